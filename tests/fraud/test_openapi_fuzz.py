"""Schemathesis against the served fraud OpenAPI: the contract the documentation states is the one served.

The gateway (as ``make run`` serves it) runs under uvicorn on its own migrated SQLite stack, with a
tenant holding a ``fraud`` key. Every operation of ``/fraud/openapi.json`` is fuzzed from the schema
alone: the API key comes from the schema's ``ApiKey`` security scheme, and each signed request gets
a real ``Tessera-Signature`` over the exact bytes sent. Checks: no 5xx at all, every status code
and content type documented, every response valid against its schema, schema-valid data accepted,
invalid data refused, authentication enforced. The webhooks are fuzzed again through their FastAPI
routes (``TESSERA_HOT_ROUTES=false``; the gateway serves them as hot routes) and unsigned (401s).

Bounded and deterministic: a fixed seed and a fixed number of examples per operation (both can be
raised from the environment for a deeper run, see ``tests.schema_fuzzing.MAX_EXAMPLES``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import requests
import schemathesis
from schemathesis import BaseSchema, Case

from services.fraud.schemas import EARLIEST_TIMESTAMP, EXAMPLE_RULE, RULE_FIELDS
from shared.security import SIGNATURE_HEADER, sign_payload
from tests.conftest import Stack, sqlite_stack_at
from tests.fraud.conftest import FraudServer, FraudTenant, run_cli
from tests.schema_fuzzing import (
    fuzz_config,
    node_id_for_schemathesis,  # noqa: F401  (an autouse fixture, active here once imported)
    start_uvicorn,
    without_transport_headers,
)

SIGNED_ROUTES = r"/v1/transactions(:batch)?$"
VALID_YET_REFUSED = {
    ("GET", "/v1/cases"): "a cursor this API did not issue",
    ("PUT", "/v1/settings"): "a review_threshold above the decline_threshold, a callback_url refused",
    ("PUT", "/v1/rules/{rule_id}"): "a body whose id is not the path's",
    ("POST", "/v1/models/retrain"): "too few labelled transactions",
    ("POST", "/v1/backtests"): "a CSV without the needed columns",
}
"""Schema-valid requests that may still be a 422: rules across fields or on stored state, which JSON
Schema cannot state (each route's 422 description says them)."""
VALID_DATA_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
"""schemathesis's default for schema-valid requests (5xx is failed by its own check)."""


@dataclass
class FuzzTarget:
    """The served apps, the tenant whose key the fuzzer uses, and how often each status came back."""

    gateway_url: str
    twin_url: str
    tenant: FraudTenant
    answers: Counter[tuple[str, str, int]] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """On a stack of their own (fuzzed settings and callbacks reach no other test's worker), started
    side by side: the gateway as ``make run`` serves it, and the fraud app alone with
    ``TESSERA_HOT_ROUTES=false``, where the webhook's documented FastAPI route serves it."""
    stack: Stack = sqlite_stack_at(tmp_path_factory.mktemp("fuzz-stack"))
    run_cli(stack, "db", "upgrade")
    env = {**stack.env, "TESSERA_LOG_LEVEL": "WARNING"}
    gateway, gateway_url = start_uvicorn("services.gateway:app", env, "fuzz-gateway")
    twin, twin_url = start_uvicorn("services.fraud.api:app", {**env, "TESSERA_HOT_ROUTES": "false"}, "fuzz-twin")
    try:
        # the CLI creates the key; no database engine is needed for that
        tenant = FraudServer(stack, f"{gateway_url}/fraud/v1", engine=None).new_tenant()  # type: ignore[arg-type]
        for process in (gateway, twin):
            process.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield FuzzTarget(f"{gateway_url}/fraud", twin_url, tenant)
    finally:
        for process in (gateway, twin):
            process.stop()
            if "Traceback" in process.output:  # a 500's cause, in the test report
                print(f"--- {process.name} log with errors ---\n{process.output[-8000:]}")


def every_check_config(api_key: str) -> schemathesis.Config:
    """Every check, valid-yet-refused operations allowed their 422."""
    return fuzz_config(api_key, checks={"enabled": True}, operations=[
        {"include-method": method, "include-path": path, "checks": {
            "positive_data_acceptance": {"expected-statuses": VALID_DATA_STATUSES + ["422"]}}}
        for method, path in VALID_YET_REFUSED])


@pytest.fixture(scope="module")
def served_schema(fuzz_target: FuzzTarget) -> BaseSchema:
    """The fraud schema exactly as served."""
    return load_schema(f"{fuzz_target.gateway_url}/openapi.json", fuzz_target.tenant.api_key)


def load_schema(url: str, api_key: str) -> BaseSchema:
    """A served schema with this module's configuration and case hooks."""
    schema = schemathesis.openapi.from_url(url, config=every_check_config(api_key))
    schema.hook("map_case")(keep_event_time_in_window)
    schema.hook("map_headers")(without_transport_headers)
    return schema


def keep_event_time_in_window(_context: schemathesis.HookContext, case: Case) -> Case:
    """``map_case``: a schema-valid transaction gets an event time the webhook accepts.

    JSON Schema's ``date-time`` cannot state the accepted window (from 2000 to a day ahead of the
    server's clock; the field's description says it), so a valid case moves its time into it.
    """
    body = case.body
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and isinstance(body, dict) and not _inside_window(body.get("timestamp")):
        body["timestamp"] = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    return case


def _inside_window(timestamp: object) -> bool:
    """True for a time the webhook accepts, and for anything that is not a time string (left as generated)."""
    if not isinstance(timestamp, str):
        return True
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return EARLIEST_TIMESTAMP <= moment <= datetime.now(UTC)
    except (ValueError, OverflowError):
        return False


class SignedBody(requests.auth.AuthBase):
    """Replaces a request's ``Tessera-Signature`` by a valid one over the exact body bytes sent.

    Only where the request carries the header: a case that left the required header out must
    still be refused.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        raw = body.encode() if isinstance(body, str) else body
        if SIGNATURE_HEADER in request.headers and isinstance(raw, bytes):
            request.headers[SIGNATURE_HEADER] = sign_payload(self.secret, raw, int(time.time()))
        return request


fraud_api = schemathesis.pytest.from_fixture("served_schema")
twin_api = schemathesis.pytest.from_fixture("twin_schema")


@pytest.fixture(scope="module")
def twin_schema(fuzz_target: FuzzTarget) -> BaseSchema:
    """The same schema as served by the fraud app whose webhook is its FastAPI route."""
    return load_schema(f"{fuzz_target.twin_url}/openapi.json", fuzz_target.tenant.api_key)


@fraud_api.parametrize()
def test_every_operation_honours_the_served_contract(case: Case, fuzz_target: FuzzTarget) -> None:
    response = case.call_and_validate(auth=SignedBody(fuzz_target.tenant.webhook_secret))
    fuzz_target.answers["signed", case.operation.label, response.status_code] += 1


@twin_api.include(path_regex=SIGNED_ROUTES, method="POST").parametrize()
def test_the_webhooks_fastapi_routes_honour_it_too(case: Case, fuzz_target: FuzzTarget) -> None:
    response = case.call_and_validate(auth=SignedBody(fuzz_target.tenant.webhook_secret))
    fuzz_target.answers["twin", case.operation.label, response.status_code] += 1


@fraud_api.include(path_regex=SIGNED_ROUTES, method="POST").parametrize()
def test_unsigned_webhooks_are_documented_401s(case: Case, fuzz_target: FuzzTarget) -> None:
    response = case.call_and_validate()
    fuzz_target.answers["unsigned", case.operation.label, response.status_code] += 1


def test_the_fuzzing_reached_the_scoring_and_never_failed(fuzz_target: FuzzTarget) -> None:
    """The runs above did what they are for: signed webhooks scored, unsigned ones refused, no 5xx."""
    answers = fuzz_target.answers
    if not answers:
        pytest.skip("run with the fuzz tests above (this one reads their answers)")
    print("fuzz answers (run, operation, status): count", *sorted(answers.items()), sep="\n")
    assert not [key for key in answers if key[2] >= 500]
    for run in ("signed", "twin"):
        assert answers[run, "POST /v1/transactions", 200] and answers[run, "POST /v1/transactions:batch", 200]
    assert answers["signed", "POST /v1/rules", 201]
    unsigned = {status for run, _, status in answers if run == "unsigned"}
    assert 401 in unsigned and not any(200 <= status < 300 for status in unsigned)


def test_a_wrong_method_lists_every_method_of_the_path(fuzz_target: FuzzTarget) -> None:
    response = requests.options(f"{fuzz_target.gateway_url}/v1/settings",
                                headers={"X-API-Key": fuzz_target.tenant.api_key}, timeout=10)
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["allow"] == "GET, PUT"


def test_the_served_schema_states_keys_signed_bodies_problems_and_rule_fields(fuzz_target: FuzzTarget) -> None:
    schema = requests.get(f"{fuzz_target.gateway_url}/openapi.json", timeout=10).json()
    components = schema["components"]
    assert components["securitySchemes"]["ApiKey"] == {
        **components["securitySchemes"]["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert components["securitySchemes"]["Bearer"]["scheme"] == "bearer"
    webhook = schema["paths"]["/v1/transactions"]["post"]
    assert webhook["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert webhook["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TransactionIn"}
    assert [(p["name"], p["in"], p["required"]) for p in webhook["parameters"]] == [
        (SIGNATURE_HEADER, "header", True)]
    for status in ("401", "403", "409", "413", "415", "422", "503", "504"):
        assert webhook["responses"][status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    batch = schema["paths"]["/v1/transactions:batch"]["post"]["requestBody"]["content"]["application/json"]
    assert batch["schema"] == {"$ref": "#/components/schemas/BatchIn"} and batch["example"]["transactions"]
    problem_members = set(components["schemas"]["Problem"]["properties"])
    assert {"type", "title", "status", "detail", "request_id", "errors"} <= problem_members
    condition = components["schemas"]["Condition"]
    assert condition["properties"]["field"]["enum"] == sorted(RULE_FIELDS)
    assert set(condition["properties"]["op"]["enum"]) == {"gt", "gte", "lt", "lte", "eq", "ne", "in", "not_in"}
    assert components["schemas"]["RuleIn"]["examples"] == [EXAMPLE_RULE]
