"""Emotion model evaluation through the serving path: the shipped artifact in the shared runtime, fed
int16 8 kHz telephone audio and transcripts as the call pipeline feeds it.

What it measures, per data set and input (audio-only, text-only, fused): WA (share right), UA (mean
per-class recall) and macro-F1, on the **test speakers recorded in the artifact's manifest** (so no
voice or actor the model was trained or selected on):

- ``simulated-heldout``: **SIMULATED** espeak-ng utterances of the test voices drawn with another seed
  than training's (new sentences from the same script templates, new prosody jitter);
- ``simulated-noisy``: the same utterances over a noisier line (-40 dBFS instead of -55 dBFS);
- ``ravdess-test``: the RAVDESS test actors through the telephone line (CC BY-NC-SA 4.0, evaluation
  only); four classes, ``frustrated`` counted as ``angry``; its text is one of two fixed sentences.

It also times the model: seconds per utterance one at a time and in batches of 16 (the runtime's
batching of concurrent calls). Nothing here is tuned; the model card's table is the training run's
own test figures, computed from cached features; ``ravdess-test`` here should reproduce them through
the serving path (resampling, features and tokens done by the runtime's ``prepare``).

Run:  .venv/bin/python bench/cs_emotion_eval.py [--per-voice-emotion 12]   (``tessera bench cs_emotion_eval``)
Writes bench/results/cs_emotion_eval.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_runtime import load_manifest  # noqa: E402
from model_runtime.runtime import ModelRuntime  # noqa: E402
from services.customer_service.datasets import read_acted_speech_index  # noqa: E402
from services.customer_service.labels import EMOTIONS, REAL_EMOTIONS, fold_label, fold_to_real  # noqa: E402
from services.customer_service.model import EmotionRequest, default_emotion_dir, emotion_model_spec  # noqa: E402
from services.customer_service.pipeline import EmotionReading  # noqa: E402
from services.customer_service.simulate import VOICES_BY_NAME, simulate_corpus, telephone_band  # noqa: E402
from services.customer_service.training import MODES, scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cs_emotion_eval.json"
HELDOUT_SEED = 1009
"""Seed of the held-out simulated utterances (training used the manifest's seed)."""
MODEL = "cs-emotion-eval"


def only(request: EmotionRequest, mode: str) -> EmotionRequest:
    """The request with only ``mode``'s modalities."""
    return EmotionRequest(request.samples if mode != "text" else None, request.sample_rate,
                          request.text if mode != "audio" else None)


def simulated_requests(voices: Sequence[str], per_voice_emotion: int, noise_dbfs: float,
                       ) -> tuple[list[EmotionRequest], list[str]]:
    """Held-out simulated utterances of ``voices`` (8 kHz int16 over the line) and their labels."""
    clips = simulate_corpus(HELDOUT_SEED, per_voice_emotion, voices=[VOICES_BY_NAME[v] for v in voices],
                            noise_dbfs=noise_dbfs, workers=2)
    return [EmotionRequest(clip.samples, clip.sample_rate, clip.text) for clip in clips], [c.emotion for c in clips]


def ravdess_requests(actors: Sequence[str]) -> tuple[list[EmotionRequest], list[str]]:
    """The RAVDESS clips of ``actors`` through the telephone line (8 kHz int16) and their labels."""
    from services.customer_service.audio import read_wav

    requests, labels = [], []
    for entry in read_acted_speech_index():
        if entry.name.speaker in actors:
            audio = read_wav(entry.path.read_bytes())
            requests.append(EmotionRequest(telephone_band(audio.samples, audio.sample_rate), 8000, entry.name.text))
            labels.append(entry.emotion)
    return requests, labels


async def readings(runtime: ModelRuntime, requests: Sequence[EmotionRequest]) -> list[EmotionReading]:
    """All requests at once (the runtime batches them)."""
    return list(await asyncio.gather(*[runtime.predict(MODEL, request) for request in requests]))


def score(answers: Sequence[EmotionReading], labels: Sequence[str], *, real: bool) -> dict[str, Any]:
    """WA / UA / macro-F1 (four classes on the real set)."""
    if real:
        truth = [fold_label(label) for label in labels]
        folded = [fold_to_real(answer.probabilities) for answer in answers]
        predicted = [max(f, key=f.__getitem__) for f in folded]
        return scores(truth, predicted, REAL_EMOTIONS)
    return scores(labels, [answer.label for answer in answers], EMOTIONS)


async def run(directory: Path, per_voice_emotion: int) -> dict[str, Any]:
    """Every data set in every mode, and the timing."""
    manifest = load_manifest(directory)
    data = manifest.extra["data"]
    sets = {"simulated-heldout": simulated_requests(data["simulated"]["split"]["test"], per_voice_emotion, -55.0),
            "simulated-noisy": simulated_requests(data["simulated"]["split"]["test"], per_voice_emotion, -40.0)}
    if "real" in data:
        sets["ravdess-test"] = ravdess_requests(data["real"]["split"]["test"])
    runtime = ModelRuntime()
    try:
        await runtime.load(emotion_model_spec(directory, name=MODEL, max_batch_size=16, max_wait_ms=20.0))
        results: dict[str, Any] = {}
        for name, (requests, labels) in sets.items():
            results[name] = {mode: score(await readings(runtime, [only(r, mode) for r in requests]), labels,
                                         real=name.startswith("ravdess")) for mode in MODES}
        timing_set = sets["simulated-heldout"][0][:32]
        started = time.perf_counter()
        for request in timing_set:
            await runtime.predict(MODEL, request)
        alone = (time.perf_counter() - started) / len(timing_set)
        started = time.perf_counter()
        await readings(runtime, timing_set)
        batched = (time.perf_counter() - started) / len(timing_set)
    finally:
        await runtime.close()
    return {"artifact": str(directory), "version": manifest.version, "sets": results,
            "seconds_per_utterance": {"one_at_a_time": alone, "batched": batched},
            "card_test_metrics": manifest.metrics, "host": platform.node(), "python": platform.python_version()}


def table(results: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    rows = ["| data set | input | WA | UA | macro-F1 | clips |", "|---|---|---|---|---|---|"]
    for name, modes in results["sets"].items():
        for mode, values in modes.items():
            rows.append(f"| {name} | {mode} | {values['wa']:.3f} | {values['ua']:.3f} | {values['macro_f1']:.3f} | "
                        f"{values['clips']} |")
    timing = results["seconds_per_utterance"]
    rows.append(f"\nms per utterance: {1000 * timing['one_at_a_time']:.1f} one at a time, "
                f"{1000 * timing['batched']:.1f} in batches")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Evaluate the shipped (or given) emotion artifact; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory (default: newest shipped)")
    parser.add_argument("--per-voice-emotion", type=int, default=12, help="held-out simulated clips per voice/emotion")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.artifact or default_emotion_dir(), args.per_voice_emotion))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
