"""Emotion model evaluation through the serving path: the shipped artifact in the shared runtime, fed
int16 8 kHz telephone audio and transcripts as the call pipeline feeds it.

What it measures, per data set, line condition and input (audio-only, text-only, fused): WA (share
right), UA (mean per-class recall) and macro-F1, on the **test speakers recorded in the artifact's
manifest** (so no voice or actor the model was trained or selected on); several artifacts (``--artifact``
repeated) are scored on the very same requests, side by side:

- ``simulated``: **SIMULATED** espeak-ng utterances of the test voices drawn with another seed than
  training's (new sentences from the same script templates, new prosody jitter), over
  - the simulator's line at -55 dBFS line noise (``clean``, what training's corpus has), -40 dBFS
    (``line noise -40 dBFS``: the README's "noisier line") and -30 dBFS, synthesised again each time;
  - the clean line then a degraded one (:func:`~services.customer_service.simulate.degrade_line`): a
    quiet line (-20 / -30 dB), white noise at 20 / 10 / 5 dB SNR, pink at 10 dB, babble at 10 / 5 dB
    (3-6 talkers from held-out utterances of the manifest's *validation* voices, never a test voice);
- ``ravdess``: the RAVDESS test actors through the telephone line (CC BY-NC-SA 4.0, evaluation
  only; four classes, ``frustrated`` counted as ``angry``; its text is one of two fixed sentences),
  clean, with -40 dBFS line noise, quiet (-20 dB), white and babble noise at 10 dB SNR.

Noise comes from fixed seeds (not training's); text-only is scored on the clean line only (the line
does not change the transcript given).

It also times the model: seconds per utterance one at a time and in batches of 16 (the runtime's
batching of concurrent calls). Nothing here is tuned; the model card's table is the training run's
own test figures, computed from cached features; ``ravdess-test`` here should reproduce them through
the serving path (resampling, features and tokens done by the runtime's ``prepare``).

Run:  .venv/bin/python bench/cs_emotion_eval.py [--artifact models/cs/emotion/v1 --artifact ...]
      [--per-voice-emotion 12]   (``tessera bench cs_emotion_eval``; default: the newest shipped artifact)
Writes bench/results/cs_emotion_eval.json and prints markdown tables.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_runtime import load_manifest  # noqa: E402
from model_runtime.runtime import ModelRuntime  # noqa: E402
from services.customer_service.datasets import read_acted_speech_index  # noqa: E402
from services.customer_service.labels import EMOTIONS, REAL_EMOTIONS, fold_label, fold_to_real  # noqa: E402
from services.customer_service.model import EmotionRequest, default_emotion_dir, emotion_model_spec  # noqa: E402
from services.customer_service.pipeline import EmotionReading  # noqa: E402
from services.customer_service.simulate import (  # noqa: E402
    VOICES_BY_NAME,
    LineCondition,
    degrade_line,
    simulate_corpus,
    telephone_band,
)
from services.customer_service.training import MODES, scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cs_emotion_eval.json"
HELDOUT_SEED = 1009
"""Seed of the held-out simulated utterances (training used the manifest's seed)."""
MODEL = "cs-emotion-eval"
LINE_SEED = 4242
"""Seed of the degraded lines' noise (training's augmentation and test lines use others)."""

SIM_LINES: dict[str, tuple[float, LineCondition | None]] = {
    "clean": (-55.0, None),
    "line noise -40 dBFS": (-40.0, None),
    "line noise -30 dBFS": (-30.0, None),
    "quiet line -20 dB": (-55.0, LineCondition(gain_db=-20.0)),
    "quiet line -30 dB": (-55.0, LineCondition(gain_db=-30.0)),
    "white 20 dB SNR": (-55.0, LineCondition(noise="white", snr_db=20.0)),
    "white 10 dB SNR": (-55.0, LineCondition(noise="white", snr_db=10.0)),
    "white 5 dB SNR": (-55.0, LineCondition(noise="white", snr_db=5.0)),
    "pink 10 dB SNR": (-55.0, LineCondition(noise="pink", snr_db=10.0)),
    "babble 10 dB SNR": (-55.0, LineCondition(noise="babble", snr_db=10.0)),
    "babble 5 dB SNR": (-55.0, LineCondition(noise="babble", snr_db=5.0)),
}
"""Simulated conditions: the simulator's line noise (dBFS), then an optional degraded line."""

REAL_LINES: dict[str, tuple[float | None, LineCondition | None]] = {
    "clean": (None, None),
    "line noise -40 dBFS": (-40.0, None),
    "quiet line -20 dB": (None, LineCondition(gain_db=-20.0)),
    "white 10 dB SNR": (None, LineCondition(noise="white", snr_db=10.0)),
    "babble 10 dB SNR": (None, LineCondition(noise="babble", snr_db=10.0)),
}
"""RAVDESS conditions: line noise (dBFS) on the telephone line, then an optional degraded line."""


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


def ravdess_requests(actors: Sequence[str], noise_dbfs: float | None = None) -> tuple[list[EmotionRequest], list[str]]:
    """The RAVDESS clips of ``actors`` through the telephone line (8 kHz int16; line noise at
    ``noise_dbfs`` from a fixed seed) and their labels."""
    from services.customer_service.audio import read_wav

    requests, labels = [], []
    rng = np.random.default_rng(LINE_SEED)
    for entry in read_acted_speech_index():
        if entry.name.speaker in actors:
            audio = read_wav(entry.path.read_bytes())
            line = telephone_band(audio.samples, audio.sample_rate, rng=rng if noise_dbfs is not None else None,
                                  noise_dbfs=noise_dbfs)
            requests.append(EmotionRequest(line, 8000, entry.name.text))
            labels.append(entry.emotion)
    return requests, labels


def degraded(requests: Sequence[EmotionRequest], condition: LineCondition | None, seed: int,
             talkers: Sequence[np.ndarray]) -> list[EmotionRequest]:
    """The requests heard over ``condition`` (unchanged for ``None``), noise from ``seed``."""
    if condition is None:
        return list(requests)
    rng = np.random.default_rng(seed)
    return [EmotionRequest(degrade_line(r.samples, condition, rng, talkers=talkers), r.sample_rate, r.text)
            for r in requests if r.samples is not None]


def build_sets(manifest_data: dict[str, Any], per_voice_emotion: int,
               ) -> dict[str, dict[str, tuple[list[EmotionRequest], list[str]]]]:
    """Every data set under every line condition: set -> condition -> (requests, labels)."""
    test_voices = manifest_data["simulated"]["split"]["test"]
    babble_voices = [VOICES_BY_NAME[v] for v in manifest_data["simulated"]["split"]["validation"]]
    talkers = [clip.samples for clip in simulate_corpus(HELDOUT_SEED + 1, 2, voices=babble_voices, workers=2)]
    simulated: dict[str, tuple[list[EmotionRequest], list[str]]] = {}
    by_noise: dict[float, tuple[list[EmotionRequest], list[str]]] = {}
    for index, (name, (noise_dbfs, condition)) in enumerate(SIM_LINES.items()):
        if noise_dbfs not in by_noise:
            by_noise[noise_dbfs] = simulated_requests(test_voices, per_voice_emotion, noise_dbfs)
        requests, labels = by_noise[noise_dbfs]
        simulated[name] = (degraded(requests, condition, LINE_SEED + index, talkers), labels)
    sets = {"simulated": simulated}
    if "real" in manifest_data:
        actors = manifest_data["real"]["split"]["test"]
        real: dict[str, tuple[list[EmotionRequest], list[str]]] = {}
        for index, (name, (real_noise, condition)) in enumerate(REAL_LINES.items()):
            requests, labels = ravdess_requests(actors, real_noise)
            real[name] = (degraded(requests, condition, LINE_SEED + 100 + index, talkers), labels)
        sets["ravdess"] = real
    return sets


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


async def score_artifact(directory: Path, sets: dict[str, dict[str, tuple[list[EmotionRequest], list[str]]]],
                         ) -> dict[str, Any]:
    """One artifact on every set and condition (text-only on the clean line only), and its timing."""
    manifest = load_manifest(directory)
    runtime = ModelRuntime()
    try:
        await runtime.load(emotion_model_spec(directory, name=MODEL, max_batch_size=16, max_wait_ms=20.0))
        results: dict[str, Any] = {}
        for name, conditions in sets.items():
            results[name] = {}
            for condition, (requests, labels) in conditions.items():
                modes = MODES if condition == "clean" else ("audio", "fused")
                results[name][condition] = {
                    mode: score(await readings(runtime, [only(r, mode) for r in requests]), labels,
                                real=name == "ravdess") for mode in modes}
        timing_set = sets["simulated"]["clean"][0][:32]
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
            "card_test_metrics": manifest.metrics}


async def run(directories: Sequence[Path], per_voice_emotion: int) -> dict[str, Any]:
    """Every artifact on the same requests (built from the first one's test speakers; all must share them)."""
    splits = [load_manifest(d).extra["data"] for d in directories]
    for directory, data in zip(directories[1:], splits[1:], strict=True):
        for part in ("simulated", "real"):
            if part in data and part in splits[0] and data[part]["split"] != splits[0][part]["split"]:
                raise SystemExit(f"{directory}: its {part} split differs from {directories[0]}'s; "
                                 "score them in separate runs")
    sets = build_sets(splits[0], per_voice_emotion)
    artifacts = {}
    for directory in directories:
        scored = await score_artifact(directory, sets)
        key = scored["version"] if scored["version"] not in artifacts else f"{scored['version']} ({directory})"
        artifacts[key] = scored
    return {"artifacts": artifacts, "per_voice_emotion": per_voice_emotion, "heldout_seed": HELDOUT_SEED,
            "line_seed": LINE_SEED, "host": platform.node(), "python": platform.python_version(),
            "clips": {name: {c: len(labels) for c, (_, labels) in conditions.items()}
                      for name, conditions in sets.items()}}


def table(results: dict[str, Any]) -> str:
    """The figures as markdown: audio-only and fused UA per artifact side by side, then every
    figure of every artifact, then the timing."""
    artifacts = results["artifacts"]
    names = list(artifacts)
    first = artifacts[names[0]]["sets"]
    header = "| data set | line | clips | " + " | ".join(f"{n} audio UA | {n} fused UA" for n in names) + " |"
    rows = [header, "|" + "---|" * (3 + 2 * len(names))]
    for set_name, conditions in first.items():
        for condition in conditions:
            cells = [f"{artifacts[n]['sets'][set_name][condition][mode]['ua']:.3f}"
                     for n in names for mode in ("audio", "fused")]
            rows.append(f"| {set_name} | {condition} | {results['clips'][set_name][condition]} | "
                        + " | ".join(cells) + " |")
    rows += ["", "| artifact | data set | line | input | WA | UA | macro-F1 | clips |", "|" + "---|" * 8]
    for name in names:
        for set_name, conditions in artifacts[name]["sets"].items():
            for condition, modes in conditions.items():
                for mode, values in modes.items():
                    rows.append(f"| {name} | {set_name} | {condition} | {mode} | {values['wa']:.3f} | "
                                f"{values['ua']:.3f} | {values['macro_f1']:.3f} | {values['clips']} |")
    for name in names:
        timing = artifacts[name]["seconds_per_utterance"]
        rows.append(f"\n{name}: ms per utterance: {1000 * timing['one_at_a_time']:.1f} one at a time, "
                    f"{1000 * timing['batched']:.1f} in batches")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Evaluate the shipped (or given) emotion artifact; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--artifact", type=Path, action="append",
                        help="artifact directory, repeatable (default: the newest shipped)")
    parser.add_argument("--per-voice-emotion", type=int, default=12, help="held-out simulated clips per voice/emotion")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.artifact or [default_emotion_dir()], args.per_voice_emotion))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
