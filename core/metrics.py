"""Prometheus metrics: one registry per process, rendered at /metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, null, select

from core.db import utcnow
from core.ports import EventKind, ProviderOutcome

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from core.runtime import Runtime

REGISTRY = CollectorRegistry(auto_describe=True)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HTTP_REQUESTS = Counter("gateway_http_requests_total", "HTTP requests", ["route", "method", "status"],
                        registry=REGISTRY)
HTTP_LATENCY = Histogram("gateway_http_request_seconds", "HTTP request latency", ["route"], buckets=_FAST,
                         registry=REGISTRY)
USSD_HOPS = Counter("gateway_ussd_hops_total", "USSD hops", ["aggregator", "screen"], registry=REGISTRY)
USSD_HOP_LATENCY = Histogram("gateway_ussd_hop_seconds", "USSD hop latency", ["aggregator", "screen"],
                             buckets=_FAST, registry=REGISTRY)
# Overload (channels.ussd.routes): the hops one serve process is running, and those it answered "unavailable" at
# once because USSD_MAX_HOPS_IN_FLIGHT were already running (else they queue until the aggregator gives up).
USSD_HOPS_IN_FLIGHT = Gauge("gateway_ussd_hops_in_flight", "USSD hops this process is running now",
                            registry=REGISTRY)
USSD_HOPS_SHED = Counter("gateway_ussd_hops_shed_total", "USSD hops answered unavailable at once: the process "
                         "already ran USSD_MAX_HOPS_IN_FLIGHT", ["aggregator"], registry=REGISTRY)
USSD_SESSIONS = Counter("gateway_ussd_sessions_total", "USSD sessions by outcome", ["aggregator", "outcome"],
                        registry=REGISTRY)
PAYMENTS = Counter("gateway_payment_transitions_total", "Payment transitions by target status",
                   ["status", "method"], registry=REGISTRY)


@functools.lru_cache(maxsize=256)
def payment_moved(status: str, method: str) -> Counter:
    """PAYMENTS' series of one status and method, looked up once (labels() costs a lock and a lookup, about 3 us of
    an API payment's CPU). Statuses and methods are the gateway's own few: the cache never evicts."""
    return PAYMENTS.labels(status=status, method=method)

# One HTTP call to a provider (operation: the adapter's name for the endpoint, e.g. request_to_pay, token)...
PROVIDER_CALLS = Histogram("gateway_provider_call_seconds", "Provider HTTP call latency", ["provider", "operation"],
                           buckets=_FAST, registry=REGISTRY)
# ...and a job's whole operation (collect, status, refund, refund_status: its token, calls and retries together).
# Apart: under one name an MTN refund's HTTP call and its whole operation fell in the same series.
PROVIDER_OPERATIONS = Histogram("gateway_provider_operation_seconds",
                                "Provider operation latency, token and retries included", ["provider", "operation"],
                                buckets=_FAST, registry=REGISTRY)
PROVIDER_ERRORS = Counter("gateway_provider_errors_total", "Provider call errors", ["provider", "operation"],
                          registry=REGISTRY)
# A provider in an outage as this process sees it (providers.calls.FAILING_AFTER): 1 from the call that made its
# failures in a row (a 5xx, a timeout, no connection) that many, 0 again from the first call it answers. Per
# process (each worker and serve sees its own calls): alert on the max across them. Each process also records its
# view in Redis (providers.health), which the ops page shows across them.
PROVIDER_FAILING = Gauge("gateway_provider_failing", "1 while this process's calls to the provider keep failing "
                         "(a 5xx, a timeout or no connection, several in a row), 0 once one is answered",
                         ["provider"], registry=REGISTRY)
CALLBACK_REJECTED = Counter("gateway_callback_verification_failures_total", "Callbacks refused",
                            ["source"], registry=REGISTRY)
# A rotated-out secret still in use (core.auth.previous_secret_used): a token signed with one of JWT_PREVIOUS_SECRETS
# (name "jwt") or a callback carrying one of CALLBACK_SECRET_<NAME>_PREVIOUS (name: the callback's, e.g. mtn_momo), or
# signed with one of AIRTEL_CALLBACK_KEY_PREVIOUS or IREMBOPAY_SECRET_KEY_PREVIOUS (names "airtel_callback_key",
# "irembopay_secret_key"). Once it stops growing on every process, the previous secret can be removed (README).
# Labels: "jwt", the configured callback names and those two, a fixed set.
PREVIOUS_SECRET_USED = Counter("gateway_previous_secret_used_total", "Tokens and callbacks accepted with a previous "
                               "(rotated-out) secret, by name: jwt or the callback's", ["name"], registry=REGISTRY)
JOBS = Counter("gateway_outbox_jobs_total", "Outbox jobs run", ["kind", "outcome"], registry=REGISTRY)
JOB_LATENCY = Histogram("gateway_outbox_job_seconds", "Outbox job run time", ["kind"], buckets=_FAST,
                        registry=REGISTRY)
OUTBOX_DEPTH = Gauge("gateway_outbox_depth", "Outbox jobs by status (PENDING counts jobs scheduled for later too)",
                     ["status"], registry=REGISTRY)
# What a stuck worker shows (README "Metrics and alerts"): jobs due now and not taken, PENDING with run_at passed
# or RUNNING with a lapsed lease (a claim moves run_at to the lease's end), and how long the oldest has waited.
OUTBOX_DUE = Gauge("gateway_outbox_due_jobs", "Outbox jobs due and not taken: PENDING past run_at, RUNNING past "
                   "the lease (a worker lost)", ["status"], registry=REGISTRY)
OUTBOX_OLDEST_DUE = Gauge("gateway_outbox_oldest_due_seconds", "Seconds the oldest due outbox job has waited "
                          "(0 when none)", registry=REGISTRY)
OUTBOX_GAUGES_OK = Gauge("gateway_outbox_gauges_ok", "1 if the last scrape read the outbox (and open payment) "
                         "gauges from the database, 0 if it failed (they are then NaN)", registry=REGISTRY)
OUTBOX_GAUGE_FAILURES = Counter("gateway_outbox_gauge_refresh_failures_total",
                                "Scrapes that could not read the outbox gauges from the database", registry=REGISTRY)
# A payment stuck open (README "Metrics and alerts"): read with the outbox gauges at each scrape, one statement on
# the open payments (ix_payments_status_poll's status), so a payment left open past its approval window shows here
# even while the outbox looks healthy (its status poll waiting 30 minutes, told "unknown" each time).
PAYMENTS_OPEN = Gauge("gateway_payments_open", "Payments open (PENDING or PROCESSING), by provider", ["provider"],
                      registry=REGISTRY)
PAYMENTS_PAST_WINDOW = Gauge("gateway_payments_open_past_window", "Open payments whose approval window "
                             "(expires_at) is over, by provider", ["provider"], registry=REGISTRY)
PAYMENTS_PAST_WINDOW_OLDEST = Gauge("gateway_payments_open_past_window_oldest_seconds", "Seconds since the "
                                    "approval window of the open payment longest past it ended (0 when none)",
                                    registry=REGISTRY)
# Whether this process's Redis answered a PING at the last scrape: /readyz no longer fails on Redis alone (a serve
# keeps taking the API and provider callbacks without it), so this is what to alert on.
REDIS_UP = Gauge("gateway_redis_up", "1 if Redis answered PING at the last scrape, 0 if not", registry=REGISTRY)
# How Redis copes with a full memory, as this process last found it (core.auth.RedisWatch: every cycle of each
# serve's revocation guard and of each worker's Redis watch, ~5 s; /readyz too). A policy that evicts takes USSD
# sessions mid-menu, rate-limit counts and token revocation marks; a full Redis under noeviction refuses every write
# (each USSD hop answers "service unavailable"), while PING, and so gateway_redis_up, still says 1. Alert on
# max(gateway_redis_evicting) == 1, max(gateway_redis_writes_refused) == 1 and any increase of
# gateway_redis_evicted_keys_total. The gauges read NaN while Redis cannot be asked (gateway_redis_up says so).
REDIS_EVICTING = Gauge("gateway_redis_evicting", "1 if Redis has a memory limit and a maxmemory-policy other than "
                       "noeviction (it evicts keys when full), 0 if not, at the last check", registry=REGISTRY)
REDIS_WRITES_REFUSED = Gauge("gateway_redis_writes_refused", "1 if Redis refused a write for want of memory (OOM) "
                             "at the last check, 0 if it took it", registry=REGISTRY)
REDIS_EVICTED_KEYS = Counter("gateway_redis_evicted_keys_total", "Keys Redis evicted (INFO stats evicted_keys) "
                             "while this process watched it", registry=REGISTRY)
# PostgreSQL restored from a backup and `main.py advance-references` not run (core.reference_mark): the reference
# sequence behind the highest number it was seen at (kept in Redis, which the restore did not take back), so new
# payments and refunds are given references already on members' receipts. Set at every scrape (and at each payment
# sweep); NaN while the sequence or the mark cannot be read. Alert (page) on max(...) == 1.
REFERENCE_SEQUENCE_BEHIND = Gauge("gateway_reference_sequence_behind", "1 if the payment and refund reference "
                                  "sequence is behind its high-water mark (PostgreSQL restored without "
                                  "advance-references: references are handed out twice), 0 if not",
                                  registry=REGISTRY)
SMS = Counter("gateway_sms_total", "SMS messages by status", ["status"], registry=REGISTRY)
# A refund the provider contradicted after it was final, each flagged on its payment for a person (README).
REFUND_ANOMALIES = Counter("gateway_refund_anomalies_total", "Refunds flagged for a person: sent_after_failure, "
                           "failed_after_completion, beyond_collected (the member paid back more than collected, or "
                           "a chargeback recorded beyond what the refunds left: once per payment while its flag "
                           "is open), "
                           "amount_mismatch (the provider reported another amount sent back), "
                           "withdrawn_unsent (a refund not sent: an earlier one went through after all, or the "
                           "provider sent the money back itself)",
                           ["kind"], registry=REGISTRY)
# How far behind now the payment sync lists changes (a transaction writing payments holds it back; SYNC_LAG aside).
SYNC_HELD_BACK = Gauge("gateway_payment_sync_held_back_seconds", "Seconds the payment sync's horizon was held back "
                       "by the oldest transaction writing payments, at the last sync page served", registry=REGISTRY)
REMINDERS_SKIPPED = Counter("gateway_reminders_skipped_total", "Queued reminders not sent, by reason", ["reason"],
                            registry=REGISTRY)
# A provider callback about a payment or refund the gateway does not have (core.unmatched_callbacks.report_unmatched):
# with outcome SUCCEEDED money moved that nothing of ours records (PostgreSQL restored to an earlier point, say): kind
# "collection", a member's money taken with no payment to credit; kind "refund", money paid out of the
# cooperative's account with no refund to account for it. Alert on any increase; a person lists them with
# GET /v1/provider-callbacks?unmatched=true&resolved=false. Labels bounded: a configured provider's name, the
# callback's kind (collection, refund) and its ProviderOutcome (six values).
CALLBACKS_UNMATCHED = Counter("gateway_callbacks_unmatched_total", "Provider callbacks that matched no payment "
                              "(kind collection) or no refund (kind refund), by the outcome they report "
                              "(SUCCEEDED: money taken, or paid out)", ["provider", "kind", "outcome"],
                              registry=REGISTRY)

# The kinds of REFUND_ANOMALIES, each counted by core.refunds.
REFUND_ANOMALY_KINDS = ("sent_after_failure", "failed_after_completion", "beyond_collected", "amount_mismatch",
                        "withdrawn_unsent")


def expose_alert_series(providers: Iterable[str]) -> None:
    """Show at 0 the counters the README asks to alert on "any increase" of, before their first event.

    A labelled series is born at its first inc(): scraped at 1 with no sample before, increase() and rate() read no
    increase, so the alert on the first refund paid back beyond what was collected, or the first callback saying
    money was taken for no payment of ours (rare events: the first is often the only one of a process's life),
    never fired."""
    for kind in REFUND_ANOMALY_KINDS:
        REFUND_ANOMALIES.labels(kind=kind)
    for provider in providers:
        for event_kind in EventKind:
            CALLBACKS_UNMATCHED.labels(provider=provider, kind=event_kind.value,
                                       outcome=ProviderOutcome.SUCCEEDED.value)


def observe_job(kind: str, outcome: str, seconds: float) -> None:
    JOBS.labels(kind=kind, outcome=outcome).inc()
    JOB_LATENCY.labels(kind=kind).observe(seconds)


log = logging.getLogger("gateway.metrics")
_STATUSES = ("PENDING", "RUNNING", "PARKED")
_DUE_STATUSES = ("PENDING", "RUNNING")
REFRESH_TIMEOUT = 5.0  # seconds: a database that hangs must not hang the scrape past its own timeout
_WARN_EVERY = 60.0  # seconds between warnings while the refresh keeps failing (one a scrape is noise)
_last_warning = -math.inf
REDIS_PING_TIMEOUT = 1.0  # seconds: as the client's own socket timeout (app._connect_redis)
_providers_shown: set[str] = set()  # provider label values of the payment gauges (see _providers)


async def _read_outbox(session: AsyncSession) -> tuple[dict[str, int], dict[str, int], float]:
    """Depth by status, due jobs by status, and the oldest due job's age in seconds, in one statement.

    The WHERE names the live statuses (not `!= 'DONE'`), so the (status, run_at) index that the claim uses
    finds them without reading the DONE history; "due" is the claim's own test (core.outbox._claim), by the
    database's clock on PostgreSQL (workers measure run_at by it), by the local one on SQLite.
    """
    from core.models import OutboxJob

    postgres = session.get_bind().dialect.name == "postgresql"
    now = func.now() if postgres else utcnow()
    due = OutboxJob.run_at <= now
    rows = (await session.execute(
        select(OutboxJob.status, func.count(), func.count().filter(due), func.min(OutboxJob.run_at).filter(due),
               func.now() if postgres else null())
        .where(OutboxJob.status.in_(_STATUSES)).group_by(OutboxJob.status))).all()
    local_now = utcnow()
    depth: dict[str, int] = {}
    due_count: dict[str, int] = {}
    oldest = 0.0
    for status, count, due_n, first_due, db_now in rows:
        depth[status] = count
        if status in _DUE_STATUSES:
            due_count[status] = due_n
            if first_due is not None:
                oldest = max(oldest, ((db_now or local_now) - first_due).total_seconds())
    return depth, due_count, oldest


async def _read_open_payments(session: AsyncSession) -> tuple[dict[str, tuple[int, int]], float]:
    """Open payments by provider, (all, past their approval window), and how long ago the window of the one
    longest past it ended, in seconds: one statement. Its WHERE is the open statuses, the first column of
    ix_payments_status_poll: it reads the open payments only, never the year of settled ones. Past the window by
    the database's clock on PostgreSQL (expires_at is dated by it: core.db.align_clock)."""
    from core.models import Payment
    from core.state.payment import OPEN

    postgres = session.get_bind().dialect.name == "postgresql"
    past = Payment.expires_at < (func.now() if postgres else utcnow())
    rows = (await session.execute(
        select(Payment.provider, func.count(), func.count().filter(past), func.min(Payment.expires_at).filter(past),
               func.now() if postgres else null())
        .where(Payment.status.in_(sorted(status.value for status in OPEN))).group_by(Payment.provider))).all()
    local_now = utcnow()
    counts: dict[str, tuple[int, int]] = {}
    oldest = 0.0
    for provider, count, past_n, first_expired, db_now in rows:
        counts[provider] = (count, past_n)
        if first_expired is not None:
            oldest = max(oldest, ((db_now or local_now) - first_expired).total_seconds())
    return counts, oldest


async def _read_database(rt: Runtime) -> tuple[tuple[dict[str, int], dict[str, int], float],
                                               tuple[dict[str, tuple[int, int]], float]]:
    async with rt.sessionmaker() as session:
        return await _read_outbox(session), await _read_open_payments(session)


def _providers(rt: Runtime, read: dict[str, tuple[int, int]] | None = None) -> set[str]:
    """The provider label values to set: the configured providers, any with open payments, and any set before
    (so a provider's series goes back to 0, or NaN, rather than staying at its last figure)."""
    _providers_shown.update(getattr(rt, "providers", None) or ())
    _providers_shown.update(read or ())
    return set(_providers_shown)


# The refresh a process is running, by (runtime, event loop): scrapes that come while it runs wait for it and answer
# with its figures (one flight). Each scrape read the database on connections of its own, so a burst of scrapes
# (anyone who reaches the port while METRICS_TOKEN is unset) took every pooled connection, and USSD hops, provider
# callbacks and the API waiting for one were answered "unavailable". Nothing is kept once it ends: the next scrape
# reads again.
_refreshing: dict[tuple[int, int], asyncio.Future[None]] = {}


async def refresh_gauges(rt: Runtime) -> None:
    """Set the gauges read at each scrape: from the database (refresh_database_gauges), Redis's PING and the
    reference sequence against its mark (core.reference_mark), at once; a scrape that comes while another's
    refresh runs waits for that one (see _refreshing)."""
    key = (id(rt), id(asyncio.get_running_loop()))
    running = _refreshing.get(key)
    if running is None:
        running = asyncio.ensure_future(_refresh_gauges(rt))
        _refreshing[key] = running

        def done(finished: asyncio.Future[None]) -> None:
            if _refreshing.get(key) is finished:
                del _refreshing[key]

        running.add_done_callback(done)
    # Shielded: a scrape whose client went away does not cancel the refresh the others wait for.
    await asyncio.shield(running)


async def _refresh_gauges(rt: Runtime) -> None:
    from core.reference_mark import refresh_gauge as refresh_reference_gauge

    await asyncio.gather(refresh_database_gauges(rt), refresh_redis_gauge(rt), refresh_reference_gauge(rt))


async def refresh_redis_gauge(rt: Runtime) -> None:
    """gateway_redis_up: 1 when Redis answers a PING within REDIS_PING_TIMEOUT, else 0."""
    try:
        await asyncio.wait_for(rt.redis.ping(), timeout=REDIS_PING_TIMEOUT)
    except Exception:
        REDIS_UP.set(0)
    else:
        REDIS_UP.set(1)


async def refresh_database_gauges(rt: Runtime) -> None:
    """Set the outbox and open-payment gauges from the database. If it cannot be read, they are set to NaN (not
    left showing the last figures as current), gateway_outbox_gauges_ok to 0, and a warning is logged once a
    minute at most."""
    global _last_warning
    try:
        (depth, due, oldest), (payments, past_oldest) = await asyncio.wait_for(_read_database(rt),
                                                                              timeout=REFRESH_TIMEOUT)
    except Exception as exc:
        OUTBOX_GAUGES_OK.set(0)
        OUTBOX_GAUGE_FAILURES.inc()
        for status in _STATUSES:
            OUTBOX_DEPTH.labels(status=status).set(math.nan)
        for status in _DUE_STATUSES:
            OUTBOX_DUE.labels(status=status).set(math.nan)
        OUTBOX_OLDEST_DUE.set(math.nan)
        for provider in _providers(rt):
            PAYMENTS_OPEN.labels(provider=provider).set(math.nan)
            PAYMENTS_PAST_WINDOW.labels(provider=provider).set(math.nan)
        PAYMENTS_PAST_WINDOW_OLDEST.set(math.nan)
        if time.monotonic() - _last_warning >= _WARN_EVERY:
            _last_warning = time.monotonic()
            log.warning("outbox and payment gauges not refreshed: the database could not be read (%s: %s); they "
                        "read NaN and gateway_outbox_gauges_ok 0 until it can", type(exc).__name__, exc)
        return
    for status in _STATUSES:
        OUTBOX_DEPTH.labels(status=status).set(depth.get(status, 0))
    for status in _DUE_STATUSES:
        OUTBOX_DUE.labels(status=status).set(due.get(status, 0))
    OUTBOX_OLDEST_DUE.set(max(0.0, oldest))
    for provider in _providers(rt, payments):
        count, past = payments.get(provider, (0, 0))
        PAYMENTS_OPEN.labels(provider=provider).set(count)
        PAYMENTS_PAST_WINDOW.labels(provider=provider).set(past)
    PAYMENTS_PAST_WINDOW_OLDEST.set(max(0.0, past_oldest))
    OUTBOX_GAUGES_OK.set(1)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
