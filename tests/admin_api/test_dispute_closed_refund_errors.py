"""A refund asked with a dispute's resolution once the dispute is closed: the officer is told the dispute is closed,
not about the refund it would have made.

Found walking a Kampala (UGX) cooperative's disputes: a dispute another admin had already REJECTED, sent RESOLVED
with a refundAmount larger than what was left, answered "refund of 9,000 UGX exceeds the refundable 5,000 UGX"
(she lowered the amount, only to be told then that the move is not allowed); and a dispute another admin had
already RESOLVED with a refund, resolved again with another amount, answered 409 "Refund with this idempotency key
already exists with a different request" about a key she never sent."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from core.models import OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.conftest import requires_pg


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
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409,
                               json={"status": "RESOLVED", "refundAmount": 9000})
    assert refused["message"].startswith(f"dispute {dispute['reference']} was rejected already by ")
    assert '("charged once"): a closed dispute takes no further move or note' in refused["message"]
    assert await _refunds(rt) == (1, 1)


async def test_a_dispute_resolved_again_with_another_amount_is_told_it_is_closed(admin: Caller, rt: Any,
                                                                                 demo: dict[str, Any]) -> None:
    _, dispute = await _disputed(admin, rt, demo)
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                                json={"status": "RESOLVED", "refundAmount": 5000, "note": "overcharged"})
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    again = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409,
                             json={"status": "RESOLVED", "refundAmount": 3000})
    assert again["message"] == (
        f"dispute {dispute['reference']} was resolved in the payer's favour already by admin@kigali-heights.rw at "
        f"{resolved['resolvedAt']} (\"overcharged\") with refund {refund['reference']} of 5,000 RWF (PENDING): a "
        "closed dispute takes no further move or note; if the payment is contested again, open a new dispute of it "
        "(POST /v1/disputes)")
    assert "idempotency" not in again["message"]
    assert await _refunds(rt) == (1, 1)


@requires_pg
async def test_two_admins_resolving_at_once_the_second_is_told_who_resolved_it(admin: Caller, rt: Any,
                                                                              demo: dict[str, Any]) -> None:
    """Two officers resolve the same dispute at the same moment (each with her refund): one resolves it, and the other,
    waiting on the dispute's lock, was answered 422 "dispute: RESOLVED -> RESOLVED is not allowed", the state
    machine's words. Now a 409 saying it was resolved already, by whom, when and how (the refund it was resolved
    with), and nothing more is refunded."""
    _, dispute = await _disputed(admin, rt, demo)
    url = f"/v1/disputes/{dispute['id']}/transitions"
    answers = await asyncio.gather(*[admin.req("POST", url, json={
        "status": "RESOLVED", "refundAmount": amount, "note": f"overcharged by {amount}"}) for amount in (5000, 3000)])
    assert sorted(a.status for a in answers) == [200, 409], [a.status for a in answers]
    won = await next(a for a in answers if a.status == 200).json()
    lost = await next(a for a in answers if a.status == 409).json()
    refund = await admin.json("GET", f"/v1/refunds/{won['refundId']}", 200)
    assert (lost["code"], lost["field"], lost["message"]) == ("INVALID_STATE", "status", (
        f"dispute {dispute['reference']} was resolved in the payer's favour already by admin@kigali-heights.rw at "
        f"{won['resolvedAt']} (\"{won['resolution']}\") with refund {refund['reference']} of "
        f"{refund['amount']:,} RWF (PENDING): a closed dispute takes no further move or note; if the payment is "
        "contested again, open a new dispute of it (POST /v1/disputes)"))
    assert "->" not in lost["message"]
    assert await _refunds(rt) == (1, 1)
