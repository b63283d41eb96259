"""Webhook domains and endpoints through HTTP: request, super-admin approval, register, disable, scoping."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from core import webhooks
from core.models import ApprovedDomain, AuditEvent, WebhookEndpoint
from core.webhooks import endpoint_secret
from tests.conftest import requires_pg, waiting_for_locks


async def test_domain_approval_then_endpoint(admin, superadmin, rt, demo):
    url = "https://erp.kigali-heights.rw/hooks/payments"
    refused = await admin.json(
        "POST", "/v1/webhook-endpoints", 403, json={"url": url, "events": ["payment.completed"]}
    )
    assert "not approved" in refused["message"]
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "erp.kigali-heights.rw"})
    assert domain["status"] == "PENDING"
    pending = await admin.json(
        "POST", "/v1/webhook-endpoints", 403, json={"url": url, "events": ["payment.completed"]}
    )
    assert "pending approval" in pending["message"]
    await admin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 403)
    approved = await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    assert approved["status"] == "APPROVED" and approved["decidedAt"]

    created = await admin.json(
        "POST",
        "/v1/webhook-endpoints",
        201,
        json={"url": url, "events": ["refund.completed", "payment.completed"]},
    )
    assert created["secret"].startswith("whsec_") and created["status"] == "ACTIVE"
    async with rt.sessionmaker() as s:
        row = (await s.execute(select(WebhookEndpoint))).scalar_one()
        assert endpoint_secret(rt.cipher, row) == created["secret"]
        assert created["secret"] not in row.secret_enc
    listed = await admin.json("GET", "/v1/webhook-endpoints", 200)
    assert [e["id"] for e in listed["data"]] == [created["id"]] and "secret" not in listed["data"][0]
    disabled = await admin.json("DELETE", f"/v1/webhook-endpoints/{created['id']}", 200)
    assert disabled["status"] == "DISABLED"
    enabled = await admin.json("POST", f"/v1/webhook-endpoints/{created['id']}/enable", 200)
    assert enabled["status"] == "ACTIVE"
    deliveries = await admin.json("GET", f"/v1/webhook-endpoints/{created['id']}/deliveries", 200)
    assert deliveries["meta"]["total"] == 0


async def test_validation(admin, rt):
    bad = await admin.json(
        "POST", "/v1/webhook-endpoints", 400, json={"url": "https://x.rw", "events": ["nope"]}
    )
    assert any(m.startswith("events.0 must be one of") for m in bad["message"])
    if rt.settings.is_embedded:
        return  # the embedded default allows http and local hosts, for trying it out on one machine
    http = await admin.json(
        "POST",
        "/v1/webhook-endpoints",
        400,
        json={"url": "http://erp.example.rw/h", "events": ["payment.completed"]},
    )
    assert http["message"] == ["webhook url must use https"]
    ip = await admin.json("POST", "/v1/webhook-domains", 400, json={"domain": "10.0.0.1"})
    assert "not IP addresses" in ip["message"][0]


async def test_urls_the_sender_cannot_use_are_refused_with_400(admin, superadmin, demo):
    """A URL whose port is no port, with an unclosed "[" or a control character: a 400 naming the url, at
    registration and on PATCH (before: a 500 with a traceback for the "[", and the others stored, each delivery
    then failing unrecorded in the job, never counted towards switching the endpoint off)."""
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "erp.kigali-heights.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    good = "https://erp.kigali-heights.rw/hooks"
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": good, "events": ["payment.failed"]})
    for url in (
        "https://erp.kigali-heights.rw:99999/hooks",
        "https://erp.kigali-heights.rw:abc/hooks",
        "https://erp.kigali-heights.rw:0/hooks",
        "https://[::1/hooks",
        "https://erp.kigali-heights.rw/hooks\r\nX-Injected: 1",
    ):
        for method, path in (("POST", "/v1/webhook-endpoints"), ("PATCH", f"/v1/webhook-endpoints/{endpoint['id']}")):
            refused = await admin.json(method, path, 400, json={"url": url, "events": ["payment.failed"]})
            assert refused["error"] == "Bad Request", (method, url)
            assert refused["message"][0].startswith("webhook url"), (method, url, refused)
    listed = await admin.json("GET", "/v1/webhook-endpoints", 200)
    assert [(e["id"], e["url"]) for e in listed["data"]] == [(endpoint["id"], good)]
    refused = await admin.json("POST", "/v1/webhook-domains", 400, json={"domain": "https://[::1/x"})
    assert refused["message"] == ["'https://[::1/x' is not a valid domain name"]


async def test_one_domain_asked_for_twice_at_once_is_one_request(admin, rt, demo, monkeypatch):
    """A cooperative's setup script that retries its call on a timeout: the two requests for one domain both
    answer 201 with the one row (before: the second read "not asked yet" while the first's row was uncommitted,
    inserted too, and failed on the unique constraint with a 500). The interleaving is forced: the first request
    holds its transaction open (in its audit write) for up to a second, while the second arrives."""
    original, calls = webhooks.record, []

    async def record_held_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        await original(*args, **kwargs)
        if len(calls) == 1:
            await asyncio.sleep(1.0)

    monkeypatch.setattr(webhooks, "record", record_held_once)
    answers = await asyncio.gather(*(
        admin.req("POST", "/v1/webhook-domains", json={"domain": "erp.kigali-heights.rw"}) for _ in range(2)
    ))
    bodies = [await answer.json() for answer in answers]
    assert [answer.status for answer in answers] == [201, 201], bodies
    assert bodies[0]["id"] == bodies[1]["id"] and bodies[0]["status"] == "PENDING"
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(ApprovedDomain.id))).scalars().all()
        requested = (await session.execute(
            select(AuditEvent.entity_id).where(AuditEvent.action == "webhook_domain.requested"))).scalars().all()
    assert rows == [bodies[0]["id"]] and requested == [bodies[0]["id"]]


async def test_domains_and_endpoints_are_scoped(admin, superadmin, coop_b):
    b = coop_b["admin"]
    domain = await b.json("POST", "/v1/webhook-domains", 201, json={"domain": "b.example.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await b.json(
        "POST",
        "/v1/webhook-endpoints",
        201,
        json={"url": "https://b.example.rw/h", "events": ["payment.failed"]},
    )
    assert (await admin.json("GET", "/v1/webhook-domains", 200))["meta"]["total"] == 0
    for method, path in (
        ("GET", f"/v1/webhook-endpoints/{endpoint['id']}"),
        ("DELETE", f"/v1/webhook-endpoints/{endpoint['id']}"),
        ("POST", f"/v1/webhook-endpoints/{endpoint['id']}/enable"),
        ("GET", f"/v1/webhook-endpoints/{endpoint['id']}/deliveries"),
    ):
        await admin.json(method, path, 404)
    # An approved domain of B does not let A register on it.
    await admin.json(
        "POST",
        "/v1/webhook-endpoints",
        403,
        json={"url": "https://b.example.rw/h", "events": ["payment.failed"]},
    )
    assert (await superadmin.json("GET", "/v1/webhook-domains?status=APPROVED", 200))["meta"]["total"] == 1
    rejected = await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/reject", 200)
    assert rejected["status"] == "REJECTED"


async def test_delete_and_enable_of_an_endpoint_switched_off_after_failures(admin, rt, demo):
    """Enable sends what it held while switched off; DELETE makes it deleted: what it has pending fails."""
    from datetime import timedelta

    from core import webhooks
    from core.db import utcnow
    from core.models import OutboxJob, WebhookDelivery
    from tests.core.test_webhooks import approved_endpoint

    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook", events=["payment.completed"])
    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    event = {"event_type": "payment.completed", "cooperative_id": coop, "event_id": "evt_api"}
    assert await webhooks.fan_out(rt, event) == 1  # recorded while switched off
    shown = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert shown["status"] == "DISABLED" and shown["disabledAt"]

    enabled = await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/enable", 200)
    assert enabled["status"] == "ACTIVE" and enabled["disabledAt"] is None
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.deliver"))).scalars().all()
    assert sorted(j.payload["event_id"] for j in jobs if "resumed_at" in j.payload) == ["evt_api"]

    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    deleted = await admin.json("DELETE", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert deleted["status"] == "DISABLED"
    assert await webhooks.fan_out(rt, {**event, "event_id": "evt_after"}) == 0  # deleted: nothing new
    async with rt.sessionmaker() as s:
        rows = {d.event_id: d.status for d in (await s.execute(select(WebhookDelivery))).scalars()}
    assert rows == {"evt_api": "FAILED"}


async def test_deliveries_held_for_a_rejected_domain_say_so(admin, superadmin, rt, demo, worker):
    """The endpoint shows its domain's status, and each PENDING delivery that is not being sent its heldReason."""
    from tests.conftest import drain
    from tests.core.test_webhooks import approved_endpoint

    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook", events=["payment.completed"])
    assert await webhooks.fan_out(rt, {"event_type": "payment.completed", "cooperative_id": coop,
                                       "event_id": "evt_held", "data": {"id": "p1"}}) == 1
    path = f"/v1/webhook-endpoints/{endpoint.id}"
    assert (await admin.json("GET", path, 200))["domainStatus"] == "APPROVED"
    [queued] = (await admin.json("GET", f"{path}/deliveries", 200))["data"]
    assert queued["status"] == "PENDING" and queued["heldReason"] is None

    async with rt.sessionmaker() as s:
        domain_id = (await s.execute(select(ApprovedDomain.id))).scalar_one()
    await superadmin.json("POST", f"/v1/webhook-domains/{domain_id}/reject", 200, json={})
    await drain(worker)
    [held] = (await admin.json("GET", f"{path}/deliveries", 200))["data"]
    assert held["status"] == "PENDING" and held["heldReason"] == "domain_not_approved" and held["attempts"] == []
    assert (await admin.json("GET", path, 200))["domainStatus"] == "REJECTED"
    [listed] = (await admin.json("GET", "/v1/webhook-endpoints", 200))["data"]
    assert listed["domainStatus"] == "REJECTED"

    await superadmin.json("POST", f"/v1/webhook-domains/{domain_id}/approve", 200, json={})
    [resumed] = (await admin.json("GET", f"{path}/deliveries", 200))["data"]
    assert resumed["heldReason"] is None
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.action == "webhook_domain.approved")
                                 .order_by(AuditEvent.id.desc()).limit(1))).scalar_one()
    assert audit.after["resumedDeliveries"] == 1



@requires_pg
async def test_an_endpoint_deleted_while_it_is_enabled_ends_deleted(admin, rt, demo):
    """Two admins at once: one enables an endpoint the worker switched off after failures, the other deletes it.
    Before, the DELETE read it switched off (the enable not yet committed), changed nothing on it and answered
    DISABLED: the enable then left it ACTIVE, sent the events it held and every one after."""
    from datetime import timedelta

    from core.audit import Actor
    from core.db import utcnow
    from core.models import WebhookDelivery
    from tests.core.test_webhooks import approved_endpoint

    actor = Actor("admin:test", "admin")
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, "http://127.0.0.1:9/hook", events=["payment.completed"])
    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    event = {"event_type": "payment.completed", "cooperative_id": coop, "event_id": "evt_held"}
    assert await webhooks.fan_out(rt, event) == 1  # held while switched off

    async def deleted() -> WebhookEndpoint:
        async with rt.sessionmaker.begin() as s:
            return await webhooks.delete_endpoint(s, endpoint_id=endpoint.id, cooperative_id=coop, actor=actor)

    async with rt.sessionmaker.begin() as s:
        await webhooks.enable_endpoint(s, endpoint_id=endpoint.id, cooperative_id=coop, actor=actor)
        deletion = asyncio.create_task(deleted())
        waiting = asyncio.create_task(waiting_for_locks(rt, 1))  # the DELETE waits for the enable, or is done
        await asyncio.wait({deletion, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    answer = await deletion
    assert answer.status == "DISABLED"
    async with rt.sessionmaker() as s:
        assert (await s.get(WebhookEndpoint, endpoint.id)).status == "DISABLED"
        assert [d.status for d in (await s.execute(select(WebhookDelivery))).scalars()] == ["FAILED"]
    assert await webhooks.fan_out(rt, {**event, "event_id": "evt_after"}) == 0
