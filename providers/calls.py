"""One outbound provider call: timeouts, latency and error metrics, transport failures in core words."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from core.config import ProviderConfig
from core.db import iso_ms, iso_z, utcnow
from core.metrics import PROVIDER_CALLS, PROVIDER_ERRORS, PROVIDER_FAILING
from core.ports import NOT_SENT, CredentialsRefused, ProviderError, ProviderTimeout, departing, turned_back

log = logging.getLogger("gateway.providers")

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 10.0
# A Retry-After longer than this is not waited for as such: the job's own backoff takes over.
MAX_RETRY_AFTER = 3600.0
# Calls to one provider failed (a 5xx, a timeout, no connection) this many times in a row, with no answer between:
# it is down or hanging, not one unlucky request. One error line says since when, and gateway_provider_failing reads
# 1, until a call is answered again (one line more). Not one line per job: in an outage every job fails.
FAILING_AFTER = 5


@dataclass
class Outage:
    """A provider's calls failing in a row, as this process saw them."""

    failures: int = 0
    since: str | None = None  # when the first of them was sent (UTC, ISO 8601)
    reported: bool = False  # the error line was written (FAILING_AFTER reached)
    started: float = 0.0  # time.monotonic() of the first
    # The operations whose credentials the provider refuses (credentials_refused), each said once. An answer to
    # another operation, made with other credentials (M-Pesa's STK push beside its reversal initiator, MTN's
    # collection product beside its disbursement one), does not end the outage: only one to a refused operation does.
    refused: set[str] = field(default_factory=set)


_outages: dict[str, Outage] = {}


@dataclass
class Seen:
    """What this process last saw of a provider's calls, for the record all processes read (providers.health):
    when one was last answered, when one last failed and how. `error` is a class (UNREACHABLE, TIMEOUT, HTTP_503,
    CREDENTIALS_REFUSED) and `summary` words of ours around the operation, an exception's class name or a status
    code: never a URL (a secret may ride in its query), a provider's text or a phone number."""

    last_success: str | None = None
    last_failure: str | None = None
    error: str | None = None
    summary: str | None = None


_seen: dict[str, Seen] = {}
# Events set at each change of _seen or _outages: providers.health's publisher waits on one (its own loop's)
# instead of writing to Redis from the call path.
_listeners: set[asyncio.Event] = set()


def listen(event: asyncio.Event) -> None:
    """Have `event` set whenever this process's view of a provider changes (ignore() undoes it)."""
    _listeners.add(event)


def ignore(event: asyncio.Event) -> None:
    _listeners.discard(event)


def _changed() -> None:
    for event in _listeners:
        event.set()


def _failure_seen(provider: str, error: str, summary: str) -> None:
    seen = _seen.setdefault(provider, Seen())
    seen.last_failure, seen.error, seen.summary = iso_ms(utcnow()), error, summary
    _changed()


def health_view() -> dict[str, dict[str, Any]]:
    """This process's view of each provider it has called since it started: failing (an outage reported, as
    gateway_provider_failing says) since when, its failures in a row, the last failure's class and summary and
    when, the last answered call, and the operations whose credentials it refuses."""
    view: dict[str, dict[str, Any]] = {}
    for provider in sorted(set(_seen) | set(_outages)):
        seen = _seen.get(provider, Seen())
        outage = _outages.get(provider, Outage())
        view[provider] = {"failing": outage.reported, "failingSince": outage.since if outage.reported else None,
                          "failuresInARow": outage.failures, "lastFailureAt": seen.last_failure,
                          "lastError": seen.error, "lastErrorSummary": seen.summary,
                          "lastSuccessAt": seen.last_success, "credentialsRefused": sorted(outage.refused)}
    return view


def call_failed(provider: str, started: float, *, error: str = "FAILED", summary: str = "call failed") -> None:
    """A call to `provider` sent at `started` (time.perf_counter()) got no answer, or a 5xx: `error` and `summary`
    say which (Seen: no URL, provider text or phone number)."""
    _failure_seen(provider, error, summary)
    outage = _outages.setdefault(provider, Outage())
    if not outage.failures:
        ago = time.perf_counter() - started
        outage.since = iso_z(datetime.fromtimestamp(utcnow().timestamp() - ago, UTC))
        outage.started = time.monotonic() - ago
    outage.failures += 1
    if outage.failures >= FAILING_AFTER and not outage.reported:
        outage.reported = True
        PROVIDER_FAILING.labels(provider=provider).set(1)
        log.error("%s calls failing since %s", provider, outage.since,
                  extra={"provider": provider, "failures_in_a_row": outage.failures, "failing_since": outage.since})


def credentials_refused(provider: str, operation: str, detail: str) -> None:
    """`provider` refused the gateway's own credentials (HTTP 401 after a fresh token): our configuration, which
    no retry mends. Reported at once, not after FAILING_AFTER: one error line, gateway_provider_failing 1, until a
    call is answered again (the configuration fixed). `detail`, the provider's words, goes to the log line only."""
    _failure_seen(provider, "CREDENTIALS_REFUSED", f"{operation.replace('_', ' ')}: credentials refused")
    outage = _outages.setdefault(provider, Outage())
    if not outage.failures:
        outage.since = iso_z(utcnow())
        outage.started = time.monotonic()
    outage.failures += 1
    outage.reported = True
    PROVIDER_FAILING.labels(provider=provider).set(1)
    if operation not in outage.refused:
        outage.refused.add(operation)
        log.error("%s refuses the gateway's credentials (%s): fix its configuration", provider,
                  operation.replace("_", " "), extra={"provider": provider, "operation": operation,
                                                      "error": detail[:200], "failing_since": outage.since})


def call_answered(provider: str, operation: str | None = None) -> None:
    """A call to `provider` (its `operation`) got an answer that is not a 5xx (a 4xx is the provider's answer too):
    an outage this process reported is over, unless the provider still refuses our credentials for another
    operation (Outage.refused)."""
    seen = _seen.setdefault(provider, Seen())
    first = seen.last_success is None
    seen.last_success = iso_ms(utcnow())
    outage = _outages.get(provider)
    if outage is None or not outage.failures:
        if first:
            _changed()
        return
    _changed()
    if operation is not None and outage.refused - {operation}:
        outage.refused.discard(operation)
        return
    if outage.reported:
        PROVIDER_FAILING.labels(provider=provider).set(0)
        log.warning("%s calls succeed again", provider,
                    extra={"provider": provider, "failures_in_a_row": outage.failures, "failing_since": outage.since,
                           "failed_for_s": round(time.monotonic() - outage.started)})
    _outages[provider] = Outage()


def credentials_accepted(provider: str, operation: str) -> None:
    """`provider` took `operation` with the gateway's credentials, as its callback says (M-Pesa's reversal Result
    other than 2001/21): its refusal reported by credentials_refused is over. The process that receives the callback
    (serve) may never make that call itself (the worker sends reversals), so call_answered alone left
    gateway_provider_failing at 1 there for good."""
    outage = _outages.get(provider)
    if outage is not None and operation in outage.refused:
        call_answered(provider, operation)


class ProviderBusy(ProviderError):
    """The provider refused for now (HTTP 429): nothing was processed, so the same call may go again.

    `retry_after`: the seconds the provider asked us to wait (its Retry-After header), when it said;
    the outbox waits at least that long before the next attempt.
    """

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, retryable=True, code=code)
        self.retry_after = retry_after


def with_query(url: str, **params: str) -> str:
    """`url` with `params` added to its query string (the secret already there is kept)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def timeout_from(config: ProviderConfig) -> httpx.Timeout:
    """Per-provider timeouts from options connect_timeout / read_timeout (seconds)."""
    try:
        connect = float(config.options.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT)
        read = float(config.options.get("read_timeout") or DEFAULT_READ_TIMEOUT)
    except ValueError:
        raise ValueError("provider connect_timeout / read_timeout must be numbers") from None
    return httpx.Timeout(read, connect=connect)


async def send(http: httpx.AsyncClient, *, provider: str, operation: str, method: str, url: str,
               timeouts: httpx.Timeout, creates: bool, headers: Mapping[str, str] | None = None,
               json: Any = None, auth: httpx.Auth | tuple[str, str] | None = None, params: Any = None,
               label: str | None = None, answered: Callable[[httpx.Response], bool] | None = None,
               count_5xx: bool = True) -> httpx.Response:
    """Send once. `creates`: the request starts a payment or refund, so an unanswered one is ambiguous.

    A failure to connect is retryable (nothing reached the provider): httpx raises ConnectError, ConnectTimeout and
    PoolTimeout before a byte of the request is written (no connection was had; core.http keeps that true of the
    gateway's own transport), so they are UNREACHABLE, and a request that `creates` is turned back
    (core.ports.turned_back). A request that may have reached the provider but got no answer (a read or write
    timeout, a reset, a malformed answer) raises ProviderTimeout when it `creates`: the caller must ask the status of
    the same reference rather than send it again.

    For the outage line (call_failed / call_answered) a call fails when it could not connect, got no answer in
    time, or was answered 5xx, unless `answered` says that 5xx is the provider's answer (Daraja's
    "still processing"). `label`: the provider as its errors name it ("M-Pesa"; its key by default).

    A request that could not be made, or whose URL httpx refuses before connecting, never left: not_sent (a
    retryable NOT_SENT, its own class), never a timeout or an unreachable provider. A request that `creates` is
    counted as gone (core.ports.departing) as it is handed to the transport: whatever fails after that may follow
    a request that arrived, but for a failure to connect, an answer 401 (nothing was processed under a refused
    token: the adapters send it again with a new one) and an answer 429 (the provider's rate limit refused it, nothing
    processed: ProviderBusy, sent again after its Retry-After), which turn it back.

    gateway_provider_errors_total is counted here (a transport failure, a 5xx unless `count_5xx` is off: an
    adapter that counts its errors as it reads them, a request not made) and in http_error (a 4xx), once per
    failed HTTP call: the jobs above (core.jobs) time operations but count no errors (but for an adapter's
    exception before its request left: not_sent). Nothing is logged per call: in an outage every job fails, and
    the outage line (call_failed) says it once.
    """
    name = label or provider
    try:
        # Made before anything is sent: one that cannot be made (a credential a header cannot carry, a body that is
        # not JSON, a URL httpx refuses) never left. No call then: not timed, no outage line, never "no answer".
        request = http.build_request(method, url, headers=dict(headers or {}), json=json, params=params,
                                     timeout=timeouts)
    except Exception as exc:
        raise not_sent(provider, operation, exc, label=name) from exc
    if creates:
        departing()  # from here on it may arrive, whatever happens next (core.ports.watch_departures)
    started = time.perf_counter()
    timed = True
    try:
        response = await http.send(request, auth=auth)
    except httpx.UnsupportedProtocol as exc:
        # The URL's scheme is refused before a connection is even looked for: nothing left.
        timed = False
        if creates:
            turned_back()
        raise not_sent(provider, operation, exc, label=name) from exc
    except (httpx.ConnectTimeout, httpx.ConnectError, httpx.PoolTimeout) as exc:
        # No connection was had (refused, DNS, TLS handshake, none within the connect or pool timeout): not a byte of
        # the request was written. (A WriteTimeout may follow part of it written: it stays in doubt, below.)
        if creates:
            turned_back()
        PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
        call_failed(provider, started, error="UNREACHABLE",
                    summary=f"{operation}: cannot connect ({type(exc).__name__})")
        raise ProviderError(f"{name} {operation}: cannot connect ({type(exc).__name__})", retryable=True,
                            code="UNREACHABLE") from None
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
        call_failed(provider, started, error="TIMEOUT",
                    summary=f"{operation}: no answer in time ({type(exc).__name__})")
        if creates:
            raise ProviderTimeout(f"{name} {operation}: no answer in time ({type(exc).__name__}); ask the "
                                  "status, do not send again") from None
        # A token or a query changes nothing at the provider: asking again is safe.
        raise ProviderError(f"{name} {operation}: no answer in time ({type(exc).__name__})", retryable=True,
                            code="TIMEOUT") from None
    finally:
        if timed:
            PROVIDER_CALLS.labels(provider=provider, operation=operation).observe(time.perf_counter() - started)
    if creates and response.status_code in (401, 429):
        # Refused unprocessed: for the gateway's token (sent again with a new one, or our credentials), or by the
        # provider's rate limit (http_error's ProviderBusy: sent again after its Retry-After, as never arrived).
        turned_back()
    if response.status_code >= 500 and (answered is None or not answered(response)):
        if count_5xx:
            PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
        call_failed(provider, started, error=f"HTTP_{response.status_code}",
                    summary=f"{operation}: HTTP {response.status_code}")
    elif response.status_code != 401:
        # A 401 says nothing of the provider's health: a token revoked early (sent again with a new one), or our
        # credentials refused (credentials_refused, which keeps an outage reported until an answer ends it).
        call_answered(provider, operation)
    return response


def not_sent(provider: str, operation: str, exc: BaseException, *, label: str | None = None) -> ProviderError:
    """`operation`'s request to `provider` failed before it left this process (`exc`: raised while it was being
    made, by httpx or by the adapter): nothing reached the provider, so it is a retryable NOT_SENT - sent again
    later, as a token not obtained is (core.jobs.ready_to_send) - never a call that may have arrived. Counted and
    logged by request_not_made. Its message names the exception's class only (its text may hold a URL or a
    credential)."""
    request_not_made(provider, operation, exc, label=label)
    return ProviderError(f"{label or provider} {operation.replace('_', ' ')}: the request could not be made "
                         f"({type(exc).__name__}); nothing was sent, sent later", retryable=True, code=NOT_SENT)


def request_not_made(provider: str, operation: str, exc: BaseException, *, label: str | None = None) -> None:
    """A request to `provider` that could not be made (`exc`), nothing sent: counted in
    gateway_provider_errors_total; no call is timed, and the provider's health (call_failed, Seen) is untouched: the
    provider did nothing wrong (the ops page shows it as its calls left it: UNKNOWN when none was ever made, never
    FAILING nor CREDENTIALS_REFUSED for a setting it never saw). One error line with the traceback: it is our
    configuration or our code, which a retry alone does not mend. For the payment providers (not_sent) and the SMS
    sender (channels.sms.sender: an SMS_API_KEY a header cannot carry)."""
    PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
    log.error("%s %s: the request could not be made, nothing was sent (%s)", label or provider,
              operation.replace("_", " "), type(exc).__name__, exc_info=exc,
              extra={"provider": provider, "operation": operation, "error": type(exc).__name__})


def retry_after(response: httpx.Response, *, now: datetime | None = None) -> float | None:
    """The Retry-After header in seconds (a number of seconds or an HTTP date), or None."""
    raw = response.headers.get("Retry-After", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return None
    return min(seconds, MAX_RETRY_AFTER)


def http_error(provider: str, operation: str, response: httpx.Response, detail: str, *,
               deduplicated: bool = True) -> ProviderError:
    """5xx may be retried with the same reference, and so may 429 (nothing was processed: the provider's
    rate limit refused it); any other 4xx will fail the same way again.

    `deduplicated=False`: the request moves money and carries no reference of ours the provider would
    recognise on a second sending (Airtel's refund names only the payment). A 5xx does not say whether the
    provider acted before it failed, so it is ProviderTimeout: never sent again, settled by a status
    query or a person.

    send() already counted a 5xx; a 4xx is counted here because only the adapter knows which ones are
    expected answers (MTN's 409 for a reference we sent before is not an error).
    """
    status = response.status_code
    if status < 500:
        PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
    words = operation.replace("_", " ")
    if status >= 500 and not deduplicated:
        return ProviderTimeout(f"{provider} {words} failed on the provider's side (HTTP {status}): {detail}; "
                               "it may have been carried out: not sent again")
    if status >= 500:
        return ProviderError(f"{provider} {words} failed on the provider's side (HTTP {status}): "
                             f"{detail}", retryable=True, code=f"HTTP_{status}")
    if status == 401:
        # Adapters send a call refused 401 once more with a fresh token: a second 401, or one to the token request
        # itself, is our credentials refused.
        credentials_refused(provider, operation, detail)
        return CredentialsRefused(f"{provider} refused the gateway's credentials for {words} (HTTP 401): {detail}",
                                  code="HTTP_401")
    if status == 429:
        return ProviderBusy(f"{provider} is rate limiting {words} (HTTP 429): {detail}", code="HTTP_429",
                            retry_after=retry_after(response))
    return ProviderError(f"{provider} refused {words} (HTTP {status}): {detail}", retryable=False,
                         code=f"HTTP_{status}")


def taken_unconfirmed(provider: str, operation: str, response: httpx.Response, then: str, *,
                      label: str | None = None) -> ProviderTimeout:
    """A request that moves money answered 2xx, but not as the provider documents its acceptance (MTN's 200 or 201
    for its 202, Airtel's 201 for its 200, or a 2xx without the body that says accepted). A 2xx says the provider
    took the request: failing the payment (or refund) could fail one whose money moves, and sending it again could
    move it twice. As unanswered: its status settles it (`then` says how). `label`: the provider as its errors
    name it (its key by default)."""
    PROVIDER_ERRORS.labels(provider=provider, operation=operation).inc()
    return ProviderTimeout(f"{label or provider} {operation.replace('_', ' ')} answered HTTP {response.status_code}, "
                           f"not as documented: it may have been taken; {then}")


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The answer as a JSON object, or {} when it is empty or not JSON."""
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


_COMPACT = "%Y%m%d%H%M%S"  # M-Pesa's TransactionDate and TransCompletedTime: 20261031235959, local time


def provider_time(value: object, zone: tzinfo = UTC) -> datetime | None:
    """When a provider says something happened, in UTC: an ISO 8601 date-time (without an offset: in `zone`) or
    M-Pesa's compact YYYYMMDDHHMMSS (a number or a string, in `zone`). None for anything else: the time only
    dates the money in the reports (core.provider_events.money_moved_at), so a provider writing it oddly costs the
    exact time, never the callback."""
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None
    text = str(value).strip()
    try:
        moment = (datetime.strptime(text, _COMPACT) if text.isdigit() and len(text) == 14
                  else datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")))
    except ValueError:
        return None
    try:
        return (moment.replace(tzinfo=zone) if moment.tzinfo is None else moment).astimezone(UTC)
    except (OverflowError, ValueError):
        return None
