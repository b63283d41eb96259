"""A `serve` host whose clock drifted still dates what it writes by PostgreSQL's clock (app.align_clock_once).

The workers measure a job's due time and a payment's approval window by PostgreSQL's now(); a `serve` six
minutes fast used to write its own now(): the collect job of every payment it took waited six minutes before
any worker would claim it (the member stared at the confirmation, no PIN prompt), and the approval window
ended six minutes late."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, text

import core.db
from app import align_clock_once, open_runtime
from core.db import make_engine, utcnow
from core.models import OutboxJob, Payment
from core.payments import create_payment
from tests.conftest import requires_pg
from tests.providers.wires import ADMIN, mtn_adapter, mtn_payment, mtn_wire

SKEW = 360.0
REQUEST_TO_PAY = "/collection/v1_0/requesttopay"


def _host_clock_off(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This process's host clock runs `seconds` off PostgreSQL's (the offset is put back after the test)."""
    real = time.time
    monkeypatch.setattr(core.db, "time", SimpleNamespace(time=lambda: real() + seconds, monotonic=time.monotonic))
    monkeypatch.setattr(core.db, "_clock_offset", 0.0)


@requires_pg
async def test_a_fast_serve_clock_does_not_delay_the_collect_or_stretch_the_window(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    wire = mtn_wire().on("POST", REQUEST_TO_PAY, 202)
    mtn_adapter(rt, wire)
    _host_clock_off(monkeypatch, SKEW)
    assert (utcnow() - core.db.datetime.now(core.db.UTC)).total_seconds() > SKEW - 5  # the premise
    async with open_runtime(rt.settings) as serve:  # a `serve` starting on that host
        assert abs(core.db.clock_offset() + SKEW) < 1
        assert abs((utcnow() - core.db.datetime.now(core.db.UTC)).total_seconds()) < 5
        async with serve.sessionmaker.begin() as s:
            payment, _ = await create_payment(s, serve, mtn_payment(demo), actor=ADMIN)
    async with rt.sessionmaker() as s:
        window = (await s.execute(select(func.extract("epoch", Payment.expires_at - func.now()))
                                  .where(Payment.id == payment.id))).scalar_one()
        collect_due = (await s.execute(select(OutboxJob.run_at <= func.now())
                                       .where(OutboxJob.kind == "payment.collect"))).scalar_one()
    assert abs(float(window) - rt.settings.payment_timeout_seconds) < 5
    assert collect_due
    await worker.run_once()  # a worker claims it now, not in six minutes: the member gets the PIN prompt
    assert len(wire.sent("POST", REQUEST_TO_PAY)) == 1


@requires_pg
async def test_a_slow_serve_clock_is_moved_forward_too(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _host_clock_off(monkeypatch, -SKEW)
    await align_clock_once(rt.sessionmaker.kw["bind"])
    assert abs(core.db.clock_offset() - SKEW) < 1
    # Read between two of this process's clock readings: a loaded machine can pause between the query and a
    # reading after it for longer than the 1 s allowed.
    async with rt.sessionmaker() as s:
        before = utcnow()
        db_now = (await s.execute(text("SELECT clock_timestamp()"))).scalar_one()
        after = utcnow()
    assert before - timedelta(seconds=1) < db_now < after + timedelta(seconds=1)


async def test_a_database_that_cannot_be_read_keeps_the_offset_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(core.db, "_clock_offset", 1.5)
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:9/nowhere")  # nothing listens on port 9
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            await align_clock_once(engine)
    finally:
        await engine.dispose()
    assert core.db.clock_offset() == 1.5
    assert any("could not read the database's clock" in r.getMessage() for r in caplog.records)


async def test_sqlite_has_no_other_clock(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.db, "_clock_offset", 0.0)
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/one.db")
    try:
        await align_clock_once(engine)
    finally:
        await engine.dispose()
    assert core.db.clock_offset() == 0.0


@requires_pg
async def test_sessions_are_in_utc_whatever_the_servers_default_zone(rt: Any, demo: dict[str, Any]) -> None:
    """initdb writes the host's zone into postgresql.conf (a server set up in Kigali: TimeZone=Africa/Kigali);
    the ops page keys its payments-per-minute chart by UTC minute and drew nothing."""
    from core.ops import dashboard

    url = rt.settings.database_url
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    async with rt.sessionmaker() as s:
        await s.execute(text(f'ALTER DATABASE "{name}" SET timezone = \'Africa/Kigali\''))
        await s.commit()
    engine = make_engine(url)
    try:
        async with rt.sessionmaker.begin() as s:
            payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
        from core.db import make_sessionmaker

        async with make_sessionmaker(engine)() as s:
            assert (await s.execute(text("SHOW TimeZone"))).scalar_one() == "UTC"
            figures = await dashboard(s, demo["cooperative_id"])
    finally:
        await engine.dispose()
        async with rt.sessionmaker() as s:
            await s.execute(text(f'ALTER DATABASE "{name}" RESET timezone'))
            await s.commit()
    assert {r["minute"] for r in figures["paymentsPerMinute"]} == {payment.updated_at.strftime("%Y-%m-%dT%H:%M")}
