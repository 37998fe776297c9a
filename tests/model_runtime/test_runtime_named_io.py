"""Several named inputs and outputs: items are dicts of arrays, batched outputs dicts split per item."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.collate import collate, run_collated

FEATURES, CONTEXT, HIDDEN = 6, 3, 5


class TwoHeads(torch.nn.Module):
    """Two named inputs (``x``, ``context``), two named outputs (``score``, ``embedding``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Linear(FEATURES + CONTEXT, HIDDEN)
        self.score = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = torch.tanh(self.body(torch.cat([x, context], dim=1)))
        return {"score": torch.sigmoid(self.score(embedding)).squeeze(1), "embedding": embedding}


class MappingBackend:
    """A backend in the runtime's protocol: called with one mapping of named batched tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.module(**{name: value for name, value in batch.items() if not name.endswith("_mask")}))


def named_item(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(FEATURES, generator=generator), "context": torch.randn(CONTEXT, generator=generator)}


def alone(model: TwoHeads, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = model(item["x"].unsqueeze(0), item["context"].unsqueeze(0))
    return {name: value[0] for name, value in out.items()}


def stacked_run(model: TwoHeads, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A run_batch returning the model's named batched outputs as they are: the runtime splits them."""
    return dict(model(**collate(items).inputs))


def assert_answers(model: TwoHeads, items: list[dict[str, torch.Tensor]], answers: list[Any]) -> None:
    for item, answer in zip(items, answers, strict=True):
        expected = alone(model, item)
        assert answer.keys() == {"score", "embedding"}
        for name, value in expected.items():
            torch.testing.assert_close(answer[name], value, rtol=1e-5, atol=1e-6)


def test_named_outputs_of_a_batch_are_split_back_per_item(runtime: ModelRuntime) -> None:
    model = TwoHeads().eval()
    items = [named_item(seed) for seed in range(20)]

    async def scenario() -> list[Any]:
        await runtime.load(ModelSpec(name="two-heads", version="v1", loader=lambda _ctx: model,
                                     run_batch=stacked_run, max_batch_size=8, warmup_items=items[:2]))
        return await asyncio.gather(*(runtime.predict("two-heads", item) for item in items))

    assert_answers(model, items, asyncio.run(scenario()))


def test_a_backend_called_with_a_mapping_serves_named_inputs(runtime: ModelRuntime) -> None:
    model = TwoHeads().eval()
    items = [named_item(seed) for seed in range(7)]
    runtime.load_sync(ModelSpec(name="two-heads-backend", version="v1", loader=lambda _ctx: MappingBackend(model),
                                run_batch=run_collated({}), max_batch_size=4))
    assert_answers(model, items, runtime.predict_many_sync("two-heads-backend", items))
