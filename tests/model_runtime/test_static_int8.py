"""The calibrated (static) int8 candidate and tolerances stated in the answer's terms (``compare_as``)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from model_runtime.backends import (
    CALIBRATION_OPTION,
    CPU_CANDIDATES,
    build_cpu_backend,
    calibration_rows,
    choose_cpu_backend,
)


class ConvClassifier(torch.nn.Module):
    """(N, 1, T) audio-like signal -> (N, 4) logits: a conv stack, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv1d(1, 16, 9, stride=4), torch.nn.GELU(),
            torch.nn.Conv1d(16, 16, 3, stride=2), torch.nn.GELU())
        self.head = torch.nn.Linear(16, 4)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(signal).mean(dim=-1))


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The answer's terms: softmax over the classes."""
    return torch.softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def classifier() -> ConvClassifier:
    torch.manual_seed(0)
    return ConvClassifier().eval()


def _signals(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 512, generator=generator)


def _quantized_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_static_int8_quantizes_activations_and_stays_close_in_probabilities(
        classifier: ConvClassifier, tmp_path: Path) -> None:
    example, served = _signals(4, seed=1), _signals(16, seed=2)
    backend = build_cpu_backend("onnx-int8-static", classifier, example, tmp_path,
                                backend_options={"onnx-int8-static": {CALIBRATION_OPTION: [_signals(8, seed=3)]}})
    assert backend.name == "onnx-int8-static"
    ops = _quantized_ops(tmp_path / "model.int8-static.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations too, not only weights
    with torch.inference_mode():
        want, got = probabilities(classifier(served)), probabilities(backend(served))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 0.05
    assert not (tmp_path / "model.int8-static.pre.onnx").exists()


def test_static_int8_calibrates_on_each_example_row_by_default(classifier: ConvClassifier, tmp_path: Path) -> None:
    example = _signals(3, seed=4)
    rows = [row for row in calibration_rows(example) if isinstance(row, torch.Tensor)]
    assert [row.shape for row in rows] == [torch.Size([1, 1, 512])] * 3
    assert torch.equal(torch.cat(rows), example)
    named = [row for row in calibration_rows({"a": example[:, 0], "b": example[:, 0, :8]}) if isinstance(row, dict)]
    assert len(named) == 3 and named[2]["b"].shape == (1, 8)
    backend = build_cpu_backend("onnx-int8-static", classifier, example, tmp_path)
    with torch.inference_mode():
        assert backend(example).shape == (3, 4)


def test_the_quantized_candidate_is_never_a_default_and_its_tolerance_is_in_the_answers_terms(
        classifier: ConvClassifier, tmp_path: Path) -> None:
    assert "onnx-int8-static" not in CPU_CANDIDATES
    example = _signals(6, seed=5)
    options = {"onnx-int8-static": {CALIBRATION_OPTION: [_signals(8, seed=6)]}}
    strict = choose_cpu_backend(classifier, example, ("eager", "onnx-int8-static"), 1e-6, batch_sizes=(1,),
                                repeats=2, workdir=tmp_path / "strict", backend_options=options,
                                compare_as=probabilities)
    by_name = {m.name: m for m in strict.measurements}
    assert not by_name["onnx-int8-static"].accurate and strict.name == "eager"
    assert strict.conditions["error_in"] == "probabilities"
    assert by_name["eager"].max_abs_error == 0.0
    loose = choose_cpu_backend(classifier, example, ("onnx-int8-static",), 0.05, batch_sizes=(1,), repeats=2,
                               workdir=tmp_path / "loose", backend_options=options, compare_as=probabilities)
    measured = {m.name: m for m in loose.measurements}["onnx-int8-static"]
    assert measured.accurate and 0.0 < measured.max_abs_error < 0.05
    assert loose.name == "onnx-int8-static"


def test_static_int8_without_calibration_batches_is_refused(classifier: ConvClassifier, tmp_path: Path) -> None:
    from model_runtime.backends import export_onnx, quantize_onnx_int8_static

    source = export_onnx(classifier, _signals(2, seed=7), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="calibration batch"):
        quantize_onnx_int8_static(source, tmp_path / "q.onnx", [])
