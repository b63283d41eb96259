"""A refund reported failed, then sent back after all (the provider's late word, or a person correcting a FAILED
recorded too soon): the member's "refund failed ... your cooperative will contact you" SMS still waiting for its turn
(the worker or the aggregator down) went out all the same, after the refund had completed, and could reach her after
"refund completed". It is not sent once the refund has completed (its job says why); "completed" goes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from core.audit import Actor
from core.db import utcnow
from core.models import OutboxJob, Refund, SmsMessage
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome, request_refund
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.conftest import drain

ADMIN = Actor("admin:test", "api")
PROVIDER = Actor("provider:mtn_momo", "provider")
JEAN = "+250788000002"  # English
SENT_SINCE = "not sent: refund_sent_since"


async def _refund(rt: Any, demo: dict[str, Any], member: bool) -> Refund:
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, created_at=utcnow(),
                                 member_id=demo["members"][JEAN] if member else None)
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                         amount=None, reason="paid twice", idempotency_key=f"refund-{payment.id}",
                                         actor=ADMIN)
        # Sent, its answer not come yet.
        await s.execute(update(Refund).where(Refund.id == refund.id).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund.id}").values(status="DONE"))
    return refund


async def _outcome(rt: Any, refund_id: str, outcome: ProviderOutcome) -> None:
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, refund_id), outcome, actor=PROVIDER,
                                   reason="INTERNAL_PROCESSING_ERROR", provider_transaction_id="RF-LATE-1")


async def _failed_job(rt: Any, refund_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key == f"sms:refund_failed:{refund_id}"))).scalar_one()


async def _messages(rt: Any) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).order_by(SmsMessage.created_at))).scalars())


@pytest.mark.parametrize("member", [True, False], ids=["member", "payer"])
async def test_a_refund_failed_sms_queued_before_it_went_through_is_not_sent(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, member: bool) -> None:
    refund = await _refund(rt, demo, member)
    await _outcome(rt, refund.id, ProviderOutcome.FAILED)
    await _outcome(rt, refund.id, ProviderOutcome.SUCCEEDED)

    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    bodies = [m["message"] for m in sim.messages(JEAN)]
    assert len(bodies) == 1 and "completed" in bodies[0] and "failed" not in bodies[0], bodies
    assert [(m.template, m.status) for m in await _messages(rt)] == [("refund_completed", "SENT")]
    job = await _failed_job(rt, refund.id)
    assert (job.status, job.last_error) == ("DONE", SENT_SINCE)


@pytest.mark.parametrize("member", [True, False], ids=["member", "payer"])
async def test_a_refund_failed_sms_retried_through_an_outage_is_not_sent_once_it_went_through(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, member: bool) -> None:
    refund = await _refund(rt, demo, member)
    await _outcome(rt, refund.id, ProviderOutcome.FAILED)
    _server, sim = await start_simulator(aiohttp_server, rt, global_failure="http503")
    await drain(worker)
    [stored] = await _messages(rt)
    assert (stored.template, stored.status) == ("refund_failed", "QUEUED")

    await _outcome(rt, refund.id, ProviderOutcome.SUCCEEDED)
    sim.set_failure(None)
    async with rt.sessionmaker.begin() as s:  # its backoff is over
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(run_at=utcnow()))
    await drain(worker)
    bodies = [m["message"] for m in sim.messages(JEAN)]
    assert len(bodies) == 1 and "completed" in bodies[0], bodies
    by_template = {m.template: m for m in await _messages(rt)}
    assert (by_template["refund_failed"].status, by_template["refund_failed"].failure_reason) == ("FAILED", SENT_SINCE)
    assert by_template["refund_completed"].status == "SENT"
    assert (await _failed_job(rt, refund.id)).last_error == SENT_SINCE


async def test_a_refund_that_failed_is_told(rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    refund = await _refund(rt, demo, True)
    await _outcome(rt, refund.id, ProviderOutcome.FAILED)
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    [body] = [m["message"] for m in sim.messages(JEAN)]
    assert "failed" in body and "Your cooperative will contact you" in body
