"""A payment the provider still reports pending when our approval window ends (MTN PENDING, Airtel TIP) stays open
and polled for PAYMENT_PENDING_GRACE_SECONDS: the provider's PIN prompt lives from when it received the request
(MTN: about 5 minutes), later than our window began, and an approval there takes the money while MTN's one
callback may be lost. "Not approved in time" only once the provider still says pending after that grace."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update

from core.config import ConfigError, ProviderConfig, Secret, load_settings
from core.db import utcnow
from core.jobs import STUCK_AFTER, sweep_open_payments
from core.models import OutboxJob, Payment
from core.payments import NewPayment, create_payment
from providers.airtel.adapter import AirtelAdapter
from tests.conftest import drain
from tests.providers.conftest import load
from tests.providers.wires import ADMIN, Routes, due_now, mtn_adapter, mtn_payment, mtn_wire

STATUS = "/collection/v1_0/requesttopay/"
PENDING = {"amount": "50000", "currency": "RWF", "financialTransactionId": None,
           "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}, "status": "PENDING"}
SUCCESSFUL = {**PENDING, "financialTransactionId": "FT-77", "status": "SUCCESSFUL"}
AIRTEL_BASE = "https://airtel.test"


async def _payment(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _window_over(rt: Any, payment_id: str, ago: timedelta = timedelta(seconds=1)) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment_id).values(expires_at=utcnow() - ago))
    await due_now(rt, "payment.poll")


async def _polls(rt: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll"))).scalars())


async def _dedupe_keys(rt: Any, kind: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == kind))).scalars())


async def _mtn_processing(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Routes, Payment]:
    """An MTN payment MTN accepted (PROCESSING) and still shows the payer (PENDING), over a fail-closed wire."""
    wire = mtn_wire().on("POST", "/collection/v1_0/requesttopay", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await worker.run_once()  # the collect job
    stored = await _payment(rt, payment.id)
    assert stored.status == "PROCESSING"
    ref = stored.provider_reference
    wire.on("GET", STATUS + ref, 200, {**PENDING, "externalId": ref})
    return wire, stored


async def _assert_open_and_polled(rt: Any, payment: Payment, at_most: float) -> OutboxJob:
    """Still open, nothing told to anyone, and its poll due again within `at_most` seconds."""
    held = await _payment(rt, payment.id)
    assert (held.status, held.failure_reason) == ("PROCESSING", None)
    assert await _dedupe_keys(rt, "sms.send") == []
    [poll] = await _polls(rt)
    assert poll.status == "PENDING" and "still pending at the provider after the approval window" in poll.last_error
    assert 0 < (poll.run_at - utcnow()).total_seconds() <= at_most
    assert abs((held.next_poll_at - poll.run_at).total_seconds()) < 2
    return poll


async def test_mtn_pending_at_the_window_end_is_asked_again_and_its_approval_completes_it(rt, demo, worker):
    wire, payment = await _mtn_processing(rt, demo, worker)
    ref = payment.provider_reference
    await _window_over(rt, payment.id)
    await drain(worker)
    # MTN's prompt (5 minutes from when MTN got the request) may still be on the payer's phone: kept open, asked
    # again a minute later, not "not approved in time" and no "not approved" SMS.
    await _assert_open_and_polled(rt, payment, at_most=60)
    assert await sweep_open_payments(rt) == 0  # its poll is alive: no second one
    # The payer approves on that prompt; MTN's one callback is lost: its status says so at the next poll.
    wire.on("GET", STATUS + ref, 200, {**SUCCESSFUL, "externalId": ref})
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.late, done.failure_reason, done.provider_transaction_id) == (
        "COMPLETED", False, None, "FT-77")
    assert await _dedupe_keys(rt, "sms.send") == [f"sms:payment_receipt:{payment.id}"]
    assert f"wh:evt_payment_timeout_{payment.id}" not in await _dedupe_keys(rt, "webhook.event")
    assert len(wire.sent("POST", "/collection/v1_0/requesttopay")) == 1


async def test_a_payment_in_the_grace_whose_poll_was_lost_is_found_by_the_sweep(rt, demo, worker):
    wire, payment = await _mtn_processing(rt, demo, worker)
    await _window_over(rt, payment.id)
    await drain(worker)
    async with rt.sessionmaker.begin() as s:  # its poll job lost (a restored backup)
        await s.execute(delete(OutboxJob).where(OutboxJob.kind == "payment.poll"))
    assert await sweep_open_payments(rt, now=utcnow() + STUCK_AFTER + timedelta(minutes=1)) == 1
    ref = payment.provider_reference
    wire.on("GET", STATUS + ref, 200, {**SUCCESSFUL, "externalId": ref})
    await drain(worker)
    assert (await _payment(rt, payment.id)).status == "COMPLETED"


async def test_still_pending_when_the_grace_ends_is_not_approved_in_time(rt, demo, worker):
    _wire, payment = await _mtn_processing(rt, demo, worker)
    grace = timedelta(seconds=rt.settings.payment_pending_grace_seconds)
    assert grace == timedelta(minutes=10)  # the default: MTN's 5-minute prompt, and a margin
    await _window_over(rt, payment.id, grace - timedelta(minutes=1))
    await drain(worker)
    await _assert_open_and_polled(rt, payment, at_most=60)  # never asked past the grace's end
    await _window_over(rt, payment.id, grace)
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.failure_reason, done.late) == ("TIMEOUT", "not approved in time", False)
    assert await _dedupe_keys(rt, "sms.send") == [f"sms:payment_timeout:{payment.id}"]
    [poll] = await _polls(rt)
    assert poll.status == "DONE"


async def test_the_pending_grace_is_the_configured_one(rt, demo, worker, monkeypatch):
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, payment_pending_grace_seconds=120))
    _wire, payment = await _mtn_processing(rt, demo, worker)
    await _window_over(rt, payment.id, timedelta(seconds=100))
    await drain(worker)
    await _assert_open_and_polled(rt, payment, at_most=20)  # the grace ends in 20 s
    await _window_over(rt, payment.id, timedelta(seconds=120))
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.failure_reason) == ("TIMEOUT", "not approved in time")


def test_the_pending_grace_setting():
    assert load_settings({}).payment_pending_grace_seconds == 600
    assert load_settings({"PAYMENT_PENDING_GRACE_SECONDS": "900"}).payment_pending_grace_seconds == 900
    with pytest.raises(ConfigError):
        load_settings({"PAYMENT_PENDING_GRACE_SECONDS": "0"})


async def test_airtel_in_progress_at_the_window_end_is_asked_again_and_completes(rt, demo, worker):
    wire = (Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
            .on("POST", "/merchant/v1/payments/", 200, load("airtel", "collection_accepted.json"))
            .on("GET", "/standard/v1/payments/*", 200, load("airtel", "status_tip.json")))
    config = ProviderConfig(base_url=AIRTEL_BASE, credentials={
        k: Secret(f"{k}-test") for k in ("client_id", "client_secret", "callback_key")}, options={"country": "RW"})
    rt.providers = {**rt.providers, "airtel": AirtelAdapter(httpx.AsyncClient(
        transport=httpx.MockTransport(wire.handle)), config)}
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key="key-airtel-tip-01",
            channel="api", member_id=demo["members"]["+250733000001"]), actor=ADMIN)
    await worker.run_once()  # the collect job
    assert (await _payment(rt, payment.id)).status == "PROCESSING"
    await _window_over(rt, payment.id)
    await drain(worker)
    await _assert_open_and_polled(rt, payment, at_most=60)  # TIP: transaction in progress
    wire.on("GET", "/standard/v1/payments/*", 200, load("airtel", "status_ts.json"))
    await due_now(rt, "payment.poll")
    await drain(worker)
    done = await _payment(rt, payment.id)
    assert (done.status, done.late, done.provider_transaction_id) == ("COMPLETED", False, "MP210603.1234.A12345")
    assert [r.url.path for r in wire.sent("GET", "/standard/v1/payments/*")] == [
        f"/standard/v1/payments/{payment.provider_reference}"] * 2


async def test_pending_near_the_window_end_is_asked_again_at_the_window_end_not_later(rt, demo, worker):
    """A payment ten minutes old (its polls backed off to two minutes) with 20 s of its window left: the poll after
    MTN's PENDING is due at the window's end, so its outcome (or the grace after it) starts on time, not up to two
    minutes late."""
    _, payment = await _mtn_processing(rt, demo, worker)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            created_at=utcnow() - timedelta(minutes=10), expires_at=utcnow() + timedelta(seconds=20)))
    await due_now(rt, "payment.poll")
    await drain(worker)
    held = await _payment(rt, payment.id)
    [poll] = await _polls(rt)
    assert (held.status, poll.status) == ("PROCESSING", "PENDING")
    assert poll.run_at <= held.expires_at + timedelta(seconds=1)
    assert held.next_poll_at <= held.expires_at + timedelta(seconds=1)
