"""Migration 0028: the USSD sweep (channels.ussd.records.close_abandoned) reads the sessions still OPEN through
ix_ussd_sessions_open (started_at, OPEN rows only), not every session of its window (of the whole table, the day's
first sweep) through ix_ussd_sessions_started. Built on a database holding sessions, gone at 0027, the same again at
0028; on SQLite the revision goes down and up again with the models and the migrations agreeing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, func, select, text

from channels.ussd import jobs as ussd_jobs
from channels.ussd import records
from core import pgraw
from core.db import utcnow
from core.models import UssdSession
from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_ussd_sessions_open": "ussd_sessions (started_at) WHERE ((status)::text = 'OPEN'::text)"}


async def _sessions(rt: Any, *, ended: int, left_open: int) -> None:
    """`ended` sessions over the last three days, closed as sessions are, and `left_open` still OPEN from 20 hours
    ago on (within a windowed sweep's day, and past ABANDONED_AFTER: each the sweep's to close)."""
    async with rt.sessionmaker.begin() as session:
        await session.execute(text(
            "INSERT INTO ussd_sessions (id, aggregator, session_id, phone_index, phone_masked, service_code, status, "
            "hops, started_at, ended_at) SELECT gen_random_uuid()::text, 'nalo', 'ended-' || g, 'ix' || (g % 500), "
            "'+250***01', '*384*123#', CASE WHEN g % 4 = 0 THEN 'Incomplete' ELSE 'Success' END, 3, "
            "now() - interval '3 days' + g * (interval '3 days' / :n), now() FROM generate_series(1, :n) g"),
            {"n": ended})
        await session.execute(text(
            "INSERT INTO ussd_sessions (id, aggregator, session_id, phone_index, phone_masked, service_code, status, "
            "hops, started_at) SELECT gen_random_uuid()::text, 'nalo', 'open-' || g, 'ix', '+250***01', '*384*123#', "
            "'OPEN', 1, now() - interval '20 hours' + g * interval '1 s' FROM generate_series(1, :n) g"),
            {"n": left_open})
    async with rt.engine.connect() as conn:
        await conn.execute(text("ANALYZE ussd_sessions"))
        await conn.commit()


@requires_pg
async def test_0028_index_comes_and_goes_with_the_revision_on_a_database_with_sessions(
        rt: Any, migrated_database: str) -> None:
    await _sessions(rt, ended=50, left_open=5)
    await check_comes_and_goes(migrated_database, INDEX, "0028", "0027")
    async with rt.engine.connect() as conn:
        kept = (await conn.execute(text("SELECT count(*) FILTER (WHERE status = 'OPEN'), count(*) "
                                        "FROM ussd_sessions"))).one()
    assert tuple(kept) == (5, 55)


def test_0028_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    after = check_sqlite_round_trip(tmp_path, list(INDEX), "0027")
    assert after["ix_ussd_sessions_open"].endswith("WHERE status = 'OPEN'")


@requires_pg
async def test_the_sweep_reads_the_open_sessions_alone(rt: Any) -> None:
    """60,000 ended sessions, 300 left OPEN: the windowed sweep and the day's first (whole table) each read their
    batch from the partial index (they read every session of the day, or of the table, through
    ix_ussd_sessions_started and kept the OPEN ones: 0.43 s at 2 million rows), and close them all."""
    await _sessions(rt, ended=60_000, left_open=300)
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().startswith("WITH due AS"):
            seen.append((statement, parameters))

    engine = rt.engine
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        now = utcnow()
        assert await records.close_abandoned(rt, now=now, since=now - ussd_jobs.SWEEP_WINDOW, batch=100) == 300
        assert await records.close_abandoned(rt, now=now) == 0
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert len(seen) == 5  # three full batches, one empty; then the whole table's, empty
    async with engine.connect() as conn:
        for statement, parameters in (seen[0], seen[-1]):
            plan = "\n".join(row[0] for row in await conn.exec_driver_sql(
                f"EXPLAIN (COSTS OFF) {statement}", tuple(parameters)))
            assert "ix_ussd_sessions_open" in plan and "ix_ussd_sessions_started" not in plan, plan
            assert "Seq Scan" not in plan, plan
        await conn.rollback()
    async with rt.sessionmaker() as session:
        statuses = dict((await session.execute(
            select(UssdSession.status, func.count()).group_by(UssdSession.status))).all())
    assert statuses == {"Success": 45_000, "Incomplete": 15_300}


@requires_pg
async def test_the_sweep_uses_the_index_in_a_plan_postgresql_reuses(rt: Any) -> None:
    """`status = 'OPEN'` is written out in the statement, not bound: PostgreSQL uses a partial index for
    `status = $1` only while it plans for that value, not in a generic plan (one it reuses: asyncpg prepares each
    statement, and PostgreSQL may go generic after five runs)."""
    await _sessions(rt, ended=20_000, left_open=10)
    for bounded in (True, False):
        statement = pgraw.compiled(records._abandoned_statement(bounded))
        now = utcnow()
        args = statement.args({"before": now - records.ABANDONED_AFTER, "since": now - ussd_jobs.SWEEP_WINDOW,
                               "batch": 500, "v_ended_at": now})
        async with rt.engine.connect() as conn:
            raw = await pgraw.driver(conn)
            await raw.execute(f"PREPARE sweep AS {statement.sql}")
            try:
                await raw.execute("SET plan_cache_mode = force_generic_plan")
                values = ", ".join(str(a) if isinstance(a, int) else "'{}'".format(str(a).replace("'", "''"))
                                   for a in args)  # EXPLAIN EXECUTE takes no parameters of its own
                plan = "\n".join(row[0] for row in await raw.fetch(f"EXPLAIN (COSTS OFF) EXECUTE sweep({values})"))
            finally:
                await raw.execute("DEALLOCATE sweep; RESET plan_cache_mode")
            await conn.rollback()
        assert "ix_ussd_sessions_open" in plan and "ix_ussd_sessions_started" not in plan, plan
