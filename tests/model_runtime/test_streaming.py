"""Streaming sessions on a real recurrent model (a GRU cell): batched across streams, exact per stream."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY
from runtime_fakes import wait_until

from model_runtime import ModelRuntime
from model_runtime.errors import BadInput, ModelNotReady, RuntimeOverloaded
from model_runtime.streaming import (
    SessionClosed,
    StreamAlreadyOpen,
    StreamingModel,
    StreamingSessions,
    StreamStep,
    run_steps,
)
from shared.errors import Conflict, as_problem

FEATURES, HIDDEN, CLASSES, FRAMES = 4, 8, 3, 5
RTOL, ATOL = 1e-5, 1e-6


class RecurrentTagger(torch.nn.Module):
    """A GRU cell over the frames of each chunk and a linear head on its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.GRUCell(FEATURES, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)


class SpiedStep:
    """The batched step function, recording every batch's size and held on a gate when asked."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, model: RecurrentTagger, states: dict[str, Any],
                 chunks: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """states: hidden (B, HIDDEN), frames (B,); chunks: (B, FRAMES, FEATURES) -> logits (B, CLASSES)."""
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        self.batch_sizes.append(chunks.shape[0])
        return recurrent_step(model, states, chunks)

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


def recurrent_step(model: RecurrentTagger, states: Mapping[str, Any],
                   chunks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of B streams; a chunk holding NaN poisons the batch (a model-side failure)."""
    if torch.isnan(chunks).any():
        raise ValueError("NaN in a chunk")
    hidden = states["hidden"]
    for frame in range(chunks.shape[1]):
        hidden = model.cell(chunks[:, frame], hidden)
    return model.head(hidden), {"hidden": hidden, "frames": states["frames"] + chunks.shape[1]}


def initial_state(_model: RecurrentTagger) -> dict[str, torch.Tensor]:
    return {"hidden": torch.zeros(HIDDEN), "frames": torch.tensor(0)}


def checked_chunk(raw: Any) -> torch.Tensor:
    chunk = torch.as_tensor(raw, dtype=torch.float32)
    if chunk.shape != (FRAMES, FEATURES):
        raise ValueError(f"chunk of shape {tuple(chunk.shape)}, expected {(FRAMES, FEATURES)}")
    return chunk


@pytest.fixture
def tagger() -> RecurrentTagger:
    torch.manual_seed(7)
    return RecurrentTagger().eval()


def streaming_model(tagger: RecurrentTagger, step: SpiedStep, version: str = "v1", **options: Any) -> StreamingModel:
    return StreamingModel(name="tagger", version=version, loader=lambda _ctx: tagger, step=step,
                          initial_state=initial_state, prepare_chunk=checked_chunk, **options)


def stream_chunks(seed: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(FRAMES, FEATURES, generator=generator) for _ in range(count)]


def run_alone(tagger: RecurrentTagger,
              chunks: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The reference: one stream stepped by itself, batch of one, no runtime."""
    state = initial_state(tagger)
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            logits, batched = recurrent_step(tagger, {k: v.unsqueeze(0) for k, v in state.items()},
                                             chunk.unsqueeze(0))
            outputs.append(logits[0])
            state = {k: v[0] for k, v in batched.items()}
    return outputs, state


def assert_same_stream(outputs: list[Any], state: Mapping[str, Any] | None,
                       expected: tuple[list[torch.Tensor], dict[str, torch.Tensor]]) -> None:
    expected_outputs, expected_state = expected
    assert state is not None
    assert len(outputs) == len(expected_outputs)
    for got, want in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(state["hidden"], expected_state["hidden"], rtol=RTOL, atol=ATOL)
    assert int(state["frames"]) == int(expected_state["frames"])


def _sample(metric: str, model: str = "tagger") -> float:
    return REGISTRY.get_sample_value(metric, {"model": model}) or 0.0


def test_concurrent_streams_match_each_stream_run_alone(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    chunks = {f"call-{n}": stream_chunks(seed=n, count=6) for n in range(8)}

    async def stream(sessions: StreamingSessions, stream_id: str) -> tuple[list[Any], Any]:
        with sessions.open_session("tagger", stream_id) as session:
            outputs = [await session.step(chunk) for chunk in chunks[stream_id]]
            return outputs, session.state

    async def scenario() -> dict[str, tuple[list[Any], Any]]:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step))
        results = await asyncio.gather(*(stream(sessions, stream_id) for stream_id in chunks))
        await sessions.close()
        return dict(zip(chunks, results, strict=True))

    results = asyncio.run(scenario())
    for stream_id, (outputs, state) in results.items():
        assert_same_stream(outputs, state, run_alone(tagger, chunks[stream_id]))
    assert sum(step.batch_sizes) == 8 * 6


def test_steps_of_different_streams_share_one_batch(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    batch_streams_before = _sample("tessera_stream_batch_streams_sum")

    async def scenario() -> None:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step, max_batch_size=16))
        opened = [sessions.open_session("tagger", f"call-{n}") for n in range(8)]
        step.hold()
        first = opened[0].step(stream_chunks(0, 1)[0])
        await wait_until(step.entered.is_set)
        others = [session.step(stream_chunks(n, 1)[0]) for n, session in enumerate(opened[1:], start=1)]
        await wait_until(lambda: runtime.stats()["tagger"]["queue_depth"] == 7)
        step.release()
        await asyncio.gather(first, *others)
        await sessions.close()

    asyncio.run(scenario())
    assert step.batch_sizes == [1, 7]
    assert _sample("tessera_stream_batch_streams_sum") - batch_streams_before == 8


def test_steps_submitted_together_run_in_order_one_at_a_time(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    ordered, other = stream_chunks(1, 10), stream_chunks(2, 10)

    async def scenario() -> tuple[list[Any], Any, list[Any], Any]:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step))
        first = sessions.open_session("tagger", "ordered")
        second = sessions.open_session("tagger", "other")
        # every step submitted before any is answered; the two streams interleave
        submitted = [task for pair in zip(ordered, other, strict=True)
                     for task in (first.step(pair[0]), second.step(pair[1]))]
        assert first.pending == 10
        answers = await asyncio.gather(*submitted)
        result = answers[0::2], first.state, answers[1::2], second.state
        await sessions.close()
        return result

    first_outputs, first_state, second_outputs, second_state = asyncio.run(scenario())
    assert_same_stream(first_outputs, first_state, run_alone(tagger, ordered))
    assert_same_stream(second_outputs, second_state, run_alone(tagger, other))
    assert max(step.batch_sizes) <= 2  # never two steps of one stream in one batch


def test_a_bad_chunk_fails_only_its_stream(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    good = {name: stream_chunks(seed, 3) for seed, name in enumerate(("a", "b", "c"))}
    poisoned = torch.full((FRAMES, FEATURES), float("nan"))
    errors_before = _sample("tessera_stream_step_errors_total")

    async def scenario() -> dict[str, tuple[list[Any], Any]]:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step))
        opened = {name: sessions.open_session("tagger", name) for name in good}
        outputs: dict[str, list[Any]] = {name: [await opened[name].step(good[name][0])] for name in good}
        with pytest.raises(BadInput, match="shape"):
            await opened["b"].step(torch.zeros(FRAMES, FEATURES + 1))  # refused before it is queued
        step.hold()
        blocker = opened["a"].step(good["a"][1])
        await wait_until(step.entered.is_set)
        shared = [opened["b"].step(poisoned), opened["c"].step(good["c"][1])]
        await wait_until(lambda: runtime.stats()["tagger"]["queue_depth"] == 2)
        step.release()
        outputs["a"].append(await blocker)
        bad, fine = await asyncio.gather(*shared, return_exceptions=True)
        assert isinstance(bad, ValueError) and "NaN" in str(bad)
        outputs["c"].append(fine)
        for name in ("a", "b", "c"):  # b goes on from its last good state
            outputs[name].append(await opened[name].step(good[name][-1] if name != "b" else good["b"][1]))
        result = {name: (outputs[name], opened[name].state) for name in good}
        await sessions.close()
        return result

    results = asyncio.run(scenario())
    assert 2 in step.batch_sizes  # b and c shared a batch (then ran alone: isolation)
    assert_same_stream(*results["a"], run_alone(tagger, good["a"]))
    assert_same_stream(*results["c"], run_alone(tagger, good["c"]))
    assert_same_stream(*results["b"], run_alone(tagger, good["b"][:2]))
    assert _sample("tessera_stream_step_errors_total") - errors_before == 2


def test_a_closed_session_cannot_step_and_its_pending_steps_fail(runtime: ModelRuntime,
                                                                  tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    chunks = stream_chunks(3, 2)
    open_before = _sample("tessera_stream_sessions_open")

    async def scenario() -> None:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step))
        session = sessions.open_session("tagger", "call")
        with pytest.raises(StreamAlreadyOpen) as duplicate:
            sessions.open_session("tagger", "call")
        assert isinstance(as_problem(duplicate.value), Conflict)  # 409 at an HTTP edge
        assert _sample("tessera_stream_sessions_open") - open_before == 1
        step.hold()
        running, queued = session.step(chunks[0]), session.step(chunks[1])
        await wait_until(step.entered.is_set)
        session.close()
        step.release()
        for task in (running, queued):
            with pytest.raises(SessionClosed):
                await task
        assert session.closed and session.state is None
        with pytest.raises(SessionClosed):
            session.step(chunks[0])
        assert sessions.session("tagger", "call") is None
        assert _sample("tessera_stream_sessions_open") - open_before == 0
        with sessions.open_session("tagger", "call") as reopened:  # a fresh state, not the old one
            assert_same_stream([await reopened.step(chunks[0])], reopened.state, run_alone(tagger, chunks[:1]))
        with pytest.raises(ModelNotReady):
            sessions.open_session("not-loaded", "call")
        await sessions.close()

    asyncio.run(scenario())


def test_idle_sessions_are_reaped_but_not_while_a_step_is_pending(runtime: ModelRuntime,
                                                                   tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    now = [1000.0]
    reaped_before = _sample("tessera_stream_sessions_reaped_total")

    async def scenario() -> None:
        sessions = StreamingSessions(runtime, clock=lambda: now[0], reap_interval_s=3600)
        await sessions.load(streaming_model(tagger, step, idle_timeout_s=60))
        quiet = sessions.open_session("tagger", "quiet")
        busy = sessions.open_session("tagger", "busy")
        await quiet.step(stream_chunks(0, 1)[0])
        now[0] += 30
        step.hold()
        pending = busy.step(stream_chunks(1, 1)[0])
        await wait_until(step.entered.is_set)
        now[0] += 31
        assert sessions.reap_idle() == [quiet]
        assert quiet.closed and quiet.state is None and not busy.closed
        now[0] += 120  # busy's step is still running: not idle however long it takes
        assert sessions.reap_idle() == []
        step.release()
        await pending
        now[0] += 60
        assert sessions.reap_idle() == [busy]
        assert sessions.open_count() == 0
        await sessions.close()

    asyncio.run(scenario())
    assert _sample("tessera_stream_sessions_reaped_total") - reaped_before == 2


def test_the_reaper_closes_an_abandoned_session_by_itself(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    async def scenario() -> None:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, SpiedStep(), idle_timeout_s=0.05))
        abandoned = sessions.open_session("tagger", "dropped-call")
        await abandoned.step(stream_chunks(0, 1)[0])
        await wait_until(lambda: abandoned.closed)
        assert abandoned.state is None and sessions.open_count() == 0
        await sessions.close()

    asyncio.run(scenario())


def test_a_cancelled_step_leaves_its_stream_where_it_was(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    step = SpiedStep()
    chunks = stream_chunks(4, 4)

    async def scenario() -> tuple[list[Any], Any]:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, step))
        session = sessions.open_session("tagger", "call")
        step.hold()
        submitted = [session.step(chunk) for chunk in chunks]
        await wait_until(step.entered.is_set)
        submitted[0].cancel()  # while its batch runs: the answer is dropped, the state not taken
        submitted[2].cancel()  # while it waits its turn: never queued
        step.release()
        answers = await asyncio.gather(*submitted, return_exceptions=True)
        assert [type(answer) for answer in answers[0::2]] == [asyncio.CancelledError] * 2
        never_started = session.step(chunks[0])
        never_started.cancel()  # before its task first runs
        answers.append(await asyncio.wait_for(session.step(chunks[2]), 10))
        assert session.pending == 0
        result = [*answers[1::2], answers[-1]], session.state
        await sessions.close()
        return result

    outputs, state = asyncio.run(scenario())
    assert_same_stream(outputs, state, run_alone(tagger, [chunks[1], chunks[3], chunks[2]]))


def test_unloading_closes_the_sessions_of_the_model(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    async def scenario() -> None:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, SpiedStep()))
        session = sessions.open_session("tagger", "call")
        await session.step(stream_chunks(0, 1)[0])
        await sessions.unload("tagger")
        assert session.closed and sessions.open_count() == 0 and "tagger" not in runtime.loaded()
        with pytest.raises(SessionClosed):
            session.step(stream_chunks(0, 1)[0])
        await sessions.close()

    asyncio.run(scenario())


def test_a_swapped_model_starts_each_stream_from_its_own_initial_state(runtime: ModelRuntime,
                                                                      tagger: RecurrentTagger) -> None:
    torch.manual_seed(8)
    retrained = RecurrentTagger().eval()
    chunks = stream_chunks(6, 3)

    async def scenario() -> tuple[list[Any], Any]:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, SpiedStep()))
        session = sessions.open_session("tagger", "call")
        for chunk in chunks[:2]:
            await session.step(chunk)
        await sessions.load(streaming_model(retrained, SpiedStep(), version="v2"))
        result = [await session.step(chunks[2])], session.state
        await sessions.close()
        return result

    outputs, state = asyncio.run(scenario())
    assert_same_stream(outputs, state, run_alone(retrained, chunks[2:]))  # v1's hidden state not fed to v2


def test_sessions_beyond_the_models_capacity_are_refused(runtime: ModelRuntime, tagger: RecurrentTagger) -> None:
    async def scenario() -> None:
        sessions = StreamingSessions(runtime)
        await sessions.load(streaming_model(tagger, SpiedStep(), max_sessions=2))
        first = sessions.open_session("tagger", "one")
        sessions.open_session("tagger", "two")
        with pytest.raises(RuntimeOverloaded):
            sessions.open_session("tagger", "three")
        first.close()
        sessions.open_session("tagger", "three")
        await sessions.close()

    asyncio.run(scenario())


VAD_SAMPLES, VAD_HIDDEN = 64, 16


class VadLike(torch.nn.Module):
    """silero-vad's ONNX interface on two GRU cells: input (B, samples), state (2, B, hidden) -> (B, 1), state."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.GRUCell(VAD_SAMPLES, VAD_HIDDEN)
        self.second = torch.nn.GRUCell(VAD_HIDDEN, VAD_HIDDEN)
        self.head = torch.nn.Linear(VAD_HIDDEN, 1)

    def forward(self, samples: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.first(samples, state[0])
        second = self.second(first, state[1])
        return torch.sigmoid(self.head(second)), torch.stack([first, second])


def export_vad_like(path: Any) -> Any:
    torch.manual_seed(11)
    example = (torch.randn(2, VAD_SAMPLES), torch.zeros(2, 2, VAD_HIDDEN))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(VadLike().eval(), example, str(path), dynamo=False, input_names=["input", "state"],
                          output_names=["output", "stateN"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "state": {1: "batch"}, "output": {0: "batch"},
                                        "stateN": {1: "batch"}})
    return path


def vad_step(session: Any, states: dict[str, Any], chunks: Any) -> tuple[Any, dict[str, Any]]:
    """NumPy in and out: chunks (B, samples) float32, state (2, B, hidden) -> {"speech": (B,)}, state."""
    probability, state = session.run(["output", "stateN"], {"input": chunks, "state": states["state"]})
    return {"speech": probability[:, 0]}, {"state": state}


def test_onnx_runtime_model_with_numpy_state_on_a_second_batch_axis(runtime: ModelRuntime, tmp_path: Any) -> None:
    import numpy as np
    import onnxruntime

    graph = export_vad_like(tmp_path / "vad_like.onnx")
    onnx_session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(5)
    calls = {f"call-{n}": generator.standard_normal((6, VAD_SAMPLES)).astype(np.float32) for n in range(6)}
    vad = StreamingModel(
        name="vad-like", version="v1", loader=lambda _ctx: onnx_session, step=vad_step,
        initial_state=lambda _model: {"state": np.zeros((2, VAD_HIDDEN), np.float32)},
        state_axes={"state": 1}, uses_torch=False, warmup_chunks=[calls["call-0"][0]],
        prepare_chunk=lambda raw: np.asarray(raw, dtype=np.float32).reshape(VAD_SAMPLES))

    async def stream(sessions: StreamingSessions, call: str) -> tuple[list[Any], Any]:
        with sessions.open_session("vad-like", call) as session:
            return [await session.step(frame) for frame in calls[call]], session.state

    async def scenario() -> dict[str, tuple[list[Any], Any]]:
        sessions = StreamingSessions(runtime)
        await sessions.load(vad)
        results = await asyncio.gather(*(stream(sessions, call) for call in calls))
        await sessions.close()
        return dict(zip(calls, results, strict=True))

    for call, (outputs, state) in asyncio.run(scenario()).items():
        alone = np.zeros((2, 1, VAD_HIDDEN), np.float32)
        for frame, output in zip(calls[call], outputs, strict=True):
            probability, alone = onnx_session.run(None, {"input": frame[None], "state": alone})
            np.testing.assert_allclose(output["speech"], probability[0, 0], rtol=1e-5, atol=1e-6)
        assert state is not None and state["state"].shape == (2, VAD_HIDDEN)
        np.testing.assert_allclose(state["state"], alone[:, 0], rtol=1e-5, atol=1e-6)


def test_run_steps_stacks_named_chunks_and_gives_each_stream_its_own_copy() -> None:
    def step(_model: None, states: dict[str, Any], chunks: Any) -> tuple[Any, dict[str, Any]]:
        total = states["total"] + chunks["samples"].sum(dim=1) * chunks["gain"]
        return {"total": total, "peak": chunks["samples"].amax(dim=1)}, {"total": total}

    streaming = StreamingModel(name="sum", version="v1", loader=lambda _ctx: None, step=step,
                               initial_state=lambda _model: {"total": torch.tensor(0.0)})
    chunks = [{"samples": torch.tensor([1.0, 2.0]), "gain": torch.tensor(1.0)},
              {"samples": torch.tensor([3.0, 5.0]), "gain": torch.tensor(2.0)}]
    first, second = run_steps(streaming, None, [StreamStep(None, chunk) for chunk in chunks])
    assert (float(first.output["total"]), float(first.output["peak"])) == (3.0, 2.0)
    assert (float(second.output["total"]), float(second.output["peak"])) == (16.0, 5.0)
    for result in (first, second):
        total = result.state["total"]
        assert isinstance(total, torch.Tensor) and total._base is None  # a copy, not a view of the batch
    with pytest.raises(ValueError, match="different names"):
        run_steps(streaming, None, [StreamStep({"total": torch.tensor(0.0)}, chunks[0]),
                                    StreamStep({"other": torch.tensor(0.0)}, chunks[1])])
