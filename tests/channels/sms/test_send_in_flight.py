"""A person's action that writes "not sent" on a message while a run's request for it is out (the row read QUEUED
before the send, Africa's Talking's answer not back yet): her erasure, the release of her number, an admin's discard of
its parked job. Africa's Talking took it, so the row must say it went (SENT with its id, so that its delivery report
finds it), not "not sent". And a run stalled past its lease whose own request never connected, after the run that took
its job over recorded the message Unconfirmed: nothing went, so it is sent (once), where an HTTP 5xx leaves it
Unconfirmed. In every case at most one copy reaches her (the simulator's messages)."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.jobs import SmsJobs
from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender
from core.audit import Actor
from core.config import Secret
from core.db import utcnow
from core.members import erase_member, release_phone
from core.models import AuditEvent, Member, OutboxJob
from core.state.sms import SENT_UNCONFIRMED
from tests.admin_api.conftest import bearer
from tests.channels.sms.conftest import gateway_app
from tests.channels.sms.helpers import hold_reports, jobs_of, stalled_run, start_simulator
from tests.channels.sms.test_send_faults import ALINE, queue_receipt, the_row
from tests.conftest import drain, requires_pg

pytestmark = requires_pg
ADMIN = Actor("admin:test", "admin")


def _hold_the_answer(rt: Any, monkeypatch: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """The first send reaches the simulator (Africa's Talking has the message) and its answer is held until `go` is
    set: the request is out. (out, go)"""
    real_send, out, go = rt.sms.send, asyncio.Event(), asyncio.Event()

    async def send(phone: Any, body: str) -> Any:
        result = await real_send(phone, body)
        if not out.is_set():
            out.set()
            await asyncio.wait_for(go.wait(), 30)
        return result

    monkeypatch.setattr(rt.sms, "send", send)
    return out, go


async def _suspended(session: Any, member_id: str) -> Member:
    member = await session.get(Member, member_id)
    member.status = "SUSPENDED"  # erased, or her number released, only once suspended
    await session.flush()
    return member


async def _erase(rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as session:
        await erase_member(session, await _suspended(session, demo["members"][ALINE]), actor=ADMIN)


async def _release(rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as session:
        await release_phone(session, await _suspended(session, demo["members"][ALINE]), actor=ADMIN)


async def _while_out(worker: Any, out: asyncio.Event, go: asyncio.Event, action: Any) -> None:
    """The worker's run of the receipt's job, its request out (`out` set) while `action` (awaited) commits; then its
    answer let through (`go`) and the run ended."""
    [job] = await worker.claim()
    run = asyncio.create_task(worker.run_job(job))
    await asyncio.wait_for(out.wait(), 30)
    await action
    go.set()
    await run


async def _actions(rt: Any, sms_id: str) -> list[str]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(select(AuditEvent.action).where(AuditEvent.entity_id == sms_id)
                                           .order_by(AuditEvent.id))).scalars().all())


async def _reported(rt: Any, sim: Any, count: int, status: str) -> Any:
    for _ in range(200):
        if len(sim.reports_posted) >= count and (row := await the_row(rt)).status == status:
            return row
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(sim.reports_posted)} delivery reports posted; the row {(await the_row(rt)).status}")


@pytest.mark.parametrize("action", ["erasure", "release"])
async def test_a_send_out_when_her_erasure_or_release_commits_is_recorded_sent_with_its_id(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any, monkeypatch: Any, action: str
) -> None:
    """The worker's request for her receipt is out when her erasure (or the release of her number) commits, which
    finds the row QUEUED and writes "not sent". Africa's Talking's answer then comes back: the row says SENT with its
    id, status and cost (audited sms.confirmed), and its delivery report, posted to the gateway over HTTP, finds it.
    An erased row keeps its number and text cleared; a released one keeps its number, as her rows sent before do.
    Before, the row said FAILED "not sent: member_erased" (or phone_released) though she had the text, and its report
    found no row."""
    gateway = await aiohttp_server(gateway_app(rt))
    reports = hold_reports(monkeypatch)  # until the row is read as the send left it
    _, sim = await start_simulator(aiohttp_server, rt,
                                   delivery_url=str(gateway.make_url("/sms/africastalking/delivery")))
    await queue_receipt(rt, demo)
    out, go = _hold_the_answer(rt, monkeypatch)
    [job] = await worker.claim()
    run = asyncio.create_task(worker.run_job(job))
    await asyncio.wait_for(out.wait(), 30)
    await (_erase if action == "erasure" else _release)(rt, demo)
    held = await the_row(rt)
    assert (held.status, held.failure_reason) == (
        "FAILED", "not sent: member_erased" if action == "erasure" else "not sent: phone_released")
    go.set()
    await run
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status, row.cost, row.failure_reason) == (
        "SENT", went["id"], "Success", "RWF 20.0000", None)
    assert row.sent_at is not None
    if action == "erasure":
        assert (row.phone_enc, row.phone_index, row.body) == ("", "", "")
    else:
        assert (row.phone_enc, row.phone_index, row.body) == (held.phone_enc, held.phone_index, held.body) != (
            "", "", "")
    assert await _actions(rt, row.id) == ["sms.failed", "sms.confirmed"]
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
    reports.set()
    row = await _reported(rt, sim, 1, "DELIVERED")
    assert (row.provider_message_id, [r["answer"] for r in sim.reports_posted]) == (went["id"], ["200"])
    assert len(sim.messages(ALINE)) == 1


async def test_a_send_out_when_her_erasure_commits_whose_answer_is_lost_is_recorded_unconfirmed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """As above, but the answer is lost (a read timeout after the request went): it may have gone, so the row says SENT
    Unconfirmed, not "not sent"; her number and text stay cleared."""
    import httpx

    real_http_send, out, go = rt.http.send, asyncio.Event(), asyncio.Event()

    async def http_send(request: Any, **kwargs: Any) -> Any:
        await real_http_send(request, **kwargs)  # Africa's Talking has it
        out.set()
        await asyncio.wait_for(go.wait(), 30)
        raise httpx.ReadTimeout("no answer", request=request)

    monkeypatch.setattr(rt.http, "send", http_send)
    await queue_receipt(rt, demo)
    await _while_out(worker, out, go, _erase(rt, demo))
    assert len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id, row.phone_enc, row.body) == (
        "SENT", SENT_UNCONFIRMED, None, "", "")
    assert row.failure_reason.startswith("unconfirmed, not resent: ReadTimeout")
    assert await _actions(rt, row.id) == ["sms.failed", "sms.sent"]


async def test_a_stalled_send_out_when_an_admin_discards_its_parked_job_is_recorded_sent_with_its_id(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run A's request for her receipt is out when A stalls past its lease; run B takes the job over and fails before
    it settles anything (its last attempt: parked, in doubt); an admin discards it, which writes "discarded by an
    admin" on the row still QUEUED. A's answer then comes back: the row says SENT with its id; the job stays
    DISCARDED."""
    await queue_receipt(rt, demo)
    out, go = _hold_the_answer(rt, monkeypatch)
    run_a, job = await stalled_run(rt, out)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(max_attempts=2))

    async def fails(self: Any, *args: Any) -> bool:
        raise ConnectionResetError("database went away")

    monkeypatch.setattr(SmsJobs, "_settled_before", fails)
    await drain(worker)  # run B: parked
    assert (await jobs_of(rt, "sms.send"))[0].status == "PARKED"
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": "not needed"})
    held = await the_row(rt)
    assert (held.status, held.failure_reason) == ("FAILED", "discarded by an admin: not needed")
    go.set()
    await run_a
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status, row.failure_reason) == (
        "SENT", went["id"], "Success", None)
    assert await _actions(rt, row.id) == ["sms.failed", "sms.confirmed"]
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DISCARDED"]


@pytest.mark.parametrize("action", ["erasure", "discard"])
async def test_a_send_out_when_her_erasure_or_a_discard_commits_that_is_refused_is_recorded_rejected(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any, action: str
) -> None:
    """Africa's Talking refuses the number while her erasure (or an admin's discard of the job) writes "not sent": the
    row ends REJECTED with Africa's Talking's status and reason, as any refused send does (the ops page's and the
    delivery rate's refusals count it: Africa's Talking had it, and said no), not FAILED Skipped ("never handed to
    Africa's Talking", false); no sent time, and an erased row's number and text stay cleared. Audited sms.rejected,
    a recovery (SMS.recoveries "rejected"), the person's "not sent" in its before. Before, it stayed FAILED Skipped."""
    sim.set_failure("InvalidPhoneNumber", number=ALINE)
    await queue_receipt(rt, demo)
    out, go = _hold_the_answer(rt, monkeypatch)
    if action == "erasure":
        held_back, reason = _erase(rt, demo), "not sent: member_erased"
    else:
        held_back, reason = _discard_while_running(rt, sms_client, demo), "discarded by an admin: not needed"
    await _while_out(worker, out, go, held_back)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason, row.provider_message_id, row.sent_at) == (
        "REJECTED", "InvalidPhoneNumber", "InvalidPhoneNumber", None, None)
    if action == "erasure":
        assert (row.phone_enc, row.body) == ("", "")
    assert sim.messages(ALINE) == []
    async with rt.sessionmaker() as session:
        audits = (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == row.id)
                                        .order_by(AuditEvent.id))).scalars().all()
    assert [a.action for a in audits] == ["sms.failed", "sms.rejected"]
    assert (audits[1].before["status"], audits[1].before["failureReason"]) == ("FAILED", reason)
    assert (audits[1].after["status"], audits[1].after["recovery"]) == ("REJECTED", "rejected")


async def _discard_while_running(rt: Any, sms_client: Any, demo: dict[str, Any]) -> None:
    """An admin's discard of the receipt's job, which the worker is running (its request out): parked first, as only
    a parked job is discarded (a run stalled past its lease, whose taker parked it, in real life)."""
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="PARKED"))
    [job] = await jobs_of(rt, "sms.send")
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": "not needed"})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _taken_over_then_sent(rt: Any, sim: Any, worker: Any, monkeypatch: Any, *, unreachable: bool,
                                failure: str = "http500", before_wake: Any = None, clock_stopped: bool = False
                                ) -> tuple[asyncio.Task[None], OutboxJob]:
    """Run A stores her receipt and stalls before its request, past its lease; run B records it Unconfirmed without
    sending; then A wakes up and sends, to no listening port (`unreachable`: no connection made) or to the simulator
    answering HTTP 500. `clock_stopped`: A's own clock did not count the stall (its host suspended: CLOCK_MONOTONIC
    stops; or stamped late, the loop stalled between its claim's statement and the Job it built), so A still reads
    itself inside its handler's time. (A's task, the job)"""
    real_send, stalled, go = rt.sms.send, asyncio.Event(), asyncio.Event()
    nowhere = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=f"http://127.0.0.1:{_closed_port()}", username="coop-test", api_key=Secret("k"),
        sender_id="COOPPAY"))

    async def send(phone: Any, body: str) -> Any:
        if not stalled.is_set():  # run A: its row stored, its request not out yet
            stalled.set()
            await asyncio.wait_for(go.wait(), 30)
            return await (nowhere.send if unreachable else real_send)(phone, body)
        return await real_send(phone, body)

    monkeypatch.setattr(rt.sms, "send", send)
    if not unreachable:
        sim.set_failure(failure, number=ALINE, times=1)
    run_a, job = await stalled_run(rt, stalled)
    if clock_stopped:
        object.__setattr__(job, "claimed", time.monotonic())
    await worker.run_job((await worker.claim())[0])  # B: recorded Unconfirmed, not sent
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", SENT_UNCONFIRMED, None)
    if before_wake is not None:
        await before_wake()
    go.set()
    await run_a
    async with rt.sessionmaker() as session:
        return run_a, await session.get(OutboxJob, job.id)


async def _handed_back_then_sent_once(rt: Any, sim: Any, worker: Any, job: OutboxJob) -> None:
    """The job handed back (PENDING, its last word "sent again: "), the next run sends it: one copy, the row SENT (or
    already DELIVERED) with its id, and nothing more on the runs after."""
    assert (job.status, job.locked_by) == ("PENDING", None) and job.last_error.startswith("sent again: ")
    await drain(worker)
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) in {("SENT", went["id"]), ("DELIVERED", went["id"])}
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1


async def test_a_stalled_run_that_cannot_connect_after_its_job_was_taken_over_has_it_sent_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """A's request never connected: nothing went, though B's record says it may have. The row goes back to QUEUED and
    the job to PENDING (its last word REOPENED, no doubt), and the next run sends it: one copy, the row SENT with its
    id. Before, the row stayed Unconfirmed and the job DONE: she never got her receipt."""
    await queue_receipt(rt, demo)
    _, job = await _taken_over_then_sent(rt, sim, worker, monkeypatch, unreachable=True)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason, row.sent_at) == ("QUEUED", None, None, None)
    assert (job.status, job.locked_by) == ("PENDING", None) and job.last_error.startswith("sent again: ")
    assert sim.messages(ALINE) == []
    await drain(worker)
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) in {("SENT", went["id"]), ("DELIVERED", went["id"])}
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
    assert await _actions(rt, row.id) in (["sms.sent", "sms.reopened", "sms.sent"],
                                          ["sms.sent", "sms.reopened", "sms.sent", "sms.delivered"])
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1


async def test_a_stalled_run_whose_clock_did_not_count_the_stall_that_cannot_connect_has_it_sent_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """As above, but A's own clock did not count its stall (a suspended host or VM: CLOCK_MONOTONIC stops; or its
    claim stamped late), so A reads itself inside its handler's time while the database's lease lapsed and B took
    the job over. Whether it was taken over is the database's to say, not A's clock: the row is handed back and sent
    once. Dropped otherwise: Unconfirmed, the job DONE, her receipt never sent."""
    await queue_receipt(rt, demo)
    _, job = await _taken_over_then_sent(rt, sim, worker, monkeypatch, unreachable=True, clock_stopped=True)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason, row.sent_at) == ("QUEUED", None, None, None)
    await _handed_back_then_sent_once(rt, sim, worker, job)


@pytest.mark.parametrize("refusal", ["InsufficientBalance", "RiskHold"])
async def test_a_stalled_run_whose_account_is_refused_after_its_job_was_taken_over_has_it_sent_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any, refusal: str
) -> None:
    """A's request is answered by Africa's Talking's API itself refusing it for our account (an empty balance, a risk
    hold: its answer's recipient status): it did not take the message, for sure, as the send path has it everywhere
    else (SmsAccountError: "safe to send again", sent again once the account is fixed). So, as for no connection, the
    message is handed back and sent once. Before, it stayed Unconfirmed and the job DONE: every other text went out
    once the balance was topped up, hers never did."""
    await queue_receipt(rt, demo)
    _, job = await _taken_over_then_sent(rt, sim, worker, monkeypatch, unreachable=False, failure=refusal)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason) == ("QUEUED", None, None)
    assert sim.messages(ALINE) == []
    await _handed_back_then_sent_once(rt, sim, worker, job)


async def test_a_stalled_run_answered_5xx_after_its_job_was_taken_over_leaves_it_unconfirmed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """A's request was answered HTTP 500: Africa's Talking's front end may refuse after its API took the message, so
    it stays Unconfirmed, the job DONE (B's), and nothing is sent again."""
    await queue_receipt(rt, demo)
    _, job = await _taken_over_then_sent(rt, sim, worker, monkeypatch, unreachable=False)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", SENT_UNCONFIRMED, None)
    assert job.status == "DONE"
    await drain(worker)
    assert len(sim.requests) == 1 and sim.messages(ALINE) == []
    assert await _actions(rt, row.id) == ["sms.sent"]


async def test_a_stalled_run_that_cannot_connect_after_her_erasure_sends_nothing(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """Her erasure commits after B's Unconfirmed and before A's failed connection: the row has no number left, so it is
    not handed back (it stays Unconfirmed, erased), and nothing is sent."""
    await queue_receipt(rt, demo)
    real_send, stalled, go = rt.sms.send, asyncio.Event(), asyncio.Event()
    nowhere = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=f"http://127.0.0.1:{_closed_port()}", username="coop-test", api_key=Secret("k")))

    async def send(phone: Any, body: str) -> Any:
        if not stalled.is_set():
            stalled.set()
            await asyncio.wait_for(go.wait(), 30)
            return await nowhere.send(phone, body)
        return await real_send(phone, body)

    monkeypatch.setattr(rt.sms, "send", send)
    run_a, _ = await stalled_run(rt, stalled)
    await worker.run_job((await worker.claim())[0])  # B: recorded Unconfirmed, not sent
    await _erase(rt, demo)
    go.set()
    await run_a
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.phone_enc) == ("SENT", SENT_UNCONFIRMED, "")
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
    assert sim.requests == [] and sim.messages(ALINE) == []


async def _due_now(rt: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send", OutboxJob.status == "PENDING")
                              .values(run_at=utcnow() - timedelta(seconds=1)))


@pytest.mark.parametrize("action", ["erasure", "release"])
async def test_a_send_out_when_her_erasure_or_release_commits_whose_outcome_write_fails_is_recorded_by_the_next_run(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any, action: str
) -> None:
    """As the first test, but writing Africa's Talking's answer fails (the database went away under the write): the
    answer is kept in Redis and the attempt fails as interrupted, for the next one to record it. That next run finds
    the row her erasure (or the release) wrote "not sent", FAILED: it records the kept answer on it (SENT with its id),
    sends nothing, and the job ends. Before, it found the row FAILED and ended the job: the row said "not sent"
    (Skipped: never handed to Africa's Talking) though she had the text, and its delivery report found no row."""
    await queue_receipt(rt, demo)
    out, go = _hold_the_answer(rt, monkeypatch)
    real_confirm = SmsJobs._confirm

    async def db_away(self: Any, *args: Any) -> bool:
        monkeypatch.setattr(SmsJobs, "_confirm", real_confirm)  # once
        raise ConnectionResetError("database went away")

    monkeypatch.setattr(SmsJobs, "_confirm", db_away)
    await _while_out(worker, out, go, (_erase if action == "erasure" else _release)(rt, demo))
    [went] = sim.messages(ALINE)
    [pending] = await jobs_of(rt, "sms.send")
    assert pending.status == "PENDING" and "AT accepted it" in pending.last_error
    await _due_now(rt)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status, row.failure_reason) == (
        "SENT", went["id"], "Success", None)
    if action == "erasure":
        assert (row.phone_enc, row.body) == ("", "")
    assert await _actions(rt, row.id) == ["sms.failed", "sms.confirmed"]
    assert [j.status for j in await jobs_of(rt, "sms.send")] == ["DONE"]
    assert len(sim.messages(ALINE)) == 1 and len(sim.requests) == 1


async def test_a_stalled_run_that_cannot_connect_after_her_number_was_released_sends_nothing(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: Any
) -> None:
    """The release of her number commits after B's Unconfirmed and before A's failed connection: the row keeps the
    number (a release clears no row but those still QUEUED), which may be its next holder's by now, so it is not handed
    back (a receipt's retry does not ask whether the number is still hers): it stays Unconfirmed, nothing is sent."""
    await queue_receipt(rt, demo)
    _, job = await _taken_over_then_sent(rt, sim, worker, monkeypatch, unreachable=True,
                                         before_wake=lambda: _release(rt, demo))
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", SENT_UNCONFIRMED) and row.phone_enc != ""
    assert job.status == "DONE"
    await drain(worker)
    assert sim.requests == [] and sim.messages(ALINE) == []
