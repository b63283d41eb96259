"""Migration 0039 and the retention walk's plans: each batch of `prune` reads its rows by an index from where the
batch before stopped, not the table (or the period) again from its start; the ended jobs in (run_at, id) order
from ix_outbox_jobs_ended, also under a generic plan (the statements are prepared and sent again per batch)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy import text

from core.retention import RetentionPolicy, prune
from tests.conftest import make_settings, requires_pg
from tests.core.test_growth_indexes import _statements, pg_indexes

ENDED_INDEX = {"ix_outbox_jobs_ended": "outbox_jobs (run_at, id) WHERE ((status)::text = ANY "
                                       "((ARRAY['DONE'::character varying, 'DISCARDED'::character varying])::text[]))"}


async def _fill(rt: Any) -> None:
    """480 ended jobs (a tenth DISCARDED), 300 USSD sessions and 580 SMS texts past their period; and younger
    ones and live jobs, which stay."""
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, status, attempts, max_attempts, run_at, created_at, updated_at,"
            " done_at) SELECT 'sms.send', '{}', CASE WHEN i > 1000 THEN 'PENDING' WHEN i % 10 = 0 THEN 'DISCARDED'"
            " ELSE 'DONE' END, 1, 5, t, t, t, CASE WHEN i > 1000 THEN NULL ELSE t END"
            " FROM (SELECT i, now() - (1200 - i) * interval '1 hour' - interval '30 minutes' AS t"
            " FROM generate_series(1, 1200) i) s"))
        await conn.execute(text(
            "INSERT INTO ussd_sessions (id, aggregator, session_id, phone_index, phone_masked, service_code, status,"
            " hops, started_at, ended_at) SELECT 'u' || i, 'hubtel', 's' || i, 'p', '+25078****000', '*1#', 'ENDED',"
            " 2, t, t + interval '1 minute'"
            " FROM (SELECT i, now() - (2460 - i) * interval '1 hour' - interval '30 minutes' AS t"
            " FROM generate_series(1, 600) i) s"))
        await conn.execute(text(
            "INSERT INTO sms_messages (id, phone_enc, phone_index, phone_masked, template, language, body, encoding,"
            " length, segments, status, idempotency_key, created_at, updated_at) SELECT 'm' || i, 'x', 'p',"
            " '+25078****000', 'receipt', 'en', 'Payment received.', 'GSM-7', 17, 1, 'DELIVERED', 'k' || i, t, t"
            " FROM (SELECT i, now() - (4900 - i) * interval '1 hour' - interval '30 minutes' AS t"
            " FROM generate_series(1, 600) i) s"))
        for table in ("outbox_jobs", "ussd_sessions", "sms_messages"):
            await conn.execute(text(f"ANALYZE {table}"))


def _literal(value: Any) -> str:
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


@requires_pg
async def test_0039_index_exists_and_goes_with_the_revision(migrated_database):
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await pg_indexes(conn, [*ENDED_INDEX]) == {name: (True, d) for name, d in ENDED_INDEX.items()}
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0038")
        assert await pg_indexes(conn, [*ENDED_INDEX]) == {}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await pg_indexes(conn, [*ENDED_INDEX]) == {name: (True, d) for name, d in ENDED_INDEX.items()}
    finally:
        await conn.close()


@requires_pg
async def test_each_batch_reads_on_from_where_the_last_stopped(rt):
    """Batches of 100: every walk's SELECT after the first starts its index scan at the last row read (the row
    comparison an index condition), the jobs' on ix_outbox_jobs_ended with no sort of them all; and exactly the
    old ended jobs, sessions and texts go."""
    await _fill(rt)
    policy = RetentionPolicy(outbox_done_days=30, ussd_sessions_days=90, unknown_callbacks_days=0,
                             webhook_deliveries_days=0, webhook_held_days=0, sms_body_days=180, batch_size=100)
    with _statements(rt) as sent:
        report = await prune(rt.engine, policy)
    assert [(p.table, p.count) for p in report if p.count] == [
        ("outbox_jobs", 480), ("ussd_sessions", 300), ("sms_messages", 580)]
    plans: dict[str, list[str]] = {}
    async with rt.engine.connect() as conn:
        # The plan PostgreSQL falls back to for a statement prepared and run again and again, and no table scan.
        await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        await conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in sent:
            words = statement.split()
            if words[0] == "SELECT" and "ORDER" in words:  # a walk's batch
                # Prepared, then explained as executed with its parameters: the generic plan (EXPLAIN alone plans
                # with the values in place).
                await conn.exec_driver_sql(f"PREPARE walk AS {statement}")
                arguments = ", ".join(_literal(value) for value in parameters)
                rows = (await conn.exec_driver_sql(f"EXPLAIN EXECUTE walk({arguments})")).scalars().all()
                await conn.exec_driver_sql("DEALLOCATE walk")
                plans.setdefault(words[words.index("FROM") + 1], []).append("\n".join(rows))
        await conn.rollback()
    assert {table: len(walks) for table, walks in plans.items()} == {
        "outbox_jobs": 5, "ussd_sessions": 4, "used_refresh_tokens": 1, "sms_messages": 6}, plans
    for walks in plans.values():
        for plan in walks[1:]:  # the first starts at the oldest
            # The row comparison, or on an index of the order column alone its first part (`>=`, the rest a
            # filter of the rows of that one value): not only the period's end.
            cond = next(line for line in plan.splitlines() if "Index Cond" in line)
            assert "ROW(" in cond or ">= $" in cond, plan
    for plan in plans["outbox_jobs"]:
        assert "ix_outbox_jobs_ended" in plan and "Sort" not in plan, plan
    async with rt.engine.connect() as conn:
        left = (await conn.execute(text("SELECT status, count(*) FROM outbox_jobs GROUP BY status"))).all()
    assert sorted(left) == [("DISCARDED", 52), ("DONE", 468), ("PENDING", 200)]
