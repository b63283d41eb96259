"""Alembic environment (async): the URL comes from the gateway's settings, never from alembic.ini."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

import core.models  # noqa: F401 - registers every table on Base.metadata
from core.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


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
    # One transaction per migration: a migration with an autocommit block (0004's CONCURRENTLY index builds)
    # then never commits the ones before it halfway, and a failed migration leaves the earlier ones applied
    # and recorded, so the next `migrate` resumes from it.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True,
                      transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), command_timeout=None)  # a migration may wait on locks or build an index
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online()) if config.attributes.get("connection") is None else _run(
        config.attributes["connection"])
