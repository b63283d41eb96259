"""The exports as a treasurer's Excel opens them. In a French (Rwanda) locale Excel splits a CSV on `;` and reads
`1500.00` as text, not a number: `delimiter=semicolon` writes `;` between the cells and a decimal comma in the
amounts. Excel shows a 13+ digit provider transaction id as 2,02610E+19 and keeps 15 of its digits, and drops an
id's leading zeros: `excel=true` writes digit-only ids as `="…"` (text to Excel) after a byte-order mark. The
default file stays byte for byte what scripts read, and free text is neutralised whatever the options."""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlalchemy import update

from core import auth
from core.models import Payment, Refund
from tests.admin_api.conftest import bearer, complete_payment, idem, make_payment
from tests.admin_api.test_reports_settled import _dated

OCTOBER = "from=2026-10-01&to=2026-11-01"
LONG_ID = "20261005123456789012"  # an MTN-style financial transaction id: 20 digits


async def _raw(caller: Any, path: str) -> bytes:
    resp = await caller.req("GET", path)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    return await resp.read()


def _rows(raw: bytes, delimiter: str = ",") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""), delimiter=delimiter))


async def _october_payment(admin: Any, rt: Any, demo: dict[str, Any], day: str = "05", **over: Any) -> dict[str, Any]:
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], **over)
    await complete_payment(rt, paid["id"])
    await _dated(rt, paid["id"], f"2026-10-{day}T08:00:00", f"2026-10-{day}T08:01:00")
    return paid


async def test_a_semicolon_export_for_a_french_locale_excel(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    paid = await _october_payment(admin, rt, demo, description="Loyer; octobre")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(provider_transaction_id=LONG_ID))
    plain = await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}")
    row = _rows(plain)[0]

    raw = await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}&delimiter=semicolon")
    header = raw.split(b"\r\n")[0]
    assert header == plain.split(b"\r\n")[0].replace(b",", b";")
    line = ";".join([
        paid["id"], row["reference"], "2026-10-05T08:00:00Z", "2026-10-05T08:01:00Z", "COMPLETED",
        "MOBILE_MONEY_MTN", "50000", "RWF", "0", "0", "50000", row["paymentTypeId"], "Monthly Rent", row["memberId"],
        "+25078****001", row["gatewayReference"], LONG_ID, row["channel"], "false", "false",
        '"Loyer; octobre"',  # the `;` in the text quoted, not a column break
        "mtn_momo", "2026-10-05", "2026-10-05", row["memberName"], "KHHC", ""])
    assert raw == header + b"\r\n" + line.encode() + b"\r\n"
    assert not raw.startswith(b"\xef\xbb\xbf")  # the byte-order mark only when asked for
    assert _rows(raw, ";") == [row]  # RWF has no decimals: the same cells

    # Explicitly comma: the default file, byte for byte.
    assert await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}&delimiter=comma") == plain

    back = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"amount": 1000, "reason": "trop payé; rendu", "idempotencyKey": idem()})
    plain = await _raw(admin, "/v1/reports/refunds.csv")
    raw = await _raw(admin, "/v1/reports/refunds.csv?delimiter=semicolon&bom=true")
    assert raw.startswith(b"\xef\xbb\xbfid;reference;paymentId;paymentReference;createdAt;")
    assert b';"trop pay\xc3\xa9; rendu";' in raw
    assert _rows(raw, ";") == _rows(plain) and [r["id"] for r in _rows(plain)] == [back["id"]]


async def test_a_semicolon_export_writes_shillings_with_a_decimal_comma(superadmin: Any, rt: Any,
                                                                          client: Any) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Umoja SACCO", "shortCode": "NRB", "country": "KE"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada ya mwezi", "amount": "1500.00", "cooperativeId": coop["id"]})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@nrb.test", password="nairobi-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    ke = await bearer(client, "admin@nrb.test", "nairobi-admin-pw")
    paid = await ke.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype["id"], "amount": "1500.00", "paymentMethod": "MPESA",
        "paymentAccount": "0712345678", "idempotencyKey": idem()})
    await complete_payment(rt, paid["id"], fee=2550)

    plain = _rows(await _raw(ke, "/v1/reports/payments.csv"))
    assert [(r["amount"], r["fee"], r["refundedAmount"], r["collectedAmount"]) for r in plain] == [
        ("1500.00", "25.50", "0.00", "1500.00")]  # scripts' form, unchanged
    raw = await _raw(ke, "/v1/reports/payments.csv?delimiter=semicolon")
    assert b";1500,00;KES;25,50;0,00;1500,00;" in raw
    semi = _rows(raw, ";")
    assert [(r["amount"], r["fee"], r["refundedAmount"], r["collectedAmount"]) for r in semi] == [
        ("1500,00", "25,50", "0,00", "1500,00")]
    # Nothing else changes: dates, times and ids keep their dots and dashes.
    assert [{k: v for k, v in r.items() if k not in ("amount", "fee", "refundedAmount", "collectedAmount")}
            for r in semi] == [{k: v for k, v in r.items()
                                if k not in ("amount", "fee", "refundedAmount", "collectedAmount")} for r in plain]
    await ke.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})  # in full
    refunds = await _raw(ke, "/v1/reports/refunds.csv?delimiter=semicolon")
    assert [r["amount"] for r in _rows(refunds, ";")] == ["1500,00"]
    assert [r["amount"] for r in _rows(await _raw(ke, "/v1/reports/refunds.csv"))] == ["1500.00"]


async def test_excel_keeps_long_digit_ids_as_text_and_formulas_stay_neutralised(admin: Any, rt: Any,
                                                                                 demo: dict[str, Any]) -> None:
    paid = await _october_payment(admin, rt, demo, description="=1+2")
    forged = await _october_payment(admin, rt, demo, "06", description="+250788000001")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(
            provider_transaction_id=LONG_ID, gateway_reference=None, provider_reference="0042"))
        await s.execute(update(Payment).where(Payment.id == forged["id"]).values(
            provider_transaction_id='=HYPERLINK("http://x.example","1")'))
    plain = await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}")
    rows = _rows(plain)
    assert [r["gatewayTransactionId"] for r in rows] == [LONG_ID, "'=HYPERLINK(\"http://x.example\",\"1\")"]

    raw = await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}&excel=true")
    assert raw.startswith(b"\xef\xbb\xbfid,reference,")  # the byte-order mark: Excel reads UTF-8
    first = raw.split(b"\r\n")[1]
    # ="20261005123456789012": text to Excel, every digit kept; quoted as CSV quotes a cell with quotes.
    assert b',"=""20261005123456789012""",' in first
    excel = _rows(raw)
    assert [(r["gatewayTransactionId"], r["description"]) for r in excel] == [
        (f'="{LONG_ID}"', "'=1+2"),  # free text still neutralised
        ("'=HYPERLINK(\"http://x.example\",\"1\")", "+250788000001")]  # not digits: guarded, not wrapped
    assert (rows[0]["gatewayReference"], excel[0]["gatewayReference"]) == ("0042", '="0042"')  # zeros kept
    # Amounts stay numbers Excel can sum; every other cell as in the default file.
    ids = ("reference", "gatewayReference", "gatewayTransactionId")
    for before, after in zip(rows, excel, strict=True):
        assert (after["amount"], after["collectedAmount"]) == ("50000", "50000")
        assert {k: v for k, v in after.items() if k not in ids} == {k: v for k, v in before.items() if k not in ids}

    # With `;` as well: Rwanda's treasurer.
    raw = await _raw(admin, f"/v1/reports/payments.csv?{OCTOBER}&excel=true&delimiter=semicolon")
    assert raw.startswith(b"\xef\xbb\xbfid;reference;")
    assert b';"=""20261005123456789012""";' in raw.split(b"\r\n")[1]
    assert [r["description"] for r in _rows(raw, ";")] == ["'=1+2", "+250788000001"]

    back = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"amount": 1000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == back["id"]).values(provider_transaction_id=LONG_ID))
    refunds = _rows(await _raw(admin, "/v1/reports/refunds.csv?excel=1"))
    assert [(r["id"], r["providerTransactionId"], r["amount"]) for r in refunds] == [
        (back["id"], f'="{LONG_ID}"', "1000")]
    assert [r["providerTransactionId"] for r in _rows(await _raw(admin, "/v1/reports/refunds.csv"))] == [LONG_ID]


async def test_export_options_are_validated_and_documented(admin: Any, client: Any, demo: dict[str, Any]) -> None:
    for path in ("/v1/reports/payments.csv?delimiter=tab", "/v1/reports/refunds.csv?delimiter=%3B",
                 "/v1/reports/payments.csv?delimiter=SEMICOLON"):
        bad = await admin.json("GET", path, 400)
        assert bad["message"] == ["delimiter must be one of: comma, semicolon"], bad
    bad = await admin.json("GET", "/v1/reports/refunds.csv?excel=yes", 400)
    assert bad["message"] == ["excel must be true or false"], bad

    doc = await (await client.get("/v1/openapi.json")).json()
    for path in ("/v1/reports/payments.csv", "/v1/reports/refunds.csv"):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"] if p["in"] == "query"}
        assert params["delimiter"]["schema"] == {"type": "string", "enum": ["comma", "semicolon"],
                                                 "default": "comma"}
        assert "decimal comma" in params["delimiter"]["description"]
        assert params["excel"]["schema"] == {"type": "boolean", "default": False}
        assert "byte-order mark" in params["excel"]["description"]
