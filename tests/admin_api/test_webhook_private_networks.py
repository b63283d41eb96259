"""WEBHOOK_PRIVATE_NETWORKS: an operator lets webhooks reach a cooperative's system on its own network (an on-premises
install beside its accounting system, a staging receiver on the same machine). Only the listed networks: at
registration (an IP address outside them is refused, loopback and link-local included) and at each delivery's
resolution (a name repointed to another private address gets nothing)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import select

from core import webhooks
from core.audit import Actor
from core.models import WebhookDelivery
from core.notify import emit_event
from tests.conftest import drain
from tests.integration.procs import free_port

DEPLOYED = "postgresql+asyncpg://gw@db.example.rw/gw"  # as deployed: not the embedded default's allowance
IP_REFUSED = "webhook domains must be public host names, not IP addresses or localhost"


def _deployed(rt: Any, monkeypatch: Any, *networks: str) -> None:
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url=DEPLOYED,
                                                            webhook_private_networks=networks))


async def test_a_receiver_on_a_listed_network_is_registered_and_sent_signed_events(
        rt, demo, admin, superadmin, worker, aiohttp_server, monkeypatch):
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1", port=free_port())
    url = f"http://127.0.0.1:{server.port}/hook"

    # Not listed: refused as before; listing a LAN lets no loopback or metadata address through.
    for networks in ((), ("10.0.0.0/8", "192.168.0.0/16")):
        _deployed(rt, monkeypatch, *networks)
        for address in ("127.0.0.1", "169.254.169.254", "172.16.0.9", "93.184.216.34"):
            refused = await admin.json("POST", "/v1/webhook-domains", 400, json={"domain": address})
            assert refused["message"][0].startswith(IP_REFUSED)
        refused = await admin.json("POST", "/v1/webhook-endpoints", 400, json={"url": url,
                                                                               "events": ["payment.completed"]})
        # Not without a listed network (http included); with one, not to an address outside it.
        listed = f"{IP_REFUSED}, except an address of the networks the operator allows"
        assert refused["message"] == [listed if networks else "webhook url must use https"]

    _deployed(rt, monkeypatch, "127.0.0.1/32")
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "127.0.0.1"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": url,
                                                                            "events": ["payment.completed"]})
    # A name stays https, wherever it resolves: only an address of a listed network is called over http.
    named = await admin.json("POST", "/v1/webhook-endpoints", 400, json={"url": "http://erp.coop.lan/h",
                                                                         "events": ["payment.completed"]})
    assert named["message"] == ["webhook url must use https"]

    async with rt.sessionmaker.begin() as s:
        await emit_event(s, cooperative_id=demo["cooperative_id"], event_type="payment.completed",
                         event_id="evt_lan", data={"id": "p1"})
    await drain(worker)
    [(headers, body)] = received
    assert webhooks.verify_signature(endpoint["secret"], headers["X-Gateway-Signature"], body)
    assert json.loads(body)["id"] == "evt_lan" and headers["X-Gateway-Event-Id"] == "evt_lan"
    async with rt.sessionmaker() as s:
        delivery = (await s.execute(select(WebhookDelivery))).scalar_one()
    assert delivery.status == "DELIVERED" and delivery.attempts[0]["status_code"] == 200


async def test_a_name_resolving_to_an_unlisted_private_address_gets_nothing(rt, demo, worker, monkeypatch):
    """Registration does not resolve a name: the delivery does, each time, and only a listed network passes."""
    sent: list[str] = []
    answers = {"address": "192.168.1.5"}

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("erp.coop.lan", 443)
        return [answers["address"]]

    async def post(url: str, **_kw: Any) -> httpx.Response:
        sent.append(url)
        return httpx.Response(200, request=httpx.Request("POST", url))

    monkeypatch.setattr(webhooks, "resolve", resolve)
    monkeypatch.setattr(rt.webhook_http, "post", post)
    _deployed(rt, monkeypatch, "10.0.0.0/8")
    coop, actor = demo["cooperative_id"], Actor("system", "system")
    private = rt.settings.webhook_private_networks
    async with rt.sessionmaker.begin() as s:
        domain = await webhooks.request_domain(s, cooperative_id=coop, domain="erp.coop.lan", actor=actor,
                                               private=private)
        await webhooks.approve_domain(s, domain_id=domain.id, actor=actor, is_super_admin=True)
        await webhooks.register_endpoint(s, rt.cipher, cooperative_id=coop, url="https://erp.coop.lan/h",
                                         events=["payment.completed"], actor=actor, private=private)
        await emit_event(s, cooperative_id=coop, event_type="payment.completed", event_id="evt_rebound",
                         data={"id": "p1"})
    await drain(worker)
    async with rt.sessionmaker() as s:
        delivery = (await s.execute(select(WebhookDelivery))).scalar_one()
    assert sent == [] and delivery.status == "PENDING"
    assert delivery.attempts[-1]["error"] == ("erp.coop.lan resolves to 192.168.1.5, which is not a public address: "
                                              "not sent")

    for address in ("127.0.0.1", "169.254.169.254"):  # loopback and the metadata service: never, unless listed
        answers["address"] = address
        assert await webhooks.refused_destination("https://erp.coop.lan/h", embedded=False, private=private) == (
            f"erp.coop.lan resolves to {address}, which is not a public address: not sent")

    answers["address"] = "10.4.0.20"  # back on the listed network: sent
    await webhooks.deliver(rt, _job(delivery))
    assert sent == ["https://erp.coop.lan/h"]
    async with rt.sessionmaker() as s:
        assert (await s.get(WebhookDelivery, delivery.id)).status == "DELIVERED"


def _job(delivery: WebhookDelivery) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(payload={"endpoint_id": delivery.endpoint_id, "event_id": delivery.event_id})


async def test_an_endpoint_on_a_network_taken_off_the_list_is_sent_nothing_from_the_next_start(
        rt, demo, admin, superadmin, worker, aiohttp_server, monkeypatch):
    """An IP address is not resolved, but each delivery holds it to the list as it is at the time, as the addresses a
    name resolves to are: once the operator takes its network off WEBHOOK_PRIVATE_NETWORKS (a new start), its next
    delivery is not sent, the reason in its attempt (before: sent until an admin rejected the domain)."""
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app, host="127.0.0.1", port=free_port())
    url = f"http://127.0.0.1:{server.port}/hook"
    _deployed(rt, monkeypatch, "127.0.0.1/32")
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "127.0.0.1"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": url,
                                                                            "events": ["payment.completed"]})

    async def emit(event_id: str) -> None:
        async with rt.sessionmaker.begin() as s:
            await emit_event(s, cooperative_id=demo["cooperative_id"], event_type="payment.completed",
                             event_id=event_id, data={"id": event_id})
        await drain(worker)

    await emit("evt_listed")
    assert [json.loads(body)["id"] for body in received] == ["evt_listed"]

    _deployed(rt, monkeypatch, "10.0.0.0/8")  # restarted with 127.0.0.1/32 off the list, another network on it
    await emit("evt_unlisted")
    assert len(received) == 1
    deliveries = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint['id']}/deliveries", 200)
    by_event = {d["eventId"]: d for d in deliveries["data"]}
    assert by_event["evt_listed"]["status"] == "DELIVERED"
    unlisted = by_event["evt_unlisted"]
    assert unlisted["status"] == "PENDING" and unlisted["heldReason"] is None  # retried, as a name resolving there
    [attempt] = unlisted["attempts"]
    assert attempt["statusCode"] is None and attempt["error"] == "127.0.0.1 is not a public address: not sent"
    # Refused at registration as well, now that it is not listed.
    refused = await admin.json("POST", "/v1/webhook-endpoints", 400, json={"url": url.replace("/hook", "/other"),
                                                                           "events": ["payment.completed"]})
    assert refused["message"] == [f"{IP_REFUSED}, except an address of the networks the operator allows"]


async def test_an_ipv6_domain_and_an_endpoint_on_it_match_however_each_is_written(
        rt, demo, admin, superadmin, monkeypatch):
    """An IP literal is compared in its canonical form (ipaddress) on both sides: the domain asked for `fd00:0::5` is
    the one an endpoint at `[fd00::5]` is on (before: stored as written, the endpoint refused 403 "not approved")."""
    _deployed(rt, monkeypatch, "fd00::/8")
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "FD00:0::5"})
    assert domain["domain"] == "fd00::5"
    again = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "fd00:0000:0:0::0005"})
    assert again["id"] == domain["id"]  # the same request, however it is written
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    for url in ("http://[fd00::5]:8080/h", "https://[fd00:0:0::0005]/h"):
        endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": url,
                                                                                "events": ["payment.completed"]})
        assert endpoint["url"] == url and endpoint["domainStatus"] == "APPROVED"
    listed = await admin.json("GET", "/v1/webhook-endpoints", 200)
    assert [e["domainStatus"] for e in listed["data"]] == ["APPROVED", "APPROVED"]


async def test_a_second_endpoint_at_an_ip_url_written_otherwise_is_a_conflict(rt, demo, admin, superadmin,
                                                                              monkeypatch):
    """Two registrations of one receiver on an IPv6 address compare as one (url_key, the address in its canonical
    form) as its domain does: http://[fd00:0::5]/h after http://[fd00::5]/h is 409 naming the first (before: a
    second endpoint, 201, and the receiver sent every event twice, one copy signed with a secret it never kept)."""
    _deployed(rt, monkeypatch, "fd00::/8")
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "fd00::5"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    first = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": "http://[fd00::5]/h",
                                                                         "events": ["payment.completed"]})
    for url in ("http://[fd00:0::5]/h", "http://[FD00:0000::0005]:80/h/"):
        conflict = await admin.json("POST", "/v1/webhook-endpoints", 409, json={"url": url,
                                                                                "events": ["payment.completed"]})
        assert conflict["code"] == "WEBHOOK_URL_TAKEN" and first["id"] in conflict["message"], conflict
    listed = await admin.json("GET", "/v1/webhook-endpoints", 200)
    assert [e["id"] for e in listed["data"]] == [first["id"]]


async def test_an_ipv6_domain_in_brackets_is_its_address(rt, demo, admin, superadmin, monkeypatch):
    """`[fd00::5]`, as an admin copies it from http://[fd00::5]/h, is the domain fd00::5 (before: 400 "not a valid
    domain name"); brackets around anything but an IPv6 address are a 400 that says what they are for."""
    _deployed(rt, monkeypatch, "fd00::/8")
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "[FD00:0::5]"})
    assert domain["domain"] == "fd00::5"
    again = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "fd00::5"})
    assert again["id"] == domain["id"]
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": "http://[fd00::5]/h",
                                                                            "events": ["payment.completed"]})
    assert endpoint["domainStatus"] == "APPROVED"
    for typed in ("[fd00::5", "fd00::5]", "[not-an-ip]", "[1.2.3.4]", "[]", "[fd00::5]:8080"):
        refused = await admin.json("POST", "/v1/webhook-domains", 400, json={"domain": typed})
        assert refused["message"] == [f"{typed!r} is not a valid domain name: brackets enclose an IPv6 address, "
                                      "as in [fd00::5]"], refused
    # An address outside the listed networks is refused as unbracketed.
    refused = await admin.json("POST", "/v1/webhook-domains", 400, json={"domain": "[fe80::1]"})
    assert refused["message"] == [f"{IP_REFUSED}, except an address of the networks the operator allows"]
    listed = await admin.json("GET", "/v1/webhook-domains", 200)
    assert [d["domain"] for d in listed["data"]] == ["fd00::5"]


async def test_an_ipv4_mapped_domain_is_written_one_way_on_every_python(rt, demo, admin, superadmin, monkeypatch):
    """The embedded default takes an IPv4-mapped address: stored and compared as `::ffff:127.0.0.1` however it is
    written (before: str(), `::ffff:7f00:1` on Python 3.11 and 3.12 and `::ffff:127.0.0.1` from 3.13, so a domain
    stored on one matched no endpoint on the other)."""
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, database_url="sqlite+aiosqlite:///x.db"))
    assert webhooks.canonical_host("::FFFF:7F00:1") == "::ffff:127.0.0.1"
    assert webhooks.canonical_host("::ffff:127.0.0.1%eth0") == "::ffff:127.0.0.1%eth0"
    assert webhooks.canonical_host("::ffff:0:7f00:1") == "::ffff:0:7f00:1"  # not mapped: ipaddress's form
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "::ffff:7f00:1"})
    assert domain["domain"] == "::ffff:127.0.0.1"
    for typed in ("::FFFF:127.0.0.1", "[::ffff:7f00:1]", "0:0:0:0:0:ffff:7f00:0001"):
        again = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": typed})
        assert again["id"] == domain["id"], typed
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201, json={"url": "http://[::ffff:7f00:1]:8080/h",
                                                                            "events": ["payment.completed"]})
    assert endpoint["domainStatus"] == "APPROVED"
    conflict = await admin.json("POST", "/v1/webhook-endpoints", 409, json={"url": "http://[::ffff:127.0.0.1]:8080/h",
                                                                            "events": ["payment.completed"]})
    assert conflict["code"] == "WEBHOOK_URL_TAKEN" and endpoint["id"] in conflict["message"]
