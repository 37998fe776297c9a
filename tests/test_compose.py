"""compose.yaml is a valid Compose file with the topology DESIGN.md describes (no Docker engine needed)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from tests.support import REPO_ROOT

SCHEMA = json.loads((Path(__file__).parent / "data" / "compose_spec.json").read_text())


def load_compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    compose = load_compose()
    validator = jsonschema.Draft201909Validator(SCHEMA)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_compose_has_one_api_per_vertical_workers_per_queue_gpu_and_flower() -> None:
    services = load_compose()["services"]
    assert {"postgres", "redis", "flower", "beat", "migrate"} <= set(services)
    for vertical in ("fraud", "cs", "nodule", "iiot"):
        assert f"api-{vertical}" in services
        worker = services[f"worker-{vertical}"]
        assert vertical in worker["command"]
    for gpu_worker in ("worker-cs", "worker-nodule"):
        devices = services[gpu_worker]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        if name.startswith(("api-", "worker-")):
            assert service["environment"]["TESSERA_BROKER_URL"].startswith("redis://")
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
