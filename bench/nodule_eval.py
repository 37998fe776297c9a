"""Nodule detector evaluation: teacher vs student on held-out SIMULATED studies, and the real CT samples.

**The held-out studies are simulated** (:mod:`services.nodule.simulate`): figures here are figures on
simulated chest CT, not on patients. They are drawn with seeds of their own and with other settings
than training (:data:`services.nodule.evaluation.EVALUATION_CONFIG`: noise 15-55 HU, 70 % sharp
kernels, slices 1.1 / 1.75 / 2.25 mm, pixels 0.62-0.92 mm, rotation up to 8 degrees, more
juxta-pleural nodules, 35 % of scans without a nodule). Thresholds are the ones shipped with each
model, chosen on the validation split at training time; nothing here is tuned.

Per model: per-scan sensitivity and specificity at the shipped threshold, the LUNA16 CPM (mean
sensitivity at 1/8 ... 8 FP per scan), each with a percentile bootstrap 95 % CI over scans, the FROC
points, nodule-level sensitivity, FP per scan, type accuracy, median centre and long-axis errors of
the hits, and seconds per volume (the whole detect_series call: normalisation, sliding window
through the runtime, post-processing). Then every series under ``../shared/datasets/ct_samples/``
is assembled (``services.nodule.volume``) and run, or refused with the reason (no annotations
there: this checks the pipeline, not accuracy).

Run:  .venv/bin/python bench/nodule_eval.py [--studies 60]   (``tessera bench nodule_eval``)
``--split development`` runs the same on the development set instead (evaluation settings, validation-split
seeds, :func:`services.nodule.evaluation.development_seeds`): where model choices are made, so that the
held-out studies are scored once per shipped model.
Writes bench/results/nodule_eval.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_runtime.runtime import ModelRuntime  # noqa: E402
from services.nodule.candidates import scan_candidates  # noqa: E402
from services.nodule.classifier import TwoStageSettings, is_two_stage, load_crop_net  # noqa: E402
from services.nodule.detect import (  # noqa: E402
    DetectionRefused,
    detect_series,
    load_detector,
    probability_map,
    two_stage_settings_for,
)
from services.nodule.evaluation import (  # noqa: E402
    EVALUATION_CONFIG,
    ScanRecord,
    Summary,
    candidates_of,
    development_seeds,
    match,
    split_seeds,
    summarise,
    truths_of,
    type_accuracy,
    volume_from_simulated,
)
from services.nodule.model import DetectorSettings, default_artifact_dir  # noqa: E402
from services.nodule.simulate import simulate_study  # noqa: E402
from services.nodule.two_stage import classify_candidates  # noqa: E402
from services.nodule.volume import SeriesError, assemble_series  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "nodule_eval.json"
CT_SAMPLES = ROOT.parent / "shared" / "datasets" / "ct_samples"
NOT_DICOM = (".md", ".txt", ".json", ".license")
SPLIT_LABELS = {"evaluation": "simulated held-out studies",
                "development": "simulated development studies (evaluation settings, validation seeds)"}
GOALS = {"sensitivity": 0.963, "specificity": 0.912, "cpm": 0.90, "speedup": 5.0, "student_seconds": 2.0}


async def network_seconds(runtime: ModelRuntime, model_name: str, hu: np.ndarray,
                          spacing_mm: tuple[float, float, float], repeats: int = 3) -> float:
    """Median seconds of the network pass alone: the sliding window of a dense network (normalisation
    included, no post-processing), or a two-stage classifier over one scan's candidate crops (crop
    cutting included, candidates found beforehand and not timed)."""
    two_stage = two_stage_settings_for(runtime, model_name)
    scan = scan_candidates(hu, spacing_mm, max_candidates=two_stage.max_candidates,
                           faint_candidates=two_stage.faint_candidates) if two_stage else None
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        if scan is not None:
            await classify_candidates(scan, runtime=runtime, model_name=model_name,
                                      blended=bool(two_stage and two_stage.blended))
        else:
            await probability_map(hu, runtime=runtime, model_name=model_name)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


async def evaluate_models(roles: list[str], artifacts: dict[str, Path], seeds: list[int], split: str,
                          device: str | None, network: dict[str, float]
                          ) -> tuple[dict[str, list[ScanRecord]], dict[str, DetectorSettings | TwoStageSettings],
                                     dict[str, str]]:
    """Run every role's detector over ``seeds``' studies, drawn with the evaluation settings (simulated
    one at a time, shared by the roles); ``split`` names them in the records."""
    runtime = ModelRuntime()
    settings: dict[str, DetectorSettings | TwoStageSettings] = {}
    versions: dict[str, str] = {}
    records: dict[str, list[ScanRecord]] = {role: [] for role in roles}
    try:
        for role in roles:
            settings[role] = await load_detector(runtime, role=role, artifact_dir=str(artifacts[role]), device=device)
            versions[role] = runtime.version(f"nodule-{role}")
        for index, seed in enumerate(seeds):
            study = simulate_study(replace(EVALUATION_CONFIG, seed=seed))
            volume = volume_from_simulated(study, uid=f"{split}-{index}")
            for role in roles:
                started = time.perf_counter()
                findings = await detect_series(volume, runtime=runtime, model_name=f"nodule-{role}", min_confidence=0.0)
                seconds = time.perf_counter() - started
                record = ScanRecord(f"{split}-{index}", truths_of(study), candidates_of(findings), seconds)
                records[role].append(record)
            print(f"  study {index + 1}/{len(seeds)}: {len(study.nodules)} nodule(s), "
                  + ", ".join(f"{role} {records[role][-1].seconds:.2f} s" for role in roles), flush=True)
            if index == 0:
                for role in roles:
                    network[role] = await network_seconds(runtime, f"nodule-{role}", study.hu, study.spacing_mm)
    finally:
        await runtime.close()
    return records, settings, versions


def hit_errors(records: list[ScanRecord], threshold: float) -> dict[str, float]:
    """Median centre distance (mm) and absolute long-axis error (mm) of reported candidates that hit a nodule."""
    centre, axis = [], []
    for record in records:
        for candidate, hit in zip(record.candidates, match(record), strict=True):
            if hit is None or candidate.confidence < threshold:
                continue
            truth = record.truths[hit]
            centre.append(float(np.linalg.norm(np.subtract(candidate.centre_lps_mm, truth.centre_lps_mm))))
            axis.append(abs(candidate.long_axis_mm - truth.long_axis_mm))
    return {"median_centre_error_mm": float(np.median(centre)) if centre else math.nan,
            "median_long_axis_error_mm": float(np.median(axis)) if axis else math.nan}


def model_result(records: list[ScanRecord], settings: DetectorSettings | TwoStageSettings, version: str,
                 resamples: int) -> dict[str, Any]:
    """Every figure of one model on the evaluation studies, JSON-ready."""
    summary: Summary = summarise(records, settings.report_threshold, resamples=resamples)
    accuracy, typed = type_accuracy(records, settings.report_threshold)
    seconds = [record.seconds for record in records]
    return {
        "version": version, "threshold": settings.report_threshold,
        "sensitivity": summary.sensitivity.as_dict(), "specificity": summary.specificity.as_dict(),
        "cpm": summary.cpm.as_dict(),
        "sensitivity_at_fp_per_scan": {str(k): v for k, v in summary.sensitivity_at.items()},
        "counts": summary.counts.__dict__, "nodule_sensitivity": summary.counts.nodule_sensitivity,
        "fp_per_scan": summary.counts.fp_per_scan, "type_accuracy": accuracy, "typed_nodules": typed,
        "seconds_per_volume": {"median": float(np.median(seconds)), "p90": float(np.percentile(seconds, 90)),
                               "first": seconds[0] if seconds else math.nan},
        "froc": {"fp_per_scan": summary.froc.fp_per_scan.round(4).tolist()[:400],
                 "sensitivity": summary.froc.sensitivity.round(4).tolist()[:400]},
        **hit_errors(records, settings.report_threshold),
    }


async def run_ct_samples(root: Path, artifact: Path, device: str | None) -> list[dict[str, Any]]:
    """Assemble every series under ``root`` and run the student on each, or record why not."""
    if not root.is_dir():
        return [{"folder": str(root), "outcome": "skipped", "reason": "directory absent"}]
    runtime = ModelRuntime()
    rows: list[dict[str, Any]] = []
    try:
        await load_detector(runtime, role="student", artifact_dir=str(artifact), device=device)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in NOT_DICOM)
            results = assemble_series(files)
            for result in results:
                rows.append(await _run_one(folder.name, result, runtime))
            if any(isinstance(r, SeriesError) and r.code == "missing_uid" for r in results):
                # the files' UIDs were blanked when they were published: give them placeholder UIDs in
                # memory so the rest of the pipeline is exercised on their pixels
                for result in assemble_series(_with_placeholder_uids(folder.name, files)):
                    rows.append(await _run_one(f"{folder.name} (placeholder UIDs)", result, runtime))
    finally:
        await runtime.close()
    return rows


def _with_placeholder_uids(folder: str, files: list[str]) -> list[Any]:
    import pydicom
    from pydicom.uid import generate_uid

    datasets = []
    for path in files:
        try:
            dataset = pydicom.dcmread(path)
        except Exception:  # not DICOM: assembly reports it from the path
            continue
        for keyword, source in (("StudyInstanceUID", folder), ("SeriesInstanceUID", folder),
                                ("SOPInstanceUID", f"{folder}/{Path(path).name}")):
            if not str(dataset.get(keyword, "") or "").strip():
                setattr(dataset, keyword, generate_uid(entropy_srcs=["tessera-bench", keyword, source]))
        datasets.append(dataset)
    return datasets


async def _run_one(folder: str, result: Any, runtime: ModelRuntime) -> dict[str, Any]:
    if isinstance(result, SeriesError):
        return {"folder": folder, "outcome": "refused at assembly", "reason": f"{result.code}: {result.message}"}
    row: dict[str, Any] = {"folder": folder, "shape": list(result.shape),
                           "spacing_mm": [round(v, 3) for v in result.spacing_mm]}
    started = time.perf_counter()
    try:
        findings = await detect_series(result, runtime=runtime, model_name="nodule-student")
    except DetectionRefused as refused:
        return {**row, "outcome": "refused by the detector", "reason": refused.reason}
    seconds = round(time.perf_counter() - started, 2)
    return {**row, "outcome": "analysed", "nodules": len(findings.nodules), "seconds": seconds,
            "notes": list(findings.notes),
            "largest_mm": max((n.long_axis_mm for n in findings.nodules), default=None)}


def _pct(interval: dict[str, float]) -> str:
    return f"{interval['value'] * 100:.1f} % ({interval['low'] * 100:.1f}-{interval['high'] * 100:.1f})"


def _interval(interval: dict[str, float]) -> str:
    return f"{interval['value']:.3f} ({interval['low']:.3f}-{interval['high']:.3f})"


def _analysed_detail(sample: dict[str, Any]) -> str:
    notes = f"; {'; '.join(sample['notes'])}" if sample.get("notes") else ""
    return (f"{sample.get('shape')} at {sample.get('spacing_mm')} mm: {sample.get('nodules')} nodule(s) reported, "
            f"{sample.get('seconds')} s{notes}")


def table(results: dict[str, Any]) -> str:
    """The markdown table of the run."""
    models = results["models"]
    roles = list(models)
    heading = SPLIT_LABELS[results.get("split", "evaluation")]
    lines = [f"| {heading} | " + " | ".join(f"{r} ({models[r]['parameters']:,} params)" for r in roles)
             + " | goal |", "|---|" + "---|" * len(roles) + "---|"]

    def row(label: str, cells: list[str], goal: str = "") -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {goal} |")

    row("per-scan sensitivity (95 % CI)", [_pct(models[r]["sensitivity"]) for r in roles], "student >= 96.3 %")
    row("per-scan specificity (95 % CI)", [_pct(models[r]["specificity"]) for r in roles], "student >= 91.2 %")
    row("CPM (95 % CI)", [_interval(models[r]["cpm"]) for r in roles], ">= 0.90")
    for rate in ("0.125", "1.0", "8.0"):
        row(f"sensitivity at {float(rate):g} FP/scan",
            [f"{models[r]['sensitivity_at_fp_per_scan'][rate]:.3f}" for r in roles])
    row("nodule sensitivity / FP per scan at threshold",
        [f"{models[r]['nodule_sensitivity']:.3f} / {models[r]['fp_per_scan']:.2f}" for r in roles])
    row("type accuracy (hit nodules)",
        [f"{models[r]['type_accuracy']:.3f} (n={models[r]['typed_nodules']})" for r in roles])
    row("median centre / long-axis error (mm)",
        [f"{models[r]['median_centre_error_mm']:.2f} / {models[r]['median_long_axis_error_mm']:.2f}" for r in roles])
    row("s per 64x256x256 volume (median)", [f"{models[r]['seconds_per_volume']['median']:.2f}" for r in roles],
        "student <= 2 s")
    row("s per volume, network pass only (median of 3)",
        [f"{models[r]['network_seconds_per_volume']:.2f}" for r in roles])
    if "speedup" in results:
        row("teacher / student time: whole detection / network pass",
            [f"{results['speedup']:.1f}x / {results['network_speedup']:.1f}x"] + [""] * (len(roles) - 1), ">= 5x")
    lines.append("")
    lines.append(f"{results['studies']} simulated studies ({results['positive_scans']} with nodules, "
                 f"{results['nodules']} nodules); {results['machine']}. Figures on SIMULATED data.")
    if results.get("ct_samples"):
        lines += ["", "| real CT sample | outcome | detail |", "|---|---|---|"]
        for sample in results["ct_samples"]:
            detail = sample.get("reason") or _analysed_detail(sample)
            lines.append(f"| {sample['folder']} | {sample['outcome']} | {detail} |")
    return "\n".join(lines)


CARD_MARKER = "<!-- held-out evaluation: written by bench/nodule_eval.py -->"


def update_card(directory: Path, role: str, results: dict[str, Any], command: str) -> None:
    """Replace the held-out section of ``directory``'s model card with this run's figures."""
    card_path = directory / "MODEL_CARD.md"
    card = card_path.read_text().split(CARD_MARKER)[0].rstrip() + "\n\n"
    model = results["models"][role]
    at = ", ".join(f"{float(rate):g}: {value:.3f}" for rate, value in model["sensitivity_at_fp_per_scan"].items())
    section = f"""{CARD_MARKER}
## Held-out evaluation (SIMULATED studies, other seeds and settings)
{results['studies']} studies ({results['positive_scans']} with nodules, {results['nodules']} nodules), drawn with
`EVALUATION_CONFIG` (noise 15-55 HU, 70 % sharp kernels, slices 1.1 / 1.75 / 2.25 mm, rotation up to 8 degrees);
threshold {model['threshold']:.3f} as shipped. 95 % percentile bootstrap intervals over scans.

| metric | value |
|---|---|
| per-scan sensitivity | {_pct(model['sensitivity'])} |
| per-scan specificity | {_pct(model['specificity'])} |
| CPM | {_interval(model['cpm'])} |
| nodule sensitivity / FP per scan | {model['nodule_sensitivity']:.3f} / {model['fp_per_scan']:.2f} |
| type accuracy | {model['type_accuracy']:.3f} (n={model['typed_nodules']}) |
| seconds per 64x256x256 volume (median) | {model['seconds_per_volume']['median']:.2f} ({results['machine']}) |

Sensitivity by FP/scan: {at}. Measured by `{command}`.
"""
    card_path.write_text(card + section)


def main(argv: list[str] | None = None) -> int:
    """Evaluate teacher and student, run the real samples, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=60, help="held-out simulated studies")
    parser.add_argument("--split", choices=tuple(SPLIT_LABELS), default="evaluation",
                        help="evaluation (held out; the README's figures) or development (evaluation settings, "
                             "validation seeds: where choices are made)")
    parser.add_argument("--student", type=Path, help="student artifact (default: newest shipped)")
    parser.add_argument("--teacher", type=Path, help="teacher artifact (default: newest shipped)")
    parser.add_argument("--no-teacher", action="store_true", help="evaluate the student only")
    parser.add_argument("--baseline", type=Path,
                        help="another artifact (e.g. the v2 student) evaluated on the same studies, side by side")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--ct-samples", type=Path, default=CT_SAMPLES)
    parser.add_argument("--device", default=None, help="override settings.device (cpu, cuda)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--update-cards", action="store_true",
                        help="write the held-out figures into each artifact's MODEL_CARD.md (not hashed)")
    args = parser.parse_args(argv)
    if args.split == "development":
        if args.update_cards:
            parser.error("--update-cards writes held-out figures: not with --split development")
        if args.output == RESULTS:
            args.output = RESULTS.with_name("nodule_eval_development.json")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    roles = ["student"] if args.no_teacher else ["teacher", "student"]
    artifacts: dict[str, Path] = {"student": args.student or default_artifact_dir("student")}
    if not args.no_teacher:
        artifacts["teacher"] = args.teacher or default_artifact_dir("teacher")
    if args.baseline:
        roles.append("baseline")
        artifacts["baseline"] = args.baseline
    print(f"evaluating {', '.join(roles)} on {args.studies} {SPLIT_LABELS[args.split]}", flush=True)
    seeds = development_seeds(args.studies) if args.split == "development" else split_seeds("evaluation", args.studies)
    network: dict[str, float] = {}
    records, settings, versions = asyncio.run(evaluate_models(roles, artifacts, seeds, args.split, args.device,
                                                                  network))
    from services.nodule.model import load_net, parameter_count

    models = {}
    for role in roles:
        models[role] = model_result(records[role], settings[role], versions[role], args.resamples)
        net = load_crop_net(artifacts[role])[0] if is_two_stage(artifacts[role]) else load_net(artifacts[role])[0]
        models[role]["parameters"] = parameter_count(net)
        models[role]["artifact"] = str(artifacts[role])
        models[role]["network_seconds_per_volume"] = network.get(role, math.nan)
    first = records[roles[0]]
    results: dict[str, Any] = {
        "data": f"SIMULATED chest CT (services.nodule.simulate): {SPLIT_LABELS[args.split]}",
        "evaluation_config": {k: v for k, v in EVALUATION_CONFIG.__dict__.items() if k != "seed"},
        "split": args.split, "studies": len(first), "positive_scans": sum(r.positive for r in first),
        "nodules": sum(len(r.truths) for r in first), "models": models, "goals": GOALS,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"device {args.device or 'settings'}",
    }
    if "teacher" in models:
        timing = {role: models[role]["seconds_per_volume"]["median"] for role in ("teacher", "student")}
        results["speedup"] = timing["teacher"] / timing["student"]
        results["network_speedup"] = network["teacher"] / network["student"]
    results["ct_samples"] = asyncio.run(run_ct_samples(args.ct_samples, artifacts["student"], args.device))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    print(f"\nwrote {args.output}")
    if args.update_cards:
        for role in (r for r in roles if r != "baseline"):
            given = sys.argv[1:] if argv is None else argv
            update_card(artifacts[role], role, results, " ".join(["tessera bench nodule_eval", *given]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
