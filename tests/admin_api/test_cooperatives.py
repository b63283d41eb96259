"""Cooperatives through HTTP: super admin CRUD, admins read only their own."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from core.audit import Actor
from core.cooperatives import update_cooperative
from core.models import AuditEvent, Cooperative
from tests.conftest import requires_pg, waiting_for_locks

NEW = {
    "name": "Musanze Farmers SACCO",
    "shortCode": "MFS",
    "country": "RW",
    "ussdExtension": "77",
    "contactPhone": "0788123999",
}


async def test_super_admin_creates_updates_and_suspends(superadmin):
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json=NEW)
    assert coop["currency"] == "RWF" and coop["status"] == "ACTIVE"
    assert coop["contactPhone"] == "+25078****999"
    await superadmin.json("POST", "/v1/cooperatives", 409, json={**NEW, "ussdExtension": "78"})
    changed = await superadmin.json(
        "PATCH",
        f"/v1/cooperatives/{coop['id']}",
        200,
        json={"name": "Musanze SACCO", "selfRegistration": False},
    )
    assert changed["name"] == "Musanze SACCO" and changed["selfRegistration"] is False
    await superadmin.json("PATCH", f"/v1/cooperatives/{coop['id']}", 400, json={"currency": "KES"})
    suspended = await superadmin.json("DELETE", f"/v1/cooperatives/{coop['id']}", 200)
    assert suspended["status"] == "SUSPENDED"
    listed = await superadmin.json("GET", "/v1/cooperatives?status=SUSPENDED", 200)
    assert [c["id"] for c in listed["data"]] == [coop["id"]]


async def test_validation(superadmin):
    body = await superadmin.json(
        "POST",
        "/v1/cooperatives",
        400,
        json={"name": "X", "shortCode": "bad code!", "country": "FR", "timezone": "Mars/Olympus"},
    )
    msgs = body["message"]
    assert "name must be at least 2 characters" in msgs
    assert "shortCode must be 2 to 32 letters, digits, '-' or '_'" in msgs
    assert any(m.startswith("country must be one of") for m in msgs)
    tz = await superadmin.json("POST", "/v1/cooperatives", 400, json={**NEW, "timezone": "Mars/Olympus"})
    assert tz["message"] == ["timezone must be an IANA time zone name"]


async def test_admin_sees_only_own_cooperative(admin, coop_b, demo):
    listed = await admin.json("GET", "/v1/cooperatives", 200)
    assert [c["id"] for c in listed["data"]] == [demo["cooperative_id"]]
    await admin.json("GET", f"/v1/cooperatives/{demo['cooperative_id']}", 200)
    await admin.json("GET", f"/v1/cooperatives/{coop_b['cooperative_id']}", 404)
    await admin.json("PATCH", f"/v1/cooperatives/{demo['cooperative_id']}", 403, json={"name": "Mine now"})
    await admin.json("DELETE", f"/v1/cooperatives/{demo['cooperative_id']}", 403)


@requires_pg
async def test_a_suspension_sent_while_it_is_made_active_again_suspends_it(rt, superadmin, demo):
    """A super admin suspends a cooperative while another makes it active again (not yet committed). The DELETE
    read it SUSPENDED, so it set nothing (the status was already that), ended no session and wrote an audit row
    from SUSPENDED to SUSPENDED: it answered 200 SUSPENDED, and the cooperative stayed ACTIVE, its admins signed
    in. Now it waits for the reactivation, reads the cooperative ACTIVE and suspends it as any suspension does."""
    coop = demo["cooperative_id"]
    await superadmin.json("DELETE", f"/v1/cooperatives/{coop}", 200)

    async def ended() -> int:
        async with rt.sessionmaker() as s:
            return (await s.execute(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == "user.sessions_ended", AuditEvent.cooperative_id == coop))).scalar_one()

    ended_before = await ended()
    assert ended_before > 0
    blocker = rt.sessionmaker()
    try:
        await blocker.begin()  # the reactivation, written and not yet committed
        await update_cooperative(blocker, await blocker.get(Cooperative, coop), changes={"status": "ACTIVE"},
                                 actor=Actor("user:other-super", "super_admin"))
        suspension = asyncio.create_task(superadmin.req("DELETE", f"/v1/cooperatives/{coop}"))
        await waiting_for_locks(rt, 1)
        await blocker.commit()
        answer = await suspension
    finally:
        await blocker.close()
    assert answer.status == 200 and (await answer.json())["status"] == "SUSPENDED"
    async with rt.sessionmaker() as s:
        assert (await s.get(Cooperative, coop)).status == "SUSPENDED"
        last = (await s.execute(select(AuditEvent).where(AuditEvent.action == "cooperative.updated")
                                .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1))).scalar_one()
        assert (last.before["status"], last.after["status"]) == ("ACTIVE", "SUSPENDED")
    assert await ended() == 2 * ended_before  # its accounts' sessions ended again
    signin = await superadmin.client.post("/v1/auth/token", json=dict(zip(("username", "password"), demo["admin"],
                                                                          strict=True)))
    assert signin.status == 401
