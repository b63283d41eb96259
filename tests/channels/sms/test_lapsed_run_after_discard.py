"""A run of an 'sms.send' whose lease lapsed before it stored its message (a worker stalled: a long GC pause, SIGSTOP)
stored and sent it after another worker's run parked the job and an admin discarded it: a keyword's reply is stored
only while its run holds its job (channels.sms.jobs._insert_leased)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from channels.sms.jobs import GIVE_BACK_JOB, SmsJobs
from core.models import SmsMessage
from core.outbox import PermanentJobError
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import jobs_of, stalled_run
from tests.channels.sms.test_routes import inbound
from tests.channels.sms.test_send_faults import ALINE
from tests.conftest import drain


@pytest.mark.usefixtures("limiter_clock")
async def test_a_run_whose_lease_lapsed_before_it_stored_its_message_sends_nothing_once_discarded(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run A of her HELP's reply stalls while building it (its send lock taken), past its lease and its lock. Run B
    claims the job and parks it (its build refused), storing nothing; an admin discards it, which gives the reply's
    count back (none stored: never sent). Then A wakes up, stores the reply and sends it: a reply of a discarded job,
    uncounted."""
    await inbound(sms_client, ALINE, "HELP", "in-help")
    real_build, stalled, go = SmsJobs._build, asyncio.Event(), asyncio.Event()

    async def build(self: Any, conn: Any, payload: Any, **kwargs: Any) -> Any:
        if not stalled.is_set():  # run A: stalls here
            stalled.set()
            await asyncio.wait_for(go.wait(), 30)
            return await real_build(self, conn, payload, **kwargs)
        raise PermanentJobError("cooperative not found")  # run B: parks, nothing stored

    monkeypatch.setattr(SmsJobs, "_build", build)
    run_a, job = await stalled_run(rt, stalled)  # A's lease lapses, and so does its send lock
    await drain(worker)  # run B
    assert (await jobs_of(rt, "sms.send"))[0].status == "PARKED"
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": "not needed"})
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    go.set()
    await run_a
    async with rt.sessionmaker() as session:
        stored = (await session.execute(select(SmsMessage.status))).scalars().all()
    assert (await jobs_of(rt, "sms.send"))[0].status == "DISCARDED"
    assert sim.messages(ALINE) == [] and stored == [], (sim.messages(ALINE), stored)
