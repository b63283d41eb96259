"""Alembic environment (async): the URL comes from the gateway's settings, never from alembic.ini."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import core.models  # noqa: F401 - registers every table on Base.metadata
from core.db import Base, make_engine

config = context.config
target_metadata = Base.metadata
log = logging.getLogger("alembic.runtime.migration")


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from core.config import load_settings

        url = load_settings().database_url
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=_url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _sqlite_before(connection)
    try:
        # One transaction per migration: a migration with an autocommit block (0004's CONCURRENTLY index builds)
        # then never commits the ones before it halfway, and a failed migration leaves the earlier ones applied
        # and recorded, so the next `migrate` resumes from it.
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=sqlite, compare_type=True, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if sqlite:
            connection.rollback()  # a failed migration's transaction, so that the pragma below takes effect
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def _sqlite_before(connection: Connection) -> None:
    """SQLite: foreign keys off while migrating (core.db turns them on for every connection). A batch migration
    (0006's webhook_endpoints, 0007's members, either way) copies its table, drops the original and renames the
    copy: with foreign keys on, SQLite refuses that DROP while any row refers to the table (a member with a
    payment), and `migrate` failed there for good ("FOREIGN KEY constraint failed"). The pragma is a no-op inside
    a transaction, so it is set before any. A copy such a failed batch left behind (`_alembic_tmp_<table>`, empty:
    its rows were rolled back, the original kept) is dropped, or the batch would refuse to make it again."""
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    tables = set(connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
    for name in sorted(tables):
        if name.startswith("_alembic_tmp_") and name.removeprefix("_alembic_tmp_") in tables:
            connection.exec_driver_sql(f'DROP TABLE "{name}"')
    connection.commit()


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), command_timeout=None)  # a migration may wait on locks or build an index
    try:
        async with AsyncExitStack() as stack:
            if engine.dialect.name == "postgresql":
                await stack.enter_async_context(_one_migrate_at_a_time(engine))
            async with engine.connect() as conn:
                await conn.run_sync(_run)
                await conn.commit()
    finally:
        await engine.dispose()


# Session-level advisory lock that `migrate` (and `alembic upgrade`/`downgrade`) holds on PostgreSQL while it runs.
MIGRATE_LOCK = 0x636F6F706D696772  # "coopmigr"


@asynccontextmanager
async def _one_migrate_at_a_time(engine: AsyncEngine) -> AsyncIterator[None]:
    """One migration run at a time per database: a second `migrate` (a deploy tool running it on every machine)
    waits for the first, then finds the revisions applied. Two at once ran the same revision together: the second
    took the first's index build in progress (INVALID, as an interrupted build leaves it) for a leftover, dropped it
    and built it again, and one of them died on a deadlock, or on a version stamp the other had moved.

    Held on a connection of its own, idle between tries (pg_try_advisory_lock, not a blocking wait): a waiting
    statement holds a snapshot, which the running migrate's CREATE INDEX CONCURRENTLY would wait for in turn."""
    async with engine.connect() as lock:
        waiting = False
        while not (await lock.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATE_LOCK})).scalar():
            await lock.commit()
            if not waiting:
                log.warning("another migrate is running on this database: waiting for it to finish")
                waiting = True
            await asyncio.sleep(1)
        await lock.commit()
        try:
            yield
        finally:
            await lock.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK})
            await lock.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online()) if config.attributes.get("connection") is None else _run(
        config.attributes["connection"])
