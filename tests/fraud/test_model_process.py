"""The fraud model served from a child process of the API process (``TESSERA_FRAUD_MODEL_PROCESS``, on by
default): a real uvicorn server on the embedded default scores through it, a killed child costs the
requests it held a 503 (the sender retries; the same id then scores exactly once) and is replaced.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Stack
from tests.fraud.conftest import FraudServer, FraudTenant, run_cli, serve_fraud, transaction
from tests.support import descendants, model_child


def _model_child(server_pid: int) -> int:
    """The pid of the API process's model child (multiprocessing's spawn entry point)."""
    children = [pid for pid in descendants(server_pid) if model_child(pid)]
    assert children, f"no model child process under {server_pid}"
    return children[0]


@pytest.fixture(scope="module")
def fraud_api(sqlite_stack: Stack) -> Iterator[FraudServer]:
    run_cli(sqlite_stack, "db", "upgrade")
    with serve_fraud(sqlite_stack, {"TESSERA_FRAUD_MODEL_PROCESS": "true"}, name="fraud-model-process") as server:
        yield server


def _post(client: httpx.Client, tenant: FraudTenant, payload: dict[str, object]) -> httpx.Response:
    body, headers = tenant.signed(payload)
    return client.post("/transactions", content=body, headers=headers)


def test_the_webhook_scores_through_the_model_child_and_survives_its_death(fraud_api: FraudServer) -> None:
    tenant = fraud_api.new_tenant()
    server_pid = fraud_api.pid
    with tenant.client() as client:
        first = _post(client, tenant, transaction(amount=42.5))
        assert first.status_code == 200, first.text
        child = _model_child(server_pid)
        assert child != server_pid

        os.kill(child, signal.SIGKILL)
        resent = transaction(amount=77.0)
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # as a bank's sender does: resend the same id until it is answered
            response = _post(client, tenant, resent)
            statuses.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        replacement = _model_child(server_pid)
        assert replacement != child

        stored = client.get(f"/transactions/{resent['id']}")
        assert stored.status_code == 200 and stored.json()["score"] == response.json()["score"]
        replay = _post(client, tenant, resent).json()  # scored once: a further resend replays the decision
        assert replay.pop("replayed") is True
        assert replay == {key: value for key, value in response.json().items() if key != "replayed"}


SCORE_WITHOUT_TORCH = """
import sys
from datetime import datetime
from model_runtime.device import resolve_placement
from model_runtime.runtime import LoadContext
from services.fraud.features import WindowAggregates
from services.fraud.serving import ScoringItem, _load, default_artifact_dir, score_batch
scorer = _load(LoadContext(default_artifact_dir(), None, resolve_placement("cpu", None)))
first_use = WindowAggregates(1, 1, 1, 1, 1, 1, 1, 1, 1, None, 0, 0, 0, 0, 0, 0, 0, 0, None)
[scored] = score_batch(scorer, [ScoringItem(12.5, datetime(2026, 1, 1), 1.767e9, "t-1", first_use, 0.0)])
print(round(scored.score, 6), "torch" in sys.modules)
"""


def test_the_shipped_model_scores_without_importing_torch() -> None:
    """What the model child imports: the ONNX sequence graph and the booster, no torch (~180 MB less a child)."""
    import subprocess

    from tests.support import REPO_ROOT, python_argv

    done = subprocess.run(python_argv("-c", SCORE_WITHOUT_TORCH), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    score, torch_loaded = done.stdout.split()
    assert 0.0 <= float(score) <= 1.0
    assert torch_loaded == "False"


def test_the_api_modules_import_without_the_training_libraries() -> None:
    """Each server and test stack start imports the fraud API: training's torch, LightGBM and scikit-learn
    (~4 s of a start on this box) load in the jobs that train and back-test, not there."""
    import subprocess

    from tests.support import REPO_ROOT, python_argv

    check = ("import sys, services.fraud.api, services.gateway; "
             "print(' '.join(m for m in ('torch', 'lightgbm', 'sklearn') if m in sys.modules))")
    done = subprocess.run(python_argv("-c", check), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout
