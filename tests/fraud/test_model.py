"""Training builds a sealed artifact; FraudScorer loads it and scores like the trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_runtime.artifacts import ArtifactError, load_manifest
from services.fraud.features import FEATURE_NAMES, compute_offline_features
from services.fraud.model import FALLBACK_SEQUENCE_BACKEND, SEQUENCE_FEATURE, FraudScorer, _tabular_columns
from services.fraud.simulate import SimulationConfig, simulate_transactions
from services.fraud.training import GbmParams, SequenceTraining, train_candidate, train_fraud_model

SMALL_GBM = GbmParams(num_leaves=15, n_estimators=40, min_child_samples=20)
SMALL_SEQUENCE = SequenceTraining(epochs=1, negative_fraction=0.3)


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return simulate_transactions(SimulationConfig(n_customers=300, n_terminals=600, n_days=45, seed=5))


@pytest.fixture(scope="module")
def artifact(transactions: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = transactions[transactions.TX_TIME_DAYS.between(14, 34)]
    valid = transactions[transactions.TX_TIME_DAYS.between(35, 44)]
    root = tmp_path_factory.mktemp("models")
    train_fraud_model(train, valid, output_dir=root, version="test-1", context_df=transactions,
                      params=SMALL_GBM, sequence_settings=SMALL_SEQUENCE,
                      data_description="simulated (tests)", rebuild_command="pytest tests/fraud")
    return root / "test-1"


@pytest.fixture(scope="module")
def inputs(transactions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    features, sequences = compute_offline_features(transactions)
    last = transactions.TX_TIME_DAYS >= 40
    return features.to_numpy(np.float32)[last], sequences[last.to_numpy()], transactions[last]


def test_artifact_is_sealed_with_a_model_card(artifact: Path) -> None:
    manifest = load_manifest(artifact)
    assert manifest.name == "fraud" and "valid_average_precision" in manifest.metrics
    assert (artifact / "MODEL_CARD.md").read_text().strip()
    with (artifact / "scorer.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(ArtifactError):
        FraudScorer(artifact)
    (artifact / "scorer.json").write_text((artifact / "scorer.json").read_text()[:-1])


def test_scores_are_probabilities_and_rank_frauds_first(artifact: Path, inputs) -> None:
    features, sequences, frame = inputs
    scorer = FraudScorer(artifact)
    assert scorer.uses_sequence and scorer.feature_names[-1] == SEQUENCE_FEATURE
    scores = scorer.predict_batch(features, sequences)
    assert scores.shape == (len(features),) and ((scores >= 0) & (scores <= 1)).all()
    fraud = frame.TX_FRAUD.to_numpy() == 1
    assert scores[fraud].mean() > 3 * scores[~fraud].mean()


def test_batch_equals_single_and_backends_agree(artifact: Path, inputs) -> None:
    features, sequences, _ = inputs
    scorer = FraudScorer(artifact)
    batch = scorer.predict_batch(features[:64], sequences[:64])
    single = np.concatenate([scorer.predict_batch(features[i:i + 1], sequences[i:i + 1]) for i in range(64)])
    np.testing.assert_allclose(single, batch, rtol=1e-6, atol=1e-9)
    numpy_scores = FraudScorer(artifact, tree_backend="numpy").predict_batch(features[:64], sequences[:64])
    np.testing.assert_allclose(numpy_scores, batch, rtol=1e-9, atol=1e-12)
    one_pass, reasons = scorer.score_with_reasons(features[:64], sequences[:64], k=3)
    np.testing.assert_allclose(one_pass, batch, rtol=1e-6, atol=1e-9)
    assert reasons == scorer.top_contributions(features[:64], k=3, sequences=sequences[:64])
    threshold = float(np.median(batch[:64]))
    flagged_scores, flagged_reasons = scorer.score_with_reasons(features[:64], sequences[:64], k=3,
                                                                explain_from=threshold)
    np.testing.assert_allclose(flagged_scores, batch, rtol=1e-6, atol=1e-9)
    assert [bool(r) for r in flagged_reasons] == [bool(s >= threshold) for s in flagged_scores]
    assert [r for r in flagged_reasons if r] == [r for r, s in zip(reasons, one_pass, strict=True) if s >= threshold]
    torch_scores = FraudScorer(artifact, sequence_backend="eager").predict_batch(features[:64], sequences[:64])
    np.testing.assert_allclose(torch_scores, batch, rtol=1e-4, atol=1e-6)
    int8 = FraudScorer(artifact, sequence_backend="onnx-int8").predict_batch(features[:64], sequences[:64])
    assert np.corrcoef(int8, batch)[0, 1] > 0.98


def test_the_card_records_the_measured_sequence_backend_and_the_scorer_serves_it(artifact: Path) -> None:
    manifest = load_manifest(artifact)
    record = manifest.extra["serving_backend"]["sequence"]
    measured = {m["name"]: m for m in record["measurements"]}
    assert set(measured) == {"eager", "onnx", "onnx-int8"}
    assert all(set(m["latency_ms"]) == {"1", "8", "64"} for m in measured.values())
    assert measured["onnx"]["max_abs_error"] < 1e-4 and measured[record["chosen"]]["accurate"]
    assert record["conditions"]["torch_threads"] == 1 and "calibration period" in record["conditions"]["example"]
    card = (artifact / "MODEL_CARD.md").read_text()
    assert f"Served: **{record['chosen']}**" in card and "| onnx-int8 |" in card
    assert FraudScorer(artifact).sequence_backend == record["chosen"]
    assert FraudScorer(artifact, sequence_backend="eager").sequence_backend == "eager"
    with pytest.raises(ValueError, match="unknown sequence backend"):
        FraudScorer(artifact, sequence_backend="torch")


def test_a_card_without_the_measured_record_serves_the_fallback(artifact: Path, tmp_path: Path) -> None:
    import json
    import shutil

    older = tmp_path / "older"
    shutil.copytree(artifact, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["extra"]["serving_backend"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert FraudScorer(older).sequence_backend == FALLBACK_SEQUENCE_BACKEND == "onnx"


def test_raw_histories_score_like_precomputed_sequences(artifact: Path, transactions: pd.DataFrame) -> None:
    from services.fraud.features import aggregates_for_row, feature_vector

    scorer = FraudScorer(artifact)
    rows = transactions.index[transactions.TX_TIME_DAYS >= 40][:5]
    feats, raw = [], []
    for i in rows:
        agg = aggregates_for_row(transactions, int(i))
        row = transactions.loc[i]
        feats.append(feature_vector(row.TX_AMOUNT, row.TX_DATETIME.to_pydatetime(), agg))
        raw.append((row.TX_AMOUNT, float(row.TX_TIME_SECONDS), str(row.TERMINAL_ID), agg.card_history))
    features, sequences = compute_offline_features(transactions)
    positions = transactions.index.get_indexer(rows)
    np.testing.assert_allclose(scorer.predict_batch(np.stack(feats), raw),
                               scorer.predict_batch(features.to_numpy(np.float32)[positions],
                                                    sequences[positions]), rtol=1e-5)


def test_top_contributions_name_the_features(artifact: Path, inputs) -> None:
    features, sequences, _ = inputs
    reasons = FraudScorer(artifact).top_contributions(features[:8], k=3, sequences=sequences[:8])
    assert len(reasons) == 8 and all(len(r) == 3 for r in reasons)
    names = set(FEATURE_NAMES) | {SEQUENCE_FEATURE}
    assert all(name in names and isinstance(value, float) for r in reasons for name, value in r)
    assert all(r[0][1] >= r[1][1] >= r[2][1] for r in reasons)


def test_path_attributions_add_up_to_the_margin(artifact: Path, inputs) -> None:
    features, sequences, _ = inputs
    scorer = FraudScorer(artifact)
    model_inputs = scorer.model_inputs(features[:32], sequences[:32])
    leaves = np.asarray(scorer.booster.predict(model_inputs, pred_leaf=True))
    margin, contrib = scorer.paths.explain(leaves)
    np.testing.assert_allclose(margin, scorer.booster.predict(model_inputs, raw_score=True), atol=1e-9)
    np.testing.assert_allclose(contrib.sum(axis=1) + scorer.paths.bias, margin, atol=1e-9)
    shap = scorer.top_contributions(features[:32], k=1, sequences=sequences[:32], method="shap")
    assert len(shap) == 32 and all(len(r) == 1 for r in shap)


def test_leaf_indices_through_the_c_api_equal_the_wrapper(artifact: Path, inputs) -> None:
    features, sequences, _ = inputs
    scorer = FraudScorer(artifact)
    for count in (1, 7, 64):
        model_inputs = scorer.model_inputs(features[:count], sequences[:count])
        expected = scorer.booster.predict(model_inputs, pred_leaf=True, num_threads=1)
        np.testing.assert_array_equal(scorer.leaf_index(model_inputs), expected)
    scorer.leaf_index._predict = None  # a LightGBM without the expected handle: the wrapper serves
    np.testing.assert_array_equal(scorer.leaf_index(model_inputs), expected)


def test_missing_sequences_are_refused(artifact: Path, inputs) -> None:
    features, _, _ = inputs
    with pytest.raises(ValueError, match="sequences"):
        FraudScorer(artifact).predict_batch(features[:2])


def test_retraining_candidate_reports_holdout_metrics(transactions: pd.DataFrame) -> None:
    features, _ = compute_offline_features(transactions)
    labelled = pd.concat([transactions, features], axis=1)
    model, metrics = train_candidate(labelled, params=SMALL_GBM, holdout_days=7, delay_days=7)
    assert 0.5 < metrics["auc_roc"] <= 1.0 and 0.0 <= metrics["card_precision_at_100"] <= 1.0
    assert metrics["n_train"] > 0 and metrics["n_holdout"] > 0 and not model.uses_sequence


def test_an_artifact_of_an_older_feature_set_reads_its_own_columns() -> None:
    older = tuple(name for name in FEATURE_NAMES if name != "TERMINAL_DAYS_SINCE_FIRST_FRAUD_DELAYED")
    columns = _tabular_columns(older + (SEQUENCE_FEATURE,))
    assert columns is not None and [FEATURE_NAMES[c] for c in columns] == list(older)
    assert _tabular_columns(FEATURE_NAMES + (SEQUENCE_FEATURE,)) is None
    with pytest.raises(ValueError, match="RETIRED_FEATURE"):
        _tabular_columns(("TX_AMOUNT", "RETIRED_FEATURE"))
