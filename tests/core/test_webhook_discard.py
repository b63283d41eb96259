"""A parked webhook delivery's job discarded by an admin (POST /v1/jobs/{id}/discard: the receiver is gone for good):
the delivery reads as given up (FAILED), never still to go, and nothing is sent again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.models import AuditEvent, OutboxJob, WebhookDelivery
from tests.conftest import drain
from tests.core import test_webhooks
from tests.core.test_webhook_replay import _admin, _deliveries, given_up

receiver = test_webhooks.receiver  # the fixture: a cooperative's receiver on 127.0.0.1
REASON = "the cooperative retired this receiver"


async def _discards(rt: Any) -> list[AuditEvent]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(
            select(AuditEvent).where(AuditEvent.action == webhooks.DISCARDED))).scalars())


async def test_a_discarded_delivery_given_up_stays_so(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    hook, url = receiver
    _secret, job_id = await given_up(rt, demo, hook, url, worker)
    await (await _admin(client, demo)).json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": REASON})
    [delivery] = await _deliveries(rt)
    assert delivery.status == "FAILED" and await _discards(rt) == []
    hook.answers = [200]
    await drain(worker)
    assert len(hook.requests) == 1


async def test_a_discarded_delivery_still_pending_is_given_up(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    """A delivery whose job parked before its three days were up (PENDING still): given up with the discard,
    audited, so the deliveries list stops showing it as still to go."""
    hook, url = receiver
    _secret, job_id = await given_up(rt, demo, hook, url, worker)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookDelivery).values(status="PENDING"))
    await (await _admin(client, demo)).json("POST", f"/v1/jobs/{job_id}/discard", 200, json={"reason": REASON})
    [delivery] = await _deliveries(rt)
    assert delivery.status == "FAILED"
    [audit] = await _discards(rt)
    assert (audit.entity_type, audit.entity_id, audit.cooperative_id, audit.before, audit.after) == (
        "webhook_delivery", delivery.id, demo["cooperative_id"], {"status": "PENDING"},
        {"status": "FAILED", "jobId": int(job_id)})
    async with rt.sessionmaker() as session:
        assert (await session.get(OutboxJob, int(job_id))).status == "DISCARDED"
    await drain(worker)
    assert len(hook.requests) == 1
