"""Sign-in accounts: who may create whom, tenant logins tied to members, deactivation."""

from __future__ import annotations

from tests.admin_api.conftest import bearer


async def test_super_admin_creates_a_cooperative_admin_who_can_sign_in(client, superadmin, coop_b):
    made = await superadmin.json(
        "POST",
        "/v1/users",
        201,
        json={
            "username": "boss@b.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": coop_b["cooperative_id"],
        },
    )
    assert made["cooperativeId"] == coop_b["cooperative_id"] and "password" not in made
    boss = await bearer(client, "boss@b.rw", "a-long-password-1")
    coops = await boss.json("GET", "/v1/cooperatives", 200)
    assert [c["id"] for c in coops["data"]] == [coop_b["cooperative_id"]]
    await superadmin.json(
        "POST",
        "/v1/users",
        409,
        json={
            "username": "boss@b.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": coop_b["cooperative_id"],
        },
    )
    await superadmin.json(
        "POST",
        "/v1/users",
        404,
        json={
            "username": "ghost@x.rw",
            "password": "a-long-password-1",
            "role": "COOP_ADMIN",
            "cooperativeId": "00000000-0000-0000-0000-000000000000",
        },
    )


async def test_admin_creates_tenant_login_for_own_member_only(client, admin, demo, coop_b):
    bosco = demo["members"]["+250788000002"]
    made = await admin.json(
        "POST",
        "/v1/users",
        201,
        json={"username": "bosco@kh.rw", "password": "bosco-password-1", "role": "TENANT", "memberId": bosco},
    )
    assert made["memberId"] == bosco
    tenant = await bearer(client, "bosco@kh.rw", "bosco-password-1")
    await tenant.json("GET", f"/v1/members/{bosco}", 200)
    await admin.json(
        "POST",
        "/v1/users",
        404,
        json={
            "username": "spy@kh.rw",
            "password": "spy-password-12",
            "role": "TENANT",
            "memberId": coop_b["member_id"],
        },
    )
    missing = await admin.json(
        "POST",
        "/v1/users",
        400,
        json={"username": "t@kh.rw", "password": "tenant-password", "role": "TENANT"},
    )
    assert missing["message"] == ["memberId is required for a TENANT"]
    await admin.json(
        "POST",
        "/v1/users",
        403,
        json={"username": "root@kh.rw", "password": "root-password-1", "role": "SUPER_ADMIN"},
    )
    short = await admin.json(
        "POST", "/v1/users", 400, json={"username": "x", "password": "short", "role": "X"}
    )
    assert len(short["message"]) == 3


async def test_deactivated_user_cannot_sign_in(client, admin, demo):
    made = await admin.json(
        "POST",
        "/v1/users",
        201,
        json={"username": "temp@kh.rw", "password": "temp-password-1", "role": "COOP_ADMIN"},
    )
    listed = await admin.json("GET", "/v1/users?role=COOP_ADMIN", 200)
    assert {u["username"] for u in listed["data"]} == {"temp@kh.rw", demo["admin"][0]}
    gone = await admin.json("DELETE", f"/v1/users/{made['id']}", 200)
    assert gone["isActive"] is False
    resp = await client.post("/v1/auth/token", json={"username": "temp@kh.rw", "password": "temp-password-1"})
    assert resp.status == 401
    me = next(u for u in listed["data"] if u["username"] == demo["admin"][0])
    await admin.json("DELETE", f"/v1/users/{me['id']}", 409)
