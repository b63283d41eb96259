"""A treasurer reconciling a month: payments.csv says why a payment failed (as the payment's JSON does), and the
report's dispute figures say which moment they count. `openDisputes` is the disputes open when the report is read,
whatever its period (September's report read in December counts December's); `disputesOpened` and
`disputesOpenAtEnd` are the period's own: opened in it, and still open when it ended."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update

from core.audit import Actor
from core.models import Dispute, Payment
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import complete_payment, make_payment
from tests.admin_api.test_reports_payer import PAYER, _rows
from tests.admin_api.test_reports_treasurer import ADDED, OCTOBER, PAYMENT_COLUMNS_BEFORE, SEPTEMBER

PROVIDER = Actor("provider:t", "provider")


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def test_payments_csv_says_why_a_payment_failed(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    paid = await make_payment(admin, rent)
    await complete_payment(rt, paid["id"])
    declined = await make_payment(admin, rent)
    forged = await make_payment(admin, rent)  # a provider's free text, as it sent it
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, declined["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="insufficient balance")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, forged["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason='=HYPERLINK("http://x.example","why")')
    cancelled = await admin.json("POST", f"/v1/payments/{(await make_payment(admin, rent))['id']}/cancel", 200,
                                 json={"note": "member paid cash at the office"})

    header, rows = await _rows(admin, "/v1/reports/payments.csv")
    # At the very end: every column a script reads by position stays where it was.
    assert header == PAYMENT_COLUMNS_BEFORE + ADDED + PAYER + ["failureReason"]
    assert {r["id"]: (r["status"], r["failureReason"]) for r in rows} == {
        paid["id"]: ("COMPLETED", ""),
        declined["id"]: ("FAILED", "insufficient balance"),
        forged["id"]: ("FAILED", "'=HYPERLINK(\"http://x.example\",\"why\")"),  # a formula no spreadsheet runs
        cancelled["id"]: ("CANCELLED", "cancelled by the cooperative: member paid cash at the office"),
    }
    # As the payment's own JSON says it.
    shown = await admin.json("GET", f"/v1/payments/{declined['id']}", 200)
    assert shown["failureReason"] == "insufficient balance"


async def _dispute(admin: Any, rt: Any, demo: dict[str, Any], *, opened: str | None,
                   closed: str | None = None) -> str:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    if closed is not None:
        await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                         json={"status": "REJECTED", "note": "paid as recorded"})
    values: dict[str, Any] = {}
    if opened is not None:
        values["created_at"] = _at(opened)
    if closed is not None:
        values["resolved_at"] = _at(closed)
    if values:
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Dispute).where(Dispute.id == dispute["id"]).values(**values))
    return str(dispute["id"])


async def test_dispute_figures_say_which_moment_they_count(admin: Any, rt: Any, demo: dict[str, Any],
                                                           coop_b: dict[str, Any]) -> None:
    # Kigali days: September ends at 2026-09-30T22:00Z, October at 2026-10-31T22:00Z; the report is read in
    # December (now).
    await _dispute(admin, rt, demo, opened="2026-09-10T08:00:00", closed="2026-10-05T08:00:00")  # open at Sep's end
    await _dispute(admin, rt, demo, opened="2026-10-02T08:00:00", closed="2026-10-03T08:00:00")  # closed within Oct
    await _dispute(admin, rt, demo, opened="2026-10-20T08:00:00")  # still open
    await _dispute(admin, rt, demo, opened="2026-09-30T23:00:00", closed="2026-10-31T22:00:00")  # 1 Oct local; open
    # at October's end (closed on its first instant after)
    await _dispute(admin, rt, demo, opened=None)  # opened now, in December: no period of these has it
    # Opened on the instant September ends (00:00 on 1 October in Kigali), closed days later: October's alone, not
    # open at September's end.
    await _dispute(admin, rt, demo, opened="2026-09-30T22:00:00", closed="2026-10-04T08:00:00")

    september = await admin.json("GET", f"/v1/reports/reconciliation?{SEPTEMBER}", 200)
    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    ever = await admin.json("GET", "/v1/reports/reconciliation", 200)
    figures = ("openDisputes", "disputesOpened", "disputesOpenAtEnd")
    # openDisputes: open now, the same whatever the period (October's and December's open ones).
    assert [september[f] for f in figures] == [2, 1, 1]
    assert [october[f] for f in figures] == [2, 4, 2]
    assert [ever[f] for f in figures] == [2, 6, 2]  # open-ended: its end is now
    other = await coop_b["admin"].json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert [other[f] for f in figures] == [0, 0, 0]  # another cooperative's report counts none of these

    # The document says which moment each counts.
    doc = await (await admin.req("GET", "/v1/openapi.json")).json()
    schema = doc["paths"]["/v1/reports/reconciliation"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]
    props = schema["properties"] if "properties" in schema else doc["components"]["schemas"][
        schema["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert "time of the request" in props["openDisputes"]["description"]
    assert "opened in the period" in props["disputesOpened"]["description"]
    assert "period's end" in props["disputesOpenAtEnd"]["description"]
    # As the other figures of the requests made in the period: their status when the report is read.
    payments = props["payments"]["properties"]
    assert "status at the time of the request" in payments["byStatus"]["description"]
    assert "status at the time of the request" in props["refunds"]["description"]
    assert "held at the time of the request" in props["totals"]["description"]
