"""The fraud-scoring vertical's declaration (see :mod:`shared.verticals`)."""

from shared.verticals import Vertical

VERTICAL = Vertical(
    name="fraud",
    title="Fraud scoring",
    commands={"train": "training:main", "simulate": "simulate:main", "restore-state": "restore:main",
              "recorder": "recorder:main"},
    benchmarks=("fraud", "fraud_eval", "fraud_sqlite_wrk", "callbacks"),
)
