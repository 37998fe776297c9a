"""Webhook signatures (pure) and API keys (stored hashed, scoped) on both databases."""

from __future__ import annotations

import time

import pytest

from shared.db import session_scope
from shared.security import (
    TENANT_ID_PATTERN,
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


def _signed(secret: str = SECRET, body: bytes = BODY, age_s: int = 0) -> str:
    return sign_payload(secret, body, int(time.time()) - age_s)


@pytest.mark.parametrize(
    ("make_header", "body", "message"),
    [
        (lambda: None, BODY, "missing"),
        (lambda: "v1=abc", BODY, "malformed"),
        (lambda: "t=abc,v1=00", BODY, "not an integer"),
        (lambda: _signed(age_s=301), BODY, "replay window"),
        (lambda: _signed(age_s=-301), BODY, "replay window"),
        (lambda: _signed(), BODY + b" ", "does not match"),
        (lambda: _signed(secret="whsec_other"), BODY, "does not match"),
    ],
    ids=["missing", "malformed", "bad-timestamp", "expired", "from-the-future", "tampered", "other-secret"],
)
def test_bad_signatures_are_refused_with_a_reason(make_header, body: bytes, message: str) -> None:
    # Headers are made inside the test: a timestamp taken at collection would expire in a long run.
    with pytest.raises(SignatureError, match=message) as caught:
        verify_signature(make_header(), body, [SECRET], tolerance_s=300)
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


@pytest.mark.parametrize("tenant_id", ["bank-a", "b", "acme.eu_1-2", "x" * 40])
def test_tenant_ids_that_fit_every_derived_name_are_accepted(tenant_id: str) -> None:
    assert TENANT_ID_PATTERN.match(tenant_id)


@pytest.mark.parametrize("tenant_id", ["", "x" * 41, "Bank", "{bank}", "bank a", "-bank", "bank|a"])
def test_tenant_ids_that_would_break_keys_or_namespaces_are_refused(tenant_id: str) -> None:
    assert not TENANT_ID_PATTERN.match(tenant_id)
