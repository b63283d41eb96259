"""Transactional outbox: jobs written with the state change, run by workers claiming with SKIP LOCKED."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Float,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from core import pgraw
from core.db import autocommit, lock_row, row_insert, utcnow
from core.models import OutboxJob, Payment, Refund

log = logging.getLogger("gateway.outbox")


# A job a person ended for good while it was PARKED (discard_job): it never runs again (a replay is refused) and, as
# DONE, it is no work left: neither live (the gauges, the ops page) nor kept by prune past the DONE jobs' retention.
DISCARDED = "DISCARDED"
DISCARDED_BY = "discarded by an admin: "
# The statuses of a job that has ended (no worker or person will run it again), and of one that has not.
ENDED = ("DONE", DISCARDED)
LIVE = ("PENDING", "RUNNING", "PARKED")


def process_id() -> str:
    """A name for this process, unique per start (a restarted process on the same host and pid is another): a
    worker's id, and each process's key in the provider health record (providers.health)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{random.getrandbits(24):06x}"


class PermanentJobError(Exception):
    """A failure that retrying will not fix: the job is parked at once."""


class LeaseLost(Exception):
    """The job is no longer this worker's (its lease lapsed and another worker took it): do nothing more."""


class RetryLater(Exception):
    """Run the job again after `delay` seconds, its attempt given back (e.g. a payment still pending); `payload`: the
    job's payload from then on (a long job's progress, which its next run goes on from), unchanged when None.
    `failed`: this try failed (a webhook receiver answered 500, a status query failed), and the handler retries it
    this way rather than through the job's attempts (a webhook delivery is bounded by its three days): recorded on
    the job (after_failure), so it is listed and run now as any job waiting after a failed attempt (waiting). Not for
    a planned wait (still pending, a rate limit's pacing, another worker's lock, a long job's next batch): nothing
    was wrong, and running it sooner fixes nothing."""

    def __init__(self, delay: float, reason: str = "", payload: dict[str, Any] | None = None, *,
                 failed: bool = False) -> None:
        super().__init__(reason or f"retry in {delay:.0f}s")
        self.delay = delay
        self.payload = payload
        self.failed = failed


# How last_error starts when the worker cancelled a handler that ran past its time (see Job.interrupted).
INTERRUPTED = "handler interrupted"
# The last_error a claim gives a job it takes from a worker whose lease lapsed while the job was RUNNING (the
# worker was killed, ran out of memory or lost its host, or hangs): it wrote nothing, and its handler may
# have been waiting for the provider's answer, so this attempt is an interrupted one too (Job.interrupted).
WORKER_LOST = f"{INTERRUPTED}: worker lost while running (lease expired)"
# What a handler whose provider call must not be sent twice blind writes on its running job just before that
# call (call_starting). A job lost with its worker after this was written may have reached the provider.
CALL_STARTED = "provider call started; if this attempt is lost, the call may have arrived"
# How last_error starts once some try of a job may have reached its provider without the job being INTERRUPTED (so
# it is sent again as it was, under the same reference): an attempt failed after stamping its call (call_starting)
# with an error that has it sent again (a retryable ProviderError: a 5xx from a provider that deduplicates by our
# reference), other than a refusal of nothing processed (NOTHING_PROCESSED). Every later attempt's last_error keeps
# it (_doubt_kept): it speaks for the job's tries so far, not only its last (core.refunds.cancel_refund).
CALL_SENT = "provider call sent, may have arrived"
# How last_error starts once a try of a job may have reached its provider unanswered (Job.call_may_have_arrived: cut
# off, or its worker lost after the stamp) and a later try ended before it could ask (its first read failed, its
# write of "asked" was refused, a RetryLater): the doubt handed on as that try found it, so the next one asks too.
# Written as CALL_SENT (sent again as it was), it had the try after it send a second STK push or Airtel refund.
# It starts with CALL_SENT, so what reads that (core.refunds.cancel_refund) reads a try that may have arrived; not
# INTERRUPTED, so Job.interrupted (an SMS's "cut off mid-send") keeps meaning the previous try only.
CALL_IN_DOUBT = f"{CALL_SENT}, its outcome unknown (ask, never send it again)"
# The codes (core.ports.ProviderError.code) of a retryable failure that says the request was refused before the
# provider processed anything: a connection never made (providers.calls.send), a rate limit's HTTP 429
# (providers.calls.ProviderBusy). A stamped call that failed so is as one never sent. Anything else counts as
# arrived: a list of what is safe, so an error nobody thought of errs on the side of "may have arrived".
# AWAITING_CONFIGURATION: the provider refused the gateway's credentials (core.ports.CredentialsRefused). NOT_SENT:
# the request never left this process (core.ports.NOT_SENT: it could not be made).
NOTHING_PROCESSED = frozenset({"UNREACHABLE", "HTTP_429", "AWAITING_CONFIGURATION", "NOT_SENT"})
# What a claim leaves on a job it starts for the first time (no last_error yet): claimed, its provider call not
# started. Empty, so it reads as no error (and an older worker, which never wrote it, is never taken for one
# whose call had not started). Found still there on a job whose worker was lost, it says the lost attempt
# never reached the provider (Job.lost_before_call).
UNSTAMPED = ""
# The longest wait a failure's own retry_after (e.g. a provider's Retry-After) may impose.
MAX_RETRY_AFTER = 3600.0
# A claimed job with less of its handler time left than this is handed back rather than started.
MIN_HANDLER_SECONDS = 2.0
# PostgreSQL's undefined column and undefined table (SQLSTATE 42703, 42P01): the handler's code and the database's
# schema are of different releases (a deploy in progress: this worker is of the release before or after the
# schema's migrations). Not the job's failure: it is handed back, its attempt kept, for a worker whose code
# matches (see schema_mismatch), due again in SCHEMA_RETRY_SECONDS; the worker logs it at most once a
# SCHEMA_LOG_SECONDS.
SCHEMA_MISMATCH_STATES = frozenset({"42703", "42P01"})
SCHEMA_MISMATCH = "schema mismatch (a deploy in progress?): handed back for a worker of the matching release"
SCHEMA_RETRY_SECONDS = 30.0
# A job whose kind no worker has handled for this long is not waiting for a deploy to finish (a kind a newer
# release removed, or queued by mistake): parked, where a person sees it, rather than handed back for ever.
UNKNOWN_KIND_PARK_AFTER = timedelta(hours=6)
SCHEMA_LOG_SECONDS = 60.0


def raised_sqlstate(exc: BaseException, states: frozenset[str]) -> bool:
    """`exc` (or what it wraps: SQLAlchemy's .orig, the asyncpg error as its __cause__, a re-raise's
    __context__) is a PostgreSQL error whose SQLSTATE is one of `states`."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen or len(seen) > 20:
            continue
        seen.add(id(error))
        if getattr(error, "sqlstate", None) in states:
            return True
        orig = getattr(error, "orig", None)
        todo.extend((orig if isinstance(orig, BaseException) else None, error.__cause__, error.__context__))
    return False


def schema_mismatch(exc: BaseException) -> bool:
    """PostgreSQL's undefined column or undefined table: the code does not match the schema."""
    return raised_sqlstate(exc, SCHEMA_MISMATCH_STATES)


def handler_timeout(lease_seconds: float) -> float:
    """Seconds a handler may run before the worker cancels it: inside the lease, so no other worker
    claims the job while it still runs. The lease less 5 s (the margin to record its outcome); under a 10 s lease
    (OUTBOX_LEASE_SECONDS, tests and tight set-ups) half of it: 5 s there ran a handler to the lease's end, and
    past it under 5 s, while another worker took the job back."""
    return max(min(5.0, lease_seconds / 2), lease_seconds - 5)


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: datetime
    # The worker holding the lease (set by claim); lets a handler finish its job in its own last
    # transaction (finish_in). `finished` records that it did, so the worker skips its own UPDATE.
    locked_by: str | None = None
    finished: list[bool] = field(default_factory=list, compare=False, repr=False)
    # What the previous attempt left (set by claim): see `interrupted`.
    last_error: str | None = None
    # When it was claimed (time.monotonic()): its lease, and so its handler's time, runs from then.
    claimed: float = field(default_factory=time.monotonic, compare=False, repr=False)
    # Set by claim: the previous attempt's worker was lost (WORKER_LOST) before that attempt stamped a
    # provider call (call_starting) - it was claimed with no earlier error and had not called yet.
    lost_before_call: bool = False
    # This attempt stamped its provider call (call_starting): a failure after it may follow a request that arrived.
    call_started: list[bool] = field(default_factory=list, compare=False, repr=False)
    # Set by claim: the outside service the job's handler calls (_lane), whose share of a worker's slots it
    # counts against; None for a job that calls none the worker limits.
    lane: str | None = None
    # Set by claim: the row's (status, run_at, last_error, locked_by) before it, so a job the worker cannot start
    # within its lane's share is put back exactly as it was found (OutboxWorker._unclaim).
    before: tuple[str, datetime, str | None, str | None] | None = field(default=None, compare=False, repr=False)

    def mark_call_started(self) -> None:
        """Mark this attempt as one after which its provider may have the request, in memory only: should it fail
        from here on, run_job records it interrupted, and the next attempt asks instead of sending again
        (call_starting also stamps the row first; a handler whose call answered already needs no stamp)."""
        if not self.call_started:
            self.call_started.append(True)

    def time_left(self, lease_seconds: float) -> float:
        """Seconds its handler may still run: the handler timeout, less the time it waited for a slot."""
        return handler_timeout(lease_seconds) - (time.monotonic() - self.claimed)

    @property
    def interrupted(self) -> bool:
        """The previous attempt was cancelled mid-run (it ran past the handler timeout), or its worker was
        lost while running it (the lease lapsed with the job RUNNING: WORKER_LOST): whatever it was sending
        may have arrived. A handler whose call is not safe to repeat asks, not resends. (A stamp is only ever
        read as WORKER_LOST; were one ever handed on as it is, it would still mean interrupted.)"""
        return (self.last_error or "").startswith(INTERRUPTED) or self.last_error == CALL_STARTED

    @property
    def call_may_have_arrived(self) -> bool:
        """`interrupted`, for a handler that stamps its provider call (call_starting): an attempt lost before
        its stamp never called the provider, so its request is sent as on a first attempt. Any doubt (a
        stamp, a cut-off, a loss on a retry or by a worker that did not stamp) still counts as arrived, and so
        does one an earlier try handed on (CALL_IN_DOUBT): once a try may have reached the provider, every later
        try asks, whatever the tries in between met."""
        return ((self.interrupted and not self.lost_before_call)
                or (self.last_error or "").startswith(CALL_IN_DOUBT))

    @property
    def tried_before(self) -> bool:
        """An earlier try of this job may have sent its request (its handler then never ends what it was to send as
        "never sent"): this is not its first attempt, or an earlier try's CALL_SENT (a 5xx after its call) is on it.
        Not by its attempts alone: a replay of a parked job (replay_job) starts them again at 0, and its first claim
        read as a first try though the tries before it may have reached the provider (an MTN push answered 500 and
        parked, replayed after its member was suspended: CANCELLED "nothing was taken" while she could still approve
        it). Its last_error is what the replay and the claim keep."""
        return self.attempts > 1 or (self.last_error or "").startswith(CALL_SENT)


Handler = Callable[[Job], Awaitable[None]]
# What a kind says of its job parked by the worker rather than by its handler: cut off on its last attempt (the
# handler saw only a cancellation, and could not say what a person does). (the job, the worker's own last_error)
# -> the parked job's last_error.
ParkedHint = Callable[[Job, str], str]


@dataclass(frozen=True)
class Hinted:
    """A kind's handler with its ParkedHint: run_job parks its job cut off on its last attempt with what the hint
    says (a refund poll's "replay it, or record the outcome"), where another kind's says only INTERRUPTED."""

    handler: Handler
    hint: ParkedHint

    async def __call__(self, job: Job) -> None:
        await self.handler(job)


@dataclass(frozen=True)
class NewJob:
    """A job to add in the caller's transaction (see enqueue_many)."""

    kind: str
    payload: dict[str, Any]
    dedupe_key: str | None = None
    cooperative_id: str | None = None
    run_at: datetime | None = None
    max_attempts: int = 8

    COLUMNS = ("kind", "payload", "dedupe_key", "cooperative_id", "status", "attempts", "max_attempts", "run_at",
               "created_at", "updated_at")

    def row(self, now: datetime | None = None) -> dict[str, Any]:
        """The outbox row's values, in COLUMNS order."""
        now = now or utcnow()
        return {"kind": self.kind, "payload": self.payload, "dedupe_key": self.dedupe_key,
                "cooperative_id": self.cooperative_id, "status": "PENDING", "attempts": 0,
                "max_attempts": self.max_attempts, "run_at": self.run_at or now, "created_at": now,
                "updated_at": now}


async def enqueue(
    session: AsyncSession,
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    run_at: datetime | None = None,
    cooperative_id: str | None = None,
    max_attempts: int = 8,
) -> bool:
    """Add a job in the caller's transaction; False when a job with the same dedupe key already exists."""
    return await enqueue_job(session, NewJob(kind, payload, dedupe_key=dedupe_key, cooperative_id=cooperative_id,
                                             run_at=run_at, max_attempts=max_attempts))


async def enqueue_job(session: AsyncSession, job: NewJob) -> bool:
    """enqueue, for a job built beforehand (core.notify's sms_job and event_job)."""
    stmt = row_insert(session.get_bind().dialect.name, OutboxJob,
                      ignore_conflict=("dedupe_key",) if job.dedupe_key is not None else None)
    result = await session.execute(stmt, job.row())
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def enqueue_many(
    session: AsyncSession, jobs: list[NewJob], *, alongside: tuple[Any, dict[str, Any]] | None = None
) -> None:
    """Add several jobs in the caller's transaction in one round trip; a job whose dedupe key exists is
    skipped, as with enqueue.

    `alongside`: another write of the same transaction, (a Core UPDATE built once, its parameters). On
    PostgreSQL, inside an open transaction, it travels in the jobs' statement as a CTE (one INSERT of
    every row and the UPDATE: one round trip for both); elsewhere it runs just before them.
    """
    dialect = session.get_bind().dialect.name
    raw = (bool(jobs) and dialect == "postgresql" and all(job.dedupe_key is not None for job in jobs)
           and await pgraw.in_transaction(session))
    if not raw:
        if alongside is not None:
            await session.execute(*alongside)
        if not jobs:
            return
        if any(job.dedupe_key is None for job in jobs):
            for job in jobs:
                await enqueue_job(session, job)
        else:
            await session.execute(row_insert(dialect, OutboxJob, ignore_conflict=("dedupe_key",)),
                                  [job.row() for job in jobs])
        return
    start = 0
    for size in _insert_sizes(len(jobs)):
        params = job_params(jobs[start:start + size])
        if alongside is not None and start == 0:  # the other write goes with the first statement
            params.update(alongside[1])
        statement = _rows_insert(size, None if alongside is None or start else alongside[0])
        await pgraw.fetchrow(session, pgraw.compiled(statement), params)
        start += size


# Each row count gets an INSERT built and compiled once and kept for the process's life (_rows_insert, pgraw.compiled):
# about 3 KB a row, so a statement per count seen grew a process by hundreds of MB over the counts a resume of held
# webhook deliveries makes (core.webhooks: any number up to 500 a batch). Counts up to _ONE_STATEMENT go in one
# statement (a state change's few jobs: one round trip); larger ones in powers of two up to _LARGEST, then the rest.
_ONE_STATEMENT = 16
_LARGEST = 256


def _insert_sizes(count: int) -> list[int]:
    """The row counts of the INSERTs that write `count` jobs: one of 1 to _ONE_STATEMENT, or powers of two."""
    sizes = []
    while count > _ONE_STATEMENT:
        size = min(_LARGEST, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return [*sizes, count] if count else sizes


@functools.cache
def _rows_insert(count: int, alongside: Any | None) -> Any:
    """INSERT INTO outbox_jobs VALUES (row 0), (row 1), ... ON CONFLICT (dedupe_key) DO NOTHING, with the
    write `alongside` as a CTE; built once per row count (parameters r<i>_<column>)."""
    rows = [{c: bindparam(f"r{i}_{c}", type_=_TABLE.c[c].type) for c in NewJob.COLUMNS} for i in range(count)]
    stmt = postgresql.insert(_TABLE).values(rows).on_conflict_do_nothing(index_elements=["dedupe_key"])
    if alongside is not None:
        stmt = stmt.add_cte(alongside.cte("alongside"))
    return stmt


def backoff(attempt: int, *, base: float = 2.0, cap: float = 3600.0) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)), at least 1 s."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(1.0, random.uniform(ceiling / 2, ceiling))


# A worker whose claims fail (its database down or out of reach) waits CLAIM_RETRY_FIRST seconds, then twice as long
# after each failure in a row up to CLAIM_RETRY_MAX (reset by a claim that works); it logs the first failure with
# its traceback and then one line a CLAIM_LOG_SECONDS at most: a traceback every 2 s buried everything else.
CLAIM_RETRY_FIRST = 2.0
CLAIM_RETRY_MAX = 30.0
CLAIM_LOG_SECONDS = 60.0
# Claims failed in a row for a worker's /healthz to fail (OutboxWorker.health): with the backoff, about 6 s of them.
CLAIM_FAILURES_UNHEALTHY = 3


@dataclass
class ClaimTrouble:
    """A worker's claims failing in a row: how long to wait before the next, and what to log."""

    failures: int = 0  # in a row
    unlogged: int = 0  # since the last line
    since: float = 0.0  # time.monotonic() of the first
    logged: float = 0.0  # ...and of the last line
    error: str = ""  # the last one's exception's type

    def failed(self, exc: Exception) -> float:
        """Count (and log, at most once a CLAIM_LOG_SECONDS) a failed claim; seconds to wait before the next."""
        now = time.monotonic()
        self.failures += 1
        self.error = type(exc).__name__
        self.unlogged += 1
        if self.failures == 1:
            self.since = self.logged = now
            self.unlogged = 0
            log.error("claiming jobs failed; backing off", exc_info=exc,
                      extra={"retry_in_s": CLAIM_RETRY_FIRST})
        elif now - self.logged >= CLAIM_LOG_SECONDS:
            log.error("claiming jobs still fails", extra={
                "error": type(exc).__name__, "failures_since_last_line": self.unlogged,
                "failing_for_s": round(now - self.since), "retry_in_s": self.wait()})
            self.logged, self.unlogged = now, 0
        return self.wait()

    def wait(self) -> float:
        return min(CLAIM_RETRY_MAX, CLAIM_RETRY_FIRST * 2 ** min(self.failures - 1, 16))

    def succeeded(self) -> None:
        """A claim worked: after failures, say so once, and the next failure waits CLAIM_RETRY_FIRST again."""
        if self.failures:
            log.warning("claiming jobs works again", extra={
                "failures": self.failures, "failed_for_s": round(time.monotonic() - self.since)})
            self.failures = self.unlogged = 0


class OutboxWorker:
    """Claims due jobs in batches, runs the handler for each kind, retries, parks, and leases.

    A claimed job is marked RUNNING with run_at moved to the lease's end, so one index
    (status, run_at) finds both due jobs and jobs whose worker died mid-run.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        handlers: Mapping[str, Handler],
        *,
        batch_size: int = 50,
        lease_seconds: int = 60,
        concurrency: int = 16,
        idle_sleep: float = 0.2,
        worker_id: str | None = None,
        on_job: Callable[[str, str, float], None] | None = None,
        lane_share: float = 0.5,
    ) -> None:
        self._sm = sessionmaker
        self._handlers = dict(handlers)
        self._batch = batch_size
        self._lease = lease_seconds
        if concurrency < 1:
            raise ValueError("a worker needs a concurrency of at least 1")
        self._sem = asyncio.Semaphore(concurrency)
        # Slots: run_forever starts a job only with one of the semaphore's; _busy counts the ones taken (the
        # two change together, with no await between), so concurrency - _busy is what is free.
        self._concurrency, self._busy = concurrency, 0
        # The most slots the jobs of one lane (_lane: a payment provider) may hold at once:
        # a provider that hangs (each call waiting out its read timeout, and on rent day there are always more of
        # its jobs due) holds that many, and the rest of the slots keep every other provider's payments, the SMS
        # and the webhooks moving. Counted per worker; a job of a lane at its share is not claimed (_spared).
        if not 0 < lane_share <= 1:
            raise ValueError("a lane's share of the worker's slots is more than 0 and at most 1")
        self._share = max(1, int(concurrency * lane_share))
        self._lanes: Counter[str] = Counter()
        # Set when a lane's job ends: a worker that found only jobs of lanes at their share claims again then,
        # not after its idle sleep.
        self._lane_freed = asyncio.Event()
        self._idle = idle_sleep
        # Stored in locked_by (64 characters): a long host name (a Kubernetes pod, an FQDN) is cut so the id
        # still fits, keeping the pid and the random part that make it unique.
        self.worker_id = worker_id or process_id()
        self._on_job = on_job
        self._stopping = asyncio.Event()
        # Schema mismatches (schema_mismatch) handed back since the last log line, and when that was written.
        self._mismatches, self._mismatch_logged = 0, -SCHEMA_LOG_SECONDS
        self._claim_trouble = ClaimTrouble()
        # time.monotonic() of the loop's last sign of life: a claim that worked, or a job of its that ended (a worker
        # whose slots are all taken claims nothing until one does). Read by health.
        self._alive = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()

    def health(self, stale_after: float) -> str | None:
        """Why this worker's loop is not doing its work (its /healthz answers 503 with it), or None: its last
        CLAIM_FAILURES_UNHEALTHY claims or more failed, or no claim has come back for `stale_after` seconds."""
        trouble = self._claim_trouble
        if trouble.failures >= CLAIM_FAILURES_UNHEALTHY:
            return (f"{trouble.failures} claims failed in a row ({trouble.error}) for "
                    f"{round(time.monotonic() - trouble.since)} s")
        quiet = time.monotonic() - self._alive
        if quiet > stale_after:
            return f"no claim has succeeded for {round(quiet)} s (more than {stale_after:g} s)"
        return None

    async def claim(self, limit: int | None = None, *, sparing: Sequence[str] = (), key: str | None = None
                    ) -> list[Job]:
        """Lease up to `limit` (a batch) due jobs (PENDING, or RUNNING with a lapsed lease), oldest first, none of
        whose lane (_lane) is in `sparing`; with `key`, only the job of that dedupe key, if it is due (a job
        another worker holds is skipped, never waited for).

        A job taken back from a lapsed lease is marked WORKER_LOST (Job.interrupted) in the same statement;
        one whose lost attempt had not stamped its provider call is told so (Job.lost_before_call).
        On PostgreSQL the due time and the lease's end are read from the database's clock, so a worker
        whose own clock runs fast does not take jobs another worker is still running; SQLite (embedded, one
        process) uses the local clock.
        """
        batch = self._batch if limit is None else min(limit, self._batch)
        # The lanes to spare in byte order (Python's order of str), as _spared's ranges compare them.
        full = {f"full_{n}": lane for n, lane in enumerate(sorted(set(sparing)))}
        engine = self._engine()
        if engine.dialect.name == "postgresql":
            # One statement, atomic on its own, in autocommit (the BEGIN, SELECT, UPDATE and COMMIT were four round
            # trips). Without a lane to spare, the plain claim: it reads no lane but the claimed jobs'.
            params: dict[str, Any] = {"batch": batch, "worker": self.worker_id, "lease": float(self._lease), **full}
            if key is not None:
                params["key"] = key
            async with autocommit(engine) as conn:
                claimed = (await conn.execute(_claim(len(full), keyed=key is not None), params)).all()
            # (A last_error of WORKER_LOST whose row had UNSTAMPED before: the row was RUNNING, see _LAST_ERROR.)
            return [Job(r.id, r.kind, dict(r.payload), r.attempts, r.max_attempts, r.created_at,
                        locked_by=self.worker_id, last_error=_told(r.last_error),
                        lost_before_call=r.last_error == WORKER_LOST and r.last_error_before == UNSTAMPED,
                        lane=r.lane, before=(r.status_before, r.run_at_before, r.last_error_before,
                                             r.locked_by_before))
                    for r in sorted(claimed, key=lambda r: (r.run_at_before, r.id))]
        now = utcnow()
        where = and_(OutboxJob.status.in_(("PENDING", "RUNNING")), OutboxJob.run_at <= now)
        if key is not None:
            where = and_(where, OutboxJob.dedupe_key == key)
        async with self._sm.begin() as session:
            rows = (
                await session.execute(
                    select(OutboxJob, _lane(False).label("lane"))
                    .where(and_(where, _spared(len(full), False)) if full else where)
                    .order_by(OutboxJob.run_at)
                    .limit(batch)
                    .with_for_update(skip_locked=True),
                    full,
                )
            ).all()
            if not rows:
                return []
            ids = [r.id for r, _ in rows]
            # (The rows' state as found, before the UPDATE changes the instances.)
            before = {r.id: (r.status, r.run_at, r.last_error, r.locked_by) for r, _ in rows}
            # The due check again: the driver read the rows outside the write transaction (SQLite takes its write
            # lock at the UPDATE), so another claimer in this process (the worker, and a POST running its bank
            # payment's collect job: core.collect_now) may have leased one since; only what this UPDATE leased is
            # this claim's.
            leased = set((await session.execute(
                update(OutboxJob)
                .where(OutboxJob.id.in_(ids), OutboxJob.status.in_(("PENDING", "RUNNING")), OutboxJob.run_at <= now)
                .values(status="RUNNING", run_at=now + timedelta(seconds=self._lease), last_error=_LAST_ERROR,
                        locked_by=self.worker_id, attempts=OutboxJob.attempts + 1, updated_at=now)
                .returning(OutboxJob.id)
                .execution_options(synchronize_session=False)
            )).scalars())
            # (The rows were read before the UPDATE: their status is the one the claim found.)
            return [Job(r.id, r.kind, dict(r.payload), r.attempts + 1, r.max_attempts, r.created_at,
                        locked_by=self.worker_id,
                        last_error=WORKER_LOST if r.status == "RUNNING" else _told(r.last_error),
                        lost_before_call=r.status == "RUNNING" and r.last_error == UNSTAMPED,
                        lane=lane, before=before[r.id])
                    for r, lane in rows if r.id in leased]

    async def _claim_within_shares(self, free: int) -> list[Job]:
        """claim(free), sparing the lanes at their share; a job past its lane's share in this batch (the batch
        brought more of one lane than it had room for) is put back as it was (_unclaim), not started."""
        jobs = await self.claim(free, sparing=[lane for lane, n in self._lanes.items() if n >= self._share])
        room = Counter({lane: self._share - self._lanes[lane] for lane in {j.lane for j in jobs if j.lane}})
        keep: list[Job] = []
        over: list[Job] = []
        for job in jobs:
            if job.lane is None or room[job.lane] > 0:
                keep.append(job)
                if job.lane is not None:
                    room[job.lane] -= 1
            else:
                over.append(job)
        if over:
            try:
                await self._unclaim(over)
            except Exception:  # their leases bring them back; the jobs kept are this worker's to run
                log.warning("could not put back jobs past their lane's share", exc_info=True,
                            extra={"job_ids": [job.id for job in over]})
        return keep

    async def _unclaim(self, jobs: list[Job]) -> None:
        """Put claimed jobs back exactly as the claim found them (status, due time, last_error, holder; its
        attempt given back), in one round trip: for the worker they were never claimed, so they keep their place
        in the queue and a lapsed job's lost attempt is still read as it was."""
        now = utcnow()
        await self._execute(_FINISH, [
            {"status": status, "run_at": run_at, "last_error": last_error, "locked_by": locked_by,
             "attempts": job.attempts - 1, "updated_at": now, "b_id": job.id, "b_worker": self.worker_id}
            for job in jobs if job.before is not None
            for status, run_at, last_error, locked_by in [job.before]])

    async def _finish(self, job: Job, *, run_in: float | None = None, **values: Any) -> bool:
        """End this worker's run of `job` with `values`; `run_in`: due again that many seconds from now (the
        database's now on PostgreSQL, as the claim reads it). False, changing nothing, when the job is no longer
        this worker's (its lease lapsed while it ran, a worker stopped past it, and another worker claimed it):
        said once, at INFO, and its caller says nothing of this run's outcome ("job parked after retries" was
        logged for a job another worker then finished)."""
        values.setdefault("updated_at", utcnow())
        values.update(b_id=job.id, b_worker=self.worker_id)
        engine = self._engine()
        statement = _FINISH
        if run_in is not None:
            if engine.dialect.name == "postgresql":
                statement, values["b_delay"] = _FINISH_LATER, float(run_in)
            else:
                values["run_at"] = utcnow() + timedelta(seconds=run_in)
        # One UPDATE is its own transaction: run it in autocommit, as a Core statement built once per set of
        # columns.
        async with autocommit(engine) as conn:
            ours = (await conn.execute(statement, values)).rowcount != 0
        if not ours:
            log.info("job's lease lapsed while it ran and another worker has it: this run's outcome is dropped",
                     extra={"job_id": job.id, "kind": job.kind, **_subject(job), "status": values.get("status")})
        return ours

    async def _execute(self, statement: Any, values: Any) -> None:
        """One statement (or one statement with several rows of parameters) in autocommit, without the BEGIN and
        COMMIT round trips of a session transaction."""
        async with autocommit(self._engine()) as conn:
            await conn.execute(statement, values)

    def _engine(self) -> Any:
        engine = self._sm.kw.get("bind")
        if engine is None:
            raise RuntimeError("the outbox worker's sessionmaker has no engine bound")
        return engine

    async def run_job(self, job: Job) -> None:
        handler = self._handlers.get(job.kind)
        started = time.perf_counter()
        outcome = "done"
        limit = job.time_left(self._lease)
        if limit < MIN_HANDLER_SECONDS:
            # It waited for a slot until its lease is nearly out: started now, it could still be running when
            # another worker claims it again. Handed back, attempt and all, for a claim of its own.
            await self._give_back(job)
            return
        deadline = asyncio.timeout(limit)
        try:
            if handler is None:
                unknown = f"no handler for job kind {job.kind!r}"
                if utcnow() - job.created_at > UNKNOWN_KIND_PARK_AFTER:
                    # Not a deploy's window: no release running handles it. Parked, where a person sees it.
                    raise PermanentJobError(f"{unknown} after {UNKNOWN_KIND_PARK_AFTER}")
                # A kind of another release (a newer one queued it during a deploy): handed back as a schema
                # mismatch is, for a worker that has it, rather than parked.
                outcome = "later"
                await self._schema_mismatch(job, LookupError(unknown))
                return
            async with deadline:
                await handler(job)
        except asyncio.CancelledError:
            # Cancelled from outside (a serve process's shutdown cutting a job it ran for a waiting request,
            # core.collect_now): not done; left RUNNING for a worker to take back at the lease's end.
            outcome = "cancelled"
            raise
        except RetryLater as later:
            outcome = "later"
            # Its attempt given back (a wait, or a failure its handler bounds otherwise); whether this try failed
            # is written either way, so a planned wait after a failed one (one that used an attempt too) no longer
            # reads as waiting (is_waiting).
            progress = {} if later.payload is None else {"payload": later.payload}
            await self._finish(job, status="PENDING", locked_by=None, attempts=job.attempts - 1,
                               run_in=later.delay, last_error=_doubt_kept(job, str(later))[:2000],
                               after_failure=later.failed, **progress)
        except PermanentJobError as exc:
            outcome = "parked"
            if await self._finish(job, status="PARKED", locked_by=None, last_error=str(exc)[:2000]):
                log.error("job parked", extra={"job_id": job.id, "kind": job.kind, **_subject(job),
                                               "error": str(exc)})
        except Exception as exc:
            if schema_mismatch(exc):
                outcome = "later"
                await self._schema_mismatch(job, exc)
                return
            error = f"{type(exc).__name__}: {exc}"[:2000]
            cut_off = isinstance(exc, TimeoutError) and deadline.expired()
            if cut_off:
                # Cut off by us, not failed: the next attempt can tell (Job.interrupted).
                error = f"{INTERRUPTED}: still running after {limit:.0f}s and cancelled"
            elif job.call_started and getattr(exc, "retryable", None) is not True:
                # It failed after stamping its provider call (call_starting), and not with the provider's own
                # "send it again" (a retryable ProviderError): the request may have arrived (e.g. accepted,
                # then the database went away before the answer was written). The next attempt asks.
                error = f"{INTERRUPTED}: failed after its provider call started: {error}"[:2000]
            error = _doubt_kept(job, error, exc)[:2000]
            if job.attempts >= job.max_attempts:
                outcome = "parked"
                if cut_off and isinstance(handler, Hinted):  # its handler never saw why: its kind says what to do
                    error = handler.hint(job, error)[:2000]
                if await self._finish(job, status="PARKED", locked_by=None, last_error=error):
                    log.error("job parked after retries",
                              extra={"job_id": job.id, "kind": job.kind, **_subject(job), "attempts": job.attempts,
                                     "error": error})
            else:
                outcome = "retry"
                delay = backoff(job.attempts)
                asked = getattr(exc, "retry_after", None)  # e.g. a provider's Retry-After
                if isinstance(asked, int | float) and asked > delay:
                    delay = min(float(asked), MAX_RETRY_AFTER)
                # This try failed (after_failure), whatever an earlier one said: waiting, until a try plans its wait.
                if await self._finish(job, status="PENDING", locked_by=None, last_error=error, run_in=delay,
                                      after_failure=True):
                    log.warning("job failed, will retry",
                                extra={"job_id": job.id, "kind": job.kind, **_subject(job),
                                       "attempts": job.attempts, "delay_s": round(delay, 1), "error": error})
        else:
            if not job.finished:  # the handler did not mark it DONE in its own transaction
                await self._finish(job, **_done(utcnow()))
        finally:
            if self._on_job:
                self._on_job(job.kind, outcome, time.perf_counter() - started)

    async def _schema_mismatch(self, job: Job, exc: Exception) -> None:
        """`job`'s handler met a schema of another release (schema_mismatch), or this worker has no handler for its
        kind (queued by a newer release): due again in
        SCHEMA_RETRY_SECONDS with its attempt given back, so a deploy's window parks nothing; logged at most
        once a SCHEMA_LOG_SECONDS per worker. A doubt about its provider call (a stamped call, or an
        interrupted attempt before it) is kept for the next attempt (Job.interrupted)."""
        error = f"{SCHEMA_MISMATCH}: {type(exc).__name__}: {exc}"
        if job.call_started or job.interrupted:
            error = f"{INTERRUPTED}: {error}"
        error = _doubt_kept(job, error)
        self._mismatches += 1
        now = time.monotonic()
        if now - self._mismatch_logged >= SCHEMA_LOG_SECONDS:
            log.warning("job's code does not match the database schema or the job's kind (a deploy in "
                        "progress?); handed back without using an attempt, for a worker of the matching release",
                        extra={"job_id": job.id, "kind": job.kind, **_subject(job),
                               "jobs_handed_back": self._mismatches, "delay_s": SCHEMA_RETRY_SECONDS,
                               "error": f"{type(exc).__name__}: {exc}"[:500]})
            self._mismatches, self._mismatch_logged = 0, now
        await self._finish(job, status="PENDING", locked_by=None, attempts=job.attempts - 1,
                           run_in=SCHEMA_RETRY_SECONDS, last_error=error[:2000])

    async def _give_back(self, job: Job) -> None:
        """Hand back a claimed job this worker will not start (stopping, or its lease used up waiting for a slot):
        as the claim found it (_unclaim), so a job taken back from a lost worker is still read as one, and one
        lost before its provider call still as that (Job.lost_before_call: a collect then sends, where "the call
        may have arrived" would not, and M-Pesa's or IremboPay's payer would never be prompted)."""
        if job.before is not None:
            await self._unclaim([job])
            return
        await self._finish(job, status="PENDING", locked_by=None, attempts=job.attempts - 1, run_in=0)

    async def _guarded(self, job: Job) -> None:
        try:
            await self.run_job(job)
        except Exception:  # the database went away while finishing: the lease brings the job back
            log.exception("could not record job result", extra={"job_id": job.id, "kind": job.kind, **_subject(job)})
        finally:
            self._alive = time.monotonic()
            self._busy -= 1
            if job.lane is not None:
                self._lanes[job.lane] -= 1
                if not self._lanes[job.lane]:
                    del self._lanes[job.lane]
                self._lane_freed.set()
            self._sem.release()

    async def run_once(self) -> int:
        """Claim one batch and run it to completion; returns how many jobs ran."""
        jobs = await self.claim()
        await asyncio.gather(*(self.run_job(j) for j in jobs))
        return len(jobs)

    async def _free_slots(self) -> int:
        """Wait until at least one slot is free; how many are."""
        await self._sem.acquire()
        self._sem.release()
        return self._concurrency - self._busy

    async def run_forever(self) -> None:
        # Up to a batch is claimed at once (one statement), but never more jobs than there are free slots:
        # a busy worker does not hold jobs it cannot start while an idle one finds nothing. A claimed job's
        # lease runs from its claim, so its handler gets the lease less the time it waited (run_job; one
        # that waited too long is handed back), and a stop hands back the jobs not started yet. No lane holds
        # more than its share of the slots (_claim_within_shares): its jobs wait in the queue, unclaimed.
        tasks: set[asyncio.Task[None]] = set()
        while not self._stopping.is_set():
            free = await self._free_slots()
            if self._stopping.is_set():
                break
            self._lane_freed.clear()
            try:
                jobs = await self._claim_within_shares(free)
            except Exception as exc:
                await self._sleep(self._claim_trouble.failed(exc))
                continue
            self._claim_trouble.succeeded()
            self._alive = time.monotonic()
            for index, job in enumerate(jobs):
                await self._sem.acquire()
                if self._stopping.is_set():
                    self._sem.release()
                    await asyncio.gather(*(self._give_back(j) for j in jobs[index:]), return_exceptions=True)
                    break
                self._busy += 1
                if job.lane is not None:
                    self._lanes[job.lane] += 1
                task = asyncio.create_task(self._guarded(job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if not jobs:
                await self._sleep(self._idle, self._lane_freed if self._lanes else None)
        # Graceful stop: let running jobs finish (their lease covers a hard kill).
        if tasks:
            await asyncio.wait(tasks, timeout=self._lease)

    async def _sleep(self, seconds: float, or_until: asyncio.Event | None = None) -> None:
        """Wait `seconds`, or less if the worker stops or `or_until` is set."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self._stopping, or_until) if event is not None]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


_TABLE = cast(Table, OutboxJob.__table__)


async def db_now(session: AsyncSession) -> datetime:
    """Now by the clock leases and due times are measured by: PostgreSQL's now() (the transaction's start,
    one round trip), so workers whose clocks disagree still agree on it; SQLite (embedded, one process) has
    only the local clock, as the claim there uses."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    return (await session.execute(select(func.now()))).scalar_one()


def _db_now_plus(seconds: Any) -> Any:
    """The database's now() plus `seconds` (PostgreSQL): leases and due times by one clock for all workers."""
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, seconds)


# A claim's last_error: a job found RUNNING (its lease lapsed) was lost with its worker (see WORKER_LOST); one
# started for the first time is UNSTAMPED until its handler stamps a provider call. In an UPDATE's SET, status
# and last_error are still the row's before it.
_LAST_ERROR = case((_TABLE.c.status == "RUNNING", literal(WORKER_LOST)),
                   (_TABLE.c.last_error.is_(None), literal(UNSTAMPED)), else_=_TABLE.c.last_error)
# Lanes: the payment provider a job's handler waits on, so that one provider hanging holds no more than a share of a
# worker's slots (OutboxWorker's `lane_share`) and every other job still runs. A payment's or refund's jobs call
# the payment's provider (its name, as configured), which the database writes on the job's row as it is inserted
# (the `lane` column: migration 0020's trigger, whichever code or release inserts it; a payment's provider never
# changes). SMS, webhooks (each its own receiver), scans and sweeps have no lane: they are never held back. (SMS
# had one, the aggregator's: capped at half the slots, the benchmark's receipts ran at a third of their rate.)
PAYMENT_KINDS = ("payment.collect", "payment.poll")
REFUND_KINDS = ("refund.submit", "refund.poll")
LANE_KINDS = PAYMENT_KINDS + REFUND_KINDS


@functools.cache
def _lane_found(postgres: bool) -> Any:
    """The lane of a row written without one (inserted while triggers were off, or before its payment could be read),
    from its payment row (a refund's through its payment); NULL for a kind without a lane. On PostgreSQL migration
    0020's outbox_job_lane(kind, payload), which its trigger writes the column with: the planner prices a function
    as one call, where it priced the subquery as a read on every due row, planned the sparing claim as a scan of
    them all and JIT-compiled it (half a second a claim with 20,000 due). Elsewhere (SQLite) the same subquery."""
    kind = _TABLE.c.kind
    if postgres:
        return case((kind.in_(LANE_KINDS), func.outbox_job_lane(kind, _TABLE.c.payload, type_=String)),
                    else_=null())
    payments, refunds = cast(Table, Payment.__table__), cast(Table, Refund.__table__)
    of_payment = (select(payments.c.provider).where(payments.c.id == _TABLE.c.payload["payment_id"].as_string())
                  .correlate(_TABLE).scalar_subquery())
    of_refund = (select(payments.c.provider).select_from(refunds.join(payments, payments.c.id == refunds.c.payment_id))
                 .where(refunds.c.id == _TABLE.c.payload["refund_id"].as_string())
                 .correlate(_TABLE).scalar_subquery())
    return case((kind.in_(PAYMENT_KINDS), of_payment), (kind.in_(REFUND_KINDS), of_refund), else_=null())


@functools.cache
def _lane(postgres: bool) -> Any:
    """A job's lane as SQL on its outbox row: its `lane`, or for a row without one _lane_found."""
    return func.coalesce(_TABLE.c.lane, _lane_found(postgres))


def job_lane(postgres: bool) -> Any:
    """A job's lane (the payment provider it calls; NULL for a kind without one) as SQL on its outbox row."""
    return _lane(postgres)


@functools.cache
def _spared(count: int, postgres: bool) -> Any:
    """The jobs a claim sparing `count` lanes may take (the parameters full_0 < full_1 < ..., the lanes at their share,
    in byte order as the column compares): none of whose lane is one of them, so such a job is not claimed at all,
    holds no slot and no lease, and keeps its place and its attempts.

    Written as the ranges between the full lanes (lane < full_0, full_0 < lane < full_1, ..., lane > the last) and the
    jobs without a lane, each an index condition on ix_outbox_due_lane (lane, run_at): PostgreSQL reads the other
    lanes' due jobs and never a full lane's. (`lane NOT IN (...)` is no index condition: the claim read every due
    job of a full lane, thousands on rent day with a provider down, again at every claim.) A row of a lane kind
    left without its lane is held by the lane _lane_found reads for it."""
    lane = _TABLE.c.lane
    full = [bindparam(f"full_{n}", type_=String) for n in range(count)]
    ranges = [and_(*([] if low is None else [lane > low]), *([] if high is None else [lane < high]))
              for low, high in itertools.pairwise([None, *full, None])]
    unlaned = and_(lane.is_(None), or_(_TABLE.c.kind.not_in(LANE_KINDS),
                                       func.coalesce(_lane_found(postgres), "").not_in(full)))
    return or_(unlaned, *ranges)


@functools.cache
def _claim(spared: int, keyed: bool = False) -> Any:
    """The claim: WITH due AS (SELECT ... FOR UPDATE SKIP LOCKED) UPDATE ... FROM due RETURNING, one statement
    (PostgreSQL); `spared`: how many lanes it spares (_spared; none: the plain claim); `keyed`: only the job of
    the dedupe key `key` (its unique index)."""
    where = and_(_TABLE.c.status.in_(("PENDING", "RUNNING")), _TABLE.c.run_at <= func.now())
    if keyed:
        where = and_(where, _TABLE.c.dedupe_key == bindparam("key"))
    due = (select(_TABLE.c.id, _TABLE.c.status, _TABLE.c.run_at, _TABLE.c.last_error, _TABLE.c.locked_by)
           .where(and_(where, _spared(spared, True)) if spared else where)
           .order_by(_TABLE.c.run_at).limit(bindparam("batch")).with_for_update(skip_locked=True).cte("due"))
    # RETURNING shows the new row; the state it had before the lease (run_at for the order, last_error for
    # Job.lost_before_call, all of it for _unclaim) comes from the CTE.
    return (update(_TABLE).where(_TABLE.c.id == due.c.id)
            .values(status="RUNNING", run_at=_db_now_plus(bindparam("lease", type_=Float)),
                    locked_by=bindparam("worker"), attempts=_TABLE.c.attempts + 1, updated_at=func.now(),
                    last_error=_LAST_ERROR)
            .returning(_TABLE.c.id, _TABLE.c.kind, _TABLE.c.payload, _TABLE.c.attempts, _TABLE.c.max_attempts,
                       _TABLE.c.created_at, _TABLE.c.last_error, _lane(True).label("lane"),
                       due.c.status.label("status_before"), due.c.run_at.label("run_at_before"),
                       due.c.last_error.label("last_error_before"), due.c.locked_by.label("locked_by_before")))


# Only the lease holder may finish the job; a job re-claimed after a lapse belongs to another. Built once:
# the SET clause comes from the parameters' column names.
_FINISH = update(_TABLE).where(_TABLE.c.id == bindparam("b_id"), _TABLE.c.locked_by == bindparam("b_worker"),
                               _TABLE.c.status == "RUNNING")
# _FINISH for a job due again in b_delay seconds by the database's clock (PostgreSQL; see _finish).
_FINISH_LATER = _FINISH.values(run_at=_db_now_plus(bindparam("b_delay", type_=Float)))


def _doubt_kept(job: Job, error: str, exc: BaseException | None = None) -> str:
    """`error`, the last_error an attempt of `job` ends with, marked when a try of the job may have reached its
    provider and `error` does not already say so (INTERRUPTED): CALL_IN_DOUBT when this attempt was told a call
    may have arrived unanswered (Job.call_may_have_arrived), so the next one asks as this one was to; else
    CALL_SENT when this attempt stamped its call and failed other than with NOTHING_PROCESSED (`exc`), or an
    earlier try's CALL_SENT is carried on."""
    if error.startswith((INTERRUPTED, CALL_SENT)):
        return error
    if job.call_may_have_arrived:
        return f"{CALL_IN_DOUBT}: {error}"
    refused = getattr(exc, "retryable", None) is True and getattr(exc, "code", None) in NOTHING_PROCESSED
    if (job.call_started and not refused) or (job.last_error or "").startswith(CALL_SENT):
        return f"{CALL_SENT}: {error}"
    return error


def _told(last_error: str | None) -> str | None:
    """A claimed job's last_error as its handler reads it: the claim's own UNSTAMPED is no error."""
    return None if last_error == UNSTAMPED else last_error


async def call_starting(sessionmaker: async_sessionmaker[AsyncSession], job: Job) -> None:
    """Stamp `job` CALL_STARTED just before its handler sends the provider a request that must not be sent
    twice blind (an STK push, a refund): one UPDATE in autocommit, guarded by the lease as _FINISH is.

    Should the worker be lost after it, the claim that takes the job back treats the call as one that may
    have arrived; lost before it (e.g. PostgreSQL went away under the handler's first read), the job is
    told its call never started (Job.lost_before_call) and sends it. Raises LeaseLost, and the call is not
    made, when another worker has the job. A job run outside a worker (no lease) is only marked in memory.
    """
    if job.locked_by is not None:
        async with autocommit(sessionmaker.kw["bind"]) as conn:
            result = await conn.execute(_FINISH, {"last_error": CALL_STARTED, "b_id": job.id,
                                                  "b_worker": job.locked_by})
        if not result.rowcount:
            raise LeaseLost(f"job {job.id} is no longer held by {job.locked_by}; its provider call is not made")
    job.mark_call_started()


# What a job is about, so an operator can go from a payment (or a refund) to its jobs and back: in the job's log
# lines, its view (admin_api.jobs) and the list's paymentId/refundId filter. Only that opaque id is ever read out
# of a payload: never its encrypted phone numbers, message contexts otherwise, or webhook bodies.
# The id's payload key, by subject type...
SUBJECT_KEYS = {"payment": "payment_id", "refund": "refund_id"}
# ...the kinds whose payload holds it at the top...
OWN_SUBJECT = {"payment.collect": "payment", "payment.poll": "payment", "refund.submit": "refund",
               "refund.poll": "refund", "payment.contested": "payment", "payment.watch": "payment"}
# ...an SMS's in its message context (core.notify.sms_job: a receipt's {"payment_id"}, a refund's {"refund_id"})...
SMS_KIND = "sms.send"
# The job giving back a keyword reply's count (channels.sms.routes.GIVE_BACK_JOB); the route's names the number's blind
# index in its payload ("index"), which a member's erasure clears (core.members).
SMS_GIVE_BACK_KIND = "sms.give_back"
# ...and a webhook event's (and each of its deliveries') in its event id, as core.notify.notice_jobs makes it:
# evt_<type with "_">_<the entity's id>, or core.provider_events' evt_<type>_<payment id>_<16 hex> (a flag's, a
# review's, reported money's). The event job's id is the one made, never the stored digest; a delivery's is the
# stored one, a digest for those longer ids: its job carries the id under SUBJECT_KEYS (core.webhooks.fan_out).
WEBHOOK_KINDS = ("webhook.event", "webhook.deliver")
_EVENT_ID = re.compile(
    r"evt_(payment|refund)_[a-z_]+_([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:_[0-9a-f]{16})?")


def job_subject(kind: str, payload: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(type, id) of the payment or refund a job is about (see SUBJECT_KEYS), or None."""
    payload = payload or {}
    if kind in OWN_SUBJECT:
        value = payload.get(SUBJECT_KEYS[OWN_SUBJECT[kind]])
        return (OWN_SUBJECT[kind], value) if isinstance(value, str) and value else None
    if kind == SMS_KIND:
        context = payload.get("context")
        for subject, key in SUBJECT_KEYS.items():
            value = context.get(key) if isinstance(context, dict) else None
            if isinstance(value, str) and value:
                return subject, value
        return None
    if kind in WEBHOOK_KINDS:
        for subject, key in SUBJECT_KEYS.items():
            value = payload.get(key)
            if isinstance(value, str) and value:
                return subject, value
        event_id = payload.get("event_id")
        found = _EVENT_ID.fullmatch(event_id) if isinstance(event_id, str) else None
        return (found[1], found[2]) if found else None
    return None


def subject_filter(subject: str, subject_id: str) -> Any:
    """The WHERE of the jobs job_subject says are about (`subject`, `subject_id`): each kind's own JSON path.
    Not indexed: the caller bounds the rows it is tested on (admin_api.jobs: the jobs not DONE)."""
    key = SUBJECT_KEYS[subject]
    own = [kind for kind, of in OWN_SUBJECT.items() if of == subject]
    event = _TABLE.c.payload["event_id"].as_string()
    return or_(
        and_(_TABLE.c.kind.in_(own), _TABLE.c.payload[key].as_string() == subject_id),
        and_(_TABLE.c.kind == SMS_KIND, _TABLE.c.payload[("context", key)].as_string() == subject_id),
        and_(_TABLE.c.kind.in_(WEBHOOK_KINDS), event.startswith(f"evt_{subject}_", autoescape=True),
             or_(event.endswith(f"_{subject_id}", autoescape=True),
                 event.contains(f"_{subject_id}_", autoescape=True))),
        and_(_TABLE.c.kind.in_(WEBHOOK_KINDS), _TABLE.c.payload[key].as_string() == subject_id),
    )


def _subject(job: Job) -> dict[str, str]:
    """The job's subject for its log lines (job_subject), as payment_id or refund_id, so grepping a payment's id
    finds its jobs' lines (a receipt SMS's and its webhook's too)."""
    found = job_subject(job.kind, job.payload)
    return {SUBJECT_KEYS[found[0]]: found[1]} if found else {}


def _done(now: datetime) -> dict[str, Any]:
    """The columns _FINISH sets: the job DONE, its lease released, its last try not a failure (after_failure: a job
    that failed once and then succeeded no longer shows afterFailure, nor is waiting when it is queued again)."""
    return {"status": "DONE", "locked_by": None, "done_at": now, "last_error": None, "after_failure": False,
            "updated_at": now}


def finish_values(job: Job) -> dict[str, Any]:
    """The parameters of _FINISH (and of finished_after's CTE)."""
    return {**_done(utcnow()), "b_id": job.id, "b_worker": job.locked_by}


def finished_after(moved: Any) -> Any:
    """_FINISH as a CTE that runs only when the CTE `moved` returned a row: a handler's last write and
    its job's end in one statement (PostgreSQL; see core.state.machine.transition_alone)."""
    return (_FINISH.values({column: bindparam(column) for column in _done(utcnow())})  # _done's columns
            .where(exists(select(1).select_from(moved)))
            .returning(_TABLE.c.id).cte("job_ended"))


def queued_after(moved: Any, count: int) -> Any:
    """INSERT INTO outbox_jobs SELECT (row 0) FROM moved UNION ALL ... ON CONFLICT (dedupe_key) DO NOTHING,
    as a CTE: `count` jobs (parameters r<i>_<column>, NewJob.row's values) queued only when the CTE
    `moved` returned a row (see core.state.machine.transition's `jobs`)."""
    rows = [select(*(bindparam(f"r{i}_{c}", type_=_TABLE.c[c].type) for c in NewJob.COLUMNS)).select_from(moved)
            for i in range(count)]
    source = rows[0] if count == 1 else union_all(*rows)
    return (postgresql.insert(_TABLE).from_select(list(NewJob.COLUMNS), source)
            .on_conflict_do_nothing(index_elements=["dedupe_key"]).cte("queued"))


def job_params(jobs: list[NewJob], now: datetime | None = None) -> dict[str, Any]:
    """The parameters of _rows_insert and queued_after for `jobs`."""
    now = now or utcnow()
    return {f"r{i}_{column}": value for i, job in enumerate(jobs) for column, value in job.row(now).items()}


async def end_waiting(session: AsyncSession, *where: Any, status: str, reason: str) -> int:
    """End jobs that will not run now, in the caller's transaction: those matching `where` with `status`
    (PENDING: superseded before they ran; PARKED: settled by a person), marked DONE with `reason` as their
    last word. A RUNNING job is never touched (its worker finishes it). Returns how many ended."""
    now = utcnow()
    result = await session.execute(update(_TABLE).where(_TABLE.c.status == status, *where).values(
        status="DONE", locked_by=None, done_at=now, updated_at=now, last_error=reason[:2000]))
    return int(result.rowcount)  # type: ignore[attr-defined]


async def finish_in(session: AsyncSession, job: Job) -> bool:
    """Mark `job` DONE in the caller's transaction, as the worker would after a success; True when it was.

    For a handler whose last write ends the job: the job's end commits with it, which saves the worker's
    own finishing UPDATE. Only the lease holder finishes (the same WHERE as the worker's); a job not
    claimed by a worker (no lease) is left to the worker. After the caller has committed, it calls
    `finished(job)`; if the transaction rolls back, the worker finishes the job as usual.
    """
    if job.locked_by is None:
        return False
    result = await session.execute(_FINISH, finish_values(job))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def finish_unsent(conn: AsyncConnection, job: Job, reason: str) -> None:
    """End `job` DONE with `reason` as its last word, as end_waiting ends a job superseded before it ran: its handler
    found, at its turn, that what it was to send must not go out any more (a receipt for a payment voided since), so
    its row says why nothing was sent (GET /v1/jobs, lastError). Only the lease holder finishes it (finish_in's
    WHERE); a job not claimed by a worker is left to the worker, which ends it DONE without the reason."""
    if job.locked_by is None:
        return
    result = await conn.execute(_FINISH, {**finish_values(job), "last_error": reason[:2000]})
    if result.rowcount:
        finished(job)


async def finish_queueing(sessionmaker: async_sessionmaker[AsyncSession], job: Job, jobs: list[NewJob]) -> bool:
    """End `job` DONE (finish_in) and queue `jobs` with its end, in one commit, only if it ended; True when it did.
    For a handler whose last word is work for later that must happen if and only if the run is over (a reply not
    sent gives its count back: channels.sms.jobs): queued before the end, a run lost in between was run again and
    may decide otherwise; after it, a run lost in between never queued it. Only the lease holder ends its job, so a
    run whose lease lapsed queues nothing (the run holding it decides). A job not claimed by a worker (no lease) has
    `jobs` queued alone, and the worker ends it. Each job carries a dedupe key (one whose key exists is skipped). On
    PostgreSQL one statement in autocommit; elsewhere a short transaction."""
    if any(new.dedupe_key is None for new in jobs):
        raise ValueError("the jobs queued with a job's end carry dedupe keys")
    engine = sessionmaker.kw.get("bind")
    if job.locked_by is not None and engine is not None and engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            raw = await pgraw.fetchrow(conn, pgraw.compiled(_ended_and_queued(len(jobs))),
                                       {**finish_values(job), **job_params(jobs)})
        done = raw is not None and bool(raw["finished"])
    else:
        async with sessionmaker.begin() as session:
            done = await finish_in(session, job)
            if done or job.locked_by is None:
                await enqueue_many(session, jobs)
    if done:
        finished(job)
    return done


@functools.cache
def _ended_and_queued(count: int) -> Any:
    """WITH job_ended AS (_FINISH RETURNING id), queued AS (INSERT the `count` jobs FROM job_ended) SELECT whether
    it ended: finish_queueing's statement, built once per count."""
    ended = _FINISH.values({column: bindparam(column) for column in _done(utcnow())}).returning(
        _TABLE.c.id).cte("job_ended")
    statement = select(exists(select(ended.c.id)).label("finished")).add_cte(ended)
    return statement.add_cte(queued_after(ended, count)) if count else statement


def finished(job: Job) -> None:
    """The handler's transaction that ran finish_in committed: the worker need not finish the job."""
    job.finished.append(True)


async def queue_depth(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(OutboxJob.status, func.count()).where(
            OutboxJob.status.not_in(ENDED)).group_by(OutboxJob.status))
    return {status: count for status, count in rows.all()}


async def replay_job(session: AsyncSession, job_id: int) -> OutboxJob | None:
    """Put a PARKED job back in the queue with a fresh attempt budget; None when it is not parked.

    Handlers are idempotent, so running a parked job again can finish what it started but never
    does a side effect twice. Its last_error is kept: with its attempts back at 0, it is what tells the next try
    that an earlier one may have reached the provider (Job.call_may_have_arrived, Job.tried_before).
    """
    job = await lock_parked(session, job_id)
    if job is None:
        return None
    job.status, job.attempts, job.run_at, job.locked_by = "PENDING", 0, utcnow(), None
    job.after_failure = False  # a fresh start: its tries from now on say whether they failed
    return job


def waiting(now: datetime) -> ColumnElement[bool]:
    """The jobs waiting for their retry after a failed attempt (is_waiting), as a query's condition: by the
    (status, run_at) index."""
    return and_(OutboxJob.status == "PENDING", OutboxJob.run_at > now, OutboxJob.after_failure.is_(True))


def is_waiting(job: OutboxJob, now: datetime) -> bool:
    """Whether `job` is PENDING, not due before a later instant, after a try that failed (after_failure, which the
    worker writes at every retry): its backoff (up to an hour, or a failure's own retry_after: 30 minutes for an SMS
    the aggregator refused for our account), or a failure its handler retries with the attempt given back
    (RetryLater's `failed`: a webhook delivery's, up to 6 hours; a poll whose status query failed). Not a job never
    tried, nor one whose last try only planned its wait (queued for later on purpose: a poll's or a reminder scan's
    time; a refund's poll told "still pending" after a failed attempt, its attempts above 0), nor one claimed
    (RUNNING). (Its attempts are no sign: they count every failed attempt, not only the last try's.)"""
    return job.status == "PENDING" and bool(job.after_failure) and job.run_at > now


async def run_waiting_now(session: AsyncSession, job_id: int) -> tuple[OutboxJob, datetime] | None:
    """Make a job waiting for its retry (is_waiting) due now, its row locked (lock_row) as a replay's is: the job and
    when it was due. None, changing nothing, when it is not waiting (claimed since, finished, parked, or due already).
    Its cause fixed (an SMS API key corrected), its next try need not wait out the backoff. Its attempts so far are
    kept (not a fresh budget, as a replay of a parked job is), and so is its last error, which tells its next try
    whether its call may have arrived (Job.interrupted, CALL_SENT)."""
    job = await lock_row(session, OutboxJob, job_id)
    now = utcnow()
    if job is None or not is_waiting(job, now):
        return None
    due, job.run_at = job.run_at, now
    return job, due


async def lock_parked(session: AsyncSession, job_id: int) -> OutboxJob | None:
    """The job, its row locked (core.db.lock_row: FOR UPDATE, on SQLite the write lock first), while it is PARKED;
    None when it is not (or is gone). A replay and a discard of the same job take turns on the lock, and the second
    finds it no longer PARKED. (FOR UPDATE alone is nothing on SQLite: both read PARKED, and the later write won, a
    discarded job put back PENDING or a replayed one, claimed since, marked DISCARDED under its worker.)"""
    job = await lock_row(session, OutboxJob, job_id)
    return job if job is not None and job.status == "PARKED" else None


def mark_discarded(job: OutboxJob, reason: str) -> None:
    """End a PARKED job (locked by lock_parked) for good: a person has decided it is never to run again (a poison
    job, whose replay could only park again). It ends as a DONE job does (done_at, no lease; pruned as long after as
    a DONE one), under a status of its own so that it never reads as work done; its last_error keeps the error it
    parked with after the person's reason."""
    now = utcnow()
    said = f"{DISCARDED_BY}{reason}" + (f"; parked with: {job.last_error}" if job.last_error else "")
    job.status, job.locked_by, job.done_at, job.updated_at, job.last_error = DISCARDED, None, now, now, said[:2000]
