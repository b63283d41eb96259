"""Migration 0011: the single-column cooperative_id indexes a composite already covers are gone, the composites
that cover them are there, and a downgrade builds them again."""

from __future__ import annotations

import asyncio

from migrations.online import IndexSpec
from tests.conftest import make_settings, requires_pg

DROPPED = ("ix_payments_cooperative_id", "ix_refunds_cooperative_id", "ix_sms_messages_cooperative_id",
           "ix_webhook_deliveries_cooperative_id", "ix_ussd_sessions_cooperative_id", "ix_members_cooperative_id")


async def _leading_cooperative_id(conn) -> dict[str, list[str]]:
    """Per table, the indexes (unique constraints' too) whose first column is cooperative_id."""
    rows = await conn.fetch(
        "SELECT t.relname AS tbl, c.relname AS idx FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
        "WHERE a.attname = 'cooperative_id' AND t.relname = ANY($1::text[]) ORDER BY 1, 2",
        ["payments", "refunds", "sms_messages", "webhook_deliveries", "ussd_sessions", "members"])
    found: dict[str, list[str]] = {}
    for r in rows:
        found.setdefault(r["tbl"], []).append(r["idx"])
    return found


@requires_pg
async def test_0011_leaves_one_index_leading_with_cooperative_id_where_there_were_two(migrated_database):
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    cfg = _alembic_config(make_settings())
    try:
        after = await _leading_cooperative_id(conn)
        assert not set(DROPPED) & {name for names in after.values() for name in names}
        # Every table still has an index to find a cooperative's rows by.
        assert sorted(after) == ["members", "payments", "refunds", "sms_messages", "ussd_sessions",
                                 "webhook_deliveries"]
        await asyncio.to_thread(command.downgrade, cfg, "0010")
        before = await _leading_cooperative_id(conn)
        assert {table: sorted(set(names) - set(after[table])) for table, names in before.items()} == {
            name.removeprefix("ix_").removesuffix("_cooperative_id"): [name] for name in DROPPED}
        await asyncio.to_thread(migrate, make_settings())
        assert await _leading_cooperative_id(conn) == after
    finally:
        await asyncio.to_thread(migrate, make_settings())  # at head again, whatever happened
        await conn.close()


def test_0011_downgrades_and_upgrades_again_on_sqlite(tmp_path):
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/gw.db")

    def names() -> set[str]:
        with engine.connect() as c:
            return {r[0] for r in c.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'index'"))}

    assert not set(DROPPED) & names()
    command.downgrade(_alembic_config(settings), "0010")
    assert set(DROPPED) <= names()
    migrate(settings)
    assert not set(DROPPED) & names()
    engine.dispose()


def test_0011_names_revision_0001s_indexes():
    """The names dropped are the ones 0001 created (op.f names), and the list is what the migration drops."""
    from importlib import import_module

    spec: tuple[IndexSpec, ...] = import_module("migrations.versions.0011_drop_redundant_coop_indexes").INDEXES
    assert tuple(name for name, _t, _c in spec) == DROPPED
    initial = (import_module("migrations.versions.0001_initial_schema").__file__ or "")
    with open(initial) as f:
        text = f.read()
    for name, table, columns in spec:
        assert f"op.create_index(op.f('{name}'), '{table}', {columns!r}, unique=False)" in text
