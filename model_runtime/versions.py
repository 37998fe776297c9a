"""Model versions per tenant, promotion and hot reload, for every vertical.

The registry
    One table, ``model_versions``, holds every version a vertical trained: its model family
    (``"fraud"``), its label, its scope (the tenant whose data trained it, or :data:`SHARED`, the
    empty tenant id, for a version every tenant gets), where its sealed artifact lies, the
    artifact's sha256 (:attr:`~model_runtime.artifacts.ArtifactManifest.digest`), its metrics and
    its model card. At most one version is live per (model, scope): a partial unique index holds
    that even against two promotions racing. See :func:`record_version`, :func:`promote`,
    :func:`retire_live`, :func:`live_version`, :func:`live_artifact_dir`, :func:`recorded_versions`.

Serving
    :class:`LiveModels` keeps one process's runtime serving a family: the vertical's default under
    the family's name and each tenant's live version as ``<model>@<tenant>``
    (:func:`tenant_runtime_name`). Requests ask :meth:`LiveModels.name_for`, a dict lookup with no
    database read. An API process loads every live version and polls (:meth:`LiveModels.watch`,
    every ``model_reload_poll_s``). A Celery worker serves the tenants its tasks ask for
    (:meth:`LiveModels.model_for_sync`, :meth:`LiveModels.serve_sync`) and, once
    :func:`reload_in_workers` registered the family, checks the registry again when a task starts
    and a poll interval has passed since the last check. That check runs in the pool process that
    runs the task, so prefork children need no thread of their own and nothing crosses a fork;
    and a task never sees its model change while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery.signals import task_prerun
from sqlalchemy import Index, String, Text, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from model_runtime.artifacts import MODEL_CARD_NAME, ArtifactError, load_manifest
from model_runtime.runtime import ModelRuntime, ModelSpec, get_runtime
from shared.config import get_settings
from shared.db import Base, session_factory, utcnow
from shared.errors import NotFound

logger = logging.getLogger("tessera.model_runtime.versions")

SHARED = ""
"""The scope of a version that serves every tenant (the empty tenant id)."""
LIVE, CANDIDATE, REJECTED, RETIRED = "live", "candidate", "rejected", "retired"


class ModelVersion(Base):
    """One trained version of a model family in one scope; at most one is live per (model, scope)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index("ix_model_versions_scope_created", "model", "tenant_id", "created_at"),
        Index("ix_model_versions_one_live", "model", "tenant_id", unique=True,
              sqlite_where=text("status = 'live'"), postgresql_where=text("status = 'live'")),
    )

    model: Mapped[str] = mapped_column(String(64), primary_key=True, doc="model family, e.g. fraud")
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), server_default=SHARED, doc="scope; '' is shared")
    status: Mapped[str] = mapped_column(String(20), doc="live | candidate | rejected | retired")
    artifact_dir: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str | None] = mapped_column(String(64), default=None,
                                               doc="artifact digest; None for rows older than the registry")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    card: Mapped[str] = mapped_column(Text, default="", server_default="", doc="MODEL_CARD.md text")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(default=None)


class VersionNotFound(NotFound):
    """No such version of that model in the registry (404)."""


# --------------------------------------------------------------------------- the registry

def record_version(session: Session, model: str, version: str, artifact_dir: Path, *,
                   tenant_id: str = SHARED, metrics: dict[str, Any] | None = None,
                   status: str = CANDIDATE) -> ModelVersion:
    """Record a sealed artifact as a version of ``model`` in ``tenant_id``'s scope, not live yet.

    The artifact is verified against its manifest now and its digest and model card are kept, so
    a process about to serve it can tell that it is the artifact that was evaluated.

    Parameters
    ----------
    metrics : dict, optional
        What the version was judged on; defaults to the manifest's metrics.
    status : {"candidate", "rejected"}
        A candidate waits for :func:`promote`; a rejected version is kept for its metrics.

    Raises
    ------
    ArtifactError
        The artifact is incomplete, does not match its digests, or holds another version.
    """
    if status not in (CANDIDATE, REJECTED):
        raise ValueError(f"a version is recorded as {CANDIDATE} or {REJECTED}, not {status!r}")
    manifest = load_manifest(artifact_dir)
    if manifest.version not in (version, "local"):
        raise ArtifactError(f"{artifact_dir} holds version {manifest.version}, not {version}")
    card = artifact_dir / MODEL_CARD_NAME
    row = ModelVersion(model=model, version=version, tenant_id=tenant_id, status=status,
                       artifact_dir=str(artifact_dir.resolve()), sha256=manifest.digest,
                       metrics=dict(manifest.metrics) if metrics is None else metrics,
                       card=card.read_text() if card.is_file() else "")
    session.add(row)
    session.flush()
    return row


def promote(session: Session, model: str, version: str) -> ModelVersion:
    """Make ``version`` the live one of its scope; the scope's previous live version is retired.

    Promoting a retired version again is a rollback. Two promotions racing in one scope cannot
    both commit: the partial unique index fails the second with an ``IntegrityError``.

    Raises
    ------
    VersionNotFound
        ``version`` of ``model`` was never recorded.
    """
    row = session.get(ModelVersion, (model, version))
    if row is None:
        raise VersionNotFound(f"model {model} has no version {version}")
    if row.status != LIVE:
        retire_live(session, model, row.tenant_id)
        row.status, row.promoted_at = LIVE, utcnow()
        session.flush()
    return row


def retire_live(session: Session, model: str, tenant_id: str = SHARED) -> str | None:
    """Retire the scope's live version (the scope falls back to the default); its label, if any."""
    live = live_version(session, model, tenant_id)
    if live is None:
        return None
    session.execute(update(ModelVersion).where(ModelVersion.model == model, ModelVersion.tenant_id == tenant_id,
                                               ModelVersion.status == LIVE).values(status=RETIRED))
    session.flush()
    return live.version


def live_version(session: Session, model: str, tenant_id: str = SHARED) -> ModelVersion | None:
    """The scope's own live version of ``model``, if it has one."""
    return session.scalar(select(ModelVersion).where(ModelVersion.model == model, ModelVersion.tenant_id == tenant_id,
                                                     ModelVersion.status == LIVE))


def live_artifact_dir(session: Session, model: str, tenant_id: str = SHARED) -> Path | None:
    """Where the artifact serving ``tenant_id`` lies: its own live version's, else the shared scope's live one's.

    ``None`` when neither scope has a live version: the vertical's shipped default serves then.
    """
    for scope in dict.fromkeys((tenant_id, SHARED)):
        live = live_version(session, model, scope)
        if live is not None:
            return Path(live.artifact_dir)
    return None


def recorded_versions(session: Session, model: str, tenant_id: str = SHARED) -> list[ModelVersion]:
    """Every version of ``model`` recorded in ``tenant_id``'s scope, newest first."""
    return list(session.scalars(select(ModelVersion).where(ModelVersion.model == model,
                                                           ModelVersion.tenant_id == tenant_id)
                                .order_by(ModelVersion.created_at.desc())))


def tenant_model_listing(session: Session, model: str, tenant_id: str,
                         shipped_dir: Path | None) -> list[dict[str, Any]]:
    """What a tenant's ``GET /models`` lists: its own versions of ``model``, newest first, then the
    shipped default from ``shipped_dir`` (live unless one of the tenant's own is)."""
    own = recorded_versions(session, model, tenant_id)
    listed: list[dict[str, Any]] = [
        {"version": m.version, "status": m.status, "default": False, "metrics": m.metrics,
         "created_at": m.created_at, "promoted_at": m.promoted_at} for m in own]
    if shipped_dir is not None:
        card = load_manifest(shipped_dir, verify=False)
        has_own_live = any(m.status == LIVE for m in own)
        listed.append({"version": card.version, "status": "standby" if has_own_live else LIVE, "default": True,
                       "metrics": card.metrics, "created_at": card.created_at, "promoted_at": None})
    return listed


@dataclass(frozen=True)
class LiveVersion:
    """A tenant's live version as a process serves it (read from the registry, tied to no session)."""

    tenant_id: str
    version: str
    artifact_dir: Path
    sha256: str | None


def live_tenant_versions(session: Session, model: str,
                         tenant_ids: Iterable[str] | None = None) -> dict[str, LiveVersion]:
    """Each tenant's own live version of ``model`` (all tenants', or only ``tenant_ids``'), by tenant id."""
    query = select(ModelVersion.tenant_id, ModelVersion.version, ModelVersion.artifact_dir, ModelVersion.sha256).where(
        ModelVersion.model == model, ModelVersion.status == LIVE, ModelVersion.tenant_id != SHARED)
    if tenant_ids is not None:
        query = query.where(ModelVersion.tenant_id.in_(list(tenant_ids)))
    return {row.tenant_id: LiveVersion(row.tenant_id, row.version, Path(row.artifact_dir), row.sha256)
            for row in session.execute(query)}


# --------------------------------------------------------------------------- serving in a process

def tenant_runtime_name(model: str, tenant_id: str) -> str:
    """Runtime name of a tenant's own version of ``model``."""
    return f"{model}@{tenant_id}"


SpecFactory = Callable[[str, Path], ModelSpec]
"""``(runtime name, artifact directory) -> ModelSpec`` that serves the artifact under that name."""


class LiveModels:
    """Keeps one process's runtime serving a model family: a default and each tenant's live version.

    Parameters
    ----------
    model : str
        The family, as recorded in the registry; the default is served under this name.
    spec_for : SpecFactory
        Builds the spec of one artifact under a given runtime name.
    default_artifact : callable
        ``() -> Path | None``: the artifact every tenant without a live version of its own gets
        (e.g. the newest shipped one). Loaded again when its digest changes.
    unload_grace_s : float
        In an API process, a tenant's model is unloaded this long after requests stop being
        routed to it (its requests in flight finish first).
    runtime : ModelRuntime, optional
        Defaults to the process-wide runtime.
    """

    def __init__(self, model: str, spec_for: SpecFactory, default_artifact: Callable[[], Path | None], *,
                 unload_grace_s: float = 2.0, runtime: ModelRuntime | None = None) -> None:
        self.model = model
        self._spec_for = spec_for
        self._default_artifact = default_artifact
        self._unload_grace_s = unload_grace_s
        self._runtime = runtime
        self._served: dict[str, str] = {}
        """tenant id -> runtime name of the tenant's own live version, for the tenants served here."""
        self._asked: set[str] = set()
        """Tenants a worker's tasks asked for: the ones it keeps current."""
        self._reported: set[str] = set()
        self._unreadable = False
        self._last_check = float("-inf")
        self._sync_lock = threading.Lock()

    @property
    def runtime(self) -> ModelRuntime:
        """The runtime these models are loaded into."""
        return self._runtime or get_runtime()

    def own_name(self, tenant_id: str) -> str | None:
        """Runtime name of ``tenant_id``'s own live version when this process serves one."""
        return self._served.get(tenant_id)

    def name_for(self, tenant_id: str) -> str:
        """Runtime name that scores ``tenant_id``: its own live version, else the default (no database read)."""
        return self._served.get(tenant_id, self.model)

    # -- API processes (event loop) -----------------------------------------------------------
    async def refresh(self) -> None:
        """Serve the default and every tenant's live version (start-up, then every poll).

        Loads or hot-swaps what changed since the last call and unloads versions no longer live.
        With the registry unreadable (not migrated yet, an outage) what is loaded keeps serving.
        """
        default = self._default_spec_if_changed()
        if default is not None:
            await self.runtime.load(default)
        wanted = await asyncio.to_thread(self._read_live, None)
        if wanted is None:
            return
        for live in wanted.values():
            name = tenant_runtime_name(self.model, live.tenant_id)
            try:
                if not self._serves(name, live.version):
                    await self.runtime.load(self._spec_for(name, live.artifact_dir))
                self._served[live.tenant_id] = name
            except Exception:  # this tenant keeps its current model; the next poll retries
                logger.exception("loading %s model %s of tenant %s failed", self.model, live.version, live.tenant_id)
        for tenant_id in set(self._served) - set(wanted):
            name = self._served.pop(tenant_id)
            await asyncio.sleep(self._unload_grace_s)  # requests already routed to it finish first
            await self.runtime.unload(name)

    async def watch(self) -> None:
        """:meth:`refresh` every ``model_reload_poll_s`` until cancelled (an API process's background task)."""
        while True:
            await asyncio.sleep(get_settings().model_reload_poll_s)
            try:
                await self.refresh()
            except Exception:  # keep serving the current versions; try again next poll
                logger.exception("%s model reload failed", self.model)

    async def unload_all(self) -> None:
        """Stop serving the default and every tenant's version (shutdown)."""
        names = [self.model, *self._served.values()]
        self._served.clear()
        self._asked.clear()
        for name in names:
            await self.runtime.unload(name)

    # -- Celery workers and batch jobs (no event loop) ----------------------------------------
    def serve_sync(self, tenant_id: str) -> str:
        """Serve the default and ``tenant_id``'s version live as of now; the runtime name that scores it.

        Reads the registry on every call: for a task that must score with the version live when
        it starts (a back-test). Registry and loading errors propagate.
        """
        with self._sync_lock:
            self._asked.add(tenant_id)
            self._load_default_sync()
            live = self._usable(live_tenant_versions_now(self.model, [tenant_id]))
            self._apply_sync(tenant_id, live.get(tenant_id))
            return self.name_for(tenant_id)

    def model_for_sync(self, tenant_id: str) -> str:
        """The runtime name that scores ``tenant_id``, current to within a poll interval.

        The first call for a tenant reads the registry; later ones are a dict lookup, kept current
        by :meth:`refresh_sync` (run at task start once :func:`reload_in_workers` registered this).
        """
        if tenant_id in self._asked:
            return self.name_for(tenant_id)
        return self.serve_sync(tenant_id)

    def refresh_sync(self) -> None:
        """Check again what this process serves: the default and the tenants asked for; swap what changed."""
        with self._sync_lock:
            self._last_check = time.monotonic()
            if self.model in self.runtime.loaded():  # a process that never scored loads nothing
                self._load_default_sync()
            if not self._asked:
                return
            wanted = self._read_live(self._asked)
            if wanted is None:
                return
            for tenant_id in sorted(self._asked):
                try:
                    self._apply_sync(tenant_id, wanted.get(tenant_id))
                except Exception:  # this tenant keeps its current model; the next check retries
                    logger.exception("loading %s model of tenant %s failed", self.model, tenant_id)

    def refresh_sync_if_due(self) -> None:
        """:meth:`refresh_sync` when ``model_reload_poll_s`` has passed since the last check; never raises."""
        if time.monotonic() - self._last_check < get_settings().model_reload_poll_s:
            return
        try:
            self.refresh_sync()
        except Exception:  # a task must not fail because a reload did: the current models serve it
            logger.exception("%s model reload failed", self.model)

    def _apply_sync(self, tenant_id: str, live: LiveVersion | None) -> None:
        name = tenant_runtime_name(self.model, tenant_id)
        if live is None:
            if self._served.pop(tenant_id, None) is not None:
                self.runtime.unload_sync(name)
            return
        if not self._serves(name, live.version):
            self.runtime.load_sync(self._spec_for(name, live.artifact_dir))
        self._served[tenant_id] = name

    def _load_default_sync(self) -> None:
        default = self._default_spec_if_changed()
        if default is not None:
            self.runtime.load_sync(default)

    # -- both ---------------------------------------------------------------------------------
    def _default_spec_if_changed(self) -> ModelSpec | None:
        """The default's spec when this process does not serve the default artifact yet."""
        artifact = self._default_artifact()
        if artifact is None:
            return None
        loaded = self.runtime.loaded().get(self.model)
        if loaded and loaded.get("digest") == load_manifest(artifact, verify=False).digest:
            return None
        return self._spec_for(self.model, artifact)

    def _read_live(self, tenant_ids: Iterable[str] | None) -> dict[str, LiveVersion] | None:
        """Live versions usable here, or None while the registry cannot be read (said once, not every poll)."""
        try:
            found = live_tenant_versions_now(self.model, tenant_ids)
        except SQLAlchemyError as exc:
            if not self._unreadable:
                logger.warning("%s model versions unreadable (%s): serving the models loaded so far",
                               self.model, type(exc).__name__)
            self._unreadable = True
            return None
        self._unreadable = False
        return self._usable(found)

    def _usable(self, found: dict[str, LiveVersion]) -> dict[str, LiveVersion]:
        """``found`` less versions whose artifact is missing here or differs from the one recorded.

        Such a tenant is scored by the default meanwhile; each version is reported once.
        """
        usable = {}
        for tenant_id, live in found.items():
            problem = None
            if not self._serves(tenant_runtime_name(self.model, tenant_id), live.version):
                problem = _artifact_problem(live)
            if problem is None:
                usable[tenant_id] = live
            elif live.version not in self._reported:
                self._reported.add(live.version)
                logger.error("live %s model %s of tenant %s: %s", self.model, live.version, tenant_id, problem)
        return usable

    def _serves(self, name: str, version: str) -> bool:
        try:
            return self.runtime.version(name) == version
        except KeyError:
            return False


def live_tenant_versions_now(model: str, tenant_ids: Iterable[str] | None = None) -> dict[str, LiveVersion]:
    """:func:`live_tenant_versions` in a session of its own."""
    with session_factory()() as session:
        return live_tenant_versions(session, model, tenant_ids)


def _artifact_problem(live: LiveVersion) -> str | None:
    """Why ``live``'s artifact cannot be served on this machine, or None."""
    if not live.artifact_dir.is_dir():
        return f"artifact {live.artifact_dir} missing on this machine"
    try:
        digest = load_manifest(live.artifact_dir, verify=False).digest
    except (ArtifactError, ValueError, TypeError) as exc:
        return f"artifact {live.artifact_dir} unreadable ({type(exc).__name__})"
    if live.sha256 is not None and digest != live.sha256:
        return f"artifact {live.artifact_dir} is not the one recorded (sha256 differs)"
    return None


# --------------------------------------------------------------------------- Celery workers

_reloaded_in_workers: list[LiveModels] = []


def reload_in_workers(models: LiveModels) -> LiveModels:
    """Keep ``models`` current in Celery workers: checked when a task starts, once a poll interval at most.

    Call at import of the vertical's task module. The check runs in the process that runs the
    task (a prefork child included) before the task body, so a task never sees its model change
    under it; in a process that runs no tasks (an API) it never fires.
    """
    if models not in _reloaded_in_workers:
        _reloaded_in_workers.append(models)
    return models


@task_prerun.connect(weak=False)
def _refresh_before_task(**_signal: Any) -> None:
    for models in _reloaded_in_workers:
        models.refresh_sync_if_due()
