"""`tessera train fraud --data FILE`: a bank's export trains a model whose card names the file."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_runtime.artifacts import load_manifest
from services.fraud import training
from services.fraud.features import compute_offline_features
from services.fraud.model import FraudScorer
from services.fraud.simulate import SimulationConfig, simulate_transactions
from services.fraud.training import GbmParams, load_transactions_file, main
from tests.support import python_argv


@pytest.fixture(scope="module")
def simulated() -> pd.DataFrame:
    return simulate_transactions(SimulationConfig(n_customers=60, n_terminals=120, n_days=24, seed=11))


def bank_export(transactions: pd.DataFrame) -> pd.DataFrame:
    """The simulated rows as a bank would export them: text ids, ISO times with an offset, no derived columns."""
    return pd.DataFrame({
        "TRANSACTION_ID": [f"t-{i}" for i in transactions.TRANSACTION_ID],
        "TX_DATETIME": transactions.TX_DATETIME.dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "CUSTOMER_ID": [f"card-{c}" for c in transactions.CUSTOMER_ID],
        "TERMINAL_ID": [f"term-{t}" for t in transactions.TERMINAL_ID],
        "TX_AMOUNT": transactions.TX_AMOUNT.round(2),
        "TX_FRAUD": transactions.TX_FRAUD,
        "MERCHANT_NAME": "ignored",
    })


@pytest.fixture(scope="module")
def export_csv(simulated: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "bank-export.csv"
    bank_export(simulated).to_csv(path, index=False)
    return path


def test_a_bank_export_trains_a_model_whose_card_records_the_file(export_csv: Path, tmp_path: Path,
                                                                  simulated: pd.DataFrame,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "SELECTED_PARAMS", GbmParams(num_leaves=7, n_estimators=30))  # seconds, not minutes
    main(["--data", str(export_csv), "--from", "2018-04-03", "--to", "2018-04-22", "--version", "bank-1",
          "--no-sequence", "--output", str(tmp_path)])
    manifest = load_manifest(tmp_path / "bank-1")
    record = manifest.extra["training_data"]
    used = simulated[(simulated.TX_DATETIME >= "2018-04-03") & (simulated.TX_DATETIME < "2018-04-23")]
    assert record["sha256"] == hashlib.sha256(export_csv.read_bytes()).hexdigest()
    assert (record["rows"], record["first_date"], record["last_date"]) == (len(simulated), "2018-04-01", "2018-04-24")
    assert (record["rows_used"], record["used_from"], record["used_to"]) == (len(used), "2018-04-03", "2018-04-22")
    assert record["calibration_days"] == "2018-04-16..2018-04-22"
    assert manifest.metrics["n_train"] + manifest.metrics["n_valid"] == len(used)
    assert manifest.rebuild_command.startswith(f"tessera train fraud --data {export_csv} --from 2018-04-03")
    assert record["sha256"] in (tmp_path / "bank-1" / "MODEL_CARD.md").read_text()
    features, sequences = compute_offline_features(simulated)
    scores = FraudScorer(tmp_path / "bank-1").predict_batch(features.to_numpy(np.float32)[-50:], sequences[-50:])
    assert ((scores >= 0) & (scores <= 1)).all()


def test_an_export_reads_like_the_handbook_frame(export_csv: Path, simulated: pd.DataFrame) -> None:
    """Times are Unix seconds as the webhook computes them; text ids are numbered in time order."""
    loaded = load_transactions_file(export_csv)
    assert len(loaded) == len(simulated) and loaded.TRANSACTION_ID.is_unique
    expected_seconds = (simulated.TX_DATETIME - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    assert sorted(loaded.TX_TIME_SECONDS) == sorted(expected_seconds)
    assert (np.diff(loaded.TX_TIME_SECONDS.to_numpy()) >= 0).all()  # ids follow time
    assert loaded.SOURCE_TRANSACTION_ID.iloc[0].startswith("t-")
    assert set(loaded.TX_FRAUD.unique()) <= {0, 1}


def test_a_parquet_export_reads_like_the_csv(export_csv: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    parquet = tmp_path / "bank-export.parquet"
    export = pd.read_csv(export_csv)
    export["TX_DATETIME"] = pd.to_datetime(export.TX_DATETIME, utc=True)  # Parquet keeps timestamps typed
    export.to_parquet(parquet)
    pd.testing.assert_frame_equal(load_transactions_file(parquet), load_transactions_file(export_csv))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.parquet"
    path.write_bytes(b"PAR1")
    assert "reading Parquet needs pyarrow" in _exit_message(["--data", str(path)], capsys)


def _write(tmp_path: Path, rows: pd.DataFrame, name: str = "export.csv") -> Path:
    path = tmp_path / name
    rows.to_csv(path, index=False)
    return path


def _exit_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.drop(columns=["TX_FRAUD", "TERMINAL_ID"]), "missing column(s) TERMINAL_ID, TX_FRAUD"),
    (lambda f: f.assign(TX_DATETIME=f.TX_DATETIME.where(f.index != 4, "yesterday")),
     "TX_DATETIME: 1 value(s) are not ISO 8601 date/times (e.g. 2024-03-01T14:05:00Z): data row 5 ('yesterday')"),
    (lambda f: f.assign(TX_FRAUD=f.TX_FRAUD.astype(object).where(f.index != 2, "maybe")),
     "TX_FRAUD: 1 value(s) are not labels (1 fraud, 0 legitimate; every row needs one): data row 3 ('maybe')"),
    (lambda f: f.assign(TX_AMOUNT=f.TX_AMOUNT.where(f.index != 0, -5)), "TX_AMOUNT: 1 value(s) are not amounts"),
    (lambda f: f.assign(TRANSACTION_ID=f.TRANSACTION_ID.where(f.index != 1, f.TRANSACTION_ID[0])),
     "TRANSACTION_ID: 2 rows share an id: data row 1 ('t-0'), data row 2 ('t-0')"),
    (lambda f: f.head(0), "the file has a header but no rows"),
    (lambda f: f.assign(TX_FRAUD=0), "the training days (2018-04-01..2018-04-17; the last 7 days of the range "
                                     "calibrate, the days before train) hold 0 fraud(s)"),
])
def test_a_bad_export_is_refused_with_what_and_where(change, message: str, simulated: pd.DataFrame, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, change(bank_export(simulated)))
    error = _exit_message(["--data", str(path), "--output", str(tmp_path / "models"), "--no-sequence"], capsys)
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--from", "2018-04-20", "--to", "2018-04-02"], "--from 2018-04-20 is after --to 2018-04-02"),
    (["--from", "20/04/2018"], "argument --from: '20/04/2018' is not a date; expected YYYY-MM-DD"),
    (["--from", "2019-01-01"], "no rows between 2019-01-01 and the end (the file covers 2018-04-01..2018-04-24)"),
    (["--calibration-days", "0"], "--calibration-days must be at least 1"),
])
def test_bad_dates_are_refused(options: list[str], message: str, export_csv: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    error = _exit_message(["--data", str(export_csv), "--output", str(tmp_path), *options], capsys)
    assert message in error


@pytest.mark.parametrize(("name", "message"), [
    ("missing.csv", "missing.csv: no such file"),
    ("export.xlsx", "export.xlsx: unknown file type; expected .csv"),
])
def test_a_file_that_cannot_be_read_is_refused(name: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if name.endswith(".xlsx"):
        (tmp_path / name).write_bytes(b"PK")
    assert message in _exit_message(["--data", str(tmp_path / name)], capsys)


def test_the_command_line_exits_2_naming_the_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("TRANSACTION_ID,TX_DATETIME,TX_AMOUNT\n1,2024-01-01T00:00:00Z,3.50\n")
    done = subprocess.run(python_argv("-m", "services.cli", "train", "fraud", "--data", str(path)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "missing column(s) CUSTOMER_ID, TERMINAL_ID, TX_FRAUD" in done.stderr
    assert "Traceback" not in done.stderr
