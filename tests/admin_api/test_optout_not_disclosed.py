"""A cooperative's admin learns nothing of another cooperative's STOP list: a number that texted STOP (as another
cooperative's member, or as nobody's) and is then added here (API, CSV import) looks like any other number in
the member, its audit row and its reminders' jobs, and still gets no reminder. A STOP sent while a member of this
cooperative shows as this membership's flag."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core.db import utcnow
from core.models import AuditEvent, Member, OutboxJob, SmsMessage
from core.reminders import scan, why_not_send
from tests.channels.sms.helpers import jobs_of, start_simulator
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

BEA = "+250788999001"  # coop_b's member
NOBODY = "+250788999003"  # nobody's member when it texts STOP
CONTROL = "+250788999002"  # never texted STOP
# 28 November, 08:00 in Kigali: the demo's Monthly Rent (due day 1) falls due in 3 days (as tests/core/test_reminders).
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
STOPPED = "You will no longer get reminders"


async def _created(rt: Any, member_ids: list[str]) -> dict[str, Any]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent).where(AuditEvent.action == "member.created",
                                                         AuditEvent.entity_id.in_(member_ids)))).scalars()
        return {a.entity_id: a.after for a in rows}


async def _flags(rt: Any, member_ids: list[str]) -> dict[str, bool]:
    async with rt.sessionmaker() as s:
        rows = await s.execute(select(Member.id, Member.reminders_opt_out).where(Member.id.in_(member_ids)))
        return dict(rows.all())


async def test_a_number_that_texted_stop_elsewhere_looks_like_any_other_and_gets_no_reminder(
        rt: Any, client: Any, admin: Any, coop_b: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    _server, sim = await start_simulator(aiohttp_server, rt)
    await inbound(client, BEA, "STOP", "in-stop-bea")
    await inbound(client, NOBODY, "STOP", "in-stop-nobody")
    made = {phone: await admin.json("POST", "/v1/members", 201, json={"name": "Probe Member", "phone": phone})
            for phone in (BEA, NOBODY, CONTROL)}
    ids = {phone: m["id"] for phone, m in made.items()}

    # What the admin reads: the member (as created, and read again) and the audit row, the same for all three.
    for phone, member in made.items():
        again = await admin.json("GET", f"/v1/members/{member['id']}", 200)
        assert {k: v for k, v in again.items() if k not in ("id", "phone", "updatedAt", "createdAt")} == {
            "cooperativeId": member["cooperativeId"], "name": "Probe Member", "phoneReleased": False,
            "language": "en", "unit": None, "status": "ACTIVE", "remindersOptOut": False}, phone
    events = await admin.json("GET", "/v1/audit-events?action=member.created&limit=100", 200)
    after = {e["entityId"]: e["after"] for e in events["data"]}
    assert {phone: after[ids[phone]] for phone in made} == {
        phone: {"status": "ACTIVE", "phone": made[phone]["phone"]} for phone in made}
    assert await _flags(rt, list(ids.values())) == {i: False for i in ids.values()}
    # Bea's STOP was sent as B's member: it shows there.
    assert await _flags(rt, [coop_b["member_id"]]) == {coop_b["member_id"]: True}

    # The reminder scan queues the three alike; at its turn the number's STOP still holds, for the same reason
    # a member's own STOP gives.
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    reminders = {j.payload["member_id"]: j for j in await jobs_of(rt, "sms.send")
                 if j.payload["template"] == "payment_reminder"}
    assert set(ids.values()) <= set(reminders)
    async with rt.engine.connect() as conn:
        assert {phone: await why_not_send(conn, reminders[ids[phone]].payload) for phone in made} == {
            BEA: "opted_out", NOBODY: "opted_out", CONTROL: None}
    await drain(worker)
    for stopped in (BEA, NOBODY):  # the STOP's reply, and no reminder
        assert [m["message"][: len(STOPPED)] for m in sim.messages(stopped)] == [STOPPED], stopped
    [reminder] = sim.messages(CONTROL)
    assert reminder["message"].startswith("Reminder: Monthly Rent")
    async with rt.sessionmaker() as s:
        statuses = (await s.execute(select(OutboxJob.status, OutboxJob.last_error).where(
            OutboxJob.id.in_([reminders[ids[phone]].id for phone in made])))).all()
    assert statuses == [("DONE", None)] * 3  # dropped as quietly as one sent


async def test_a_csv_import_does_not_read_the_stop_list(rt: Any, client: Any, admin: Any,
                                                         coop_b: dict[str, Any]) -> None:
    await inbound(client, BEA, "STOP", "in-stop-bea")
    await inbound(client, NOBODY, "STOP", "in-stop-nobody")
    rows = "\n".join(f"Probe {i:03d},+250788999{i:03d}" for i in range(1, 51))
    done = await admin.json("POST", "/v1/members/import?status=PENDING", 201, data=f"name,phone\n{rows}\n",
                            headers={"Content-Type": "text/csv"})
    assert done["imported"] == 50
    created = await _created(rt, done["memberIds"])
    assert len(created) == 50 and all(set(a) == {"status", "phone"} for a in created.values()), [
        a for a in created.values() if set(a) != {"status", "phone"}]
    events = await admin.json("GET", "/v1/audit-events?action=member.created&limit=100", 200)
    assert [e["after"] for e in events["data"] if "remindersOptOut" in e["after"]] == []
    assert set((await _flags(rt, done["memberIds"])).values()) == {False}


async def test_a_stop_sent_as_this_cooperatives_member_shows_here(rt: Any, client: Any, admin: Any,
                                                                 coop_b: dict[str, Any]) -> None:
    """Bea joins A after her STOP as B's member (nothing shown), then texts STOP again: now she is A's member
    too, and A's membership says so (its flag and the member.reminders_opt_out audit row); START clears both."""
    await inbound(client, BEA, "STOP", "in-stop-1")
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Bea Other", "phone": BEA})
    await inbound(client, BEA, "STOP", "in-stop-2")
    assert await _flags(rt, [made["id"]]) == {made["id"]: True}
    events = await admin.json("GET", "/v1/audit-events?action=member.reminders_opt_out&limit=100", 200)
    assert [(e["entityId"], e["after"]) for e in events["data"]] == [(made["id"], {"remindersOptOut": True})]
    await inbound(client, BEA, "START", "in-start")
    assert await _flags(rt, [made["id"], coop_b["member_id"]]) == {made["id"]: False, coop_b["member_id"]: False}


@pytest.mark.parametrize("suspended", [False, True])
async def test_a_reminder_retried_after_a_stop_sent_elsewhere_reads_as_one_skipped_for_another_reason(
        rt: Any, client: Any, admin: Any, demo: dict[str, Any], coop_b: dict[str, Any], worker: Any,
        aiohttp_server: Any, suspended: bool) -> None:
    """The aggregator is down for the reminders' first attempt (stored, QUEUED). Before the retry Aline's number is
    corrected (TYPO) to Bea's, which texted STOP as B's member, and Grace's reminder runs past its day: both
    stored reminders end the same, and A's messages say nothing of a STOP. Both members suspended meanwhile (Grace's
    day not over): both say so, STOP or not."""
    aline, grace = demo["members"]["+250788000001"], demo["members"]["+250788000002"]
    await inbound(client, BEA, "STOP", "in-stop-bea")
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http503")
    await drain(worker)
    async with rt.sessionmaker() as s:
        queued = set((await s.execute(select(SmsMessage.member_id).where(
            SmsMessage.template == "payment_reminder", SmsMessage.status == "QUEUED"))).scalars())
    assert {aline, grace} <= queued and sim.inbox == {}

    fixed = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": BEA, "phoneChange": "TYPO"})
    assert fixed["remindersOptOut"] is False
    if suspended:
        for member_id in (aline, grace):
            await admin.json("PATCH", f"/v1/members/{member_id}", 200, json={"status": "SUSPENDED"})
    async with rt.sessionmaker.begin() as s:
        if not suspended:
            [late] = [j for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars()
                      if j.payload.get("member_id") == grace and j.payload.get("template") == "payment_reminder"]
            await s.execute(update(OutboxJob).where(OutboxJob.id == late.id).values(
                payload={**late.payload, "send_before": (utcnow() - timedelta(minutes=1)).isoformat()}))
        await s.execute(update(OutboxJob).where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    sim.set_failure(None)
    await drain(worker)

    shown = {}
    for member_id in (aline, grace):
        listed = await admin.json("GET", f"/v1/members/{member_id}/messages", 200)
        [reminder] = [m for m in listed["data"] if m["template"] == "payment_reminder"]
        shown[member_id] = (reminder["status"], reminder["providerStatus"], reminder["failureReason"])
        assert "opted" not in str(listed).lower()
    words = "not sent: member_inactive" if suspended else "not sent: skipped"
    assert shown == {aline: ("FAILED", "Skipped", words), grace: ("FAILED", "Skipped", words)}
    assert [m["message"][: len(STOPPED)] for m in sim.messages(BEA)] == [STOPPED]  # the STOP's reply only
    assert sim.messages("+250788000002") == []
