"""A chargeback: the provider already sent the member's money back on its own (a disputed payment it reversed).
The cooperative records it, as a dispute's resolution or a refund, with `returnedByProvider`: a COMPLETED refund
that is never sent (sending it would pay the member twice), dated when the provider's statement says."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalars())


async def _completed(admin: Any, rt: Any, demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A payment collected an hour ago."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], **over)
    await complete_payment(rt, paid["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(
            created_at=utcnow() - timedelta(hours=1, minutes=1), completed_at=utcnow() - timedelta(hours=1)))
    return paid


async def test_a_dispute_resolved_by_the_providers_chargeback_records_it_and_sends_nothing(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _completed(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "NOT_AUTHORISED"})
    when = (utcnow() - timedelta(minutes=5)).replace(microsecond=0)
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
        "status": "RESOLVED", "note": "MTN reversed it (chargeback MTN-REV-77)", "refundAmount": 50000,
        "returnedByProvider": {"providerTransactionId": "MTN-REV-77", "completedAt": when.isoformat()}})
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert (refund["status"], refund["amount"]) == ("COMPLETED", 50000)
    assert refund["completedAt"] == when.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert await _jobs(rt, "refund.submit") == []  # nothing goes to MTN
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
        stored = await s.get(Refund, resolved["refundId"])
        audit = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "refund.returned_by_provider"))).scalar_one()
    assert (payment.status, payment.refunded_minor) == ("REFUNDED", 50_000)
    assert stored.provider_transaction_id == "MTN-REV-77"
    assert audit.after == {"providerTransactionId": "MTN-REV-77", "completedAt": refund["completedAt"]}
    # The member and the cooperative's system are told as for any refund that went through.
    templates = [j.payload.get("template") for j in await _jobs(rt, "sms.send")]
    assert "refund_completed" in templates
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(line["paymentMethod"], line["refunded"]) for line in report["settled"]] == [("MOBILE_MONEY_MTN", 50000)]


async def test_a_partial_reversal_an_airtel_refund_could_not_make_is_recorded(admin: Any, rt: Any,
                                                                              demo: dict[str, Any]) -> None:
    """Airtel refunds whole transactions only, so a refund to send must be the whole amount; a reversal Airtel
    made itself is whatever it made."""
    paid = await _completed(admin, rt, demo, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001")
    body = {"amount": 20000, "idempotencyKey": idem()}
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json=body)
    body["returnedByProvider"] = {"providerTransactionId": "AIR-REV-1"}
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    assert (refund["status"], refund["amount"]) == ("COMPLETED", 20000)
    again = await admin.req("POST", f"/v1/payments/{paid['id']}/refunds", json=body)
    assert (again.status, (await again.json())["id"]) == (201, refund["id"])  # a replay answers as the first
    other = {**body, "returnedByProvider": {"providerTransactionId": "AIR-REV-2"}}
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 409, json=other)
    assert (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["status"] == "PARTIALLY_REFUNDED"
    assert await _jobs(rt, "refund.submit") == []


async def test_a_chargeback_is_refused_with_a_clear_error_and_records_nothing(admin: Any, rt: Any,
                                                                             demo: dict[str, Any]) -> None:
    paid = await _completed(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    url = f"/v1/disputes/{dispute['id']}/transitions"
    no_amount = await admin.json("POST", url, 400, json={
        "status": "RESOLVED", "returnedByProvider": {"providerTransactionId": "MTN-REV-1"}})
    assert no_amount["message"] == ["returnedByProvider needs refundAmount: how much the provider sent back"]
    refunds = f"/v1/payments/{paid['id']}/refunds"
    future = (utcnow() + timedelta(hours=2)).isoformat()
    for given, says in (({"providerTransactionId": "MTN-REV-1", "completedAt": future},
                         "returnedByProvider.completedAt is in the future"),
                        ({"providerTransactionId": "MTN-REV-1", "completedAt": "2020-01-01T00:00:00Z"},
                         "returnedByProvider.completedAt is before the payment's money was taken"),
                        ({"providerTransactionId": "  "}, "returnedByProvider.providerTransactionId must be 1 to 128"),
                        ({"completedAt": "2026-11-01T00:00:00Z"}, "providerTransactionId")):
        refused = await admin.json("POST", refunds, 400, json={"idempotencyKey": idem(), "returnedByProvider": given})
        assert any(says in m for m in refused["message"]), refused
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Refund))).scalars().all() == []
        assert (await s.get(Payment, paid["id"])).status == "COMPLETED"


async def test_one_reversal_of_the_providers_is_recorded_once(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Two admins recording one chargeback (or a retry with a fresh idempotency key), or its statement id used for
    a second payment of the same provider: the second is a 409 naming the refund that has it, nothing recorded."""
    import asyncio

    first = await _completed(admin, rt, demo)
    body = {"amount": 20000, "returnedByProvider": {"providerTransactionId": "MTN-REV-9"}}
    recorded = await admin.json("POST", f"/v1/payments/{first['id']}/refunds", 201,
                                json={**body, "idempotencyKey": idem()})
    again = await admin.json("POST", f"/v1/payments/{first['id']}/refunds", 409,
                             json={**body, "idempotencyKey": idem()})
    assert again["message"] == (f"the provider's reversal MTN-REV-9 is already recorded, by refund "
                                f"{recorded['reference']}")
    second = await _completed(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{second['id']}/refunds", 409, json={**body, "idempotencyKey": idem()})
    # Two at once, on two payments: one is recorded.
    third = await _completed(admin, rt, demo)
    twice = {"amount": 10000, "returnedByProvider": {"providerTransactionId": "MTN-REV-10"}}
    answers = await asyncio.gather(*(admin.req("POST", f"/v1/payments/{p['id']}/refunds",
                                               json={**twice, "idempotencyKey": idem()}) for p in (second, third)))
    assert sorted(a.status for a in answers) == [201, 409]
    async with rt.sessionmaker() as s:
        refunds = (await s.execute(select(Refund))).scalars()
        stored = sorted((r.provider_transaction_id, r.amount_minor) for r in refunds)
    assert stored == [("MTN-REV-10", 10_000), ("MTN-REV-9", 20_000)]


async def test_another_cooperatives_reversal_is_refused_without_naming_its_refund(admin: Any, rt: Any,
                                                                                  demo: dict[str, Any],
                                                                                  coop_b: dict[str, Any]) -> None:
    ours = await _completed(admin, rt, demo)
    recorded = await admin.json("POST", f"/v1/payments/{ours['id']}/refunds", 201, json={
        "amount": 10000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-A1"}})
    other = coop_b["admin"]
    theirs = await make_payment(other, coop_b["payment_type_id"], amount=1000)
    await complete_payment(rt, theirs["id"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == theirs["id"]).values(
            created_at=utcnow() - timedelta(hours=1, minutes=1), completed_at=utcnow() - timedelta(hours=1)))
    refused = await other.json("POST", f"/v1/payments/{theirs['id']}/refunds", 409, json={
        "amount": 1000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-A1"}})
    assert refused["message"] == ("the provider's reversal MTN-REV-A1 is already recorded, on another payment of "
                                  "this provider: check the id on the statement")
    assert recorded["reference"] not in str(refused)
