"""The v3 nodule detector: blob candidates (stage 1), a crop classifier through the runtime (stage 2), then
a region grow in HU that measures every accepted nodule.

:func:`detect_two_stage` is what :func:`services.nodule.detect.detect_series` runs for a model whose
artifact says ``"kind": "two_stage"``:

1. :func:`~services.nodule.candidates.scan_candidates` (in a thread): up to ``max_candidates`` blob
   candidates on a 1 mm isotropic grid, no network;
2. one ``32^3`` crop per candidate (:func:`~services.nodule.classifier.extract_crops`; with its
   hand-crafted features when the artifact blends them), each sent with ``runtime.predict`` to the
   classifier, whose batcher stacks the crops of every candidate of every study in flight into shared
   batches; its answer is the candidate's confidence;
3. (in a thread) candidates from ``min_confidence`` up are segmented and measured, best first, a
   candidate whose centre falls in an already segmented nodule being the same nodule.

Segmentation (:func:`segment_candidate`), in the series' own voxels: inside a ball of
``1.3 x`` the candidate's radius + 2 mm around its centre, the HU volume (lightly smoothed) is
thresholded halfway between the lung background (:data:`LUNG_BACKGROUND_HU`) and the nodule's peak
attenuation near the centre (clipped to -720..-350 HU, so ground glass stays in and a solid nodule
is cut at its half-maximum edge, as the simulator's labels are), and the 26-connected component
holding the peak is kept; the ball stops vessels and the chest wall from running off with it. The
reported centre is the centroid of the component's core (voxels at least half the largest depth
inside it: a vessel or wall the component touches hardly moves it), unless that lies further than
``centre_shift_limit`` candidate radii from the stage-1 peak (v12 artifacts: 1): then the component is mostly
something else (a small nodule on a vessel or the pleura) and the peak is reported instead. Measurements are the dense
detector's (:mod:`services.nodule.detect`): long/short axis on the largest axial section, volume,
mean HU, and the type from the interior's solid share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from model_runtime import ModelRuntime, ProgressCallback
from services.nodule.candidates import BlobCandidate, CandidateScan, scan_candidates
from services.nodule.classifier import TwoStageSettings, crop_items, extract_crops
from services.nodule.findings import DetectedNodule
from services.nodule.model import DetectorSettings

LUNG_BACKGROUND_HU = -850.0
THRESHOLD_RANGE_HU = (-720.0, -350.0)


async def classify_candidates(scan: CandidateScan, *, runtime: ModelRuntime, model_name: str,
                              on_progress: ProgressCallback | None = None,
                              timeout_s: float | None = None, blended: bool = False) -> list[float]:
    """The classifier's probability for every candidate of ``scan`` (through ``runtime``, batched);
    ``blended``: the classifier also takes each candidate's hand-crafted features (computed here, in a thread)."""
    if not scan.candidates:
        if on_progress is not None:
            on_progress(1, 1)
        return []
    centres = np.array([c.grid_index for c in scan.candidates])
    crops = await asyncio.to_thread(lambda: crop_items(extract_crops(scan.iso, centres), blended))
    answers = await asyncio.gather(*(runtime.predict(model_name, crop, timeout_s=timeout_s) for crop in crops))
    if on_progress is not None:
        on_progress(len(crops), len(crops))
    return [float(np.asarray(answer).reshape(-1)[0]) for answer in answers]


def segment_candidate(hu: np.ndarray, spacing_mm: tuple[float, float, float], centre_voxel: Sequence[float],
                      radius_mm: float) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Region grow around one candidate (see the module docstring).

    Returns
    -------
    window : tuple of slice
        Where the mask lies in ``hu``.
    mask : numpy.ndarray
        The nodule's voxels within ``window`` (never empty: a ball of 0.8 x the radius when the
        grow finds nothing).
    centre : numpy.ndarray
        ``(3,)`` voxel index of the core's centroid.
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    centre = np.asarray(centre_voxel, dtype=float)
    reach_mm = 1.3 * radius_mm + 2.0
    half = np.ceil(reach_mm / spacing).astype(int) + 1
    low = np.maximum(np.floor(centre).astype(int) - half, 0)
    high = np.minimum(np.floor(centre).astype(int) + half + 1, np.asarray(hu.shape))
    window = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    sub = ndimage.gaussian_filter(hu[window].astype(np.float32), 0.6 / spacing)
    local = centre - low
    grids = np.ogrid[tuple(slice(0, n) for n in sub.shape)]
    distance_mm = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, local, spacing, strict=True)))
    ball = distance_mm <= reach_mm
    near = distance_mm <= max(1.0, 0.5 * radius_mm)
    peak_index = np.unravel_index(int(np.argmax(np.where(near, sub, -np.inf))), sub.shape)
    peak = float(sub[peak_index])
    threshold = float(np.clip((peak + LUNG_BACKGROUND_HU) / 2, *THRESHOLD_RANGE_HU))
    foreground = (sub >= threshold) & ball
    labelled, _ = ndimage.label(foreground, structure=np.ones((3, 3, 3), dtype=bool))
    mask = labelled == labelled[peak_index] if labelled[peak_index] else np.zeros(sub.shape, dtype=bool)
    if not mask.any():
        mask = distance_mm <= max(0.8 * radius_mm, float(spacing.max()))
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = depth >= 0.5 * depth.max()
    centroid = np.argwhere(core).mean(axis=0) + low
    return window, mask, centroid  # type: ignore[return-value]


def reported_centre(centroid: np.ndarray, candidate: BlobCandidate, spacing_mm: tuple[float, float, float],
                    shift_limit: float) -> np.ndarray:
    """The segmentation's ``centroid`` (voxels), or ``candidate``'s stage-1 peak when the centroid lies further
    than ``shift_limit`` x the candidate's radius from it (``shift_limit`` 0: the centroid always)."""
    peak = np.asarray(candidate.centre_voxel, dtype=float)
    shift_mm = float(np.linalg.norm((np.asarray(centroid, dtype=float) - peak) * np.asarray(spacing_mm)))
    if shift_limit > 0 and shift_mm > shift_limit * candidate.radius_mm:
        return peak
    return np.asarray(centroid, dtype=float)


def measure_candidates(candidates: Sequence[BlobCandidate], confidences: Sequence[float], hu: np.ndarray,
                       spacing_mm: tuple[float, float, float], voxel_to_lps: Callable[[np.ndarray], np.ndarray],
                       settings: TwoStageSettings, *, min_confidence: float = 0.0
                       ) -> tuple[list[DetectedNodule], np.ndarray]:
    """Segment and measure the candidates from ``min_confidence`` up, best first; their label volume.

    A candidate whose refined centre falls inside an already kept nodule is that nodule (dropped).
    """
    from services.nodule.detect import classify_attenuation, feret_axes

    typing = DetectorSettings(solid_share_min=settings.solid_share_min,
                              ground_glass_share_max=settings.ground_glass_share_max)
    labels = np.zeros(hu.shape, dtype=np.uint16)
    nodules: list[DetectedNodule] = []
    voxel_mm3 = float(np.prod(spacing_mm))
    for index in np.argsort(-np.asarray(confidences, dtype=float), kind="stable"):
        confidence = float(confidences[index])
        if confidence < min_confidence:
            break
        candidate = candidates[index]
        window, mask, centre = segment_candidate(hu, spacing_mm, candidate.centre_voxel, candidate.radius_mm)
        centre = reported_centre(centre, candidate, spacing_mm, settings.centre_shift_limit)
        at = tuple(int(round(v)) for v in np.clip(centre, 0, np.asarray(hu.shape) - 1))
        if labels[at]:
            continue
        region = labels[window]
        mask = mask & (region == 0)
        if not mask.any():
            continue
        label = len(nodules) + 1
        region[mask] = label
        long_axis, short_axis = feret_axes(mask, spacing_mm)
        nodule_type, solid_mm = classify_attenuation(mask, hu[window], spacing_mm, typing)
        lps = np.asarray(voxel_to_lps(centre), dtype=float)
        nodules.append(DetectedNodule(
            label=label, centre_voxel=tuple(round(float(v), 2) for v in centre),  # type: ignore[arg-type]
            centre_lps_mm=tuple(round(float(v), 2) for v in lps),  # type: ignore[arg-type]
            long_axis_mm=round(long_axis, 2), short_axis_mm=round(short_axis, 2),
            volume_mm3=round(float(mask.sum()) * voxel_mm3, 1), mean_hu=round(float(hu[window][mask].mean()), 1),
            nodule_type=nodule_type, confidence=round(confidence, 4), solid_component_mm=solid_mm))
    return nodules, labels


async def detect_two_stage(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                           voxel_to_lps: Callable[[np.ndarray], np.ndarray], *, runtime: ModelRuntime,
                           model_name: str, settings: TwoStageSettings, min_confidence: float,
                           on_progress: ProgressCallback | None = None,
                           timeout_s: float | None = None) -> tuple[list[DetectedNodule], np.ndarray]:
    """Candidates, classification through ``runtime``, segmentation and measurements of one volume."""
    scan = await asyncio.to_thread(scan_candidates, hu, spacing_mm, max_candidates=settings.max_candidates,
                                   faint_candidates=settings.faint_candidates)
    confidences = await classify_candidates(scan, runtime=runtime, model_name=model_name, on_progress=on_progress,
                                            timeout_s=timeout_s, blended=settings.blended)
    return await asyncio.to_thread(measure_candidates, scan.candidates, confidences, hu, spacing_mm, voxel_to_lps,
                                   settings, min_confidence=min_confidence)
