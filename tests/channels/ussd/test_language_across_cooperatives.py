"""A language is the person's: every membership of her phone carries it, whichever cooperative she dials and
whichever serve process answers (each hop may land on another one: only the database and Redis are shared)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from core.audit import Actor
from core.db import utcnow
from core.models import Cooperative, Member, PaymentType
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, RW_MTN, option


async def another_serve_process(rt: Any, aiohttp_client: Any) -> Any:
    """A second app on the same database and Redis: its memory of who spoke what is empty."""
    from app import create_app

    return await aiohttp_client(create_app(rt.settings, runtime=rt))


async def add_cooperative(rt: Any, name: str, extension: str) -> str:
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name=name, short_code=extension.join("XC"), country="RW", currency="RWF",
                           status="ACTIVE", ussd_extension=extension, self_registration=True)
        s.add(coop)
        await s.flush()
        s.add(PaymentType(cooperative_id=coop.id, name="Savings", amount_minor=2_000, currency="RWF",
                          is_active=True))
        return coop.id


async def test_a_member_joining_another_cooperative_through_its_extension_keeps_her_language(
        demo: Any, db: Any, rt: Any, aiohttp_client: Any) -> None:
    """Aline (Kinyarwanda, a member of the demo cooperative) dials another cooperative's extension to join
    it, on a serve process that has never answered her: she was greeted in English (her memberships were
    narrowed to the dialled cooperative, which had none), her new membership was stored in English (so its
    SMS reached her in English), and once it was approved her usual code greeted her in English too (its
    cooperative's name sorts first)."""
    abahinzi = await add_cooperative(rt, "Abahinzi Coffee Growers", "77")
    phone = AtPhone(await another_serve_process(rt, aiohttp_client), RW_MTN, service_code="*384*123*77#")
    home = await phone.dial()
    assert home.startswith("CON Murakaza neza"), home
    prompt = await phone.send(option(home, "Kwishyura"))  # Pay: not a member here, so join
    assert prompt.startswith("CON Andika amazina yawe yose ngo winjire muri Abahinzi Coffee Growers"), prompt
    done = await phone.send("Aline Uwase")
    assert done.startswith("END Murakoze Aline Uwase."), done
    joined = await db.one(Member, Member.cooperative_id == abahinzi)
    assert (joined.status, joined.language) == ("PENDING", "rw")

    async with rt.sessionmaker.begin() as s:  # the cooperative approves her
        await s.execute(update(Member).where(Member.id == joined.id).values(status="ACTIVE"))
    usual = await AtPhone(await another_serve_process(rt, aiohttp_client), RW_MTN).dial()
    assert usual.startswith("CON Murakaza neza kuri CoopPay"), usual  # both memberships now
    extension = await AtPhone(await another_serve_process(rt, aiohttp_client), RW_MTN,
                              service_code="*384*123*77#").dial()
    assert extension.startswith("CON Murakaza neza kuri Abahinzi Coffee Growers"), extension


async def test_memberships_that_disagree_speak_the_most_recently_written_ones_language(
        demo: Any, rt: Any, aiohttp_client: Any) -> None:
    """Rows agree after a choice on USSD (it writes them all); an operator's edit of one row makes them
    differ, and then the row written last decides, whichever cooperative's code is dialled and whichever serve
    process answers (the first membership by cooperative name used to decide, and only among the dialled
    cooperative's)."""
    from core.members import create_member

    remera = await add_cooperative(rt, "Remera Teachers SACCO", "7")
    async with rt.sessionmaker.begin() as s:
        french = (await create_member(s, rt.cipher, cooperative_id=remera, name="Jean Bosco",
                                      phone=normalize(EN_MTN), actor=Actor("system", "system"),
                                      language="fr")).id
    english = demo["members"][EN_MTN]  # the demo cooperative's (Kigali Heights), English
    codes = ("*384*123#", "*384*123*7#", "*384*123*123#")  # both memberships, Remera's, Kigali Heights'

    for newest, oldest, welcome in ((french, english, "CON Bienvenue"), (english, french, "CON Welcome")):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Member).where(Member.id == newest).values(updated_at=utcnow()))
            await s.execute(update(Member).where(Member.id == oldest)
                            .values(updated_at=utcnow() - timedelta(days=1)))
        process = await another_serve_process(rt, aiohttp_client)
        greetings = [await AtPhone(process, EN_MTN, service_code=code).dial() for code in codes]
        assert all(g.startswith(welcome) for g in greetings), (welcome, greetings)


async def test_a_membership_reactivated_after_her_choice_speaks_the_language_she_chose(
        demo: Any, db: Any, rt: Any, aiohttp_client: Any) -> None:
    """Her membership of another cooperative is suspended when she picks French: it takes French too, so once it
    is reactivated (the most recently written row) she is still greeted in French, not in its old English."""
    from core.members import create_member, get_member, update_member

    remera = await add_cooperative(rt, "Remera Teachers SACCO", "7")
    async with rt.sessionmaker.begin() as s:
        other = (await create_member(s, rt.cipher, cooperative_id=remera, name="Jean Bosco",
                                     phone=normalize(EN_MTN), actor=Actor("system", "system"),
                                     language="en", status="SUSPENDED")).id
    phone = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN)
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    assert (await phone.send(option(languages, "Francais"))).startswith("CON Bienvenue")
    async with rt.sessionmaker.begin() as s:
        await update_member(s, await get_member(s, other), actor=Actor("admin", "user"), status="ACTIVE")
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, other)).language == "fr"
    greeting = await AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN).dial()
    assert greeting.startswith("CON Bienvenue"), greeting


async def test_a_released_number_is_not_greeted_in_its_previous_holders_language(
        demo: Any, db: Any, rt: Any, aiohttp_client: Any) -> None:
    """Jean Bosco chose French, left, and his number was released (the operator gives it to someone else): its
    next holder is greeted in English, the default, not in French (a language kept for the number in Redis)."""
    phone = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN)
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    assert (await phone.send(option(languages, "Francais"))).startswith("CON Bienvenue")
    from tests.admin_api.conftest import bearer

    admin = await bearer(await another_serve_process(rt, aiohttp_client), "admin@kigali-heights.rw",
                         "demo-admin-password")
    member = demo["members"][EN_MTN]
    await admin.json("DELETE", f"/v1/members/{member}", 200)
    await admin.json("POST", f"/v1/members/{member}/release-phone", 200)
    stranger = await AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN).dial()
    assert stranger.startswith("CON Welcome"), stranger
