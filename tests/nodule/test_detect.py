"""Nodule post-processing on probability maps with known components, and detect_series through the runtime."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from model_runtime.runtime import ModelRuntime
from services.nodule.detect import (
    DetectionRefused,
    check_volume,
    detect_series,
    extract_nodules,
    feret_axes,
    register_settings,
)
from services.nodule.model import DetectorSettings, nodule_model_spec
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume

SPACING = (1.5, 0.7, 0.7)
LUNG_HU = -850.0


def _volume(hu: np.ndarray, direction: np.ndarray | None = None, spacing: tuple[float, float, float] = SPACING,
            origin: tuple[float, float, float] = (-100.0, -80.0, 200.0)) -> SeriesVolume:
    return SeriesVolume(series_instance_uid="1.2.3", study_instance_uid="1.2", frame_of_reference_uid=None,
                        hu=hu.astype(np.float32), spacing_mm=spacing, origin_lps=origin,
                        direction=np.eye(3) if direction is None else direction, sop_instance_uids=(),
                        source_paths=(), convolution_kernel=None, slice_thickness_mm=spacing[0])


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius_mm: float,
          spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing, strict=True)],
                        indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2  # type: ignore[no-any-return]


class TestExtractNodules:
    shape = (32, 96, 96)

    def _scene(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        hu = np.full(self.shape, LUNG_HU, dtype=np.float32)
        probability = np.zeros(self.shape, dtype=np.float32)
        balls = {
            "solid": _ball(self.shape, (10, 25, 25), 5.0),
            "ground_glass": _ball(self.shape, (20, 70, 30), 6.0),
            "part_solid": _ball(self.shape, (16, 30, 70), 7.0),
            "tiny": _ball(self.shape, (25, 75, 75), 0.9),
        }
        hu[balls["solid"]] = 30.0
        hu[balls["ground_glass"]] = -550.0
        hu[balls["part_solid"]] = -550.0
        hu[_ball(self.shape, (16, 30, 70), 4.0)] = 20.0
        hu[balls["tiny"]] = 30.0
        for peak, name in zip((0.95, 0.8, 0.9, 0.99), balls, strict=True):
            probability[balls[name]] = peak
        return probability, hu, balls

    def test_components_are_measured_typed_and_placed_in_lps(self) -> None:
        probability, hu, balls = self._scene()
        flipped = np.diag([-1.0, 1.0, 1.0])  # rows run to patient right: LPS must follow the direction
        volume = _volume(hu, direction=flipped)
        nodules, labels = extract_nodules(probability, hu, volume.spacing_mm, volume.voxel_to_lps, DetectorSettings())
        assert [n.confidence for n in nodules] == pytest.approx([0.95, 0.9, 0.8])  # the tiny one is dropped
        solid, part_solid, ground_glass = nodules
        assert (solid.nodule_type, part_solid.nodule_type, ground_glass.nodule_type) == (
            NoduleType.SOLID, NoduleType.PART_SOLID, NoduleType.GROUND_GLASS)
        assert solid.label == 1 and set(np.unique(labels)) == {0, 1, 2, 3}
        assert np.array_equal(labels == 1, balls["solid"])
        assert solid.centre_voxel == pytest.approx((10, 25, 25), abs=0.05)
        expected_lps = volume.origin_lps + np.array([-25 * 0.7, 25 * 0.7, 10 * 1.5])
        assert solid.centre_lps_mm == pytest.approx(tuple(expected_lps), abs=0.05)
        for nodule, radius in ((solid, 5.0), (ground_glass, 6.0), (part_solid, 7.0)):
            assert nodule.long_axis_mm == pytest.approx(2 * radius, abs=1.0)
            assert nodule.short_axis_mm == pytest.approx(2 * radius, abs=1.0)
            assert nodule.volume_mm3 == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.15)
        assert solid.mean_hu == pytest.approx(30.0)
        assert part_solid.solid_component_mm == pytest.approx(8.0, abs=1.0)
        assert solid.solid_component_mm is None

    def test_min_confidence_and_candidate_threshold(self) -> None:
        probability, hu, _ = self._scene()
        volume = _volume(hu)
        kept, labels = extract_nodules(probability, hu, SPACING, volume.voxel_to_lps, DetectorSettings(),
                                       min_confidence=0.85)
        assert [n.confidence for n in kept] == pytest.approx([0.95, 0.9]) and labels.max() == 2
        high = DetectorSettings(candidate_threshold=0.92)
        assert len(extract_nodules(probability, hu, SPACING, volume.voxel_to_lps, high)[0]) == 1

    def test_feret_axes_of_an_ellipse(self) -> None:
        mask = np.zeros((1, 64, 64), dtype=bool)
        rows, cols = np.mgrid[:64, :64]
        mask[0] = ((rows - 32) / 20) ** 2 + ((cols - 32) / 8) ** 2 <= 1
        long_axis, short_axis = feret_axes(mask, (1.0, 0.5, 0.5))
        assert long_axis == pytest.approx(20.5, abs=0.6) and short_axis == pytest.approx(8.5, abs=0.6)


class _BrightSpots(nn.Module):
    """A hand-set 'network': nodule logits wherever the normalised input is soft-tissue bright."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (volume - 0.55) * 60.0


def test_detect_series_finds_a_planted_sphere_through_the_runtime() -> None:
    shape = (24, 96, 96)
    hu = np.full(shape, LUNG_HU, dtype=np.float32)
    hu[_ball(shape, (12, 40, 60), 4.0)] = 40.0
    volume = _volume(hu)
    net = _BrightSpots()
    progress: list[tuple[int, int]] = []

    async def scenario() -> tuple[Any, dict[str, dict[str, Any]]]:
        runtime = ModelRuntime()
        try:
            await runtime.load(nodule_model_spec("nodule-test", net=net, roi_size=(16, 64, 64), device="cpu",  # type: ignore[arg-type]
                                                 warm_up=False))
            settings = DetectorSettings(roi_size=(16, 64, 64), overlap=0.25, report_threshold=0.5)
            register_settings(runtime, "nodule-test", settings)
            findings = await detect_series(volume, runtime=runtime, model_name="nodule-test",
                                           on_progress=lambda done, total: progress.append((done, total)))
            return findings, runtime.stats()
        finally:
            await runtime.close()

    findings, stats = asyncio.run(scenario())
    assert stats["nodule-test"]["samples"] > 0 and net.calls > 0  # patches went through the runtime's batcher
    assert progress[-1][0] == progress[-1][1] > 1
    (nodule,) = findings.nodules
    assert nodule.centre_lps_mm == pytest.approx(tuple(volume.voxel_to_lps((12, 40, 60))), abs=0.5)
    assert nodule.long_axis_mm == pytest.approx(8.0, abs=1.0) and nodule.nodule_type == NoduleType.SOLID
    assert findings.labels.shape == shape and findings.model_version == "nodule-test in-code"


def test_too_few_slices_or_not_axial_is_refused() -> None:
    with pytest.raises(DetectionRefused, match="slice"):
        check_volume(_volume(np.zeros((3, 64, 64))))
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(DetectionRefused, match="not axial"):
        check_volume(_volume(np.zeros((16, 64, 64)), direction=sagittal))
