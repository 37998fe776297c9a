"""One error shape for every vertical: RFC 9457 ``application/problem+json``.

Domain code raises the exceptions below (or subclasses); :func:`install_problem_handlers` maps
them, FastAPI's validation errors and Starlette's HTTP errors to problem+json. Anything else
becomes a generic 500 that leaks no internals (the traceback goes to the log with the request id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://tessera.dev/problems/"

logger = logging.getLogger("tessera.errors")
ModelT = TypeVar("ModelT", bound=BaseModel)


class ProblemError(Exception):
    """A failure with an HTTP meaning. Subclasses fix ``status``, ``title`` and ``type_slug``."""

    status: int = 500
    title: str = "Internal Server Error"
    type_slug: str = "internal"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None,
                 **extensions: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extensions = extensions

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 body for this error."""
        return problem_body(self.status, self.title, self.detail, self.type_slug, instance, self.extensions)


class BadRequest(ProblemError):
    status, title, type_slug = 400, "Bad Request", "bad-request"


class UndecodableBody(BadRequest):
    """A body declared as JSON that is not UTF-8 text (or nests too deeply, or holds a number too long)."""

    type_slug = "undecodable-body"


class Unauthorized(ProblemError):
    status, title, type_slug = 401, "Unauthorized", "unauthorized"


class Forbidden(ProblemError):
    status, title, type_slug = 403, "Forbidden", "forbidden"


class NotFound(ProblemError):
    status, title, type_slug = 404, "Not Found", "not-found"


class Conflict(ProblemError):
    status, title, type_slug = 409, "Conflict", "conflict"


class PayloadTooLarge(ProblemError):
    status, title, type_slug = 413, "Content Too Large", "payload-too-large"


class UnsupportedMediaType(ProblemError):
    status, title, type_slug = 415, "Unsupported Media Type", "unsupported-media-type"


class UnprocessableContent(ProblemError):
    status, title, type_slug = 422, "Unprocessable Content", "validation-error"


class ServiceOverloaded(ProblemError):
    """Too much work queued: callers should back off and retry (503 + Retry-After)."""

    status, title, type_slug = 503, "Service Unavailable", "overloaded"

    def __init__(self, detail: str | None = None, *, retry_after_s: float = 1.0, **extensions: Any) -> None:
        retry = max(1, round(retry_after_s))
        super().__init__(detail, headers={"Retry-After": str(retry)}, retry_after_s=retry, **extensions)


class NotReady(ProblemError):
    status, title, type_slug = 503, "Service Unavailable", "not-ready"


class DeadlineExceeded(ProblemError):
    """Work waited past its deadline and was dropped rather than answered late."""

    status, title, type_slug = 504, "Gateway Timeout", "deadline-exceeded"


class NotBuilt(ProblemError):
    """A declared endpoint whose work is not built yet (501): its path, method and provisional
    contract are published, and ``tracking_issue`` names the issue that builds it."""

    status, title, type_slug = 501, "Not Implemented", "not-built"

    def __init__(self, tracking_issue: int) -> None:
        super().__init__(f"not built yet: tracked in issue {tracking_issue}", tracking_issue=tracking_issue)


class EdgeMappedError(Exception):
    """An error raised below the HTTP edge (e.g. by the model runtime) that has no HTTP meaning of its own.

    Celery tasks and scripts see it as a plain Python exception; at the HTTP edge the problem
    handlers answer it with the :class:`ProblemError` that :func:`register_problem_mapping`
    registered for its class (an unmapped one is a generic 500). ``shared`` imports nothing of
    the layers that define such errors: each layer registers its own mapping when it is imported.
    """


_EDGE_MAPPINGS: dict[type[BaseException], Callable[[Any], ProblemError | None]] = {}


def register_problem_mapping(error_type: type[EdgeMappedError],
                             to_problem: Callable[[Any], ProblemError | None]) -> None:
    """Answer ``error_type`` (and its subclasses without a mapping of their own) with ``to_problem(error)``;
    ``None`` from it makes the error an unexpected one (logged, a generic 500)."""
    _EDGE_MAPPINGS[error_type] = to_problem


def as_problem(error: BaseException) -> ProblemError | None:
    """The problem an error is answered with at the edge: itself when a :class:`ProblemError`, the
    registered mapping of its nearest mapped class for an :class:`EdgeMappedError`, else ``None``
    (an unexpected error)."""
    if isinstance(error, ProblemError):
        return error
    for cls in type(error).__mro__:
        mapping = _EDGE_MAPPINGS.get(cls)
        if mapping is not None:
            return mapping(error)
    return None


_STATUS_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def problem_body(status: int, title: str | None, detail: str | None, type_slug: str | None = None,
                 instance: str | None = None, extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build an RFC 9457 problem document."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + type_slug if type_slug else "about:blank",
        "title": title or _STATUS_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail or title or _STATUS_TITLES.get(status, "Error"),
    }
    if instance:
        body["instance"] = instance
    if extensions:
        body.update(extensions)
    return body


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response carrying a problem document with the right media type."""
    return JSONResponse(body, status_code=body["status"], headers=headers,
                        media_type=PROBLEM_CONTENT_TYPE)


# --- the error shape in OpenAPI --------------------------------------------------------------------

class InvalidField(BaseModel):
    """One invalid input of a 422, as pydantic names it."""

    loc: list[str | int] = Field(description="where: body, query, path or header, then the field path")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, string_pattern_mismatch")


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every 4xx and 5xx, as ``application/problem+json``.

    Members beyond these are extensions of the problem's type (e.g. ``known_fields``,
    ``retry_after_s``).
    """

    model_config = ConfigDict(extra="allow")

    type: str = Field(description=f"the kind of problem: {PROBLEM_TYPE_BASE}<slug>, or about:blank")
    title: str = Field(description="short summary of the kind of problem")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request")
    instance: str | None = Field(default=None, description="the request path")
    request_id: str | None = Field(default=None, description="the request's X-Request-ID (also in the logs)")
    errors: list[InvalidField] | None = Field(default=None, description="422 only: every invalid input")


PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"

_PROBLEM_MEANINGS = {
    400: "The request could not be read.",
    401: "No valid API key (X-API-Key or Authorization: Bearer), or, on a signed route, a missing, malformed, "
         "wrong or expired Tessera-Signature.",
    403: "The API key is valid but not for this vertical (scope).",
    404: "Nothing with this id for the caller's tenant.",
    409: "Conflicts with what is stored (an id that exists, or one reused with a different body).",
    413: "The body is larger than this route accepts.",
    415: "The body is not sent as JSON (Content-Type: application/json).",
    422: "The request is well formed but invalid; `errors` lists every invalid input.",
    501: "Declared but not built yet: `tracking_issue` names the issue that builds it.",
    503: "Temporarily unavailable (overloaded, a dependency down, a model not loaded): retry, after Retry-After "
         "seconds when given.",
    504: "The request waited past its deadline and was dropped rather than answered late.",
}
_PROBLEM_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer, when the API key is missing or invalid",
                               "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def problem_responses(*statuses: int, notes: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems a route can answer, for a route's ``responses=``.

    ``notes`` adds a route's own meaning to a status's general one (e.g. ``{404: "no such rule"}``).
    The ``Problem`` schema they refer to is added to every service app's OpenAPI (``shared.app``).
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description = " ".join(filter(None, (_PROBLEM_MEANINGS.get(status, _STATUS_TITLES.get(status, "Error")),
                                             (notes or {}).get(status))))
        responses[status] = {"description": description,
                             "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}}}
        if status in _PROBLEM_HEADERS:
            responses[status]["headers"] = _PROBLEM_HEADERS[status]
    return responses


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def failure_document(exc: ProblemError | None, instance: str, request_id: str | None) -> dict[str, Any]:
    """The problem document of a failed request; ``None`` is an unexpected error (a 500 that leaks nothing)."""
    if exc is None:
        body = problem_body(500, "Internal Server Error", "An unexpected error occurred; it has been logged.",
                            "internal", instance)
    else:
        body = exc.to_problem(instance=instance)
    body["request_id"] = request_id
    return body


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(failure_document(exc, request.url.path, _request_id(request)), exc.headers)


async def _on_mapped(request: Request, exc: Exception) -> JSONResponse:
    problem = as_problem(exc)
    if problem is None:
        return await _on_unexpected(request, exc)
    return await _on_problem(request, problem)


def _error_entries(raw_errors: Sequence[Any]) -> tuple[list[dict[str, Any]], str]:
    """pydantic errors as problem ``errors`` entries, plus a one-line detail naming the first."""
    errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
              for err in raw_errors]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return errors, f"{where}: {first['msg']}"


UTF8_BOM = b"\xef\xbb\xbf"


def parse_json(model: type[ModelT], body: bytes) -> ModelT:
    """Validate a raw JSON body (e.g. one whose signature was checked first) into ``model``.

    Malformed input raises :class:`UnprocessableContent` carrying every error, as FastAPI's own
    request validation does; a body that is not UTF-8 raises :class:`UndecodableBody` (400), as FastAPI's
    routes answer it. A leading UTF-8 byte order mark is ignored, as FastAPI's routes ignore it (RFC 8259 §8.1).
    """
    text = body[len(UTF8_BOM):] if body.startswith(UTF8_BOM) else body
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        try:
            text.decode("utf-8")  # only on the error path: is the JSON wrong, or the encoding?
        except UnicodeDecodeError as cause:
            raise UndecodableBody(undecodable_body_detail(cause)) from None
        raise _unprocessable(exc) from None


def parse_object(model: type[ModelT], data: object, *, loc: Sequence[str | int] = ()) -> ModelT:
    """As :func:`parse_json`, for a value already decoded from JSON (e.g. one item of a batch);
    ``loc``: where ``data`` lies in the request (e.g. ``("body", "retrieval")``), prefixed to each error's."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _unprocessable(exc, loc) from None


def _unprocessable(exc: ValidationError, loc: Sequence[str | int] = ()) -> UnprocessableContent:
    errors, detail = _error_entries([{**error, "loc": (*loc, *error.get("loc", ()))} for error in exc.errors()])
    return UnprocessableContent(detail, errors=errors)


def is_json_media_type(content_type: str) -> bool:
    """True for ``application/json`` and ``application/*+json``, with any parameters (charset)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/")
                                                and media_type.endswith("+json"))


def require_json_body(headers: Mapping[str, str]) -> None:
    """415 for a request whose body is declared as anything but JSON (``headers``: lower-case names).

    Decided on the headers alone, before the body is read or the caller authenticated. A body
    without a Content-Type is read as JSON; one with another type is refused rather than guessed
    at (curl's ``-d`` alone sends ``application/x-www-form-urlencoded``). No body, no check.
    """
    content_type = headers.get("content-type")
    if content_type is None or is_json_media_type(content_type):
        return
    if headers.get("content-length", "0").strip() == "0" and "transfer-encoding" not in headers:
        return
    media_type = content_type.split(";", 1)[0].strip()[:100] or "(empty)"
    raise UnsupportedMediaType(
        f"Content-Type {media_type} is not accepted here: send JSON with Content-Type: application/json "
        "(curl: add -H 'Content-Type: application/json')", supported=["application/json"])


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors, detail = _error_entries(exc.errors())
    body = problem_body(422, "Unprocessable Content", detail, "validation-error",
                        request.url.path, {"errors": errors, "request_id": _request_id(request)})
    return problem_response(body)


_FASTAPI_UNPARSED_BODY = "There was an error parsing the body"
"""FastAPI's 400 for a JSON body it could not decode for any reason but a JSON syntax error (a 422 here)."""


def undecodable_body_detail(cause: BaseException) -> str:
    """Why a declared-JSON body could not be decoded, from the decoder's exception."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text (byte {cause.start}); JSON is sent as UTF-8"
    if isinstance(cause, RecursionError):
        return "the JSON nests arrays or objects too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number in the body has too many digits"
    return f"the body could not be decoded as JSON ({type(cause).__name__})"


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    type_slug = None
    if exc.status_code == 400 and exc.__cause__ is not None and detail == _FASTAPI_UNPARSED_BODY:
        type_slug, detail = UndecodableBody.type_slug, undecodable_body_detail(exc.__cause__)
    body = problem_body(exc.status_code, None, detail, type_slug, request.url.path,
                        {"request_id": _request_id(request)})
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request)) or headers.get("Allow", "")
    return problem_response(body, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method the app documents at the request's path (Starlette's 405 names one route's
    only, though GET and PUT of a path are two routes). As in OpenAPI, a concrete path is matched
    before templated ones."""
    root_path, path = request.scope.get("root_path", ""), request.scope["path"]
    path = path[len(root_path):] if root_path and path.startswith(root_path) else path
    documented = request.app.openapi().get("paths", {}) if isinstance(request.app, FastAPI) else {}
    matching = documented.get(path) or {method: None for template, operations in documented.items()
                                        if compile_path(template)[0].fullmatch(path) for method in operations}
    return sorted(method.upper() for method in matching)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The one log line of the error. Starlette re-raises it after this answer; the app's request
    # context middleware ends it there once the answer is complete, so uvicorn neither logs it
    # again nor closes the keep-alive connection (shared.observability.RequestContextMiddleware).
    logger.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem_response(failure_document(None, request.url.path, _request_id(request)))


def holds_nul_text(exc: DataError) -> bool:
    """Whether the database refused a statement for a NUL character (U+0000) in a text or JSON value:
    PostgreSQL's text cannot hold one, so it comes from the request, not from a fault here. (SQLite
    could; it is made to refuse one too, with :class:`shared.sqlite.NulCharacter`.)"""
    message = str(exc.orig)
    return type(exc.orig).__name__ == "UntranslatableCharacter" or "NUL (0x00)" in message or "\\u0000" in message


async def _on_data_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataError)
    if not holds_nul_text(exc):
        return await _on_unexpected(request, exc)
    detail = "a text value in the request holds a NUL character (U+0000), which no stored value may hold"
    body = problem_body(422, "Unprocessable Content", detail, "validation-error", request.url.path,
                        {"errors": [{"loc": [], "msg": detail, "type": "nul_character"}],
                         "request_id": _request_id(request)})
    return problem_response(body)


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error ``app`` returns a problem+json document (unexpected ones: a generic 500)."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(DataError, _on_data_error)
    app.add_exception_handler(EdgeMappedError, _on_mapped)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
