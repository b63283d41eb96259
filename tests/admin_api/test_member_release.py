"""A member who left: suspended, then their phone number released, so the operator's next holder of the number
can be registered (API, CSV import, USSD) while the old member's record, payments and audit trail stay."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.models import AuditEvent, Member, Payment, SmsMessage
from tests.admin_api.conftest import Caller
from tests.channels.sms.helpers import make_payment
from tests.channels.ussd.helpers import AtPhone

ALINE = "+250788000001"


async def _audits(rt: Any, member_id: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == member_id, AuditEvent.action == "member.phone_released"))).scalars())


async def test_released_number_can_be_registered_again(rt: Any, client: Any, admin: Caller, demo: Any) -> None:
    aline = demo["members"][ALINE]
    paid = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    refused = await admin.json("POST", "/v1/members", 409, json={"name": "New Holder", "phone": ALINE})
    assert "already exists" in refused["message"]

    released = await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    assert released["status"] == "SUSPENDED" and released["phoneReleased"] is True
    assert released["phone"] == "+25078****001"  # the masked form stays for the record
    async with rt.sessionmaker() as s:
        row = await s.get(Member, aline)
        assert row.phone_enc is None and row.phone_index is None
    [audit] = await _audits(rt, aline)
    assert audit.after == {"phone": "+25078****001", "phoneReleased": True}
    assert ALINE not in str(audit.before) + str(audit.after)

    holder = await admin.json("POST", "/v1/members", 201, json={"name": "New Holder", "phone": ALINE})
    assert holder["phoneReleased"] is False
    # The number now finds only its new holder; the old member, and her payment, are still there.
    found = await admin.json("GET", f"/v1/members?phone={ALINE}", 200)
    assert [m["id"] for m in found["data"]] == [holder["id"]]
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["name"] == "Aline Uwase"
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid.id)).member_id == aline


async def test_only_a_suspended_members_number_is_released_and_only_once(
    rt: Any, client: Any, admin: Caller, demo: Any
) -> None:
    aline = demo["members"][ALINE]
    active = await admin.json("POST", f"/v1/members/{aline}/release-phone", 409)
    assert "suspend the member" in active["message"]
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["phoneReleased"] is False

    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    again = await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)  # a retry changes nothing
    assert again["phoneReleased"] is True
    assert len(await _audits(rt, aline)) == 1

    # A released member cannot come back with no number: the person is registered again as a new member.
    for status in ("ACTIVE", "PENDING"):
        back = await admin.json("PATCH", f"/v1/members/{aline}", 409, json={"status": status})
        assert "released" in back["message"]
    renamed = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"name": "Aline U. (left)"})
    assert renamed["status"] == "SUSPENDED" and renamed["phoneReleased"] is True


async def test_released_number_can_be_imported_again(rt: Any, client: Any, admin: Caller, demo: Any) -> None:
    aline = demo["members"][ALINE]
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    done = await admin.json("POST", "/v1/members/import", 201, data="name,phone\nNew Holder,0788000001\n",
                            headers={"Content-Type": "text/csv"})
    assert done["imported"] == 1


async def test_new_holder_of_a_released_number_registers_by_ussd(
    rt: Any, client: Any, admin: Caller, demo: Any
) -> None:
    aline = demo["members"][ALINE]
    await admin.json("DELETE", f"/v1/members/{aline}", 200)

    async def register(name: str) -> str:
        phone = AtPhone(client, ALINE)
        await phone.dial()
        assert (await phone.send("1")).startswith("CON You are not registered yet.")
        await phone.send("khhc")
        return await phone.send(name)

    # Suspended only: the number is still the old member's in this cooperative, who is told her membership is not
    # active (in her language) rather than offered to register.
    phone = AtPhone(client, ALINE)
    await phone.dial()
    suspended = await phone.send("1")
    assert suspended.startswith("END ") and "Kigali Heights Housing Cooperative" in suspended, suspended
    await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    assert (await register("New Holder")).startswith("END Thank you New Holder.")
    async with rt.sessionmaker() as s:
        pending = (await s.execute(select(Member).where(Member.name == "New Holder"))).scalar_one()
    assert pending.status == "PENDING" and pending.id != aline


async def test_a_number_released_while_redis_is_down_is_forgotten_once_redis_is_back(
        rt: Any, admin: Caller, demo: Any, worker: Any) -> None:
    """The release stands with Redis down; the worker deletes the number's USSD language and resume route once
    Redis answers again (they were left for 90 days, for a person to delete by hand from a warning)."""
    from channels.ussd.sessions import phone_keys
    from core.models import OutboxJob
    from tests.admin_api.conftest import redis_unreachable
    from tests.conftest import drain

    aline = demo["members"][ALINE]
    async with rt.sessionmaker() as s:
        index = (await s.get(Member, aline)).phone_index
    lang, resume = phone_keys(index)
    await rt.redis.set(lang, "fr")
    await rt.redis.set(resume, "{}")
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    async with redis_unreachable(rt):
        assert (await admin.json("POST", f"/v1/members/{aline}/release-phone", 200))["phoneReleased"] is True
        assert await drain(worker) == 1  # tried, and retried later: Redis still down
    assert await rt.redis.exists(lang, resume) == 2
    async with rt.sessionmaker.begin() as s:
        [job] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "ussd.forget_phone"))).scalars().all()
        assert (job.status, job.attempts, job.payload) == ("PENDING", 1, {"blind_index": index})
        job.run_at = job.created_at  # its retry is due now
    assert await drain(worker) == 1
    assert await rt.redis.exists(lang, resume) == 0
    async with rt.sessionmaker() as s:
        assert (await s.get(OutboxJob, job.id)).status == "DONE"


async def test_a_text_held_by_an_outage_is_not_sent_to_a_released_number(
        rt: Any, admin: Caller, demo: Any, worker: Any, aiohttp_server: Any) -> None:
    """The number's next holder got her receipt: its row, stored with her number by a first try during an outage,
    was sent once the aggregator came back."""
    from tests.admin_api.test_member_phone_change import OLD, _aggregator_back, _receipt_held_by_an_outage
    from tests.channels.sms.helpers import start_simulator

    _, sim = await start_simulator(aiohttp_server, rt)
    diane, message = await _receipt_held_by_an_outage(rt, admin, demo, sim, worker, "receipt-held-release")
    await admin.json("DELETE", f"/v1/members/{diane['id']}", 200)
    await admin.json("POST", f"/v1/members/{diane['id']}/release-phone", 200)
    await _aggregator_back(rt, sim, worker)
    assert sim.messages(OLD) == []
    async with rt.sessionmaker() as s:
        row = await s.get(SmsMessage, message)
    assert (row.status, row.failure_reason) == ("FAILED", "not sent: phone_released")
