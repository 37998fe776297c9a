"""Results back to the PACS: a DICOM SR, a DICOM SEG and key images, all in the source study.

Three kinds of object per analysed series, each in a new series of the source study (patient and
study attributes copied from the source CT, new series and instance UIDs):

- :func:`build_sr`: a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom): one
  TID 1411 volumetric measurement group per nodule and one TID 1501 group for the study.
- :func:`build_seg`: a binary DICOM SEG with one segment per nodule, referencing the CT instances.
- :func:`build_key_images`: one Secondary Capture per nodule, the axial slice through its centre in
  a lung window with the outline and its size burned in, for PACS viewers that cannot show SEG.

:func:`build_results` makes all three, the SR referencing the SEG's segments.

UIDs are derived from the source series, the detector version and the object, so rebuilding the
results of one analysis (a retried job) gives the same UIDs and a PACS stores them once.

Every object says in its SeriesDescription that Tessera produced it with AI and that it is not a
diagnosis; Manufacturer is ``Tessera``, the software version is the detector's model version.

Codes
-----
Standard codes wherever DICOM PS3.16 (as shipped in pydicom's code dictionaries) has one:

=============================  ========================================================
what                           code
=============================  ========================================================
procedure reported             (LN 25045-6, "CT unspecified body region"), CID 100
finding                        (SCT 27925004, "Nodule")
finding category               (SCT 49755003, "Morphologically abnormal structure")
finding site                   (SCT 39607008, "Lung")
long / short axis              (SCT 103339001, "Long axis") / (SCT 103340004, "Short axis"), mm
volume                         (SCT 118565006, "Volume"), (UCUM mm3)
mean attenuation               (DCM 112031, "Attenuation Coefficient") with derivation
                               (SCT 373098007, "Mean"), unit (UCUM [hnsf'U])
detector confidence            (DCM 111012, "Certainty of Finding"), (UCUM %)
malignancy probability         (DCM 111047, "Probability of cancer"), (UCUM %)
algorithm family (SEG)         (DCM 123110, "Artificial Intelligence")
=============================  ========================================================

No standard code was found (not in PS3.16 as pydicom ships it; RadLex identifiers for these could
not be verified here) for the following, so they use the private coding scheme ``99TESSERA``,
declared in each SR's Coding Scheme Identification Sequence (see :data:`TESSERA_CODES`):
the nodule type concept and its values (solid, part-solid, ground-glass), the Lung-RADS v2022
category concept and its values (``LR-0`` ... ``LR-4X``), the malignancy model used as measurement
method (``BROCK-2A`` / ``BROCK-2B``), the solid component diameter of a part-solid nodule, the
number of nodules detected, and the study assessment group's finding.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.risk import BrockResult, LungRadsCategory, StudyLungRads
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume

MANUFACTURER = "Tessera"
MODEL_NAME = "Tessera nodule detection"
DEVICE_SERIAL_NUMBER = "TESSERA-NODULE"
ALGORITHM_NAME = "Tessera lung nodule detector"
DISCLAIMER = "AI, not a diagnosis"

SR_SERIES_NUMBER = 9701
SEG_SERIES_NUMBER = 9702
KEY_IMAGE_SERIES_NUMBER = 9703

LUNG_WINDOW_WIDTH = 1500.0
LUNG_WINDOW_LEVEL = -600.0
KEY_IMAGE_MIN_SIZE = 512  # key images smaller than this are enlarged so the burned-in text stays legible
OUTLINE_RGB = (255, 200, 0)

PRIVATE_SCHEME = "99TESSERA"
_UID_NAMESPACE = "tessera-nodule-results"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


NODULE_TYPE_CONCEPT = _private("NODTYPE", "Nodule attenuation type")
NODULE_TYPE_CODES = {
    NoduleType.SOLID: _private("SOLID", "Solid nodule"),
    NoduleType.PART_SOLID: _private("PARTSOLID", "Part-solid nodule"),
    NoduleType.GROUND_GLASS: _private("GGN", "Ground-glass nodule"),
}
LUNG_RADS_CONCEPT = _private("LUNGRADS", "Lung-RADS v2022 category")
LUNG_RADS_CODES = {category: _private(f"LR-{category.value}", f"Lung-RADS {category.value}")
                   for category in LungRadsCategory}
BROCK_METHOD_CODES = {"2a": _private("BROCK-2A", "Brock (PanCan) model 2a"),
                      "2b": _private("BROCK-2B", "Brock (PanCan) model 2b")}
SOLID_COMPONENT_CONCEPT = _private("SOLIDCOMP", "Solid component mean diameter")
NODULE_COUNT_CONCEPT = _private("NODCOUNT", "Number of nodules detected")
STUDY_ASSESSMENT_FINDING = _private("STUDYASSESS", "Lung nodule study assessment")
#: Every private code the SR may use (its Coding Scheme Identification names the scheme).
TESSERA_CODES: tuple[CodedConcept, ...] = (
    NODULE_TYPE_CONCEPT, *NODULE_TYPE_CODES.values(), LUNG_RADS_CONCEPT, *LUNG_RADS_CODES.values(),
    *BROCK_METHOD_CODES.values(), SOLID_COMPONENT_CONCEPT, NODULE_COUNT_CONCEPT, STUDY_ASSESSMENT_FINDING,
)

MEAN_ATTENUATION_CONCEPT = CodedConcept("112031", "DCM", "Attenuation Coefficient")
CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
PROBABILITY_OF_CANCER = CodedConcept("111047", "DCM", "Probability of cancer")


class ReportError(ValueError):
    """The findings and the source instances do not fit together (shape, slices, frame of reference)."""


@dataclass(frozen=True)
class NoduleRisk:
    """Risk of one nodule, when fusion could compute it.

    Attributes
    ----------
    malignancy_probability : float or None
        Brock (PanCan) probability in [0, 1].
    brock_model : str or None
        ``"2a"`` or ``"2b"`` (:attr:`services.nodule.risk.BrockResult.model`).
    lung_rads : LungRadsCategory or None
        The nodule's own Lung-RADS category.
    """

    malignancy_probability: float | None = None
    brock_model: str | None = None
    lung_rads: LungRadsCategory | None = None


@dataclass(frozen=True)
class StudyRisk:
    """Risk fusion's answer for a study, as the SR reports it.

    Attributes
    ----------
    nodules : Mapping[int, NoduleRisk]
        By :attr:`DetectedNodule.label`; nodules without an entry get no risk items.
    lung_rads : LungRadsCategory or None
        The study's category (its most suspicious nodule's).
    """

    nodules: Mapping[int, NoduleRisk] = field(default_factory=dict)
    lung_rads: LungRadsCategory | None = None


def study_risk(findings: SeriesFindings, brock: Mapping[int, BrockResult] | None = None,
               lung_rads: StudyLungRads | None = None) -> StudyRisk:
    """Gather :mod:`services.nodule.risk` results into a :class:`StudyRisk`.

    Parameters
    ----------
    findings : SeriesFindings
    brock : Mapping[int, BrockResult], optional
        Brock results by nodule label.
    lung_rads : StudyLungRads, optional
        From :func:`services.nodule.risk.lung_rads_study` called with the nodules in the order of
        ``findings.nodules`` (its per-nodule assessments are matched by position).
    """
    brock = brock or {}
    per_nodule = lung_rads.nodules if lung_rads is not None else ()
    if lung_rads is not None and len(per_nodule) != len(findings.nodules):
        raise ReportError(f"{len(per_nodule)} Lung-RADS assessments for {len(findings.nodules)} nodules")
    nodules = {}
    for index, nodule in enumerate(findings.nodules):
        result = brock.get(nodule.label)
        nodules[nodule.label] = NoduleRisk(
            malignancy_probability=result.probability if result else None,
            brock_model=result.model if result else None,
            lung_rads=per_nodule[index].category if per_nodule else None)
    return StudyRisk(nodules=nodules, lung_rads=lung_rads.category if lung_rads else None)


# --------------------------------------------------------------------------------------------------
# UIDs, source ordering, shared attributes


def result_uid(findings: SeriesFindings, *parts: object) -> str:
    """A UID for one result object, the same whenever the same findings are reported again."""
    sources = [_UID_NAMESPACE, findings.series_instance_uid, findings.model_version, *map(str, parts)]
    return str(generate_uid(entropy_srcs=sources))


def tracking_uid(findings: SeriesFindings, nodule: DetectedNodule) -> str:
    """The nodule's Tracking UID, shared by its SR measurement group and its SEG segment."""
    return result_uid(findings, "tracking", nodule.label)


def _series_description(kind: str) -> str:
    return f"Tessera {kind} ({DISCLAIMER})"[:64]


def _ordered_sources(findings: SeriesFindings, source_datasets: Sequence[Dataset],
                     volume: SeriesVolume | None = None) -> list[Dataset]:
    """The analysed series' instances in the slice order of ``findings.labels``."""
    members = [ds for ds in source_datasets if ds.get("SeriesInstanceUID") == findings.series_instance_uid]
    if volume is not None:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in members}
        missing = [uid for uid in volume.sop_instance_uids if uid not in by_uid]
        if missing:
            raise ReportError(f"{len(missing)} of the volume's instances are not among the source datasets")
        ordered = [by_uid[uid] for uid in volume.sop_instance_uids]
    else:
        ordered = sorted(members, key=_position_along_normal)
    if len(ordered) != findings.labels.shape[0]:
        raise ReportError(f"{len(ordered)} source instances of the series for {findings.labels.shape[0]} label slices")
    return ordered


def _position_along_normal(dataset: Dataset) -> float:
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, np.asarray(dataset.ImagePositionPatient, dtype=np.float64)))


# --------------------------------------------------------------------------------------------------
# SR


def build_sr(findings: SeriesFindings, source_datasets: Sequence[Dataset], *, risk: StudyRisk | None = None,
             segmentation: Dataset | None = None, volume: SeriesVolume | None = None,
             series_number: int = SR_SERIES_NUMBER) -> Dataset:
    """A Comprehensive 3D SR with a TID 1500 measurement report of the findings.

    One TID 1411 (volumetric ROI) measurement group per nodule: tracking identifier and UID,
    finding "Nodule" in the lung, the region (the nodule's segment of ``segmentation`` when given,
    else its centre as an SCOORD3D POINT in the frame of reference), long and short axis (mm),
    volume (mm3), mean attenuation (HU), detector confidence (%), nodule type, and when ``risk``
    has them the Brock probability (%) and the nodule's Lung-RADS category. One TID 1501 group
    "study assessment" with the number of nodules and the study's Lung-RADS category, so a study
    without nodules still gets a report saying none were found.

    Parameters
    ----------
    findings : SeriesFindings
    source_datasets : Sequence[pydicom.Dataset]
        The analysed CT instances (headers suffice); patient and study attributes come from them.
    risk : StudyRisk, optional
    segmentation : pydicom.Dataset, optional
        The SEG from :func:`build_seg`; its segments become the measurement groups' regions.
    volume : SeriesVolume, optional
        The analysed stack; needed when the series was split into stacks (its instances are the evidence).
    series_number : int

    Returns
    -------
    pydicom.Dataset
        A :class:`highdicom.sr.Comprehensive3DSR` (SOP class 1.2.840.10008.5.1.4.1.1.88.34).
    """
    sources = _ordered_sources(findings, source_datasets, volume)
    frame_of_reference = str(sources[0].FrameOfReferenceUID)
    risk = risk or StudyRisk()
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=findings.model_version,
                                              manufacturer=MANUFACTURER)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for nodule in findings.nodules:
        surface, segment = _nodule_region(findings, nodule, frame_of_reference, segmentation)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(findings, nodule),
                                                         identifier=f"Nodule {nodule.label}"),
            finding_type=codes.SCT.Nodule, finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)], algorithm_id=algorithm,
            measurements=_nodule_measurements(nodule, risk.nodules.get(nodule.label)),
            qualitative_evaluations=_nodule_evaluations(nodule, risk.nodules.get(nodule.label)),
            referenced_volume_surface=surface, referenced_segment=segment))
    groups.append(_study_group(findings, risk, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(findings), procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups)
    evidence = list(sources) + ([segmentation] if segmentation is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=result_uid(findings, "sr", "series"),
        series_number=series_number, sop_instance_uid=result_uid(findings, "sr", "instance"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=_series_description("AI nodule report"), manufacturer_model_name=MODEL_NAME,
        software_versions=findings.model_version, device_serial_number=DEVICE_SERIAL_NUMBER,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="Tessera nodule vertical local codes",
            responsible_organization=MANUFACTURER)])


def _observation_context(findings: SeriesFindings) -> hd.sr.ObservationContext:
    device_uid = str(generate_uid(entropy_srcs=[_UID_NAMESPACE, "device", findings.model_version]))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
        model_name=MODEL_NAME, serial_number=DEVICE_SERIAL_NUMBER)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _nodule_region(findings: SeriesFindings, nodule: DetectedNodule, frame_of_reference: str,
                   segmentation: Dataset | None) -> tuple[hd.sr.VolumeSurface | None, hd.sr.ReferencedSegment | None]:
    """The group's region, exactly one of: its centre as a 3D point, or (given a SEG) its segment."""
    series = hd.sr.SourceSeriesForSegmentation(findings.series_instance_uid)
    if segmentation is not None:
        return None, hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=_segment_number(segmentation, tracking_uid(findings, nodule)), source_series=series)
    centre = np.asarray([nodule.centre_lps_mm], dtype=np.float64)
    return hd.sr.VolumeSurface(graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=centre,
                               frame_of_reference_uid=frame_of_reference, source_series=series), None


def _segment_number(segmentation: Dataset, tracking: str) -> int:
    for segment in segmentation.SegmentSequence:
        if segment.get("TrackingUID") == tracking:
            return int(segment.SegmentNumber)
    raise ReportError("the segmentation has no segment for a nodule of the findings (tracking UID not found)")


def _nodule_measurements(nodule: DetectedNodule, risk: NoduleRisk | None) -> list[hd.sr.Measurement]:
    mm = codes.UCUM.Millimeter
    measurements = [
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=round(nodule.long_axis_mm, 2), unit=mm),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=round(nodule.short_axis_mm, 2), unit=mm),
        hd.sr.Measurement(name=codes.SCT.Volume, value=round(nodule.volume_mm3, 1), unit=codes.UCUM.CubicMillimeter),
        hd.sr.Measurement(name=MEAN_ATTENUATION_CONCEPT, value=round(nodule.mean_hu, 1),
                          unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Mean),
        hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=round(100.0 * nodule.confidence, 1),
                          unit=codes.UCUM.Percent),
    ]
    if nodule.solid_component_mm is not None:
        measurements.append(hd.sr.Measurement(name=SOLID_COMPONENT_CONCEPT,
                                              value=round(nodule.solid_component_mm, 2), unit=mm))
    if risk is not None and risk.malignancy_probability is not None:
        method = BROCK_METHOD_CODES.get(risk.brock_model or "")
        measurements.append(hd.sr.Measurement(name=PROBABILITY_OF_CANCER,
                                              value=round(100.0 * risk.malignancy_probability, 2),
                                              unit=codes.UCUM.Percent, method=method))
    return measurements


def _nodule_evaluations(nodule: DetectedNodule, risk: NoduleRisk | None) -> list[hd.sr.QualitativeEvaluation]:
    evaluations = [hd.sr.QualitativeEvaluation(NODULE_TYPE_CONCEPT, NODULE_TYPE_CODES[nodule.nodule_type])]
    if risk is not None and risk.lung_rads is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(LUNG_RADS_CONCEPT, LUNG_RADS_CODES[risk.lung_rads]))
    return evaluations


def _study_group(findings: SeriesFindings, risk: StudyRisk,
                 algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = []
    if risk.lung_rads is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(LUNG_RADS_CONCEPT, LUNG_RADS_CODES[risk.lung_rads]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(findings, "tracking", "study"),
                                                     identifier="Study assessment"),
        finding_type=STUDY_ASSESSMENT_FINDING, finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=NODULE_COUNT_CONCEPT, value=len(findings.nodules),
                                        unit=codes.UCUM.NoUnits)],
        qualitative_evaluations=evaluations or None)


# --------------------------------------------------------------------------------------------------
# SEG


def build_seg(findings: SeriesFindings, source_datasets: Sequence[Dataset], *, volume: SeriesVolume | None = None,
              series_number: int = SEG_SERIES_NUMBER) -> Dataset | None:
    """A binary DICOM SEG with one segment per nodule, or ``None`` when there are no nodules.

    A SEG must hold at least one segment, so a series without findings gets no SEG (its SR says
    that no nodule was found). Segment ``i`` is ``findings.nodules[i - 1]``'s voxels in
    ``findings.labels``, labelled ``Nodule <label>`` with the nodule's Tracking UID (the same as in
    the SR). Empty frames are omitted; every frame references its source CT instance.

    Parameters
    ----------
    findings : SeriesFindings
    source_datasets : Sequence[pydicom.Dataset]
        The analysed CT instances (headers suffice).
    volume : SeriesVolume, optional
        Gives the slice order of ``findings.labels``; without it the instances are sorted along
        their slice normal (the order :func:`services.nodule.volume.assemble_series` uses).
    series_number : int
    """
    if not findings.nodules:
        return None
    sources = _ordered_sources(findings, source_datasets, volume)
    segments = np.zeros(findings.labels.shape, dtype=np.uint8 if len(findings.nodules) < 256 else np.uint16)
    descriptions = []
    family = codes.cid7162.ArtificialIntelligence
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, family=family,
                                                   version=findings.model_version, source=MANUFACTURER)
    for number, nodule in enumerate(findings.nodules, start=1):
        segments[findings.labels == nodule.label] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"Nodule {nodule.label}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=tracking_uid(findings, nodule),
            tracking_id=f"Nodule {nodule.label}", anatomic_regions=[codes.SCT.Lung]))
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=segments, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=result_uid(findings, "seg", "series"),
        series_number=series_number, sop_instance_uid=result_uid(findings, "seg", "instance"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME, software_versions=findings.model_version,
        device_serial_number=DEVICE_SERIAL_NUMBER, series_description=_series_description("AI nodule SEG"),
        content_label="NODULES", content_description=f"Lung nodules found by Tessera ({DISCLAIMER})")


# --------------------------------------------------------------------------------------------------
# Key images


def build_key_images(findings: SeriesFindings, volume: SeriesVolume, source_datasets: Sequence[Dataset], *,
                     series_number: int = KEY_IMAGE_SERIES_NUMBER) -> list[Dataset]:
    """One RGB Secondary Capture per nodule: the axial slice through its centre, outline burned in.

    The slice is shown in a lung window (W 1500 / L -600); the nodule's outline is drawn just
    outside its segmentation (so its own pixels stay visible) with a label giving its long and
    short axis. Images under :data:`KEY_IMAGE_MIN_SIZE` pixels are enlarged by an integer factor
    (nearest neighbour; PixelSpacing scaled to match) so the text stays legible.

    Parameters
    ----------
    findings : SeriesFindings
    volume : SeriesVolume
        The analysed volume (HU and slice order of ``findings.labels``).
    source_datasets : Sequence[pydicom.Dataset]
        The analysed CT instances; each key image references the one it was made from.
    series_number : int

    Returns
    -------
    list[pydicom.Dataset]
        :class:`highdicom.sc.SCImage` objects in one new series, in the order of ``findings.nodules``.
    """
    if findings.labels.shape != volume.shape:
        raise ReportError(f"labels {findings.labels.shape} and volume {volume.shape} differ in shape")
    sources = _ordered_sources(findings, source_datasets, volume)
    series_uid = result_uid(findings, "key-images", "series")
    images = []
    for number, nodule in enumerate(findings.nodules, start=1):
        index = _key_slice(findings.labels, nodule)
        rgb, scale = _render_key_image(volume.hu[index], findings.labels[index] == nodule.label, nodule)
        images.append(_key_image_dataset(findings, volume, sources[index], rgb, scale, nodule, series_uid,
                                         series_number, number))
    return images


def key_image_png(findings: SeriesFindings, volume: SeriesVolume, nodule: DetectedNodule) -> bytes:
    """The key image of ``nodule`` (as in :func:`build_key_images`) as PNG bytes, for the JSON API."""
    index = _key_slice(findings.labels, nodule)
    rgb, _ = _render_key_image(volume.hu[index], findings.labels[index] == nodule.label, nodule)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _key_slice(labels: np.ndarray, nodule: DetectedNodule) -> int:
    """The slice through the nodule's centre, or its largest cross-section if the centre slice misses it."""
    index = int(np.clip(round(nodule.centre_voxel[0]), 0, labels.shape[0] - 1))
    if np.any(labels[index] == nodule.label):
        return index
    areas = (labels == nodule.label).sum(axis=(1, 2))
    return int(np.argmax(areas)) if areas.any() else index


def lung_window(hu: np.ndarray) -> np.ndarray:
    """HU to 8-bit grey in the lung window (W 1500 / L -600)."""
    low = LUNG_WINDOW_LEVEL - LUNG_WINDOW_WIDTH / 2
    grey = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / LUNG_WINDOW_WIDTH)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        padded = np.pad(grown, 1)
        grown = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
                 | padded[:-2, :-2] | padded[:-2, 2:] | padded[2:, :-2] | padded[2:, 2:])
    return grown


def _render_key_image(hu_slice: np.ndarray, mask: np.ndarray, nodule: DetectedNodule) -> tuple[np.ndarray, int]:
    """RGB uint8 (rows, columns, 3) of the slice with the outline and label; and the enlargement factor."""
    scale = max(1, math.ceil(KEY_IMAGE_MIN_SIZE / max(hu_slice.shape)))
    grey = np.kron(lung_window(hu_slice), np.ones((scale, scale), dtype=np.uint8))
    mask = np.kron(mask, np.ones((scale, scale), dtype=bool))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    ring = _dilate(mask, 2 * scale) & ~_dilate(mask, scale)
    rgb[ring] = OUTLINE_RGB
    image = Image.fromarray(rgb, mode="RGB")
    _draw_label(image, mask, nodule)
    return np.asarray(image), scale


def _draw_label(image: Image.Image, mask: np.ndarray, nodule: DetectedNodule) -> None:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.width // 36))
    text = f"Nodule {nodule.label}: {nodule.long_axis_mm:.1f} x {nodule.short_axis_mm:.1f} mm"
    rows, columns = np.nonzero(mask)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    if rows.size:
        x = int(np.clip(columns.min(), 2, max(2, image.width - width - 2)))
        y = int(rows.min()) - height - 8
        y = y if y >= 2 else min(int(rows.max()) + 8, image.height - height - 2)
    else:
        x, y = 2, 2
    draw.rectangle((x - 2, y - 2, x + width + 2, y + height + 4), fill=(0, 0, 0))
    draw.text((x - left, y - top), text, fill=OUTLINE_RGB, font=font)
    notice = f"Tessera {DISCLAIMER}"
    left, top, right, bottom = draw.textbbox((0, 0), notice, font=font)
    draw.text((4 - left, image.height - (bottom - top) - 6 - top), notice, fill=(255, 255, 255), font=font)


def _patient_orientation(direction: np.ndarray) -> tuple[str, str]:
    """PatientOrientation letters of the image's row and column directions (e.g. ``("L", "P")``)."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def spelled(vector: np.ndarray) -> str:
        order = np.argsort(-np.abs(vector))
        return "".join(letters[axis][int(vector[axis] > 0)] for axis in order if abs(vector[axis]) > 1e-3)

    return spelled(direction[:, 0]), spelled(direction[:, 1])


def _key_image_dataset(findings: SeriesFindings, volume: SeriesVolume, source: Dataset, rgb: np.ndarray, scale: int,
                       nodule: DetectedNodule, series_uid: str, series_number: int, number: int) -> Dataset:
    spacing = (volume.spacing_mm[1] / scale, volume.spacing_mm[2] / scale)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=result_uid(findings, "key-image", nodule.label),
        instance_number=number, manufacturer=MANUFACTURER,
        pixel_spacing=(round(spacing[0], 6), round(spacing[1], 6)),  # type: ignore[arg-type]  # mm, not int
        patient_orientation=_patient_orientation(volume.direction), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_series_description("AI nodule key images"), manufacturer_model_name=MODEL_NAME,
        software_versions=findings.model_version)
    image.BurnedInAnnotation = "NO"  # the burned-in text is a measurement, nothing that identifies the patient
    image.ImageComments = (f"Nodule {nodule.label}, long axis {nodule.long_axis_mm:.1f} mm, "
                           f"short axis {nodule.short_axis_mm:.1f} mm ({DISCLAIMER})")
    image.DerivationDescription = (f"Axial slice of the source CT in a lung window (W {LUNG_WINDOW_WIDTH:g} / "
                                   f"L {LUNG_WINDOW_LEVEL:g}) with the outline of nodule {nodule.label} "
                                   f"from {ALGORITHM_NAME} {findings.model_version}")[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.SourceImageSequence = [reference]
    return image


# --------------------------------------------------------------------------------------------------
# All of it


def build_results(findings: SeriesFindings, volume: SeriesVolume, source_datasets: Sequence[Dataset], *,
                  risk: StudyRisk | None = None) -> list[Dataset]:
    """SEG (when there are nodules), SR referencing its segments, and key images, in that order.

    Parameters
    ----------
    findings : SeriesFindings
    volume : SeriesVolume
    source_datasets : Sequence[pydicom.Dataset]
        The analysed CT instances (with pixel data or not).
    risk : StudyRisk, optional

    Returns
    -------
    list[pydicom.Dataset]
        Ready to store or send; UIDs are stable for the same findings.
    """
    segmentation = build_seg(findings, source_datasets, volume=volume)
    report = build_sr(findings, source_datasets, risk=risk, segmentation=segmentation, volume=volume)
    images = build_key_images(findings, volume, source_datasets)
    return ([segmentation] if segmentation is not None else []) + [report] + images


def save_results(datasets: Sequence[Dataset], directory: str | os.PathLike[str]) -> list[Path]:
    """Write each object as a DICOM file ``<SOPInstanceUID>.dcm`` under ``directory``; return the paths.

    Rewriting the same results overwrites the same files (their UIDs are stable), so a retried job
    leaves one copy. The paths are what the send job and the retrieval endpoints read.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset in datasets:
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        partial = path.with_suffix(".partial")
        dataset.save_as(partial, enforce_file_format=True)
        partial.replace(path)  # readers never see half a file
        paths.append(path)
    return paths
