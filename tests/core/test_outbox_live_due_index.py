"""Migration 0023: the plain outbox claim reads its batch of due jobs from ix_outbox_live_due (run_at, live jobs
only) in order, instead of reading every due job through ix_outbox_due (status, run_at) and sorting them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text, update

from core.db import utcnow
from core.models import OutboxJob
from core.outbox import OutboxWorker
from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_outbox_live_due": "outbox_jobs (run_at) WHERE ((status)::text = ANY ((ARRAY['PENDING'::character "
                               "varying, 'RUNNING'::character varying])::text[]))"}


@requires_pg
async def test_0023_index_comes_and_goes_with_the_revision(migrated_database: str) -> None:
    await check_comes_and_goes(migrated_database, INDEX, "0023", "0022")


def test_0023_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    check_sqlite_round_trip(tmp_path, list(INDEX), "0022")


@requires_pg
async def test_the_plain_claim_reads_its_batch_without_sorting_every_due_job(sm: Any) -> None:
    """20,000 due jobs behind 50,000 finished ones: the claim takes the oldest batch, in order, through the index and
    sorts nothing (it read and sorted all 20,000 at every claim)."""
    async with sm.begin() as session:
        await session.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, created_at, "
            "updated_at, done_at) SELECT 'sms.send', '{}'::jsonb, 'done' || g, 'DONE', 1, 5, now() - interval '2 days',"
            " now(), now(), now() FROM generate_series(1, 50000) g"))
        await session.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, created_at, "
            "updated_at) SELECT 'webhook.deliver', jsonb_build_object('n', g), 'due' || g, 'PENDING', 0, 5, "
            "now() - interval '1 hour' + g * interval '1 ms', now(), now() FROM generate_series(1, 20000) g"))
    engine = sm.kw["bind"]
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE outbox_jobs"))
        await conn.commit()
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().startswith("WITH due AS"):
            seen.append((statement, parameters))

    worker = OutboxWorker(sm, {}, concurrency=16, batch_size=20)
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        claimed = await worker.claim(20)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert [job.payload["n"] for job in claimed] == list(range(1, 21))  # the oldest, in order
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.status == "RUNNING")
                              .values(status="PENDING", locked_by=None, attempts=0, run_at=utcnow()))
    [(statement, parameters)] = seen
    async with engine.connect() as conn:
        plan = "\n".join(row[0] for row in await conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, COSTS OFF) {statement}", tuple(parameters)))
        await conn.rollback()
    assert "ix_outbox_live_due" in plan and "Sort" not in plan, plan
