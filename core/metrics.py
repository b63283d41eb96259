"""Prometheus metrics: one registry per process, rendered at /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

if TYPE_CHECKING:
    from core.runtime import Runtime

REGISTRY = CollectorRegistry(auto_describe=True)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HTTP_REQUESTS = Counter("gateway_http_requests_total", "HTTP requests", ["route", "method", "status"],
                        registry=REGISTRY)
HTTP_LATENCY = Histogram("gateway_http_request_seconds", "HTTP request latency", ["route"], buckets=_FAST,
                         registry=REGISTRY)
USSD_HOPS = Counter("gateway_ussd_hops_total", "USSD hops", ["aggregator", "screen"], registry=REGISTRY)
USSD_HOP_LATENCY = Histogram("gateway_ussd_hop_seconds", "USSD hop latency", ["aggregator", "screen"],
                             buckets=_FAST, registry=REGISTRY)
USSD_SESSIONS = Counter("gateway_ussd_sessions_total", "USSD sessions by outcome", ["aggregator", "outcome"],
                        registry=REGISTRY)
PAYMENTS = Counter("gateway_payment_transitions_total", "Payment transitions by target status",
                   ["status", "method"], registry=REGISTRY)
PROVIDER_CALLS = Histogram("gateway_provider_call_seconds", "Provider call latency", ["provider", "operation"],
                           buckets=_FAST, registry=REGISTRY)
PROVIDER_ERRORS = Counter("gateway_provider_errors_total", "Provider call errors", ["provider", "operation"],
                          registry=REGISTRY)
CALLBACK_REJECTED = Counter("gateway_callback_verification_failures_total", "Callbacks refused",
                            ["source"], registry=REGISTRY)
JOBS = Counter("gateway_outbox_jobs_total", "Outbox jobs run", ["kind", "outcome"], registry=REGISTRY)
JOB_LATENCY = Histogram("gateway_outbox_job_seconds", "Outbox job run time", ["kind"], buckets=_FAST,
                        registry=REGISTRY)
OUTBOX_DEPTH = Gauge("gateway_outbox_depth", "Outbox jobs by status", ["status"], registry=REGISTRY)
SMS = Counter("gateway_sms_total", "SMS messages by status", ["status"], registry=REGISTRY)
REMINDERS_SKIPPED = Counter("gateway_reminders_skipped_total", "Queued reminders not sent, by reason", ["reason"],
                            registry=REGISTRY)


def observe_job(kind: str, outcome: str, seconds: float) -> None:
    JOBS.labels(kind=kind, outcome=outcome).inc()
    JOB_LATENCY.labels(kind=kind).observe(seconds)


async def refresh_gauges(rt: Runtime) -> None:
    from core.models import OutboxJob

    try:
        async with rt.sessionmaker() as session:
            rows = await session.execute(
                select(OutboxJob.status, func.count()).where(OutboxJob.status != "DONE")
                .group_by(OutboxJob.status))
            depth = dict(rows.all())
    except Exception:
        return
    for status in ("PENDING", "RUNNING", "PARKED"):
        OUTBOX_DEPTH.labels(status=status).set(depth.get(status, 0))


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
