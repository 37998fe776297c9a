"""Tenants, API keys (stored hashed, scoped per vertical) and HMAC-SHA256 webhook signatures.

API key format: ``tsk_<key_id>_<secret>``. Only ``key_id`` and an HMAC-SHA256 of the whole key
(peppered with ``TESSERA_SECRET_KEY``) are stored; the plaintext is shown once, at creation.

Webhook signatures (both directions: banks signing to us, us signing callbacks) use the header
``Tessera-Signature: t=<unix seconds>,v1=<hex hmac-sha256 of "<t>." + body>``; several ``v1``
entries are accepted so a tenant can rotate its secret without downtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.config import VERTICALS, get_settings
from shared.db import Base, session_factory, utcnow
from shared.errors import Forbidden, Unauthorized

SIGNATURE_HEADER = "Tessera-Signature"
API_KEY_HEADER = "X-API-Key"
API_KEY_CACHE_TTL_S = 30.0


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
    unknown = [s for s in scope_set if s not in VERTICALS and s != "admin"]
    if unknown or not scope_set:
        raise ValueError(f"scopes must be among {VERTICALS + ('admin',)}, got {scope_set}")
    ensure_tenant(session, tenant_id)
    key_id = uuid.uuid4().hex[:12]
    plaintext = f"tsk_{key_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(id=key_id, tenant_id=tenant_id, name=name, key_hash=hash_api_key(plaintext),
                       scopes=",".join(scope_set)))
    return plaintext


def revoke_api_key(session: Session, key_id: str) -> None:
    """Revoke a key; it stops working within the cache TTL."""
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()


_principal_cache: dict[str, tuple[float, Principal | None]] = {}
_NOT_CACHED = object()
MAX_CACHED_KEYS = 10_000


def cached_principal(plaintext: str) -> Principal | None | object:
    """The cached principal for a key (None: known bad), or ``_NOT_CACHED``."""
    cached = _principal_cache.get(plaintext)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    return _NOT_CACHED


def authenticate_api_key(session: Session, plaintext: str) -> Principal | None:
    """The principal for a presented key, or None. Results are cached briefly per process."""
    found = cached_principal(plaintext)
    if found is not _NOT_CACHED:
        return found  # type: ignore[return-value]
    principal = _lookup_api_key(session, plaintext)
    if len(_principal_cache) >= MAX_CACHED_KEYS:  # bounded: garbage keys must not grow memory
        _principal_cache.clear()
    _principal_cache[plaintext] = (time.monotonic() + API_KEY_CACHE_TTL_S, principal)
    return principal


def _lookup_api_key(session: Session, plaintext: str) -> Principal | None:
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "tsk":
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.id == parts[1], ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_hash, hash_api_key(plaintext)):
        return None
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes.split(",")))


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

    Async on purpose: a cached key costs a dict lookup on the event loop; only a cache miss
    visits the database, in a worker thread.
    """
    if plaintext is None:
        raise Unauthorized("missing API key (X-API-Key or Authorization: Bearer)",
                           headers={"WWW-Authenticate": "Bearer"})
    principal = cached_principal(plaintext)
    if principal is _NOT_CACHED:
        principal = await asyncio.to_thread(_authenticate_in_new_session, plaintext)
    if principal is None:
        raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    assert isinstance(principal, Principal)
    if scope not in principal.scopes and "admin" not in principal.scopes:
        raise Forbidden(f"this key is not allowed to use '{scope}'")
    return principal


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """FastAPI dependency factory: the caller must hold a key with ``scope`` (or ``admin``)."""

    async def dependency(request: Request) -> Principal:
        principal = await authorize(presented_api_key(request.headers), scope)
        request.state.principal = principal
        return principal

    return dependency


def _authenticate_in_new_session(plaintext: str) -> Principal | None:
    with session_factory()() as session:
        return authenticate_api_key(session, plaintext)


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


def parse_signature_header(header: str) -> tuple[int, list[str]]:
    """Split ``t=...,v1=...[,v1=...]`` into (timestamp, signatures)."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            if not value.isdigit():
                raise SignatureError("signature timestamp is not an integer")
            timestamp = int(value)
        elif key == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: expected t=<unix>,v1=<hex>")
    return timestamp, signatures


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
