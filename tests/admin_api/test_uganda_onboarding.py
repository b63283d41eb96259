"""A super admin onboards a Kampala savings cooperative from nothing, following the README: the cooperative (UGX,
Africa/Kampala), its payment types, its admin and an API key, 300 members from an old Excel list, members paying
by USSD through MTN MoMo and Airtel Money Uganda, and the admin's reconciliation and export."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.audit import Actor
from core.models import Member, OutboxJob, Payment
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone

CODE = "*384*123*256#"


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    return make_settings(AIRTEL_COUNTRY="UG")  # the deployment's Airtel Money account is Uganda's


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


def _excel_list() -> bytes:
    """What Excel's "CSV UTF-8" writes in a Ugandan office: a BOM, `;`, CRLF, numbers typed every way, empty rows."""
    rows = ["Name;Phone;Unit"]
    for i in range(300):
        n = f"{i:03d}"
        phone = [f"0772 {n}-456", f"256772{n}457", f"+256 772 {n} 458", f"0701-{n}-459"][i % 4]
        rows.append(f"Nakato Ssebunya {n};{phone};Plot {i}")
        if i % 50 == 0:
            rows.append(";;")
    rows[5] = "Nabukeera Zoë Akéllo;0772 001-456;Plot 1"
    return ("\ufeff" + "\r\n".join(rows) + "\r\n").encode()


async def _cooperative(operator: Caller, client: Any) -> tuple[dict[str, Any], dict[str, Any], Caller]:
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kampala Akiba Savings", "shortCode": "KAS", "country": "UG", "ussdExtension": "256"})
    types = {}
    for body in ({"name": "Monthly dues", "amount": 20000, "recurringInterval": "MONTHLY", "dueDay": 5},
                 {"name": "Share capital", "amount": 100000},
                 {"name": "Savings deposit", "amount": 1000, "allowCustomAmount": True}):
        made = await operator.json("POST", "/v1/payment-types", 201, json={**body, "cooperativeId": coop["id"]})
        types[made["name"]] = made
    await operator.json("POST", "/v1/users", 201, json={
        "username": "treasurer@kas.ug", "password": "kas-admin-password-1", "role": "COOP_ADMIN",
        "cooperativeId": coop["id"]})
    return coop, types, await bearer(client, "treasurer@kas.ug", "kas-admin-password-1")


async def test_a_kampala_cooperative_from_nothing_to_its_report(operator: Caller, client: Any, rt: Any) -> None:
    coop, types, admin = await _cooperative(operator, client)
    assert (coop["currency"], coop["timezone"], coop["language"]) == ("UGX", "Africa/Kampala", "en")
    assert [(t["amount"], t["currency"]) for t in types.values()] == [(20000, "UGX"), (100000, "UGX"), (1000, "UGX")]
    clash = await operator.json("POST", "/v1/cooperatives", 409, json={
        "name": "Kampala Other", "shortCode": "kas", "country": "UG"})
    assert (clash["field"], clash["message"]) == (
        "shortCode", "shortCode 'kas' is already used (as 'KAS': codes are the same whatever their case)")
    cents = await admin.json("POST", "/v1/payment-types", 400, json={"name": "Fee", "amount": 20000.5})
    assert (cents["field"], cents["message"]) == ("amount", ["UGX has 0 decimal places; 20000.5 has more"])

    imported = await admin.json("POST", "/v1/members/import", 201, data=_excel_list(),
                                headers={"Content-Type": "text/csv"})
    assert (imported["imported"], imported["encoding"], imported["ignoredColumns"]) == (300, "utf-8", [])
    async with rt.sessionmaker() as s:
        names = set((await s.execute(select(Member.name).where(Member.cooperative_id == coop["id"]))).scalars())
    assert len(names) == 300 and "Nabukeera Zoë Akéllo" in names
    # The same list sent again is refused naming the rows, and with existing=update changes nothing twice.
    again = await admin.json("POST", "/v1/members/import?existing=update", 201, data=_excel_list(),
                             headers={"Content-Type": "text/csv"})
    assert (again["imported"], again["updated"], again["unchanged"]) == (0, 0, 300)
    copied = _excel_list().replace(b"\r\n;;\r\n", b"\r\nCopied Twice;+256 772 000 456;Plot 0\r\n", 1)
    doubled = await admin.json("POST", "/v1/members/import", 400, data=copied, headers={"Content-Type": "text/csv"})
    assert "row 3: phone: same number as row 2" in doubled["message"], doubled

    mtn = AtPhone(client, "+256772000456", service_code=CODE)
    assert (await mtn.dial()).startswith("CON Welcome to Kampala Akiba Savings\n1. Pay\n")
    assert await mtn.send("1") == ("CON Choose what to pay:\n1. Monthly dues 20,000 UGX (due day 5)\n"
                                   "2. Savings deposit 1,000 UGX\n3. Share capital 100,000 UGX\n0. Back")
    assert "Amount: 20,000 UGX\nFee: 0 UGX\nVia MTN MoMo\n" in await mtn.send("1")
    assert (await mtn.send("1")).startswith("END Approve the prompt on your phone to pay 20,000 UGX.")
    airtel = AtPhone(client, "+256701007459", service_code=CODE)
    await airtel.dial()
    await airtel.send("1")
    assert (await airtel.send("2")).startswith("CON Enter amount in UGX")
    assert "Amount: 250,000 UGX\nFee: 0 UGX\nVia Airtel Money\n" in await airtel.send("250,000")
    await airtel.send("1")

    async with rt.sessionmaker.begin() as s:
        payments = list((await s.execute(select(Payment).where(Payment.cooperative_id == coop["id"]))).scalars())
        assert sorted((p.amount_minor, p.currency, p.method) for p in payments) == [
            (20000, "UGX", "MOBILE_MONEY_MTN"), (250000, "UGX", "MOBILE_MONEY_AIRTEL")]
        for p in payments:
            await apply_collection_outcome(s, rt, p, ProviderOutcome.SUCCEEDED, actor=Actor("provider:x", "provider"),
                                           provider_transaction_id=f"TX-{p.reference}")
    async with rt.sessionmaker() as s:
        jobs = list((await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars())
    from channels.sms.jobs import SmsJobs
    async with rt.engine.connect() as conn:
        texts = sorted([(await SmsJobs(rt)._build(conn, j.payload))[2] for j in jobs])
    assert texts[0].startswith("We received 20,000 UGX for Monthly dues, Kampala Akiba Savings."), texts
    assert texts[1].startswith("We received 250,000 UGX for Savings deposit, Kampala Akiba Savings.")

    report = await admin.json("GET", "/v1/reports/reconciliation?from=2026-01-01&to=2027-01-01", 200)
    assert report["period"]["from"] == "2025-12-31T21:00:00Z"  # Kampala's midnight
    assert report["totals"] == [{"currency": "UGX", "collectedCount": 2, "collected": 270000, "fees": 0,
                                 "refunded": 0, "net": 270000}]
    assert sorted((line["provider"], line["collected"]) for line in report["settled"]) == [
        ("airtel", 250000), ("mtn_momo", 20000)]
    export = await admin.req("GET", "/v1/reports/payments.csv?from=2026-01-01&to=2027-01-01")
    lines = (await export.text()).splitlines()
    assert len(lines) == 3 and all(",UGX,0,0," in line and line.endswith(",KAS,") for line in lines[1:]), lines


async def test_an_api_key_sent_as_a_bearer_token_is_told_where_it_goes(operator: Caller, client: Any) -> None:
    """The README shows `Authorization: Bearer $TOKEN` for every call; an API key sent so was "invalid token",
    which says nothing of the X-API-Key header the key belongs in."""
    _coop, types, admin = await _cooperative(operator, client)
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "core system", "scopes": ["payments:write"]})
    body = {"paymentTypeId": types["Share capital"]["id"], "amount": 100000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": "0772 004-456", "idempotencyKey": "kas-000001"}
    as_bearer = Caller(client, {"Authorization": f"Bearer {key['key']}"})
    refused = await as_bearer.json("POST", "/v1/payments", 401, json=body)
    assert refused["message"] == "an API key goes in the X-API-Key header, not Authorization: Bearer"
    made = await Caller(client, {"X-API-Key": key["key"]}).json("POST", "/v1/payments", 201, json=body)
    assert (made["amount"], made["currency"], made["paymentAccount"]) == (100000, "UGX", "+25677****456")


async def test_a_short_code_refused_for_its_form_says_what_it_may_be(operator: Caller) -> None:
    """"KAMPALA SACCO" was refused with "shortCode has an invalid format": she could not tell that the space was
    the problem, nor what a code may hold."""
    refused = await operator.json("POST", "/v1/cooperatives", 400, json={
        "name": "Kampala Akiba Savings", "shortCode": "KAMPALA SACCO", "country": "UG", "ussdExtension": "2#"})
    assert refused["message"] == ["shortCode must be 2 to 32 letters, digits, '-' or '_'",
                                  "ussdExtension must be 1 to 8 digits"]


async def test_a_currency_its_countrys_mobile_money_cannot_collect_is_refused(operator: Caller, client: Any) -> None:
    """A Kampala cooperative made from a Rwandan one's body kept `"currency": "RWF"`: created (201), its types priced
    in RWF, its Airtel members told "No payment method is available for your number" and its MTN payments sent in
    RWF to MTN Uganda; and a currency can never be changed afterwards."""
    refused = await operator.json("POST", "/v1/cooperatives", 400, json={
        "name": "Kampala Akiba Savings", "shortCode": "KAS", "country": "UG", "currency": "RWF"})
    assert refused["message"] == ["currency must be UGX for a cooperative in UG (its mobile money collects UGX only)"]
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kampala Two", "shortCode": "KA2", "country": "UG", "currency": "UGX"})
    assert made["currency"] == "UGX"


async def test_a_list_mixing_utf8_and_windows_1252_rows_is_refused_naming_them(operator: Caller, client: Any,
                                                                                rt: Any) -> None:
    """The list saved as CSV UTF-8, then rows pasted in from an older Windows export: the file was read whole as
    Windows-1252 (201) and every accented name of its UTF-8 rows stored as "Nabukeera ZoÃ« AkÃ©llo"."""
    _coop, _types, admin = await _cooperative(operator, client)
    data = ("name,phone\nNabukeera Zoë Akéllo,0772000456\nOkello Jane,0772000457\n".encode()
            + "Namuli Bénédicte,0772000458\n".encode("cp1252"))
    refused = await admin.json("POST", "/v1/members/import", 400, data=data, headers={"Content-Type": "text/csv"})
    assert refused["message"] == [
        "row 4: file: is not UTF-8 while row 2 is: its letters beyond A-Z would be read wrong; save the whole list "
        "again as CSV UTF-8 and import that file"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Member.id).where(Member.name.like("%Ã%")))).first() is None
    whole = await admin.json("POST", "/v1/members/import", 201, headers={"Content-Type": "text/csv"}, data=(
        "name,phone\nNabukeera Zoë Akéllo,0772000456\nNamuli Bénédicte,0772000458\n".encode("cp1252")))
    assert whole["encoding"] == "windows-1252"  # a file in Windows-1252 alone is still read so


KE_UG = ("+25471****678 is a KE number, not UG: this UG cooperative's members pay with MTN MoMo or Airtel Money from "
         "a UG number, and no bank method collects UGX; this member can never pay")


async def test_a_kenyan_number_in_a_ugandan_list_is_imported_with_a_warning(operator: Caller, client: Any,
                                                                            rt: Any) -> None:
    coop, _, admin = await _cooperative(operator, client)
    data = b"name,phone\nNakato Ssebunya,0772 000 456\nWanjiru Kamau,+254712345678\n"
    imported = await admin.json("POST", "/v1/members/import", 201, data=data, headers={"Content-Type": "text/csv"})
    assert imported["imported"] == 2
    assert imported["warnings"] == [{"row": 3, "field": "phone", "message": KE_UG}]
    async with rt.sessionmaker() as s:
        names = set((await s.execute(select(Member.name).where(Member.cooperative_id == coop["id"]))).scalars())
    assert names == {"Nakato Ssebunya", "Wanjiru Kamau"}
    # Numbers of the cooperative's country: no warning.
    more = await admin.json("POST", "/v1/members/import", 201, data=b"name,phone\nOkello Paul,0701 000 459\n",
                            headers={"Content-Type": "text/csv"})
    assert more["warnings"] == []


async def test_a_member_created_with_a_foreign_number_is_warned_about(operator: Caller, client: Any) -> None:
    _, _, admin = await _cooperative(operator, client)
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Wanjiru Kamau", "phone": "+254712345678"})
    assert made["warnings"] == [{"field": "phone", "message": KE_UG}]
    home = await admin.json("POST", "/v1/members", 201, json={"name": "Nakato Ssebunya", "phone": "0772000456"})
    assert home["warnings"] == []


async def test_a_members_number_changed_to_a_foreign_one_is_warned_about(operator: Caller, client: Any) -> None:
    """Her new SIM is Kenyan: the number is stored as on create, and the admin is told as on create how she can pay."""
    _, _, admin = await _cooperative(operator, client)
    home = await admin.json("POST", "/v1/members", 201, json={"name": "Wanjiru Kamau", "phone": "0772000456"})
    moved = await admin.json("PATCH", f"/v1/members/{home['id']}", 200, json={"phone": "+254712345678"})
    assert (moved["phone"], moved["warnings"]) == ("+25471****678", [{"field": "phone", "message": KE_UG}])
    # Back to a number of the cooperative's country, or no number changed: nothing to look at.
    back = await admin.json("PATCH", f"/v1/members/{home['id']}", 200, json={"phone": "0772000456"})
    assert (back["phone"], back["warnings"]) == ("+25677****456", [])
    renamed = await admin.json("PATCH", f"/v1/members/{home['id']}", 200, json={"name": "Wanjiru Kamau Njeri"})
    assert (renamed["name"], renamed["warnings"]) == ("Wanjiru Kamau Njeri", [])


async def test_a_foreign_member_of_a_rwandan_cooperative_can_pay_by_bank(operator: Caller, client: Any,
                                                                         demo: dict[str, Any]) -> None:
    made = await operator.json("POST", "/v1/members", 201, json={
        "name": "Wanjiru Kamau", "phone": "+254712345678", "cooperativeId": demo["cooperative_id"]})
    assert made["warnings"] == [{"field": "phone", "message": (
        "+25471****678 is a KE number, not RW: this RW cooperative's members pay with MTN MoMo or Airtel Money "
        "from a RW number; this member can pay only by bank (BANK_BK, BANK_IM, BANK_ECOBANK)")}]
