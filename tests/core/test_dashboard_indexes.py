"""Migration 0010: the ops page's and the jobs list's indexes exist, are valid, and match the queries' columns."""

from __future__ import annotations

import asyncio

from tests.conftest import make_settings, requires_pg

# name -> "table (columns)" as pg_get_indexdef prints it.
DASHBOARD_INDEXES = {
    "ix_payments_updated": "payments (updated_at)",
    "ix_payments_created": "payments (created_at)",
    "ix_ussd_sessions_started": "ussd_sessions (started_at)",
    "ix_ussd_sessions_coop_started": "ussd_sessions (cooperative_id, started_at)",
    "ix_sms_messages_created": "sms_messages (created_at)",
    "ix_sms_messages_coop_created": "sms_messages (cooperative_id, created_at)",
    "ix_webhook_deliveries_created": "webhook_deliveries (created_at)",
    "ix_webhook_deliveries_coop_created": "webhook_deliveries (cooperative_id, created_at)",
    "ix_outbox_jobs_coop_id": "outbox_jobs (cooperative_id, id)",
}


async def _indexes(conn) -> dict[str, tuple[bool, str]]:
    rows = await conn.fetch(
        "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY($1::text[])", list(DASHBOARD_INDEXES))
    return {r["relname"]: (r["indisvalid"], r["def"].split(" ON ")[1].replace("public.", "")
                           .replace("USING btree ", "")) for r in rows}


@requires_pg
async def test_0010_indexes_exist_and_are_valid_after_migrate(migrated_database):
    import asyncpg

    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await _indexes(conn) == {name: (True, d) for name, d in DASHBOARD_INDEXES.items()}
    finally:
        await conn.close()


@requires_pg
async def test_0010_downgrades_and_rebuilds_an_invalid_leftover(migrated_database):
    """Downgrading drops them; an INVALID index an interrupted concurrent build left is built again."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await asyncio.to_thread(command.downgrade, cfg, "0009")
        assert await _indexes(conn) == {}
        # What a killed `migrate` leaves: an INVALID index (here also of the wrong columns).
        await conn.execute("CREATE INDEX ix_outbox_jobs_coop_id ON outbox_jobs (cooperative_id)")
        await conn.execute("UPDATE pg_index SET indisvalid = false "
                           "WHERE indexrelid = 'ix_outbox_jobs_coop_id'::regclass")
        await asyncio.to_thread(command.upgrade, cfg, "0010")
        assert await _indexes(conn) == {name: (True, d) for name, d in DASHBOARD_INDEXES.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0010_downgrades_and_upgrades_again_on_sqlite(tmp_path):
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migrations import _diff

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    command.downgrade(_alembic_config(settings), "0009")
    migrate(settings)
    assert _diff(url) == []
