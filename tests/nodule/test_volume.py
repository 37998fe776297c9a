"""Volume assembly: what the detector, the SR/SEG writer and the API see of a study's CT series.

Synthetic series come from ``dicom_factory``; stored values are chosen so every voxel's HU is
distinct (``100 * slice + 10 * row + column`` in creation order) and an ordering mistake shows.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from services.nodule import volume as volume_module
from services.nodule.volume import (
    AIR_HU,
    MAX_HU,
    ErrorCode,
    InstanceHeader,
    SeriesError,
    SeriesResult,
    SeriesVolume,
    age_in_years,
    assemble_series,
    read_header,
    stored_to_hu,
)
from tests.nodule.dicom_factory import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    CtOptions,
    InstanceGeometry,
    SeriesIdentity,
    ct_instance,
    ct_series,
    write_instances,
)

CT_SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ct_samples"
SLICES, ROWS, COLUMNS = 6, 8, 7
ORIGIN = (-100.0, -120.0, -50.0)
PIXEL_SPACING = (0.5, 0.8)  # (row spacing -> y, column spacing -> x)
SLICE_SPACING = 1.5


def expected_hu(slices: int = SLICES) -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(slices), np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    return (100 * k + 10 * j + i).astype(np.float32)


def stored_ramp(slices: int = SLICES) -> np.ndarray:
    """Stored values that the default rescale (intercept -1024) turns into ``expected_hu``."""
    return (expected_hu(slices) + 1024).astype(np.int16)


def make_series(
    identity: SeriesIdentity | None = None,
    *,
    slices: int = SLICES,
    orientation: tuple[float, ...] = AXIAL,
    slice_spacing: float = SLICE_SPACING,
    options: CtOptions | None = None,
    **kwargs: object,
) -> list[Dataset]:
    return ct_series(
        stored_ramp(slices),
        identity=identity or SeriesIdentity.new(),
        origin=ORIGIN,
        orientation=orientation,
        pixel_spacing=PIXEL_SPACING,
        slice_spacing=slice_spacing,
        options=options,
        **kwargs,  # type: ignore[arg-type]
    )


def volumes(results: list[SeriesResult]) -> list[SeriesVolume]:
    return [result for result in results if isinstance(result, SeriesVolume)]


def errors(results: list[SeriesResult]) -> list[SeriesError]:
    return [result for result in results if isinstance(result, SeriesError)]


def only_volume(results: list[SeriesResult]) -> SeriesVolume:
    assert errors(results) == [], errors(results)
    (volume,) = volumes(results)
    return volume


def only_error(results: list[SeriesResult], code: ErrorCode) -> SeriesError:
    matching = [error for error in errors(results) if error.code == code]
    assert len(matching) == 1, results
    return matching[0]


def move(dataset: Dataset, position: tuple[float, float, float]) -> Dataset:
    dataset.ImagePositionPatient = [f"{value:.6f}" for value in position]
    return dataset


# --- geometry ------------------------------------------------------------------------------------


def test_axial_series_maps_voxels_to_lps_as_dicom_defines() -> None:
    datasets = make_series()
    volume = only_volume(assemble_series(datasets))

    assert volume.hu.dtype == np.float32 and volume.shape == (SLICES, ROWS, COLUMNS)
    np.testing.assert_array_equal(volume.hu, expected_hu())
    assert volume.spacing_mm == (SLICE_SPACING, 0.5, 0.8)
    assert volume.origin_lps == ORIGIN
    np.testing.assert_allclose(volume.direction, np.eye(3))
    np.testing.assert_allclose(volume.voxel_to_lps((0, 0, 0)), ORIGIN)
    # far corner: column 6 moves x by 6 * 0.8, row 7 moves y by 7 * 0.5, slice 5 moves z by 5 * 1.5
    np.testing.assert_allclose(volume.voxel_to_lps((5, 7, 6)), (-95.2, -116.5, -42.5))
    assert volume.sop_instance_uids == tuple(d.SOPInstanceUID for d in datasets)


def test_lps_to_voxel_inverts_voxel_to_lps_for_many_points() -> None:
    volume = only_volume(assemble_series(make_series(orientation=(0.8, 0.6, 0.0, 0.0, 0.0, -1.0))))
    indices = np.array([[0, 0, 0], [5, 7, 6], [2.5, 3.25, 1.75]])
    points = volume.voxel_to_lps(indices)
    assert points.shape == (3, 3)
    np.testing.assert_allclose(volume.lps_to_voxel(points), indices, atol=1e-9)


def test_shuffled_or_reversed_input_assembles_the_same_volume() -> None:
    datasets = make_series()
    forward = only_volume(assemble_series(datasets))
    shuffled = [datasets[i] for i in (3, 0, 5, 1, 4, 2)]
    for reordered in (datasets[::-1], shuffled):
        volume = only_volume(assemble_series(reordered))
        np.testing.assert_array_equal(volume.hu, forward.hu)
        assert volume.sop_instance_uids == forward.sop_instance_uids
        assert volume.origin_lps == forward.origin_lps


def test_slices_acquired_against_the_normal_are_sorted_along_it() -> None:
    # Slices written head to feet (z descending, as the GE sample): slice 0 of the volume is the lowest z.
    datasets = make_series(slice_spacing=-SLICE_SPACING)
    volume = only_volume(assemble_series(datasets))
    np.testing.assert_array_equal(volume.hu, expected_hu()[::-1])
    assert volume.origin_lps == pytest.approx((-100.0, -120.0, -50.0 - 5 * SLICE_SPACING))
    assert volume.spacing_mm[0] == SLICE_SPACING
    assert volume.sop_instance_uids == tuple(d.SOPInstanceUID for d in datasets[::-1])


@pytest.mark.parametrize(
    ("orientation", "normal", "corner_lps"),
    [
        # coronal: rows run to patient left (+x), columns to feet (-z), slices go posterior (+y)
        (CORONAL, (0.0, 1.0, 0.0), (-100 + 6 * 0.8, -120 + 5 * 1.5, -50 - 7 * 0.5)),
        # sagittal: rows run posterior (+y), columns to feet (-z), slices go to patient right (-x)
        (SAGITTAL, (-1.0, 0.0, 0.0), (-100 - 5 * 1.5, -120 + 6 * 0.8, -50 - 7 * 0.5)),
    ],
)
def test_coronal_and_sagittal_stacks_keep_their_lps_axes(
    orientation: tuple[float, ...], normal: tuple[float, float, float], corner_lps: tuple[float, float, float]
) -> None:
    volume = only_volume(assemble_series(make_series(orientation=orientation)))
    np.testing.assert_allclose(volume.direction[:, 2], normal)
    np.testing.assert_allclose(volume.direction[:, 0], orientation[:3])
    np.testing.assert_allclose(volume.voxel_to_lps((5, 7, 6)), corner_lps)
    np.testing.assert_array_equal(volume.hu, expected_hu())


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL, (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)])
def test_geometry_agrees_with_highdicom(orientation: tuple[float, ...]) -> None:
    """highdicom stacks slices against the normal (a right-handed index order): same voxels, flipped."""
    datasets = make_series(orientation=orientation)
    volume = only_volume(assemble_series(datasets[::-1]))
    reference = highdicom.get_volume_from_series(datasets)
    np.testing.assert_array_equal(reference.array[::-1], volume.hu)
    indices = np.array([[0, 0, 0], [5, 7, 6], [2, 3, 4]])
    flipped = np.column_stack([SLICES - 1 - indices[:, 0], indices[:, 1:]])
    reference_lps = flipped @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    np.testing.assert_allclose(volume.voxel_to_lps(indices), reference_lps, atol=1e-6)


def test_spacing_comes_from_positions_when_slice_thickness_lies() -> None:
    datasets = make_series(slice_spacing=2.0, slice_thickness=3.0)
    volume = only_volume(assemble_series(datasets))
    assert volume.spacing_mm[0] == 2.0
    assert volume.slice_thickness_mm == 3.0


# --- HU ------------------------------------------------------------------------------------------


def test_rescale_slope_and_intercept_give_hu() -> None:
    stored = np.full((SLICES, ROWS, COLUMNS), 600, dtype=np.uint16)
    stored[:, 0, 0] = 0
    options = CtOptions(rescale_slope=2.0, rescale_intercept=-1000.0)
    datasets = ct_series(stored, identity=SeriesIdentity.new(), origin=ORIGIN, options=options)
    volume = only_volume(assemble_series(datasets))
    assert volume.hu.dtype == np.float32
    assert volume.hu[0, 1, 1] == 200.0  # 600 * 2 - 1000
    assert volume.hu[0, 0, 0] == -1000.0  # 0 * 2 - 1000


def test_padding_becomes_air_and_values_are_clipped_to_the_ct_range() -> None:
    stored = np.full((SLICES, ROWS, COLUMNS), 1024, dtype=np.int16)  # water
    stored[:, 0, :] = -2000  # the scanner's padding outside the field of view
    stored[:, 1, 0] = 5000  # metal beyond the 12-bit range
    stored[:, 1, 1] = -500  # below air but not padding
    options = CtOptions(pixel_padding_value=-2000)
    datasets = ct_series(stored, identity=SeriesIdentity.new(), origin=ORIGIN, options=options)
    volume = only_volume(assemble_series(datasets))
    assert np.all(volume.hu[:, 0, :] == AIR_HU)
    assert volume.hu[0, 1, 0] == MAX_HU
    assert volume.hu[0, 1, 1] == AIR_HU
    assert volume.hu[0, 4, 4] == 0.0


def test_padding_range_limit_marks_a_range_as_air() -> None:
    header = InstanceHeader.from_dataset(make_series(slices=1)[0])
    header = replace(header, rescale_intercept=0.0, pixel_padding_value=100, pixel_padding_range_limit=50)
    hu = stored_to_hu(np.array([[49, 50, 75, 100, 101]], dtype=np.int16), header)
    np.testing.assert_array_equal(hu, [[49, AIR_HU, AIR_HU, AIR_HU, 101]])


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
    ],
    ids=lambda uid: uid.name,
)
def test_every_supported_transfer_syntax_decodes_from_files(transfer_syntax: str, tmp_path: Path) -> None:
    # 32 x 32: OpenJPEG's default six resolution levels need tiles of at least 2**5 pixels
    stored = np.random.default_rng(7).integers(0, 4000, (4, 32, 32)).astype(np.int16)
    options = CtOptions(transfer_syntax=transfer_syntax)
    datasets = ct_series(stored, identity=SeriesIdentity.new(), origin=ORIGIN, options=options)
    paths = write_instances(datasets, tmp_path)
    assert read_header(paths[0]).transfer_syntax_uid == transfer_syntax
    volume = only_volume(assemble_series(paths[::-1]))
    np.testing.assert_array_equal(volume.hu, np.clip(stored.astype(np.float32) - 1024, AIR_HU, MAX_HU))
    assert volume.source_paths == tuple(str(path) for path in paths)


# --- headers -------------------------------------------------------------------------------------


def test_header_and_volume_carry_demographics_and_kernel_without_leaking_them() -> None:
    identity = SeriesIdentity.new(patient_id="MRN-424242", patient_age="067Y", patient_sex="M")
    datasets = make_series(identity, options=CtOptions(kernel="LUNG"))
    header = InstanceHeader.from_dataset(datasets[0])
    assert (header.patient_id, header.patient_age, header.patient_sex) == ("MRN-424242", "067Y", "M")
    volume = only_volume(assemble_series(datasets))
    assert volume.patient_age_years == pytest.approx(67.0)
    assert volume.patient_sex == "M" and volume.convolution_kernel == "LUNG"
    assert volume.study_instance_uid == identity.study_instance_uid
    assert volume.frame_of_reference_uid == identity.frame_of_reference_uid
    for text in (repr(header), repr(volume)):
        assert "MRN-424242" not in text and "067Y" not in text


def test_age_strings_convert_to_years() -> None:
    assert age_in_years("065Y") == 65.0
    assert age_in_years("006M") == pytest.approx(0.5)
    assert age_in_years("014D") == pytest.approx(14 / 365.25)
    assert age_in_years("") is None and age_in_years("abc") is None


# --- what is tolerated ---------------------------------------------------------------------------


def test_the_same_sop_instance_twice_is_one_instance() -> None:
    datasets = make_series()
    volume = only_volume(assemble_series([*datasets, datasets[2]]))
    assert volume.shape[0] == SLICES
    assert any("repeated SOP" in note for note in volume.notes)


def test_a_copy_with_identical_pixels_at_a_taken_position_is_dropped() -> None:
    identity = SeriesIdentity.new()
    datasets = make_series(identity)
    copy = make_series(identity)[2]  # same position and pixels, another SOP instance UID
    volume = only_volume(assemble_series([*datasets, copy]))
    assert volume.shape[0] == SLICES
    assert any("identical pixels" in note for note in volume.notes)


def test_axial_mode_acquisitions_at_distinct_positions_stay_one_volume() -> None:
    datasets = make_series()
    for index, dataset in enumerate(datasets):
        dataset.AcquisitionNumber = 1 + index // 2  # one acquisition per table position
    volume = only_volume(assemble_series(datasets))
    assert volume.shape[0] == SLICES and volume.stack_label == ""


def test_two_phases_in_one_series_become_two_labelled_volumes() -> None:
    identity = SeriesIdentity.new()
    arterial = make_series(identity, options=CtOptions(acquisition_number=1))
    venous = make_series(identity, options=CtOptions(acquisition_number=2))
    results = assemble_series([*arterial, *venous])
    assert errors(results) == []
    labels = sorted(volume.stack_label for volume in volumes(results))
    assert labels == ["acquisition 1", "acquisition 2"]


# --- what is refused -----------------------------------------------------------------------------


def test_a_localizer_in_the_series_is_left_out_as_mixed_series() -> None:
    identity = SeriesIdentity.new()
    datasets = make_series(identity)
    localizer = make_series(identity, slices=1, orientation=CORONAL)[0]
    results = assemble_series([*datasets, localizer])
    assert volumes(results)[0].shape[0] == SLICES
    error = only_error(results, ErrorCode.MIXED_SERIES)
    assert error.sop_instance_uids == (localizer.SOPInstanceUID,)
    assert "orientation" in error.message and error.series_instance_uid == identity.series_instance_uid


def test_an_instance_of_another_size_is_left_out_as_mixed_series() -> None:
    identity = SeriesIdentity.new()
    datasets = make_series(identity)
    small = ct_instance(
        np.zeros((4, 4), np.int16), InstanceGeometry((0.0, 0.0, 100.0), pixel_spacing=PIXEL_SPACING), identity=identity
    )
    results = assemble_series([*datasets, small])
    assert len(volumes(results)) == 1
    assert "image size" in only_error(results, ErrorCode.MIXED_SERIES).message


def test_a_missing_slice_is_named_as_a_gap() -> None:
    datasets = make_series()
    del datasets[3]
    results = assemble_series(datasets)
    error = only_error(results, ErrorCode.MISSING_SLICES)
    assert volumes(results) == []
    assert "3 mm between -47.00 and -44.00 mm" in error.message
    assert "about 1 slice(s) missing" in error.message
    assert len(error.sop_instance_uids) == SLICES - 1


def test_irregular_spacing_is_refused_beyond_the_tolerance() -> None:
    datasets = make_series()
    move(datasets[3], (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 3 * SLICE_SPACING + 0.3))
    only_error(assemble_series(datasets), ErrorCode.NONUNIFORM_SPACING)
    move(datasets[3], (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 3 * SLICE_SPACING + 0.005))  # rounding noise
    assert only_volume(assemble_series(datasets)).shape[0] == SLICES


def test_two_different_images_at_one_position_are_a_duplicate_slice() -> None:
    identity = SeriesIdentity.new()
    datasets = make_series(identity)
    other = ct_series(
        np.zeros((1, ROWS, COLUMNS), np.int16), identity=identity, origin=ORIGIN, pixel_spacing=PIXEL_SPACING
    )[0]
    results = assemble_series([*datasets, other])
    error = only_error(results, ErrorCode.DUPLICATE_SLICE)
    assert "duplicate slice position" in error.message
    assert set(error.sop_instance_uids) == {datasets[0].SOPInstanceUID, other.SOPInstanceUID}
    assert volumes(results) == []


def test_gantry_tilt_in_the_header_is_refused() -> None:
    error = only_error(assemble_series(make_series(options=CtOptions(gantry_tilt=15.0))), ErrorCode.GANTRY_TILT)
    assert "15" in error.message


def test_slices_not_stacked_along_their_normal_are_refused_as_tilt() -> None:
    datasets = make_series()
    shift = math.tan(math.radians(20)) * SLICE_SPACING
    for index, dataset in enumerate(datasets):
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        move(dataset, (x, y + index * shift, z))
    error = only_error(assemble_series(datasets), ErrorCode.GANTRY_TILT)
    assert "about 20.0 degrees" in error.message


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (CtOptions(modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4"), ErrorCode.NOT_CT),
        (CtOptions(modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34"), ErrorCode.NOT_CT),
        (CtOptions(modality="", sop_class_uid=""), ErrorCode.NOT_CT),
        (CtOptions(sop_class_uid="1.2.840.10008.5.1.4.1.1.2.1"), ErrorCode.UNSUPPORTED_SOP_CLASS),
    ],
)
def test_non_ct_series_are_refused_and_the_rest_of_the_study_is_kept(options: CtOptions, code: ErrorCode) -> None:
    ct = make_series()
    other = make_series(options=options)
    results = assemble_series([*other, *ct])
    error = only_error(results, code)
    assert error.series_instance_uid == other[0].SeriesInstanceUID
    assert len(error.sop_instance_uids) == SLICES
    assert only_volume([r for r in results if r is not error]).shape[0] == SLICES


def test_too_few_slices_is_refused() -> None:
    error = only_error(assemble_series(make_series(slices=2)), ErrorCode.TOO_FEW_SLICES)
    assert "2 distinct slice position(s)" in error.message
    assert only_volume(assemble_series(make_series(slices=2), min_slices=2)).shape[0] == 2


def test_missing_geometry_is_refused_per_instance() -> None:
    datasets = make_series()
    del datasets[0].ImagePositionPatient
    results = assemble_series(datasets)
    error = only_error(results, ErrorCode.MISSING_GEOMETRY)
    assert "ImagePositionPatient" in error.message and error.sop_instance_uids == (datasets[0].SOPInstanceUID,)
    assert volumes(results)[0].shape[0] == SLICES - 1  # the first slice gone leaves no gap


def test_instances_without_uids_are_refused() -> None:
    datasets = make_series()
    for dataset in datasets:
        dataset.SeriesInstanceUID = ""
    error = only_error(assemble_series(datasets), ErrorCode.MISSING_UID)
    assert "SeriesInstanceUID" in error.message


def truncate(path: Path, keep_bytes: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:-keep_bytes])


def test_an_undecodable_end_slice_is_reported_and_the_rest_assembles(tmp_path: Path) -> None:
    datasets = make_series()
    paths = write_instances(datasets, tmp_path)
    truncate(paths[-1])
    results = assemble_series(paths)
    error = only_error(results, ErrorCode.UNDECODABLE)
    assert error.sop_instance_uids == (datasets[-1].SOPInstanceUID,)
    assert error.paths == (str(paths[-1]),)
    volume = volumes(results)[0]
    np.testing.assert_array_equal(volume.hu, expected_hu()[:-1])


def test_an_undecodable_middle_slice_leaves_a_gap(tmp_path: Path) -> None:
    datasets = make_series(options=CtOptions(transfer_syntax=RLELossless))
    datasets[2].PixelData = datasets[2].PixelData[:-200]  # a cut RLE stream
    results = assemble_series(datasets)
    assert only_error(results, ErrorCode.UNDECODABLE).sop_instance_uids == (datasets[2].SOPInstanceUID,)
    gap = only_error(results, ErrorCode.MISSING_SLICES)
    assert "undecodable" in gap.message
    assert volumes(results) == []


def test_unreadable_files_are_reported_and_the_study_kept(tmp_path: Path) -> None:
    datasets = make_series()
    paths = write_instances(datasets, tmp_path)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    results = assemble_series([junk, *paths])
    assert only_error(results, ErrorCode.UNREADABLE).paths == (str(junk),)
    assert volumes(results)[0].shape[0] == SLICES


def test_a_study_of_good_and_bad_series_never_raises_and_messages_hold_no_phi(tmp_path: Path) -> None:
    identity = dict(patient_id="MRN-9931", patient_name="Doe^Jane")
    good = make_series(SeriesIdentity.new(**identity))
    tilted = make_series(SeriesIdentity.new(**identity), options=CtOptions(gantry_tilt=7.0))
    gappy = make_series(SeriesIdentity.new(**identity))
    del gappy[2]
    short = make_series(SeriesIdentity.new(**identity), slices=1)
    results = assemble_series([*good, *tilted, *gappy, *short])
    assert sorted(str(error.code) for error in errors(results)) == ["gantry_tilt", "missing_slices", "too_few_slices"]
    assert only_volume([r for r in results if isinstance(r, SeriesVolume)]).series_instance_uid == (
        good[0].SeriesInstanceUID
    )
    for result in results:
        assert "MRN-9931" not in repr(result) and "Doe" not in repr(result)


def test_an_unforeseen_failure_costs_one_series_not_the_study(monkeypatch: pytest.MonkeyPatch) -> None:
    good, doomed = make_series(), make_series()
    original = volume_module._split_into_stacks

    def split_or_fail(members: list) -> list:  # type: ignore[type-arg]
        if members[0].header.series_instance_uid == doomed[0].SeriesInstanceUID:
            raise ZeroDivisionError("boom")
        return original(members)

    monkeypatch.setattr(volume_module, "_split_into_stacks", split_or_fail)
    results = assemble_series([*doomed, *good])
    error = only_error(results, ErrorCode.ASSEMBLY_FAILED)
    assert error.series_instance_uid == doomed[0].SeriesInstanceUID and "boom" not in error.message
    assert only_volume([r for r in results if r is not error]).series_instance_uid == good[0].SeriesInstanceUID


# --- the real CT samples -------------------------------------------------------------------------


def sample_paths(folder: str = "") -> list[Path]:
    if not CT_SAMPLES.is_dir():
        pytest.skip(f"{CT_SAMPLES} is absent: the real CT samples live in ../shared/datasets/ct_samples")
    return sorted((CT_SAMPLES / folder).rglob("*.dcm"))


def describe(result: SeriesResult) -> str:
    if isinstance(result, SeriesVolume):
        spacing = "x".join(f"{value:.4g}" for value in result.spacing_mm)
        return f"volume {result.shape} spacing {spacing} mm, HU {result.hu.min():.0f}..{result.hu.max():.0f}"
    return f"{result.code}: {result.message}"


def test_every_real_ct_sample_assembles_or_is_refused_with_a_reason() -> None:
    paths = sample_paths()
    results = assemble_series(paths)
    for result in results:
        print(f"{result.series_instance_uid[-20:]:>20}  {describe(result)}")
    assert all(isinstance(result, SeriesVolume) or result.message for result in results)
    by_folder = {path.parent.name: str(path) for path in paths}
    ge = next(v for v in volumes(results) if v.source_paths[0] and "ge_ctc_3slice" in v.source_paths[0])
    assert ge.shape == (3, 512, 512) and ge.spacing_mm[0] == pytest.approx(1.0)  # SliceThickness says 1.25
    assert ge.hu.min() == AIR_HU  # GE's -3024 HU outside the field of view
    lidc = next(e for e in errors(results) if by_folder["lidc_chest_2slice"] in e.paths)
    assert lidc.code == ErrorCode.TOO_FEW_SLICES
    siemens = next(e for e in errors(results) if by_folder["siemens_abdomen_20slice_j2k"] in e.paths)
    assert siemens.code == ErrorCode.MISSING_UID  # over-eager anonymisation blanked every UID
    sr_and_seg = [uid for e in errors(results) if e.code == ErrorCode.NOT_CT for uid in e.sop_instance_uids]
    assert len(sr_and_seg) == 3  # highdicom's two SRs and its SEG


def test_real_jpeg2000_series_with_uids_restored_assembles_at_its_true_spacing() -> None:
    paths = sample_paths("siemens_abdomen_20slice_j2k")
    series_uid, study_uid = generate_uid(), generate_uid()
    datasets = []
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = generate_uid()
        dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        dataset.SeriesInstanceUID, dataset.StudyInstanceUID = series_uid, study_uid
        datasets.append(dataset)
    volume = only_volume(assemble_series(datasets))
    print(describe(volume))
    assert volume.shape == (20, 512, 512)
    assert volume.spacing_mm == (2.0, 0.9765625, 0.9765625)  # SliceThickness says 3
    assert volume.origin_lps[2] == -804.5
    assert volume.hu.min() == AIR_HU and 1000 < volume.hu.max() <= MAX_HU
