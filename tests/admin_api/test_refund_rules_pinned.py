"""Refund rules a treasurer relies on that no other test held: what the audit log says a refund was asked for,
and what a refusal says is left to refund once the member has been paid back more than was collected."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from core.db import iso_z, utcnow
from core.models import OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment


async def _paid(admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    return payment


async def test_the_audit_log_says_how_much_a_refund_was_asked_for(admin: Caller, rt: Any,
                                                                  demo: dict[str, Any]) -> None:
    """An auditor rebuilds who asked for which refund from the log alone: its payment, amount (minor units),
    currency and reason, on the refund.requested row."""
    payment = await _paid(admin, rt, demo)
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 12500, "reason": "charged twice", "idempotencyKey": idem()})
    events = await admin.json("GET", f"/v1/audit-events?entityType=refund&entityId={refund['id']}", 200)
    [requested] = [e for e in events["data"] if e["action"] == "refund.requested"]
    assert requested["after"] == {"paymentId": payment["id"], "amount": 12500, "currency": "RWF",
                                  "reason": "charged twice"}
    # Everything left (no amount given): the amount it came to is what the log says.
    rest = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()})
    events = await admin.json("GET", f"/v1/audit-events?entityType=refund&entityId={rest['id']}", 200)
    [requested] = [e for e in events["data"] if e["action"] == "refund.requested"]
    assert (requested["after"]["amount"], rest["amount"]) == (37500, 37500)


async def test_paid_back_more_than_collected_leaves_nothing_not_less_than_nothing(admin: Caller, rt: Any,
                                                                                  demo: dict[str, Any]) -> None:
    """A refund that FAILED went through after all while a second one had been made: the member has 100,000 RWF
    back of 50,000. Another refund is refused with what is left: 0 RWF, never a negative amount."""
    payment = await _paid(admin, rt, demo)
    first = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == first["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200, json={"status": "FAILED", "note": "failed"})
    second = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == second["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    await admin.json("POST", f"/v1/refunds/{second['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "sent", "providerTransactionId": "MTN-RF-2"})
    await admin.json("POST", f"/v1/refunds/{first['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "on the statement after all",
                           "providerTransactionId": "MTN-RF-1"})
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 100000)

    refused = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                               json={"amount": 1000, "idempotencyKey": idem()})
    # What went back, in the order it did: the second refund, then the first one the statement showed after all.
    assert refused["message"] == (
        "the payment has been refunded in full: nothing is left to refund (100,000 RWF back of 50,000 RWF "
        f"collected: refund {second['reference']}, refund {first['reference']})")
    nothing = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert nothing["message"] == refused["message"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 2


async def test_a_refund_recorded_from_a_statement_is_never_dated_before_it_was_asked_for_nor_ahead(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """The statement time an admin gives dates the refund into a reconciliation period: one before the refund was
    asked for (the wrong line, the wrong year) or in the future is refused, naming what is wrong, and nothing is
    recorded."""
    payment = await _paid(admin, rt, demo)
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 5000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
        asked = (await s.get(Refund, refund["id"])).created_at
    body = {"status": "COMPLETED", "note": "on the statement", "providerTransactionId": "MTN-RF-9"}
    before = iso_z(asked - timedelta(minutes=1))
    ahead = iso_z(utcnow() + timedelta(hours=1))
    for when, says in ((before, f"completedAt is before the refund was asked for ({iso_z(asked)})"),
                       (ahead, "completedAt is in the future")):
        refused = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 400,
                                   json={**body, "completedAt": when})
        assert says in str(refused["message"]), refused
    shown = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
    assert (shown["status"], shown["completedAt"]) == ("PROCESSING", None)
