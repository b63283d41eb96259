"""Checks every index-only migration's tests share: its indexes come and go with the revision on PostgreSQL, and on
SQLite (the embedded default) the revision downgrades and upgrades again with the models and migrations agreeing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tests.conftest import make_settings
from tests.core.test_growth_indexes import pg_indexes, sqlite_indexes


async def check_comes_and_goes(migrated_database: str, indexes: Mapping[str, str], revision: str,
                               previous: str) -> None:
    """PostgreSQL: `indexes` (name -> "table (columns)[ WHERE ...]" as pg_get_indexdef prints it) are valid at head,
    gone at `previous`, valid again at `revision`; the database is left at head whatever happens."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    built = {name: (True, d) for name, d in indexes.items()}
    try:
        assert await pg_indexes(conn, list(indexes)) == built
        await asyncio.to_thread(command.downgrade, cfg, previous)
        assert await pg_indexes(conn, list(indexes)) == {}
        await asyncio.to_thread(command.upgrade, cfg, revision)
        assert await pg_indexes(conn, list(indexes)) == built
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)


def check_sqlite_round_trip(tmp_path: Any, names: list[str], previous: str) -> dict[str, str]:
    """SQLite: the indexes `names` built at head, gone at `previous`, the same again at head (a second migrate does
    nothing), the models and the migrations agreeing. Returns head's indexes (name -> CREATE INDEX statement)."""
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migrations import _diff

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        after = sqlite_indexes(engine)
        assert set(names) <= set(after) and _diff(url) == []
        command.downgrade(_alembic_config(settings), previous)
        assert not set(names) & set(sqlite_indexes(engine))
        migrate(settings)
        migrate(settings)
        assert sqlite_indexes(engine) == after and _diff(url) == []
        return after
    finally:
        engine.dispose()
