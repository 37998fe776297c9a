"""The gate is honest: a variant whose server is absent is skipped outside CI and fails the run under it.

A tiny test file runs in a child pytest with the suite's fixtures (``-p tests.conftest``) and
PostgreSQL and Redis addresses where nothing listens.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.support import REPO_ROOT, free_port, python_argv

TINY_SUITE = '''
import pytest

from tests.conftest import POSTGRESQL


def test_on_each_deployment(stack):
    assert stack.database_url


@pytest.mark.stack_variants(POSTGRESQL)
def test_on_postgresql_without_redis(stack):
    assert stack.redis_url is None


def test_on_a_dataset_beside_the_clone():
    pytest.skip("handbook data absent: ../shared/datasets/fraud_handbook")
'''


def run_tiny_suite(tmp_path: Path, ci: bool) -> tuple[int, str, dict[str, int]]:
    """Exit code, output and outcome counts of :data:`TINY_SUITE` with no server reachable."""
    (tmp_path / "test_tiny.py").write_text(TINY_SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # schemathesis and hypothesis take seconds to import; unused here
    env["TESSERA_TEST_PG_ADMIN"] = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    env["TESSERA_TEST_REDIS"] = f"redis://127.0.0.1:{free_port()}"
    if ci:
        env["CI"] = "true"
    done = subprocess.run(python_argv("-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rA",
                                      "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
                                      str(tmp_path / "test_tiny.py")),
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    counts = {outcome: int(count) for count, outcome in re.findall(r"(\d+) (passed|skipped|failed|errors?)", summary)}
    return done.returncode, done.stdout, counts


def test_outside_ci_a_variant_without_its_server_is_skipped_saying_why(tmp_path: Path) -> None:
    code, output, counts = run_tiny_suite(tmp_path, ci=False)
    assert code == 0, output
    assert counts == {"passed": 1, "skipped": 3}, output
    assert "Redis is not listening on 127.0.0.1:" in output
    assert "PostgreSQL is not listening on 127.0.0.1:" in output
    assert "run `make services` to start it" in output


def test_under_ci_a_variant_without_its_server_fails_the_run(tmp_path: Path) -> None:
    code, output, counts = run_tiny_suite(tmp_path, ci=True)
    assert code == 1, output
    assert counts == {"passed": 1, "errors": 2, "skipped": 1}, output
    assert re.search(r"ERROR .*test_on_each_deployment\[postgresql-redis\] - Failed: Redis is not listening", output)
    assert re.search(r"ERROR .*test_on_postgresql_without_redis\[postgresql-database\] - Failed: PostgreSQL is "
                     r"not listening .*CI=true: a skipped variant fails the run", output)
    assert re.search(r"SKIPPED .*handbook data absent", output), "a dataset absent beside the clone stays a skip"
