"""The cap of 10 endpoints bounds what one event stores: an endpoint switched off after failures (each event still
records a delivery held for it) counts against the cap while its deliveries are held (RETRY_FOR), and past that
nothing more is recorded for it. Before, a cooperative pointing endpoints at a dead URL and adding new ones each
day multiplied every event: 40 endpoints, 40 deliveries and jobs per event, for a cap of 10."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from core import webhooks
from core.db import utcnow
from core.models import WebhookDelivery, WebhookEndpoint

DOMAIN = "erp.kigali-heights.rw"


async def _endpoints(admin: Any, count: int, start: int) -> list[str]:
    return [(await admin.json("POST", "/v1/webhook-endpoints", 201, json={
        "url": f"https://{DOMAIN}/hook{start + n}", "events": ["payment.completed"]}))["id"] for n in range(count)]


async def test_endpoints_held_after_failures_count_against_the_cap_until_they_lapse(
        rt: Any, demo: dict[str, Any], admin: Any, superadmin: Any) -> None:
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": DOMAIN})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    failing = await _endpoints(admin, webhooks.MAX_ENDPOINTS_PER_COOPERATIVE, 0)
    async with rt.sessionmaker.begin() as s:  # what the worker does after a day of failed attempts
        for endpoint_id in failing:
            await webhooks._disable(rt, s, endpoint_id, 20, utcnow() - timedelta(days=1))
    refused = await admin.json("POST", "/v1/webhook-endpoints", 409, json={
        "url": f"https://{DOMAIN}/one-more", "events": ["payment.completed"]})
    assert "switched off after failures" in refused["message"]

    # One of them may still be enabled again: it takes the place it holds.
    await admin.json("POST", f"/v1/webhook-endpoints/{failing[0]}/enable", 200)
    async with rt.sessionmaker.begin() as s:
        await webhooks._disable(rt, s, failing[0], 20, utcnow() - timedelta(days=1))

    payload = {"event_type": "payment.completed", "cooperative_id": demo["cooperative_id"],
               "event_id": "evt_cap_1", "data": {"id": "x", "amount": 50000}}
    await webhooks.fan_out(rt, payload)  # held for each of the ten: they may be enabled again
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(WebhookDelivery))).scalar_one() == 10

    # Switched off longer than a delivery is ever retried: nothing more kept for them, and room again.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id.in_(failing))
                        .values(disabled_at=utcnow() - webhooks.RETRY_FOR - timedelta(hours=1)))
    fresh = await _endpoints(admin, 2, 100)
    await webhooks.fan_out(rt, {**payload, "event_id": "evt_cap_2"})
    async with rt.sessionmaker() as s:
        second = (await s.execute(select(WebhookDelivery.endpoint_id)
                                  .where(WebhookDelivery.event_id == "evt_cap_2"))).scalars().all()
    assert sorted(second) == sorted(fresh)
