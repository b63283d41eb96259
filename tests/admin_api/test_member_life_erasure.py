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

from typing import Any

from sqlalchemy import select

from core.models import OutboxJob
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
