"""pocketsphinx search settings side by side: word error rate and decoding CPU per second of audio.

The candidates (:data:`VARIANTS`) are decoded with the shipped domain language model on the project's
WER sentences (:mod:`services.customer_service.evaluation`: 24 in-script and 16 held-out sentences,
**simulated** espeak-ng speech over the simulated telephone line), in one process, taking turns per
sentence (so a busy shared box slows them alike), ``--repeats`` times (the decoder dithers its input,
so WER moves by a point or two between passes). CPU is this process's ``time.process_time`` around
each decode (the decoder runs in the calling thread); wall-clock RTF is reported beside it.

Settings are *chosen* on the development sentences (``--sets development``:
:func:`~services.customer_service.evaluation.development_sets`, other script fills and other held-out
sentences) and only the chosen ones are measured on the measurement sets (the default). ``--grid
lw=6,8,10 wip=0.2,0.65`` adds every combination of those values to the variants (over ``base``).

Run:  .venv/bin/python bench/cs_asr_settings.py [--repeats 2] [--variants base,topn2,...] [--sets development]
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
    development_sets,
    measurement_sets,
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
    "beam1e-50": replace(BASE, beam=1e-50),  # wider: -5 points in-script on the development set, +11 % CPU
    "topn2+maxhmmpf3000": replace(BASE, topn=2, maxhmmpf=3000),
    "topn2+ds2": replace(BASE, topn=2, ds=2),
}


SETTING_TYPES: dict[str, type] = {"lw": float, "wip": float, "beam": float, "wbeam": float, "pbeam": float,
                                  "topn": int, "ds": int, "maxhmmpf": int}


def grid_variants(axes: list[str]) -> dict[str, DecoderSettings]:
    """Every combination of ``name=v1,v2`` axes over :data:`BASE`, named ``lw8/wip0.2``."""
    combos: list[tuple[str, dict[str, Any]]] = [("", {})]
    for axis in axes:
        field, _, values = axis.partition("=")
        if field not in SETTING_TYPES or not values:
            raise ValueError(f"grid axis {axis!r}: use one of {', '.join(SETTING_TYPES)} as name=v1,v2")
        combos = [(f"{label}/{field}{value}".lstrip("/"), {**changes, field: SETTING_TYPES[field](value)})
                  for label, changes in combos for value in values.split(",")]
    return {label: replace(BASE, **changes) for label, changes in combos}


def run(names: list[str], repeats: int, set_kind: str = "measurement") -> dict[str, Any]:
    """Decode every sentence set with every variant, alternating; WER, CPU and wall RTF per set."""
    lm = build_domain_lm(domain_texts())
    recognizers = {name: Recognizer(lm, VARIANTS[name]) for name in names}
    sets = development_sets() if set_kind == "development" else measurement_sets()
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
            "repeats": repeats, "sentence_sets": set_kind, "when": datetime.now(UTC).isoformat(timespec="seconds"),
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

    def mean_wer(entry: dict[str, Any]) -> float:
        return mean([run["wer"] for runs in entry["sets"].values() for run in runs])

    for name, entry in sorted(variants.items(), key=lambda item: mean_wer(item[1])):
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
    parser.add_argument("--sets", choices=("measurement", "development"), default="measurement",
                        help="development: the sentences settings are chosen on")
    parser.add_argument("--grid", nargs="*", default=[], help="axes name=v1,v2 (lw, wip, beam, ...) over base")
    args = parser.parse_args(argv)
    try:
        grid = grid_variants(args.grid) if args.grid else {}
    except ValueError as exc:
        parser.error(str(exc))
    VARIANTS.update(grid)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    names += [name for name in grid if name not in names]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}")
    results = run(names, args.repeats, args.sets)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
