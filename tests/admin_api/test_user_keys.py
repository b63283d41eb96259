"""An account's API keys go with the account: deactivating an admin revokes the keys they created, and a key
whose creator is no longer active is refused even if it was somehow left unrevoked."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core.models import AdminUser, ApiKey, AuditEvent
from tests.admin_api.conftest import Caller, bearer
from tests.conftest import sql_sent


async def _leaving_admin_with_key(client: Any, admin: Caller) -> tuple[dict[str, Any], dict[str, Any]]:
    leaving = await admin.json("POST", "/v1/users", 201, json={
        "username": "leaving@kh.rw", "password": "a-long-password-1", "role": "COOP_ADMIN"})
    them = await bearer(client, "leaving@kh.rw", "a-long-password-1")
    key = await them.json("POST", "/v1/api-keys", 201, json={"name": "mine", "scopes": ["admin", "payments:read"]})
    return leaving, key


async def test_deactivating_an_admin_revokes_the_keys_they_created(rt, client, admin):
    leaving, key = await _leaving_admin_with_key(client, admin)
    staying = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ours", "scopes": ["admin"]})
    their_key, our_key = Caller(client, {"X-API-Key": key["key"]}), Caller(client, {"X-API-Key": staying["key"]})
    await their_key.json("GET", "/v1/members", 200)

    done = await admin.json("DELETE", f"/v1/users/{leaving['id']}", 200)

    assert done["isActive"] is False and done["apiKeysRevoked"] == [key["id"]]
    assert (await their_key.json("GET", "/v1/members", 401))["message"] == "invalid or inactive API key"
    await our_key.json("GET", "/v1/members", 200)  # another admin's key is not touched
    async with rt.sessionmaker() as s:
        assert (await s.get(ApiKey, key["id"])).revoked_at is not None
        assert (await s.get(ApiKey, staying["id"])).revoked_at is None
        events = {e.action: e for e in (await s.execute(
            select(AuditEvent).where(AuditEvent.entity_id.in_([key["id"], leaving["id"]])))).scalars()}
    assert events["api_key.revoked"].after == {"reason": "creator deactivated"}
    assert events["user.deactivated"].after == {"apiKeysRevoked": [key["id"]]}
    keys = await admin.json("GET", "/v1/api-keys", 200)
    assert {k["id"]: k["revokedAt"] is not None for k in keys["data"]}[key["id"]] is True


async def test_a_key_whose_creator_is_inactive_is_refused_and_a_repeated_deactivation_revokes_it(rt, client, admin):
    leaving, key = await _leaving_admin_with_key(client, admin)
    # An account deactivated before its keys were revoked with it (or by any other path).
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(AdminUser).where(AdminUser.id == leaving["id"]).values(is_active=False))
    their_key = Caller(client, {"X-API-Key": key["key"]})
    with sql_sent(rt) as sent:
        assert (await their_key.json("GET", "/v1/members", 401))["message"] == "invalid or inactive API key"
    # The creator's account is read in the key's own lookup: one statement, no extra round trip.
    lookups = [q for q in sent if "api_keys" in q]
    assert len(lookups) == 1 and "admin_users" in lookups[0], sent

    done = await admin.json("DELETE", f"/v1/users/{leaving['id']}", 200)
    assert done["apiKeysRevoked"] == [key["id"]]
    async with rt.sessionmaker() as s:
        assert (await s.get(ApiKey, key["id"])).revoked_at is not None


async def test_keys_made_by_no_account_still_work(rt, client, admin, demo):
    from core import auth
    from core.audit import Actor

    async with rt.sessionmaker.begin() as s:
        _, clear = await auth.create_api_key(s, cooperative_id=demo["cooperative_id"], name="cli",
                                             scopes=["payments:read"], actor=Actor.system())
    await Caller(client, {"X-API-Key": clear}).json("GET", "/v1/payments", 200)


async def test_a_key_reads_what_it_writes_and_acts_on(client, admin, demo):
    """A payments:write key (an integrator's) asks the status of the payments it made, and of no others; an admin
    key (refunds, disputes) lists the payments it acts on. Neither may do more: write does not make an admin,
    admin does not create payments."""
    from tests.admin_api.conftest import payment_body

    writer = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["payments:write"]})
    back_office = await admin.json("POST", "/v1/api-keys", 201, json={"name": "desk", "scopes": ["admin"]})
    erp, desk = Caller(client, {"X-API-Key": writer["key"]}), Caller(client, {"X-API-Key": back_office["key"]})
    made = await erp.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Water"], amount=5000))
    assert (await erp.json("GET", f"/v1/payments/{made['id']}", 200))["id"] == made["id"]
    assert (await erp.json("GET", f"/v1/payments/{made['id']}/status", 200))["status"] == "PENDING"
    # Only the payments it made: another's is not found; members, lists, disputes and refunds stay closed.
    other = await admin.json("POST", "/v1/payments", 201,
                             json=payment_body(demo["payment_types"]["Water"], amount=5000))
    await erp.json("GET", f"/v1/payments/{other['id']}", 404)
    await erp.json("GET", f"/v1/payments/{other['id']}/status", 404)
    member = demo["members"]["+250788000001"]
    for path in ("/v1/members", f"/v1/members/{member}", "/v1/payments", "/v1/disputes", "/v1/refunds"):
        await erp.json("GET", path, 403)
    # Nor does it open disputes (which answer with the payment's member and text the member), on any payment.
    for payment in (other, made):
        await erp.json("POST", "/v1/disputes", 403, json={"paymentId": payment["id"], "reason": "OTHER"})
    assert (await desk.json("GET", "/v1/disputes", 200))["data"] == []
    listed = await desk.json("GET", "/v1/payments", 200)
    assert {p["id"] for p in listed["data"]} == {made["id"], other["id"]}
    await desk.json("POST", "/v1/payments", 403, json=payment_body(demo["payment_types"]["Water"], amount=5000))
    # The key keeps the scopes it was given: the listing shows those, not what they let it read.
    keys = {k["id"]: k["scopes"] for k in (await admin.json("GET", "/v1/api-keys", 200))["data"]}
    assert keys[writer["id"]] == ["payments:write"] and keys[back_office["id"]] == ["admin"]


async def test_the_document_says_which_routes_refuse_a_key(rt, client, admin):
    """The OpenAPI document's Access line of a route no key may call does not offer keys: it said "or API key with
    admin", and an integrator whose key had admin got 403 "are managed by signed-in administrators"."""
    made = await admin.json("POST", "/v1/api-keys", 201,
                            json={"name": "all", "scopes": ["admin", "payments:read", "payments:write"]})
    key = Caller(client, {"X-API-Key": made["key"]})
    document = await (await client.get("/v1/openapi.json")).json()
    signed_in = {("post", "/v1/api-keys"), ("get", "/v1/api-keys"), ("delete", "/v1/api-keys/{id}"),
                 ("post", "/v1/users"), ("get", "/v1/users"), ("patch", "/v1/users/{id}"),
                 ("delete", "/v1/users/{id}"), ("post", "/v1/auth/password")}
    for method, path in signed_in:
        operation = document["paths"][path][method]
        assert "API key is refused" in operation["description"], (method, path)
        assert "API key with" not in operation["description"], (method, path)
        assert operation["security"] == [{"bearerAuth": []}], (method, path)
    # Every other route that takes credentials still offers a key, and the ones named here do refuse one.
    offered = {(m, p) for p, ops in document["paths"].items() for m, op in ops.items() if {"apiKey": []} in
               op.get("security", [])}
    assert not offered & signed_in and ("post", "/v1/payments") in offered
    await key.json("POST", "/v1/auth/password", 403,
                   json={"currentPassword": "whatever-it-is", "newPassword": "a-new-long-password"})
    await key.json("GET", "/v1/api-keys", 403)


async def test_a_key_manages_no_keys_and_no_accounts(rt, client, admin, demo):
    """A key with every scope still cannot mint, list or revoke keys, nor list, make, change or remove accounts: a
    leaked key could otherwise make itself permanent, or an account to sign in with."""
    made = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ours", "scopes": ["admin"]})
    key = Caller(client, {"X-API-Key": made["key"]})
    user = (await admin.json("GET", "/v1/users", 200))["data"][0]["id"]
    for method, path, body in (
        ("POST", "/v1/api-keys", {"name": "forever", "scopes": ["admin"]}),
        ("GET", "/v1/api-keys", None),
        ("DELETE", f"/v1/api-keys/{made['id']}", None),
        ("POST", "/v1/users", {"username": "mole@kh.rw", "password": "a-long-password-1", "role": "COOP_ADMIN"}),
        ("GET", "/v1/users", None),
        ("PATCH", f"/v1/users/{user}", {"password": "taken-over-password"}),
        ("DELETE", f"/v1/users/{user}", None),
    ):
        refused = await key.json(method, path, 403, **({"json": body} if body else {}))
        assert refused["message"].endswith("are managed by signed-in administrators"), (method, path)
    async with rt.sessionmaker() as s:
        assert [k.id for k in (await s.execute(select(ApiKey))).scalars()] == [made["id"]]
        assert (await s.get(ApiKey, made["id"])).revoked_at is None
        assert (await s.execute(select(AdminUser).where(AdminUser.username == "mole@kh.rw"))).first() is None
