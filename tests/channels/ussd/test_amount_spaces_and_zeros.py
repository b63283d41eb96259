"""Amounts as a keypad types them, through each aggregator's endpoint: thousands grouped by spaces, as French (and
Rwanda's franc) writes them ("20 000", with a plain, a no-break or a narrow no-break space), and a run of zeros
before the amount (a member holding the 0 key). "20 000" was "Enter a whole amount in RWF", and three hundred zeros
before 5000 were "Amount too high"; each time she had typed the amount she meant."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Payment, PaymentType
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_amount_with_cents import AKOSUA, KWAME, ghana_coop, to_the_amount
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL
from tests.channels.ussd.test_hubtel_nalo_flows import HubtelPhone, nalo

NBSP, NNBSP = "\u00a0", "\u202f"
HELD_ZERO = "0" * 300
# Hubtel and Nalo take a message of 200 characters at most (a USSD string is 182): still past Money.parse's 64.
HELD_ZERO_SHORT = "0" * 150


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def _donation(rt: Any, demo: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=10_000,
                          currency="RWF", is_active=True, allow_custom_amount=True))


async def _at_the_amount(client: Any, msisdn: str, prompt: str) -> AtPhone:
    phone = AtPhone(client, msisdn)
    await phone.dial()
    await phone.send("1")  # Pay
    answer = await phone.send("1")  # Donation (first by name)
    assert answer.startswith(f"CON {prompt}"), answer
    return phone


@pytest.mark.parametrize(("msisdn", "prompt", "invalid", "shown", "typed"), [
    (EN_MTN, "Enter amount in RWF", "Enter a whole amount in RWF, e.g. 5000:", "20,000 RWF", "20 000"),
    (EN_MTN, "Enter amount in RWF", "Enter a whole amount in RWF, e.g. 5000:", "20,000 RWF", f"20{NBSP}000#"),
    (FR_AIRTEL, "Entrez le montant en RWF", "Entrez un montant entier en RWF, ex. 5000 :", "20 000 RWF",
     f"20{NNBSP}000"),
    (FR_AIRTEL, "Entrez le montant en RWF", "Entrez un montant entier en RWF, ex. 5000 :", "20 000 RWF",
     "\u3000\uff12\uff10\u3000\uff10\uff10\uff10"),  # full-width digits and spaces, a CJK keyboard's
])
async def test_rwandan_francs_grouped_by_spaces_are_paid_on_africastalking(
        msisdn: str, prompt: str, invalid: str, shown: str, typed: str, client: Any, demo: Any, db: Any,
        rt: Any) -> None:
    await _donation(rt, demo)
    phone = await _at_the_amount(client, msisdn, prompt)
    # A space that groups no three digits is no grouping; nor is one after a first group of zeros (as "0,500").
    for bad in ("2 0000", "20 00", f"20{NBSP}0000", "2 000 00", "0 500", "20 000,50", "20 000.5", "20  000"):
        assert (await phone.send(bad)).startswith(f"CON {invalid}"), bad
    confirm = await phone.send(typed)
    assert shown in confirm, confirm
    assert (await phone.send("1")).startswith("END "), "confirmed"
    assert (await db.one(Payment)).amount_minor == 20_000


async def test_zeros_held_before_an_amount_are_no_amount_too_high(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Three hundred zeros, then 5000: the payment is 5,000 RWF. Money.parse bounds an amount's text, and read
    whole it was "Amount too high. The maximum is 5,000,000 RWF" for five thousand francs. Zeros alone stay no
    amount, and an amount really too large is still told so."""
    await _donation(rt, demo)
    phone = await _at_the_amount(client, EN_MTN, "Enter amount in RWF")
    assert (await phone.send(HELD_ZERO)).startswith("CON Enter a whole amount in RWF, e.g. 5000:")
    assert (await phone.send("9" * 70)).startswith("CON Amount too high. The maximum is 5,000,000 RWF:")
    assert (await phone.send(HELD_ZERO + "5000001")).startswith("CON Amount too high.")
    confirm = await phone.send(HELD_ZERO + "5000")
    assert "Amount: 5,000 RWF" in confirm, confirm
    assert "pay 5,000 RWF" in await phone.send("1")
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency) == (5_000, "RWF")


async def test_cedis_grouped_by_spaces_and_held_zeros_on_hubtel(operator: Caller, client: Any, db: Any) -> None:
    """English, a currency with cents: "1 200.50" with a no-break space is GHS 1,200.50; a French decimal comma
    after it is no decimal mark in English ("1 234,50" asked again, as "1234,50" is)."""
    await ghana_coop(operator)
    phone = HubtelPhone(client, "233" + KWAME[1:], "hubtel-spaces-1")
    await phone.post("Initiation", "*384*123*7#")
    await phone.post("Response", "1")  # Pay
    assert (await phone.post("Response", "1"))["Message"].startswith("Enter amount in GHS")
    for bad in ("1 234,50", "1 2345.50", "12 00", "1 200.505"):
        answer = await phone.post("Response", bad)
        assert answer["Message"].startswith("Enter an amount in GHS, e.g. 10.50:"), (bad, answer)
    confirm = await phone.post("Response", f"1{NBSP}200.50")
    assert confirm["Type"] == "Response" and "GHS 1,200.50" in confirm["Message"], confirm
    assert await phone.post("Response", "0")  # Back to the amount
    confirm = await phone.post("Response", HELD_ZERO_SHORT + "12.50")
    assert "GHS 12.50" in confirm["Message"], confirm
    assert (await phone.post("Response", "1"))["Type"] == "Release"
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency) == (1250, "GHS")


async def test_a_french_amount_grouped_by_narrow_spaces_with_a_decimal_comma_on_nalo(operator: Caller, client: Any,
                                                                                    db: Any) -> None:
    """French writes 1234.50 as "1 234,50" (its screens say so: "GHS 1 234,50"): that is what she types, with the
    narrow no-break space a French keyboard puts there, and it is 1234.50, not 123450 nor refused."""
    await ghana_coop(operator)
    assert "GHS 20,50" in await to_the_amount(client, "nalo-spaces-1", AKOSUA)
    for bad in (f"1{NNBSP}23,50", "1 234,505", "1 234 5,50"):
        answer = (await nalo(client, "nalo-spaces-1", bad, False, AKOSUA))["MSG"]
        assert answer.startswith("Entrez un montant en GHS, ex. 10,50 :"), (bad, answer)
    confirm = (await nalo(client, "nalo-spaces-1", f"1{NNBSP}234,50", False, AKOSUA))["MSG"]
    assert "GHS 1 234,50" in confirm, confirm
    assert (await nalo(client, "nalo-spaces-1", "1", False, AKOSUA))["MSGTYPE"] is False
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency) == (123_450, "GHS")
