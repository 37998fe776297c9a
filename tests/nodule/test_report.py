"""Results for the PACS: SR, SEG and key images built from findings on a simulated study, read back
with highdicom from their encoded bytes (simulated data; the findings are the simulator's truth)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from services.nodule import report
from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.risk import (
    BrockInputs,
    LungRadsCategory,
    LungRadsNodule,
    Sex,
    brock_probability,
    lung_rads_mean_diameter,
    lung_rads_study,
)
from services.nodule.schemas import NoduleType
from services.nodule.simulate import SimulatedStudy, SimulationConfig, simulate_study, write_dicom_series
from services.nodule.volume import SeriesVolume, assemble_series

SHAPE = (32, 96, 96)
MODEL_VERSION = "test-student-1"
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_TAGS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
TYPES = {"solid": NoduleType.SOLID, "part_solid": NoduleType.PART_SOLID, "ground_glass": NoduleType.GROUND_GLASS}


@dataclass
class Case:
    """A simulated study written as DICOM, its assembled volume, and findings taken from its truth."""

    study: SimulatedStudy
    volume: SeriesVolume
    datasets: list[Dataset]
    findings: SeriesFindings
    risk: report.StudyRisk


def findings_from_truth(study: SimulatedStudy, volume: SeriesVolume) -> SeriesFindings:
    """What a perfect detector would answer for ``study`` (the simulator's own measurements)."""
    nodules = tuple(
        DetectedNodule(
            label=truth.nodule_id, centre_voxel=tuple(float(v) for v in truth.center_voxel),  # type: ignore[arg-type]
            centre_lps_mm=truth.center_lps_mm, long_axis_mm=truth.long_axis_mm, short_axis_mm=truth.short_axis_mm,
            volume_mm3=truth.volume_mm3, mean_hu=truth.mean_hu, nodule_type=TYPES[truth.nodule_type],
            confidence=0.9 - 0.1 * index,
            solid_component_mm=truth.solid_component_mm if truth.nodule_type == "part_solid" else None)
        for index, truth in enumerate(study.nodules))
    return SeriesFindings(series_instance_uid=volume.series_instance_uid,
                          study_instance_uid=volume.study_instance_uid, nodules=nodules,
                          labels=study.labels.astype(np.uint16), model_version=MODEL_VERSION)


def make_case(directory: Path, seed: int = 3) -> Case:
    """Simulate a small study with two nodules, write it, assemble it, and make findings and risk."""
    study = simulate_study(SimulationConfig(seed=seed, shape=SHAPE, nodule_count=(2, 2), no_nodule_probability=0.0,
                                            nodule_diameter_mm=(6.0, 12.0)))
    paths = write_dicom_series(study, directory)
    volume = assemble_series(paths)[0]
    assert isinstance(volume, SeriesVolume)
    findings = findings_from_truth(study, volume)
    first = findings.nodules[0].label
    risk = report.StudyRisk(
        nodules={first: report.NoduleRisk(malignancy_probability=0.0734, brock_model="2b",
                                          lung_rads=LungRadsCategory.SUSPICIOUS_4A)},
        lung_rads=LungRadsCategory.SUSPICIOUS_4A)
    return Case(study, volume, [pydicom.dcmread(path) for path in paths], findings, risk)


def encoded(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file in memory (what a PACS would store)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_sr(data: bytes) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(io.BytesIO(data))
    return hd.sr.MeasurementReport.from_sequence(sr.content)


def nodule_groups(measurement_report: hd.sr.MeasurementReport
                  ) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    return {str(group.tracking_identifier): group
            for group in measurement_report.get_volumetric_roi_measurement_groups()}


def measurement(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, name: Code | CodedConcept
                ) -> hd.sr.Measurement:
    found = group.get_measurements(name=name)
    assert len(found) == 1, f"{name}: {len(found)} measurements"
    return found[0]


def assert_same_patient_and_study(dataset: Dataset, source: Dataset) -> None:
    for keyword in PATIENT_TAGS + STUDY_TAGS:
        assert str(dataset.get(keyword)) == str(source.get(keyword)), keyword
    assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
    assert "Tessera" in dataset.SeriesDescription and "not a diagnosis" in dataset.SeriesDescription
    assert dataset.Manufacturer == "Tessera"


def check_sr(data: bytes, case: Case, segmentation: Dataset | None) -> None:
    """The SR's groups hold every nodule's measurements, codes and region; the study group its category."""
    groups = nodule_groups(read_sr(data))
    assert set(groups) == {f"Nodule {nodule.label}" for nodule in case.findings.nodules}
    for nodule in case.findings.nodules:
        group = groups[f"Nodule {nodule.label}"]
        assert group.tracking_uid == report.tracking_uid(case.findings, nodule)
        assert group.finding_type == codes.SCT.Nodule
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
        assert measurement(group, codes.SCT.LongAxis).value == pytest.approx(nodule.long_axis_mm, abs=0.01)
        assert measurement(group, codes.SCT.LongAxis).unit == codes.UCUM.Millimeter
        assert measurement(group, codes.SCT.ShortAxis).value == pytest.approx(nodule.short_axis_mm, abs=0.01)
        assert measurement(group, codes.SCT.Volume).value == pytest.approx(nodule.volume_mm3, abs=0.1)
        assert measurement(group, codes.SCT.Volume).unit == codes.UCUM.CubicMillimeter
        hu = measurement(group, report.MEAN_ATTENUATION_CONCEPT)
        assert hu.value == pytest.approx(nodule.mean_hu, abs=0.1) and hu.unit == codes.UCUM.HounsfieldUnit
        assert hu.derivation == codes.SCT.Mean
        assert measurement(group, report.CERTAINTY_OF_FINDING).value == pytest.approx(100 * nodule.confidence)
        types = group.get_qualitative_evaluations(name=report.NODULE_TYPE_CONCEPT)
        assert [evaluation.value for evaluation in types] == [report.NODULE_TYPE_CODES[nodule.nodule_type]]
        if segmentation is None:
            assert group.reference_type == codes.DCM.VolumeSurface
            surface = group.roi
            assert isinstance(surface, hd.sr.VolumeSurface) and surface.graphic_type.value == "POINT"
            assert surface.frame_of_reference_uid == case.datasets[0].FrameOfReferenceUID
            np.testing.assert_allclose(surface.graphic_data[0] if isinstance(surface.graphic_data, list)
                                       else surface.graphic_data, [nodule.centre_lps_mm], atol=1e-3)
        else:
            referenced = group.referenced_segment
            assert referenced is not None
            assert referenced.referenced_sop_instance_uid == segmentation.SOPInstanceUID
            segment = referenced.referenced_segment_numbers[0]  # type: ignore[index]
            assert segmentation.SegmentSequence[segment - 1].TrackingUID == group.tracking_uid


def check_risk(data: bytes, case: Case) -> None:
    measurement_report = read_sr(data)
    first = case.findings.nodules[0]
    group = nodule_groups(measurement_report)[f"Nodule {first.label}"]
    probability = measurement(group, report.PROBABILITY_OF_CANCER)
    assert probability.value == pytest.approx(7.34) and probability.unit == codes.UCUM.Percent
    assert probability.method == report.BROCK_METHOD_CODES["2b"]
    lung_rads = group.get_qualitative_evaluations(name=report.LUNG_RADS_CONCEPT)
    assert [evaluation.value for evaluation in lung_rads] == [report.LUNG_RADS_CODES[LungRadsCategory.SUSPICIOUS_4A]]
    (study,) = measurement_report.get_image_measurement_groups()
    assert study.tracking_identifier == "Study assessment"
    assert [m.value for m in study.get_measurements(name=report.NODULE_COUNT_CONCEPT)] == [len(case.findings.nodules)]
    assert [e.value for e in study.get_qualitative_evaluations(name=report.LUNG_RADS_CONCEPT)] == [
        report.LUNG_RADS_CODES[LungRadsCategory.SUSPICIOUS_4A]]


def check_seg(data: bytes, case: Case) -> None:
    """One segment per nodule with the nodule's voxels, referencing the source CT slices."""
    seg = hd.seg.segread(io.BytesIO(data))
    assert seg.number_of_segments == len(case.findings.nodules)
    masks = seg.get_pixels_by_source_instance(list(case.volume.sop_instance_uids),
                                              ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    for number, nodule in enumerate(case.findings.nodules, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == f"Nodule {nodule.label}"
        assert description.tracking_uid == report.tracking_uid(case.findings, nodule)
        assert description.segmented_property_type == codes.SCT.Nodule
        np.testing.assert_array_equal(masks[..., number - 1] > 0, case.findings.labels == nodule.label)
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced <= set(case.volume.sop_instance_uids)


def check_key_image(data: bytes, case: Case, nodule: DetectedNodule) -> None:
    image = pydicom.dcmread(io.BytesIO(data))
    assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
    pixels = image.pixel_array
    assert pixels.shape[0] >= report.KEY_IMAGE_MIN_SIZE and pixels.shape[2] == 3
    outline = np.all(pixels == report.OUTLINE_RGB, axis=2)
    assert outline.sum() > 20, "no outline burned in"
    scale = pixels.shape[0] // case.volume.shape[1]
    centre_row, centre_column = (round(nodule.centre_voxel[1]) * scale, round(nodule.centre_voxel[2]) * scale)
    rows, columns = np.nonzero(outline)
    assert rows.min() <= centre_row <= rows.max() and columns.min() <= centre_column <= columns.max()
    (source,) = image.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == case.volume.sop_instance_uids[round(nodule.centre_voxel[0])]
    assert f"{nodule.long_axis_mm:.1f} mm" in image.ImageComments


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("report-case"))


@pytest.fixture(scope="module")
def results(case: Case) -> list[Dataset]:
    return report.build_results(case.findings, case.volume, case.datasets, risk=case.risk)


def test_results_are_seg_sr_and_one_key_image_per_nodule_in_the_source_study(case: Case,
                                                                              results: list[Dataset]) -> None:
    kinds = [str(dataset.SOPClassUID) for dataset in results]
    assert kinds == [str(pydicom.uid.SegmentationStorage), str(pydicom.uid.Comprehensive3DSRStorage)] + [
        str(pydicom.uid.SecondaryCaptureImageStorage)] * len(case.findings.nodules)
    for dataset in results:
        assert_same_patient_and_study(dataset, case.datasets[0])
        assert dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len({dataset.SeriesInstanceUID for dataset in results}) == 3
    assert len({dataset.SOPInstanceUID for dataset in results}) == len(results)


def test_sr_measurements_codes_and_segment_references_survive_encoding(case: Case, results: list[Dataset]) -> None:
    segmentation, sr = results[0], results[1]
    check_sr(encoded(sr), case, segmentation)
    check_risk(encoded(sr), case)
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == ["99TESSERA"]
    evidence = {entry[2] for entry in hd.sr.srread(io.BytesIO(encoded(sr))).get_evidence()}  # (.., SOP UID, ..)
    assert segmentation.SOPInstanceUID in evidence and set(case.volume.sop_instance_uids) <= evidence


def test_sr_without_a_seg_gives_each_nodule_its_centre_as_a_3d_point(case: Case) -> None:
    sr = report.build_sr(case.findings, case.datasets)
    check_sr(encoded(sr), case, segmentation=None)


def test_seg_has_one_segment_per_nodule_with_its_voxels(case: Case, results: list[Dataset]) -> None:
    check_seg(encoded(results[0]), case)
    assert results[0].SegmentationType == "BINARY"


def test_key_images_show_each_nodule_outlined_on_its_centre_slice(case: Case, results: list[Dataset]) -> None:
    for image, nodule in zip(results[2:], case.findings.nodules, strict=True):
        check_key_image(encoded(image), case, nodule)


def test_key_image_png_is_the_key_image(case: Case, results: list[Dataset]) -> None:
    nodule = case.findings.nodules[0]
    png = Image.open(io.BytesIO(report.key_image_png(case.findings, case.volume, nodule)))
    assert png.format == "PNG" and png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), results[2].pixel_array)


def test_rebuilding_gives_the_same_uids(case: Case, results: list[Dataset]) -> None:
    again = report.build_results(case.findings, case.volume, case.datasets, risk=case.risk)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in results]
    assert [d.SeriesInstanceUID for d in again] == [d.SeriesInstanceUID for d in results]


def test_no_nodules_gives_no_seg_and_an_sr_saying_none_were_found(case: Case) -> None:
    empty = SeriesFindings(series_instance_uid=case.findings.series_instance_uid,
                           study_instance_uid=case.findings.study_instance_uid, nodules=(),
                           labels=np.zeros_like(case.findings.labels), model_version=MODEL_VERSION)
    assert report.build_seg(empty, case.datasets) is None
    (sr,) = report.build_results(empty, case.volume, case.datasets,
                                 risk=report.StudyRisk(lung_rads=LungRadsCategory.NEGATIVE))
    measurement_report = read_sr(encoded(sr))
    assert measurement_report.get_volumetric_roi_measurement_groups() == []
    (study,) = measurement_report.get_image_measurement_groups()
    assert [m.value for m in study.get_measurements(name=report.NODULE_COUNT_CONCEPT)] == [0]


def test_findings_that_do_not_fit_the_series_are_refused(case: Case) -> None:
    with pytest.raises(report.ReportError, match="label slices"):
        report.build_seg(case.findings, case.datasets[:-1])


def test_saved_results_read_back_as_the_same_objects(results: list[Dataset], tmp_path: Path) -> None:
    paths = report.save_results(results, tmp_path / "results")
    assert [path.name for path in paths] == [f"{d.SOPInstanceUID}.dcm" for d in results]
    assert report.save_results(results, tmp_path / "results") == paths  # a retry overwrites, no second copy
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(path.name for path in paths)
    for path, dataset in zip(paths, results, strict=True):
        assert pydicom.dcmread(path).SOPInstanceUID == dataset.SOPInstanceUID


def test_risk_from_the_risk_module_lands_in_the_sr(case: Case) -> None:
    nodules = case.findings.nodules
    inputs = [BrockInputs(age_years=64, sex=Sex.FEMALE, family_history_lung_cancer=False, emphysema=True,
                          nodule_diameter_mm=n.mean_diameter_mm, nodule_type=n.nodule_type, upper_lobe=True,
                          nodule_count=len(nodules), spiculation=None) for n in nodules]
    brock = {n.label: brock_probability(i) for n, i in zip(nodules, inputs, strict=True)}
    measured = [LungRadsNodule(nodule_type=n.nodule_type,
                               mean_diameter_mm=lung_rads_mean_diameter(n.long_axis_mm, n.short_axis_mm),
                               solid_component_mm=n.solid_component_mm) for n in nodules]
    lung_rads = lung_rads_study(measured, baseline=True)
    risk = report.study_risk(case.findings, brock, lung_rads)
    groups = nodule_groups(read_sr(encoded(report.build_sr(case.findings, case.datasets, risk=risk))))
    for nodule, assessment in zip(nodules, lung_rads.nodules, strict=True):
        group = groups[f"Nodule {nodule.label}"]
        probability = measurement(group, report.PROBABILITY_OF_CANCER)
        assert probability.value == pytest.approx(100 * brock[nodule.label].probability, abs=0.005)
        assert probability.method == report.BROCK_METHOD_CODES["2a"]
        assert [e.value for e in group.get_qualitative_evaluations(name=report.LUNG_RADS_CONCEPT)] == [
            report.LUNG_RADS_CODES[assessment.category]]
    with pytest.raises(report.ReportError, match="assessments"):
        report.study_risk(case.findings, brock, lung_rads_study([], baseline=True))
