"""Every table of the suite in one metadata: what Alembic migrates and the tests compare against."""

from __future__ import annotations

import importlib

from sqlalchemy import MetaData

from shared.db import Base
from shared.verticals import vertical_table_modules

PLATFORM_TABLE_MODULES = (
    "shared.security",
    "shared.jobs",
    "shared.webhooks",
    "model_runtime.versions",
)
"""The platform's own table modules; a vertical's come from its declaration (:mod:`shared.verticals`)."""


def table_modules() -> tuple[str, ...]:
    """Every module that defines tables: the platform's, then each registered vertical's."""
    return (*PLATFORM_TABLE_MODULES, *vertical_table_modules())


def load_all_tables() -> MetaData:
    """Import every table module and return the one shared metadata (a module not written yet is skipped)."""
    for module in table_modules():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return Base.metadata
