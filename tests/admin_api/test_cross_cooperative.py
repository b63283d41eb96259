"""For every route that names a resource, a cooperative admin of B gets 404 for A's resource."""

from __future__ import annotations

from sqlalchemy import select

from admin_api import all_routes
from core.models import AdminUser, AuditEvent, OutboxJob, Payment, ProviderEvent
from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.admin_api.test_recorded_payments import _line

# A schema-valid body for each write route, so that only scoping can refuse the call.
BODIES = {
    ("PATCH", "/payment-types/{id}"): {"amount": 1},
    ("PATCH", "/cooperatives/{id}"): {"name": "Taken over"},
    ("PATCH", "/members/{id}"): {"name": "Taken over"},
    ("PATCH", "/users/{id}"): {"password": "taken-over-password"},
    ("POST", "/payments/{id}/refunds"): {"idempotencyKey": "cross-coop-key"},
    ("POST", "/disputes/{id}/transitions"): {"status": "REJECTED"},
    ("POST", "/refunds/{id}/outcome"): {"status": "COMPLETED", "note": "taken over"},
    ("POST", "/refunds/{id}/cancel"): {"note": "taken over"},
    ("POST", "/jobs/{id}/discard"): {"reason": "taken over"},
    ("POST", "/payments/{id}/outcome"): {"status": "COMPLETED", "providerTransactionId": "TX-B", "note": "taken"},
    ("POST", "/payments/{id}/review"): {"note": "taken over"},
    ("POST", "/webhook-endpoints/{id}/rotate-secret"): {"overlapHours": 0},
    ("PATCH", "/webhook-endpoints/{id}"): {"events": ["payment.failed"]},
    ("POST", "/provider-callbacks/{id}/resolve"): {"note": "taken over"},
    ("POST", "/payments/{id}/gateway-reference"): {"gatewayReference": "5b0f3c1e-8d2a-4f6b-9c7e-1a2b3c4d5e6f"},
    ("POST", "/payments/{id}/cancel"): {"note": "taken over"},
    ("POST", "/payments/{id}/void"): {"note": "taken over"},
}
# Routes only a super admin may call at all: B's admin is stopped earlier, with 403.
SUPER_ONLY = {
    ("PATCH", "/cooperatives/{id}"),
    ("DELETE", "/cooperatives/{id}"),
    ("POST", "/webhook-domains/{id}/approve"),
    ("POST", "/webhook-domains/{id}/reject"),
}


async def _resources_of_a(admin, superadmin, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    payment = await make_payment(admin, rent)
    await complete_payment(rt, payment["id"])
    refund = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"amount": 100, "idempotencyKey": idem()}
    )
    # Recorded from the statement without its request: one a gatewayReference may be given to.
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    dispute = await admin.json(
        "POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"}
    )
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "A", "scopes": ["admin"]})
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "a.example.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json(
        "POST",
        "/v1/webhook-endpoints",
        201,
        json={"url": "https://a.example.rw/h", "events": ["payment.completed"]},
    )
    member = demo["members"]["+250788000001"]
    user = await admin.json(
        "POST",
        "/v1/users",
        201,
        json={"username": "clerk@a.rw", "password": "clerk-password-1", "role": "COOP_ADMIN"},
    )
    async with rt.sessionmaker() as s:
        job_id = (await s.execute(select(OutboxJob.id).where(
            OutboxJob.cooperative_id == demo["cooperative_id"]).limit(1))).scalar_one()
    # A callback that matched no payment: of no cooperative, a super admin's alone.
    unmatched = ProviderEvent(provider="mtn_momo", event_id="cross-coop-unmatched", kind="collection",
                              status="SUCCEEDED", payload={}, outcome="unknown_payment")
    async with rt.sessionmaker.begin() as s:
        s.add(unmatched)
    return {
        "/jobs/{id}/replay": str(job_id),
        "/jobs/{id}/discard": str(job_id),
        "/provider-callbacks/{id}/resolve": unmatched.id,
        "/users/{id}": user["id"],
        "/payments/{id}": payment["id"],
        "/payments/{id}/status": payment["id"],
        "/payments/{id}/outcome": payment["id"],
        "/payments/{id}/review": payment["id"],
        "/payments/{id}/refunds": payment["id"],
        "/payments/{id}/gateway-reference": recorded["id"],
        "/payments/{id}/cancel": payment["id"],
        "/payments/{id}/void": recorded["id"],
        "/refunds/{id}": refund["id"],
        "/refunds/{id}/outcome": refund["id"],
        "/refunds/{id}/cancel": refund["id"],
        "/members/{id}/transactions": member,
        "/members/{id}/messages": member,
        "/payments/{id}/messages": payment["id"],
        "/payments/{id}/receipt": payment["id"],
        "/payments/{id}/callbacks": payment["id"],
        "/refunds/{id}/callbacks": refund["id"],
        "/members/{id}": member,
        "/members/{id}/approve": member,
        "/members/{id}/release-phone": member,
        "/members/{id}/erase": member,
        "/payment-types/{id}": rent,
        "/cooperatives/{id}": demo["cooperative_id"],
        "/disputes/{id}": dispute["id"],
        "/disputes/{id}/transitions": dispute["id"],
        "/api-keys/{id}": key["id"],
        "/webhook-domains/{id}/approve": domain["id"],
        "/webhook-domains/{id}/reject": domain["id"],
        "/webhook-endpoints/{id}": endpoint["id"],
        "/webhook-endpoints/{id}/enable": endpoint["id"],
        "/webhook-endpoints/{id}/rotate-secret": endpoint["id"],
        "/webhook-endpoints/{id}/deliveries": endpoint["id"],
    }


async def test_every_resource_route_hides_other_cooperatives(admin, superadmin, rt, demo, coop_b):
    ids = await _resources_of_a(admin, superadmin, rt, demo)
    b = coop_b["admin"]
    checked = 0
    for route in all_routes():
        if "{id}" not in route.path:
            continue
        assert route.path in ids, f"add {route.method} {route.path} to this test"
        url = "/v1" + route.path.replace("{id}", ids[route.path])
        kw = {"json": BODIES[(route.method, route.path)]} if (route.method, route.path) in BODIES else {}
        expected = 403 if (route.method, route.path) in SUPER_ONLY else 404
        resp = await b.req(route.method, url, **kw)
        assert resp.status == expected, (route.method, route.path, resp.status, await resp.text())
        checked += 1
    assert checked >= 20
    # And A's things are all still there, untouched.
    assert (await admin.json("GET", f"/v1/members/{ids['/members/{id}']}", 200))["name"] == "Aline Uwase"
    assert (await admin.json("GET", f"/v1/disputes/{ids['/disputes/{id}']}", 200))["status"] == "OPEN"
    assert (await admin.json("GET", "/v1/api-keys", 200))["data"][0]["revokedAt"] is None
    recorded = await admin.json("GET", f"/v1/payments/{ids['/payments/{id}/gateway-reference']}", 200)
    assert recorded["gatewayReference"].startswith("recorded:")  # no request given to it
    assert recorded["status"] == "COMPLETED"  # nor voided
    clerk = await admin.client.post("/v1/auth/token", json={"username": "clerk@a.rw", "password": "clerk-password-1"})
    assert clerk.status == 200  # A's account kept its password and is still on
    async with rt.sessionmaker() as s:
        rotated = (await s.execute(select(AuditEvent.id).where(
            AuditEvent.action == "webhook_endpoint.secret_rotated"))).all()
    assert rotated == []  # A's webhook secret too
    endpoint = await admin.json("GET", f"/v1/webhook-endpoints/{ids['/webhook-endpoints/{id}']}", 200)
    assert (endpoint["events"], endpoint["url"], endpoint["status"]) == (
        ["payment.completed"], "https://a.example.rw/h", "ACTIVE")  # nor its events (PATCH) nor its status


async def test_every_list_route_shows_nothing_of_other_cooperatives(admin, superadmin, rt, demo, coop_b):
    await _resources_of_a(admin, superadmin, rt, demo)
    b = coop_b["admin"]
    for path in (
        "/v1/payments",
        "/v1/refunds",
        "/v1/disputes",
        "/v1/api-keys",
        "/v1/webhook-domains",
        "/v1/webhook-endpoints",
        "/v1/audit-events",
        "/v1/jobs",
    ):
        page = await b.json("GET", path, 200)
        assert all(
            item.get("cooperativeId", coop_b["cooperative_id"]) == coop_b["cooperative_id"]
            for item in page["data"]
        ), path
        if path not in ("/v1/audit-events",):
            assert page["meta"]["total"] == 0, path
    members = await b.json("GET", "/v1/members", 200)
    assert {m["cooperativeId"] for m in members["data"]} == {coop_b["cooperative_id"]}
    types = await b.json("GET", "/v1/payment-types?includeInactive=true", 200)
    assert {t["cooperativeId"] for t in types["data"]} == {coop_b["cooperative_id"]}
    coops = await b.json("GET", "/v1/cooperatives", 200)
    assert [c["id"] for c in coops["data"]] == [coop_b["cooperative_id"]]


async def test_user_list_shows_only_the_callers_cooperatives_accounts(admin, coop_b):
    await admin.json("POST", "/v1/users", 201,
                     json={"username": "clerk@a.rw", "password": "clerk-password-1", "role": "COOP_ADMIN"})
    page = await coop_b["admin"].json("GET", "/v1/users", 200)
    assert [(u["username"], u["cooperativeId"]) for u in page["data"]] == [("admin@b.rw", coop_b["cooperative_id"])]
    assert page["meta"]["total"] == 1


async def test_reports_naming_another_cooperative_show_nothing_of_it(admin, superadmin, rt, demo, coop_b):
    """cooperativeId narrows a report within what the caller sees: B's admin naming A gets none of A's money."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"amount": 100, "idempotencyKey": idem()})
    a, b = demo["cooperative_id"], coop_b["admin"]
    seen = await superadmin.json("GET", f"/v1/reports/reconciliation?cooperativeId={a}", 200)
    assert seen["totals"][0]["collected"] == 50000  # there is something of A's to leak
    summary = await b.json("GET", f"/v1/reports/reconciliation?cooperativeId={a}", 200)
    assert summary["payments"]["byStatus"] == [] and summary["totals"] == [] and summary["refunds"] == []
    for export in ("payments.csv", "refunds.csv"):
        resp = await b.req("GET", f"/v1/reports/{export}?cooperativeId={a}")
        assert resp.status == 200
        assert len((await resp.text()).strip().splitlines()) == 1, export  # the header alone


async def test_a_recorded_payment_takes_only_its_cooperatives_type_and_member(superadmin, rt, demo, coop_b):
    async with rt.sessionmaker() as s:
        before = len((await s.execute(select(Payment.id))).all())
    # B's admin naming A's payment type (no member: the payer's number would find one).
    refused = await coop_b["admin"].json("POST", "/v1/payments/recorded", 404,
                                         json=_line(demo, memberId=None, paymentAccount="+250788999001"))
    assert refused["field"] == "paymentTypeId"
    # A super admin recording B's payment naming A's member.
    refused = await superadmin.json("POST", "/v1/payments/recorded", 404, json=_line(
        demo, cooperativeId=coop_b["cooperative_id"], paymentTypeId=coop_b["payment_type_id"], amount=1000))
    assert refused["field"] == "memberId"
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(Payment.id))).all()) == before


async def test_a_tenant_login_is_for_a_member_of_its_own_cooperative(superadmin, rt, demo, coop_b):
    refused = await superadmin.json("POST", "/v1/users", 404, json={
        "username": "tenant@b.rw", "password": "tenant-password-1", "role": "TENANT",
        "cooperativeId": coop_b["cooperative_id"], "memberId": demo["members"]["+250788000001"]})
    assert refused["field"] == "memberId"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(AdminUser.id).where(AdminUser.username == "tenant@b.rw"))).first() is None
