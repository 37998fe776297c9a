"""The `tessera keys` commands, run as a user runs them (a child process) against each stack."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import timedelta

from shared.db import session_scope, utcnow
from shared.security import ApiKey, authenticate_api_key
from tests.conftest import Stack
from tests.fraud.conftest import exported_values
from tests.support import REPO_ROOT, python_argv


def tessera(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``tessera <args>`` in a child process on ``stack``."""
    return subprocess.run(python_argv("-m", "services.cli", *args), cwd=REPO_ROOT, env={**os.environ, **stack.env},
                          capture_output=True, text=True, timeout=120, check=False)


def create_key(stack: Stack, tenant: str, *scopes: str) -> dict[str, str]:
    done = tessera(stack, "keys", "create", "--tenant", tenant, *(a for s in scopes for a in ("--scope", s)))
    assert done.returncode == 0, done.stderr
    return exported_values(done.stdout)


def principal_of(plaintext: str):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return authenticate_api_key(session, plaintext)


def test_keys_create_prints_export_lines_a_shell_can_paste(migrated_stack: Stack) -> None:
    env = {**os.environ, **migrated_stack.env}
    argv = " ".join(python_argv("-m", "services.cli", "keys", "create", "--tenant", "bank-paste", "--scope", "fraud"))
    shell = subprocess.run(["bash", "-c", f'eval "$({argv})" && echo "key=$API_KEY" && echo "secret=$WEBHOOK_SECRET"'],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    pasted = dict(line.split("=", 1) for line in shell.stdout.splitlines())
    assert pasted["key"].startswith("tsk_") and pasted["secret"].startswith("whsec_")
    principal = principal_of(pasted["key"])
    assert principal is not None and principal.tenant_id == "bank-paste"


def test_keys_list_shows_every_column_but_never_a_secret(migrated_stack: Stack) -> None:
    first = create_key(migrated_stack, "bank-list", "fraud")
    second = create_key(migrated_stack, "bank-list", "fraud", "iiot")
    create_key(migrated_stack, "bank-other", "cs")
    with session_scope() as session:
        hashes = [key.key_hash for key in session.query(ApiKey).all()]

    table = tessera(migrated_stack, "keys", "list", "--tenant", "bank-list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "tenant", "name", "scopes", "created", "revoked"]
    ids = [first["API_KEY"].split("_")[1], second["API_KEY"].split("_")[1]]
    assert [line.split()[:4] for line in lines[1:]] == [[ids[0], "bank-list", "default", "fraud"],
                                                        [ids[1], "bank-list", "default", "fraud,iiot"]]
    assert all(line.split()[5] == "-" for line in lines[1:])

    everything = tessera(migrated_stack, "keys", "list", "--json")
    rows = json.loads(everything.stdout)
    assert {"bank-list", "bank-other"} <= {row["tenant"] for row in rows}
    assert set(rows[0]) == {"id", "tenant", "name", "scopes", "created", "revoked"}
    # the random part of each secret (it may itself hold "_": splitting on every "_" could leave a
    # one-letter tail that any output contains), and the stored hashes
    secret_parts = [key["API_KEY"].split("_", 2)[2] for key in (first, second)]
    secret_parts += [first["WEBHOOK_SECRET"].removeprefix("whsec_"), *hashes]
    for output in (table.stdout, everything.stdout):
        for secret in secret_parts:
            assert secret not in output


def test_keys_revoke_stops_a_key_and_says_when_the_id_is_unknown(migrated_stack: Stack) -> None:
    key = create_key(migrated_stack, "bank-revoke", "fraud")["API_KEY"]
    key_id = key.split("_")[1]
    assert principal_of(key) is not None
    revoked = tessera(migrated_stack, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout, revoked.stderr
    assert principal_of(key) is None
    listed = json.loads(tessera(migrated_stack, "keys", "list", "--tenant", "bank-revoke", "--json").stdout)
    assert listed[0]["revoked"] is not None
    unknown = tessera(migrated_stack, "keys", "revoke", "does-not-exist")
    assert unknown.returncode == 1 and "no API key 'does-not-exist'" in unknown.stderr


def test_keys_rotate_keeps_tenant_and_scopes_and_honours_the_grace_period(migrated_stack: Stack) -> None:
    old_now = create_key(migrated_stack, "bank-rotate", "fraud", "iiot")["API_KEY"]
    rotated = tessera(migrated_stack, "keys", "rotate", old_now.split("_")[1])
    assert rotated.returncode == 0, rotated.stderr
    new_key = exported_values(rotated.stdout)["API_KEY"]
    new = principal_of(new_key)
    assert new is not None and new.tenant_id == "bank-rotate" and new.scopes == frozenset({"fraud", "iiot"})
    assert principal_of(old_now) is None  # no grace: revoked at once

    old_later = create_key(migrated_stack, "bank-rotate", "fraud")["API_KEY"]
    graceful = tessera(migrated_stack, "keys", "rotate", old_later.split("_")[1], "--grace-seconds", "3600")
    assert graceful.returncode == 0, graceful.stderr
    assert principal_of(exported_values(graceful.stdout)["API_KEY"]) is not None
    assert principal_of(old_later) is not None  # still inside the grace period
    with session_scope() as session:
        old_row = session.get(ApiKey, old_later.split("_")[1])
        assert old_row is not None and old_row.revoked_at is not None
        assert old_row.revoked_at.isoformat(timespec="seconds")[:19] in graceful.stdout.replace("Z", "")
        old_row.revoked_at = utcnow() - timedelta(seconds=1)  # the hour of grace is over (no waiting it out)
    assert principal_of(old_later) is None

    again = tessera(migrated_stack, "keys", "rotate", old_now.split("_")[1])
    assert again.returncode == 1 and "no active API key" in again.stderr
