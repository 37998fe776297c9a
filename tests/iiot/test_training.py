"""Training the failure-risk model on tiny slices (seconds): the loop learns and keeps the best
validation epoch, the real-data protocols run end to end (validation-chosen threshold, official
C-MAPSS test set), and a fleet-trained network is sealed with its card and served by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_runtime import ModelRuntime, load_manifest
from model_runtime.artifacts import MODEL_CARD_NAME
from services.iiot import datasets, evaluation, training
from services.iiot.model import ONNX_FILE, RiskRequest, RiskResult, risk_model_spec
from services.iiot.training import Arrays, FitSettings, FleetPlan

TINY = {"d_model": 8, "heads": 2, "layers": 1, "d_ff": 16}
QUICK = FitSettings(epochs=2, batch_size=64, learning_rate=5e-3, patience=2)


def synthetic(count: int, seed: int, window: int = 12, channels: int = 3) -> Arrays:
    """Windows whose last steps rise before a failure: channel 0 carries the signal."""
    rng = np.random.default_rng(seed)
    failing = rng.random(count) < 0.3
    x = rng.normal(size=(count, window, channels)).astype(np.float32)
    x[failing, -4:, 0] += 3.0
    rul = np.where(failing, rng.uniform(0, 72, count), 720.0).astype(np.float32)
    return Arrays(x, np.ones((count, window), np.float32), failing.astype(np.float32), rul)


def test_fit_learns_and_keeps_the_best_validation_epoch() -> None:
    data = (synthetic(240, 0), synthetic(80, 1), synthetic(80, 2))
    config = training.SensorWindowConfig.for_tier("edge", ("a", "b", "c"), window=12, rul_scale=720.0, **TINY)
    settings = FitSettings(epochs=5, batch_size=32, learning_rate=1e-2, patience=5)
    result = training.fit(config, data[0], data[1], settings, training.fleet_validation_loss)
    scores = [entry["validation"] for entry in result.history]
    assert result.validation_loss == min(scores) and result.best_epoch == scores.index(min(scores))
    assert training.failure_validation_loss(result.net, data[2]) < 0.2  # AP > 0.8 on the clear signal


def test_fleet_model_is_sealed_with_its_card_and_served(tmp_path: Path) -> None:
    channels = len(training.STEP_FEATURES)
    train, validation, test = (synthetic(count, seed, window=48, channels=channels)
                               for seed, count in enumerate((300, 80, 80)))
    data = training.Splits(train, validation, test, training.STEP_FEATURES)
    plan = FleetPlan(assets=4, days=10, test_assets=2, policy_assets=2)
    nets, figures = training.run_fleet("edge", plan, QUICK, data=data)
    assert figures["alerts"]["policy"]["open_threshold"] in training.POLICY_OPEN
    directory = training.write_artifact(nets[0], tmp_path / "edge" / "v1", figures=figures,
                                        data=training.FLEET_DATA.format(cap=720, **vars(FleetPlan())),
                                        rebuild_command="tessera train iiot --tier edge")
    manifest = load_manifest(directory)
    assert manifest.metrics["onnx_bytes"] == (directory / ONNX_FILE).stat().st_size < 1_000_000
    card = (directory / MODEL_CARD_NAME).read_text()
    assert "SIMULATED" in card and "tessera train iiot --tier edge" in card and "test fleet" in card
    assert manifest.extra["alert_policy"] == figures["alerts"]["policy"] and "## Alerts" in card
    runtime = ModelRuntime()
    runtime.load_sync(risk_model_spec(directory, name="iiot-trained"))
    try:
        answers = runtime.predict_many_sync("iiot-trained", [RiskRequest(x) for x in data.test.x[:5]])
    finally:
        runtime.close_sync()
    assert all(isinstance(answer, RiskResult) and 0 <= answer.p_failure <= 1 for answer in answers)
    evaluations = tmp_path / "evaluation"
    evaluations.mkdir()
    (evaluations / "ai4i.json").write_text(json.dumps({"dataset": "AI4I 2020", "protocol": "stratified",
                                                        "test": {"f1": 0.5}}))
    training.render_card(directory, evaluations)  # the card is outside the digests: still verifies
    assert "AI4I 2020: test" in (directory / MODEL_CARD_NAME).read_text() and load_manifest(directory)


def require(folder: str) -> None:
    if not (datasets.datasets_dir() / folder).is_dir():
        pytest.skip(f"the shared data set is absent: {datasets.datasets_dir() / folder}")


def test_cmapss_protocol_scores_the_official_test_set_once() -> None:
    require(datasets.CMAPSS_FOLDER)
    folds = training.cmapss_folds(folds=2, cuts=3, unit_limit=8)
    truth = folds[0].validation_truth
    assert truth is not None and folds[0].validation.rul is not None
    np.testing.assert_array_equal(folds[0].validation.rul, np.minimum(truth, datasets.RUL_CAP))
    figures = training.run_cmapss(seeds=2, keep=1, settings=QUICK, sizes=TINY, data=folds, baseline=True)
    assert figures["test_engines"] == 100 and set(figures["test"]) >= {"rmse", "phm08", "rmse_capped_truth"}
    assert set(figures["baseline"]["test"]) == set(figures["test"])  # LightGBM, same windows, same run
    assert figures["validation"]["windows"] == figures["baseline"]["validation"]["windows"] == 8 * 3
    assert [len(kept) for kept in figures["ensemble_seeds"]] == [1, 1] and "capped at 125" in figures["protocol"]
    blend = figures["blend"]  # the share is the best on validation; the test is scored with it once
    best = min(blend["validation_rmse_capped_by_share"].values())
    assert blend["validation"]["rmse_capped_truth"] == pytest.approx(best, abs=1e-4)
    assert set(blend["test"]) == set(figures["test"])
    for fold, kept in enumerate(figures["ensemble_seeds"]):  # chosen on the fold's validation, never on test
        scores = [run["validation_rmse"] for run in figures["runs"] if run["fold"] == fold]
        assert scores[kept[0]] == min(scores)


def test_the_cmapss_baseline_may_use_its_own_window_on_the_same_cuts(tmp_path: Path) -> None:
    require(datasets.CMAPSS_FOLDER)
    folds = training.cmapss_folds(folds=2, cuts=3, unit_limit=8, window=50)
    longer = training.cmapss_folds(folds=2, cuts=3, unit_limit=8, window=60)
    saved = tmp_path / "cmapss_predictions.npz"
    figures = training.run_cmapss(seeds=1, settings=QUICK, sizes=TINY, data=folds, baseline=True, baseline_data=longer,
                                  predictions_file=saved)
    baseline, blend = figures["baseline"], figures["blend"]
    assert baseline["window"] == 60 and blend["attention_share"] in evaluation.BLEND_WEIGHTS
    assert len(baseline["features"]) == 14 * 10 + 2 * 14 and baseline["features"][-1] == "s21.history_slope"
    assert baseline["seeds"] == list(training.CMAPSS_GBM_SEEDS) and baseline["params"]["num_leaves"] == 15
    assert np.shape(baseline["iterations"]) == (2, len(training.CMAPSS_GBM_SEEDS))
    with np.load(saved) as predictions:  # the blend again from the saved predictions alone
        share = blend["attention_share"]
        mixed = share * predictions["network_validation"] + (1 - share) * predictions["gbm_validation"]
        capped = np.minimum(predictions["validation_truth"], predictions["rul_cap"])
        assert evaluation.rmse(mixed, capped) == pytest.approx(blend["validation"]["rmse_capped_truth"])
        mixed_test = share * predictions["network_test"] + (1 - share) * predictions["gbm_test"]
        assert evaluation.rmse(mixed_test, predictions["test_truth"]) == pytest.approx(blend["test"]["rmse"])
    assert figures["predictions_file"] == saved.name
    other_cuts = training.cmapss_folds(folds=2, cuts=3, unit_limit=8, seed=5)
    with pytest.raises(ValueError, match="same engines and cuts"):
        training.run_cmapss(seeds=1, settings=QUICK, sizes=TINY, data=folds, baseline=True, baseline_data=other_cuts)


def test_the_blend_share_is_the_best_on_validation_and_ties_go_to_an_even_blend() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    good, bad = truth + 0.1, truth + 3.0
    share, losses = evaluation.choose_blend_weight(good, bad, lambda blend: evaluation.rmse(blend, truth))
    assert share == 1.0 and losses[1.0] == min(losses.values())
    share, _ = evaluation.choose_blend_weight(truth, truth, lambda blend: evaluation.rmse(blend, truth))
    assert share == 0.5


def test_ai4i_cli_writes_its_evaluation_with_a_validation_threshold(tmp_path: Path) -> None:
    require(datasets.AI4I_FOLDER)
    training.main(["--dataset", "ai4i", "--seeds", "1", "--epochs", "1", "--folds", "2", "--output", str(tmp_path)])
    figures = json.loads((tmp_path / "evaluation" / "ai4i.json").read_text())
    assert figures["rows"] == {"development": 8000, "test": 2000, "folds": 2} and len(figures["runs"]) == 2
    # the threshold is chosen out of fold, never on test; the test rows flag the share it flags out of fold
    assert figures["test"]["out_of_fold_threshold"] == figures["validation"]["threshold"]
    assert figures["validation"]["rows"] == 8000 and figures["test"]["rows"] == 2000
    assert not set(figures["inputs"]) & {"TWF", "HDF", "PWF", "OSF", "RNF"}
    assert figures["baseline"]["test"]["out_of_fold_threshold"] == figures["baseline"]["validation"]["threshold"]
    assert figures["rebuild_command"].startswith("tessera train iiot --dataset ai4i")
    blend = figures["blend"]  # the share chosen out of fold, its threshold too; the test rows decided as above
    assert blend["validation"]["f1"] == pytest.approx(max(blend["validation_f1_by_share"].values()), abs=1e-4)
    assert blend["test"]["out_of_fold_threshold"] == blend["validation"]["threshold"]


def test_the_rate_matched_threshold_flags_the_out_of_fold_share_of_rows() -> None:
    out_of_fold = np.linspace(0.0, 1.0, 100)  # a threshold of 0.9 flags 10 % of these rows
    smoother = np.linspace(0.2, 0.6, 50)  # a mean of models: no row reaches 0.9
    threshold = training.rate_matched_threshold(smoother, out_of_fold, 0.9)
    assert int((smoother >= threshold).sum()) == 5 and int((smoother >= 0.9).sum()) == 0


def test_ai4i_folds_keep_the_test_rows_apart_and_stratify() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    folds = training.stratified_folds(labels, 5, seed=1)
    validated = np.sort(np.concatenate([val for _, val in folds]))
    assert (validated == np.arange(100)).all()
    for train_rows, val_rows in folds:
        assert not set(train_rows) & set(val_rows) and labels[val_rows].sum() == 2


def test_shipped_cards_quote_the_real_data_evaluations_as_they_stand() -> None:
    """A real-data run rewrites models/iiot/evaluation and renders every card again; a card that quotes
    older figures (as v2's did after the 2026-12-02 runs) fails here."""
    from shared.config import get_settings

    output = get_settings().models_dir / training.MODELS_SUBDIR
    versions = training.artifact_versions(output)
    assert versions, f"no shipped risk model under {output}"
    for directory in versions:
        current = training.card_text(directory, output / training.EVALUATION_SUBDIR)
        stale = (directory / MODEL_CARD_NAME).read_text() != current
        command = f"tessera train iiot --card-only --tier {directory.parent.name} --version {directory.name}"
        assert not stale, f"{directory}: the card quotes older figures; run `{command}`"


def test_history_channels_are_standardised_on_the_training_windows_and_zero_where_padded() -> None:
    require(datasets.CMAPSS_FOLDER)
    fold = training.cmapss_folds(folds=2, cuts=3, unit_limit=8, window=50)[0]  # some test engines are shorter
    widened = training.with_history_channels(fold)
    sensors = len(datasets.CMAPSS_SENSORS)
    assert widened.channels[-1] == "s21.history_slope" and len(widened.channels) == 3 * sensors
    assert widened.train.x.shape == (*fold.train.x.shape[:2], 3 * sensors)
    np.testing.assert_array_equal(widened.validation.x[..., :sensors], fold.validation.x)
    last = widened.train.x[:, -1, sensors:]  # the last step is never padding
    np.testing.assert_allclose(last.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(last.std(axis=0), 1.0, atol=1e-3)
    padded = widened.test.mask == 0
    assert padded.any() and not widened.test.x[padded][:, sensors:].any()
    steps = widened.test.mask[0] > 0  # constant along the window's valid steps
    np.testing.assert_array_equal(widened.test.x[0, steps, sensors:], np.broadcast_to(
        widened.test.x[0, -1, sensors:], (int(steps.sum()), 2 * sensors)))


def test_networks_train_on_history_channels_and_the_protocol_says_so() -> None:
    require(datasets.CMAPSS_FOLDER)
    folds = [training.with_history_channels(fold) for fold in training.cmapss_folds(folds=2, cuts=3, unit_limit=8)]
    figures = training.run_cmapss(seeds=1, settings=QUICK, sizes=TINY, data=folds)
    assert "history features (below) as constant channels" in figures["protocol"]
    plain = training.run_cmapss(seeds=1, settings=QUICK, sizes=TINY, data=training.cmapss_folds(folds=2, cuts=3,
                                                                                                unit_limit=8))
    assert "constant channels" not in plain["protocol"] and figures["parameters"] > plain["parameters"]
