"""Keys as handsets send them, through each aggregator's endpoint: a choice padded with a zero ("01"), the Send key
left on the input ("1#", "1＃"), digits of another script ("１", full-width; "١", Arabic-Indic), full-width letters
in a code, the Arabic decimal and thousands separators in an amount. Each was answered "Invalid choice" (or "No
cooperative has this code", or asked for the amount again) and the member could not pay. "0" (Back) and "00"
(Home) keep their meaning, zeros only and a choice after more than one zero are no choice, and every hop is still
a valid CON or END."""

from __future__ import annotations

from typing import Any

import pytest

from core.models import Cooperative, Member, Payment, PaymentType
from tests.admin_api.conftest import Caller, bearer
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_amount_with_cents import AKOSUA, KWAME, ghana_coop, to_the_amount
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


@pytest.mark.parametrize("typed", [
    "\uff12\uff10,\uff10\uff10\uff10#", "\u0662\u0660\u0660\u0660\u0660", "020000#",
    "\uff12\uff10\uff0c\uff10\uff10\uff10\uff03",  # full-width "，" (a comma as "," is) and "＃"
    "\u0662\u0660\u066c\u0660\u0660\u0660"])  # the Arabic thousands separator
async def test_an_amount_typed_in_other_digits_or_with_the_send_key(client: Any, demo: Any, db: Any, rt: Any,
                                                                    typed: str) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=10_000,
                          currency="RWF", is_active=True, allow_custom_amount=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    assert (await phone.send("1")).startswith("CON Enter amount in RWF (usual: 10,000 RWF):")  # Donation
    # "²⁰⁰⁰⁰" is no amount (superscripts are no keys), nor is a comma, full-width or Arabic ("٬"), that groups no
    # thousands: nor one after a first group of zeros ("0٬500" is no way to write 500; read as 500 it was 500 RWF).
    for bad in ("\u00b2\u2070\u2070\u2070\u2070", "20\u066c00", "20\uff0c00", "0\u066c500",
                "\u0660\u0660\u066c\u0665\u0660\u0660", "0,500", "00,500,000"):
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
    assert (await nalo(client, "nalo-keys-1", "02", False, GH_EN_MTN))["MSG"].startswith("Pay Water")
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


async def test_full_width_send_key_letters_and_runs_of_zeros_on_africastalking(client: Any, demo: Any, db: Any,
                                                                              rt: Any) -> None:
    """A full-width keyboard's "＃" (U+FF03) was kept on the input ("２＃": Invalid choice), its letters were no
    code ("ｒｔｓ－２": No cooperative has this code); and "0000001" chose 1, where more than one zero before a
    choice is as likely "00" (Home) mistyped: asked again. The name she types is stored as typed, less the ＃."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Remera Teachers SACCO", short_code="RTS-2", country="RW", currency="RWF",
                          status="ACTIVE", self_registration=True))
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    # Full-width "001" too; and "①" is no key (NFKC would read it as 1: only the width forms are read).
    for padded in ("001", "0000001", "\uff10\uff10\uff11", "0098", "\u2460"):
        assert (await phone.send(padded)).startswith("CON Invalid choice.\nWelcome to"), padded
    types = await phone.send("\uff10\uff11\uff03")  # full-width 01, full-width Send key: Pay
    assert types.startswith("CON Choose what to pay:\n1. Monthly Rent"), types
    assert (await phone.send("002")).startswith("CON Invalid choice.\nChoose what to pay:")
    confirm = await phone.send("\uff12\uff03")  # full-width 2, full-width Send key: Water
    assert confirm.startswith("CON Pay Water\nAmount: 5,000 RWF"), confirm
    assert await phone.send("\uff10\uff03") == types  # Back
    assert await phone.send("00\uff03") == home  # Home
    assert (await phone.send("\uff03")).startswith("CON Invalid choice.\nWelcome to")  # the Send key alone
    assert await db.count(Payment) == 0

    stranger = AtPhone(client, STRANGER)
    await stranger.dial()
    assert (await stranger.send("\uff11")).startswith("CON You are not registered yet.")
    # Superscripts and circled letters are no keys: still no code.
    assert (await stranger.send("RTS-\u00b2")).startswith("CON No cooperative has this code.")
    prompt = await stranger.send("\uff52\uff54\uff53\uff0d\uff12\uff03")  # full-width "rts-2＃"
    assert prompt.startswith("CON Enter your full name to join Remera Teachers SACCO:"), prompt
    done = await stranger.send("\uff2d\uff41\uff52\uff49\uff45 Uwase\uff03")  # full-width "Ｍａｒｉｅ", Send key
    assert done.startswith("END Thank you Marie Uwase."), done  # the screen's GSM-7 writes it plain
    # Stored as she typed it, without the Send key.
    member = await db.one(Member, Member.name == "\uff2d\uff41\uff52\uff49\uff45 Uwase")
    assert member.cooperative_id == (await db.one(Cooperative, Cooperative.short_code == "RTS-2")).id


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def test_arabic_decimal_separator_and_runs_of_zeros_on_hubtel(operator: Caller, client: Any, db: Any) -> None:
    """"١٢٫٥٠" (12.50 as an Arabic keyboard types it, U+066B the decimal separator) in GHS was "Enter an amount in
    GHS, e.g. 10.50", which she had done. What a "." is refused for, "٫" is too."""
    await ghana_coop(operator)
    phone = HubtelPhone(client, "233" + KWAME[1:], "hubtel-arabic-1")
    await phone.post("Initiation", "*384*123*7#")
    assert (await phone.post("Response", "0001"))["Message"].startswith("Invalid choice.\nWelcome to")
    prompt = await phone.post("Response", "01")  # Pay
    prompt = await phone.post("Response", "\uff11\uff03")  # its one type
    assert prompt["Message"].startswith("Enter amount in GHS (usual: GHS 20.50):"), prompt
    for bad in ("12\u066b505", "1\u066b2\u066b3", "12\u066b", "\u066b", "0\u066b00", "12\u066c50", "1\u00bd"):
        answer = await phone.post("Response", bad)
        assert answer["Message"].startswith("Enter an amount in GHS, e.g. 10.50:\nEnter amount"), (bad, answer)
    confirm = await phone.post("Response", "\u0661\u0662\u066b\u0665\u0660\uff03")
    assert confirm["Type"] == "Response" and "GHS 12.50" in confirm["Message"], confirm
    done = await phone.post("Response", "1")
    assert done["Type"] == "Release" and "pay GHS 12.50" in done["Message"], done
    payment = await db.one(Payment)
    assert (payment.amount_minor, payment.currency) == (1250, "GHS")


async def test_arabic_thousands_separator_and_full_width_point_on_nalo(operator: Caller, client: Any,
                                                                       db: Any) -> None:
    """Nalo, in English and in French (whose "," is the decimal mark: "٬" groups thousands there too, it is no
    comma), and a full-width "．" as the decimal point."""
    await ghana_coop(operator)
    assert (await to_the_amount(client, "nalo-arabic-1", KWAME)).startswith("Enter amount in GHS")
    assert (await nalo(client, "nalo-arabic-1", "1\u066c00", False, KWAME))["MSG"].startswith(
        "Enter an amount in GHS, e.g. 10.50:")  # "٬" groups by three or is no amount
    confirm = await nalo(client, "nalo-arabic-1", "\u0661\u066c\u0662\u0660\u0660\u066b\u0665", False, KWAME)
    assert "GHS 1,200.50" in confirm["MSG"], confirm
    assert (await nalo(client, "nalo-arabic-1", "1", False, KWAME))["MSGTYPE"] is False

    await nalo(client, "nalo-arabic-2", "*384*123*7#", True, AKOSUA)
    assert (await nalo(client, "nalo-arabic-2", "0000001", False, AKOSUA))["MSG"].startswith("Choix invalide")
    await nalo(client, "nalo-arabic-2", "1", False, AKOSUA)
    assert "GHS 20,50" in (await nalo(client, "nalo-arabic-2", "1", False, AKOSUA))["MSG"]
    confirm = await nalo(client, "nalo-arabic-2", "2\u066c000", False, AKOSUA)
    assert "GHS 2 000,00" in confirm["MSG"], confirm
    assert await nalo(client, "nalo-arabic-2", "0", False, AKOSUA)  # Back to the amount
    confirm = await nalo(client, "nalo-arabic-2", "\uff11\uff12\uff0e\uff15", False, AKOSUA)
    assert "GHS 12,50" in confirm["MSG"], confirm
    await nalo(client, "nalo-arabic-2", "1", False, AKOSUA)
    assert sorted(p.amount_minor for p in await db.all(Payment)) == [1250, 120_050]


async def test_a_key_of_thousands_of_digits_is_no_choice(client: Any, demo: Any) -> None:
    """Africa's Talking takes an input of 8 KiB: a key of more than 4,300 digits made int() raise (Python's limit on
    a number's digits), and the hop answered "END Service unavailable", ending her session."""
    for junk in ("9" * 5000, "0" + "1" * 4400):  # (one session each: Africa's Talking's text holds every input)
        phone = AtPhone(client, EN_MTN)
        await phone.dial()
        assert (await phone.send(junk)).startswith("CON Invalid choice.\nWelcome to"), junk[:8]
    assert (await phone.send("1")).startswith("CON Choose what to pay:")
