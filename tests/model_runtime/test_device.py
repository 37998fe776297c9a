"""Device and precision per model, and ONNX Runtime's providers for a placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_runtime.device import (
    Placement,
    PlacementError,
    inference_context,
    onnx_providers,
    resolve_placement,
)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch believes two CUDA devices are visible (pure placement logic: nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_fp32_is_the_default_and_runs_without_autocast() -> None:
    placement = resolve_placement("cpu")
    assert placement.autocast_dtype is None and placement.precision == "fp32"
    with inference_context(placement):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_cpu_runs_under_cpu_autocast() -> None:
    placement = resolve_placement("cpu", "bf16")
    assert placement.describe() == "cpu/bf16"
    layer = torch.nn.Linear(8, 4)
    with inference_context(placement):
        assert torch.is_autocast_enabled("cpu")
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16


def test_fp16_is_refused_on_an_explicit_cpu_and_runs_as_fp32_when_auto_falls_back() -> None:
    with pytest.raises(PlacementError, match="fp16 is not served on CPU"):
        resolve_placement("cpu", "fp16")
    if not torch.cuda.is_available():
        assert resolve_placement("auto", "fp16") == Placement(torch.device("cpu"))


@pytest.mark.parametrize("device, precision, message", [
    ("gpu", None, "is not one of auto, cpu, cuda"),
    ("cpu:1", None, "only cuda takes an index"),
    ("cpu", "int4", "precision 'int4' is not one of"),
])
def test_malformed_choices_are_refused(device: str, precision: str | None, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        resolve_placement(device, precision)


@pytest.mark.usefixtures("two_gpus")
def test_cuda_devices_are_chosen_per_model() -> None:
    assert resolve_placement("auto").device == torch.device("cuda", 0)
    assert resolve_placement("cuda:1", "fp16").describe() == "cuda:1/fp16"
    assert resolve_placement("cuda", "bf16").autocast_dtype == torch.bfloat16
    assert resolve_placement("cuda").autocast_dtype is None  # no autocast unless the spec asks
    with pytest.raises(PlacementError, match="cuda:2 asked for but torch sees 2"):
        resolve_placement("cuda:2")


@pytest.mark.usefixtures("two_gpus")
def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(PlacementError, match="Tesla T4 lacks it: use fp16"):
        resolve_placement("cuda:1", "bf16")


def test_onnx_providers_follow_the_placement_and_the_build() -> None:
    on_gpu = Placement(torch.device("cuda", 1))
    assert onnx_providers(None) == ["CPUExecutionProvider"]
    assert onnx_providers(Placement(torch.device("cpu"))) == ["CPUExecutionProvider"]
    assert onnx_providers(on_gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert onnx_providers(on_gpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    import onnxruntime as ort

    expected_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert (onnx_providers(on_gpu)[0] != "CPUExecutionProvider") == expected_cuda


def test_an_onnx_graph_placed_on_a_gpu_runs_on_cpu_when_the_build_lacks_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    from model_runtime.backends import OnnxRuntimeBackend, export_onnx

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    layer = torch.nn.Linear(8, 4)
    example = torch.randn(3, 8)
    graph = export_onnx(layer, example, tmp_path / "linear.onnx")
    backend = OnnxRuntimeBackend(graph, placement=Placement(torch.device("cuda", 0)))
    assert backend.session.get_providers() == ["CPUExecutionProvider"]
    torch.testing.assert_close(backend(example), layer(example).detach(), atol=1e-5, rtol=1e-5)


def test_a_cuda_provider_that_cannot_start_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from model_runtime import backends

    layer = torch.nn.Linear(8, 4)
    graph = backends.export_onnx(layer, torch.randn(3, 8), tmp_path / "linear.onnx")
    asked = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    monkeypatch.setattr(backends, "onnx_providers", lambda placement: asked)
    session = backends.onnx_session(graph, placement=Placement(torch.device("cuda", 0)))
    if "CUDAExecutionProvider" not in session.get_providers():
        assert "could not start its CUDA provider" in caplog.text
