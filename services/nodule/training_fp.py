"""Training the v3 (two-stage) nodule detector: ``tessera train nodule --two-stage``.

1. **Crop bank** (:func:`build_crop_bank`): training studies are simulated
   (:mod:`services.nodule.simulate`, the training split's seeds), stage 1
   (:func:`~services.nodule.candidates.scan_candidates`) runs on each, and a ``36^3`` crop of the
   1 mm grid is kept around every candidate and every true nodule's centre. Labels follow the
   LUNA16 hit rule: a candidate within a counted nodule's radius is positive; one farther than
   the radius + :data:`AMBIGUOUS_MARGIN_MM` from every nodule is negative; the ones in between,
   and hits on nodules under 3 mm, are left out. ``--cache-dir`` keeps the bank on disk; ``--jobs``
   builds it in several processes. ``--training-settings wide`` (v6) draws the training and
   validation studies from :data:`~services.nodule.evaluation.WIDE_TRAINING_CONFIG` instead of the
   simulator's defaults. ``--small-nodule-studies N`` (v13) adds N studies of the same domain with 2-6 nodules
   of 3-6 mm each (:func:`~services.nodule.evaluation.small_nodule_config`, their own ``train_small`` seeds):
   the classifier generalised worst to small nodules, which the usual studies hold few of.
2. **Teacher** (:class:`~services.nodule.classifier.CropNet`, teacher config): binary cross-entropy,
   batches with ``positive_fraction`` positives, random ``32^3`` windows of the ``36^3`` crops
   (+-2 mm shifts), flips on every axis, row/column swaps, extra noise and small contrast changes.
   With ``hard_negative_fraction`` > 0 (v4), that share of a batch's negatives is drawn in proportion
   to how nodule-like the classifier last found each negative (online hard-negative mining: the
   vessel crossings and pleural bumps that set the reporting threshold are seen more often).
3. **Student**, distilled: the teacher's probabilities on every crop of the bank (computed once, on
   the centred crop) are soft targets:
   ``w * BCE(student, teacher) + (1 - w) * BCE(student, label)``; its hard negatives are the
   teacher's own false positives on the training studies (negatives drawn in proportion to the
   teacher's probability).
4. **Calibration** on the validation split (other seeds): the whole detector runs through a
   private runtime (:func:`~services.nodule.two_stage.detect_two_stage`); the reported-confidence
   threshold maximises per-scan sensitivity + specificity and the attenuation shares the type
   accuracy, as for the dense models.
5. Sealed artifacts ``<output>/{teacher,student}/<version>/`` (``config.json`` with
   ``"kind": "two_stage"``, ``weights.pt``, manifest, model card).

**All training data is simulated.**
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_runtime import resolve_device
from model_runtime.artifacts import save_artifact
from model_runtime.runtime import ModelRuntime
from services.nodule.candidate_features import FEATURE_NAMES, FeatureModel, candidate_features, train_feature_model
from services.nodule.candidates import FAINT_SCORE_CAP_HU, scan_candidates
from services.nodule.classifier import (
    CROP_SIZE,
    STUDENT_CROP_CONFIG,
    TEACHER_CROP_CONFIG,
    CropNet,
    CropNetConfig,
    TwoStageArtifactConfig,
    TwoStageSettings,
    classifier_model_spec,
    crop_hu,
    extract_crops,
    normalise_crop_hu,
    parameter_count,
    with_test_time_views,
    write_crop_weights,
)
from services.nodule.evaluation import (
    CALIBRATION_STUDIES,
    MIN_COUNTED_MM,
    TRAINING_SETTINGS,
    ScanRecord,
    Summary,
    candidates_of_nodules,
    choose_threshold,
    match,
    small_nodule_config,
    split_config,
    split_seeds,
    summarise,
    truths_of,
    type_accuracy,
)
from services.nodule.simulate import SimulatedStudy, SimulationConfig, simulate_study
from services.nodule.training import StageLog, _cells, _jsonable, _learning_rate, _round, _type_of

logger = logging.getLogger("tessera.nodule.training_fp")

BANK_CROP = CROP_SIZE + 4
"""Crops are kept 4 voxels larger than the network's input, for random +-2 voxel shifts."""
AMBIGUOUS_MARGIN_MM = 3.0
CNN_WEIGHT = 0.5
"""The CNN logit's share in a v10 blend: fixed beforehand (an even average), not tuned on any evaluation set."""


def data_text(training_settings: str = "default") -> str:
    """What the training data of a run with ``training_settings`` is, for manifests and model cards."""
    return ("SIMULATED chest CT only (services.nodule.simulate: geometric body, lungs, vessel and airway trees, "
            "solid / part-solid / ground-glass nodules of 3-30 mm incl. juxta-pleural and juxta-vascular, "
            f"soft and sharp kernels, {_domain_text(TRAINING_SETTINGS[training_settings])}). No patient data.")


def _domain_text(config: SimulationConfig) -> str:
    slices = config.slice_spacing_choices_mm
    parts = [f"noise {config.noise_sd_hu[0]:g}-{config.noise_sd_hu[1]:g} HU"]
    if config.sharp_kernel_probability != 0.5:
        parts.append(f"{round(config.sharp_kernel_probability * 100)} % sharp kernels")
    parts += [f"slices {min(slices):g}-{max(slices):g} mm",
              f"pixels {config.pixel_spacing_mm[0]:g}-{config.pixel_spacing_mm[1]:g} mm"]
    if config.max_rotation_deg:
        parts.append(f"rotation to {config.max_rotation_deg:g} degrees")
    return ", ".join(parts)


SOLID_SHARE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
GROUND_GLASS_SHARE_GRID = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2)


@dataclass(frozen=True)
class FpPlan:
    """How much to simulate and train for the two-stage detector (see the module docstring)."""

    train_studies: int = 120
    small_nodule_studies: int = 0
    """Extra training studies with 2-6 nodules of 3-6 mm each (:func:`~services.nodule.evaluation.small_nodule_config`,
    the ``train_small`` seeds), added to the crop bank."""
    validation_studies: int = CALIBRATION_STUDIES
    study_shape: tuple[int, int, int] = (64, 256, 256)
    max_candidates: int = 64
    faint_candidates: int = 0
    """Of ``max_candidates``, how many stage 1 fills by its faint (ground-glass) ranking (v11: 16)."""
    centre_shift_limit: float = 0.0
    """:attr:`~services.nodule.classifier.TwoStageSettings.centre_shift_limit` of the artifacts, calibration
    included (v12: 1)."""
    batch_size: int = 32
    teacher_steps: int = 2000
    student_steps: int = 2000
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0
    learning_rate: float = 2e-3
    positive_fraction: float = 0.3
    distillation_weight: float = 0.5
    extra_noise_hu: float = 35.0
    hard_negative_fraction: float = 0.0
    training_settings: str = "default"
    teacher_stem_stride: int = TEACHER_CROP_CONFIG.stem_stride
    """1 keeps the teacher's first level at the crop's 1 mm: ~10x the compute of stride 2 (probed 2026-12-03 as
    v7: no validation gain over v4, not shipped)."""
    teacher_test_time_views: int = 1
    """Views of each crop the teacher's logit is averaged over when it is served, calibrated and distilled from
    (:class:`~services.nodule.classifier.ViewAveragedNet`; v14: 16). The student is always one pass."""
    feature_model: bool = False
    """Blend each network with a LightGBM over hand-crafted candidate features (v10,
    :mod:`services.nodule.candidate_features`), the two logits weighted by :data:`CNN_WEIGHT`."""
    seed: int = 0

    def teacher_config(self) -> CropNetConfig:
        """The teacher's network configuration under this plan."""
        return replace(TEACHER_CROP_CONFIG, stem_stride=self.teacher_stem_stride)

    def detector_settings(self, blended: bool, role: str = "student") -> TwoStageSettings:
        """The detector settings ``role``'s artifact starts from (calibration then chooses the rest)."""
        views = self.teacher_test_time_views if role == "teacher" else 1
        return TwoStageSettings(max_candidates=self.max_candidates, faint_candidates=self.faint_candidates,
                                blended=blended, centre_shift_limit=self.centre_shift_limit, test_time_views=views)

    def study_config(self, split: str, seed: int) -> SimulationConfig:
        """The simulation config of one ``train``, ``train_small`` or ``validation`` study of this plan."""
        domain = TRAINING_SETTINGS[self.training_settings]
        if split == "train_small":
            return replace(small_nodule_config(domain), seed=seed, shape=self.study_shape)
        return replace(split_config(split, seed, domain), shape=self.study_shape)


QUICK_FP_PLAN = FpPlan(train_studies=2, validation_studies=2, study_shape=(24, 96, 96), max_candidates=16,
                       batch_size=4, teacher_steps=2, student_steps=2)


# -- the crop bank --------------------------------------------------------------------------------
@dataclass
class CropBank:
    """Normalised ``(n, 36, 36, 36)`` float16 crops, their labels (0/1) and whether each is a stage-1 candidate."""

    crops: np.ndarray
    labels: np.ndarray
    from_candidate: np.ndarray

    @classmethod
    def concatenate(cls, banks: list[CropBank]) -> CropBank:
        """One bank of several."""
        if not banks:
            return cls(np.zeros((0, BANK_CROP, BANK_CROP, BANK_CROP), np.float16), np.zeros(0, np.float32),
                       np.zeros(0, bool))
        return cls(np.concatenate([b.crops for b in banks]), np.concatenate([b.labels for b in banks]),
                   np.concatenate([b.from_candidate for b in banks]))


def study_crops(study: SimulatedStudy, max_candidates: int, faint_candidates: int = 0) -> CropBank:
    """The labelled crops of one simulated study (candidates and true nodule centres)."""
    scan = scan_candidates(study.hu, study.spacing_mm, max_candidates=max_candidates, faint_candidates=faint_candidates)
    spacing = np.asarray(study.spacing_mm, dtype=float)
    ratio = (np.asarray(study.hu.shape) - 1) / np.maximum(np.asarray(scan.iso.shape) - 1, 1)
    truths = [(np.asarray(n.center_voxel, float) * spacing, n.long_axis_mm / 2, n.long_axis_mm >= MIN_COUNTED_MM)
              for n in study.nodules]
    centres, labels, from_candidate = [], [], []
    for candidate in scan.candidates:
        position = np.asarray(candidate.centre_voxel) * spacing
        label: float | None = 0.0
        for centre, radius, counted in truths:
            distance = float(np.linalg.norm(position - centre))
            if distance <= radius:
                label = 1.0 if counted else None
                break
            if distance <= radius + AMBIGUOUS_MARGIN_MM:
                label = None
        if label is None:
            continue
        centres.append(candidate.grid_index)
        labels.append(label)
        from_candidate.append(True)
    for nodule, (_, _, counted) in zip(study.nodules, truths, strict=True):
        if counted:
            centres.append(tuple(np.rint(np.asarray(nodule.center_voxel) / ratio).astype(int)))
            labels.append(1.0)
            from_candidate.append(False)
    crops = extract_crops(scan.iso, np.array(centres, dtype=int).reshape(-1, 3), size=BANK_CROP)
    return CropBank(normalise_crop_hu(crops).astype(np.float16), np.asarray(labels, np.float32),
                    np.asarray(from_candidate, bool))


def build_crop_bank(split: str, count: int, plan: FpPlan, cache_dir: Path | None = None, jobs: int = 1) -> CropBank:
    """The crops of ``count`` simulated studies of ``split``, cached per study in ``cache_dir`` if given,
    built by ``jobs`` processes (the bank is the same whatever ``jobs``: every study has its own seed)."""
    started = time.perf_counter()
    work = [(plan.study_config(split, seed), plan.max_candidates, plan.faint_candidates,
             _bank_path(cache_dir, split, seed, plan))
            for seed in split_seeds(split, count)]
    if jobs <= 1:
        banks = [_cached_study_crops(*item) for item in work]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: a fork of a process whose torch/OpenMP threads are running can deadlock
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            banks = list(pool.map(_cached_study_crops, *zip(*work, strict=True), chunksize=4))
    logger.info("crop bank: %d studies in %.0f s", count, time.perf_counter() - started)
    return CropBank.concatenate(banks)


def _bank_path(cache_dir: Path | None, split: str, seed: int, plan: FpPlan) -> Path | None:
    if cache_dir is None:
        return None
    domain = "" if plan.training_settings == "default" else f"{plan.training_settings}-"
    faint = f"-faint{plan.faint_candidates}" if plan.faint_candidates else ""
    shape = "x".join(map(str, plan.study_shape))
    return cache_dir / f"crops-{domain}{split}-{seed}-{shape}-{plan.max_candidates}{faint}.npz"


def _cached_study_crops(config: SimulationConfig, max_candidates: int, faint_candidates: int,
                        path: Path | None) -> CropBank:
    if path is not None and path.exists():
        with np.load(path) as stored:
            return CropBank(stored["crops"], stored["labels"], stored["from_candidate"])
    bank = study_crops(simulate_study(config), max_candidates, faint_candidates)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(temporary, **asdict(bank))
        temporary.replace(path)
    return bank


def augment_crops(crops: np.ndarray, rng: np.random.Generator, extra_noise_hu: float) -> np.ndarray:
    """Random ``32^3`` windows of ``(n, 36, 36, 36)`` crops, flips, row/column swaps, noise and contrast."""
    out = np.empty((len(crops), CROP_SIZE, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    margin = BANK_CROP - CROP_SIZE
    for row, crop in enumerate(crops):
        z, y, x = (int(v) for v in rng.integers(0, margin + 1, 3))
        window = crop[z:z + CROP_SIZE, y:y + CROP_SIZE, x:x + CROP_SIZE].astype(np.float32)
        flips = tuple(axis for axis in range(3) if rng.random() < 0.5)
        if flips:
            window = np.flip(window, flips)
        if rng.random() < 0.5:
            window = window.transpose(0, 2, 1)
        out[row] = window
    if extra_noise_hu > 0:
        noisy = rng.random(len(out)) < 0.5
        scale = 1200.0  # HU per unit of the normalised input
        for row in np.nonzero(noisy)[0].tolist():
            out[row] = out[row] * rng.uniform(0.95, 1.05) + rng.uniform(-20, 20) / scale
            out[row] += rng.normal(0.0, rng.uniform(0, extra_noise_hu) / scale, out[row].shape).astype(np.float32)
    return out


def centred(crops: np.ndarray) -> np.ndarray:
    """The centred ``32^3`` windows of ``(n, 36, 36, 36)`` crops, float32."""
    margin = (BANK_CROP - CROP_SIZE) // 2
    return crops[:, margin:margin + CROP_SIZE, margin:margin + CROP_SIZE, margin:margin + CROP_SIZE].astype(np.float32)


# -- training -------------------------------------------------------------------------------------
HARD_NEGATIVE_FLOOR = 0.02
"""Every negative keeps at least this hardness, so easy ones are still drawn now and then."""


def _batch_indices(labels: np.ndarray, rng: np.random.Generator, size: int, positive_fraction: float,
                   hardness: np.ndarray | None = None, hard_fraction: float = 0.0) -> np.ndarray:
    """Bank rows of one batch: ``positive_fraction`` positives, the rest negatives, of which
    ``hard_fraction`` are drawn in proportion to ``hardness`` (a nodule probability per row)."""
    positives, negatives = np.nonzero(labels > 0.5)[0], np.nonzero(labels <= 0.5)[0]
    wanted = int(round(size * positive_fraction)) if len(positives) else 0
    chosen = [rng.choice(positives, wanted)] if wanted else []
    pool = negatives if len(negatives) else positives
    hard = int(round((size - wanted) * hard_fraction)) if len(negatives) else 0
    if hard and hardness is not None:
        weights = np.maximum(hardness[negatives], HARD_NEGATIVE_FLOOR).astype(np.float64)
        chosen.append(rng.choice(negatives, hard, p=weights / weights.sum()))
    else:
        hard = 0
    chosen.append(rng.choice(pool, size - wanted - hard))
    return np.concatenate(chosen)


def train_classifier(config: CropNetConfig, bank: CropBank, plan: FpPlan, steps: int, max_seconds: float,
                     rng: np.random.Generator, label: str, device: str = "cpu",
                     soft_targets: np.ndarray | None = None,
                     init_from: Path | None = None) -> tuple[CropNet, StageLog]:
    """Train a :class:`CropNet` on the bank: BCE to the labels, or distillation when ``soft_targets`` are given.

    With ``plan.hard_negative_fraction`` > 0, negatives are mined by hardness: the teacher's probabilities
    (``soft_targets``) for a student, else the network's own last probability on each crop (at the start:
    the ``init_from`` network's probabilities, or 1 for a new network).
    ``init_from``: an artifact of the same architecture whose weights training continues from.
    """
    net = CropNet(config).to(device)
    if init_from is not None:
        from services.nodule.classifier import load_crop_net

        previous, _ = load_crop_net(init_from, device)
        # the stem's stride changes no weight's shape, so a stride-2 network can seed a stride-1 one
        if replace(previous.config, stem_stride=config.stem_stride) != config:
            raise ValueError(f"{init_from} is a {previous.config}, not a {config}")
        net.load_state_dict(previous.state_dict())
    hardness = None
    if plan.hard_negative_fraction > 0:
        if soft_targets is not None:
            hardness = soft_targets.astype(np.float32)
        elif init_from is not None:
            hardness = teacher_probabilities(net, bank, device).astype(np.float32)
            net.train()
        else:
            hardness = np.ones(len(bank.labels), np.float32)
    optimiser = torch.optim.AdamW(net.parameters(), lr=plan.learning_rate, weight_decay=1e-4)
    started, recent = time.perf_counter(), list[float]()
    log = StageLog()
    net.train()
    for step in range(steps):
        elapsed = time.perf_counter() - started
        progress = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(plan.learning_rate, step, progress)
        chosen = _batch_indices(bank.labels, rng, plan.batch_size, plan.positive_fraction, hardness,
                                plan.hard_negative_fraction)
        images = torch.from_numpy(augment_crops(bank.crops[chosen], rng, plan.extra_noise_hu))[:, None].to(device)
        target = torch.from_numpy(bank.labels[chosen]).to(device)
        logits = net(images)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        if soft_targets is not None:
            soft = torch.from_numpy(soft_targets[chosen].astype(np.float32)).to(device)
            loss = plan.distillation_weight * F.binary_cross_entropy_with_logits(logits, soft) + \
                (1 - plan.distillation_weight) * loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if hardness is not None and soft_targets is None:
            hardness[chosen] = torch.sigmoid(logits.detach()).cpu().numpy()
        recent = (recent + [loss.item()])[-50:]
        log.steps, log.seconds = step + 1, time.perf_counter() - started
        if (step + 1) % 100 == 0:
            logger.info("%s step %d/%d loss %.4f (%.0f s)", label, step + 1, steps, np.mean(recent), log.seconds)
        if max_seconds and log.seconds >= max_seconds:
            logger.info("%s stopped at step %d: %.0f s budget spent", label, step + 1, max_seconds)
            break
    final = round(float(np.mean(recent)), 4) if recent else math.nan
    return net.eval(), StageLog(log.steps, round(log.seconds, 1), final)


def teacher_probabilities(teacher: CropNet, bank: CropBank, device: str = "cpu", batch: int = 128,
                          views: int = 1) -> np.ndarray:
    """The teacher's probability on every (centred) crop of the bank, averaged over ``views`` views as it is
    served: the student's soft targets."""
    out = []
    served = with_test_time_views(teacher.eval(), views)
    with torch.inference_mode():
        for start in range(0, len(bank.crops), batch):
            images = torch.from_numpy(centred(bank.crops[start:start + batch]))[:, None].to(device)
            out.append(torch.sigmoid(served(images))[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# -- calibration ----------------------------------------------------------------------------------
@dataclass
class FpCalibration:
    """Settings chosen on the validation split and the figures there."""

    settings: TwoStageSettings
    summary: Summary
    type_accuracy: float
    typed_nodules: int
    seconds_per_volume: float
    candidate_recall: float


def calibrate_two_stage(net: CropNet, studies: list[SimulatedStudy], base: TwoStageSettings, name: str,
                        device: str = "cpu", feature_model: FeatureModel | None = None) -> FpCalibration:
    """Run the whole v3 detector with ``net`` (blended with ``feature_model`` if given) and ``base``'s settings on
    ``studies`` through a private runtime; choose the rest of its settings."""
    return asyncio.run(_calibrate(net, studies, base, name, device, feature_model))


def bank_features(bank: CropBank) -> np.ndarray:
    """:func:`~services.nodule.candidate_features.candidate_features` of every (centred) crop of the bank."""
    parts = [candidate_features(crop_hu(centred(bank.crops[start:start + 512])))
             for start in range(0, len(bank.crops), 512)]
    return np.concatenate(parts) if parts else np.zeros((0, len(FEATURE_NAMES)), np.float32)


async def _calibrate(net: CropNet, studies: list[SimulatedStudy], base: TwoStageSettings, name: str,
                     device: str, feature_model: FeatureModel | None = None) -> FpCalibration:
    from services.nodule.detect import solid_share
    from services.nodule.evaluation import volume_from_simulated
    from services.nodule.two_stage import detect_two_stage

    runtime = ModelRuntime()
    records: list[ScanRecord] = []
    shares: list[list[tuple[float, str, float] | None]] = []
    seconds = []
    try:
        await runtime.load(classifier_model_spec(name, net=net, feature_model=feature_model, cnn_weight=CNN_WEIGHT,
                                                 test_time_views=base.test_time_views, device=device))
        for index, study in enumerate(studies):
            volume = volume_from_simulated(study, uid=f"validation-{index}")
            started = time.perf_counter()
            nodules, labels = await detect_two_stage(volume.hu, volume.spacing_mm, volume.voxel_to_lps,
                                                     runtime=runtime, model_name=name, settings=base,
                                                     min_confidence=0.0)
            seconds.append(time.perf_counter() - started)
            record = ScanRecord(f"validation-{index}", truths_of(study), candidates_of_nodules(nodules))
            records.append(record)
            found: list[tuple[float, str, float] | None] = []
            for position, (candidate, hit) in enumerate(zip(record.candidates, match(record), strict=True)):
                found.append(None if hit is None else (solid_share(labels == position + 1, study.hu),
                                                       record.truths[hit].nodule_type, candidate.confidence))
            shares.append(found)
    finally:
        await runtime.close()
    threshold = choose_threshold(records)
    solid_min, ground_glass_max = _choose_type_shares(shares, threshold)
    settings = replace(base, report_threshold=threshold, solid_share_min=solid_min,
                       ground_glass_share_max=ground_glass_max)
    retyped = [replace(record, candidates=tuple(
        replace(c, nodule_type=_type_of(s[0], solid_min, ground_glass_max)) if s is not None else c
        for c, s in zip(record.candidates, share, strict=True))) for record, share in zip(records, shares, strict=True)]
    accuracy, typed = type_accuracy(retyped, threshold)
    counted = [t for r in records for t in r.truths if t.counted]
    hit_any = sum(len({h for h in match(r) if h is not None and r.truths[h].counted}) for r in records)
    return FpCalibration(settings, summarise(records, threshold, resamples=200), accuracy, typed,
                         float(np.median(seconds)) if seconds else math.nan,
                         hit_any / len(counted) if counted else math.nan)


def _choose_type_shares(shares: list[list[tuple[float, str, float] | None]], threshold: float) -> tuple[float, float]:
    hits = [entry for scan in shares for entry in scan if entry is not None and entry[2] >= threshold]
    default = TwoStageSettings()
    best, best_right = (default.solid_share_min, default.ground_glass_share_max), -1
    for solid_min in SOLID_SHARE_GRID:
        for ground_glass_max in GROUND_GLASS_SHARE_GRID:
            if ground_glass_max >= solid_min:
                continue
            right = sum(_type_of(share, solid_min, ground_glass_max) == truth for share, truth, _ in hits)
            if right > best_right:
                best, best_right = (solid_min, ground_glass_max), right
    return best


# -- artifacts ------------------------------------------------------------------------------------
def write_two_stage(net: CropNet, role: str, version: str, output: Path, calibration: FpCalibration, log: StageLog,
                    plan: FpPlan, rebuild: str, bank: CropBank, *, force: bool = False, extra: str = "",
                    feature_model: FeatureModel | None = None) -> Path:
    """Seal one classifier (and its feature model, if blended) as ``<output>/<role>/<version>/`` with config,
    weights, manifest and card."""
    directory = output / role / version
    if directory.exists():
        if not force:
            raise FileExistsError(f"{directory} exists (pass --force to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    TwoStageArtifactConfig(net.config, calibration.settings, role,
                           cnn_weight=None if feature_model is None else CNN_WEIGHT).write(directory)
    write_crop_weights(net, directory)
    if feature_model is not None:
        feature_model.save(directory)
    summary = calibration.summary
    metrics = {
        "parameters": parameter_count(net), "training_steps": log.steps, "training_seconds": log.seconds,
        "validation_scans": summary.counts.scans, "validation_sensitivity": _round(summary.sensitivity.value),
        "validation_specificity": _round(summary.specificity.value), "validation_cpm": _round(summary.cpm.value),
        "validation_type_accuracy": _round(calibration.type_accuracy),
        "validation_candidate_recall": _round(calibration.candidate_recall),
        "validation_seconds_per_volume": _round(calibration.seconds_per_volume),
        "report_threshold": calibration.settings.report_threshold,
    }
    card = model_card(role, version, net, calibration, log, plan, rebuild, bank, extra)
    save_artifact(directory, name=f"nodule-{role}", version=version, framework="torch", metrics=metrics,
                  data=data_text(plan.training_settings), rebuild_command=rebuild, model_card=card,
                  extra={"kind": "two_stage", "plan": _jsonable(asdict(plan)),
                         "detector": asdict(calibration.settings), "net": net.config.to_json()})
    return directory


def model_card(role: str, version: str, net: CropNet, calibration: FpCalibration, log: StageLog, plan: FpPlan,
               rebuild: str, bank: CropBank, extra: str = "") -> str:
    """Markdown model card of a v3 (two-stage) detector."""
    summary, settings, config = calibration.summary, calibration.settings, net.config
    at = ", ".join(f"{rate:g}: {value:.3f}" for rate, value in summary.sensitivity_at.items())
    positives = int((bank.labels > 0.5).sum())
    loss = ("binary cross-entropy to the labels" if role == "teacher" else
            f"{plan.distillation_weight} x BCE to the teacher's probabilities (soft labels, computed once per "
            f"crop) + {1 - plan.distillation_weight:g} x BCE to the labels")
    if plan.hard_negative_fraction > 0:
        source = ("its own last probability on each crop" if role == "teacher" else
                  "the teacher's probability on each crop (the teacher's false positives)")
        loss += (f"; {round(plan.hard_negative_fraction * 100)} % of each batch's negatives drawn in proportion to "
                 f"{source}, at least {HARD_NEGATIVE_FLOOR}")
    return f"""# nodule-{role} {version} (two-stage detector)

**Trained and validated on SIMULATED chest CT only** (`services.nodule.simulate`). No patient data was
used; every figure below is measured on simulated studies and says nothing yet about real scans.

## What it is
A two-stage detector, as LUNA16 CAD systems are built:
1. candidates (no network, `services/nodule/candidates.py`): multi-scale difference-of-Gaussians blob
   maxima on a 1 mm isotropic grid in the lung region, ranked by capped response x Hessian blobness,
   up to {settings.max_candidates} per scan{_faint_text(settings.faint_candidates)};
2. this network ({'teacher' if role == 'teacher' else 'student distilled from the teacher'}): a 3D CNN on a
   32^3 crop (1 mm, HU clipped to [-1000, 200]) around each candidate, giving its nodule probability;
   channels {list(config.channels)}, {config.convs_per_level} convolution(s) per level, stem stride
   {config.stem_stride}. **{parameter_count(net):,} parameters.** Served through the shared runtime (crops of
   every candidate and study batched together; `services/nodule/classifier.py`){_views_text(settings)};
3. each accepted candidate is segmented by a region grow in HU (half-way between lung and the nodule's
   peak) inside a ball around it and measured (`services/nodule/two_stage.py`){_centre_text(settings)}.
{_blend_text() if plan.feature_model else ""}
## Data
{data_text(plan.training_settings)}
Training: {plan.train_studies} studies{_small_text(plan)} of {list(plan.study_shape)} voxels
({len(bank.labels):,} crops, {positives:,} positive: candidates within a nodule's radius and the true centres);
validation: {plan.validation_studies} studies (other seeds). Batches of {plan.batch_size} with
{round(plan.positive_fraction * 100)} % positives; random +-2 mm shifts, flips, row/column swaps, extra noise
up to {plan.extra_noise_hu:g} HU.

## Training
{_training_text(log, plan, loss)}

## Settings chosen on the validation split
Reported confidence >= {settings.report_threshold:.3f} (maximises per-scan sensitivity + specificity);
solid if the interior's share >= -300 HU is >= {settings.solid_share_min}, ground glass if
< {settings.ground_glass_share_max}, else part-solid.

## Validation figures (simulated; the split the threshold was chosen on, so optimistic)
| metric | value | 95 % CI |
|---|---|---|
| per-scan sensitivity | {_cells(summary.sensitivity)} |
| per-scan specificity | {_cells(summary.specificity)} |
| CPM | {_cells(summary.cpm)} |
| nodules reached by any reported candidate (stage 1 + segmentation) | {calibration.candidate_recall:.3f} | |
| type accuracy (hit nodules) | {calibration.type_accuracy:.3f} ({calibration.typed_nodules} nodules) | |
| median s per volume (calibration runtime) | {calibration.seconds_per_volume:.2f} | |

Sensitivity by FP/scan: {at}. Held-out figures: `tessera bench nodule_eval`.
{extra}
## Rebuild
`{rebuild}`
"""


def _training_text(log: StageLog, plan: FpPlan, loss: str) -> str:
    if log.steps == 0:
        return ("No network training in this run: the weights are those of the artifact it continued from (below), "
                "unchanged; what this run made is the feature model and the settings.")
    return (f"{log.steps} steps in {log.seconds:.0f} s on this machine's shared CPU "
            f"(final loss {log.final_loss:.4f});\nAdamW, peak learning rate {plan.learning_rate}, cosine decay. "
            f"Loss: {loss}.")


def _blend_text() -> str:
    return (f"\n**Blended (v10):** the reported probability is the sigmoid of {CNN_WEIGHT:g} x this network's logit + "
            f"{1 - CNN_WEIGHT:g} x the logit of a LightGBM over {len(FEATURE_NAMES)} hand-crafted features of the same "
            "crop (ball and shell HU statistics, Hessian eigenvalues at 1-3 mm, the dense component's size and shape, "
            "the lung's noise; `services/nodule/candidate_features.py`, `feature_model.txt`), trained on the same "
            "crop bank; the weight was fixed beforehand, not tuned.\n")


def _views_text(settings: TwoStageSettings) -> str:
    if settings.test_time_views == 1:
        return ""
    return (f"; its logit is the mean over {settings.test_time_views} views of each crop (flips on every axis"
            f"{', and each with rows and columns swapped' if settings.test_time_views == 16 else ''}: the training "
            "augmentations), one pass per view, as it is served and calibrated, and as a student's soft labels "
            "are computed from it (v14)")


def _centre_text(settings: TwoStageSettings) -> str:
    if not settings.centre_shift_limit:
        return ""
    return (f"; the reported centre is the centroid of the region's core unless that lies more than "
            f"{settings.centre_shift_limit:g} x the candidate's radius from the stage-1 peak (the region grew into "
            f"a vessel or the wall), then the peak (v12)")


def _small_text(plan: FpPlan) -> str:
    if not plan.small_nodule_studies:
        return ""
    config = small_nodule_config(TRAINING_SETTINGS[plan.training_settings])
    (fewest, most), (low, high) = config.nodule_count, config.nodule_diameter_mm
    return (f" and {plan.small_nodule_studies} more with {fewest}-{most} nodules of {low:g}-{high:g} mm each "
            "(small-nodule studies, their own seeds)")


def _faint_text(faint_candidates: int) -> str:
    if not faint_candidates:
        return ""
    return (f" (the last {faint_candidates} of them by a second ranking whose response cap is "
            f"{FAINT_SCORE_CAP_HU:g} HU, room for faint ground-glass blobs that dense vessels and noise outrank)")


# -- the command ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``tessera train nodule --two-stage``."""
    parser = argparse.ArgumentParser(prog="tessera train nodule --two-stage",
                                     description="Train the v3 two-stage nodule detector on simulated CT.")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--version", default="v3")
    parser.add_argument("--quick", action="store_true")
    for name in ("train-studies", "small-nodule-studies", "validation-studies", "teacher-steps", "student-steps",
                 "batch-size", "max-candidates", "faint-candidates", "seed", "teacher-stem-stride",
                 "teacher-test-time-views"):
        parser.add_argument(f"--{name}", type=int)
    for name in ("teacher-seconds", "student-seconds", "learning-rate", "distillation-weight",
                 "hard-negative-fraction", "extra-noise-hu", "centre-shift-limit"):
        parser.add_argument(f"--{name}", type=float)
    parser.add_argument("--training-settings", choices=sorted(TRAINING_SETTINGS),
                        help="the simulated domain of the training and validation studies (default: default)")
    parser.add_argument("--jobs", type=int, default=1, help="processes building the crop bank")
    parser.add_argument("--feature-model", action="store_true", default=None,
                        help="blend each network with a LightGBM over hand-crafted candidate features (v10)")
    parser.add_argument("--teacher-from", type=Path, help="reuse this v3 teacher artifact instead of training one")
    parser.add_argument("--teacher-init", type=Path, help="continue training from this teacher artifact's weights")
    parser.add_argument("--student-init", type=Path, help="continue training from this student artifact's weights")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tessera train nodule --two-stage``: crop bank, teacher, distilled student, calibration, artifacts."""
    from services.nodule.classifier import load_crop_net

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args([a for a in argv if a != "--two-stage"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = QUICK_FP_PLAN if args.quick else FpPlan()
    overrides = {key: getattr(args, key) for key in ("train_studies", "small_nodule_studies", "validation_studies",
                                                      "teacher_steps", "student_steps", "batch_size", "max_candidates",
                                                      "faint_candidates", "seed",
                                                      "teacher_seconds", "student_seconds", "learning_rate",
                                                      "distillation_weight", "hard_negative_fraction",
                                                      "extra_noise_hu", "centre_shift_limit", "training_settings",
                                                      "teacher_stem_stride", "teacher_test_time_views",
                                                      "feature_model")
                 if getattr(args, key) is not None}
    plan = replace(plan, **overrides)
    if args.output is None:
        from shared.config import get_settings

        args.output = get_settings().models_dir / "nodule"
    device = str(resolve_device(args.device))
    torch.manual_seed(plan.seed)
    rng = np.random.default_rng(plan.seed)
    started = time.perf_counter()
    bank = build_crop_bank("train", plan.train_studies, plan, args.cache_dir, args.jobs)
    if plan.small_nodule_studies:
        small = build_crop_bank("train_small", plan.small_nodule_studies, plan, args.cache_dir, args.jobs)
        bank = CropBank.concatenate([bank, small])
    logger.info("crop bank: %d crops (%d positive) in %.0f s", len(bank.labels), int(bank.labels.sum()),
                time.perf_counter() - started)
    feature_model = None
    if plan.feature_model:
        started_features = time.perf_counter()
        feature_model = train_feature_model(bank_features(bank), bank.labels, plan.seed)
        logger.info("feature model trained in %.0f s", time.perf_counter() - started_features)
    trained: list[tuple[str, CropNet, StageLog]] = []
    if args.teacher_from:
        teacher, _ = load_crop_net(args.teacher_from, device)
    else:
        teacher, teacher_log = train_classifier(plan.teacher_config(), bank, plan, plan.teacher_steps,
                                                plan.teacher_seconds, rng, "teacher", device,
                                                init_from=args.teacher_init)
        trained.append(("teacher", teacher, teacher_log))
    # the soft labels cost a teacher pass per crop and view: only when the student trains
    soft = (teacher_probabilities(teacher, bank, device, views=plan.teacher_test_time_views)
            if plan.student_steps or plan.student_seconds else None)
    student, student_log = train_classifier(STUDENT_CROP_CONFIG, bank, plan, plan.student_steps, plan.student_seconds,
                                            rng, "student", device, soft_targets=soft, init_from=args.student_init)
    trained.append(("student", student, student_log))
    validation = [simulate_study(plan.study_config("validation", seed))
                  for seed in split_seeds("validation", plan.validation_studies)]
    rebuild = " ".join(["tessera train nodule --two-stage", *[a for a in argv if a not in ("--force", "--two-stage")]])
    for role, net, log in trained:
        calibration = calibrate_two_stage(net, validation, plan.detector_settings(feature_model is not None, role),
                                          f"nodule-{role}-{args.version}-calibration", device, feature_model)
        teacher_dir = args.teacher_from or args.output / "teacher" / args.version
        extra = f"\nDistilled from the teacher at `{teacher_dir}`.\n" if role == "student" and log.steps else ""
        init = args.teacher_init if role == "teacher" else args.student_init
        if init is not None:
            extra += f"\nTraining continued from the weights of `{init}` (the steps above are this run's only).\n"
        directory = write_two_stage(net, role, args.version, args.output, calibration, log, plan, rebuild, bank,
                                    force=args.force, extra=extra, feature_model=feature_model)
        summary = calibration.summary
        print(f"{directory}: {parameter_count(net):,} params, validation sensitivity {summary.sensitivity.value:.3f} "
              f"specificity {summary.specificity.value:.3f} CPM {summary.cpm.value:.3f} "
              f"threshold {calibration.settings.report_threshold:.3f} reach {calibration.candidate_recall:.3f}",
              flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
