"""HTTP app of the fraud scoring vertical, mounted at ``/fraud``.

Routes parse, call the domain (``scoring``, ``rules``, ``feedback``), and return schemas. The
transaction webhooks need an API key with the ``fraud`` scope (it names the tenant) and a
``Tessera-Signature`` made with that tenant's webhook secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from sqlalchemy.orm import Session

from model_runtime.runtime import get_runtime
from services.fraud import feedback, retraining, rules
from services.fraud.backtest import check_backtest_header
from services.fraud.recorder import DecisionRecorder
from services.fraud.schemas import (
    RULE_FIELDS,
    TEXT_RULE_FIELDS,
    BatchIn,
    BatchItemOut,
    BatchOut,
    CaseOut,
    DecisionOut,
    LabelIn,
    RetrainIn,
    RuleIn,
    RuleSetOut,
    TenantSettingsIn,
    TransactionIn,
)
from services.fraud.scoring import TenantPolicy, score_transaction, tenant_policies
from services.fraud.serving import (
    FRAUD_MODEL_NAME,
    default_artifact_dir,
    load_fraud_models,
    unload_fraud_models,
    watch_live_model,
)
from services.fraud.tasks import backtest_csv, enqueue_callback, retrain_model
from services.fraud.window_store import window_store
from shared.app import create_service_app, raw_json_body
from shared.config import get_settings
from shared.db import SessionDep
from shared.errors import (
    EdgeMappedError,
    NotReady,
    PayloadTooLarge,
    ProblemError,
    as_problem,
    parse_json,
    parse_object,
    problem_responses,
)
from shared.hot_routes import HotRequest, HotRoute
from shared.jobs import get_job, submit_job
from shared.kv import async_redis
from shared.observability import Readiness
from shared.security import SIGNATURE_HEADER, Principal, require_scope, verify_signature
from shared.streams import running_recorders
from shared.uploads import multipart_upload_body, receive_multipart_upload

logger = logging.getLogger("tessera.fraud.api")

FraudPrincipal = Annotated[Principal, Depends(require_scope("fraud"))]
MAX_BODY_BYTES = 1 << 20
MAX_BACKTEST_BYTES = 512 << 20
"""A back-test CSV: room for the 2,000,000 rows a back-test reads, at up to ~250 bytes a row."""


async def verified_policy(tenant_id: str, body: bytes, signature: str | None) -> TenantPolicy:
    """The tenant's policy once ``signature`` is found to sign ``body`` with its secret (else 401)."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
    policy = await tenant_policies.get(tenant_id)
    verify_signature(signature, body, policy.webhook_secrets, tolerance_s=get_settings().webhook_tolerance_s)
    return policy


async def signed_body(request: Request, principal: FraudPrincipal) -> tuple[bytes, TenantPolicy]:
    """The raw body after checking its signature against the caller's tenant secrets (else 401)."""
    body = await request.body()
    return body, await verified_policy(principal.tenant_id, body, request.headers.get(SIGNATURE_HEADER))


SignedBody = Annotated[tuple[bytes, TenantPolicy], Depends(signed_body)]


async def transaction_webhook(tenant_id: str, body: bytes, policy: TenantPolicy) -> DecisionOut:
    """Validate a signed transaction and score it synchronously (idempotent by its id)."""
    tx = parse_json(TransactionIn, body)
    return await score_transaction(tenant_id, tx, policy, on_flagged=enqueue_callback)


async def hot_transaction_webhook(request: HotRequest) -> DecisionOut:
    """``POST /v1/transactions`` as a hot route: the same steps without FastAPI's machinery."""
    tenant_id = request.principal.tenant_id
    policy = await verified_policy(tenant_id, request.body, request.headers.get(SIGNATURE_HEADER.lower()))
    return await transaction_webhook(tenant_id, request.body, policy)


HOT_ROUTES = (HotRoute("POST", "/v1/transactions", "fraud", hot_transaction_webhook, MAX_BODY_BYTES),)


KEYED = problem_responses(401, 403, 503)
"""What any route can answer before its own work: the fraud-scoped API key is checked first."""
JSON_BODY = problem_responses(400, 415, 422, notes={400: "The body is not UTF-8 text."})
TRANSACTION_EXAMPLE = {"id": "tx-1", "timestamp": "2026-11-23T10:15:00Z", "customer_id": "c-42",
                       "terminal_id": "t-7", "amount": 42.5, "currency": "EUR", "channel": "ecommerce"}
BATCH_EXAMPLE = {"transactions": [TRANSACTION_EXAMPLE, {**TRANSACTION_EXAMPLE, "id": "tx-2", "amount": 1250.0}]}

transactions = APIRouter(prefix="/v1", tags=["transactions"], responses=KEYED)


@transactions.post("/transactions", response_model=DecisionOut,
                   openapi_extra=raw_json_body(TransactionIn, TRANSACTION_EXAMPLE, signed=True),
                   responses=problem_responses(409, 413, 415, 422, 503, 504, notes={
                       409: "The id was scored before for a different transaction (the same body replays the "
                            "stored decision).",
                       503: "Also: the model's queue is full or the fast state store is unreachable.",
                       504: "The model did not answer within the request's deadline."}))
async def post_transaction(principal: FraudPrincipal, signed: SignedBody) -> DecisionOut:
    """Score one transaction synchronously (idempotent by its id).

    Served as a hot route (:data:`HOT_ROUTES`) unless ``TESSERA_HOT_ROUTES=false``.
    """
    body, policy = signed
    return await transaction_webhook(principal.tenant_id, body, policy)


@transactions.post("/transactions:batch", response_model=BatchOut,
                   openapi_extra=raw_json_body(BatchIn, BATCH_EXAMPLE, signed=True),
                   responses=problem_responses(413, 415, 422, notes={
                       422: "The body as a whole (an item's own problems are in its result)."}))
async def post_transaction_batch(principal: FraudPrincipal, signed: SignedBody) -> BatchOut:
    """Score several transactions in order; each item gets its own result or error.

    Items are validated one by one: an invalid item gets a 422 problem with its ``index`` (and its
    ``transaction_id`` when the id itself is valid), a resent id with a different body a 409, and
    the other items are scored. Only a body that is not an object with a ``transactions`` list of
    1 to 1000 objects fails as a whole (422), as does a bad signature (401) or size (413).
    """
    body, policy = signed
    batch = parse_json(BatchIn, body)
    return BatchOut(results=[await _batch_item(principal.tenant_id, index, item, policy)
                             for index, item in enumerate(batch.transactions)])


async def _batch_item(tenant_id: str, index: int, item: dict[str, Any], policy: TenantPolicy) -> BatchItemOut:
    """One batch item scored, or the problem that stopped it (with its index and id)."""
    raw_id = item.get("id")
    transaction_id = raw_id if isinstance(raw_id, str) else None
    try:
        tx = parse_object(TransactionIn, item)
        decision = await score_transaction(tenant_id, tx, policy, on_flagged=enqueue_callback)
        return BatchItemOut(index=index, transaction_id=tx.id, result=decision)
    except (ProblemError, EdgeMappedError) as exc:  # EdgeMappedError: the runtime's overload, deadline
        problem = as_problem(exc)
        if problem is None:
            raise
        if any(error["loc"][:1] == ["id"] for error in problem.extensions.get("errors", ())):
            transaction_id = None  # not a valid id: nothing to name the item by but its index
        return BatchItemOut(index=index, transaction_id=transaction_id,
                            error={**problem.to_problem(), "index": index, "transaction_id": transaction_id})


@transactions.get("/transactions/{transaction_id}", response_model=DecisionOut,
                  responses=problem_responses(404, 422))
def get_transaction(transaction_id: str, principal: FraudPrincipal, session: SessionDep) -> DecisionOut:
    """The stored decision for a transaction."""
    return feedback.decision_of(session, principal.tenant_id, transaction_id)


@transactions.post("/transactions/{transaction_id}/label", response_model=DecisionOut,
                   responses={**problem_responses(404), **JSON_BODY})
def post_label(transaction_id: str, label: LabelIn, principal: FraudPrincipal,
               session: SessionDep) -> DecisionOut:
    """Record an analyst verdict or a chargeback; it feeds terminal risk and retraining."""
    decision = feedback.record_label(session, principal.tenant_id, transaction_id, label)
    session.commit()
    return decision


review = APIRouter(prefix="/v1", tags=["review"], responses=KEYED)


@review.get("/cases", response_model=list[CaseOut], responses={
    200: {"headers": {"Link": {"description": "<url of the next page>; rel=\"next\", on a full page",
                               "schema": {"type": "string"}}}},
    **problem_responses(422, notes={422: "Also a cursor this API did not issue."})})
def list_cases(principal: FraudPrincipal, session: SessionDep, request: Request, response: Response,
               status: Annotated[str, Query(pattern="^(open|confirmed_fraud|legitimate)$")] = "open",
               limit: Annotated[int, Query(ge=1, le=500)] = 100,
               cursor: Annotated[str | None, Query(max_length=200, description=(
                   "where the previous page ended: take it from that page's `Link: <…>; rel=\"next\"` "
                   "header"))] = None) -> list[CaseOut]:
    """The review queue, highest score first, a page at a time.

    A full page carries an RFC 8288 ``Link`` header to the next one (keyset paging: cases opened
    meanwhile never shift a page).
    """
    after = feedback.CasePosition.decode(cursor) if cursor is not None else None
    cases = feedback.list_cases(session, principal.tenant_id, status, limit, after)
    if len(cases) == limit:
        last = feedback.CasePosition(cases[-1].score, cases[-1].id)
        next_url = request.url.include_query_params(cursor=last.encode())
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return cases


@review.get("/settings", response_model=TenantSettingsIn)
def get_settings_route(principal: FraudPrincipal, session: SessionDep) -> TenantSettingsIn:
    """The tenant's thresholds and callback URL."""
    return feedback.get_tenant_settings(session, principal.tenant_id)


@review.put("/settings", response_model=TenantSettingsIn, responses={**JSON_BODY, **problem_responses(422, notes={
    422: "Also a review_threshold above the decline_threshold, or a callback_url refused (the problem's reason: "
         "a loopback, link-local or private address unless allow-listed, not https in production, unresolvable)."})})
def put_settings(new: TenantSettingsIn, principal: FraudPrincipal, session: SessionDep) -> TenantSettingsIn:
    """Change thresholds or the callback URL (used by every replica within 1 s)."""
    saved = feedback.set_tenant_settings(session, principal.tenant_id, new)
    session.commit()
    tenant_policies.invalidate(principal.tenant_id)
    return saved


rule_routes = APIRouter(prefix="/v1/rules", tags=["rules"], responses=KEYED)
NO_SUCH_RULE = problem_responses(404, notes={404: "No rule with this id in the active rule set."})
NEVER_FIRES = ("Also a rule that could never fire: an unknown field (the problem's known_fields lists them), "
               "in/not_in without a list, an ordering on a text field, a value of the wrong kind.")
RULE_REFUSED = {**JSON_BODY, **problem_responses(422, notes={422: NEVER_FIRES})}


def _rule_set_out(row) -> RuleSetOut:  # type: ignore[no-untyped-def]
    return RuleSetOut(version=row.version, rules=[RuleIn.model_validate(r) for r in row.rules],
                      created_at=row.created_at, change=row.change)


def _after_rules_change(session: Session, tenant_id: str, row) -> RuleSetOut:  # type: ignore[no-untyped-def]
    out = _rule_set_out(row)
    session.commit()
    tenant_policies.invalidate(tenant_id)
    return out


@rule_routes.get("", response_model=RuleSetOut)
def get_rules(principal: FraudPrincipal, session: SessionDep) -> RuleSetOut:
    """The active rule set (version 0, empty, if none was ever defined)."""
    row = rules.active_rule_set(session, principal.tenant_id)
    if row is None:
        return RuleSetOut(version=0, rules=[], created_at=feedback.epoch(), change="none")
    return _rule_set_out(row)


@rule_routes.get("/versions", response_model=list[RuleSetOut])
def get_rule_versions(principal: FraudPrincipal, session: SessionDep) -> list[RuleSetOut]:
    """Every version of the tenant's rules, newest first."""
    return [_rule_set_out(row) for row in rules.rule_set_history(session, principal.tenant_id)]


@rule_routes.post("", response_model=RuleSetOut, status_code=201, responses={
    **RULE_REFUSED, **problem_responses(409, notes={409: "A rule with this id exists (PUT replaces it)."})})
def post_rule(rule: RuleIn, principal: FraudPrincipal, session: SessionDep) -> RuleSetOut:
    """Add a rule; returns the new active version."""
    rules.validate_rule(rule, set(RULE_FIELDS), set(TEXT_RULE_FIELDS))
    return _after_rules_change(session, principal.tenant_id, rules.add_rule(session, principal.tenant_id, rule))


@rule_routes.put("/{rule_id}", response_model=RuleSetOut, responses={
    **NO_SUCH_RULE, **JSON_BODY, **problem_responses(422, notes={422: f"{NEVER_FIRES} Or a body id not the path's."})})
def put_rule(rule_id: str, rule: RuleIn, principal: FraudPrincipal, session: SessionDep) -> RuleSetOut:
    """Replace a rule; returns the new active version."""
    rules.validate_rule(rule, set(RULE_FIELDS), set(TEXT_RULE_FIELDS))
    row = rules.replace_rule(session, principal.tenant_id, rule_id, rule)
    return _after_rules_change(session, principal.tenant_id, row)


@rule_routes.delete("/{rule_id}", response_model=RuleSetOut, responses={**NO_SUCH_RULE, **problem_responses(422)})
def delete_rule(rule_id: str, principal: FraudPrincipal, session: SessionDep) -> RuleSetOut:
    """Remove a rule; returns the new active version."""
    row = rules.delete_rule(session, principal.tenant_id, rule_id)
    return _after_rules_change(session, principal.tenant_id, row)


jobs = APIRouter(prefix="/v1", tags=["jobs"], responses=KEYED)


@jobs.get("/jobs/{job_id}", responses=problem_responses(404, 422, notes={404: "No job with this id for this tenant."}))
def get_job_route(job_id: str, principal: FraudPrincipal, session: SessionDep) -> dict[str, object]:
    """Status, progress and result of one of the tenant's fraud jobs (retraining, back-test, callback)."""
    job = get_job(session, job_id, tenant_id=principal.tenant_id)
    return {"id": job.id, "task": job.task_name, "status": job.status, "progress": job.progress,
            "attempts": job.attempts, "result": job.result, "error": job.error}


models = APIRouter(prefix="/v1", tags=["models"], responses=KEYED)


@models.get("/models")
def list_models(principal: FraudPrincipal, session: SessionDep) -> list[dict[str, object]]:
    """The caller's own fraud model versions, newest first, then the shared default model.

    Own versions carry their evaluation (``metrics.candidate``, and ``metrics.live_at_evaluation``
    of the model they were compared with); status ``live`` (it scores this tenant), ``rejected`` or
    ``retired``. The shared default (``"default": true``, the shipped model) carries its model
    card's metrics and is ``live`` for a tenant with no live version of its own, else ``standby``.
    Another tenant's versions are never listed.
    """
    return retraining.model_versions(session, principal.tenant_id)


@models.post("/models/retrain", status_code=202, responses={**JSON_BODY, **problem_responses(422, notes={
    422: "Also too few labels to train and judge a candidate (the problem's needed and have give the counts)."})})
def post_retrain(request: RetrainIn, principal: FraudPrincipal, session: SessionDep) -> dict[str, str]:
    """Start a retraining job: a candidate trained on this tenant's labelled traffic, judged against
    the model that scores this tenant now (its own live version, else the shared default) on the
    latest held-out days; promoted, for this tenant alone, when its Average Precision there is not
    lower than the live model's plus ``min_improvement`` (>= 0).

    Labelled days are those older than the tenant's newest transaction by the 7-day label delay
    (an unlabelled one counts as legitimate). Refused with 422 (the problem's ``needed`` and
    ``have`` give the counts) unless the tenant has, among them:

    - at least 20 frauds and 1 legitimate transaction in the training days: older than the newest
      labelled day minus ``holdout_days`` and a further 7 days (labels arrive a week late);
    - at least 1 fraud and 1 legitimate transaction in the calibration days: the first half
      (rounded up) of the held-out days.
    """
    retraining.check_enough_labels(
        retraining.stored_label_counts(session, principal.tenant_id, request.holdout_days), request.holdout_days)
    job = submit_job(session, retrain_model, key=f"fraud-retrain:{uuid.uuid4().hex}",
                     payload={**request.model_dump(), "tenant_id": principal.tenant_id},
                     tenant_id=principal.tenant_id, max_attempts=2)
    session.commit()
    return {"job_id": job.id}


def check_backtest_head(head: bytes) -> None:
    """422 for a CSV whose first line lacks the back-test's columns, before the rest is stored."""
    check_backtest_header(head.split(b"\n", 1)[0].decode("utf-8", errors="replace"))


@models.post("/backtests", status_code=202, responses=problem_responses(400, 413, 415, 422, notes={
    400: "The multipart body is malformed or ends before its closing boundary.",
    422: "Also a CSV whose header has neither our columns nor the handbook's."}),
    openapi_extra=multipart_upload_body("file", description="a CSV of past transactions", media_type="text/csv",
                                        max_bytes=MAX_BACKTEST_BYTES))
async def post_backtest(request: Request, principal: FraudPrincipal, session: SessionDep) -> dict[str, str]:
    """Upload a CSV of past transactions to replay through scoring (idempotent by file content)."""
    upload = await receive_multipart_upload(  # streamed to disk, the header checked before the rest is read
        request, get_settings().data_dir / "uploads", max_bytes=MAX_BACKTEST_BYTES, name_prefix="backtest-",
        name_suffix=".csv", check_head=check_backtest_head)
    job = submit_job(session, backtest_csv, key=f"fraud-backtest:{principal.tenant_id}:{upload.sha256}",
                     payload={"tenant_id": principal.tenant_id, "path": str(upload.path.resolve())},
                     tenant_id=principal.tenant_id, max_attempts=2)
    session.commit()
    return {"job_id": job.id}


async def _models_ready() -> None:
    if not get_runtime().is_ready([FRAUD_MODEL_NAME]):
        raise NotReady("fraud model not loaded")


async def _fast_state_ready() -> None:
    await window_store().check_ready()


@contextlib.asynccontextmanager
async def fast_state() -> AsyncIterator[None]:
    """The window-state store's connections (warm) and, when it writes rows behind and no separate
    ``tessera recorder fraud`` does it, the decision stream drained into the database, for as long
    as the app runs."""
    store = window_store()
    async with store.connected():
        if store.written_behind and get_settings().recorder_in_api:
            async with running_recorders([DecisionRecorder(async_redis())]):
                yield
        else:
            yield


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Load the default fraud model and every tenant's live one; watch for promotions and hot-swap them."""
    if default_artifact_dir() is None:
        logger.error("no fraud model artifact found under %s/fraud", get_settings().models_dir)
    await load_fraud_models()
    watcher = asyncio.create_task(watch_live_model())
    try:
        async with fast_state():
            yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await unload_fraud_models()


readiness = Readiness()
readiness.add("models", _models_ready)
readiness.add("fast_state", _fast_state_ready)
app = create_service_app("fraud", title="Tessera — Fraud scoring", lifespan=lifespan, readiness=readiness,
                         routers=[transactions, review, rule_routes, jobs, models], hot_routes=HOT_ROUTES,
                         documented_models=[TransactionIn, BatchIn])
