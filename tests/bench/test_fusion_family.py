"""The audio + text fusion benchmark model: missing modalities, and padded batches equal to one-by-one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.families.fusion_model import (
    EMOTIONS,
    ONNX_DYNAMIC_AXES,
    QUANTIZED_TOLERANCE,
    FusionClassifier,
    FusionGraph,
    backend_example,
    choose_backend,
    decode,
    fusion_model,
    fusion_spec,
    predict_one,
    probabilities,
    run_fusion,
    tokenize,
)
from model_runtime import ModelRuntime, OnnxRuntimeBackend, export_onnx


def tiny_model() -> FusionClassifier:
    return fusion_model(seed=3, hidden=32, audio_layers=1, conv_channels=16, text_layers=1)


def pcm(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.2, int(seconds * 16_000)).clip(-1, 1) * 32767).astype("<i2").tobytes()


REQUESTS = [(pcm(0.4, 1), "hello there"), (pcm(1.3, 2), ""), (b"", "only words, no audio at all"),
            (pcm(0.9, 3), "why is my order late"), (pcm(0.05, 4), "x")]


def test_decode_tokenizes_bytes_and_refuses_empty_or_odd_requests() -> None:
    assert tokenize("hi").tolist() == [0, ord("h") + 3, ord("i") + 3, 2]
    assert len(tokenize("a" * 500)) == 64
    with pytest.raises(ValueError):
        decode(b"", "")
    with pytest.raises(ValueError):
        decode(b"\x00\x01\x02", "odd")
    with pytest.raises(ValueError):
        decode(pcm(0.01, 0), "")  # shorter than the conv encoder's receptive field


def test_either_modality_may_be_missing() -> None:
    model = tiny_model()
    for body, text in [(pcm(0.5, 0), ""), (b"", "text only"), (pcm(0.5, 0), "both")]:
        answer = predict_one(model, decode(body, text))
        assert answer["label"] in EMOTIONS
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    with torch.inference_mode():  # a whole batch without audio, or without text
        assert torch.isfinite(torch.stack(run_fusion(model, [decode(b"", "a"), decode(b"", "bc")]))).all()
        assert torch.isfinite(torch.stack(run_fusion(model, [decode(pcm(0.3, 1), ""),
                                                             decode(pcm(0.6, 2), "")]))).all()


def test_padded_batch_equals_one_by_one() -> None:
    model = tiny_model()
    items = [decode(*request) for request in REQUESTS]
    with torch.inference_mode():
        alone = torch.stack([run_fusion(model, [item])[0] for item in items])
        batched = torch.stack(run_fusion(model, items))
    assert torch.allclose(batched, alone, atol=1e-4)


def test_runtime_batches_match_one_by_one() -> None:
    model = tiny_model()
    runtime = ModelRuntime(prepare_threads=1)
    runtime.load_sync(fusion_spec(model, buckets=False))
    try:
        answers = runtime.predict_many_sync("fusion", REQUESTS)
    finally:
        runtime.close_sync()
    for request, answer in zip(REQUESTS, answers, strict=True):
        expected = predict_one(model, decode(*request))
        assert answer["label"] == expected["label"]
        got, want = (np.array(list(a["probabilities"].values())) for a in (answer, expected))
        assert np.allclose(got, want, atol=1e-4)


def test_onnx_graph_matches_eager_and_falls_back_when_a_modality_is_absent(tmp_path: Path) -> None:
    model = tiny_model()
    items = [decode(*request) for request in REQUESTS]
    path = export_onnx(model, backend_example(items[:2]), tmp_path / "fusion.onnx",
                       dynamic_axes=ONNX_DYNAMIC_AXES, output_names=["logits"])
    graph = FusionGraph(model, OnnxRuntimeBackend(path, threads=1), "onnx")
    text_only = [decode(b"", "no audio"), decode(b"", "none here either")]
    with torch.inference_mode():
        for batch in (items, items[1:2], text_only):
            assert torch.allclose(torch.stack(run_fusion(graph, batch)), torch.stack(run_fusion(model, batch)),
                                  atol=1e-4)


def test_the_quantized_choice_judges_every_candidate_on_answered_probabilities() -> None:
    model = tiny_model()
    graph, choice = choose_backend(model, quantized=True)
    measured = {m["name"]: m for m in choice["measurements"]}
    assert {"eager", "onnx", "onnx-int8", "onnx-int8-static"} <= set(measured)
    assert measured["onnx-int8-static"]["error"] is None  # calibrated and measured, not failed
    assert choice["conditions"]["error_in"] == "answered_probabilities"
    assert choice["max_abs_error_allowed"] == QUANTIZED_TOLERANCE
    items = [decode(*request) for request in REQUESTS[:2]]
    with torch.inference_mode():
        served = probabilities(torch.stack(run_fusion(graph, items)))
        eager = probabilities(torch.stack(run_fusion(model, items)))
    assert float((served - eager).abs().max()) <= QUANTIZED_TOLERANCE
