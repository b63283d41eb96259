"""A run of a reply to STOP whose lease lapsed before it stored its message (a worker stalled: a long GC pause,
SIGSTOP), after it judged the reply still true, must not store and send it once the run holding the job found her
START taken since and ended the job with the reply's give-back (switched_since, nothing stored)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from channels.sms.jobs import GIVE_BACK_JOB, SmsJobs
from channels.sms.templates import render
from core.models import SmsMessage
from tests.channels.sms.helpers import jobs_of, stalled_run
from tests.channels.sms.test_routes import ALINE
from tests.channels.sms.test_stop_start_order import _replies_to_status, _text
from tests.conftest import drain


@pytest.mark.usefixtures("limiter_clock")
async def test_a_lapsed_run_of_a_reply_switched_since_and_given_back_stores_and_sends_nothing(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run A of her STOP's reply judges it true (her STOP is the latest word) and stalls building it, past its lease
    and its send lock. Her START is taken; run B claims the job, finds the reply switched since with nothing stored,
    and ends the job with its give-back, which runs. Then A wakes up: it must store and send nothing. Stored and sent,
    she read "no more reminders" last while her START had turned them back on, and that reply was given back too
    (5 of her next 5 keywords answered: 7 replies in her 10 minutes)."""
    await _text(sms_client, "STOP", "at-1", "2026-01-15 10:00:00")
    real_build, stalled, go = SmsJobs._build, asyncio.Event(), asyncio.Event()

    async def build(self: Any, conn: Any, payload: Any, **kwargs: Any) -> Any:
        if payload["template"] == "opted_out" and not stalled.is_set():  # run A: stalls here
            stalled.set()
            await asyncio.wait_for(go.wait(), 30)
        return await real_build(self, conn, payload, **kwargs)

    monkeypatch.setattr(SmsJobs, "_build", build)
    run_a, _ = await stalled_run(rt, stalled)  # A's lease lapses, and so does its send lock
    await _text(sms_client, "START", "at-2", "2026-01-15 10:00:05")
    await drain(worker)  # run B (switched since, nothing stored: DONE, its give-back queued), the START's reply
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    go.set()
    await run_a
    async with rt.sessionmaker() as session:
        stored = (await session.execute(select(SmsMessage.template, SmsMessage.status))).all()
    assert [m["message"] for m in sim.messages(ALINE)] == [render("opted_in", "rw", {})]
    assert stored == [("opted_in", "SENT")], stored
    assert (await jobs_of(rt, "sms.send"))[0].status == "DONE"
    assert await _replies_to_status(rt, sms_client, 5) == 4
