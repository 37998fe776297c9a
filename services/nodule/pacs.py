"""Sending results to the hospital PACS: a DICOM C-STORE SCU (pynetdicom).

:func:`store_instances` opens one association to the configured destination, proposing each SOP
class of the datasets with their transfer syntax (and the uncompressed alternatives when theirs is
uncompressed), sends every instance and returns a :class:`StoreReport` with one
:class:`InstanceStatus` per instance. It does not raise for network or peer failures; it records
them. :func:`send_results` is what the durable job calls: it stores, then raises
:class:`RetryablePacsError` (a :class:`shared.jobs.TransientJobError`, so the job retries with
backoff) or :class:`PermanentPacsError` (a :class:`shared.jobs.PublicJobError`, the job fails with
that message) unless every instance was stored.

What counts as transient (retry) and what as permanent (fail), by PS3.4 Annex B and PS3.7 Annex C:

- the association could not be made (connection refused or timed out, association rejected,
  aborted, no answer): transient. A rejection because of the AE title is "permanent" in DICOM's
  terms, but it is fixed by configuration on either side, so the job keeps retrying within its
  attempts rather than dropping results;
- no response to a C-STORE (the association dropped mid-send): transient;
- ``0xA7xx`` refused, out of resources; ``0x0110`` processing failure; ``0x0213`` resource
  limitation: transient;
- ``0xA9xx`` data set does not match SOP class, ``0xCxxx`` cannot understand, ``0x0122`` SOP class
  not supported, ``0x0124`` not authorised, any other failure, and a SOP class the PACS did not
  accept in the association (when it accepts none of them, pynetdicom aborts the association:
  that is permanent too): permanent;
- ``0x0000`` success, ``0x0001`` and ``0xBxxx`` warnings: stored.

The destination comes from the settings (:func:`load_destination`): ``TESSERA_NODULE_PACS_HOST``,
``TESSERA_NODULE_PACS_PORT`` (104) and ``TESSERA_NODULE_PACS_AE_TITLE`` (``PACS``); we call as
``TESSERA_NODULE_AE_TITLE``. No PACS is configured until the host is set. Logs name the
destination, counts and status codes, never patient data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt

from shared.config import Settings, get_settings
from shared.jobs import PublicJobError, TransientJobError

logger = logging.getLogger("tessera.nodule.pacs")

MAX_PRESENTATION_CONTEXTS = 128
UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213})
DEFAULT_CALLING_AE_TITLE = "TESSERA"
DEFAULT_TIMEOUT_S = 30.0  # connect, association and per-message


@dataclass(frozen=True)
class PacsDestination:
    """A Storage SCP to send to."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def load_destination(settings: Settings | None = None) -> PacsDestination | None:
    """The configured destination, or ``None`` when ``TESSERA_NODULE_PACS_HOST`` is not set.

    We call as the vertical's own AE title (``nodule_ae_title``, the one its listener answers to).
    """
    settings = settings or get_settings()
    if not settings.nodule_pacs_host:
        return None
    return PacsDestination(ae_title=settings.nodule_pacs_ae_title, host=settings.nodule_pacs_host,
                           port=settings.nodule_pacs_port, calling_ae_title=settings.nodule_ae_title)


class Outcome(StrEnum):
    """What became of one instance."""

    STORED = "stored"
    STORED_WITH_WARNING = "stored_with_warning"
    RETRYABLE = "retryable"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceStatus:
    """One instance's C-STORE result.

    Attributes
    ----------
    sop_instance_uid, sop_class_uid : str
    outcome : Outcome
    status : int or None
        The DIMSE status the PACS answered; ``None`` when it answered nothing (not sent, no response).
    reason : str
        Why it was not stored (empty when it was).
    """

    sop_instance_uid: str
    sop_class_uid: str
    outcome: Outcome
    status: int | None = None
    reason: str = ""

    @property
    def stored(self) -> bool:
        """True when the PACS holds the instance (success or warning)."""
        return self.outcome in (Outcome.STORED, Outcome.STORED_WITH_WARNING)


@dataclass(frozen=True)
class StoreReport:
    """The result of sending a batch of instances to one destination.

    Attributes
    ----------
    destination : str
        ``AE@host:port``.
    statuses : tuple of InstanceStatus
        One per instance sent or skipped-as-failed, in the order given.
    association_error : str
        Why no association could be made (empty when one was).
    """

    destination: str
    statuses: tuple[InstanceStatus, ...]
    association_error: str = ""

    @property
    def stored_uids(self) -> list[str]:
        """SOP Instance UIDs the PACS now holds."""
        return [status.sop_instance_uid for status in self.statuses if status.stored]

    @property
    def retryable(self) -> list[InstanceStatus]:
        """Instances whose failure may pass on a later attempt."""
        return [status for status in self.statuses if status.outcome is Outcome.RETRYABLE]

    @property
    def failed(self) -> list[InstanceStatus]:
        """Instances the PACS will not take as they are."""
        return [status for status in self.statuses if status.outcome is Outcome.FAILED]

    @property
    def all_stored(self) -> bool:
        """True when every instance was stored."""
        return all(status.stored for status in self.statuses)

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts and statuses (UIDs and status codes only, no patient data)."""
        return {
            "destination": self.destination, "instances": len(self.statuses), "stored": len(self.stored_uids),
            "retryable": len(self.retryable), "failed": len(self.failed), "association_error": self.association_error,
            "statuses": [{"sop_instance_uid": s.sop_instance_uid, "outcome": s.outcome.value,
                          "status": None if s.status is None else f"0x{s.status:04X}", "reason": s.reason}
                         for s in self.statuses],
        }

    def describe(self) -> str:
        """One line for an error message or a log."""
        if self.association_error:
            return f"no association with {self.destination}: {self.association_error}"
        problems = sorted({s.reason for s in self.statuses if not s.stored})
        return (f"{len(self.stored_uids)} of {len(self.statuses)} instances stored at {self.destination}"
                + (f"; {'; '.join(problems)}" if problems else ""))


class PacsSendError(Exception):
    """Base of the send failures; carries the :class:`StoreReport`."""

    report: StoreReport


class RetryablePacsError(TransientJobError, PacsSendError):
    """Some instances may be stored on a later attempt (the job retries with backoff)."""

    def __init__(self, report: StoreReport) -> None:
        super().__init__(report.describe())
        self.report = report


class PermanentPacsError(PublicJobError, PacsSendError):
    """The PACS refused some instances for good; retrying the same objects cannot help."""

    def __init__(self, report: StoreReport) -> None:
        super().__init__(report.describe())
        self.report = report


# --------------------------------------------------------------------------------------------------
# Status codes


def classify_status(status: int) -> tuple[Outcome, str]:
    """The outcome of a C-STORE response status, with a short reason for a failure."""
    if status == 0x0000:
        return Outcome.STORED, ""
    if status == 0x0001 or status & 0xF000 == 0xB000:
        return Outcome.STORED_WITH_WARNING, ""
    if status & 0xFF00 == 0xA700:
        return Outcome.RETRYABLE, f"refused: out of resources (0x{status:04X})"
    if status in TRANSIENT_STATUSES:
        return Outcome.RETRYABLE, f"processing failure or resource limitation at the PACS (0x{status:04X})"
    if status & 0xFF00 == 0xA900:
        return Outcome.FAILED, f"data set does not match SOP class (0x{status:04X})"
    if status & 0xF000 == 0xC000:
        return Outcome.FAILED, f"cannot understand (0x{status:04X})"
    if status == 0x0122:
        return Outcome.FAILED, "SOP class not supported (0x0122)"
    if status == 0x0124:
        return Outcome.FAILED, "not authorised (0x0124)"
    return Outcome.FAILED, f"failed (0x{status:04X})"


# --------------------------------------------------------------------------------------------------
# Sending


def _as_dataset(item: Dataset | str | os.PathLike[str]) -> Dataset:
    return item if isinstance(item, Dataset) else pydicom.dcmread(item)


def _transfer_syntax(dataset: Dataset) -> UID:
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise ValueError("a dataset to send needs file meta with a TransferSyntaxUID")
    return UID(syntax)


def _requested_contexts(datasets: Sequence[Dataset]) -> dict[str, list[str]]:
    """Transfer syntaxes to propose per SOP class: each dataset's own, plus uncompressed ones if it is."""
    contexts: dict[str, list[str]] = {}
    for dataset in datasets:
        syntax = _transfer_syntax(dataset)
        proposed = contexts.setdefault(str(dataset.SOPClassUID), [])
        candidates = [syntax, *UNCOMPRESSED_SYNTAXES] if not syntax.is_compressed else [syntax]
        proposed.extend(uid for uid in candidates if uid not in proposed)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP classes exceed the {MAX_PRESENTATION_CONTEXTS} presentation contexts"
                         " of one association")
    return contexts


def _application_entity(destination: PacsDestination, contexts: dict[str, list[str]]) -> AE:
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    ae.connection_timeout = destination.timeout_s
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def _rejection_recorder(reasons: list[str]) -> Any:
    def record(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if primitive is not None and getattr(primitive, "result", None) in (0x01, 0x02):
            reasons.append(f"association rejected ({primitive.result_str}, {primitive.source_str}: "
                           f"{primitive.reason_str})")
    return record


def _associate(destination: PacsDestination, contexts: dict[str, list[str]]
               ) -> tuple[Association | None, str, Outcome]:
    """An established association, or ``None``, why not, and whether that is worth retrying."""
    ae = _application_entity(destination, contexts)
    reasons: list[str] = []
    try:
        association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                   evt_handlers=[(evt.EVT_ACSE_RECV, _rejection_recorder(reasons))])
    except OSError as exc:  # resolution or socket setup
        return None, f"cannot connect ({type(exc).__name__}: {exc})", Outcome.RETRYABLE
    if association.is_established:
        return association, "", Outcome.STORED
    if association.is_rejected:
        return None, reasons[0] if reasons else "association rejected", Outcome.RETRYABLE
    if association.is_aborted and association.rejected_contexts and not association.accepted_contexts:
        refused = ", ".join(sorted({str(context.abstract_syntax) for context in association.rejected_contexts}))
        return None, f"the PACS accepted none of the SOP classes offered ({refused})", Outcome.FAILED
    if association.is_aborted:
        return None, "association aborted", Outcome.RETRYABLE
    return None, "connection refused, timed out or closed before an association was made", Outcome.RETRYABLE


def _send_one(association: Association, dataset: Dataset) -> InstanceStatus:
    uid, sop_class = str(dataset.SOPInstanceUID), str(dataset.SOPClassUID)
    if not association.is_established:
        return InstanceStatus(uid, sop_class, Outcome.RETRYABLE, reason="association lost before sending")
    if not any(context.abstract_syntax == sop_class for context in association.accepted_contexts):
        return InstanceStatus(uid, sop_class, Outcome.FAILED,
                              reason=f"the PACS accepted no presentation context for SOP class {sop_class}")
    try:
        response = association.send_c_store(dataset)
    except ValueError as exc:  # no context for its transfer syntax, or it cannot be encoded
        return InstanceStatus(uid, sop_class, Outcome.FAILED, reason=f"cannot send: {exc}")
    if "Status" not in response:
        return InstanceStatus(uid, sop_class, Outcome.RETRYABLE, reason="no response (timeout or association lost)")
    status = int(response.Status)
    outcome, reason = classify_status(status)
    return InstanceStatus(uid, sop_class, outcome, status=status, reason=reason)


def store_instances(items: Iterable[Dataset | str | os.PathLike[str]], destination: PacsDestination) -> StoreReport:
    """C-STORE every instance to ``destination`` over one association; record what happened.

    Parameters
    ----------
    items : iterable of pydicom.Dataset or path
        Instances with file meta (a TransferSyntaxUID), or files to read them from.
    destination : PacsDestination

    Returns
    -------
    StoreReport
        One status per instance. Never raises for network or PACS failures; raises ``ValueError``
        for an instance without file meta and ``OSError``/``InvalidDicomError`` for an unreadable file.
    """
    datasets = [_as_dataset(item) for item in items]
    if not datasets:
        return StoreReport(destination=str(destination), statuses=())
    association, error, outcome = _associate(destination, _requested_contexts(datasets))
    if association is None:
        statuses = tuple(InstanceStatus(str(ds.SOPInstanceUID), str(ds.SOPClassUID), outcome, reason=error)
                         for ds in datasets)
        logger.warning("PACS %s: %s", destination, error)
        return StoreReport(destination=str(destination), statuses=statuses, association_error=error)
    try:
        statuses = tuple(_send_one(association, dataset) for dataset in datasets)
    finally:
        if association.is_established:
            association.release()
    report = StoreReport(destination=str(destination), statuses=statuses)
    logger.info("PACS %s: %d of %d instances stored", destination, len(report.stored_uids), len(statuses))
    return report


def send_results(items: Iterable[Dataset | str | os.PathLike[str]], destination: PacsDestination, *,
                 already_stored: Collection[str] = ()) -> StoreReport:
    """Send a series' results to the PACS; succeed only when every instance is stored.

    Meant to be the body of the durable send job (see the module docstring for what is transient).
    Sending an instance again is harmless (same SOP Instance UID: the PACS keeps one copy), so a
    retried job may send everything again; ``already_stored`` skips what an earlier attempt stored.

    Parameters
    ----------
    items : iterable of pydicom.Dataset or path
    destination : PacsDestination
    already_stored : collection of str
        SOP Instance UIDs not to send again (e.g. ``error.report.stored_uids`` of the last attempt).

    Returns
    -------
    StoreReport
        When every instance was stored (skipped ones are not in it).

    Raises
    ------
    RetryablePacsError
        No association, no response, or a transient status for some instance. It wins over permanent
        failures in the same attempt: the transient ones are retried first, and the permanent ones
        fail the job once nothing transient is left.
    PermanentPacsError
        Some instance was refused for good and none failed transiently.
    """
    skip = set(already_stored)
    datasets = [dataset for dataset in map(_as_dataset, items) if str(dataset.SOPInstanceUID) not in skip]
    report = store_instances(datasets, destination)
    if report.retryable:
        raise RetryablePacsError(report)
    if report.failed:
        raise PermanentPacsError(report)
    return report
