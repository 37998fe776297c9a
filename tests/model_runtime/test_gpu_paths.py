"""The GPU paths on a real CUDA device (skipped without one; their CPU-side logic is tested elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest

from model_runtime.backends import OnnxRuntimeBackend, TorchBackend, export_onnx
from model_runtime.device import resolve_placement
from model_runtime.memory import ItemTooLargeForMemory, run_with_oom_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).eval()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_each_precision_runs_close_to_fp32_on_cpu(mlp: torch.nn.Module, precision: str) -> None:
    batch = torch.randn(32, 64)
    reference = TorchBackend(mlp)(batch)
    placement = resolve_placement("cuda", precision)
    if precision == "bf16" and torch.cuda.get_device_capability(placement.device)[0] < 8:
        pytest.skip("bf16 is refused on GPUs before Ampere")
    output = TorchBackend(mlp, placement)(batch)
    assert output.dtype == torch.float32 and output.device.type == "cpu"
    tolerance = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}[precision]
    torch.testing.assert_close(output, reference, atol=tolerance, rtol=tolerance)


def test_a_real_out_of_memory_is_answered_by_splitting() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    free, _total = torch.cuda.mem_get_info(device)
    per_item = free // 3  # two items fit, four do not
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        block = torch.empty(len(items) * per_item, dtype=torch.uint8, device=device)
        del block
        return list(items)

    assert run_with_oom_split(run, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert sizes == [4, 2, 2]
    with pytest.raises(ItemTooLargeForMemory):
        run_with_oom_split(lambda items: run([0] * 4), [9])
    torch.cuda.empty_cache()


def test_onnx_runtime_uses_the_cuda_provider_when_the_build_has_it(mlp: torch.nn.Module, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (onnxruntime-gpu)")
    graph = export_onnx(mlp, torch.randn(4, 64), tmp_path / "mlp.onnx")
    backend = OnnxRuntimeBackend(graph, placement=resolve_placement("cuda"))
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    batch = torch.randn(16, 64)
    torch.testing.assert_close(backend(batch), TorchBackend(mlp)(batch), atol=1e-4, rtol=1e-4)


def test_gpu_memory_is_in_the_metrics_once_cuda_is_used() -> None:
    torch.ones(1024, device="cuda")
    exposition = generate_latest(REGISTRY).decode()
    assert "tessera_gpu_memory_allocated_bytes{device=" in exposition
    assert "tessera_gpu_memory_total_bytes{device=" in exposition


def test_a_study_on_the_gpu_is_cut_and_blended_there_and_equals_monai() -> None:
    import asyncio
    import copy

    from monai.inferers import sliding_window_inference

    from model_runtime import ModelRuntime, ModelSpec
    from model_runtime.sliding_window import SlidingWindowConfig, SlidingWindowInferer, run_patch_batch_on_device

    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    volume = torch.randn(1, 40, 36, 20)
    config = SlidingWindowConfig(roi_size=(16, 16, 16), overlap=0.5, mode="gaussian")
    with torch.inference_mode():
        expected = sliding_window_inference(volume[None], config.roi_size, 4, net, overlap=0.5, mode="gaussian")
    assert isinstance(expected, torch.Tensor)
    devices: list[str] = []

    def run(model: torch.nn.Module, patches: list[torch.Tensor]) -> list[object]:
        outputs = run_patch_batch_on_device(model, patches)
        devices.extend(patch.device.type for patch in patches)
        devices.extend(output.device.type for output in outputs)  # type: ignore[union-attr]
        return outputs  # type: ignore[return-value]

    async def infer() -> object:
        runtime = ModelRuntime()
        await runtime.load(ModelSpec(name="gpu-net", version="t", run_batch=run, device="cuda", max_batch_size=8,
                                     loader=lambda context: copy.deepcopy(net).to(context.placement.device)))
        try:
            return await SlidingWindowInferer(runtime, "gpu-net", config).infer(volume)
        finally:
            await runtime.close()

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions, to compare with the CPU's
    try:
        output = asyncio.run(infer())
        again = asyncio.run(infer())  # the grid's weights come from the per-device cache the second time
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert devices and set(devices) == {"cuda"}  # patches cut on the GPU, their outputs blended there
    assert isinstance(output, torch.Tensor) and output.device.type == "cpu" and output.dtype == torch.float32
    assert not output.is_pinned()  # staged through page-locked memory, handed over in ordinary memory
    torch.testing.assert_close(output, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, expected[0], atol=1e-4, rtol=1e-4)
