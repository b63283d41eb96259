"""Models and alembic migrations agree, and `serve` refuses an unmigrated database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from core.db import Base, make_engine
from tests.conftest import make_settings, requires_pg


def _diff(url: str) -> list:
    async def run() -> list:
        engine = make_engine(url)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata))
        await engine.dispose()
        return diff

    return asyncio.run(run())


@requires_pg
def test_autogenerate_finds_no_difference_on_postgres(migrated_database):
    assert _diff(migrated_database) == []


def test_migrations_apply_on_sqlite_and_match_models(tmp_path):
    from main import migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    migrate(make_settings(DATABASE_URL=url))
    assert _diff(url) == []


@requires_pg
def test_audit_log_is_append_only_on_postgres(migrated_database):
    """UPDATE, DELETE and TRUNCATE are refused by the database itself (0001's row trigger, 0019's statement
    trigger: row triggers never fire on TRUNCATE)."""
    attempts = {"update": "UPDATE audit_events SET action = 'forged'", "delete": "DELETE FROM audit_events",
                "truncate": "TRUNCATE audit_events", "truncate-many": "TRUNCATE payments, audit_events CASCADE"}

    async def run() -> dict[str, str]:
        engine = make_engine(migrated_database)
        said = {}
        try:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO audit_events (actor, channel, action, entity_type, entity_id, at) "
                                        "VALUES ('t', 'test', 'x', 'y', 'z', now())"))
                before = (await conn.execute(text("SELECT count(*) FROM audit_events"))).scalar_one()
            for name, statement in attempts.items():
                try:
                    async with engine.begin() as conn:
                        await conn.execute(text(statement))
                    said[name] = "done"
                except Exception as exc:
                    said[name] = "refused" if "append-only" in str(exc) else str(exc)
            async with engine.connect() as conn:
                after = (await conn.execute(text("SELECT count(*) FROM audit_events"))).scalar_one()
                said["rows"] = "kept" if after == before else f"{before} -> {after}"
        finally:
            async with engine.begin() as conn:  # as the suite empties its database: a superuser's replica session
                await conn.execute(text("SET LOCAL session_replication_role = replica"))
                await conn.execute(text("TRUNCATE audit_events"))
            await engine.dispose()
        return said

    assert asyncio.run(run()) == {**{name: "refused" for name in attempts}, "rows": "kept"}


def test_serve_refuses_an_unmigrated_database(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/empty.db", "REDIS_URL": "redis://127.0.0.1:1"}
    result = subprocess.run([sys.executable, "main.py", "serve"], capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 3
    assert "refusing to start" in result.stderr and "python main.py migrate" in result.stderr


REPORT_INDEXES = {"ix_payments_coop_completed": "payments (cooperative_id, completed_at)",
                  "ix_refunds_coop_created": "refunds (cooperative_id, created_at)",
                  "ix_refunds_coop_completed": "refunds (cooperative_id, completed_at)"}


@requires_pg
async def test_0004_builds_its_indexes_without_blocking_payment_writes(migrated_database):
    """`migrate` runs on the live database: 0004's indexes are built CONCURRENTLY, so a payment write that
    comes while a build waits or runs is not queued behind it (a plain CREATE INDEX blocked every INSERT and
    UPDATE of payments for the whole build); an INVALID index an interrupted build left is built again."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    dsn = migrated_database.replace("postgresql+asyncpg://", "postgresql://")
    cfg = _alembic_config(settings)
    upgrading = None
    writer = await asyncpg.connect(dsn)
    try:
        await asyncio.to_thread(command.downgrade, cfg, "0003")
        assert not await writer.fetch("SELECT 1 FROM pg_class WHERE relname = ANY($1::text[])", list(REPORT_INDEXES))
        # What a killed `migrate` leaves: an INVALID index (here also of the wrong columns).
        await writer.execute("CREATE INDEX ix_refunds_coop_created ON refunds (cooperative_id)")
        await writer.execute("UPDATE pg_index SET indisvalid = false "
                             "WHERE indexrelid = 'ix_refunds_coop_created'::regclass")
        # A payment's transaction in flight: the build waits for it, as any index build must.
        in_flight = writer.transaction()
        await in_flight.start()
        await writer.execute("UPDATE payments SET status = status WHERE false")
        upgrading = asyncio.ensure_future(asyncio.to_thread(command.upgrade, cfg, "0004"))
        other = await asyncpg.connect(dsn)
        try:
            for _ in range(200):  # until the build waits on the payment's transaction
                if await other.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%' "
                                        "AND wait_event_type = 'Lock' AND datname = current_database()"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the index build never started")
            # Meanwhile another payment is written: it must not queue behind the build.
            await other.execute("SET lock_timeout = '3s'")
            await other.execute("UPDATE payments SET status = status WHERE false")
        finally:
            await other.close()
            await in_flight.commit()
        await upgrading
        rows = {r["relname"]: (r["indisvalid"], r["def"]) for r in await writer.fetch(
            "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY($1::text[])", list(REPORT_INDEXES))}
        assert {name: (valid, d.split(" ON ")[1].replace("public.", "").replace("USING btree ", ""))
                for name, (valid, d) in rows.items()} == {name: (True, d) for name, d in REPORT_INDEXES.items()}
    finally:
        if upgrading is not None and not upgrading.done():
            await asyncio.wait([upgrading], timeout=60)
        await writer.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0004_downgrades_and_upgrades_again_on_sqlite(tmp_path):
    from alembic import command

    from main import _alembic_config, migrate

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    command.downgrade(_alembic_config(settings), "0003")
    migrate(settings)
    assert _diff(url) == []
