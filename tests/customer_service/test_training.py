"""`tessera train cs --quick` writes a sealed emotion artifact whose card holds the measured table; the
artifact reads back and reproduces its figures; the runtime adapter serves it with utterances of
concurrent calls in one batch (an utterance alone gets the answer it gets batched), refuses bad items
one by one, and works with either modality missing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model_runtime import BadInput, LoadContext, ModelRuntime, load_manifest, resolve_placement
from model_runtime.runtime import ModelSpec
from services.customer_service.labels import EMOTIONS
from services.customer_service.model import (
    MAX_REQUEST_S,
    EmotionRequest,
    emotion_model_spec,
    load_emotion_model,
    save_emotion_model,
)
from services.customer_service.pipeline import EmotionReading
from services.customer_service.training import QUICK_PLAN, augment, evaluate, load_corpus, main, scores

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A quick artifact (simulated data only) and the cache the run filled."""
    root = tmp_path_factory.mktemp("cs-emotion")
    torch.manual_seed(0)
    assert main(["--quick", "--output", str(root / "models"), "--version", "t1",
                 "--cache-dir", str(root / "cache")]) == 0
    return root / "models" / "emotion" / "t1", root / "cache"


def speech(seconds: float, rate: int = 8000, seed: int = 0) -> np.ndarray:
    """Noise shaped like a voice's level (int16), enough to exercise the audio path."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, 3000, int(seconds * rate)), -32768, 32767).astype(np.int16)


def requests() -> list[EmotionRequest]:
    return [EmotionRequest(speech(1.2), 8000, "This is absolutely unacceptable, I want a refund."),
            EmotionRequest(speech(3.1, seed=1), 8000, None),
            EmotionRequest(None, 8000, "Thank you so much, that was wonderful."),
            EmotionRequest(speech(2.0, 16000, seed=2), 16000, "   "),
            EmotionRequest(speech(0.5, 44100, seed=3), 44100, "where is my order")]


def test_quick_training_writes_a_sealed_artifact_with_its_card(quick: tuple[Path, Path]) -> None:
    directory, cache = quick
    manifest = load_manifest(directory)
    assert manifest.name == "cs-emotion" and manifest.version == "t1"
    assert "SIMULATED" in manifest.data and manifest.rebuild_command.startswith("tessera train cs --quick")
    for mode in ("audio", "text", "fused"):
        for metric in ("wa", "ua", "macro_f1"):
            assert 0.0 <= manifest.metrics[f"test_simulated_{mode}_{metric}"] <= 1.0
    card = (directory / "MODEL_CARD.md").read_text()
    assert "SIMULATED" in card and "| data set (split) | input | WA | UA | macro-F1 |" in card
    assert "89 %" in card and "IEMOCAP" in card and "tessera train cs --quick" in card
    assert sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) < 2_000_000
    assert any(cache.glob("simulated-*/manifest.json")) and any(cache.glob("sim-*.npz"))
    split = manifest.extra["data"]["simulated"]["split"]
    assert not set(split["train"]) & (set(split["validation"]) | set(split["test"]))
    assert not set(split["validation"]) & set(split["test"])


def test_the_artifact_reads_back_and_reproduces_its_test_figures(quick: tuple[Path, Path], tmp_path: Path) -> None:
    directory, cache = quick
    model = load_emotion_model(directory)
    corpus = load_corpus(QUICK_PLAN, cache)  # from the cache: no synthesis
    measured = evaluate(model, {"simulated": corpus.simulated["test"]})["simulated"]
    metrics = load_manifest(directory).metrics
    for mode in ("audio", "text", "fused"):
        assert measured[mode]["ua"] == pytest.approx(metrics[f"test_simulated_{mode}_ua"], abs=1e-4)
    save_emotion_model(model, tmp_path / "copy")
    again = load_emotion_model(tmp_path / "copy")
    items = [model.prepare(np.zeros(16000, np.float32) + 0.01, "hello"), model.prepare(None, "thanks")]
    for copied, original in zip(again.predict(items), model.predict(items), strict=True):
        assert copied == pytest.approx(original)
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == json.loads(
        (directory / "config.json").read_text())


def direct(spec: ModelSpec) -> tuple[Any, Any]:
    """The spec's model and a function running one batch of raw requests without the runtime."""
    model = spec.loader(LoadContext(spec.artifact_dir, None, resolve_placement("cpu", None)))
    prepare = spec.prepare
    assert prepare is not None

    def run(batch: list[EmotionRequest]) -> list[EmotionReading]:
        with torch.inference_mode():
            return list(spec.run_batch(model, [prepare(item) for item in batch]))  # type: ignore[arg-type]
    return model, run


def test_an_utterance_gets_the_same_reading_alone_and_batched(quick: tuple[Path, Path]) -> None:
    _, run = direct(emotion_model_spec(quick[0]))
    together = run(requests())
    for request, batched in zip(requests(), together, strict=True):
        alone = run([request])[0]
        assert alone.modalities == batched.modalities and alone.label == batched.label
        assert alone.probabilities == pytest.approx(batched.probabilities, abs=1e-5)


def test_either_modality_may_be_missing(quick: tuple[Path, Path]) -> None:
    _, run = direct(emotion_model_spec(quick[0]))
    readings = run(requests())
    assert [reading.modalities for reading in readings] == [
        ("audio", "text"), ("audio",), ("text",), ("audio",), ("audio", "text")]
    for reading in readings:
        assert isinstance(reading, EmotionReading) and tuple(reading.probabilities) == EMOTIONS
        assert sum(reading.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert reading.label == max(reading.probabilities, key=reading.probabilities.__getitem__)


def test_concurrent_utterances_share_a_batch_through_the_runtime(quick: tuple[Path, Path]) -> None:
    # A 200 ms window from the first item: the default greedy fill never waits, so on a loaded box the
    # utterances, prepared one by one in the thread pool, can each reach an idle model alone.
    spec = dataclasses.replace(emotion_model_spec(quick[0], name="cs-emotion-test", max_wait_ms=200.0),
                               fill="window")
    sizes: list[int] = []

    def recording(model: Any, items: list[Any]) -> Any:
        sizes.append(len(items))
        return spec.run_batch(model, items)

    _, run = direct(spec)
    expected = run(requests())

    async def scenario() -> list[EmotionReading]:
        runtime = ModelRuntime()
        try:
            await runtime.load(dataclasses.replace(spec, run_batch=recording))
            sizes.clear()  # the warm-up's batches
            return list(await asyncio.gather(*[runtime.predict("cs-emotion-test", r) for r in requests()]))
        finally:
            await runtime.close()

    served = asyncio.run(scenario())
    assert max(sizes) > 1 and sum(sizes) == len(requests())
    for reading, reference in zip(served, expected, strict=True):
        assert reading.probabilities == pytest.approx(reference.probabilities, abs=1e-5)


BAD_REQUESTS = [
    pytest.param(EmotionRequest(None, 8000, None), "neither audio nor text", id="nothing"),
    pytest.param(EmotionRequest(np.zeros(0, np.int16), 8000, "  "), "neither audio nor text", id="empty-and-blank"),
    pytest.param(EmotionRequest(np.zeros(800, np.float32), 8000, "hi"), "int16", id="float-samples"),  # type: ignore[arg-type]
    pytest.param(EmotionRequest(np.zeros((2, 800), np.int16), 8000, None), "mono", id="stereo"),
    pytest.param(EmotionRequest(speech(1.0), 4000, None), "outside 8000-48000", id="rate-too-low"),
    pytest.param(EmotionRequest(speech(1.0), 96000, None), "outside 8000-48000", id="rate-too-high"),
    pytest.param(EmotionRequest(speech(MAX_REQUEST_S + 1), 8000, None), "at most 30 s", id="too-long"),
    pytest.param(EmotionRequest(None, 8000, b"bytes"), "string", id="text-bytes"),  # type: ignore[arg-type]
    pytest.param("not a request", "EmotionRequest", id="wrong-type"),
]


@pytest.mark.parametrize(("request_", "message"), BAD_REQUESTS)
def test_a_bad_item_is_refused_with_a_reason(quick: tuple[Path, Path], request_: Any, message: str) -> None:
    spec = emotion_model_spec(quick[0])
    assert spec.prepare is not None
    with pytest.raises(BadInput, match=message):
        spec.prepare(request_)


def test_a_bad_item_fails_alone_in_the_runtime(quick: tuple[Path, Path]) -> None:
    async def scenario() -> list[Any]:
        runtime = ModelRuntime()
        try:
            await runtime.load(emotion_model_spec(quick[0], name="cs-emotion-bad", max_wait_ms=100.0))
            good, bad = requests()[0], EmotionRequest(speech(1.0), 1000, None)
            return list(await asyncio.gather(runtime.predict("cs-emotion-bad", good),
                                             runtime.predict("cs-emotion-bad", bad), return_exceptions=True))
        finally:
            await runtime.close()

    good, bad = asyncio.run(scenario())
    assert isinstance(good, EmotionReading) and isinstance(bad, BadInput)


def test_the_shipped_artifact_is_found_and_serves() -> None:
    async def scenario() -> EmotionReading:
        runtime = ModelRuntime()
        try:
            described = await runtime.load(emotion_model_spec(REPO / "models" / "cs" / "emotion" / "v1"))
            assert described["version"] == "v1"
            reading: EmotionReading = await runtime.predict("cs-emotion", requests()[0])
            return reading
        finally:
            await runtime.close()

    reading = asyncio.run(scenario())
    assert reading.modalities == ("audio", "text") and reading.label in EMOTIONS
    card = (REPO / "models" / "cs" / "emotion" / "v1" / "MODEL_CARD.md").read_text()
    assert "SIMULATED" in card and "CC BY-NC-SA" in card


def test_scores_are_weighted_unweighted_accuracy_and_macro_f1() -> None:
    truth = ["angry", "angry", "angry", "sad"]
    predicted = ["angry", "angry", "sad", "sad"]
    result = scores(truth, predicted, EMOTIONS)
    assert result["wa"] == pytest.approx(0.75) and result["ua"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_augmentation_keeps_bands_and_at_least_a_second() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 64)).astype(np.float32)
    for _ in range(20):
        out = augment(features, QUICK_PLAN, rng)
        assert out.shape[1] == 64 and 180 <= out.shape[0] <= 300 and out.dtype == np.float32
    short = augment(features[:50], QUICK_PLAN, rng)
    assert short.shape == (50, 64)


def test_tessera_train_cs_is_a_command() -> None:
    completed = subprocess.run([sys.executable, "-m", "services.cli", "train", "cs", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "--quick" in completed.stdout and "--folds" in completed.stdout
