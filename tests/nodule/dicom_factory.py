"""Synthetic CT Image Storage instances for tests, written with pydicom.

Each instance carries the tags the CT Image IOD requires (patient, study, series, frame of
reference, equipment, image plane, image pixel, CT image and SOP common modules), so the same
files serve volume assembly, C-STORE/STOW ingest and SR/SEG writing tests.

Typical use::

    identity = SeriesIdentity.new()
    datasets = ct_series(stored_volume, identity=identity, origin=(-100, -100, -50))
    paths = write_instances(datasets, tmp_path)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

_NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}


@dataclass(frozen=True)
class SeriesIdentity:
    """Patient, study, series and frame-of-reference identity shared by a series' instances."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str = "TESSERA-TEST-0001"
    patient_name: str = "Test^Phantom"
    patient_age: str = "064Y"
    patient_sex: str = "F"
    series_number: int = 1

    @classmethod
    def new(cls, **overrides: object) -> SeriesIdentity:
        """Fresh UIDs for a new study, series and frame of reference."""
        identity = cls(generate_uid(), generate_uid(), generate_uid())
        return replace(identity, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class InstanceGeometry:
    """Where one slice lies: ImagePositionPatient, ImageOrientationPatient, PixelSpacing (row, column)."""

    position: tuple[float, float, float]
    orientation: tuple[float, ...] = AXIAL
    pixel_spacing: tuple[float, float] = (0.7, 0.7)
    slice_thickness: float = 1.0


@dataclass(frozen=True)
class CtOptions:
    """Tags a test may want to vary; defaults describe a plain CT slice."""

    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    pixel_padding_value: int | None = None
    acquisition_number: int | None = 1
    gantry_tilt: float = 0.0
    kernel: str = "B30f"
    modality: str = "CT"
    sop_class_uid: str = CTImageStorage
    transfer_syntax: str = ExplicitVRLittleEndian
    extra: dict[str, object] = field(default_factory=dict)


def ct_instance(
    stored: np.ndarray,
    geometry: InstanceGeometry,
    *,
    identity: SeriesIdentity,
    instance_number: int = 1,
    options: CtOptions | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build one CT Image Storage instance.

    Parameters
    ----------
    stored:
        (rows, columns) int16 (signed, PixelRepresentation 1) or uint16 stored values.
    geometry:
        Its position, orientation, pixel spacing and thickness.
    identity:
        Patient/study/series identity shared with the rest of the series.
    instance_number:
        InstanceNumber.
    options:
        Rescale, padding, acquisition, tilt, kernel, modality, SOP class, transfer syntax and any
        extra keyword → value.
    sop_instance_uid:
        A fixed SOPInstanceUID, else a fresh one.
    """
    options = options or CtOptions()
    dataset = Dataset()
    _patient_and_study(dataset, identity)
    _series_and_equipment(dataset, identity, options)
    _image_plane(dataset, geometry, instance_number)
    _image_pixel(dataset, stored)
    _ct_image(dataset, options)
    dataset.SOPClassUID = options.sop_class_uid
    dataset.SOPInstanceUID = sop_instance_uid or generate_uid()
    for keyword, value in options.extra.items():
        setattr(dataset, keyword, value)
    _file_meta(dataset, options.transfer_syntax)
    return dataset


def ct_series(
    stored_volume: np.ndarray,
    *,
    identity: SeriesIdentity,
    origin: Sequence[float] = (-100.0, -100.0, -50.0),
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_spacing: float = 1.0,
    slice_thickness: float | None = None,
    options: CtOptions | None = None,
) -> list[Dataset]:
    """Build one instance per slice of ``stored_volume`` (slices, rows, columns).

    Slice ``k`` lies at ``origin + k * slice_spacing * normal`` where ``normal`` is the cross product
    of the orientation's row and column cosines. SliceThickness defaults to ``slice_spacing``.
    """
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    thickness = slice_spacing if slice_thickness is None else slice_thickness
    datasets = []
    for index, stored in enumerate(stored_volume):
        position = np.asarray(origin, float) + index * slice_spacing * normal
        geometry = InstanceGeometry(
            tuple(float(v) for v in position),  # type: ignore[arg-type]
            tuple(float(v) for v in orientation),
            pixel_spacing,
            thickness,
        )
        datasets.append(ct_instance(stored, geometry, identity=identity, instance_number=index + 1, options=options))
    return datasets


def write_instances(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM Part 10 file ``<SOPInstanceUID>.dcm``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, dataset in enumerate(datasets):
        path = directory / f"{index:04d}_{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _patient_and_study(dataset: Dataset, identity: SeriesIdentity) -> None:
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.PatientName = identity.patient_name
    dataset.PatientID = identity.patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = identity.patient_sex
    dataset.PatientAge = identity.patient_age
    dataset.StudyInstanceUID = identity.study_instance_uid
    dataset.StudyDate = "20260101"
    dataset.StudyTime = "120000"
    dataset.ReferringPhysicianName = ""
    dataset.StudyID = "1"
    dataset.AccessionNumber = ""


def _series_and_equipment(dataset: Dataset, identity: SeriesIdentity, options: CtOptions) -> None:
    dataset.Modality = options.modality
    dataset.SeriesInstanceUID = identity.series_instance_uid
    dataset.SeriesNumber = identity.series_number
    dataset.FrameOfReferenceUID = identity.frame_of_reference_uid
    dataset.PositionReferenceIndicator = ""
    dataset.Manufacturer = "Tessera test factory"


def _image_plane(dataset: Dataset, geometry: InstanceGeometry, instance_number: int) -> None:
    dataset.InstanceNumber = instance_number
    dataset.PatientOrientation = ""
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in geometry.position]
    dataset.ImageOrientationPatient = [f"{v:.6f}" for v in geometry.orientation]
    dataset.PixelSpacing = [f"{v:.6f}" for v in geometry.pixel_spacing]
    dataset.SliceThickness = f"{geometry.slice_thickness:.6f}"


def _image_pixel(dataset: Dataset, stored: np.ndarray) -> None:
    if stored.dtype not in (np.int16, np.uint16):
        raise TypeError(f"stored values must be int16 or uint16, got {stored.dtype}")
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    dataset.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()


def _ct_image(dataset: Dataset, options: CtOptions) -> None:
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    dataset.KVP = "120"
    dataset.AcquisitionNumber = options.acquisition_number
    dataset.RescaleSlope = f"{options.rescale_slope:g}"
    dataset.RescaleIntercept = f"{options.rescale_intercept:g}"
    dataset.RescaleType = "HU"
    dataset.GantryDetectorTilt = f"{options.gantry_tilt:g}"
    dataset.ConvolutionKernel = options.kernel
    if options.pixel_padding_value is not None:
        dataset.PixelPaddingValue = options.pixel_padding_value


def _file_meta(dataset: Dataset, transfer_syntax: str) -> None:
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if UID(transfer_syntax) in _NATIVE_SYNTAXES:
        dataset.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    else:
        # compress() keeps the SOP instance UID we chose (a lossless re-encoding is the same image)
        dataset.compress(transfer_syntax, generate_instance_uid=False)
