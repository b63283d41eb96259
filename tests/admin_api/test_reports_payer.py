"""Who paid, in the exports: a treasurer matching a provider's statement line (which names the payer) to the
gateway's payments had only a member's id and a masked number, and a super admin's export of every cooperative
did not say which cooperative a row was. payments.csv and refunds.csv end with `memberName` and
`cooperativeShortCode`, the member's name neutralised as any free text is (a name a member chose on USSD may start
with `=`), quoted as CSV quotes (commas, quotes, line breaks)."""

from __future__ import annotations

import csv
import io
from typing import Any

from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.admin_api.test_reports_treasurer import ADDED, PAYMENT_COLUMNS_BEFORE, REFUND_COLUMNS_BEFORE

PAYER = ["memberName", "cooperativeShortCode"]


async def _rows(caller: Any, path: str) -> tuple[list[str], list[dict[str, str]]]:
    resp = await caller.req("GET", path)
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    text = raw.decode("utf-8-sig")  # as Excel reads a file with a byte-order mark
    return next(csv.reader(io.StringIO(text))), list(csv.DictReader(io.StringIO(text, newline="")))


async def test_the_exports_name_the_payer_and_the_cooperative(admin: Any, superadmin: Any, rt: Any,
                                                              demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    aline, bad = demo["members"]["+250788000001"], demo["members"]["+250733000001"]
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"name": 'Uwase, Aline "Mama Keza"'})
    await admin.json("PATCH", f"/v1/members/{bad}", 200, json={"name": '=HYPERLINK("http://x.example","Pay")'})
    paid = await make_payment(admin, rent, memberId=aline)
    await complete_payment(rt, paid["id"])
    other = await make_payment(admin, rent, memberId=bad, paymentMethod="MOBILE_MONEY_AIRTEL",
                               paymentAccount="+250733000001")
    stranger = await make_payment(admin, rent, paymentAccount="+250788555444")  # no member holds this number
    assert stranger["memberId"] is None
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    theirs = await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000,
                                memberId=coop_b["member_id"], paymentAccount="+250788999001")

    header, rows = await _rows(admin, "/v1/reports/payments.csv?bom=true")
    # At the end: the others keep their places (then failureReason: test_reports_reasons_and_disputes).
    assert header == PAYMENT_COLUMNS_BEFORE + ADDED + PAYER + ["failureReason"]
    assert {r["id"]: (r["memberName"], r["cooperativeShortCode"]) for r in rows} == {
        paid["id"]: ('Uwase, Aline "Mama Keza"', "KHHC"),
        other["id"]: ("'=HYPERLINK(\"http://x.example\",\"Pay\")", "KHHC"),  # a formula no spreadsheet runs
        stranger["id"]: ("", "KHHC"),
    }
    header, rows = await _rows(admin, "/v1/reports/refunds.csv?bom=true")
    assert header == REFUND_COLUMNS_BEFORE + ADDED + ["providerTransactionId", "returnedByProvider"] + PAYER
    assert [(r["id"], r["memberName"], r["cooperativeShortCode"]) for r in rows] == [
        (refund["id"], 'Uwase, Aline "Mama Keza"', "KHHC")]

    # A super admin's export of every cooperative tells their rows apart.
    _, rows = await _rows(superadmin, "/v1/reports/payments.csv")
    assert {r["id"]: (r["memberName"], r["cooperativeShortCode"]) for r in rows}[theirs["id"]] == (
        "Bea Other", "OTHER")
    assert {r["cooperativeShortCode"] for r in rows} == {"KHHC", "OTHER"}
