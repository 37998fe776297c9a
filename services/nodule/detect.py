"""Nodule detection of one assembled CT series, through the shared model runtime.

:func:`detect_series` normalises the HU volume, runs the loaded nodule network over it with the
runtime's :class:`~model_runtime.SlidingWindowInferer` (patches of every study in
flight share the model's batches; progress per patch) and turns the stitched probability map into
:class:`~services.nodule.findings.SeriesFindings` with :func:`extract_nodules`.

No resampling: the network runs on the series' own voxels (it was trained on slices of 1-2.5 mm and
pixels of 0.6-0.9 mm); every measurement below uses the series' spacing, so sizes are millimetres
whatever the grid. A series outside that range is still analysed, with a note in the findings.

Post-processing (:func:`extract_nodules`), all in voxel space, then mapped to patient LPS:

- candidates: 26-connected components of ``probability >= candidate_threshold``; confidence is the
  component's maximum probability (its mean is kept in the logs only);
- a component whose long axis is under :data:`MIN_LONG_AXIS_MM` (3 mm, the smallest nodule
  Lung-RADS counts) is dropped;
- centre: the probability-weighted centroid of the component's voxels, in LPS through
  ``SeriesVolume.voxel_to_lps`` (weighting keeps a nodule's centre on it when a faint tail along
  an abutting vessel joins its component);
- long / short axis: on the axial slice where the component is largest, the maximum Feret diameter
  and the caliper width perpendicular to it (90 directions, 2 degree steps), as Lung-RADS measures;
- volume: voxel count x voxel volume; mean HU over the component;
- type from attenuation: the component's interior (eroded by one voxel in plane; the whole component
  when nothing is left) is scored by its share of voxels >= :data:`SOLID_HU_MIN` (-300 HU, above
  ground glass: -750..-300 HU, below solid soft tissue): at least ``solid_share_min`` is solid, under
  ``ground_glass_share_max`` is ground glass, in between part-solid. The solid component of a
  part-solid nodule is the largest connected part >= -300 HU, sized as the mean of its axes.
  The two shares ship in the model's ``config.json``, chosen on the validation split.

The thresholds come from the model's artifact (:class:`~services.nodule.model.DetectorSettings`),
registered with :func:`load_detector`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from model_runtime import ModelRuntime, ProgressCallback, SlidingWindowInferer, get_runtime
from services.nodule.classifier import TwoStageArtifactConfig, TwoStageSettings, classifier_model_spec, is_two_stage
from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.model import (
    STUDENT_NAME,
    DetectorSettings,
    NoduleArtifactConfig,
    default_artifact_dir,
    nodule_model_spec,
    normalise_hu,
)
from services.nodule.schemas import NoduleType
from services.nodule.two_stage import detect_two_stage
from services.nodule.volume import SeriesVolume

logger = logging.getLogger("tessera.nodule.detect")

MIN_LONG_AXIS_MM = 3.0
"""Components with a shorter long axis are not reported (Lung-RADS counts nodules from 3 mm)."""
SOLID_HU_MIN = -300.0
"""Voxels at or above this attenuation count as solid; ground glass lies at about -750..-300 HU."""
MIN_SLICES = 8
"""Fewer slices than this are refused: a 3 mm nodule needs several slices to be told from a vessel."""
MIN_AXIAL_COSINE = 0.9
"""The slice normal must be this close to the patient's z axis (an axial series)."""
TRAINED_SLICE_SPACING_MM = (1.0, 2.5)
TRAINED_PIXEL_SPACING_MM = (0.6, 0.9)
_FERET_ANGLES = np.linspace(0.0, np.pi, 90, endpoint=False)
_FERET_DIRECTIONS = np.stack([np.cos(_FERET_ANGLES), np.sin(_FERET_ANGLES)])


class DetectionRefused(ValueError):
    """The series cannot be analysed by this detector; ``reason`` says why (per series, not fatal)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- registering the detector with a runtime --------------------------------------------------------
_SETTINGS: dict[tuple[int, str, str], DetectorSettings] = {}
_TWO_STAGE: dict[tuple[int, str, str], TwoStageSettings] = {}
"""Models served as v3 two-stage detectors (a crop classifier), with their settings."""
_INFERERS: dict[tuple[int, str, DetectorSettings], SlidingWindowInferer] = {}


def register_settings(runtime: ModelRuntime, model_name: str, settings: DetectorSettings) -> None:
    """Remember the post-processing settings of the version of ``model_name`` now served by ``runtime``."""
    _SETTINGS[(id(runtime), model_name, runtime.version(model_name))] = settings


def register_two_stage(runtime: ModelRuntime, model_name: str, settings: TwoStageSettings) -> None:
    """Remember that the served version of ``model_name`` is a v3 two-stage detector with these settings."""
    _TWO_STAGE[(id(runtime), model_name, runtime.version(model_name))] = settings


def two_stage_settings_for(runtime: ModelRuntime, model_name: str) -> TwoStageSettings | None:
    """The two-stage settings of the served version of ``model_name``; ``None`` for a dense network."""
    return _TWO_STAGE.get((id(runtime), model_name, runtime.version(model_name)))


def settings_for(runtime: ModelRuntime, model_name: str) -> DetectorSettings:
    """The settings registered for the served version of ``model_name`` (defaults when none were)."""
    return _SETTINGS.get((id(runtime), model_name, runtime.version(model_name)), DetectorSettings())


async def load_detector(runtime: ModelRuntime | None = None, *, role: str = "student", model_name: str | None = None,
                        artifact_dir: str | None = None, device: str | None = None
                        ) -> DetectorSettings | TwoStageSettings:
    """Load a shipped nodule network into the runtime and register its post-processing settings.

    A v3 artifact (``"kind": "two_stage"`` in its ``config.json``) is a crop classifier: it is
    served with :func:`~services.nodule.classifier.classifier_model_spec` and
    :func:`detect_series` then runs the two-stage detector (:mod:`services.nodule.two_stage`);
    v1/v2 artifacts are dense networks run through the sliding window.

    Parameters
    ----------
    runtime : ModelRuntime, optional
        Default: the process-wide runtime.
    role : {"student", "teacher"}
        Which network (the student is the one served by default).
    model_name : str, optional
        Runtime name; default ``nodule-<role>``.
    artifact_dir : str, optional
        A sealed artifact; default the newest under ``<models_dir>/nodule/<role>/``.
    device : str, optional
        Overrides ``settings.device``.

    Returns
    -------
    DetectorSettings or TwoStageSettings
        The thresholds shipped with the artifact.
    """
    from pathlib import Path

    runtime = runtime or get_runtime()
    directory = Path(artifact_dir) if artifact_dir else default_artifact_dir(role)
    name = model_name or f"nodule-{role}"
    if is_two_stage(directory):
        two_stage = TwoStageArtifactConfig.read(directory)
        await runtime.load(classifier_model_spec(name, artifact_dir=directory, device=device))
        register_two_stage(runtime, name, two_stage.detector)
        return two_stage.detector
    config = NoduleArtifactConfig.read(directory)
    await runtime.load(nodule_model_spec(name, artifact_dir=directory, roi_size=config.detector.roi_size,
                                         device=device))
    register_settings(runtime, name, config.detector)
    return config.detector


def _inferer(runtime: ModelRuntime, model_name: str, settings: DetectorSettings) -> SlidingWindowInferer:
    key = (id(runtime), model_name, settings)
    if key not in _INFERERS:
        _INFERERS[key] = SlidingWindowInferer(runtime, model_name, settings.window(),
                                              patches_per_study=4, max_patches_in_flight=32)
    return _INFERERS[key]


# -- the detector ---------------------------------------------------------------------------------
async def detect_series(volume: SeriesVolume, *, runtime: ModelRuntime | None = None,
                        model_name: str = STUDENT_NAME, settings: DetectorSettings | None = None,
                        min_confidence: float | None = None, on_progress: ProgressCallback | None = None,
                        timeout_s: float | None = None) -> SeriesFindings:
    """Detect and measure the nodules of one series.

    Parameters
    ----------
    volume : SeriesVolume
        An assembled axial CT series.
    runtime : ModelRuntime, optional
        Where ``model_name`` is loaded (default: the process-wide runtime).
    model_name : str
        The loaded nodule network (``nodule-student`` by default).
    settings : DetectorSettings, optional
        Thresholds of a dense network; default: those registered with the served version
        (:func:`load_detector`). A model registered as a v3 two-stage detector runs
        :func:`~services.nodule.two_stage.detect_two_stage` with its own settings.
    min_confidence : float, optional
        Report candidates from this confidence; default ``settings.report_threshold`` (0 gives
        every candidate, as the FROC evaluation needs).
    on_progress : callable, optional
        ``(patches_done, patches_total)`` as the sliding window advances.
    timeout_s : float, optional
        Deadline for the network pass.

    Returns
    -------
    SeriesFindings
        Nodules sorted by confidence, their label volume and the served model version.

    Raises
    ------
    DetectionRefused
        Too few slices or not an axial series.
    """
    runtime = runtime or get_runtime()
    check_volume(volume)
    version = runtime.version(model_name)
    two_stage = two_stage_settings_for(runtime, model_name)
    if two_stage is not None and settings is None:
        threshold = two_stage.report_threshold if min_confidence is None else min_confidence
        found, labels = await detect_two_stage(volume.hu, volume.spacing_mm, volume.voxel_to_lps, runtime=runtime,
                                               model_name=model_name, settings=two_stage, min_confidence=threshold,
                                               on_progress=on_progress, timeout_s=timeout_s)
        return SeriesFindings(series_instance_uid=volume.series_instance_uid,
                              study_instance_uid=volume.study_instance_uid, nodules=tuple(found), labels=labels,
                              model_version=f"{model_name} {version}", notes=spacing_notes(volume))
    settings = settings or settings_for(runtime, model_name)
    probability = await probability_map(volume.hu, runtime=runtime, model_name=model_name, settings=settings,
                                        on_progress=on_progress, timeout_s=timeout_s)
    threshold = settings.report_threshold if min_confidence is None else min_confidence
    nodules, labels = await asyncio.to_thread(
        extract_nodules, probability, volume.hu, volume.spacing_mm, volume.voxel_to_lps, settings,
        min_confidence=threshold)
    return SeriesFindings(series_instance_uid=volume.series_instance_uid,
                          study_instance_uid=volume.study_instance_uid, nodules=tuple(nodules), labels=labels,
                          model_version=f"{model_name} {version}", notes=spacing_notes(volume))


async def probability_map(hu: np.ndarray, *, runtime: ModelRuntime, model_name: str = STUDENT_NAME,
                          settings: DetectorSettings | None = None, on_progress: ProgressCallback | None = None,
                          timeout_s: float | None = None) -> np.ndarray:
    """The network's stitched nodule probability over a ``(slice, row, column)`` HU volume (same shape).

    Normalisation in a thread, then the sliding window through ``runtime`` (no post-processing).
    """
    settings = settings or settings_for(runtime, model_name)
    inputs = await asyncio.to_thread(_network_input, hu)
    probability = await _inferer(runtime, model_name, settings).infer(inputs, on_progress=on_progress,
                                                                      timeout_s=timeout_s)
    assert isinstance(probability, torch.Tensor)
    return probability[0].numpy()


def check_volume(volume: SeriesVolume) -> None:
    """Raise :class:`DetectionRefused` for a series this detector cannot analyse."""
    slices = volume.shape[0]
    if slices < MIN_SLICES:
        raise DetectionRefused(f"{slices} slice(s): the nodule detector needs at least {MIN_SLICES} contiguous "
                               "slices to tell a nodule from a vessel")
    normal = np.asarray(volume.direction, dtype=float)[:, 2]
    if abs(normal[2]) < MIN_AXIAL_COSINE:
        raise DetectionRefused(f"slice normal {np.round(normal, 3).tolist()} is not axial: the detector was "
                               "trained on axial series only")


def spacing_notes(volume: SeriesVolume) -> tuple[str, ...]:
    """Notes for a series whose spacing lies outside what the network was trained on."""
    slice_mm, row_mm, column_mm = volume.spacing_mm
    notes = []
    low, high = TRAINED_SLICE_SPACING_MM
    if not low * 0.8 <= slice_mm <= high * 1.2:
        notes.append(f"slice spacing {slice_mm:.2f} mm is outside the trained range {low}-{high} mm: "
                     "sensitivity may be lower")
    low, high = TRAINED_PIXEL_SPACING_MM
    if not low * 0.8 <= min(row_mm, column_mm) <= max(row_mm, column_mm) <= high * 1.2:
        notes.append(f"pixel spacing {row_mm:.3f} x {column_mm:.3f} mm is outside the trained range {low}-{high} mm")
    return tuple(notes)


def _network_input(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(normalise_hu(hu)[None])


# -- post-processing (pure, numpy) ----------------------------------------------------------------
@dataclass(frozen=True)
class _Component:
    index: int
    window: tuple[slice, slice, slice]
    mask: np.ndarray  # within window
    confidence: float
    weights: np.ndarray  # probability of the mask's voxels, in np.argwhere(mask) order


def extract_nodules(probability: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float, float],
                    voxel_to_lps: Callable[[np.ndarray], np.ndarray], settings: DetectorSettings,
                    *, min_confidence: float = 0.0) -> tuple[list[DetectedNodule], np.ndarray]:
    """Nodules from a probability map: components, measurements, type, confidence; and their labels.

    Parameters
    ----------
    probability : numpy.ndarray
        ``(slice, row, column)`` nodule probability in [0, 1].
    hu : numpy.ndarray
        The series' HU volume, same shape.
    spacing_mm : tuple of float
        ``(slice, row, column)`` spacing.
    voxel_to_lps : callable
        ``(3,)`` voxel index to ``(3,)`` LPS mm (``SeriesVolume.voxel_to_lps``).
    settings : DetectorSettings
        Candidate threshold and type thresholds.
    min_confidence : float
        Keep nodules whose confidence is at least this.

    Returns
    -------
    nodules : list of DetectedNodule
        Sorted by confidence (highest first), labelled 1..n in that order.
    labels : numpy.ndarray
        ``uint16`` volume of the same shape with each kept nodule's label.
    """
    if probability.shape != hu.shape:
        raise ValueError(f"probability {probability.shape} and HU {hu.shape} differ in shape")
    components = _components(probability, settings.candidate_threshold)
    measured = []
    for component in components:
        if component.confidence < min_confidence:
            continue
        nodule = _measure(component, hu, spacing_mm, voxel_to_lps, settings)
        if nodule is not None:
            measured.append((component, nodule))
    measured.sort(key=lambda pair: -pair[1].confidence)
    labels = np.zeros(hu.shape, dtype=np.uint16)
    nodules = []
    for label, (component, nodule) in enumerate(measured, start=1):
        labels[component.window][component.mask] = label
        nodules.append(_relabelled(nodule, label))
    return nodules, labels


def _components(probability: np.ndarray, threshold: float) -> list[_Component]:
    candidates = probability >= threshold
    labelled, count = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    peaks = ndimage.maximum(probability, labelled, index=np.arange(1, count + 1))
    found = []
    for index, window in enumerate(ndimage.find_objects(labelled), start=1):
        if window is None:
            continue
        mask = labelled[window] == index
        found.append(_Component(index, window, mask, float(peaks[index - 1]),  # type: ignore[arg-type]
                                probability[window][mask]))
    return found


def _measure(component: _Component, hu: np.ndarray, spacing_mm: tuple[float, float, float],
             voxel_to_lps: Callable[[np.ndarray], np.ndarray], settings: DetectorSettings) -> DetectedNodule | None:
    mask = component.mask
    long_axis, short_axis = feret_axes(mask, spacing_mm)
    if long_axis < MIN_LONG_AXIS_MM:
        return None
    values = hu[component.window][mask]
    offsets = np.array([window.start for window in component.window], dtype=float)
    centre_voxel = np.average(np.argwhere(mask), axis=0, weights=component.weights) + offsets
    nodule_type, solid_mm = classify_attenuation(mask, hu[component.window], spacing_mm, settings)
    voxel_mm3 = float(np.prod(spacing_mm))
    lps = np.asarray(voxel_to_lps(centre_voxel), dtype=float)
    return DetectedNodule(
        label=0, centre_voxel=tuple(round(float(v), 2) for v in centre_voxel),  # type: ignore[arg-type]
        centre_lps_mm=tuple(round(float(v), 2) for v in lps),  # type: ignore[arg-type]
        long_axis_mm=round(long_axis, 2), short_axis_mm=round(short_axis, 2),
        volume_mm3=round(float(mask.sum()) * voxel_mm3, 1), mean_hu=round(float(values.mean()), 1),
        nodule_type=nodule_type, confidence=round(component.confidence, 4), solid_component_mm=solid_mm)


def _relabelled(nodule: DetectedNodule, label: int) -> DetectedNodule:
    from dataclasses import replace

    return replace(nodule, label=label)


def feret_axes(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[float, float]:
    """Long axis and perpendicular short axis (mm) on the axial slice where ``mask`` is largest.

    The long axis is the maximum Feret diameter (extent of the voxel centres along 90 directions,
    plus one pixel); the short axis is the extent perpendicular to it. 0, 0 for an empty mask.
    """
    if not mask.any():
        return 0.0, 0.0
    largest = mask[int(np.argmax(mask.sum(axis=(1, 2))))]
    rows, columns = np.nonzero(largest)
    points = np.stack([rows * spacing_mm[1], columns * spacing_mm[2]], axis=1)
    projected = points @ _FERET_DIRECTIONS
    extent = projected.max(axis=0) - projected.min(axis=0) + (spacing_mm[1] + spacing_mm[2]) / 2
    longest = int(np.argmax(extent))
    return float(extent[longest]), float(extent[(longest + len(_FERET_ANGLES) // 2) % len(_FERET_ANGLES)])


def solid_share(mask: np.ndarray, hu: np.ndarray) -> float:
    """Share of the nodule's interior (eroded one voxel in plane, or all of it) at >= :data:`SOLID_HU_MIN`."""
    interior = ndimage.binary_erosion(mask, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool))
    if not interior.any():
        interior = mask
    return float((hu[interior] >= SOLID_HU_MIN).mean())


def classify_attenuation(mask: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float, float],
                         settings: DetectorSettings) -> tuple[NoduleType, float | None]:
    """Solid / part-solid / ground-glass from the interior's solid share; the solid core (mm) if part-solid.

    Parameters
    ----------
    mask, hu : numpy.ndarray
        The nodule's voxels and the HU around it, same shape.
    """
    share = solid_share(mask, hu)
    if share >= settings.solid_share_min:
        return NoduleType.SOLID, None
    if share < settings.ground_glass_share_max:
        return NoduleType.GROUND_GLASS, None
    return NoduleType.PART_SOLID, solid_core_mm(mask, hu, spacing_mm)


def solid_core_mm(mask: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Mean axial diameter (mm) of the largest connected part of the nodule at >= :data:`SOLID_HU_MIN`."""
    solid = mask & (hu >= SOLID_HU_MIN)
    labelled, count = ndimage.label(solid, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return 0.0
    sizes = np.bincount(labelled.ravel())[1:]
    core = labelled == int(np.argmax(sizes)) + 1
    return round(sum(feret_axes(core, spacing_mm)) / 2, 2)


def sphere_diameter_mm(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere of this volume."""
    return (6 * volume_mm3 / math.pi) ** (1 / 3)
