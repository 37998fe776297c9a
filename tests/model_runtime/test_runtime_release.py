"""A spec's ``release`` frees what a model holds outside the process's memory (worker processes,
files) once it stops serving: unloaded, replaced by a new version after it drained, or closed."""

from __future__ import annotations

import asyncio
from typing import Any

from model_runtime import ModelRuntime, ModelSpec


class Holder:
    """A loaded "model" that owns something only ``release`` gives back."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.released = False


def spec(version: str, released: list[str]) -> ModelSpec:
    def release(model: Holder) -> None:
        model.released = True
        released.append(model.version)

    return ModelSpec(name="held", version=version, loader=lambda _ctx: Holder(version), uses_torch=False,
                     run_batch=lambda model, items: [model.version for _ in items], release=release)


def test_release_runs_when_a_model_is_replaced_unloaded_or_the_runtime_closes() -> None:
    released: list[str] = []

    async def scenario() -> list[Any]:
        runtime = ModelRuntime()
        await runtime.load(spec("v1", released))
        answers = [await runtime.predict("held", 0)]
        await runtime.load(spec("v2", released))  # v1 drains, then is released
        answers += [list(released), await runtime.predict("held", 0)]
        await runtime.unload("held")
        answers.append(list(released))
        await runtime.load(spec("v3", released))
        await runtime.close()
        return answers

    assert asyncio.run(scenario()) == ["v1", ["v1"], "v2", ["v1", "v2"]]
    assert released == ["v1", "v2", "v3"]


def test_a_failing_release_does_not_stop_the_unload() -> None:
    def broken(_model: Any) -> None:
        raise RuntimeError("cannot release")

    async def scenario() -> bool:
        runtime = ModelRuntime()
        await runtime.load(ModelSpec(name="broken", version="v1", loader=lambda _ctx: object(), uses_torch=False,
                                     run_batch=lambda _m, items: items, release=broken))
        await runtime.unload("broken")
        return "broken" in runtime.loaded()

    assert asyncio.run(scenario()) is False
