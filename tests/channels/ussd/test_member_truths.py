"""What the USSD screens tell a member about what will happen, through POST /ussd/africastalking and /ussd/nalo
(findings of an exploratory tester, each reproduced twice):

- "My payments" offered "Send receipt by SMS" for a failed or pending payment and ended "Your receipt for PAY_...
  will arrive by SMS shortly"; what arrived was its status ("... failed"). The offer and the end now name what
  the SMS is: the receipt of a paid payment, else the payment's status.
- A member suspended (or whose cooperative was) while she was on the confirmation was told "Sorry, we could not
  complete your request. Please try again later.": trying later cannot help. She is told her membership is not
  active and to contact the cooperative, as when she dials afterwards (she was told "not registered, choose Pay to
  register", and the code prompt then refused her cooperative's code), greeted in her own language (English
  before: a suspended cooperative's membership was not counted).
- The cooperative picker cut every name to 30 characters ("Kigali Heights Housing Coope..") on a screen with
  room to spare: names are whole where the list fits, shortened (marked "..") only as far as it needs.
- The list of payment types cut every name to 22 characters ("1. Monthly Savings Cont.. GHS 125.50 (due day 5)"
  on a screen of about 100 of Hubtel's or Nalo's characters): the same rule as the picker's.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.templates import CATALOGS
from channels.ussd.i18n import translate
from core import gsm
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType, UssdSession
from core.phone import normalize
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import option
from tests.channels.ussd.test_language_across_cooperatives import add_cooperative, another_serve_process
from tests.channels.ussd.test_names_and_lines import NaloPhone
from tests.conftest import drain

MEMBERS = {"en": "+250788000002", "rw": "+250788000001", "fr": "+250733000001", "sw": "+250733000002"}
COOP = "Kigali Heights Housing Cooperative"  # the demo's


async def _detail(client: Any, phone: str, reference: str) -> tuple[AtPhone, str]:
    member = AtPhone(client, phone)
    await member.dial()
    listing = await member.send("2")
    return member, await member.send(option(listing, reference))


# --------------------------------------------------------------------------- the SMS "My payments" offers


@pytest.mark.parametrize("status", ["FAILED", "PENDING"])
@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_payment_not_paid_offers_its_status_by_sms_and_that_is_what_arrives(
        client: Any, demo: Any, rt: Any, db: Any, worker: Any, aiohttp_server: Any, lang: str, status: str) -> None:
    _server, sim = await start_simulator(aiohttp_server, rt)
    phone = MEMBERS[lang]
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone],
                                 status=status, failure_reason="declined" if status == "FAILED" else None)
    member, detail = await _detail(client, phone, payment.reference)
    assert translate(lang, "my.receipt") not in detail, detail  # no receipt is on offer: none would come
    sent = await member.send(option(detail, translate(lang, "my.status_sms")))
    assert sent == "END " + translate(lang, "my.status_sent", ref=payment.reference), sent
    await drain(worker)
    [sms] = sim.messages(phone)
    assert (await db.one(OutboxJob, OutboxJob.kind == "sms.send")).payload["template"] == "payment_status"
    assert payment.reference in sms["message"], sms
    assert CATALOGS[lang].PAYMENT_STATUS[status] in sms["message"], sms  # "... failed", as the END said it would


@pytest.mark.parametrize("lang", ["en", "sw"])
async def test_a_paid_payment_offers_its_receipt_and_the_receipt_arrives(
        client: Any, demo: Any, rt: Any, worker: Any, aiohttp_server: Any, lang: str) -> None:
    _server, sim = await start_simulator(aiohttp_server, rt)
    phone = MEMBERS[lang]
    payment = await make_payment(rt, demo["cooperative_id"], account=phone, member_id=demo["members"][phone])
    member, detail = await _detail(client, phone, payment.reference)
    assert translate(lang, "my.status_sms") not in detail, detail
    sent = await member.send(option(detail, translate(lang, "my.receipt")))
    assert sent == "END " + translate(lang, "my.receipt_sent", ref=payment.reference), sent
    await drain(worker)
    [sms] = sim.messages(phone)
    receipt = CATALOGS[lang].MESSAGES["payment_receipt"]
    assert sms["message"].startswith(receipt[:receipt.index("{")]) and payment.reference in sms["message"], sms


# ------------------------------------------------------------------- a membership that is not active (any more)


@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_member_suspended_before_she_confirms_is_told_her_membership_is_not_active(
        client: Any, demo: Any, rt: Any, db: Any, lang: str) -> None:
    phone = MEMBERS[lang]
    member = AtPhone(client, phone)
    await member.dial()
    await member.send("1")  # Pay
    confirm = await member.send("1")  # the first type: its confirmation
    assert "PAY_" in confirm and confirm.startswith("CON "), confirm
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][phone]).values(status="SUSPENDED"))
    refused = await member.send("1")  # Confirm
    assert refused == "END " + translate(lang, "member.inactive", coop=COOP), refused
    assert refused != "END " + translate(lang, "error.generic")
    assert await db.count(Payment) == 0


async def test_a_cooperative_suspended_before_she_confirms_is_told_so_too(
        client: Any, demo: Any, rt: Any, db: Any) -> None:
    member = AtPhone(client, MEMBERS["en"])
    await member.dial()
    await member.send("1")
    await member.send("1")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
            status="SUSPENDED"))
    refused = await member.send("1")
    assert refused == f"END Your membership of {COOP} is not active. Please contact the cooperative office.", refused
    assert await db.count(Payment) == 0


@pytest.mark.parametrize("lang", MEMBERS)
async def test_a_member_of_a_suspended_cooperative_is_greeted_in_her_language_and_told_it_is_not_active(
        demo: Any, rt: Any, aiohttp_client: Any, lang: str) -> None:
    """Every flow says so (Pay asked for her cooperative's code and refused it; My payments said "not registered,
    choose Pay to register"); the greeting is in her language, not English."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(
            status="SUSPENDED"))
    told = "END " + translate(lang, "member.inactive", coop=COOP)
    for key in ("1", "2", "3", "5"):  # Pay, My payments, Problem with a payment, Help
        member = AtPhone(await another_serve_process(rt, aiohttp_client), MEMBERS[lang])
        home = await member.dial()
        assert home.startswith("CON " + translate(lang, "home.title", name="CoopPay") + "\n"), home
        assert await member.send(key) == told, key


async def test_a_suspended_member_dialling_is_told_her_membership_is_not_active(
        client: Any, demo: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][MEMBERS["rw"]]).values(
            status="SUSPENDED"))
    member = AtPhone(client, MEMBERS["rw"])
    assert (await member.dial()).startswith("CON " + translate("rw", "home.title", name="CoopPay"))
    assert await member.send("1") == "END " + translate("rw", "member.inactive", coop=COOP)


async def test_a_stranger_is_still_asked_for_her_cooperatives_code(client: Any, demo: Any) -> None:
    stranger = AtPhone(client, "+250788555123")
    await stranger.dial()
    assert (await stranger.send("1")).startswith("CON You are not registered yet. Enter your cooperative's code:")


async def test_a_member_suspended_in_one_cooperative_may_still_register_in_another_by_its_extension(
        client: Any, demo: Any, rt: Any) -> None:
    await add_cooperative(rt, "Remera Teachers SACCO", "7")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][MEMBERS["en"]]).values(
            status="SUSPENDED"))
    member = AtPhone(client, MEMBERS["en"], service_code="*384*123*7#")
    await member.dial()
    assert (await member.send("1")).startswith("CON Enter your full name to join Remera Teachers SACCO"), "registers"


@pytest.mark.parametrize("lang", ["en", "rw"])
async def test_a_member_suspended_in_one_cooperative_and_active_in_another_is_told_the_truth_at_each(
        client: Any, demo: Any, rt: Any, db: Any, lang: str) -> None:
    """Suspended in the demo cooperative, active in Remera: dialling the demo cooperative's extension said "not
    registered with it" (My payments, Problem, Help) or, at Pay, asked her name and then "already registered
    with it": her membership there is not active, as it tells a member suspended everywhere. Remera's extension,
    and the plain code, still take her to Remera's payments."""
    phone = MEMBERS[lang]
    remera = await add_cooperative(rt, "Remera Teachers SACCO", "7")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][phone]).values(status="SUSPENDED"))
        await create_member(s, rt.cipher, cooperative_id=remera, name="Member Two", phone=normalize(phone),
                            actor=Actor("system", "system"), language=lang, status="ACTIVE")
    told = "END " + translate(lang, "member.inactive", coop=COOP)
    for key in ("1", "2", "3", "5"):  # Pay, My payments, Problem with a payment, Help
        member = AtPhone(client, phone, service_code="*384*123*123#")
        home = await member.dial()
        assert home.startswith("CON "), home
        assert await member.send(key) == told, key

    for code in ("*384*123*7#", "*384*123#"):
        member = AtPhone(client, phone, service_code=code)
        await member.dial()
        # Pay: Remera's type ("Savings"; the demo cooperative has none of that name), no picker: Remera is the one
        # membership she can pay with.
        paying = await member.send("1")
        assert paying.startswith("CON ") and "Savings" in paying, (code, paying)
    assert await db.count(Payment) == 0
    async with rt.sessionmaker() as s:
        statuses = {m.cooperative_id: m.status for m in (await s.execute(
            select(Member).where(Member.cooperative_id.in_([demo["cooperative_id"], remera])))).scalars()
            if m.id == demo["members"][phone] or m.cooperative_id == remera}
    assert statuses == {demo["cooperative_id"]: "SUSPENDED", remera: "ACTIVE"}  # no registration made at either


# ------------------------------------------------------------------------------------- the cooperative picker

OTHERS = ("Nyamirambo Savings and Credit Cooperative", "Remera Teachers SACCO")
LONG = ("Koperative y'Abahinzi b'Ikawa ba Maraba na Nyamagabe KOAIMA",
        "Koperative y'Abahinzi b'Ikawa ba Maraba na Nyamagabe KOAIMB")


async def _member_of(rt: Any, names: tuple[str, ...]) -> None:
    # The cooperatives first (add_cooperative commits its own transaction): made inside the members' one, the second
    # waited for the write lock that transaction held on SQLite and failed, "database is locked".
    coops = [await add_cooperative(rt, name, str(n)) for n, name in enumerate(names, start=7)]
    async with rt.sessionmaker.begin() as s:
        for coop in coops:
            await create_member(s, rt.cipher, cooperative_id=coop, name="Jean Bosco", phone=normalize(MEMBERS["en"]),
                                actor=Actor("system", "system"), language="en", status="ACTIVE")


async def _picker(client: Any, aggregator: str) -> str:
    member = AtPhone(client, MEMBERS["en"]) if aggregator == "africastalking" else NaloPhone(client, MEMBERS["en"])
    await member.dial()
    screen = await member.send("1")
    assert screen.startswith("CON Choose your cooperative:\n"), screen
    return screen[4:]


async def test_the_picker_shows_names_whole_where_the_screen_has_room(client: Any, demo: Any, rt: Any) -> None:
    await _member_of(rt, OTHERS)
    screen = await _picker(client, "africastalking")
    assert [line.split(". ", 1)[1] for line in screen.split("\n")[1:4]] == sorted([COOP, *OTHERS]), screen
    assert ".." not in screen and gsm.length(screen) <= 182


@pytest.mark.parametrize(("aggregator", "limit"), [("africastalking", 182), ("nalo", 120)])
async def test_the_picker_shortens_names_only_as_far_as_one_screen_needs(
        client: Any, demo: Any, rt: Any, aggregator: str, limit: int) -> None:
    """Two 59-character names that differ at their end: shortened (marked "..") to fit one screen, still told
    apart; the shortest name is whole; no "More"."""
    await _member_of(rt, LONG)
    screen = await _picker(client, aggregator)
    lines = screen.split("\n")
    names = [line.split(". ", 1)[1] for line in lines if line[:1].isdigit() and not line.startswith("0.")]
    assert len(names) == 3 and "98. " not in screen and gsm.length(screen) <= limit, screen
    assert [name[-1] for name in names[1:]] == ["A", "B"] and all(".." in name for name in names[1:]), screen
    if aggregator == "africastalking":
        assert names[0] == COOP and min(map(len, names[1:])) > 30, screen  # the room is used (was 30 always)
    else:
        assert COOP.startswith(names[0][:-2]) and names[0].endswith(".."), screen


# ------------------------------------------------------------------------------------------- the type list

SAVINGS = "Monthly Savings Contribution"  # 28 characters: over the 22 every type's name was cut to


async def _type_list(client: Any, rt: Any, demo: Any, aggregator: str, names: tuple[str, ...]) -> list[str]:
    async with rt.sessionmaker.begin() as s:
        if aggregator == "nalo":  # the demo's Monthly Rent alone beside it: three types need two of Nalo's screens
            await s.execute(update(PaymentType).where(PaymentType.cooperative_id == demo["cooperative_id"],
                                                      PaymentType.name == "Water").values(is_active=False))
        for name in names:
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=12_550,
                              currency="RWF", is_active=True))
    member = AtPhone(client, MEMBERS["en"]) if aggregator == "africastalking" else NaloPhone(client, MEMBERS["en"])
    await member.dial()
    screen = await member.send("1")
    assert screen.startswith("CON Choose what to pay:\n"), screen
    assert "98. " not in screen and gsm.length(screen[4:]) <= (182 if aggregator == "africastalking" else 120)
    return [line.split(". ", 1)[1] for line in screen[4:].split("\n")[1:] if line[:1].isdigit()
            and not line.startswith("0.")]


@pytest.mark.parametrize("aggregator", ["africastalking", "nalo"])
async def test_the_type_list_shows_names_whole_where_the_screen_has_room(
        client: Any, demo: Any, rt: Any, aggregator: str) -> None:
    lines = await _type_list(client, rt, demo, aggregator, (SAVINGS,))
    assert f"{SAVINGS} 12,550 RWF" in lines and ".." not in "".join(lines), lines


async def test_the_type_list_shortens_names_only_as_far_as_one_screen_needs(client: Any, demo: Any, rt: Any) -> None:
    """Two long names beside the demo's two, 4 characters over Africa's Talking's 182 whole: shortened (marked "..")
    as far as one screen needs, told apart, longer than the 22 they were cut to; the demo's short names whole; no
    "More"."""
    lines = await _type_list(client, rt, demo, "africastalking", (f"{SAVINGS} A", f"{SAVINGS} B"))
    names = [line.split(" 12,550")[0] for line in lines if line.startswith("Monthly S")]
    assert len(lines) == 4 and all(".." in name and len(name) > 22 for name in names), lines
    assert [name[-1] for name in names] == ["A", "B"], lines
    assert any(line.startswith("Monthly Rent 50,000 RWF") for line in lines), lines


@pytest.mark.parametrize("code", ["*384*123#", "*384*123*123#"])  # the plain code, the cooperative's extension
async def test_a_session_told_the_membership_is_not_active_is_in_that_cooperatives_session_list(
        client: Any, demo: Any, rt: Any, code: str) -> None:
    """Ended on member.inactive from the first menu, the session's row named no cooperative (dialled with the plain
    code: the phone has no membership it may use), so the cooperative's operations page did not count it; the
    cooperative it was told about is now its row's."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == demo["members"][MEMBERS["en"]]).values(
            status="SUSPENDED"))
    member = AtPhone(client, MEMBERS["en"], service_code=code)
    await member.dial()
    assert await member.send("1") == "END " + translate("en", "member.inactive", coop=COOP)
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(UssdSession).where(UssdSession.session_id == member.session_id))).scalar_one()
    assert (row.status, row.last_screen, row.cooperative_id) == ("Success", "member_inactive", demo["cooperative_id"])

    token = (await (await client.post("/v1/auth/token", json=dict(zip(("username", "password"), demo["admin"],
                                                                      strict=True)))).json())["accessToken"]
    resp = await client.get("/ops/data", headers={"Authorization": f"Bearer {token}"})
    body = await resp.json()
    assert resp.status == 200, body
    assert [r for r in body["ussdLastScreens"] if r["screen"] == "member_inactive"] == [
        {"screen": "member_inactive", "sessions": 1, "paid": 0}]
