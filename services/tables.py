"""Every table of the suite in one metadata: what Alembic migrates and the tests compare against."""

from __future__ import annotations

import importlib

from sqlalchemy import MetaData

from shared.db import Base

TABLE_MODULES = (
    "shared.security",
    "shared.jobs",
    "services.fraud.db",
    "services.customer_service.db",
    "services.nodule.db",
    "services.iiot.db",
)
"""Every module that defines tables; a vertical without tables yet is skipped."""


def load_all_tables() -> MetaData:
    """Import every table module and return the one shared metadata."""
    for module in TABLE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return Base.metadata
