"""Long names and long lines on the USSD screens, through the aggregators' endpoints (Africa's Talking: 182
characters; Nalo: 120).

A "My payments" line too long for the screen was cut at its end, and the end is the reference the member quotes to
complain or to ask for her receipt ("Imeshindwa, pesa imekatwa PAY_20261202_1.."). Names were cut before the screen
was measured (a cooperative's to 40 characters, a person's to 30), on screens with room to spare, and the "." the
cut added read as the end of a sentence ("Koperative y'Abahinzi b'Ikawa ba Maraba.: for help call ...").
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import update

from channels.ussd.i18n import translate
from core import gsm
from core.models import Cooperative, Member, Payment, PaymentType
from tests.channels.sms.helpers import make_payment
from tests.channels.ussd.helpers import AtPhone, new_session_id

COOP59 = "Koperative y'Abahinzi b'Ikawa ba Maraba na Nyamagabe KOAIMA"
PERSON59 = "Jean Bosco Habimana Nsengiyumva Mukamana Uwase Twagiramungu"
TYPE = "Monthly Rent - Building A, Block 3"
MEMBERS = {"en": "+250788000002", "sw": "+250733000002"}  # the demo's members who read English, Kiswahili
STRANGER = "+250788555123"  # belongs to no cooperative
AGGREGATORS = {"africastalking": 182, "nalo": 120}


class NaloPhone:
    """A phone dialling through Nalo, its answers read as Africa's Talking's ("CON "/"END " and the text)."""

    def __init__(self, client: Any, phone: str) -> None:
        self.client, self.msisdn, self.session_id = client, phone.lstrip("+"), new_session_id("nalo")

    async def post(self, userdata: str, first: bool) -> str:
        resp = await self.client.post("/ussd/nalo", json={
            "USERID": "NALOTest", "MSISDN": self.msisdn, "USERDATA": userdata, "MSGTYPE": first,
            "NETWORK": "MTN", "SESSIONID": self.session_id})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return ("CON " if body["MSGTYPE"] else "END ") + body["MSG"]

    async def dial(self) -> str:
        return await self.post("*384*123#", True)

    async def send(self, key: str) -> str:
        return await self.post(key, False)


def phone_on(aggregator: str, client: Any, phone: str) -> Any:
    return AtPhone(client, phone) if aggregator == "africastalking" else NaloPhone(client, phone)


def shown(screen: str, limit: int) -> str:
    """The screen's text, checked to be within the aggregator's limit in GSM-7."""
    text = screen[4:]
    assert gsm.is_gsm(text) and gsm.length(text) <= limit, (gsm.length(text), limit, text)
    return text


def assert_whole_or_marked(text: str, name: str) -> None:
    """The name is shown whole, or its start (a few words' worth at least) marked "..": never cut with one "."."""
    if name in text:
        return
    cut = next((name[:n] for n in range(len(name) - 1, 5, -1) if name[:n].rstrip() + ".." in text), None)
    assert cut is not None, (name, text)


async def rename_cooperative(rt: Any, demo: Any, name: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(name=name))


async def failed_payment_with_money_taken(rt: Any, demo: Any, phone: str, reference: str) -> Payment:
    """A payment that failed and whose money was taken after all (the longest status), of a long-named type."""
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone],
                                 status="FAILED", reference=reference, failure_reason="declined")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            amount_minor=1_500_000, completed_at=datetime(2026, 12, 2, 9, 0, tzinfo=UTC)))
        await s.execute(update(PaymentType).where(PaymentType.id == payment.payment_type_id).values(name=TYPE))
    return payment


def payment_line(listing: str, reference: str) -> str:
    line = next((line for line in listing.split("\n") if reference in line), None)
    assert line is not None, f"{reference} not shown whole: {listing!r}"
    return line


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_payments_line_too_long_shortens_the_type_and_keeps_the_reference(
        client: Any, demo: Any, rt: Any, lang: str, aggregator: str) -> None:
    """The type's name gives way (marked ".."), the status and the reference stay whole; the detail screen, with
    room for it, names the type in full on Africa's Talking (Nalo's is the shorter message, without the type)."""
    phone, reference = MEMBERS[lang], "PAY_20261202_1234567"  # the counter has outgrown six digits
    await failed_payment_with_money_taken(rt, demo, phone, reference)
    # The list's short form: the whole one, the SMS's words, leaves no room beside the type.
    status = translate(lang, "status.TAKEN_AFTER_FAILURE.short")
    whole = translate(lang, "status.TAKEN_AFTER_FAILURE")
    member = phone_on(aggregator, client, phone)
    await member.dial()
    listing = shown(await member.send("2"), AGGREGATORS[aggregator])
    line = payment_line(listing, reference)
    found = re.fullmatch(rf"1\. 1,500,000 RWF (.+)\.\. {re.escape(status)} {reference}", line)
    assert found is not None and TYPE.startswith(found.group(1)), line
    assert len(line) <= 72, line
    detail = shown(await member.send("1"), AGGREGATORS[aggregator])
    assert detail.startswith(reference) and (whole if aggregator == "africastalking" else status) in detail, detail
    if aggregator == "africastalking":
        assert f"{TYPE}: 1,500,000 RWF" in detail, detail


@pytest.mark.parametrize("aggregator", AGGREGATORS)
async def test_a_line_still_too_long_shortens_the_status_too_never_the_reference(
        client: Any, demo: Any, rt: Any, aggregator: str) -> None:
    """A reference from a ten-digit counter and Swahili's longest status: the type's name is as short as it gets,
    then the status is shortened; the reference is whole."""
    phone, reference = MEMBERS["sw"], "PAY_20261202_1234567890"
    await failed_payment_with_money_taken(rt, demo, phone, reference)
    status = translate("sw", "status.TAKEN_AFTER_FAILURE.short")
    member = phone_on(aggregator, client, phone)
    await member.dial()
    line = payment_line(shown(await member.send("2"), AGGREGATORS[aggregator]), reference)
    found = re.fullmatch(rf"1\. 1,500,000 RWF (\S+)\.\. (.+)\.\. {reference}", line)
    assert found is not None, line
    assert TYPE.startswith(found.group(1)) and status.startswith(found.group(2)), line
    assert len(line) <= 72, line


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_long_cooperative_name_is_whole_where_the_screen_has_room(
        client: Any, demo: Any, rt: Any, lang: str, aggregator: str) -> None:
    """Help names the cooperative whole on both aggregators (was "ba Maraba.: for help call"); the menu's title
    does where it fits, and on Nalo the name gives way (marked "..") rather than the menu spilling onto a second
    page."""
    await rename_cooperative(rt, demo, COOP59)
    limit = AGGREGATORS[aggregator]
    member = phone_on(aggregator, client, MEMBERS[lang])
    home = shown(await member.dial(), limit)
    assert f"5. {translate(lang, 'menu.help')}" in home and "98." not in home, home
    if aggregator == "africastalking":
        assert home.startswith(translate(lang, "home.title", name=COOP59) + "\n"), home
    else:
        assert_whole_or_marked(home.split("\n")[0], COOP59)
    help_ = await member.send("5")
    assert help_.startswith("END ") and shown(help_, limit) == translate(
        lang, "help.text", coop=COOP59, phone="+250788123456"), help_


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("lang", ["en", "sw"])
async def test_registration_keeps_long_names_whole_where_they_fit_and_marks_them_where_not(
        client: Any, demo: Any, rt: Any, db: Any, lang: str, aggregator: str) -> None:
    """A 59-character person joining a 59-character cooperative: the prompt names the cooperative whole; the last
    screen keeps both names whole on Africa's Talking, and on Nalo shortens them (marked "..") and keeps the
    sentence after them (it read "Thank you Jean Bosco Habimana Nsengiyum. Your request...")."""
    await rename_cooperative(rt, demo, COOP59)
    limit = AGGREGATORS[aggregator]
    stranger = phone_on(aggregator, client, STRANGER)
    await stranger.dial()
    await stranger.send("4")  # Language
    await stranger.send({"en": "1", "sw": "4"}[lang])
    await stranger.send("1")  # Pay: not a member yet, so the cooperative's code
    prompt = shown(await stranger.send(demo["short_code"]), limit)
    assert prompt.startswith(translate(lang, "reg.name", coop=COOP59) + "\n"), prompt
    done = await stranger.send(PERSON59)
    assert done.startswith("END "), done
    text = shown(done, limit)
    if aggregator == "africastalking":
        assert PERSON59 in text and COOP59 in text, text
    else:
        for name in (PERSON59, COOP59):
            assert_whole_or_marked(text, name)
        # The sentence after the names is there whole (in the message or its shorter variant).
        tails = tuple(translate(lang, msgid, name="N", coop="COOP").split("COOP")[1]
                      for msgid in ("reg.done", "reg.done.short"))
        assert text.endswith(tails), (tails, text)
    assert not re.search(r"[^.]\.[:;,]", text), text  # no single "." glued to a name's end
    assert (await db.one(Member, Member.status == "PENDING")).name == PERSON59  # the name kept whole


BLOCKS = ("Monthly contribution to the market stall maintenance fund Block B",
          "Monthly contribution to the market stall maintenance fund Block C")


@pytest.mark.parametrize("aggregator", AGGREGATORS)
async def test_the_confirmation_keeps_what_tells_a_shortened_type_from_the_others(
        client: Any, demo: Any, rt: Any, db: Any, aggregator: str) -> None:
    """Two types of the same amount whose names differ only at their end: the list tells them apart
    ("Monthly contr..Block C"), and so must the confirmation. Shortened by its end to fit Nalo's 120 characters, both
    read "Monthly contribution t..: 1,500 RWF", and she could not see which one she was about to pay."""
    async with rt.sessionmaker.begin() as s:
        for name in BLOCKS:
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=1_500, currency="RWF",
                              is_active=True))
    limit = AGGREGATORS[aggregator]
    member = phone_on(aggregator, client, MEMBERS["en"])
    await member.dial()
    listing = shown(await member.send("1"), limit)
    while not any("Block C" in line for line in listing.split("\n")):
        assert "98. " in listing, listing
        listing = shown(await member.send("98"), limit)
    number = next(line.split(".")[0] for line in listing.split("\n") if "Block C" in line)
    summary = shown(await member.send(number), limit)
    assert "Block C" in summary and "Block B" not in summary, summary
    if aggregator == "africastalking":
        assert BLOCKS[1] in summary, summary  # room for it whole
    assert (await member.send("1")).startswith("END "), "confirmed"
    paid = await db.one(Payment, Payment.member_id == demo["members"][MEMBERS["en"]])
    chosen = await db.one(PaymentType, PaymentType.id == paid.payment_type_id)
    assert chosen.name == BLOCKS[1]
