"""'sms.send' through the outbox and the simulator over HTTP: sent once, permanent vs temporary, throttled."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.jobs import SmsJobs, message_key, send_limit
from core.db import utcnow
from core.models import Cooperative, Member, OutboxJob, SmsMessage
from core.notify import send_sms
from core.outbox import RetryLater
from core.phone import Phone
from tests.channels.sms.helpers import as_job, jobs_of, make_payment
from tests.conftest import LimiterClock, drain

ALINE = "+250788000001"


async def queue_receipt(
    rt: Any,
    demo: dict[str, Any],
    payment_id: str,
    *,
    dedupe: str = "receipt-1",
    phone: str = ALINE,
    template: str = "payment_receipt",
) -> None:
    async with rt.sessionmaker.begin() as session:
        await send_sms(
            session,
            template=template,
            cooperative_id=demo["cooperative_id"],
            context={"payment_id": payment_id},
            cipher=rt.cipher,
            member_id=demo["members"][phone],
            dedupe=dedupe,
        )


async def sms_rows(rt: Any) -> list[SmsMessage]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(select(SmsMessage).order_by(SmsMessage.created_at))).scalars())


async def test_receipt_goes_out_through_the_simulator(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    assert await drain(worker) == 1

    inbox = sim.messages(ALINE)
    assert len(inbox) == 1
    assert payment.reference in inbox[0]["message"] and "50,000 RWF" in inbox[0]["message"]
    assert inbox[0]["message"].startswith("Twakiriye")  # Aline reads Kinyarwanda
    assert sim.requests[0]["from"] == "COOPPAY"
    [row] = await sms_rows(rt)
    assert row.status == "SENT"
    assert row.provider_message_id == inbox[0]["id"]
    assert row.cost == inbox[0]["cost"]
    assert (row.encoding, row.segments, row.length) == ("GSM-7", inbox[0]["segments"], len(row.body))
    assert row.idempotency_key == "receipt-1" and row.language == "rw" and row.phone_masked == "+25078****001"
    assert row.sent_at is not None


async def test_a_message_of_two_parts_is_recorded_as_two(rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    """The row says how many parts the SMS took (GET /v1/messages `segments`: what the cooperative pays for). A receipt
    naming a long cooperative goes past 160 septets: two parts of 153, recorded as two, as the aggregator counted."""
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
            name="Koperative y'Abahinzi n'Aborozi b'Inka n'Ihene ba Kigali Heights na Nyarutarama Bishyize Hamwe"))
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    assert await drain(worker) == 1
    [row] = await sms_rows(rt)
    [sent] = sim.messages(ALINE)
    assert sent["message"] == row.body and 160 < len(row.body) <= 306
    assert (row.status, row.encoding, row.length, row.segments) == ("SENT", "GSM-7", len(row.body), 2)
    assert sent["segments"] == 2


async def test_duplicate_events_send_one_sms(rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id, dedupe="same")
    await queue_receipt(rt, demo, payment.id, dedupe="same")  # enqueued twice: one job
    assert len(await jobs_of(rt, "sms.send")) == 1
    await drain(worker)
    [job] = await jobs_of(rt, "sms.send")
    # The same job run again, as after a worker lost its lease: no second SMS.
    await SmsJobs(rt).send(as_job(job, attempts=2))
    # A second job carrying the same message key (e.g. re-enqueued under another dedupe key).
    await SmsJobs(rt).send(dataclasses.replace(as_job(job), id=job.id + 1000))
    assert len(sim.messages(ALINE)) == 1
    assert len(await sms_rows(rt)) == 1


async def test_permanent_rejection_is_recorded_not_retried(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    sim.set_failure("UserInBlackList", number=ALINE)
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await drain(worker)
    [row] = await sms_rows(rt)
    assert row.status == "REJECTED" and row.failure_reason == "UserInBlacklist"
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "DONE" and job.attempts == 1  # an outcome, not a failure: no retry
    assert sim.messages(ALINE) == []
    assert len(sim.requests) == 1


async def test_a_long_refusal_from_the_aggregator_is_recorded_not_resent(
    rt: Any, demo: dict[str, Any], worker: Any
) -> None:
    """No recipient accepted, with a wording longer than the row's status column: the row is REJECTED
    with the wording cut to fit, and the message is not sent again (the write used to fail, the row stayed
    QUEUED and every retry called the aggregator again)."""
    import httpx

    from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender
    from core.config import Secret

    sent: list[httpx.Request] = []
    wording = "Sent to 0/1 Total Cost: RWF 0.0000 (sender id blocked by the operator)"

    def aggregator(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/version1/messaging", request.url  # anything else is unexpected
        sent.append(request)
        return httpx.Response(201, json={"SMSMessageData": {"Message": wording, "Recipients": []}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(aggregator)) as client:
        rt.sms = AfricasTalkingSender(client, AfricasTalkingConfig("http://127.0.0.1:9", "u", Secret("k"), "COOPPAY"))
        payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
        await queue_receipt(rt, demo, payment.id)
        await drain(worker)
    [row] = await sms_rows(rt)
    assert (row.status, row.provider_status, row.failure_reason) == ("REJECTED", wording[:32], wording[:64])
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "DONE" and job.attempts == 1
    assert len(sent) == 1


async def test_insufficient_balance_waits_for_a_top_up(rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    # Our account's empty balance is not the member's number: the message waits (it used to end FAILED,
    # and every receipt sent before the top-up was lost). See test_send_faults.py.
    sim.set_failure("InsufficientBalance")
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await drain(worker)
    [row] = await sms_rows(rt)
    assert row.status == "QUEUED"
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "PENDING" and "InsufficientBalance" in job.last_error


async def _make_due(rt: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))


async def test_temporary_failure_is_retried_then_sent(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    sim.set_failure("http500", times=2)
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await worker.run_once()
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "PENDING" and job.attempts == 1 and "HTTP 500" in job.last_error
    assert job.run_at > utcnow()  # backoff
    [row] = await sms_rows(rt)
    assert row.status == "QUEUED"
    await _make_due(rt)
    await worker.run_once()
    await _make_due(rt)
    await worker.run_once()
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "DONE" and job.attempts == 3
    [row] = await sms_rows(rt)
    assert row.status == "SENT"
    assert len(sim.messages(ALINE)) == 1
    assert len(sim.requests) == 3


async def test_temporary_failure_exhausted_parks_and_keeps_the_message_queued(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    sim.set_failure("http503")
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(attempts=9))  # max_attempts is 10 for SMS
    await worker.run_once()
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "PARKED"
    [row] = await sms_rows(rt)
    # QUEUED, not FAILED: the message never left, so replaying the parked job must send it.
    assert row.status == "QUEUED" and row.provider_status == "RetriesExhausted"


async def test_network_error_is_retried(rt: Any, demo: dict[str, Any], worker: Any) -> None:
    from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender
    from core.config import Secret

    # Nothing listens on port 9 of 127.0.0.1: connection refused.
    rt.sms = AfricasTalkingSender(
        rt.http, AfricasTalkingConfig(base_url="http://127.0.0.1:9", username="u", api_key=Secret("k"))
    )
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await worker.run_once()
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "PENDING" and "network error" in job.last_error


async def test_reminders_respect_opt_out_but_receipts_do_not(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    member_id = demo["members"][ALINE]
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Member).where(Member.id == member_id).values(reminders_opt_out=True))
    type_id = demo["payment_types"]["Monthly Rent"]
    async with rt.sessionmaker.begin() as session:
        await send_sms(
            session,
            template="payment_reminder",
            cooperative_id=demo["cooperative_id"],
            context={"member_id": member_id, "payment_type_id": type_id, "due_date": "2026-02-01"},
            cipher=rt.cipher,
            member_id=member_id,
            dedupe="reminder-1",
        )
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=member_id)
    await queue_receipt(rt, demo, payment.id)
    await drain(worker)
    inbox = sim.messages(ALINE)
    assert len(inbox) == 1 and payment.reference in inbox[0]["message"]
    # Opted back in: the reminder goes, with the due date and the dial code.
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(Member).where(Member.id == member_id).values(reminders_opt_out=False))
        await send_sms(
            session,
            template="payment_reminder",
            cooperative_id=demo["cooperative_id"],
            context={"member_id": member_id, "payment_type_id": type_id, "due_date": "2026-03-01"},
            cipher=rt.cipher,
            member_id=member_id,
            dedupe="reminder-2",
        )
    await drain(worker)
    assert "01/03/2026" in sim.messages(ALINE)[-1]["message"]
    assert "*384*123*123#" in sim.messages(ALINE)[-1]["message"]


async def test_bad_template_is_parked(rt: Any, demo: dict[str, Any], sim: Any, worker: Any) -> None:
    await queue_receipt(rt, demo, "no-such-payment")
    await drain(worker)
    [job] = await jobs_of(rt, "sms.send")
    assert job.status == "PARKED" and "payment no-such-payment not found" in job.last_error
    assert sim.requests == []


@pytest.mark.usefixtures("limiter_clock")
async def test_throttle_per_sender_id(rt: Any, demo: dict[str, Any], sim: Any) -> None:
    slow = dataclasses.replace(rt, settings=dataclasses.replace(rt.settings, sms_rate_per_second=2.0))
    jobs = SmsJobs(slow)
    # The window is a calendar second: the limiter's clock held still, the three calls are in one however long
    # they take (they were made again whenever a loaded machine paused between them across a second's turn).
    await jobs.throttle_and_lock("sms:lock:{a}", "1")
    await jobs.throttle_and_lock("sms:lock:{b}", "2")
    with pytest.raises(RetryLater) as refused:
        await jobs.throttle_and_lock("sms:lock:{c}", "3")
    raised = refused.value
    assert 0 < raised.delay <= 1 and "rate" in str(raised)
    # Refused by the rate, the message's lock is not kept; the two that passed hold theirs.
    assert [await rt.redis.get(f"sms:lock:{{{k}}}") for k in "abc"] == [b"1", b"2", None]
    keys = [k.decode() async for k in rt.redis.scan_iter("rl:*:sms:send:*")]
    assert keys and all(k.startswith("rl:{COOPPAY}:sms:send:") for k in keys)
    assert await rt.redis.ttl(keys[0]) > 0


async def test_a_message_locked_by_another_run_is_not_sent_twice(rt: Any, demo: dict[str, Any], sim: Any) -> None:
    jobs = SmsJobs(rt)
    await jobs.throttle_and_lock("sms:lock:{held}", "first")
    with pytest.raises(RetryLater) as raised:
        await jobs.throttle_and_lock("sms:lock:{held}", "second")
    assert "another worker" in str(raised.value)
    assert await rt.redis.get("sms:lock:{held}") == b"first"


async def test_throttled_job_is_rescheduled_without_counting_a_failure(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, limiter_clock: LimiterClock
) -> None:
    limit = send_limit(rt.settings.sms_rate_per_second)
    assert limit.window == 1
    # Fill this second's window for the sender id, then send: the job waits instead of failing. (The limiter's
    # clock held still: the second cannot roll over between the two, which let the send through and the test
    # assert nothing.)
    window_key = f"rl:{{COOPPAY}}:sms:send:{int(limiter_clock.now)}"
    await rt.redis.set(window_key, limit.count + 100, ex=60)
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await worker.run_once()
    [job] = await jobs_of(rt, "sms.send")
    assert (job.status, job.attempts) == ("PENDING", 0) and "rate" in job.last_error
    assert sim.requests == []


def test_send_limit_shapes() -> None:
    assert (send_limit(50).count, send_limit(50).window) == (50, 1)
    assert (send_limit(0.2).count, send_limit(0.2).window) == (1, 5)


def test_message_key_without_core_key_ignores_the_phone_nonce() -> None:
    a = {"template": "help", "cooperative_id": None, "member_id": None, "phone_enc": "x:1", "context": {}}
    b = {**a, "phone_enc": "x:2"}
    assert message_key(a) == message_key(b)
    assert message_key({**a, "key": "k"}) == "k"


def test_phone_type() -> None:
    assert Phone(ALINE).masked() == "+25078****001"


async def test_no_full_phone_number_or_key_reaches_the_logs(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    sim.set_failure("UserInBlackList", number=ALINE)
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    await queue_receipt(rt, demo, payment.id, dedupe="again", phone="+250788000002")
    sim.set_failure("http500", number="+250788000002", times=1)
    await drain(worker)
    assert caplog.records
    for record in caplog.records:
        # Checked before the JSON formatter's last-line scrub: our code must not rely on it.
        text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        for secret in ("788000001", "788000002", "sim-test-key"):
            assert secret not in text, (record.name, record.getMessage())


async def test_concurrent_runs_of_one_message_send_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    import asyncio

    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    [row] = await jobs_of(rt, "sms.send")
    jobs = SmsJobs(rt)
    outcomes = await asyncio.gather(
        jobs.send(as_job(row)), jobs.send(as_job(row, attempts=2)), return_exceptions=True
    )
    assert len(sim.messages(ALINE)) == 1
    assert all(o is None or isinstance(o, RetryLater) for o in outcomes)
    # The run that waited finds the message sent and does nothing.
    await jobs.send(as_job(row, attempts=3))
    assert len(sim.messages(ALINE)) == 1


@pytest.mark.parametrize("template", ["payment_receipt", "payment_failed", "payment_timeout", "payment_status"])
async def test_payment_messages_from_the_one_query_match_the_row_by_row_build(
    rt: Any, demo: dict[str, Any], template: str
) -> None:
    """The worker fills payment templates from one plain query; build_message (row by row, through the ORM)
    stays the reference: same phone, language and body, in every language the demo members speak."""
    from datetime import UTC, datetime

    from channels.sms.jobs import FAILURE_TEMPLATES, _NotSent, _payment_facts
    from channels.sms.templates import build_message
    from core.db import autocommit
    from core.models import Payment

    jobs = SmsJobs(rt)
    seen_languages, seen_dates, seen_taken = set(), set(), set()
    # Completed with the amount asked, or with less or more taken (collected_minor): the message states that.
    shapes = [("FAILED", "INSUFFICIENT_FUNDS", None), ("COMPLETED", None, None), ("COMPLETED", None, 40_000),
              ("COMPLETED", None, 60_000)]
    # Every member (five, one language each) meets every shape (four).
    members = list(demo["members"].items()) * len(shapes)
    for (phone, member_id), (status, reason, taken) in zip(members, shapes * len(demo["members"]), strict=True):
        payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=member_id,
                                     status=status, failure_reason=reason)
        # Touched two days later (a refund): a completed payment is dated by completed_at (15/01), another
        # by updated_at (17/01).
        async with rt.sessionmaker.begin() as session:
            row = await session.get(Payment, payment.id)
            row.updated_at = datetime(2026, 1, 17, 8, 0, tzinfo=UTC)
            row.collected_minor, row.mismatch = taken, taken is not None
        for payload in (
            {"template": template, "cooperative_id": demo["cooperative_id"], "member_id": member_id,
             "context": {"payment_id": payment.id}},
            # No member and no cooperative in the payload: the phone from the payload, the payment's own coop.
            {"template": template, "context": {"payment_id": payment.id, "language": "fr"},
             "phone_enc": rt.cipher.encrypt(phone, context="sms")},
        ):
            async with autocommit(rt.engine) as conn:
                assert await _payment_facts(conn, payload, 90) is not None  # the fast path is the one taken
                if template in FAILURE_TEMPLATES and status == "COMPLETED":
                    # A failure told of a payment whose money came since: not sent (jobs._stale).
                    with pytest.raises(_NotSent, match="payment_paid_since"):
                        await jobs._build(conn, payload)
                    continue
                fast = await jobs._build(conn, payload)
            async with rt.sessionmaker() as session:
                reference = await build_message(session, rt.cipher, payload,
                                                service_code=rt.settings.ussd_service_code)
            assert fast == reference
            assert payment.reference in fast[2] and fast[0].e164 == phone
            if taken is not None:  # what was taken, beside the 50,000 asked (French groups digits with spaces)
                sep = " " if fast[1] == "fr" else ","
                assert f"{taken:,} RWF".replace(",", sep) in fast[2] and f"50{sep}000 RWF" in fast[2], fast[2]
                seen_taken.add((fast[1], taken))
            seen_languages.add(fast[1])
            seen_dates.update(day for day in ("15/01", "17/01", "16/01") if day in fast[2])
    assert len(seen_languages) >= 2, seen_languages
    if template in FAILURE_TEMPLATES:
        return  # no money taken in what is sent
    assert seen_taken == {(language, taken) for language in seen_languages for taken in (40_000, 60_000)}, seen_taken
    if template == "payment_receipt":  # the template that shows the date: both dates were used
        assert seen_dates == {"15/01", "17/01"}, seen_dates


async def test_a_receipt_for_a_member_that_is_gone_is_parked_with_the_reason(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, member_id="no-such-member",
                       dedupe="gone-member")
    # With the phone in the payload too: still parked (the member the message is for is gone), not sent.
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, member_id="no-such-member",
                       phone=Phone(ALINE), dedupe="gone-member-with-phone")
    await drain(worker)
    jobs = await jobs_of(rt, "sms.send")
    assert len(jobs) == 2
    for job in jobs:
        assert job.status == "PARKED" and "member no-such-member not found" in job.last_error
    assert sim.requests == [] and await sms_rows(rt) == []


async def test_a_message_stored_by_another_run_first_is_counted_queued_once(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs build the same message; the other stores it between this run's look-up and its insert (ON CONFLICT
    DO NOTHING: no row). gateway_sms_total{status="QUEUED"} counted it twice: once per run, not per row. (The other
    run stores outside a worker's lease, as no worker's run can while this one holds the job; this run, finding
    its insert stored nothing, sends nothing and its job is tried again: its next attempt sends the row.)"""
    from core.db import autocommit
    from core.metrics import REGISTRY

    real_build = SmsJobs._build
    raced: list[str] = []

    async def racing(self: SmsJobs, conn: Any, payload: dict[str, Any], **kw: Any) -> Any:
        built = await real_build(self, conn, payload, **kw)
        if not raced:  # the other run, inserting the row (and counting it) before this run's insert
            raced.append(message_key(payload))
            async with autocommit(rt.engine) as other:
                await self._create(other, payload, raced[0])
        return built

    monkeypatch.setattr(SmsJobs, "_build", racing)
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await queue_receipt(rt, demo, payment.id)
    before = REGISTRY.get_sample_value("gateway_sms_total", {"status": "QUEUED"}) or 0.0
    await drain(worker)
    assert raced and sim.messages(ALINE) == []
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    assert len(await sms_rows(rt)) == 1 and len(sim.messages(ALINE)) == 1
    assert REGISTRY.get_sample_value("gateway_sms_total", {"status": "QUEUED"}) == before + 1
