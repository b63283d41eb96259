"""Test helpers shared by the SMS and webhook tests: the simulator on 127.0.0.1 and rows to talk about."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from channels.sms import simulator
from channels.sms.jobs import message_key, message_keys
from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender
from channels.sms.simulator import STATE, SimulatorState, create_simulator
from core.config import Secret
from core.db import utcnow
from core.models import Cooperative, OutboxJob, Payment, PaymentType
from core.outbox import Job

# The references make_payment gives, one after another from a random start: a random one each (one in a million)
# met an earlier payment's in a long run (uq_payments_reference, the CI try of fc8a745).
_REFERENCES = itertools.count(uuid.uuid4().int % 10**6)

SIM_KEY = "sim-test-key"


def hold_reports(monkeypatch: Any) -> asyncio.Event:
    """The simulator's delivery reports wait for the returned event (the test sets it once it has read the row as
    the send left it, SENT), then go after their delivery_delay. A fixed delay alone (1 s) let a loaded host's report
    reach the row before the test read it (found DELIVERED, not SENT: a CI run failed though the gateway did right)."""
    release = asyncio.Event()
    post = simulator._post_report

    async def held(state: SimulatorState, entry: dict[str, Any], status: str, reason: str | None) -> None:
        await asyncio.wait_for(release.wait(), 60)
        await post(state, entry, status, reason)

    monkeypatch.setattr(simulator, "_post_report", held)
    return release


async def start_simulator(aiohttp_server: Any, rt: Any, **options: Any) -> tuple[Any, SimulatorState]:
    """Run the simulator on 127.0.0.1 and point rt.sms at it (the sender speaks real HTTP to it)."""
    options.setdefault("delivery_delay", 0.05)
    app = create_simulator(username="coop-test", api_key=SIM_KEY, **options)
    server = await aiohttp_server(app)
    rt.sms = AfricasTalkingSender(
        rt.http,
        AfricasTalkingConfig(
            base_url=str(server.make_url("")).rstrip("/"),
            username="coop-test",
            api_key=Secret(SIM_KEY),
            sender_id="COOPPAY",
        ),
    )
    return server, app[STATE]


async def make_payment(
    rt: Any,
    cooperative_id: str,
    *,
    account: str,
    member_id: str | None = None,
    status: str = "COMPLETED",
    reference: str | None = None,
    failure_reason: str | None = None,
    created_at: datetime | None = None,
) -> Payment:
    async with rt.sessionmaker.begin() as session:
        ptype = (
            (
                await session.execute(
                    select(PaymentType)
                    .where(PaymentType.cooperative_id == cooperative_id)
                    .order_by(PaymentType.name)
                )
            )
            .scalars()
            .first()
        )
        # 23:30 in Kigali by default: the date is local.
        now = created_at or datetime(2026, 1, 15, 21, 30, tzinfo=UTC)
        payment = Payment(
            cooperative_id=cooperative_id,
            member_id=member_id,
            payment_type_id=ptype.id,
            reference=reference or f"PAY_20260115_{next(_REFERENCES) % 10**6:06d}",
            amount_minor=50_000,
            currency="RWF",
            status=status,
            method="MOBILE_MONEY_MTN",
            provider="mtn_momo",
            provider_reference=str(uuid.uuid4()),
            provider_transaction_id="MTN-TX-778899",
            payment_account_enc=rt.cipher.encrypt(account, context=f"payment:{cooperative_id}"),
            payment_account_index=rt.cipher.blind_index(account),
            payment_account_masked=account[:6] + "***",
            idempotency_key=str(uuid.uuid4()),
            request_hash="x" * 64,
            channel="ussd",
            failure_reason=failure_reason,
            expires_at=now + timedelta(minutes=5),
            completed_at=now if status == "COMPLETED" else None,
            created_at=now,
            updated_at=now,
        )
        session.add(payment)
    return payment


async def cooperative(rt: Any, cooperative_id: str) -> Cooperative:
    async with rt.sessionmaker() as session:
        return await session.get(Cooperative, cooperative_id)


async def stalled_run(rt: Any, stalled: asyncio.Event) -> tuple[asyncio.Task[None], Job]:
    """Run A of the one 'sms.send' job due: claimed by a worker of its own and run until it sets `stalled` (a patched
    build stalling there), then stalled past its lease (due again: another worker claims it; its claim as long ago as
    the lease, Job.claimed) and its send lock (gone).
    (run A's task, its job)"""
    from app import create_worker

    first = create_worker(rt)
    [job] = await first.claim()
    run_a = asyncio.create_task(first.run_job(job))
    await asyncio.wait_for(stalled.wait(), 30)
    async with rt.sessionmaker.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(
            run_at=utcnow() - timedelta(seconds=1)))
    await rt.hot_redis.delete(message_keys(message_key(job.payload))[0])
    # And on its own clock: as long since its claim as a real stall (past its handler's time, Job.time_left).
    object.__setattr__(job, "claimed", job.claimed - rt.settings.outbox_lease_seconds)
    return run_a, job


async def jobs_of(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as session:
        return list(
            (
                await session.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id))
            ).scalars()
        )


def as_job(row: OutboxJob, attempts: int = 1) -> Job:
    return Job(row.id, row.kind, dict(row.payload), attempts, row.max_attempts, row.created_at)
