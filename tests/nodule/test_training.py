"""`tessera train nodule --quick` writes loadable, sealed teacher and student artifacts with model cards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_runtime.artifacts import load_manifest
from model_runtime.runtime import ModelRuntime
from services.nodule.evaluation import volume_from_simulated
from services.nodule.model import NoduleArtifactConfig, load_net, parameter_count
from services.nodule.simulate import SimulationConfig, simulate_study
from services.nodule.training import (
    QUICK_PLAN,
    TrainingStudy,
    augment,
    distillation_loss,
    load_training_studies,
    main,
    sample_patch,
    segmentation_loss,
)


@pytest.fixture(scope="module")
def quick_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("nodule-models")
    assert main(["--quick", "--output", str(output), "--version", "t1"]) == 0
    return output


def test_quick_training_writes_sealed_artifacts_with_cards(quick_artifacts: Path) -> None:
    teacher_dir, student_dir = quick_artifacts / "teacher" / "t1", quick_artifacts / "student" / "t1"
    teacher_manifest, student_manifest = load_manifest(teacher_dir), load_manifest(student_dir)
    assert (teacher_manifest.name, student_manifest.name) == ("nodule-teacher", "nodule-student")
    assert student_manifest.metrics["parameters"] <= 0.2 * teacher_manifest.metrics["parameters"]
    card = (student_dir / "MODEL_CARD.md").read_text()
    assert "SIMULATED" in card and "tessera train nodule --quick" in card and "parameters" in card
    assert "SIMULATED" in student_manifest.data
    teacher, config = load_net(teacher_dir)
    assert config.role == "teacher" and parameter_count(teacher) == teacher_manifest.metrics["parameters"]
    assert json.loads((student_dir / "config.json").read_text())["detector"]["roi_size"] == list(QUICK_PLAN.roi_size)


def test_quick_student_serves_from_its_artifact(quick_artifacts: Path) -> None:
    from services.nodule.detect import detect_series, load_detector

    study = simulate_study(SimulationConfig(seed=3, shape=(16, 64, 64)))

    async def scenario() -> int:
        runtime = ModelRuntime()
        try:
            settings = await load_detector(runtime, artifact_dir=str(quick_artifacts / "student" / "t1"), device="cpu")
            assert settings == NoduleArtifactConfig.read(quick_artifacts / "student" / "t1").detector
            findings = await detect_series(volume_from_simulated(study), runtime=runtime, model_name="nodule-student")
            assert findings.model_version == "nodule-student t1"
            return len(findings.nodules)
        finally:
            await runtime.close()

    assert asyncio.run(scenario()) >= 0


def test_recalibration_reseals_with_both_commands(quick_artifacts: Path) -> None:
    assert main(["--quick", "--output", str(quick_artifacts), "--version", "t1", "--recalibrate"]) == 0
    manifest = load_manifest(quick_artifacts / "student" / "t1")
    assert manifest.rebuild_command.endswith("--version t1 --recalibrate") and " && " in manifest.rebuild_command
    assert "Distilled from the teacher" in (quick_artifacts / "student" / "t1" / "MODEL_CARD.md").read_text()


def test_existing_version_is_not_overwritten_without_force(quick_artifacts: Path) -> None:
    with pytest.raises(FileExistsError):
        main(["--quick", "--output", str(quick_artifacts), "--version", "t1", "--teacher-from",
              str(quick_artifacts / "teacher" / "t1")])


def test_patches_around_nodules_hold_nodule_voxels() -> None:
    labels = np.zeros((16, 64, 64), dtype=bool)
    labels[6:10, 30:34, 30:34] = True
    study = TrainingStudy(image=np.zeros((16, 64, 64), np.float16), labels=labels,
                          nodule_centres=np.array([[8, 32, 32]]), lung_voxels=np.array([[2, 2, 2]]))
    rng = np.random.default_rng(0)
    image, target = sample_patch(study, rng, (16, 32, 32), positive=True)
    assert image.shape == target.shape == (1, 16, 32, 32) and target.sum() > 0
    small = TrainingStudy(image=np.zeros((8, 20, 20), np.float16), labels=np.zeros((8, 20, 20), bool),
                          nodule_centres=np.zeros((0, 3), int), lung_voxels=np.array([[1, 1, 1]]))
    assert sample_patch(small, rng, (16, 32, 32), positive=True)[0].shape == (1, 16, 32, 32)  # padded with air


def test_losses_prefer_the_right_answer() -> None:
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., 1:3, 1:3, 1:3] = 1
    good, bad = (target * 20 - 10), -(target * 20 - 10)
    assert segmentation_loss(good, target) < segmentation_loss(bad, target)
    assert distillation_loss(good, target, target, 0.5) < distillation_loss(bad, target, target, 0.5)


def test_hard_patches_centre_on_hard_voxels_and_augment_keeps_image_and_labels_aligned() -> None:
    labels = np.zeros((16, 64, 64), dtype=bool)
    image = np.zeros((16, 64, 64), np.float16)
    image[8, 10, 50] = 1.0  # the one hard voxel, far from the lung sample
    study = TrainingStudy(image=image, labels=labels, nodule_centres=np.zeros((0, 3), int),
                          lung_voxels=np.array([[8, 60, 2]]), hard_voxels=np.array([[8, 10, 50]]))
    rng = np.random.default_rng(1)
    for _ in range(5):
        patch, _ = sample_patch(study, rng, (8, 32, 32), kind="hard")
        assert patch.max() == 1.0
    marked = np.zeros((1, 8, 32, 32), np.float32)
    marked[0, 2, 5, 9] = 1.0
    for _ in range(10):
        augmented, target = augment(marked.copy(), marked.copy(), rng, extra_noise_hu=0.0)
        assert augmented.shape == target.shape == marked.shape and np.array_equal(augmented, target)


def test_patch_bank_is_cached_and_reloaded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = load_training_studies("train", 1, (16, 64, 64), rng, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = load_training_studies("train", 1, (16, 64, 64), rng, tmp_path)
    assert np.array_equal(first[0].image, again[0].image) and np.array_equal(first[0].hard_voxels, again[0].hard_voxels)
