"""Features computed at request time equal a pandas reference on the handbook's real data.

Transactions of a sample of cards are replayed through the signed webhook in time order, with
fraud labels posted once a transaction is 7 days old (the handbook's feedback delay), exactly as a
bank's chargebacks would arrive. The features each request was scored with (stored with the
decision) must equal the handbook's own pandas computation over the same transactions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from sqlalchemy import text

from services.fraud import handbook
from services.fraud.features import FEATURE_NAMES, HANDBOOK_FEATURES, compute_offline_features
from tests.conftest import STATE_STORES
from tests.fraud.conftest import FraudServer, FraudTenant

pytestmark = pytest.mark.stack_variants(*STATE_STORES)  # the windows of each state store match the reference

LABEL_DELAY = pd.Timedelta(days=7)


@pytest.fixture(scope="module")
def handbook_sample() -> pd.DataFrame:
    path = handbook.dataset_path()
    if not path.exists():
        pytest.skip(f"handbook data absent: {path} (see ../shared/datasets/fraud_handbook/README.md)")
    df = handbook.load_transactions(path)
    window = df[(df.TX_DATETIME >= "2018-07-10") & (df.TX_DATETIME < "2018-08-05")]
    rng = np.random.default_rng(7)
    # Compromised terminals (scenario 2) exercise the delayed terminal risk; random cards the rest.
    early_frauds = window[(window.TX_FRAUD_SCENARIO == 2) & (window.TX_DATETIME < "2018-07-20")]
    terminals = rng.choice(early_frauds.TERMINAL_ID.unique(), 3, replace=False)
    cards = rng.choice(window.CUSTOMER_ID.unique(), 6, replace=False)
    sample = window[window.TERMINAL_ID.isin(terminals) | window.CUSTOMER_ID.isin(cards)]
    return sample.sort_values(["TX_TIME_SECONDS", "TRANSACTION_ID"]).reset_index(drop=True)


def replay(tenant: FraudTenant, sample: pd.DataFrame) -> None:
    pending_labels = sample[sample.TX_FRAUD == 1][["TRANSACTION_ID", "TX_DATETIME"]].values.tolist()
    with tenant.client() as client:
        for row in sample.itertuples():
            while pending_labels and pending_labels[0][1] + LABEL_DELAY <= row.TX_DATETIME:
                labelled_id = pending_labels.pop(0)[0]
                answer = client.post(f"/transactions/{labelled_id}/label",
                                     json={"is_fraud": True, "source": "chargeback"})
                assert answer.status_code == 200, answer.text
            body, headers = tenant.signed({
                "id": str(row.TRANSACTION_ID), "timestamp": row.TX_DATETIME.isoformat(),
                "customer_id": str(row.CUSTOMER_ID), "terminal_id": str(row.TERMINAL_ID),
                "amount": float(row.TX_AMOUNT)})
            answer = client.post("/transactions", content=body, headers=headers)
            assert answer.status_code == 200, answer.text


def stored_features(server: FraudServer, tenant: FraudTenant, ids: list[int]) -> np.ndarray:
    server.wait_recorded(tenant.tenant_id, [str(i) for i in ids])
    with server.engine.connect() as connection:
        rows: dict[str, Any] = dict(connection.execute(text(
            "SELECT transaction_id, features FROM fraud_transactions WHERE tenant_id = :t"),
            {"t": tenant.tenant_id}).all())
    decoded = [orjson.loads(rows[str(i)]) if isinstance(rows[str(i)], str) else rows[str(i)] for i in ids]
    return np.asarray(decoded, dtype=np.float64)


@pytest.mark.handbook
def test_request_time_features_equal_the_pandas_reference(fraud_server: FraudServer,
                                                          handbook_sample: pd.DataFrame) -> None:
    tenant = fraud_server.new_tenant()
    replay(tenant, handbook_sample)
    ids = handbook_sample.TRANSACTION_ID.tolist()
    online = pd.DataFrame(stored_features(fraud_server, tenant, ids), columns=list(FEATURE_NAMES), index=ids)

    reference = handbook.handbook_reference_features(handbook_sample).loc[ids]
    np.testing.assert_allclose(online[list(HANDBOOK_FEATURES)].to_numpy(),
                               reference[list(HANDBOOK_FEATURES)].to_numpy(np.float64), rtol=1e-5, atol=1e-4)
    assert reference["TERMINAL_ID_RISK_30DAY_WINDOW"].gt(0).any(), "the sample must exercise terminal risk"

    offline, _ = compute_offline_features(handbook_sample)
    offline.index = handbook_sample.TRANSACTION_ID.to_numpy()
    np.testing.assert_allclose(online.to_numpy(), offline.loc[ids].to_numpy(np.float64), rtol=1e-5, atol=1e-4)
    assert online["TERMINAL_DAYS_SINCE_FIRST_FRAUD_DELAYED"].ge(7).any(), "the sample must exercise compromise age"
