"""When the number's methods refuse only the amount (M-Pesa: whole shillings), the member is told so, not that
her number has no payment method."""

from __future__ import annotations

from typing import Any

import pytest

from channels.ussd import cache
from channels.ussd.i18n import translate
from core.models import Payment, PaymentType
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone

SAFARICOM, AIRTEL_KE = "+254712000001", "+254733123456"


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def kenyan_coop(operator: Caller, rt: Any, amount_minor: int) -> None:
    """A Kenyan cooperative whose one type costs `amount_minor` cents, stored as a type saved before the API
    refused cents did (the API now answers 400), and a Safaricom and an Airtel member."""
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Savings Group", "shortCode": "NSG", "country": "KE", "ussdExtension": "44"})
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=coop["id"], name="Monthly Contribution", amount_minor=amount_minor,
                          currency="KES", is_active=True))
    for name, phone in (("Achieng Otieno", SAFARICOM), ("Wanjiku Kamau", AIRTEL_KE)):
        await operator.json("POST", "/v1/members", 201, json={"name": name, "phone": phone,
                                                              "cooperativeId": coop["id"]})


async def pay_the_type(client: Any, phone: str) -> str:
    p = AtPhone(client, phone, service_code="*384*123*44#")
    await p.dial()
    await p.send("1")  # Pay
    return await p.send("1")  # its only type


async def test_safaricom_member_is_told_the_amount_is_the_problem(operator: Caller, client: Any, rt: Any,
                                                                  db: Any) -> None:
    """Was "No payment method is available for your number": the member calls about her number while her
    cooperative's price (1,500.50 KES) is what M-Pesa refuses."""
    await kenyan_coop(operator, rt, 150_050)
    answer = await pay_the_type(client, SAFARICOM)
    assert answer == ("END This amount (1,500.50 KES) cannot be paid by M-Pesa. "
                      "Please contact Nairobi Savings Group.")
    assert await db.count(Payment) == 0


async def test_a_type_over_mpesas_ceiling_is_the_amounts_problem(operator: Caller, client: Any, rt: Any,
                                                                   db: Any) -> None:
    """A type priced over Safaricom's KES 250,000 a transaction (saved before the API refused it): M-Pesa was
    offered, the payment made, and Daraja refused the push; the member is told the amount is the problem."""
    await kenyan_coop(operator, rt, 30_000_000)
    answer = await pay_the_type(client, SAFARICOM)
    assert answer == ("END This amount (300,000.00 KES) cannot be paid by M-Pesa. "
                      "Please contact Nairobi Savings Group.")
    assert await db.count(Payment) == 0


async def test_a_method_that_cannot_take_the_currency_is_still_the_numbers(operator: Caller, client: Any,
                                                                           rt: Any, db: Any) -> None:
    """The Airtel member: this deployment's Airtel account is Rwanda's, so no method serves her number in
    Kenya whatever the amount; that is not the amount's fault."""
    await kenyan_coop(operator, rt, 150_050)
    answer = await pay_the_type(client, AIRTEL_KE)
    assert answer == ("END No payment method is available for your number. "
                      "Please contact Nairobi Savings Group.")
    assert await db.count(Payment) == 0


async def test_whole_shillings_go_on_to_the_confirmation(operator: Caller, client: Any, rt: Any) -> None:
    await kenyan_coop(operator, rt, 150_000)
    answer = await pay_the_type(client, SAFARICOM)
    assert answer.startswith("CON Pay Monthly Contribution\nAmount: 1,500.00 KES"), answer
    assert "Via M-Pesa" in answer


@pytest.mark.parametrize("lang", ["en", "fr", "rw", "sw"])
def test_every_language_names_the_amount_and_the_method(lang: str) -> None:
    text = translate(lang, "pay.amount_no_method", amount="1,500.50 KES", method="M-Pesa", coop="NSG")
    assert "1,500.50 KES" in text and "M-Pesa" in text and "NSG" in text


async def test_a_fixed_price_over_the_ussd_cap_is_not_offered_for_a_pin_prompt(operator: Caller, client: Any, rt: Any,
                                                                                db: Any, demo: dict[str, Any]) -> None:
    """A type priced 6,000,000 RWF (the API takes it: a bank can collect it) over the 5,000,000 a USSD payment may
    be, which a typed amount is refused past: it was confirmed, sent to MTN, and failed by the wallet's limit after
    her PIN. She is told the amount is the problem before anything is made."""
    rent = f"/v1/payment-types/{demo['payment_types']['Monthly Rent']}"
    await operator.json("PATCH", rent, 200, json={"amount": 6_000_000})
    p = AtPhone(client, "+250788000002")  # Jean Bosco, English, MTN
    await p.dial()
    assert "Monthly Rent 6,000,000 RWF" in await p.send("1")
    answer = await p.send("1")
    assert answer == ("END This amount (6,000,000 RWF) cannot be paid by MTN MoMo. Please contact Kigali Heights "
                      "Housing Cooperative.")
    assert await db.count(Payment) == 0
    # The cap itself is still payable.
    await operator.json("PATCH", rent, 200, json={"amount": 5_000_000})
    cache.of(rt).types.clear()  # what its TTL_SECONDS (5 s) does before she dials again
    p = AtPhone(client, "+250788000002")
    await p.dial()
    await p.send("1")
    assert (await p.send("1")).startswith("CON Pay Monthly Rent\nAmount: 5,000,000 RWF")
