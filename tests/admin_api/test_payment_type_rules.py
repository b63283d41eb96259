"""Payment types that could be saved but never worked: an amount no method of the country can collect, a
recurring type nobody is reminded of; and what the OpenAPI document says amounts look like."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import func, select

from core.config import ProviderConfig, Secret
from core.models import PaymentType
from core.money import Money
from core.reminders import due_dates
from providers.airtel.adapter import AirtelAdapter
from providers.mpesa.adapter import MpesaAdapter
from tests.admin_api.conftest import Caller

CENTS = "no payment method can collect 1,500.50 KES: M-Pesa takes whole shillings; 1,500.50 KES has cents"


async def kenyan_coop(superadmin: Caller) -> str:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Savings Group", "shortCode": "NSG", "country": "KE", "ussdExtension": "44"})
    return str(made["id"])


async def stored(rt: Any, coop_id: str) -> dict[str, PaymentType]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(PaymentType).where(PaymentType.cooperative_id == coop_id))).scalars()
        return {pt.name: pt for pt in rows}


async def test_kes_amount_with_cents_is_refused_on_create_and_on_change(superadmin: Caller, rt: Any,
                                                                        demo: Any) -> None:
    """M-Pesa takes whole shillings and this deployment's Airtel account is Rwanda's: a 1,500.50 KES type was
    saved (201) and every Safaricom member was then told their number had no payment method."""
    coop = await kenyan_coop(superadmin)
    refused = await superadmin.json("POST", "/v1/payment-types", 400, json={
        "name": "Monthly Contribution", "amount": "1500.50", "cooperativeId": coop})
    assert refused["message"] == [CENTS]
    assert await stored(rt, coop) == {}

    made = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Monthly Contribution", "amount": "1500.00", "cooperativeId": coop})
    changed = await superadmin.json("PATCH", f"/v1/payment-types/{made['id']}", 400, json={"amount": "1500.50"})
    assert changed["message"] == [CENTS]
    assert stored_amount(await stored(rt, coop)) == 150_000
    await superadmin.json("PATCH", f"/v1/payment-types/{made['id']}", 200, json={"amount": 1600})
    assert stored_amount(await stored(rt, coop)) == 160_000


async def test_kes_amount_over_mpesas_ceiling_is_refused(superadmin: Caller, rt: Any, demo: Any) -> None:
    """A SACCO's 300,000 KES loan instalment: no method here takes it in one transaction (M-Pesa's ceiling is
    KES 250,000), so every Safaricom member would have been told the amount cannot be paid."""
    coop = await kenyan_coop(superadmin)
    refused = await superadmin.json("POST", "/v1/payment-types", 400, json={
        "name": "Loan Instalment", "amount": 300000, "cooperativeId": coop})
    assert refused["message"] == ["no payment method can collect 300,000.00 KES: M-Pesa takes at most "
                                  "250,000.00 KES in one transaction; 300,000.00 KES is more"]
    assert await stored(rt, coop) == {}
    await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Loan Instalment", "amount": 250000, "cooperativeId": coop})
    assert (await stored(rt, coop))["Loan Instalment"].amount_minor == 25_000_000


def stored_amount(types: dict[str, PaymentType]) -> int:
    return types["Monthly Contribution"].amount_minor


async def test_a_currency_no_provider_here_collects_is_not_the_types_fault(superadmin: Caller, rt: Any,
                                                                           demo: Any) -> None:
    """A Ghanaian cooperative on this deployment (its MTN and Airtel accounts collect other currencies): no
    amount rule refuses 150.50 GHS, so the type is saved; a payment asked for says what is missing."""
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Accra Traders", "shortCode": "ACC", "country": "GH"})
    await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": "150.50", "cooperativeId": coop["id"]})
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(PaymentType).where(
            PaymentType.cooperative_id == coop["id"]))).scalar_one() == 1


def test_refused_only_when_no_method_of_the_country_can_collect() -> None:
    """A Kenyan Airtel account, which takes cents, is a way to pay 1,500.50 KES: refused only when none is; an
    MTN account (any currency) does not count for Kenya, where members have no MTN wallet."""
    from core.payment_types import uncollectable

    http = httpx.AsyncClient()

    def adapter(kind: type, country: str, currency: str) -> Any:
        return kind(http, ProviderConfig(base_url="https://provider.test",
                                         options={"country": country, "currency": currency},
                                         credentials={"callback_key": Secret("k")}))

    routes = {"MPESA": "mpesa", "MOBILE_MONEY_AIRTEL": "airtel", "MOBILE_MONEY_MTN": "mtn"}
    anywhere = SimpleNamespace(currencies=None)  # MTN's sandbox: any currency, no amount rule
    kenya = SimpleNamespace(routes=routes, providers={
        "mpesa": adapter(MpesaAdapter, "KE", "KES"), "airtel": adapter(AirtelAdapter, "KE", "KES"),
        "mtn": anywhere})
    rwanda_airtel = SimpleNamespace(routes=routes, providers={
        "mpesa": adapter(MpesaAdapter, "KE", "KES"), "airtel": adapter(AirtelAdapter, "RW", "RWF"),
        "mtn": anywhere})
    assert uncollectable(kenya, "KE", Money(150_050, "KES")) is None  # Airtel Kenya takes it
    assert uncollectable(rwanda_airtel, "KE", Money(150_050, "KES")) == CENTS
    assert uncollectable(rwanda_airtel, "KE", Money(150_000, "KES")) is None
    assert uncollectable(rwanda_airtel, "KE", Money(0, "KES")) is None  # a free type: the payer names it


async def test_an_interval_or_due_day_makes_the_type_recurring(admin: Caller, rt: Any, demo: Any) -> None:
    """{"recurringInterval": "MONTHLY", "dueDay": 5} without isRecurring was saved as a one-off type: USSD
    showed "(due day 5)" and no reminder was ever planned."""
    made = await admin.json("POST", "/v1/payment-types", 201, json={
        "name": "Security Levy", "amount": 1500, "recurringInterval": "MONTHLY", "dueDay": 5})
    assert (made["isRecurring"], made["recurringInterval"], made["dueDay"]) == (True, "MONTHLY", 5)
    row = (await stored(rt, demo["cooperative_id"]))["Security Levy"]
    kigali = ZoneInfo("Africa/Kigali")
    assert due_dates(row, date(2026, 12, 2), kigali) == (date(2026, 11, 5), date(2026, 12, 5))
    one_off = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Entry Fee", "amount": 2000})
    assert (one_off["isRecurring"], one_off["recurringInterval"], one_off["dueDay"]) == (False, None, None)


async def test_a_recurring_type_needs_its_due_day_and_a_one_off_type_has_none(admin: Caller, rt: Any,
                                                                              demo: Any) -> None:
    no_day = await admin.json("POST", "/v1/payment-types", 400, json={
        "name": "Welfare", "amount": 200, "isRecurring": True, "recurringInterval": "MONTHLY"})
    assert no_day["message"] == ["dueDay is required when isRecurring is true: reminders go out before it"]
    contradiction = await admin.json("POST", "/v1/payment-types", 400, json={
        "name": "Welfare", "amount": 200, "isRecurring": False, "recurringInterval": "MONTHLY", "dueDay": 5})
    assert contradiction["message"] == [
        "isRecurring is false, so recurringInterval and dueDay must be null (or left out)"]
    assert "Welfare" not in await stored(rt, demo["cooperative_id"])


async def test_changes_keep_the_recurrence_whole(admin: Caller, rt: Any, demo: Any) -> None:
    """A patch is checked as the type will be: removing the due day of a recurring type is refused, turning it
    into a one-off type clears its interval and due day, and giving a one-off type both makes it recurring."""
    rent = demo["payment_types"]["Monthly Rent"]  # MONTHLY, due day 1
    refused = await admin.json("PATCH", f"/v1/payment-types/{rent}", 400, json={"dueDay": None})
    assert refused["message"] == ["dueDay is required when isRecurring is true: reminders go out before it"]
    both = await admin.json("PATCH", f"/v1/payment-types/{rent}", 400, json={
        "isRecurring": False, "dueDay": 3})
    assert both["message"] == ["isRecurring is false, so recurringInterval and dueDay must be null (or left out)"]

    one_off = await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={"isRecurring": False})
    assert (one_off["isRecurring"], one_off["recurringInterval"], one_off["dueDay"]) == (False, None, None)
    again = await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={
        "recurringInterval": "QUARTERLY", "dueDay": 15})
    assert (again["isRecurring"], again["recurringInterval"], again["dueDay"]) == (True, "QUARTERLY", 15)
    async with rt.sessionmaker() as s:
        row = await s.get(PaymentType, rent)
    assert row is not None and (row.is_recurring, row.recurring_interval, row.due_day) == (True, "QUARTERLY", 15)


async def test_a_type_saved_before_the_rules_can_still_be_renamed_and_retired(admin: Caller, rt: Any,
                                                                              demo: Any) -> None:
    """Rows saved before these rules (a due day on a one-off type): a patch that leaves the recurrence alone
    is not refused for it, so the cooperative can still rename or deactivate the type."""
    async with rt.sessionmaker.begin() as s:
        old = PaymentType(cooperative_id=demo["cooperative_id"], name="Old Levy", amount_minor=1000,
                          currency="RWF", is_recurring=False, recurring_interval="MONTHLY", due_day=5)
        s.add(old)
    await admin.json("PATCH", f"/v1/payment-types/{old.id}", 200, json={"name": "Older Levy"})
    gone = await admin.json("DELETE", f"/v1/payment-types/{old.id}", 200)
    assert gone["isActive"] is False


def test_openapi_says_how_amounts_of_each_currency_look() -> None:
    """It said "Amounts are in major units (RWF integers)"; a Kenyan cooperative's come back as "1500.00"."""
    from admin_api import all_routes
    from admin_api.openapi import build_document

    document = build_document(all_routes())
    text = document["info"]["description"]
    assert "RWF integers" not in text
    assert "an integer for a currency without minor units (RWF, UGX: 50000" in text
    assert '(KES: "1500.00" is 1,500 shillings)' in text
    create = document["paths"]["/v1/payment-types"]["post"]["requestBody"]["content"]["application/json"]
    amount = create["schema"]["properties"]["amount"]
    assert amount["examples"] == [50000, "1500.00"] and "50000 RWF" not in amount["description"]
    assert '"1500.00" KES' in amount["description"]
    shown = document["paths"]["/v1/payment-types/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert shown["schema"]["properties"]["amount"]["examples"] == [50000, "1500.00"]
