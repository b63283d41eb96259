"""Every failure answers in the seed's shape: {statusCode, message, error, timestamp, path}, with `code`, the
machine-readable reason (core.errors.CODES), and `field` when the refusal is about one field of the request."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.db import utcnow
from core.errors import DomainError, ValidationError, status_code
from core.inbound import unreadable
from core.ratelimit import Decision

log = logging.getLogger("gateway.api")
# The rate-limit decision for this request, for the X-RateLimit-* headers.
RATE_DECISION = web.RequestKey("ratelimit", Decision)
# The fields the request's route takes (its body's properties and its query parameters): an error's `field` is
# answered only when it is one of them. A refusal of the entity's state (a payment already VOIDED) names its
# `status`, which is no field of the request that was refused.
REQUEST_FIELDS = web.RequestKey("request_fields", frozenset)


class ApiError(DomainError):
    """An HTTP-level refusal raised by the API layer itself (413, 415, 429...)."""

    def __init__(
        self, status: int, message: str | list[str], *, headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message if isinstance(message, str) else "; ".join(message), code=code or status_code(status))
        self.status = status
        self.payload = message
        self.headers = headers or {}


def timestamp() -> str:
    now = utcnow()  # read once: two reads straddling a second gave 10:00:00.000 for 10:00:01.000
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_body(status: int, message: str | list[str], path: str, field: str | None = None,
               code: str | None = None) -> dict[str, object]:
    """The seed's error shape with `code` (DomainError.code; the status's by default); `field`, the one request
    field a refusal is about (DomainError.field), is added when there is one (absent otherwise)."""
    body: dict[str, object] = {
        "statusCode": status,
        "message": message,
        "error": HTTPStatus(status).phrase,
        "code": code or status_code(status),
        "timestamp": timestamp(),
        "path": path,
    }
    return {**body, "field": field} if field else body


def error_response(
    request: web.Request, status: int, message: str | list[str], headers: dict[str, str] | None = None,
    *, field: str | None = None, code: str | None = None,
) -> web.Response:
    response = web.json_response(error_body(status, message, request.path_qs, field, code), status=status,
                                 headers=headers)
    apply_rate_headers(request, response)
    return response


def apply_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    decision = request.get(RATE_DECISION)
    if decision is None or response.prepared:
        return
    response.headers["X-RateLimit-Limit"] = str(decision.limit)
    response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
    response.headers["X-RateLimit-Reset"] = str(decision.reset)
    if not decision.allowed:
        response.headers["Retry-After"] = str(decision.retry_after)


def _sqlstate(exc: DBAPIError) -> str:
    """The PostgreSQL error code behind a database error ("" when there is none: SQLite, a client error).
    asyncpg's errors reach SQLAlchemy as its generic DBAPIError, whatever their class: the code tells them apart."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code if isinstance(code, str) else ""


def _bad_value(exc: BaseException) -> bool:
    """A value the database refused (SQLSTATE class 22, "data exception": a NUL or a character the encoding
    lacks, a number out of range, a malformed date...; asyncpg reports a parameter it cannot encode as 22000
    too): the same request fails the same way every time."""
    return isinstance(exc, DBAPIError) and _sqlstate(exc).startswith("22")


def is_outage(exc: BaseException) -> bool:
    """A failure to reach the database or Redis (refused, reset, timed out, restarting), not a bug: a
    database error other than a constraint, a malformed statement or bad data (see _bad_value)."""
    # PoolTimeout: no pooled connection came free within DB_POOL_TIMEOUT_SECONDS (every one busy or held): the
    # request never reached the database, so it is an outage like one refused, not a bug (was a 500 after 30 s).
    if isinstance(exc, (OSError, TimeoutError, RedisError, PoolTimeout)):
        return True
    return (isinstance(exc, DBAPIError) and not isinstance(exc, (IntegrityError, ProgrammingError, DataError))
            and not _bad_value(exc))


def what_failed(exc: BaseException) -> str:
    """The outage in a few words for the log line: a database error with the server's or driver's own first line
    ("DBAPIError: sorry, too many clients already"), which alone tells max_connections reached from a server
    restarting, a statement cut by a timeout or a connection dropped mid-query; the bare class said none of that."""
    if isinstance(exc, PoolTimeout):
        return "no database connection free (pool exhausted)"
    if isinstance(exc, DBAPIError):
        said = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        if said and said[0]:
            return f"{type(exc).__name__}: {said[0][:200]}"
    return type(exc).__name__


def _answer_begun(request: web.Request) -> bool:
    """Has this request's response already begun (a streamed export prepared: its status line and headers are
    sent, or queued to go with the first chunk)? Nothing else may be written then."""
    writer = request.writer
    return writer.output_size > 0 or getattr(writer, "_headers_buf", None) is not None


def _cut_short(request: web.Request, exc: BaseException) -> web.StreamResponse:
    """A failure after the response began (an export cut mid-stream): a second response written into the
    first's body would be read as CSV rows, or as a garbled chunk. The connection is closed instead (what was
    written is still delivered first), so the body ends without its last chunk and the client reports an
    incomplete transfer. The response returned is never sent: aiohttp finds the connection closing and drops it."""
    if is_outage(exc):
        log.warning("dependency unavailable on %s %s after the response began; connection closed: %s",
                    request.method, request.path, what_failed(exc))
    else:
        log.error("error on %s %s after the response began; connection closed", request.method, request.path,
                  exc_info=exc)
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=503 if is_outage(exc) else 500)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except Exception as exc:
        if _answer_begun(request):
            return _cut_short(request, exc)
        return _error_answer(request, exc)
    apply_rate_headers(request, response)
    _not_stored(response)
    return response


def _not_stored(response: web.StreamResponse) -> None:
    """Answers carry members' names and phone numbers, payments, tokens: no browser disk or shared cache may keep
    them (a signed-out admin's pages read back from the cache). A route that chose its own caching keeps it (the
    active payment types' list, /v1/payment-types/active: private, max-age=30)."""
    if not response.prepared and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"


# Every 503: nothing was changed, and the same request may be sent again in a second.
SEND_AGAIN_SOON = {"Retry-After": "1"}


def _error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The error in the API's shape, when nothing of a response was written yet."""
    if isinstance(exc, ApiError):
        return error_response(request, exc.status, exc.payload, exc.headers, code=exc.code)
    field = exc.field if isinstance(exc, DomainError) and exc.field in request.get(REQUEST_FIELDS, ()) else None
    if isinstance(exc, ValidationError):
        return error_response(request, exc.status, list(exc.errors), field=field, code=exc.code)
    if isinstance(exc, DomainError):
        # A 503 says when to send it again, as an outage's does (below): nothing was changed.
        retry = SEND_AGAIN_SOON if exc.status == 503 else None
        return error_response(request, exc.status, exc.message, retry, field=field, code=exc.code)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.text if exc.status != 404 else f"Cannot {request.method} {request.path}"
        if isinstance(exc, web.HTTPMethodNotAllowed):
            # aiohttp's text is "405: Method Not Allowed": name the method refused and those the path takes.
            message = f"Cannot {request.method} {request.path}: it takes {', '.join(sorted(exc.allowed_methods))}"
        if exc.status == 413:
            message = "request body is too large"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(request, exc.status, message or HTTPStatus(exc.status).phrase, headers)
    if isinstance(exc, web.RequestPayloadError):
        # A body aiohttp could not decode (Content-Encoding: gzip on bytes that are not gzip), read by a handler
        # without read_body: the sender's mistake, not ours.
        return error_response(request, 400, unreadable(request, exc))
    if isinstance(exc, DBAPIError) and _bad_value(exc):
        # Not an outage: "send it again" would loop forever. A check that should have refused the value
        # first is missing: logged with the code so it can be added.
        log.error("the database refused a value on %s %s (SQLSTATE %s)", request.method, request.path,
                  _sqlstate(exc))
        return error_response(request, 400, "a value in the request cannot be stored (for example a "
                              "control character, or a number out of range)")
    if is_outage(exc):
        # The database or Redis is down or restarting, or every pooled connection is busy: the transaction
        # did not commit, so nothing was changed, and the same request (same idempotency key) can be sent
        # again. One line, no traceback: an outage is not a bug.
        log.warning("dependency unavailable on %s %s: %s", request.method, request.path, what_failed(exc))
        return error_response(request, 503, "A dependency is unavailable; nothing was changed, send it again",
                              SEND_AGAIN_SOON)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(request, 500, "Internal server error")
