"""Claims: what a claim takes (no more than the worker's free slots), what it tells the handler about a job
whose worker was lost (Job.interrupted), and whose clock leases are measured by (the database's)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select, update

import core.outbox as outbox
from core.db import utcnow
from core.models import OutboxJob
from core.outbox import INTERRUPTED, WORKER_LOST, OutboxWorker, RetryLater, enqueue
from tests.conftest import requires_pg


async def _row(sm, job_id: int) -> OutboxJob:
    async with sm() as session:
        return await session.get(OutboxJob, job_id)


async def test_a_job_taken_back_from_a_lapsed_lease_is_interrupted(sm):
    async with sm.begin() as session:
        await enqueue(session, "k", {"n": "lost"})
        await enqueue(session, "k", {"n": "failed"})
    lost = OutboxWorker(sm, {}, lease_seconds=30, worker_id="lost")
    taken = {j.payload["n"]: j for j in await lost.claim()}
    assert not any(j.interrupted for j in taken.values())  # first attempts
    async with sm.begin() as session:
        # "lost": its worker died mid-run (RUNNING, lease over). "failed": an attempt that failed and waits.
        await session.execute(update(OutboxJob).where(OutboxJob.id == taken["lost"].id)
                              .values(run_at=utcnow() - timedelta(seconds=1)))
        await session.execute(update(OutboxJob).where(OutboxJob.id == taken["failed"].id).values(
            status="PENDING", locked_by=None, last_error="ProviderError: HTTP 503", run_at=utcnow()))
    rescuer = OutboxWorker(sm, {}, lease_seconds=30, worker_id="rescuer")
    again = {j.payload["n"]: j for j in await rescuer.claim()}
    assert again["lost"].interrupted and again["lost"].last_error == WORKER_LOST
    assert WORKER_LOST.startswith(INTERRUPTED)
    assert not again["failed"].interrupted and again["failed"].last_error == "ProviderError: HTTP 503"
    row = await _row(sm, again["lost"].id)
    assert (row.status, row.locked_by, row.attempts, row.last_error) == ("RUNNING", "rescuer", 2, WORKER_LOST)
    assert (await _row(sm, again["failed"].id)).last_error == "ProviderError: HTTP 503"


async def test_a_busy_worker_claims_no_more_than_its_free_slots(sm):
    """README: a worker claims 'only as many jobs as it has free slots': one with every slot taken holds
    no job it cannot start, and an idle worker finds them."""
    release = asyncio.Event()
    started: list[int] = []

    async def slow(job) -> None:  # e.g. a provider call hanging until its timeout
        started.append(job.payload["n"])
        await release.wait()

    async with sm.begin() as session:
        for n in range(10):
            await enqueue(session, "test.slow", {"n": n})
    busy = OutboxWorker(sm, {"test.slow": slow}, batch_size=50, concurrency=2, lease_seconds=60, idle_sleep=0.02)
    loop = asyncio.create_task(busy.run_forever())

    def waiting_for_a_slot() -> bool:
        """The busy worker's loop waits for a slot (its task in the semaphore's queue), its two jobs started: from
        there it claims nothing until one ends. What it claimed before it came to wait is in the table."""
        return len(started) == 2 and loop._fut_waiter in (busy._sem._waiters or ())  # type: ignore[attr-defined]

    try:
        # Until then, not a fixed pause: a loaded host's pause could end before the loop came round to claim again
        # (one claiming ahead of its slots then passed). 30 s at most: never there fails the test.
        give_up = asyncio.get_running_loop().time() + 30
        while not waiting_for_a_slot():
            assert not loop.done() and asyncio.get_running_loop().time() < give_up, (started, loop)
            await asyncio.sleep(0.02)
        async with sm() as session:
            held = (await session.execute(select(func.count()).where(OutboxJob.locked_by == busy.worker_id))
                    ).scalar_one()
        idle = OutboxWorker(sm, {}, batch_size=50, concurrency=3, lease_seconds=60)
        got = await idle.claim(3)
    finally:
        busy.stop()
        release.set()
        await asyncio.wait_for(loop, 10)
    assert held == 2 and len(started) == 2
    assert len(got) == 3


@requires_pg
async def test_leases_run_by_the_database_clock_not_the_workers(sm, monkeypatch):
    """A worker whose clock runs a minute fast neither takes a job another worker is still running nor
    sets leases and retry times by its own clock."""
    async with sm.begin() as session:
        await enqueue(session, "k", {"n": 1})
    honest = OutboxWorker(sm, {}, lease_seconds=60)
    [running] = await honest.claim()
    async with sm.begin() as session:
        await enqueue(session, "later", {"n": 2})
    monkeypatch.setattr(outbox, "utcnow", lambda: utcnow() + timedelta(seconds=60))

    async def later(_job) -> None:
        raise RetryLater(30, "still pending")

    fast = OutboxWorker(sm, {"later": later}, lease_seconds=60)
    asked = utcnow()  # before the claim: a loaded machine can pause this process for seconds after it
    claimed = await fast.claim()
    assert [j.kind for j in claimed] == ["later"]  # not the job the other worker runs
    before = utcnow()
    row = await _row(sm, claimed[0].id)
    assert asked + timedelta(seconds=50) < row.run_at <= before + timedelta(seconds=61)  # lease by the db
    await fast.run_job(claimed[0])
    row = await _row(sm, claimed[0].id)
    assert (row.status, row.attempts) == ("PENDING", 0)
    assert before + timedelta(seconds=25) < row.run_at <= utcnow() + timedelta(seconds=31)  # not 90 s out
    assert (await _row(sm, running.id)).locked_by == honest.worker_id
