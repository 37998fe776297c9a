"""Hand-crafted candidate features and the v10 blend of the crop CNN with a LightGBM over them: the features
measure what they say, the vectorised Hessian equals SciPy's filters, and a blended artifact is served through
the runtime and by detect_series."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from model_runtime.runtime import ModelRuntime
from services.nodule.candidate_features import (
    FEATURE_NAMES,
    HESSIAN_SCALES_MM,
    FeatureModel,
    candidate_features,
    train_feature_model,
)
from services.nodule.classifier import (
    CROP_SIZE,
    STUDENT_CROP_CONFIG,
    CropNet,
    TwoStageArtifactConfig,
    classifier_model_spec,
    crop_items,
)
from services.nodule.detect import detect_series, load_detector, two_stage_settings_for
from services.nodule.evaluation import volume_from_simulated
from services.nodule.simulate import SimulationConfig, simulate_study
from services.nodule.training_fp import main

GRID = np.meshgrid(*[np.arange(CROP_SIZE) - CROP_SIZE // 2] * 3, indexing="ij")


def _crops(noise_sd: float = 20.0) -> np.ndarray:
    """Lung background with a 5 mm-radius ball, a 2 mm-radius tube along z and nothing."""
    rng = np.random.default_rng(0)
    crops = rng.normal(-850.0, noise_sd, (3, CROP_SIZE, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    crops[0][GRID[0] ** 2 + GRID[1] ** 2 + GRID[2] ** 2 <= 25] = 30.0
    crops[1][GRID[1] ** 2 + GRID[2] ** 2 <= 4] = 30.0
    return np.clip(crops, -1000, 200)


def _feature(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, FEATURE_NAMES.index(name)]


def test_features_tell_a_ball_from_a_tube_and_measure_the_noise() -> None:
    features = candidate_features(_crops())
    assert features.shape == (3, len(FEATURE_NAMES)) and features.dtype == np.float32
    eigenvalues = np.stack([_feature(features, f"hessian_2mm_eig{k}") for k in (1, 2, 3)], axis=1)
    assert (eigenvalues[0] < 0).all()  # a ball curves down along all three axes
    assert (eigenvalues[1, :2] < 0).all() and abs(eigenvalues[1, 2]) < 0.1 * abs(eigenvalues[1, 0])  # a tube: two
    assert _feature(features, "component_touches_edge").tolist() == [0.0, 1.0, 0.0]
    assert _feature(features, "component_spread_3_1")[0] > 0.8 > _feature(features, "component_spread_3_1")[1]
    assert _feature(features, "ball_mean_3.5mm")[0] == pytest.approx(30.0)
    assert _feature(features, "lung_noise_sd")[2] == pytest.approx(20.0, rel=0.05)


def test_the_hessian_features_equal_scipys_gaussian_derivatives_at_the_centre() -> None:
    crop = _crops()[0] + np.random.default_rng(1).normal(0, 50, (CROP_SIZE,) * 3).astype(np.float32)
    features = candidate_features(crop[None])
    centre = (CROP_SIZE // 2,) * 3
    for scale in HESSIAN_SCALES_MM:
        derivative = {order: ndimage.gaussian_filter(crop.astype(np.float64), scale, order=order)[centre]
                      for order in ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))}
        hessian = np.array([[derivative[(2, 0, 0)], derivative[(1, 1, 0)], derivative[(1, 0, 1)]],
                            [derivative[(1, 1, 0)], derivative[(0, 2, 0)], derivative[(0, 1, 1)]],
                            [derivative[(1, 0, 1)], derivative[(0, 1, 1)], derivative[(0, 0, 2)]]]) * scale ** 2
        expected = np.linalg.eigvalsh(hessian)
        got = [features[0, FEATURE_NAMES.index(f"hessian_{scale:g}mm_eig{k}")] for k in (1, 2, 3)]
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-3)
        smoothed = ndimage.gaussian_filter(crop.astype(np.float64), scale)[centre]
        assert features[0, FEATURE_NAMES.index(f"hessian_{scale:g}mm_smoothed")] == pytest.approx(smoothed, rel=1e-5)


def _component_one_by_one(crop: np.ndarray) -> tuple[float, float, float, float]:
    """The centre component's features computed the plain way: one labelling, ``np.cov`` of its voxels."""
    labelled, _ = ndimage.label(crop > -500.0)
    label = labelled[(CROP_SIZE // 2,) * 3]
    if not label:
        return 0.0, 0.0, 0.0, 0.0
    voxels = np.argwhere(labelled == label)
    touches = float(voxels.min() == 0 or voxels.max() == CROP_SIZE - 1)
    if len(voxels) < 4:
        return float(np.log1p(len(voxels))), touches, 1.0, 1.0
    spreads = np.sort(np.linalg.eigvalsh(np.cov(voxels.T)))[::-1] + 1e-6
    return float(np.log1p(len(voxels))), touches, float(spreads[1] / spreads[0]), float(spreads[2] / spreads[0])


def test_batched_components_and_percentiles_equal_the_per_crop_computation() -> None:
    rng = np.random.default_rng(5)
    crops = np.concatenate([_crops(), rng.normal(-600.0, 250.0, (6, CROP_SIZE, CROP_SIZE, CROP_SIZE))])
    crops[3, 14:19, 14:19, 14:19] = 40.0  # a cube touching the component of its noisy neighbours
    crops[4, CROP_SIZE // 2, CROP_SIZE // 2, CROP_SIZE // 2] = 40.0  # a lone dense voxel: fewer than 4 voxels
    crops[4, CROP_SIZE // 2 - 1:CROP_SIZE // 2 + 2, CROP_SIZE // 2 - 1:CROP_SIZE // 2 + 2] = -900.0
    crops[4, CROP_SIZE // 2, CROP_SIZE // 2, CROP_SIZE // 2] = 40.0
    crops[5] = crops[5][::-1]  # a dense last slice next to the following crop's first
    crops[6, -1] = 100.0
    crops[7, 0] = 100.0
    crops = np.clip(crops, -1000, 200).astype(np.float32)
    features = candidate_features(crops)
    names = ("component_log_size", "component_touches_edge", "component_spread_2_1", "component_spread_3_1")
    got = np.stack([_feature(features, name) for name in names], axis=1)
    expected = np.array([_component_one_by_one(crop) for crop in crops], dtype=np.float32)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert _feature(features, "component_log_size")[4] == pytest.approx(np.log1p(1))
    radius = np.sqrt(GRID[0] ** 2 + GRID[1] ** 2 + GRID[2] ** 2)
    for inner, outer in ((1.5, 3.5), (3.5, 6.0), (6.0, 10.0), (10.0, 15.0)):
        shell = (radius > inner) & (radius <= outer)
        expected_p90 = np.percentile(crops[:, shell].astype(np.float64), 90, axis=1)
        assert np.allclose(_feature(features, f"shell_{inner:g}_{outer:g}mm_p90"), expected_p90, rtol=1e-6)


def test_features_refuse_crops_of_another_shape() -> None:
    with pytest.raises(ValueError, match="expected"):
        candidate_features(np.zeros((2, 16, 16, 16)))


def _feature_model() -> FeatureModel:
    crops = np.concatenate([_crops(noise) for noise in np.linspace(10.0, 40.0, 30)])
    labels = np.tile([1.0, 0.0, 0.0], 30)
    return train_feature_model(candidate_features(crops), labels)


def test_a_feature_model_round_trips_through_its_file(tmp_path: Path) -> None:
    model = _feature_model()
    features = candidate_features(_crops())
    model.save(tmp_path)
    assert np.array_equal(FeatureModel.load(tmp_path).logits(features), model.logits(features))
    assert model.logits(features)[0] > model.logits(features)[1]  # the ball scores above the tube


def test_a_blended_classifier_is_served_through_the_runtime_as_its_formula_says() -> None:
    torch.manual_seed(0)
    net, model = CropNet(STUDENT_CROP_CONFIG).eval(), _feature_model()
    crops = _crops()
    items = crop_items(crops, blended=True)

    async def run() -> list[float]:
        runtime = ModelRuntime()
        try:
            await runtime.load(classifier_model_spec("blend-test", net=net, feature_model=model, cnn_weight=0.3))
            answers = await asyncio.gather(*(runtime.predict("blend-test", item) for item in items))
            return [float(a.reshape(-1)[0]) for a in answers]
        finally:
            await runtime.close()

    with torch.inference_mode():
        cnn = net(torch.stack([item["crops"] for item in items]))[:, 0].double().numpy()  # type: ignore[index]
    expected = 1 / (1 + np.exp(-(0.3 * cnn + 0.7 * model.logits(candidate_features(crops)))))
    assert np.allclose(asyncio.run(run()), expected, atol=1e-5)


def test_quick_blended_artifacts_are_served_by_detect_series(tmp_path: Path) -> None:
    assert main(["--two-stage", "--quick", "--feature-model", "--output", str(tmp_path)]) == 0
    student = tmp_path / "student" / "v3"
    config = TwoStageArtifactConfig.read(student)
    assert config.cnn_weight == 0.5 and config.detector.blended and (student / FeatureModel.FILE).exists()
    assert "Blended (v10)" in (student / "MODEL_CARD.md").read_text()
    study = simulate_study(SimulationConfig(seed=11, shape=(48, 192, 192), nodule_count=(1, 1),
                                            no_nodule_probability=0.0, nodule_diameter_mm=(10.0, 12.0),
                                            type_weights=(1.0, 0.0, 0.0), juxta_pleural_fraction=0.0,
                                            juxta_vascular_fraction=0.0, noise_sd_hu=(15.0, 15.0)))

    async def run() -> object:
        runtime = ModelRuntime()
        try:
            await load_detector(runtime, role="student", artifact_dir=str(student))
            settings = two_stage_settings_for(runtime, "nodule-student")
            assert settings is not None and settings.blended
            return await detect_series(volume_from_simulated(study), runtime=runtime, min_confidence=0.0)
        finally:
            await runtime.close()

    findings = asyncio.run(run())
    assert len(findings.nodules) >= 1  # type: ignore[attr-defined]
    raw = json.loads((student / "config.json").read_text())
    raw["feature_model"]["features"] = raw["feature_model"]["features"][:-1]
    (student / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="other features"):
        TwoStageArtifactConfig.read(student)
