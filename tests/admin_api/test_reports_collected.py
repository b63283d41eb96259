"""Reconciliation counts what providers actually took: a payment the provider reported short is collected at
what it reported (as refunds are capped), in the totals, by method, by payment type and in the CSV export."""

from __future__ import annotations

import csv
import io

from core.audit import Actor
from core.models import Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import complete_payment, idem, make_payment, payment_body


async def _short_paid(admin, rt, demo) -> dict:
    """Rent of 50000 of which the provider reported 40000 taken."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        assert row is not None
        await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"),
                                       amount=Money(40000, "RWF"), provider_transaction_id="TX-SHORT")
    return payment


async def test_reconciliation_sums_what_was_taken(admin, rt, demo):
    await _short_paid(admin, rt, demo)
    full = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await complete_payment(rt, full["id"], fee=100)
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert report["totals"] == [
        {"currency": "RWF", "collectedCount": 2, "collected": 45000, "fees": 100, "refunded": 0, "net": 44900}
    ]
    [mtn] = report["payments"]["byMethod"]
    assert (mtn["count"], mtn["amount"], mtn["completedCount"], mtn["completedAmount"]) == (2, 55000, 2, 45000)
    by_type = {t["name"]: t for t in report["payments"]["byPaymentType"]}
    assert by_type["Monthly Rent"]["completedAmount"] == 40000 and by_type["Water"]["completedAmount"] == 5000
    # byStatus keeps the payments' own amounts: 55000 asked, of which the totals above say 45000 came in.
    assert report["payments"]["byStatus"] == [{"status": "COMPLETED", "currency": "RWF", "count": 2, "amount": 55000}]


async def test_a_full_refund_of_a_short_payment_nets_to_zero(admin, rt, demo):
    from core.models import Refund
    from core.refunds import apply_refund_outcome

    payment = await _short_paid(admin, rt, demo)
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"idempotencyKey": "refund-short-001"})
    assert refund["amount"] == 40000
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Refund, refund["id"])
        assert row is not None
        await apply_refund_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"))
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert report["totals"] == [
        {"currency": "RWF", "collectedCount": 1, "collected": 40000, "fees": 0, "refunded": 40000, "net": 0}
    ]
    # The payment's JSON and payments.csv, as the reconciliation: what was taken, the refund beside it (not taken
    # off: a system crediting collectedAmount less refundedAmount nets to 0 as the totals do).
    got = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (got["status"], got["collectedAmount"], got["refundedAmount"]) == ("REFUNDED", 40000, 40000)
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(
        await (await admin.req("GET", "/v1/reports/payments.csv")).text()))}
    assert (rows[payment["id"]]["collectedAmount"], rows[payment["id"]]["refundedAmount"]) == ("40000", "40000")


async def test_payments_csv_has_the_collected_amount(admin, rt, demo):
    short = await _short_paid(admin, rt, demo)
    pending = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    assert resp.status == 200
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(await resp.text()))}
    assert (rows[short["id"]]["amount"], rows[short["id"]]["collectedAmount"]) == ("50000", "40000")
    assert (rows[pending["id"]]["amount"], rows[pending["id"]]["collectedAmount"]) == ("5000", "0")


async def test_the_json_the_csv_and_the_webhook_state_the_same_collected_amount(admin, rt, demo):
    """One figure (what the provider took and the payment still holds, 0 if none) in the three places a cooperative
    reads it, in every state: the JSON and the webhook said null where the CSV wrote 0 (nothing taken yet, failed)."""
    from core.provider_events import event_data

    short = await _short_paid(admin, rt, demo)
    pending = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    failed = await make_payment(admin, demo["payment_types"]["Water"], amount=5000,
                                paymentAccount="+250788000002")
    elsewhere = await make_payment(admin, demo["payment_types"]["Water"], amount=5000,
                                   paymentAccount="+250788000003")
    async with rt.sessionmaker.begin() as s:
        for payment, outcome, amount in ((failed, ProviderOutcome.FAILED, None),
                                         (elsewhere, ProviderOutcome.SUCCEEDED, Money(5000, "KES"))):
            row = await s.get(Payment, payment["id"])
            await apply_collection_outcome(s, rt, row, outcome, actor=Actor("provider:t", "provider"),
                                           amount=amount, provider_transaction_id=f"TX-{payment['id'][:8]}")
    resp = await admin.req("GET", "/v1/reports/payments.csv")
    cells = {r["id"]: (r["status"], r["collectedAmount"]) for r in csv.DictReader(io.StringIO(await resp.text()))}
    shown, told = {}, {}
    for payment in (short, pending, failed, elsewhere):
        got = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
        shown[payment["id"]] = (got["status"], got["collectedAmount"])
        async with rt.sessionmaker() as s:
            told[payment["id"]] = event_data(await s.get(Payment, payment["id"]))["collectedAmount"]
    assert shown == {short["id"]: ("COMPLETED", 40000), pending["id"]: ("PENDING", 0),
                     failed["id"]: ("FAILED", 0), elsewhere["id"]: ("COMPLETED", 0)}
    assert told == {key: collected for key, (_status, collected) in shown.items()}
    assert cells == {key: (status, str(collected)) for key, (status, collected) in shown.items()}


async def test_an_overpayment_is_counted_and_refundable_in_full(admin, rt, demo):
    """The provider reported more than the amount: all of it is the payer's money held by the cooperative."""
    from core.models import Refund
    from core.refunds import apply_refund_outcome

    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"),
                                       amount=Money(60000, "RWF"), provider_transaction_id="TX-OVER")
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["mismatch"]) == ("COMPLETED", True)
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(t["collected"], t["net"]) for t in report["totals"]] == [(60000, 60000)]
    assert [x["collected"] for x in report["settled"]] == [60000]
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"idempotencyKey": "refund-overpaid-001"})
    assert refund["amount"] == 60000
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, refund["id"]), ProviderOutcome.SUCCEEDED,
                                   actor=Actor("provider:t", "provider"))
    assert (await admin.json("GET", f"/v1/payments/{payment['id']}", 200))["status"] == "REFUNDED"


async def test_totals_past_one_payments_ceiling_still_report(admin, tenant, demo):
    """Two payments of the largest amount one may be (a custom-amount type): the period's totals pass that
    ceiling; the reconciliation still answers (it answered 400 "amount is too large" for the whole period)."""
    ptype = await admin.json("POST", "/v1/payment-types", 201,
                             json={"name": "Donation", "amount": 0, "allowCustomAmount": True})
    for _ in range(2):
        await tenant.json("POST", "/v1/payments", 201,
                          json=payment_body(ptype["id"], amount=999_999_999_999_999, idempotencyKey=idem()))
    report = await admin.json("GET", "/v1/reports/reconciliation?from=2020-01-01", 200)
    pending = [row for row in report["payments"]["byStatus"] if row["status"] == "PENDING"]
    assert pending == [{"status": "PENDING", "currency": "RWF", "count": 2, "amount": 1_999_999_999_999_998}]
