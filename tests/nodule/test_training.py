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
    distillation_loss,
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
