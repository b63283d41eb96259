"""What an operator on call sees: a payment's jobs found by its id (over the API and in the logs), readiness and
/metrics while Redis is down, a payment stuck open past its window, and a worker whose database is down."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

import core.outbox as outbox
from channels.sms.sender import SmsTemporaryError
from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, Payment, WebhookEndpoint
from core.outbox import OutboxWorker, enqueue, enqueue_job, job_subject
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome, flagged_job
from core.webhooks import enable_endpoint, fan_out
from tests.admin_api.conftest import bearer, make_payment, redis_unreachable
from tests.conftest import drain, readiness
from tests.core.test_webhooks import approved_endpoint


async def _admin(client: Any, demo: dict[str, Any]) -> Any:
    return await bearer(client, *demo["admin"])


async def _complete(rt: Any, payment_id: str) -> None:
    """The provider's word that the payment went through (a callback's path): queues its receipt and webhook."""
    async with rt.sessionmaker.begin() as s:
        payment = await s.get(Payment, payment_id, with_for_update=True)
        await apply_collection_outcome(s, rt, payment, ProviderOutcome.SUCCEEDED,
                                       actor=Actor("provider:mtn_momo", "provider"), provider_transaction_id="TX-1")


async def _pay(admin: Any, demo: dict[str, Any]) -> dict[str, Any]:
    """A payment for the demo's water bill (5,000 RWF), by MTN MoMo, asked over the API."""
    return await make_payment(admin, demo["payment_types"]["Water"], amount=5000)


def _records(caplog: Any, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


# -- a payment's jobs, by its id -------------------------------------------------------------------------------


async def test_a_payments_jobs_are_listed_by_its_id_with_their_subject(rt, client, demo):
    admin = await _admin(client, demo)
    mine, other = await _pay(admin, demo), await _pay(admin, demo)
    await _complete(rt, mine["id"])  # its receipt SMS and its webhook event are queued
    async with rt.sessionmaker.begin() as s:
        # What the webhook fan-out queues for each endpoint (core.webhooks: the event id names the payment).
        await enqueue(s, "webhook.deliver", {"endpoint_id": "endpoint-1",
                                             "event_id": f"evt_payment_completed_{mine['id']}"},
                      dedupe_key="whd:test", cooperative_id=demo["cooperative_id"])

    page = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}&limit=100", 200)
    assert sorted(j["kind"] for j in page["data"]) == [
        "payment.collect", "payment.poll", "sms.send", "webhook.deliver", "webhook.event"]
    assert {(j["subject"]["type"], j["subject"]["id"]) for j in page["data"]} == {("payment", mine["id"])}
    assert page["meta"]["total"] == 5
    theirs = await admin.json("GET", f"/v1/jobs?paymentId={other['id']}", 200)
    assert sorted(j["kind"] for j in theirs["data"]) == ["payment.collect", "payment.poll"]
    # Every job's view names what it is about: the unfiltered list shows the receipt's and webhook's subject too.
    listed = await admin.json("GET", "/v1/jobs?kind=sms.send", 200)
    assert [j["subject"] for j in listed["data"]] == [{"type": "payment", "id": mine["id"]}]

    # Only the jobs not DONE are searched (the DONE history is not read by payload): said, not silently empty.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(status="DONE"))
    page = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}&limit=100", 200)
    assert "payment.collect" not in {j["kind"] for j in page["data"]} and len(page["data"]) == 4
    parked = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}&status=PARKED", 200)
    assert parked["data"] == []
    body = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}&status=DONE", 400)
    assert "search the jobs not DONE" in body["message"][0]
    await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}&refundId={other['id']}", 400)
    await admin.json("GET", "/v1/jobs?paymentId=not-a-uuid", 400)


async def test_a_refunds_jobs_are_listed_by_its_id(rt, client, demo):
    admin = await _admin(client, demo)
    refund_id, other = "0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    coop = demo["cooperative_id"]
    async with rt.sessionmaker.begin() as s:  # the payloads core.refunds and core.notify queue
        await enqueue(s, "refund.submit", {"refund_id": refund_id}, dedupe_key=f"refund:{refund_id}",
                      cooperative_id=coop)
        await enqueue(s, "sms.send", {"template": "refund_completed", "context": {"refund_id": refund_id},
                                      "phone_enc": "sealed"}, dedupe_key="sms:r", cooperative_id=coop)
        await enqueue(s, "webhook.event", {"event_type": "refund.completed", "data": {"id": refund_id},
                                           "event_id": f"evt_refund_completed_{refund_id}"},
                      dedupe_key="wh:r", cooperative_id=coop)
        await enqueue(s, "refund.submit", {"refund_id": other}, dedupe_key=f"refund:{other}", cooperative_id=coop)
    page = await admin.json("GET", f"/v1/jobs?refundId={refund_id}", 200)
    assert sorted(j["kind"] for j in page["data"]) == ["refund.submit", "sms.send", "webhook.event"]
    assert {j["subject"]["id"] for j in page["data"]} == {refund_id}
    assert (await admin.json("GET", f"/v1/jobs?paymentId={refund_id}", 200))["data"] == []


async def test_a_flags_webhook_jobs_are_listed_by_its_payments_id(rt, client, demo):
    """payment.flagged's event id ends with a digest after the payment's id, and each delivery's stored id is all a
    digest (longer than the column): its event job and its delivery jobs named no payment, and ?paymentId= found
    neither, while a delivery waited for a receiver that was down."""
    admin = await _admin(client, demo)
    mine = await _pay(admin, demo)
    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook",
                                          events=["payment.flagged"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(status="DONE"))  # its collect and poll: not this test's
        payment = await s.get(Payment, mine["id"])
        await enqueue_job(s, flagged_job(payment, "amount_mismatch", "provider reported 4,000 RWF, expected 5,000 RWF"))
    subject = {"type": "payment", "id": mine["id"]}
    page = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}", 200)
    assert [(j["kind"], j["subject"]) for j in page["data"]] == [("webhook.event", subject)]

    async with rt.sessionmaker() as s:
        event = await s.get(OutboxJob, page["data"][0]["id"])
        assert event is not None
    assert await fan_out(rt, event.payload, event.id) == 1
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.id == event.id).values(status="DONE"))
    page = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}", 200)
    assert [(j["kind"], j["subject"]) for j in page["data"]] == [("webhook.deliver", subject)]

    # The endpoint switched off after failures and enabled again: the job queued for its held delivery names the
    # payment too (it was queued with the digest alone).
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(
            status="DISABLED", disabled_at=utcnow() - timedelta(hours=1)))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "webhook.deliver").values(status="DONE"))
    async with rt.sessionmaker.begin() as s:
        await enable_endpoint(s, endpoint_id=endpoint.id, cooperative_id=demo["cooperative_id"],
                              actor=Actor("admin:walk", "api"))
    page = await admin.json("GET", f"/v1/jobs?paymentId={mine['id']}", 200)
    assert [(j["kind"], j["subject"]) for j in page["data"]] == [("webhook.deliver", subject)]
    async with rt.sessionmaker() as s:
        resumed = await s.get(OutboxJob, page["data"][0]["id"])
    assert resumed is not None and "resumed_at" in resumed.payload


def test_a_jobs_subject_is_an_opaque_id_only():
    assert job_subject("sms.send", {"context": {"payment_id": "p-1"}, "phone_enc": "sealed"}) == ("payment", "p-1")
    # A dispute's SMS, a member's: no payment or refund to name, and nothing else from the payload.
    assert job_subject("sms.send", {"context": {"dispute_id": "d-1", "status": "OPEN"}}) is None
    assert job_subject("sms.send", {"context": {}, "phone_enc": "sealed"}) is None
    assert job_subject("webhook.deliver", {"event_id": "evt_dispute_opened_d-1"}) is None
    assert job_subject("webhook.deliver", {"event_id": "evt_" + "a" * 48}) is None  # a digest names nothing
    assert job_subject("ussd.forget_phone", {"blind_index": "x"}) is None


async def test_a_parked_receipt_sms_is_traced_to_its_payment(rt, client, demo, worker, caplog):
    admin = await _admin(client, demo)
    pay = await _pay(admin, demo)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(status="DONE"))  # its collect and poll: not this test's
    await _complete(rt, pay["id"])

    class Down:
        async def send(self, phone: Any, body: str) -> Any:
            raise SmsTemporaryError("Africa's Talking answered 503")

    rt.sms = Down()
    async with rt.sessionmaker.begin() as s:  # its last attempt
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(attempts=9))
    with caplog.at_level(logging.INFO, logger="gateway.outbox"):
        await drain(worker)
    parked = await admin.json("GET", f"/v1/jobs?status=PARKED&paymentId={pay['id']}", 200)
    assert [(j["kind"], j["subject"]) for j in parked["data"]] == [("sms.send", {"type": "payment", "id": pay["id"]})]
    lines = _records(caplog, "job parked after retries")
    assert [(r.kind, r.payment_id) for r in lines] == [("sms.send", pay["id"])]  # type: ignore[attr-defined]


async def test_a_retried_jobs_log_line_names_its_payment(rt, client, demo, worker, caplog):
    admin = await _admin(client, demo)
    pay = await _pay(admin, demo)
    with caplog.at_level(logging.INFO, logger="gateway.outbox"):
        await drain(worker, rounds=1)  # MTN's base URL answers nothing here: the collect fails
    retried = _records(caplog, "job failed, will retry")
    assert retried and {(r.kind, r.payment_id) for r in retried} == {  # type: ignore[attr-defined]
        ("payment.collect", pay["id"])}


async def test_a_refused_callback_is_logged_with_the_reference_it_named(rt, client, demo, caplog):
    admin = await _admin(client, demo)
    pay = await _pay(admin, demo)
    ref = pay["gatewayReference"]
    with caplog.at_level(logging.INFO, logger="gateway.providers.callbacks"):
        unknown = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(
            {"referenceId": ref, "externalId": pay["reference"], "status": "REVERSED_X"}))
        phone = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(
            {"referenceId": "250788123456", "status": "REVERSED_X"}))
        empty = await client.post("/webhooks/payments/mtn_momo", data=json.dumps({"status": "SUCCESSFUL"}))
    assert (unknown.status, phone.status, empty.status) == (400, 400, 400)
    refused = _records(caplog, "provider callback refused")
    assert [getattr(r, "reference", None) for r in refused] == [ref, "25078****456", None]
    assert "REVERSED_X" in refused[0].reason  # type: ignore[attr-defined]


# -- readiness and Redis ---------------------------------------------------------------------------------------


async def _scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await response.text()) for s in family.samples}


def _get(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def test_readiness_follows_the_database_and_reports_redis(rt, client, demo, monkeypatch):
    assert await readiness(client) == (200, {"status": "ok", "checks": {"database": "ok", "redis": "ok"}})
    assert _get(await _scrape(client), "gateway_redis_up") == 1

    # Redis down: the API and provider callbacks still work, so the balancer keeps the process; Redis is named.
    async with redis_unreachable(rt):
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 200 and body["status"] == "degraded"
        assert body["checks"]["database"] == "ok" and body["checks"]["redis"].startswith("error: ")
        admin = await _admin(client, demo)
        await admin.json("GET", "/v1/payments", 200)
        assert _get(await _scrape(client), "gateway_redis_up") == 0
    assert _get(await _scrape(client), "gateway_redis_up") == 1

    class DatabaseDown:
        def connect(self) -> Any:
            raise ConnectionRefusedError("database down")

    monkeypatch.setattr(rt, "engine", DatabaseDown())
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["checks"]["database"] == "error: ConnectionRefusedError"


# -- a payment stuck open --------------------------------------------------------------------------------------


async def test_a_payment_open_past_its_window_shows_in_metrics(rt, client, demo, monkeypatch):
    admin = await _admin(client, demo)
    pay = await _pay(admin, demo)
    fresh = await _scrape(client)
    assert _get(fresh, "gateway_payments_open", provider="mtn_momo") == 1
    assert _get(fresh, "gateway_payments_open_past_window", provider="mtn_momo") == 0
    assert _get(fresh, "gateway_payments_open_past_window_oldest_seconds") == 0
    assert _get(fresh, "gateway_payments_open", provider="airtel") == 0  # every configured provider: a 0, not absent

    # Its poll keeps hearing "unknown" and waits 30 minutes each time: the outbox looks healthy, the payment is not.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == pay["id"]).values(
            status="PROCESSING", created_at=utcnow() - timedelta(hours=1, minutes=5),
            expires_at=utcnow() - timedelta(hours=1)))
    stuck = await _scrape(client)
    assert _get(stuck, "gateway_payments_open", provider="mtn_momo") == 1
    assert _get(stuck, "gateway_payments_open_past_window", provider="mtn_momo") == 1
    assert 3590 < _get(stuck, "gateway_payments_open_past_window_oldest_seconds") < 3700

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == pay["id"]).values(status="COMPLETED"))
    settled = await _scrape(client)
    assert _get(settled, "gateway_payments_open", provider="mtn_momo") == 0
    assert _get(settled, "gateway_payments_open_past_window_oldest_seconds") == 0

    class Down:
        def __call__(self) -> Any:
            raise ConnectionRefusedError("database down")

    monkeypatch.setattr(rt, "sessionmaker", Down())
    down = await _scrape(client)  # not the last figures as current: NaN, with gateway_outbox_gauges_ok 0
    assert _get(down, "gateway_outbox_gauges_ok") == 0
    assert math.isnan(_get(down, "gateway_payments_open", provider="mtn_momo"))
    assert math.isnan(_get(down, "gateway_payments_open_past_window_oldest_seconds"))


# -- a worker whose database is down ---------------------------------------------------------------------------


async def test_a_worker_whose_claims_fail_backs_off_and_logs_once_a_minute(rt, monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: clock[0])
    worker = OutboxWorker(rt.sessionmaker, {}, idle_sleep=0.2)
    waits: list[float] = []
    outcomes = iter([*[ConnectionRefusedError("database down")] * 7, None, None, OSError("again"), None])

    async def claim(limit: int | None = None, *, sparing: Any = ()) -> list[Any]:
        outcome = next(outcomes, StopAsyncIteration)
        if outcome is StopAsyncIteration:
            worker.stop()
        elif outcome is not None:
            raise outcome
        return []

    async def sleep(seconds: float, or_until: Any = None) -> None:
        waits.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(worker, "claim", claim)
    monkeypatch.setattr(worker, "_sleep", sleep)
    with caplog.at_level(logging.INFO, logger="gateway.outbox"):
        await asyncio.wait_for(worker.run_forever(), 5)
    # Doubling from 2 s up to 30 s while it fails; idle polling as usual once it works; 2 s again after that.
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 0.2, 0.2, 2.0, 0.2, 0.2]
    lines = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines == [
        ("ERROR", "claiming jobs failed; backing off", True),  # the first, with its traceback
        ("ERROR", "claiming jobs still fails", False),  # a minute on (t=60 s: the 5 failures since)
        ("WARNING", "claiming jobs works again", False),
        ("ERROR", "claiming jobs failed; backing off", True),
        ("WARNING", "claiming jobs works again", False),
    ]
    still = caplog.records[1]
    assert (still.error, still.failures_since_last_line, still.failing_for_s) == (  # type: ignore[attr-defined]
        "ConnectionRefusedError", 5, 60)
    assert caplog.records[2].failures == 7  # type: ignore[attr-defined]
