"""'sms.send' never sends a message twice once Africa's Talking may have it: not when writing AT's answer fails
(a pool timeout, a PostgreSQL failover, a connection reset), once or several times in a row, not when the worker
is lost between AT's answer and the write, not when AT's front end answers 504 after its API queued it, and
not for a reminder whose member's state changed before the retry (it was sent: SENT, never FAILED "not sent")."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import update
from sqlalchemy.exc import TimeoutError as PoolTimeout

import channels.sms.jobs as sms_jobs
from channels.sms.jobs import job_handlers, message_key, message_keys
from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender, SmsTemporaryError, SmsUnconfirmedError
from channels.sms.simulator import STATE, create_simulator
from core.config import Secret
from core.db import utcnow
from core.models import Member, OutboxJob
from core.notify import send_sms
from core.phone import Phone
from core.state.sms import SmsStatus
from tests.channels.sms.helpers import SIM_KEY
from tests.channels.sms.test_send_faults import (
    ALINE,
    make_due,
    queue_receipt,
    sender_over,
    slow_simulator,
    the_job,
    the_row,
)
from tests.conftest import drain


def failing_sent_writes(monkeypatch: pytest.MonkeyPatch, times: int, error: BaseException) -> dict[str, int]:
    """The next `times` writes of SENT fail with `error` (AT's answer is in hand: the database went away)."""
    real = sms_jobs.transition_alone
    failed = {"n": 0}

    async def flaky(sessionmaker: Any, machine: Any, entity_id: str, source: Any, target: Any, **kw: Any) -> Any:
        if target == SmsStatus.SENT and failed["n"] < times:
            failed["n"] += 1
            raise error
        return await real(sessionmaker, machine, entity_id, source, target, **kw)

    monkeypatch.setattr(sms_jobs, "transition_alone", flaky)
    return failed


async def kept_answer(rt: Any, key: str) -> Any:
    return await rt.redis.get(message_keys(key)[1])


async def test_a_failed_sent_write_is_recorded_with_ats_id_on_the_retry_not_resent(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    await queue_receipt(rt, demo)
    await drain(worker)
    [copy] = sim.messages(ALINE)  # AT accepted (and billed) it
    job = await the_job(rt)
    # The attempt failed as interrupted (AT has it), saying so; the row could not be written.
    assert job.status == "PENDING"
    assert job.last_error.startswith("handler interrupted: failed after its provider call started: "
                                     "SmsOutcomeNotRecorded: AT accepted it")
    assert copy["id"] in job.last_error and "ConnectionResetError" in job.last_error
    assert (await the_row(rt)).status == "QUEUED"
    assert await kept_answer(rt, "receipt-1") is not None

    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1 and sim.messages(ALINE) == [copy]
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status) == ("SENT", copy["id"], "Success")
    assert (row.cost, row.failure_reason) == (copy["cost"], None)
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 2)
    assert await kept_answer(rt, "receipt-1") is not None  # kept (ANSWER_SECONDS): a restore may lose the row


async def test_three_failed_sent_writes_in_a_row_still_one_copy(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover of a minute: the first write and the next two attempts' writes of the kept answer fail."""
    failed = failing_sent_writes(monkeypatch, 3, PoolTimeout("QueuePool limit reached, connection timed out"))
    await queue_receipt(rt, demo)
    for _ in range(4):
        await drain(worker)
        await make_due(rt)
    assert failed["n"] == 3
    [copy] = sim.messages(ALINE)
    assert len(sim.requests) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) == ("SENT", copy["id"])
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 4)


async def test_the_first_copys_delivery_report_matches_once_recorded(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AT's report for the copy arrives while the row has no id yet: parked, then applied to it."""
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    await queue_receipt(rt, demo)
    await drain(worker)
    [copy] = sim.messages(ALINE)
    answer = await sms_client.post("/sms/africastalking/delivery", data={"id": copy["id"], "status": "Success"})
    assert answer.status == 200
    await make_due(rt)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, len(sim.requests)) == ("DELIVERED", copy["id"], 1)


async def test_with_redis_failing_too_the_retry_records_it_unconfirmed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AT's answer could not be kept either: the interrupted attempt alone stops the resend."""
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))

    async def redis_down(*_args: Any, **_kw: Any) -> None:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(rt.hot_redis, "set", redis_down)
    await queue_receipt(rt, demo)
    await drain(worker)
    assert "answer not kept" in (await the_job(rt)).last_error
    monkeypatch.undo()
    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert row.failure_reason == "unconfirmed, not resent: previous attempt's outcome not written"
    assert (await the_job(rt)).status == "DONE"


async def test_a_failed_unconfirmed_write_after_a_read_timeout_is_not_resent(
    rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, slow = await slow_simulator(rt, aiohttp_server, delay=1.0, wait=0.3)
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    await queue_receipt(rt, demo)
    await drain(worker)  # AT queued it, our read timed out, and writing Unconfirmed failed
    assert (await the_row(rt)).status == "QUEUED"
    slow["delay"] = 0
    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert row.failure_reason == "unconfirmed, not resent: ReadTimeout after the send"


class WorkerKilled(BaseException):
    """The process dies where this is raised: nothing after it runs, the outbox records nothing."""


async def lose_the_worker_after_the_answer(rt: Any, worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim the job and die between AT's answer and the SENT write; the lease then lapses."""
    failing_sent_writes(monkeypatch, 1, WorkerKilled())
    [job] = await worker.claim()
    with pytest.raises(WorkerKilled):
        await job_handlers(rt)["sms.send"](job)
    assert (await the_job(rt)).status == "RUNNING"
    async with rt.sessionmaker.begin() as session:  # the lease lapses
        await session.execute(update(OutboxJob).values(run_at=utcnow()))


async def test_a_worker_lost_after_ats_answer_does_not_resend(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await queue_receipt(rt, demo)
    await lose_the_worker_after_the_answer(rt, worker, monkeypatch)
    await drain(worker)  # claimed back as WORKER_LOST (Job.interrupted)
    [copy] = sim.messages(ALINE)
    assert len(sim.requests) == 1
    row = await the_row(rt)  # AT's answer was kept before the write: recorded with AT's id, not Unconfirmed
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Success", copy["id"])
    assert row.failure_reason is None
    assert (await the_job(rt)).status == "DONE"


async def test_a_retry_in_doubt_that_fails_before_settling_keeps_the_doubt(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker is lost after AT's answer; the next attempt fails at its first read (the database is still
    away): the one after it must still not send (the failing attempt hands the doubt on: send() marks it before
    its first read)."""
    await queue_receipt(rt, demo)
    await lose_the_worker_after_the_answer(rt, worker, monkeypatch)
    real_first = sms_jobs._first
    reads = {"n": 0}

    async def first_fails(*args: Any, **kw: Any) -> Any:
        reads["n"] += 1
        if reads["n"] == 1:
            raise ConnectionResetError("connection reset by peer")
        return await real_first(*args, **kw)

    monkeypatch.setattr(sms_jobs, "_first", first_fails)
    await drain(worker)
    assert (await the_job(rt)).last_error.startswith("handler interrupted")
    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Success")  # from AT's answer, kept before the write


async def test_a_504_from_ats_front_end_after_it_queued_the_message_is_not_resent(
    rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any
) -> None:
    """AT's load balancer stops waiting for its API (504 Gateway Time-out) after the API queued the message:
    our own read timeout, one hop further in."""
    front = {"timeouts": 1}

    @web.middleware
    async def gateway_timeout(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)  # AT's API queued (and billed) it
        if request.path.endswith("/messaging") and front["timeouts"]:
            front["timeouts"] -= 1
            return web.Response(status=504, text="<html><body><h1>504 Gateway Time-out</h1></body></html>")
        return response

    app = create_simulator(username="coop-test", api_key=SIM_KEY, delivery_delay=0.05)
    app.middlewares.append(gateway_timeout)
    server = await aiohttp_server(app)
    sim = app[STATE]
    rt.sms = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=str(server.make_url("")).rstrip("/"), username="coop-test", api_key=Secret(SIM_KEY),
        sender_id="COOPPAY"))
    await queue_receipt(rt, demo)
    await drain(worker)
    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert row.failure_reason == "unconfirmed, not resent: HTTP 504 after the send"
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 1)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (504, SmsUnconfirmedError),  # AT's front end gave up waiting: its API may have queued it
        (502, SmsTemporaryError),  # AT's front end could not reach its API, which never saw it: resent
        (500, SmsTemporaryError),  # AT's API refusing it for now: resent
        (503, SmsTemporaryError),
        (408, SmsTemporaryError),
        (429, SmsTemporaryError),
    ],
)
async def test_http_errors_by_whether_at_may_have_the_message(status: int, outcome: type[Exception]) -> None:
    sender, seen = sender_over(lambda _r: httpx.Response(status, text="error"))
    with pytest.raises(outcome) as raised:
        await sender.send(Phone(ALINE), "Hello")
    assert not isinstance(raised.value, SmsUnconfirmedError if outcome is SmsTemporaryError else SmsTemporaryError)
    assert f"HTTP {status}" in str(raised.value) and len(seen) == 1


async def test_a_reminder_sent_before_its_member_opted_out_is_recorded_sent_not_failed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send-time checks (why_not_send) are for a reminder not sent yet: this one was."""
    member_id = demo["members"][ALINE]
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    async with rt.sessionmaker.begin() as session:
        await send_sms(
            session,
            template="payment_reminder",
            cooperative_id=demo["cooperative_id"],
            context={"member_id": member_id, "payment_type_id": demo["payment_types"]["Monthly Rent"],
                     "due_date": "2026-03-01"},
            cipher=rt.cipher,
            member_id=member_id,
            dedupe="reminder-1",
        )
    await drain(worker)
    [copy] = sim.messages(ALINE)
    async with rt.sessionmaker.begin() as session:  # STOP before the retry
        await session.execute(update(Member).where(Member.id == member_id).values(reminders_opt_out=True))
    await make_due(rt)
    await drain(worker)
    assert len(sim.requests) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.provider_status) == ("SENT", copy["id"], "Success")
    assert row.failure_reason is None
    job = await the_job(rt)
    assert job.status == "DONE"
    assert await kept_answer(rt, message_key(job.payload)) is not None  # kept: a restore may lose the row


async def test_a_receipt_sent_while_ats_front_end_answers_502_goes_out_once_at_is_back(
        rt: Any, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """A 502 is AT's front end not reaching its API (down, redeployed): the API never saw the message. Taken as
    'may have it', every receipt of such an outage was recorded Unconfirmed and never sent."""
    from tests.channels.sms.helpers import start_simulator

    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http502")
    await queue_receipt(rt, demo)
    await drain(worker)
    assert (await the_row(rt)).status == "QUEUED"
    sim.set_failure(None)  # AT is back
    await make_due(rt)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Success")



class _WorkerKilled(BaseException):
    """The worker process dying mid-run (nothing of the handler's own error handling runs)."""


async def test_a_worker_lost_before_the_message_was_stored_does_not_stop_its_send(
        rt: Any, demo: Any, worker: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: lost before its row was stored, the message never reached AT; the next attempt's doubt (the job is
    interrupted) is dropped once no row is found, so a 500 on it is an ordinary retry and the one after sends (it
    was recorded Unconfirmed and never sent)."""
    from tests.channels.sms.helpers import start_simulator

    _server, sim = await start_simulator(aiohttp_server, rt)
    await queue_receipt(rt, demo)
    real = sms_jobs.SmsJobs._create

    async def dies(self: Any, *a: Any, **k: Any) -> Any:
        raise _WorkerKilled()

    monkeypatch.setattr(sms_jobs.SmsJobs, "_create", dies)
    [job] = await worker.claim()
    with pytest.raises(_WorkerKilled):
        await job_handlers(rt)["sms.send"](job)
    monkeypatch.setattr(sms_jobs.SmsJobs, "_create", real)
    async with rt.sessionmaker.begin() as s:  # its lease lapses: claimed again as a lost worker's
        await s.execute(update(OutboxJob).values(run_at=utcnow()))
    sim.set_failure("http500")  # AT refuses it for now: nothing reached it
    await drain(worker)
    assert (await the_row(rt)).status == "QUEUED"
    sim.set_failure(None)
    await make_due(rt)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Success")
