"""An admin recording a FAILED refund COMPLETED from the statement (with its providerTransactionId) locks the
disputes its late success notes before the payment, as every other path does (a refund made during an open dispute,
a resolution: the dispute, then the payment). It locked the payment first (to check the statement line's id), then
the dispute of a refund still waiting to be sent: a refund asked for on that disputed payment at the same moment
held the dispute and waited for the payment, and PostgreSQL ended the deadlock by rolling one of them back (503)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import select, text, update

from core.disputes import open_dispute
from core.models import Dispute, OutboxJob, Payment, Refund
from core.money import Money
from core.payments import create_payment
from core.refunds import record_refund_outcome, request_refund
from tests.conftest import requires_pg, waiting_for_locks
from tests.providers.wires import ADMIN, completed, mtn_payment


async def _refund(rt: Any, payment: Payment, amount: int) -> Refund:
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(
            s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id, amount=Money(amount, "RWF"),
            reason="paid twice", idempotency_key=f"refund-{uuid.uuid4().hex}", actor=ADMIN)
    return refund


@requires_pg
async def test_a_failed_refund_recorded_completed_waits_for_the_dispute_before_holding_the_payment(
        rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    failed = await _refund(rt, payment, 20_000)
    async with rt.sessionmaker.begin() as s:  # sent, no live poll: a person records what the provider did
        await s.execute(update(Refund).where(Refund.id == failed.id).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{failed.id}").values(status="DONE"))
    async with rt.sessionmaker.begin() as s:
        await record_refund_outcome(s, rt, refund_id=failed.id, cooperative_id=payment.cooperative_id,
                                    succeeded=False, note="the provider says it failed", actor=ADMIN)
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment.id)
        dispute = await open_dispute(s, payment=row, reason="OTHER", channel="api", actor=ADMIN, cipher=rt.cipher,
                                     answer_days=90)
    waiting = await _refund(rt, payment, 10_000)  # made during the dispute: linked to it, not yet sent
    assert waiting.dispute_id == dispute.id

    async def recorded() -> Refund:
        async with rt.sessionmaker.begin() as s:
            return await record_refund_outcome(
                s, rt, refund_id=failed.id, cooperative_id=payment.cooperative_id, succeeded=True,
                note="the statement shows it sent back", actor=ADMIN, provider_transaction_id="ST-LATE-1")

    # Another refund of the disputed payment, asked for now: it holds the dispute, then takes the payment.
    async with rt.engine.connect() as other:
        await other.begin()
        await other.execute(text("SET LOCAL lock_timeout = '5s'"))
        await other.execute(select(Dispute.id).where(Dispute.id == dispute.id).with_for_update())
        task = asyncio.create_task(recorded())
        await waiting_for_locks(rt, 1)
        await other.execute(select(Payment.id).where(Payment.id == payment.id).with_for_update())
        await other.rollback()
    result = await task
    assert result.status == "COMPLETED"
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        assert (paid.status, paid.refunded_minor) == ("PARTIALLY_REFUNDED", 20_000)
        assert (await s.get(Refund, waiting.id)).status == "PENDING"  # 30,000 still fits: left to go
