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


T0 = "2026-01-01 00:00:00.000000"
# A cooperative with a member who paid, and a webhook endpoint with a delivery, as revision 0005 stores them: rows
# that refer to members and webhook_endpoints, the two tables 0006 and 0007 copy on SQLite (batch migrations).
ROWS_AT_0005 = [
    "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration, "
    f"created_at, updated_at) VALUES ('c1', 'Coop', 'C1', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', 0, '{T0}', '{T0}')",
    "INSERT INTO payment_types (id, cooperative_id, name, amount_minor, currency, allow_custom_amount, is_recurring, "
    f"is_active, created_at, updated_at) VALUES ('t1', 'c1', 'Rent', 100, 'RWF', 0, 0, 1, '{T0}', '{T0}')",
    "INSERT INTO members (id, cooperative_id, name, phone_enc, phone_index, phone_masked, language, status, "
    f"reminders_opt_out, created_at, updated_at) VALUES ('m1', 'c1', 'Ann', 'e', 'i1', '+2507****01', 'en', 'ACTIVE', "
    f"0, '{T0}', '{T0}')",
    "INSERT INTO payments (id, cooperative_id, member_id, payment_type_id, reference, amount_minor, currency, "
    "fee_minor, refunded_minor, status, method, provider, provider_reference, payment_account_enc, "
    "payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late, "
    "expires_at, created_at, updated_at) VALUES ('p1', 'c1', 'm1', 't1', 'PAY_1', 100, 'RWF', 0, 0, 'COMPLETED', "
    f"'MOBILE_MONEY_MTN', 'mtn_momo', 'pr1', 'e', 'i1', '+2507****01', 'k1', 'h', 'api', 0, 0, '{T0}', '{T0}', "
    f"'{T0}')",
    "INSERT INTO webhook_endpoints (id, cooperative_id, url, secret_enc, events, status, consecutive_failures, "
    f"created_at, updated_at) VALUES ('w1', 'c1', 'https://erp.example/hook', 's', '[]', 'ACTIVE', 0, '{T0}', '{T0}')",
    "INSERT INTO webhook_deliveries (id, cooperative_id, endpoint_id, event_id, event_type, payload, status, "
    f"attempts, created_at, updated_at) VALUES ('d1', 'c1', 'w1', 'e1', 'payment.completed', '{{}}', 'DELIVERED', "
    f"'[]', '{T0}', '{T0}')",
]


def _sqlite_rows(path: str) -> dict[str, object]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return {"version": conn.execute("SELECT version_num FROM alembic_version").fetchone()[0],
                **{table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                   for table in ("members", "payments", "webhook_endpoints", "webhook_deliveries")},
                "leftovers": conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'").fetchall(),
                "broken references": conn.execute("PRAGMA foreign_key_check").fetchall()}


def test_sqlite_migrates_up_and_down_a_database_whose_rows_refer_to_the_copied_tables(tmp_path):
    """The embedded default upgraded from a release before 0007 with its members' payments and its webhooks'
    deliveries in it: 0006 and 0007 copy webhook_endpoints and members (batch migrations) and drop the
    originals, which SQLite's foreign keys refused while rows referred to them ("FOREIGN KEY constraint failed",
    every `migrate` and `run` after it too). The same for a downgrade past them, and for a database a failed
    `migrate` left with the copy of members (`_alembic_tmp_members`) beside it."""
    import sqlite3

    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config, migrate

    path = f"{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    head = ScriptDirectory.from_config(_alembic_config(settings)).get_current_head()
    command.upgrade(_alembic_config(settings), "0005")
    with sqlite3.connect(path) as conn:
        for statement in ROWS_AT_0005:
            conn.execute(statement)
        conn.execute("CREATE TABLE _alembic_tmp_members (id VARCHAR(36) NOT NULL)")  # a failed 0007's leftover
    migrate(settings)
    at_head = {"members": 1, "payments": 1, "webhook_endpoints": 1, "webhook_deliveries": 1, "leftovers": [],
               "broken references": []}
    assert _sqlite_rows(path) == {"version": head, **at_head}
    assert _diff(settings.database_url) == []
    command.downgrade(_alembic_config(settings), "0005")
    assert _sqlite_rows(path) == {"version": "0005", **at_head}
    migrate(settings)
    assert _sqlite_rows(path) == {"version": head, **at_head}
    assert _diff(settings.database_url) == []


def test_sqlite_0007_down_and_up_again_gives_a_released_number_back_its_nulls(tmp_path):
    """The embedded default's side of test_migration_round_trip (PostgreSQL only): a downgrade past 0007 writes a
    released member's placeholders ('' and 'released:<id>'), and the upgrade turns them back into NULL; left, she
    read as holding a number (phoneReleased false) whose empty ciphertext no key opens. 0007 is a batch migration
    here (the table copied), and its UPDATE concatenates with SQLite's ||."""
    import sqlite3

    from alembic import command

    from main import _alembic_config

    path = f"{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    command.upgrade(_alembic_config(settings), "0005")
    with sqlite3.connect(path) as conn:
        for statement in ROWS_AT_0005:
            conn.execute(statement)
    command.upgrade(_alembic_config(settings), "0007")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE members SET phone_enc = NULL, phone_index = NULL WHERE id = 'm1'")  # released
    command.downgrade(_alembic_config(settings), "0006")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT phone_enc, phone_index FROM members").fetchall() == [("", "released:m1")]
    command.upgrade(_alembic_config(settings), "0007")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT phone_enc, phone_index FROM members").fetchall() == [(None, None)]
