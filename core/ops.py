"""Figures for the operations page: payment flow, provider success, USSD funnel, SMS, outbox, webhooks, and
callbacks for payments the gateway does not have."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import case, func, literal_column, null, select
from sqlalchemy.ext.asyncio import AsyncSession

from core import reference_mark
from core.db import utcnow
from core.models import OutboxJob, Payment, ProviderEvent, SmsMessage, UssdSession, WebhookDelivery, WebhookEndpoint
from core.retention import NO_MONEY_MOVED
from core.state.sms import RETRIES_EXHAUSTED, SENT_UNCONFIRMED, SKIPPED, SmsStatus
from core.unmatched_callbacks import UNMATCHED, UNMATCHED_REFUND
from core.webhooks import held_reasons

log = logging.getLogger("gateway.ops")

# The USSD pay funnel. Each session counts once per step it reaches, in Redis hash counters per UTC hour
# (ops:{ussdfunnel}:<YYYYMMDDHH>, field "<scope>|<step>", scope "*" for all or a cooperative id). The
# channel adds them in the pipeline that already saves the session: no extra round trip per hop.
FUNNEL_STEPS = ("home", "pay_type", "pay_confirm", "pay_done")
FUNNEL_LABELS = {"home": "Main menu", "pay_type": "Pay: what to pay", "pay_confirm": "Pay: confirmation",
                 "pay_done": "Pay: confirmed"}
FUNNEL_ALL = "*"
FUNNEL_HOURS = 24
FUNNEL_TTL = (FUNNEL_HOURS + 2) * 3600


def funnel_key(at: datetime) -> str:
    # One hash tag for every hour: the dashboard reads them all in one pipeline, even on Redis Cluster. Formatted
    # by hand: strftime was most of what a hop's save spent on its funnel counters.
    return f"ops:{{ussdfunnel}}:{at.year:04d}{at.month:02d}{at.day:02d}{at.hour:02d}"


def funnel_field(scope: str, step: str) -> str:
    return f"{scope}|{step}"


async def ussd_funnel(redis: Any, cooperative_id: str | None, now: datetime) -> list[dict[str, Any]]:
    """Sessions reaching each step over the last 24 hours, and how many went no further.

    A session that reached a step counts for every step before it too (a resumed session may land on
    the confirmation directly), so each step's `reached` is at most the previous one's; `dropped` is
    reached here minus reached at the next step (sessions still on the step count as dropped until they
    move on). The last step ends the funnel: nothing drops there.
    """
    scope = cooperative_id or FUNNEL_ALL
    fields = [funnel_field(scope, step) for step in FUNNEL_STEPS]
    pipe = redis.pipeline(transaction=False)
    for hours_ago in range(FUNNEL_HOURS):
        pipe.hmget(funnel_key(now - timedelta(hours=hours_ago)), fields)
    reached = [0] * len(FUNNEL_STEPS)
    for values in await pipe.execute():
        for i, value in enumerate(values):
            reached[i] += int(value or 0)
    first = reached[0]
    out = []
    for i, step in enumerate(FUNNEL_STEPS):
        further = reached[i + 1] if i + 1 < len(reached) else reached[i]
        out.append({"step": step, "label": FUNNEL_LABELS[step], "reached": reached[i],
                    "dropped": max(0, reached[i] - further),
                    "ofStart": round(reached[i] / first, 4) if first else None})
    return out


async def _funnel_if_reachable(redis: Any, cooperative_id: str | None, now: datetime
                               ) -> list[dict[str, Any]] | None:
    """The USSD funnel, or None while Redis cannot be reached (the page shows the funnel as unavailable)."""
    try:
        return await ussd_funnel(redis, cooperative_id, now)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("USSD funnel unavailable: Redis unreachable", extra={"error": type(exc).__name__})
        return None


# SMS states an operator must tell apart (channels.sms.jobs): sent but never confirmed by the aggregator (not
# resent, to send nothing twice), waiting after an outage used up its retries (its job parked: replay it), and
# never handed to the aggregator (a reminder dropped at its turn: her payment since the scan, STOP; a queued message
# of a member erased): not a failed send, so not in the delivery rate either.
_SMS_SHOWN = {(SmsStatus.SENT.value, SENT_UNCONFIRMED): "SENT_UNCONFIRMED",
              (SmsStatus.QUEUED.value, RETRIES_EXHAUSTED): "QUEUED_PARKED",
              (SmsStatus.FAILED.value, SKIPPED): "SKIPPED"}


def _minute(session: AsyncSession, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.date_trunc("minute", column), literal_column("'YYYY-MM-DD\"T\"HH24:MI'"))
    return func.strftime("%Y-%m-%dT%H:%M", column)


async def dashboard(session: AsyncSession, cooperative_id: str | None = None, *, minutes: int = 60,
                    redis: Any = None, provider_health: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the ops page draws, scoped to one cooperative unless a super admin asks.

    `redis` holds the USSD funnel counters; without it the funnel steps are left out (an empty list). With
    Redis down, the funnel is null and `funnelUnavailable` true: the rest comes from the database, and an
    outage is when an operator watches the outbox and the SMS figures most.

    `providerHealth`: `provider_health` as given, the caller's read of the providers' health as the serves and
    workers report it in Redis (providers.health.shown: OK, FAILING since when and the last error, or UNKNOWN; and
    whether Redis answered), the same for every cooperative: an outage of MTN is everyone's. While Redis cannot be
    read, the serving process's own view, `source` "this process only".
    """
    now = utcnow()
    since = now - timedelta(minutes=minutes)
    day = now - timedelta(hours=24)

    def scoped(query: Any, model: Any) -> Any:
        return query.where(model.cooperative_id == cooperative_id) if cooperative_id else query

    minute = _minute(session, Payment.updated_at)
    per_minute = await session.execute(scoped(
        select(minute, Payment.status, Payment.method, func.count())
        .where(Payment.updated_at >= since).group_by(minute, Payment.status, Payment.method).order_by(minute),
        Payment))
    by_provider = await session.execute(scoped(
        select(Payment.provider, Payment.status, func.count()).where(Payment.created_at >= day)
        .group_by(Payment.provider, Payment.status), Payment))
    providers: dict[str, dict[str, int]] = {}
    for provider, status, count in by_provider.all():
        providers.setdefault(provider, {})[status] = count
    success = {}
    for provider, counts in providers.items():
        # (A voided recording is no provider's outcome: an admin recorded money in error and took it back.)
        settled = sum(v for k, v in counts.items() if k not in ("PENDING", "PROCESSING", "VOIDED"))
        good = sum(v for k, v in counts.items() if k in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"))
        success[provider] = {"settled": settled, "succeeded": good,
                             "rate": round(good / settled, 4) if settled else None, "counts": counts}

    # Counted in the database, every one: the first 5,000 read (the oldest) were counted and bucketed, so an outage
    # that left more open said 5,000, and none of the newest under a minute old.
    minute_ago, five_ago = now - timedelta(minutes=1), now - timedelta(minutes=5)
    open_count, under_1m, over_5m, oldest = (await session.execute(scoped(
        select(func.count(), func.count().filter(Payment.created_at > minute_ago),
               func.count().filter(Payment.created_at <= five_ago), func.min(Payment.created_at))
        .where(Payment.status.in_(("PENDING", "PROCESSING"))), Payment))).one()
    buckets = {"under_1m": under_1m, "1m_to_5m": open_count - under_1m - over_5m, "over_5m": over_5m}

    funnel_rows = await session.execute(scoped(
        select(UssdSession.last_screen, func.count(),
               func.sum(case((UssdSession.payment_id.is_not(None), 1), else_=0)))
        .where(UssdSession.started_at >= day).group_by(UssdSession.last_screen), UssdSession))
    last_screens = [{"screen": screen or "(none)", "sessions": count, "paid": int(paid or 0)}
                    for screen, count, paid in funnel_rows.all()]
    last_screens.sort(key=lambda row: -row["sessions"])
    funnel = await _funnel_if_reachable(redis, cooperative_id, now) if redis is not None else []

    sms_rows = await session.execute(scoped(
        select(SmsMessage.status, SmsMessage.provider_status, func.count()).where(SmsMessage.created_at >= day)
        .group_by(SmsMessage.status, SmsMessage.provider_status), SmsMessage))
    sms: dict[str, int] = {}
    for status, provider_status, count in sms_rows.all():
        key = _SMS_SHOWN.get((status, provider_status), status)
        sms[key] = sms.get(key, 0) + count
    # Delivered out of those whose delivery can be known: not the queued ones, nor those sent without an
    # answer from the aggregator (no message id: no delivery report will ever name them), nor those never sent.
    unsent = ("QUEUED", "QUEUED_PARKED", "SENT_UNCONFIRMED", "SKIPPED")
    sent = sum(sms.values()) - sum(sms.get(key, 0) for key in unsent)
    # Live statuses named (not != DONE): the (status, run_at) index finds them without the DONE history. Due:
    # the claim's test (PENDING past run_at, RUNNING past its lease), by the database's clock on PostgreSQL.
    postgres = session.get_bind().dialect.name == "postgresql"
    due = OutboxJob.run_at <= (func.now() if postgres else now)
    outbox_rows = await session.execute(scoped(
        select(OutboxJob.kind, OutboxJob.status, func.count(), func.count().filter(due),
               func.min(OutboxJob.run_at).filter(due), func.now() if postgres else null())
        .where(OutboxJob.status.in_(("PENDING", "RUNNING", "PARKED")))
        .group_by(OutboxJob.kind, OutboxJob.status), OutboxJob))
    outbox: dict[str, dict[str, int]] = {}
    due_jobs, oldest_due = 0, 0.0
    for kind, status, count, due_count, first_due, db_now in outbox_rows.all():
        outbox.setdefault(status, {})[kind] = count
        if status in ("PENDING", "RUNNING"):
            due_jobs += due_count
            if first_due is not None:
                oldest_due = max(oldest_due, ((db_now or now) - first_due).total_seconds())
    hooks = dict((await session.execute(scoped(
        select(WebhookDelivery.status, func.count()).where(WebhookDelivery.created_at >= day)
        .group_by(WebhookDelivery.status), WebhookDelivery))).all())
    # PENDING ones held, not sent (their endpoint switched off after failures, or its domain not approved: the
    # deliveries list's heldReason) are shown apart, as HELD: no retry of theirs is coming until a person acts.
    held = 0
    if hooks.get("PENDING"):
        waiting = await session.execute(scoped(
            select(WebhookDelivery.endpoint_id, func.count())
            .where(WebhookDelivery.created_at >= day, WebhookDelivery.status == "PENDING")
            .group_by(WebhookDelivery.endpoint_id), WebhookDelivery))
        counts = dict(waiting.all())
        endpoints = (await session.execute(select(WebhookEndpoint).where(WebhookEndpoint.id.in_(counts)))
                     ).scalars().all()
        reasons = await held_reasons(session, list(endpoints))
        held = sum(counts[endpoint_id] for endpoint_id, reason in reasons.items() if reason is not None)
    if held:
        hooks["PENDING"] -= held
        if not hooks["PENDING"]:
            del hooks["PENDING"]
        hooks["HELD"] = held
    disabled = (await session.execute(scoped(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.status == "DISABLED"),
        WebhookEndpoint))).scalar_one()
    # Callbacks for a payment the gateway does not have, or a refund it does not have, under which money may have
    # moved (taken, or paid out), not yet accounted for (GET /v1/provider-callbacks?unmatched=true&resolved=false):
    # every one a person must resolve, as prune keeps them (any status but one saying no money moved: SUCCEEDED,
    # AMBIGUOUS, PENDING). They name no cooperative, so across all only.
    unmatched = None if cooperative_id else dict((await session.execute(
        select(ProviderEvent.outcome, func.count())
        .where(ProviderEvent.payment_id.is_(None), ProviderEvent.outcome.in_((UNMATCHED, UNMATCHED_REFUND)),
               ProviderEvent.status.not_in(NO_MONEY_MOVED))
        .group_by(ProviderEvent.outcome))).all())
    # The reference sequence behind its mark: PostgreSQL restored without `advance-references` (across all only).
    references = None if cooperative_id else await reference_mark.shown(session, redis)

    return {
        "generatedAt": now.isoformat(),
        "paymentsPerMinute": [{"minute": m, "status": s, "method": meth, "count": c}
                              for m, s, meth, c in per_minute.all()],
        "providers": success,
        "openPayments": {"count": open_count,
                         "oldestSeconds": round(max(0.0, (now - oldest).total_seconds()), 1) if oldest else 0,
                         "buckets": buckets},
        "ussdFunnel": funnel,
        "funnelUnavailable": funnel is None,
        "ussdLastScreens": last_screens,
        "sms": {"counts": sms, "delivered": sms.get("DELIVERED", 0), "sent": sent,
                "deliveryRate": round(sms.get("DELIVERED", 0) / sent, 4) if sent else None},
        "outbox": {"pending": sum(outbox.get("PENDING", {}).values()),
                   "running": sum(outbox.get("RUNNING", {}).values()),
                   "parked": sum(outbox.get("PARKED", {}).values()), "byStatus": outbox,
                   "due": due_jobs, "oldestDueSeconds": round(oldest_due, 1)},
        "webhooks": {"deliveries": hooks, "failed": hooks.get("FAILED", 0), "held": held,
                     "disabledEndpoints": disabled},
        "unmatchedCallbacks": None if unmatched is None else {
            "moneyTakenUnresolved": unmatched.get(UNMATCHED, 0),
            "refundsPaidUnresolved": unmatched.get(UNMATCHED_REFUND, 0)},
        "referenceSequence": references,
        "providerHealth": provider_health,
    }
