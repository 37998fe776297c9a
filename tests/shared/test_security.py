"""Webhook signatures (pure) and API keys (stored hashed, scoped) on both databases."""

from __future__ import annotations

import time

import pytest

from shared.db import session_scope
from shared.security import (
    ApiKey,
    SignatureError,
    authenticate_api_key,
    create_api_key,
    revoke_api_key,
    sign_payload,
    verify_signature,
)

SECRET = "whsec_test"
BODY = b'{"id":"tx-1","amount":12.5}'


def test_valid_signature_returns_its_timestamp() -> None:
    now = time.time()
    header = sign_payload(SECRET, BODY, int(now))
    assert verify_signature(header, BODY, [SECRET], tolerance_s=300, now=now) == int(now)


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        (None, BODY, "missing"),
        ("v1=abc", BODY, "malformed"),
        ("t=abc,v1=00", BODY, "not an integer"),
        (sign_payload(SECRET, BODY, int(time.time()) - 400), BODY, "replay window"),
        (sign_payload(SECRET, BODY, int(time.time()) + 400), BODY, "replay window"),
        (sign_payload(SECRET, BODY), BODY + b" ", "does not match"),
        (sign_payload("whsec_other", BODY), BODY, "does not match"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(header: str | None, body: bytes, message: str) -> None:
    with pytest.raises(SignatureError, match=message) as caught:
        verify_signature(header, body, [SECRET], tolerance_s=300)
    assert caught.value.status == 401


def test_rotated_secret_is_accepted_during_rotation() -> None:
    header = sign_payload("whsec_previous", BODY)
    verify_signature(header, BODY, [SECRET, "whsec_previous"], tolerance_s=300)


def test_api_keys_are_stored_hashed_scoped_and_revocable(migrated_stack) -> None:
    with session_scope() as session:
        plaintext = create_api_key(session, tenant_id="bank-a", name="processor", scopes=["fraud"])
    with session_scope() as session:
        stored = session.get(ApiKey, plaintext.split("_")[1])
        assert plaintext not in stored.key_hash and len(stored.key_hash) == 64
        principal = authenticate_api_key(session, plaintext)
        assert principal is not None and principal.tenant_id == "bank-a"
        assert principal.scopes == frozenset({"fraud"})
        assert authenticate_api_key(session, plaintext[:-2] + "xx") is None
        revoke_api_key(session, principal.key_id)
    with session_scope() as session:
        from shared import security

        security._principal_cache.clear()
        assert authenticate_api_key(session, plaintext) is None


def test_unknown_scopes_are_refused(migrated_stack) -> None:
    with session_scope() as session, pytest.raises(ValueError, match="scopes"):
        create_api_key(session, tenant_id="bank-a", name="x", scopes=["payroll"])
