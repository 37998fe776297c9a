"""Out of memory is answered by splitting the batch; a single item that cannot fit fails alone."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.batcher import execute_batch
from model_runtime.errors import BadInput
from model_runtime.memory import (
    ItemTooLargeForMemory,
    MemoryBudget,
    device_memory_budget,
    is_out_of_memory,
    run_with_oom_split,
)


class RunsOutAbove:
    """A run that raises CUDA's out-of-memory error for batches larger than ``limit`` (or items marked big)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        if len(items) > self.limit or any(item < 0 for item in items):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 10 for item in items]


def test_cuda_oom_is_constructible_here_and_recognised() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors carry an allocator's message
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    assert is_out_of_memory(RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                                             "returned while running MatMul node. Status Message: Failed to "
                                             "allocate memory for requested buffer of size 1073741824"))


def test_an_oom_batch_is_halved_until_it_fits_and_answers_in_order() -> None:
    run = RunsOutAbove(limit=3)
    splits: list[None] = []
    out_of_memory: list[None] = []
    outputs = run_with_oom_split(run, list(range(10)), on_split=lambda: splits.append(None),
                                 on_out_of_memory=lambda: out_of_memory.append(None))
    assert outputs == [i * 10 for i in range(10)]
    assert run.sizes == [10, 5, 2, 3, 5, 2, 3]  # 10 -> 5 + 5, each 5 -> 2 + 3
    assert len(splits) == 3
    assert len(out_of_memory) == 3  # each split here followed a real out-of-memory


def test_a_single_item_out_of_memory_is_the_runtimes_own_error() -> None:
    with pytest.raises(ItemTooLargeForMemory, match="on its own: CUDA out of memory") as raised:
        run_with_oom_split(RunsOutAbove(limit=0), [7])
    assert isinstance(raised.value, BadInput)


def test_other_errors_are_not_split() -> None:
    calls: list[int] = []

    def broken(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise RuntimeError("index out of range")

    with pytest.raises(RuntimeError, match="index out of range"):
        run_with_oom_split(broken, [1, 2, 3, 4])
    assert calls == [4]


def test_with_the_batcher_the_item_that_cannot_fit_fails_alone() -> None:
    run = RunsOutAbove(limit=4)
    outcomes = execute_batch(functools.partial(run_with_oom_split, run), [1, 2, -3, 4])
    assert [outcome.ok for outcome in outcomes] == [True, True, False, True]
    assert [outcome.value for outcome in outcomes if outcome.ok] == [10, 20, 40]
    assert isinstance(outcomes[2].error, ItemTooLargeForMemory)


def test_a_budget_splits_a_real_model_before_running_with_the_same_outputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
    rows = [torch.randn(16) for _ in range(13)]
    ran: list[int] = []

    def run(items: list[torch.Tensor]) -> list[torch.Tensor]:
        ran.append(len(items))
        with torch.inference_mode():
            return list(model(torch.stack(list(items))))

    bytes_per_row = (16 + 64 + 4) * 4
    budget = MemoryBudget(budget_bytes=4 * bytes_per_row, bytes_per_item=bytes_per_row)
    out_of_memory: list[None] = []
    outputs = run_with_oom_split(run, rows, budget=budget, on_out_of_memory=lambda: out_of_memory.append(None))
    assert max(ran) <= 4 and sum(ran) == 13
    assert not out_of_memory  # cut by the budget before running: splits, but no out-of-memory
    with torch.inference_mode():
        expected = model(torch.stack(rows))
    torch.testing.assert_close(torch.stack(outputs), expected, atol=1e-6, rtol=1e-5)


def test_an_item_over_the_budget_is_refused_without_running() -> None:
    run = RunsOutAbove(limit=100)
    budget = MemoryBudget(budget_bytes=1000, bytes_per_item=lambda item: item)
    with pytest.raises(ItemTooLargeForMemory) as raised:
        run_with_oom_split(run, [5000], budget=budget)
    assert raised.value.extensions == {"estimated_bytes": 5000, "budget_bytes": 1000}
    assert run.sizes == []
    assert run_with_oom_split(run, [400, 400, 300, 900], budget=budget) == [4000, 4000, 3000, 9000]
    assert run.sizes == [2, 1, 1]  # 2000 bytes -> [400, 400] runs; [300, 900] is 1200 -> one by one


def test_no_budget_on_cpu() -> None:
    assert device_memory_budget(torch.device("cpu")) is None
    assert MemoryBudget.on_device(torch.device("cpu"), 1024) is None


def test_a_device_budget_is_a_share_of_its_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10_000, 80_000))
    budget = MemoryBudget.on_device(torch.device("cuda", 0), 1000, fraction=0.5)
    assert budget == MemoryBudget(5000, 1000) and budget.fits([1] * 5) and not budget.fits([1] * 6)


def test_a_model_with_a_memory_budget_splits_its_batches_and_an_oversized_item_fails_alone(
        runtime: ModelRuntime) -> None:
    ran: list[list[int]] = []

    def run_batch(model: None, items: list[int]) -> list[int]:
        ran.append(list(items))
        return [item * 10 for item in items]

    spec = ModelSpec(name="budgeted", version="v1", loader=lambda context: None, run_batch=run_batch,
                     uses_torch=False, max_batch_size=16, max_wait_ms=20.0, fill="window",
                     memory_budget=MemoryBudget(budget_bytes=1000, bytes_per_item=lambda item: item))

    async def scenario() -> list[object]:
        await runtime.load(spec)
        items = [300, 200, 100, 400, 2000, 250, 150, 50]
        return await asyncio.gather(*(runtime.predict("budgeted", item) for item in items), return_exceptions=True)

    answers = asyncio.run(scenario())
    assert answers[:4] == [3000, 2000, 1000, 4000] and answers[5:] == [2500, 1500, 500]
    assert isinstance(answers[4], ItemTooLargeForMemory)
    assert all(sum(batch) <= 1000 for batch in ran)  # no run over the budget, the oversized item never ran
