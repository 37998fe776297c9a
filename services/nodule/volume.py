"""CT volume assembly: from a study's instances to HU volumes in patient (LPS) space.

:func:`assemble_series` groups instances by SeriesInstanceUID, splits a series into stacks of one
orientation, image size, pixel spacing and acquisition, sorts each stack along its slice normal,
measures the slice spacing from ImagePositionPatient (never from SliceThickness), checks it is
uniform, decodes the pixels through pydicom's handlers (JPEG 2000 and JPEG-LS through pylibjpeg,
RLE, deflate) and converts them to Hounsfield units. Each stack becomes a :class:`SeriesVolume`;
everything that cannot be assembled becomes a :class:`SeriesError` with a machine code, a reason
and the instances it concerns. One bad series never stops the rest of the study.

Conventions (those of SimpleITK/ITK images, which MONAI's ITK reader also follows):

- ``hu`` is indexed ``(slice, row, column)``, i.e. ``(z, y, x)``, and ``spacing_mm`` follows it;
- patient coordinates are DICOM LPS millimetres (x to the patient's left, y to posterior, z to
  head); ``origin_lps`` is the centre of voxel ``(0, 0, 0)``;
- ``direction`` holds the unit row direction (column index grows), column direction (row index
  grows) and slice normal (their cross product; slice index grows) as its columns.

Tolerances, in one place:

- orientations agree when every direction cosine is within :data:`ORIENTATION_TOLERANCE`;
- two slices share a position when they are within :data:`POSITION_TOLERANCE_MM` along the normal;
- spacing is uniform when every step is within :data:`SPACING_RELATIVE_TOLERANCE` of the median
  step (highdicom's default) or :data:`SPACING_ABSOLUTE_TOLERANCE_MM`, whichever is larger; a step
  of :data:`GAP_FACTOR` times the median or more is reported as missing slices;
- a stack is tilted when GantryDetectorTilt exceeds :data:`TILT_TAG_TOLERANCE_DEG` or when stacking
  the slices along the normal would misplace one by more than :data:`TILT_OFFSET_TOLERANCE_PIXELS`
  pixel in plane.

Patient identifiers and demographics are carried for the report and the risk model but never put
in a message or a ``repr``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_CT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

AIR_HU = -1024.0
MAX_HU = 3071.0
DEFAULT_MIN_SLICES = 3

ORIENTATION_TOLERANCE = 1e-3
DIRECTION_COSINE_TOLERANCE = 1e-2  # unit length and perpendicularity of a header's own cosines
PIXEL_SPACING_TOLERANCE_MM = 1e-3
POSITION_TOLERANCE_MM = 0.01
SPACING_RELATIVE_TOLERANCE = 0.01
SPACING_ABSOLUTE_TOLERANCE_MM = 0.01
GAP_FACTOR = 1.5
TILT_TAG_TOLERANCE_DEG = 0.01
TILT_OFFSET_TOLERANCE_PIXELS = 0.5

_MAX_LISTED = 3  # gaps or reasons spelled out in one message


class ErrorCode(StrEnum):
    """Why a series, a stack of it or some of its instances could not be assembled."""

    UNREADABLE = "unreadable"
    MISSING_UID = "missing_uid"
    NOT_CT = "not_ct"
    UNSUPPORTED_SOP_CLASS = "unsupported_sop_class"
    MISSING_GEOMETRY = "missing_geometry"
    MIXED_SERIES = "mixed_series"
    GANTRY_TILT = "gantry_tilt"
    DUPLICATE_SLICE = "duplicate_slice"
    TOO_FEW_SLICES = "too_few_slices"
    MISSING_SLICES = "missing_slices"
    NONUNIFORM_SPACING = "nonuniform_spacing"
    UNDECODABLE = "undecodable"
    ASSEMBLY_FAILED = "assembly_failed"


@dataclass(frozen=True)
class InstanceHeader:
    """What assembly needs from one instance's header (read without its pixel data).

    ``image_orientation`` is the six direction cosines (row direction, then column direction),
    ``pixel_spacing`` is ``(row spacing, column spacing)`` in mm as DICOM stores it. Absent or
    unparsable values are ``None``; absent rescale values default to slope 1, intercept 0.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    modality: str | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    acquisition_number: int | None
    instance_number: int | None
    rescale_slope: float
    rescale_intercept: float
    pixel_padding_value: int | None
    pixel_padding_range_limit: int | None
    gantry_detector_tilt: float | None
    convolution_kernel: str | None
    slice_thickness: float | None
    transfer_syntax_uid: str | None
    path: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    patient_age: str | None = field(default=None, repr=False)
    patient_sex: str | None = field(default=None, repr=False)

    @classmethod
    def from_dataset(cls, dataset: Dataset, path: str | None = None) -> InstanceHeader:
        """Read the header fields of ``dataset`` (pixel data is not touched).

        Parameters
        ----------
        dataset:
            A CT instance, with or without its pixel data.
        path:
            The file it came from, if any; kept so the pixels can be read later.
        """
        file_meta = getattr(dataset, "file_meta", None)
        transfer_syntax = _text(file_meta, "TransferSyntaxUID") if file_meta is not None else None
        slope = _number(dataset, "RescaleSlope")
        intercept = _number(dataset, "RescaleIntercept")
        return cls(
            sop_class_uid=_text(dataset, "SOPClassUID"),
            sop_instance_uid=_text(dataset, "SOPInstanceUID"),
            study_instance_uid=_text(dataset, "StudyInstanceUID"),
            series_instance_uid=_text(dataset, "SeriesInstanceUID"),
            frame_of_reference_uid=_text(dataset, "FrameOfReferenceUID"),
            modality=_text(dataset, "Modality"),
            image_position=_numbers(dataset, "ImagePositionPatient", 3),  # type: ignore[arg-type]
            image_orientation=_numbers(dataset, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
            pixel_spacing=_numbers(dataset, "PixelSpacing", 2),  # type: ignore[arg-type]
            rows=_integer(dataset, "Rows"),
            columns=_integer(dataset, "Columns"),
            acquisition_number=_integer(dataset, "AcquisitionNumber"),
            instance_number=_integer(dataset, "InstanceNumber"),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            pixel_padding_value=_integer(dataset, "PixelPaddingValue"),
            pixel_padding_range_limit=_integer(dataset, "PixelPaddingRangeLimit"),
            gantry_detector_tilt=_number(dataset, "GantryDetectorTilt"),
            convolution_kernel=_text(dataset, "ConvolutionKernel"),
            slice_thickness=_number(dataset, "SliceThickness"),
            transfer_syntax_uid=transfer_syntax,
            path=path,
            patient_id=_text(dataset, "PatientID"),
            patient_age=_text(dataset, "PatientAge"),
            patient_sex=_text(dataset, "PatientSex"),
        )


def read_header(path: str | os.PathLike[str]) -> InstanceHeader:
    """Read one file's header with ``pydicom.dcmread(stop_before_pixels=True)``.

    Raises
    ------
    pydicom.errors.InvalidDicomError, OSError
        When the file is not DICOM or cannot be read.
    """
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceHeader.from_dataset(dataset, path=os.fspath(path))


def stored_to_hu(stored: np.ndarray, header: InstanceHeader) -> np.ndarray:
    """Convert stored pixel values to Hounsfield units.

    ``HU = stored * RescaleSlope + RescaleIntercept``; pixels equal to PixelPaddingValue (or within
    the PixelPaddingRangeLimit range) become air (-1024 HU); the result is clipped to
    [-1024, 3071] HU.

    Parameters
    ----------
    stored:
        (rows, columns) stored values as decoded by pydicom.
    header:
        The instance's header (rescale and padding).

    Returns
    -------
    np.ndarray
        (rows, columns) float32 in HU.
    """
    hu = stored.astype(np.float32) * np.float32(header.rescale_slope) + np.float32(header.rescale_intercept)
    padding = _padding_mask(stored, header)
    if padding is not None:
        hu[padding] = AIR_HU
    return np.clip(hu, AIR_HU, MAX_HU, out=hu)


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """One assembled stack of a CT series.

    Attributes
    ----------
    hu:
        (slices, rows, columns) = (z, y, x) float32 in HU, slices ordered along ``direction[:, 2]``.
    spacing_mm:
        (z, y, x) voxel spacing in mm; z measured from ImagePositionPatient.
    origin_lps:
        (x, y, z) LPS position in mm of the centre of voxel (0, 0, 0).
    direction:
        3x3; columns are the row direction, column direction and slice normal, as LPS unit vectors.
    sop_instance_uids:
        The source instances, one per slice, in slice order.
    source_paths:
        The file each slice was read from (``None`` for in-memory datasets), in slice order.
    stack_label:
        Empty when the series is one stack; otherwise what sets this stack apart
        (e.g. ``"acquisition 2"``).
    notes:
        Things assembly tolerated (ignored duplicates, a split series), no patient data.
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction: np.ndarray
    sop_instance_uids: tuple[str, ...]
    source_paths: tuple[str | None, ...]
    convolution_kernel: str | None
    slice_thickness_mm: float | None
    stack_label: str = ""
    notes: tuple[str, ...] = ()
    patient_id: str | None = field(default=None, repr=False)
    patient_age_years: float | None = field(default=None, repr=False)
    patient_sex: str | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        slices, rows, columns = self.hu.shape
        return slices, rows, columns

    @property
    def index_to_lps(self) -> np.ndarray:
        """4x4 affine from homogeneous ``(slice, row, column, 1)`` to ``(x, y, z, 1)`` LPS mm."""
        affine = np.eye(4)
        axes_in_index_order = self.direction[:, ::-1]  # normal, column direction, row direction
        affine[:3, :3] = axes_in_index_order * np.asarray(self.spacing_mm)
        affine[:3, 3] = self.origin_lps
        return affine

    def voxel_to_lps(self, index: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map voxel indices to patient coordinates.

        Parameters
        ----------
        index:
            (3,) or (N, 3) ``(slice, row, column)`` indices, fractional allowed.

        Returns
        -------
        np.ndarray
            (3,) or (N, 3) ``(x, y, z)`` LPS in mm.
        """
        indices = np.asarray(index, dtype=np.float64)
        affine = self.index_to_lps
        return indices @ affine[:3, :3].T + affine[:3, 3]

    def lps_to_voxel(self, point: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map patient coordinates to (fractional) voxel indices; inverse of :meth:`voxel_to_lps`.

        Parameters
        ----------
        point:
            (3,) or (N, 3) ``(x, y, z)`` LPS in mm.

        Returns
        -------
        np.ndarray
            (3,) or (N, 3) ``(slice, row, column)`` float indices.
        """
        points = np.asarray(point, dtype=np.float64)
        affine = self.index_to_lps
        return np.linalg.solve(affine[:3, :3], (points - affine[:3, 3]).T).T


@dataclass(frozen=True)
class SeriesError:
    """Why a series, one stack of it, or some of its instances could not be used.

    Attributes
    ----------
    series_instance_uid:
        The series ("" when the instances carry none, or cannot be read).
    code:
        A short machine code (:class:`ErrorCode`, compares equal to its string).
    message:
        A human reason, naming positions and counts but no patient data.
    sop_instance_uids:
        The instances concerned.
    paths:
        Their files, where known (the only handle on a file that is not readable DICOM).
    stack_label:
        Which stack of a split series, empty otherwise.
    """

    series_instance_uid: str
    code: ErrorCode
    message: str
    sop_instance_uids: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    stack_label: str = ""


SeriesResult = SeriesVolume | SeriesError
InstanceSource = str | os.PathLike[str] | Dataset


def assemble_series(sources: Iterable[InstanceSource], *, min_slices: int = DEFAULT_MIN_SLICES) -> list[SeriesResult]:
    """Assemble every CT series found among ``sources`` into HU volumes.

    Parameters
    ----------
    sources:
        File paths and/or pydicom datasets, in any order, possibly of several series.
        Files are read header-first; pixels are decoded only for stacks whose geometry passes.
    min_slices:
        Fewest distinct slice positions a stack needs (at least 2; 3 lets the spacing be checked).

    Returns
    -------
    list[SeriesVolume | SeriesError]
        One or more entries per series, in the order series were first seen: a volume per stack
        that assembles, an error per stack or group of instances that does not. Files that cannot
        be attributed to a series come last. Never raises for bad input data.
    """
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2, got {min_slices}")
    candidates, results = _read_candidates(sources)
    by_series, unattributed = _group_by_series(candidates)
    series_results: list[SeriesResult] = []
    for series_uid, members in by_series.items():
        series_results.extend(_assemble_one_series_safely(series_uid, members, min_slices))
    return series_results + unattributed + results


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    header: InstanceHeader
    dataset: Dataset | None  # in-memory input; None means the pixels are read from header.path

    @property
    def uid(self) -> str:
        return self.header.sop_instance_uid or ""


def _read_candidates(sources: Iterable[InstanceSource]) -> tuple[list[_Candidate], list[SeriesResult]]:
    candidates: list[_Candidate] = []
    unreadable: list[str] = []
    reasons: list[str] = []
    for source in sources:
        try:
            if isinstance(source, Dataset):
                candidates.append(_Candidate(InstanceHeader.from_dataset(source), source))
            else:
                candidates.append(_Candidate(read_header(source), None))
        except Exception as exc:  # pydicom raises many types for damaged files; each is one bad file
            unreadable.append(os.fspath(source) if not isinstance(source, Dataset) else "<dataset>")
            reasons.append(_short_reason(exc))
    if not unreadable:
        return candidates, []
    message = f"{len(unreadable)} file(s) are not readable DICOM: {_listed(reasons)}"
    return candidates, [SeriesError("", ErrorCode.UNREADABLE, message, paths=tuple(unreadable))]


def _group_by_series(candidates: list[_Candidate]) -> tuple[dict[str, list[_Candidate]], list[SeriesResult]]:
    by_series: dict[str, list[_Candidate]] = {}
    without_uid: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        series_uid = candidate.header.series_instance_uid
        if series_uid and candidate.header.sop_instance_uid:
            by_series.setdefault(series_uid, []).append(candidate)
        else:
            without_uid.setdefault(series_uid or "", []).append(candidate)
    errors: list[SeriesResult] = []
    for series_uid, members in without_uid.items():
        missing = "SOPInstanceUID" if series_uid else "SeriesInstanceUID/SOPInstanceUID"
        errors.append(
            SeriesError(
                series_uid,
                ErrorCode.MISSING_UID,
                f"{len(members)} instance(s) have an empty {missing}; they cannot be grouped or referenced",
                paths=tuple(m.header.path for m in members if m.header.path),
            )
        )
    return by_series, errors


# --- one series ----------------------------------------------------------------------------------


def _assemble_one_series_safely(series_uid: str, members: list[_Candidate], min_slices: int) -> list[SeriesResult]:
    """One catch-all per series, so input nobody foresaw costs that series and not the study."""
    try:
        return _assemble_one_series(series_uid, members, min_slices)
    except Exception as exc:
        message = f"assembly failed unexpectedly ({type(exc).__name__}); the rest of the study is kept"
        return [_error(series_uid, ErrorCode.ASSEMBLY_FAILED, message, members)]


def _assemble_one_series(series_uid: str, members: list[_Candidate], min_slices: int) -> list[SeriesResult]:
    results: list[SeriesResult] = []
    members, notes = _drop_repeated_sop_instances(members)
    members = _keep_ct(series_uid, members, results)
    members = _keep_with_geometry(series_uid, members, results)
    if not members:
        return results
    stacks = _split_into_stacks(members)
    if len(stacks) > 1:
        notes.append(f"series split into {len(stacks)} stacks by {_differing_attributes(stacks)}")
    for stack in stacks:
        if len(stacks) > 1 and _distinct_position_count(stack) < min_slices:
            results.append(_mixed_series_error(series_uid, stack, stacks))
            continue
        results.extend(_assemble_stack(series_uid, stack, min_slices, tuple(notes)))
    return results


def _drop_repeated_sop_instances(members: list[_Candidate]) -> tuple[list[_Candidate], list[str]]:
    """The same SOP instance received twice is one instance (a PACS may resend)."""
    unique: dict[str, _Candidate] = {}
    for candidate in members:
        unique.setdefault(candidate.uid, candidate)
    repeated = len(members) - len(unique)
    notes = [f"{repeated} repeated SOP instance(s) ignored"] if repeated else []
    return list(unique.values()), notes


def _keep_ct(series_uid: str, members: list[_Candidate], results: list[SeriesResult]) -> list[_Candidate]:
    kept: list[_Candidate] = []
    refused: dict[ErrorCode, list[tuple[_Candidate, str]]] = {}
    for candidate in members:
        problem = _ct_problem(candidate.header)
        if problem is None:
            kept.append(candidate)
        else:
            refused.setdefault(problem[0], []).append((candidate, problem[1]))
    for code, items in refused.items():
        reasons = sorted({reason for _, reason in items})
        message = f"{len(items)} instance(s) are not single-frame CT images: {_listed(reasons)}"
        results.append(_error(series_uid, code, message, [candidate for candidate, _ in items]))
    return kept


def _ct_problem(header: InstanceHeader) -> tuple[ErrorCode, str] | None:
    sop_class, modality = header.sop_class_uid, header.modality
    if sop_class in MULTIFRAME_CT_STORAGE:
        return ErrorCode.UNSUPPORTED_SOP_CLASS, f"{MULTIFRAME_CT_STORAGE[sop_class]} is not supported"
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        return ErrorCode.NOT_CT, f"SOP class {sop_class} is not CT Image Storage"
    if modality and modality != "CT":
        return ErrorCode.NOT_CT, f"Modality is {modality}"
    if not sop_class and not modality:
        return ErrorCode.NOT_CT, "neither SOPClassUID nor Modality says CT"
    return None


def _keep_with_geometry(series_uid: str, members: list[_Candidate], results: list[SeriesResult]) -> list[_Candidate]:
    kept: list[_Candidate] = []
    broken: list[tuple[_Candidate, str]] = []
    for candidate in members:
        problem = _geometry_problem(candidate.header)
        if problem is None:
            kept.append(candidate)
        else:
            broken.append((candidate, problem))
    if broken:
        reasons = sorted({reason for _, reason in broken})
        message = f"{len(broken)} instance(s) cannot be placed in patient space: {_listed(reasons)}"
        results.append(_error(series_uid, ErrorCode.MISSING_GEOMETRY, message, [c for c, _ in broken]))
    return kept


def _geometry_problem(header: InstanceHeader) -> str | None:
    missing = [
        name
        for name, value in (
            ("ImagePositionPatient", header.image_position),
            ("ImageOrientationPatient", header.image_orientation),
            ("PixelSpacing", header.pixel_spacing),
            ("Rows", header.rows),
            ("Columns", header.columns),
        )
        if value is None
    ]
    if missing:
        return "missing or unreadable " + ", ".join(missing)
    assert header.image_orientation is not None and header.pixel_spacing is not None
    row, column = np.asarray(header.image_orientation[:3]), np.asarray(header.image_orientation[3:])
    if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(column) - 1)) > DIRECTION_COSINE_TOLERANCE:
        return "ImageOrientationPatient cosines are not unit vectors"
    if abs(float(row @ column)) > DIRECTION_COSINE_TOLERANCE:
        return "ImageOrientationPatient row and column are not perpendicular"
    if min(header.pixel_spacing) <= 0:
        return "PixelSpacing is not positive"
    return None


# --- stacks --------------------------------------------------------------------------------------


@dataclass
class _Stack:
    orientation: np.ndarray  # (6,) as found on the first member
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    acquisition_number: int | None
    members: list[_Candidate]
    label: str = ""

    @property
    def row_direction(self) -> np.ndarray:
        row = self.orientation[:3]
        return row / np.linalg.norm(row)

    @property
    def column_direction(self) -> np.ndarray:
        column = self.orientation[3:]
        return column / np.linalg.norm(column)

    @property
    def normal(self) -> np.ndarray:
        normal = np.cross(self.row_direction, self.column_direction)
        return normal / np.linalg.norm(normal)

    def positions_along_normal(self) -> np.ndarray:
        return np.array([_position(c) for c in self.members]) @ self.normal

    def accepts(self, header: InstanceHeader) -> bool:
        assert header.image_orientation is not None and header.pixel_spacing is not None
        return (
            header.rows == self.rows
            and header.columns == self.columns
            and np.allclose(header.image_orientation, self.orientation, atol=ORIENTATION_TOLERANCE, rtol=0)
            and np.allclose(header.pixel_spacing, self.pixel_spacing, atol=PIXEL_SPACING_TOLERANCE_MM, rtol=0)
        )


def _split_into_stacks(members: list[_Candidate]) -> list[_Stack]:
    geometry_groups: list[_Stack] = []
    for candidate in members:
        header = candidate.header
        group = next((stack for stack in geometry_groups if stack.accepts(header)), None)
        if group is None:
            assert header.image_orientation is not None and header.pixel_spacing is not None
            assert header.rows is not None and header.columns is not None
            group = _Stack(
                np.asarray(header.image_orientation, dtype=np.float64),
                header.rows,
                header.columns,
                header.pixel_spacing,
                header.acquisition_number,
                [],
            )
            geometry_groups.append(group)
        group.members.append(candidate)
    stacks = [stack for group in geometry_groups for stack in _split_by_acquisition(group)]
    if len(stacks) > 1:
        for stack in stacks:
            stack.label = _stack_label(stack, stacks)
    return stacks


def _split_by_acquisition(group: _Stack) -> list[_Stack]:
    """Split by AcquisitionNumber only where acquisitions repeat positions (e.g. two phases).

    Axial-mode scanners number each table position as its own acquisition; those acquisitions
    cover disjoint ranges and belong to one volume.
    """
    by_acquisition: dict[int | None, list[_Candidate]] = {}
    for candidate in group.members:
        by_acquisition.setdefault(candidate.header.acquisition_number, []).append(candidate)
    if len(by_acquisition) == 1:
        group.acquisition_number = next(iter(by_acquisition))
        return [group]
    parts = [
        _Stack(group.orientation, group.rows, group.columns, group.pixel_spacing, number, members)
        for number, members in by_acquisition.items()
    ]
    positions = [part.positions_along_normal() for part in parts]
    if not _any_shared_position(positions):
        group.acquisition_number = None
        return [group]
    return parts


def _any_shared_position(position_sets: list[np.ndarray]) -> bool:
    for index, first in enumerate(position_sets):
        for second in position_sets[index + 1 :]:
            if np.min(np.abs(first[:, None] - second[None, :])) <= POSITION_TOLERANCE_MM:
                return True
    return False


def _stack_attributes(stack: _Stack) -> dict[str, str]:
    return {
        "orientation": "orientation " + ",".join(f"{value:.3g}" for value in stack.orientation),
        "image size": f"{stack.rows}x{stack.columns} pixels",
        "pixel spacing": f"pixel spacing {stack.pixel_spacing[0]:.4g}x{stack.pixel_spacing[1]:.4g} mm",
        "acquisition": (
            "no acquisition number" if stack.acquisition_number is None else f"acquisition {stack.acquisition_number}"
        ),
    }


def _stack_label(stack: _Stack, stacks: list[_Stack]) -> str:
    differing = _differing_attributes(stacks).split(", ")
    attributes = _stack_attributes(stack)
    return ", ".join(attributes[name] for name in differing if name in attributes)


def _differing_attributes(stacks: list[_Stack]) -> str:
    described = [_stack_attributes(stack) for stack in stacks]
    names = [name for name in described[0] if len({d[name] for d in described}) > 1]
    return ", ".join(names)


def _distinct_position_count(stack: _Stack) -> int:
    return len(_position_groups(np.sort(stack.positions_along_normal())))


def _mixed_series_error(series_uid: str, stack: _Stack, stacks: list[_Stack]) -> SeriesError:
    largest = max(len(other.members) for other in stacks)
    message = (
        f"series mixes {len(stacks)} stacks differing by {_differing_attributes(stacks)}; "
        f"{len(stack.members)} instance(s) with {stack.label} (largest stack: {largest}) "
        "are too few to make a volume and are left out"
    )
    return _error(series_uid, ErrorCode.MIXED_SERIES, message, stack.members, stack.label)


# --- one stack -----------------------------------------------------------------------------------


def _assemble_stack(series_uid: str, stack: _Stack, min_slices: int, notes: tuple[str, ...]) -> list[SeriesResult]:
    def fail(code: ErrorCode, message: str, members: Sequence[_Candidate]) -> list[SeriesResult]:
        return [_error(series_uid, code, message, members, stack.label)]

    tilt = _tilt_problem(stack)
    if tilt is not None:
        return fail(ErrorCode.GANTRY_TILT, tilt, stack.members)
    stack.members.sort(key=_position_sort_key(stack.normal))
    along = stack.positions_along_normal()
    groups = _position_groups(along)
    distinct = np.array([along[group[0]] for group in groups])
    problem = _count_or_spacing_problem(distinct, min_slices)
    if problem is not None:
        return fail(problem[0], problem[1], stack.members)

    hu, failures = _decode_stack(stack)
    results: list[SeriesResult] = []
    if failures:
        message = f"{len(failures)} instance(s) have undecodable pixel data: {_listed(sorted(set(failures.values())))}"
        failed = [stack.members[index] for index in failures]
        results.append(_error(series_uid, ErrorCode.UNDECODABLE, message, failed, stack.label))
    kept, duplicate_error, stack_notes = _resolve_positions(stack, groups, hu, failures)
    if duplicate_error is not None:
        return results + fail(ErrorCode.DUPLICATE_SLICE, duplicate_error[0], duplicate_error[1])
    if failures:
        problem = _count_or_spacing_problem(along[kept], min_slices)
        if problem is not None:
            suffix = f" after leaving out {len(failures)} undecodable instance(s)"
            return results + fail(problem[0], problem[1] + suffix, stack.members)
    volume_hu = hu if len(kept) == len(hu) else hu[kept]
    results.append(_build_volume(series_uid, stack, kept, volume_hu, notes + tuple(stack_notes)))
    return results


def _position_sort_key(normal: np.ndarray) -> Any:
    def key(candidate: _Candidate) -> tuple[float, int]:
        return float(_position(candidate) @ normal), candidate.header.instance_number or 0

    return key


def _tilt_problem(stack: _Stack) -> str | None:
    tilts = [abs(c.header.gantry_detector_tilt or 0.0) for c in stack.members]
    if max(tilts) > TILT_TAG_TOLERANCE_DEG:
        return f"GantryDetectorTilt is {max(tilts):g} degrees; tilted acquisitions need resampling"
    positions = np.array([_position(c) for c in stack.members])
    offsets = positions - positions[0]
    along = offsets @ stack.normal
    in_plane = offsets - np.outer(along, stack.normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] <= TILT_OFFSET_TOLERANCE_PIXELS * min(stack.pixel_spacing):
        return None
    angle = math.degrees(math.atan2(drift[worst], abs(along[worst])))
    return (
        f"slice positions drift {drift[worst]:.2f} mm in plane over {abs(along[worst]):.2f} mm along the "
        f"slice normal (about {angle:.1f} degrees): the slices are not stacked along their normal (gantry tilt)"
    )


def _position_groups(sorted_along: np.ndarray) -> list[list[int]]:
    """Indices of slices sharing a position (within tolerance), in order along the normal."""
    groups: list[list[int]] = []
    for index, value in enumerate(sorted_along):
        if groups and value - sorted_along[groups[-1][0]] <= POSITION_TOLERANCE_MM:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _count_or_spacing_problem(distinct_along: np.ndarray, min_slices: int) -> tuple[ErrorCode, str] | None:
    if len(distinct_along) < min_slices:
        return (
            ErrorCode.TOO_FEW_SLICES,
            f"{len(distinct_along)} distinct slice position(s); at least {min_slices} are needed for a volume",
        )
    steps = np.diff(distinct_along)
    expected = float(np.median(steps))
    tolerance = max(SPACING_RELATIVE_TOLERANCE * expected, SPACING_ABSOLUTE_TOLERANCE_MM)
    gaps = np.flatnonzero(steps >= GAP_FACTOR * expected)
    if len(gaps):
        described = [
            f"{steps[i]:.3g} mm between {distinct_along[i]:.2f} and {distinct_along[i + 1]:.2f} mm "
            f"(about {round(steps[i] / expected) - 1} slice(s) missing)"
            for i in gaps
        ]
        return (
            ErrorCode.MISSING_SLICES,
            f"slice spacing is {expected:.3g} mm but {len(gaps)} gap(s) along the slice normal: {_listed(described)}",
        )
    irregular = np.flatnonzero(np.abs(steps - expected) > tolerance)
    if len(irregular):
        described = [f"{steps[i]:.4g} mm after {distinct_along[i]:.2f} mm" for i in irregular]
        return (
            ErrorCode.NONUNIFORM_SPACING,
            f"slice spacing varies beyond ±{tolerance:.3g} mm around {expected:.4g} mm: {_listed(described)}",
        )
    return None


def _decode_stack(stack: _Stack) -> tuple[np.ndarray, dict[int, str]]:
    """Decode every slice into one (slices, rows, columns) HU array; failures by slice index."""
    hu = np.empty((len(stack.members), stack.rows, stack.columns), dtype=np.float32)
    failures: dict[int, str] = {}
    for index, candidate in enumerate(stack.members):
        try:
            hu[index] = stored_to_hu(_stored_pixels(candidate, stack.rows, stack.columns), candidate.header)
        except Exception as exc:  # pixel handlers raise many types (ValueError, RuntimeError, EOFError...)
            failures[index] = _short_reason(exc)
            hu[index] = AIR_HU
    return hu, failures


def _stored_pixels(candidate: _Candidate, rows: int, columns: int) -> np.ndarray:
    dataset = candidate.dataset
    if dataset is None:
        assert candidate.header.path is not None
        dataset = pydicom.dcmread(candidate.header.path)
    if "PixelData" not in dataset:
        raise ValueError("no PixelData")
    stored = dataset.pixel_array
    if stored.shape != (rows, columns):
        raise ValueError(f"decoded shape {stored.shape} is not Rows x Columns {(rows, columns)}")
    return stored


def _resolve_positions(
    stack: _Stack, groups: list[list[int]], hu: np.ndarray, failures: dict[int, str]
) -> tuple[list[int], tuple[str, list[_Candidate]] | None, list[str]]:
    """One decoded slice per position; identical copies are dropped, different ones are an error."""
    kept: list[int] = []
    dropped = 0
    for group in groups:
        decoded = [index for index in group if index not in failures]
        if not decoded:
            continue
        first = decoded[0]
        if any(not np.array_equal(hu[first], hu[other]) for other in decoded[1:]):
            position = stack.positions_along_normal()[first]
            message = (
                f"duplicate slice position: {len(decoded)} instances at {position:.2f} mm along the slice "
                "normal have different pixel data"
            )
            return kept, (message, [stack.members[index] for index in decoded]), []
        kept.append(first)
        dropped += len(decoded) - 1
    notes = [f"{dropped} instance(s) repeating a slice position with identical pixels ignored"] if dropped else []
    return kept, None, notes


def _build_volume(
    series_uid: str, stack: _Stack, kept: list[int], hu: np.ndarray, notes: tuple[str, ...]
) -> SeriesVolume:
    members = [stack.members[index] for index in kept]
    along = np.array([_position(member) for member in members]) @ stack.normal
    # The mean step puts the last slice exactly where its header says; the check bounded the rest.
    slice_spacing = round(float(along[-1] - along[0]) / (len(along) - 1), 6)
    first = members[0].header
    return SeriesVolume(
        series_instance_uid=series_uid,
        study_instance_uid=first.study_instance_uid or "",
        frame_of_reference_uid=first.frame_of_reference_uid,
        hu=hu,
        spacing_mm=(slice_spacing, stack.pixel_spacing[0], stack.pixel_spacing[1]),
        origin_lps=tuple(float(value) for value in _position(members[0])),  # type: ignore[arg-type]
        direction=np.column_stack([stack.row_direction, stack.column_direction, stack.normal]),
        sop_instance_uids=tuple(member.uid for member in members),
        source_paths=tuple(member.header.path for member in members),
        convolution_kernel=first.convolution_kernel,
        slice_thickness_mm=first.slice_thickness,
        stack_label=stack.label,
        notes=notes,
        patient_id=first.patient_id,
        patient_age_years=age_in_years(first.patient_age),
        patient_sex=first.patient_sex,
    )


# --- small helpers -------------------------------------------------------------------------------


_AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def age_in_years(patient_age: str | None) -> float | None:
    """Parse a DICOM Age String (``"065Y"``, ``"018M"``, ``"010W"``, ``"003D"``) into years."""
    if not patient_age or len(patient_age) < 2 or patient_age[-1] not in _AGE_UNIT_DAYS:
        return None
    try:
        count = int(patient_age[:-1])
    except ValueError:
        return None
    return count * _AGE_UNIT_DAYS[patient_age[-1]] / 365.25


def _padding_mask(stored: np.ndarray, header: InstanceHeader) -> np.ndarray | None:
    if header.pixel_padding_value is None:
        return None
    if header.pixel_padding_range_limit is None:
        return stored == header.pixel_padding_value
    low = min(header.pixel_padding_value, header.pixel_padding_range_limit)
    high = max(header.pixel_padding_value, header.pixel_padding_range_limit)
    return (stored >= low) & (stored <= high)


def _position(candidate: _Candidate) -> np.ndarray:
    assert candidate.header.image_position is not None
    return np.asarray(candidate.header.image_position, dtype=np.float64)


def _error(
    series_uid: str, code: ErrorCode, message: str, members: Sequence[_Candidate], stack_label: str = ""
) -> SeriesError:
    return SeriesError(
        series_uid,
        code,
        message,
        sop_instance_uids=tuple(member.uid for member in members if member.uid),
        paths=tuple(member.header.path for member in members if member.header.path),
        stack_label=stack_label,
    )


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}; and {len(items) - _MAX_LISTED} more"


def _short_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _text(dataset: Any, keyword: str) -> str | None:
    value = dataset.get(keyword) if dataset is not None else None
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(item).strip() for item in value)
    else:
        text = str(value).strip()
    return text or None


def _number(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    number = _number(dataset, keyword)
    return None if number is None else int(number)


def _numbers(dataset: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = dataset.get(keyword)
    try:
        numbers = tuple(float(item) for item in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(number) for number in numbers):
        return None
    return numbers
