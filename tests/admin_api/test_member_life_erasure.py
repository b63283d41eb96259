"""A member's life ends in erasure (h4's findings, through the admin API and SMS inbound):

- The reply to a keyword she texted (STATUS, RECEIPT, HELP...) is queued with her number encrypted in the
  outbox job's payload (the SMS row holds it too). Erasing her emptied the row's number but left the job's: her
  number could still be decrypted from the job for 30 days (RETENTION_OUTBOX_DONE_DAYS), and for ever from a parked
  one. The jobs of the texts an erasure empties lose their number too.
- A member registered by USSD, approved, suspended and erased within minutes (she asked at the office, right
  after dialling) kept her name in Redis: her sessions' saved state ("nm", the last screen "Thank you <name>...")
  lived on for their TTL. Her recent sessions' keys are deleted with the erasure.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from channels.ussd.sessions import session_key
from core.db import utcnow
from core.models import OutboxJob, SmsMessage, UssdSession
from tests.admin_api.conftest import Caller
from tests.channels.sms.helpers import start_simulator
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import drain

NAME, PHONE = "Jeanne Mukeshimana", "+250788777111"


async def test_the_job_of_a_keyword_reply_to_her_loses_her_number_when_she_is_erased(
        rt: Any, client: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    texted = await client.post("/sms/africastalking/inbound", data={
        "from": PHONE, "to": "COOPPAY", "text": "STATUS PAY_20260115_000001", "id": "in-1", "date": "2026-01-15"})
    assert texted.status == 200
    await drain(worker)
    assert [r["to"] for r in sim.requests] == [PHONE]  # the reply ("not found") left for her number
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert rt.cipher.decrypt(job.payload["phone_enc"], context="sms") == PHONE  # as queued
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert job.payload["phone_enc"] is None, job.payload
    assert (job.payload["template"], job.payload["member_id"]) == ("not_found", jeanne["id"])


async def test_her_recent_ussd_sessions_in_redis_go_with_the_erasure(
        rt: Any, client: Any, admin: Caller, demo: Any) -> None:
    phone = AtPhone(client, PHONE)
    await phone.dial()
    await phone.send("1")
    await phone.send("khhc")
    done = await phone.send(NAME)
    assert done.startswith(f"END Thank you {NAME}."), done
    other = AtPhone(client, "+250788000002")  # a member's session, not hers: kept
    await other.dial()
    [jeanne] = (await admin.json("GET", "/v1/members?name=Mukeshimana", 200))["data"]
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    left = {key: await rt.redis.get(key) for key in await rt.redis.keys("ussd:*")}
    assert not [key for key, value in left.items() if value and NAME.encode() in value], left
    assert any(other.session_id.encode() in key for key in left), left


async def test_a_keyword_reply_not_yet_sent_when_she_is_erased_is_not_sent_nor_stored_with_her_number(
        rt: Any, client: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """Her reply's job had not run yet (the worker behind, the send rate reached): no SMS row of it to erase, and
    its payload held her number. Run after the erasure, it stored a new row with her number and text, and sent."""
    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    texted = await client.post("/sms/africastalking/inbound", data={
        "from": PHONE, "to": "COOPPAY", "text": "STATUS PAY_20260115_000001", "id": "in-1", "date": "2026-01-15"})
    assert texted.status == 200
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert job.payload["phone_enc"] is None, job.payload
    await drain(worker)
    assert sim.requests == []
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(SmsMessage))).scalars().all() == []


async def test_a_parked_reply_that_stored_no_text_loses_her_number_when_she_is_erased(
        rt: Any, client: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """Her reply's job parked before it stored its text (its tries failing, or a person parked it): no SMS row to
    erase, and a parked job is kept until replayed, so its payload kept her number for ever; and replayed after the
    erasure, it sent to her."""
    _, sim = await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    texted = await client.post("/sms/africastalking/inbound", data={
        "from": PHONE, "to": "COOPPAY", "text": "STATUS PAY_20260115_000001", "id": "in-1", "date": "2026-01-15"})
    assert texted.status == 200
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="PARKED"))
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert job.payload["phone_enc"] is None, job.payload
    await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    assert sim.requests == []


async def test_a_discarded_reply_that_stored_no_text_loses_her_number_when_she_is_erased(
        rt: Any, client: Any, admin: Caller, demo: Any) -> None:
    """Her reply's job parked before it stored its text and was then discarded (POST /v1/jobs/{id}/discard): no SMS
    row to erase, and a discarded job is kept RETENTION_OUTBOX_DONE_DAYS; found by her id, as a parked one is."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    texted = await client.post("/sms/africastalking/inbound", data={
        "from": PHONE, "to": "COOPPAY", "text": "STATUS PAY_20260115_000001", "id": "in-1", "date": "2026-01-15"})
    assert texted.status == 200
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send").values(status="PARKED"))
        job_id = (await s.execute(select(OutboxJob.id).where(OutboxJob.kind == "sms.send"))).scalar_one()
    await admin.json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": "reply template broken"})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        job = await s.get(OutboxJob, job_id)
    assert job is not None and job.status == "DISCARDED"
    assert job.payload["phone_enc"] is None, job.payload
    async with rt.sessionmaker() as s:  # the job giving her reply's count back names the discarded job only
        given_back = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "sms.give_back"))).scalar_one()
    assert given_back == {"job_id": job_id}


async def test_her_session_opened_over_five_minutes_ago_and_still_going_goes_with_the_erasure(
        rt: Any, client: Any, admin: Caller, demo: Any) -> None:
    """A session's Redis state lives SESSION_TTL after its last hop, not after its first: one opened six minutes
    ago whose last hop was a minute ago is still there, with her name."""
    phone = AtPhone(client, PHONE)
    await phone.dial()
    await phone.send("1")
    await phone.send("khhc")
    done = await phone.send(NAME)
    assert done.startswith(f"END Thank you {NAME}."), done
    async with rt.sessionmaker.begin() as s:  # opened 6 minutes ago (its hops kept its state alive)
        await s.execute(update(UssdSession).values(started_at=utcnow() - timedelta(minutes=6)))
    [jeanne] = (await admin.json("GET", "/v1/members?name=Mukeshimana", 200))["data"]
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    left = {key: await rt.redis.get(key) for key in await rt.redis.keys("ussd:*")}
    assert not [key for key, value in left.items() if value and NAME.encode() in value], left


async def test_her_live_ussd_session_in_another_cooperative_is_kept_when_one_erases_her(
        rt: Any, client: Any, admin: Caller, demo: Any, coop_b: Any) -> None:
    """A member of two cooperatives, erased from one, keeps the other's: her session there, live in Redis, was
    deleted (the recent sessions were chosen by her number alone), ending her payment to the other cooperative."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    in_b = await coop_b["admin"].json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    phone = AtPhone(client, PHONE)  # her one active membership now: the other cooperative's
    menu = await phone.dial()
    assert menu.startswith("CON Welcome to Other Coop"), menu
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    assert await rt.redis.exists(session_key("africastalking", phone.session_id)) == 1
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(UssdSession).where(UssdSession.session_id == phone.session_id))).scalar_one()
    assert (row.cooperative_id, row.member_id, row.phone_index) == (
        coop_b["cooperative_id"], in_b["id"], rt.cipher.blind_index(PHONE))


async def test_her_session_that_chose_another_cooperative_before_she_was_suspended_is_kept(
        rt: Any, client: Any, admin: Caller, demo: Any, coop_b: Any) -> None:
    """Opened while both memberships were active, the session's row names no cooperative until it ends; its state
    says which she chose: the other cooperative's session is kept, one in the erased membership goes."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await coop_b["admin"].json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    sessions = {}
    for coop_name in ("Other Coop", "Kigali Heights"):
        phone = AtPhone(client, PHONE)
        if "Continue where you left off" in await phone.dial():  # the first session left a route to resume
            await phone.send("2")  # start again
        picker = await phone.send("1")
        [item] = [line.split(".")[0] for line in picker.splitlines() if coop_name in line]
        await phone.send(item)
        sessions[coop_name] = phone.session_id
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    assert await rt.redis.exists(session_key("africastalking", sessions["Other Coop"])) == 1
    assert await rt.redis.exists(session_key("africastalking", sessions["Kigali Heights"])) == 0


async def test_the_give_back_job_of_her_stale_stop_loses_her_numbers_index_when_she_is_erased(
        rt: Any, client: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """A STOP she texted before her START (stale: no reply) gives its count back by an 'sms.give_back' job whose
    payload names her number's blind index (the Redis keys' name). Her erasure clears that index on her SMS rows;
    the job's went on naming it until the job was pruned (RETENTION_OUTBOX_DONE_DAYS)."""
    await start_simulator(aiohttp_server, rt)
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    for text, message_id, date in (("START", "in-2", "2026-01-15 10:00:05"), ("STOP", "in-1", "2026-01-15 10:00:00")):
        texted = await client.post("/sms/africastalking/inbound", data={
            "from": PHONE, "to": "COOPPAY", "text": text, "id": message_id, "date": date})
        assert texted.status == 200
    await drain(worker)
    index = rt.cipher.blind_index(PHONE)
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.give_back"))).scalars().all()
    assert job.status == "DONE" and job.payload["index"] == index  # as queued, and run
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
    async with rt.sessionmaker() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.give_back"))).scalars().all()
    assert index not in str(job.payload), job.payload
