"""CPU backends agree with eager torch, and the choice between them is measured."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from model_runtime import OnnxRuntimeBackend, TorchBackend, choose_cpu_backend, export_onnx
from model_runtime.artifacts import load_manifest, save_artifact
from model_runtime.backends import compare_backends, record_backend_choice, recorded_backend, simplified_onnx
from model_runtime.device import Placement, PlacementError, resolve_placement


class SmallEncoder(torch.nn.Module):
    """(N, 8, 6) float -> (N, 3) logits: a one-layer transformer encoder classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


@pytest.fixture(scope="module")
def encoder() -> SmallEncoder:
    torch.manual_seed(0)
    return SmallEncoder().eval()


def test_onnx_backend_matches_eager(encoder: SmallEncoder, tmp_path: Path) -> None:
    onnx = OnnxRuntimeBackend(export_onnx(encoder, torch.randn(2, 8, 6), tmp_path / "m.onnx"))
    eager = TorchBackend(encoder)
    for batch_size in (1, 5, 17):  # the exported batch axis is dynamic
        batch = torch.randn(batch_size, 8, 6)
        assert torch.allclose(onnx(batch), eager(batch), atol=1e-4)


def test_served_graphs_are_simplified_without_changing_outputs(encoder: SmallEncoder, tmp_path: Path) -> None:
    exported = export_onnx(encoder, torch.randn(2, 8, 6), tmp_path / "m.onnx")
    simplified = onnx.load_from_string(simplified_onnx(exported))
    assert len(simplified.graph.node) < len(onnx.load(str(exported)).graph.node)
    served = OnnxRuntimeBackend(simplified.SerializeToString())
    batch = torch.randn(3, 8, 6)
    assert torch.allclose(served(batch), TorchBackend(encoder)(batch), atol=1e-4)


def test_a_graph_onnxsim_cannot_take_is_served_as_exported(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="tessera.test")], "odd",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("tessera.test", 1)])
    assert simplified_onnx(model.SerializeToString()) == model.SerializeToString()


def test_choose_cpu_backend_measures_every_candidate(encoder: SmallEncoder) -> None:
    example = torch.randn(8, 8, 6)
    choice = choose_cpu_backend(encoder, example, max_abs_error=1e-4, batch_sizes=(1, 8), repeats=5)
    by_name = {m.name: m for m in choice.measurements}
    assert set(by_name) == {"eager", "onnx", "onnx-int8"}
    assert all(m.error is None and set(m.latency_ms) == {1, 8} for m in by_name.values())
    assert by_name["onnx"].max_abs_error < 1e-4
    assert by_name["onnx-int8"].max_abs_error > 0  # quantized: close, not equal
    chosen = by_name[choice.name]
    assert chosen.accurate and chosen.score == min(m.score for m in by_name.values())
    record = choice.as_dict()
    assert record["chosen"] == choice.name and len(record["measurements"]) == 3


def test_inaccurate_candidates_are_never_chosen(encoder: SmallEncoder) -> None:
    choice = choose_cpu_backend(encoder, torch.randn(4, 8, 6), candidates=("eager", "onnx-int8"),
                                max_abs_error=0.0, batch_sizes=(1,), repeats=3)
    assert choice.name == "eager"


def test_built_backends_are_compared_and_a_broken_one_is_recorded(encoder: SmallEncoder, tmp_path: Path) -> None:
    class Broken:
        name = "broken"

        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no kernel")

    eager = TorchBackend(encoder)
    onnx = OnnxRuntimeBackend(export_onnx(encoder, torch.randn(2, 8, 6), tmp_path / "m.onnx"), threads=1)
    choice = compare_backends(eager, {"eager": eager, "onnx": onnx, "broken": Broken()}, torch.randn(4, 8, 6),
                              1e-4, batch_sizes=(1, 4), repeats=3, threads=1)
    by_name = {m.name: m for m in choice.measurements}
    assert choice.name in ("eager", "onnx") and "no kernel" in (by_name["broken"].error or "")
    assert choice.conditions["torch_threads"] == 1 and choice.conditions["example_rows"] == 4


def test_the_choice_is_recorded_in_a_sealed_artifact_without_touching_its_payload(
        encoder: SmallEncoder, tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"w")
    sealed = save_artifact(tmp_path, name="m", version="1", framework="torch", model_card="# m 1\n\n## Rebuild\nx\n")
    assert recorded_backend(load_manifest(tmp_path), "encoder") is None  # a card from before the record
    for _ in range(2):  # recording again replaces the record and the card section
        choice = choose_cpu_backend(encoder, torch.randn(4, 8, 6), candidates=("eager", "onnx"),
                                    max_abs_error=1e-4, batch_sizes=(1,), repeats=3)
        record_backend_choice(tmp_path, "encoder", choice)
    manifest = load_manifest(tmp_path)  # verified: the payload digests still hold
    assert manifest.digest == sealed.digest and recorded_backend(manifest, "encoder") == choice.name
    assert manifest.extra["serving_backend"]["encoder"]["chosen"] == choice.name
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert card.count("## Serving backend (measured): encoder") == 1 and "## Rebuild" in card
    assert f"Served: **{choice.name}**" in card and "| onnx |" in card


def test_placement_defaults_to_cpu_without_cuda() -> None:
    placement = resolve_placement("cpu")
    assert placement == Placement(torch.device("cpu")) and placement.describe() == "cpu"
    if not torch.cuda.is_available():
        assert resolve_placement("auto").device.type == "cpu"
        with pytest.raises(PlacementError, match="no CUDA"):
            resolve_placement("cuda")
