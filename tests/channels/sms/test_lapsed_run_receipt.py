"""A run of a receipt's 'sms.send' whose lease lapsed before it stored its message (a worker stalled: a long GC pause,
SIGSTOP) must store and send nothing once another run holds the job: every SMS is stored only while its run holds
its job (channels.sms.jobs._insert_leased), not only a keyword's reply. Before, run A stored and sent a receipt of a
job an admin had discarded, or one the run holding the job had found void since (its payment voided), and it sent the
receipt a second time while the run holding the job sent it (two copies)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.jobs import SmsJobs
from core.models import Payment, SmsMessage
from core.outbox import PermanentJobError
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import jobs_of, stalled_run
from tests.channels.sms.test_send_faults import ALINE, queue_receipt
from tests.conftest import drain


async def _stall_run_a(rt: Any, monkeypatch: Any, then: Any) -> tuple[asyncio.Task[None], asyncio.Event, Any]:
    """Claim the receipt's job and start run A, which builds the receipt (reading its payment as it is) and stalls
    before storing it until `go` is set; then its lease lapses, and so does its send lock. Later builds do `then`
    (None: build as usual). (run A's task, go, its job)"""
    real_build, stalled, go = SmsJobs._build, asyncio.Event(), asyncio.Event()

    async def build(self: Any, conn: Any, payload: Any, **kwargs: Any) -> Any:
        if stalled.is_set():  # run B
            return await (then or real_build)(self, conn, payload, **kwargs)
        built = await real_build(self, conn, payload, **kwargs)  # run A: built, then stalls
        stalled.set()
        await asyncio.wait_for(go.wait(), 30)
        return built

    monkeypatch.setattr(SmsJobs, "_build", build)
    run_a, job = await stalled_run(rt, stalled)  # A's lease lapses, and so does its send lock
    return run_a, go, job


async def _stored(rt: Any) -> list[tuple[str, str]]:
    async with rt.sessionmaker() as session:
        return [tuple(row) for row in (await session.execute(select(SmsMessage.template, SmsMessage.status))).all()]


async def test_a_lapsed_run_of_a_receipt_sends_nothing_once_its_job_was_parked_and_discarded(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run B parks the job before storing anything (its build refused), and an admin discards it. Run A then wakes
    up: before, it stored the receipt and sent it, an SMS of a DISCARDED job."""

    async def refused(self: Any, conn: Any, payload: Any, **kwargs: Any) -> Any:
        raise PermanentJobError("cooperative not found")

    await queue_receipt(rt, demo)
    run_a, go, job = await _stall_run_a(rt, monkeypatch, refused)
    await drain(worker)  # run B: parked
    assert (await jobs_of(rt, "sms.send"))[0].status == "PARKED"
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": "not needed"})
    go.set()
    await run_a
    assert (await jobs_of(rt, "sms.send"))[0].status == "DISCARDED"
    assert sim.messages(ALINE) == [] and await _stored(rt) == []


async def test_a_lapsed_run_of_a_receipt_sends_nothing_once_the_run_holding_its_job_found_it_void(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run A built the receipt while its payment held the money; the desk voided the recording; run B finds the
    receipt void (payment_voided: nothing stored, the job DONE "not sent"). Before, A woke up and sent it all the same:
    "we received ..." for money the cooperative has just taken off her record."""
    await queue_receipt(rt, demo)
    run_a, go, _ = await _stall_run_a(rt, monkeypatch, None)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Payment).values(status="VOIDED"))
    await drain(worker)  # run B: not sent
    [ended] = await jobs_of(rt, "sms.send")
    assert (ended.status, ended.last_error) == ("DONE", "not sent: payment_voided")
    go.set()
    await run_a
    assert sim.messages(ALINE) == [] and await _stored(rt) == []


@pytest.mark.parametrize("when", ["while_it_sends", "after_it_sent"])
async def test_a_lapsed_run_of_a_receipt_does_not_send_it_again_beside_the_run_holding_its_job(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any, when: str
) -> None:
    """Run B stores the receipt and sends it. Run A wakes up while B's request is out (`while_it_sends`), or once it
    is recorded SENT. Before, A found B's row still QUEUED and sent it too: she got the receipt twice. (Once it is
    SENT, A found it sent and stopped: that held before too.)"""
    await queue_receipt(rt, demo)
    run_a, go, _ = await _stall_run_a(rt, monkeypatch, None)
    real_send, sends = rt.sms.send, []

    async def send(phone: Any, body: str) -> Any:
        sends.append(body)
        if len(sends) == 1 and when == "while_it_sends":  # B's request is out: A wakes up and runs to its end
            go.set()
            await asyncio.wait_for(asyncio.shield(run_a), 30)
        return await real_send(phone, body)

    monkeypatch.setattr(rt.sms, "send", send)
    await drain(worker)  # run B: stored and sent
    go.set()
    await run_a
    assert len(sends) == 1 and len(sim.messages(ALINE)) == 1, (sends, sim.messages(ALINE))
    assert await _stored(rt) == [("payment_receipt", "SENT")]
    [done] = await jobs_of(rt, "sms.send")
    assert done.status == "DONE"
