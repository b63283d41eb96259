"""HTTP routes of the USSD channel: callback authentication, a time budget per hop, wire in and out."""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from channels.ussd import africastalking, hubtel, nalo, records
from channels.ussd.screens import build_engine
from channels.ussd.service import UssdService
from channels.ussd.types import HOP_PROGRESS, HopProgress, HopUnsettled, UssdReply, UssdTurn
from channels.ussd.wire import MalformedRequest, Parsed, Rendered
from core import metrics
from core.inbound import client_address, read_capped
from core.runtime import RUNTIME, SETTINGS

log = logging.getLogger("gateway.ussd")

AGGREGATORS: dict[str, ModuleType] = {m.NAME: m for m in (africastalking, hubtel, nalo)}
# Well under the aggregators' 10-15 s limit, and near what the strictest operators allow (~2-3 s).
HOP_BUDGET_SECONDS = 3.0
MAX_BODY = 16 * 1024


# After a hop has started a payment (or another write the user must hear about) it may run this much
# longer, still inside the aggregators' 10 s; past that the user hears "unavailable" but the hop
# finishes in the background and a retry of the same hop gets its real answer.
SIDE_EFFECT_GRACE_SECONDS = 5.0
# Outages expected in production: logged without a traceback.
EXPECTED_OUTAGES: tuple[type[BaseException], ...] = (OSError, RedisError, DBAPIError)  # OSError: timeouts too


class UssdChannel:
    def __init__(self, allowlist: tuple[str, ...], per_aggregator: Mapping[str, tuple[str, ...]] | None = None,
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        self.service = UssdService(build_engine())
        self.budget = HOP_BUDGET_SECONDS
        self.grace = SIDE_EFFECT_GRACE_SECONDS
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in allowlist]
        self.networks_by_aggregator = {name: [ipaddress.ip_network(e, strict=False) for e in entries]
                                       for name, entries in (per_aggregator or {}).items()}
        self.trusted_proxies = tuple(trusted_proxies)
        # Hops finishing their side effect after the aggregator was answered (asyncio keeps only weak
        # references to tasks: without this set one could be collected mid-way).
        self._finishing: set[asyncio.Task[tuple[UssdReply, str]]] = set()

    def allowed_networks(self, aggregator: str) -> list[Any]:
        return self.networks_by_aggregator.get(aggregator, self.networks)

    def source_address(self, request: web.Request) -> Any:
        """The caller's address; behind our own trusted proxies, the nearest untrusted X-Forwarded-For hop."""
        return client_address(request, self.trusted_proxies)

    async def run_hop(self, rt: Any, turn: UssdTurn, limit: int) -> tuple[UssdReply, str]:
        """The hop within its budget; a hop that has begun a side effect is never cut mid-way."""
        progress = HopProgress()
        token = HOP_PROGRESS.set(progress)
        try:
            task = asyncio.create_task(self.service.handle(rt, turn, limit))
        finally:
            HOP_PROGRESS.reset(token)
        done, _ = await asyncio.wait({task}, timeout=self.budget)
        if not done and progress.side_effects:
            done, _ = await asyncio.wait({task}, timeout=self.grace)
        if done:
            try:
                return task.result()
            except Exception as exc:
                if progress.side_effects:
                    raise HopUnsettled(f"hop failed after its side effect began: {type(exc).__name__}") from exc
                raise
        if progress.side_effects:
            # Let it commit and save the session's answer; the aggregator's retry will be served it.
            self._finishing.add(task)
            task.add_done_callback(self._finished)
            raise HopUnsettled("hop still finishing its side effect")
        task.cancel()
        raise TimeoutError("hop over budget")

    def _finished(self, task: asyncio.Task[tuple[UssdReply, str]]) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("ussd hop finished in the background with an error",
                        extra={"error": type(task.exception()).__name__})


USSD = web.AppKey("ussd_channel", UssdChannel)


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[USSD] = UssdChannel(settings.ussd_ip_allowlist, settings.ussd_ip_allowlists, settings.trusted_proxies)
    missing = [name for name in AGGREGATORS if not settings.callback_secrets.get(name)]
    if missing:
        log.warning("USSD callbacks accepted without a URL secret; set CALLBACK_SECRET_<AGGREGATOR>",
                    extra={"aggregators": ",".join(missing)})
    for name in AGGREGATORS:
        app.router.add_post(f"/ussd/{name}", _hop_handler(name))
    app.router.add_post("/ussd/africastalking/events", _events)


def _authorised(request: web.Request, aggregator: str) -> bool:
    channel = request.app[USSD]
    settings = request.app[SETTINGS]
    networks = channel.allowed_networks(aggregator)
    if networks:
        source = channel.source_address(request)
        if source is None or not any(source in net for net in networks):
            log.warning("ussd callback refused: source address not allowed",
                        extra={"aggregator": aggregator, "remote": request.remote})
            return False
    secret = settings.callback_secrets.get(aggregator)
    if secret:
        given = request.query.get("secret", "")
        if not hmac.compare_digest(given.encode(), secret.get().encode()):
            log.warning("ussd callback refused: wrong or missing secret", extra={"aggregator": aggregator})
            return False
    return True


def _respond(rendered: Rendered) -> web.Response:
    return web.Response(status=rendered.status, body=rendered.body,
                        headers={"Content-Type": f"{rendered.content_type}; charset=utf-8"})


async def _read(request: web.Request, aggregator: str) -> Any:
    raw = await read_capped(request, MAX_BODY)
    if raw is None:
        raise MalformedRequest("body too large")
    if aggregator == africastalking.NAME:
        from urllib.parse import parse_qsl

        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise MalformedRequest("body is not UTF-8") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest("body is not JSON") from None


@functools.cache  # screen ids are a fixed set (the engine's screens, plus retry/closed/unavailable)
def _hop_metrics(aggregator: str, screen: str) -> tuple[Any, Any]:
    """The hop counter and latency series of this screen; labels() costs a lock and a lookup per call."""
    return (metrics.USSD_HOPS.labels(aggregator=aggregator, screen=screen),
            metrics.USSD_HOP_LATENCY.labels(aggregator=aggregator, screen=screen))


def _hop_handler(aggregator: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    module = AGGREGATORS[aggregator]

    async def handle(request: web.Request) -> web.Response:
        if not _authorised(request, aggregator):
            metrics.CALLBACK_REJECTED.labels(source=f"ussd_{aggregator}").inc()
            raise web.HTTPForbidden(text="forbidden")
        rt = request.app[RUNTIME]
        channel = request.app[USSD]
        settings = request.app[SETTINGS]
        started = time.perf_counter()
        parsed: Parsed | None = None
        try:
            parsed = module.parse(await _read(request, aggregator), settings.service_code_for(aggregator))
        except MalformedRequest as exc:
            log.warning("ussd callback malformed", extra={"aggregator": aggregator, "error": str(exc)})
            return _respond(module.render_malformed(str(exc)))
        except Exception:  # an adapter bug must still give the aggregator a well-formed answer
            log.exception("ussd callback could not be parsed", extra={"aggregator": aggregator})
            return _respond(module.render_malformed("unreadable request"))
        turn = parsed.turn
        screen = "unavailable"
        try:
            reply, screen = await channel.run_hop(rt, turn, module.LIMIT)
        except HopUnsettled as exc:
            # Not "try again": the payment may have gone through. The user is told to wait for the SMS.
            log.warning("ussd hop unsettled after its side effect; answering pending",
                        extra={"aggregator": aggregator, "session_id": turn.session_id,
                               "phone": turn.phone.masked(), "error": str(exc)},
                        exc_info=exc.__cause__ is not None
                        and not isinstance(exc.__cause__, EXPECTED_OUTAGES))
            reply = channel.service.unsettled(rt, turn)
            screen = "unsettled"
            metrics.USSD_SESSIONS.labels(aggregator=aggregator, outcome="unsettled").inc()
        except Exception as exc:
            log.warning("ussd hop failed; answering service unavailable",
                        extra={"aggregator": aggregator, "session_id": turn.session_id,
                               "phone": turn.phone.masked(), "error": type(exc).__name__},
                        exc_info=not isinstance(exc, EXPECTED_OUTAGES))
            reply = channel.service.unavailable(rt, turn)
            metrics.USSD_SESSIONS.labels(aggregator=aggregator, outcome="unavailable").inc()
        elapsed = time.perf_counter() - started
        hops, latency = _hop_metrics(aggregator, screen)
        hops.inc()
        latency.observe(elapsed)
        log.info("ussd hop", extra={"aggregator": aggregator, "session_id": turn.session_id,
                                    "phone": turn.phone.masked(), "screen": screen, "end": reply.end,
                                    "ms": round(elapsed * 1000, 1)})
        return _respond(module.render(reply, parsed))

    handle.__name__ = f"ussd_{aggregator}"
    return handle


async def _events(request: web.Request) -> web.Response:
    """Africa's Talking end-of-session notification, recorded on the session row."""
    if not _authorised(request, africastalking.NAME):
        metrics.CALLBACK_REJECTED.labels(source="ussd_africastalking_events").inc()
        raise web.HTTPForbidden(text="forbidden")
    rt = request.app[RUNTIME]
    try:
        fields = africastalking.parse_event(await _read(request, africastalking.NAME))
    except MalformedRequest as exc:
        log.warning("ussd event malformed", extra={"error": str(exc)})
        return web.json_response({"error": "Bad Request", "message": str(exc)}, status=400)
    event = records.SessionEvent(aggregator=africastalking.NAME, **fields)
    try:
        await asyncio.wait_for(records.record_event(rt, event), timeout=5.0)
    except Exception as exc:
        log.warning("ussd event not recorded", extra={"session_id": event.session_id,
                                                      "error": type(exc).__name__})
        return web.json_response({"error": "Service Unavailable"}, status=503)
    if event.status != "Success":
        metrics.USSD_SESSIONS.labels(aggregator=africastalking.NAME, outcome=event.status.lower()).inc()
    log.info("ussd session ended", extra={"session_id": event.session_id, "phone": event.phone.masked(),
                                          "status": event.status, "hops": event.hops})
    return web.Response(text="OK")
