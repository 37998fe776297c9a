"""Risk fusion over stored nodules: Brock when its inputs are known (else why not), Lung-RADS per
nodule and per series, baseline vs follow-up with matched nodules, growth and doubling time, and the
upper-lobe estimate from the lung extent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.nodule.fusion import PatientContext, PriorSeries, assess_series, in_upper_lobe, lung_z_extent
from services.nodule.risk import BrockInputs, Sex, brock_probability
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume

KNOWN = PatientContext(age_years=62.0, sex="F", family_history_lung_cancer=True, emphysema=False)


def nodule(label: int, centre: tuple[float, float, float], long_mm: float, short_mm: float, *,
           kind: str = "solid", solid_mm: float | None = None, upper: bool | None = True) -> dict[str, Any]:
    volume = np.pi / 6 * ((long_mm + short_mm) / 2) ** 3
    return {"label": label, "centre_lps_mm": list(centre), "long_axis_mm": long_mm, "short_axis_mm": short_mm,
            "volume_mm3": volume, "nodule_type": kind, "solid_component_mm": solid_mm, "upper_lobe": upper,
            "mean_hu": 20.0, "confidence": 0.9}


def test_brock_is_the_risk_module_s_answer_when_every_input_is_known() -> None:
    found = [nodule(1, (10, 20, 30), 9.0, 7.0), nodule(2, (-50, 0, -40), 4.0, 4.0, upper=False)]
    risk = assess_series(found, KNOWN)
    expected = brock_probability(BrockInputs(age_years=62.0, sex=Sex.FEMALE, family_history_lung_cancer=True,
                                             emphysema=False, nodule_diameter_mm=8.0, nodule_type=NoduleType.SOLID,
                                             upper_lobe=True, nodule_count=2))
    first = risk.by_label()[1]
    assert first.malignancy_probability == pytest.approx(expected.probability)
    assert first.brock_model == "2a" and first.malignancy_note is None
    assert risk.baseline and risk.prior_study_instance_uid is None
    # Baseline: 8.0 mm solid is category 4A (8 to < 15 mm), 4.0 mm is 2; the series takes the most suspicious.
    assert [n.lung_rads for n in risk.nodules] == ["4A", "2"] and risk.lung_rads == "4A"


def test_without_clinical_data_or_lobe_brock_is_null_with_the_reason() -> None:
    header_only = PatientContext(age_years=70.0, sex="M")
    risk = assess_series([nodule(1, (0, 0, 0), 12.0, 10.0, upper=None)], header_only)
    only = risk.nodules[0]
    assert only.malignancy_probability is None
    assert only.malignancy_note is not None
    for missing in ("family history", "emphysema", "lobe"):
        assert missing in only.malignancy_note
    assert "age" not in only.malignancy_note and only.lung_rads == "4A"  # 11 mm solid at baseline


def test_a_part_solid_nodule_without_its_solid_component_gets_no_category_but_a_note() -> None:
    risk = assess_series([nodule(1, (0, 0, 0), 12.0, 10.0, kind="part-solid", solid_mm=None)], KNOWN)
    assert risk.lung_rads is None and risk.lung_rads_note and "Lung-RADS not assigned" in risk.lung_rads_note
    assert risk.nodules[0].malignancy_probability is not None


def test_against_a_prior_study_nodules_are_matched_with_growth_doubling_time_and_follow_up_rules() -> None:
    shift = np.array([3.0, -2.0, 15.0])  # the patient lay elsewhere on the table
    prior_nodules = [nodule(1, (10, 20, 30), 6.0, 6.0), nodule(2, (-60, 10, -20), 5.0, 5.0)]
    current = [nodule(1, tuple(np.add((10, 20, 30), shift)), 8.5, 8.5),  # grew 2.5 mm in a year
               nodule(2, tuple(np.add((-60, 10, -20), shift)), 5.0, 5.0),  # stable
               nodule(3, (40, -30, 60), 7.0, 7.0)]  # new
    prior = PriorSeries(study_instance_uid="1.2.3", interval_days=365.0, nodules=prior_nodules)
    risk = assess_series(current, KNOWN, prior)
    by_label = risk.by_label()
    assert not risk.baseline and risk.prior_study_instance_uid == "1.2.3" and risk.interval_days == 365.0
    grown, stable, new = by_label[1].prior, by_label[2].prior, by_label[3].prior
    assert grown and grown.matched and grown.prior_label == 1 and grown.growth == "growing"
    assert grown.diameter_change_mm == pytest.approx(2.5)
    expected_vdt = 365.0 * np.log(2) / np.log((8.5 / 6.0) ** 3)
    assert grown.volume_doubling_time_days == pytest.approx(expected_vdt, abs=0.1)
    assert stable and stable.matched and stable.growth == "stable" and stable.volume_doubling_time_days is None
    assert new and not new.matched
    # Follow-up: a growing solid nodule >= 8 mm is 4B; stable 5 mm is 2; a new 7 mm solid nodule is 4A.
    assert (by_label[1].lung_rads, by_label[2].lung_rads, by_label[3].lung_rads) == ("4B", "2", "4A")
    assert risk.lung_rads == "4B"


def chest(slices: int = 40, size: int = 32) -> SeriesVolume:
    """Air outside, lung (-850 HU) in slices 10..29 of the centre, slice k at z = 100 - 2.5 k (head first)."""
    hu = np.full((slices, size, size), -1000.0, np.float32)
    hu[:, 4:-4, 4:-4] = 40.0
    hu[10:30, 8:-8, 8:-8] = -850.0
    direction = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    return SeriesVolume(series_instance_uid="1.2", study_instance_uid="1.1", frame_of_reference_uid=None, hu=hu,
                        spacing_mm=(2.5, 1.0, 1.0), origin_lps=(0.0, 0.0, 100.0), direction=direction,
                        sop_instance_uids=tuple(str(k) for k in range(slices)), source_paths=(None,) * slices,
                        convolution_kernel=None, slice_thickness_mm=2.5)


def test_the_upper_lobe_is_the_cranial_half_of_the_lung_extent() -> None:
    extent = lung_z_extent(chest())
    assert extent == pytest.approx((100 - 2.5 * 29, 100 - 2.5 * 10))
    assert in_upper_lobe(70.0, extent) is True and in_upper_lobe(40.0, extent) is False
    assert in_upper_lobe(40.0, None) is None
    airless = chest()
    airless.hu[:] = 40.0
    assert lung_z_extent(airless) is None
