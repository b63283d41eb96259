"""A webhook delivery given up after three days parks its job; an admin who fixed the receiver replays the job
(`POST /v1/jobs/{id}/replay`) and the event goes out once more, with three fresh days of retries. A delivery
that got through is not sent again, and replaying a job of another kind leaves deliveries alone."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, WebhookDelivery
from core.outbox import UNKNOWN_KIND_PARK_AFTER, enqueue
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import as_job, jobs_of
from tests.conftest import drain
from tests.core import test_webhooks
from tests.core.test_webhooks import Receiver, approved_endpoint, by_hand, emit

receiver = test_webhooks.receiver  # the fixture: a cooperative's receiver on 127.0.0.1


async def given_up(rt: Any, demo: dict[str, Any], hook: Receiver, url: str, worker: Any) -> tuple[str, str]:
    """An event whose receiver failed for three days: (the endpoint's secret, the parked job's id)."""
    hook.answers = [500]
    _endpoint, secret = await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"], event_id="evt_lost")
    await worker.run_once()  # fan-out
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=3)))
    await drain(worker)
    [job] = await jobs_of(rt, "webhook.deliver")
    [delivery] = await _deliveries(rt)
    assert (job.status, delivery.status, len(hook.requests)) == ("PARKED", "FAILED", 1)
    return secret, str(job.id)


async def _deliveries(rt: Any) -> list[WebhookDelivery]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(select(WebhookDelivery))).scalars())


async def _replays(rt: Any) -> list[AuditEvent]:
    async with rt.sessionmaker() as session:
        return list((await session.execute(
            select(AuditEvent).where(AuditEvent.action == webhooks.REPLAYED))).scalars())


async def _admin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["admin"])


async def test_a_replayed_parked_delivery_is_sent_once(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    hook, url = receiver
    secret, job_id = await given_up(rt, demo, hook, url, worker)
    # The receiver is fixed (answers 200 from now on); the admin replays the parked job.
    replayed = await (await _admin(client, demo)).json("POST", f"/v1/jobs/{job_id}/replay", 200)
    assert replayed["status"] == "PENDING"
    [delivery] = await _deliveries(rt)
    assert delivery.status == "PENDING"
    [audit] = await _replays(rt)
    assert (audit.entity_type, audit.entity_id, audit.cooperative_id) == (
        "webhook_delivery", delivery.id, demo["cooperative_id"])
    assert (audit.before, audit.after) == ({"status": "FAILED"}, {"status": "PENDING", "jobId": int(job_id)})

    await drain(worker)
    assert len(hook.requests) == 2
    first, second = hook.requests
    assert second["body"] == first["body"] and json.loads(second["body"])["id"] == "evt_lost"
    assert second["headers"]["X-Gateway-Event-Id"] == "evt_lost"
    assert second["headers"]["X-Gateway-Delivery-Attempt"] == "2"
    assert by_hand(secret, second["headers"]["X-Gateway-Signature"], second["body"])
    [delivery] = await _deliveries(rt)
    assert delivery.status == "DELIVERED" and delivery.delivered_at is not None
    assert [a["status_code"] for a in delivery.attempts] == [500, 200]
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "DONE"
    # Exactly once: nothing else is queued for it, and running the job again sends nothing.
    await drain(worker)
    assert await webhooks.deliver(rt, as_job(job)) == "delivered"
    assert len(hook.requests) == 2


async def test_a_replay_gives_the_delivery_three_fresh_days(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    hook, url = receiver
    _secret, job_id = await given_up(rt, demo, hook, url, worker)
    hook.answers = [503]  # not fixed after all
    await (await _admin(client, demo)).json("POST", f"/v1/jobs/{job_id}/replay", 200)
    tried = utcnow()  # before the attempt: a loaded machine can take seconds over it and the reads below
    await drain(worker)
    # Tried, failed, and retried from the start of the backoff (30 s), not given up at once: its three
    # days count from the replay.
    assert len(hook.requests) == 2
    [delivery] = await _deliveries(rt)
    assert delivery.status == "PENDING" and [a["status_code"] for a in delivery.attempts] == [500, 503]
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "PENDING"
    assert tried + timedelta(seconds=20) < job.run_at < utcnow() + timedelta(seconds=40)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))
    await drain(worker)
    [delivery] = await _deliveries(rt)
    assert delivery.status == "DELIVERED" and len(hook.requests) == 3


async def test_a_delivered_event_is_not_sent_again_by_a_replay(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    hook, url = receiver
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"], event_id="evt_ok")
    await drain(worker)
    # A job of that delivery parked anyway (a worker that lost the database while finishing it, say).
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.kind == "webhook.deliver")
                              .values(status="PARKED", last_error="database went away"))
    [job] = await jobs_of(rt, "webhook.deliver")
    await (await _admin(client, demo)).json("POST", f"/v1/jobs/{job.id}/replay", 200)
    await drain(worker)
    assert len(hook.requests) == 1
    [delivery] = await _deliveries(rt)
    assert delivery.status == "DELIVERED" and len(delivery.attempts) == 1
    assert await _replays(rt) == []
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "DONE"


async def test_replaying_another_kind_of_job_leaves_deliveries_alone(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    hook, url = receiver
    await given_up(rt, demo, hook, url, worker)
    [delivery] = await _deliveries(rt)
    # A parked job of another kind whose payload happens to name the same delivery.
    async with rt.sessionmaker.begin() as session:
        await enqueue(session, "no.such.kind", {"endpoint_id": delivery.endpoint_id, "event_id": "evt_lost"},
                      dedupe_key="other-kind", cooperative_id=demo["cooperative_id"])
        # Unhandled for hours, so parked (a younger one is handed back: a deploy's window).
        await session.execute(update(OutboxJob).where(OutboxJob.dedupe_key == "other-kind")
                              .values(created_at=utcnow() - UNKNOWN_KIND_PARK_AFTER - timedelta(minutes=1)))
    await drain(worker)
    [other] = await jobs_of(rt, "no.such.kind")
    assert other.status == "PARKED"
    await (await _admin(client, demo)).json("POST", f"/v1/jobs/{other.id}/replay", 200)
    await drain(worker)
    [delivery] = await _deliveries(rt)
    assert delivery.status == "FAILED" and len(hook.requests) == 1
    assert await _replays(rt) == []


async def test_a_delivery_waiting_for_its_retry_is_run_now_once_the_receiver_is_fixed(
    rt: Any, demo: dict[str, Any], receiver: Any, worker: Any, client: Any
) -> None:
    """A failed delivery waits for its retry (30 s doubling up to 6 hours) with its job's attempt given back
    (RetryLater: its three days bound it), so its attempts stay 0. Once the receiver is fixed, the admin runs it now
    as any job waiting after a failed attempt; before, it was not listed as waiting and its replay was refused (409
    "not tried yet") while its lastError said the attempt failed. Its three days are not restarted."""
    hook, url = receiver
    hook.answers = [500]
    await approved_endpoint(rt, demo["cooperative_id"], url)
    await emit(rt, demo["cooperative_id"], event_id="evt_waiting")
    await drain(worker)
    [job] = await jobs_of(rt, "webhook.deliver")
    assert (job.status, job.attempts, job.last_error) == ("PENDING", 0, "webhook attempt 1 failed: HTTP 500")
    assert job.run_at > utcnow() and len(hook.requests) == 1

    hook.answers = [200]  # the receiver fixed
    admin = await _admin(client, demo)
    listed = await admin.json("GET", "/v1/jobs?waiting=true&kind=webhook.deliver", 200)
    assert [j["id"] for j in listed["data"]] == [job.id]
    ran = await admin.json("POST", "/v1/jobs/replay", 200, json={"waiting": True, "kind": "webhook.deliver"})
    assert ran["replayed"] == [job.id]
    await drain(worker)
    assert len(hook.requests) == 2 and hook.requests[1]["headers"]["X-Gateway-Delivery-Attempt"] == "2"
    [delivery] = await _deliveries(rt)
    assert delivery.status == "DELIVERED"
    # Not a replay of a given-up delivery: nothing reopened, its three days still count from its creation.
    assert await _replays(rt) == []
    [job] = await jobs_of(rt, "webhook.deliver")
    assert job.status == "DONE"
