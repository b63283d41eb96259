"""PATCH /v1/webhook-endpoints/{id} through HTTP: events and URL changed with the registration's checks, the secret
and deliveries kept, audited; deliveries pending for an event no longer asked for are given up, and the next
delivery goes to the new URL."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, WebhookDelivery, WebhookEndpoint
from tests.conftest import drain
from tests.core import test_webhooks
from tests.core.test_webhooks import Receiver, approved_endpoint, emit

receiver = test_webhooks.receiver  # the fixture: a cooperative's receiver on 127.0.0.1
DOMAIN = "erp.kigali-heights.rw"
URL = f"https://{DOMAIN}/hooks/payments"


async def _registered(admin: Any, superadmin: Any, events: list[str] | None = None) -> dict[str, Any]:
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": DOMAIN})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    return await admin.json("POST", "/v1/webhook-endpoints", 201,
                            json={"url": URL, "events": events or ["payment.completed", "refund.completed"]})


async def _row(rt: Any, endpoint_id: str) -> WebhookEndpoint:
    async with rt.sessionmaker() as session:
        row = await session.get(WebhookEndpoint, endpoint_id)
    assert row is not None
    return row


async def _updates(rt: Any) -> list[AuditEvent]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(select(AuditEvent).where(
            AuditEvent.action == "webhook_endpoint.updated").order_by(AuditEvent.id))).scalars())


async def _statuses(rt: Any) -> dict[str, str]:
    async with rt.sessionmaker() as session:
        return dict((await session.execute(select(WebhookDelivery.event_id, WebhookDelivery.status))).all())


def _as_deployed(rt: Any, monkeypatch: Any) -> None:
    """The URL rules as on PostgreSQL (https, public host names), whichever database the suite runs on."""
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="postgresql+asyncpg://x/y"))


async def test_events_and_url_change_keeping_the_secret_audited(admin, superadmin, rt, demo):
    created = await _registered(admin, superadmin)
    secret = created["secret"]
    changed = await admin.json("PATCH", f"/v1/webhook-endpoints/{created['id']}", 200,
                               json={"events": ["refund.failed", "payment.failed"],
                                     "url": f"https://{DOMAIN}/hooks/v2"})
    # Stored in EVENTS order, as at registration; no secret in the answer.
    assert changed["events"] == ["payment.failed", "refund.failed"]
    assert changed["url"] == f"https://{DOMAIN}/hooks/v2"
    assert changed["status"] == "ACTIVE" and "secret" not in changed
    row = await _row(rt, created["id"])
    assert (row.url, row.events) == (f"https://{DOMAIN}/hooks/v2", ["payment.failed", "refund.failed"])
    assert webhooks.endpoint_secret(rt.cipher, row) == secret  # the same secret: nothing to redistribute
    assert (await admin.json("GET", f"/v1/webhook-endpoints/{created['id']}", 200))["events"] == changed["events"]

    # One field alone leaves the other as it is.
    only_events = await admin.json("PATCH", f"/v1/webhook-endpoints/{created['id']}", 200,
                                   json={"events": ["dispute.opened"]})
    assert only_events["url"] == f"https://{DOMAIN}/hooks/v2" and only_events["events"] == ["dispute.opened"]
    # A super admin may change any cooperative's endpoint, as on the neighbouring routes.
    by_super = await superadmin.json("PATCH", f"/v1/webhook-endpoints/{created['id']}", 200, json={"url": URL})
    assert by_super["url"] == URL and by_super["events"] == ["dispute.opened"]

    first, second, third = await _updates(rt)
    assert (first.entity_type, first.entity_id, first.cooperative_id) == (
        "webhook_endpoint", created["id"], demo["cooperative_id"])
    assert first.before == {"url": URL, "events": ["payment.completed", "refund.completed"]}
    assert first.after == {"url": f"https://{DOMAIN}/hooks/v2", "events": ["payment.failed", "refund.failed"],
                           "droppedDeliveries": 0}
    assert second.before["events"] == ["payment.failed", "refund.failed"]
    assert second.after["events"] == ["dispute.opened"]
    assert third.actor.startswith("admin:") and third.actor != first.actor  # the super admin's own row
    assert third.after["url"] == URL
    for audit in (first, second, third):
        assert secret not in str(audit.before) + str(audit.after)
        assert row.secret_enc not in str(audit.before) + str(audit.after)


async def test_refusals_change_nothing(admin, superadmin, tenant, rt, demo, coop_b, monkeypatch):
    _as_deployed(rt, monkeypatch)
    created = await _registered(admin, superadmin)
    path = f"/v1/webhook-endpoints/{created['id']}"
    for body, expected in (
        ({}, "body must contain at least one field"),
        ({"events": []}, "events must contain at least 1 item"),
        ({"events": ["nope"]}, "events.0 must be one of: payment.completed"),
        ({"events": ["payment.failed", "payment.failed"]}, "events must not contain duplicates"),
        ({"events": "payment.failed"}, "events must be an array"),
        ({"url": f"https://{DOMAIN}/" + "x" * 500}, "url must be at most 500 characters"),
        ({"url": "short"}, "url must be at least 8 characters"),
        ({"url": None}, "url must be a string"),
        ({"cooperativeId": coop_b["cooperative_id"], "events": ["payment.failed"]},
         "property cooperativeId should not exist"),
        ({"secret": "whsec_mine", "events": ["payment.failed"]}, "property secret should not exist"),
    ):
        refused = await admin.json("PATCH", path, 400, json=body)
        assert refused["statusCode"] == 400 and refused["error"] == "Bad Request", body
        assert refused["message"][0].startswith(expected), (body, refused)
    for url, expected in (
        (f"http://{DOMAIN}/h", "webhook url must use https"),
        (f"https://user:pw@{DOMAIN}/h", "webhook url must not carry credentials"),
        (f"https://{DOMAIN}/h#frag", "webhook url must not have a #fragment"),
        ("https://10.0.0.1/h", "not IP addresses"),
        ("https://localhost/h", "not IP addresses or localhost"),
    ):
        refused = await admin.json("PATCH", path, 400, json={"url": url})
        assert refused["message"][0].startswith(expected) or expected in refused["message"][0], (url, refused)
    # A domain not approved for this cooperative: unknown, pending, or approved for B only.
    refused = await admin.json("PATCH", path, 403, json={"url": "https://other.example.rw/h"})
    assert refused["message"] == ("domain other.example.rw is not approved: request it and have a super admin "
                                  "approve it first")
    await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "pending.example.rw"})
    refused = await admin.json("PATCH", path, 403, json={"url": "https://pending.example.rw/h"})
    assert "pending approval" in refused["message"]
    b_domain = await coop_b["admin"].json("POST", "/v1/webhook-domains", 201, json={"domain": "b.example.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{b_domain['id']}/approve", 200)
    await admin.json("PATCH", path, 403, json={"url": "https://b.example.rw/h"})
    # Another cooperative's admin finds no such endpoint; a tenant may not call the route at all.
    hidden = await coop_b["admin"].json("PATCH", path, 404, json={"events": ["payment.failed"]})
    assert hidden["message"] == "webhook endpoint not found"
    await tenant.json("PATCH", path, 403, json={"events": ["payment.failed"]})
    await admin.json("PATCH", "/v1/webhook-endpoints/00000000-0000-0000-0000-000000000000", 404,
                     json={"events": ["payment.failed"]})

    row = await _row(rt, created["id"])
    assert (row.url, row.events) == (URL, ["payment.completed", "refund.completed"])
    assert await _updates(rt) == []


async def test_put_is_not_a_route(admin, superadmin):
    created = await _registered(admin, superadmin)
    resp = await admin.req("PUT", f"/v1/webhook-endpoints/{created['id']}", json={"events": ["payment.failed"]})
    assert resp.status == 405


async def test_an_event_taken_off_is_given_up_and_the_new_url_gets_the_next_delivery(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, aiohttp_server: Any, monkeypatch: Any
) -> None:
    from aiohttp import web

    old_hook, old_url = receiver
    new_hook = Receiver()
    app = web.Application()
    app.router.add_post("/v2", new_hook.handle)
    new_url = str((await aiohttp_server(app)).make_url("/v2"))
    coop = demo["cooperative_id"]
    endpoint, secret = await approved_endpoint(rt, coop, old_url, events=["payment.completed", "refund.completed"])
    old_hook.answers = [503, 503]  # down: both events are pending a retry when the endpoint is changed
    await emit(rt, coop, "payment.completed", "evt_paid")
    await emit(rt, coop, "refund.completed", "evt_refund")
    await drain(worker)
    assert len(old_hook.requests) == 2
    assert await _statuses(rt) == {"evt_paid": "PENDING", "evt_refund": "PENDING"}

    # A receiver on 127.0.0.1 is allowed by the embedded default's rules (one machine, trying it out) only.
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="sqlite+aiosqlite:///x.db"))
    changed = await admin.json("PATCH", f"/v1/webhook-endpoints/{endpoint.id}", 200,
                               json={"events": ["refund.completed"], "url": new_url})
    monkeypatch.undo()
    assert changed["url"] == new_url and changed["events"] == ["refund.completed"]
    assert changed["consecutiveFailures"] == 0  # the old URL's failures are not the new one's
    assert await _statuses(rt) == {"evt_paid": "FAILED", "evt_refund": "PENDING"}
    [audit] = await _updates(rt)
    assert audit.after["droppedDeliveries"] == 1

    await emit(rt, coop, "payment.completed", "evt_paid_after")  # no longer asked for: not recorded
    await emit(rt, coop, "refund.completed", "evt_refund_after")
    async with rt.sessionmaker.begin() as session:  # the pending retries come due
        await session.execute(update(OutboxJob).where(OutboxJob.status == "PENDING")
                              .values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)

    assert len(old_hook.requests) == 2  # nothing more to the old URL
    sent = sorted(request["headers"]["X-Gateway-Event-Id"] for request in new_hook.requests)
    assert sent == ["evt_refund", "evt_refund_after"]
    for request in new_hook.requests:  # signed with the secret it always had
        assert webhooks.verify_signature(secret, request["headers"]["X-Gateway-Signature"], request["body"])
    assert await _statuses(rt) == {"evt_paid": "FAILED", "evt_refund": "DELIVERED", "evt_refund_after": "DELIVERED"}


async def test_held_deliveries_of_an_event_taken_off_are_not_resumed(admin, rt, demo, receiver, worker):
    """An endpoint switched off after failures holds its deliveries; a change of its events gives up those of
    events it no longer gets, and enabling it sends only the others."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed", "payment.failed"])
    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    for event_type, event_id in (("payment.completed", "evt_kept"), ("payment.failed", "evt_dropped"),
                                 ("payment.voided", "evt_follows")):
        assert await webhooks.fan_out(rt, {"event_type": event_type, "cooperative_id": coop,
                                           "event_id": event_id}) == 1
    changed = await admin.json("PATCH", f"/v1/webhook-endpoints/{endpoint.id}", 200,
                               json={"events": ["payment.completed"]})
    assert changed["status"] == "DISABLED"  # still switched off: enabling it is a decision of its own
    # payment.voided follows payment.completed, which it still asks for: kept.
    assert await _statuses(rt) == {"evt_kept": "PENDING", "evt_dropped": "FAILED", "evt_follows": "PENDING"}
    await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/enable", 200)
    await drain(worker)
    assert sorted(r["headers"]["X-Gateway-Event-Id"] for r in hook.requests) == ["evt_follows", "evt_kept"]


async def test_a_delivery_recorded_as_its_event_was_taken_off_is_not_sent(rt, demo, receiver, worker):
    """fan_out read the endpoint's events just before they changed and recorded a delivery after the change
    gave up the others: its job finds the event no longer asked for and gives it up too."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.completed", "refund.completed"])
    await webhooks.fan_out(rt, {"event_type": "payment.completed", "cooperative_id": coop, "event_id": "evt_late"})
    async with rt.sessionmaker.begin() as s:  # the change, committed between the two
        await s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id)
                        .values(events=["refund.completed"]))
    await drain(worker)
    assert hook.requests == []
    async with rt.sessionmaker() as s:
        delivery = (await s.execute(select(WebhookDelivery))).scalar_one()
    assert delivery.status == "FAILED"
    assert [a["error"] for a in delivery.attempts] == ["event no longer subscribed"]


def test_what_an_endpoint_still_gets() -> None:
    """A delivery does not keep the `follows` its event came with: an event that may follow another is kept while
    the endpoint asks for any event it can follow."""
    still = webhooks.still_subscribed
    assert still(["payment.completed"], "payment.completed")
    assert not still(["payment.completed"], "payment.failed")
    assert still(["payment.completed"], "payment.voided")  # FOLLOWS
    assert still(["payment.failed"], "payment.taken_after_failure")
    assert not still(["refund.failed"], "payment.voided")
    for reported in ("payment.paid_twice", "payment.unconfirmed_success"):
        for told in webhooks.TOLD:
            assert still([told], reported)
        assert not still(["refund.completed", "dispute.opened"], reported)


async def test_money_taken_after_a_void_reaches_the_endpoints_told_of_the_payment(rt, demo, receiver, worker):
    """payment.taken_after_void follows payment.voided (its job's `follows`): an endpoint that asked for
    payment.voided, or payment.completed which that follows, is sent it, not given it up at delivery as an event no
    longer asked for; and a change of its events that keeps payment.voided keeps it pending."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url, events=["payment.voided"])
    assert await webhooks.fan_out(rt, {"event_type": "payment.taken_after_void", "cooperative_id": coop,
                                       "event_id": "evt_taken", "follows": ["payment.voided"]}) == 1
    await drain(worker)
    assert [r["headers"]["X-Gateway-Event-Id"] for r in hook.requests] == ["evt_taken"]
    assert await _statuses(rt) == {"evt_taken": "DELIVERED"}

    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    assert await webhooks.fan_out(rt, {"event_type": "payment.taken_after_void", "cooperative_id": coop,
                                       "event_id": "evt_held", "follows": ["payment.voided"]}) == 1
    async with rt.sessionmaker.begin() as s:
        await webhooks.update_endpoint(s, endpoint_id=endpoint.id, cooperative_id=coop, actor=test_webhooks.ADMIN,
                                       events=["payment.voided", "refund.completed"])
    assert (await _statuses(rt))["evt_held"] == "PENDING"
    assert webhooks.still_subscribed(["payment.completed"], "payment.taken_after_void")
    assert not webhooks.still_subscribed(["payment.failed"], "payment.taken_after_void")
