"""Who may call each route, walked over the route table: a route added without a line in ACCESS fails here, so
its access is decided, not inherited. Every caller a route does not let in is answered 403 (no caller at all:
401), before anything is looked up; and every {id} route answers another cooperative's id, to each of that
cooperative's callers it lets in, with 404, exactly as it answers an id that does not exist."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from admin_api import all_routes
from tests.admin_api.conftest import Caller, make_payment
from tests.admin_api.test_cross_cooperative import BODIES, _resources_of_a
from tests.security.conftest import snapshot

# The callers, one letter each, from the highest role down: S super admin, A a cooperative's admin (signed in),
# K an API key with the admin scope, R a key with payments:read, W a key with payments:write (reads only the
# payments it made), T a tenant (a member's own login). There is no read-only staff role: a read-only system
# gets an R key.
CALLERS = "SAKRWT"
PUBLIC = None  # no credentials asked: sign-in, refresh, the OpenAPI document and its page
STAFF = "SAK"  # the default for a cooperative's administration: signed in or an admin key
# Each route and the callers it lets in. Lines that differ from STAFF say why.
ACCESS: dict[tuple[str, str], str | None] = {
    ("POST", "/auth/token"): PUBLIC,
    ("POST", "/auth/refresh"): PUBLIC,
    ("POST", "/auth/password"): "SAT",  # an account's own password: signed-in accounts only, no key
    ("POST", "/api-keys"): "SA",  # keys and accounts are managed by signed-in administrators, never by a key
    ("GET", "/api-keys"): "SA",
    ("DELETE", "/api-keys/{id}"): "SA",
    ("POST", "/payments"): "SAWT",  # payments:write (an admin key does not make payments)
    ("GET", "/payments"): "SAKRT",  # a tenant: her own; W reads only the payments it made, by id
    ("GET", "/payments/{id}"): "SAKRWT",
    ("POST", "/payments/{id}/outcome"): STAFF,
    ("POST", "/payments/{id}/review"): STAFF,
    ("POST", "/payments/recorded"): STAFF,
    ("POST", "/payments/{id}/gateway-reference"): STAFF,
    ("POST", "/payments/{id}/cancel"): STAFF,
    ("POST", "/payments/{id}/void"): STAFF,
    ("GET", "/payments/{id}/status"): "SAKRWT",
    ("GET", "/members/{id}/transactions"): "SAKRT",
    ("POST", "/payments/{id}/refunds"): STAFF,
    ("GET", "/payments/{id}/refunds"): "SAKR",
    ("GET", "/refunds"): "SAKR",
    ("GET", "/refunds/{id}"): "SAKR",
    ("POST", "/refunds/{id}/outcome"): STAFF,
    ("POST", "/refunds/{id}/cancel"): STAFF,
    ("POST", "/payment-types"): STAFF,
    ("GET", "/payment-types"): "SAKRT",  # what a member may pay is hers to read
    ("GET", "/payment-types/active"): "SAKRT",
    ("GET", "/payment-types/{id}"): "SAKRT",
    ("PATCH", "/payment-types/{id}"): STAFF,
    ("DELETE", "/payment-types/{id}"): STAFF,
    ("POST", "/cooperatives"): "S",  # cooperatives are made, changed and suspended by the gateway's staff
    ("GET", "/cooperatives"): STAFF,
    ("GET", "/cooperatives/{id}"): STAFF,
    ("PATCH", "/cooperatives/{id}"): "S",
    ("DELETE", "/cooperatives/{id}"): "S",
    ("POST", "/members"): STAFF,
    ("GET", "/members"): STAFF,  # the list and search are admin's; one member by her id is payments:read's
    ("POST", "/members/import"): STAFF,
    ("GET", "/members/{id}"): "SAKRT",
    ("PATCH", "/members/{id}"): STAFF,
    ("DELETE", "/members/{id}"): STAFF,
    ("POST", "/members/{id}/approve"): STAFF,
    ("POST", "/members/{id}/release-phone"): STAFF,
    ("POST", "/members/{id}/erase"): STAFF,
    ("GET", "/members/{id}/messages"): STAFF,
    ("GET", "/payments/{id}/messages"): STAFF,
    ("POST", "/payments/{id}/receipt"): STAFF,
    ("GET", "/payments/{id}/callbacks"): STAFF,
    ("GET", "/refunds/{id}/callbacks"): STAFF,
    # A member disputes her payment; a key opens disputes only with payments:write and payments:read together
    # (W alone only makes payments), which no single-scope key here has.
    ("POST", "/disputes"): "SAT",
    ("GET", "/disputes"): "SAKRT",
    ("GET", "/disputes/{id}"): "SAKRT",
    ("POST", "/disputes/{id}/transitions"): STAFF,
    ("GET", "/reports/reconciliation"): STAFF,
    ("GET", "/reports/payments.csv"): STAFF,
    ("GET", "/reports/refunds.csv"): STAFF,
    ("GET", "/reports/dues"): STAFF,
    ("GET", "/reports/dues.csv"): STAFF,
    ("GET", "/audit-events"): STAFF,
    ("POST", "/webhook-domains"): STAFF,
    ("GET", "/webhook-domains"): STAFF,
    ("POST", "/webhook-domains/{id}/approve"): "S",  # a domain is approved by the gateway's staff
    ("POST", "/webhook-domains/{id}/reject"): "S",
    ("POST", "/webhook-endpoints"): STAFF,
    ("GET", "/webhook-endpoints"): STAFF,
    ("GET", "/webhook-endpoints/{id}"): STAFF,
    ("PATCH", "/webhook-endpoints/{id}"): STAFF,
    ("DELETE", "/webhook-endpoints/{id}"): STAFF,
    ("POST", "/webhook-endpoints/{id}/enable"): STAFF,
    ("POST", "/webhook-endpoints/{id}/rotate-secret"): STAFF,
    ("GET", "/webhook-endpoints/{id}/deliveries"): STAFF,
    ("GET", "/jobs"): STAFF,
    ("POST", "/jobs/{id}/replay"): STAFF,
    ("POST", "/jobs/{id}/discard"): STAFF,
    ("POST", "/jobs/replay"): STAFF,
    ("POST", "/jobs/discard"): STAFF,
    ("GET", "/provider-callbacks"): STAFF,
    ("POST", "/provider-callbacks/{id}/resolve"): STAFF,
    ("POST", "/users"): "SA",
    ("GET", "/users"): "SA",
    ("PATCH", "/users/{id}"): "SA",
    ("DELETE", "/users/{id}"): "SA",
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
}


@pytest.fixture(autouse=True)
def _generous_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of calls must reach the routes, not the rate limiter (read when the app is built)."""
    monkeypatch.setenv("RATE_LIMIT_MULTIPLIER", "1000")


async def _keys(client: Any, admin: Caller) -> dict[str, Caller]:
    """The cooperative's API keys by letter (K, R, W), made by its admin."""
    keys = {}
    for letter, scope in (("K", "admin"), ("R", "payments:read"), ("W", "payments:write")):
        made = await admin.json("POST", "/v1/api-keys", 201, json={"name": f"key {letter}", "scopes": [scope]})
        keys[letter] = Caller(client, {"X-API-Key": made["key"]})
    return keys


def test_every_route_has_its_access_decided() -> None:
    routes = {(r.method, r.path): r for r in all_routes()}
    assert set(routes) == set(ACCESS), (
        f"add to ACCESS: {sorted(set(routes) - set(ACCESS))}; gone: {sorted(set(ACCESS) - set(routes))}")
    for key, route in routes.items():
        assert (route.scope is None) == (ACCESS[key] is PUBLIC), key


def _comparable(status: int, body: Any) -> tuple[int, Any]:
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("timestamp", "path", "requestId")}
    return status, body


async def _answer(caller: Caller, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    resp = await caller.req(method, url, **kw)
    text = await resp.text()
    return _comparable(resp.status, await resp.json() if text.startswith("{") else text)


async def test_every_route_refuses_the_callers_it_does_not_let_in(client: Any, rt: Any, admin: Caller,
                                                                  superadmin: Caller, tenant: Caller) -> None:
    callers = {"S": superadmin, "A": admin, "T": tenant, **await _keys(client, admin)}
    anonymous = Caller(client, {})
    before = await snapshot(rt)
    refused = 0
    for route in all_routes():
        allowed = ACCESS[(route.method, route.path)]
        if allowed is PUBLIC:
            continue
        url = "/v1" + route.path.replace("{id}", str(uuid.uuid4()))
        kw = {"json": BODIES[(route.method, route.path)]} if (route.method, route.path) in BODIES else {}
        status, body = await _answer(anonymous, route.method, url, **kw)
        assert status == 401, (route.method, route.path, status, body)
        for letter in CALLERS:
            status, body = await _answer(callers[letter], route.method, url, **kw)
            if letter in allowed:
                # Let in: whatever it then says of a missing id or an empty body, not that the caller may not (nor
                # a 5xx: a route that fails everyone it lets in passed).
                assert status not in (401, 403) and status < 500, (letter, route.method, route.path, status, body)
            else:
                assert status == 403, (letter, route.method, route.path, status, body)
                refused += 1
    assert refused > 150
    assert await snapshot(rt) == before  # nothing was made or changed on the way


async def test_another_cooperatives_ids_are_missing_to_each_of_its_callers(client: Any, rt: Any, admin: Caller,
                                                                           superadmin: Caller, demo: Any,
                                                                           coop_b: Any) -> None:
    """B's admin, B's admin key and B's reading key, naming A's ids on every {id} route: 403 where the route does
    not let that caller in at all; else 404, the very answer an id that does not exist gets; A's rows unchanged."""
    ids = await _resources_of_a(admin, superadmin, rt, demo)
    b = {"A": coop_b["admin"], **await _keys(client, coop_b["admin"])}
    before = await snapshot(rt)
    missing = str(uuid.uuid4())
    compared = 0
    for route in all_routes():
        if "{id}" not in route.path:
            continue
        allowed = ACCESS[(route.method, route.path)] or ""
        kw = {"json": BODIES[(route.method, route.path)]} if (route.method, route.path) in BODIES else {}
        for letter, caller in b.items():
            real = await _answer(caller, route.method, "/v1" + route.path.replace("{id}", ids[route.path]), **kw)
            if letter not in allowed:
                assert real[0] == 403, (letter, route.method, route.path, real)
                continue
            assert real[0] == 404, (letter, route.method, route.path, real)
            assert real == await _answer(caller, route.method, "/v1" + route.path.replace("{id}", missing), **kw), (
                letter, route.method, route.path)
            compared += 1
    assert compared > 60
    assert await snapshot(rt) == before


async def test_a_key_is_told_it_is_refused_before_its_body_is_read(client: Any, admin: Caller, demo: Any) -> None:
    """A key on a route for signed-in users, or one lacking a scope the route needs as well, is refused for what it
    is, whatever it sends: it was told its body lacked fields (400), and a key without admin to get admin on
    POST /v1/api-keys, which refuses every key."""
    keys = await _keys(client, admin)
    for letter in "KRW":
        for method, path in (("POST", "/v1/api-keys"), ("POST", "/v1/users"), ("POST", "/v1/auth/password")):
            refused = await keys[letter].json(method, path, 403, json={})
            assert refused["code"] == "FORBIDDEN", (letter, path, refused)
        assert (await keys[letter].json("POST", "/v1/api-keys", 403))["message"] == (
            "API keys are managed by signed-in administrators")
        assert (await keys[letter].json("PATCH", f"/v1/users/{uuid.uuid4()}", 403, json={}))["message"] == (
            "accounts are managed by signed-in administrators")
    # payments:write makes payments but opens no dispute: it needs payments:read too, named whatever the body.
    refused = await keys["W"].json("POST", "/v1/disputes", 403, json={})
    assert (refused["code"], refused["message"]) == (
        "SCOPE_MISSING", "Forbidden resource: this API key lacks the payments:read scope")
    # With payments:read as well (or admin, which implies it) the same key opens one, on the payment it made.
    for scopes in (["payments:write", "payments:read"], ["payments:write", "admin"]):
        both = await admin.json("POST", "/v1/api-keys", 201, json={"name": " + ".join(scopes), "scopes": scopes})
        key = Caller(client, {"X-API-Key": both["key"]})
        paid = await make_payment(key, demo["payment_types"]["Water"], amount=5000)
        await key.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    document = await (await client.get("/v1/openapi.json")).json()
    assert document["paths"]["/v1/disputes"]["post"]["description"].startswith(
        "Access: payments:write and payments:read (a key needs both)")
    # And a payments:write key reads the payments it made, as the document says (it said payments:read alone).
    made = await make_payment(keys["W"], demo["payment_types"]["Water"], amount=5000)
    for path in ("/v1/payments/{id}", "/v1/payments/{id}/status"):
        assert document["paths"][path]["get"]["description"].startswith(
            "Access: payments:read, or payments:write for the payments that key made (any other is 404)"), path
        await keys["W"].json("GET", path.replace("{id}", made["id"]), 200)


async def test_filters_naming_another_cooperatives_ids_list_nothing(client: Any, rt: Any, admin: Caller,
                                                                     superadmin: Caller, demo: Any,
                                                                     coop_b: Any) -> None:
    """B's admin and B's admin key filtering by A's ids (its type, member, payment, refund, cooperative) get an
    empty list, as for ids that do not exist, never A's rows; one that names a thing to read (the dues of a type,
    an import's cooperative) is 404 exactly as a missing one."""
    ids = await _resources_of_a(admin, superadmin, rt, demo)
    rent, member, payment = demo["payment_types"]["Monthly Rent"], demo["members"]["+250788000001"], ids[
        "/payments/{id}"]
    coop = demo["cooperative_id"]
    listed = [
        f"/v1/payments?paymentTypeId={rent}", f"/v1/payments?member={member}", f"/v1/payments?cooperativeId={coop}",
        f"/v1/refunds?cooperativeId={coop}", f"/v1/disputes?paymentId={payment}", f"/v1/disputes?member={member}",
        f"/v1/payment-types?cooperativeId={coop}", f"/v1/members?cooperativeId={coop}",
        f"/v1/jobs?paymentId={payment}", f"/v1/jobs?refundId={ids['/refunds/{id}']}",
        f"/v1/audit-events?entityId={payment}", f"/v1/audit-events?entityId={member}&entityType=member",
        f"/v1/audit-events?cooperativeId={coop}",
    ]
    for url in listed:  # there is something of A's to find
        assert (await superadmin.json("GET", url, 200))["meta"]["total"] > 0, url
    b = {"A": coop_b["admin"], **await _keys(client, coop_b["admin"])}
    for caller in (b["A"], b["K"]):
        for url in listed:
            page = await caller.json("GET", url, 200)
            assert (page["data"], page["meta"]["total"]) == ([], 0), url
        for export in (f"payments.csv?paymentTypeId={rent}&member={member}", f"refunds.csv?cooperativeId={coop}"):
            resp = await caller.req("GET", f"/v1/reports/{export}")
            assert resp.status == 200 and len((await resp.text()).strip().splitlines()) == 1, export  # the header
        for url, kw in (("/v1/reports/dues?paymentTypeId={}&period=2026-12-01", {}),
                        ("/v1/payment-types/active?cooperativeId={}", {}),
                        ("/v1/members/import?cooperativeId={}", {"data": b"name,phone\nEve,+250788111222\n",
                                                                 "headers": {"Content-Type": "text/csv"}})):
            real = rent if "paymentTypeId" in url else coop
            seen = await _answer(caller, "POST" if "import" in url else "GET", url.format(real), **kw)
            assert seen[0] == 404 and seen == await _answer(
                caller, "POST" if "import" in url else "GET", url.format(uuid.uuid4()), **kw), (url, seen)
