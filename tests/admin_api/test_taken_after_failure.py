"""Money a provider reports taken after the payment had FAILED: the payment stays FAILED (never reopened), but
the money is held: it can be given back through the API (a refund, or a dispute resolved with one), and the
reconciliation counts it where the provider's statement does. Taken in another currency, a person must look."""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlalchemy import select

from core.audit import Actor
from core.models import AuditEvent, OutboxJob, Payment, Refund
from core.money import Money
from core.payments import apply_collection_outcome
from core.ports import ProviderOutcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import idem, make_payment

PROVIDER = Actor("provider:test", "provider")


async def _failed_then_taken(admin: Any, rt: Any, demo: dict[str, Any], taken: Money | None) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="payer declined")
    async with rt.sessionmaker.begin() as s:
        result = await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]),
                                                ProviderOutcome.SUCCEEDED, actor=PROVIDER, amount=taken,
                                                provider_transaction_id="MTN-LATE-9")
    assert result == "flagged_success_after_failure"
    return payment


async def _settle(rt: Any, refund_id: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, refund_id), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                   provider_transaction_id="RF-1")


async def test_the_money_is_given_back_and_the_payment_stays_failed(admin, rt, demo):
    payment = await _failed_then_taken(admin, rt, demo, Money(50_000, "RWF"))
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["mismatch"]) == ("FAILED", True)
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"idempotencyKey": idem(), "reason": "taken after the failure"})
    assert refund["amount"] == 50000  # everything that was taken
    await _settle(rt, refund["id"])
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment["id"])
        assert (row.status, row.refunded_minor) == ("FAILED", 50000)
        audit = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.refunded_after_failure"))).scalar_one()
        sms = list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "sms.send")
                                    .order_by(OutboxJob.id))).scalars())
    assert audit == {"refundId": refund["id"], "refunded": 50000}
    assert sms == [f"sms:payment_failed:{payment['id']}", f"sms:refund_completed:{refund['id']}"]
    left = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert "nothing left to refund" in left["message"]


async def test_the_cooperatives_system_is_told_the_money_was_taken(admin, rt, demo):
    """It was told the payment failed; a webhook event says the money is held (what was taken, flagged), once."""
    payment = await _failed_then_taken(admin, rt, demo, Money(50_000, "RWF"))
    async with rt.sessionmaker.begin() as s:  # the same money reported again changes nothing
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, amount=Money(50_000, "RWF"),
                                       provider_transaction_id="MTN-LATE-9")
    async with rt.sessionmaker() as s:
        events = list((await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event")
                                       .order_by(OutboxJob.id))).scalars())
    assert [e["event_type"] for e in events] == ["payment.failed", "payment.taken_after_failure"]
    held = events[1]["data"]
    assert (held["id"], held["status"], held["collectedAmount"], held["mismatch"]) == (
        payment["id"], "FAILED", 50000, True)
    assert held["mismatchDetail"] == "provider reported success (50,000 RWF) after the payment had failed"


async def test_the_audit_log_alone_says_what_was_taken_and_when(admin, rt, demo):
    """An auditor rebuilds what a FAILED payment holds, and the period it counts in, from its audit rows: the
    first report's row carries the amount taken and its date; a repeat's row shows them unchanged."""
    payment = await _failed_then_taken(admin, rt, demo, Money(45_000, "RWF"))
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, amount=Money(45_000, "RWF"),
                                       provider_transaction_id="MTN-LATE-9")
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent.before, AuditEvent.after).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.success_after_failure")
            .order_by(AuditEvent.id))).all()
    assert [tuple(r) for r in rows] == [
        ({"status": "FAILED", "mismatch": False, "collected": None, "completedAt": None},
         {"providerTransactionId": "MTN-LATE-9", "mismatch": True, "collected": 45000, "currency": "RWF",
          "completedAt": shown["completedAt"], "first": True}),
        ({"status": "FAILED", "mismatch": True, "collected": 45000, "completedAt": shown["completedAt"]},
         {"providerTransactionId": "MTN-LATE-9", "mismatch": True, "collected": 45000, "currency": "RWF",
          "completedAt": shown["completedAt"], "first": False}),
    ]
    assert shown["completedAt"] is not None and shown["collectedAmount"] == 45000


async def test_a_dispute_resolved_with_a_refund_gives_it_back(admin, rt, demo):
    payment = await _failed_then_taken(admin, rt, demo, None)  # no amount reported: the payment's amount
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    resolved = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                                json={"status": "RESOLVED", "note": "money taken after the failure returned",
                                      "refundAmount": 50000})
    assert resolved["status"] == "RESOLVED" and resolved["refundId"]


async def test_the_reconciliation_counts_it_as_the_statement_does(admin, rt, demo):
    payment = await _failed_then_taken(admin, rt, demo, Money(50_000, "RWF"))
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(x["paymentMethod"], x["collectedCount"], x["collected"], x["refunded"]) for x in report["settled"]] == [
        ("MOBILE_MONEY_MTN", 1, 50000, 0)]
    assert [(t["collectedCount"], t["collected"]) for t in report["totals"]] == [(1, 50000)]
    # The per-method and per-type lines add up to the totals.
    assert [(m["completedCount"], m["completedAmount"]) for m in report["payments"]["byMethod"]] == [(1, 50000)]
    assert [(t["completedCount"], t["completedAmount"]) for t in report["payments"]["byPaymentType"]] == [(1, 50000)]
    assert [f["id"] for f in report["flagged"]] == [payment["id"]]
    resp = await admin.req("GET", "/v1/reports/payments.csv?basis=completed")
    [row] = list(csv.DictReader(io.StringIO(await resp.text())))
    assert (row["id"], row["status"], row["collectedAmount"]) == (payment["id"], "FAILED", "50000")
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"idempotencyKey": idem(), "amount": 50000})
    await _settle(rt, refund["id"])
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    [line] = report["settled"]
    assert (line["collected"], line["refunded"], line["net"]) == (50000, 50000, 0)


async def test_taken_in_another_currency_is_left_to_a_person(admin, rt, demo):
    payment = await _failed_then_taken(admin, rt, demo, Money(40_00, "USD"))
    refused = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                               json={"idempotencyKey": idem()})
    assert "only collected payments can be refunded; this one is FAILED" in refused["message"]
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert report["settled"] == [] and [f["id"] for f in report["flagged"]] == [payment["id"]]
    # Money was taken (not counted here, in another currency): the cooperative's system is told, flagged.
    async with rt.sessionmaker() as s:
        events = list((await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event")
                                       .order_by(OutboxJob.id))).scalars())
    assert [e["event_type"] for e in events] == ["payment.failed", "payment.taken_after_failure"]
    assert (events[1]["data"]["collectedAmount"], events[1]["data"]["mismatch"]) == (0, True)


async def test_a_failed_payment_nothing_was_taken_from_is_not_refundable(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="payer declined")
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()})
