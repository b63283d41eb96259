"""core.retention (`main.py prune`): exactly the rows past their period go, nothing a live row names, and the
money trail and SMS rows stay."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from core.config import ConfigError
from core.db import utcnow
from core.models import (
    OutboxJob,
    ProviderEvent,
    SmsMessage,
    UsedRefreshToken,
    UssdSession,
    WebhookDelivery,
    WebhookEndpoint,
)
from core.retention import RetentionPolicy, load_policy, prune
from tests.core import factories

DAY = timedelta(days=1)


def _ago(days: float) -> datetime:
    return utcnow() - days * DAY


async def _job(s: Any, name: str, status: str, *, done_days: float | None, run_days: float,
               kind: str = "sms.send", payload: dict[str, Any] | None = None) -> None:
    await s.execute(insert(OutboxJob).values(
        kind=kind, payload=payload or {"name": name}, dedupe_key=name, status=status, run_at=_ago(run_days),
        created_at=_ago(run_days), updated_at=_ago(done_days if done_days is not None else run_days),
        done_at=None if done_days is None else _ago(done_days)))


async def _session(s: Any, name: str, *, started_days: float, ended_days: float | None) -> None:
    await s.execute(insert(UssdSession).values(
        id=str(uuid.uuid4()), aggregator="africastalking", session_id=name, phone_index="i", phone_masked="m",
        service_code="*384#", status="Success" if ended_days is not None else "OPEN", started_at=_ago(started_days),
        ended_at=None if ended_days is None else _ago(ended_days)))


async def _event(s: Any, name: str, *, days: float, outcome: str | None, payment_id: str | None,
                 status: str = "SUCCEEDED") -> None:
    await s.execute(insert(ProviderEvent).values(
        id=str(uuid.uuid4()), provider="mtn_momo", event_id=name, payment_id=payment_id, kind="collection",
        status=status, payload={"n": name}, outcome=outcome, received_at=_ago(days)))


async def _delivery(s: Any, endpoint: WebhookEndpoint, name: str, status: str, *, days: float) -> None:
    await s.execute(insert(WebhookDelivery).values(
        id=str(uuid.uuid4()), cooperative_id=endpoint.cooperative_id, endpoint_id=endpoint.id, event_id=name,
        event_type="payment.completed", payload={}, status=status, attempts=[], created_at=_ago(days),
        updated_at=_ago(days - 3 if days > 3 else days),
        delivered_at=_ago(days) if status == "DELIVERED" else None))


async def _sms(s: Any, name: str, status: str, *, days: float) -> None:
    await s.execute(insert(SmsMessage).values(
        id=str(uuid.uuid4()), phone_enc="x", phone_index="i", phone_masked="m", template="receipt",
        language="en", body=f"text of {name}", encoding="GSM-7", length=12, segments=1, status=status,
        idempotency_key=name, created_at=_ago(days), updated_at=_ago(days)))


async def _seed(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await factories.cooperative(s)
        paid = await factories.payment(s, coop, status="COMPLETED")
        endpoint = WebhookEndpoint(cooperative_id=coop.id, url="https://hooks.example.com/x", secret_enc="x")
        s.add(endpoint)
        await s.flush()

        await _job(s, "job-done-old", "DONE", done_days=31, run_days=31)
        await _job(s, "job-done-old-2", "DONE", done_days=200, run_days=201)
        await _job(s, "job-done-new", "DONE", done_days=29, run_days=31)  # ran late: counts from its end
        await _job(s, "job-pending-old", "PENDING", done_days=None, run_days=90)
        await _job(s, "job-running-old", "RUNNING", done_days=None, run_days=90)
        await _job(s, "job-parked-old", "PARKED", done_days=None, run_days=90)
        await _job(s, "job-superseded", "DONE", done_days=40, run_days=-1)  # ended before it was due
        # The jobs that name deliveries (by endpoint and event id, as core.webhooks does).
        await _job(s, "job-parked-delivery", "PARKED", done_days=None, run_days=60, kind="webhook.deliver",
                   payload={"endpoint_id": endpoint.id, "event_id": "wd-failed-parked"})
        await _job(s, "job-done-delivery", "DONE", done_days=10, run_days=10, kind="webhook.deliver",
                   payload={"endpoint_id": endpoint.id, "event_id": "wd-failed-done-job"})
        # A replayed one: its job waits again (PENDING), the delivery not reopened until the job runs.
        await _job(s, "job-replayed-delivery", "PENDING", done_days=None, run_days=0, kind="webhook.deliver",
                   payload={"endpoint_id": endpoint.id, "event_id": "wd-failed-replayed"})

        await _session(s, "us-ended-old", started_days=91, ended_days=91)
        await _session(s, "us-never-ended-old", started_days=120, ended_days=None)
        await _session(s, "us-ended-new", started_days=89, ended_days=89)
        await _session(s, "us-open-now", started_days=0, ended_days=None)

        # FAILED: an unresolved one saying money was taken stays (tests/core/test_unmatched_callbacks_retention.py).
        await _event(s, "pe-unknown-old", days=31, outcome="unknown_payment", payment_id=None, status="FAILED")
        await _event(s, "pe-unknown-new", days=29, outcome="unknown_payment", payment_id=None)
        await _event(s, "pe-payment-old", days=800, outcome="completed", payment_id=paid.id)
        await _event(s, "pe-unlinked-other", days=800, outcome=None, payment_id=None)

        await _delivery(s, endpoint, "wd-delivered-old", "DELIVERED", days=40)
        await _delivery(s, endpoint, "wd-failed-old", "FAILED", days=40)
        await _delivery(s, endpoint, "wd-failed-done-job", "FAILED", days=40)
        await _delivery(s, endpoint, "wd-failed-parked", "FAILED", days=60)
        await _delivery(s, endpoint, "wd-failed-replayed", "FAILED", days=60)
        await _delivery(s, endpoint, "wd-pending-old", "PENDING", days=60)
        await _delivery(s, endpoint, "wd-delivered-new", "DELIVERED", days=20)

        await _sms(s, "sms-sent-old", "DELIVERED", days=181)
        await _sms(s, "sms-failed-old", "FAILED", days=400)
        await _sms(s, "sms-queued-old", "QUEUED", days=200)
        await _sms(s, "sms-sent-new", "SENT", days=179)

        # Refresh tokens used (core.auth.refresh), by their expiry: the row goes a day after the token expired.
        for name, days in (("rt-expired-2d", 2), ("rt-expired-12h", 0.5), ("rt-live", -6)):
            await s.execute(insert(UsedRefreshToken).values(id=name, expires_at=_ago(days)))


async def _left(rt: Any) -> dict[str, Any]:
    async with rt.sessionmaker() as s:
        return {
            "outbox_jobs": set((await s.execute(select(OutboxJob.dedupe_key))).scalars()),
            "ussd_sessions": set((await s.execute(select(UssdSession.session_id))).scalars()),
            "provider_events": set((await s.execute(select(ProviderEvent.event_id))).scalars()),
            "webhook_deliveries": set((await s.execute(select(WebhookDelivery.event_id))).scalars()),
            "sms_messages": {k: b for k, b in (await s.execute(select(SmsMessage.idempotency_key, SmsMessage.body)))},
            "used_refresh_tokens": set((await s.execute(select(UsedRefreshToken.id))).scalars()),
        }


async def test_exactly_the_old_eligible_rows_go(rt: Any) -> None:
    await _seed(rt)
    before = await _left(rt)

    counted = await prune(rt.engine, RetentionPolicy(), dry_run=True)
    assert await _left(rt) == before  # a dry run changes nothing
    counts = {p.table: p.count for p in counted}
    assert counts == {"outbox_jobs": 2, "ussd_sessions": 2, "provider_events": 1, "webhook_deliveries": 3,
                      "webhook_deliveries held": 0, "webhook_deliveries held for a domain": 0,
                      "used_refresh_tokens": 1, "sms_messages": 2}

    done = await prune(rt.engine, RetentionPolicy())
    assert {p.table: p.count for p in done} == counts
    left = await _left(rt)
    assert before["outbox_jobs"] - left["outbox_jobs"] == {"job-done-old", "job-done-old-2"}
    assert before["ussd_sessions"] - left["ussd_sessions"] == {"us-ended-old", "us-never-ended-old"}
    assert before["provider_events"] - left["provider_events"] == {"pe-unknown-old"}
    # A used refresh token's row stays until a day after the token expired (until then it refuses a replay).
    assert before["used_refresh_tokens"] - left["used_refresh_tokens"] == {"rt-expired-2d"}
    # The delivery a parked job names stays (a replay reopens it), as does one a waiting job names (replayed: the job
    # reopens it when it runs); the one named only by a DONE job goes.
    assert before["webhook_deliveries"] - left["webhook_deliveries"] == {
        "wd-delivered-old", "wd-failed-old", "wd-failed-done-job"}
    # Every SMS row stays; the old ones no longer QUEUED lose their text.
    assert left["sms_messages"] == {"sms-sent-old": "", "sms-failed-old": "",
                                    "sms-queued-old": "text of sms-queued-old", "sms-sent-new": "text of sms-sent-new"}
    lines = [p.line(dry_run=False) for p in done]
    assert lines[0].startswith("outbox_jobs: 2 deleted (DONE or DISCARDED jobs finished before ")
    assert lines[-1].startswith("sms_messages: 2 cleared (texts and numbers of SMS created before ")

    # Run again: nothing more.
    assert {p.count for p in await prune(rt.engine, RetentionPolicy())} == {0}


async def test_small_batches_take_everything_and_zero_keeps_forever(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        for n in range(7):
            await _job(s, f"old-{n}", "DONE", done_days=40 + n, run_days=40 + n)
            await _sms(s, f"sms-{n}", "SENT", days=200 + (n % 3))  # equal created_at across batches too
            await _session(s, f"us-{n}", started_days=100, ended_days=100)
    kept = RetentionPolicy(ussd_sessions_days=0, batch_size=2)
    report = {p.table: p for p in await prune(rt.engine, kept)}
    assert report["outbox_jobs"].count == 7 and report["sms_messages"].count == 7
    assert report["ussd_sessions"].count is None
    assert report["ussd_sessions"].line(dry_run=False) == "ussd_sessions: kept (RETENTION_USSD_SESSIONS_DAYS=0)"
    left = await _left(rt)
    assert left["outbox_jobs"] == set() and set(left["sms_messages"].values()) == {""}
    assert len(left["ussd_sessions"]) == 7


async def test_rows_of_one_moment_across_batches_all_go(rt: Any) -> None:
    """Rows with the very same order value (run_at, started_at, created_at) over several batches: each batch goes on
    after the last one's (value, id), not past the value, and steps over those it keeps; the texts cleared, the
    rows kept."""
    moment = _ago(400)
    async with rt.sessionmaker.begin() as s:
        for n in range(7):
            await _job(s, f"job-{n}", "DONE" if n != 3 else "PENDING", done_days=400, run_days=400)
            await _session(s, f"us-{n}", started_days=400, ended_days=400 if n != 2 else 1)
            await _sms(s, f"sms-{n}", "SENT" if n != 4 else "QUEUED", days=400)
        for table, column in ((OutboxJob, "run_at"), (UssdSession, "started_at"), (SmsMessage, "created_at")):
            await s.execute(update(table).values({column: moment}))
    report = {p.table: p.count for p in await prune(rt.engine, RetentionPolicy(batch_size=2))}
    assert (report["outbox_jobs"], report["ussd_sessions"], report["sms_messages"]) == (6, 6, 6)
    left = await _left(rt)
    assert left["outbox_jobs"] == {"job-3"} and left["ussd_sessions"] == {"us-2"}
    assert {k for k, body in left["sms_messages"].items() if body} == {"sms-4"} and len(left["sms_messages"]) == 7


def test_the_policy_is_read_from_the_environment() -> None:
    assert load_policy({}) == RetentionPolicy()
    policy = load_policy({"RETENTION_OUTBOX_DONE_DAYS": "7", "RETENTION_SMS_BODY_DAYS": "0",
                          "RETENTION_BATCH_SIZE": "100", "RETENTION_WEBHOOK_HELD_DAYS": "90"})
    assert (policy.outbox_done_days, policy.sms_body_days, policy.batch_size) == (7, 0, 100)
    assert (policy.webhook_held_days, RetentionPolicy().webhook_held_days) == (90, 30)
    for name, value in (("RETENTION_USSD_SESSIONS_DAYS", "-1"), ("RETENTION_USSD_SESSIONS_DAYS", "ninety"),
                        ("RETENTION_BATCH_SIZE", "0")):
        with pytest.raises(ConfigError, match=name):
            load_policy({name: value})


async def test_one_row_per_batch_steps_over_the_rows_it_must_keep(rt: Any) -> None:
    await _seed(rt)
    report = await prune(rt.engine, RetentionPolicy(batch_size=1))
    assert {p.table: p.count for p in report} == {"outbox_jobs": 2, "ussd_sessions": 2, "provider_events": 1,
                                                  "webhook_deliveries": 3, "webhook_deliveries held": 0,
                                                  "webhook_deliveries held for a domain": 0,
                                                  "used_refresh_tokens": 1,
                                                  "sms_messages": 2}
    assert "wd-failed-parked" in (await _left(rt))["webhook_deliveries"]
