"""A model family for the registry tests: each artifact answers one fixed word, so a reply names the
version that served it. Also a job task scoring with it, loaded by a real worker with
``--include tests.model_runtime.versioned_echo``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from model_runtime.artifacts import save_artifact
from model_runtime.runtime import LoadContext, ModelSpec, get_runtime
from model_runtime.versions import LiveModels, reload_in_workers
from shared.jobs import Job, job_task

ECHO_MODEL = "echo"
DEFAULT_ARTIFACT_ENV = "TESSERA_TEST_ECHO_DEFAULT"
"""The worker's default echo artifact (a directory), given in its environment."""


def echo_artifact(root: Path, version: str, *, word: str | None = None) -> Path:
    """A sealed echo artifact ``root/<version>`` answering ``word`` (the version itself by default)."""
    directory = root / version
    directory.mkdir(parents=True)
    (directory / "word.txt").write_text(word or version)
    save_artifact(directory, name=ECHO_MODEL, version=version, framework="text", metrics={"accuracy": 1.0},
                  data="none: a test model", rebuild_command="echo_artifact()")
    return directory


def _load(context: LoadContext) -> str:
    assert context.artifact_dir is not None
    return (context.artifact_dir / "word.txt").read_text()


def echo_spec(name: str, artifact_dir: Path) -> ModelSpec:
    """Serve an echo artifact under runtime name ``name``: every item is answered with its word."""
    return ModelSpec(name=name, version="", loader=_load, run_batch=lambda word, items: [word for _ in items],
                     artifact_dir=artifact_dir, uses_torch=False, max_wait_ms=0.5, warmup_items=["warm-up"])


def _worker_default() -> Path | None:
    configured = os.environ.get(DEFAULT_ARTIFACT_ENV)
    return Path(configured) if configured else None


WORKER_ECHO_MODELS = reload_in_workers(LiveModels(ECHO_MODEL, echo_spec, _worker_default, unload_grace_s=0.0))
"""What a worker process serves of the echo family, kept current at task start."""


@job_task(name="tests.model_runtime.echo_answer", queue="default")
def echo_answer(session: Session, job: Job) -> dict[str, Any]:
    """Score one item for the payload's tenant in this worker process: the word it got and who answered."""
    name = WORKER_ECHO_MODELS.model_for_sync(job.payload["tenant_id"])
    [word] = get_runtime().predict_many_sync(name, ["probe"])
    return {"word": word, "runtime_name": name, "pid": os.getpid()}
