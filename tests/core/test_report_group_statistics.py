"""Migration 0040: the planner knows how many groups the reconciliation's payment figures make (ndistinct statistics
on the keys core.reports.reconciliation groups payments by). Its figures are the tests of the report's; here, that the
statistics come with the revision and go with its downgrade."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import make_settings, requires_pg

KEYS = ["currency", "method", "payment_type_id", "provider", "status"]


@requires_pg
async def test_0040_statistics_come_and_go_with_the_revision(migrated_database: str) -> None:
    """Created at head (filled by the migration's ANALYZE), gone at 0039, created again at 0040."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))

    async def kinds() -> list[Any]:
        return [tuple(r) for r in await conn.fetch(
            "SELECT stxkind::text[], (SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute"
            " WHERE attrelid = stxrelid AND attnum = ANY(stxkeys)) FROM pg_statistic_ext"
            " WHERE stxname = 'st_payments_report_groups'")]

    try:
        assert await kinds() == [(["d"], KEYS)]
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), "0039")
        assert await kinds() == []
        await asyncio.to_thread(command.upgrade, _alembic_config(settings), "0040")
        assert await kinds() == [(["d"], KEYS)]
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)
