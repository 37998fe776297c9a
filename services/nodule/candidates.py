"""Stage 1 of the v3 nodule detector: blob candidates with high recall, a few dozen per scan.

:func:`generate_candidates` finds nodule-like blobs in a CT volume (HU) without any network, as the
candidate stage of LUNA16-style CAD systems does; stage 2 (:mod:`services.nodule.classifier`)
rejects the false positives. Filtering is :mod:`scipy.ndimage`; the resampling is torch's trilinear
interpolation (a tensor operation on the CPU, no model):

1. **Lung region** (:func:`lung_region`), on a grid of about 2 mm: air (< -400 HU) not connected to
   the volume's in-plane border (outside the body), holes filled slice by slice (vessels, nodules)
   and a closing plus a dilation of :data:`LUNG_MARGIN_MM`; a peak is kept when it lies within
   that margin plus 0.8 x its radius of the region, so the centre of a large juxta-pleural nodule,
   in the notch it digs into the air, stays in.
2. **Scale space**: the volume (HU clipped to ``[-1000, 200]``, so bone does not dominate) is
   resampled to :data:`GRID_MM` isotropic and smoothed with Gaussians of :data:`SIGMAS_MM`, those
   from :data:`COARSE_FROM_MM` up on a grid twice as coarse (a pyramid); the scale-normalised
   difference of Gaussians ``(G(s_k) - G(s_k+1)) * s_k / (s_k+1 - s_k)`` approximates ``-s^2 LoG``
   (bright blobs positive), whose response peaks at ``s = r / sqrt(3)`` for a ball of radius ``r``.
3. **Maxima**, per pyramid level: voxels whose strongest response over the level's scales is the
   maximum of their 3x3x3 neighbourhood and above :data:`MIN_RESPONSE_HU`; the scale is the one
   that gave it (small blobs beside large structures survive on the fine level).
4. **Blobness**: at each maximum, the Hessian of the smoothed volume at its scale (finite
   differences) gives eigenvalues ``l1 <= l2 <= l3``; a ball has three similar negative ones, a
   vessel one near zero. Candidates are ranked by ``min(response, SCORE_CAP_HU) * (0.1 + blobness)``
   with ``blobness = clip(-l3 / |l1|, 0, 1)`` (the cap lets faint ground glass compete with dense
   vessels on shape); candidates closer than the smaller one's radius or :data:`MERGE_MM` are
   merged into the better one, and the top ``max_candidates`` are kept.
5. **Faint slots** (``faint_candidates``, v11 artifacts: 16 of 64): the last slots are filled by a second
   ranking capped at :data:`FAINT_SCORE_CAP_HU`, in which shape alone decides. Ground-glass nodules answer
   a few hundred HU above the lung, so in the first ranking the many dense vessel cross-sections and noise
   peaks at the finest scale outrank them: on 120 development studies (evaluation settings) the first
   ranking put 17 of 41 ground-glass nodules in the top 64, the mixed one (48 + 16) 29.

On the validation split (24 simulated studies, 48 nodules >= 3 mm), 64 candidates per scan put one
within the radius of 38 nodules (79 %). Per 64 x 256 x 256 volume on this shared 2-core box: 0.74 s
profiled, 1.15 s median in a side-by-side timing run at load 9-16.

Each :class:`BlobCandidate` carries its centre (voxel indices of the original volume), the radius
its scale implies, the response and the blobness; the classifier sees a crop around the centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

GRID_MM = 1.0
"""Isotropic grid (mm) of the scale space: the smallest counted nodule (3 mm) spans three voxels."""
SIGMAS_MM = (0.8, 1.2, 1.8, 2.7, 4.0, 6.0, 9.0)
"""Gaussian scales (mm): DoG levels between consecutive ones cover nodule radii of about 1.7-13 mm."""
HU_CLIP = (-1000.0, 200.0)
MIN_RESPONSE_HU = 20.0
"""DoG maxima weaker than this (HU, scale-normalised) are no candidate (lung texture, noise)."""
LUNG_HU = -400.0
LUNG_MARGIN_MM = 4.0
DEFAULT_MAX_CANDIDATES = 48
COARSE_FROM_MM = 2.7
"""Scales from this one run on a grid twice as coarse (a scale pyramid: 1/8 of the voxels)."""
SCORE_CAP_HU = 200.0
"""Responses are capped here in the ranking score, so faint ground glass competes with dense vessels on shape."""
FAINT_SCORE_CAP_HU = 60.0
"""The cap of the second ranking that fills a scan's faint-candidate slots (``faint_candidates``): at 60 HU a
ground-glass blob (a few hundred HU above the lung) ranks on its shape alone against vessels and noise."""
MERGE_MM = 2.5
"""Two candidates closer than this, or than the smaller one's radius, are one (the stronger is kept)."""


@dataclass(frozen=True)
class BlobCandidate:
    """One candidate: where, how big its scale says it is, how strong and how round.

    ``centre_voxel`` is ``(slice, row, column)`` in the original volume (float); ``radius_mm`` is
    ``sqrt(3)`` times the detecting scale; ``score`` is the ranking score.
    """

    centre_voxel: tuple[float, float, float]
    radius_mm: float
    response: float
    blobness: float
    score: float
    grid_index: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class CandidateScan:
    """Stage 1's output for one volume: the candidates and the isotropic grid they were found on.

    ``iso`` is the volume (HU clipped to :data:`HU_CLIP`) resampled to about ``grid_mm``; a
    candidate's ``grid_index`` indexes it (crops for stage 2 are cut from it).
    """

    candidates: list[BlobCandidate]
    iso: np.ndarray
    grid_mm: float


def _zoom_factors(spacing_mm: tuple[float, float, float], grid_mm: float) -> np.ndarray:
    return np.asarray(spacing_mm, dtype=float) / grid_mm


def lung_region(hu: np.ndarray, spacing_mm: tuple[float, float, float], margin_mm: float = LUNG_MARGIN_MM,
                coarse_mm: float = 2.0) -> np.ndarray:
    """Boolean lung region (with a margin) on the volume's own grid.

    Computed on a grid of about ``coarse_mm`` (strided, so cheap) and expanded back by repetition.
    """
    steps = tuple(max(1, int(round(coarse_mm / s))) for s in spacing_mm)
    coarse = hu[::steps[0], ::steps[1], ::steps[2]]
    air = coarse < LUNG_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labelled, count = ndimage.label(air, structure=in_plane)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    border = np.unique(np.concatenate([labelled[:, 0, :].ravel(), labelled[:, -1, :].ravel(),
                                       labelled[:, :, 0].ravel(), labelled[:, :, -1].ravel()]))
    outside = np.isin(labelled, border[border > 0])
    lungs = air & ~outside
    lungs = ndimage.binary_fill_holes(lungs, structure=in_plane)
    coarse_spacing = np.asarray(spacing_mm) * np.asarray(steps)
    radius = np.maximum(1, np.round(margin_mm / coarse_spacing)).astype(int)
    ball = _ellipsoid(radius)
    lungs = ndimage.binary_closing(lungs, structure=ball, border_value=0)
    lungs = ndimage.binary_dilation(lungs, structure=ball)
    full = lungs.repeat(steps[0], 0).repeat(steps[1], 1).repeat(steps[2], 2)
    return np.ascontiguousarray(full[:hu.shape[0], :hu.shape[1], :hu.shape[2]])


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-int(r), int(r) + 1) for r in radius)]
    return sum((g / max(int(r), 1)) ** 2 for g, r in zip(grids, radius, strict=True)) <= 1.0  # type: ignore[return-value]


def generate_candidates(hu: np.ndarray, spacing_mm: tuple[float, float, float], *,
                        max_candidates: int = DEFAULT_MAX_CANDIDATES, faint_candidates: int = 0,
                        lung: np.ndarray | None = None, grid_mm: float = GRID_MM) -> list[BlobCandidate]:
    """The candidates of :func:`scan_candidates` alone."""
    return scan_candidates(hu, spacing_mm, max_candidates=max_candidates, faint_candidates=faint_candidates,
                           lung=lung, grid_mm=grid_mm).candidates


def scan_candidates(hu: np.ndarray, spacing_mm: tuple[float, float, float], *,
                    max_candidates: int = DEFAULT_MAX_CANDIDATES, faint_candidates: int = 0,
                    lung: np.ndarray | None = None, grid_mm: float = GRID_MM) -> CandidateScan:
    """Blob candidates of a ``(slice, row, column)`` HU volume, best first (see the module docstring).

    Parameters
    ----------
    hu : numpy.ndarray
        The volume in HU.
    spacing_mm : tuple of float
        ``(slice, row, column)`` spacing.
    max_candidates : int
        How many to keep at most.
    faint_candidates : int
        How many of those slots are filled last, by a second ranking whose response cap is
        :data:`FAINT_SCORE_CAP_HU` instead of :data:`SCORE_CAP_HU` (the first
        ``max_candidates - faint_candidates`` come from the usual ranking): room for faint ground-glass
        blobs that dense vessels and noise outrank. 0 keeps one ranking.
    lung : numpy.ndarray, optional
        A lung region of the volume's shape (default :func:`lung_region`).
    grid_mm : float
        Isotropic grid of the scale space.
    """
    region = lung_region(hu, spacing_mm) if lung is None else lung
    iso = resample_isotropic(np.clip(hu, *HU_CLIP), spacing_mm, grid_mm)
    if not region.any():
        return CandidateScan([], iso, grid_mm)
    # distance (mm) of every grid voxel to the lung region: a peak may lie up to ~ its radius outside
    # (the centre of a large juxta-pleural nodule sits in the notch it makes in the air)
    coarse_step = 2
    coarse_region = resample_isotropic(region.astype(np.float32), spacing_mm, grid_mm * coarse_step) > 0.5
    outside_mm = ndimage.distance_transform_edt(~coarse_region) * grid_mm * coarse_step
    fine = [s for s in SIGMAS_MM if s <= COARSE_FROM_MM]
    coarse_sigmas = [s for s in SIGMAS_MM if s >= COARSE_FROM_MM]
    fine_points, fine_levels, fine_strength, fine_smoothed = _scale_peaks(iso, None, [s / grid_mm for s in fine])
    # the larger scales on a grid twice as coarse, starting from G(COARSE_FROM_MM) (smooth enough not to alias)
    start = fine_smoothed[-1][::2, ::2, ::2]
    coarse_points, coarse_levels, coarse_strength, coarse_smoothed = _scale_peaks(
        start, coarse_sigmas[0] / (2 * grid_mm), [s / (2 * grid_mm) for s in coarse_sigmas])
    points = np.concatenate([fine_points, coarse_points * 2])
    levels = np.concatenate([fine_levels, coarse_levels + len(fine) - 1])
    strength = np.concatenate([fine_strength, coarse_strength])
    smoothed_at = [(fine_smoothed[k], 1) for k in range(len(fine) - 1)] + \
                  [(coarse_smoothed[k], 2) for k in range(len(coarse_sigmas) - 1)]
    if len(points) == 0:
        return CandidateScan([], iso, grid_mm)
    zs, ys, xs = points[:, 0], points[:, 1], points[:, 2]
    scale_mm = np.sqrt(np.asarray(SIGMAS_MM)[:-1] * np.asarray(SIGMAS_MM)[1:])  # geometric mean of the DoG pair
    radius = math.sqrt(3.0) * scale_mm[levels]
    coarse = np.minimum(np.stack([zs, ys, xs], axis=1) // coarse_step, np.asarray(outside_mm.shape) - 1)
    near_lung = outside_mm[coarse[:, 0], coarse[:, 1], coarse[:, 2]] <= LUNG_MARGIN_MM + 0.8 * radius
    zs, ys, xs, levels, radius = zs[near_lung], ys[near_lung], xs[near_lung], levels[near_lung], radius[near_lung]
    strength = strength[near_lung]
    points = points[near_lung]
    blob = np.zeros(len(points))
    for k in np.unique(levels):
        chosen = levels == k
        volume, step = smoothed_at[k]
        blob[chosen] = blobness(volume, points[chosen] // step)
    score = np.minimum(strength, SCORE_CAP_HU) * (0.1 + blob)
    ratio = (np.asarray(hu.shape) - 1) / np.maximum(np.asarray(iso.shape) - 1, 1)  # grid index -> voxel index
    spacing = np.asarray(spacing_mm, dtype=float)
    centres_voxel = np.stack([zs, ys, xs], axis=1) * ratio
    centres_mm = centres_voxel * spacing
    kept: list[int] = []
    _keep_best(np.argsort(-score), centres_mm, radius, kept, max_candidates - max(faint_candidates, 0))
    if faint_candidates > 0:
        faint_score = np.minimum(strength, FAINT_SCORE_CAP_HU) * (0.1 + blob)
        _keep_best(np.argsort(-faint_score), centres_mm, radius, kept, max_candidates)
    found = []
    for index in kept:
        voxel = centres_voxel[index]
        found.append(BlobCandidate(tuple(round(float(v), 2) for v in voxel),  # type: ignore[arg-type]
                                   round(float(radius[index]), 2), round(float(strength[index]), 2),
                                   round(float(blob[index]), 3), round(float(score[index]), 2),
                                   (int(zs[index]), int(ys[index]), int(xs[index]))))
    return CandidateScan(found, iso, grid_mm)


def _keep_best(order: np.ndarray, centres_mm: np.ndarray, radius: np.ndarray, kept: list[int], limit: int) -> None:
    """Append to ``kept`` the peaks of ``order`` (best first) that no kept peak merges, until it holds ``limit``.

    A peak merges into a kept one closer than the smaller one's radius or :data:`MERGE_MM`.
    """
    for index in order:
        if len(kept) >= limit:
            return
        if kept:
            distance = np.linalg.norm(centres_mm[kept] - centres_mm[index], axis=1)
            if (distance < np.maximum(np.minimum(radius[kept], radius[index]), MERGE_MM)).any():
                continue
        kept.append(int(index))


def _scale_peaks(volume: np.ndarray, start_sigma: float | None, sigmas: list[float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """DoG scale-space maxima of ``volume`` over ``sigmas`` (grid voxels): points, level, strength, Gaussians.

    ``volume`` is already smoothed by ``start_sigma`` (``None``: not at all). A peak is the maximum
    of its 3x3x3 neighbourhood over the levels' maximum, and at least its neighbours in scale at the same place.
    """
    smoothed = []
    previous = start_sigma
    current_volume = volume
    for sigma in sigmas:
        if previous is None or sigma > previous:
            extra = sigma if previous is None else math.sqrt(sigma ** 2 - previous ** 2)
            current_volume = ndimage.gaussian_filter(current_volume, extra, truncate=3.0)
        smoothed.append(current_volume)
        previous = sigma
    responses = np.stack([(smoothed[k] - smoothed[k + 1]) * np.float32(sigmas[k] / (sigmas[k + 1] - sigmas[k]))
                          for k in range(len(sigmas) - 1)])
    strongest = responses.max(axis=0)
    peak = (strongest == ndimage.maximum_filter(strongest, size=3, mode="nearest")) & (strongest > MIN_RESPONSE_HU)
    points = np.argwhere(peak)
    levels = responses[:, peak].argmax(axis=0)
    return points, levels, strongest[peak], smoothed


def resample_isotropic(volume: np.ndarray, spacing_mm: tuple[float, float, float], grid_mm: float) -> np.ndarray:
    """Trilinear resampling of a ``(slice, row, column)`` volume to ``grid_mm`` isotropic (voxel centres kept:
    the first and last voxels map exactly; grid steps are ``grid_mm`` or slightly less)."""
    shape = np.asarray(volume.shape)
    size = [int(n) for n in np.floor((shape - 1) * np.asarray(spacing_mm) / grid_mm) + 1]
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=size, mode="trilinear", align_corners=True)
    # align_corners: the end voxels map exactly, so grid index i is voxel i * (shape - 1) / (size - 1)
    return out[0, 0].numpy()


def blobness(smoothed: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``clip(-l3 / |l1|, 0, 1)`` of the Hessian at each ``(n, 3)`` point (finite differences, edges clamped).

    ``l1 <= l2 <= l3`` are the eigenvalues: about 1 for a ball (three similar negative curvatures),
    about 0 for a tube (one near zero) or a plate; 0 where the curvature is not negative.
    """
    if len(points) == 0:
        return np.zeros(0)
    limit = np.asarray(smoothed.shape) - 1

    def at(offset: tuple[int, int, int]) -> np.ndarray:
        index = np.clip(points + np.asarray(offset), 0, limit)
        return smoothed[index[:, 0], index[:, 1], index[:, 2]].astype(np.float64)

    value = at((0, 0, 0))
    hessian = np.zeros((len(points), 3, 3))
    unit = np.eye(3, dtype=int)
    for a in range(3):
        hessian[:, a, a] = at(tuple(unit[a])) + at(tuple(-unit[a])) - 2 * value
        for b in range(a + 1, 3):
            mixed = (at(tuple(unit[a] + unit[b])) - at(tuple(unit[a] - unit[b])) - at(tuple(unit[b] - unit[a]))
                     + at(tuple(-unit[a] - unit[b]))) / 4
            hessian[:, a, b] = hessian[:, b, a] = mixed
    eigen = np.linalg.eigvalsh(hessian)  # ascending per point
    ratio = np.where(eigen[:, 0] < 0, -eigen[:, 2] / np.maximum(np.abs(eigen[:, 0]), 1e-9), 0.0)
    return np.clip(ratio, 0.0, 1.0)
