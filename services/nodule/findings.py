"""What the detector finds in one CT series: nodules with measurements, and their label volume.

The hand-over between the nodule vertical's rooms: the detector (:mod:`services.nodule.detect`)
produces a :class:`SeriesFindings` from an assembled :class:`~services.nodule.volume.SeriesVolume`;
risk fusion (:mod:`services.nodule.risk`) adds malignancy and Lung-RADS; the report writers
(:mod:`services.nodule.report`) turn it into DICOM SR, SEG and key images; the API shows it as JSON
(:mod:`services.nodule.schemas`).

Coordinates: voxel indices are ``(slice, row, column)`` = ``(z, y, x)`` into
``SeriesVolume.hu``; patient coordinates are DICOM LPS millimetres ``(x, y, z)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.nodule.schemas import NoduleType


@dataclass(frozen=True)
class DetectedNodule:
    """One nodule as the detector measured it.

    Attributes
    ----------
    label : int
        Its value in :attr:`SeriesFindings.labels` (1, 2, ...).
    centre_voxel : tuple of float
        ``(slice, row, column)`` of its centroid.
    centre_lps_mm : tuple of float
        The same point in patient LPS millimetres ``(x, y, z)``.
    long_axis_mm, short_axis_mm : float
        Longest in-plane diameter on the axial slice where the nodule is largest, and the longest
        diameter perpendicular to it on that slice (as Lung-RADS and radiologists measure).
    volume_mm3 : float
        Voxel count x voxel volume of its segmentation.
    mean_hu : float
        Mean attenuation over its segmentation.
    nodule_type : NoduleType
        Solid, part-solid or ground-glass, from its attenuation.
    solid_component_mm : float or None
        Mean diameter of the solid core of a part-solid nodule (Lung-RADS needs it), else ``None``.
    confidence : float
        Detector confidence in [0, 1].
    """

    label: int
    centre_voxel: tuple[float, float, float]
    centre_lps_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    nodule_type: NoduleType
    confidence: float
    solid_component_mm: float | None = None

    @property
    def mean_diameter_mm(self) -> float:
        """Mean of the long and short axis (mm), the size Lung-RADS and the Brock model use."""
        return (self.long_axis_mm + self.short_axis_mm) / 2.0


@dataclass(frozen=True, eq=False)
class SeriesFindings:
    """The detector's answer for one series: its nodules and a label volume of their segmentations.

    Attributes
    ----------
    series_instance_uid, study_instance_uid : str
        The analysed series and its study.
    nodules : tuple of DetectedNodule
        Sorted by confidence, highest first.
    labels : numpy.ndarray
        ``(slice, row, column)`` uint16 volume, same shape as the series' HU volume: 0 background,
        ``nodule.label`` inside each nodule.
    model_version : str
        The detector version that produced it (the runtime's served version).
    """

    series_instance_uid: str
    study_instance_uid: str
    nodules: tuple[DetectedNodule, ...]
    labels: np.ndarray
    model_version: str
    notes: tuple[str, ...] = field(default=())
