"""Which mobile-money method a member is offered outside Rwanda's usual case, and the END when none can work."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from channels.ussd.flows import methods_for
from core.config import ProviderConfig, Secret
from core.models import Payment
from core.money import Money
from core.phone import normalize
from providers.airtel.adapter import AirtelAdapter
from providers.mpesa.adapter import MpesaAdapter
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone

ROUTED = {"MPESA", "MOBILE_MONEY_AIRTEL", "MOBILE_MONEY_MTN"}
NO_METHOD = "END No payment method is available for your number."


@pytest.mark.parametrize(("country", "number", "expected"), [
    ("KE", "0113345678", ["MPESA"]),  # Safaricom 0113: was unknown, so Airtel was offered too
    ("KE", "0762345678", ["MOBILE_MONEY_AIRTEL"]),
    ("KE", "0771234567", []),  # Telkom Kenya: no method collects from it
    ("GH", "0201234567", []),  # Telecel Ghana
    ("GH", "0271234567", []),  # AT Ghana is not Airtel
    ("GH", "0531234567", ["MOBILE_MONEY_MTN"]),
])
def test_methods_follow_the_numbers_operator(country: str, number: str, expected: list[str]) -> None:
    phone = normalize(number, country)
    assert methods_for(country, phone.operator, ROUTED, number_country=phone.region) == expected


def test_a_number_of_another_country_gets_no_method() -> None:
    phone = normalize("+250788765432")
    assert methods_for("UG", phone.operator, ROUTED, number_country=phone.region) == []
    assert methods_for("RW", phone.operator, ROUTED, number_country=phone.region) == ["MOBILE_MONEY_MTN"]


def test_only_methods_whose_provider_can_collect_the_amount() -> None:
    config = ProviderConfig(base_url="https://provider.test", options={"country": "RW", "currency": "RWF"},
                            credentials={"callback_key": Secret("k")})
    http = httpx.AsyncClient()
    providers = {"airtel": AirtelAdapter(http, config), "mpesa": MpesaAdapter(http, config)}
    routes = {"MOBILE_MONEY_AIRTEL": "airtel", "MPESA": "mpesa"}
    airtel = normalize("0733123456", "KE")
    assert methods_for("KE", airtel.operator, routes, number_country="KE", amount=Money(150000, "KES"),
                       providers=providers) == []  # the Airtel account is Rwanda's
    safaricom = normalize("0712345678", "KE")
    assert methods_for("KE", safaricom.operator, routes, number_country="KE", amount=Money(150000, "KES"),
                       providers=providers) == ["MPESA"]
    assert methods_for("KE", safaricom.operator, routes, number_country="KE", amount=Money(150050, "KES"),
                       providers=providers) == []  # cents: M-Pesa takes whole shillings


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def coop(operator: Caller, country: str, code: str, ext: str, price: str, phone: str) -> None:
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": f"{code} Housing", "shortCode": code, "country": country, "ussdExtension": ext})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": price, "cooperativeId": made["id"]})
    await operator.json("POST", "/v1/members", 201, json={"name": "Member One", "phone": phone,
                                                          "cooperativeId": made["id"]})


async def walk(client: Any, phone: str, ext: str) -> list[str]:
    """Dial the cooperative's code, pick "Pay" and its only type, and Confirm if asked."""
    p = AtPhone(client, phone, service_code=f"*384*123*{ext}#")
    screens = [await p.dial()]
    for key in ("1", "1", "1", "1"):
        screens.append(await p.send(key))
        if screens[-1].startswith("END"):
            break
    return screens


async def no_payment(rt: Any) -> None:
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 0


async def test_ghana_telecel_member_is_told_no_method(operator: Caller, client: Any, rt: Any) -> None:
    """Was offered "MTN MoMo / Airtel Money" (Ghana has no Airtel Money), and Confirm ended in an error."""
    await coop(operator, "GH", "ACC", "7", "150.00", "0201234567")
    screens = await walk(client, "+233201234567", "7")
    assert not any("Airtel" in s for s in screens), screens
    assert screens[-1].startswith(NO_METHOD), screens
    await no_payment(rt)


async def test_foreign_number_member_is_told_no_method(operator: Caller, client: Any, rt: Any) -> None:
    """A Ugandan cooperative's member registered with her Rwandan MTN number: was sent a UGX MTN request."""
    await coop(operator, "UG", "KLA", "8", "20000", "+250788765432")
    screens = await walk(client, "+250788765432", "8")
    assert screens[-1].startswith(NO_METHOD), screens
    await no_payment(rt)
