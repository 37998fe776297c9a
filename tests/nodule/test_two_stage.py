"""The v3 two-stage nodule detector: blob candidates on a simulated volume, the crop classifier through the
runtime, distillation, region-grow measurements, and a --quick artifact served by detect_series."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model_runtime.runtime import ModelRuntime
from services.nodule.candidates import BlobCandidate, generate_candidates, scan_candidates
from services.nodule.classifier import (
    CROP_SIZE,
    STUDENT_CROP_CONFIG,
    TEACHER_CROP_CONFIG,
    CropNet,
    TwoStageArtifactConfig,
    TwoStageSettings,
    ViewAveragedNet,
    classifier_model_spec,
    crop_tensors,
    crop_view,
    extract_crops,
    is_two_stage,
    parameter_count,
    write_crop_weights,
)
from services.nodule.detect import detect_series, load_detector, two_stage_settings_for
from services.nodule.evaluation import volume_from_simulated
from services.nodule.simulate import SimulationConfig, simulate_study
from services.nodule.training_fp import (
    BANK_CROP,
    QUICK_FP_PLAN,
    CropBank,
    _batch_indices,
    augment_crops,
    build_crop_bank,
    main,
    teacher_probabilities,
    train_classifier,
)
from services.nodule.two_stage import reported_centre, segment_candidate

ONE_SOLID = SimulationConfig(seed=11, shape=(48, 192, 192), nodule_count=(1, 1), no_nodule_probability=0.0,
                             nodule_diameter_mm=(10.0, 12.0), type_weights=(1.0, 0.0, 0.0),
                             juxta_pleural_fraction=0.0, juxta_vascular_fraction=0.0, noise_sd_hu=(15.0, 15.0))


def test_candidates_find_a_simulated_solid_nodule_among_the_first_few() -> None:
    study = simulate_study(ONE_SOLID)
    assert len(study.nodules) == 1
    truth = study.nodules[0]
    candidates = generate_candidates(study.hu, study.spacing_mm, max_candidates=48)
    assert 0 < len(candidates) <= 48
    spacing = np.asarray(study.spacing_mm)
    distances = [float(np.linalg.norm((np.asarray(c.centre_voxel) - truth.center_voxel) * spacing)) for c in candidates]
    hits = [rank for rank, distance in enumerate(distances) if distance <= truth.long_axis_mm / 2]
    assert hits and hits[0] < 5, (hits, distances[:5])
    assert 3.0 <= candidates[hits[0]].radius_mm <= 12.0


def test_candidates_of_an_empty_volume_are_none() -> None:
    hu = np.full((24, 64, 64), 40.0, dtype=np.float32)  # soft tissue only: no lungs
    scan = scan_candidates(hu, (2.0, 0.8, 0.8))
    assert scan.candidates == [] and scan.iso.ndim == 3


def _faint_ball_among_dense_segments() -> np.ndarray:
    """Lung with ten dense, elongated segments (vessels: strong response, poor blobness) and one faint round
    blob of 80 HU above the lung at (30, 70, 70) (ground glass: weak response, a ball's blobness)."""
    hu = np.full((48, 96, 96), 40.0, dtype=np.float32)
    hu[4:44, 8:88, 8:88] = -850.0
    z, y, x = np.ogrid[:48, :96, :96]
    for k in range(10):
        cz, cy, cx = 12 + 8 * (k % 4), 20 + 24 * (k // 4), 20 + 6 * k
        hu[((z - cz) / 1.8) ** 2 + ((y - cy) / 1.8) ** 2 + ((x - cx) / 6.0) ** 2 <= 1] = 40.0
    hu[(z - 30) ** 2 + (y - 70) ** 2 + (x - 70) ** 2 <= 25] = -770.0
    return hu + np.random.default_rng(0).normal(0, 5, hu.shape).astype(np.float32)


def test_faint_slots_let_a_ground_glass_blob_in_that_dense_structures_outrank() -> None:
    hu = _faint_ball_among_dense_segments()

    def reaches_the_blob(candidates: list) -> bool:  # type: ignore[type-arg]
        return any(np.linalg.norm(np.asarray(c.centre_voxel) - (30, 70, 70)) <= 5 for c in candidates)

    usual = scan_candidates(hu, (1.0, 1.0, 1.0), max_candidates=8).candidates
    with_faint = scan_candidates(hu, (1.0, 1.0, 1.0), max_candidates=8, faint_candidates=2).candidates
    assert len(usual) == len(with_faint) == 8
    assert not reaches_the_blob(usual)
    assert reaches_the_blob(with_faint)
    assert [c.centre_voxel for c in with_faint[:6]] == [c.centre_voxel for c in usual[:6]]  # the usual ranking first


def test_crops_are_centred_and_air_padded() -> None:
    iso = np.full((40, 40, 40), -900.0, dtype=np.float32)
    iso[20, 20, 20] = 100.0
    crops = extract_crops(iso, np.array([[20, 20, 20], [0, 0, 0]]))
    assert crops.shape == (2, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    assert crops[0][CROP_SIZE // 2, CROP_SIZE // 2, CROP_SIZE // 2] == 100.0
    assert crops[1][0, 0, 0] == -1000.0  # outside the volume


def test_crops_equal_those_of_the_padded_volume_at_every_edge() -> None:
    """Crops read in place equal crops of the volume padded with air, the way the v3 detector first cut them."""
    rng = np.random.default_rng(0)
    iso = rng.normal(-600, 200, (37, 45, 41)).astype(np.float32)
    half = CROP_SIZE // 2
    padded = np.pad(iso, half + 1, mode="constant", constant_values=-1000.0)
    centres = np.array([[0, 0, 0], [36, 44, 40], [18, 22, 20], [3, 40, 1], *rng.integers(0, 37, (20, 3))])
    crops = extract_crops(iso, centres)
    for crop, centre in zip(crops, centres, strict=True):
        start = centre + 1
        np.testing.assert_array_equal(crop, padded[start[0]:start[0] + CROP_SIZE, start[1]:start[1] + CROP_SIZE,
                                                   start[2]:start[2] + CROP_SIZE])


def test_student_has_at_least_80_percent_fewer_parameters() -> None:
    teacher, student = parameter_count(CropNet(TEACHER_CROP_CONFIG)), parameter_count(CropNet(STUDENT_CROP_CONFIG))
    assert student <= 0.2 * teacher


def test_classifier_spec_batches_crops_through_the_runtime() -> None:
    torch.manual_seed(0)
    net = CropNet(STUDENT_CROP_CONFIG).eval()
    crops = np.random.default_rng(0).uniform(-1000, 200, (12, CROP_SIZE, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    tensors = crop_tensors(crops)

    async def run() -> tuple[list[float], dict[str, object]]:
        runtime = ModelRuntime()
        try:
            await runtime.load(classifier_model_spec("crop-test", net=net, max_batch_size=8))
            answers = await asyncio.gather(*(runtime.predict("crop-test", crop) for crop in tensors))
            return [float(a.reshape(-1)[0]) for a in answers], runtime.stats()["crop-test"]
        finally:
            await runtime.close()

    probabilities, _ = asyncio.run(run())
    with torch.inference_mode():
        direct = torch.sigmoid(net(torch.stack(list(tensors))))[:, 0].tolist()
    assert np.allclose(probabilities, direct, atol=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probabilities)


def test_the_16_views_are_distinct_and_their_average_is_invariant_under_each() -> None:
    torch.manual_seed(0)
    net = CropNet(STUDENT_CROP_CONFIG).eval()
    crops = torch.rand(3, 1, 8, 8, 8)
    views = torch.stack([crop_view(crops, view) for view in range(16)])
    assert len({tuple(v.flatten().tolist()) for v in views}) == 16
    averaged, flips_only = ViewAveragedNet(net, 16).eval(), ViewAveragedNet(net, 8).eval()
    with torch.inference_mode():
        reference = averaged(crops)
        assert torch.allclose(reference, torch.stack([net(v) for v in views]).mean(dim=0), atol=1e-6)
        for view in (3, 6, 9, 15):
            assert torch.allclose(averaged(crop_view(crops, view)), reference, atol=1e-5)
        assert torch.allclose(flips_only(crop_view(crops, 5)), flips_only(crops), atol=1e-5)
    with pytest.raises(ValueError, match="test-time views"):
        ViewAveragedNet(net, 4)


def test_an_artifact_with_test_time_views_is_served_averaged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = CropNet(STUDENT_CROP_CONFIG).eval()
    write_crop_weights(net, tmp_path)
    TwoStageArtifactConfig(net.config, TwoStageSettings(test_time_views=16), "teacher").write(tmp_path)
    assert TwoStageArtifactConfig.read(tmp_path).detector.test_time_views == 16
    crops = np.random.default_rng(1).uniform(-1000, 200, (4, CROP_SIZE, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    tensors = crop_tensors(crops)

    async def run() -> list[float]:
        runtime = ModelRuntime()
        try:
            await runtime.load(classifier_model_spec("views-test", artifact_dir=tmp_path))
            answers = await asyncio.gather(*(runtime.predict("views-test", crop) for crop in tensors))
            return [float(a.reshape(-1)[0]) for a in answers]
        finally:
            await runtime.close()

    with torch.inference_mode():
        expected = torch.sigmoid(ViewAveragedNet(net, 16)(torch.stack(list(tensors))))[:, 0].tolist()
    assert np.allclose(asyncio.run(run()), expected, atol=1e-5)


def _bank(rng: np.random.Generator, count: int = 16) -> CropBank:
    crops = rng.uniform(0, 0.2, (count, BANK_CROP, BANK_CROP, BANK_CROP)).astype(np.float16)
    labels = (np.arange(count) % 2).astype(np.float32)
    crops[labels > 0, 14:22, 14:22, 14:22] = 0.85  # a bright blob in the positives
    return CropBank(crops, labels, np.ones(count, bool))


def test_distillation_step_uses_the_teacher_soft_labels() -> None:
    rng = np.random.default_rng(0)
    bank = _bank(rng)
    plan = replace(QUICK_FP_PLAN, batch_size=8, learning_rate=5e-3)
    teacher, log = train_classifier(TEACHER_CROP_CONFIG, bank, plan, 3, 0.0, rng, "teacher")
    assert log.steps == 3 and np.isfinite(log.final_loss)
    soft = teacher_probabilities(teacher, bank)
    assert soft.shape == (len(bank.labels),) and ((soft >= 0) & (soft <= 1)).all()
    student, student_log = train_classifier(STUDENT_CROP_CONFIG, bank, plan, 3, 0.0, rng, "student", soft_targets=soft)
    assert student_log.steps == 3 and np.isfinite(student_log.final_loss)
    assert augment_crops(bank.crops[:2], rng, 30.0).shape == (2, CROP_SIZE, CROP_SIZE, CROP_SIZE)


def test_a_stride_1_teacher_continues_from_a_stride_2_artifact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bank = _bank(rng)
    plan = replace(QUICK_FP_PLAN, batch_size=4, teacher_stem_stride=1)
    stride_2, _ = train_classifier(TEACHER_CROP_CONFIG, bank, plan, 1, 0.0, rng, "teacher")
    write_crop_weights(stride_2, tmp_path)
    TwoStageArtifactConfig(stride_2.config, TwoStageSettings(), "teacher").write(tmp_path)
    stride_1, log = train_classifier(plan.teacher_config(), bank, plan, 1, 0.0, rng, "teacher", init_from=tmp_path)
    assert stride_1.config.stem_stride == 1 and log.steps == 1
    assert stride_1(torch.zeros(1, 1, CROP_SIZE, CROP_SIZE, CROP_SIZE)).shape == (1, 1)
    with pytest.raises(ValueError, match="not a"):
        train_classifier(STUDENT_CROP_CONFIG, bank, plan, 1, 0.0, rng, "student", init_from=tmp_path)


def test_hard_negatives_are_drawn_by_hardness() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    hardness = np.array([0.9, 0.99, 0.0, 0.0, 0.0], np.float32)
    rows = _batch_indices(labels, rng, 10, 0.2, hardness, 1.0)
    assert len(rows) == 10 and (rows[:2] == 0).all()
    assert (rows[2:] == 1).mean() > 0.8  # the one hard negative dominates (the others keep the floor)
    assert len(_batch_indices(labels, rng, 10, 0.2)) == 10

def test_segmentation_measures_a_ball() -> None:
    spacing = (1.5, 0.7, 0.7)
    shape = (32, 80, 80)
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, (16, 40, 40), spacing, strict=True)],
                        indexing="ij")
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[sum(g ** 2 for g in grids) <= 5.0 ** 2] = 30.0
    window, mask, centre = segment_candidate(hu, spacing, (16.0, 41.0, 39.0), 4.0)
    assert np.allclose(centre, (16, 40, 40), atol=0.6)
    volume = mask.sum() * np.prod(spacing)
    assert abs(volume - 4 / 3 * np.pi * 125) / (4 / 3 * np.pi * 125) < 0.2


def test_a_small_nodule_on_a_vessel_keeps_its_peak_as_centre() -> None:
    spacing = (1.0, 1.0, 1.0)
    shape = (40, 40, 40)
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[(grids[0] - 20) ** 2 + (grids[1] - 20) ** 2 + (grids[2] - 20) ** 2 <= 1.6 ** 2] = 40.0  # a 3 mm nodule
    hu[(grids[0] - 20) ** 2 + (grids[1] - 23.5) ** 2 <= 2.0 ** 2] = 40.0  # on a 4 mm vessel running along x
    candidate = BlobCandidate((20.0, 20.0, 20.0), 1.7, 300.0, 0.8, 200.0)
    _, _, centroid = segment_candidate(hu, spacing, candidate.centre_voxel, candidate.radius_mm)
    assert np.linalg.norm(centroid - 20.0) > 1.7  # the region grew along the vessel
    np.testing.assert_allclose(reported_centre(centroid, candidate, spacing, 1.0), (20.0, 20.0, 20.0))
    np.testing.assert_allclose(reported_centre(centroid, candidate, spacing, 0.0), centroid)  # before v12
    near = np.array([20.0, 20.5, 20.0])
    np.testing.assert_allclose(reported_centre(near, candidate, spacing, 1.0), near)
    assert TwoStageSettings.from_json({"max_candidates": 64}).centre_shift_limit == 0.0  # artifacts before v12
    assert TwoStageSettings.from_json({"centre_shift_limit": 1.0}).centre_shift_limit == 1.0


def test_quick_two_stage_artifacts_are_served_by_detect_series(tmp_path: Path) -> None:
    assert main(["--two-stage", "--quick", "--output", str(tmp_path), "--teacher-test-time-views", "8"]) == 0
    student = tmp_path / "student" / "v3"
    assert is_two_stage(student) and (student / "MODEL_CARD.md").exists()
    assert TwoStageArtifactConfig.read(tmp_path / "teacher" / "v3").detector.test_time_views == 8
    assert "mean over 8 views" in (tmp_path / "teacher" / "v3" / "MODEL_CARD.md").read_text()
    assert TwoStageArtifactConfig.read(student).detector.test_time_views == 1  # the student is one pass
    assert "SIMULATED" in (student / "MODEL_CARD.md").read_text()
    study = simulate_study(ONE_SOLID)
    volume = volume_from_simulated(study)

    async def run() -> object:
        runtime = ModelRuntime()
        try:
            await load_detector(runtime, role="student", artifact_dir=str(student))
            assert two_stage_settings_for(runtime, "nodule-student") is not None
            return await detect_series(volume, runtime=runtime, min_confidence=0.0)
        finally:
            await runtime.close()

    findings = asyncio.run(run())
    assert findings.labels.shape == study.hu.shape  # type: ignore[attr-defined]
    assert len(findings.nodules) >= 1  # type: ignore[attr-defined]
    assert all(n.long_axis_mm > 0 and n.volume_mm3 > 0 for n in findings.nodules)  # type: ignore[attr-defined]


def test_the_crop_bank_is_the_same_built_by_two_processes_and_is_cached_per_domain(tmp_path: Path) -> None:
    plan = replace(QUICK_FP_PLAN, training_settings="wide")
    serial = build_crop_bank("train", 2, plan)
    parallel = build_crop_bank("train", 2, plan, tmp_path, jobs=2)
    assert np.array_equal(serial.crops, parallel.crops) and np.array_equal(serial.labels, parallel.labels)
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("*.npz")) == ["wide", "wide"]
    default = build_crop_bank("train", 2, QUICK_FP_PLAN, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 4  # the default domain's studies are cached beside, not reused
    assert default.crops.shape != serial.crops.shape or not np.array_equal(default.crops, serial.crops)
