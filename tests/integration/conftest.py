"""Integration fixtures: a Runtime and an HTTP client beside the process stack, and logs on failure.

The fixtures here are named so they never pull in the suite's `settings`/`rt` fixtures: those reset
the database the stack's processes are using.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import is_postgres
from tests.integration import procs

needs_servers = pytest.mark.skipif(
    not is_postgres() or not os.environ.get("REDIS_URL", "").startswith("redis://"),
    reason="needs PostgreSQL (DATABASE_URL) and Redis (REDIS_URL redis://...); run scripts/test.sh")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and procs.LIVE:
        report.sections.append(("gateway processes (log tails)", procs.all_tails(lines=25)))


def start_stack(folder: Path, database_url: str, redis_url: str, **kwargs: Any) -> procs.Stack:
    harness = procs.Harness(folder)
    stack = procs.Stack(harness, database_url, redis_url, **kwargs)
    try:
        stack.start()
    except BaseException:
        print(harness.tails(60))
        stack.stop()
        raise
    return stack


@pytest.fixture
async def gw(stack: procs.Stack) -> AsyncIterator[Any]:
    """A Runtime with the processes' settings (each module defines its `stack`): tests read rows through it."""
    from app import open_runtime

    async with open_runtime(stack.settings()) as rt:
        yield rt


@pytest.fixture
async def demo(gw: Any) -> dict[str, Any]:
    from core.demo import seed_demo

    async with gw.sessionmaker.begin() as s:  # idempotent: returns the ids `seed-demo` created
        return await seed_demo(s, gw.cipher)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
