"""RFC 9421 HTTP message signatures, verifier side, for ``hmac-sha256`` (what Genesys AudioHook signs
its WebSocket upgrade with), and the part of RFC 8941 structured fields their headers use.

A signed request carries two dictionary headers with the same label::

    Signature-Input: sig1=("@request-target" "@authority" "x-api-key");keyid="…";nonce="…";
                     alg="hmac-sha256";created=1641013200;expires=1641013230
    Signature: sig1=:<base64 of the HMAC>:

The signature base is one line per covered component, ``"<name>": <value>``, in the listed order,
then ``"@signature-params": <the inner list re-serialised>``, joined by ``\\n`` (no trailing newline);
the HMAC-SHA256 of its UTF-8 bytes under the shared key must equal the ``Signature`` bytes
(compared in constant time). Header values are trimmed and obsolete line folding becomes one space;
a header sent several times is joined with ``", "``. Derived components read here: ``@method``,
``@authority`` (the ``Host`` header unless given), ``@request-target`` (path and query as sent),
``@path``, ``@query`` and ``@scheme``/``@target-uri`` when given. As in Genesys' reference
implementation (purecloudlabs/audiohook-reference-implementation, ``httpsignature``), the parameters
are re-serialised from the parsed form, so a sloppy encoding cannot carry padding; component
parameters (``;sf``, ``;bs``, ``;req``, ``;key``) and ``@query-param`` are refused as unsupported;
only the first signature (by its label's order) is checked.

Expiry: ``created`` in the future beyond ``clock_skew_s`` is refused, ``expires`` in the past beyond
it too, and with ``max_age_s`` a signature older than that (plus the skew) or without ``created``.
The reference counts the skew against the signer (``expires < now + 3`` fails); here it is a
tolerance either way, as RFC 9421 section 3.2.1 allows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.customer_service.protocols.base import SignatureRejected


class Token(str):
    """A structured-field token (serialised bare, not quoted)."""

    __slots__ = ()


BareItem = int | float | str | bytes | bool
Parameters = list[tuple[str, BareItem]]


@dataclass(frozen=True, slots=True)
class Item:
    """A structured-field item: a bare value and its parameters."""

    value: BareItem
    params: Parameters


@dataclass(frozen=True, slots=True)
class InnerList:
    """A structured-field inner list of items, with the list's parameters."""

    items: list[Item]
    params: Parameters


class StructuredFieldError(ValueError):
    """A header that is not a valid RFC 8941 structured field."""


_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,3})?")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def skip(self, characters: str) -> None:
        while self.peek() and self.peek() in characters:
            self.pos += 1

    def expect(self, character: str) -> None:
        if self.peek() != character:
            raise StructuredFieldError(f"expected {character!r} at position {self.pos} of {self.text[:120]!r}")
        self.pos += 1

    def match(self, pattern: re.Pattern[str]) -> re.Match[str]:
        found = pattern.match(self.text, self.pos)
        if found is None:
            raise StructuredFieldError(f"unexpected {self.text[self.pos:self.pos + 20]!r} at position {self.pos}")
        self.pos = found.end()
        return found

    def dictionary(self) -> dict[str, Item | InnerList]:
        members: dict[str, Item | InnerList] = {}
        self.skip(" ")
        while self.pos < len(self.text):
            key = self.match(_KEY).group()
            if self.peek() == "=":
                self.pos += 1
                members[key] = self.inner_list() if self.peek() == "(" else self.item()
            else:
                members[key] = Item(True, self.params())
            self.skip(" \t")
            if self.pos >= len(self.text):
                break
            self.expect(",")
            self.skip(" \t")
            if self.pos >= len(self.text):
                raise StructuredFieldError("trailing comma")
        return members

    def inner_list(self) -> InnerList:
        self.expect("(")
        items: list[Item] = []
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.pos += 1
                return InnerList(items, self.params())
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise StructuredFieldError(f"expected a space or ')' at position {self.pos}")

    def item(self) -> Item:
        return Item(self.bare_item(), self.params())

    def params(self) -> Parameters:
        params: dict[str, BareItem] = {}  # a repeated key keeps its first position, the last value
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            key = self.match(_KEY).group()
            value: BareItem = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare_item()
            params[key] = value
        return list(params.items())

    def bare_item(self) -> BareItem:
        first = self.peek()
        if first == '"':
            return self.string()
        if first == ":":
            encoded = self.match(_BYTES).group(1)
            try:
                return base64.b64decode(encoded, validate=True)
            except binascii.Error as error:
                raise StructuredFieldError(f"byte sequence is not base64: {error}") from None
        if first == "?":
            flag = self.text[self.pos + 1:self.pos + 2]
            if flag not in ("0", "1"):
                raise StructuredFieldError(f"boolean must be ?0 or ?1 at position {self.pos}")
            self.pos += 2
            return flag == "1"
        if first == "-" or first.isdigit():
            number = self.match(_NUMBER)
            return float(number.group()) if number.group(1) else int(number.group())
        return Token(self.match(_TOKEN).group())

    def string(self) -> str:
        self.expect('"')
        characters: list[str] = []
        while True:
            character = self.peek()
            self.pos += 1
            if character == "":
                raise StructuredFieldError("unterminated string")
            if character == '"':
                return "".join(characters)
            if character == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\"):
                    raise StructuredFieldError(f"bad escape at position {self.pos}")
                self.pos += 1
                characters.append(escaped)
            elif not " " <= character <= "~":
                raise StructuredFieldError(f"non-printable character in a string at position {self.pos - 1}")
            else:
                characters.append(character)


def parse_dictionary(text: str) -> dict[str, Item | InnerList]:
    """An RFC 8941 dictionary header value (raises :class:`StructuredFieldError`)."""
    return _Parser(text.strip()).dictionary()


def serialize_bare(value: BareItem) -> str:
    """RFC 8941 serialisation of a bare item."""
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, Token):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value)}.0"
    return str(value)


def serialize_params(params: Parameters) -> str:
    """``;key=value`` for each parameter (``;key`` alone for true)."""
    return "".join(f";{key}" if value is True else f";{key}={serialize_bare(value)}" for key, value in params)


def serialize_inner_list(inner: InnerList) -> str:
    """RFC 8941 serialisation of an inner list with its parameters."""
    items = " ".join(serialize_bare(item.value) + serialize_params(item.params) for item in inner.items)
    return f"({items}){serialize_params(inner.params)}"


def canonical_field(value: str) -> str:
    """A header value as a signature covers it: trimmed, obsolete line folding as one space."""
    return re.sub(r"[ \t]*\r\n[ \t]+", " ", value.strip())


# --- verification ---------------------------------------------------------------------------------------

DERIVED = frozenset({"@method", "@authority", "@scheme", "@target-uri", "@request-target", "@path", "@query"})
SIGNATURE_PARAMETERS = {"alg": str, "created": int, "expires": int, "keyid": str, "nonce": str}
ALGORITHM = "hmac-sha256"


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """A signature that verified: its label and parameters."""

    label: str
    keyid: str
    nonce: str | None
    created: int | None
    expires: int | None
    components: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a signature can cover of an upgrade request: ``headers`` (lower-case names; a list, or
    Starlette's ``Headers``, joins repeated headers) and the derived components' sources."""

    headers: Mapping[str, str | list[str]]
    request_target: str
    method: str = "GET"
    authority: str | None = None
    scheme: str | None = None

    def header(self, name: str) -> str | None:
        """A header's canonical value, several sent joined by ``", "`` (``None`` when absent)."""
        getlist = getattr(self.headers, "getlist", None)  # Starlette's Headers keep repeated headers apart
        value = getlist(name) if getlist is not None else self.headers.get(name)
        if not value:
            return None
        values = [value] if isinstance(value, str) else value
        return ", ".join(canonical_field(one) for one in values)

    def derived(self, name: str) -> str | None:
        """A derived component's value (``None`` when this request cannot say)."""
        path, _, query = self.request_target.partition("?")
        authority = self.authority or self.header("host")
        values = {"@method": self.method.upper(), "@authority": authority.lower() if authority else None,
                  "@request-target": self.request_target, "@path": path, "@query": "?" + query,
                  "@scheme": self.scheme,
                  "@target-uri": f"{self.scheme}://{authority}{self.request_target}" if self.scheme and authority
                  else None}
        return values.get(name)


KeyLookup = Callable[[str], bytes | None]


def verify_signature(request: SignedRequest, key_for: KeyLookup, *, required: tuple[str, ...] = (),
                     max_age_s: float | None = None, clock_skew_s: float = 3.0,
                     now: float | None = None) -> VerifiedSignature:
    """Verify the request's first ``Signature-Input``/``Signature`` pair (``hmac-sha256``).

    ``key_for(keyid)``: the shared key's bytes, ``None`` for an unknown key id (then a random key is
    used so the failure takes as long as a wrong signature). ``required``: components the signature
    must cover. Every failure is a :class:`~.base.SignatureRejected` saying which check failed.
    """
    label, inner, signature = _first_signature(request)
    params = _signature_parameters(inner)
    _check_times(params, max_age_s, clock_skew_s, time.time() if now is None else now)
    components = _covered_components(inner)
    missing = [name for name in required if name not in components]
    if missing:
        raise SignatureRejected(f"the signature does not cover {', '.join(missing)}")
    lines = [f'"{name}": {_component_value(request, name)}' for name in components]
    lines.append(f'"@signature-params": {serialize_inner_list(inner)}')
    keyid = str(params.get("keyid", ""))
    key = key_for(keyid) if keyid else None
    expected = hmac.new(key if key is not None else os.urandom(32), "\n".join(lines).encode("utf-8"),
                        hashlib.sha256).digest()
    matches = hmac.compare_digest(expected, signature)
    if params.get("alg", ALGORITHM) != ALGORITHM:
        raise SignatureRejected(f"signature algorithm {params['alg']!r} is not supported ({ALGORITHM} only)")
    if not keyid:
        raise SignatureRejected("the signature has no keyid")
    if key is None or not matches:
        raise SignatureRejected("the signature does not match the request")
    return VerifiedSignature(label, keyid, _optional_str(params.get("nonce")), _optional_int(params.get("created")),
                             _optional_int(params.get("expires")), tuple(components))


def _first_signature(request: SignedRequest) -> tuple[str, InnerList, bytes]:
    raw_inputs, raw_signatures = request.header("signature-input"), request.header("signature")
    if not raw_inputs and not raw_signatures:
        raise SignatureRejected("unsigned: no Signature and Signature-Input headers")
    if not raw_inputs or not raw_signatures:
        raise SignatureRejected(f"found {'Signature' if raw_signatures else 'Signature-Input'} without "
                                f"{'Signature-Input' if raw_signatures else 'Signature'}")
    try:
        inputs, signatures = parse_dictionary(raw_inputs), parse_dictionary(raw_signatures)
    except StructuredFieldError as error:
        raise SignatureRejected(f"malformed Signature or Signature-Input header: {error}") from None
    if not inputs:
        raise SignatureRejected("Signature-Input holds no signature")
    label, inner = next(iter(inputs.items()))
    if not isinstance(inner, InnerList):
        raise SignatureRejected(f"Signature-Input {label}: must be an inner list of component names")
    signature = signatures.get(label)
    if signature is None:
        raise SignatureRejected(f"Signature has no {label}= entry")
    if not isinstance(signature, Item) or not isinstance(signature.value, bytes):
        raise SignatureRejected(f"Signature {label}: must be a byte sequence (:base64:)")
    return label, inner, signature.value


def _signature_parameters(inner: InnerList) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in inner.params:
        expected = SIGNATURE_PARAMETERS.get(key)
        if expected is None:
            raise SignatureRejected(f"unknown signature parameter {key!r}")
        if isinstance(value, bool) or not isinstance(value, expected) or isinstance(value, bytes):
            kind = "an integer" if expected is int else "a string"
            raise SignatureRejected(f"signature parameter {key} must be {kind}")
        if isinstance(value, int) and value < 0:
            raise SignatureRejected(f"signature parameter {key} must not be negative")
        params[key] = value
    return params


def _check_times(params: dict[str, Any], max_age_s: float | None, skew_s: float, now: float) -> None:
    created, expires = params.get("created"), params.get("expires")
    if created is not None and created > now + skew_s:
        raise SignatureRejected(f"signature created {created - now:.0f} s in the future")
    if expires is not None and expires < now - skew_s:
        raise SignatureRejected(f"signature expired {now - expires:.0f} s ago")
    if max_age_s is not None:
        if created is None:
            raise SignatureRejected("the signature has no created parameter, so its age is unknown")
        if now - created > max_age_s + skew_s:
            raise SignatureRejected(f"signature created {now - created:.0f} s ago (at most {max_age_s:g} s)")


def _covered_components(inner: InnerList) -> list[str]:
    names: list[str] = []
    for item in inner.items:
        if not isinstance(item.value, str) or isinstance(item.value, Token):
            raise SignatureRejected("Signature-Input must list component names as strings")
        if item.params:
            raise SignatureRejected(f"component parameters ({item.value}{serialize_params(item.params)}) are not "
                                    "supported")
        if item.value in names:
            raise SignatureRejected(f"component {item.value} is listed twice")
        if item.value == "@signature-params" or (item.value.startswith("@") and item.value not in DERIVED):
            raise SignatureRejected(f"component {item.value} cannot be covered here")
        names.append(item.value)
    return names


def _component_value(request: SignedRequest, name: str) -> str:
    value = request.derived(name) if name.startswith("@") else request.header(name)
    if value is None:
        raise SignatureRejected(f"the signature covers {name}, which this request does not have")
    return value


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
