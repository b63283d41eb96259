"""Rotating a webhook endpoint's secret over the API: the new secret is shown once, stored encrypted and
audited; for the overlap (24 h by default) deliveries, including those pending at the rotation, are signed
with the new secret and the previous one, so a receiver still on the old secret loses nothing."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, WebhookDelivery, WebhookEndpoint
from tests.conftest import drain
from tests.core import test_webhooks
from tests.core.test_webhooks import approved_endpoint, emit

receiver = test_webhooks.receiver  # the fixture: a cooperative's receiver on 127.0.0.1


def v1_values(header: str) -> list[str]:
    return [part[3:] for part in header.split(",") if part.startswith("v1=")]


def signed_by(secret: str, request: dict[str, Any]) -> str:
    """The v1 value `secret` gives this request's body and timestamp, computed independently."""
    timestamp = request["headers"]["X-Gateway-Signature"].split(",", 1)[0].removeprefix("t=")
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + request["body"], hashlib.sha256).hexdigest()


async def _endpoint(rt: Any, endpoint_id: str) -> WebhookEndpoint:
    async with rt.sessionmaker() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
    assert endpoint is not None
    return endpoint


async def test_rotation_signs_pending_and_new_deliveries_with_both_secrets(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    hook.answers = [503]  # down when the event happens: its retry is pending at the rotation
    endpoint, old = await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_paid")
    await drain(worker)
    assert v1_values(hook.requests[0]["headers"]["X-Gateway-Signature"]) == [signed_by(old, hook.requests[0])]

    resp = await admin.req("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret")
    rotated = await resp.json()
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    until = rotated["previousSecretValidUntil"]
    assert until is not None
    row = await _endpoint(rt, endpoint.id)
    assert row.previous_secret_expires_at is not None
    assert timedelta(hours=23, minutes=59) < row.previous_secret_expires_at - utcnow() <= timedelta(hours=24)
    # Both stored encrypted, the same way as at creation.
    assert webhooks.endpoint_secret(rt.cipher, row) == new
    assert webhooks.signing_secrets(rt.cipher, row) == [new, old]
    for secret in (new, old):
        assert secret not in row.secret_enc and secret not in (row.previous_secret_enc or "")
    # Shown once: reading the endpoint gives no secret.
    got = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert "secret" not in got and got["previousSecretValidUntil"] == until
    async with rt.sessionmaker() as session:
        [audit] = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "webhook_endpoint.secret_rotated"))).scalars().all()
    assert (audit.entity_id, audit.cooperative_id) == (endpoint.id, coop)
    assert audit.after["overlap_seconds"] == 24 * 3600
    assert new not in str(audit.after) and old not in str(audit.after)

    # The pending retry goes out now, signed with the new secret and the old one.
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    await emit(rt, coop, event_id="evt_after")
    await drain(worker)
    assert len(hook.requests) == 3
    for request in hook.requests[1:]:
        header = request["headers"]["X-Gateway-Signature"]
        assert v1_values(header) == [signed_by(new, request), signed_by(old, request)]
        assert webhooks.verify_signature(new, header, request["body"])
        assert webhooks.verify_signature(old, header, request["body"])  # a receiver not switched yet
    async with rt.sessionmaker() as session:
        statuses = dict((await session.execute(select(WebhookDelivery.event_id, WebhookDelivery.status))).all())
    assert statuses == {"evt_paid": "DELIVERED", "evt_after": "DELIVERED"}


async def test_the_previous_secret_stops_signing_when_the_overlap_ends(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, old = await approved_endpoint(rt, coop, url)
    rotated = await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200,
                               json={"overlapHours": 1})
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).values(
            previous_secret_expires_at=utcnow() - timedelta(seconds=1)))
    await emit(rt, coop, event_id="evt_late")
    await drain(worker)
    [request] = hook.requests
    header = request["headers"]["X-Gateway-Signature"]
    assert v1_values(header) == [signed_by(rotated["secret"], request)]
    assert not webhooks.verify_signature(old, header, request["body"])


async def test_zero_overlap_drops_the_old_secret_at_once_and_rotating_again_keeps_one(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, first = await approved_endpoint(rt, coop, url)
    second = (await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200))["secret"]
    third = (await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200))["secret"]
    # Rotating during an overlap: only the secret just replaced still signs.
    assert webhooks.signing_secrets(rt.cipher, await _endpoint(rt, endpoint.id)) == [third, second]
    leaked = await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200,
                              json={"overlapHours": 0})
    assert leaked["previousSecretValidUntil"] is None
    row = await _endpoint(rt, endpoint.id)
    assert row.previous_secret_enc is None
    assert webhooks.signing_secrets(rt.cipher, row) == [leaked["secret"]]
    await emit(rt, coop, event_id="evt_1")
    await drain(worker)
    [request] = hook.requests
    header = request["headers"]["X-Gateway-Signature"]
    assert v1_values(header) == [signed_by(leaked["secret"], request)]
    assert not any(webhooks.verify_signature(s, header, request["body"]) for s in (first, second, third))


async def test_rotation_keeps_a_failing_endpoints_streak(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """updated_at says since when a failing endpoint fails (it is switched off after a day of it)."""
    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    since = utcnow() - timedelta(hours=20)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).values(consecutive_failures=15, updated_at=since))
    await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200)
    row = await _endpoint(rt, endpoint.id)
    assert (row.consecutive_failures, row.updated_at) == (15, since)


async def test_rotation_input_and_access(admin: Any, tenant: Any, rt: Any, demo: dict[str, Any]) -> None:
    endpoint, secret = await approved_endpoint(rt, demo["cooperative_id"], "https://erp.example.rw/h",
                                               embedded=False)
    path = f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret"
    for body in ({"overlapHours": -1}, {"overlapHours": 24 * 7 + 1}, {"overlapHours": "24"}, {"secret": "mine"}):
        await admin.json("POST", path, 400, json=body)
    await tenant.json("POST", path, 403)
    await admin.json("POST", "/v1/webhook-endpoints/00000000-0000-0000-0000-000000000000/rotate-secret", 404)
    row = await _endpoint(rt, endpoint.id)
    assert webhooks.endpoint_secret(rt.cipher, row) == secret and row.previous_secret_enc is None
