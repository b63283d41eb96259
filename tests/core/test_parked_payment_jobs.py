"""A payment's collect or poll parked while it was open (a provider's outage outlasting the collect's attempts), and
the payment ended since: the next payment sweep settles the parked job (DONE, saying why). Left PARKED, a replay is
refused (409: it would send nothing) and nothing else ended it, so gateway_outbox_depth{status="PARKED"} (the
README's alert) and the ops page's parked count stayed up for good after the outage was over."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from core.jobs import PARKED_SETTLED, schedule_sweep
from core.models import OutboxJob, Payment
from core.payments import create_payment
from tests.admin_api.conftest import bearer
from tests.conftest import drain
from tests.providers.wires import ADMIN, due_now, mtn_payment


async def _jobs(rt: Any, payment_id: str) -> dict[str, tuple[str, str | None]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(OutboxJob).where(
            OutboxJob.payload["payment_id"].as_string() == payment_id))).scalars()
        return {job.kind: (job.status, job.last_error) for job in rows}


async def _parked_gauge(client: Any) -> float:
    text = await (await client.get("/metrics")).text()
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "gateway_outbox_depth" and s.labels == {"status": "PARKED"})


async def test_parked_jobs_of_an_ended_payment_are_settled_by_the_sweep(rt, demo, worker, client):
    async with rt.sessionmaker.begin() as s:
        ended, _ = await create_payment(s, rt, mtn_payment(demo, "key-parked-ended"), actor=ADMIN)
        still_open, _ = await create_payment(s, rt, mtn_payment(demo, "key-parked-open"), actor=ADMIN)
        # Both collects parked (MTN unreachable through every attempt); both polls parked too for the ended one.
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect")
                        .values(status="PARKED", last_error="ProviderError: mtn_momo request_to_pay: cannot connect"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll",
                                                OutboxJob.payload["payment_id"].as_string() == ended.id)
                        .values(status="PARKED", last_error="gave up"))
        # The first ended since (its poll found that MTN never got it); the other is still open.
        await s.execute(update(Payment).where(Payment.id == ended.id)
                        .values(status="FAILED", failure_reason="the request never reached the provider"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.poll",
                                                OutboxJob.payload["payment_id"].as_string() == still_open.id)
                        .values(status="DONE"))
    assert await _parked_gauge(client) == 3
    admin = await bearer(client, *demo["admin"])
    assert (await _jobs(rt, ended.id))["payment.collect"][0] == "PARKED"

    async with rt.sessionmaker.begin() as s:
        await schedule_sweep(s)
    await due_now(rt, "payments.sweep")
    async with rt.sessionmaker.begin() as s:  # the sweep scheduled for the next slot: due now
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payments.sweep").values(run_at=OutboxJob.created_at))
    await drain(worker)

    assert await _jobs(rt, ended.id) == {"payment.collect": ("DONE", PARKED_SETTLED),
                                         "payment.poll": ("DONE", PARKED_SETTLED)}
    assert (await _jobs(rt, still_open.id))["payment.collect"][0] == "PARKED"  # its window may still be open
    assert await _parked_gauge(client) == 1
    listed = await admin.json("GET", "/v1/jobs?status=PARKED", 200)
    assert [j["subject"]["id"] for j in listed["data"]] == [still_open.id]
