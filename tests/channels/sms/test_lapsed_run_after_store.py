"""A run of a receipt's 'sms.send' that stalls after it stored its message and before its request to Africa's Talking
(a long GC pause, SIGSTOP), past its lease. The run that takes its job over finds the row QUEUED, cannot tell a run that
sent from one that did not (the lapsed run's answer is not kept yet), and records it Unconfirmed without sending; then
the stalled run wakes up and sends it. One copy goes (only the stalled run sent), and the row must say what went: SENT
with Africa's Talking's message id, status and cost, so that the delivery reports for that id find it. Before, the
stalled run's outcome was dropped (the row had moved on): the row said Unconfirmed for ever, and the reports for its id
matched no row (parked an hour, then lost)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from core.models import AuditEvent, SmsMessage
from core.state.sms import SENT_UNCONFIRMED
from tests.channels.sms.conftest import gateway_app
from tests.channels.sms.helpers import hold_reports, jobs_of, stalled_run, start_simulator
from tests.channels.sms.test_send_faults import ALINE, queue_receipt, the_row


async def _stall_before_the_request(rt: Any, monkeypatch: Any) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Run A stores the receipt and stalls just before its request goes out, until `go` is set; its lease lapses,
    and its send lock with it. (run A's task, go)"""
    real_send, stalled, go = rt.sms.send, asyncio.Event(), asyncio.Event()

    async def send(phone: Any, body: str) -> Any:
        if not stalled.is_set():  # run A: its row stored, its request not out yet
            stalled.set()
            await asyncio.wait_for(go.wait(), 30)
        return await real_send(phone, body)

    monkeypatch.setattr(rt.sms, "send", send)
    run_a, _ = await stalled_run(rt, stalled)
    return run_a, go


async def _reported(sim: Any, count: int) -> None:
    for _ in range(200):
        if len(sim.reports_posted) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(sim.reports_posted)} delivery reports posted, {count} expected")


@pytest.mark.parametrize("failure", [None, "DeliveryFailure"])
async def test_a_stalled_run_that_sends_after_its_job_was_taken_over_records_what_went(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any, monkeypatch: Any, failure: str | None
) -> None:
    """Run B records the receipt Unconfirmed (A may have sent it) and sends nothing; A wakes up and sends it: one copy
    in her inbox, and the row says SENT with its id, then DELIVERED (or FAILED) by the simulator's report for that
    id, posted to the gateway over HTTP."""
    gateway = await aiohttp_server(gateway_app(rt))
    # The report held until the row is read as the send left it (a fixed delay let a loaded host's report come first).
    reports = hold_reports(monkeypatch)
    _, sim = await start_simulator(aiohttp_server, rt,
                                   delivery_url=str(gateway.make_url("/sms/africastalking/delivery")))
    if failure:
        sim.set_failure(failure, number=ALINE)
    await queue_receipt(rt, demo)
    run_a, go = await _stall_before_the_request(rt, monkeypatch)
    run_b = await worker.claim()
    assert [job.interrupted for job in run_b] == [True]
    await worker.run_job(run_b[0])  # B: the row QUEUED, its job interrupted: recorded Unconfirmed, not sent
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", SENT_UNCONFIRMED, None)
    assert sim.messages(ALINE) == []
    go.set()
    await run_a  # A: sends it
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status, row.failure_reason, row.cost) == (
        "SENT", went["id"], "Success", None, "RWF 20.0000")
    reports.set()
    await _reported(sim, 1)
    row = await the_row(rt)
    final = ("FAILED", "Failed") if failure else ("DELIVERED", "Success")
    assert (row.status, row.provider_status, row.provider_message_id) == (*final, went["id"])
    assert [r["answer"] for r in sim.reports_posted] == ["200"]
    async with rt.sessionmaker() as session:
        audits = (await session.execute(select(AuditEvent.action, AuditEvent.after).where(
            AuditEvent.entity_id == row.id).order_by(AuditEvent.id))).all()
    assert [action for action, _ in audits] == ["sms.sent", "sms.confirmed", f"sms.{final[0].lower()}"]
    assert audits[1].after["providerMessageId"] == went["id"]
    assert [job.status for job in await jobs_of(rt, "sms.send")] == ["DONE"]


async def test_a_stalled_run_that_wakes_before_the_takeover_is_recorded_once(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any, monkeypatch: Any
) -> None:
    """A wakes up and sends after B claimed the job but before B read the row: B finds A's answer (kept) or the row
    SENT, records nothing of its own and sends nothing. One copy, the row SENT with its id."""
    _, sim = await start_simulator(aiohttp_server, rt)
    await queue_receipt(rt, demo)
    run_a, go = await _stall_before_the_request(rt, monkeypatch)
    [job_b] = await worker.claim()
    go.set()
    await run_a
    await worker.run_job(job_b)
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) in {("SENT", went["id"]), ("DELIVERED", went["id"])}
    async with rt.sessionmaker() as session:
        stored = (await session.execute(select(SmsMessage.id))).scalars().all()
    assert stored == [row.id]


async def test_a_stalled_run_whose_send_is_refused_after_its_job_was_taken_over_records_the_refusal(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """As above, but Africa's Talking refuses the number (InvalidPhoneNumber): nothing went, and the row says
    REJECTED with the refusal, not SENT Unconfirmed ("may have gone")."""
    sim.set_failure("InvalidPhoneNumber", number=ALINE)
    await queue_receipt(rt, demo)
    run_a, go = await _stall_before_the_request(rt, monkeypatch)
    await worker.run_job((await worker.claim())[0])  # B: recorded Unconfirmed, not sent
    assert (await the_row(rt)).provider_status == SENT_UNCONFIRMED
    go.set()
    await run_a
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason, row.provider_message_id) == (
        "REJECTED", "InvalidPhoneNumber", "InvalidPhoneNumber", None)
    assert len(sim.requests) == 1 and sim.messages(ALINE) == []
    async with rt.sessionmaker() as session:
        actions = (await session.execute(select(AuditEvent.action).where(AuditEvent.entity_id == row.id)
                                         .order_by(AuditEvent.id))).scalars().all()
    assert actions == ["sms.sent", "sms.rejected"]


async def test_a_stalled_run_whose_send_is_refused_leaves_no_sent_time_on_the_refused_row(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """The taker's Unconfirmed stamped sent_at (SENT: it may have gone); the stalled run's refusal makes it REJECTED,
    never sent, so it has no sent time, as a message Africa's Talking refused at its first send has none (the admin
    API's sentAt said it was sent at the taker's recording)."""
    sim.set_failure("InvalidPhoneNumber", number=ALINE)
    await queue_receipt(rt, demo)
    run_a, go = await _stall_before_the_request(rt, monkeypatch)
    await worker.run_job((await worker.claim())[0])  # B: recorded Unconfirmed (sent_at stamped), not sent
    assert (await the_row(rt)).sent_at is not None
    go.set()
    await run_a
    row = await the_row(rt)
    assert (row.status, row.sent_at) == ("REJECTED", None)


async def test_a_stalled_run_that_sends_after_her_erasure_records_its_id_and_keeps_her_row_erased(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her erasure commits after the taker recorded the receipt Unconfirmed and before the stalled run's answer: the
    answer written on the row (its id, for the delivery reports) leaves her number and the text cleared, and is
    audited once."""
    from core.audit import Actor
    from core.members import erase_member
    from core.models import Member

    await queue_receipt(rt, demo)
    run_a, go = await _stall_before_the_request(rt, monkeypatch)
    await worker.run_job((await worker.claim())[0])  # B: recorded Unconfirmed, not sent
    async with rt.sessionmaker.begin() as session:
        member = await session.get(Member, demo["members"][ALINE])
        member.status = "SUSPENDED"  # erased only once suspended
        await session.flush()
        await erase_member(session, member, actor=Actor("admin:test", "admin"))
    erased = await the_row(rt)
    go.set()
    await run_a
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status) in {
        ("SENT", went["id"], "Success"), ("DELIVERED", went["id"], "Success")}
    assert (row.phone_enc, row.phone_index, row.phone_masked, row.body) == (
        erased.phone_enc, erased.phone_index, erased.phone_masked, erased.body) == ("", "", erased.phone_masked, "")
    async with rt.sessionmaker() as session:
        actions = (await session.execute(select(AuditEvent.action).where(AuditEvent.entity_id == row.id)
                                         .order_by(AuditEvent.id))).scalars().all()
    assert actions[:2] == ["sms.sent", "sms.confirmed"] and actions.count("sms.confirmed") == 1
