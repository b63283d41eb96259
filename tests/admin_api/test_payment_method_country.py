"""A payment's wallet method against its cooperative's country (core.payments.wallets_by_operator): POST
/v1/payments and POST /v1/payments/recorded refuse a wallet the country's members do not pay with, as USSD never
offers it (channels.ussd.flows.methods_for)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core import auth
from core.db import iso_z, utcnow
from core.models import Cooperative, Payment, PaymentType
from tests.admin_api.conftest import Caller, bearer, idem


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    # MTN's sandbox without a currency collects any: its account's currency does not refuse the method first.
    return make_settings(MTN_MOMO_TARGET_ENVIRONMENT="sandbox", MTN_MOMO_CURRENCY="")


async def country_admin(superadmin: Caller, rt: Any, client: Any, country: str, code: str, price: str,
                        **coop: Any) -> tuple[Caller, str]:
    made = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": f"{country} Coop", "shortCode": code, "country": country, **coop})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": price, "cooperativeId": made["id"], "allowCustomAmount": True})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username=f"admin@{code}.test", password="country-admin-pw", role="COOP_ADMIN",
                               cooperative_id=made["id"])
    return await bearer(client, f"admin@{code}.test", "country-admin-pw"), ptype["id"]


async def payments(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(Payment))).scalar_one())


async def asked(admin: Caller, ptype: str, status: int, method: str, account: str, amount: Any) -> Any:
    return await admin.json("POST", "/v1/payments", status, json={
        "paymentTypeId": ptype, "amount": amount, "paymentMethod": method, "paymentAccount": account,
        "idempotencyKey": idem()})


async def test_mtn_for_a_tanzanian_cooperative_is_refused_by_its_countrys_wallets(superadmin: Caller, rt: Any,
                                                                                  client: Any) -> None:
    """Tanzania has no MTN: the desk is told which wallet its members pay with, not that an Airtel number is no MTN
    number (as if another number would do)."""
    admin, ptype = await country_admin(superadmin, rt, client, "TZ", "DAR", "5000")
    body = await asked(admin, ptype, 400, "MOBILE_MONEY_MTN", "0681234567", 5000)
    assert body["message"] == ["paymentMethod MOBILE_MONEY_MTN is not one a TZ cooperative's members pay with: "
                               "MOBILE_MONEY_AIRTEL (Airtel Money), or a bank method"]
    assert await payments(rt) == 0


async def test_mtn_for_a_kenyan_cooperative_is_refused_by_its_countrys_wallets(superadmin: Caller, rt: Any,
                                                                               client: Any) -> None:
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    body = await asked(admin, ptype, 400, "MOBILE_MONEY_MTN", "0712345678", "1500.00")
    assert body["message"] == ["paymentMethod MOBILE_MONEY_MTN is not one a KE cooperative's members pay with: "
                               "MPESA (M-Pesa), MOBILE_MONEY_AIRTEL (Airtel Money), or a bank method"]
    assert await payments(rt) == 0


async def test_airtel_money_for_a_ghanaian_cooperative_is_refused_by_its_countrys_wallets(
        superadmin: Caller, rt: Any, client: Any) -> None:
    """Ghana has no Airtel Money: Airtel's Ghanaian network became AirtelTigo, now AT, whose wallet is not Airtel's
    Open API. The desk of a Kumasi susu group was told its members pay with "MOBILE_MONEY_AIRTEL (Airtel Money)",
    and an AT number was refused only because Airtel's account collects another currency."""
    admin, ptype = await country_admin(superadmin, rt, client, "GH", "KSI", "50.00")
    for account in ("0561234567", "0244123456"):  # an AT number, an MTN one
        body = await asked(admin, ptype, 400, "MOBILE_MONEY_AIRTEL", account, "50.00")
        assert body["message"] == ["paymentMethod MOBILE_MONEY_AIRTEL is not one a GH cooperative's members pay "
                                   "with: MOBILE_MONEY_MTN (MTN MoMo), or a bank method"]
    body = await asked(admin, ptype, 400, "MPESA", "0244123456", "50.00")
    assert body["message"] == ["paymentMethod MPESA is not one a GH cooperative's members pay with: "
                               "MOBILE_MONEY_MTN (MTN MoMo), or a bank method"]
    assert await payments(rt) == 0
    made = await asked(admin, ptype, 201, "MOBILE_MONEY_MTN", "024 412 3456", "50.00")
    assert (made["paymentMethod"], made["amount"], made["currency"]) == ("MOBILE_MONEY_MTN", "50.00", "GHS")


async def test_mpesa_from_a_range_nobody_names_is_refused_outside_kenya(superadmin: Caller, rt: Any,
                                                                        client: Any) -> None:
    """Zambia's 0790 range has no operator in the carrier data, so the number check lets it through; a Zambian
    cooperative kept in shillings then had M-Pesa (Safaricom's Daraja) sent a Zambian number."""
    admin, ptype = await country_admin(superadmin, rt, client, "ZM", "LUN", "1500.00")
    async with rt.sessionmaker.begin() as s:  # made before a cooperative's currency was held to its country's
        await s.execute(update(Cooperative).where(Cooperative.short_code == "LUN").values(currency="KES"))
        await s.execute(update(PaymentType).where(PaymentType.id == ptype).values(currency="KES"))
    body = await asked(admin, ptype, 400, "MPESA", "+260790123456", "1500.00")
    assert body["message"] == ["paymentMethod MPESA is not one a ZM cooperative's members pay with: "
                               "MOBILE_MONEY_MTN (MTN MoMo), MOBILE_MONEY_AIRTEL (Airtel Money), or a bank method"]
    assert await payments(rt) == 0


async def test_the_countrys_own_wallet_is_still_taken(superadmin: Caller, rt: Any, client: Any) -> None:
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    made = await asked(admin, ptype, 201, "MPESA", "0712345678", "1500.00")
    assert made["paymentMethod"] == "MPESA"
    assert await payments(rt) == 1


async def test_a_recording_of_a_wallet_its_country_has_none_of_is_refused(superadmin: Caller, rt: Any,
                                                                          client: Any) -> None:
    """No statement of the deployment's MTN account shows money taken from a Tanzanian cooperative's member: the
    recording names the wrong method (Airtel's line picked as MTN's), and the payment would be counted as MTN's."""
    admin, ptype = await country_admin(superadmin, rt, client, "TZ", "DAR", "5000")
    body = await admin.json("POST", "/v1/payments/recorded", 400, json={
        "paymentTypeId": ptype, "amount": 5000, "paymentMethod": "MOBILE_MONEY_MTN", "paymentAccount": "0681234567",
        "providerTransactionId": "MTN-STMT-1", "completedAt": iso_z(utcnow() - timedelta(hours=3)),
        "note": "statement line 4", "idempotencyKey": idem()})
    assert body["message"] == ["paymentMethod MOBILE_MONEY_MTN is not one a TZ cooperative's members pay with: "
                               "MOBILE_MONEY_AIRTEL (Airtel Money), or a bank method"]
    assert await payments(rt) == 0
