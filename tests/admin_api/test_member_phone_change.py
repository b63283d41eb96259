"""Right to rectification: a member's number typed wrong at registration, or a new SIM, is corrected on her record
with PATCH /v1/members/{id} {"phone": ...}: read in the cooperative's country, encrypted, blind-indexed and masked
as on create, her history kept; the old number is no longer hers (its USSD keys and, once no membership holds
it, its STOP go), and the new one brings its own STOP state. phoneChange says why: NEW_SIM (the default) keeps a
STOP she sent on her membership; TYPO resets it (a STOP from a number never hers was its holder's)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from channels.ussd.sessions import phone_keys
from core.members import number_opted_out, phone_context
from core.models import AuditEvent, Member, OutboxJob, Payment, PhoneOptOut, SmsMessage
from tests.admin_api.conftest import Caller
from tests.admin_api.test_payments_countries import country_admin
from tests.channels.sms.helpers import make_payment

OLD, NEW = "+250788444001", "+250788444010"


async def _member(rt: Any, member_id: str) -> Member:
    async with rt.sessionmaker() as s:
        return await s.get(Member, member_id)


async def _stop(rt: Any, phone: str) -> None:
    """The number sent STOP (channels.sms.routes): its opt-out, and the flag on its memberships."""
    async with rt.sessionmaker.begin() as s:
        s.add(PhoneOptOut(phone_index=rt.cipher.blind_index(phone), created_at=datetime.now(UTC)))
        for member in (await s.execute(select(Member).where(
                Member.phone_index == rt.cipher.blind_index(phone)))).scalars():
            member.reminders_opt_out = True


async def _opted_out(rt: Any, phone: str) -> bool:
    async with rt.sessionmaker() as s:
        return await s.get(PhoneOptOut, rt.cipher.blind_index(phone)) is not None


async def test_admin_corrects_a_members_number_and_keeps_her_history(rt: Any, admin: Caller, demo: Any) -> None:
    diane = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Keza", "phone": OLD})
    paid = await make_payment(rt, demo["cooperative_id"], account=OLD, member_id=diane["id"])
    old_index = (await _member(rt, diane["id"])).phone_index
    for key in phone_keys(old_index):
        await rt.redis.set(key, "fr")

    fixed = await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": "0788 444 010"})
    assert (fixed["phone"], fixed["phoneReleased"], fixed["name"]) == ("+25078****010", False, "Diane Keza")
    row = await _member(rt, diane["id"])
    assert rt.cipher.decrypt(row.phone_enc, context=phone_context(row.cooperative_id)) == NEW
    assert (row.phone_index, row.phone_masked) == (rt.cipher.blind_index(NEW), "+25078****010")
    # The number finds her now; the old one finds nobody and may be given to someone else.
    assert [m["id"] for m in (await admin.json("GET", "/v1/members?phone=0788444010", 200))["data"]] == [diane["id"]]
    assert (await admin.json("GET", "/v1/members?phone=0788444001", 200))["data"] == []
    await admin.json("POST", "/v1/members", 201, json={"name": "Old Number Holder", "phone": OLD})
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid.id)).member_id == diane["id"]  # her history stays hers
        [event] = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == diane["id"], AuditEvent.action == "member.updated"))).scalars().all()
        forget = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "ussd.forget_phone"))).scalars().all()
    assert event.before == {"language": "en", "status": "ACTIVE", "phone": "+25078****001"}
    assert event.after == {"language": "en", "status": "ACTIVE", "phone": "+25078****010",
                           "phoneChange": "NEW_SIM"}
    assert OLD[4:] not in json.dumps([event.before, event.after]) and NEW[4:] not in json.dumps(event.after)
    # The old number's USSD language and resume route are not hers any more (and a job deletes them too).
    assert await rt.redis.exists(*phone_keys(old_index)) == 0
    assert [j.payload["blind_index"] for j in forget] == [old_index]


async def test_a_number_another_member_of_the_cooperative_has_is_refused(
        rt: Any, admin: Caller, demo: Any, coop_b: Any) -> None:
    diane = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Keza", "phone": OLD})
    taken = await admin.json("PATCH", f"/v1/members/{diane['id']}", 409, json={"phone": "+250788000001"})  # Aline's
    assert taken["message"] == (
        "a member with this phone number already exists in this cooperative (member "
        f"{demo['members']['+250788000001']}): correct hers first, or, if the two members exchange their numbers "
        "(sisters swapping phones), send phoneChange SWAP")
    assert (await _member(rt, diane["id"])).phone_index == rt.cipher.blind_index(OLD)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == diane["id"], AuditEvent.action == "member.updated"))).first() is None
    # Another cooperative's member with the number is no obstacle (one person, two memberships).
    moved = await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": "+250788999001"})
    assert moved["phone"] == "+25078****001"
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 400, json={"phone": "12345"})  # not a number


async def test_the_stop_goes_with_the_number(rt: Any, admin: Caller, demo: Any, coop_b: Any) -> None:
    diane = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Keza", "phone": OLD})
    await _stop(rt, OLD)
    # Her new SIM: the STOP she sent as this cooperative's member stays hers (no reminder until she sends START),
    # while the old number's STOP (no membership holds it) goes with the number to its next holder.
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": NEW})
    assert (await _member(rt, diane["id"])).reminders_opt_out is True
    assert not await _opted_out(rt, OLD)
    async with rt.sessionmaker() as s:
        [event] = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == diane["id"], AuditEvent.action == "member.updated"))).scalars().all()
    assert "remindersOptOut" not in event.after
    # START from the new number is hers to send (channels.sms.routes clears her flag); the rest of this test
    # starts from a member who is not opted out.
    async with rt.sessionmaker.begin() as s:
        (await s.get(Member, diane["id"])).reminders_opt_out = False
    # To a number that sent STOP (elsewhere): held at send time, as for a member registered with it now, and
    # nothing of it on her row or in the cooperative's audit log.
    await _stop(rt, "+250788444020")
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": "+250788444020"})
    row = await _member(rt, diane["id"])
    assert row.reminders_opt_out is False
    async with rt.engine.connect() as conn:
        assert await conn.scalar(select(number_opted_out(row.phone_index))) is True
    async with rt.sessionmaker() as s:
        last = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == diane["id"], AuditEvent.action == "member.updated")
            .order_by(AuditEvent.id.desc()).limit(1))).scalar_one()
    assert "remindersOptOut" not in last.after
    # A number still held by another membership (cooperative B's) keeps its person's STOP.
    await _stop(rt, "+250788999001")
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": "+250788999001"})
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": NEW})
    assert await _opted_out(rt, "+250788999001")
    assert (await _member(rt, coop_b["member_id"])).reminders_opt_out is True


async def test_a_released_number_is_not_corrected(rt: Any, admin: Caller, demo: Any) -> None:
    aline = demo["members"]["+250788000001"]
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    refused = await admin.json("PATCH", f"/v1/members/{aline}", 409, json={"phone": NEW})
    assert refused["message"] == ("the member's phone number was released: register the person again as a new "
                                  "member")
    assert (await _member(rt, aline)).phone_enc is None


async def test_the_number_is_read_in_the_cooperatives_country(
        rt: Any, client: Any, superadmin: Caller) -> None:
    admin, _ = await country_admin(superadmin, rt, client, "KE", "NRB", "1500.00")
    wanjiru = await admin.json("POST", "/v1/members", 201, json={"name": "Wanjiru Kamau", "phone": "0712345678"})
    fixed = await admin.json("PATCH", f"/v1/members/{wanjiru['id']}", 200, json={"phone": "0712345679"})
    assert fixed["phone"] == "+25471****679"
    assert (await _member(rt, wanjiru["id"])).phone_index == rt.cipher.blind_index("+254712345679")


async def test_her_stop_holds_on_her_new_sim(rt: Any, demo: Any, client: Any, admin: Caller) -> None:
    """Aline texts STOP, gets a new SIM, her admin corrects her number: the next reminder scan sends her nothing
    (her STOP was dropped with the old number, and reminders went to the new one)."""
    from core.reminders import scan, why_not_send
    from tests.channels.sms.helpers import jobs_of
    from tests.channels.sms.test_routes import ALINE, JEAN, inbound
    from tests.channels.sms.test_stop_and_reply_limits import NOW

    aline, jean = demo["members"][ALINE], demo["members"][JEAN]
    await inbound(client, ALINE, "STOP", "in-stop-1")
    fixed = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": "+250788654321"})
    assert fixed["remindersOptOut"] is True  # NEW_SIM, the default: her own STOP, shown
    assert (await _member(rt, aline)).reminders_opt_out is True
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    reminders = [j for j in await jobs_of(rt, "sms.send") if j.payload.get("template") == "payment_reminder"]
    async with rt.engine.connect() as conn:
        verdicts = {job.payload["member_id"]: await why_not_send(conn, job.payload) for job in reminders}
    # Nothing queued for her (the scan reads her flag), while Jean, who never texted STOP, gets his.
    assert aline not in verdicts and verdicts.get(jean, "not queued") is None, verdicts


@pytest.mark.parametrize("new_number_stopped", [False, True])
async def test_a_typo_correction_drops_the_strangers_stop(
        rt: Any, demo: Any, client: Any, admin: Caller, new_number_stopped: bool) -> None:
    """Aline's number was typed wrong at registration: the stranger who holds it got her reminders and texted STOP.
    Corrected as a TYPO, the STOP (never hers) leaves her membership, and the admin sees it go; a STOP her real
    number sent itself (number-wide) still holds at send time."""
    from core.reminders import scan, why_not_send
    from tests.channels.sms.helpers import jobs_of
    from tests.channels.sms.test_routes import ALINE, inbound
    from tests.channels.sms.test_stop_and_reply_limits import NOW

    right = "+250788654321"
    aline = demo["members"][ALINE]
    await inbound(client, ALINE, "STOP", "in-stop-stranger")  # the stranger, not Aline
    if new_number_stopped:
        await inbound(client, right, "STOP", "in-stop-right")  # her real number, as nobody's member yet
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is True
    fixed = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": right, "phoneChange": "TYPO"})
    assert (fixed["phone"], fixed["remindersOptOut"]) == ("+25078****321", False)
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is False
    assert (await _member(rt, aline)).reminders_opt_out is False
    async with rt.sessionmaker() as s:
        [event] = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == aline, AuditEvent.action == "member.updated"))).scalars().all()
    assert event.before["remindersOptOut"] is True and event.after["remindersOptOut"] is False
    assert (event.before["phone"], event.after["phone"]) == ("+25078****001", "+25078****321")

    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    reminders = [j for j in await jobs_of(rt, "sms.send")
                 if j.payload.get("member_id") == aline and j.payload.get("template") == "payment_reminder"]
    assert reminders, "no reminder queued for her"
    async with rt.engine.connect() as conn:
        verdicts = {await why_not_send(conn, job.payload) for job in reminders}
    assert verdicts == ({"opted_out"} if new_number_stopped else {None})


async def test_phone_change_is_given_only_with_a_phone(rt: Any, demo: Any, admin: Caller) -> None:
    aline = demo["members"]["+250788000001"]
    await _stop(rt, "+250788000001")
    for body in ({"phoneChange": "TYPO"}, {"name": "Aline U", "phoneChange": "NEW_SIM"},
                 {"phone": NEW, "phoneChange": "WRONG"}):
        refused = await admin.json("PATCH", f"/v1/members/{aline}", 400, json=body)
        assert any("phoneChange" in line for line in refused["message"]), refused
    row = await _member(rt, aline)
    assert (row.phone_index, row.reminders_opt_out) == (rt.cipher.blind_index("+250788000001"), True)
    # NEW_SIM said outright is the default: her own STOP stays, and the audit row does not mention it.
    kept = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
    assert kept["remindersOptOut"] is True
    async with rt.sessionmaker() as s:
        [event] = (await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == aline, AuditEvent.action == "member.updated"))).scalars().all()
    assert "remindersOptOut" not in event.after and "remindersOptOut" not in event.before


async def _receipt_held_by_an_outage(rt: Any, admin: Caller, demo: Any, sim: Any, worker: Any,
                                     key: str) -> tuple[dict[str, Any], str]:
    """Diane's receipt, tried once while Africa's Talking is down: its row holds her number, QUEUED for later."""
    from core.notify import send_sms
    from tests.conftest import drain

    diane = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Keza", "phone": OLD})
    payment = await make_payment(rt, demo["cooperative_id"], account=OLD, member_id=diane["id"])
    async with rt.sessionmaker.begin() as s:
        await send_sms(s, template="payment_receipt", cooperative_id=demo["cooperative_id"],
                       context={"payment_id": payment.id}, cipher=rt.cipher, member_id=diane["id"], dedupe=key)
    sim.set_failure("http503")
    await drain(worker)
    async with rt.sessionmaker() as s:
        [row] = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == diane["id"]))).scalars().all()
    assert (row.status, row.phone_index) == ("QUEUED", rt.cipher.blind_index(OLD))
    return diane, row.id


async def _aggregator_back(rt: Any, sim: Any, worker: Any) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from core.db import utcnow
    from tests.conftest import drain

    sim.set_failure(None)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)


@pytest.mark.parametrize("change", ["TYPO", "NEW_SIM"])
async def test_a_text_held_by_an_outage_goes_to_the_corrected_number(
        rt: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any, change: str) -> None:
    """Her receipt's first try stored the number with the row; corrected before the retry, it went to the old number
    (a stranger's, for a typo) with her amount, reference and cooperative."""
    from tests.channels.sms.helpers import start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    diane, message = await _receipt_held_by_an_outage(rt, admin, demo, sim, worker, f"receipt-held-{change}")
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": NEW, "phoneChange": change})
    await _aggregator_back(rt, sim, worker)
    assert sim.messages(OLD) == []
    [sent] = sim.messages(NEW)
    assert sent["message"].startswith("We received 50,000 RWF")
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, message)
    assert (row.status, row.phone_index, row.phone_masked) == ("SENT", rt.cipher.blind_index(NEW), "+25078****010")


async def test_a_text_already_sent_still_says_the_number_it_went_to(rt: Any, admin: Caller, demo: Any) -> None:
    """Only texts still waiting follow the corrected number: a receipt already sent to the old one keeps that number
    on its row (the SMS log says where each text went, for the desk and for a dispute)."""
    diane = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Keza", "phone": OLD})
    async with rt.sessionmaker.begin() as s:
        sent = SmsMessage(cooperative_id=demo["cooperative_id"], member_id=diane["id"],
                          phone_enc=rt.cipher.encrypt(OLD, context="sms"), phone_index=rt.cipher.blind_index(OLD),
                          phone_masked="+25078****001", template="payment_receipt", language="en", body="x",
                          encoding="GSM-7", length=1, segments=1, status="SENT", idempotency_key="sent-before-fix")
        s.add(sent)
        await s.flush()
        sent_id = sent.id
    await admin.json("PATCH", f"/v1/members/{diane['id']}", 200, json={"phone": NEW})
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, sent_id)
    assert (row.phone_index, row.phone_masked) == (rt.cipher.blind_index(OLD), "+25078****001")
    assert rt.cipher.decrypt(row.phone_enc, context="sms") == OLD
