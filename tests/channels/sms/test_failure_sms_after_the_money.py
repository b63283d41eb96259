"""A "not approved in time" / "failed ... dial to try again" SMS still waiting for its turn (the worker or the
aggregator down) when the provider reports her money taken after all: the payment completed late (or, FAILED, holds
the money), and her late receipt ("received after all: do not pay again") is queued. The failure SMS went out all the
same, after the payment had completed, and could reach her after the receipt (an older job's longer backoff): told to
pay again for a payment made. It is not sent, as a receipt queued before a void is not (its job says why)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, Payment, SmsMessage
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.conftest import drain

PROVIDER = Actor("provider:test", "provider")
JEAN = "+250788000002"  # English
PAID_SINCE = "not sent: payment_paid_since"


async def _outcome(rt: Any, payment_id: str, outcome: ProviderOutcome, **kwargs: Any) -> str:
    async with rt.sessionmaker.begin() as s:
        row = (await s.execute(select(Payment).where(Payment.id == payment_id).with_for_update())).scalar_one()
        return await apply_collection_outcome(s, rt, row, outcome, actor=PROVIDER, reason="payer declined",
                                              **kwargs)


async def _job(rt: Any, template: str, payment_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key == f"sms:{template}:{payment_id}"))).scalar_one()


async def _messages(rt: Any) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).order_by(SmsMessage.created_at))).scalars())


@pytest.mark.parametrize(("first", "told", "then"), [
    (ProviderOutcome.EXPIRED, "payment_timeout", "payment_late_receipt"),
    (ProviderOutcome.CANCELLED, "payment_failed", "payment_late_receipt"),
    (ProviderOutcome.FAILED, "payment_failed", "payment_taken_after_failure"),
])
@pytest.mark.parametrize("member", [True, False], ids=["member", "payer"])
async def test_a_failure_sms_queued_before_the_money_came_is_not_sent(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, first: ProviderOutcome, told: str,
        then: str, member: bool) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="PENDING",
                                 member_id=demo["members"][JEAN] if member else None, created_at=utcnow())
    await _outcome(rt, payment.id, first)
    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, amount=Money(50_000, "RWF"),
                   provider_transaction_id="MTN-LATE-1")

    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    bodies = [m["message"] for m in sim.messages(JEAN)]
    assert len(bodies) == 1 and "Dial" not in bodies[0] and "after all" in bodies[0], bodies
    assert [(m.template, m.status) for m in await _messages(rt)] == [(then, "SENT")]
    job = await _job(rt, told, payment.id)
    assert (job.status, job.last_error) == ("DONE", PAID_SINCE)


@pytest.mark.parametrize("member", [True, False], ids=["member", "payer"])
async def test_a_failure_sms_retried_through_an_outage_is_not_sent_once_the_money_came(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, member: bool) -> None:
    """Its first try stored the message and the aggregator refused it (503); the payment completes late meanwhile.
    At the retry it ends unsent (the stored message FAILED, "not sent"), and the late receipt goes."""
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="PENDING",
                                 member_id=demo["members"][JEAN] if member else None, created_at=utcnow())
    await _outcome(rt, payment.id, ProviderOutcome.EXPIRED)
    _server, sim = await start_simulator(aiohttp_server, rt, global_failure="http503")
    await drain(worker)
    [stored] = await _messages(rt)
    assert (stored.template, stored.status) == ("payment_timeout", "QUEUED")

    await _outcome(rt, payment.id, ProviderOutcome.SUCCEEDED, amount=Money(50_000, "RWF"),
                   provider_transaction_id="MTN-LATE-2")
    sim.set_failure(None)
    async with rt.sessionmaker.begin() as s:  # its backoff is over
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(run_at=utcnow()))
    await drain(worker)
    bodies = [m["message"] for m in sim.messages(JEAN)]
    assert len(bodies) == 1 and "after all" in bodies[0], bodies
    by_template = {m.template: m for m in await _messages(rt)}
    assert (by_template["payment_timeout"].status, by_template["payment_timeout"].failure_reason) == (
        "FAILED", PAID_SINCE)
    assert by_template["payment_late_receipt"].status == "SENT"
    job = await _job(rt, "payment_timeout", payment.id)
    assert (job.status, job.last_error) == ("DONE", PAID_SINCE)


async def test_a_failure_sms_is_sent_when_no_money_came(rt: Any, demo: dict[str, Any], worker: Any,
                                                        aiohttp_server: Any) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="PENDING",
                                 member_id=demo["members"][JEAN], created_at=utcnow())
    await _outcome(rt, payment.id, ProviderOutcome.EXPIRED)
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    [body] = [m["message"] for m in sim.messages(JEAN)]
    assert "was not approved in time" in body and "Dial" in body
