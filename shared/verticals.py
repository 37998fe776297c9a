"""The vertical registry: each vertical declares itself once, and the platform discovers it.

A vertical is a package under ``TESSERA_VERTICALS_PACKAGE`` (default ``services``) holding a
``vertical.py`` module with one :class:`Vertical` named ``VERTICAL``. That declaration is all the
platform reads: the gateway mounts ``app`` under ``/<name>``, Celery loads ``task_module`` and
consumes ``queues``, Alembic and the tests load ``tables_module``, ``tessera up`` starts every
enabled listener, and ``tessera train|simulate|restore-state|recorder <name>`` run ``commands``.
Adding a vertical adds a folder; no platform file changes, and ``shared`` imports no vertical
(modules are named as strings and imported where they are used).

``vertical.py`` must stay cheap to import (no torch, no app): the Celery worker, the CLI and
Alembic read it before anything else.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from shared.config import get_settings

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
DECLARATION_MODULE = "vertical"
PLATFORM_SCOPES = ("admin",)
COMMANDS = ("train", "simulate", "restore-state", "recorder", "edge")
"""CLI verbs a vertical may implement: ``tessera <verb> <vertical> [args...]`` calls ``main(argv)``."""


def always() -> bool:
    """A listener's default switch: always on."""
    return True


@dataclass(frozen=True, slots=True)
class Listener:
    """A non-HTTP server that ``tessera up`` runs in its own process beside the API (a DICOM
    C-STORE receiver, an MQTT subscriber).

    ``target`` names ``serve(stop: threading.Event) -> None``, relative to the vertical's package
    (``"dicom:serve"``): it serves until ``stop`` is set (SIGTERM/SIGINT), then returns
    (:func:`shared.listeners.run_listener`). ``enabled`` says whether the current settings ask for
    it (e.g. only when an MQTT URL is set); it must not import anything heavy.
    """

    name: str
    target: str
    enabled: Callable[[], bool] = always
    description: str = ""


@dataclass(frozen=True, slots=True)
class Vertical:
    """One vertical's declaration (``services/<package>/vertical.py``: ``VERTICAL = Vertical(...)``).

    ``name`` is the URL prefix (``/<name>``), the API-key scope and the default Celery queue.
    Module references are relative to ``package`` (``"api:app"``, ``"tasks"``), so a vertical can
    be renamed or moved by editing one line.
    """

    name: str
    title: str
    package: str = ""
    app: str = "api:app"
    task_module: str | None = "tasks"
    tables_module: str | None = "db"
    queues: tuple[str, ...] = ()
    listeners: tuple[Listener, ...] = ()
    commands: Mapping[str, str] = field(default_factory=dict)
    benchmarks: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        """Where the gateway mounts the vertical's app."""
        return f"/{self.name}"

    @property
    def scope(self) -> str:
        """The API-key scope its endpoints require."""
        return self.name

    @property
    def queue_names(self) -> tuple[str, ...]:
        """The Celery queues its tasks use (its name when none are declared)."""
        return self.queues or (self.name,)

    def module_name(self, relative: str) -> str:
        """The absolute module name of ``relative``: ``"<package>.<relative>"``."""
        return f"{self.package}.{relative}"

    def resolve(self, reference: str) -> Any:
        """Import ``"module:attribute"`` (relative to the package) and return the attribute."""
        module, _, attribute = reference.partition(":")
        if not attribute:
            raise ValueError(f"{self.name}: {reference!r} is not 'module:attribute'")
        return getattr(importlib.import_module(self.module_name(module)), attribute)

    def load_app(self) -> Any:
        """The vertical's ASGI app (imports it: models and routers load here)."""
        return self.resolve(self.app)

    def listener(self, name: str) -> Listener:
        """The declared listener ``name``."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise LookupError(f"the {self.name} vertical declares no listener {name!r}")


class RegistryError(RuntimeError):
    """A vertical declaration is missing, malformed or clashes with another."""


def discover_verticals(root_package: str) -> tuple[Vertical, ...]:
    """Every ``<root_package>.<sub>.vertical:VERTICAL``, sorted by name, checked for clashes."""
    root = importlib.import_module(root_package)
    found: list[Vertical] = []
    for module_info in pkgutil.iter_modules(getattr(root, "__path__", [])):
        if not module_info.ispkg:
            continue
        package = f"{root_package}.{module_info.name}"
        declaration = f"{package}.{DECLARATION_MODULE}"
        if importlib.util.find_spec(declaration) is None:
            continue
        vertical = getattr(importlib.import_module(declaration), "VERTICAL", None)
        if not isinstance(vertical, Vertical):
            raise RegistryError(f"{declaration} must define VERTICAL = Vertical(...)")
        found.append(_with_package(vertical, package))
    _check(found)
    return tuple(sorted(found, key=lambda v: v.name))


def _with_package(vertical: Vertical, package: str) -> Vertical:
    if vertical.package and vertical.package != package:
        raise RegistryError(f"{package}.{DECLARATION_MODULE} declares package {vertical.package!r}")
    return replace(vertical, package=package)


def _check(verticals: list[Vertical]) -> None:
    names: dict[str, str] = {}
    for vertical in verticals:
        if not NAME_PATTERN.match(vertical.name):
            raise RegistryError(f"{vertical.package}: name {vertical.name!r} must match {NAME_PATTERN.pattern}")
        if vertical.name in PLATFORM_SCOPES or vertical.name in names:
            raise RegistryError(f"{vertical.package}: name {vertical.name!r} is taken "
                                f"({names.get(vertical.name, 'the platform')})")
        unknown = set(vertical.commands) - set(COMMANDS)
        if unknown:
            raise RegistryError(f"{vertical.package}: unknown commands {sorted(unknown)}; known: {COMMANDS}")
        names[vertical.name] = vertical.package


@lru_cache
def verticals() -> tuple[Vertical, ...]:
    """The registered verticals of this process (discovered once; tests clear the cache)."""
    return discover_verticals(get_settings().verticals_package)


def get_vertical(name: str) -> Vertical:
    """The vertical called ``name``; LookupError listing the known ones otherwise."""
    for vertical in verticals():
        if vertical.name == name:
            return vertical
    raise LookupError(f"no vertical {name!r}; registered: {', '.join(v.name for v in verticals())}")


def api_key_scopes() -> tuple[str, ...]:
    """Every scope an API key may carry: one per vertical, plus ``admin``."""
    return (*(v.scope for v in verticals()), *PLATFORM_SCOPES)


def vertical_queues() -> tuple[str, ...]:
    """Every vertical's Celery queues, in registry order, without repeats."""
    return tuple(dict.fromkeys(queue for v in verticals() for queue in v.queue_names))


def vertical_task_modules() -> tuple[str, ...]:
    """Every vertical's Celery task module (absolute names, not imported here)."""
    return tuple(v.module_name(v.task_module) for v in verticals() if v.task_module)


def vertical_table_modules() -> tuple[str, ...]:
    """Every vertical's table module (absolute names, not imported here)."""
    return tuple(v.module_name(v.tables_module) for v in verticals() if v.tables_module)
