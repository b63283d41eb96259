"""The reference sequence's high-water mark: a PostgreSQL restore nobody followed with `main.py advance-references`
must not go unnoticed.

human_reference_seq numbers every payment's and refund's reference (core.references). A restore takes it back to
the restore point, and the numbers issued since (on members' receipts, their SMS and the cooperative's statements)
would be handed out again: two payments of one member with one reference, silently. Redis is not restored with
PostgreSQL, so it keeps the highest number the sequence was seen at (HIGH_WATER_KEY), raised by each payment sweep
(core.jobs), at each start of `serve` and `worker` and by `advance-references`, and lowered only by an operator's
explicit override. Never on a payment's path: the USSD END hop and POST /v1/payments pay no round trip for it.

The sequence behind the mark means the database went back: `serve` and `worker` refuse to start (check_at_start),
and a running process says so (ReferenceWatch: an ERROR once, gateway_reference_sequence_behind, /ops/data).
PostgreSQL only: SQLite numbers references per day, and an embedded install has no restore to recover from."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core import metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from core.runtime import Runtime

log = logging.getLogger("gateway.references")

# One key, read and written alone (the script names only KEYS[1]): on a Redis Cluster it lives on one shard as it is.
HIGH_WATER_KEY = "references:high-water"
# What an operator passes to `serve` or `worker` to start although the sequence is behind the mark (main.py).
ACCEPT_FLAG = "--accept-references-behind"
# Redis out of reach, or too slow to answer: the mark cannot be read or raised this time.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)
REDIS_WAIT_SECONDS = 2.0

# The highest number the sequence has handed out: last_value, unless setval(n, false) left n still to hand out.
ISSUED = text("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM human_reference_seq")
# Atomic max: the mark is set to ARGV[1] only when it is higher (or there is none); the mark after is returned.
_RAISE = """
local raw = redis.call('GET', KEYS[1])
local mark = tonumber(raw)
if mark == nil or tonumber(ARGV[1]) > mark then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return raw
"""


@dataclass(frozen=True)
class Position:
    """Where the sequence is (`issued`: the highest number it handed out) and the mark (None: Redis has none)."""

    issued: int
    mark: int | None

    @property
    def behind(self) -> bool:
        return self.mark is not None and self.issued < self.mark


class ReferencesBehind(Exception):
    """The sequence is behind its mark at start-up: PostgreSQL was restored and `advance-references` not run."""

    def __init__(self, at: Position) -> None:
        self.at = at
        super().__init__(
            f"the reference sequence (human_reference_seq) is at {at.issued}, behind {at.mark}, the highest number "
            f"it was seen at (Redis key {HIGH_WATER_KEY}): PostgreSQL was restored from a backup, and new payments "
            "and refunds would be given references already on members' receipts; run `.venv/bin/python main.py "
            f"advance-references` first (or start with {ACCEPT_FLAG} if no reference past {at.issued} was ever "
            "handed out)")


def applies(db: AsyncEngine | AsyncConnection | AsyncSession) -> bool:
    """Whether there is a sequence to watch: PostgreSQL's."""
    dialect = db.get_bind().dialect if isinstance(db, AsyncSession) else db.dialect
    return bool(dialect.name == "postgresql")


async def issued(db: AsyncConnection | AsyncSession) -> int:
    """The highest number the sequence has handed out (a read: it takes none)."""
    return int((await db.execute(ISSUED)).scalar_one())


async def read_mark(redis: Redis) -> int | None:
    """The mark; None when there is none (or it is not a number, which the next raise overwrites)."""
    raw = await asyncio.wait_for(redis.get(HIGH_WATER_KEY), timeout=REDIS_WAIT_SECONDS)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        log.warning("the reference sequence's high-water mark is not a number: taken as none",
                    extra={"key": HIGH_WATER_KEY})
        return None


async def raise_mark(redis: Redis, seen: int) -> int:
    """Raise the mark to `seen` unless it is already higher (atomic, whoever else raises it meanwhile); returns the
    mark after."""
    after = await asyncio.wait_for(redis.eval(_RAISE, 1, HIGH_WATER_KEY, str(seen)), timeout=REDIS_WAIT_SECONDS)
    return int(after)


async def position(db: AsyncConnection | AsyncSession, redis: Redis) -> Position:
    """The sequence and the mark. The mark is read first: every number it holds was the sequence's before, so a
    sequence read after it is at least there unless the database went back (read the other way round, a process
    raising the mark between the two reads would look like a restore)."""
    mark = await read_mark(redis)
    return Position(await issued(db), mark)


async def check_at_start(engine: AsyncEngine, redis: Redis, *, accept_behind: bool) -> Position | None:
    """Before `serve` or `worker` starts: raise ReferencesBehind when the sequence is behind the mark, unless the
    operator accepts it (`accept_behind`: the mark is then lowered to the sequence, said in a WARNING). Else the
    mark is raised to the sequence. A Redis without the mark (new, flushed) has nothing to compare: said at INFO.

    A Redis out of reach does not stop the start (WARNING; None returned), as it stops nothing else at start-up:
    without Redis a process still serves the API and provider callbacks and runs its jobs, and a Redis outage
    must not keep every process from restarting. The payment sweep compares once Redis answers (ReferenceWatch)."""
    if not applies(engine):
        return None
    try:
        mark = await read_mark(redis)
    except REDIS_FAILURES as exc:
        log.warning("could not read the reference sequence's high-water mark (Redis unreachable): started without "
                    "comparing; the payment sweep compares once Redis answers", extra={"error": type(exc).__name__})
        return None
    async with engine.connect() as conn:
        at = Position(await issued(conn), mark)
    try:
        if at.mark is None:
            log.info("no high-water mark of the reference sequence in Redis (a new or flushed Redis): nothing to "
                     "compare; set from the sequence", extra={"sequence": at.issued})
        elif at.behind and not accept_behind:
            raise ReferencesBehind(at)
        elif at.behind:
            await asyncio.wait_for(redis.set(HIGH_WATER_KEY, str(at.issued)), timeout=REDIS_WAIT_SECONDS)
            log.warning(f"starting with the reference sequence behind its high-water mark ({ACCEPT_FLAG}): the mark "
                        "is lowered to the sequence", extra={"sequence": at.issued, "high_water": at.mark})
            return at
        await raise_mark(redis, at.issued)
    except REDIS_FAILURES as exc:
        log.warning("could not raise the reference sequence's high-water mark (Redis unreachable); the payment "
                    "sweep raises it once Redis answers", extra={"error": type(exc).__name__})
    return at


class ReferenceWatch:
    """A worker's look at the sequence and the mark at each payment sweep (core.jobs): raises the mark while the
    sequence is at or past it, and while it is behind logs one ERROR when it falls behind (not at every sweep) and
    one INFO when it is past it again (after `advance-references`). gateway_reference_sequence_behind says the
    same, set at every scrape of every process too (metrics.refresh_gauges), so no process keeps an old 1."""

    def __init__(self) -> None:
        self.behind = False
        self.unreadable = False

    async def check(self, rt: Runtime) -> Position | None:
        """None on SQLite, or while Redis cannot be asked (a WARNING once until it can)."""
        if not applies(rt.engine):
            return None
        try:
            mark = await read_mark(rt.redis)  # first, as position() says
        except REDIS_FAILURES as exc:
            self._unreadable(exc)
            return None
        async with rt.engine.connect() as conn:  # the database's own errors are the sweep's
            at = Position(await issued(conn), mark)
        if not at.behind:
            try:
                await raise_mark(rt.redis, at.issued)
            except REDIS_FAILURES as exc:
                self._unreadable(exc)
                return None
        self.unreadable = False
        self._report(at)
        return at

    def _unreadable(self, exc: BaseException) -> None:
        metrics.REFERENCE_SEQUENCE_BEHIND.set(math.nan)
        if not self.unreadable:
            log.warning("could not compare the reference sequence with its high-water mark (Redis unreachable)",
                        extra={"error": type(exc).__name__})
        self.unreadable = True

    def _report(self, at: Position) -> None:
        metrics.REFERENCE_SEQUENCE_BEHIND.set(1 if at.behind else 0)
        if at.behind == self.behind:
            return
        self.behind = at.behind
        if at.behind:
            log.error("the reference sequence is behind its high-water mark: PostgreSQL was restored from a backup "
                      "and `.venv/bin/python main.py advance-references` was not run; new payments and refunds are "
                      "being given references already on members' receipts: run it now",
                      extra={"sequence": at.issued, "high_water": at.mark})
        else:
            log.info("the reference sequence is past its high-water mark again", extra={"sequence": at.issued})


async def refresh_gauge(rt: Runtime) -> None:
    """gateway_reference_sequence_behind at a scrape: 1 behind, 0 not (also with no mark, and on SQLite), NaN when
    the sequence or the mark cannot be read. A read only: the sweep raises the mark."""
    if not applies(rt.engine):
        metrics.REFERENCE_SEQUENCE_BEHIND.set(0)
        return
    async def read() -> Position:
        async with rt.engine.connect() as conn:
            return await position(conn, rt.redis)

    try:
        at = await asyncio.wait_for(read(), timeout=metrics.REFRESH_TIMEOUT)
    except Exception:  # the database or Redis out of reach: their own gauges say which
        metrics.REFERENCE_SEQUENCE_BEHIND.set(math.nan)
        return
    metrics.REFERENCE_SEQUENCE_BEHIND.set(1 if at.behind else 0)


async def shown(session: AsyncSession, redis: Any) -> dict[str, Any] | None:
    """/ops/data's referenceSequence: the sequence, the mark and whether it is behind (None: unknown, Redis out of
    reach); None on SQLite or without Redis."""
    if redis is None or not applies(session):
        return None
    try:
        at = await position(session, redis)
    except REDIS_FAILURES:
        return {"issued": await issued(session), "highWater": None, "behind": None}
    return {"issued": at.issued, "highWater": at.mark, "behind": at.behind}
