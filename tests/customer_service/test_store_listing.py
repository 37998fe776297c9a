"""What the API adds to the customer-service storage, on SQLite and on PostgreSQL: the calls list
(newest first, by status, keyset pages that calls started meanwhile do not shift) and a tenant's
stream credentials (sections set, kept, removed; one tenant's never another's)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from services.customer_service import store
from services.customer_service.assist_schemas import IntegrationsIn
from shared.db import session_scope, utcnow
from tests.conftest import POSTGRESQL, SQLITE, Stack

pytestmark = pytest.mark.stack_variants(SQLITE, POSTGRESQL)
SID = "AC" + "ab" * 16
SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


@pytest.fixture
def tenant(migrated_stack: Stack) -> str:
    return f"cs-{uuid.uuid4().hex[:8]}"


def test_calls_are_listed_newest_first_by_status_in_keyset_pages(tenant: str) -> None:
    start = utcnow() - timedelta(hours=1)
    with session_scope() as session:
        for index in range(5):  # CA-1 and CA-2 start at the same time: the row id orders them
            store.open_call(session, tenant, f"CA-{index}", protocol="twilio",
                            started_at=start + timedelta(seconds=min(index, 1) if index < 3 else index))
        store.close_call(session, tenant, "CA-0", reason="completed")
        store.open_call(session, "someone-else", "CA-9", protocol="twilio")
    with session_scope() as session:
        ids = [call.call_id for call in store.list_calls(session, tenant)]
        assert ids == ["CA-4", "CA-3", "CA-2", "CA-1", "CA-0"]
        assert [c.call_id for c in store.list_calls(session, tenant, status="ended")] == ["CA-0"]
        first = store.list_calls(session, tenant, limit=3)
        after = store.CallPosition(first[-1].started_at, first[-1].id)
        store.open_call(session, tenant, "CA-new", protocol="audiohook")
        assert [c.call_id for c in store.list_calls(session, tenant, limit=3, after=after)] == ["CA-1", "CA-0"]
        with pytest.raises(ValueError, match="unknown call status"):
            store.list_calls(session, tenant, status="sideways")


def test_stream_credentials_are_set_kept_and_removed_by_section(tenant: str) -> None:
    with session_scope() as session:
        assert store.integration_credentials(session, tenant) is None
        assert not store.integrations(session, tenant).twilio_auth_token_set
        store.set_integrations(session, tenant, IntegrationsIn.model_validate(
            {"twilio": {"account_sid": SID, "auth_token": "t" * 32}, "audiohook": {"client_secret": SECRET}}))
    with session_scope() as session:
        store.set_integrations(session, tenant, IntegrationsIn.model_validate({"twilio": None}))
        shown = store.integrations(session, tenant)
        assert (shown.twilio_account_sid, shown.twilio_auth_token_set, shown.audiohook_client_secret_set) == (
            None, False, True)
        stored = store.integration_credentials(session, tenant)
        assert stored == store.IntegrationCredentials(None, None, SECRET)
        assert store.integration_credentials(session, f"{tenant}-other") is None
