"""A webhook domain rejected after its endpoints' events were recorded: nothing more is sent there (first tries,
retries, deliveries an enable resumed), each delivery held PENDING with no attempt recorded and no give-up, and
sent once, signed as usual, when a super admin approves the domain again."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select, update

from core import webhooks
from core.db import utcnow
from core.models import ApprovedDomain, AuditEvent, OutboxJob, WebhookDelivery, WebhookEndpoint
from tests.channels.sms.helpers import jobs_of
from tests.conftest import drain
from tests.core.test_webhooks import ADMIN, SUPER, Receiver, approved_endpoint, by_hand, emit, receiver

__all__ = ["receiver"]  # the fixture, used by name


async def _decide(rt: Any, approve: bool) -> dict[str, Any]:
    """The super admin approves or rejects the (only) domain; the decision's audit row's `after`."""
    async with rt.sessionmaker.begin() as session:
        domain_id = (await session.execute(select(ApprovedDomain.id))).scalar_one()
        await webhooks.approve_domain(session, domain_id=domain_id, actor=SUPER, is_super_admin=True,
                                      approve=approve)
    async with rt.sessionmaker() as session:
        audit = (await session.execute(
            select(AuditEvent).where(AuditEvent.entity_type == "approved_domain")
            .order_by(AuditEvent.id.desc()).limit(1))).scalar_one()
    return dict(audit.after)


async def _deliveries(rt: Any) -> dict[str, WebhookDelivery]:
    async with rt.sessionmaker() as session:
        return {d.event_id: d for d in (await session.execute(select(WebhookDelivery))).scalars()}


async def _make_due(rt: Any) -> None:
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.status == "PENDING")
                              .values(run_at=utcnow() - timedelta(seconds=1)))


async def test_deliveries_to_a_rejected_domain_are_held_then_sent_once_approved_again(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    _endpoint, secret = await approved_endpoint(rt, coop, url)
    # One delivery failed once and is retrying; another is queued, not tried yet.
    hook.answers = [500]
    await emit(rt, coop, event_id="evt_retrying")
    await drain(worker)
    assert len(hook.requests) == 1
    await emit(rt, coop, event_id="evt_queued")
    await worker.run_once()  # the fan-out only: its delivery job is queued
    assert len(hook.requests) == 1

    after = await _decide(rt, approve=False)
    assert after["status"] == "REJECTED"
    await _make_due(rt)
    await drain(worker)
    assert len(hook.requests) == 1  # nothing more reached the rejected domain
    rows = await _deliveries(rt)
    assert {e: (d.status, len(d.attempts)) for e, d in rows.items()} == {
        "evt_retrying": ("PENDING", 1), "evt_queued": ("PENDING", 0)}  # held: no attempt counted
    jobs = await jobs_of(rt, "webhook.deliver")
    assert {j.status for j in jobs} == {"DONE"}  # nothing left to run (and give up) while held
    assert all((j.last_error or "").startswith("held: domain 127.0.0.1 is rejected") for j in jobs)

    # Held past the three days: not given up.
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=4)))
    await drain(worker)
    assert {d.status for d in (await _deliveries(rt)).values()} == {"PENDING"}

    # Approved again: each goes out once, signed as usual, the attempt counted on from what was recorded.
    after = await _decide(rt, approve=True)
    assert after["resumedDeliveries"] == 2
    await drain(worker)
    rows = await _deliveries(rt)
    assert {e: d.status for e, d in rows.items()} == {"evt_retrying": "DELIVERED", "evt_queued": "DELIVERED"}
    sent = hook.requests[1:]
    assert sorted(r["headers"]["X-Gateway-Event-Id"] for r in sent) == ["evt_queued", "evt_retrying"]
    assert all(by_hand(secret, r["headers"]["X-Gateway-Signature"], r["body"]) for r in sent)
    assert {r["headers"]["X-Gateway-Event-Id"]: r["headers"]["X-Gateway-Delivery-Attempt"] for r in sent} == {
        "evt_retrying": "2", "evt_queued": "1"}
    assert [json.loads(r["body"])["id"] for r in sent] == [r["headers"]["X-Gateway-Event-Id"] for r in sent]
    # Approving once more sends nothing again.
    assert (await _decide(rt, approve=True))["resumedDeliveries"] == 0
    await drain(worker)
    assert len(hook.requests) == 3


async def test_a_domain_asked_for_again_holds_as_a_rejected_one(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """Rejected, then asked for again by the cooperative (PENDING): still not approved, still held."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_pending")
    await worker.run_once()  # fan-out
    await _decide(rt, approve=False)
    async with rt.sessionmaker.begin() as session:
        again = await webhooks.request_domain(session, cooperative_id=coop, domain="127.0.0.1", actor=ADMIN,
                                              embedded=True)
    assert again.status == "PENDING"
    await drain(worker)
    assert hook.requests == []
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "DONE" and (job.last_error or "").startswith("held: domain 127.0.0.1 is pending")
    await _decide(rt, approve=True)
    await drain(worker)
    assert [r["headers"]["X-Gateway-Event-Id"] for r in hook.requests] == ["evt_pending"]


async def test_deliveries_an_enable_resumes_are_held_while_the_domain_is_rejected(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url)
    async with rt.sessionmaker.begin() as session:
        await webhooks._disable(rt, session, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    await emit(rt, coop, event_id="evt_switched_off")
    await drain(worker)  # recorded, held while switched off
    await _decide(rt, approve=False)
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    await drain(worker)
    assert hook.requests == []
    assert (await _deliveries(rt))["evt_switched_off"].status == "PENDING"
    await _decide(rt, approve=True)
    await drain(worker)
    assert [r["headers"]["X-Gateway-Event-Id"] for r in hook.requests] == ["evt_switched_off"]
    assert (await _deliveries(rt))["evt_switched_off"].status == "DELIVERED"


async def test_a_switched_off_endpoint_keeps_holding_when_its_domain_is_approved(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_both")
    await worker.run_once()  # fan-out
    await _decide(rt, approve=False)
    await drain(worker)  # held for the domain
    async with rt.sessionmaker.begin() as session:
        await webhooks._disable(rt, session, endpoint.id, webhooks.DISABLE_AFTER, utcnow() - timedelta(days=1))
    assert (await _decide(rt, approve=True))["resumedDeliveries"] == 0
    await drain(worker)
    assert hook.requests == []
    async with rt.sessionmaker.begin() as session:
        await webhooks.enable_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN)
    await drain(worker)
    assert [r["headers"]["X-Gateway-Event-Id"] for r in hook.requests] == ["evt_both"]


async def test_rejected_and_approved_again_while_a_delivery_is_mid_send_sends_it_once(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """The send under way when the domain is rejected finishes (it cannot be called back); the approval that
    follows queues no second job for it, so the receiver gets the event once."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    _endpoint, secret = await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_mid")
    await worker.run_once()  # fan-out
    hook.hold.clear()
    sending = asyncio.create_task(worker.run_once())  # claims the job: RUNNING, its request held by the receiver
    await asyncio.wait_for(hook.arrived.wait(), 30)
    await _decide(rt, approve=False)
    assert (await _decide(rt, approve=True))["resumedDeliveries"] == 0
    assert await worker.run_once() == 0  # no second job to send it while the first is under way
    hook.hold.set()
    await asyncio.wait_for(sending, 30)
    await drain(worker)
    [request] = hook.requests
    assert by_hand(secret, request["headers"]["X-Gateway-Signature"], request["body"])
    delivery = (await _deliveries(rt))["evt_mid"]
    assert delivery.status == "DELIVERED" and len(delivery.attempts) == 1


async def test_rejected_while_a_delivery_is_mid_send_it_is_delivered_once_and_not_resent(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    hook, url = receiver
    coop = demo["cooperative_id"]
    await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_mid")
    await worker.run_once()  # fan-out
    hook.hold.clear()
    sending = asyncio.create_task(worker.run_once())
    await asyncio.wait_for(hook.arrived.wait(), 30)
    await _decide(rt, approve=False)
    hook.hold.set()
    await asyncio.wait_for(sending, 30)
    await drain(worker)
    assert (await _deliveries(rt))["evt_mid"].status == "DELIVERED"  # the 200 answered is kept
    assert (await _decide(rt, approve=True))["resumedDeliveries"] == 0
    await drain(worker)
    assert len(hook.requests) == 1


async def test_a_new_url_on_an_approved_domain_takes_what_the_rejected_one_held(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any
) -> None:
    """PATCH to a URL on another, approved domain: the deliveries held for the old one are queued for it."""
    hook, url = receiver
    coop = demo["cooperative_id"]
    endpoint, _ = await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_moved")
    await worker.run_once()  # fan-out
    await _decide(rt, approve=False)
    await drain(worker)
    assert hook.requests == []
    async with rt.sessionmaker.begin() as session:
        domain = await webhooks.request_domain(session, cooperative_id=coop, domain="localhost", actor=ADMIN,
                                               embedded=True)
        await webhooks.approve_domain(session, domain_id=domain.id, actor=SUPER, is_super_admin=True)
        await webhooks.update_endpoint(session, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN,
                                       url=url.replace("127.0.0.1", "localhost"), embedded=True)
    queued = [j for j in await jobs_of(rt, "webhook.deliver") if j.status == "PENDING"]
    assert [j.payload["event_id"] for j in queued] == ["evt_moved"] and "resumed_at" in queued[0].payload
    async with rt.sessionmaker() as session:
        moved = await session.get(WebhookEndpoint, endpoint.id)
        assert moved is not None
        assert await webhooks.held_reason(session, moved) is None


async def test_a_domain_approved_while_the_delivery_is_being_held_is_sent_to(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any, monkeypatch: Any
) -> None:
    """The delivery's first read found the domain rejected; before the hold's locked read it was approved again
    and the endpoint's URL changed: sent now, to the URL as it is then, not held with no job left to send it."""
    old, new = Receiver(), Receiver()
    app = web.Application()
    app.router.add_post("/hook", old.handle)
    app.router.add_post("/moved", new.handle)
    server = await aiohttp_server(app)
    url = str(server.make_url("/hook"))
    coop = demo["cooperative_id"]
    endpoint, secret = await approved_endpoint(rt, coop, url)
    await emit(rt, coop, event_id="evt_race")
    await worker.run_once()  # fan-out
    await _decide(rt, approve=False)
    read = webhooks.domain_status

    async def stale(session: Any, cooperative_id: str, at: str) -> str | None:
        """deliver's first read (REJECTED); then, before its hold, the approval and the PATCH commit."""
        found = await read(session, cooperative_id, at)
        monkeypatch.setattr(webhooks, "domain_status", read)
        await _decide(rt, approve=True)
        async with rt.sessionmaker.begin() as other:
            await webhooks.update_endpoint(other, endpoint_id=endpoint.id, cooperative_id=coop, actor=ADMIN,
                                           url=str(server.make_url("/moved")), embedded=True)
        return found

    monkeypatch.setattr(webhooks, "domain_status", stale)
    await drain(worker)
    assert old.requests == []
    [request] = new.requests
    assert by_hand(secret, request["headers"]["X-Gateway-Signature"], request["body"])
    assert (await _deliveries(rt))["evt_race"].status == "DELIVERED"
