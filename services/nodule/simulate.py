"""Simulated chest CT with ground truth, written as real DICOM CT series.

**Everything this module makes is simulated data, not patient data.** No real scan or anatomy is
used: a chest is drawn from geometric shapes whose sizes and densities follow textbook CT values,
and every ground-truth number (nodule centre, diameters, volume, mean HU) is measured on what was
drawn. Figures of a detector trained or evaluated on these studies are figures on simulated data.

One study (:func:`simulate_study`) is a (z, y, x) volume in Hounsfield units; z runs inferior to
superior (the slice normal of an axial series), y anterior to posterior, x patient right to left:

- body: subcutaneous fat (~ -100 HU) over a muscle layer (~ 40 HU); ribs as oblique bands of bone in
  the chest wall (descending anteriorly, one every 22-30 mm), sternum, a vertebra with spinal canal,
  posterior arch and intervertebral discs (bone 250-1000 HU);
- mediastinum: fat, the heart in the lower part of the slab, ascending and descending aorta,
  oesophagus; two lungs (~ -850 HU) with smooth low-frequency texture and a gravity gradient;
- pulmonary artery and vein trees from roots along each hilum: tubes branching and narrowing outward
  (radius 2.5-4.5 mm down to 0.5 mm, 30-50 HU); airways: trachea, carina, main and lobar bronchi (air
  lumen, soft-tissue wall); tubes and nodules are drawn with analytic partial volume;
- 0-4 nodules of 3-30 mm: solid (0-60 HU, lobulated ellipsoid), ground-glass (-650 to -400 HU, soft
  edge, vessels still seen through), part-solid (ground glass around a solid core); each isolated,
  juxta-pleural (flattened against the lung wall) or juxta-vascular (abutting a vessel);
- reconstruction: a kernel-dependent point spread function (soft: wider; sharp: narrower with edge
  enhancement) and noise (soft: spatially correlated; sharp: high-frequency), clipped to [-1024, 3071].

The anatomy scales with the field of view (256 voxels at 0.6-0.9 mm are narrower than an adult
chest); nodules, vessels and airways keep their sizes in millimetres. A nodule that fits nowhere in
the lungs at its drawn size is shrunk until it does (or dropped below the smallest size), so the
sizes reported are always the drawn ones. Outside the reconstruction circle the image is -1024 HU.
A 64 x 256 x 256 study takes under a second on one core. :func:`write_dicom_series` writes it as CT
Image Storage instances (one per slice, int16 with rescale intercept -1024 and padding outside the
circle, or unsigned 12-bit; optional RLE or JPEG 2000 lossless) whose UIDs are derived from the seed
and configuration, so the same seed gives the same files. The command line (:func:`main`) derives
each study's seed from (seed, index): runs with different seeds share no study.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

NoduleType = Literal["solid", "part_solid", "ground_glass"]
NODULE_TYPES: tuple[NoduleType, ...] = ("solid", "part_solid", "ground_glass")
#: Drawn density (HU) of a solid nodule or core and of ground glass, before blur, noise and partial volume.
SOLID_HU = (0.0, 60.0)
GROUND_GLASS_HU = (-650.0, -400.0)
KERNELS = ("soft", "sharp")
#: ConvolutionKernel written for each kernel class (GE-style names).
CONVOLUTION_KERNEL = {"soft": "STANDARD", "sharp": "LUNG"}
HU_MIN, HU_MAX = -1024.0, 3071.0
RESCALE_INTERCEPT = -1024
#: Stored value outside the reconstruction circle (HU -3024), as many scanners write it.
PADDING_STORED = -2000
MANUFACTURER = "Tessera"
MODEL_NAME = "Chest CT simulator (simulated data)"
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                     "rle": RLELossless, "jpeg2000": JPEG2000Lossless}

FloatArray = NDArray[np.float32]
Vector = NDArray[np.float64]


@dataclass(frozen=True)
class SimulationConfig:
    """What a simulated study may look like; every random draw comes from ``seed``.

    Ranges are ``(low, high)``. ``shape`` is (slices, rows, columns). ``type_weights`` follows
    :data:`NODULE_TYPES`. A study has no nodule with ``no_nodule_probability``, else a count drawn
    uniformly from ``nodule_count`` (at least one). Each nodule is juxta-pleural with
    ``juxta_pleural_fraction``, juxta-vascular with ``juxta_vascular_fraction``, else isolated.
    ``noise_sd_hu`` is the noise standard deviation whatever the kernel; the kernel shapes its
    texture. ``max_rotation_deg`` rotates the patient in the axial plane (the series stays axial).
    """

    seed: int = 0
    shape: tuple[int, int, int] = (64, 256, 256)
    pixel_spacing_mm: tuple[float, float] = (0.6, 0.9)
    slice_spacing_choices_mm: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5)
    nodule_count: tuple[int, int] = (0, 4)
    no_nodule_probability: float = 0.25
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0)
    type_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)
    juxta_pleural_fraction: float = 0.25
    juxta_vascular_fraction: float = 0.2
    noise_sd_hu: tuple[float, float] = (10.0, 40.0)
    sharp_kernel_probability: float = 0.5
    max_rotation_deg: float = 0.0
    age_years: tuple[int, int] = (50, 80)

    def __post_init__(self) -> None:
        if min(self.shape) < 16 or self.shape[1] < 64 or self.shape[2] < 64:
            raise ValueError(f"shape {self.shape} is too small: at least 16 slices of 64 x 64")
        ranges = {"pixel_spacing_mm": self.pixel_spacing_mm, "nodule_count": self.nodule_count,
                  "nodule_diameter_mm": self.nodule_diameter_mm, "noise_sd_hu": self.noise_sd_hu,
                  "age_years": self.age_years}
        for name, (low, high) in ranges.items():
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be 0 <= low <= high, got {(low, high)}")
        if self.nodule_diameter_mm[0] < 1 or not self.slice_spacing_choices_mm:
            raise ValueError("nodules need a diameter >= 1 mm and at least one slice spacing")
        if self.juxta_pleural_fraction + self.juxta_vascular_fraction > 1 or sum(self.type_weights) <= 0:
            raise ValueError("juxta fractions must sum to <= 1 and type weights to > 0")

    def digest(self) -> str:
        """A short hash of every field: the entropy source of the study's UIDs."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class NoduleTruth:
    """Ground truth of one simulated nodule, measured on the drawn voxels.

    ``center_voxel`` is the (z, y, x) index nearest the occupancy-weighted centroid and
    ``center_lps_mm`` that centroid in patient coordinates. The long and short axes are the maximum
    Feret diameter and the caliper width perpendicular to it on the axial slice where the nodule is
    largest. ``volume_mm3`` sums the partial-volume occupancy. ``mean_hu`` averages the final image
    (after blur and noise) over the nodule's label. ``solid_component_mm`` is the mean axial
    diameter of the solid part (the whole nodule if solid, the core if part-solid, 0 if ground glass).
    """

    nodule_id: int
    nodule_type: NoduleType
    center_voxel: tuple[int, int, int]
    center_lps_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    solid_component_mm: float
    juxta_pleural: bool
    juxta_vascular: bool
    lung: Literal["right", "left"]

    @property
    def mean_diameter_mm(self) -> float:
        """Mean of long and short axis, as Lung-RADS sizes a nodule."""
        return (self.long_axis_mm + self.short_axis_mm) / 2


@dataclass
class SimulatedStudy:
    """One simulated chest CT and its ground truth.

    Attributes
    ----------
    hu:
        (z, y, x) float32 in HU; slice ``k`` lies at ``origin_lps_mm + k * spacing_mm[0]`` along +z.
    labels:
        (z, y, x) uint8, the ``nodule_id`` of each nodule's voxels (occupancy >= 0.5), else 0.
    lung_mask:
        (z, y, x) bool, the lungs as drawn (before vessels and nodules).
    spacing_mm:
        (slice spacing, row spacing, column spacing); SliceThickness equals the slice spacing.
    origin_lps_mm:
        Patient (x, y, z) of voxel (0, 0, 0).
    """

    hu: FloatArray
    labels: NDArray[np.uint8]
    lung_mask: NDArray[np.bool_]
    nodules: list[NoduleTruth]
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    kernel: str
    noise_sd_hu: float
    rotation_deg: float
    kvp: int
    patient_age_years: int
    patient_sex: Literal["M", "F"]
    study_date: datetime.date
    config: SimulationConfig

    @property
    def convolution_kernel(self) -> str:
        """The ConvolutionKernel value written to the series."""
        return CONVOLUTION_KERNEL[self.kernel]

    def voxel_to_lps(self, index_zyx: Sequence[float]) -> tuple[float, float, float]:
        """Patient (x, y, z) mm of a (z, y, x) voxel index of this axial series."""
        k, j, i = (float(v) for v in index_zyx)
        dz, dy, dx = self.spacing_mm
        x0, y0, z0 = self.origin_lps_mm
        return (x0 + i * dx, y0 + j * dy, z0 + k * dz)

    def uids(self) -> dict[str, str]:
        """Study, series and frame-of-reference UIDs, the same for the same configuration."""
        return {name: str(_uid(self.config, name)) for name in
                ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}


# --------------------------------------------------------------------------------------------------
# Geometry: the anatomical frame (mm, body centre at x = y = 0, z up from the first slice, patient
# rotated by ``rotation``) and the image frame (mm from voxel (0, 0, 0) along z, y, x).


@dataclass(frozen=True)
class _Frame:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    rotation_rad: float
    body_centre_yx_mm: tuple[float, float]

    @property
    def slab_mm(self) -> float:
        return (self.shape[0] - 1) * self.spacing[0]

    def to_image_mm(self, xyz: Vector) -> Vector:
        """Anatomical (..., 3) x, y, z mm to image (..., 3) z, y, x mm."""
        cos, sin = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
        image_x = cos * x - sin * y + self.body_centre_yx_mm[1]
        image_y = sin * x + cos * y + self.body_centre_yx_mm[0]
        return np.stack([z, image_y, image_x], axis=-1)

    def anatomical_grid(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """x and y of every (row, column) as (1, rows, cols); z of every slice as (slices, 1, 1)."""
        slices, rows, cols = self.shape
        dz, dy, dx = self.spacing
        image_y = (np.arange(rows, dtype=np.float32) * dy - self.body_centre_yx_mm[0])[:, None]
        image_x = (np.arange(cols, dtype=np.float32) * dx - self.body_centre_yx_mm[1])[None, :]
        cos, sin = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        x = (cos * image_x + sin * image_y).astype(np.float32)[None]
        y = (-sin * image_x + cos * image_y).astype(np.float32)[None]
        z = (np.arange(slices, dtype=np.float32) * dz)[:, None, None]
        return x, y, z


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: np.ndarray | float,
             b: np.ndarray | float) -> np.ndarray:
    """Normalised elliptic radius: <= 1 inside the ellipse."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


@dataclass(frozen=True)
class _Chest:
    """The drawn anatomy's dimensions in mm (anatomical frame); see :func:`_draw_chest`."""

    body_a: float
    body_b: float
    fat: float
    muscle: float
    slab_mm: float
    heart_top: float  # fraction of the slab height where the heart ends
    carina_z: float
    rib_period: float
    rib_phase: float
    rib_slope: float
    rib_height: float
    disc_period: float
    disc_phase: float

    @property
    def cavity_a(self) -> float:
        return self.body_a - self.fat - self.muscle

    @property
    def cavity_b(self) -> float:
        return self.body_b - self.fat - self.muscle

    @property
    def mediastinum_a(self) -> float:
        return 0.16 * self.cavity_a

    @property
    def spine(self) -> tuple[float, float]:
        """Vertebral body centre y and radius."""
        return 0.82 * self.cavity_b, 0.2 * self.cavity_b

    @property
    def descending_aorta(self) -> tuple[float, float, float]:
        cb = self.cavity_b
        return 0.32 * cb, 0.62 * cb, 0.1 * cb

    def heart_scale(self, z: np.ndarray) -> np.ndarray:
        """Heart size factor per z: 1 at the bottom of the slab, 0 above ``heart_top``."""
        t = z / (self.heart_top * self.slab_mm)
        return np.sqrt(np.clip(1 - t**2, 0, 1))

    def lung_label(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> NDArray[np.uint8]:
        """0 outside the lungs, 1 in the right lung (x < 0), 2 in the left; broadcasts x, y, z."""
        ca, cb = self.cavity_a, self.cavity_b
        shrink = 1 - 0.1 * np.clip(z / self.slab_mm, -0.5, 1.5)  # lungs narrow towards the apex
        lungs = (_ellipse(np.abs(x), y, 0.5 * ca, 0.05 * cb, 0.52 * ca * shrink, 0.92 * cb * shrink) <= 1)
        lungs &= _ellipse(x, y, 0, 0, ca - 3, cb - 3) <= 1
        lungs &= _ellipse(x, y, 0, -0.05 * cb, self.mediastinum_a, cb) > 1
        heart = self.heart_scale(z)
        lungs &= _ellipse(x, y, 0.15 * ca, -0.2 * cb, 0.42 * ca * heart + 3, 0.55 * cb * heart + 3) > 1
        spine_y, spine_r = self.spine
        lungs &= x**2 + (y - spine_y) ** 2 > (spine_r + 4) ** 2
        aorta_x, aorta_y, aorta_r = self.descending_aorta
        lungs &= (x - aorta_x) ** 2 + (y - aorta_y) ** 2 > (aorta_r + 3) ** 2
        return (lungs * np.where(x < 0, 1, 2)).astype(np.uint8)

    def in_lung(self, points_xyz: Vector) -> NDArray[np.bool_]:
        """Whether each anatomical (..., 3) point lies in a lung."""
        return self.lung_label(points_xyz[..., 0], points_xyz[..., 1], points_xyz[..., 2]) > 0


def _draw_chest_parameters(rng: np.random.Generator, frame: _Frame) -> _Chest:
    _, rows, cols = frame.shape
    field_of_view = min(rows, cols) * frame.spacing[2]  # the reconstruction circle's diameter
    body_a = field_of_view * rng.uniform(0.42, 0.45)
    body_b = body_a * rng.uniform(0.64, 0.74)
    slab = frame.slab_mm
    return _Chest(
        body_a=body_a, body_b=body_b, fat=body_a * rng.uniform(0.03, 0.08), muscle=body_a * rng.uniform(0.05, 0.07),
        slab_mm=slab, heart_top=rng.uniform(0.45, 0.65), carina_z=slab * rng.uniform(0.5, 0.7),
        rib_period=rng.uniform(22, 30), rib_phase=rng.uniform(0, 30), rib_slope=rng.uniform(18, 28),
        rib_height=rng.uniform(7, 10), disc_period=rng.uniform(24, 30), disc_phase=rng.uniform(0, 30),
    )


def _draw_chest(chest: _Chest, frame: _Frame, rng: np.random.Generator) -> tuple[FloatArray, NDArray[np.uint8]]:
    """The chest without vessels, airways or nodules: (HU volume, lung label volume)."""
    x, y, z = frame.anatomical_grid()
    ca, cb = chest.cavity_a, chest.cavity_b
    hu = np.broadcast_to(_chest_wall_slice(chest, x[0], y[0]), frame.shape).copy()
    slice_z = z[:, 0, 0]
    _draw_ribs(hu, chest, x[0], y[0], slice_z)
    spine_y, spine_r = chest.spine
    discs = np.mod(slice_z - chest.disc_phase, chest.disc_period) < 5.0
    _paint(hu, discs, _ellipse(x[0], y[0], 0, spine_y, spine_r, spine_r) <= 1, 85.0)
    upper = slice_z > 0.8 * chest.heart_top * chest.slab_mm
    _paint(hu, upper, _ellipse(x[0], y[0], -0.06 * ca, -0.35 * cb, 0.1 * cb, 0.1 * cb) <= 1, 42.0)
    heart_scale = chest.heart_scale(z)
    heart = _ellipse(x, y, 0.15 * ca, -0.2 * cb, 0.42 * ca * heart_scale + 1e-3, 0.55 * cb * heart_scale + 1e-3) <= 1
    hu[heart] = rng.uniform(35, 50)
    lung = chest.lung_label(x, y, z)
    inside = lung > 0
    hu[inside] = _lung_parenchyma(rng, frame, y)[inside]
    return hu, lung


def _paint(hu: FloatArray, slices: NDArray[np.bool_], region: NDArray[np.bool_], value: float) -> None:
    """Set ``value`` on the axial ``region`` of the chosen slices."""
    rows, cols = np.nonzero(region)
    hu[np.flatnonzero(slices)[:, None], rows[None, :], cols[None, :]] = value


def _lung_parenchyma(rng: np.random.Generator, frame: _Frame, y: FloatArray) -> FloatArray:
    """Lung density: -860 HU, smooth texture (~15 HU) and denser dependent (posterior) lung."""
    slices, rows, cols = frame.shape
    coarse = ndimage.gaussian_filter(rng.standard_normal((slices // 4 + 3, rows // 8 + 3, cols // 8 + 3)), 1.0)
    coarse /= coarse.std() + 1e-6
    texture = ndimage.zoom(coarse.astype(np.float32), (slices / coarse.shape[0], rows / coarse.shape[1],
                                                       cols / coarse.shape[2]), order=1, mode="nearest", grid_mode=True)
    texture = texture[:slices, :rows, :cols]
    dependent = np.clip(y / (np.abs(y).max() + 1e-6), 0, 1) ** 2
    return (-860.0 + 15.0 * texture + 45.0 * dependent).astype(np.float32)


def _chest_wall_slice(chest: _Chest, x: FloatArray, y: FloatArray) -> FloatArray:
    """One axial slice of everything that does not change along z."""
    ca, cb = chest.cavity_a, chest.cavity_b
    hu = np.full(x.shape, -1000.0, np.float32)
    body = _ellipse(x, y, 0, 0, chest.body_a, chest.body_b) <= 1
    hu[body] = -100.0
    hu[_ellipse(x, y, 0, 0, chest.body_a - chest.fat, chest.body_b - chest.fat) <= 1] = 45.0
    hu[_ellipse(x, y, 0, 0, ca, cb) <= 1] = -90.0  # mediastinal fat fills the cavity before the organs
    spine_y, spine_r = chest.spine
    canal_y = spine_y + 1.55 * spine_r
    arch = _ellipse(x, y, 0, canal_y, 0.85 * spine_r, 0.85 * spine_r) <= 1
    process = _ellipse(x, y, 0, canal_y + 1.1 * spine_r, 0.2 * spine_r, 0.7 * spine_r) <= 1
    hu[(arch | process) & body] = 700.0
    hu[_ellipse(x, y, 0, canal_y, 0.5 * spine_r, 0.5 * spine_r) <= 1] = 15.0
    vertebra = _ellipse(x, y, 0, spine_y, spine_r, spine_r)
    hu[vertebra <= 1] = 900.0  # cortex
    hu[vertebra <= 0.75] = 280.0  # cancellous bone
    sternum_y = -(cb + 0.45 * chest.muscle)
    hu[_ellipse(x, y, 0, sternum_y, 0.12 * ca, 0.4 * chest.muscle) <= 1] = 450.0
    aorta_x, aorta_y, aorta_r = chest.descending_aorta
    hu[_ellipse(x, y, aorta_x, aorta_y, aorta_r, aorta_r) <= 1] = 42.0
    hu[_ellipse(x, y, 0.04 * ca, 0.5 * cb, 0.05 * cb, 0.05 * cb) <= 1] = 35.0  # oesophagus
    return hu


def _draw_ribs(hu: FloatArray, chest: _Chest, x: FloatArray, y: FloatArray, z: FloatArray) -> None:
    """Ribs: bands just outside the cavity whose height falls as they run from spine to sternum."""
    ca, cb = chest.cavity_a, chest.cavity_b
    radius = np.sqrt(_ellipse(x, y, 0, 0, ca, cb))
    thickness = 0.7 * chest.muscle / min(ca, cb)
    rows, cols = np.nonzero((radius >= 1.0) & (radius <= 1.0 + thickness))
    from_spine = np.abs(np.angle(np.exp(1j * (np.arctan2(y[rows, cols] / cb, x[rows, cols] / ca) - np.pi / 2))))
    keep = (from_spine > 0.3) & (from_spine < 2.6)
    rows, cols, from_spine = rows[keep], cols[keep], from_spine[keep]
    rib_z = chest.rib_phase - chest.rib_slope * from_spine
    in_rib = np.mod(z[:, None] - rib_z[None, :], chest.rib_period) < chest.rib_height
    depth = (radius[rows, cols] - 1.0) / thickness  # cortex brighter than the marrow
    bone = (350.0 + 500.0 * (np.abs(depth - 0.5) * 2) ** 2).astype(np.float32)
    slab = hu[:, rows, cols]
    hu[:, rows, cols] = np.where(in_rib, bone[None, :], slab)


# --------------------------------------------------------------------------------------------------
# Tubes (vessels and airways) and nodules, drawn with partial volume in boxes around each object.


@dataclass(frozen=True)
class _Tube:
    """A straight tube with rounded ends, in anatomical mm."""

    start: Vector
    end: Vector
    radius: float


@dataclass(frozen=True)
class _Box:
    """A block of the volume and the image-frame mm offset of its voxels from a centre."""

    index: tuple[slice, slice, slice]
    offsets: tuple[FloatArray, FloatArray, FloatArray]  # broadcastable z, y, x


def _local_box(frame: _Frame, centre_zyx: Vector, half_mm: Vector) -> _Box | None:
    spacing = np.asarray(frame.spacing)
    low = np.maximum(np.floor((centre_zyx - half_mm) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((centre_zyx + half_mm) / spacing).astype(int) + 1, frame.shape)
    if np.any(high <= low):
        return None
    offsets = [(np.arange(lo, hi, dtype=np.float32) * step - np.float32(c)).reshape(
        [-1 if axis == dim else 1 for dim in range(3)])
        for axis, (lo, hi, step, c) in enumerate(zip(low, high, spacing, centre_zyx, strict=True))]
    index = (slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2]))
    return _Box(index, (offsets[0], offsets[1], offsets[2]))


def _overlap(distance: FloatArray, radius: FloatArray | float, width: FloatArray) -> FloatArray:
    """Fraction of a voxel of ``width`` (along the normal) at ``distance`` covered by [-radius, radius]."""
    covered = np.minimum(radius, distance + width / 2) - np.maximum(-radius, distance - width / 2)
    return np.clip(covered / width, 0.0, 1.0).astype(np.float32)


def _voxel_width(unit: Sequence[NDArray[np.floating]], spacing: tuple[float, float, float],
                 edge_mm: float = 0.0) -> FloatArray:
    """Width of a voxel seen along a unit direction (box-equivalent), widened by a soft edge."""
    squared = sum((u * step) ** 2 for u, step in zip(unit, spacing, strict=True)) + edge_mm**2
    return np.sqrt(np.maximum(squared, 1e-6)).astype(np.float32)


def _draw_tube(occupancy: FloatArray, frame: _Frame, tube: _Tube) -> None:
    """Raise ``occupancy`` to the tube's partial-volume fraction in its bounding box."""
    start, end = frame.to_image_mm(tube.start), frame.to_image_mm(tube.end)
    axis = end - start
    length = float(np.linalg.norm(axis))
    direction = axis / max(length, 1e-6)
    half = np.abs(axis) / 2 + tube.radius + np.asarray(frame.spacing)
    box = _local_box(frame, (start + end) / 2, half)
    if box is None:
        return
    rel = [offset + np.float32(c) for offset, c in zip(box.offsets, (end - start) / 2, strict=True)]
    along = np.clip(sum(r * np.float32(u) for r, u in zip(rel, direction, strict=True)), 0, length)
    radial = [r - along * np.float32(u) for r, u in zip(rel, direction, strict=True)]
    distance = np.sqrt(radial[0] ** 2 + radial[1] ** 2 + radial[2] ** 2)
    safe = np.maximum(distance, 1e-6)
    width = _voxel_width((radial[0] / safe, radial[1] / safe, radial[2] / safe), frame.spacing)
    region = occupancy[box.index]
    np.maximum(region, _overlap(distance, tube.radius, width), out=region)


def _perpendicular(rng: np.random.Generator, direction: Vector) -> Vector:
    trial = rng.standard_normal(3)
    trial -= trial.dot(direction) * direction
    return trial / max(float(np.linalg.norm(trial)), 1e-9)


def _reach_into_lung(chest: _Chest, origin: Vector, heading: Vector, length: float) -> Vector | None:
    """The end of a segment from ``origin`` that stays in a lung, shortened if needed."""
    for fraction in (1.0, 0.6, 0.35):
        end = origin + heading * length * fraction
        if chest.in_lung(np.stack([end, origin + (end - origin) * 0.7])).all():
            return end
    return None


def _branching_tree(rng: np.random.Generator, chest: _Chest, root: Vector, headings: Sequence[Vector],
                    radius: float, *, min_radius: float, max_tubes: int) -> list[_Tube]:
    """Tubes that branch in two (a main and a side child, Murray-like radii) until ``min_radius``.

    Each child leans a little away from the root, so that the tree fans out towards the pleura.
    """
    pending = [(root, h / np.linalg.norm(h), radius) for h in headings]
    tubes: list[_Tube] = []
    while pending and len(tubes) < max_tubes:
        origin, heading, r = pending.pop(0)  # breadth first: a tube budget trims the finest branches
        end = _reach_into_lung(chest, origin, heading, r * rng.uniform(5, 9) + 2)
        if end is None:
            continue
        tubes.append(_Tube(origin, end, r))
        side = _perpendicular(rng, heading)
        outward = (end - root) / max(float(np.linalg.norm(end - root)), 1e-6)
        children = ((r * rng.uniform(0.78, 0.88), rng.uniform(10, 30), 1.0),
                    (r * rng.uniform(0.6, 0.75), rng.uniform(30, 60), -1.0))
        for child_radius, angle, sign in children:
            if child_radius >= min_radius:
                turn = math.radians(angle)
                child = math.cos(turn) * heading + sign * math.sin(turn) * side + 0.35 * outward
                pending.append((end, child / np.linalg.norm(child), child_radius))
    return tubes


def _hilar_headings(rng: np.random.Generator, lateral: float) -> list[Vector]:
    """Anterolateral, lateral and posterolateral directions from a hilum (``lateral`` -1 right, +1 left)."""
    angles = np.radians(np.array([-55.0, 0.0, 55.0]) + rng.normal(0, 10, 3))
    return [np.array([lateral * math.cos(a), math.sin(a), rng.normal(0, 0.35)]) for a in angles]


def _vessel_trees(rng: np.random.Generator, chest: _Chest, scale: float) -> list[_Tube]:
    """Pulmonary artery and vein trees from roots along each hilum, one every 15 mm of the slab."""
    tubes: list[_Tube] = []
    levels = np.arange(rng.uniform(3, 12), chest.slab_mm - 3, 15.0)
    for lateral in (-1.0, 1.0):
        for level, z in enumerate(levels):
            hilum_y = (0.08 if level % 2 else -0.12) * chest.cavity_b  # arteries and veins alternate
            root = np.array([lateral * (chest.mediastinum_a + 4), hilum_y, z])
            tubes += _branching_tree(rng, chest, root, _hilar_headings(rng, lateral),
                                     rng.uniform(2.5, 4.5) * scale, min_radius=0.5, max_tubes=160)
    return tubes


def _airways(rng: np.random.Generator, chest: _Chest, scale: float) -> list[_Tube]:
    """Trachea, main bronchi and a few generations of lobar bronchi (lumen radii)."""
    cz, ma, cb = chest.carina_z, chest.mediastinum_a, chest.cavity_b
    carina = np.array([0.0, 0.3 * cb, cz])
    tubes = [_Tube(np.array([0.0, 0.3 * cb, chest.slab_mm + 20]), carina, rng.uniform(6.0, 7.5) * scale)]
    for lateral, reach, drop, radius in ((-1.0, 6.0, 18.0, 5.5), (1.0, 10.0, 28.0, 5.0)):
        hilum = np.array([lateral * (ma + reach), 0.12 * cb, cz - drop])
        tubes.append(_Tube(carina, hilum, radius * scale))
        tubes += _branching_tree(rng, chest, hilum, _hilar_headings(rng, lateral), 3.8 * scale,
                                 min_radius=1.2, max_tubes=30)
    return tubes


def _draw_tubes(hu: FloatArray, frame: _Frame, vessels: list[_Tube], airways: list[_Tube],
                rng: np.random.Generator) -> None:
    """Composite vessels (~40 HU), then airway walls and air lumens, onto ``hu``."""
    vessel = np.zeros(frame.shape, np.float32)
    for tube in vessels:
        _draw_tube(vessel, frame, tube)
    hu += vessel * (np.float32(rng.uniform(30, 50)) - hu)
    wall, lumen = np.zeros(frame.shape, np.float32), np.zeros(frame.shape, np.float32)
    for tube in airways:
        _draw_tube(wall, frame, _Tube(tube.start, tube.end, tube.radius * 1.2 + 0.5))
        _draw_tube(lumen, frame, tube)
    hu += wall * (np.float32(20.0) - hu)
    hu += lumen * (np.float32(-1000.0) - hu)


@dataclass(frozen=True)
class _NoduleDesign:
    """What to draw for one nodule; directions and offsets in the image (z, y, x) frame."""

    nodule_type: NoduleType
    centre: Vector  # anatomical x, y, z mm
    semi_axes: Vector
    orientation: NDArray[np.float64]  # columns: the semi-axes' directions
    lobes: NDArray[np.float64]  # (n, 3) unit vectors of the lobulations
    lobulation: float
    density_hu: float
    edge_mm: float
    core_radius: float  # part-solid only, else 0
    core_offset: Vector
    core_hu: float
    juxta_pleural: bool
    juxta_vascular: bool

    @property
    def radius(self) -> float:
        return float(self.semi_axes.max())


def _unit_sphere_directions() -> Vector:
    grid = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    grid = grid[np.abs(grid).sum(1) > 0]
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


_SHELL = _unit_sphere_directions()


def _free(centre: Vector, radius: float, taken: list[tuple[Vector, float]]) -> bool:
    return all(np.linalg.norm(centre - other) > 1.2 * (radius + other_radius) + 2 for other, other_radius in taken)


def _sphere_in_lung(chest: _Chest, centre: Vector, radius: float) -> bool:
    return bool(chest.in_lung(np.vstack([centre, centre + radius * _SHELL])).all())


def _random_lung_points(rng: np.random.Generator, chest: _Chest, margin_z: float, count: int = 256) -> Vector:
    low = np.array([-chest.cavity_a, -chest.cavity_b, margin_z])
    high = np.array([chest.cavity_a, chest.cavity_b, chest.slab_mm - margin_z])
    points = rng.uniform(low, high, (count, 3))
    return points[chest.in_lung(points)]


def _place_isolated(rng: np.random.Generator, chest: _Chest, radius: float,
                    taken: list[tuple[Vector, float]]) -> Vector | None:
    for candidate in _random_lung_points(rng, chest, radius + 2):
        if _sphere_in_lung(chest, candidate, radius + 2) and _free(candidate, radius, taken):
            return candidate
    return None


def _place_juxta_pleural(rng: np.random.Generator, chest: _Chest, radius: float,
                         taken: list[tuple[Vector, float]]) -> Vector | None:
    """A centre less than one radius inside the lung wall, found by walking out from a lung point."""
    steps = np.arange(0.5, 2.5 * max(chest.cavity_a, chest.cavity_b), 0.5)
    for start in _random_lung_points(rng, chest, radius + 1, count=32):
        heading = np.array([*rng.standard_normal(2), 0.2 * rng.standard_normal()])
        heading /= np.linalg.norm(heading)
        outside = ~chest.in_lung(start + steps[:, None] * heading)
        if not outside.any():
            continue
        wall = start + steps[int(np.argmax(outside))] * heading
        centre = wall - heading * radius * rng.uniform(0.35, 0.7)
        fits_slab = radius + 1 <= centre[2] <= chest.slab_mm - radius - 1
        if fits_slab and chest.in_lung(centre[None])[0] and _free(centre, radius, taken):
            return centre
    return None


def _place_juxta_vascular(rng: np.random.Generator, chest: _Chest, vessels: list[_Tube], radius: float,
                          taken: list[tuple[Vector, float]]) -> Vector | None:
    """A centre beside a vessel of radius >= 0.8 mm, the nodule overlapping its wall."""
    candidates = [tube for tube in vessels if tube.radius >= 0.8]
    for pick in rng.permutation(len(candidates))[:48]:
        tube = candidates[pick]
        axis = tube.end - tube.start
        on_axis = tube.start + rng.uniform(0.2, 0.8) * axis
        side = _perpendicular(rng, axis / np.linalg.norm(axis))
        centre = on_axis + side * (tube.radius + radius * rng.uniform(0.5, 0.8))
        fits_slab = radius + 1 <= centre[2] <= chest.slab_mm - radius - 1
        if fits_slab and _sphere_in_lung(chest, centre, radius + 1) and _free(centre, radius, taken):
            return centre
    return None


def _random_rotation(rng: np.random.Generator) -> NDArray[np.float64]:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _design_nodule(rng: np.random.Generator, config: SimulationConfig, chest: _Chest, vessels: list[_Tube],
                   taken: list[tuple[Vector, float]]) -> _NoduleDesign | None:
    """Draw one nodule's type, size, shape and place; None when no place in the lungs fits it."""
    weights = np.asarray(config.type_weights, float)
    nodule_type = NODULE_TYPES[int(rng.choice(3, p=weights / weights.sum()))]
    placement = rng.random()
    juxta_pleural = placement < config.juxta_pleural_fraction
    juxta_vascular = not juxta_pleural and placement < config.juxta_pleural_fraction + config.juxta_vascular_fraction
    low, high = config.nodule_diameter_mm
    radius = math.exp(rng.uniform(math.log(low), math.log(high))) / 2  # small nodules are the common ones
    radius = min(radius, chest.slab_mm / 2 - 3)
    centre = None
    while centre is None and radius >= low / 2 * 0.9:
        if juxta_pleural:
            centre = _place_juxta_pleural(rng, chest, radius, taken)
        elif juxta_vascular:
            centre = _place_juxta_vascular(rng, chest, vessels, radius, taken)
        else:
            centre = _place_isolated(rng, chest, radius, taken)
        if centre is None:
            radius *= 0.85
    if centre is None:
        return None
    ground_glass = nodule_type != "solid"
    return _NoduleDesign(
        nodule_type=nodule_type, centre=centre,
        semi_axes=radius * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.7, 1.0)]),
        orientation=_random_rotation(rng), lobes=_random_rotation(rng).T[: int(rng.integers(2, 4))],
        lobulation=rng.uniform(0.0, 0.15), density_hu=rng.uniform(*(GROUND_GLASS_HU if ground_glass else SOLID_HU)),
        edge_mm=rng.uniform(1.0, 2.5) if ground_glass else 0.0,
        core_radius=radius * rng.uniform(0.35, 0.6) if nodule_type == "part_solid" else 0.0,
        core_offset=rng.uniform(-0.15, 0.15, 3) * radius, core_hu=rng.uniform(*SOLID_HU),
        juxta_pleural=juxta_pleural, juxta_vascular=juxta_vascular)


def _ellipsoid_occupancy(offsets: Sequence[FloatArray], semi_axes: Vector, orientation: NDArray[np.float64],
                         lobes: NDArray[np.float64], lobulation: float, edge_mm: float,
                         spacing: tuple[float, float, float]) -> FloatArray:
    """Partial-volume occupancy of a lobulated ellipsoid centred at offset 0."""
    distance = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    at_centre = distance < 1e-6
    safe = np.where(at_centre, 1.0, distance)
    unit = [np.where(at_centre, 1.0 if axis == 0 else 0.0, o / safe) for axis, o in enumerate(offsets)]
    inverse_radius_sq = sum((sum(unit[i] * np.float32(orientation[i, k]) for i in range(3)) / semi_axes[k]) ** 2
                            for k in range(3))
    surface = 1 / np.sqrt(inverse_radius_sq)
    if len(lobes):
        bumps = sum(np.exp(6 * (sum(unit[i] * np.float32(lobe[i]) for i in range(3)) - 1)) for lobe in lobes)
        surface = surface * (1 + lobulation * (bumps - 0.083 * len(lobes)))
    width = _voxel_width((unit[0], unit[1], unit[2]), spacing, edge_mm)
    return _overlap(distance, surface, width)


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> FloatArray:
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return texture / (texture.std() + 1e-6)


@dataclass
class _DrawnNodule:
    design: _NoduleDesign
    box: _Box
    occupancy: FloatArray
    core: FloatArray | None


def _draw_nodule(hu: FloatArray, lung: NDArray[np.uint8], frame: _Frame, design: _NoduleDesign,
                 rng: np.random.Generator) -> _DrawnNodule | None:
    """Composite one nodule onto ``hu`` (never darker than what is there: vessels show through)."""
    centre = frame.to_image_mm(design.centre)
    half = np.full(3, design.radius * 1.4 + design.edge_mm + 2 * max(frame.spacing))
    box = _local_box(frame, centre, half)
    if box is None:
        return None
    in_lung = lung[box.index] > 0
    occupancy = _ellipsoid_occupancy(box.offsets, design.semi_axes, design.orientation, design.lobes,
                                     design.lobulation, design.edge_mm, frame.spacing) * in_lung
    region = hu[box.index]
    texture = _smooth_texture(rng, region.shape, 1.5)
    spread = 30.0 if design.nodule_type != "solid" else 8.0
    target = design.density_hu + spread * texture
    np.maximum(region, region + occupancy * (target - region), out=region)
    core = None
    if design.core_radius > 0:
        shifted = [o - np.float32(c) for o, c in zip(box.offsets, design.core_offset, strict=True)]
        core_axes = design.core_radius * np.array([1.0, 0.9, 0.85])
        core = _ellipsoid_occupancy(shifted, core_axes, design.orientation, design.lobes[:0], 0.0, 0.3,
                                    frame.spacing) * in_lung
        np.maximum(region, region + core * (design.core_hu + 8.0 * texture - region), out=region)
    return _DrawnNodule(design, box, occupancy, core)


# --------------------------------------------------------------------------------------------------
# Reconstruction (point spread function and noise) and ground truth measured on the result.


def _reconstruct(hu: FloatArray, kernel: str, noise_sd: float, spacing: tuple[float, float, float],
                 rng: np.random.Generator) -> FloatArray:
    """Blur by the kernel's PSF, add noise of ``noise_sd`` HU with the kernel's texture, clip."""
    dz, dy, dx = spacing
    sigma_mm = 0.65 if kernel == "soft" else 0.35
    image = ndimage.gaussian_filter(hu, (0.25, sigma_mm / dy, sigma_mm / dx))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if kernel == "sharp":
        image += 0.6 * (image - ndimage.gaussian_filter(image, (0, 1.0 / dy, 1.0 / dx)))  # edge enhancement
        noise -= 0.5 * ndimage.gaussian_filter(noise, (0, 1.0, 1.0))  # high-frequency texture
    else:
        noise = ndimage.gaussian_filter(noise, (0, 0.9, 0.9))  # correlated, blotchy texture
    image += noise * np.float32(noise_sd / float(noise.std()))
    return np.clip(image, HU_MIN, HU_MAX, out=image)


def _feret_axes(mask: NDArray[np.bool_], spacing: tuple[float, float, float]) -> tuple[float, float]:
    """Long axis (maximum Feret diameter) and the width perpendicular to it on the largest axial slice, mm."""
    if not mask.any():
        return 0.0, 0.0
    largest = mask[int(np.argmax(mask.sum(axis=(1, 2))))]
    rows, cols = np.nonzero(largest)
    points = np.stack([rows * spacing[1], cols * spacing[2]], 1)
    angles = np.linspace(0, np.pi, 90, endpoint=False)
    projected = points @ np.stack([np.cos(angles), np.sin(angles)])
    extent = projected.max(0) - projected.min(0) + (spacing[1] + spacing[2]) / 2
    longest = int(np.argmax(extent))
    return float(extent[longest]), float(extent[(longest + 45) % 90])


def _label_and_measure(drawn: _DrawnNodule, nodule_id: int, hu: FloatArray, labels: NDArray[np.uint8],
                       lung: NDArray[np.uint8], frame: _Frame, origin: tuple[float, float, float]) -> NoduleTruth:
    """Write the nodule's id into ``labels`` (occupancy >= 0.5) and measure its truth on the final image."""
    box, occupancy = drawn.box, drawn.occupancy
    mask = occupancy >= 0.5
    if not mask.any():  # a sub-voxel nodule still gets its brightest voxel
        mask = occupancy == occupancy.max()
    labels[box.index][mask] = nodule_id
    spacing = frame.spacing
    starts = [s.start for s in box.index]
    grids = np.meshgrid(*[np.arange(n) + s for n, s in zip(occupancy.shape, starts, strict=True)], indexing="ij")
    centroid = [float((g * occupancy).sum() / occupancy.sum()) for g in grids]
    long_axis, short_axis = _feret_axes(mask, spacing)
    solid = {"solid": (long_axis + short_axis) / 2, "ground_glass": 0.0}.get(drawn.design.nodule_type)
    if solid is None:
        solid = sum(_feret_axes(drawn.core >= 0.5, spacing)) / 2 if drawn.core is not None else 0.0
    side = np.bincount(lung[box.index][mask], minlength=3)[1:]
    return NoduleTruth(
        nodule_id=nodule_id, nodule_type=drawn.design.nodule_type,
        center_voxel=(round(centroid[0]), round(centroid[1]), round(centroid[2])),
        center_lps_mm=tuple(round(origin[a] + centroid[2 - a] * spacing[2 - a], 2) for a in range(3)),  # type: ignore[arg-type]
        long_axis_mm=round(long_axis, 2), short_axis_mm=round(short_axis, 2),
        volume_mm3=round(float(occupancy.sum()) * spacing[0] * spacing[1] * spacing[2], 1),
        mean_hu=round(float(hu[box.index][mask].mean()), 1), solid_component_mm=round(solid, 2),
        juxta_pleural=drawn.design.juxta_pleural, juxta_vascular=drawn.design.juxta_vascular,
        lung="right" if side[0] >= side[1] else "left")


# --------------------------------------------------------------------------------------------------
# The study.


def _nodule_count(rng: np.random.Generator, config: SimulationConfig) -> int:
    low, high = config.nodule_count
    if high == 0 or rng.random() < config.no_nodule_probability:
        return 0
    return int(rng.integers(max(low, 1), high + 1))


def simulate_study(config: SimulationConfig = SimulationConfig()) -> SimulatedStudy:
    """Simulate one chest CT study with ground truth (simulated data; see the module docstring).

    Parameters
    ----------
    config:
        Ranges to draw from and the seed; the same config gives the same study, voxel for voxel.

    Returns
    -------
    SimulatedStudy with ``hu`` (z, y, x) float32 HU, ``labels`` (z, y, x) uint8 nodule ids,
    ``lung_mask`` and one :class:`NoduleTruth` per nodule (ids 1..n).
    """
    rng = np.random.default_rng(config.seed)
    slices, rows, cols = config.shape
    pixel = round(float(rng.uniform(*config.pixel_spacing_mm)), 3)
    spacing = (float(rng.choice(config.slice_spacing_choices_mm)), pixel, pixel)
    kernel = "sharp" if rng.random() < config.sharp_kernel_probability else "soft"
    noise_sd = round(float(rng.uniform(*config.noise_sd_hu)), 1)
    rotation = float(rng.uniform(-1, 1) * config.max_rotation_deg)
    shift = rng.uniform(-0.03, 0.03, 2) * np.array([rows * pixel, cols * pixel])
    frame = _Frame(config.shape, spacing, math.radians(rotation),
                   ((rows - 1) / 2 * pixel + shift[0], (cols - 1) / 2 * pixel + shift[1]))
    origin = (round(-(cols - 1) / 2 * pixel, 2), round(-(rows - 1) / 2 * pixel, 2),
              round(-float(rng.uniform(150, 350)), 2))
    demographics = (int(rng.integers(config.age_years[0], config.age_years[1] + 1)),
                    "M" if rng.random() < 0.5 else "F",
                    datetime.date(2019, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 2190))),
                    int(rng.choice([100, 120])))
    chest = _draw_chest_parameters(rng, frame)
    hu, lung = _draw_chest(chest, frame, rng)
    scale = float(np.clip(chest.cavity_a / 75.0, 0.4, 1.0))  # small fields of view get thinner tubes
    vessels = _vessel_trees(rng, chest, scale)
    _draw_tubes(hu, frame, vessels, _airways(rng, chest, scale), rng)
    drawn: list[_DrawnNodule] = []
    taken: list[tuple[Vector, float]] = []
    for _ in range(_nodule_count(rng, config)):
        design = _design_nodule(rng, config, chest, vessels, taken)
        nodule = _draw_nodule(hu, lung, frame, design, rng) if design is not None else None
        if design is not None and nodule is not None:
            taken.append((design.centre, design.radius))
            drawn.append(nodule)
    hu = _reconstruct(hu, kernel, noise_sd, spacing, rng)
    hu[:, _outside_reconstruction_circle(rows, cols)] = HU_MIN
    labels = np.zeros(config.shape, np.uint8)
    nodules = [_label_and_measure(nodule, i + 1, hu, labels, lung, frame, origin) for i, nodule in enumerate(drawn)]
    age, sex, study_date, kvp = demographics
    return SimulatedStudy(hu=hu, labels=labels, lung_mask=lung > 0, nodules=nodules, spacing_mm=spacing,
                          origin_lps_mm=origin, kernel=kernel, noise_sd_hu=noise_sd, rotation_deg=round(rotation, 2),
                          kvp=kvp, patient_age_years=age, patient_sex=sex,  # type: ignore[arg-type]
                          study_date=study_date, config=config)


def _uid(config: SimulationConfig, name: str) -> UID:
    return generate_uid(entropy_srcs=["tessera-nodule-simulator", config.digest(), name])


# --------------------------------------------------------------------------------------------------
# DICOM series and ground truth files.


def _ds(value: float) -> str:
    """A decimal string short enough for DS (16 characters)."""
    return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.1f}"


def _stored_slices(study: SimulatedStudy, pixel_representation: Literal["int16", "uint12"],
                   pad_outside_fov: bool) -> NDArray[np.integer]:
    """Stored values (HU - intercept) of every slice; the padding value outside the reconstruction circle."""
    stored = np.rint(study.hu).astype(np.int32) - RESCALE_INTERCEPT
    if pixel_representation == "uint12":
        return np.clip(stored, 0, 4095).astype(np.uint16)
    stored = stored.astype(np.int16)
    if pad_outside_fov:
        stored[:, _outside_reconstruction_circle(stored.shape[1], stored.shape[2])] = PADDING_STORED
    return stored


def _outside_reconstruction_circle(rows: int, cols: int) -> NDArray[np.bool_]:
    """Pixels outside the circle a scanner reconstructs (diameter: the smaller image side)."""
    row, col = np.ogrid[:rows, :cols]
    return ((row - (rows - 1) / 2) ** 2 + (col - (cols - 1) / 2) ** 2) > (min(rows, cols) / 2) ** 2


def _series_attributes(study: SimulatedStudy, *, patient_id: str, patient_name: str, age: int, sex: str,
                       study_date: datetime.date, series_number: int) -> dict[str, object]:
    """Every attribute shared by the series' instances: patient, study, series, equipment, CT image."""
    uids = study.uids()
    date = study_date.strftime("%Y%m%d")
    birth = study_date.replace(year=study_date.year - age, day=1) - datetime.timedelta(days=1)
    _, rows, cols = study.hu.shape
    return {
        "SpecificCharacterSet": "ISO_IR 100", "SOPClassUID": CTImageStorage,
        "PatientName": patient_name, "PatientID": patient_id, "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex, "PatientAge": f"{age:03d}Y",
        "StudyInstanceUID": uids["StudyInstanceUID"], "StudyDate": date, "StudyTime": "093000",
        "ReferringPhysicianName": "", "StudyID": study.config.digest()[:8].upper(),
        "AccessionNumber": f"SIM{study.config.digest()[:12].upper()}",
        "StudyDescription": "SIMULATED CHEST CT",
        "Modality": "CT", "SeriesInstanceUID": uids["SeriesInstanceUID"], "SeriesNumber": series_number,
        "SeriesDate": date, "SeriesTime": "093100", "BodyPartExamined": "CHEST", "PatientPosition": "HFS",
        "SeriesDescription": f"Simulated chest CT, {study.kernel} kernel",
        "FrameOfReferenceUID": uids["FrameOfReferenceUID"], "PositionReferenceIndicator": "",
        "Manufacturer": MANUFACTURER, "ManufacturerModelName": MODEL_NAME, "SoftwareVersions": "1",
        "InstitutionName": "Simulated", "StationName": "SIMULATOR",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "AcquisitionNumber": 1, "AcquisitionDate": date,
        "ContentDate": date, "BurnedInAnnotation": "NO",
        "ImageComments": "SIMULATED DATA: generated by a simulator, not acquired from a patient",
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "PixelSpacing": [_ds(study.spacing_mm[1]), _ds(study.spacing_mm[2])],
        "SliceThickness": _ds(study.spacing_mm[0]),
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "Rows": rows, "Columns": cols,
        "BitsAllocated": 16, "RescaleIntercept": str(RESCALE_INTERCEPT), "RescaleSlope": "1", "RescaleType": "HU",
        "KVP": str(study.kvp), "ConvolutionKernel": study.convolution_kernel,
        "ReconstructionDiameter": _ds(min(rows, cols) * study.spacing_mm[1]),
        "DataCollectionDiameter": "500", "GantryDetectorTilt": "0", "TableHeight": "150",
        "RotationDirection": "CW", "XRayTubeCurrent": 100 if study.kvp == 120 else 150, "ExposureTime": 500,
        "WindowCenter": ["-600", "40"], "WindowWidth": ["1500", "400"],
        "WindowCenterWidthExplanation": ["LUNG", "MEDIASTINUM"],
    }


def write_dicom_series(
    study: SimulatedStudy,
    directory: Path | str,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str | None = None,
    patient_name: str | None = None,
    age: int | None = None,
    sex: Literal["M", "F"] | None = None,
    study_date: datetime.date | None = None,
    series_number: int = 1,
    pixel_representation: Literal["int16", "uint12"] = "int16",
    pad_outside_fov: bool = True,
) -> list[Path]:
    """Write ``study`` as CT Image Storage instances, one file per slice (``CT0001.dcm`` ...).

    Parameters
    ----------
    transfer_syntax:
        Explicit or Implicit VR Little Endian, or any syntax pydicom can compress to (RLE Lossless,
        JPEG 2000 Lossless with pylibjpeg-openjpeg).
    patient_id, patient_name, age, sex, study_date:
        Override the study's simulated demographics (the default patient id is ``SIM-<digest>``).
    pixel_representation:
        ``int16``: signed, 16 bits stored, rescale intercept -1024; ``uint12``: unsigned, 12 bits stored.
    pad_outside_fov:
        For ``int16``, store PixelPaddingValue -2000 (HU -3024) outside the reconstruction circle.

    Returns
    -------
    The paths written, in slice order (slice ``k`` at ImagePositionPatient ``origin + k * spacing``
    along +z). UIDs come from the study's seed and configuration: rewriting gives the same files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    syntax = UID(transfer_syntax)
    stored = _stored_slices(study, pixel_representation, pad_outside_fov and pixel_representation == "int16")
    digest = study.config.digest()
    common = _series_attributes(
        study, patient_id=patient_id or f"SIM-{digest[:10].upper()}",
        patient_name=patient_name or f"SIMULATED^{digest[:6].upper()}",
        age=study.patient_age_years if age is None else age, sex=sex or study.patient_sex,
        study_date=study_date or study.study_date, series_number=series_number)
    signed = pixel_representation == "int16"
    pixel = {"BitsStored": 16 if signed else 12, "HighBit": 15 if signed else 11, "PixelRepresentation": int(signed)}
    if signed and pad_outside_fov:
        pixel["PixelPaddingValue"] = PADDING_STORED
    paths = []
    for k, slice_values in enumerate(stored):
        dataset = Dataset()
        for keyword, value in {**common, **pixel}.items():
            setattr(dataset, keyword, value)
        position = study.voxel_to_lps((k, 0, 0))
        dataset.SOPInstanceUID = _uid(study.config, f"SOPInstanceUID/{series_number}/{k}")
        dataset.InstanceCreationDate = common["StudyDate"]
        dataset.InstanceNumber = k + 1
        dataset.ContentTime = f"0931{k % 60:02d}"
        dataset.ImagePositionPatient = [_ds(v) for v in position]
        dataset.SliceLocation = _ds(position[2])
        dataset.file_meta = _file_meta(dataset.SOPInstanceUID)
        dataset.PixelData = slice_values.tobytes()
        if syntax.is_compressed:
            dataset.compress(syntax, slice_values, generate_instance_uid=False)
        else:
            dataset.file_meta.TransferSyntaxUID = syntax
        path = directory / f"CT{k + 1:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TESSERA_SIM_1"
    return meta


def ground_truth(study: SimulatedStudy) -> dict[str, object]:
    """The study's ground truth as JSON-ready data (what :func:`write_ground_truth` writes)."""
    return {
        "simulated": True,
        "note": "Simulated chest CT: no patient data; every value measured on the simulator's own drawing.",
        **study.uids(),
        "seed": study.config.seed, "config": dataclasses.asdict(study.config),
        "shape_zyx": list(study.hu.shape), "spacing_zyx_mm": list(study.spacing_mm),
        "origin_lps_mm": list(study.origin_lps_mm), "image_orientation_patient": [1, 0, 0, 0, 1, 0],
        "kernel": study.kernel, "convolution_kernel": study.convolution_kernel, "noise_sd_hu": study.noise_sd_hu,
        "kvp": study.kvp, "rotation_deg": study.rotation_deg, "patient_age_years": study.patient_age_years,
        "patient_sex": study.patient_sex, "study_date": study.study_date.isoformat(),
        "nodules": [{**dataclasses.asdict(n), "mean_diameter_mm": round(n.mean_diameter_mm, 2)}
                    for n in study.nodules],
    }


def write_ground_truth(study: SimulatedStudy, path: Path | str) -> Path:
    """Write :func:`ground_truth` as JSON to ``path``; return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ground_truth(study), indent=2))
    return path


def _study_seed(seed: int, index: int) -> int:
    """Study ``index`` of a run: seeds derived from (seed, index), so runs with other seeds share none."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def main(argv: list[str] | None = None) -> int:
    """``tessera simulate nodule``: write simulated chest CT studies as DICOM series with ground truth.

    Each study gets a folder ``study_<n>`` with ``series/CT<k>.dcm``, ``truth.json`` and
    ``labels.npz`` (the nodule label volume, z y x).
    """
    parser = argparse.ArgumentParser(prog="tessera simulate nodule", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--studies", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="64,256,256", help="slices,rows,cols")
    parser.add_argument("--max-rotation-deg", type=float, default=0.0)
    parser.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        parser.error("--shape takes three integers: slices,rows,cols")
    for index in range(args.studies):
        config = SimulationConfig(seed=_study_seed(args.seed, index), shape=shape,  # type: ignore[arg-type]
                                  max_rotation_deg=args.max_rotation_deg)
        study = simulate_study(config)
        folder = args.out / f"study_{index:04d}"
        paths = write_dicom_series(study, folder / "series", transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax])
        write_ground_truth(study, folder / "truth.json")
        np.savez_compressed(folder / "labels.npz", labels=study.labels)
        kinds = ", ".join(f"{n.nodule_type} {n.mean_diameter_mm:.1f} mm" for n in study.nodules) or "no nodule"
        print(f"{folder}: {len(paths)} slices, {study.spacing_mm[1]:.3f} x {study.spacing_mm[0]} mm, "
              f"{study.kernel} kernel; {kinds} (simulated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
