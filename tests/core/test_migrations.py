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
    async def run() -> str:
        engine = make_engine(migrated_database)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO audit_events (actor, channel, action, entity_type, entity_id, at) "
                                        "VALUES ('t', 'test', 'x', 'y', 'z', now())"))
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE audit_events SET action = 'forged'"))
        except Exception as exc:
            return str(exc)
        finally:
            async with engine.begin() as conn:
                await conn.execute(text("TRUNCATE audit_events"))
            await engine.dispose()
        return "updated"

    assert "append-only" in asyncio.run(run())


def test_serve_refuses_an_unmigrated_database(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/empty.db", "REDIS_URL": "redis://127.0.0.1:1"}
    result = subprocess.run([sys.executable, "main.py", "serve"], capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 3
    assert "refusing to start" in result.stderr and "python main.py migrate" in result.stderr
