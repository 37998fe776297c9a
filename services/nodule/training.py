"""Training the nodule detector on simulated chest CT: the teacher, then the distilled student.

``tessera train nodule`` (:func:`main`):

1. simulates the training and validation studies (:mod:`services.nodule.simulate`; seeds from
   :func:`~services.nodule.evaluation.split_seeds`, disjoint from the evaluation split's);
2. trains the **teacher** on patches sampled around nodules (``positive_fraction``), on hard
   negatives (``hard_negative_fraction``: vessels, airway walls and the pleura, where an undertrained
   detector puts its false positives and misses juxta-pleural nodules) and anywhere in the lungs,
   with flips, row/column swaps, extra noise and contrast changes (:func:`augment`), with Dice +
   binary cross-entropy against the drawn nodule labels; the training studies are simulated once
   into a patch bank (``--cache-dir`` keeps it on disk for the next run, :func:`load_training_studies`);
3. distils the **student** from the teacher's probabilities on the same kind of patches plus the
   labels: ``w * BCE(student, teacher) + (1 - w) * (Dice + BCE)(student, labels)``;
4. runs both networks through the shared runtime and the real post-processing
   (:func:`~services.nodule.detect.detect_series`) on the validation studies and chooses, per
   network, the reported-confidence threshold (per-scan sensitivity + specificity) and the
   attenuation shares that separate solid / part-solid / ground glass (type accuracy);
5. writes both as sealed artifacts ``<output>/{teacher,student}/<version>/`` (``config.json``,
   ``weights.pt``, manifest with sha256, model card).

**All training data is simulated.** Validation figures in the cards are on the split the thresholds
were chosen on; ``tessera bench nodule_eval`` measures held-out studies drawn with other settings.
``--quick`` trains a toy pair in seconds (tests); its artifacts detect nothing useful.

``tessera train nodule --two-stage`` trains the v3 detector instead (blob candidates and crop
classifiers, :mod:`services.nodule.training_fp`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from model_runtime import resolve_device
from model_runtime.artifacts import load_manifest, save_artifact
from model_runtime.runtime import ModelRuntime
from services.nodule.detect import extract_nodules, probability_map, solid_share
from services.nodule.evaluation import (
    Interval,
    ScanRecord,
    Summary,
    candidates_of_nodules,
    choose_threshold,
    froc,
    match,
    scan_counts,
    split_config,
    split_seeds,
    summarise,
    truths_of,
    type_accuracy,
    volume_from_simulated,
)
from services.nodule.model import (
    DEFAULT_ROI,
    HU_WINDOW,
    MODELS_SUBDIR,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    DetectorSettings,
    NetConfig,
    NoduleArtifactConfig,
    NoduleNet,
    load_net,
    nodule_model_spec,
    normalise_hu,
    parameter_count,
    write_weights,
)
from services.nodule.simulate import SimulatedStudy, simulate_study

logger = logging.getLogger("tessera.nodule.training")

DATA_TEXT = ("SIMULATED chest CT only (services.nodule.simulate: geometric body, lungs, vessel and airway trees, "
             "solid / part-solid / ground-glass nodules of 3-30 mm incl. juxta-pleural and juxta-vascular, "
             "soft and sharp kernels, noise 10-40 HU, slices 1-2.5 mm, pixels 0.6-0.9 mm). No patient data.")
CANDIDATE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)
"""Probability levels tried on the validation split for the candidate components."""
SOLID_SHARE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
GROUND_GLASS_SHARE_GRID = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2)
HARD_NEGATIVE_HU = -500.0
"""Lung voxels denser than this that are no nodule (vessels, airway walls) are hard-negative patch centres."""


@dataclass(frozen=True)
class TrainingPlan:
    """How much to simulate and train.

    Parameters
    ----------
    train_studies, validation_studies : int
        Simulated studies per split.
    study_shape : tuple of int
        (slices, rows, columns) of the simulated studies.
    patch_size : tuple of int
        Training patch (multiples of (8, 16, 16)).
    batch_size : int
        Patches per step.
    teacher_steps, student_steps : int
        Optimiser steps per network (``max_seconds`` may stop a stage earlier).
    teacher_seconds, student_seconds : float
        Wall-clock cap per stage (0: none).
    learning_rate : float
        AdamW peak learning rate (cosine decay to 5 % of it).
    positive_fraction : float
        Share of patches centred (with jitter) on a nodule.
    hard_negative_fraction : float
        Share of patches centred on a vessel, an airway wall or the pleura (what the detector
        confuses with nodules); the rest anywhere in the lungs.
    distillation_weight : float
        Weight of the teacher's soft targets in the student's loss.
    distillation_interval : int
        The teacher labels every this many student batches (the others train on the labels alone):
        on a CPU the teacher's forward pass costs several student steps.
    extra_noise_hu : float
        Half the patches get extra white noise of up to this standard deviation (HU) and a small
        contrast / level change, so the networks see noisier scans than the simulator's training
        range draws.
    roi_size : tuple of int
        Inference patch shipped with the models.
    seed : int
        Torch and sampling seed.
    """

    train_studies: int = 48
    validation_studies: int = 16
    study_shape: tuple[int, int, int] = (64, 256, 256)
    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 4
    teacher_steps: int = 600
    student_steps: int = 1500
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0
    learning_rate: float = 2e-3
    positive_fraction: float = 0.5
    hard_negative_fraction: float = 0.3
    distillation_weight: float = 0.5
    distillation_interval: int = 1
    extra_noise_hu: float = 35.0
    roi_size: tuple[int, int, int] = DEFAULT_ROI
    seed: int = 0


QUICK_PLAN = TrainingPlan(train_studies=2, validation_studies=2, study_shape=(16, 64, 64), patch_size=(16, 32, 32),
                          batch_size=2, teacher_steps=2, student_steps=2, roi_size=(16, 64, 64))
"""A toy plan for tests: seconds, and a model that detects nothing useful."""


# -- data -----------------------------------------------------------------------------------------
@dataclass
class TrainingStudy:
    """One simulated study ready for patch sampling (normalised image, labels, where lungs and nodules are).

    ``hard_voxels`` are the places a detector confuses with nodules: vessels and airway walls inside
    the lungs (dense voxels that are no nodule) and the pleura (the lungs' border).
    """

    image: np.ndarray  # (z, y, x) float16 in [0, 1]
    labels: np.ndarray  # (z, y, x) bool
    nodule_centres: np.ndarray  # (n, 3) voxel indices
    lung_voxels: np.ndarray  # (m, 3) a sample of lung voxel indices
    hard_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=int))  # (k, 3)


def simulate_split(split: str, count: int, shape: tuple[int, int, int]) -> list[SimulatedStudy]:
    """``count`` simulated studies of ``split`` (seeds from :func:`split_seeds`)."""
    return [simulate_study(replace(split_config(split, seed), shape=shape)) for seed in split_seeds(split, count)]


def training_study(study: SimulatedStudy, rng: np.random.Generator, lung_samples: int = 20_000) -> TrainingStudy:
    """Keep what patch sampling needs of a simulated study (float16 image: 8 MB per 64 x 256 x 256)."""
    lung = np.argwhere(study.lung_mask)
    if len(lung) == 0:
        lung = np.argwhere(np.ones(study.hu.shape, dtype=bool))
    chosen = lung[rng.integers(0, len(lung), min(lung_samples, len(lung)))]
    centres = np.array([n.center_voxel for n in study.nodules], dtype=int).reshape(-1, 3)
    return TrainingStudy(normalise_hu(study.hu).astype(np.float16), study.labels > 0, centres, chosen,
                         _hard_voxels(study, rng, lung_samples))


def _hard_voxels(study: SimulatedStudy, rng: np.random.Generator, samples: int) -> np.ndarray:
    """A sample of dense non-nodule voxels in the lungs (vessels, airway walls) and of the pleura, half each."""
    nodule_zone = ndimage.binary_dilation(study.labels > 0, iterations=3)
    dense = np.argwhere(study.lung_mask & (study.hu > HARD_NEGATIVE_HU) & ~nodule_zone)
    border = study.lung_mask & ~ndimage.binary_erosion(study.lung_mask, iterations=2)
    pleura = np.argwhere(border & ~nodule_zone)
    picked = [found[rng.integers(0, len(found), min(samples // 2, len(found)))] for found in (dense, pleura)
              if len(found)]
    return np.concatenate(picked) if picked else np.zeros((0, 3), dtype=int)


def load_training_studies(split: str, count: int, shape: tuple[int, int, int], rng: np.random.Generator,
                          cache_dir: Path | None = None) -> list[TrainingStudy]:
    """The training studies of ``split`` as a patch bank, simulated once and cached in ``cache_dir`` if given.

    The cache holds one ``.npz`` per study, named by split, seed and shape, so a later run (the
    student's, a rebuild) skips the simulation; the patch sampling stays random per step.
    """
    studies = []
    for seed in split_seeds(split, count):
        path = cache_dir / f"{split}-{seed}-{'x'.join(map(str, shape))}.npz" if cache_dir else None
        if path is not None and path.exists():
            with np.load(path) as stored:
                studies.append(TrainingStudy(**{name: stored[name] for name in stored.files}))
            continue
        study = training_study(simulate_study(replace(split_config(split, seed), shape=shape)), rng)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path.with_suffix(".tmp.npz"), **asdict(study))
            path.with_suffix(".tmp.npz").replace(path)
        studies.append(study)
    return studies


PatchKind = str
"""``positive`` (around a nodule), ``hard`` (a vessel, airway wall or the pleura) or ``lung`` (anywhere)."""


def sample_patch(study: TrainingStudy, rng: np.random.Generator, patch: tuple[int, int, int],
                 positive: bool = False, kind: PatchKind | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ``(1, *patch)`` image and label patch: around a nodule (jittered), at a hard place or anywhere in the lungs.

    Volumes smaller than the patch are padded with air. ``kind`` overrides ``positive``; a study
    without nodules (or hard voxels) gives a lung patch instead.
    """
    kind = kind or ("positive" if positive else "lung")
    size = np.array(patch)
    if kind == "positive" and len(study.nodule_centres):
        centre = study.nodule_centres[rng.integers(len(study.nodule_centres))]
        centre = centre + rng.integers(-(size // 4), size // 4 + 1)
    elif kind == "hard" and len(study.hard_voxels):
        centre = study.hard_voxels[rng.integers(len(study.hard_voxels))] + rng.integers(-(size // 8), size // 8 + 1)
    else:
        centre = study.lung_voxels[rng.integers(len(study.lung_voxels))]
    image, labels = _pad_to(study.image, size, 0.0), _pad_to(study.labels, size, False)
    start = np.clip(centre - size // 2, 0, np.array(image.shape) - size)
    window = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size, strict=True))
    x, y = image[window].astype(np.float32), labels[window].astype(np.float32)
    return np.ascontiguousarray(x)[None], np.ascontiguousarray(y)[None]


def _pad_to(array: np.ndarray, size: np.ndarray, value: Any) -> np.ndarray:
    missing = np.maximum(size - np.array(array.shape), 0)
    if not missing.any():
        return array
    return np.pad(array, [(0, int(m)) for m in missing], constant_values=value)


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            extra_noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Flip each axis half the time, swap rows and columns half the time (square patches only), and
    on half the patches add white noise of up to ``extra_noise_hu`` and a small contrast and level change."""
    flips = tuple(axis for axis in (1, 2, 3) if rng.random() < 0.5)
    if flips:
        image, labels = np.flip(image, flips), np.flip(labels, flips)
    if image.shape[2] == image.shape[3] and rng.random() < 0.5:
        image, labels = image.transpose(0, 1, 3, 2), labels.transpose(0, 1, 3, 2)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if extra_noise_hu > 0 and rng.random() < 0.5:
        scale = HU_WINDOW[1] - HU_WINDOW[0]
        image = image * rng.uniform(0.95, 1.05) + rng.uniform(-20, 20) / scale
        image += rng.normal(0.0, rng.uniform(0, extra_noise_hu) / scale, image.shape).astype(np.float32)
    return image, np.ascontiguousarray(labels)


def sample_batch(studies: list[TrainingStudy], rng: np.random.Generator,
                 plan: TrainingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch ``(N, 1, *patch)`` of augmented images and labels (:func:`augment`)."""
    pairs = []
    for _ in range(plan.batch_size):
        draw = rng.random()
        kind = ("positive" if draw < plan.positive_fraction
                else "hard" if draw < plan.positive_fraction + plan.hard_negative_fraction else "lung")
        image, labels = sample_patch(studies[rng.integers(len(studies))], rng, plan.patch_size, kind=kind)
        pairs.append(augment(image, labels, rng, plan.extra_noise_hu))
    images = np.stack([p[0] for p in pairs]).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(np.stack([p[1] for p in pairs]))


# -- losses and loops -----------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the whole batch (patches without nodules still count through the false positives)."""
    probability = torch.sigmoid(logits)
    overlap = (probability * target).sum()
    return 1 - (2 * overlap + smooth) / (probability.sum() + target.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + binary cross-entropy against hard labels."""
    return dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def distillation_loss(student_logits: torch.Tensor, teacher_probability: torch.Tensor, target: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """``weight * BCE(student, teacher probabilities) + (1 - weight) * (Dice + BCE)(student, labels)``."""
    soft = F.binary_cross_entropy_with_logits(student_logits, teacher_probability)
    return weight * soft + (1 - weight) * segmentation_loss(student_logits, target)


@dataclass
class StageLog:
    """What one training stage did."""

    steps: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")


def _train(net: NoduleNet, loss_of: Callable[[NoduleNet, torch.Tensor, torch.Tensor], torch.Tensor],
           studies: list[TrainingStudy], plan: TrainingPlan, steps: int, max_seconds: float,
           rng: np.random.Generator, label: str) -> StageLog:
    optimiser = torch.optim.AdamW(net.parameters(), lr=plan.learning_rate, weight_decay=1e-4)
    log, started = StageLog(), time.perf_counter()
    recent: list[float] = []
    net.train()
    device = next(net.parameters()).device
    for step in range(steps):
        elapsed = time.perf_counter() - started
        progress = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(plan.learning_rate, step, progress)
        images, labels = (tensor.to(device) for tensor in sample_batch(studies, rng, plan))
        loss = loss_of(net, images, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        recent = (recent + [loss.item()])[-50:]
        log.steps, log.seconds = step + 1, time.perf_counter() - started
        if (step + 1) % 100 == 0:
            logger.info("%s step %d/%d loss %.4f (%.0f s)", label, step + 1, steps, np.mean(recent), log.seconds)
        if max_seconds and log.seconds >= max_seconds:
            logger.info("%s stopped at step %d: %.0f s budget spent", label, step + 1, max_seconds)
            break
    log.final_loss = float(np.mean(recent)) if recent else float("nan")
    return StageLog(log.steps, round(log.seconds, 1), round(log.final_loss, 4))


def _learning_rate(peak: float, step: int, progress: float, warmup: int = 30) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5 % of ``peak`` as ``progress`` goes 0 to 1
    (progress: the larger of the step and the time budget fractions, so a stage cut by time still decays)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_teacher(studies: list[TrainingStudy], plan: TrainingPlan, config: NetConfig = TEACHER_CONFIG,
                  rng: np.random.Generator | None = None, device: str = "cpu") -> tuple[NoduleNet, StageLog]:
    """Train the teacher on labelled patches (Dice + BCE)."""
    rng = rng or np.random.default_rng(plan.seed)
    net = NoduleNet(config).to(device)
    log = _train(net, lambda model, x, y: segmentation_loss(model(x), y), studies, plan, plan.teacher_steps,
                 plan.teacher_seconds, rng, "teacher")
    return net.eval(), log


def distil_student(teacher: NoduleNet, studies: list[TrainingStudy], plan: TrainingPlan,
                   config: NetConfig = STUDENT_CONFIG,
                   rng: np.random.Generator | None = None, device: str = "cpu") -> tuple[NoduleNet, StageLog]:
    """Train the student on the teacher's probabilities and the labels (:func:`distillation_loss`)."""
    rng = rng or np.random.default_rng(plan.seed + 1)
    teacher.eval().to(device)
    net = NoduleNet(config).to(device)

    batches = 0

    def loss_of(model: NoduleNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal batches
        batches += 1
        if (batches - 1) % max(plan.distillation_interval, 1):
            return segmentation_loss(model(images), labels)
        with torch.inference_mode():
            soft = torch.sigmoid(teacher(images))
        return distillation_loss(model(images), soft.clone(), labels, plan.distillation_weight)

    log = _train(net, loss_of, studies, plan, plan.student_steps, plan.student_seconds, rng, "student")
    return net.eval(), log


# -- calibration on the validation split ----------------------------------------------------------
@dataclass
class Calibration:
    """Detector settings chosen on validation studies, and the validation figures at those settings."""

    settings: DetectorSettings
    summary: Summary
    type_accuracy: float
    typed_nodules: int
    seconds_per_volume: float


def calibrate(net: NoduleNet, studies: list[SimulatedStudy], roi_size: tuple[int, int, int],
              name: str = "nodule-calibration", device: str = "cpu") -> Calibration:
    """Run ``net`` through a private runtime and the real post-processing on ``studies``; choose thresholds."""
    return asyncio.run(_calibrate(net, studies, roi_size, name, device))


async def _calibrate(net: NoduleNet, studies: list[SimulatedStudy], roi_size: tuple[int, int, int],
                     name: str, device: str) -> Calibration:
    runtime = ModelRuntime()
    base = DetectorSettings(roi_size=roi_size)
    records: dict[float, list[ScanRecord]] = {level: [] for level in CANDIDATE_THRESHOLDS}
    shares: dict[float, list[list[tuple[float, str, float] | None]]] = {level: [] for level in CANDIDATE_THRESHOLDS}
    seconds = []
    try:
        await runtime.load(nodule_model_spec(name, net=net, roi_size=roi_size, device=device))
        for index, study in enumerate(studies):
            volume = volume_from_simulated(study, uid=f"validation-{index}")
            started = time.perf_counter()
            probability = await probability_map(volume.hu, runtime=runtime, model_name=name, settings=base)
            seconds.append(time.perf_counter() - started)
            for level in CANDIDATE_THRESHOLDS:  # the same post-processing detect_series runs, per candidate level
                nodules, labels = extract_nodules(probability, volume.hu, volume.spacing_mm, volume.voxel_to_lps,
                                                  replace(base, candidate_threshold=level))
                record = ScanRecord(f"validation-{index}", truths_of(study),
                                    candidates_of_nodules(nodules))
                records[level].append(record)
                shares[level].append(_hit_shares(record, labels, study))
    finally:
        await runtime.close()
    level, threshold = _choose_levels(records)
    solid_min, ground_glass_max = _choose_type_shares(shares[level], threshold)
    settings = replace(base, candidate_threshold=level, report_threshold=threshold, solid_share_min=solid_min,
                       ground_glass_share_max=ground_glass_max)
    retyped = [_retyped(record, share, settings) for record, share in zip(records[level], shares[level], strict=True)]
    accuracy, typed = type_accuracy(retyped, threshold)
    return Calibration(settings, summarise(records[level], threshold, resamples=200), accuracy, typed,
                       float(np.median(seconds)) if seconds else float("nan"))


def _choose_levels(records: dict[float, list[ScanRecord]]) -> tuple[float, float]:
    """The candidate level and report threshold with the best per-scan sensitivity + specificity (then CPM)."""
    best: tuple[float, float, float, float] | None = None
    for level, scans in records.items():
        threshold = choose_threshold(scans)
        counts = scan_counts(scans, threshold)
        youden = sum(0.0 if math.isnan(v) else v for v in (counts.sensitivity, counts.specificity))
        key = (youden, froc(scans).cpm, level, threshold)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return best[2], best[3]


def _hit_shares(record: ScanRecord, labels: np.ndarray, study: SimulatedStudy) -> list[tuple[float, str, float] | None]:
    """Per candidate: (solid share, true type, confidence) when it hits a nodule, else None."""
    found: list[tuple[float, str, float] | None] = []
    for position, (candidate, hit) in enumerate(zip(record.candidates, match(record), strict=True)):
        if hit is None:
            found.append(None)
            continue
        mask = labels == position + 1
        found.append((solid_share(mask, study.hu), record.truths[hit].nodule_type, candidate.confidence))
    return found


def _type_of(share: float, solid_min: float, ground_glass_max: float) -> str:
    if share >= solid_min:
        return "solid"
    return "ground_glass" if share < ground_glass_max else "part_solid"


def _choose_type_shares(shares: list[list[tuple[float, str, float] | None]], threshold: float) -> tuple[float, float]:
    hits = [entry for scan in shares for entry in scan if entry is not None and entry[2] >= threshold]
    default = DetectorSettings()
    if not hits:
        return default.solid_share_min, default.ground_glass_share_max
    best, best_right = (default.solid_share_min, default.ground_glass_share_max), -1
    for solid_min in SOLID_SHARE_GRID:
        for ground_glass_max in GROUND_GLASS_SHARE_GRID:
            if ground_glass_max >= solid_min:
                continue
            right = sum(_type_of(share, solid_min, ground_glass_max) == truth for share, truth, _ in hits)
            if right > best_right:
                best, best_right = (solid_min, ground_glass_max), right
    return best


def _retyped(record: ScanRecord, shares: list[tuple[float, str, float] | None],
             settings: DetectorSettings) -> ScanRecord:
    candidates = tuple(
        replace(candidate, nodule_type=_type_of(share[0], settings.solid_share_min, settings.ground_glass_share_max))
        if share is not None else candidate
        for candidate, share in zip(record.candidates, shares, strict=True))
    return replace(record, candidates=candidates)


# -- artifacts ------------------------------------------------------------------------------------
def write_model(net: NoduleNet, role: str, version: str, output: Path, calibration: Calibration, stage: StageLog,
                plan: TrainingPlan, rebuild: str, *, force: bool = False, extra_card: str = "") -> Path:
    """Seal one network as ``<output>/<role>/<version>/`` with its config, weights, manifest and card."""
    directory = output / role / version
    if directory.exists():
        if not force:
            raise FileExistsError(f"{directory} exists (pass --force to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    NoduleArtifactConfig(net.config, calibration.settings, role).write(directory)
    write_weights(net, directory)
    metrics = _metrics(net, calibration, stage)
    card = model_card(role, version, net, calibration, stage, plan, rebuild, extra_card)
    save_artifact(directory, name=f"nodule-{role}", version=version, framework="torch", metrics=metrics,
                  data=DATA_TEXT, rebuild_command=rebuild, model_card=card,
                  extra={"plan": _jsonable(asdict(plan)), "detector": _jsonable(asdict(calibration.settings)),
                         "net": net.config.to_json()})
    return directory


def _metrics(net: NoduleNet, calibration: Calibration, stage: StageLog) -> dict[str, Any]:
    summary = calibration.summary
    return {
        "parameters": parameter_count(net), "training_steps": stage.steps, "training_seconds": stage.seconds,
        "validation_scans": summary.counts.scans, "validation_sensitivity": _round(summary.sensitivity.value),
        "validation_specificity": _round(summary.specificity.value), "validation_cpm": _round(summary.cpm.value),
        "validation_type_accuracy": _round(calibration.type_accuracy),
        "validation_seconds_per_volume": _round(calibration.seconds_per_volume),
        "report_threshold": calibration.settings.report_threshold,
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


def model_card(role: str, version: str, net: NoduleNet, calibration: Calibration, stage: StageLog,
               plan: TrainingPlan, rebuild: str, extra: str = "") -> str:
    """Markdown model card: data (simulated), architecture, training, validation figures, rebuild command."""
    summary, settings = calibration.summary, calibration.settings
    at = ", ".join(f"{rate:g}: {value:.3f}" for rate, value in summary.sensitivity_at.items())
    config = net.config
    return f"""# nodule-{role} {version}

**Trained and validated on SIMULATED chest CT only** (`services.nodule.simulate`). No patient data was
used; every figure below is measured on simulated studies and says nothing yet about real scans.

## What it is
A 3D U-Net ({'teacher' if role == 'teacher' else 'student distilled from the teacher'}) mapping one channel
of HU (clipped to [-1024, 400], scaled to [0, 1]) to a per-voxel nodule probability; channels
{list(config.channels)}, {config.convs_per_level} convolution(s) per level, {'concatenated' if config.concat_skips
else 'additive'} skips, stem stride (1, 2, 2). **{parameter_count(net):,} parameters.**
Served through the shared runtime (sliding window {list(settings.roi_size)}, overlap {settings.overlap},
Gaussian blending); post-processing in `services/nodule/detect.py`.

## Data
{DATA_TEXT}
Training: {plan.train_studies} studies of {list(plan.study_shape)} voxels; validation: {plan.validation_studies}
studies (other seeds). Patches {list(plan.patch_size)}, {round(plan.positive_fraction * 100)} % centred near a nodule,
{round(plan.hard_negative_fraction * 100)} % on a vessel, airway wall or the pleura (hard negatives), the rest anywhere
in the lungs; flips on every axis, row/column swaps; extra white noise up to {plan.extra_noise_hu:g} HU and
a +-5 % contrast / +-20 HU level change on half of them.

## Training
{stage.steps} steps of {plan.batch_size} patches in {stage.seconds:.0f} s on this machine's CPU
(final loss {stage.final_loss:.4f}); AdamW, peak learning rate {plan.learning_rate}, cosine decay.
{_loss_text(role, plan)}

## Settings chosen on the validation split
Reported confidence >= {settings.report_threshold:.3f} (maximises per-scan sensitivity + specificity);
candidates at probability >= {settings.candidate_threshold}; solid if the interior's share >= -300 HU is
>= {settings.solid_share_min}, ground glass if < {settings.ground_glass_share_max}, else part-solid.

## Validation figures (simulated; the split the thresholds were chosen on, so optimistic)
| metric | value | 95 % CI |
|---|---|---|
| per-scan sensitivity | {_cells(summary.sensitivity)} |
| per-scan specificity | {_cells(summary.specificity)} |
| CPM | {_cells(summary.cpm)} |
| type accuracy (hit nodules) | {calibration.type_accuracy:.3f} ({calibration.typed_nodules} nodules) | |
| median s per volume (calibration runtime) | {calibration.seconds_per_volume:.2f} | |

Sensitivity by FP/scan: {at}. Held-out figures (other seeds and settings): `tessera bench nodule_eval`
(`bench/results/nodule_eval.json`).
{extra}
## Rebuild
`{rebuild}`
"""


def _loss_text(role: str, plan: TrainingPlan) -> str:
    if role == "teacher":
        return "Loss: Dice + BCE against the drawn nodule labels."
    weight = plan.distillation_weight
    if plan.distillation_interval > 1:
        return (f"Loss: on every {plan.distillation_interval}th batch {weight} x BCE to the teacher probabilities + "
                f"{1 - weight:g} x (Dice + BCE) to the labels; on the others Dice + BCE to the labels.")
    return f"Loss: {weight} x BCE to the teacher probabilities + {1 - weight:g} x (Dice + BCE) to the labels."


def _cells(interval: Interval) -> str:
    return f"{interval.value:.3f} | {interval.low:.3f}-{interval.high:.3f}"


# -- the command ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``tessera train nodule``."""
    parser = argparse.ArgumentParser(prog="tessera train nodule",
                                     description="Train the nodule teacher and distilled student on simulated CT.")
    parser.add_argument("--output", type=Path, default=None,
                        help="artifact root (default <models_dir>/nodule); writes teacher/ and student/")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--quick", action="store_true", help="toy sizes for tests (seconds; not a useful model)")
    parser.add_argument("--train-studies", type=int)
    parser.add_argument("--validation-studies", type=int)
    parser.add_argument("--teacher-steps", type=int)
    parser.add_argument("--student-steps", type=int)
    parser.add_argument("--teacher-seconds", type=float, help="wall-clock cap of the teacher stage")
    parser.add_argument("--student-seconds", type=float, help="wall-clock cap of the student stage")
    parser.add_argument("--teacher-from", type=Path, help="reuse this teacher artifact instead of training one")
    parser.add_argument("--teacher-only", action="store_true", help="train and write the teacher, not the student")
    parser.add_argument("--recalibrate", action="store_true",
                        help="train nothing: choose the thresholds of the existing <output>/*/<version> "
                             "artifacts again on the validation split and reseal them")
    parser.add_argument("--distillation-weight", type=float, help="weight of the teacher's soft targets (0-1)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, help="patches per step")
    parser.add_argument("--distillation-interval", type=int, help="the teacher labels every Nth student batch")
    parser.add_argument("--learning-rate", type=float, help="AdamW peak learning rate")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the simulated training studies here (.npz per study) and reuse them")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: settings.device)")
    parser.add_argument("--force", action="store_true", help="replace existing artifacts of this version")
    return parser


def plan_from(args: argparse.Namespace) -> TrainingPlan:
    """The training plan the arguments ask for."""
    plan = QUICK_PLAN if args.quick else TrainingPlan()
    overrides = {field_name: getattr(args, field_name) for field_name in
                 ("train_studies", "validation_studies", "teacher_steps", "student_steps", "teacher_seconds",
                  "student_seconds", "distillation_weight", "distillation_interval", "seed", "batch_size",
                  "learning_rate")
                 if getattr(args, field_name) is not None}
    return replace(plan, **overrides)


def rebuild_command(argv: list[str]) -> str:
    """The command line that rebuilds these artifacts (``--force`` dropped)."""
    return " ".join(["tessera train nodule", *[arg for arg in argv if arg != "--force"]])


def main(argv: list[str] | None = None) -> int:
    """``tessera train nodule``: simulate, train the teacher, distil the student, calibrate, write artifacts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--two-stage" in argv:  # the v3 detector: blob candidates + crop classifiers (services.nodule.training_fp)
        from services.nodule import training_fp

        return training_fp.main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = plan_from(args)
    output = args.output or _default_output()
    device = str(resolve_device(args.device))
    torch.manual_seed(plan.seed)
    rng = np.random.default_rng(plan.seed)
    started = time.perf_counter()
    if args.recalibrate:
        validation = simulate_split("validation", plan.validation_studies, plan.study_shape)
        for role in ("teacher", "student"):
            if (output / role / args.version / "manifest.json").exists():
                print(recalibrate(output / role / args.version, validation, device, rebuild_command(argv)))
        return 0
    studies = load_training_studies("train", plan.train_studies, plan.study_shape, rng, args.cache_dir)
    validation = simulate_split("validation", plan.validation_studies, plan.study_shape)
    logger.info("simulated %d + %d studies in %.0f s", len(studies), len(validation), time.perf_counter() - started)
    if args.teacher_from:
        teacher, _ = load_net(args.teacher_from, device)
        teacher_log = StageLog(0, 0.0, float("nan"))
    else:
        teacher, teacher_log = train_teacher(studies, plan, rng=rng, device=device)
    trained = [] if args.teacher_from else [("teacher", teacher, teacher_log)]
    if not args.teacher_only:
        student, student_log = distil_student(teacher, studies, plan, rng=rng, device=device)
        trained.append(("student", student, student_log))
    del studies
    rebuild = rebuild_command(argv)
    written = []
    for role, net, log in trained:
        calibration = calibrate(net, validation, plan.roi_size, name=f"nodule-{role}-calibration", device=device)
        extra = _teacher_note(args.teacher_from or output / "teacher" / args.version) if role == "student" else ""
        written.append(write_model(net, role, args.version, output, calibration, log, plan, rebuild,
                                   force=args.force, extra_card=extra))
        logger.info("%s: %s", role, _metrics(net, calibration, log))
    for directory in written:
        print(directory)
    print(f"done in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{role} {parameter_count(net):,} parameters, {log.steps} steps" for role, net, log in trained))
    return 0


def recalibrate(directory: Path, validation: list[SimulatedStudy], device: str, command: str) -> Path:
    """Choose an artifact's thresholds again on ``validation`` and reseal it (weights unchanged).

    The card's rebuild command becomes the original one followed by ``command``.
    """
    import re

    net, config = load_net(directory, device)
    manifest = load_manifest(directory)
    plan_json = dict(manifest.extra.get("plan", {}))
    fields: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value
                              for key, value in plan_json.items() if key in TrainingPlan.__dataclass_fields__}
    plan = replace(TrainingPlan(), **fields)
    old_card = (directory / "MODEL_CARD.md").read_text()
    loss = re.search(r"final loss ([0-9.]+)", old_card)
    stage = StageLog(int(manifest.metrics.get("training_steps", 0)), float(manifest.metrics.get("training_seconds", 0)),
                     float(loss.group(1)) if loss else float("nan"))
    calibration = calibrate(net, validation, plan.roi_size, name=f"nodule-{config.role}-calibration", device=device)
    teacher = directory.parent.parent / "teacher" / directory.name
    note = re.search(r"\nDistilled from the teacher at .*\n", old_card)
    extra = note.group(0) if note else (_teacher_note(teacher) if config.role == "student" else "")
    rebuild = f"{manifest.rebuild_command} && {command}"
    return write_model(net, config.role, directory.name, directory.parent.parent, calibration, stage, plan, rebuild,
                       force=True, extra_card=extra)


def _teacher_note(directory: Path) -> str:
    manifest = directory / "manifest.json"
    digest = load_manifest(directory, verify=False).digest[:16] if manifest.exists() else "written in this run"
    return f"\nDistilled from the teacher at `{directory}` (content digest {digest}).\n"


def _default_output() -> Path:
    from shared.config import get_settings

    return get_settings().models_dir / MODELS_SUBDIR


if __name__ == "__main__":
    raise SystemExit(main())
