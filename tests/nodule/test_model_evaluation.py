"""Nodule networks (shapes, parameter budget) and the evaluation metrics on hand-made detection lists."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.nodule.evaluation import (
    CPM_FP_RATES,
    Candidate,
    ScanRecord,
    TruthNodule,
    choose_threshold,
    froc,
    match,
    scan_counts,
    split_seeds,
    summarise,
    type_accuracy,
)
from services.nodule.model import (
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    NetConfig,
    NoduleNet,
    NoduleProbability,
    normalise_hu,
    parameter_count,
)


def test_networks_keep_the_patch_shape_and_the_student_is_80_percent_smaller() -> None:
    tiny = NoduleNet(NetConfig(channels=(4, 4, 8, 8)))
    patch = torch.rand(2, 1, 16, 32, 48)
    with torch.inference_mode():
        probability = NoduleProbability(tiny.eval())(patch)
    assert probability.shape == patch.shape and 0 <= float(probability.min()) <= float(probability.max()) <= 1
    teacher, student = parameter_count(NoduleNet(TEACHER_CONFIG)), parameter_count(NoduleNet(STUDENT_CONFIG))
    assert student <= 0.2 * teacher
    assert teacher * 4 < 25e6  # float32 weights stay under 25 MB


def test_normalise_hu_clips_to_the_window() -> None:
    import numpy as np

    assert normalise_hu(np.array([-3000.0, -1024.0, 400.0, 2000.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


def _scans() -> list[ScanRecord]:
    truths = (TruthNodule((0, 0, 0), 5.0, "solid"), TruthNodule((50, 0, 0), 3.0, "ground_glass"))
    positive = ScanRecord("a", truths=truths,
                          candidates=(Candidate((1, 0, 0), 0.9, "solid"), Candidate((0, 1, 0), 0.8, "solid"),
                                      Candidate((100, 0, 0), 0.7), Candidate((50, 1, 0), 0.6, "solid")))
    negative = ScanRecord("b", truths=(), candidates=(Candidate((0, 0, 0), 0.65), Candidate((9, 9, 9), 0.2)))
    return [positive, negative]


def test_match_uses_the_nodule_radius() -> None:
    positive, negative = _scans()
    assert match(positive) == [0, 0, None, 1]
    assert match(negative) == [None, None]


def test_froc_and_cpm_on_known_lists() -> None:
    curve = froc(_scans())
    # FP scores 0.7, 0.65, 0.2 over 2 scans; nodule scores 0.9 and 0.6 (the 0.8 duplicate counts neither way)
    expected = {0.125: 0.5, 0.25: 0.5, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert curve.sensitivity_at == pytest.approx(expected)
    assert curve.cpm == pytest.approx(5.5 / 7)
    assert (curve.nodules, curve.scans) == (2, 2) and tuple(curve.sensitivity_at) == CPM_FP_RATES
    assert curve.fp_per_scan[-1] == pytest.approx(1.5) and curve.sensitivity[-1] == 1.0


def test_per_scan_counts_and_threshold_choice() -> None:
    scans = _scans()
    loose = scan_counts(scans, 0.5)
    assert (loose.sensitivity, loose.specificity, loose.nodule_sensitivity) == (1.0, 0.0, 1.0)
    strict = scan_counts(scans, 0.66)
    assert (strict.sensitivity, strict.specificity) == (1.0, 1.0)
    assert (strict.nodule_sensitivity, strict.fp_per_scan) == (0.5, 0.5)
    assert choose_threshold(scans) == pytest.approx(0.8)  # 0.7, 0.8, 0.9 all reach 2.0: their median


def test_summary_intervals_and_type_accuracy() -> None:
    summary = summarise(_scans(), 0.66, resamples=200)
    assert summary.cpm.value == pytest.approx(5.5 / 7)
    assert summary.cpm.low <= summary.cpm.value <= summary.cpm.high
    assert summary.specificity.value == 1.0
    assert type_accuracy(_scans(), 0.5) == (0.5, 2)  # the ground-glass nodule was called solid


def test_nodules_under_3_mm_count_neither_way() -> None:
    small = ScanRecord("c", truths=(TruthNodule((0, 0, 0), 1.2, "solid", long_axis_mm=2.4),),
                       candidates=(Candidate((0.5, 0, 0), 0.9),))
    assert not small.positive
    counts = scan_counts([small], 0.5)
    assert (counts.true_negative, counts.false_positive, counts.nodules, counts.false_candidates) == (1, 0, 0, 0)
    with_small = froc([*_scans(), small])
    assert with_small.nodules == 2 and with_small.scans == 3


def test_splits_share_no_seed() -> None:
    train, validation, evaluation = (set(split_seeds(split, 200)) for split in ("train", "validation", "evaluation"))
    assert len(train) == 200 and not train & validation and not train & evaluation and not validation & evaluation


def test_the_development_set_shares_no_seed_with_calibration_or_evaluation() -> None:
    """Choices made on the development set never see a held-out study nor the studies training calibrates on."""
    from services.nodule.evaluation import CALIBRATION_STUDIES, development_seeds

    development = development_seeds(48)
    calibration = set(split_seeds("validation", CALIBRATION_STUDIES))
    assert len(set(development)) == 48
    assert not set(development) & calibration
    assert not set(development) & set(split_seeds("evaluation", 200))
    assert development[:24] == split_seeds("validation", 48)[24:]  # the README's 2026-12-03 development figures


def test_a_training_domain_never_changes_the_held_out_studies() -> None:
    """``--training-settings wide`` widens training and validation; the evaluation split keeps its own settings."""
    from services.nodule.evaluation import EVALUATION_CONFIG, TRAINING_CONFIG, WIDE_TRAINING_CONFIG, split_config

    assert split_config("evaluation", 5, WIDE_TRAINING_CONFIG) == replace(EVALUATION_CONFIG, seed=5)
    assert split_config("train", 5, WIDE_TRAINING_CONFIG) == replace(WIDE_TRAINING_CONFIG, seed=5)
    assert split_config("validation", 5) == replace(TRAINING_CONFIG, seed=5)
    assert WIDE_TRAINING_CONFIG.slice_spacing_choices_mm != EVALUATION_CONFIG.slice_spacing_choices_mm


def test_small_nodule_studies_have_their_own_seeds_and_only_small_nodules() -> None:
    """``--small-nodule-studies``: the extra training studies share no seed with any split and draw 3-6 mm nodules."""
    from services.nodule.evaluation import SMALL_NODULE_MM, TRAINING_CONFIG
    from services.nodule.training_fp import FpPlan

    small = set(split_seeds("train_small", 200))
    assert not small & set().union(*(split_seeds(split, 200) for split in ("train", "validation", "evaluation")))
    plan = FpPlan(study_shape=(32, 128, 128))
    config = plan.study_config("train_small", 7)
    assert config.nodule_diameter_mm == SMALL_NODULE_MM and config.no_nodule_probability == 0.0
    assert config.nodule_count[0] >= 2 and config.shape == (32, 128, 128) and config.seed == 7
    as_usual = replace(config, nodule_diameter_mm=TRAINING_CONFIG.nodule_diameter_mm,
                       nodule_count=TRAINING_CONFIG.nodule_count,
                       no_nodule_probability=TRAINING_CONFIG.no_nodule_probability)
    assert as_usual == plan.study_config("train", 7)
