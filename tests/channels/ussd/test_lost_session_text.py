"""An Africa's Talking session lost from Redis mid-way: its next hop's text is the key presses so far, not a
dialled cooperative code.

Africa's Talking sends every input so far ("4*1"); with the session gone (restart, failover, eviction) that
hop looks like a first hop, and text on a first hop is a code dialled after the base code (*384*123*4#).
The session row, written on every first hop, tells the two apart; it also keeps the whole code the session
was opened with (*384*123*4#), so a session opened with a cooperative's code in its text keeps that cooperative.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from channels.ussd import sessions
from channels.ussd.service import dialled_code
from core.models import Cooperative, Member, UssdSession
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, STRANGER, option
from tests.conftest import sql_sent


async def other_cooperative(rt: Any, extension: str) -> str:
    """A cooperative that takes self-registrations, whose USSD code is a menu key."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Nyamirambo Water Users", short_code="NWU", country="RW", currency="RWF",
                           status="ACTIVE", ussd_extension=extension, self_registration=True)
        s.add(coop)
        await s.flush()
        return coop.id


async def lose(rt: Any, phone: AtPhone, *, route: bool = False) -> None:
    """What a Redis restart, failover or eviction does to the session (and, with `route`, to the phone's
    resume route: a restart or a failover loses both)."""
    assert await rt.redis.delete(sessions.session_key("africastalking", phone.session_id)) == 1
    if route:
        assert await rt.redis.delete(sessions.resume_key(rt.cipher, normalize(phone.phone))) == 1


def session_row_reads(sent: list[str]) -> list[str]:
    return [s for s in sent if s.startswith("SELECT") and "FROM ussd_sessions" in s]


def session_row_writes(sent: list[str]) -> list[str]:
    # (on PostgreSQL the opening hop's write is in the memberships' statement: WITH ... INSERT INTO ussd_sessions)
    return [s for s in sent if "INSERT INTO ussd_sessions" in s]


async def test_a_lost_session_keeps_the_member_in_her_own_cooperative(client: Any, demo: Any, db: Any,
                                                                      rt: Any) -> None:
    """Her first key, "4" (Language), is also another cooperative's code: after the loss she gets her own
    menu (the key pressed on the lost session is dropped, as on Hubtel and Nalo) and Pay lists her own
    cooperative's types. It switched her to the other cooperative, whose Pay offered to join it."""
    other = await other_cooperative(rt, "4")
    fresh = await AtPhone(client, EN_MTN).dial()
    assert fresh.startswith("CON Welcome to Kigali Heights Housing Cooperative")
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("4")  # Language: a screen not offered for resume
    await lose(rt, phone)
    with sql_sent(rt) as sent:
        after = await phone.send("1")  # text "4*1"
    assert after == fresh
    assert len(session_row_reads(sent)) == 1 and session_row_writes(sent) == [], sent
    types = await phone.send(option(after, "Pay"))  # text "4*1*1": the next key, read after the consumed text
    assert types.startswith("CON Choose what to pay") and "Monthly Rent" in types, types
    assert "Nyamirambo" not in types
    assert await db.count(Member, Member.cooperative_id == other) == 0
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.cooperative_id == demo["cooperative_id"]
    stored = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert stored is not None and "x" not in stored.state.data and stored.acc == "4*1*1"


async def test_a_session_lost_on_a_screen_worth_resuming_offers_to_continue(client: Any, demo: Any,
                                                                            rt: Any) -> None:
    """Lost on the list of payment types ("1", also a cooperative's code): the next key gets the offer to
    continue where she left off, as on Hubtel and Nalo; continuing shows that list again, starting again
    shows her own menu (it showed the other cooperative's)."""
    await other_cooperative(rt, "1")
    fresh = await AtPhone(client, EN_MTN).dial()
    for choice, expected in (("1", "types"), ("2", "home")):
        phone = AtPhone(client, EN_MTN)
        await phone.dial()
        types = await phone.send("1")
        assert "Monthly Rent" in types
        await lose(rt, phone)
        offer = await phone.send(option(types, "Water"))  # text "1*2"
        assert offer.startswith("CON You did not finish your last session."), offer
        after = await phone.send(choice)  # text "1*2*1" (continue) or "1*2*2" (start again)
        assert after == (types if expected == "types" else fresh), (choice, after)


async def test_a_code_dialled_in_the_text_of_a_new_session_still_names_the_cooperative(client: Any, demo: Any,
                                                                                       db: Any, rt: Any) -> None:
    """*384*123*4# sent as serviceCode *384*123# with text "4" on a new session id: that cooperative, as before.
    The session row is read on that hop only; the plain dial (empty text) and a code in serviceCode read none."""
    other = await other_cooperative(rt, "4")
    dialled = AtPhone(client, STRANGER)
    dialled.inputs.append("4")
    with sql_sent(rt) as sent:
        assert (await dialled.dial()).startswith("CON Welcome to CoopPay")
    assert len(session_row_reads(sent)) == 1 and len(session_row_writes(sent)) == 1, sent
    prompt = await dialled.send("1")
    assert prompt.startswith("CON Enter your full name to join Nyamirambo Water Users:"), prompt
    await dialled.send("Alice Mukamana")
    assert (await db.one(Member, Member.name == "Alice Mukamana")).cooperative_id == other
    for phone in (AtPhone(client, EN_MTN), AtPhone(client, EN_MTN, service_code="*384*123*4#")):
        with sql_sent(rt) as sent:
            await phone.dial()
        assert session_row_reads(sent) == [] and len(session_row_writes(sent)) == 1, sent


async def test_a_database_outage_on_a_lost_session_answers_unavailable(client: Any, demo: Any, rt: Any) -> None:
    """The row cannot be read: the hop is answered "unavailable" (no guess at a cooperative, no error page) and
    nothing is saved; once the database is back the next key gets her own menu."""
    from core.db import make_engine

    await other_cooperative(rt, "4")
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    await phone.send("4")
    await lose(rt, phone)
    dead = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    original = rt.sessionmaker
    rt.sessionmaker = async_sessionmaker(dead, expire_on_commit=False)
    try:
        answer = await phone.send("1")
    finally:
        rt.sessionmaker = original
        await dead.dispose()
    assert answer == "END Service unavailable, please try again later."
    assert await sessions.load(rt.redis, "africastalking", phone.session_id) is None
    assert await phone.send("1") == home  # text "4*1*1"


@pytest.mark.parametrize("route", ["lost", "kept"])
async def test_a_newcomer_joining_the_cooperative_she_dialled_still_joins_it_after_a_loss(
        client: Any, demo: Any, db: Any, rt: Any, route: str) -> None:
    """*384*123*4# sent as text "4": she is asked her name to join that cooperative when her session is lost.
    Her name is consumed; she gets that cooperative's opening screen again (straight away when the resume
    route went too, after "Start again" when it is offered) and Pay asks her name to join it again. It asked
    for her cooperative's code, as on a plain dial: the lost session had forgotten the code she dialled."""
    other = await other_cooperative(rt, "4")
    phone = AtPhone(client, STRANGER)
    phone.inputs.append("4")
    first = await phone.dial()
    prompt = await phone.send(option(first, "Pay"))
    assert prompt.startswith("CON Enter your full name to join Nyamirambo Water Users:"), prompt
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.service_code == "*384*123*4#" and row.cooperative_id == other  # the code she dialled
    await lose(rt, phone, route=route == "lost")
    with sql_sent(rt) as sent:
        after = await phone.send("Alice Mukamana")  # text "4*1*Alice Mukamana"
    assert len(session_row_reads(sent)) == 1 and session_row_writes(sent) == [], sent
    if route == "kept":
        assert after.startswith("CON You did not finish your last session."), after
        after = await phone.send(option(after, "Start again"))
    assert after == first
    assert await phone.send(option(after, "Pay")) == prompt
    done = await phone.send("Alice Mukamana")
    assert done.startswith("END Thank you Alice Mukamana. Your request to join Nyamirambo Water Users was sent"), done
    assert (await db.one(Member, Member.name == "Alice Mukamana")).cooperative_id == other
    stored = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert stored is not None and stored.state.data["x"] == other


async def test_a_member_who_dialled_another_cooperatives_code_stays_with_it_after_a_loss(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """A member of Kigali Heights dials cooperative 4's code (text "4"), and her session is lost on its opening
    screen: her next key gets cooperative 4's opening screen again and Pay offers to join it. She landed on
    Kigali Heights' menu, whose Pay lists its own payment types."""
    other = await other_cooperative(rt, "4")
    own = await AtPhone(client, EN_MTN).dial()
    assert own.startswith("CON Welcome to Kigali Heights Housing Cooperative")
    phone = AtPhone(client, EN_MTN)
    phone.inputs.append("4")
    first = await phone.dial()
    assert first.startswith("CON Welcome to CoopPay"), first  # not a member of cooperative 4
    await lose(rt, phone)
    after = await phone.send("1")  # text "4*1"
    assert after == first
    joining = await phone.send(option(after, "Pay"))  # text "4*1*1"
    assert joining.startswith("CON Enter your full name to join Nyamirambo Water Users:"), joining
    assert "Monthly Rent" not in joining
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert row.service_code == "*384*123*4#" and row.cooperative_id == other


def test_the_code_kept_on_the_session_row_fits_its_column() -> None:
    """The whole code when it fits (32 characters); else its cooperative part, which names the cooperative again
    after a loss; else the plain code (no cooperative's code is that long)."""
    assert dialled_code("*384*123#", "4") == "*384*123*4#"
    assert dialled_code("*384*123#", "4*2") == "*384*123*4*2#"
    assert dialled_code("*384*123#", "4*" + "2" * 40) == "*384*123*4#"
    assert dialled_code("*384*123#", "9" * 40) == "*384*123#"
