"""A PostgreSQL restore nobody followed with `main.py advance-references` (core.reference_mark): the reference
sequence went back, and new payments would be given references already on members' receipts. Redis, not restored
with it, keeps the sequence's high-water mark: `serve` and `worker` refuse to start behind it, the payment sweep
says so while running (one ERROR, gateway_reference_sequence_behind, /ops/data), and advance-references clears it.
A restore is what the tests do to the sequence: setval to a number below the references already handed out."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import text

from app import job_handlers
from core import metrics
from core.ops import dashboard
from core.outbox import Job
from core.reference_mark import (
    ACCEPT_FLAG,
    HIGH_WATER_KEY,
    ReferenceWatch,
    check_at_start,
    raise_mark,
    read_mark,
    refresh_gauge,
)
from core.references import next_reference
from main import _advance_references, build_parser
from tests.conftest import _base_env, requires_pg

ROOT = Path(__file__).resolve().parent.parent
pytestmark = requires_pg


@pytest.fixture(autouse=True)
async def _forget_the_mark(rt: Any) -> AsyncIterator[None]:
    """These tests leave the sequence behind the mark: a later test's `serve` or `worker` must not find it."""
    yield
    await rt.redis.delete(HIGH_WATER_KEY)


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=_base_env(), timeout=60, check=False, stdin=subprocess.DEVNULL)


def _number(reference: str) -> int:
    return int(reference.rsplit("_", 1)[1])


async def _restored(rt: Any) -> tuple[int, int]:
    """References handed out and marked (as a sweep marks them), then the database taken back before them, as a
    restore does: (the sequence now, the mark)."""
    async with rt.engine.connect() as conn:
        issued = [_number(await next_reference(conn, "PAY")) for _ in range(3)]
        await raise_mark(rt.redis, issued[-1])
        await conn.execute(text("SELECT setval('human_reference_seq', :n)"), {"n": issued[0]})
    return issued[0], issued[-1]


def _refusal(result: subprocess.CompletedProcess[str], sequence: int, mark: int) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
    assert lines == [f"refusing to start: the reference sequence (human_reference_seq) is at {sequence}, behind "
                     f"{mark}, the highest number it was seen at (Redis key {HIGH_WATER_KEY}): PostgreSQL was "
                     "restored from a backup, and new payments and refunds would be given references already on "
                     "members' receipts; run `.venv/bin/python main.py advance-references` first (or start with "
                     f"--accept-references-behind if no reference past {sequence} was ever handed out)"]


def _unreachable_redis() -> Redis:
    """A client of a port nothing listens on, failing at once (no retries)."""
    return Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def _worker_starts() -> None:
    """`main.py worker` starts (its "worker started" line), then stops on SIGTERM with exit 0."""
    proc = subprocess.Popen([sys.executable, "main.py", "worker"], cwd=ROOT, env=_base_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    said: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            said.append(line)
            if not line or "worker started" in line:
                break
        assert "worker started" in said[-1], "".join(said)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(said)


async def test_a_worker_restored_behind_the_mark_refuses_to_start_until_advance_references(rt: Any) -> None:
    sequence, mark = await _restored(rt)

    _refusal(_main("worker"), sequence, mark)
    assert await read_mark(rt.redis) == mark  # a refusal changes nothing

    assert await _advance_references(rt.settings, 5000) == 0
    advanced = sequence + 5000  # moved by --by from where it was
    assert await read_mark(rt.redis) == advanced  # raised: a second restore is caught too
    _worker_starts()


async def test_serve_restored_behind_the_mark_refuses_to_start(rt: Any) -> None:
    sequence, mark = await _restored(rt)
    _refusal(_main("serve"), sequence, mark)


async def test_a_redis_without_the_mark_has_nothing_to_compare(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with rt.engine.connect() as conn:
        await next_reference(conn, "PAY")
        issued = _number(await next_reference(conn, "PAY"))  # two handed out: 1 is behind
        await conn.execute(text("SELECT setval('human_reference_seq', 1)"))  # behind, but nothing says so
    with caplog.at_level(logging.INFO, logger="gateway.references"):
        at = await check_at_start(rt.engine, rt.redis, accept_behind=False)
    assert at is not None and at.issued == 1 and at.mark is None and issued > 1
    assert "no high-water mark of the reference sequence in Redis" in caplog.text
    assert await read_mark(rt.redis) == 1  # from now on a restore is caught


async def test_starting_behind_the_mark_on_purpose_lowers_it(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    sequence, mark = await _restored(rt)
    with caplog.at_level(logging.WARNING, logger="gateway.references"):
        at = await check_at_start(rt.engine, rt.redis, accept_behind=True)
    assert at is not None and (at.issued, at.mark) == (sequence, mark)
    assert "--accept-references-behind" in caplog.text
    assert await read_mark(rt.redis) == sequence
    assert not (await check_at_start(rt.engine, rt.redis, accept_behind=False)).behind  # type: ignore[union-attr]


def test_the_refusal_names_the_flag_serve_and_worker_take() -> None:
    for command in ("serve", "worker"):
        assert build_parser().parse_args([command, ACCEPT_FLAG]).accept_references_behind is True
        assert build_parser().parse_args([command]).accept_references_behind is False


async def test_redis_out_of_reach_at_start_does_not_stop_it(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    """As the rest of start-up treats Redis: a process starts without it and runs degraded; the sweep compares
    once Redis answers."""
    down = _unreachable_redis()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.references"):
            assert await check_at_start(rt.engine, down, accept_behind=False) is None
    finally:
        await down.aclose()
    assert "Redis unreachable" in caplog.text


async def test_the_mark_is_only_ever_raised(rt: Any) -> None:
    assert await raise_mark(rt.redis, 500) == 500
    assert await raise_mark(rt.redis, 20) == 500
    assert await read_mark(rt.redis) == 500
    assert await raise_mark(rt.redis, 501) == 501


def _sweep_job() -> Job:
    return Job(id=1, kind="payments.sweep", payload={}, attempts=1, max_attempts=3, created_at=datetime.now(UTC))


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "gateway.references"]


async def test_the_sweep_says_once_the_sequence_fell_behind_and_advance_references_clears_it(
        rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    sweep = job_handlers(rt)["payments.sweep"]
    async with rt.engine.connect() as conn:
        await next_reference(conn, "PAY")
    with caplog.at_level(logging.INFO, logger="gateway.references"):
        await sweep(_sweep_job())  # no mark yet: the sweep sets it
        assert metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 0
        assert _errors(caplog) == []

        sequence, mark = await _restored(rt)  # a restore under the running service
        await sweep(_sweep_job())
        await sweep(_sweep_job())
        assert len(_errors(caplog)) == 1 and "main.py advance-references" in _errors(caplog)[0]
        assert metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 1
        assert await read_mark(rt.redis) == mark  # never lowered by the sweep
        metrics.REFERENCE_SEQUENCE_BEHIND.set(0)  # another process's scrape finds it too
        await refresh_gauge(rt)
        assert metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 1
        async with rt.sessionmaker() as session:
            assert (await dashboard(session, redis=rt.redis))["referenceSequence"] == {
                "issued": sequence, "highWater": mark, "behind": True}

        assert await _advance_references(rt.settings, 1000) == 0
        await sweep(_sweep_job())
        assert "the reference sequence is past its high-water mark again" in caplog.text
        assert len(_errors(caplog)) == 1
    assert metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 0
    await refresh_gauge(rt)
    assert metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 0
    async with rt.sessionmaker() as session:
        assert (await dashboard(session, redis=rt.redis))["referenceSequence"]["behind"] is False


async def test_the_gauge_reads_nan_while_redis_is_out_of_reach(rt: Any) -> None:
    down = _unreachable_redis()
    try:
        await refresh_gauge(type("Down", (), {"engine": rt.engine, "redis": down})())  # type: ignore[arg-type]
    finally:
        await down.aclose()
    assert math.isnan(metrics.REFERENCE_SEQUENCE_BEHIND._value.get())


async def test_the_sweep_says_once_that_redis_cannot_be_asked(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    down = _unreachable_redis()
    watch, cut_off = ReferenceWatch(), type("CutOff", (), {"engine": rt.engine, "redis": down})()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.references"):
            assert await watch.check(cut_off) is None  # type: ignore[arg-type]
            assert await watch.check(cut_off) is None  # type: ignore[arg-type]
    finally:
        await down.aclose()
    assert caplog.text.count("could not compare the reference sequence") == 1
    assert math.isnan(metrics.REFERENCE_SEQUENCE_BEHIND._value.get())
    assert (await watch.check(rt)) is not None and metrics.REFERENCE_SEQUENCE_BEHIND._value.get() == 0


async def test_advance_references_short_of_the_mark_says_so(rt: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sequence, _ = await _restored(rt)
    await rt.redis.set(HIGH_WATER_KEY, str(sequence + 100))  # more were handed out than --by 10 skips
    assert await _advance_references(rt.settings, 10) == 1
    err = capsys.readouterr().err
    assert f"still behind its high-water mark {sequence + 100}" in err and "--by 90 or more" in err
    assert await read_mark(rt.redis) == sequence + 100
