"""A parked 'sms.send' discarded by an admin (POST /v1/jobs/{id}/discard): its message, still QUEUED and shown as
parked (QUEUED_PARKED: "replay it"), will never go. It becomes FAILED, not sent, saying why (SKIPPED: never handed
to the aggregator), so the ops page no longer shows it waiting and prune may empty its text as any other's."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select, update

from channels.sms import templates
from channels.sms.jobs import GIVE_BACK_JOB, Answer, message_key, message_keys
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, SmsMessage
from core.notify import send_sms
from core.ops import dashboard
from core.outbox import INTERRUPTED
from core.ratelimit import RateLimiter
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import jobs_of, stalled_run
from tests.channels.sms.test_routes import inbound
from tests.channels.sms.test_send_faults import ALINE, last_attempt, make_due, queue_receipt, the_job, the_row
from tests.channels.sms.test_send_in_flight import _erase, _hold_the_answer, _release
from tests.channels.sms.test_sent_twice import failing_sent_writes
from tests.conftest import drain

REASON = "the member paid at the office; receipt given by hand"


async def test_a_discarded_send_fails_its_queued_message(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    assert (job.status, (await the_row(rt)).provider_status) == ("PARKED", "RetriesExhausted")

    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.failure_reason) == (
        "FAILED", "Skipped", f"discarded by an admin: {REASON}"[:64])
    async with rt.sessionmaker() as session:
        counts = (await dashboard(session, demo["cooperative_id"]))["sms"]["counts"]
        moved = (await session.execute(select(AuditEvent).where(AuditEvent.entity_type == "sms",
                                                                AuditEvent.entity_id == row.id,
                                                                AuditEvent.after["status"].as_string() == "FAILED")
                                       )).scalars().all()
    assert counts == {"SKIPPED": 1} and len(moved) == 1
    assert (await the_job(rt)).status == "DISCARDED"
    sim.set_failure(None)
    await drain(worker)
    assert sim.messages(ALINE) == []


async def test_a_discarded_send_that_stored_no_message_changes_no_message(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """A poison send: its template is gone (a release removed it), so it parked before storing any message."""
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="receipt_removed_in_v41", cooperative_id=demo["cooperative_id"],
                       context={}, cipher=rt.cipher, member_id=demo["members"][ALINE], dedupe="poison-1")
    await drain(worker)
    job = await the_job(rt)
    assert job.status == "PARKED" and "template" in (job.last_error or "")
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(SmsMessage))).first() is None
        assert (await session.get(OutboxJob, job.id)).status == "DISCARDED"


async def test_a_discarded_send_whose_last_try_was_cut_off_is_a_plain_failure(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """Its last try cut off mid-send may have reached Africa's Talking: FAILED without the Skipped mark, which would
    say it was never handed over (a reminder so marked counts as not sent, and the next scan queues it again)."""
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            last_error=f"{INTERRUPTED}: ran past 55s"))
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("FAILED", None)


async def _reply_discarded(rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any, text: str,
                           message_id: str) -> None:
    """Aline texts `text`; its reply's last try fails (an aggregator's 503), it parks, and an admin discards it."""
    await inbound(client, ALINE, text, message_id)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    [job] = [job for job in await jobs_of(rt, "sms.send") if job.status == "PARKED"]
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    sim.set_failure(None)
    async with rt.sessionmaker() as session:
        row = (await session.execute(select(SmsMessage).where(SmsMessage.idempotency_key == job.payload["key"]))
               ).scalar_one()
    assert (row.status, row.provider_status) == ("FAILED", "Skipped")
    await drain(worker)  # the count is given back by the job the discard queued (GIVE_BACK_JOB)


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_to_stop_gives_its_count_back_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any
) -> None:
    """Her STOP's reply, parked through an aggregator outage and discarded, never went: it uses none of her 5 replies
    per 10 minutes (counted still, 4 of her next 6 keywords were answered), given back once (5, not 6)."""
    await _reply_discarded(rt, demo, sim, worker, sms_client, "STOP", "at-stop")
    for i in range(6):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"status-{i}")
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")  # the help is one a calendar day: given back or not, a new day has one
async def test_a_discarded_reply_to_a_text_not_understood_gives_the_days_help_back(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any
) -> None:
    """The day's one help ("not understood, send HELP") discarded unsent: her next text not understood gets it."""
    await _reply_discarded(rt, demo, sim, worker, sms_client, "Helo?", "in-garbled")
    await inbound(sms_client, ALINE, "Hello??", "in-garbled-2")
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(SmsMessage.template).where(SmsMessage.status != "FAILED"))
                ).scalars().all() == ["unknown"]


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discard_that_did_not_commit_gives_no_count_back(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """The discard of her STOP's parked reply fails before it commits (the database gone as its audit row is
    written): the reply stays parked, and counted. Given back before the commit, the reply an admin then replayed
    went uncounted: 5 of her next 5 keywords were answered, 6 replies in her 10 minutes."""
    from admin_api import jobs as admin_jobs

    await inbound(sms_client, ALINE, "STOP", "at-stop")
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    [job] = await jobs_of(rt, "sms.send")
    real = admin_jobs.record

    async def record_failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "job.discarded":
            raise ConnectionError("database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(admin_jobs, "record", record_failing)
    admin = await bearer(sms_client, *demo["admin"])
    response = await sms_client.post(f"/v1/jobs/{job.id}/discard", json={"reason": REASON},
                                     headers=admin.headers)
    assert response.status >= 500
    monkeypatch.setattr(admin_jobs, "record", real)
    assert (await the_job(rt)).status == "PARKED"
    assert await jobs_of(rt, GIVE_BACK_JOB) == []  # queued in the discard's transaction: rolled back with it
    sim.set_failure(None)
    await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    for i in range(5):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"status-{i}")
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_reply_discarded_among_others_gives_its_count_back_once_committed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any
) -> None:
    """POST /v1/jobs/discard gives a keyword's reply's count back too, once the call has committed."""
    await inbound(sms_client, ALINE, "STOP", "at-stop")
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    admin = await bearer(sms_client, *demo["admin"])
    answer = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "sms.send"})
    assert answer["discardedCount"] == 1
    sim.set_failure(None)
    await drain(worker)
    for i in range(6):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"status-{i}")
    await drain(worker)
    assert len(sim.messages(ALINE)) == 5


async def _answered_of_six(rt: Any, worker: Any, sim: Any, client: Any) -> int:
    """Aline's next six keywords (STATUS of a payment she does not have): how many replies she gets. Her 10 minutes
    allow 5: 4 when a discarded reply of hers still counts, 6 when one was given back twice."""
    before = len(sim.messages(ALINE))
    for i in range(6):
        await inbound(client, ALINE, "STATUS PAY_20260115_999999", f"status-{i}")
    await drain(worker)
    return len(sim.messages(ALINE)) - before


async def _stop_reply_parked(rt: Any, sim: Any, worker: Any, client: Any) -> OutboxJob:
    """Aline's STOP; its reply's last try fails (an aggregator's 503): its job parks, its message QUEUED."""
    await inbound(client, ALINE, "STOP", "at-stop")
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    sim.set_failure(None)
    job = await the_job(rt)
    assert job.status == "PARKED"
    return job


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_gives_its_count_back_through_a_job_of_its_own_once_however_often_it_runs(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any
) -> None:
    """The discard queues the give-back as an outbox job, in its transaction: a row, which a worker started after
    the discard runs (given back in the request after the commit, a process lost in between left it counted for
    good). Run twice (its worker lost after Redis took it, before DONE was written) and the discard sent again
    (409), it gives the count back once: 5 of her next 7 keywords answered, not 6."""
    from app import create_worker

    job = await _stop_reply_parked(rt, sim, worker, sms_client)
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 409, json={"reason": REASON})
    [back] = await jobs_of(rt, GIVE_BACK_JOB)
    assert (back.status, back.payload, back.cooperative_id) == ("PENDING", {"job_id": job.id}, job.cooperative_id)
    assert await drain(create_worker(rt)) == 1  # a worker of its own: the job is a row, not the request's memory
    await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "status-first")  # counted: 1 of her 5
    async with rt.sessionmaker.begin() as session:  # as if its worker were lost before writing DONE: its lease
        assert (await session.get(OutboxJob, back.id)).status == "DONE"  # lapses, and another worker runs it again
        await session.execute(update(OutboxJob).where(OutboxJob.id == back.id).values(
            status="RUNNING", done_at=None, run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    # Given back again, her STATUS's count would go too: 6 replies in her 10 minutes.
    assert await _answered_of_six(rt, worker, sim, sms_client) == 4
    assert len(sim.messages(ALINE)) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_whose_give_back_redis_refused_gives_it_back_on_a_later_try(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Redis away when the give-back job runs: it waits and tries again (its attempt kept, as a send waits for
    Redis) instead of leaving the count counted (logged, best effort), and the next try gives it back."""
    job = await _stop_reply_parked(rt, sim, worker, sms_client)
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    real, failed = RateLimiter.uncount_once, []

    async def away_once(self: Any, *args: Any, **kwargs: Any) -> bool:
        if not failed:
            failed.append(1)
            raise RedisConnectionError("Connection refused")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(RateLimiter, "uncount_once", away_once)
    await drain(worker)
    [back] = await jobs_of(rt, GIVE_BACK_JOB)
    assert failed and (back.status, back.attempts) == ("PENDING", 0), (back.status, back.last_error)
    await make_due(rt)
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _answered_of_six(rt, worker, sim, sms_client) == 5


async def _stop_reply_parked_unstored(rt: Any, sim: Any, worker: Any, client: Any, monkeypatch: Any) -> OutboxJob:
    """Aline's STOP, whose reply's template this release does not have (a release removed it): its job parks at
    its first try, before it stored any message."""
    await inbound(client, ALINE, "STOP", "at-stop")
    with monkeypatch.context() as patched:
        patched.setattr(templates, "TEMPLATES", tuple(t for t in templates.TEMPLATES if t != "opted_out"))
        await drain(worker)
    job = await the_job(rt)
    assert job.status == "PARKED" and "unknown SMS template" in (job.last_error or ""), job.last_error
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(SmsMessage))).first() is None
    return job


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_whose_job_parked_before_storing_its_message_gives_its_count_back(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """No message stored is none sent (a send is of a stored message): discarded, it gives its count back as one
    stored and FAILED does. It kept it: 4 of her next 6 keywords answered."""
    job = await _stop_reply_parked_unstored(rt, sim, worker, sms_client, monkeypatch)
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _answered_of_six(rt, worker, sim, sms_client) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_never_stored_that_africas_talking_may_have_keeps_its_count(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Its answer from Africa's Talking kept (a send before PostgreSQL was restored to a point before its row): it
    went, so it stays counted."""
    job = await _stop_reply_parked_unstored(rt, sim, worker, sms_client, monkeypatch)
    _, kept = message_keys(message_key(job.payload))
    await rt.hot_redis.set(kept, Answer(provider_message_id="ATXid_1", provider_status="Success").dump(), ex=600)
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _answered_of_six(rt, worker, sim, sms_client) == 4


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_whose_last_try_was_cut_off_keeps_its_count(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any
) -> None:
    """Cut off mid-send, it may have reached Africa's Talking: no give-back queued, counted as sent."""
    job = await _stop_reply_parked(rt, sim, worker, sms_client)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            last_error=f"{INTERRUPTED}: ran past 55s"))
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    assert await jobs_of(rt, GIVE_BACK_JOB) == []
    assert await _answered_of_six(rt, worker, sim, sms_client) == 4


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_never_stored_whose_last_try_was_cut_off_gives_its_count_back(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Its last try cut off (the worker lost, or past its deadline) before it stored the message: a message is sent
    only once stored (a first send clears the doubt: Job.call_started), so it never went, and the give-back's kept
    answer check covers a send a restore lost the row of. Given back: 5 of her next 6 keywords answered, not 4."""
    job = await _stop_reply_parked_unstored(rt, sim, worker, sms_client, monkeypatch)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            last_error=f"{INTERRUPTED}: ran past 55s"))
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    await drain(worker)
    assert [j.status for j in await jobs_of(rt, GIVE_BACK_JOB)] == ["DONE"]
    assert await _answered_of_six(rt, worker, sim, sms_client) == 5


async def _parked_after_africas_talking_took_it(rt: Any, demo: dict[str, Any], sim: Any, worker: Any,
                                               monkeypatch: Any) -> tuple[dict[str, Any], OutboxJob]:
    """Her receipt's last try sent it (Africa's Talking accepted it) and could not write the outcome (the database
    away): the job parked with AT's answer kept. (the message the simulator took, the parked job)"""
    failing_sent_writes(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    await drain(worker)
    [went] = sim.messages(ALINE)
    job = await the_job(rt)
    assert job.status == "PARKED" and "AT accepted it" in job.last_error
    return went, job


async def test_a_parked_send_that_africas_talking_accepted_is_not_discarded_but_replayed_with_its_id(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Its last try sent it (Africa's Talking accepted it) and could not write the outcome (the database away): it
    parked with AT's answer kept. A discard would record it FAILED without AT's id, though it went, and its delivery
    report (here posted before) would find no row: refused (409 INVALID_STATE, saying to replay it), also in a bulk
    discard (skipped), the row still QUEUED. The replay records it SENT with AT's id, sending nothing again, and the
    report parked for that id is applied (DELIVERED). Before, the discard answered 200, the row FAILED with no id."""
    went, job = await _parked_after_africas_talking_took_it(rt, demo, sim, worker, monkeypatch)
    report = await sms_client.post("/sms/africastalking/delivery", data={"id": went["id"], "status": "Success"})
    assert report.status == 200  # no row has the id yet: parked for it
    admin = await bearer(sms_client, *demo["admin"])
    refused = await admin.json("POST", f"/v1/jobs/{job.id}/discard", 409, json={"reason": REASON})
    assert refused["code"] == "INVALID_STATE"
    assert went["id"] in refused["message"] and f"Replay job {job.id}" in refused["message"]
    bulk = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "sms.send"})
    assert (bulk["discarded"], [s["id"] for s in bulk["skipped"]]) == ([], [job.id])
    assert (await the_job(rt)).status == "PARKED" and (await the_row(rt)).status == "QUEUED"

    await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.failure_reason) == ("DELIVERED", went["id"], None)
    assert (await the_job(rt)).status == "DONE"
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1


async def test_a_parked_send_whose_answer_was_kept_as_lost_is_discarded_as_one_that_may_have_gone(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """Its answer kept as lost (Unconfirmed: AT may have it) though the job's last error does not say so: discarded as
    a plain failed send, not Skipped ("never handed to Africa's Talking")."""
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    await rt.hot_redis.set(message_keys(message_key(job.payload))[1], Answer(cause="ReadTimeout").dump())
    admin = await bearer(client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("FAILED", None)


@pytest.mark.usefixtures("limiter_clock")
async def test_a_discarded_reply_whose_send_was_out_when_its_job_parked_keeps_its_count(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """Run A of her STOP's reply stores it and sends it, and stalls with its request out (Africa's Talking has it) past
    its lease; the worker that takes the job over has no SMS sender configured (a deploy without the aggregator's
    settings) and parks it at once. The park still says the previous try may have sent it, so the discard makes it a
    plain failed send and gives no count back; A's answer then records it SENT with its id. It went, so it counts:
    4 of her next 6 keywords answered, not 5. Before, the park said only "no SMS sender configured": the discard
    wrote Skipped and gave the count back before A's answer came, one reply over her limit."""
    await inbound(sms_client, ALINE, "STOP", "at-stop")
    out, go = _hold_the_answer(rt, monkeypatch)
    run_a, job = await stalled_run(rt, out)
    sender, rt.sms = rt.sms, None
    await worker.run_job((await worker.claim())[0])  # the taker: parked
    rt.sms = sender
    parked = await the_job(rt)
    assert parked.status == "PARKED" and parked.last_error.startswith(INTERRUPTED)
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/discard", 200, json={"reason": REASON})
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("FAILED", None)
    assert await jobs_of(rt, GIVE_BACK_JOB) == []
    await drain(worker)
    go.set()
    await run_a
    [went] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) == ("SENT", went["id"])
    assert await _answered_of_six(rt, worker, sim, sms_client) == 4


async def test_a_replayed_send_whose_lost_run_had_it_out_when_a_worker_without_a_sender_parked_it_is_not_resent(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any
) -> None:
    """As above, but run A is lost for good (its answer never recorded) and the job, parked by the worker without a
    sender, is replayed once the settings are fixed: the replay records it Unconfirmed, not sending it again. Before,
    the park's "no SMS sender configured" hid the doubt and the replay sent her a second copy."""
    await queue_receipt(rt, demo)
    real_send, out = rt.sms.send, asyncio.Event()

    async def send(phone: Any, body: str) -> Any:
        await real_send(phone, body)
        out.set()
        await asyncio.Event().wait()  # lost: the answer never comes back to this run

    monkeypatch.setattr(rt.sms, "send", send)
    run_a, job = await stalled_run(rt, out)
    run_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run_a
    monkeypatch.setattr(rt.sms, "send", real_send)
    sender, rt.sms = rt.sms, None
    await worker.run_job((await worker.claim())[0])
    rt.sms = sender
    admin = await bearer(sms_client, *demo["admin"])
    await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert len(sim.requests) == 1 and len(sim.messages(ALINE)) == 1


@pytest.mark.parametrize("action", ["erasure", "release"])
async def test_a_parked_send_that_africas_talking_accepted_held_back_by_her_erasure_is_not_discarded_but_replayed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, sms_client: Any, monkeypatch: Any, action: str
) -> None:
    """As above, but her erasure (or the release of her number) came while the job was parked: it read the row QUEUED
    and wrote "not sent" (Skipped). The discard is refused all the same (409, replay it): discarded, the row stayed
    "never handed to Africa's Talking" without AT's id, its delivery report finding no row. The replay records it SENT
    with AT's id (_held_back_sent), sending nothing again. Before, the discard answered 200, the row left Skipped."""
    went, job = await _parked_after_africas_talking_took_it(rt, demo, sim, worker, monkeypatch)
    await (_erase if action == "erasure" else _release)(rt, demo)
    assert (await the_row(rt)).status == "FAILED"
    admin = await bearer(sms_client, *demo["admin"])
    refused = await admin.json("POST", f"/v1/jobs/{job.id}/discard", 409, json={"reason": REASON})
    assert refused["code"] == "INVALID_STATE" and went["id"] in refused["message"]
    bulk = await admin.json("POST", "/v1/jobs/discard", 200, json={"reason": REASON, "kind": "sms.send"})
    assert (bulk["discarded"], [s["id"] for s in bulk["skipped"]]) == ([], [job.id])
    await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) == ("SENT", went["id"])
    assert (await the_job(rt)).status == "DONE"
    assert len(sim.requests) == 1
