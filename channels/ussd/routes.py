"""HTTP routes of the USSD channel: callback authentication, a time budget per hop, a cap on hops in flight,
wire in and out."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl  # (here, not in the hop: urllib.parse's __getattr__ raised for __path__ each time)

from aiohttp import web

from channels.ussd import africastalking, hubtel, nalo, records
from channels.ussd.screens import build_engine
from channels.ussd.service import UssdService
from channels.ussd.types import (
    EXPECTED_OUTAGES,
    HOP_PROGRESS,
    HopProgress,
    HopUnsettled,
    OpeningUnwritten,
    UssdReply,
    UssdTurn,
)
from channels.ussd.wire import MalformedRequest, Parsed, Rendered
from core import metrics
from core.auth import callback_secret_ok
from core.inbound import JSON_ERRORS, UnreadableBody, client_address, read_capped
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
# Past the cap on hops in flight (USSD_MAX_HOPS_IN_FLIGHT), a warning at most this often says how many were shed.
SHED_WARN_EVERY = 60.0
# A hop answered unavailable or unsettled waits this long for its session row's close (ended_unanswered) before it
# answers; the close finishes in the background past it (a database away must not hold the answer). A shed hop
# does not wait: its close runs in the background.
CLOSE_WAIT_SECONDS = 0.5
# Such closes running at once, at most: past it (the database far behind, hops shed by the hundred) a session is
# not written, and counted or not as a close that failed is (UssdService._closed). Few: each waits for one of the
# pool's connections, ahead of the hops admitted after it, when the process is already past what it can serve.
MAX_PENDING_CLOSES = 8


class UssdChannel:
    def __init__(self, allowlist: tuple[str, ...], per_aggregator: Mapping[str, tuple[str, ...]] | None = None,
                 trusted_proxies: tuple[str, ...] = (), max_in_flight: int = 32,
                 budget: float = HOP_BUDGET_SECONDS) -> None:
        self.service = UssdService(build_engine())
        self.budget = budget
        self.grace = SIDE_EFFECT_GRACE_SECONDS
        # Hops running now, and how many may: one more is answered "unavailable" at once (see admit()).
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._shed_unwarned = 0
        self._shed_warned_at = -math.inf
        # The progress of each session's hop running here (finishing in the background included), by
        # (aggregator, session id): a copy of it that is shed is told "wait for the SMS" once a payment began.
        self._live: dict[tuple[str, str], HopProgress] = {}
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in allowlist]
        self.networks_by_aggregator = {name: [ipaddress.ip_network(e, strict=False) for e in entries]
                                       for name, entries in (per_aggregator or {}).items()}
        self.trusted_proxies = tuple(trusted_proxies)
        # Hops finishing their side effect after the aggregator was answered (asyncio keeps only weak
        # references to tasks: without this set one could be collected mid-way).
        self._finishing: dict[asyncio.Task[tuple[UssdReply, str]], tuple[tuple[str, str], HopProgress]] = {}
        # Rows of sessions ended unanswered being closed (end_unanswered).
        self._closing: set[asyncio.Task[None]] = set()

    def allowed_networks(self, aggregator: str) -> list[Any]:
        return self.networks_by_aggregator.get(aggregator, self.networks)

    def source_address(self, request: web.Request) -> Any:
        """The caller's address; behind our own trusted proxies, the nearest untrusted X-Forwarded-For hop."""
        return client_address(request, self.trusted_proxies)

    def admit(self) -> bool:
        """Take a place among the hops in flight; False when all are taken (the caller answers "unavailable").

        Past what the process can serve, hops admitted anyway share the event loop and each takes longer,
        while new requests wait unseen (accept backlog, parsing) until the aggregator gives up on them: at
        300 hops/s on 2 CPUs, 39% of members got no screen at all while every hop met its budget by the
        hop-time metric. A hop shed here costs its parsing only. (Hops finishing a payment in the background
        after their answer are not counted: they are few, and each is bounded by its grace.)
        """
        if self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def shed(self, rt: Any, turn: UssdTurn) -> UssdReply:
        """The answer to a hop not admitted. Nothing is read for it, and nothing written but its session's row
        closed (in the background, end_unanswered; not for an opening hop, which has none): no session, no
        payment, no Redis key (the language is this process's memory of the phone, as for any "unavailable"). The
        aggregator ends the session; the session saved by the hop before stays as it was, and so does its
        resume route, which the member's next dial offers (a confirmation resumed keeps its reserved
        reference: a payment already made with it is shown, not made again). Only when a hop of this session
        that began a payment is still running here is the answer "wait for the SMS" instead."""
        self._shed_unwarned += 1
        now = time.monotonic()
        if now - self._shed_warned_at >= SHED_WARN_EVERY:
            log.warning("ussd hops answered unavailable: %d hops already in flight (USSD_MAX_HOPS_IN_FLIGHT)",
                        self.max_in_flight, extra={"shed": self._shed_unwarned})
            self._shed_warned_at, self._shed_unwarned = now, 0
        running = self._live.get((turn.aggregator, turn.session_id))
        if running is not None and running.side_effects:
            return self.service.unsettled(rt, turn)
        return self.service.unavailable(rt, turn)

    def running(self, turn: UssdTurn) -> bool:
        """Whether a hop of this session runs here now (finishing in the background included)."""
        return (turn.aggregator, turn.session_id) in self._live

    async def end_unanswered(self, rt: Any, turn: UssdTurn, outcome: str, wait: float, *,
                             unwritten: bool = False, kept: Callable[[], Awaitable[None]] | None = None) -> None:
        """Close the row of a session this hop ends without its own answer (busy, unavailable, unsettled) and count
        it (UssdService.ended_unanswered), waiting for that at most `wait` seconds; the rest runs in the
        background, bounded by MAX_PENDING_CLOSES. `unwritten`: the hop could not write the session's row
        (types.OpeningUnwritten): a close not done counts it, as on Africa's Talking (the sweep has no row to count).
        `kept`: its session goes on from another copy's answer (OpeningUnwritten.kept): its row is written, not closed,
        and counted only if that write fails (by the close itself, not here on Africa's Talking: her session's own
        end counts it)."""
        if len(self._closing) >= MAX_PENDING_CLOSES:
            if turn.aggregator == africastalking.NAME or unwritten:  # as _closed judges a write that failed
                metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome=outcome).inc()
            return
        counted_here = False
        task = asyncio.create_task(self.service.ended_unanswered(rt, turn, outcome, lambda: counted_here,
                                                                 unwritten=unwritten, kept=kept))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if wait > 0:
            await asyncio.wait({task}, timeout=wait)
        if turn.aggregator == africastalking.NAME and kept is None and not task.done():
            # Africa's Talking's Success notice of this END counts nothing and may close the row before this close
            # does (it runs on): the session is counted here, now, and the close counts nothing.
            counted_here = True
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome=outcome).inc()

    async def settled(self, within: float = 5.0) -> None:
        """Wait for the background closes of rows (end_unanswered): at shutdown, before the database goes."""
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=within)

    async def run_hop(self, rt: Any, turn: UssdTurn, limit: int, started: float | None = None
                      ) -> tuple[UssdReply, str]:
        """The hop within its budget, counted from `started` (time.perf_counter() when the request reached its
        handler) if given; a hop that has begun a side effect is never cut mid-way."""
        progress = HopProgress()
        key = (turn.aggregator, turn.session_id)
        token = HOP_PROGRESS.set(progress)
        try:
            task = asyncio.create_task(self.service.handle(rt, turn, limit))
        finally:
            HOP_PROGRESS.reset(token)
        self._live[key] = progress
        finishing = False
        try:
            budget = self.budget if started is None else max(0.0, started + self.budget - time.perf_counter())
            done = await _finished_within(task, budget)
            if not done and progress.side_effects:
                done = await _finished_within(task, self.grace)
            if done:
                try:
                    return task.result()
                except Exception as exc:
                    if progress.side_effects:
                        raise HopUnsettled(f"hop failed after its side effect began: {type(exc).__name__}") from exc
                    raise
            if progress.side_effects:
                # Let it commit and save the session's answer; the aggregator's retry will be served it.
                self._finishing[task] = (key, progress)
                task.add_done_callback(self._finished)
                finishing = True
                raise HopUnsettled("hop still finishing its side effect")
            task.cancel()
            if progress.unwritten:
                # Cut off before its session's row was known written: counted as an opening hop without its row
                # (its close failing too, there is most likely no row for Hubtel's and Nalo's sweep to count).
                raise OpeningUnwritten("session row not written: hop over budget") from TimeoutError("hop over budget")
            raise TimeoutError("hop over budget")
        finally:
            if not finishing:
                self._forget(key, progress)

    def _forget(self, key: tuple[str, str], progress: HopProgress) -> None:
        if self._live.get(key) is progress:  # (not a later hop of the same session's)
            del self._live[key]

    def _finished(self, task: asyncio.Task[tuple[UssdReply, str]]) -> None:
        key, progress = self._finishing.pop(task)
        self._forget(key, progress)
        if not task.cancelled() and task.exception() is not None:
            log.warning("ussd hop finished in the background with an error",
                        extra={"error": type(task.exception()).__name__})


async def _finished_within(task: asyncio.Task[Any], seconds: float) -> bool:
    """Whether `task` finished within `seconds`; the task is left running either way. asyncio.wait({task},
    timeout=...) with less: no sets, no counter, one callback (a hop waits on its task once or twice)."""
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake)
    task.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
    return task.done()


USSD = web.AppKey("ussd_channel", UssdChannel)


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[USSD] = UssdChannel(settings.ussd_ip_allowlist, settings.ussd_ip_allowlists, settings.trusted_proxies,
                            max_in_flight=settings.ussd_max_hops_in_flight, budget=settings.ussd_hop_budget_seconds)
    # Read at each scrape, not moved per hop (a gauge's inc and dec cost a lock each); the process's one app
    # (in tests the latest), not kept alive by the gauge.
    channel = weakref.ref(app[USSD])
    metrics.USSD_HOPS_IN_FLIGHT.set_function(lambda: float(c.in_flight) if (c := channel()) is not None else 0.0)
    missing = [name for name in AGGREGATORS if not settings.callback_secrets.get(name)]
    if missing:
        log.warning("USSD callbacks accepted without a URL secret; set CALLBACK_SECRET_<AGGREGATOR>",
                    extra={"aggregators": ",".join(missing)})
    for name in AGGREGATORS:
        app.router.add_post(f"/ussd/{name}", _hop_handler(name))
    app.router.add_post("/ussd/africastalking/events", _events)
    app.on_shutdown.append(_settle)


async def _settle(app: web.Application) -> None:
    await app[USSD].settled()


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
    if not callback_secret_ok(settings, aggregator, request.query.get("secret", "")):
        log.warning("ussd callback refused: wrong or missing secret", extra={"aggregator": aggregator})
        return False
    return True


def _respond(rendered: Rendered) -> web.Response:
    return web.Response(status=rendered.status, body=rendered.body,
                        headers={"Content-Type": f"{rendered.content_type}; charset=utf-8"})


async def _read(request: web.Request, aggregator: str) -> Any:
    try:
        raw = await read_capped(request, MAX_BODY)
    except UnreadableBody as exc:  # Content-Encoding its bytes do not follow (logged as the sender's mistake)
        raise MalformedRequest(exc.text or "the request body could not be read") from None
    if raw is None:
        raise MalformedRequest("body too large")
    if aggregator == africastalking.NAME:
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise MalformedRequest("body is not UTF-8") from None
    try:
        return json.loads(raw)
    except JSON_ERRORS:
        raise MalformedRequest("body is not JSON") from None


@functools.cache  # screen ids are a fixed set (the engine's screens, plus retry/closed/unavailable/busy)
def _hop_metrics(aggregator: str, screen: str) -> tuple[Any, Any]:
    """The hop counter and latency series of this screen; labels() costs a lock and a lookup per call."""
    return (metrics.USSD_HOPS.labels(aggregator=aggregator, screen=screen),
            metrics.USSD_HOP_LATENCY.labels(aggregator=aggregator, screen=screen))


@functools.cache
def _shed_metric(aggregator: str) -> Any:
    """The shed counter of this aggregator."""
    return metrics.USSD_HOPS_SHED.labels(aggregator=aggregator)


async def _run_hop(channel: UssdChannel, rt: Any, turn: UssdTurn, limit: int, started: float
                   ) -> tuple[UssdReply, str]:
    """An admitted hop's answer and screen id, "unsettled" or "unavailable" when it did not finish well."""
    aggregator = turn.aggregator
    try:
        return await channel.run_hop(rt, turn, limit, started)
    except HopUnsettled as exc:
        # Not "try again": the payment may have gone through. The user is told to wait for the SMS.
        log.warning("ussd hop unsettled after its side effect; answering pending",
                    extra={"aggregator": aggregator, "session_id": turn.session_id,
                           "phone": turn.phone.masked(), "error": str(exc)},
                    exc_info=exc.__cause__ is not None
                    and not isinstance(exc.__cause__, EXPECTED_OUTAGES))
        await channel.end_unanswered(rt, turn, "unsettled", CLOSE_WAIT_SECONDS)
        return channel.service.unsettled(rt, turn), "unsettled"
    except Exception as exc:
        unwritten = isinstance(exc, OpeningUnwritten)
        cause = exc.__cause__ if unwritten and isinstance(exc.__cause__, Exception) else exc
        log.warning("ussd hop failed (%s); answering service unavailable", type(cause).__name__,
                    extra={"aggregator": aggregator, "session_id": turn.session_id,
                           "phone": turn.phone.masked(), "error": type(cause).__name__},
                    exc_info=not isinstance(cause, EXPECTED_OUTAGES))
        # An opening hop whose session row's write failed (OpeningUnwritten) is closed too: the write may have been
        # committed (its answer lost), and a row left OPEN was counted again by a Release or the sweep. A close
        # failing as well counts it (unwritten): most likely there is no row, and the sweep would count nothing.
        await channel.end_unanswered(rt, turn, "unavailable", CLOSE_WAIT_SECONDS, unwritten=unwritten,
                                     kept=exc.kept if isinstance(exc, OpeningUnwritten) else None)
        return channel.service.unavailable(rt, turn), "unavailable"


def _hop_handler(aggregator: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    module = AGGREGATORS[aggregator]

    async def handle(request: web.Request) -> web.Response:
        # The hop's budget and its latency count from here: the earliest this process can tell. (aiohttp keeps
        # no arrival time on the request; what waited before, in the accept backlog or for the event loop, the
        # cap on hops in flight keeps short.)
        started = time.perf_counter()
        if not _authorised(request, aggregator):
            metrics.CALLBACK_REJECTED.labels(source=f"ussd_{aggregator}").inc()
            raise web.HTTPForbidden(text="forbidden")
        rt = request.app[RUNTIME]
        channel = request.app[USSD]
        settings = request.app[SETTINGS]
        parsed: Parsed | None = None
        try:
            parsed = module.parse(await _read(request, aggregator), settings.service_code_for(aggregator))
        except africastalking.MalformedHop as exc:  # her number is known: the answer in her language
            log.warning("ussd callback malformed", extra={"aggregator": aggregator, "error": str(exc)})
            return _respond(africastalking.render_malformed(str(exc), channel.service.language_of(rt, exc.phone)))
        except MalformedRequest as exc:
            log.warning("ussd callback malformed", extra={"aggregator": aggregator, "error": str(exc)})
            return _respond(module.render_malformed(str(exc)))
        except Exception:  # an adapter bug must still give the aggregator a well-formed answer
            log.exception("ussd callback could not be parsed", extra={"aggregator": aggregator})
            return _respond(module.render_malformed("unreadable request"))
        turn = parsed.turn
        if channel.admit():
            try:
                reply, screen = await _run_hop(channel, rt, turn, module.LIMIT, started)
            finally:
                channel.release()
        else:
            reply, screen = channel.shed(rt, turn), "busy"
            _shed_metric(aggregator).inc()
            if turn.is_new and not channel.running(turn):
                # An opening hop shed has no row to close (nor a copy of it running here, which would write one):
                # counted, and nothing is read or written for it.
                metrics.USSD_SESSIONS.labels(aggregator=aggregator, outcome="busy").inc()
            else:
                await channel.end_unanswered(rt, turn, "busy", 0.0)
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
        closed_before = await asyncio.wait_for(records.record_event(rt, event), timeout=5.0)
    except Exception as exc:
        log.warning("ussd event not recorded", extra={"session_id": event.session_id,
                                                      "error": type(exc).__name__})
        return web.json_response({"error": "Service Unavailable"}, status=503)
    # Counted by the first close of its row (see service._closed): this notice's, unless the END hop, the sweep or
    # a copy of it came first. A Success never: it says our END ended the session, and the hop that answered it
    # counted it (completed, payment; or busy, unavailable, unsettled). An END hop's close runs before its END is
    # answered; a busy, unavailable or unsettled hop's may still be running when the notice comes, or have failed
    # (the row left OPEN, which this notice closes): such a hop on Africa's Talking counted the session itself
    # (UssdChannel.end_unanswered), its close counting nothing.
    if not closed_before and event.status != "Success":
        metrics.USSD_SESSIONS.labels(aggregator=africastalking.NAME, outcome=event.status.lower()).inc()
    log.info("ussd session ended", extra={"session_id": event.session_id, "phone": event.phone.masked(),
                                          "status": event.status, "hops": event.hops})
    return web.Response(text="OK")
