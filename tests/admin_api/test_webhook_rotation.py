"""Rotating a webhook endpoint's secret over the API: the new secret is shown once, stored encrypted and
audited; for the overlap (24 h by default) deliveries, including those pending at the rotation, are signed
with the new secret and the previous one, so a receiver still on the old secret loses nothing."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from admin_api.common import iso
from core import webhooks
from core.db import iso_ms, parse_aware, utcnow
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


def _expiries(row: WebhookEndpoint) -> list[Any]:
    """When each stored previous secret stops signing, as stored (newest first)."""
    return [parse_aware(entry["expires_at"]) for entry in row.previous_secrets]


async def _expire_previous(rt: Any, endpoint_id: str, *positions: int) -> None:
    """Make the stored previous secrets at `positions` (0: newest) past their overlap, as time would."""
    row = await _endpoint(rt, endpoint_id)
    past = (utcnow() - timedelta(seconds=1)).isoformat()
    entries = [{**e, "expires_at": past} if i in positions else e for i, e in enumerate(row.previous_secrets)]
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
                              .values(previous_secrets=entries))


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
    assert rotated["previousSecrets"] == [{"validUntil": until}]
    row = await _endpoint(rt, endpoint.id)
    [expires] = _expiries(row)
    assert timedelta(hours=23, minutes=59) < expires - utcnow() <= timedelta(hours=24)
    # Both stored encrypted, the same way as at creation.
    assert webhooks.endpoint_secret(rt.cipher, row) == new
    assert webhooks.signing_secrets(rt.cipher, row) == [new, old]
    for secret in (new, old):
        assert secret not in row.secret_enc and secret not in str(row.previous_secrets)
    # Shown once: reading the endpoint gives no secret.
    got = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert "secret" not in got and got["previousSecretValidUntil"] == until
    assert got["previousSecrets"] == [{"validUntil": until}]
    async with rt.sessionmaker() as session:
        [audit] = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "webhook_endpoint.secret_rotated"))).scalars().all()
    assert (audit.entity_id, audit.cooperative_id) == (endpoint.id, coop)
    assert audit.after["overlapSeconds"] == 24 * 3600
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
    await _expire_previous(rt, endpoint.id, 0)
    await emit(rt, coop, event_id="evt_late")
    await drain(worker)
    [request] = hook.requests
    header = request["headers"]["X-Gateway-Signature"]
    assert v1_values(header) == [signed_by(rotated["secret"], request)]
    assert not webhooks.verify_signature(old, header, request["body"])
    got = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert got["previousSecretValidUntil"] is None and got["previousSecrets"] == []


async def test_zero_overlap_stops_every_old_secret_at_once(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, first = await approved_endpoint(rt, coop, url)
    second = (await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200))["secret"]
    third = (await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200))["secret"]
    # Rotating during an overlap cuts no earlier secret short: all three sign, newest first.
    assert webhooks.signing_secrets(rt.cipher, await _endpoint(rt, endpoint.id)) == [third, second, first]
    leaked = await admin.json("POST", f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret", 200,
                              json={"overlapHours": 0})
    assert leaked["previousSecretValidUntil"] is None and leaked["previousSecrets"] == []
    row = await _endpoint(rt, endpoint.id)
    assert row.previous_secrets == []
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
    assert webhooks.endpoint_secret(rt.cipher, row) == secret and row.previous_secrets == []


async def test_rotating_twice_within_an_overlap_keeps_the_original_secret_signing(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """S0 -> S1 with a one-hour overlap, then at once S1 -> S2: a receiver still on S0 (it never learned S1,
    the first answer lost) accepts every event until S0's own hour ends, and one on S1 for 24 hours."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, s0 = await approved_endpoint(rt, coop, url)
    path = f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret"
    first = await admin.json("POST", path, 200, json={"overlapHours": 1})
    s1 = first["secret"]
    second = await admin.json("POST", path, 200)
    s2 = second["secret"]

    row = await _endpoint(rt, endpoint.id)
    s1_until, s0_until = _expiries(row)  # newest first: S1 (24 h), then S0 keeping its own hour
    assert timedelta(hours=23, minutes=59) < s1_until - utcnow() <= timedelta(hours=24)
    assert timedelta(minutes=59) < s0_until - utcnow() <= timedelta(hours=1)
    assert webhooks.signing_secrets(rt.cipher, row) == [s2, s1, s0]
    for secret in (s0, s1, s2):
        assert secret not in str(row.previous_secrets)
    assert second["previousSecrets"] == [{"validUntil": iso(s1_until)}, {"validUntil": iso(s0_until)}]
    assert second["previousSecretValidUntil"] == iso(s1_until)
    got = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert got["previousSecrets"] == second["previousSecrets"]
    async with rt.sessionmaker() as session:
        audits = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "webhook_endpoint.secret_rotated").order_by(AuditEvent.at))).scalars().all()
    assert [len(a.after["previousSecretsValidUntil"]) for a in audits] == [1, 2]

    await emit(rt, coop, event_id="evt_after_two")
    await drain(worker)
    [request] = hook.requests
    header = request["headers"]["X-Gateway-Signature"]
    assert v1_values(header) == [signed_by(s2, request), signed_by(s1, request), signed_by(s0, request)]
    for secret in (s2, s1, s0):
        assert webhooks.verify_signature(secret, header, request["body"])
    async with rt.sessionmaker() as session:
        delivery = (await session.execute(select(WebhookDelivery))).scalar_one()
    assert delivery.status == "DELIVERED"


async def test_each_previous_secret_stops_at_its_own_overlap_end(
    admin: Any, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, s0 = await approved_endpoint(rt, coop, url)
    path = f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret"
    s1 = (await admin.json("POST", path, 200, json={"overlapHours": 1}))["secret"]
    s2 = (await admin.json("POST", path, 200))["secret"]
    await _expire_previous(rt, endpoint.id, 1)  # S0's hour is over; S1's day is not
    await emit(rt, coop, event_id="evt_s0_over")
    await drain(worker)
    [request] = hook.requests
    header = request["headers"]["X-Gateway-Signature"]
    assert v1_values(header) == [signed_by(s2, request), signed_by(s1, request)]
    assert not webhooks.verify_signature(s0, header, request["body"])
    got = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}", 200)
    assert [p["validUntil"] for p in got["previousSecrets"]] == [got["previousSecretValidUntil"]]

    # The next rotation drops the expired one from the row and keeps S1 and S2.
    s3 = (await admin.json("POST", path, 200))["secret"]
    row = await _endpoint(rt, endpoint.id)
    assert len(row.previous_secrets) == 2
    assert webhooks.signing_secrets(rt.cipher, row) == [s3, s2, s1]


async def test_a_rotation_beyond_the_cap_is_refused_rather_than_cut_an_overlap_short(
    admin: Any, rt: Any, demo: dict[str, Any]
) -> None:
    endpoint, s0 = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook")
    path = f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret"
    secrets = [s0]
    for _ in range(webhooks.MAX_PREVIOUS_SECRETS):
        secrets.append((await admin.json("POST", path, 200))["secret"])
    full = await _endpoint(rt, endpoint.id)
    assert webhooks.signing_secrets(rt.cipher, full) == secrets[::-1]

    refused = await admin.json("POST", path, 409)
    assert "overlapHours 0" in str(refused) and f"at most {webhooks.MAX_PREVIOUS_SECRETS}" in str(refused)
    # When it may rotate again, written as the API writes instants (to the millisecond: the moment, not before it),
    # not Python's "+00:00" form with microseconds.
    first_free = min(until for entry in full.previous_secrets if (until := webhooks.secret_expiry(entry)))
    assert f"rotate again after {iso_ms(first_free)}, when" in refused["message"], refused
    row = await _endpoint(rt, endpoint.id)
    assert (row.secret_enc, row.previous_secrets) == (full.secret_enc, full.previous_secrets)  # nothing changed

    # Once the oldest one's overlap is over there is room again; a zero overlap always works.
    await _expire_previous(rt, endpoint.id, webhooks.MAX_PREVIOUS_SECRETS - 1)
    newer = (await admin.json("POST", path, 200))["secret"]
    assert webhooks.signing_secrets(rt.cipher, await _endpoint(rt, endpoint.id)) == [newer, *secrets[:0:-1]]
    await admin.json("POST", path, 409)
    leaked = await admin.json("POST", path, 200, json={"overlapHours": 0})
    assert webhooks.signing_secrets(rt.cipher, await _endpoint(rt, endpoint.id)) == [leaked["secret"]]
