"""Cooperatives outside Rwanda: what a payment may be asked for, and the defaults a new cooperative gets."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from core import auth
from core.models import Payment
from tests.admin_api.conftest import Caller, bearer, idem


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    # A Rwandan deployment as the README shows it: MTN Rwanda; Airtel's account is Rwanda's (the default).
    return make_settings(MTN_MOMO_TARGET_ENVIRONMENT="mtnrwanda")


async def country_admin(superadmin: Caller, rt: Any, client: Any, country: str, code: str,
                        price: str) -> tuple[Caller, str]:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": f"{country} Coop", "shortCode": code, "country": country})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": price, "cooperativeId": coop["id"], "allowCustomAmount": True})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username=f"admin@{code}.test", password="country-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    return await bearer(client, f"admin@{code}.test", "country-admin-pw"), ptype["id"]


async def refused(admin: Caller, ptype: str, amount: Any, method: str, account: str) -> dict[str, Any]:
    return await admin.json("POST", "/v1/payments", 400, json={
        "paymentTypeId": ptype, "amount": amount, "paymentMethod": method, "paymentAccount": account,
        "idempotencyKey": idem()})


async def no_payment(rt: Any) -> None:
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 0


async def test_airtel_account_of_another_currency_is_refused_when_asked(superadmin: Caller, rt: Any,
                                                                       client: Any) -> None:
    """The Rwandan Airtel account (RWF) cannot collect a Ugandan cooperative's UGX: a 400, not a 201 that the
    worker sends to the wrong account."""
    admin, ptype = await country_admin(superadmin, rt, client, "UG", "KLA", "20000")
    body = await refused(admin, ptype, 20000, "MOBILE_MONEY_AIRTEL", "0701234567")
    assert body["message"] == ["MOBILE_MONEY_AIRTEL collects RWF only; this payment is in UGX"]
    assert body["code"] == "PROVIDER_REFUSED"
    await no_payment(rt)


async def test_mtn_market_of_another_currency_is_refused_when_asked(superadmin: Caller, rt: Any,
                                                                   client: Any) -> None:
    admin, ptype = await country_admin(superadmin, rt, client, "GH", "ACC", "150.00")
    body = await refused(admin, ptype, "150.00", "MOBILE_MONEY_MTN", "0244123456")
    assert body["message"] == ["MOBILE_MONEY_MTN collects RWF only; this payment is in GHS"]
    await no_payment(rt)


async def test_kes_with_cents_by_mpesa_is_refused_when_asked(superadmin: Caller, rt: Any, client: Any) -> None:
    """M-Pesa takes whole shillings: '1500.50' is a 400 at once, not a failure (and an SMS) from the worker. (The
    type's own price is whole: a type priced with cents is refused when made, test_payment_type_rules.)"""
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    body = await refused(admin, ptype, "1500.50", "MPESA", "0712345678")
    assert body["message"] == ["M-Pesa takes whole shillings; 1,500.50 KES has cents"]
    assert body["code"] == "PROVIDER_REFUSED"
    await admin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype, "amount": "1500.00", "paymentMethod": "MPESA", "paymentAccount": "0712345678",
        "idempotencyKey": idem()})


async def test_kes_over_mpesas_ceiling_is_refused_when_asked(superadmin: Caller, rt: Any, client: Any) -> None:
    """Safaricom takes at most KES 250,000 in one transaction: 250,001 was a 201 that Daraja then refused, the
    member told by SMS that her payment failed. A 400 at once; the ceiling itself is taken."""
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    body = await refused(admin, ptype, 250001, "MPESA", "0712345678")
    assert body["message"] == ["M-Pesa takes at most 250,000.00 KES in one transaction; 250,001.00 KES is more"]
    await no_payment(rt)
    made = await admin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype, "amount": "250000.00", "paymentMethod": "MPESA", "paymentAccount": "0712345678",
        "idempotencyKey": idem()})
    assert made["amount"] == "250000.00"


async def test_a_wallet_of_another_country_is_refused(superadmin: Caller, rt: Any, client: Any,
                                                      admin: Caller, demo: dict[str, Any]) -> None:
    """A Rwandan cooperative (MTN Rwanda) asked to collect from a Ugandan MTN number: no MTN market can."""
    ptype = demo["payment_types"]["Monthly Rent"]
    body = await refused(admin, ptype, 15000, "MOBILE_MONEY_MTN", "+256772123456")
    assert body["message"] == ["paymentAccount is a UG number; this cooperative collects mobile money from RW "
                               "numbers only"]
    await no_payment(rt)


async def test_a_number_of_another_operator_is_refused(superadmin: Caller, rt: Any, client: Any) -> None:
    """Airtel Kenya's 0762 range (as Safaricom's 0112-0115) was unknown to core.phone's table: an M-Pesa payment
    from it was sent to Safaricom blindly. (Airtel is Rwanda's here, so KES by Airtel is refused for its currency.)"""
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    body = await refused(admin, ptype, "1500.00", "MPESA", "0762345678")
    assert body["message"] == ["paymentAccount +25476****678 is an Airtel number; M-Pesa needs a Safaricom number"]
    await no_payment(rt)


async def test_a_number_of_another_operator_is_refused_in_words_a_person_reads(admin: Caller, rt: Any,
                                                                              demo: dict[str, Any]) -> None:
    """Read by the desk: the operators and methods by the names on the member's phone, with their articles ("is a
    AIRTEL number; MPESA needs an SAFARICOM number" was the codes pasted in)."""
    body = await refused(admin, demo["payment_types"]["Monthly Rent"], 15000, "MOBILE_MONEY_MTN", "0731234567")
    assert body["message"] == ["paymentAccount +25073****567 is an Airtel number; MTN MoMo needs an MTN number"]
    await no_payment(rt)


@pytest.mark.parametrize(("account", "words"), [("0747123456", "a JTL number"),
                                                ("0744123456", "a Homeland Media number")])
async def test_another_operator_is_named_as_it_is_written(superadmin: Caller, rt: Any, client: Any, account: str,
                                                         words: str) -> None:
    """Kenya's smaller operators by their own spelling: not "a Jtl" nor "a Homeland_Media" (their codes title-cased)."""
    admin, ptype = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    body = await refused(admin, ptype, "1500.00", "MPESA", account)
    assert body["message"] == [f"paymentAccount +25474****456 is {words}; M-Pesa needs a Safaricom number"]
    await no_payment(rt)


def test_an_operator_said_by_its_letters_takes_their_article() -> None:
    """UTL, Uganda's (you-tee-el): "a UTL number", as "an MTN number" (em-tee-en)."""
    from core.payments import _normalise_account

    _, refused_ = _normalise_account("MOBILE_MONEY_MTN", "0712345678", "UG")
    assert refused_ is not None
    assert refused_.message == "paymentAccount +25671****678 is a UTL number; MTN MoMo needs an MTN number"


@pytest.mark.parametrize(("country", "zone"), [
    ("GH", "Africa/Accra"), ("KE", "Africa/Nairobi"), ("UG", "Africa/Kampala"), ("RW", "Africa/Kigali"),
])
async def test_a_cooperative_gets_its_countrys_time_zone(superadmin: Caller, country: str, zone: str) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Somewhere Coop", "shortCode": f"Z{country}", "country": country})
    assert coop["timezone"] == zone


async def test_a_named_time_zone_is_kept(superadmin: Caller) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Somewhere Coop", "shortCode": "ZGH", "country": "GH", "timezone": "UTC"})
    assert coop["timezone"] == "UTC"


async def test_a_request_accepted_before_the_rules_changed_still_finds_its_payment(
        admin: Caller, rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An integrator's retry of an accepted POST /v1/payments answers with its payment even when the provider's
    account or the number rules would refuse it now (a new release, MTN's account moved to another currency, the
    cooperative's country corrected): a 400 would read as "not created" while the payment goes on."""
    body = {"paymentTypeId": demo["payment_types"]["Water"], "amount": 5000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": "+250788000001", "idempotencyKey": idem()}
    made = await admin.json("POST", "/v1/payments", 201, json=body)
    monkeypatch.setattr(rt.provider_for("MOBILE_MONEY_MTN"), "currencies", frozenset({"UGX"}))
    assert (await admin.json("POST", "/v1/payments", 201, json=body))["id"] == made["id"]
    await admin.json("POST", "/v1/payments", 400, json={**body, "idempotencyKey": idem()})  # a new one is refused
    monkeypatch.undo()
    from core.models import Cooperative

    async with rt.sessionmaker.begin() as s:
        await s.execute(Cooperative.__table__.update().values(country="UG"))
    assert (await admin.json("POST", "/v1/payments", 201, json=body))["id"] == made["id"]
    answer = await admin.json("POST", "/v1/payments", 400, json={**body, "idempotencyKey": idem()})
    assert "UG numbers only" in str(answer["message"])
