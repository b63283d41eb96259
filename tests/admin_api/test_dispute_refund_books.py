"""Disputes with refunds and chargebacks, as a cooperative's books see them: what can go back (never more than was
collected but by a provider's own chargeback, flagged), the answers to bad input, and the reconciliation's figures
against a hand count across two months."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update

from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from tests.admin_api.conftest import complete_payment, idem, kenyan_mpesa_payment, make_payment
from tests.conftest import is_postgres, requires_pg, waiting_for_locks


async def _paid(admin: Any, rt: Any, demo: dict[str, Any], kind: str = "Monthly Rent") -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"][kind], amount=5000 if kind == "Water" else 50000)
    await complete_payment(rt, payment["id"])
    return payment


async def _refunds(rt: Any, payment_id: str) -> list[tuple[int, str, bool]]:
    async with rt.sessionmaker() as s:
        return [tuple(r) for r in (await s.execute(
            select(Refund.amount_minor, Refund.status, Refund.returned_by_provider)
            .where(Refund.payment_id == payment_id).order_by(Refund.created_at))).all()]


async def _sent(rt: Any, refund_id: str) -> None:
    """MTN says the refund went back."""
    async with rt.sessionmaker() as s:
        ours = (await s.get(Refund, refund_id)).provider_reference
    await handle_provider_event(rt, Event(
        provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex, reference=ours,
        outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id=f"MTN-RF-{refund_id[:8]}"))


async def _move(admin: Any, dispute: dict[str, Any], answer: int, **body: Any) -> dict[str, Any]:
    return await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", answer, json=body)


async def test_a_partial_refund_then_a_resolution_for_the_whole_amount_is_refused(admin, rt, demo):
    payment = await _paid(admin, rt, demo)
    part = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                            json={"amount": 20000, "idempotencyKey": idem()})
    await _sent(rt, part["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    whole = await _move(admin, dispute, 422, status="RESOLVED", refundAmount=50000)
    assert whole["field"] == "refundAmount" and "exceeds the refundable 30,000 RWF" in whole["message"]
    assert (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["status"] == "OPEN"  # nothing changed
    resolved = await _move(admin, dispute, 200, status="RESOLVED", refundAmount=30000)
    assert resolved["status"] == "RESOLVED" and resolved["refundId"]
    assert sorted(await _refunds(rt, payment["id"])) == [(20000, "COMPLETED", False), (30000, "PENDING", False)]
    async with rt.sessionmaker() as s:
        audited = (await s.execute(select(AuditEvent.entity_id, AuditEvent.action).where(
            AuditEvent.entity_id.in_([dispute["id"], resolved["refundId"]])).order_by(AuditEvent.at))).all()
        events = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "webhook.event"))).scalars().all()
    assert [tuple(a) for a in audited] == [(dispute["id"], "dispute.opened"),
                                           (resolved["refundId"], "refund.requested"),
                                           (dispute["id"], "dispute.resolved")]
    told = sorted(e["event_type"] for e in events if dispute["id"] in (e["data"]["id"], e["data"].get("disputeId")))
    assert told == ["dispute.opened", "dispute.updated"]  # (the resolution's refund is told when it settles)
    # Resolving again, the same request retried or with another amount: closed already, nothing more refunded.
    for again in ({"status": "RESOLVED", "refundAmount": 30000}, {"status": "RESOLVED"},
                  {"status": "REJECTED", "note": "changed my mind"}):
        closed = await _move(admin, dispute, 409, **again)
        assert closed["code"] == "INVALID_STATE" and "resolved in the payer's favour already" in closed["message"]
    assert len(await _refunds(rt, payment["id"])) == 2
    # A new dispute of the payment: nothing is left to refund by the gateway.
    second = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    nothing = await _move(admin, second, 422, status="RESOLVED", refundAmount=1)
    assert nothing["field"] == "refundAmount"


async def test_a_dispute_of_a_failed_payment_takes_no_refund_and_is_left_as_it_was(admin, rt, demo):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(status="FAILED"))
    # (A member charged for a payment recorded FAILED is what CHARGED_NOT_RECORDED is for: it may be opened.)
    dispute = await admin.json("POST", "/v1/disputes", 201,
                               json={"paymentId": payment["id"], "reason": "CHARGED_NOT_RECORDED"})
    refused = await _move(admin, dispute, 422, status="RESOLVED", refundAmount=50000)
    assert "only collected payments can be refunded; this one is FAILED" in refused["message"]
    charged_back = await _move(admin, dispute, 422, status="RESOLVED", refundAmount=50000,
                               returnedByProvider={"providerTransactionId": "MTN-REV-1"})
    assert "only collected payments can be refunded" in charged_back["message"]
    async with rt.sessionmaker() as s:
        row = await s.get(Dispute, dispute["id"])
        assert row.status == "OPEN" and row.refund_id is None and row.resolved_at is None
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 0
        assert (await s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.entity_id == dispute["id"]))).scalar_one() == 1  # its opening only


async def test_bad_amounts_of_a_resolution_are_refused_before_anything_changes(admin, rt, demo):
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    for amount in (0, -5, "0", "-1", "1.5", "abc", 10**15):
        await _move(admin, dispute, 400, status="RESOLVED", refundAmount=amount)
    await _move(admin, dispute, 400, status="RESOLVED", refundAmount=100, currency="KES")  # no such field
    over = await _move(admin, dispute, 422, status="RESOLVED", refundAmount=50001)
    assert over["code"] == "REFUND_EXCEEDS_REFUNDABLE" and over["field"] == "refundAmount"
    beyond = await _move(admin, dispute, 422, status="RESOLVED", refundAmount=50001,
                         returnedByProvider={"providerTransactionId": "MTN-REV-2"})
    assert beyond["code"] == "REFUND_EXCEEDS_REFUNDABLE"
    assert await _refunds(rt, payment["id"]) == []
    async with rt.sessionmaker() as s:
        assert (await s.get(Dispute, dispute["id"])).status == "OPEN"


async def test_a_refund_pending_when_the_dispute_opens_and_its_chargeback_never_exceed_what_was_collected(
        admin, rt, demo):
    """A refund queued (PENDING), then the dispute, then MTN's own reversal of the whole payment recorded with
    the resolution: the queued refund is withdrawn, not sent; the member gets the money back once."""
    payment = await _paid(admin, rt, demo)
    queued = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 20000, "idempotencyKey": idem()})
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    await _move(admin, dispute, 422, status="RESOLVED", refundAmount=30001)
    resolved = await _move(admin, dispute, 200, status="RESOLVED", refundAmount=50000,
                           returnedByProvider={"providerTransactionId": "MTN-REV-3"})
    assert resolved["status"] == "RESOLVED"
    assert sorted(await _refunds(rt, payment["id"])) == [(20000, "FAILED", False), (50000, "COMPLETED", True)]
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment["id"])
        assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50000)
    got = await admin.json("GET", f"/v1/refunds/{queued['id']}", 200)
    assert got["status"] == "FAILED" and got["failureReason"].startswith("not sent")


def _at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


async def test_the_reconciliation_counts_each_franc_once_across_months(admin, rt, demo):
    """October: A (rent, 50,000) and B (water, 5,000) collected, C (water, 5,000) failed. November: 20,000 of A
    refunded, B charged back whole by MTN after its dispute; A's dispute resolved with the rest (30,000), still at
    the provider."""
    a, b = await _paid(admin, rt, demo), await _paid(admin, rt, demo, "Water")
    c = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    async with rt.sessionmaker.begin() as s:
        for p, created in ((a, "2026-10-05T08:00:00"), (b, "2026-10-20T08:00:00"), (c, "2026-10-21T08:00:00")):
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(
                created_at=_at(created), completed_at=_at(created) + timedelta(minutes=1)))
        await s.execute(update(Payment).where(Payment.id == c["id"]).values(status="FAILED", completed_at=None))
    part = await admin.json("POST", f"/v1/payments/{a['id']}/refunds", 201,
                            json={"amount": 20000, "idempotencyKey": idem()})
    await _sent(rt, part["id"])
    dispute_b = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": b["id"], "reason": "OTHER"})
    await _move(admin, dispute_b, 200, status="RESOLVED", refundAmount=5000,
                returnedByProvider={"providerTransactionId": "MTN-REV-B", "completedAt": "2026-11-10T09:00:00Z"})
    dispute_a = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": a["id"], "reason": "OTHER"})
    await _move(admin, dispute_a, 200, status="RESOLVED", refundAmount=30000)
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": c["id"], "reason": "CHARGED_NOT_RECORDED"})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == part["id"]).values(
            created_at=_at("2026-11-02T08:00:00"), completed_at=_at("2026-11-02T08:05:00")))
        await s.execute(update(Refund).where(Refund.payment_id == b["id"]).values(
            created_at=_at("2026-11-10T10:00:00")))
        await s.execute(update(Refund).where(Refund.payment_id == a["id"], Refund.status == "PENDING").values(
            created_at=_at("2026-11-12T10:00:00")))
        await s.execute(update(Dispute).values(created_at=_at("2026-11-09T08:00:00")))
        await s.execute(update(Dispute).where(Dispute.status == "RESOLVED").values(
            resolved_at=_at("2026-11-12T10:00:00")))

    def report(start: str, end: str) -> Any:
        return admin.json("GET", f"/v1/reports/reconciliation?from={start}T00:00:00Z&to={end}T00:00:00Z", 200)

    october, november = await report("2026-10-01", "2026-11-01"), await report("2026-11-01", "2026-12-01")
    both = await report("2026-10-01", "2026-12-01")
    # October asked for 60,000, collected 55,000; 25,000 of it refunded so far (A's 20,000, B's 5,000 chargeback).
    assert october["totals"] == [{"currency": "RWF", "collectedCount": 2, "collected": 55000, "fees": 0,
                                  "refunded": 25000, "net": 30000}]
    assert sorted((line["status"], line["count"], line["amount"]) for line in october["payments"]["byStatus"]) == [
        ("FAILED", 1, 5000), ("PARTIALLY_REFUNDED", 1, 50000), ("REFUNDED", 1, 5000)]
    for lines in (october["payments"]["byMethod"], october["payments"]["byPaymentType"]):
        assert sum(line["completedAmount"] for line in lines) == 55000
        assert sum(line["refundedAmount"] for line in lines) == 25000
        assert sum(line["amount"] for line in lines) == 60000
    assert october["settled"] == [{"provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF",
                                   "collectedCount": 2, "collected": 55000, "fees": 0, "refundedCount": 0,
                                   "refunded": 0, "net": 55000}]
    assert october["refunds"] == [] and november["totals"] == [] and november["payments"]["byStatus"] == []
    # November: 25,000 went back (A's 20,000 and B's chargeback); A's 30,000 is still at the provider.
    assert november["settled"] == [{"provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF",
                                    "collectedCount": 0, "collected": 0, "fees": 0, "refundedCount": 2,
                                    "refunded": 25000, "net": -25000}]
    assert sorted((r["status"], r["count"], r["amount"]) for r in november["refunds"]) == [
        ("COMPLETED", 2, 25000), ("PENDING", 1, 30000)]
    assert (october["disputesOpened"], november["disputesOpened"], november["disputesOpenAtEnd"]) == (0, 3, 1)
    assert october["disputesOpenAtEnd"] == 0 and both["openDisputes"] == 1
    # The two months add up to both together.
    for key in ("collected", "refunded", "net", "collectedCount", "refundedCount"):
        assert sum(line[key] for m in (october, november) for line in m["settled"]) == sum(
            line[key] for line in both["settled"]), key
    assert both["totals"] == october["totals"]


async def _refused(rt: Any, refund_id: str) -> None:
    """MTN says the refund failed."""
    async with rt.sessionmaker() as s:
        ours = (await s.get(Refund, refund_id)).provider_reference
    await handle_provider_event(rt, Event(
        provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex, reference=ours,
        outcome=ProviderOutcome.FAILED, reason="reversal declined"))


async def test_a_dispute_resolved_on_a_refund_made_while_it_was_open_that_then_fails_is_on_the_desks_list(
        admin, rt, demo):
    """The member's money was sent back by a refund made while her dispute was open (noted on it: "count it before
    resolving with a refund"), so the officer resolved it without one (nothing was left to refund); MTN then refused
    that refund. The dispute reads RESOLVED, out of ?open=true: ?refundFailed=true must find it, as it finds one
    whose resolution's own refund failed, or the note saying the member has not been paid back is read by no one."""
    async def ids(query: str) -> list[str]:
        return [d["id"] for d in (await admin.json("GET", f"/v1/disputes?{query}", 200))["data"]]

    disputes, refunds, payments = [], [], []
    for _ in range(3):  # refused; sent back; its dispute rejected (not in the member's favour)
        payment = await _paid(admin, rt, demo)
        dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
        refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                  json={"idempotencyKey": idem()})
        assert refund["disputeId"] == dispute["id"]
        payments.append(payment)
        disputes.append(dispute)
        refunds.append(refund)
    refused, sent, rejected = disputes
    for dispute in (refused, sent):
        await _move(admin, dispute, 200, status="RESOLVED", note="refunded in full already")
    await _move(admin, rejected, 200, status="REJECTED", note="the statement shows one payment")
    await _refused(rt, refunds[0]["id"])
    await _sent(rt, refunds[1]["id"])
    await _refused(rt, refunds[2]["id"])
    seen = await admin.json("GET", f"/v1/disputes/{refused['id']}", 200)
    assert seen["notes"][-1]["text"].endswith("the member has not been paid back") and seen["refundId"] is None
    assert await ids("refundFailed=true") == [refused["id"]]
    assert await ids("refundFailed=false") == [rejected["id"], sent["id"]]
    # Paid back another way since: off the list.
    await admin.json("POST", f"/v1/payments/{payments[0]['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert await ids("refundFailed=true") == []
    assert await ids("refundFailed=false") == [rejected["id"], sent["id"], refused["id"]]


async def test_a_dispute_resolved_on_a_refund_still_on_its_way_that_then_fails_is_on_the_desks_list(
        admin, rt, demo):
    """A refund asked for before the member disputed the payment ("I was never paid back") was still on its way when
    the officer resolved her dispute in her favour without a refund of its own (the money was going back); MTN then
    refused that refund. Linked to no dispute, its failure was noted on none and ?refundFailed=true did not list
    the RESOLVED dispute: the officer never learnt the member was not paid back. A refund not settled at the
    resolution is what it relied on: linked to it (its disputeId), noted and listed as one made while it was open.
    One settled before (sent, or failed already: the officer saw it), or a dispute rejected, relied on nothing."""
    async def ids(query: str) -> list[str]:
        return [d["id"] for d in (await admin.json("GET", f"/v1/disputes?{query}", 200))["data"]]

    disputes, refunds, payments = [], [], []
    for _ in range(4):  # refused after; sent after; refused before the resolution; its dispute rejected
        payment = await _paid(admin, rt, demo)
        refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                  json={"idempotencyKey": idem()})
        dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
        assert refund["disputeId"] is None
        payments.append(payment)
        disputes.append(dispute)
        refunds.append(refund)
    refused, sent, failed_before, rejected = disputes
    await _refused(rt, refunds[2]["id"])
    for dispute in (refused, sent, failed_before):
        await _move(admin, dispute, 200, status="RESOLVED", note="refund on its way")
    await _move(admin, rejected, 200, status="REJECTED", note="the statement shows one payment")
    await _refused(rt, refunds[0]["id"])
    await _sent(rt, refunds[1]["id"])
    await _refused(rt, refunds[3]["id"])
    linked = [(await admin.json("GET", f"/v1/refunds/{r['id']}", 200))["disputeId"] for r in refunds]
    assert linked == [refused["id"], sent["id"], None, None]
    seen = await admin.json("GET", f"/v1/disputes/{refused['id']}", 200)
    assert seen["notes"][-1]["text"] == (f"refund {refunds[0]['reference']} failed: reversal declined; the member "
                                         "has not been paid back") and seen["refundId"] is None
    for dispute in (sent, failed_before, rejected):
        assert "not been paid back" not in str((await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"])
    async with rt.sessionmaker() as s:
        audited = (await s.execute(select(AuditEvent.entity_id, AuditEvent.after).where(
            AuditEvent.action == "dispute.resolved"))).all()
    assert {entity: after.get("refundsReliedOn") for entity, after in audited} == {
        refused["id"]: [refunds[0]["id"]], sent["id"]: [refunds[1]["id"]], failed_before["id"]: None}
    assert await ids("refundFailed=true") == [refused["id"]]
    assert await ids("refundFailed=false") == [rejected["id"], failed_before["id"], sent["id"]]
    # Paid back another way since: off the list.
    await admin.json("POST", f"/v1/payments/{payments[0]['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert await ids("refundFailed=true") == []


@requires_pg
async def test_a_resolution_refund_racing_the_providers_chargeback_never_pays_the_member_twice(admin, rt, demo):
    """Two sessions at once: the officer resolves with a refund of the whole payment, another admin records MTN's
    own reversal of it. Whichever goes first, the member gets 50,000 back once: the resolution's refund, queued, is
    withdrawn by the chargeback (never sent), or the resolution is refused as more than is left. No deadlock."""
    for n in range(8):
        payment = await _paid(admin, rt, demo)
        dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
        resolve, charge = await asyncio.gather(
            admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions",
                      json={"status": "RESOLVED", "refundAmount": 50000}),
            admin.req("POST", f"/v1/payments/{payment['id']}/refunds", json={
                "amount": 50000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": f"R-{n}"}}))
        assert charge.status == 201 and resolve.status in (200, 422), (resolve.status, await resolve.text())
        refunds = sorted(await _refunds(rt, payment["id"]))
        assert refunds in ([(50000, "COMPLETED", True)],
                           [(50000, "COMPLETED", True), (50000, "FAILED", False)]), refunds
        async with rt.sessionmaker() as s:
            paid = await s.get(Payment, payment["id"])
            assert (paid.status, paid.refunded_minor, paid.mismatch) == ("REFUNDED", 50000, False)
            ids = (await s.execute(select(Refund.id).where(Refund.payment_id == payment["id"]))).scalars().all()
            sends = (await s.execute(select(OutboxJob.status).where(
                OutboxJob.kind == "refund.submit", OutboxJob.dedupe_key.in_([f"refund:{i}" for i in ids])))
            ).scalars().all()
        assert all(status != "PENDING" for status in sends), sends


async def test_the_reconciliation_keeps_each_currency_on_its_own_lines(admin, superadmin, rt, demo):
    """A super admin's report over two cooperatives, RWF and KES: each currency's figures are its own, a KES
    chargeback never lands on an RWF line."""
    rwf = await _paid(admin, rt, demo)
    kes = await kenyan_mpesa_payment(superadmin, "1500.00")
    await complete_payment(rt, kes["id"])
    await admin.json("POST", f"/v1/payments/{rwf['id']}/refunds", 201, json={
        "amount": 20000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-K"}})
    await superadmin.json("POST", f"/v1/payments/{kes['id']}/refunds", 201, json={
        "amount": "700", "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MPESA-REV-K"}})
    dispute = await superadmin.json("POST", "/v1/disputes", 201, json={"paymentId": kes["id"], "reason": "OTHER"})
    await superadmin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 422,
                          json={"status": "RESOLVED", "refundAmount": "800.01",
                                "returnedByProvider": {"providerTransactionId": "MPESA-REV-L"}})
    report = await superadmin.json("GET", "/v1/reports/reconciliation", 200)
    assert report["totals"] == [
        {"currency": "KES", "collectedCount": 1, "collected": "1500.00", "fees": "0.00", "refunded": "700.00",
         "net": "800.00"},
        {"currency": "RWF", "collectedCount": 1, "collected": 50000, "fees": 0, "refunded": 20000, "net": 30000}]
    assert [(line["currency"], line["collected"], line["refunded"], line["net"]) for line in report["settled"]] == [
        ("RWF", 50000, 20000, 30000), ("KES", "1500.00", "700.00", "800.00")]  # (MOBILE_MONEY_MTN, then MPESA)
    assert sorted((r["currency"], r["status"], r["amount"]) for r in report["refunds"]) == [
        ("KES", "COMPLETED", "700.00"), ("RWF", "COMPLETED", 20000)]
    mine = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [t["currency"] for t in mine["totals"]] == ["RWF"] and mine["openDisputes"] == 0
    assert report["openDisputes"] == 1


async def test_a_refund_made_as_the_dispute_is_resolved_neither_names_it_nor_drops_the_resolutions_note(
        admin, rt, demo):
    """The refund read the payment's dispute OPEN, then waited (for the dispute's lock on PostgreSQL; on SQLite, the
    database's write lock, taken with the payment's) while an officer resolved it with a note. Once her resolution is
    committed the refund is made (money fits), but the dispute is closed: not linked to it, not noted on it ("while
    this dispute is OPEN"), and above all its notes are not written back as they were read, without hers."""
    from core.audit import Actor
    from core.disputes import move_dispute
    from core.money import Money
    from core.refunds import request_refund

    actor = Actor("admin:test", "admin")
    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    officer = rt.sessionmaker()
    try:
        await officer.begin()
        await move_dispute(officer, rt, dispute_id=dispute["id"], cooperative_id=None, target="RESOLVED",
                           actor=actor, note="settled with the member at the office")

        async def refund() -> str:
            async with rt.sessionmaker.begin() as s:
                made, _ = await request_refund(s, rt, payment_id=payment["id"], cooperative_id=None,
                                               amount=Money(5000, "RWF"), reason=None, idempotency_key=idem(),
                                               actor=actor)
                return made.id

        task = asyncio.create_task(refund())
        # It has read the dispute and waits for the lock the officer holds. On PostgreSQL until it does (after a fixed
        # half second, a loaded host's refund had not read the dispute yet: it read it RESOLVED, and the test passed
        # whatever the refund does); SQLite's write lock is not shown anywhere to wait for.
        if is_postgres():
            await waiting_for_locks(rt, 1, done=task)
        else:
            await asyncio.sleep(0.5)
        assert not task.done()
        await officer.commit()
        refund_id = await task
    finally:
        await officer.close()
    async with rt.sessionmaker() as s:
        stored = await s.get(Dispute, dispute["id"])
        made = await s.get(Refund, refund_id)
    assert stored.status == "RESOLVED"
    assert [n["text"] for n in stored.notes] == ["settled with the member at the office"], stored.notes
    assert made.dispute_id is None and made.amount_minor == 5000


async def _plans(rt: Any, statements: list[tuple[str, Any]]) -> list[str]:
    """Each statement's plan for the values it was sent with, as PostgreSQL plans it (its sequential scans allowed:
    on a few rows a subquery asked per row is the cheaper plan, and shows)."""
    from tests.admin_api.test_rare_filters import _literal

    plans = []
    async with rt.engine.connect() as conn:
        # The hash of every refund's dispute_id a correlated EXISTS may be run as instead, over its memory here as
        # it is over 4 MB (the default work_mem) on a large table: asked per dispute then.
        await conn.exec_driver_sql("SET work_mem = '64kB'")
        await conn.exec_driver_sql("SET plan_cache_mode = force_custom_plan")
        for n, (statement, parameters) in enumerate(statements):
            await conn.exec_driver_sql(f"PREPARE read_{n} AS {statement}")
            values = ", ".join(_literal(v) for v in parameters)
            plans.append("\n".join((await conn.exec_driver_sql(f"EXPLAIN EXECUTE read_{n}({values})")).scalars().all()))
            await conn.exec_driver_sql(f"DEALLOCATE read_{n}")
        await conn.rollback()
    return plans


@requires_pg
async def test_refund_failed_reads_the_refunds_made_while_disputes_were_open_once_not_per_dispute(admin, rt, demo):
    """?refundFailed= asks of each RESOLVED dispute without a refund of its own whether the refunds made while it was
    open all FAILED. refunds.dispute_id has no index: asked per dispute (a correlated EXISTS), each read every refund,
    and the list (its count and its page) ran for minutes on 100,000 disputes and 400,000 refunds (a refund's read
    per dispute). Read once, as a hashed set of the disputes whose linked refunds all FAILED: the plan has no
    condition tying a refund's dispute_id to the dispute at hand."""
    from tests.admin_api.test_rare_filters import _statements

    payment = await _paid(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()})
    await _move(admin, dispute, 200, status="RESOLVED", note="refunded in full already")
    await _refused(rt, refund["id"])
    async with rt.engine.begin() as conn:  # refunds of the payment before it, FAILED, of no dispute
        await conn.execute(text(
            "INSERT INTO refunds (id, cooperative_id, payment_id, reference, amount_minor, currency, status, "
            "idempotency_key, provider_reference, created_at, updated_at, returned_by_provider) SELECT "
            "md5('r' || g), :coop, :payment, 'RFD_OLD_' || g, 100, 'RWF', 'FAILED', 'old-' || g, 'old-' || g, "
            "TIMESTAMPTZ '2026-01-01', TIMESTAMPTZ '2026-01-01', false FROM generate_series(1, 3000) AS g"),
            {"coop": demo["cooperative_id"], "payment": payment["id"]})
        await conn.exec_driver_sql("ANALYZE refunds")
    for flag, found in (("true", [dispute["id"]]), ("false", [])):
        with _statements(rt) as seen:
            page = await admin.json("GET", f"/v1/disputes?refundFailed={flag}", 200)
        assert [d["id"] for d in page["data"]] == found
        lists = [(sql, parameters) for sql, parameters in seen if "FROM disputes" in sql and "refunds" in sql]
        assert len(lists) == 2, seen  # its count and its page
        for plan in await _plans(rt, lists):
            assert "SubPlan" in plan and not [line for line in plan.splitlines()
                                              if "dispute_id" in line and "disputes.id" in line], plan
