"""Money a provider reports taken after the payment had FAILED: the payment stays FAILED (never reopened), but
the money is held: it can be given back through the API (a refund, or a dispute resolved with one), and the
reconciliation counts it where the provider's statement does. Taken in another currency, a person must look."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from sqlalchemy import select

from channels.sms.encoding import GSM7, measure
from core.audit import Actor
from core.models import AuditEvent, OutboxJob, Payment, Refund, SmsMessage
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import idem, make_payment
from tests.admin_api.test_payment_review import _mtn_says
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.providers.wires import mtn_adapter, mtn_wire

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
    assert sms == [f"sms:payment_failed:{payment['id']}", f"sms:payment_taken_after_failure:{payment['id']}",
                   f"sms:refund_completed:{refund['id']}"]
    left = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert left["message"] == ("the payment has been refunded in full: nothing is left to refund (50,000 RWF back "
                               f"of 50,000 RWF collected: refund {refund['reference']})")


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


MEMBER = "+250788000001"  # the demo's member who pays (Kinyarwanda)


async def _texts(rt: Any, payment_id: str) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).where(SmsMessage.idempotency_key.like(f"%{payment_id}%"))
                                     .order_by(SmsMessage.created_at))).scalars())


async def _sms_jobs(rt: Any, payment_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return [j.payload["template"] for j in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "sms.send").order_by(OutboxJob.id))).scalars()
            if (j.payload.get("context") or {}).get("payment_id") == payment_id]


async def test_the_member_told_it_failed_is_texted_that_the_money_was_taken_and_not_to_pay_again(
        admin, rt, demo, client, worker, aiohttp_server):
    """She was texted "your payment failed ... to try again, dial ..."; then MTN reports her money taken after all
    (its callback, confirmed by its status query). Before, she heard nothing more and could pay a second time: she
    is texted, once, in her language, that the money was taken, not to pay again, and that her cooperative counts it
    or gives it back."""
    await start_simulator(aiohttp_server, rt)  # Africa's Talking
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        reference = row.provider_reference
        await apply_collection_outcome(s, rt, row, ProviderOutcome.FAILED, actor=PROVIDER, reason="NOT_ENOUGH_FUNDS")
    await drain(worker)  # her "failed" SMS goes out, as it does long before a late report of her money
    assert await _mtn_says(client, wire, reference, "50000", "MTN-LATE-77") == "flagged_success_after_failure"
    async with rt.sessionmaker.begin() as s:  # the same money reported again (another event id): no second SMS
        await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, amount=Money(50_000, "RWF"),
                                       provider_transaction_id="MTN-LATE-77")
    await drain(worker)
    sent = await _texts(rt, payment["id"])
    assert [(m.template, m.status) for m in sent] == [("payment_failed", "SENT"),
                                                      ("payment_taken_after_failure", "SENT")]
    failed, taken = sent
    assert "Ongera ukande *384*" in failed.body  # "dial ... again": what the new text answers
    assert "*384*" not in taken.body and taken.member_id == demo["members"][MEMBER] and taken.language == "rw"
    assert taken.body.startswith("Kwishyura 50,000 RWF ya Monthly Rent"), taken.body
    assert "ntimwongere kwishyura" in taken.body.lower() and "izayabara cyangwa izayagusubiza" in taken.body
    assert payment["reference"] in taken.body and "MTN-LATE-77" in taken.body
    assert payment["id"] not in taken.body and measure(taken.body).encoding == GSM7
    # The desk finds it among the payment's and the member's messages, and the cooperative's system is told once.
    listed = await admin.json("GET", f"/v1/payments/{payment['id']}/messages", 200)
    assert [(m["template"], m["paymentId"]) for m in listed["data"]] == [
        ("payment_taken_after_failure", payment["id"]), ("payment_failed", payment["id"])]
    mine = await admin.json("GET", f"/v1/members/{demo['members'][MEMBER]}/messages", 200)
    assert "payment_taken_after_failure" in [m["template"] for m in mine["data"]]
    async with rt.sessionmaker() as s:
        told = [p["event_type"] for p in (await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event"))).scalars() if p["data"]["id"] == payment["id"]]
    assert told == ["payment.failed", "payment.taken_after_failure"]


@pytest.mark.parametrize(("language", "words"), [
    ("en", ("the money was taken after all", "Do not pay again", "your cooperative will count it or refund it")),
    ("fr", ("a finalement été prélevé", "Ne payez pas à nouveau", "le comptera ou vous le remboursera")),
    ("sw", ("pesa zimekatwa hatimaye", "Usilipe tena", "kitazihesabu au kitakurudishia")),
])
async def test_the_text_is_in_her_language(admin, rt, demo, worker, aiohttp_server, language, words):
    await start_simulator(aiohttp_server, rt)
    async with rt.sessionmaker.begin() as s:
        from core.models import Member

        await s.execute(Member.__table__.update().where(Member.id == demo["members"][MEMBER])
                        .values(language=language))
    payment = await _failed_then_taken(admin, rt, demo, Money(40_000, "RWF"))
    await drain(worker)
    [taken] = [m for m in await _texts(rt, payment["id"]) if m.template == "payment_taken_after_failure"]
    assert taken.language == language and all(w in taken.body for w in words), taken.body
    assert "40" in taken.body and "50" in taken.body  # what was taken, beside what was asked
    assert measure(taken.body).encoding == GSM7 and payment["id"] not in taken.body


@pytest.mark.parametrize("taken", [Money(0, "RWF"), Money(-50_000, "RWF"), Money(40_00, "USD")],
                         ids=["zero", "negative", "another-currency"])
async def test_no_text_when_no_money_of_hers_is_held_in_the_payments_currency(admin, rt, demo, taken):
    """Nothing held (a zero or negative amount), or taken in another currency (counted nowhere, not refundable
    through the API: a person looks): "your cooperative will count it or refund it" would not be true."""
    payment = await _failed_then_taken(admin, rt, demo, taken)
    assert await _sms_jobs(rt, payment["id"]) == ["payment_failed"]


async def test_a_repeat_report_after_the_review_flags_nothing_again(admin, rt, demo):
    """The provider reports the same money again (another event id: MTN's callback sent again, now with its
    transaction id) after a person reviewed the flag: the repeat is audited and changes nothing. It left the payment
    flagged (mismatch) with no detail saying why, back in the flagged lists for nothing new."""
    payment = await _failed_then_taken(admin, rt, demo, None)
    url = f"/v1/payments/{payment['id']}"
    reviewed = await admin.json("POST", f"{url}/review", 200,
                                json={"note": "MTN statement shows 50,000 taken; refund agreed with the member"})
    assert (reviewed["mismatch"], reviewed["mismatchDetail"]) == (False, None)
    async with rt.sessionmaker.begin() as s:
        result = await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]),
                                                ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                                provider_transaction_id="MTN-LATE-9")
    assert result == "flagged_success_after_failure"
    shown = await admin.json("GET", url, 200)
    assert (shown["status"], shown["mismatch"], shown["mismatchDetail"], shown["collectedAmount"]) == (
        "FAILED", False, None, 50000)
    assert shown["review"] == reviewed["review"]
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.success_after_failure")
            .order_by(AuditEvent.at, AuditEvent.id))).scalars().all()
    assert [row["first"] for row in rows] == [True, False]
