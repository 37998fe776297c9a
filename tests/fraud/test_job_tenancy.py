"""A fraud job is visible to its own tenant only: any other key gets the same 404 as for no job."""

from __future__ import annotations

import uuid

from tests.fraud.conftest import FraudServer
from tests.fraud.test_webhook_api import assert_problem


def test_another_tenants_job_is_not_found(fraud_server: FraudServer) -> None:
    owner, other = fraud_server.new_tenant(), fraud_server.new_tenant()
    csv = (f"id,timestamp,customer_id,terminal_id,amount\n"
           f"tx-{uuid.uuid4().hex},2026-11-23T10:15:00Z,c-42,t-1,10.0\n").encode()
    with owner.client() as client:
        submitted = client.post("/backtests", files={"file": ("history.csv", csv)})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        assert client.get(f"/jobs/{job_id}").json()["id"] == job_id
    with other.client() as client:
        foreign = assert_problem(client.get(f"/jobs/{job_id}"), 404, job_id)
        missing = assert_problem(client.get(f"/jobs/{uuid.uuid4().hex}"), 404, "does not exist")
    assert foreign.keys() == missing.keys(), "another tenant's job looks exactly like no job"
