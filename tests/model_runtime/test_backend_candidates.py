"""Named inputs and outputs with dynamic axes on ONNX export, and the optional CPU candidates."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from model_runtime.backends import (
    CompiledTorchBackend,
    OnnxExportError,
    OnnxRuntimeBackend,
    TorchBackend,
    available_cpu_candidates,
    choose_cpu_backend,
    export_onnx,
    max_abs_difference,
    openvino_available,
    torch_compile_available,
)


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention whose reshapes do not name the sequence length (so it stays dynamic)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_width = heads, width // heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self.qkv(x).view(rows, -1, 3, self.heads, self.head_width).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(1, 2).reshape(rows, -1, self.heads * self.head_width))


class TokensAndFeatures(torch.nn.Module):
    """(tokens[N, T] int64, features[N, T, 4] float) -> {"per_step": [N, T, 8], "pooled": [N, 3]}."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.project = torch.nn.Linear(4, 8)
        self.attention = SelfAttention(8, 2)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        per_step = self.attention(self.embed(tokens) + self.project(features))
        return {"per_step": per_step, "pooled": self.head(per_step.mean(dim=1))}


class TorchEncoder(torch.nn.Module):
    """(N, T, 8) -> (N, T, 8) through torch's own TransformerEncoderLayer (its MHA fixes T on export)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    return {"tokens": torch.randint(0, 50, (rows, length)), "features": torch.randn(rows, length, 4)}


SEQUENCE_AXES = {"tokens": {1: "sequence"}, "features": {1: "sequence"}, "per_step": {1: "sequence"}}


@pytest.fixture(scope="module")
def fusion() -> TokensAndFeatures:
    torch.manual_seed(0)
    return TokensAndFeatures().eval()


def test_two_named_inputs_with_a_dynamic_sequence_match_torch_at_two_lengths(
        fusion: TokensAndFeatures, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    graph = export_onnx(fusion, _batch(2, 7), tmp_path / "fusion.onnx", dynamic_axes=SEQUENCE_AXES)
    proto = onnx.load(str(graph))
    assert [node.name for node in proto.graph.input] == ["tokens", "features"]
    assert [node.name for node in proto.graph.output] == ["per_step", "pooled"]
    tokens_dims = [dim.dim_param for dim in proto.graph.input[0].type.tensor_type.shape.dim]
    assert tokens_dims == ["batch", "sequence"]
    onnx_backend, eager = OnnxRuntimeBackend(graph), TorchBackend(fusion)
    for rows, length in ((3, 5), (4, 11)):
        batch = _batch(rows, length)
        ours, reference = onnx_backend(batch), eager(batch)
        assert isinstance(ours, dict) and ours["per_step"].shape == (rows, length, 8)
        torch.testing.assert_close(ours["per_step"], reference["per_step"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours["pooled"], reference["pooled"], atol=1e-5, rtol=1e-4)
    assert "not simplified" not in caplog.text  # onnxsim checked it at concrete sizes, axes kept dynamic


def test_an_export_that_fixes_a_dynamic_axis_is_refused_at_export(tmp_path: Path) -> None:
    encoder = TorchEncoder().eval()
    axes = {"input": {1: "sequence"}, "output": {1: "sequence"}}
    with pytest.raises(OnnxExportError, match="MultiheadAttention"):
        export_onnx(encoder, torch.randn(2, 7, 8), tmp_path / "encoder.onnx", dynamic_axes=axes)
    export_onnx(encoder, torch.randn(2, 7, 8), tmp_path / "fixed.onnx")  # a fixed length is fine


def test_a_volume_model_exports_with_dynamic_spatial_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    spatial = {2: "depth", 3: "height", 4: "width"}
    graph = export_onnx(conv, torch.randn(1, 1, 8, 8, 8), tmp_path / "conv.onnx",
                        dynamic_axes={"input": spatial, "output": spatial})
    backend = OnnxRuntimeBackend(graph)
    for shape in ((2, 1, 8, 8, 8), (1, 1, 12, 10, 6)):
        volume = torch.randn(*shape)
        ours = backend(volume)
        assert isinstance(ours, torch.Tensor)  # one tensor in, one output: a tensor back
        torch.testing.assert_close(ours, TorchBackend(conv)(volume), atol=1e-5, rtol=1e-4)


def test_export_refuses_axes_and_inputs_it_does_not_know(fusion: TokensAndFeatures, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an input or output"):
        export_onnx(fusion, _batch(2, 5), tmp_path / "a.onnx", dynamic_axes={"lengths": {1: "sequence"}})
    with pytest.raises(ValueError, match="not parameters of TokensAndFeatures.forward"):
        export_onnx(fusion, {**_batch(2, 5), "lengths": torch.ones(2)}, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="missing inputs"):
        OnnxRuntimeBackend(export_onnx(fusion, _batch(2, 5), tmp_path / "c.onnx"))({"tokens": torch.ones(2, 5)})


def test_named_inputs_are_measured_like_one_tensor(fusion: TokensAndFeatures, tmp_path: Path) -> None:
    choice = choose_cpu_backend(fusion, _batch(4, 6), candidates=("eager", "onnx", "openvino"), max_abs_error=1e-4,
                                batch_sizes=(1, 4), repeats=3, workdir=tmp_path,
                                export_options={"dynamic_axes": SEQUENCE_AXES})
    by_name = {m.name: m for m in choice.measurements}
    assert by_name["onnx"].error is None and by_name["onnx"].max_abs_error < 1e-4
    assert choice.conditions["example_rows"] == 4
    if not openvino_available():  # skipped cleanly: recorded as not buildable, never chosen
        assert "not installed" in (by_name["openvino"].error or "") and "openvino" not in available_cpu_candidates()
    assert max_abs_difference({"a": torch.ones(2)}, {"a": torch.zeros(2)}) == 1.0


@pytest.mark.slow
@pytest.mark.skipif(not torch_compile_available(), reason="torch.compile on CPU needs a C++ compiler")
def test_torch_compile_is_a_candidate_whose_compile_time_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real compile: with inductor's graph cache warm from an earlier run, "compiling" took 4 ms, less
    # than one call on a busy box, and the comparison below meant nothing (a flaky failure).
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    example = torch.randn(8, 16)
    assert "torch-compile" in available_cpu_candidates()
    compiled = CompiledTorchBackend(mlp, example)
    assert compiled.compile_s > 0
    torch.testing.assert_close(compiled(torch.randn(5, 16) * 0 + example[:5]), TorchBackend(mlp)(example[:5]))
    choice = choose_cpu_backend(mlp, example, candidates=("eager", "torch-compile"), max_abs_error=1e-4,
                                batch_sizes=(1, 8), repeats=5)
    measured = {m.name: m for m in choice.measurements}["torch-compile"]
    assert measured.error is None and measured.accurate and measured.build_ms is not None
    # the latency of a call, not of a compile (recorded apart as build_ms). Compared with the cold compile
    # above (seconds): the choice's own compile of the same graph reuses this process's compiled code
    # and can take a few milliseconds, less than one call on a busy box.
    assert max(measured.latency_ms.values()) < 1000 * compiled.compile_s


def test_a_compile_over_its_cap_is_recorded_not_fatal() -> None:
    if not torch_compile_available():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    choice = choose_cpu_backend(mlp, torch.randn(2, 4), candidates=("eager", "torch-compile"),
                                batch_sizes=(1,), repeats=2, compile_timeout_s=0.001)
    by_name = {m.name: m for m in choice.measurements}
    assert "took longer than 0.001 s" in (by_name["torch-compile"].error or "") and choice.name == "eager"
