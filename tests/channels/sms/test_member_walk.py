"""One Rwandan member's SMS walk on a shared short code (KHHC): keywords as she types them, her replies' language
and size, STOP and START, a stranger's number, an aggregator's repeat, and what the support desk then sees."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from app import create_app
from channels.sms.encoding import GSM7, measure
from channels.sms.routes import parse_keyword
from core.models import Member, SmsMessage
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

ALINE = "+250788000001"  # the demo's Kinyarwanda-speaking member
STRANGER = "+250788555444"


async def _walk_client(rt: Any, aiohttp_client: Any) -> Any:
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC",))
    return await aiohttp_client(create_app(rt.settings, runtime=rt))


def test_keywords_as_she_types_them_on_the_shared_code() -> None:
    for text, command in [("khhc  ubufasha", "HELP"), ("KHHC, Hagarika!", "STOP"), ("Khhc.tangira", "START"),
                          ("  KHHC   AIDE ?", "HELP"), ("KHHC ARRÊT 🙏", "STOP")]:
        assert parse_keyword(text, ("KHHC",))[0] == command, text


async def test_her_walk(rt: Any, demo: dict[str, Any], aiohttp_client: Any, aiohttp_server: Any,
                        worker: Any) -> None:
    client = await _walk_client(rt, aiohttp_client)
    _server, sim = await start_simulator(aiohttp_server, rt)
    member_id = demo["members"][ALINE]
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=member_id)

    async def reply(phone: str, text: str, message_id: str) -> list[str]:
        before = len(sim.messages(phone))
        await inbound(client, phone, text, message_id)
        await drain(worker)
        return [str(m["message"]) for m in sim.messages(phone)[before:]]

    # HELP in Kinyarwanda, with the prefix: one GSM-7 reply in rw.
    [help_] = await reply(ALINE, "khhc  ubufasha", "w-1")
    assert help_.startswith("Kanda ") and measure(help_).encoding == GSM7 and measure(help_).segments == 1
    # Status of her payment, typed loosely, twice delivered (aggregator repeat): one reply.
    [status] = await reply(ALINE, f"KHHC imimerere {payment.reference.replace('_', ' ').lower()}", "w-2")
    assert payment.reference in status and status.startswith("Kwishyura ")
    assert await reply(ALINE, f"KHHC imimerere {payment.reference}", "w-2") == []
    # STOP, then START: both take effect, each answered once in rw.
    [stopped] = await reply(ALINE, "KHHC, Hagarika!", "w-3")
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, member_id)).reminders_opt_out is True
    [started] = await reply(ALINE, "KHHC TANGIRA", "w-4")
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, member_id)).reminders_opt_out is False
    assert stopped.startswith("Ntuzongera") and started.startswith("Ubutumwa")
    # A stranger asks about her payment: not found, nothing of hers.
    [other] = await reply(STRANGER, f"KHHC STATUS {payment.reference}", "w-5")
    assert other.startswith("No payment ") and "50" not in other.replace(payment.reference, "")
    # The desk sees her replies, delivered.
    admin = await bearer(client, *demo["admin"])
    listed = await admin.json("GET", f"/v1/members/{member_id}/messages", 200)
    assert {m["status"] for m in listed["data"]} <= {"SENT", "DELIVERED"}
    assert len(listed["data"]) == 4
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage))).scalars().all()
    assert len(rows) == 5


async def test_replies_on_the_shared_code_name_its_keyword(
        rt: Any, demo: dict[str, Any], aiohttp_client: Any, aiohttp_server: Any, worker: Any) -> None:
    """On a shared short code a text without the cooperative's word never reaches the gateway: a reply telling her
    'Send TANGIRA' (or HELP's list of keywords) sends her texts nowhere."""
    client = await _walk_client(rt, aiohttp_client)
    _server, sim = await start_simulator(aiohttp_server, rt)
    for i, text in enumerate(("KHHC HAGARIKA", "KHHC UBUFASHA", "KHHC IMIMERERE", "KHHC murakoze")):
        await inbound(client, ALINE, text, f"kw-{i}")
    await drain(worker)
    replies = sorted(str(m["message"]) for m in sim.messages(ALINE))
    assert replies == sorted([
        "Ntuzongera kubona ubutumwa bwo kwibutsa. Inyemezabwishyu zizakomeza. Ohereza KHHC TANGIRA kubisubizaho.",
        "Kanda *384*123*123# wishyure. SMS: KHHC INYEMEZABWISHYU <nimero>, KHHC IMIMERERE <nimero>, KHHC ASIGAYE, "
        "KHHC HAGARIKA, KHHC TANGIRA.",
        "Ohereza KHHC IMIMERERE ukurikizaho nimero y'ubwishyu, urugero KHHC IMIMERERE PAY_20260115_001.",
        "Ntitwabyumvise. Ohereza KHHC UBUFASHA cyangwa ukande *384*123*123#.",
    ])
    assert {(measure(body).encoding, measure(body).segments) for body in replies} == {(GSM7, 1)}
    # What a reply tells her to send is read back as its command on the shared code.
    how_to_ask = next(body for body in replies if body.startswith("Ohereza KHHC IMIMERERE"))
    assert parse_keyword(" ".join(how_to_ask.split()[-3:]), ("KHHC",)) == ("STATUS", "rw", "PAY_20260115_001")
    # A text without the word (a dedicated code, or the word already configured away) is answered as before.
    await inbound(client, ALINE, "TANGIRA", "kw-plain")
    await drain(worker)
    assert sim.messages(ALINE)[-1]["message"] == "Ubutumwa bwo kwibutsa bwasubijweho. Ohereza HAGARIKA kubihagarika."
