"""A refund of a payment nothing is left of says why: refunded in full (what went back, by which refunds and
chargebacks), held by refunds not settled yet (which), or never collected.

Found walking the refunds: a second refund of a payment refunded in full answered "refund of 50,000 RWF exceeds the
refundable 0 RWF", as if the admin had asked for too much; one of a payment whose money was on its way back (a refund
queued) or sent back by the provider itself (a chargeback) said the same. The code stays REFUND_EXCEEDS_REFUNDABLE
(what clients branch on for "more than is left"); the message tells what is true."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from core.models import OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment


async def _paid(admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])  # 50,000 RWF
    await complete_payment(rt, payment["id"])
    return payment


async def _sent(admin: Caller, rt: Any, payment: dict[str, Any], amount: int, txn: str) -> dict[str, Any]:
    """A refund of `amount`, sent and completed at the provider."""
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": amount, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200,
                     json={"status": "COMPLETED", "note": "on the statement", "providerTransactionId": txn})
    return refund


async def _refused(admin: Caller, rt: Any, payment: dict[str, Any]) -> str:
    """Both refusals, of an amount and of everything left: the same answer; no refund written. Its message."""
    async with rt.sessionmaker() as s:
        before = (await s.execute(select(func.count()).select_from(Refund))).scalar_one()
    some = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                            json={"amount": 1000, "idempotencyKey": idem()})
    everything = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                                  json={"idempotencyKey": idem()})
    assert (some["code"], some["field"], some["statusCode"]) == ("REFUND_EXCEEDS_REFUNDABLE", "amount", 422)
    assert {k: v for k, v in some.items() if k != "timestamp"} == {
        k: v for k, v in everything.items() if k != "timestamp"}
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == before
    return str(some["message"])


async def test_a_payment_refunded_in_full_says_so_with_the_refunds_total(admin: Caller, rt: Any,
                                                                        demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo)
    first = await _sent(admin, rt, payment, 30000, "MTN-RF-1")
    second = await _sent(admin, rt, payment, 20000, "MTN-RF-2")
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 50000)

    assert await _refused(admin, rt, payment) == (
        "the payment has been refunded in full: nothing is left to refund (50,000 RWF back of 50,000 RWF "
        f"collected: refund {first['reference']}, refund {second['reference']})")


async def test_a_payment_sent_back_by_its_provider_names_the_chargeback(admin: Caller, rt: Any,
                                                                       demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo)
    sent = await _sent(admin, rt, payment, 10000, "MTN-RF-3")
    chargeback = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={
        "amount": 40000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-3"}})
    assert chargeback["status"] == "COMPLETED"

    assert await _refused(admin, rt, payment) == (
        "the payment has been refunded in full: nothing is left to refund (50,000 RWF back of 50,000 RWF "
        f"collected: refund {sent['reference']}, chargeback {chargeback['reference']})")


async def test_a_payment_whose_money_is_on_its_way_back_names_the_refunds_holding_it(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo)
    sent = await _sent(admin, rt, payment, 20000, "MTN-RF-4")
    queued = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 30000, "idempotencyKey": idem()})  # not sent yet: PENDING
    assert queued["status"] == "PENDING"

    assert await _refused(admin, rt, payment) == (
        f"nothing is left to refund (20,000 RWF back of 50,000 RWF collected: refund {sent['reference']}); refunds "
        f"not settled yet hold 30,000 RWF ({queued['reference']}): withdraw one not yet sent with "
        "POST /v1/refunds/{id}/cancel")
    # Withdrawn, its amount is refundable again.
    await admin.json("POST", f"/v1/refunds/{queued['id']}/cancel", 200, json={"note": "asked for by mistake"})
    again = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert again["amount"] == 30000
