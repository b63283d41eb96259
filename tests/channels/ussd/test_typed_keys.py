"""Keys as handsets send them, through each aggregator's endpoint: a choice padded with a zero ("01"), the Send key
left on the input ("1#"), digits of another script ("１", full-width; "١", Arabic-Indic). Each was answered
"Invalid choice" and the member could not pay. "0" (Back) and "00" (Home) keep their meaning, zeros only are no
choice, and every hop is still a valid CON or END."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Cooperative, Member, Payment, PaymentType
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN as GH_EN_MTN
from tests.channels.ussd.test_hubtel_nalo_flows import HubtelPhone, nalo

EN_MTN = "+250788000002"  # Jean Bosco, English, MTN: Monthly Rent 50,000 RWF (1), Water 5,000 RWF (2)
STRANGER = "+250788555123"  # a valid MTN number that belongs to no cooperative


async def test_africastalking_reads_padded_hashed_and_full_width_keys(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    types = await phone.send("01")  # Pay
    assert types.startswith("CON Choose what to pay:\n1. Monthly Rent"), types
    confirm = await phone.send("\uff12#")  # full-width 2, then the Send key: Water
    assert confirm.startswith("CON Pay Water\nAmount: 5,000 RWF"), confirm
    assert phone.form()["text"] == "01*\uff12#"  # Africa's Talking's text: every input so far, '*'-joined
    assert await phone.send("0#") == types  # Back
    assert await phone.send("00#") == home  # Home
    for junk in ("000", "#", "", "1*2", "\u00b2"):  # zeros only, the Send key alone, an empty hop, "²": no choice
        assert (await phone.send(junk)).startswith("CON Invalid choice.\nWelcome to"), junk
    await phone.send("1")
    await phone.send("\u0662")  # Arabic-Indic 2: Water
    done = await phone.send("1#")  # Confirm
    assert done.startswith("END Approve the prompt on your phone to pay 5,000 RWF."), done
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.payment_type_id) == (5_000, demo["payment_types"]["Water"])


@pytest.mark.parametrize("typed", ["\uff12\uff10,\uff10\uff10\uff10#", "\u0662\u0660\u0660\u0660\u0660", "020000#"])
async def test_an_amount_typed_in_other_digits_or_with_the_send_key(client: Any, demo: Any, db: Any, rt: Any,
                                                                    typed: str) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=10_000,
                          currency="RWF", is_active=True, allow_custom_amount=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("1")).startswith("CON Enter amount in RWF (usual: 10,000 RWF):")  # Donation
    # "²⁰⁰⁰⁰" is no amount (superscripts are no keys), nor is a full-width comma a thousands' one.
    for bad in ("\u00b2\u2070\u2070\u2070\u2070", "20\uff0c000"):
        assert (await phone.send(bad)).startswith("CON Enter a whole amount in RWF, e.g. 5000:"), bad
    confirm = await phone.send(typed)
    assert "Amount: 20,000 RWF" in confirm, confirm
    assert "pay 20,000 RWF" in await phone.send("1")
    assert (await db.one(Payment)).amount_minor == 20_000


async def test_hubtel_reads_padded_hashed_and_other_script_keys(client: Any, demo: Any, db: Any) -> None:
    phone = HubtelPhone(client, GH_EN_MTN, "hubtel-keys-1")
    await phone.post("Initiation", "*384*123#")
    types = await phone.post("Response", "01#")
    assert types["Type"] == "Response" and types["Message"].startswith("Choose what to pay:"), types
    assert (await phone.post("Response", "\u0660"))["Message"].startswith("Welcome to")  # Arabic-Indic 0: Back
    await phone.post("Response", "\uff11")
    confirm = await phone.post("Response", "\u0662")
    assert confirm["Message"].startswith("Pay Water"), confirm
    invalid = await phone.post("Response", "#")
    assert invalid["Type"] == "Response" and invalid["Message"].startswith("Invalid choice.\nPay Water"), invalid
    done = await phone.post("Response", "\uff11#")
    assert done["Type"] == "Release" and done["Message"].startswith("Approve the prompt"), done
    assert (await db.one(Payment)).idempotency_key == "ussd:hubtel:hubtel-keys-1"


async def test_nalo_reads_padded_hashed_and_full_width_keys(client: Any, demo: Any, db: Any) -> None:
    home = await nalo(client, "nalo-keys-1", "*384*123#", True, GH_EN_MTN)
    types = await nalo(client, "nalo-keys-1", "\uff10\uff11", False, GH_EN_MTN)  # full-width 01
    assert types["MSGTYPE"] is True and types["MSG"].startswith("Choose what to pay:"), types
    assert (await nalo(client, "nalo-keys-1", "00#", False, GH_EN_MTN))["MSG"] == home["MSG"]
    await nalo(client, "nalo-keys-1", "1#", False, GH_EN_MTN)
    assert (await nalo(client, "nalo-keys-1", "002", False, GH_EN_MTN))["MSG"].startswith("Pay Water")
    done = await nalo(client, "nalo-keys-1", "01#", False, GH_EN_MTN)
    assert done["MSGTYPE"] is False and done["MSG"].startswith("Approve"), done
    assert (await db.one(Payment)).idempotency_key == "ussd:nalo:nalo-keys-1"


async def test_a_cooperative_code_typed_in_other_digits(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The handset that sends "١" for Pay sends her cooperative's code in the same digits: it was "No cooperative has
    this code", a code she had typed right."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Remera Teachers SACCO", short_code="4021", country="RW", currency="RWF",
                          status="ACTIVE", self_registration=True))
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    assert (await phone.send("\u0661")).startswith("CON You are not registered yet. Enter your cooperative's code:")
    prompt = await phone.send("\u0664\u0660\u0662\u0661#")  # Arabic-Indic 4021, then the Send key
    assert prompt.startswith("CON Enter your full name to join Remera Teachers SACCO:"), prompt
    assert (await phone.send("Alice Mukamana")).startswith("END Thank you Alice Mukamana.")
    member = await db.one(Member, Member.name == "Alice Mukamana")
    assert member.cooperative_id == (await db.one(Cooperative, Cooperative.short_code == "4021")).id
