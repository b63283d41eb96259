"""A provider's success for nothing (zero, or a negative amount: a reversal's sign, its bug) after the payment
FAILED: flagged for a person and audited, but the cooperative's system is not told the money is held
(payment.taken_after_failure): nothing was taken, and payment.failed stands."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.models import OutboxJob, Payment
from core.money import Money
from tests.admin_api.conftest import Caller
from tests.admin_api.test_taken_after_failure import _failed_then_taken


@pytest.mark.parametrize("taken", [Money(0, "RWF"), Money(-50_000, "RWF")], ids=["zero", "negative"])
async def test_nothing_taken_is_not_told_as_money_held(admin: Caller, rt: Any, demo: dict[str, Any],
                                                       taken: Money) -> None:
    payment = await _failed_then_taken(admin, rt, demo, taken)
    async with rt.sessionmaker() as s:
        events = [p["event_type"] for p in (await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event").order_by(OutboxJob.id))).scalars()]
        row = await s.get(Payment, payment["id"])
    assert events == ["payment.failed", "payment.flagged"]  # the flag told as such, not as money held
    assert (row.status, row.collected_minor, row.mismatch) == ("FAILED", 0, True)
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert shown["status"] == "FAILED"
