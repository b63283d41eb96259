"""Two claimers in one embedded process (SQLite: the `run` command's worker, and a POST running its bank payment's
collect job, core.collect_now) never lease the same job. The driver reads the due rows outside the write transaction,
so a job another claimer leased between that read and this claim's UPDATE was leased twice, and run twice; the
UPDATE checks the job is still due and the claim keeps only what it leased. (PostgreSQL's claim is one statement with
SKIP LOCKED: tests/core/test_outbox.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.models import OutboxJob
from core.outbox import OutboxWorker, enqueue
from tests.conftest import is_postgres

pytestmark = pytest.mark.skipif(is_postgres(), reason="SQLite's claim path (the embedded default)")


async def test_a_job_leased_between_the_read_and_the_update_is_not_leased_again(sm: Any, monkeypatch: Any) -> None:
    async with sm.begin() as session:
        await enqueue(session, "test.record", {"n": 1}, dedupe_key="only")
    first, second = OutboxWorker(sm, {}, worker_id="first"), OutboxWorker(sm, {}, worker_id="second")
    original = AsyncSession.execute
    taken: list[Any] = []
    raced: list[bool] = []

    async def execute(self: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(statement, "is_update", False) and not raced:
            # The first claim has read the job as due; the second leases it before the first's UPDATE.
            raced.append(True)
            taken.extend(await second.claim(key="only"))
        return await original(self, statement, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "execute", execute)
    claimed = await first.claim(key="only")
    monkeypatch.undo()
    assert [job.locked_by for job in taken] == ["second"]
    assert claimed == []  # read as due, leased by the other meanwhile: not this claim's
    async with sm() as session:
        job = (await session.execute(select(OutboxJob))).scalar_one()
    assert (job.status, job.locked_by, job.attempts) == ("RUNNING", "second", 1)
