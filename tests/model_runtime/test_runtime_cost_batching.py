"""Cost-aware batching with a real torch model over variable-length sequences, padded and masked.

The model (a GRU over (time, features) windows, masked mean pooling, a text-like second input)
runs padded batches through the runtime; every answer must equal the item run alone, unpadded.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import pytest
import torch
from runtime_fakes import wait_until

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.batcher import BatchPolicy, split_batch
from model_runtime.collate import length_bucket, pad_stack, run_collated
from model_runtime.errors import BadInput

FEATURES, HIDDEN, BUDGET = 4, 8, 64
WAIT_S = 10.0


class SequenceTagger(torch.nn.Module):
    """Per-step states and a pooled vector per sequence; padding is masked out of the pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = torch.nn.GRU(FEATURES, HIDDEN, batch_first=True)
        self.text = torch.nn.Embedding(50, HIDDEN)
        self.head = torch.nn.Linear(2 * HIDDEN, 3)

    def forward(self, steps: torch.Tensor, steps_mask: torch.Tensor, tokens: torch.Tensor,
                tokens_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        states, _ = self.gru(steps)
        weights = steps_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1)
        text = (self.text(tokens) * tokens_mask.unsqueeze(-1).to(states.dtype)).sum(1)
        return {"states": states, "logits": self.head(torch.cat([pooled, text], dim=1))}


class Recorder:
    """Runs batches through the tagger, remembering each batch's lengths; optionally held on a gate."""

    def __init__(self) -> None:
        self.model = SequenceTagger().eval()
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run_batch(self, items: list[dict[str, torch.Tensor]]) -> list[Any]:
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        self.batches.append([int(item["steps"].shape[0]) for item in items])
        return run_tagger(self.model, items)


run_tagger = run_collated({"steps": (0,), "tokens": (0,)}, trim={"states": "steps"})


def item(length: int, tokens: int = 3, seed: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed if seed is not None else length)
    return {"steps": torch.randn(length, FEATURES, generator=generator),
            "tokens": torch.randint(0, 50, (tokens,), generator=generator)}


def alone(model: SequenceTagger, one: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference: the item by itself, batch of one, no padding."""
    with torch.inference_mode():
        steps, tokens = one["steps"].unsqueeze(0), one["tokens"].unsqueeze(0)
        out = model(steps, torch.ones(1, len(one["steps"]), dtype=torch.bool), tokens,
                    torch.ones(1, len(one["tokens"]), dtype=torch.bool))
    return {name: value[0] for name, value in out.items()}


def spec(recorder: Recorder, **options: Any) -> ModelSpec:
    settings: dict[str, Any] = {"max_batch_size": 16, "cost": steps_of, "max_batch_cost": BUDGET,
                                "warmup_items": [item(5)], **options}
    return ModelSpec(name="tagger", version="v1", loader=lambda _ctx: recorder,
                     run_batch=lambda model, items: model.run_batch(items), **settings)


def steps_of(prepared: dict[str, torch.Tensor]) -> int:
    return int(prepared["steps"].shape[0])


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def answered_after_queueing(runtime: ModelRuntime, recorder: Recorder, items: list[dict[str, torch.Tensor]],
                            **options: Any) -> list[Any]:
    """Load the tagger, hold it on a batch of one, queue ``items`` behind it, release: their answers."""

    async def scenario() -> list[Any]:
        await runtime.load(spec(recorder, **options))
        recorder.gate.clear()
        recorder.entered.clear()
        blocker = asyncio.create_task(runtime.predict("tagger", item(4)))
        await wait_until(recorder.entered.is_set)
        waiting = [asyncio.create_task(runtime.predict("tagger", one)) for one in items]
        await wait_until(lambda: runtime.stats()["tagger"]["queue_depth"] == len(items))
        recorder.gate.set()
        await blocker
        return await asyncio.wait_for(asyncio.gather(*waiting), WAIT_S)

    return asyncio.run(scenario())


def test_padded_batches_answer_as_one_by_one_within_the_cost_budget(runtime: ModelRuntime) -> None:
    recorder = Recorder()
    lengths = [3, 17, 9, 30, 5, 12, 21, 7, 40, 2, 33, 11, 8, 26]
    items = [item(length, tokens=1 + length % 4) for length in lengths]
    answers = answered_after_queueing(runtime, recorder, items)
    for one, answer in zip(items, answers, strict=True):
        assert_same(answer, alone(recorder.model, one))
    served = recorder.batches[2:]  # after the warm-up and the blocker
    assert sorted(length for batch in served for length in batch) == sorted(lengths)
    assert all(sum(batch) <= BUDGET for batch in served)
    assert any(len(batch) > 1 for batch in served)  # padding really happened


def test_shape_buckets_keep_similar_lengths_together(runtime: ModelRuntime) -> None:
    recorder = Recorder()
    lengths = [4, 30, 5, 31, 6, 29, 7, 28]  # buckets (base 2): 4..7 and 16..31
    items = [item(length) for length in lengths]
    answers = answered_after_queueing(runtime, recorder, items, max_batch_cost=None, bucket=length_bucket(steps_of))
    for one, answer in zip(items, answers, strict=True):
        assert_same(answer, alone(recorder.model, one))
    assert sorted(sorted(batch) for batch in recorder.batches[2:]) == [[4, 5, 6, 7], [28, 29, 30, 31]]


def test_oversized_bad_and_cancelled_items_fail_alone(runtime: ModelRuntime) -> None:
    recorder = Recorder()
    good = [item(length) for length in (6, 9, 14)]
    bad = {"steps": torch.randn(5, FEATURES + 1), "tokens": torch.tensor([1, 2])}  # wrong feature size

    async def scenario() -> tuple[list[Any], Any]:
        await runtime.load(spec(recorder))
        recorder.gate.clear()
        recorder.entered.clear()
        blocker = asyncio.create_task(runtime.predict("tagger", item(4)))
        await wait_until(recorder.entered.is_set)
        cancelled = asyncio.create_task(runtime.predict("tagger", item(13, seed=99)))
        waiting = [asyncio.create_task(runtime.predict("tagger", one)) for one in (good[0], bad, *good[1:])]
        await wait_until(lambda: runtime.stats()["tagger"]["queue_depth"] == 5)
        cancelled.cancel()
        with pytest.raises(BadInput) as oversized:  # refused before it is queued
            await runtime.predict("tagger", item(BUDGET + 1))
        recorder.gate.set()
        await blocker
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), WAIT_S), oversized.value

    answers, oversized = asyncio.run(scenario())
    assert oversized.extensions == {"cost": BUDGET + 1, "budget": BUDGET}
    assert isinstance(answers[1], RuntimeError | ValueError)
    for one, answer in zip(good, [answers[0], *answers[2:]], strict=True):
        assert_same(answer, alone(recorder.model, one))
    assert 13 not in [length for batch in recorder.batches[2:] for length in batch]  # the cancelled one never ran
    assert BUDGET + 1 not in [length for batch in recorder.batches for length in batch]


def test_synchronous_calls_batch_by_budget_too(runtime: ModelRuntime) -> None:
    recorder = Recorder()
    runtime.load_sync(spec(recorder))
    items = [item(length) for length in (30, 30, 10, 50, 5)] + [item(BUDGET + 5)]
    answers = runtime.predict_many_sync("tagger", items, return_exceptions=True)
    assert isinstance(answers[-1], BadInput)
    for one, answer in zip(items[:-1], answers[:-1], strict=True):
        assert_same(answer, alone(recorder.model, one))
    assert recorder.batches[1:] == [[30, 30], [10, 50], [5]]  # after the warm-up


def test_split_batch_takes_the_oldest_bucket_in_order_up_to_the_budget() -> None:
    policy = BatchPolicy(max_batch_size=3, max_batch_cost=10)
    entries = [("a", 4), ("b", 9), ("a", 5), ("a", 2), ("a", 1), ("a", 1)]
    taken, rest = split_batch(entries, policy, cost=lambda e: e[1], bucket=lambda e: e[0])
    assert taken == [("a", 4), ("a", 5)]  # ("a", 2) would pass the budget: the batch ends there
    assert rest == deque([("b", 9), ("a", 2), ("a", 1), ("a", 1)])
    taken, rest = split_batch(rest, policy, cost=lambda e: e[1], bucket=lambda e: e[0])
    assert taken == [("b", 9)] and list(rest) == [("a", 2), ("a", 1), ("a", 1)]
    taken, _ = split_batch(rest, policy, cost=lambda e: e[1], bucket=lambda e: e[0])
    assert taken == [("a", 2), ("a", 1), ("a", 1)]  # max_batch_size


def test_pad_stack_masks_real_positions_for_numpy_and_torch() -> None:
    import numpy as np

    for make in (np.ones, torch.ones):
        batch, mask = pad_stack([make((2, 3)), make((4, 3))], axes=(0,), pad_value=-1)
        assert tuple(batch.shape) == (2, 4, 3) and tuple(mask.shape) == (2, 4)
        assert mask.tolist() == [[True, True, False, False], [True] * 4]
        assert float(batch[0, 2, 0]) == -1.0 and float(batch[1, 3, 0]) == 1.0
    with pytest.raises(ValueError, match="differ outside"):
        pad_stack([np.ones((2, 3)), np.ones((2, 4))], axes=(0,))
