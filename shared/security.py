"""Tenants, API keys (stored hashed, scoped per vertical) and HMAC-SHA256 webhook signatures.

API key format: ``tsk_<key_id>_<secret>``. Only ``key_id`` and an HMAC-SHA256 of the whole key
(peppered with ``TESSERA_SECRET_KEY``) are stored; the plaintext is shown once, at creation.

Webhook signatures (both directions: banks signing to us, us signing callbacks) use the header
``Tessera-Signature: t=<unix seconds>,v1=<hex hmac-sha256 of "<t>." + body>``; several ``v1``
entries are accepted so a tenant can rotate its secret without downtime.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.cache import FreshnessBoundedCache
from shared.config import get_settings
from shared.db import Base, session_factory, utcnow
from shared.errors import Forbidden, NotReady, Unauthorized
from shared.verticals import api_key_scopes

SIGNATURE_HEADER = "Tessera-Signature"
API_KEY_HEADER = "X-API-Key"


class Tenant(Base):
    """A customer organisation (a bank, a call centre, a hospital, a plant operator)."""

    __tablename__ = "platform_tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Kept retrievable: HMAC verification needs the secret itself (as Stripe and GitHub do).
    webhook_secret: Mapped[str] = mapped_column(String(128))
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A hashed API key, scoped to verticals of one tenant."""

    __tablename__ = "platform_api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("platform_tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(200), doc="comma-separated verticals")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant and the verticals its key may use."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]


def hash_api_key(plaintext: str) -> str:
    """Peppered HMAC-SHA256 of an API key (keys are 256-bit random, so no slow KDF is needed)."""
    pepper = get_settings().secret_key.encode()
    return hmac.new(pepper, plaintext.encode(), hashlib.sha256).hexdigest()


TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
"""Tenant ids: short enough that derived names (a vertical's back-test namespace, 64 characters)
fit, and free of characters with a meaning in keys (Redis hash tags use braces)."""


def ensure_tenant(session: Session, tenant_id: str, name: str | None = None) -> Tenant:
    """Fetch or create a tenant (with a fresh webhook secret); a new id must match TENANT_ID_PATTERN."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        if not TENANT_ID_PATTERN.match(tenant_id):
            raise ValueError(f"tenant id {tenant_id!r} must be 1-40 of a-z, 0-9, '.', '_', '-' "
                             "(starting with a letter or digit)")
        tenant = Tenant(id=tenant_id, name=name or tenant_id, webhook_secret=new_webhook_secret())
        session.add(tenant)
        session.flush()
    return tenant


def new_webhook_secret() -> str:
    """A random webhook signing secret."""
    return "whsec_" + secrets.token_urlsafe(32)


def create_api_key(session: Session, *, tenant_id: str, name: str, scopes: Iterable[str]) -> str:
    """Create a key for ``tenant_id`` limited to ``scopes``; returns the plaintext (shown once)."""
    scope_set = sorted(set(scopes))
    known = api_key_scopes()
    unknown = [s for s in scope_set if s not in known]
    if unknown or not scope_set:
        raise ValueError(f"scopes must be among {known}, got {scope_set}")
    ensure_tenant(session, tenant_id)
    key_id = uuid.uuid4().hex[:12]
    plaintext = f"tsk_{key_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(id=key_id, tenant_id=tenant_id, name=name, key_hash=hash_api_key(plaintext),
                       scopes=",".join(scope_set)))
    return plaintext


def revoke_api_key(session: Session, key_id: str, *, after_s: float = 0.0) -> ApiKey | None:
    """Revoke a key now, or ``after_s`` seconds from now (a rotation's grace period).

    Every API process refuses it within :data:`API_KEY_MAX_AGE_S` of that moment (of the commit,
    for an immediate revocation). An already revoked key keeps its earlier revocation time.
    Returns the key, or None when there is no such key.
    """
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    revoke_at = utcnow() + timedelta(seconds=after_s)
    if key.revoked_at is None or key.revoked_at > revoke_at:
        key.revoked_at = revoke_at
    return key


def list_api_keys(session: Session, tenant_id: str | None = None) -> list[ApiKey]:
    """Keys (of ``tenant_id``, or of every tenant), oldest first; only hashes are stored."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(query))


def rotate_api_key(session: Session, key_id: str, *, grace_s: float = 0.0) -> tuple[ApiKey, str]:
    """A new key with the tenant, name and scopes of ``key_id``, which is revoked after ``grace_s``.

    Returns (the old key, the new key's plaintext, shown once). ``LookupError`` if the key does not
    exist or is already revoked.
    """
    old = session.get(ApiKey, key_id)
    if old is None or (old.revoked_at is not None and old.revoked_at <= utcnow()):
        raise LookupError(f"no active API key {key_id!r}")
    plaintext = create_api_key(session, tenant_id=old.tenant_id, name=old.name, scopes=old.scopes.split(","))
    revoke_api_key(session, key_id, after_s=grace_s)
    return old, plaintext


def authenticate_api_key(session: Session, plaintext: str) -> Principal | None:
    """The principal for a presented key, or None (unknown, wrong or revoked). Reads the database."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "tsk":
        return None
    key = session.get(ApiKey, parts[1])
    if key is None or (key.revoked_at is not None and key.revoked_at <= utcnow()):
        return None
    if not hmac.compare_digest(key.key_hash, hash_api_key(plaintext)):
        return None
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes.split(",")))


def _authenticate_in_new_session(plaintext: str) -> Principal | None:
    with session_factory()() as session:
        return authenticate_api_key(session, plaintext)


API_KEY_MAX_AGE_S = 1.0
"""An API process answers from a key lookup at most this long after that lookup began: a revoked
key is refused by every replica within 1 s of the revocation's commit (while the database answers)."""
API_KEY_REFRESH_AFTER_S = 0.5
"""A key in use is looked up again in the background after this long, so no request waits for it."""
API_KEY_STALE_IF_ERROR_S = 30.0
"""While the database cannot be read, the last lookup keeps answering this much longer (then 503)."""

principal_cache: FreshnessBoundedCache[str, Principal | None] = FreshnessBoundedCache(
    _authenticate_in_new_session, name="an API key", max_age_s=API_KEY_MAX_AGE_S,
    refresh_after_s=API_KEY_REFRESH_AFTER_S, stale_if_error_s=API_KEY_STALE_IF_ERROR_S)
"""Per process, keyed by the presented key (unknown keys too: a bad key costs one read a second)."""


def presented_api_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer``.

    ``headers`` is Starlette's case-insensitive ``Headers`` or a dict with lower-case names (ASGI's).
    """
    key = headers.get(API_KEY_HEADER.lower())
    if key:
        return key
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


async def authorize(plaintext: str | None, scope: str) -> Principal:
    """The principal of a presented key holding ``scope`` (or ``admin``); else 401 or 403.

    Async on purpose: a cached key costs a dict lookup on the event loop; the database is read in
    a worker thread (:data:`principal_cache`), and a database that cannot be read is a 503.
    """
    if plaintext is None:
        raise Unauthorized("missing API key (X-API-Key or Authorization: Bearer)",
                           headers={"WWW-Authenticate": "Bearer"})
    try:
        principal = await principal_cache.get(plaintext)
    except SQLAlchemyError as exc:
        raise NotReady("API keys cannot be checked right now; retry shortly",
                       headers={"Retry-After": "1"}) from exc
    if principal is None:
        raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    if scope not in principal.scopes and "admin" not in principal.scopes:
        raise Forbidden(f"this key is not allowed to use '{scope}'")
    return principal


API_KEY_SCHEME = APIKeyHeader(name=API_KEY_HEADER, scheme_name="ApiKey", auto_error=False,
                              description="tsk_<id>_<secret>, from `tessera keys create --tenant ID --scope VERTICAL`")
BEARER_SCHEME = HTTPBearer(scheme_name="Bearer", auto_error=False,
                           description="the same API key as `Authorization: Bearer tsk_<id>_<secret>`")
"""How the OpenAPI declares the key (either header); :func:`authorize` reads it, with the same answers."""


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """FastAPI dependency factory: the caller must hold a key with ``scope`` (or ``admin``)."""

    async def dependency(request: Request,
                         _api_key: Annotated[str | None, Security(API_KEY_SCHEME)],
                         _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)]) -> Principal:
        principal = await authorize(presented_api_key(request.headers), scope)
        request.state.principal = principal
        return principal

    return dependency


# --- webhook signatures -------------------------------------------------------------------------

class SignatureError(Unauthorized):
    """A webhook signature is missing, malformed, wrong or outside the replay window."""

    type_slug = "invalid-signature"


def compute_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``"<timestamp>." + body``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_payload(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Tessera-Signature`` header value for ``body``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={compute_signature(secret, timestamp, body)}"


SIGNATURE_TIMESTAMP = re.compile(r"[0-9]{1,12}")
"""``t=``: 1-12 ASCII digits (``str.isdigit`` also accepts '²', and ``int()`` of 5,000 digits raises)."""
SIGNATURE_HEX = re.compile(r"[0-9a-fA-F]{64}")
"""``v1=``: a hex HMAC-SHA256 (``hmac.compare_digest`` raises on a non-ASCII ``str``)."""
MAX_SIGNATURES = 8


def parse_signature_header(header: str) -> tuple[int, list[str]]:
    """Split ``t=...,v1=...[,v1=...]`` into (timestamp, lower-case hex signatures).

    Every malformed header is a :class:`SignatureError` saying what is wrong; entries of other
    schemes (``v0=``) are ignored, as Stripe does.
    """
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
    if not timestamps:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no t=; expected t=<unix>,v1=<hex>")
    if len(timestamps) > 1:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: more than one t=")
    if not SIGNATURE_TIMESTAMP.fullmatch(timestamps[0]):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: t must be 1-12 ASCII digits (unix seconds)")
    if not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: no v1=; expected t=<unix>,v1=<hex>")
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: at most {MAX_SIGNATURES} v1= entries")
    if not all(SIGNATURE_HEX.fullmatch(signature) for signature in signatures):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: v1 must be 64 hex characters "
                             "(HMAC-SHA256)")
    return int(timestamps[0]), [signature.lower() for signature in signatures]


def verify_signature(header: str | None, body: bytes, secrets_to_try: Iterable[str], *,
                     tolerance_s: int, now: float | None = None) -> int:
    """Check a webhook signature; returns its timestamp or raises :class:`SignatureError`."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    timestamp, signatures = parse_signature_header(header)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"signature timestamp outside the {tolerance_s}s replay window")
    for secret in secrets_to_try:
        expected = compute_signature(secret, timestamp, body)
        if any(hmac.compare_digest(expected, candidate) for candidate in signatures):
            return timestamp
    raise SignatureError("signature does not match the body")
