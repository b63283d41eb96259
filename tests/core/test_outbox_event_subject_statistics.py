"""Migration 0037: the planner knows how many webhook.event jobs tell of one payment (extended statistics on 0034's
partial index's expression). Without them it took each id of an erasure's batch of 500 (core.members._erase_events)
to match 0.5% of the jobs, and read the whole outbox for each batch rather than ix_outbox_jobs_event_subject."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import command
from sqlalchemy import literal_column, select, text
from sqlalchemy.dialects import postgresql

from core.db import event_data_id
from core.members import _JOBS_AT_ONCE
from core.models import OutboxJob
from tests.conftest import make_settings, requires_pg


async def _plan(rt: Any) -> str:
    """The plan of the erasure's read of a batch's webhook.event jobs (its UPDATE's WHERE)."""
    ids = [f"p36-{i}" for i in range(_JOBS_AT_ONCE)]
    query = select(OutboxJob.id).where(OutboxJob.kind == literal_column("'webhook.event'"),
                                       event_data_id(OutboxJob.payload).in_(ids))
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    async with rt.engine.connect() as conn:
        return "\n".join((await conn.exec_driver_sql(f"EXPLAIN {sql}")).scalars().all())


@requires_pg
async def test_an_erasures_batch_finds_its_webhook_event_jobs_by_the_index(rt: Any, migrated_database: str) -> None:
    """30,000 webhook.event jobs (three of each of 10,000 payments) and 10,000 other jobs, analysed as autovacuum
    leaves them: a batch's jobs are read through the index at head, by a sequential scan at 0036."""
    from main import _alembic_config, migrate

    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, created_at,"
            " updated_at, after_failure) SELECT 'webhook.event', jsonb_build_object('event_type', 'payment.completed',"
            " 'data', jsonb_build_object('id', 'p36-' || (i % 10000), 'paymentAccount', '078***111')), 'wh:' || i,"
            " 'DONE', 1, 8, now(), now(), now(), false FROM generate_series(1, 30000) i"))
        await conn.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, status, attempts, max_attempts, run_at, created_at, updated_at,"
            " after_failure) SELECT 'sms.send', jsonb_build_object('template', 'receipt'), 'DONE', 1, 8, now(), now(),"
            " now(), false FROM generate_series(1, 10000) i"))
        await conn.execute(text("ANALYZE outbox_jobs"))
    settings = make_settings()
    try:
        assert "ix_outbox_jobs_event_subject" in await _plan(rt), await _plan(rt)
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0036")
        async with rt.engine.begin() as conn:
            await conn.execute(text("ANALYZE outbox_jobs"))
        assert "Seq Scan on outbox_jobs" in await _plan(rt), await _plan(rt)
    finally:
        await asyncio.to_thread(migrate, settings)
    assert "ix_outbox_jobs_event_subject" in await _plan(rt), await _plan(rt)


async def _statistics(rt: Any) -> list[str]:
    async with rt.engine.connect() as conn:
        return list((await conn.execute(text(
            "SELECT stxname FROM pg_statistic_ext WHERE stxname = 'st_outbox_jobs_event_subject'"))).scalars())


@requires_pg
async def test_on_postgresql_13_the_upgrade_past_0037_goes_on_without_the_statistics(
        rt: Any, migrated_database: str, monkeypatch: Any) -> None:
    """PostgreSQL 13 (README: the gateway runs on it) has no statistics on an expression: CREATE STATISTICS ON
    ((payload #>> ...)) is a syntax error there, and `migrate` stopped at 0037. There it creates nothing (the erasure
    reads as before it); the downgrade drops nothing it lacks."""
    from sqlalchemy.dialects.postgresql.base import PGDialect

    from main import _alembic_config, migrate

    settings = make_settings()
    try:
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0036")
        assert await _statistics(rt) == []
        with monkeypatch.context() as patched:
            patched.setattr(PGDialect, "_get_server_version_info", lambda self, connection: (13, 16))
            await asyncio.to_thread(migrate, settings)
            assert await _statistics(rt) == []
            await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0036")
    finally:
        await asyncio.to_thread(migrate, settings)
    assert await _statistics(rt) == ["st_outbox_jobs_event_subject"]
