"""The fp32 volume path's backend options: scalar PReLU served as LeakyRelu, ONNX Runtime without
spinning, OpenVINO in f32 (when installed) with its batch split over streams."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from model_runtime import OnnxRuntimeBackend, TorchBackend, export_onnx
from model_runtime.backends import (
    OpenVinoBackend,
    build_cpu_backend,
    onnx_session,
    openvino_available,
    simplified_onnx,
)


class PReluNet(torch.nn.Module):
    """(N, 1, 8, 8, 8) -> (N, 2, 8, 8, 8): conv, one-slope PReLU (MONAI's default), conv, per-channel PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.act1 = torch.nn.PReLU()
        self.conv2 = torch.nn.Conv3d(4, 2, 3, padding=1)
        self.act2 = torch.nn.PReLU(num_parameters=2)
        with torch.no_grad():
            self.act1.weight.fill_(0.173)
            self.act2.weight.copy_(torch.tensor([0.05, 0.4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))))


@pytest.fixture(scope="module")
def prelu_net() -> PReluNet:
    torch.manual_seed(0)
    return PReluNet().eval()


@pytest.fixture(scope="module")
def prelu_graph(prelu_net: PReluNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(prelu_net, torch.randn(2, 1, 8, 8, 8), tmp_path_factory.mktemp("prelu") / "net.onnx")


def test_a_one_slope_prelu_is_served_as_leaky_relu_with_identical_outputs(prelu_net: PReluNet,
                                                                         prelu_graph: Path) -> None:
    exported = [node.op_type for node in onnx.load(str(prelu_graph)).graph.node]
    assert exported.count("PRelu") == 2
    served = onnx.load_from_string(simplified_onnx(prelu_graph))
    ops = [node.op_type for node in served.graph.node]
    assert ops.count("LeakyRelu") == 1 and ops.count("PRelu") == 1  # the per-channel slope stays a PRelu
    (leaky,) = [node for node in served.graph.node if node.op_type == "LeakyRelu"]
    assert onnx.helper.get_attribute_value(leaky.attribute[0]) == pytest.approx(0.173)
    volume = torch.randn(3, 1, 8, 8, 8)
    as_exported = onnx_session(prelu_graph, simplify=False).run(None, {"input": volume.numpy()})[0]
    rewritten = OnnxRuntimeBackend(prelu_graph)(volume)
    assert torch.equal(rewritten, torch.from_numpy(as_exported))  # the same arithmetic, bit for bit
    torch.testing.assert_close(rewritten, TorchBackend(prelu_net)(volume), atol=1e-5, rtol=1e-4)


def test_onnx_runtime_without_spinning_answers_the_same(prelu_graph: Path, tmp_path: Path,
                                                        prelu_net: PReluNet) -> None:
    volume = torch.randn(2, 1, 8, 8, 8)
    spinning = OnnxRuntimeBackend(prelu_graph)
    sleeping = build_cpu_backend("onnx", prelu_net, volume, tmp_path, backend_options={"onnx": {"spinning": False}})
    assert isinstance(sleeping, OnnxRuntimeBackend)
    assert sleeping.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert torch.equal(sleeping(volume), spinning(volume))


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_openvino_runs_float32_and_splits_a_batch_over_its_streams(prelu_net: PReluNet, prelu_graph: Path) -> None:
    one = OpenVinoBackend(prelu_graph, threads=2)
    two = OpenVinoBackend(prelu_graph, threads=2, streams=2)
    assert "32" in one.precision and "32" in two.precision  # never OpenVINO's bf16 default on AMX CPUs
    for rows in (1, 3):
        volume = torch.randn(rows, 1, 8, 8, 8)
        expected = TorchBackend(prelu_net)(volume)
        torch.testing.assert_close(one(volume), expected, atol=1e-4, rtol=1e-4)
        split = two(volume)
        assert split.shape == expected.shape
        torch.testing.assert_close(split, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="streams"):
        OpenVinoBackend(prelu_graph, streams=0)
