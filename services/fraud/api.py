"""HTTP app of the fraud scoring vertical, mounted at ``/fraud``."""

from __future__ import annotations

from shared.app import create_service_app

app = create_service_app("fraud", title="Tessera — Fraud scoring")
