"""Sliding-window inference through the runtime: MONAI's answer, patches of concurrent studies in shared
batches, progress per study, a cancelled study that stops alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from collections.abc import AsyncIterator, Sequence

import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from runtime_fakes import wait_until

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.device import Placement
from model_runtime.errors import BadInput, RuntimeOverloaded, RuntimeTimeout
from model_runtime.sliding_window import (
    PatchOutput,
    SlidingWindowConfig,
    SlidingWindowInferer,
    importance_map,
    patch_grid,
    run_patch_batch,
    run_patch_batch_on_device,
)

ROI = (16, 16, 16)
OFFSET_B = 10.0
"""Study B's voxels are shifted by this, so the spy can tell its patches from study A's."""


def tiny_net() -> torch.nn.Module:
    """A 2-layer 3D conv net, 1 channel in, 2 out, fixed random weights."""
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 2, 3, padding=1))
    return net.eval()


def monai_reference(net: torch.nn.Module, volume: torch.Tensor, config: SlidingWindowConfig) -> object:
    """MONAI's ``sliding_window_inference`` of one ``(C, *spatial)`` volume, batch axis dropped."""
    with torch.inference_mode():
        output = sliding_window_inference(volume[None], config.roi_size, 4, net, overlap=config.overlap,
                                          mode=config.mode, sigma_scale=config.sigma_scale,
                                          padding_mode=config.padding_mode, cval=config.cval)
    if isinstance(output, dict):
        return {name: value[0] for name, value in output.items()}
    assert isinstance(output, torch.Tensor)
    return output[0]


def assert_matches(stitched: object, expected: object) -> None:
    """Equal up to float summation order (patches are stitched in arrival order, MONAI's in grid order)."""
    torch.testing.assert_close(stitched, expected, rtol=1e-5, atol=1e-5)


class SpyPatchModel:
    """The tiny net as a runtime model that records which study each patch of each batch came from,
    and can be held on a gate (the Ray Serve habit: hold, don't sleep)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.running = 0

    def run_batch(self, patches: list[torch.Tensor]) -> list[PatchOutput]:
        self.running = len(patches)
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        self.batches.append(["B" if patch.min() >= OFFSET_B else "A" for patch in patches])
        return run_patch_batch(self.net, patches)

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def patches_of(self, study: str) -> int:
        return sum(batch.count(study) for batch in self.batches)


def patch_spec(run_batch: object, model: object, *, max_batch_size: int = 8) -> ModelSpec:
    return ModelSpec(name="seg", version="v1", loader=lambda _ctx: model, device="cpu",
                     run_batch=run_batch,  # type: ignore[arg-type]
                     max_batch_size=max_batch_size, max_queue=512)


def two_volumes(size: Sequence[int] = (40, 24, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    volume_a = torch.rand((1, *size), generator=generator)
    volume_b = torch.rand((1, *size), generator=generator) + OFFSET_B
    return volume_a, volume_b


# -- MONAI's arithmetic --------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [(37, 29, 21), (16, 16, 16), (40, 16, 20), (17, 33, 64)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_patch_grid_is_monais(image_size: tuple[int, ...], overlap: float) -> None:
    interval = _get_scan_interval(image_size, ROI, 3, (overlap,) * 3)
    assert patch_grid(image_size, ROI, (overlap,) * 3) == dense_patch_slices(image_size, ROI, interval)


@pytest.mark.parametrize("patch_size", [(16, 16, 16), (8, 13, 5)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_importance_map_is_monais(patch_size: tuple[int, ...], mode: str) -> None:
    expected = compute_importance_map(patch_size, mode=mode, sigma_scale=0.125)
    assert torch.equal(importance_map(patch_size, mode, (0.125,) * 3), expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("size", [(37, 29, 21), (40, 12, 20)], ids=["uneven", "padded"])
def test_stitched_study_equals_monai(runtime: ModelRuntime, mode: str, overlap: float,
                                     size: tuple[int, ...]) -> None:
    net = tiny_net()
    volume = torch.rand((1, *size), generator=torch.Generator().manual_seed(1))
    config = SlidingWindowConfig(ROI, overlap=overlap, mode=mode)  # type: ignore[arg-type]

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(run_patch_batch, net))
        inferer = SlidingWindowInferer(runtime, "seg", config)
        from_numpy = await inferer.infer(volume.numpy())
        from_torch = await inferer.infer(volume)
        assert_matches(from_numpy, from_torch)
        return from_torch

    stitched = asyncio.run(scenario())
    expected = monai_reference(net, volume, config)
    assert isinstance(stitched, torch.Tensor) and stitched.shape == (2, *size)
    assert_matches(stitched, expected)


# -- fan-out / fan-in across studies ----------------------------------------------------------------------
def test_concurrent_studies_share_batches_and_get_their_own_answers(runtime: ModelRuntime) -> None:
    spy = SpyPatchModel(tiny_net())
    volume_a, volume_b = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.5, mode="gaussian")

    async def scenario() -> tuple[PatchOutput, PatchOutput]:
        await runtime.load(patch_spec(lambda model, patches: model.run_batch(patches), spy, max_batch_size=4))
        inferer = SlidingWindowInferer(runtime, "seg", config, patches_per_study=6)
        spy.hold()
        study_a, study_b = inferer.start(volume_a), inferer.start(volume_b)
        # every lane of both studies has a patch queued or running while the model is held
        await wait_until(lambda: spy.entered.is_set()
                         and runtime.stats()["seg"]["queue_depth"] == 12 - spy.running)
        spy.release()
        return await study_a, await study_b

    stitched_a, stitched_b = asyncio.run(scenario())
    assert_matches(stitched_a, monai_reference(spy.net, volume_a, config))
    assert_matches(stitched_b, monai_reference(spy.net, volume_b, config))
    assert spy.patches_of("A") == spy.patches_of("B") == 16  # 4 x 2 x 2 windows each, each run once
    assert any(set(batch) == {"A", "B"} for batch in spy.batches), spy.batches


def test_progress_reaches_total_through_callback_and_stream(runtime: ModelRuntime) -> None:
    net = tiny_net()
    volume_a, volume_b = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.25)
    reported: list[tuple[int, int]] = []

    async def scenario() -> list[tuple[int, int]]:
        await runtime.load(patch_spec(run_patch_batch, net))
        inferer = SlidingWindowInferer(runtime, "seg", config)
        study_b = inferer.start(volume_b)
        streamed = asyncio.create_task(_collect(study_b.progress()))
        await inferer.infer(volume_a, on_progress=lambda done, total: reported.append((done, total)))
        await study_b
        return await streamed

    streamed = asyncio.run(scenario())
    total = reported[-1][1]
    assert total == 3 * 2 * 2  # windows of a 40 x 24 x 24 volume, 16^3 patches, overlap 0.25
    assert reported == [(done, total) for done in range(total + 1)]
    assert streamed[-1] == (total, total)
    assert [done for done, _ in streamed] == sorted({done for done, _ in streamed})


async def _collect(updates: AsyncIterator[tuple[int, int]]) -> list[tuple[int, int]]:
    return [update async for update in updates]


def test_cancelled_study_skips_its_queued_patches_and_the_other_completes(runtime: ModelRuntime) -> None:
    spy = SpyPatchModel(tiny_net())
    volume_a, volume_b = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.5, mode="gaussian")
    a_updates: list[tuple[int, int]] = []

    async def scenario() -> tuple[PatchOutput, list[tuple[int, int]]]:
        await runtime.load(patch_spec(lambda model, patches: model.run_batch(patches), spy, max_batch_size=4))
        inferer = SlidingWindowInferer(runtime, "seg", config, patches_per_study=6)
        spy.hold()
        study_a = inferer.start(volume_a, on_progress=lambda done, total: a_updates.append((done, total)))
        a_stream = asyncio.create_task(_collect(study_a.progress()))
        study_b = inferer.start(volume_b)
        await wait_until(lambda: spy.entered.is_set()
                         and runtime.stats()["seg"]["queue_depth"] == 12 - spy.running)
        study_a.cancel()
        await wait_until(lambda: study_a.finished)
        spy.release()
        with pytest.raises(asyncio.CancelledError):
            await study_a
        return await study_b, await a_stream  # the stream of a cancelled study ends

    stitched_b, a_streamed = asyncio.run(scenario())
    assert a_streamed == [(0, 16)]
    assert_matches(stitched_b, monai_reference(spy.net, volume_b, config))
    assert spy.patches_of("B") == 16
    assert spy.patches_of("A") <= 4  # only the batch already running when it was cancelled
    assert a_updates == [(0, 16)]  # nothing of A was stitched after it was cancelled


def test_study_deadline_and_bad_volumes_fail_alone(runtime: ModelRuntime) -> None:
    spy = SpyPatchModel(tiny_net())
    volume_a, volume_b = two_volumes()
    inferer_config = SlidingWindowConfig(ROI)

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(lambda model, patches: model.run_batch(patches), spy))
        inferer = SlidingWindowInferer(runtime, "seg", inferer_config)
        with pytest.raises(BadInput, match="a volume is"):
            await inferer.infer(volume_a[0])  # no channel axis
        with pytest.raises(BadInput, match="floating point"):
            await inferer.infer(volume_a.to(torch.int16))
        spy.hold()
        with pytest.raises(RuntimeTimeout, match="not inferred within"):
            await inferer.infer(volume_a, timeout_s=0.2)
        spy.release()
        return await inferer.infer(volume_b)

    stitched_b = asyncio.run(scenario())
    assert_matches(stitched_b, monai_reference(spy.net, volume_b, inferer_config))


def test_a_study_whose_patches_fail_fails_alone(runtime: ModelRuntime) -> None:
    spy = SpyPatchModel(tiny_net())
    volume_a, volume_b = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.5)

    def fails_on_study_a(model: SpyPatchModel, patches: list[torch.Tensor]) -> list[PatchOutput]:
        if any(patch.min() < OFFSET_B for patch in patches):
            raise RuntimeError("study A's patches poison the batch")
        return model.run_batch(patches)

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(fails_on_study_a, spy, max_batch_size=4))
        inferer = SlidingWindowInferer(runtime, "seg", config, patches_per_study=6)
        study_a, study_b = inferer.start(volume_a), inferer.start(volume_b)
        with pytest.raises(RuntimeError, match="poison"):
            await study_a
        return await study_b

    stitched_b = asyncio.run(scenario())
    assert_matches(stitched_b, monai_reference(spy.net, volume_b, config))


class RefusingRuntime:
    """Pure logic of the retry rule: ``predict`` answers with the net, but refuses the calls numbered in
    ``refuse`` (1-based) as the runtime does when it is overloaded."""

    def __init__(self, net: torch.nn.Module, refuse: set[int]) -> None:
        self.net = net
        self.refuse = refuse
        self.calls = 0

    def version(self, name: str) -> str:
        return "v1"

    def placement(self, name: str) -> Placement:
        return Placement("cpu")

    async def predict(self, name: str, patch: torch.Tensor) -> PatchOutput:
        self.calls += 1
        if self.calls in self.refuse:
            raise RuntimeOverloaded(f"{name}: queue full", retry_after_s=0.001)
        await asyncio.sleep(0)
        with torch.inference_mode():
            return run_patch_batch(self.net, [patch])[0]


def test_an_admitted_study_retries_refused_patches_and_a_new_one_is_refused() -> None:
    net = tiny_net()
    volume, _ = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.25)
    under_way = RefusingRuntime(net, refuse={5, 6})  # after patches were stitched
    refused_at_once = RefusingRuntime(net, refuse={1})

    async def scenario() -> PatchOutput:
        with pytest.raises(RuntimeOverloaded):
            await SlidingWindowInferer(refused_at_once, "seg", config,  # type: ignore[arg-type]
                                       patches_per_study=1).infer(volume)
        return await SlidingWindowInferer(under_way, "seg", config,  # type: ignore[arg-type]
                                          patches_per_study=1).infer(volume)

    stitched = asyncio.run(scenario())
    assert refused_at_once.calls == 1
    assert under_way.calls == 12 + 2  # every window once, the two refused ones twice
    assert_matches(stitched, monai_reference(net, volume, config))


class TwoHeads(torch.nn.Module):
    """A shared conv trunk with two named heads, like a segmentation net with an auxiliary output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.trunk = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.mask = torch.nn.Conv3d(3, 2, 1)
        self.edges = torch.nn.Conv3d(3, 1, 3, padding=1)

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.trunk(volume))
        return {"mask": self.mask(features), "edges": self.edges(features)}


def test_named_outputs_are_stitched_each_as_monai_does(runtime: ModelRuntime) -> None:
    net = TwoHeads().eval()
    volume, _ = two_volumes((37, 29, 21))
    config = SlidingWindowConfig(ROI, overlap=0.5, mode="gaussian")

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(run_patch_batch, net))
        return await SlidingWindowInferer(runtime, "seg", config).infer(volume)

    stitched = asyncio.run(scenario())
    assert isinstance(stitched, dict) and stitched["edges"].shape == (1, 37, 29, 21)
    assert_matches(stitched, monai_reference(net, volume, config))


def test_a_model_whose_patch_outputs_do_not_fit_the_grid_is_refused(runtime: ModelRuntime) -> None:
    downsampling = torch.nn.Conv3d(1, 2, 2, stride=2).eval()  # (2, 8, 8, 8) per 16^3 patch
    volume, _ = two_volumes()

    async def scenario() -> None:
        await runtime.load(patch_spec(run_patch_batch, downsampling))
        with pytest.raises(ValueError, match=r"a patch output is \(C_out, 16, 16, 16\); got \(2, 8, 8, 8\)"):
            await SlidingWindowInferer(runtime, "seg", SlidingWindowConfig(ROI)).infer(volume)

    asyncio.run(scenario())


def test_a_model_swapped_under_a_study_restarts_it_on_the_new_version(runtime: ModelRuntime) -> None:
    old, new = SpyPatchModel(tiny_net()), SpyPatchModel(RetrainedNet())
    volume, _ = two_volumes()
    config = SlidingWindowConfig(ROI, overlap=0.5, mode="gaussian")
    reported: list[tuple[int, int]] = []

    def run(model: SpyPatchModel, patches: list[torch.Tensor]) -> list[PatchOutput]:
        return model.run_batch(patches)

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(run, old, max_batch_size=4))
        inferer = SlidingWindowInferer(runtime, "seg", config, patches_per_study=6)
        old.hold()
        study = inferer.start(volume, on_progress=lambda done, total: reported.append((done, total)))
        await wait_until(lambda: old.entered.is_set() and runtime.stats()["seg"]["queue_depth"] == 6 - old.running)
        swap = asyncio.create_task(runtime.swap("seg", dataclasses.replace(
            patch_spec(run, new, max_batch_size=4), version="v2", loader=lambda _ctx: new)))
        await wait_until(lambda: runtime.version("seg") == "v2")
        old.release()  # v1 drains its queue; the study's next patches would go to v2
        stitched = await study
        await swap
        return stitched

    stitched = asyncio.run(scenario())
    assert_matches(stitched, monai_reference(new.net, volume, config))
    assert new.patches_of("A") == 16  # the whole study again, on v2 only
    assert reported.count((0, 16)) == 2 and reported[-1] == (16, 16)


class RetrainedNet(torch.nn.Module):
    """Other weights, same shapes as :func:`tiny_net`: the 'retrained' version of the patch model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(volume))


class CountingPatchModel:
    """The tiny net, counting its patch outputs still alive (a weakref finalizer per output)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.alive = 0
        self.most_alive = 0
        self.lock = threading.Lock()

    def run_batch(self, patches: list[torch.Tensor]) -> list[PatchOutput]:
        outputs = run_patch_batch(self.net, patches)
        with self.lock:
            self.alive += len(outputs)
            self.most_alive = max(self.most_alive, self.alive)
        for output in outputs:
            weakref.finalize(output, self._gone)
        return outputs

    def _gone(self) -> None:
        with self.lock:
            self.alive -= 1


def test_a_study_holds_few_patch_outputs_at_once(runtime: ModelRuntime) -> None:
    counting = CountingPatchModel(tiny_net())
    volume = torch.rand((1, 64, 40, 40), generator=torch.Generator().manual_seed(5))
    config = SlidingWindowConfig(ROI, overlap=0.5, mode="gaussian")

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(lambda model, patches: model.run_batch(patches), counting, max_batch_size=2))
        return await SlidingWindowInferer(runtime, "seg", config, patches_per_study=2).infer(volume)

    stitched = asyncio.run(scenario())
    assert_matches(stitched, monai_reference(counting.net, volume, config))
    assert counting.most_alive <= 2  # one per lane (patches_per_study), of 7 x 4 x 4 = 112 patches


@pytest.mark.parametrize("padding", [("reflect", 0.0), ("replicate", 0.0), ("constant", -1.0)])
def test_padding_of_a_volume_smaller_than_the_patch_is_monais(runtime: ModelRuntime,
                                                              padding: tuple[str, float]) -> None:
    net = tiny_net()
    volume = torch.rand((1, 40, 12, 20), generator=torch.Generator().manual_seed(9))
    config = SlidingWindowConfig(ROI, overlap=0.25, mode="gaussian", padding_mode=padding[0],  # type: ignore[arg-type]
                                 cval=padding[1])

    async def scenario() -> PatchOutput:
        await runtime.load(patch_spec(run_patch_batch, net))
        return await SlidingWindowInferer(runtime, "seg", config).infer(volume)

    assert_matches(asyncio.run(scenario()), monai_reference(net, volume, config))


def test_patch_outputs_of_a_model_on_the_cpu_are_on_the_host_either_way() -> None:
    patches = [torch.randn(1, *ROI) for _ in range(3)]
    on_host, kept = run_patch_batch(tiny_net(), patches), run_patch_batch_on_device(tiny_net(), patches)
    for host, other in zip(on_host, kept, strict=True):
        assert isinstance(other, torch.Tensor) and other.device.type == "cpu" and other.dtype == torch.float32
        torch.testing.assert_close(other, host)
