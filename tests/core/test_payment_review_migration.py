"""Migration 0024: a payment's review columns (reviewed_detail, reviewed_by, reviewed_at, review_note) come and go
with the revision, a payment keeping its other columns, on PostgreSQL and SQLite; the models and the migrations
agree again at head."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import make_settings, requires_pg
from tests.core.test_migrations import _diff

COLUMNS = ["review_note", "reviewed_at", "reviewed_by", "reviewed_detail"]


@requires_pg
async def test_0024_review_columns_come_and_go_on_postgres(migrated_database: str) -> None:
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))

    async def columns() -> list[str]:
        rows = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'payments' "
                                "AND column_name = ANY($1::text[]) ORDER BY column_name", COLUMNS)
        return [r["column_name"] for r in rows]

    try:
        assert await columns() == COLUMNS
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0023")
        assert await columns() == []
        await asyncio.to_thread(command.upgrade, _alembic_config(settings), "0024")
        assert await columns() == COLUMNS
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)
    assert await asyncio.to_thread(_diff, migrated_database) == []


def test_0024_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    import sqlite3

    from alembic import command

    from main import _alembic_config, migrate

    path = tmp_path / "m.db"
    url = f"sqlite+aiosqlite:///{path}"
    settings = make_settings(DATABASE_URL=url)

    def columns() -> list[str]:
        with sqlite3.connect(path) as db:
            return sorted(row[1] for row in db.execute("PRAGMA table_info(payments)") if row[1] in COLUMNS)

    migrate(settings)
    assert columns() == COLUMNS
    command.downgrade(_alembic_config(settings), "0023")
    assert columns() == []
    migrate(settings)
    assert columns() == COLUMNS and _diff(url) == []
