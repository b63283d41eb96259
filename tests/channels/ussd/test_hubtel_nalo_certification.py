"""Findings of the review certifying the Hubtel and Nalo integrations.

1. Hubtel on a shared short code: the app is itself a sub-code (*713*45#) of Hubtel's code, sent as ServiceCode
   "713" and Message "*713*45#". Read relative to the ServiceCode, the plain app code gave the extension "45":
   a member dialling the app was sent to the cooperative whose extension is 45.
2. An aggregator uses a session id again on another day (Hubtel's and Nalo's ids come back). Everything keyed by
   the id answered the new session with the old one's: a member confirming next month's rent was told "approve
   the prompt" with last month's reference and no payment was made; another member was told "could not
   complete"; the new session had no row of its own and its close overwrote the old row; a receipt asked for
   again was silently not sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from channels.ussd import hubtel, nalo
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType, UssdSession
from core.phone import normalize
from tests.channels.sms.helpers import start_simulator
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_hubtel_nalo_flows import EN_MTN, HubtelPhone
from tests.channels.ussd.test_hubtel_nalo_flows import nalo as nalo_post
from tests.conftest import drain

# -- 1. the plain app code on a shared short code ----------------------------------------------------------


@pytest.mark.parametrize(("service_code", "message", "extension"), [
    ("713", "*713*45#", None),          # the app code itself: no extension (it was "45")
    ("713", "*713*45*7#", "7"),         # what follows the app code
    ("*713*45*7#", "", "7"),            # the whole dialled code in ServiceCode
    ("713", "*713*7#", "7"),            # not our code in Message: read relative to Hubtel's ServiceCode
    ("713", "*713*456#", "456"),        # another code that starts like ours is not ours
])
def test_hubtel_reads_the_extension_after_a_sub_code_app_code(service_code: str, message: str,
                                                             extension: str | None) -> None:
    parsed = hubtel.parse({"Type": "Initiation", "SessionId": "s-1", "Mobile": "233244000001",
                           "ServiceCode": service_code, "Message": message, "Operator": "mtn"}, "*713*45#")
    assert parsed.turn.extension == extension


def test_nalo_the_plain_app_code_is_no_extension() -> None:
    """Nalo reads the extension only relative to our configured code: the same dial names no cooperative."""
    parsed = nalo.parse({"USERID": "u", "MSISDN": "233244000001", "USERDATA": "*713*45#", "MSGTYPE": True,
                         "SESSIONID": "n-1"}, "*713*45#")
    assert parsed.turn.extension is None
    parsed = nalo.parse({"USERID": "u", "MSISDN": "233244000001", "USERDATA": "*713*45*7#", "MSGTYPE": True,
                         "SESSIONID": "n-2"}, "*713*45#")
    assert parsed.turn.extension == "7"


async def test_a_member_dialling_the_plain_app_code_gets_her_own_cooperative(rt: Any, aiohttp_client: Any,
                                                                             db: Any) -> None:
    from app import create_app

    async with rt.sessionmaker.begin() as s:
        accra = Cooperative(name="Accra Traders Union", short_code="ATU", country="GH", currency="GHS",
                            timezone="Africa/Accra", status="ACTIVE", ussd_extension="7", self_registration=True)
        tema = Cooperative(name="Tema Fishers Cooperative", short_code="TFC", country="GH", currency="GHS",
                           timezone="Africa/Accra", status="ACTIVE", ussd_extension="45", self_registration=True)
        s.add_all([accra, tema])
        await s.flush()
        s.add(PaymentType(cooperative_id=accra.id, currency="GHS", is_active=True, name="Stall Levy",
                          amount_minor=15_000))
        await create_member(s, rt.cipher, cooperative_id=accra.id, name="Ama Mensah",
                            phone=normalize("0244123456", "GH"), actor=Actor("system", "system"))
    settings = dataclasses.replace(rt.settings, ussd_service_codes={"hubtel": "*713*45#"})
    client = await aiohttp_client(create_app(settings, runtime=rt))

    async def post(kind: str, message: str, sequence: int) -> dict[str, Any]:
        resp = await client.post("/ussd/hubtel", json={
            "Mobile": "233244123456", "SessionId": "sub-code-1", "ServiceCode": "713", "Type": kind,
            "Message": message, "Operator": "mtn", "Sequence": sequence, "ClientState": ""})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    home = await post("Initiation", "*713*45#", 1)
    assert home["Message"].startswith("Welcome to Accra Traders Union"), home
    pay = await post("Response", "1", 2)
    assert "Stall Levy" in pay["Message"] and "join" not in pay["Message"].lower(), pay
    row = await db.one(UssdSession)
    assert (row.cooperative_id, row.service_code) == (accra.id, "*713*45#")
    assert await db.count(Member, Member.cooperative_id == tema.id) == 0


# -- 2. a session id used again on another day -------------------------------------------------------------

def reference_on(text: str) -> str:
    found = re.search(r"PAY_\d{8}_\d{3,}", text)
    assert found, text
    return found.group(0)


async def next_month(rt: Any) -> None:
    """A month goes by: the session's Redis state is long gone, and what it wrote is a month old."""
    await rt.redis.flushdb()
    month = timedelta(days=31)
    async with rt.sessionmaker.begin() as s:
        for model, columns in ((Payment, ("created_at",)), (OutboxJob, ("created_at",)),
                               (UssdSession, ("started_at", "ended_at"))):
            for row in (await s.execute(select(model))).scalars():
                for column in columns:
                    if getattr(row, column) is not None:
                        setattr(row, column, getattr(row, column) - month)


async def hubtel_pay(client: Any, session_id: str, *, opening: str = "Initiation") -> list[dict[str, Any]]:
    """Home, Pay, Monthly Rent, Confirm: the four screens."""
    phone = HubtelPhone(client, EN_MTN, session_id)
    return [await phone.post(opening, "*384*123#" if opening == "Initiation" else "1"),
            *[await phone.post("Response", key) for key in ("1", "1", "1")]]


async def test_hubtel_the_same_member_pays_again_next_month_under_a_reused_session_id(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    first = await hubtel_pay(client, "reused-0001")
    last_month = await db.one(Payment)
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, last_month.id)).status = "COMPLETED"
    await next_month(rt)

    second = await hubtel_pay(client, "reused-0001")
    reserved = reference_on(second[2]["Message"])
    assert reserved != last_month.reference
    assert second[3]["Type"] == "Release" and second[3]["Message"].startswith("Approve the prompt on your phone")
    assert reference_on(second[3]["Message"]) == reserved != reference_on(first[3]["Message"])
    this_month = await db.one(Payment, Payment.id != last_month.id)
    assert (this_month.reference, this_month.status, this_month.member_id) == (
        reserved, "PENDING", demo["members"]["+250788000002"])
    assert this_month.idempotency_key.startswith("ussd:hubtel:reused-0001@")
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 2  # its PIN prompt goes out
    # One row per (aggregator, session id): last month's was reset for this session, which it now records.
    row = await db.one(UssdSession)
    assert (row.status, row.last_screen, row.payment_id, row.hops) == ("Success", "pay_done", this_month.id, 4)
    assert row.ended_at is not None and row.ended_at >= row.started_at > last_month.created_at


async def test_hubtel_a_reused_session_ids_confirmation_again_is_still_one_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The payment a reused id's session made is found again by every copy of its confirmation: posted twice at
    once, and after Redis lost the session and she walked to Confirm again (a new reference reserved)."""
    await hubtel_pay(client, "reused-0002")
    last_month = await db.one(Payment)
    await next_month(rt)

    phone = HubtelPhone(client, EN_MTN, "reused-0002")
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "1")
    confirm = await phone.post("Response", "1")
    both = await asyncio.gather(phone.post("Response", "1", sequence=4), phone.post("Response", "1", sequence=4))
    assert await db.count(Payment) == 2
    made = await db.one(Payment, Payment.id != last_month.id)
    assert made.reference == reference_on(confirm["Message"])
    assert all(reference_on(done["Message"]) == made.reference for done in both), both

    await rt.redis.flushdb()  # the session lost mid-way: Hubtel's next hop opens it again
    again = await hubtel_pay(client, "reused-0002", opening="Response")
    assert reference_on(again[2]["Message"]) != made.reference  # a reference reserved anew
    assert again[3]["Type"] == "Release" and reference_on(again[3]["Message"]) == made.reference
    assert await db.count(Payment) == 2
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 2


async def test_hubtel_a_confirmation_again_in_the_same_session_is_still_one_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Without a reused id: Redis lost the session after Confirm, and she confirms again (another reference
    reserved): the session's key finds its payment, a few minutes old, not a previous session's."""
    done = await hubtel_pay(client, "same-0001")
    payment = await db.one(Payment)
    await rt.redis.flushdb()
    again = await hubtel_pay(client, "same-0001", opening="Response")
    assert reference_on(again[2]["Message"]) != payment.reference
    assert reference_on(again[3]["Message"]) == reference_on(done[3]["Message"]) == payment.reference
    assert await db.count(Payment) == 1
    assert (await db.one(Payment)).idempotency_key == "ussd:hubtel:same-0001"


async def test_nalo_another_member_pays_under_a_reused_session_id(client: Any, demo: Any, db: Any,
                                                                   rt: Any) -> None:
    await nalo_post(client, "1659011525", "*384*123#", True)
    for key in ("1", "2", "1"):
        await nalo_post(client, "1659011525", key, False)
    hers = await db.one(Payment)
    await next_month(rt)

    await nalo_post(client, "1659011525", "*384*123#", True, EN_MTN)
    await nalo_post(client, "1659011525", "1", False, EN_MTN)  # Pay
    confirm = await nalo_post(client, "1659011525", "1", False, EN_MTN)  # Monthly Rent
    done = await nalo_post(client, "1659011525", "1", False, EN_MTN)
    assert done["MSGTYPE"] is False and "PAY_" in done["MSG"], done  # not "could not complete"
    his = await db.one(Payment, Payment.id != hers.id)
    assert his.reference == reference_on(confirm["MSG"]) and his.reference in done["MSG"]
    assert (his.member_id, hers.member_id) == (demo["members"]["+250788000002"], demo["members"]["+250733000001"])
    row = await db.one(UssdSession)
    assert (row.member_id, row.payment_id, row.last_screen) == (his.member_id, his.id, "pay_done")
    assert row.phone_masked != "" and row.started_at > hers.created_at


async def hubtel_receipt(client: Any, session_id: str) -> dict[str, Any]:
    """My payments, the newest, its SMS (its status: not paid yet)."""
    phone = HubtelPhone(client, EN_MTN, session_id)
    await phone.post("Initiation", "*384*123#")
    await phone.post("Response", "2")
    detail = await phone.post("Response", "1")
    key = next(line.split(".")[0] for line in detail["Message"].split("\n") if "by SMS" in line)
    return await phone.post("Response", key)


async def test_hubtel_a_receipt_asked_for_again_under_a_reused_session_id_is_sent(
        client: Any, demo: Any, db: Any, rt: Any, worker: Any, aiohttp_server: Any) -> None:
    """Run through the worker to the SMS simulator: the receipts her phone receives (after last month's job was
    pruned too: tests/channels/ussd/test_receipt_session_reuse.py)."""
    _server, sim = await start_simulator(aiohttp_server, rt)
    await hubtel_pay(client, "pay-0001")
    sent = await hubtel_receipt(client, "receipt-0001")
    assert sent["Type"] == "Release" and "will arrive by SMS" in sent["Message"]
    assert await db.count(OutboxJob, OutboxJob.kind == "sms.send") == 1
    await drain(worker)
    assert len(sim.messages("+" + EN_MTN)) == 1
    await next_month(rt)

    again = await hubtel_receipt(client, "receipt-0001")
    assert again["Message"] == sent["Message"]
    jobs = await db.all(OutboxJob, OutboxJob.kind == "sms.send")
    assert len(jobs) == 2 and {job.payload["template"] for job in jobs} == {"payment_status"}
    await rt.redis.flushdb()  # the same session asks again (its state lost): still one SMS for it
    await hubtel_receipt(client, "receipt-0001")
    assert await db.count(OutboxJob, OutboxJob.kind == "sms.send") == 2
    await drain(worker)
    received = [m["message"] for m in sim.messages("+" + EN_MTN)]
    assert len(received) == 2 and received[0] == received[1] and received[0].startswith("Payment PAY_"), received


async def test_africastalking_a_reused_session_ids_old_row_is_not_a_lost_session(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Text on a first hop whose id has a row is read as a session lost from Redis mid-way (its keys so far);
    a row of a previous session of the id is not this one's: the text is the code she dialled."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Nyamirambo Water Users", short_code="NWU", country="RW", currency="RWF",
                          status="ACTIVE", ussd_extension="4", self_registration=True))
    before = AtPhone(client, EN_MTN, session_id="ATUid_reused")
    await before.dial()
    await next_month(rt)
    dialled = AtPhone(client, EN_MTN, session_id="ATUid_reused")
    dialled.inputs = ["4"]  # *384*123*4#: the water users' code
    home = await dialled.dial()
    assert home.startswith("CON Welcome to CoopPay\n"), home  # not her own cooperative's menu again
    join = await dialled.send("1")
    assert join.startswith("CON Enter your full name to join Nyamirambo Water Users"), join
    row = await db.one(UssdSession)
    assert (row.service_code, row.status, row.hops) == ("*384*123*4#", "OPEN", 1)
