"""A bank payment's invoice while its POST /v1/payments waits (seed 001: the 201 carries the `paymentUrl` the client
redirects the payer to).

The payment and its collect job are committed first, as every payment's are; the job still leaves through the outbox.
The serve process that made the payment then leases that one job (OutboxWorker.claim by its dedupe key, SKIP LOCKED)
and runs it as a worker would: the same handler, lease, retries and stamps, so it runs once whoever takes it. When a
worker has taken it first (or it is waiting for a retry), the payment's row is watched instead. Either way the wait is
bounded (PAYMENT_URL_WAIT_SECONDS): past it the 201 goes without the URL, which GET /v1/payments/{id} shows once the
invoice exists, and a job still running here goes on in the background.

Only bank payments wait: a mobile-money payment's 201 is PENDING with nothing to redirect to, and its PIN prompt
goes out through the worker as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from core import metrics
from core.db import utcnow
from core.models import OutboxJob, Payment
from core.outbox import OutboxWorker
from core.state.payment import PaymentStatus

if TYPE_CHECKING:
    from core.runtime import Runtime

log = logging.getLogger("gateway.payments")

# Collect jobs one serve process runs at once for waiting requests; past it a request watches the row while the
# workers run its job (a burst of bank payments must not turn the API process into a worker).
MAX_AT_ONCE = 8
# How often a waiting request reads its payment's row when a worker runs the job.
WATCH_EVERY_SECONDS = 0.1
# At shutdown, how long jobs still running here get to finish before they are cancelled (a cancelled one is
# taken again by a worker when its lease lapses, and asks the provider before sending again).
CLOSE_GRACE_SECONDS = 10.0
_EXTRA = "collect_now"


class CollectNow:
    """The collect jobs a serve process runs for the requests that wait on them (one per process: `of`)."""

    def __init__(self, rt: Runtime) -> None:
        from core.jobs import job_handlers

        worker_id = f"{socket.gethostname()[:30]}:{os.getpid()}:api:{random.getrandbits(24):06x}"
        self._worker = OutboxWorker(rt.sessionmaker, {"payment.collect": job_handlers(rt)["payment.collect"]},
                                    batch_size=1, lease_seconds=rt.settings.outbox_lease_seconds,
                                    concurrency=MAX_AT_ONCE, worker_id=worker_id, on_job=metrics.observe_job)
        self._rt = rt
        self._running: set[asyncio.Task[None]] = set()
        # Set by close (at shutdown): a request still in flight then watches its row and starts no job, which the
        # runtime's cleanup would cut off mid-run.
        self._closed = False

    @staticmethod
    def of(rt: Runtime) -> CollectNow:
        found = rt.extras.get(_EXTRA)
        if found is None:
            found = rt.extras[_EXTRA] = CollectNow(rt)
        return found  # type: ignore[no-any-return]

    async def wait(self, payment_id: str, seconds: float) -> None:
        """Return when the payment has left PENDING (the invoice made: PROCESSING with its URL; or refused) or after
        `seconds`, running its collect job here if it is due and no worker has it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds

        def left() -> float:
            return max(0.0, deadline - loop.time())

        if not self._closed and len(self._running) < MAX_AT_ONCE:
            # The claim and the run are one task, never cancelled by the wait: a claim still in flight at the
            # deadline (its connection slow to come), or when the request is cancelled (a shutdown's), may lease
            # the job all the same, and then runs it, rather than leave it leased to no one until the lease lapses.
            claimed: asyncio.Future[bool] = loop.create_future()
            task = asyncio.create_task(self._take(payment_id, claimed))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            await asyncio.wait({claimed}, timeout=left())
            if not claimed.done():
                return  # the claim goes on behind the 201 (and runs the job if it gets it)
            if claimed.result():
                # Not cancelled at the deadline: the provider call may be on its way, and the job records its answer.
                await asyncio.wait({task}, timeout=left())
                return  # done (the row says how) or still running past the wait
        while loop.time() < deadline:
            try:
                if not await self._may_change(payment_id):
                    return
            except Exception:  # the payment is committed: its 201 goes without the URL, not as an error
                log.warning("payment not watched for its invoice", exc_info=True, extra={"payment_id": payment_id})
                return
            await asyncio.sleep(min(WATCH_EVERY_SECONDS, left()))

    async def _take(self, payment_id: str, claimed: asyncio.Future[bool]) -> None:
        """Lease the payment's collect job and run it; `claimed` tells the waiting request whether it got it."""
        try:
            jobs = await self._worker.claim(1, key=f"collect:{payment_id}")
        except Exception:  # the database went away after the 201's commit: the workers will run it
            log.warning("collect job not started by the API", exc_info=True, extra={"payment_id": payment_id})
            jobs = []
        claimed.set_result(bool(jobs))
        if not jobs:
            return
        try:
            await self._worker.run_job(jobs[0])
        except Exception:  # the database went away while finishing: the lease brings the job back (as a worker's)
            log.exception("could not record job result", extra={"job_id": jobs[0].id, "kind": jobs[0].kind,
                                                                 "payment_id": payment_id})

    async def _may_change(self, payment_id: str) -> bool:
        """Whether the payment is PENDING with its collect job running or due now (a worker's): what the wait can
        see happen. Not one whose job waits for a retry (its provider answered 5xx), is done or parked (the call
        went unanswered: the status poll settles it, later): a replayed POST then answers at once."""
        job = OutboxJob.__table__
        query = (select(Payment.status, job.c.status, job.c.run_at, job.c.attempts)
                 .select_from(Payment.__table__.outerjoin(job, job.c.dedupe_key == f"collect:{payment_id}"))
                 .where(Payment.id == payment_id))
        async with self._rt.sessionmaker() as session:
            row = (await session.execute(query)).first()
        if row is None or row[0] != PaymentStatus.PENDING.value:
            return False
        # A PENDING job tried before waits for its retry, however soon it is due (the backoff's jitter can make it
        # due within the horizon below): only a first run due now is one the wait sees through.
        return row[1] == "RUNNING" or (row[1] == "PENDING" and not row[3] and row[2] is not None
                                       and row[2] <= utcnow() + timedelta(seconds=WATCH_EVERY_SECONDS * 10))

    async def close(self) -> None:
        self._closed = True
        if not self._running:
            return
        _, left = await asyncio.wait(set(self._running), timeout=CLOSE_GRACE_SECONDS)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


async def close(rt: Any) -> None:
    """Let this process's collect jobs finish (or cancel them after CLOSE_GRACE_SECONDS): at shutdown."""
    # Left in rt.extras, closed: aiohttp runs on_shutdown before it waits for the requests in flight, and one of
    # them reaching CollectNow.of afterwards must find this one, not make a new one whose job nobody waits for.
    found = rt.extras.get(_EXTRA)
    if found is not None:
        await found.close()
