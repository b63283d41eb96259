"""The USSD channel's outbox jobs: what must reach Redis even when Redis is down at the moment it is decided, and
the periodic sweep of the sessions no aggregator reported ended."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from channels.ussd.records import SweepUnfinished, close_abandoned
from channels.ussd.sessions import forget_phone
from core.db import parse_aware
from core.outbox import Handler, Job, RetryLater, db_now, enqueue

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.ussd")

FORGET_PHONE = "ussd.forget_phone"
SWEEP_JOB = "ussd.sessions.sweep"
SWEEP_EVERY = timedelta(minutes=5)
# A sweep reads the sessions started in its last SWEEP_WINDOW (the earlier ones were closed by the sweeps before it);
# the day's first sweep, and the first one a worker queues (ensure_scheduled), read them all: a backlog left while no
# worker ran, or rows older than the sweep: every session the table holds, through the started_at index (0.43 s at
# 2 million, once a day). Not through an index of the OPEN rows alone: it would make every
# session's end a non-HOT update.
SWEEP_WINDOW = timedelta(days=1)
_SLOTS_A_DAY = int(timedelta(days=1) / SWEEP_EVERY)
SWEEP_BATCH = 500
# A run closes its whole backlog, batch after batch, within its handler's time less this: no batch starts later (a
# batch takes well under a second; this leaves room for one stalled on a lock or a busy database). What is left
# then is closed by the same job run again at once.
SWEEP_MARGIN = 10.0


async def queue_forget_phone(session: AsyncSession, blind_index: str, *, cooperative_id: str) -> None:
    """Forget the USSD language and resume route of a number no longer its member's (released, corrected,
    erased), in the change's transaction: the worker deletes the keys (retrying while Redis is down), so the
    number's next holder is not greeted in the previous holder's language, nor offered her session, once Redis is
    back. The route deletes them at once as well; the job's DEL is then a no-op."""
    # No dedupe key: a number given back to its member and released again later needs its own job (a key
    # naming the member and number would match the first, DONE, job); two releases at once queue two DELs.
    await enqueue(session, FORGET_PHONE, {"blind_index": blind_index}, cooperative_id=cooperative_id,
                  max_attempts=25)


async def schedule_sweep(session: AsyncSession, *, now: datetime | None = None, everything: bool = False) -> None:
    """The next sweep, once per slot whatever the number of workers (slots by the database's clock, as
    core.jobs.schedule_sweep's); `everything`: it reads every session, not only SWEEP_WINDOW's."""
    now = now or await db_now(session)
    slot = int(now.timestamp() // SWEEP_EVERY.total_seconds()) + 1
    run_at = datetime.fromtimestamp(slot * SWEEP_EVERY.total_seconds(), UTC)
    await enqueue(session, SWEEP_JOB, {"all": everything or slot % _SLOTS_A_DAY == 0},
                  dedupe_key=f"{SWEEP_JOB}:{slot}", run_at=run_at, max_attempts=3)


async def ensure_scheduled(rt: Runtime) -> None:
    """Called when a worker starts: the sweep exists (a second worker's call adds none)."""
    async with rt.sessionmaker.begin() as session:
        await schedule_sweep(session, everything=True)


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    async def forget(job: Job) -> None:
        await forget_phone(rt.redis, job.payload["blind_index"])  # Redis down: raises, retried with backoff

    async def sweep(job: Job) -> None:
        # The next run first, in its own transaction: a run that fails on every attempt parks, the chain goes on.
        async with rt.sessionmaker.begin() as session:
            await schedule_sweep(session)
            now = await db_now(session)
        until = time.monotonic() + job.time_left(rt.settings.outbox_lease_seconds) - SWEEP_MARGIN
        since = None if job.payload.get("all") else now - SWEEP_WINDOW
        reached = parse_aware(job.payload.get("from"))  # a run that stopped at its time: on from where it did
        if reached is not None:
            since = reached if since is None else max(since, reached)
        try:
            count = await close_abandoned(rt, now=now, since=since, batch=SWEEP_BATCH, until=until)
        except SweepUnfinished as cut:
            log.info("ussd sessions no aggregator ended recorded as timed out; more left, swept again",
                     extra={"count": cut.closed})
            # The rest by this job again, its attempt given back (not a failure: each run closes some). Cut off by
            # the worker's timeout mid-batch instead, each run would use up an attempt, and three park the sweep:
            # the day's first, which alone reads past SWEEP_WINDOW, would leave the older backlog for a day.
            # Its next run reads on from where this one stopped, not again past every row this one closed (a
            # backlog of millions read once, not once a run).
            raise RetryLater(1, str(cut), payload={**job.payload, "from": cut.reached.isoformat()}) from None
        if count:
            log.info("ussd sessions no aggregator ended recorded as timed out", extra={"count": count})

    return {FORGET_PHONE: forget, SWEEP_JOB: sweep}
