"""'sms.send' when Africa's Talking fails: nothing lost (a parked send can be replayed, an empty balance
waits for the top-up) and nothing doubled (an answer lost after the request went out is not resent)."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select, update

from channels.sms.sender import (
    ACCOUNT_RETRY_SECONDS,
    AfricasTalkingConfig,
    AfricasTalkingSender,
    SmsAccountError,
    SmsTemporaryError,
    SmsUnconfirmedError,
)
from channels.sms.simulator import STATE, create_simulator
from core.config import Secret
from core.db import utcnow
from core.models import OutboxJob, SmsMessage
from core.notify import send_sms
from core.ops import dashboard
from core.outbox import OutboxWorker
from core.phone import Phone
from tests.channels.sms.helpers import SIM_KEY, jobs_of, make_payment
from tests.conftest import drain

ALINE = "+250788000001"


async def queue_receipt(rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    async with rt.sessionmaker.begin() as session:
        await send_sms(session, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, member_id=demo["members"][ALINE],
                       dedupe="receipt-1")


async def the_row(rt: Any) -> SmsMessage:
    async with rt.sessionmaker() as session:
        return (await session.execute(select(SmsMessage))).scalar_one()


async def the_job(rt: Any) -> OutboxJob:
    [job] = await jobs_of(rt, "sms.send")
    return job


async def make_due(rt: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))


async def last_attempt(rt: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(attempts=9))  # max_attempts is 10 for SMS


async def replay_over_the_api(client: Any, demo: dict[str, Any], job_id: int) -> dict[str, Any]:
    """What the README tells an operator to do once the cause is fixed: POST /v1/jobs/{id}/replay."""
    username, password = demo["admin"]
    token = await client.post("/v1/auth/token", json={"username": username, "password": password})
    headers = {"Authorization": f"Bearer {(await token.json())['accessToken']}"}
    parked = await (await client.get("/v1/jobs?status=PARKED&kind=sms.send", headers=headers)).json()
    assert [j["id"] for j in parked["data"]] == [job_id]
    replayed = await client.post(f"/v1/jobs/{job_id}/replay", headers=headers)
    assert replayed.status == 200, await replayed.text()
    return parked["data"][0]


# ------------------------------------------------------------------ finding 1: a parked send can be replayed


async def test_a_send_parked_after_an_outage_is_sent_when_replayed(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")  # the outage outlasts the attempts
    await drain(worker)
    job = await the_job(rt)
    assert job.status == "PARKED"
    row = await the_row(rt)
    # Not sent, and not given up on: still QUEUED, saying why it waits.
    assert (row.status, row.provider_status) == ("QUEUED", "RetriesExhausted")
    assert "HTTP 503" in row.failure_reason
    assert sim.messages(ALINE) == []

    sim.set_failure(None)  # AT is back
    listed = await replay_over_the_api(client, demo, job.id)
    assert "HTTP 503" in listed["lastError"]
    await drain(worker)
    [sent] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.failure_reason) == ("SENT", sent["id"], None)
    assert (await the_job(rt)).status == "DONE"


async def test_a_replayed_send_is_shown_queued_again_not_parked(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """Once replayed, the message is back in the queue: the ops page and its row must not keep calling it parked
    (QUEUED_PARKED: "replay it") while its job retries; parked again, it says so again."""
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    sim.set_failure("http503")
    await drain(worker)
    job = await the_job(rt)
    await replay_over_the_api(client, demo, job.id)
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("QUEUED", None)
    assert "HTTP 503" in row.failure_reason  # why it waited, kept until it goes out
    async with rt.sessionmaker() as session:
        counts = (await dashboard(session, demo["cooperative_id"]))["sms"]["counts"]
    assert counts == {"QUEUED": 1}

    await last_attempt(rt)  # AT still refuses it: the replay's attempts run out and it parks again
    await drain(worker)
    assert (await the_job(rt)).status == "PARKED"
    assert (await the_row(rt)).provider_status == "RetriesExhausted"
    assert sim.messages(ALINE) == []


async def test_replaying_a_job_whose_message_left_sends_nothing(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    """Replay stays safe: a message past QUEUED is never sent again."""
    from core.outbox import replay_job

    await queue_receipt(rt, demo)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    async with rt.sessionmaker.begin() as session:  # as if it had been parked after the send
        await session.execute(update(OutboxJob).values(status="PARKED"))
    async with rt.sessionmaker.begin() as session:
        assert await replay_job(session, (await the_job(rt)).id) is not None
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1 and len(sim.requests) == 1


# -------------------------------------------------------- finding 2: an answer lost after the send: no resend


async def slow_simulator(rt: Any, aiohttp_server: Any, delay: float, wait: float) -> tuple[Any, dict[str, float]]:
    """AT queues the message at once and answers `delay` seconds later; our sender waits `wait` seconds."""
    slow = {"delay": delay}

    @web.middleware
    async def late_answer(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        await asyncio.sleep(slow["delay"])
        return response

    app = create_simulator(username="coop-test", api_key=SIM_KEY, delivery_delay=0.05)
    app.middlewares.append(late_answer)
    server = await aiohttp_server(app)
    rt.sms = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=str(server.make_url("")).rstrip("/"), username="coop-test", api_key=Secret(SIM_KEY),
        sender_id="COOPPAY", timeout=wait))
    return app[STATE], slow


async def test_an_answer_after_our_timeout_is_not_resent(
    rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any
) -> None:
    sim, slow = await slow_simulator(rt, aiohttp_server, delay=1.0, wait=0.3)
    await queue_receipt(rt, demo)
    await drain(worker)  # AT queued it; its answer came after our 0.3 s
    slow["delay"] = 0
    await make_due(rt)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1 and len(sim.requests) == 1  # one SMS, one request
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert row.failure_reason == "unconfirmed, not resent: ReadTimeout after the send"
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 1)


async def test_a_send_cut_off_by_the_worker_is_not_resent(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any
) -> None:
    """The worker cancels a handler still waiting for AT at the end of its time (Job.interrupted)."""
    from channels.sms.jobs import job_handlers

    sim, slow = await slow_simulator(rt, aiohttp_server, delay=8.0, wait=10.0)
    worker = OutboxWorker(rt.sessionmaker, job_handlers(rt), lease_seconds=10)  # handlers get 5 s
    await queue_receipt(rt, demo)
    await worker.run_once()
    job = await the_job(rt)
    assert job.status == "PENDING" and job.last_error.startswith("handler interrupted")
    assert (await the_row(rt)).status == "QUEUED"
    slow["delay"] = 0
    await make_due(rt)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1 and len(sim.requests) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status, row.provider_message_id) == ("SENT", "Unconfirmed", None)
    assert "cut off" in row.failure_reason
    assert (await the_job(rt)).status == "DONE"


def sender_over(handler: Any) -> tuple[AfricasTalkingSender, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(transport))
    return AfricasTalkingSender(client, AfricasTalkingConfig("https://sms.example.test", "coop", Secret("k"))), seen


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        # Nothing of the request reached AT: safe to send again.
        (httpx.ConnectError, SmsTemporaryError),
        (httpx.ConnectTimeout, SmsTemporaryError),
        (httpx.PoolTimeout, SmsTemporaryError),
        (httpx.WriteTimeout, SmsTemporaryError),
        # The request was out; the answer was lost: AT may have queued it.
        (httpx.ReadTimeout, SmsUnconfirmedError),
        (httpx.ReadError, SmsUnconfirmedError),
        (httpx.RemoteProtocolError, SmsUnconfirmedError),
    ],
)
async def test_network_errors_by_whether_the_request_was_out(error: type[Exception], outcome: type[Exception]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)  # type: ignore[call-arg]

    sender, _ = sender_over(fail)
    with pytest.raises(outcome) as raised:
        await sender.send(Phone(ALINE), "Hello")
    assert not isinstance(raised.value, SmsUnconfirmedError if outcome is SmsTemporaryError else SmsTemporaryError)


async def test_accepted_without_a_message_id_is_sent_not_retried() -> None:
    body = {"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": [
        {"statusCode": 101, "number": ALINE, "status": "Success", "cost": "RWF 20", "messageId": "None"}]}}
    sender, _ = sender_over(lambda _r: httpx.Response(201, json=body))
    result = await sender.send(Phone(ALINE), "Hello")
    assert (result.accepted, result.provider_message_id, result.provider_status) == (True, None, "Success")


async def test_a_broken_answer_is_recorded_unconfirmed_through_the_job(
    rt: Any, demo: dict[str, Any], worker: Any
) -> None:
    sent: list[httpx.Request] = []

    def aggregator(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(aggregator)) as http:
        rt.sms = AfricasTalkingSender(http, AfricasTalkingConfig("http://127.0.0.1:9", "u", Secret("k"), "COOPPAY"))
        await queue_receipt(rt, demo)
        await drain(worker)
        await make_due(rt)
        await drain(worker)
    assert len(sent) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Unconfirmed")
    assert row.failure_reason == "unconfirmed, not resent: RemoteProtocolError after the send"


# ----------------------------------------------- finding 3: our account's problems wait, the number's are final


async def test_an_empty_balance_waits_and_the_receipt_goes_out_after_the_top_up(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim.set_failure("InsufficientBalance")
    await queue_receipt(rt, demo)
    with caplog.at_level(logging.ERROR, logger="gateway.sms.sender"):
        await drain(worker)
    assert any("refuses our account" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    job = await the_job(rt)
    assert job.status == "PENDING" and "InsufficientBalance" in job.last_error
    # Retried slowly: someone has to top up.
    assert job.run_at >= utcnow() + timedelta(seconds=ACCOUNT_RETRY_SECONDS - 60)
    assert (await the_row(rt)).status == "QUEUED"
    assert sim.messages(ALINE) == []

    sim.set_failure(None)  # topped up
    await make_due(rt)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    assert (await the_row(rt)).status == "SENT"


async def test_texts_held_by_a_refused_api_key_go_out_at_once_when_an_admin_runs_them(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any
) -> None:
    """SMS_API_KEY wrong: Africa's Talking refuses it (HTTP 401) and the receipt waits 30 minutes for its next try.
    Once the key is fixed, the admin runs the waiting texts now (POST /v1/jobs/replay with waiting: true) rather
    than the members waiting out the backoff; before, the replay took parked jobs only and refused this one (409)."""
    right = rt.sms
    rt.sms = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=right._config.base_url, username="coop-test", api_key=Secret("a-revoked-key"), sender_id="COOPPAY"))
    await queue_receipt(rt, demo)
    await drain(worker)
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("PENDING", 1) and "credentials" in job.last_error
    assert job.run_at >= utcnow() + timedelta(seconds=ACCOUNT_RETRY_SECONDS - 60)
    assert (await the_row(rt)).status == "QUEUED" and sim.messages(ALINE) == []

    rt.sms = right  # the key fixed (every worker restarted with it)
    await drain(worker)
    assert sim.messages(ALINE) == []  # still waiting out its 30 minutes

    username, password = demo["admin"]
    token = await client.post("/v1/auth/token", json={"username": username, "password": password})
    headers = {"Authorization": f"Bearer {(await token.json())['accessToken']}"}
    waiting = await (await client.get("/v1/jobs?waiting=true&kind=sms.send", headers=headers)).json()
    assert [j["id"] for j in waiting["data"]] == [job.id]
    ran = await client.post("/v1/jobs/replay", json={"waiting": True, "kind": "sms.send"}, headers=headers)
    assert ran.status == 200, await ran.text()
    assert (await ran.json())["replayed"] == [job.id]
    await drain(worker)
    [sent] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) == ("SENT", sent["id"])
    assert (await the_job(rt)).status == "DONE"


async def test_a_redis_outage_longer_than_the_attempts_parks_no_receipt(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis down (its send rate's slot and send lock cannot be taken) is no failed attempt: the receipt waits
    for Redis, not sent, and goes out once when it is back. Counted as attempts, an outage of ~10 minutes parked
    every receipt queued in its first minutes (its last attempt here), sent only if an operator replayed it."""
    from app import create_worker
    from channels.sms import jobs
    from tests.admin_api.conftest import redis_unreachable

    monkeypatch.setattr(jobs, "_redis_away_said", -math.inf, raising=False)  # said once a minute
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    async with redis_unreachable(rt):
        with caplog.at_level(logging.WARNING, logger="gateway.sms.jobs"):
            await drain(create_worker(rt))  # a worker of the outage: its rate limiter's client is the dead one
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("PENDING", 9), (job.status, job.attempts, job.last_error)
    assert job.last_error.startswith("waiting for Redis (ConnectionError)"), job.last_error
    assert job.run_at >= utcnow() + timedelta(seconds=5)  # not a busy loop against a dead Redis
    assert sim.messages(ALINE) == [] and len(sim.requests) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.sms.jobs"] == [
        "SMS sends wait for Redis: not sent, tried again without using their attempts"]

    await make_due(rt)  # Redis is back
    await drain(worker)
    [sent] = sim.messages(ALINE)
    row = await the_row(rt)
    assert (row.status, row.provider_message_id) == ("SENT", sent["id"])
    assert (await the_job(rt)).status == "DONE"


async def test_a_redis_refusing_our_password_parks_the_receipt_rather_than_waiting_for_ever(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis refusing the password (REDIS_URL's rotated, not the server's) is no outage: it does not pass by
    waiting. The receipt's attempts are used as for any failure and its last one parks it, where the operator sees
    it, rather than being tried again every half minute for ever without a word."""
    from redis.exceptions import AuthenticationError

    from channels.sms import jobs

    async def refused(*_args: Any, **_kwargs: Any) -> None:
        raise AuthenticationError("invalid username-password pair or user is disabled.")

    monkeypatch.setattr(jobs.SmsJobs, "throttle_and_lock", refused)
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    await drain(worker)
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("PARKED", 10), (job.status, job.attempts, job.last_error)
    assert job.last_error.startswith("AuthenticationError"), job.last_error
    assert sim.messages(ALINE) == [] and len(sim.requests) == 0
    async with rt.sessionmaker() as session:  # refused before it was built: nothing stored, nothing sent
        assert (await session.execute(select(SmsMessage))).first() is None


async def test_a_send_in_doubt_stays_in_doubt_through_a_redis_outage(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any
) -> None:
    """An attempt cut off mid-send (AT may have the message) followed by one that meets Redis down: the doubt is
    handed on whole, and the attempt after the outage records the message Unconfirmed rather than sending it again."""
    from app import create_worker
    from tests.admin_api.conftest import redis_unreachable

    await queue_receipt(rt, demo)
    sim.set_failure("http500", times=1)  # the row is stored, AT refuses: QUEUED, to be retried
    await drain(worker)
    assert (await the_row(rt)).status == "QUEUED" and len(sim.requests) == 1
    async with rt.sessionmaker.begin() as session:  # ...as if that attempt had been cut off waiting for AT instead
        await session.execute(update(OutboxJob).values(
            last_error="handler interrupted: still running after 5s and cancelled",
            run_at=utcnow() - timedelta(seconds=1)))
    async with redis_unreachable(rt):
        await drain(create_worker(rt))
    assert (await the_job(rt)).last_error.startswith("handler interrupted"), (await the_job(rt)).last_error

    await make_due(rt)  # Redis is back
    await drain(worker)
    assert sim.messages(ALINE) == [] and len(sim.requests) == 1, "sent a second time"
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Unconfirmed")
    assert (await the_job(rt)).status == "DONE"


@pytest.mark.parametrize("failure", ["RiskHold", "InvalidSenderId", "InsufficientBalance"])
async def test_account_refusals_park_and_replay_sends(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, client: Any, failure: str
) -> None:
    sim.set_failure(failure)
    await queue_receipt(rt, demo)
    await last_attempt(rt)
    await drain(worker)
    job = await the_job(rt)
    assert job.status == "PARKED" and failure in job.last_error
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("QUEUED", "RetriesExhausted") and failure in row.failure_reason

    sim.set_failure(None)
    await replay_over_the_api(client, demo, job.id)
    await drain(worker)
    assert len(sim.messages(ALINE)) == 1
    assert (await the_row(rt)).status == "SENT"


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        ("InvalidPhoneNumber", "InvalidPhoneNumber"),
        ("UnsupportedNumberType", "UnsupportedNumberType"),
        ("UserInBlacklist", "UserInBlacklist"),
        ("CouldNotRoute", "CouldNotRoute"),
        ("DoNotDisturbRejection", "DoNotDisturbRejection"),
    ],
)
async def test_refusals_of_the_number_stay_final(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, failure: str, status: str
) -> None:
    sim.set_failure(failure, number=ALINE)
    await queue_receipt(rt, demo)
    await drain(worker)
    row = await the_row(rt)
    assert (row.status, row.failure_reason) == ("REJECTED", status)
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("DONE", 1)
    assert len(sim.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(401, text="The supplied authentication is invalid"),
        httpx.Response(201, json={"SMSMessageData": {"Message": "InvalidSenderId", "Recipients": []}}),
        httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 0/1", "Recipients": [
            {"statusCode": 401, "number": ALINE, "status": "RiskHold", "cost": "0", "messageId": "None"}]}}),
    ],
    ids=["http-401", "no-recipient-InvalidSenderId", "recipient-401-RiskHold"],
)
async def test_account_answers_are_retried_slowly(answer: httpx.Response) -> None:
    sender, _ = sender_over(lambda _r: answer)
    with pytest.raises(SmsAccountError) as raised:
        await sender.send(Phone(ALINE), "Hello")
    assert raised.value.retry_after == ACCOUNT_RETRY_SECONDS


async def test_an_aggregator_outage_is_reported_once_as_the_providers_are(caplog: Any) -> None:
    """Africa's Talking refusing every message for a while (HTTP 5xx, or out of reach) is an outage as a payment
    provider's is: one error line and gateway_provider_failing{provider="africastalking"} 1 from the fifth failure in
    a row, back to 0 with one line when it answers again, not only a warning per message."""
    from core.metrics import REGISTRY

    answers = [httpx.Response(503)] * 3 + ["down"] * 2 + [httpx.Response(500)] * 2 + [ACCEPTED_ANSWER]

    def answer(request: httpx.Request) -> httpx.Response:
        given = answers.pop(0)
        if given == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return given

    def failing() -> float | None:
        return REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "africastalking"})

    sender, _ = sender_over(answer)
    with caplog.at_level(logging.INFO, logger="gateway.providers"):
        for _ in range(7):
            with pytest.raises(SmsTemporaryError):
                await sender.send(Phone(ALINE), "Hello")
        assert failing() == 1
        assert (await sender.send(Phone(ALINE), "Hello")).accepted
        assert failing() == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.providers"]
    assert len(lines) == 2 and lines[0].startswith("africastalking calls failing since 20"), lines
    assert lines[1] == "africastalking calls succeed again"


async def test_a_refused_api_key_is_shown_as_refused_credentials_not_ok(caplog: Any) -> None:
    """SMS_API_KEY refused (HTTP 401): the ops page's "Providers now" (this process's view, as recorded in Redis)
    said Africa's Talking was OK, an answered call, while every text waited on the key. Now it is reported as a
    payment provider refusing the gateway's credentials is: at once, CREDENTIALS_REFUSED, gateway_provider_failing
    1 and one error line, until a text is accepted again (the key fixed)."""
    from core.metrics import REGISTRY
    from providers.calls import health_view

    answers = [httpx.Response(401, text="The supplied authentication is invalid")] * 2 + [ACCEPTED_ANSWER]
    sender, _ = sender_over(lambda _r: answers.pop(0))
    with caplog.at_level(logging.INFO, logger="gateway.providers"):
        for _ in range(2):
            with pytest.raises(SmsAccountError):
                await sender.send(Phone(ALINE), "Hello")
        view = health_view()["africastalking"]
        assert (view["failing"], view["lastError"], view["credentialsRefused"]) == (True, "CREDENTIALS_REFUSED",
                                                                                   ["sms.send"])
        assert view["lastErrorSummary"] == "sms.send: credentials refused"
        assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "africastalking"}) == 1
        assert (await sender.send(Phone(ALINE), "Hello")).accepted
    view = health_view()["africastalking"]
    assert (view["failing"], view["credentialsRefused"]) == (False, [])
    assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "africastalking"}) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.providers"]
    assert lines == ["africastalking refuses the gateway's credentials (sms.send): fix its configuration",
                     "africastalking calls succeed again"]


ACCEPTED_ANSWER = httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": [
    {"statusCode": 101, "number": ALINE, "status": "Success", "cost": "RWF 20", "messageId": "ATXid_1"}]}})


@pytest.mark.parametrize("recipients", [[None], "Sent", {"number": ALINE, "statusCode": 101}, [["Success"]]])
async def test_an_accepted_request_with_unreadable_recipients_is_not_resent(
    rt: Any, demo: dict[str, Any], worker: Any, recipients: Any
) -> None:
    """A 2xx whose Recipients are not objects is an answer we cannot read: AT took the request and may have queued
    the message, so it is recorded Unconfirmed and not sent again (it failed the job, whose retry sent it again)."""
    sent: list[httpx.Request] = []

    def aggregator(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": recipients}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(aggregator)) as http:
        rt.sms = AfricasTalkingSender(http, AfricasTalkingConfig("http://127.0.0.1:9", "u", Secret("k"), "COOPPAY"))
        await queue_receipt(rt, demo)
        await drain(worker)
        await make_due(rt)
        await drain(worker)
    assert len(sent) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_status) == ("SENT", "Unconfirmed")
    assert row.failure_reason == "unconfirmed, not resent: unreadable HTTP 201 answer"
    assert (await the_job(rt)).status == "DONE"


async def test_an_accepted_answer_with_a_numeric_cost_is_recorded_sent(
    rt: Any, demo: dict[str, Any], worker: Any
) -> None:
    """AT's cost is a string ("RWF 20.0000"); one given as a number must not fail the outcome's write (the message,
    which AT has, stayed QUEUED, its every retry failing the same write until the job was parked)."""
    body = {"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": [
        {"statusCode": 101, "number": ALINE, "status": "Success", "cost": 20.5, "messageId": "ATXid_num"}]}}
    sent: list[httpx.Request] = []

    def aggregator(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(aggregator)) as http:
        rt.sms = AfricasTalkingSender(http, AfricasTalkingConfig("http://127.0.0.1:9", "u", Secret("k"), "COOPPAY"))
        await queue_receipt(rt, demo)
        await drain(worker)
    assert len(sent) == 1
    row = await the_row(rt)
    assert (row.status, row.provider_message_id, row.cost) == ("SENT", "ATXid_num", "20.5")
    assert (await the_job(rt)).status == "DONE"


@pytest.mark.parametrize(("key", "error"), [("at-key-9c1e\u2019f0", "UnicodeEncodeError"),
                                            ("at-key-9c1ef0\n", "ValueError")])
async def test_an_api_key_a_header_cannot_carry_waits_counted_and_logged_not_shown_refused(
    rt: Any, demo: dict[str, Any], sim: Any, worker: Any, caplog: pytest.LogCaptureFixture, key: str, error: str
) -> None:
    """SMS_API_KEY pasted with a character outside ASCII: the request cannot be made, nothing reaches Africa's Talking.
    Before: httpx's UnicodeEncodeError came out raw, in no error count and no log line of the sender's, the receipt
    retried on the outbox's short backoff. Now as a payment provider's request not made (providers.calls): counted in
    gateway_provider_errors_total, one error line naming the class (never the key), and the text waits as for a
    refused key (30 minutes, QUEUED). The ops page does not call Africa's Talking failing or refusing: it never saw
    the request (UNKNOWN until a call is answered).

    So does one with a control character (a key read from a file with its line break, as a Kubernetes secret made
    --from-file is): httpx builds it, and the gateway's client (core.http) refused it only as it was about to write
    it, with aiohttp's ValueError, raw as the UnicodeEncodeError was."""
    from core.metrics import REGISTRY
    from providers.calls import health_view
    from providers.health import summarize
    from tests import logscan

    logscan.register_secret(key)
    errors = REGISTRY.get_sample_value("gateway_provider_errors_total",
                                       {"provider": "africastalking", "operation": "sms.send"}) or 0.0
    right = rt.sms
    rt.sms = AfricasTalkingSender(rt.http, AfricasTalkingConfig(
        base_url=right._config.base_url, username="coop-test", api_key=Secret(key), sender_id="COOPPAY"))
    await queue_receipt(rt, demo)
    with caplog.at_level(logging.ERROR, logger="gateway.providers"):
        await drain(worker)
    job = await the_job(rt)
    assert (job.status, job.attempts) == ("PENDING", 1)
    assert f"could not be made ({error})" in job.last_error and "nothing was sent" in job.last_error
    assert job.run_at >= utcnow() + timedelta(seconds=ACCOUNT_RETRY_SECONDS - 60)
    assert (await the_row(rt)).status == "QUEUED" and sim.messages(ALINE) == [] and sim.requests == []
    assert REGISTRY.get_sample_value("gateway_provider_errors_total",
                                     {"provider": "africastalking", "operation": "sms.send"}) == errors + 1
    [line] = [r for r in caplog.records if "could not be made" in r.getMessage()]
    assert line.getMessage() == ("Africa's Talking sms.send: the request could not be made, nothing was sent "
                                 f"({error})")
    assert key.strip() not in caplog.text
    assert "africastalking" not in health_view()
    [row] = summarize([{"providers": health_view()}], ["africastalking"])
    assert (row["status"], row["credentialsRefused"], row["lastError"]) == ("UNKNOWN", [], None)
