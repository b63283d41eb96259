"""Webhook endpoints: the per-cooperative limit counts active endpoints only, and an approved host name that
resolves to a private address gets nothing (server-side request forgery through DNS)."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core import webhooks
from core.audit import Actor
from core.models import WebhookDelivery
from core.notify import emit_event
from tests.conftest import drain

DOMAIN = "erp.kigali-heights.rw"
EVENTS = {"events": ["payment.completed"]}


async def _approved(admin, superadmin) -> None:
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": DOMAIN})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)


async def _register(admin, n: int, status: int = 201) -> Any:
    return await admin.json("POST", "/v1/webhook-endpoints", status, json={"url": f"https://{DOMAIN}/h{n}", **EVENTS})


async def test_deleted_endpoints_do_not_count_against_the_limit(admin, superadmin):
    await _approved(admin, superadmin)
    made = [await _register(admin, n) for n in range(webhooks.MAX_ENDPOINTS_PER_COOPERATIVE)]
    full = await _register(admin, 99, 409)
    assert full["message"] == ("a cooperative may have at most 10 active webhook endpoints (one switched off after "
                               "failures counts while its deliveries are held); disable (DELETE) one first")
    await admin.json("DELETE", f"/v1/webhook-endpoints/{made[0]['id']}", 200)
    replacement = await _register(admin, 10)
    assert replacement["status"] == "ACTIVE"
    # Ten active again: the deleted one cannot come back on top of them, until another goes.
    again = await admin.json("POST", f"/v1/webhook-endpoints/{made[0]['id']}/enable", 409)
    assert again["message"] == full["message"]
    await admin.json("DELETE", f"/v1/webhook-endpoints/{made[1]['id']}", 200)
    assert (await admin.json("POST", f"/v1/webhook-endpoints/{made[0]['id']}/enable", 200))["status"] == "ACTIVE"
    # Enabling one that is already active changes nothing and is not refused.
    await admin.json("POST", f"/v1/webhook-endpoints/{made[2]['id']}/enable", 200)
    listed = await admin.json("GET", "/v1/webhook-endpoints?limit=100", 200)
    assert sum(e["status"] == "ACTIVE" for e in listed["data"]) == 10 and listed["meta"]["total"] == 11


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.1.2.3", "192.168.0.10", "169.254.169.254", "100.64.0.1", "::1", "fe80::1%eth0"]
)
async def test_names_resolving_inward_are_refused(address, monkeypatch):
    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == (DOMAIN, 443)
        return ["93.184.216.34", address]  # one inward address among public ones is enough to refuse

    monkeypatch.setattr(webhooks, "resolve", resolve)
    refused = await webhooks.refused_destination(f"https://{DOMAIN}/h", embedded=False)
    assert refused == f"{DOMAIN} resolves to {address.split('%')[0]}, which is not a public address: not sent"
    # The embedded default (one machine, trying it out) is left alone; outside it an IP address is held to the same
    # rule, unresolved: sent to only while its network is listed.
    assert await webhooks.refused_destination(f"https://{DOMAIN}/h", embedded=True) is None
    assert await webhooks.refused_destination("http://127.0.0.1:8080/h", embedded=True) is None
    assert await webhooks.refused_destination("http://127.0.0.1:8080/h", embedded=False) == (
        "127.0.0.1 is not a public address: not sent")
    assert await webhooks.refused_destination("http://127.0.0.1:8080/h", embedded=False,
                                              private=("127.0.0.1/32",)) is None


async def test_delivery_to_a_name_resolving_inward_sends_nothing(rt, demo, worker, monkeypatch):
    sent: list[str] = []
    answers = {"address": "10.1.2.3"}

    async def resolve(host: str, port: int) -> list[str]:
        return [answers["address"]]

    async def post(url: str, **_kw: Any) -> httpx.Response:
        sent.append(url)
        return httpx.Response(200, request=httpx.Request("POST", url))

    monkeypatch.setattr(webhooks, "resolve", resolve)
    monkeypatch.setattr(rt.webhook_http, "post", post)
    # As deployed (PostgreSQL), not the embedded default's allowance.
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="postgresql+asyncpg://x/y"))
    coop, actor = demo["cooperative_id"], Actor("system", "system")
    async with rt.sessionmaker.begin() as s:
        domain = await webhooks.request_domain(s, cooperative_id=coop, domain=DOMAIN, actor=actor)
        await webhooks.approve_domain(s, domain_id=domain.id, actor=actor, is_super_admin=True)
        await webhooks.register_endpoint(s, rt.cipher, cooperative_id=coop, url=f"https://{DOMAIN}/h",
                                         events=["payment.completed"], actor=actor)
        await emit_event(s, cooperative_id=coop, event_type="payment.completed", event_id="evt_inward",
                         data={"id": "p1"})
    await drain(worker)
    assert sent == []
    async with rt.sessionmaker() as s:
        delivery = (await s.execute(select(WebhookDelivery))).scalar_one()
    assert delivery.status == "PENDING"  # retried later, as any failed attempt
    [attempt] = delivery.attempts
    assert attempt["status_code"] is None
    assert attempt["error"] == f"{DOMAIN} resolves to 10.1.2.3, which is not a public address: not sent"

    # Once the name points outward again, the next attempt goes out.
    answers["address"] = "93.184.216.34"
    await webhooks.deliver(rt, _job(delivery))
    assert sent == [f"https://{DOMAIN}/h"]
    async with rt.sessionmaker() as s:
        assert (await s.get(WebhookDelivery, delivery.id)).status == "DELIVERED"


def _job(delivery: WebhookDelivery) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(payload={"endpoint_id": delivery.endpoint_id, "event_id": delivery.event_id})


def test_a_runtime_without_the_webhook_client_sends_nothing_rather_than_fall_back(rt, monkeypatch):
    """Outside the embedded default, customers' URLs go only through the public-only client: a runtime built
    without it refuses to send instead of using the providers' client."""
    monkeypatch.setattr(rt, "webhook_http", None)
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="postgresql+asyncpg://x/y"))
    with pytest.raises(RuntimeError, match="no webhook client"):
        webhooks._client(rt)
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="sqlite+aiosqlite:///x.db"))
    assert webhooks._client(rt) is rt.http  # the embedded default: one machine, trying it out
