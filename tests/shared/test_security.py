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
    compute_signature,
    create_api_key,
    list_api_keys,
    revoke_api_key,
    rotate_api_key,
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
        (lambda: "v1=" + "0" * 64, BODY, "no t="),
        (lambda: "t=abc,v1=" + "0" * 64, BODY, "t must be 1-12 ASCII digits"),
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
        assert stored is not None
        assert plaintext not in stored.key_hash and len(stored.key_hash) == 64
        principal = authenticate_api_key(session, plaintext)
        assert principal is not None and principal.tenant_id == "bank-a"
        assert principal.scopes == frozenset({"fraud"})
        assert authenticate_api_key(session, plaintext[:-2] + "xx") is None
        revoke_api_key(session, principal.key_id)
    with session_scope() as session:
        assert authenticate_api_key(session, plaintext) is None


def test_rotation_keeps_tenant_and_scopes_and_revokes_the_old_key_after_the_grace(migrated_stack) -> None:
    with session_scope() as session:
        old_plaintext = create_api_key(session, tenant_id="bank-r", name="processor", scopes=["fraud", "iiot"])
    old_id = old_plaintext.split("_")[1]
    with session_scope() as session:
        _, new_plaintext = rotate_api_key(session, old_id, grace_s=60)
    with session_scope() as session:
        new = authenticate_api_key(session, new_plaintext)
        assert new is not None and new.tenant_id == "bank-r" and new.scopes == frozenset({"fraud", "iiot"})
        assert authenticate_api_key(session, old_plaintext) is not None  # inside the grace period
        assert [k.id for k in list_api_keys(session, "bank-r")] == [old_id, new.key_id]
        revoke_api_key(session, old_id)  # an immediate revocation overrides the grace period
    with session_scope() as session:
        assert authenticate_api_key(session, old_plaintext) is None
        with pytest.raises(LookupError, match="no active API key"):
            rotate_api_key(session, old_id)


def test_unknown_scopes_are_refused(migrated_stack) -> None:
    with session_scope() as session, pytest.raises(ValueError, match="scopes"):
        create_api_key(session, tenant_id="bank-a", name="x", scopes=["payroll"])


@pytest.mark.parametrize("tenant_id", ["bank-a", "b", "acme.eu_1-2", "x" * 40])
def test_tenant_ids_that_fit_every_derived_name_are_accepted(tenant_id: str) -> None:
    assert TENANT_ID_PATTERN.match(tenant_id)


@pytest.mark.parametrize("tenant_id", ["", "x" * 41, "Bank", "{bank}", "bank a", "-bank", "bank|a"])
def test_tenant_ids_that_would_break_keys_or_namespaces_are_refused(tenant_id: str) -> None:
    assert not TENANT_ID_PATTERN.match(tenant_id)


GOOD_HEX = "a" * 64


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("t=" + "9" * 5000 + ",v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),
        ("t=\u00b2,v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),  # str.isdigit() is True for '²'
        ("t=\u0661\u0662,v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),  # Arabic-Indic digits
        ("t=-5,v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),
        ("t=,v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),
        ("t=1,t=2,v1=" + GOOD_HEX, "more than one t="),
        ("t=1", "no v1="),
        ("t=1,v1=", "v1 must be 64 hex characters"),
        ("t=1,v1=" + "\u00e9" * 64, "v1 must be 64 hex characters"),  # compare_digest refuses non-ASCII str
        ("t=1,v1=" + "g" * 64, "v1 must be 64 hex characters"),
        ("t=1,v1=" + "a" * 63, "v1 must be 64 hex characters"),
        ("t=1,v1=" + "a" * 65, "v1 must be 64 hex characters"),
        ("t=1," + ",".join(["v1=" + GOOD_HEX] * 9), "at most 8 v1="),
        ("garbage", "no t="),
    ],
    ids=["t-5000-digits", "t-superscript", "t-arabic-digits", "t-negative", "t-empty", "t-twice", "no-v1",
         "v1-empty", "v1-non-ascii", "v1-not-hex", "v1-short", "v1-long", "v1-too-many", "garbage"],
)
def test_malformed_signature_headers_are_signature_errors(header: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message) as caught:
        verify_signature(header, BODY, [SECRET], tolerance_s=300, now=1.0)
    assert caught.value.status == 401


def test_the_largest_timestamp_is_checked_against_the_window() -> None:
    with pytest.raises(SignatureError, match="replay window"):
        verify_signature("t=999999999999,v1=" + GOOD_HEX, BODY, [SECRET], tolerance_s=300)


def test_upper_case_hex_and_unknown_schemes_are_accepted() -> None:
    now = int(time.time())
    header = f"t={now},v0=deadbeef,v1={compute_signature(SECRET, now, BODY).upper()}"
    assert verify_signature(header, BODY, [SECRET], tolerance_s=300, now=now) == now
