"""A chargeback (which now locks every dispute of the payment, closed ones too) against the failure of a
refund a closed dispute was resolved with (its note locks that dispute), in both orders: neither deadlocks."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from core.disputes import move_dispute
from core.models import Dispute, OutboxJob, Payment, Refund
from core.money import Money
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome, lock_for_outcome
from tests.conftest import requires_pg
from tests.core.test_late_success_dispute_races import _chargeback, _first_held, _opened, _paid
from tests.providers.wires import ADMIN

pytestmark = requires_pg


def _fails(rt: Any, refund: Refund) -> Any:
    async def step(s: Any) -> Any:
        fresh = await lock_for_outcome(s, refund.id, ProviderOutcome.FAILED)
        return await apply_refund_outcome(s, rt, fresh, ProviderOutcome.FAILED, actor=ADMIN, reason="refused")
    return step


@pytest.mark.parametrize("first", ["chargeback", "failure"])
async def test_a_chargeback_and_the_failure_of_a_closed_disputes_refund(rt: Any, demo: dict[str, Any],
                                                                        first: str) -> None:
    payment = await _paid(rt, demo)
    dispute = await _opened(rt, payment)
    async with rt.sessionmaker.begin() as s:
        moved = await move_dispute(s, rt, dispute_id=dispute.id, cooperative_id=dispute.cooperative_id,
                                   target="RESOLVED", actor=ADMIN, note="refund it", refund_amount=Money(50_000, "RWF"))
        refund_id = moved.refund_id
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}").values(status="DONE"))
        await s.execute(update(Refund).where(Refund.id == refund_id).values(status="PROCESSING"))
        refund = await s.get(Refund, refund_id)
    charge, fail = _chargeback(rt, payment), _fails(rt, refund)
    results = await _first_held(rt, *((charge, fail) if first == "chargeback" else (fail, charge)))
    assert not [r for r in results if isinstance(r, BaseException)], results
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund_id)).status == "FAILED"
        row = await s.get(Dispute, dispute.id)
        paid = await s.get(Payment, payment.id)
    assert any("failed" in (n["text"] or "") for n in row.notes), row.notes
    assert paid.refunded_minor == 50_000
