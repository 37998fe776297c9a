"""pocketsphinx search settings side by side: word error rate and decoding CPU per second of audio.

The candidates (:data:`VARIANTS`) are decoded with the shipped domain language model on the project's
WER sentences (:mod:`services.customer_service.evaluation`: 24 in-script and 16 held-out sentences,
**simulated** espeak-ng speech over the simulated telephone line), in one process, taking turns per
sentence (so a busy shared box slows them alike), ``--repeats`` times (the decoder dithers its input,
so WER moves by a point or two between passes). CPU is this process's ``time.process_time`` around
each decode (the decoder runs in the calling thread); wall-clock RTF is reported beside it.

Run:  .venv/bin/python bench/cs_asr_settings.py [--repeats 2] [--variants base,topn2,...]
Writes bench/results/cs_asr_settings.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.customer_service.asr import DecoderSettings, Recognizer, build_domain_lm, domain_texts  # noqa: E402
from services.customer_service.evaluation import (  # noqa: E402
    HELD_OUT_SENTENCES,
    in_script_sentences,
    telephone_speech,
    word_errors,
)

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "cs_asr_settings.json"
BASE = DecoderSettings()
VARIANTS: dict[str, DecoderSettings] = {
    "base": BASE,
    "topn2": replace(BASE, topn=2),
    "ds2": replace(BASE, ds=2),
    "maxhmmpf3000": replace(BASE, maxhmmpf=3000),
    "beams-narrow": replace(BASE, beam=1e-30, wbeam=1e-20, pbeam=1e-30),
    "topn2+maxhmmpf3000": replace(BASE, topn=2, maxhmmpf=3000),
    "topn2+ds2": replace(BASE, topn=2, ds=2),
}


def run(names: list[str], repeats: int) -> dict[str, Any]:
    """Decode every sentence set with every variant, alternating; WER, CPU and wall RTF per set."""
    lm = build_domain_lm(domain_texts())
    recognizers = {name: Recognizer(lm, VARIANTS[name]) for name in names}
    sets = {"in_script": in_script_sentences(), "held_out": list(HELD_OUT_SENTENCES)}
    results: dict[str, Any] = {name: {} for name in names}
    for set_name, sentences in sets.items():
        audio = [telephone_speech(sentence, index) for index, sentence in enumerate(sentences)]
        references = [" ".join(words) for _, words in audio]
        audio_s = sum(samples.size / 8000 for samples, _ in audio)
        for repeat in range(repeats):
            hypotheses: dict[str, list[str]] = {name: [] for name in names}
            cpu = dict.fromkeys(names, 0.0)
            wall = dict.fromkeys(names, 0.0)
            for index, (samples, _) in enumerate(audio):
                order = names[index % len(names):] + names[:index % len(names)]
                for name in order:
                    started_cpu, started = time.process_time(), time.perf_counter()
                    transcript = recognizers[name].transcribe(samples, 8000)
                    cpu[name] += time.process_time() - started_cpu
                    wall[name] += time.perf_counter() - started
                    hypotheses[name].append(transcript.text)
            for name in names:
                errors = word_errors(references, hypotheses[name])
                results[name].setdefault(set_name, []).append(
                    {"repeat": repeat, "wer": errors.wer, "cpu_per_audio_s": cpu[name] / audio_s,
                     "wall_rtf": wall[name] / audio_s, "sentences": errors.utterances,
                     "reference_words": errors.reference_words})
    return {"variants": {name: {"settings": asdict(VARIANTS[name]), "sets": results[name]} for name in names},
            "repeats": repeats, "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version()}


def table(results: dict[str, Any]) -> str:
    """Mean [min-max] WER per set, CPU per audio second and its ratio to ``base``."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    variants = results["variants"]
    base_cpu = mean([run["cpu_per_audio_s"] for runs in variants[next(iter(variants))]["sets"].values()
                     for run in runs])
    rows = ["| settings | WER in-script | WER held-out | CPU s per audio s | vs first | wall RTF |",
            "|---|---|---|---|---|---|"]
    for name, entry in variants.items():
        cells = []
        for set_name in ("in_script", "held_out"):
            wers = [100 * run["wer"] for run in entry["sets"][set_name]]
            cells.append(f"{mean(wers):.1f} [{min(wers):.1f}-{max(wers):.1f}]")
        runs = [run for runs in entry["sets"].values() for run in runs]
        cpu = mean([run["cpu_per_audio_s"] for run in runs])
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {cpu:.3f} | {cpu / base_cpu:.2f} | "
                    f"{mean([run['wall_rtf'] for run in runs]):.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Measure the variants; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}")
    results = run(names, args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
