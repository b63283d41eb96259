"""What a treasurer closing a month needs from the reports: `settled` lines per provider account (a method routed
through another provider part-way through the month is on two statements), late money flagged in the month it
landed in, the cooperative's own days in the exports, a file Excel opens with its accents, and a bare date with a
stray space still read as a local day."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from sqlalchemy import update

from core.audit import Actor
from core.models import Cooperative, Payment, Refund
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.refunds import apply_refund_outcome
from tests.admin_api.conftest import complete_payment, idem, make_payment

PROVIDER = Actor("provider:t", "provider")
SEPTEMBER = "from=2026-09-01&to=2026-10-01"  # Kigali days: 2026-08-31T22:00Z to 2026-09-30T22:00Z
OCTOBER = "from=2026-10-01&to=2026-11-01"
NOVEMBER = "from=2026-11-01&to=2026-12-01"
# The columns as they were before provider and the local dates were added (scripts read them by position).
PAYMENT_COLUMNS_BEFORE = [
    "id", "reference", "createdAt", "completedAt", "status", "paymentMethod", "amount", "currency", "fee",
    "refundedAmount", "collectedAmount", "paymentTypeId", "paymentType", "memberId", "paymentAccount",
    "gatewayReference", "gatewayTransactionId", "channel", "mismatch", "late", "description",
]
REFUND_COLUMNS_BEFORE = [
    "id", "reference", "paymentId", "paymentReference", "createdAt", "completedAt", "status", "amount", "currency",
    "reason", "failureReason", "disputeId",
]
ADDED = ["provider", "createdLocalDate", "completedLocalDate"]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def _dated(rt, payment_id: str, created: str, completed: str | None) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment_id).values(
            created_at=_at(created), completed_at=_at(completed) if completed else None))


async def _refund(admin, rt, payment_id: str, amount: int, *, completed: str) -> dict:
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": amount, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Refund, refund["id"])
        assert row is not None
        await apply_refund_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=PROVIDER)
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(
            created_at=_at(completed), completed_at=_at(completed)))
    return refund


async def _rows(caller, path: str) -> tuple[list[str], list[dict[str, str]]]:
    resp = await caller.req("GET", path)
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    return next(csv.reader(io.StringIO(text))), list(csv.DictReader(io.StringIO(text)))


async def _late(admin, rt, demo, *, created: str, completed: str) -> dict:
    """Timed out, then the provider's success arrived: a late payment (money in, after the member was told no)."""
    late = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, late["id"]), ProviderOutcome.EXPIRED,
                                       actor=PROVIDER, reason="not approved in time")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, late["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, provider_transaction_id=f"MTN-LATE-{late['id'][:8]}")
    await _dated(rt, late["id"], created, completed)
    return late


async def test_settled_has_a_line_per_provider_account_and_the_exports_name_the_provider(admin, rt, demo):
    """Mid-October MTN MoMo is routed through IremboPay (PAYMENT_ROUTES): October's MTN money is on two
    statements, MTN's (50,000) and IremboPay's (5,000, 5,000 of it paid back), not one line of 55,000."""
    direct = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, direct["id"], fee=500)
    await _dated(rt, direct["id"], "2026-10-05T08:00:00", "2026-10-05T08:01:00")
    rt.routes = {**rt.routes, "MOBILE_MONEY_MTN": "irembopay"}
    routed = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await complete_payment(rt, routed["id"])
    await _dated(rt, routed["id"], "2026-10-20T08:00:00", "2026-10-20T08:01:00")
    back = await _refund(admin, rt, routed["id"], 5000, completed="2026-10-21T09:00:00")

    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert october["settled"] == [
        {"provider": "irembopay", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF", "collectedCount": 1,
         "collected": 5000, "fees": 0, "refundedCount": 1, "refunded": 5000, "net": 0},
        {"provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF", "collectedCount": 1,
         "collected": 50000, "fees": 500, "refundedCount": 0, "refunded": 0, "net": 49500},
    ]

    header, paid = await _rows(admin, f"/v1/reports/payments.csv?{OCTOBER}&basis=completed")
    # The new columns at the end: the others keep their places (memberName and the rest after them,
    # test_reports_payer).
    assert header[:len(PAYMENT_COLUMNS_BEFORE + ADDED)] == PAYMENT_COLUMNS_BEFORE + ADDED
    assert [(r["id"], r["provider"]) for r in paid] == [(direct["id"], "mtn_momo"), (routed["id"], "irembopay")]
    header, refunds = await _rows(admin, f"/v1/reports/refunds.csv?{OCTOBER}&basis=completed")
    before = REFUND_COLUMNS_BEFORE + ADDED + ["providerTransactionId", "returnedByProvider"]  # (after these)
    assert header[:len(before)] == before
    assert [(r["id"], r["provider"]) for r in refunds] == [(back["id"], "irembopay")]  # its payment's provider


async def test_late_money_is_flagged_in_the_period_it_landed_in(admin, rt, demo, monkeypatch):
    """Asked for at 23:30 on 30 September (Kigali), timed out; the provider's late success came on 1 October: it is
    in October's `settled`, so October's `flagged` explains it (`flaggedIn: ["completed"]`), and September's still
    lists it as asked for then (`["created"]`)."""
    from core import reports

    late = await _late(admin, rt, demo, created="2026-09-30T21:30:00", completed="2026-10-01T06:00:00")
    both = await _late(admin, rt, demo, created="2026-10-10T08:00:00", completed="2026-10-10T09:00:00")
    later = await _late(admin, rt, demo, created="2026-10-30T08:00:00", completed="2026-11-02T09:00:00")

    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert [(x["provider"], x["collectedCount"]) for x in october["settled"]] == [("mtn_momo", 2)]
    assert [(f["id"], f["flaggedIn"]) for f in october["flagged"]] == [
        (late["id"], ["completed"]), (both["id"], ["created", "completed"]), (later["id"], ["created"])]
    assert october["flaggedCount"] == 3
    assert october["flagged"][0]["completedAt"] == "2026-10-01T06:00:00Z"
    september = await admin.json("GET", f"/v1/reports/reconciliation?{SEPTEMBER}", 200)
    assert [(f["id"], f["flaggedIn"]) for f in september["flagged"]] == [(late["id"], ["created"])]
    assert september["flaggedCount"] == 1
    november = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert [(f["id"], f["flaggedIn"]) for f in november["flagged"]] == [(later["id"], ["completed"])]
    everything = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [f["flaggedIn"] for f in everything["flagged"]] == [["created", "completed"]] * 3

    # The cap: the list stops, the count still counts the payments flagged by either moment.
    monkeypatch.setattr(reports, "FLAGGED_LIMIT", 2)
    capped = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert [f["id"] for f in capped["flagged"]] == [late["id"], both["id"]] and capped["flaggedCount"] == 3


async def test_exports_carry_the_cooperatives_local_dates(admin, superadmin, rt, demo, coop_b):
    """00:30 on 1 November in Kigali is 2026-10-31T22:30Z: the UTC columns say October, the local ones November.
    A super admin exporting every cooperative gets each row's own cooperative's day (Lagos: still 31 October)."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    await _dated(rt, paid["id"], "2026-10-31T22:10:00", "2026-10-31T22:30:00")
    waiting = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await _dated(rt, waiting["id"], "2026-11-02T08:00:00", None)
    back = await _refund(admin, rt, paid["id"], 1000, completed="2026-11-30T22:10:00")

    _, rows = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}&basis=completed")
    assert [(r["id"], r["completedAt"][:10], r["createdLocalDate"], r["completedLocalDate"]) for r in rows] == [
        (paid["id"], "2026-10-31", "2026-11-01", "2026-11-01")]
    _, rows = await _rows(admin, f"/v1/reports/payments.csv?{NOVEMBER}")
    assert [(r["id"], r["createdAt"][:10], r["createdLocalDate"], r["completedLocalDate"]) for r in rows] == [
        (paid["id"], "2026-10-31", "2026-11-01", "2026-11-01"), (waiting["id"], "2026-11-02", "2026-11-02", "")]
    _, rows = await _rows(admin, "/v1/reports/refunds.csv")
    assert [(r["id"], r["createdLocalDate"], r["completedLocalDate"]) for r in rows] == [
        (back["id"], "2026-12-01", "2026-12-01")]

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == coop_b["cooperative_id"])
                        .values(timezone="Africa/Lagos"))
    other = await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    await _dated(rt, other["id"], "2026-10-31T22:30:00", None)
    _, rows = await _rows(superadmin, "/v1/reports/payments.csv?from=2026-10-31T22:00:00Z&to=2026-10-31T23:00:00Z")
    assert {r["id"]: r["createdLocalDate"] for r in rows} == {paid["id"]: "2026-11-01", other["id"]: "2026-10-31"}


async def test_csv_exports_can_start_with_a_byte_order_mark_for_excel(admin, client, demo):
    """Excel opening a UTF-8 file without a BOM reads it as Windows-1252: `Février` shows as `FÃ©vrier`."""
    ptype = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Loyer – Février", "amount": 50000})
    await make_payment(admin, ptype["id"], description="Ubukode bw'ukwezi — Février")

    plain = await (await admin.req("GET", "/v1/reports/payments.csv")).read()
    assert plain.startswith(b"id,reference,")  # unchanged unless asked for
    for query in ("bom=true", "bom=1", "bom=TRUE"):
        resp = await admin.req("GET", f"/v1/reports/payments.csv?{query}")
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/csv; charset=utf-8"
        raw = await resp.read()
        assert raw.startswith(b"\xef\xbb\xbfid,reference,"), raw[:20]
        assert "Loyer – Février" in raw.decode("utf-8-sig")
    assert (await (await admin.req("GET", "/v1/reports/payments.csv?bom=false")).read()) == plain
    empty = await admin.req("GET", "/v1/reports/refunds.csv?bom=true")  # no rows: the header alone, still marked
    assert (await empty.read()).startswith(b"\xef\xbb\xbfid,reference,paymentId,")

    for path in ("/v1/reports/payments.csv?bom=yes", "/v1/reports/refunds.csv?bom=maybe"):
        bad = await admin.json("GET", path, 400)
        assert bad["message"] == ["bom must be true or false"], bad

    doc = await (await client.get("/v1/openapi.json")).json()
    for path in ("/v1/reports/payments.csv", "/v1/reports/refunds.csv"):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"] if p["in"] == "query"}
        assert params["bom"]["schema"] == {"type": "boolean", "default": False}, params.get("bom")


async def test_a_bare_date_with_a_stray_space_is_still_a_local_day(admin, rt, demo):
    """`from=2026-11-01 ` (a space a spreadsheet-built URL left) is the date 2026-11-01, so Kigali's midnight, not
    UTC's: the first two hours of November stay in November."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    await _dated(rt, paid["id"], "2026-10-31T22:30:00", "2026-10-31T22:31:00")
    plain = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert plain["period"] == {"from": "2026-10-31T22:00:00Z", "to": "2026-11-30T22:00:00Z"}
    for query in ("from=2026-11-01%20&to=2026-12-01", "from=%202026-11-01&to=2026-12-01%20%20"):
        spaced = await admin.json("GET", f"/v1/reports/reconciliation?{query}", 200)
        assert spaced["period"] == plain["period"], query
        assert [s["collectedCount"] for s in spaced["settled"]] == [1]
    _, rows = await _rows(admin, "/v1/reports/payments.csv?from=2026-11-01%20&to=2026-12-01")
    assert [r["id"] for r in rows] == [paid["id"]]


async def test_a_payment_flagged_by_a_refund_a_month_later_is_in_that_months_flagged(admin, rt, demo):
    """Paid in September; its refund, recorded FAILED, is reported sent back in October after a second one went
    too: October's `settled` carries 100,000 refunded of a 50,000 payment, and October's `flagged` says which
    payment and why (`flaggedIn: ["refunded"]`); it was in neither month's list."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    await _dated(rt, paid["id"], "2026-09-10T08:00:00", "2026-09-10T08:01:00")
    first = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == first["id"]).values(created_at=_at("2026-09-11T08:00:00")))
        await apply_refund_outcome(s, rt, await s.get(Refund, first["id"]), ProviderOutcome.FAILED, actor=PROVIDER,
                                   reason="declined")
    await _refund(admin, rt, paid["id"], 50_000, completed="2026-10-03T09:00:00")
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, first["id"]), ProviderOutcome.SUCCEEDED,
                                   actor=PROVIDER, occurred_at=_at("2026-10-05T09:00:00"))

    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert [(x["refundedCount"], x["refunded"]) for x in october["settled"]] == [(2, 100_000)]
    assert [(f["id"], f["flaggedIn"]) for f in october["flagged"]] == [(paid["id"], ["refunded"])]
    assert "more than collected" in october["flagged"][0]["mismatchDetail"]
    assert october["flaggedCount"] == 1
    september = await admin.json("GET", f"/v1/reports/reconciliation?{SEPTEMBER}", 200)
    assert [(f["id"], f["flaggedIn"]) for f in september["flagged"]] == [(paid["id"], ["created", "completed"])]
    november = await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)
    assert november["flagged"] == []


async def test_a_late_payment_refunded_a_month_later_is_not_in_that_months_flagged(admin, rt, demo):
    """Only a mismatched payment is flagged by its refund going back (`refunded`): a late one is flagged where it was
    asked for and where its money landed, not again in the month a refund of it went back."""
    late = await _late(admin, rt, demo, created="2026-09-10T08:00:00", completed="2026-09-10T09:00:00")
    await _refund(admin, rt, late["id"], 50_000, completed="2026-10-03T09:00:00")
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, late["id"])
        assert row is not None and (row.late, row.mismatch, row.status) == (True, False, "REFUNDED")

    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert [(x["refundedCount"], x["refunded"]) for x in october["settled"]] == [(1, 50_000)]
    assert (october["flagged"], october["flaggedCount"]) == ([], 0)
    september = await admin.json("GET", f"/v1/reports/reconciliation?{SEPTEMBER}", 200)
    assert [(f["id"], f["flaggedIn"]) for f in september["flagged"]] == [(late["id"], ["created", "completed"])]
