"""SQLite (the embedded default): a request cancelled while aiosqlite runs one of its writes does not leave the
database's write lock held. SQLAlchemy invalidates a connection whose statement was cancelled and closes it; a write
with RETURNING (a payment's INSERT, the reference counter's) still had its statement open, and the sqlite3 connection
closed with it became a "zombie" that kept its transaction, and the write lock, until the garbage collector freed the
cursor (30 to 60 s; every write meanwhile waited busy_timeout, then "database is locked", a 503)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
from contextlib import suppress
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SAWarning

from core.db import make_engine, make_sessionmaker
from tests.conftest import cancelled_at


def _write_elsewhere(path: Path) -> float:
    """Seconds a write from another connection took (it gives up after 2 s, raising "database is locked")."""
    started = time.monotonic()
    other = sqlite3.connect(path, timeout=2)
    try:
        other.execute("INSERT INTO t (x) VALUES (2)")
        other.commit()
    finally:
        other.close()
    return time.monotonic() - started


@pytest.mark.parametrize("returning", [True, False])
async def test_a_write_cancelled_in_flight_does_not_keep_the_write_lock(tmp_path: Path, returning: bool) -> None:
    path = tmp_path / "cancelled.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    sm = make_sessionmaker(engine)
    try:
        async with sm() as s:
            await s.execute(text("CREATE TABLE t (x INTEGER)"))
            await s.commit()
        statement = "INSERT INTO t (x) VALUES (1)" + (" RETURNING x" if returning else "")
        cuts = 0
        for point in range(1, 20):
            kept: list[BaseException] = []
            begun = asyncio.Event()
            done = asyncio.Event()

            async def write() -> None:
                try:
                    async with sm() as s:
                        await s.execute(text("SELECT 1"))  # checked out, connected
                        begun.set()
                        await s.execute(text(statement))
                        done.set()
                        await asyncio.sleep(30)
                except asyncio.CancelledError as exc:
                    # Kept, as a request's error is for a while (its log record, a reference cycle): its traceback
                    # holds the cancelled statement's cursor.
                    kept.append(exc)
                    raise

            task = asyncio.create_task(write())
            await begun.wait()
            await cancelled_at(task, point)
            with suppress(asyncio.CancelledError):
                await task
            for _ in range(200):  # the connection's shielded close finishes after the task
                if engine.sync_engine.pool.checkedout() == 0:
                    break
                await asyncio.sleep(0.01)
            try:
                took = await asyncio.to_thread(_write_elsewhere, path)
            except sqlite3.OperationalError as exc:
                raise AssertionError(f"cut at wait {point}: {exc}") from exc
            assert took < 1.5, (point, took)
            assert kept
            if done.is_set():
                break  # cut at the sleep, past the write: every wait of the write was cut
            cuts += 1
        assert cuts >= 1
        async with sm() as s:  # the engine's own connections write too
            await s.execute(text("INSERT INTO t (x) VALUES (3)"))
            await s.commit()
            assert (await s.execute(text("SELECT count(*) FROM t WHERE x = 1"))).scalar_one() == 0
    finally:
        await engine.dispose()


async def test_a_connection_the_garbage_collector_closes_does_not_keep_the_write_lock(tmp_path: Path) -> None:
    """A connection never given back (its session never closed: a task destroyed while pending) with a write's
    statement still open, its cursor alive elsewhere (a kept traceback's): the pool's clean-up when the garbage
    collector finds it cannot await a rollback, and terminates it (aiosqlite's stop: a close on its thread). Without
    the rollback core.db queues ahead of that close, the sqlite3 connection kept its transaction and the write lock
    for as long as the cursor lived."""
    path = tmp_path / "collected.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn = await engine.connect()
        await conn.execute(text("SELECT 1"))  # its transaction begun
        driver = (await conn.get_raw_connection()).driver_connection
        # The write's statement open: a RETURNING row not read, as a write cancelled before its fetch leaves it.
        pending = await driver.execute("INSERT INTO t (x) VALUES (1) RETURNING x")
        worker = driver._thread
        del conn, driver
        with pytest.warns(SAWarning, match="garbage collector"):
            gc.collect()
        await asyncio.to_thread(worker.join, 5)  # its queue run: the rollback, then the close
        assert not worker.is_alive()
        try:
            took = await asyncio.to_thread(_write_elsewhere, path)
        except sqlite3.OperationalError as exc:
            raise AssertionError(f"the collected connection kept the write lock: {exc}") from exc
        assert took < 1.5, took
        del pending
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT x FROM t ORDER BY x"))).scalars().all() == [2]
    finally:
        await engine.dispose()
