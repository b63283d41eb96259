"""A refund asked with a dispute's resolution once the dispute is closed: the officer is told the dispute is closed,
not about the refund it would have made.

Found walking a Kampala (UGX) cooperative's disputes: a dispute another admin had already REJECTED, sent RESOLVED
with a refundAmount larger than what was left, answered "refund of 9,000 UGX exceeds the refundable 5,000 UGX"
(she lowered the amount, only to be told then that the move is not allowed); and a dispute another admin had
already RESOLVED with a refund, resolved again with another amount, answered 409 "Refund with this idempotency key
already exists with a different request" about a key she never sent."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.models import OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment


async def _disputed(admin: Caller, rt: Any, demo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT"})
    return payment, dispute


async def _refunds(rt: Any) -> tuple[int, int]:
    async with rt.sessionmaker() as s:
        refunds = (await s.execute(select(func.count()).select_from(Refund))).scalar_one()
        submits = (await s.execute(select(func.count()).select_from(OutboxJob)
                                   .where(OutboxJob.kind == "refund.submit"))).scalar_one()
    return refunds, submits


async def test_a_rejected_dispute_resolved_with_too_much_is_told_it_is_closed(admin: Caller, rt: Any,
                                                                              demo: dict[str, Any]) -> None:
    payment, dispute = await _disputed(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"amount": 45000, "idempotencyKey": idem()})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "charged once"})
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 422,
                               json={"status": "RESOLVED", "refundAmount": 9000})
    assert refused["message"] == "dispute: REJECTED -> RESOLVED is not allowed"
    assert await _refunds(rt) == (1, 1)


async def test_a_dispute_resolved_again_with_another_amount_is_told_it_is_closed(admin: Caller, rt: Any,
                                                                                 demo: dict[str, Any]) -> None:
    _, dispute = await _disputed(admin, rt, demo)
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                     json={"status": "RESOLVED", "refundAmount": 5000, "note": "overcharged"})
    again = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 422,
                             json={"status": "RESOLVED", "refundAmount": 3000})
    assert again["message"] == "dispute: RESOLVED -> RESOLVED is not allowed"
    assert "idempotency" not in again["message"]
    assert await _refunds(rt) == (1, 1)
