"""Cooperatives through HTTP: super admin CRUD, admins read only their own."""

from __future__ import annotations

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
