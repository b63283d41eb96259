"""Alembic environment (async): the URL comes from the gateway's settings, never from alembic.ini."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
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


def _run(connection: Connection, lock_timeout_ms: int = 0) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _sqlite_before(connection)
    try:
        # One transaction per migration: a migration with an autocommit block (0004's CONCURRENTLY index builds)
        # then never commits the ones before it halfway, and a failed migration leaves the earlier ones applied
        # and recorded, so the next `migrate` resumes from it.
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=sqlite, compare_type=True, transaction_per_migration=True)
        # Where the database was when this migrate began (main's one line says it went from there): read here, once
        # any other migrate is done (the advisory lock), and at its first try. Read before it, a migrate that waited
        # for another said it went from where the other began, having applied nothing.
        config.attributes.setdefault("revisions_before", set(context.get_context().get_current_heads()))
        if lock_timeout_ms:
            _autocommit_blocks_wait(context.get_context(), lock_timeout_ms)
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
            lock_timeout, retries = 0.0, 0
            if engine.dialect.name == "postgresql":
                await stack.enter_async_context(_one_migrate_at_a_time(engine))
                lock_timeout, retries = _lock_limits()
            if not lock_timeout:
                async with engine.connect() as conn:
                    await conn.run_sync(_run)
                    await conn.commit()
            else:
                await _run_in_short_lock_waits(engine, lock_timeout, retries)
    finally:
        await engine.dispose()


def _lock_limits() -> tuple[float, int]:
    """MIGRATE_LOCK_TIMEOUT_SECONDS and MIGRATE_LOCK_RETRIES (main passes them; `alembic` run by hand reads them)."""
    if "lock_timeout_seconds" in config.attributes:
        return float(config.attributes["lock_timeout_seconds"]), int(config.attributes.get("lock_retries", 0))
    from core.config import load_settings

    settings = load_settings()
    return settings.migrate_lock_timeout_seconds, settings.migrate_lock_retries


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a statement that gave up at its lock_timeout
BACKOFF_SECONDS, MAX_BACKOFF_SECONDS = 1.0, 30.0
# What the migration's connection waits for (an ungranted lock) and who holds it or is queued before it.
_LOCK_WAITS = sa.text("""
SELECT coalesce(w.relation::regclass::text, w.locktype || ' lock') AS waited_for, w.mode, blocker.pid,
       b.usename, b.application_name, b.state, extract(epoch FROM now() - b.xact_start)::bigint AS age
FROM pg_locks w
CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocker(pid)
LEFT JOIN pg_stat_activity b ON b.pid = blocker.pid
WHERE w.pid = :pid AND NOT w.granted
ORDER BY b.xact_start NULLS LAST, blocker.pid""")


async def _run_in_short_lock_waits(engine: AsyncEngine, lock_timeout: float, retries: int) -> None:
    """PostgreSQL: the migrations run with a lock_timeout. An ALTER TABLE waiting for its ACCESS EXCLUSIVE lock
    behind a long transaction (a CSV export, an admin's session left open) queues every later read and write of
    that table behind it: the gateway stalled for as long as that transaction lasted. A statement that waited
    `lock_timeout` gives up; its migration is rolled back (the ones before it stay applied) and tried again after a
    pause (1 s, doubling, at most 30 s), with a WARNING naming the lock and the transactions it waited for; after
    `retries` such tries, `migrate` stops (a CommandError: exit 3) naming them. The autocommit blocks
    (CREATE INDEX CONCURRENTLY, 0020's backfill) wait without a limit, as before: they hold up no reads or writes
    while they wait for the transactions open when they started, and a build given up there would leave an
    INVALID index. Runs under _one_migrate_at_a_time: the advisory lock is kept across the tries."""
    timeout_ms = max(1, round(lock_timeout * 1000))
    for attempt in range(retries + 1):
        waits: list[Any] = []
        async with engine.connect() as conn:
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            await conn.execute(sa.text(f"SET lock_timeout = {timeout_ms}"))
            await conn.commit()
            watch = asyncio.create_task(_watch_lock_waits(engine, pid, lock_timeout, waits))
            try:
                await conn.run_sync(_run, timeout_ms)
                await conn.commit()
                return
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
                failed = exc
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
        what = f"migration {await _failed_step(engine)}"
        lock = f"{waits[0].mode} on {waits[0].waited_for}" if waits else "its lock"
        if attempt == retries:
            # One line (main prints at most 300 characters of it): the oldest blocker; the WARNINGs name more.
            raise CommandError(
                f"{what} never got {lock} ({attempt + 1} tries of {lock_timeout:g} s, "
                f"MIGRATE_LOCK_TIMEOUT_SECONDS): blocked by {_blockers(waits, 1)}; end it or wait, then run "
                "migrate again") from failed
        pause = min(BACKOFF_SECONDS * 2 ** attempt, MAX_BACKOFF_SECONDS)
        log.warning("%s waited %g s (MIGRATE_LOCK_TIMEOUT_SECONDS) for %s, blocked by %s (statement: %s): gave up "
                    "so as not to hold up the gateway's queries queued behind it; trying again in %g s "
                    "(try %d of %d)", what, lock_timeout, lock, _blockers(waits, 3),
                    " ".join(str(failed.statement or "").split())[:200], pause, attempt + 2, retries + 1)
        await asyncio.sleep(pause)


def _blockers(waits: list[Any], most: int) -> str:
    """The transactions the migration waited for, the oldest first, at most `most` of them by name."""
    if not waits:
        return "a transaction not seen in time (look in pg_stat_activity for an old xact_start)"
    named = [_blocker(row) for row in waits[:most]]
    more = f" and {len(waits) - most} more" if len(waits) > most else ""
    return ", ".join(named) + more


def _blocker(row: Any) -> str:
    """pg_blocking_pids names a prepared transaction pid 0. A session of another role than the migrating one (an
    admin's psql as postgres, while migrate runs as the database's owner) shows its user and application_name but
    not its state or age, unless the role is a superuser or has pg_read_all_stats."""
    if row.pid == 0:
        return "a prepared transaction (pg_prepared_xacts)"
    if row.state is not None:
        return (f"pid {row.pid} (application_name {row.application_name!r}, state {row.state!r}, transaction open "
                f"{row.age} s)")
    if row.usename is not None:
        return (f"pid {row.pid} (user {row.usename!r}, application_name {row.application_name!r}; its state and age "
                "are hidden from this role: see pg_stat_activity as a superuser)")
    return f"pid {row.pid} (no longer in pg_stat_activity)"


async def _watch_lock_waits(engine: AsyncEngine, pid: int, lock_timeout: float, waits: list[Any]) -> None:
    """Keeps in `waits` what the migration's connection `pid` last waited for and who held it: once its statement
    gave up, its backend waits for nothing any more. Short queries on a connection of its own, committed at once
    (no snapshot held for a CREATE INDEX CONCURRENTLY to wait for)."""
    every = min(max(lock_timeout / 4, 0.05), 1.0)
    try:
        async with engine.connect() as watcher:
            while True:
                await asyncio.sleep(every)
                rows = (await watcher.execute(_LOCK_WAITS, {"pid": pid})).all()
                await watcher.commit()
                if rows:
                    waits[:] = rows
    except (DBAPIError, OSError) as exc:  # only the messages lose their detail: the migration goes on
        log.warning("cannot watch the migration's lock waits: %s", exc.__class__.__name__)


async def _failed_step(engine: AsyncEngine) -> str:
    """The migration that gave up, as alembic names it ("upgrade 0023 -> 0024"): the one after the database's
    version, its own transaction rolled back (transaction_per_migration). Read from the database, as alembic's
    "Running upgrade" line is not logged below LOG_LEVEL=INFO."""
    from alembic.script import ScriptDirectory

    async with engine.connect() as conn:
        there = await conn.scalar(sa.text("SELECT to_regclass('alembic_version') IS NOT NULL"))
        version = await conn.scalar(sa.text("SELECT version_num FROM alembic_version")) if there else None
    for revision in ScriptDirectory.from_config(config).walk_revisions():
        down = revision.down_revision
        if down == version or (isinstance(down, tuple) and version in down):
            return f"upgrade {version or '<base>'} -> {revision.revision}"
    return "(step unknown)"


def _autocommit_blocks_wait(migration: MigrationContext, lock_timeout_ms: int) -> None:
    """The migration's autocommit blocks run without the lock_timeout (see _run_in_short_lock_waits): CREATE INDEX
    CONCURRENTLY waits, by design, for the transactions open when it starts."""
    block = migration.autocommit_block

    @contextmanager
    def waiting_block() -> Iterator[None]:
        with block():
            assert migration.connection is not None
            migration.connection.exec_driver_sql("SET lock_timeout = 0")
            yield
            migration.connection.exec_driver_sql(f"SET lock_timeout = {lock_timeout_ms}")

    setattr(migration, "autocommit_block", waiting_block)  # noqa: B010 - an instance's method, for this run only


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
