"""Registry behaviour: warm-up, artifacts, hot swap, sync path, event-loop lifecycle, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from runtime_fakes import GatedModel, make_spec, model_threads, wait_entered, wait_until

from model_runtime import (
    ArtifactError,
    LoadContext,
    ModelRuntime,
    ModelSpec,
    get_runtime,
    load_manifest,
    save_artifact,
)
from model_runtime.errors import BadInput, ModelNotReady


def _positive(item: object) -> float:
    if not isinstance(item, (int, float)) or item < 0:
        raise ValueError("expected a non-negative number")
    return float(item)


def test_warm_up_runs_before_the_model_takes_traffic(runtime: ModelRuntime) -> None:
    model = GatedModel()
    asyncio.run(runtime.load(make_spec(model, warmup_items=[1, 2, 3])))
    assert model.batches == [[1], [1, 2, 3]]
    assert runtime.stats()["double"]["per_item_ms"] > 0


def test_failing_warm_up_refuses_the_load(runtime: ModelRuntime) -> None:
    with pytest.raises(RuntimeError, match="warm-up failed"):
        asyncio.run(runtime.load(make_spec(GatedModel(), warmup_items=[1, -1])))
    assert runtime.loaded() == {}


def _sealed_artifact(directory: Path, scale: float = 3.0) -> Path:
    directory.mkdir(parents=True)
    torch.save({"scale": torch.tensor(scale)}, directory / "weights.pt")
    save_artifact(directory, name="scaler", version="v7", framework="torch", metrics={"mae": 0.0})
    return directory


def _scaler_spec(artifact_dir: Path, version: str = "v7") -> ModelSpec:
    def load(ctx: LoadContext) -> torch.Tensor:
        assert ctx.artifact_dir is not None and ctx.manifest is not None
        return torch.load(ctx.artifact_dir / "weights.pt")["scale"]

    return ModelSpec(name="scaler", version=version, loader=load, artifact_dir=artifact_dir,
                     run_batch=lambda scale, items: (torch.tensor(items) * scale).tolist(),
                     warmup_items=[1.0])


def test_artifact_loads_with_its_version_and_digest(runtime: ModelRuntime, tmp_path: Path) -> None:
    artifact = _sealed_artifact(tmp_path / "scaler" / "v7")

    async def scenario() -> float:
        await runtime.load(_scaler_spec(artifact))
        return await runtime.predict("scaler", 2.0)

    assert asyncio.run(scenario()) == 6.0
    info = runtime.loaded()["scaler"]
    assert info["version"] == "v7" and info["digest"] == load_manifest(artifact).digest
    assert info["device"] == "cpu" and info["backend"] == "Tensor"


def test_artifact_with_sha256_mismatch_is_refused(runtime: ModelRuntime, tmp_path: Path) -> None:
    artifact = _sealed_artifact(tmp_path / "scaler" / "v7")
    torch.save({"scale": torch.tensor(1000.0)}, artifact / "weights.pt")  # tampered after sealing
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        asyncio.run(runtime.load(_scaler_spec(artifact)))
    assert not runtime.is_ready(["scaler"])


def test_spec_version_must_match_the_artifact(runtime: ModelRuntime, tmp_path: Path) -> None:
    artifact = _sealed_artifact(tmp_path / "scaler" / "v7")
    with pytest.raises(ArtifactError, match="v8"):
        runtime.load_sync(_scaler_spec(artifact, version="v8"))


def test_hot_swap_under_load_loses_no_request(runtime: ModelRuntime) -> None:
    old, new = GatedModel(tag="v1"), GatedModel(tag="v2")

    async def client(start: int, stop: asyncio.Event) -> list[tuple[str, float]]:
        answers, x = [], start
        while not stop.is_set():
            answers.append(await runtime.predict("double", x))
            x += 1
        return answers

    async def scenario() -> tuple[list[list[tuple[str, float]]], tuple[str, float]]:
        await runtime.load(make_spec(old, version="v1", max_batch_size=4, warmup_items=[0]))
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(1000 * i, stop)) for i in range(8)]
        await wait_until(lambda: len(old.seen()) > 50)
        await runtime.swap("double", make_spec(new, version="v2", max_batch_size=4, warmup_items=[0]))
        await wait_until(lambda: len(new.seen()) > 50)
        stop.set()
        return await asyncio.gather(*clients), await runtime.predict("double", 1)

    per_client, after = asyncio.run(scenario())
    assert after == ("v2", 2)
    assert runtime.loaded()["double"]["version"] == "v2"
    for answers in per_client:  # every request answered, in order, v1 then v2, never mixed back
        tags = [tag for tag, _ in answers]
        assert tags == sorted(tags) and tags[0] == "v1" and tags[-1] == "v2"
    assert len(model_threads()) == 1  # the v1 worker thread has stopped


def test_swap_under_held_requests_drains_the_old_version(runtime: ModelRuntime) -> None:
    old, new = GatedModel(tag="v1"), GatedModel(tag="v2")

    async def scenario() -> tuple[list[object], object]:
        await runtime.load(make_spec(old, version="v1"))
        old.hold()
        inflight = [asyncio.create_task(runtime.predict("double", x)) for x in (1, 2, 3)]
        await wait_entered(old)
        swap = asyncio.create_task(runtime.swap("double", make_spec(new, version="v2")))
        await wait_until(lambda: runtime.loaded()["double"]["version"] == "v2")
        fresh = await runtime.predict("double", 4)
        assert not swap.done()  # still draining v1
        old.release()
        await swap
        return await asyncio.gather(*inflight), fresh

    drained, fresh = asyncio.run(scenario())
    assert drained == [("v1", 2), ("v1", 4), ("v1", 6)]
    assert fresh == ("v2", 8)


class TinyNet(torch.nn.Module):
    """(N, 4) float -> (N, 2) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _tiny_spec(net: TinyNet) -> ModelSpec:
    def prepare(item: object) -> torch.Tensor:
        tensor = torch.as_tensor(item, dtype=torch.float32)
        if tensor.shape != (4,):
            raise ValueError(f"expected 4 features, got shape {tuple(tensor.shape)}")
        return tensor

    return ModelSpec(name="tiny", version="v1", loader=lambda ctx: net.to(ctx.placement.device).eval(),
                     prepare=prepare, run_batch=lambda m, items: list(m(torch.stack(items))),
                     finalize=lambda row: row.tolist(), warmup_items=[[0.0] * 4, [1.0] * 4])


def test_real_torch_model_through_the_runtime(runtime: ModelRuntime) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    inputs = torch.randn(32, 4)

    async def scenario() -> list[list[float]]:
        await runtime.load(_tiny_spec(net))
        return await asyncio.gather(*(runtime.predict("tiny", row.tolist()) for row in inputs))

    answers = torch.tensor(asyncio.run(scenario()))
    with torch.inference_mode():
        assert torch.allclose(answers, net(inputs), atol=1e-5)
    assert runtime.loaded()["tiny"]["backend"] == "eager"


def test_sync_path_runs_batches_without_an_event_loop(runtime: ModelRuntime) -> None:
    model = GatedModel()
    runtime.load_sync(make_spec(model, max_batch_size=4, prepare=_positive))
    answers = runtime.predict_many_sync("double", [1, 2, 3, 4, 5, "x", 6], return_exceptions=True)
    assert answers[:5] == [2.0, 4.0, 6.0, 8.0, 10.0] and answers[6] == 12.0
    assert isinstance(answers[5], BadInput)
    assert model.batches == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(BadInput):
        runtime.predict_many_sync("double", ["x"])


def test_runtime_created_before_any_loop_serves_successive_loops(runtime: ModelRuntime) -> None:
    runtime.load_sync(make_spec(GatedModel()))
    assert asyncio.run(runtime.predict("double", 1)) == 2
    assert asyncio.run(runtime.predict("double", 2)) == 4  # a new loop gets a new batcher
    assert len(model_threads()) == 1
    runtime.close_sync()
    assert model_threads() == []


def test_close_fails_waiting_callers_and_leaves_no_thread(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> list[object]:
        await runtime.load(make_spec(model))
        model.hold()
        waiting = [asyncio.create_task(runtime.predict("double", x)) for x in (1, 2, 3)]
        await wait_entered(model)
        closing = asyncio.create_task(runtime.close())
        results = await asyncio.gather(*waiting, return_exceptions=True)
        model.release()
        await closing
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, ModelNotReady) for r in results)
    assert model_threads() == [] and runtime.loaded() == {}
    with pytest.raises(ModelNotReady):
        asyncio.run(runtime.predict("double", 1))


def test_stats_and_readiness(runtime: ModelRuntime) -> None:
    async def scenario() -> None:
        await runtime.load(make_spec(GatedModel()))
        await asyncio.gather(*(runtime.predict("double", x) for x in range(20)))

    asyncio.run(scenario())
    stats = runtime.stats()["double"]
    assert stats["samples"] == 20 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert runtime.is_ready(["double"]) and not runtime.is_ready(["double", "absent"])


def test_get_runtime_is_one_per_process() -> None:
    assert get_runtime() is get_runtime()
