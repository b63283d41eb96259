"""POST/PUT /webhooks/payments/{provider}: check the URL secret, verify, parse, hand the event to core."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy import or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.audit import Actor
from core.auth import callback_secret_ok
from core.config import Settings
from core.db import iso_ms, lock_row, utcnow
from core.errors import status_code
from core.inbound import JSON_ERRORS, client_address, limit_key, read_capped
from core.logs import scrub
from core.metrics import CALLBACK_REJECTED
from core.models import Payment
from core.money import Money, MoneyError
from core.ports import CallbackRejected, InboundCallback, ProviderError, ProviderOutcome
from core.ratelimit import Limit, RateLimiter
from core.runtime import RUNTIME, SETTINGS

log = logging.getLogger("gateway.providers.callbacks")

MAX_CALLBACK_BODY = 64 * 1024  # provider callbacks are a few hundred bytes
MAX_LOGGED_REFERENCE = 64  # a provider's reference is a UUID or a short code; a longer one is cut in the log
# What each provider expects as an acknowledgement; the rest take any 200.
_ACKS: dict[str, dict[str, Any]] = {
    "mpesa": {"ResultCode": 0, "ResultDesc": "Accepted"},
}
PATH = "/webhooks/payments/{provider}"
# The seed's table: webhooks 1000/min per source address.
CALLBACK_LIMIT = Limit("webhooks", 1000)


# The word in a provider's callback path where it is not the provider's name. Safaricom's Daraja refuses a URL with
# "mpesa" or "safaricom" in it (its URL rules: also exe, exec, cmd, sql and query, in any case; reported for the STK
# push's CallBackURL as "400.002.02 Bad Request - Invalid CallBackURL"): M-Pesa is told /webhooks/payments/daraja.
# /webhooks/payments/mpesa is still taken (callbacks of requests sent before this name).
CALLBACK_PATH_NAMES = {"mpesa": "daraja"}
_BY_PATH_NAME = {word: provider for provider, word in CALLBACK_PATH_NAMES.items()}


def callback_url(settings: Settings, provider: str) -> str:
    """Where `provider` should call us back, with the per-provider secret when one is configured."""
    url = f"{settings.public_base_url}/webhooks/payments/{CALLBACK_PATH_NAMES.get(provider, provider)}"
    secret = settings.callback_secrets.get(provider)
    return f"{url}?{urlencode({'secret': secret.get()})}" if secret else url


def _error(request: web.Request, status: int, message: str) -> web.Response:
    """The API's error shape, with its status's `code` (core.errors.status_code) as every API error has."""
    return web.json_response({"statusCode": status, "message": message, "error": HTTPStatus(status).phrase,
                              "code": status_code(status), "timestamp": iso_ms(utcnow()),
                              "path": request.path},
                             status=status)


def _refuse(request: web.Request, provider: str, status: int, reason: str, *,
            reference: str | None = None) -> web.Response:
    """Answer a refused callback and log it; `reference`: the payment's, when the adapter read one before refusing
    (CallbackRejected.reference), so the line is found by a search for the payment."""
    CALLBACK_REJECTED.labels(source=provider).inc()
    extra: dict[str, Any] = {"provider": provider, "reason": reason, "status": status}
    if isinstance(reference, str) and reference:
        # The sender's text: bounded, and masked if it is a phone number (the formatter masks them too).
        extra["reference"] = scrub(reference[:MAX_LOGGED_REFERENCE])
    log.warning("provider callback refused", extra=extra)
    return _error(request, status, reason)


async def _read_body(request: web.Request) -> bytes | None:
    """The raw body, or None when it is larger than a callback can be."""
    return await read_capped(request, MAX_CALLBACK_BODY)


def _unstorable_json(body: bytes) -> bool:
    """True when the body is JSON holding a string PostgreSQL cannot store (NUL, a lone surrogate).

    The raw callback is kept in a JSON column; such a string would fail that INSERT with a 500.
    """
    if b"\\u" not in body and b"\xed" not in body and b"\x00" not in body:
        # Neither can be written without one of these: a NUL is the escape \\u0000, a lone surrogate an escape
        # \\ud800-\\udfff or the bytes ED A0-BF (which json.loads decodes as one); and a body in UTF-16 or UTF-32
        # (which json.loads reads too) has NUL bytes. No parse and walk then, for nearly every callback.
        return False
    try:
        value = json.loads(body)
    except JSON_ERRORS:
        return False  # not JSON: the adapter refuses it with its own message
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _rate_limited(request: web.Request, rt: Any) -> web.Response | None:
    settings = request.config_dict.get(SETTINGS) or rt.settings
    multiplier = float(settings.extra.get("rate_limit_multiplier", 1.0))
    if multiplier <= 0:
        return None
    try:
        # Per sender: behind our own load balancers, the nearest untrusted hop, not the balancer.
        source = client_address(request, settings.trusted_proxies)
        # On the multiplexed connection where there is one (Runtime.hot_redis): one EVAL per callback.
        decision = await RateLimiter(rt.hot_redis, multiplier=multiplier).hit(CALLBACK_LIMIT, limit_key(source))
    except Exception:  # Redis down: a provider's money callback matters more than the limit
        log.warning("callback rate limit unavailable; letting the callback through")
        return None
    if decision.allowed:
        return None
    CALLBACK_REJECTED.labels(source="rate_limited").inc()
    response = _error(request, 429, "Too many requests. Please try again later.")
    response.headers.update({"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": str(decision.reset), "Retry-After": str(decision.retry_after)})
    return response


async def provider_callback(request: web.Request) -> web.Response:
    rt = request.config_dict[RUNTIME]
    word = request.match_info["provider"]
    name = _BY_PATH_NAME.get(word, word)
    adapter = rt.providers.get(name)
    if adapter is None:
        return _error(request, 404, f"unknown payment provider {word!r}")
    limited = await _rate_limited(request, rt)
    if limited is not None:
        return limited

    if not callback_secret_ok(rt.settings, name, request.query.get("secret", "")):
        return _refuse(request, name, 401, "callback secret is missing or wrong")

    body = await _read_body(request)
    if body is None:
        return _refuse(request, name, 413, f"callback body is larger than {MAX_CALLBACK_BODY} bytes")
    if _unstorable_json(body):
        return _refuse(request, name, 400, "callback contains characters that are not text (NUL or a lone "
                                           "surrogate)")
    callback = InboundCallback(method=request.method, headers=dict(request.headers),
                               query={k: v for k, v in request.query.items() if k != "secret"}, body=body)
    try:
        await adapter.verify_callback(callback)
        event = adapter.parse_callback(callback)
    except CallbackRejected as exc:
        return _refuse(request, name, exc.status, str(exc), reference=exc.reference)
    except ValueError as exc:  # an adapter's unknown-status or malformed-field error
        return _refuse(request, name, 400, str(exc))
    except (RedisError, OSError, TimeoutError) as exc:
        # The one-time-key check (IremboPay) could not reach Redis (down, or refusing writes when out of
        # memory): nothing was recorded, and a callback taken without its replay check could be a replay.
        # 503 asks the provider to send it again; a bare 500 may not.
        log.warning("provider callback not verified: Redis unavailable; asked to retry",
                    extra={"provider": name, "error": type(exc).__name__})
        await _release(adapter, callback)  # the key may have been stored with its answer lost: free it for the retry
        response = _error(request, 503, "the callback could not be verified now; retry later")
        response.headers["Retry-After"] = "5"
        return response

    from core.provider_events import handle_provider_event  # core imports providers' callers, not the reverse

    try:
        outcome = await handle_provider_event(rt, event)
    except ProviderError as exc:
        # An unsigned callback could not be confirmed by a status query (provider unreachable): nothing
        # was recorded, so the provider must send it again. 503 tells it to, where a 500 says we broke.
        # (A provider that never resends, M-Pesa, has its callback kept for the poll instead and gets its 200:
        # core.provider_events._unconfirmed.)
        log.warning("provider callback not confirmed; asked to retry",
                    extra={"provider": name, "event_id": event.event_id, "error": str(exc)})
        await _release(adapter, callback)
        return _error(request, 503, "the callback could not be confirmed with the provider; retry later")
    except Exception as exc:
        # Our side failed (database down): nothing was stored, so the provider's retry must get through.
        log.error("provider callback not processed; asked to retry",
                  extra={"provider": name, "event_id": event.event_id, "error": type(exc).__name__},
                  exc_info=not isinstance(exc, (OSError, DBAPIError, PoolTimeout)))
        await _release(adapter, callback)
        return _error(request, 503, "the callback could not be processed now; retry later")
    log.info("provider callback handled", extra={"provider": name, "event_id": event.event_id,
                                                 "outcome": event.outcome.value, "result": outcome})
    return web.json_response(_ACKS.get(name, {"status": "accepted", "result": outcome}))


async def _release(adapter: object, callback: InboundCallback) -> None:
    release = getattr(adapter, "release_callback", None)
    if release is None:
        return
    try:
        await release(callback)
    except Exception:  # Redis down too: the one-time key expires by itself
        log.warning("could not release the callback's one-time key", exc_info=True)


TEST_PATH = "/webhooks/payments/test"
_TEST_OUTCOMES = {"COMPLETED": ProviderOutcome.SUCCEEDED, "SUCCESSFUL": ProviderOutcome.SUCCEEDED,
                  "FAILED": ProviderOutcome.FAILED, "CANCELLED": ProviderOutcome.CANCELLED,
                  "TIMEOUT": ProviderOutcome.EXPIRED, "EXPIRED": ProviderOutcome.EXPIRED}


async def test_callback(request: web.Request) -> web.Response:
    """Seed 001's development webhook (`POST /webhooks/payments/test`): moves a payment as its provider's
    callback would, for trying an integration without a provider. Mounted only with the in-process simulators
    and never in production: it trusts its caller.

    `{"gatewayReference", "status": COMPLETED|FAILED|CANCELLED|TIMEOUT, "gatewayTransactionId"?,
    "failureReason"?, "gatewayData": {"amount"?}}`; gatewayReference is the payment's (GET /v1/payments/{id})."""
    from core.provider_events import apply_collection_outcome  # core imports providers' callers, not the reverse

    rt = request.config_dict[RUNTIME]
    limited = await _rate_limited(request, rt)
    if limited is not None:
        return limited
    body = await _read_body(request)
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return _error(request, 400, "body must be a JSON object")
    reference, status = data.get("gatewayReference"), data.get("status")
    if not isinstance(reference, str) or not reference:
        return _error(request, 400, "gatewayReference is required: the payment's, as GET /v1/payments/{id} shows")
    if status not in _TEST_OUTCOMES:
        return _error(request, 400, f"status must be one of {', '.join(_TEST_OUTCOMES)}")
    txn, reason = data.get("gatewayTransactionId"), data.get("failureReason")
    given = data.get("gatewayData")
    extra: dict[str, Any] = given if isinstance(given, dict) else {}
    if (txn is not None and not isinstance(txn, str)) or (reason is not None and not isinstance(reason, str)):
        return _error(request, 400, "gatewayTransactionId and failureReason must be strings")
    async with rt.sessionmaker.begin() as session:
        found = (await session.execute(select(Payment.id).where(
            or_(Payment.provider_reference == reference, Payment.gateway_reference == reference)))).scalar()
        payment = await lock_row(session, Payment, found) if found is not None else None
        if payment is None:
            return _error(request, 404, "no payment has this gatewayReference")
        if not _simulated(request.config_dict[SETTINGS], payment.provider):
            # A development install may point a provider at the real one: its payments move only on its word.
            return _error(request, 403, f"the test webhook moves only payments of providers served by the "
                                        f"in-process simulators; {payment.provider} is not")
        try:
            amount = (Money.parse(extra["amount"], payment.currency)
                      if extra.get("amount") is not None else None)
        except (MoneyError, TypeError):
            return _error(request, 400, f"gatewayData.amount must be an amount in {payment.currency}")
        result = await apply_collection_outcome(
            session, rt, payment, _TEST_OUTCOMES[status], actor=Actor("provider:test", "provider"),
            amount=amount, provider_transaction_id=txn[:128] if txn else None, reason=reason[:200] if reason else None)
    log.info("test webhook applied", extra={"payment_id": payment.id, "status": status, "result": result})
    return web.json_response({"status": "accepted", "result": result})


def _simulated(settings: Settings, provider: str) -> bool:
    """Whether a provider is the in-process simulator (its base URL is this service's /_sim/<name>)."""
    config = settings.providers.get(provider)
    return config is not None and config.base_url.rstrip("/").endswith(f"/_sim/{provider}")


def setup(app: web.Application, *, test_webhook: bool = False) -> None:
    if test_webhook:  # before the provider route, which would take "test" for a provider's name
        app.router.add_post(TEST_PATH, test_callback)
    app.router.add_post(PATH, provider_callback)
    app.router.add_put(PATH, provider_callback)
