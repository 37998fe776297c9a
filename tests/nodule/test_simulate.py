"""The chest CT simulator: deterministic by seed, ground truth that matches the image, a DICOM series
that reads back to the same HU with every required tag, and variety across seeds (simulated data)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from services.nodule.simulate import (
    NODULE_TYPES,
    PADDING_STORED,
    RESCALE_INTERCEPT,
    SimulatedStudy,
    SimulationConfig,
    main,
    simulate_study,
    write_dicom_series,
    write_ground_truth,
)

SMALL = (32, 96, 96)
SEEDS = range(12)
#: Mean HU over the label of a nodule of >= 6 mm after blur, noise and partial volume, by type.
MEAN_HU_RANGE = {"solid": (-250.0, 100.0), "part_solid": (-650.0, -150.0), "ground_glass": (-750.0, -250.0)}

#: Attributes each required module of the CT Image IOD must carry (type 1 and 2 among those we write).
REQUIRED = {
    "Patient": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"],
    "General Study": ["StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber"],
    "General Series": ["Modality", "SeriesInstanceUID", "SeriesNumber", "PatientPosition"],
    "Frame of Reference": ["FrameOfReferenceUID", "PositionReferenceIndicator"],
    "General Equipment": ["Manufacturer"],
    "General Image": ["InstanceNumber"],
    "Image Plane": ["PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"],
    "Image Pixel": ["SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "PixelData"],
    "CT Image": ["ImageType", "RescaleIntercept", "RescaleSlope", "KVP", "AcquisitionNumber"],
    "SOP Common": ["SOPClassUID", "SOPInstanceUID"],
}


@pytest.fixture(scope="module")
def studies() -> list[SimulatedStudy]:
    return [simulate_study(SimulationConfig(seed=seed, shape=SMALL)) for seed in SEEDS]


@pytest.fixture(scope="module")
def study_with_nodules(studies: list[SimulatedStudy]) -> SimulatedStudy:
    return next(study for study in studies if len(study.nodules) >= 2)


def read_hu(paths: list[Path]) -> tuple[list[pydicom.FileDataset], np.ndarray]:
    datasets = [pydicom.dcmread(path) for path in paths]
    stored = np.stack([ds.pixel_array.astype(np.float64) for ds in datasets])
    stored[stored == PADDING_STORED] = -RESCALE_INTERCEPT - 1024  # padding: -1024 HU, as in the study
    slopes = np.array([float(ds.RescaleSlope) for ds in datasets])[:, None, None]
    intercepts = np.array([float(ds.RescaleIntercept) for ds in datasets])[:, None, None]
    return datasets, stored * slopes + intercepts


def test_the_same_seed_gives_the_same_study_and_the_same_files(tmp_path: Path) -> None:
    config = SimulationConfig(seed=11, shape=SMALL)
    first, second = simulate_study(config), simulate_study(config)
    assert np.array_equal(first.hu, second.hu) and np.array_equal(first.labels, second.labels)
    assert first.nodules == second.nodules
    files_a = write_dicom_series(first, tmp_path / "a")
    files_b = write_dicom_series(second, tmp_path / "b")
    assert [a.read_bytes() for a in files_a] == [b.read_bytes() for b in files_b]
    other = simulate_study(SimulationConfig(seed=12, shape=SMALL))
    assert not np.array_equal(first.hu, other.hu)
    assert other.uids()["StudyInstanceUID"] != first.uids()["StudyInstanceUID"]


def test_ground_truth_matches_the_drawn_nodules(studies: list[SimulatedStudy]) -> None:
    nodules = [(study, nodule) for study in studies for nodule in study.nodules]
    assert len(nodules) >= 10
    for study, nodule in nodules:
        mask = study.labels == nodule.nodule_id
        assert mask.any()
        assert study.hu[mask].mean() == pytest.approx(nodule.mean_hu, abs=0.1)
        low, high = MEAN_HU_RANGE[nodule.nodule_type]
        if nodule.mean_diameter_mm >= 6:
            assert low <= nodule.mean_hu <= high, nodule
        assert -800 < nodule.mean_hu < 100, nodule  # denser than lung, never bone
        assert mask[nodule.center_voxel] or nodule.juxta_pleural, nodule
        assert study.lung_mask[mask].all()
        touches_wall = (ndimage.binary_dilation(mask) & ~study.lung_mask).any()
        if nodule.juxta_pleural:
            assert touches_wall, nodule
        else:
            assert study.lung_mask[nodule.center_voxel], nodule
        assert 0 < nodule.short_axis_mm <= nodule.long_axis_mm <= 40
        voxel_mm3 = float(np.prod(study.spacing_mm))
        if nodule.mean_diameter_mm >= 6:
            assert nodule.volume_mm3 == pytest.approx(mask.sum() * voxel_mm3, rel=0.3)
        assert np.allclose(study.voxel_to_lps(nodule.center_voxel), nodule.center_lps_mm,
                           atol=max(study.spacing_mm))
        part_solid_core = nodule.nodule_type != "part_solid" or 0 < nodule.solid_component_mm < nodule.long_axis_mm
        assert part_solid_core and (nodule.nodule_type != "ground_glass" or nodule.solid_component_mm == 0)
    assert (np.unique(studies[0].labels) == np.arange(len(studies[0].nodules) + 1)).all()


def test_the_anatomy_has_its_densities(study_with_nodules: SimulatedStudy) -> None:
    hu, lung = study_with_nodules.hu, study_with_nodules.lung_mask
    free_lung = lung & (ndimage.uniform_filter(study_with_nodules.labels.astype(float), 5) == 0)
    assert -900 < np.median(hu[free_lung]) < -780
    assert (hu > 300).mean() > 0.005  # ribs, sternum and spine
    assert (hu <= -1000).mean() > 0.1  # air around the body and outside the reconstruction circle
    assert ((hu > -150) & (hu < 100)).mean() > 0.1  # fat, muscle, heart and mediastinum


def test_the_series_reads_back_to_the_same_hu_with_every_required_tag(
        study_with_nodules: SimulatedStudy, tmp_path: Path) -> None:
    study = study_with_nodules
    paths = write_dicom_series(study, tmp_path / "series", patient_id="P-0042", age=63, sex="F")
    assert len(paths) == study.hu.shape[0]
    datasets, hu = read_hu(paths)
    assert np.abs(hu - study.hu).max() <= 0.5
    uids = study.uids()
    for index, ds in enumerate(datasets):
        missing = [(module, kw) for module, keywords in REQUIRED.items() for kw in keywords if kw not in ds]
        assert not missing
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
            uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["FrameOfReferenceUID"])
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == list(study.spacing_mm[1:])
        assert float(ds.SliceThickness) == study.spacing_mm[0]
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], study.voxel_to_lps((index, 0, 0)))
        assert ds.ConvolutionKernel == study.convolution_kernel
        assert (ds.PatientID, ds.PatientAge, ds.PatientSex, ds.Modality) == ("P-0042", "063Y", "F", "CT")
        assert "SIMULATED" in ds.ImageComments
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in datasets])
    assert np.allclose(steps, study.spacing_mm[0])


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_are_lossless(transfer_syntax: str, tmp_path: Path) -> None:
    study = simulate_study(SimulationConfig(seed=3, shape=(16, 64, 64)))
    paths = write_dicom_series(study, tmp_path, transfer_syntax=transfer_syntax)
    datasets, hu = read_hu(paths)
    assert all(ds.file_meta.TransferSyntaxUID == transfer_syntax for ds in datasets)
    assert np.abs(hu - study.hu).max() <= 0.5


def test_unsigned_12_bit_storage_reads_back(tmp_path: Path) -> None:
    study = simulate_study(SimulationConfig(seed=4, shape=(16, 64, 64)))
    datasets, hu = read_hu(write_dicom_series(study, tmp_path, pixel_representation="uint12"))
    assert (datasets[0].PixelRepresentation, datasets[0].BitsStored, datasets[0].HighBit) == (0, 12, 11)
    assert "PixelPaddingValue" not in datasets[0]
    assert np.abs(hu - study.hu).max() <= 0.5


def test_studies_vary_across_seeds(studies: list[SimulatedStudy]) -> None:
    assert len({study.spacing_mm[0] for study in studies}) >= 3
    assert len({study.spacing_mm[1] for study in studies}) >= 8
    assert {study.kernel for study in studies} == {"soft", "sharp"}
    assert {study.convolution_kernel for study in studies} == {"STANDARD", "LUNG"}
    counts = {len(study.nodules) for study in studies}
    assert 0 in counts and max(counts) >= 3
    nodules = [nodule for study in studies for nodule in study.nodules]
    assert {nodule.nodule_type for nodule in nodules} == set(NODULE_TYPES)
    assert any(n.juxta_pleural for n in nodules) and any(n.juxta_vascular for n in nodules)
    assert max(n.long_axis_mm for n in nodules) > 3 * min(n.long_axis_mm for n in nodules)
    assert len({study.noise_sd_hu for study in studies}) >= 8


def test_rotation_turns_the_patient_in_the_axial_plane() -> None:
    straight = simulate_study(SimulationConfig(seed=5, shape=SMALL))
    turned = simulate_study(SimulationConfig(seed=5, shape=SMALL, max_rotation_deg=10))
    assert straight.rotation_deg == 0 and 0 < abs(turned.rotation_deg) <= 10
    assert turned.spacing_mm == straight.spacing_mm


def test_a_full_size_study_is_fast() -> None:
    started = time.perf_counter()
    study = simulate_study(SimulationConfig(seed=1))
    assert time.perf_counter() - started < 5.0
    assert study.hu.shape == study.labels.shape == (64, 256, 256)
    assert study.hu.dtype == np.float32 and study.labels.dtype == np.uint8


def test_the_cli_writes_series_truth_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--studies", "2", "--seed", "9", "--shape", "16,64,64"]) == 0
    folders = sorted(tmp_path.iterdir())
    assert [f.name for f in folders] == ["study_0000", "study_0001"]
    truths = [json.loads((folder / "truth.json").read_text()) for folder in folders]
    assert truths[0]["StudyInstanceUID"] != truths[1]["StudyInstanceUID"]
    for folder, truth in zip(folders, truths, strict=True):
        assert truth["simulated"] is True
        series = sorted((folder / "series").glob("*.dcm"))
        assert len(series) == 16
        assert pydicom.dcmread(series[0]).StudyInstanceUID == truth["StudyInstanceUID"]
        labels = np.load(folder / "labels.npz")["labels"]
        assert labels.shape == (16, 64, 64) and labels.max() == len(truth["nodules"])
    assert "(simulated)" in capsys.readouterr().out


def test_ground_truth_json_round_trips(study_with_nodules: SimulatedStudy, tmp_path: Path) -> None:
    truth = json.loads(write_ground_truth(study_with_nodules, tmp_path / "truth.json").read_text())
    assert truth["shape_zyx"] == list(SMALL) and truth["spacing_zyx_mm"] == list(study_with_nodules.spacing_mm)
    first = truth["nodules"][0]
    assert first["nodule_type"] in NODULE_TYPES and len(first["center_lps_mm"]) == 3
    assert re.fullmatch(r"[MF]", truth["patient_sex"]) and truth["config"]["shape"] == list(SMALL)


def test_a_too_small_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        SimulationConfig(shape=(8, 32, 32))
