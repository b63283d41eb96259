"""Check-then-write limits under concurrent requests, on PostgreSQL (row locks) and on the embedded SQLite
default (which ignores FOR UPDATE: core.db.serialise_on_sqlite takes its write lock instead)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from core.audit import Actor
from core.disputes import open_dispute
from core.errors import BusinessRuleError, Conflict
from core.models import Dispute, Payment, Refund
from core.money import Money
from core.refunds import request_refund
from tests.security.conftest import pending_payment

ADMIN = Actor("admin:test", "api")


async def test_concurrent_refunds_never_hold_more_than_was_collected(rt: Any, demo: Any) -> None:
    payment = await pending_payment(rt, demo, provider="mtn_momo", method="MOBILE_MONEY_MTN", status="COMPLETED",
                                    amount_minor=50_000, txn="TX-race-1")

    async def refund(i: int) -> str:
        try:
            async with rt.sessionmaker.begin() as s:
                await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                     amount=Money(20_000, "RWF"), reason=None, idempotency_key=f"race-{i:04d}",
                                     actor=ADMIN)
            return "made"
        except BusinessRuleError as exc:
            return exc.message

    outcomes = await asyncio.gather(*(refund(i) for i in range(6)))
    assert outcomes.count("made") == 2, outcomes
    assert all(o == "made" or "exceeds the refundable" in o for o in outcomes), outcomes
    async with rt.sessionmaker() as s:
        held = (await s.execute(select(func.sum(Refund.amount_minor)).where(Refund.payment_id == payment.id))
                ).scalar_one()
    assert held == 40_000


async def test_concurrent_dispute_opens_make_one_dispute(rt: Any, demo: Any) -> None:
    payment = await pending_payment(rt, demo, provider="mtn_momo", method="MOBILE_MONEY_MTN", status="COMPLETED",
                                    amount_minor=50_000, txn="TX-race-2")

    async def dispute() -> str:
        try:
            async with rt.sessionmaker.begin() as s:
                fresh = await s.get(Payment, payment.id)
                await open_dispute(s, payment=fresh, reason="CHARGED_NOT_RECORDED", channel="api", actor=ADMIN,
                                   cipher=rt.cipher, answer_days=rt.settings.sms_payer_answer_days)
            return "opened"
        except Conflict:
            return "conflict"

    outcomes = await asyncio.gather(*(dispute() for _ in range(5)))
    assert sorted(outcomes) == ["conflict"] * 4 + ["opened"], outcomes
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Dispute))).scalar_one() == 1
