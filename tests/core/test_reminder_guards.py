"""Reminders that did not go out on their day are queued again by the next morning's scan, also when what stopped
them left a stored message (a retry through an aggregator outage, dropped at its turn: FAILED Skipped) or a job still
pending past its day's cut-off; a scan job run past its catch-up window sends nothing; a payment of another type does
not hold back the reminder of this one."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from core import reminders
from core.db import utcnow
from core.models import OutboxJob, PaymentType, SmsMessage
from core.outbox import Job
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_reminder_schedule import _scans
from tests.core.test_reminders import NOW, _reminder_jobs
from tests.core.test_reminders_review3 import (
    ALINE,
    _payment,
    _planned,
    _scan,
    _sent,
    _set_member,
    _texts,
    _too_late,
)


@pytest.fixture
def sender(rt: Any) -> Any:
    """A worker with room in the SMS rate for every reminder at once (as test_reminders_review3's)."""
    from app import create_worker

    rt.settings = replace(rt.settings, sms_rate_per_second=1000.0)
    return create_worker(rt)


async def _due_now(rt: Any) -> None:
    """The reminders' retries due now (no backoff wait)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.status == "PENDING", OutboxJob.kind == "sms.send")
                        .values(run_at=utcnow()))


async def test_a_reminder_stored_then_dropped_at_its_retry_is_queued_again_the_next_morning(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Africa's Talking answers 503 at 08:00: the five reminders are stored (QUEUED) and retried. Aline is suspended
    before her retry: it is dropped (FAILED Skipped, never sent), the others go. She is reactivated that afternoon:
    the next morning's scan reminds her, once; a message that never left is no reminder sent."""
    assert await _scan(rt) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http503")
    await drain(sender)
    sim.set_failure(None)
    await _set_member(rt, demo["members"][ALINE], status="SUSPENDED")
    await _due_now(rt)
    await drain(sender)
    assert ALINE not in sim.inbox and len(await _sent(rt)) == 4
    async with rt.sessionmaker() as s:
        hers = (await s.execute(select(SmsMessage).where(SmsMessage.member_id == demo["members"][ALINE]))
                ).scalars().all()
    assert [(m.status, m.provider_status) for m in hers] == [("FAILED", "Skipped")]
    await _set_member(rt, demo["members"][ALINE], status="ACTIVE")

    assert await _planned(rt, 1) == 1
    assert await _scan(rt, 1) == 1
    await drain(sender)
    assert await _scan(rt, 2) == 0
    [text] = _texts(sim, ALINE)
    assert "Monthly Rent" in text and "01/12/2026" in text
    assert all(len(_texts(sim, phone)) == 1 for phone in demo["members"])


async def test_a_reminder_still_pending_past_its_cut_off_is_queued_again_the_next_morning(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """The workers were down from 08:00 to the next morning: Aline's reminder is still pending, its day's cut-off
    (20:00 in Kigali) passed. The next morning's scan queues her a new one (the old one is dropped at its turn, too
    late); the others', still before their cut-off, are left be. She gets one text."""
    assert await _scan(rt) == 5
    await _too_late(rt, demo)
    assert await _planned(rt, 1) == 1
    assert await _scan(rt, 1) == 1
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    [text] = _texts(sim, ALINE)
    assert "01/12/2026" in text
    assert all(len(_texts(sim, phone)) == 1 for phone in demo["members"])


async def test_a_scan_job_run_just_past_its_catch_up_window_is_skipped(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers came back a minute after the catch-up window: today's scan sends nothing (tomorrow's reminds
    whoever is still due), and the chain goes on."""
    run_scan = reminders.job_handlers(rt)["reminders.scan"]
    job = Job(1, "reminders.scan", {"day": "2026-11-28"}, 1, 5, NOW)
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + reminders.CATCH_UP + timedelta(minutes=1))
    await run_scan(job)
    assert await _reminder_jobs(rt) == []
    assert [day for day, _ in await _scans(rt)] == ["2026-11-29"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(OutboxJob).where(OutboxJob.kind == reminders.COOPERATIVE_SCAN))).first() is None


async def test_a_payment_of_another_type_does_not_hold_back_the_reminder_of_rent(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Aline paid her water bill this week and has another water payment awaiting her PIN: rent (due 1 December)
    is still unpaid, and she is reminded of it as everyone else is."""
    await _payment(rt, demo, ALINE, type_name="Water", amount_minor=60_000)
    await _payment(rt, demo, ALINE, type_name="Water", amount_minor=5_000, status="PENDING", created=utcnow())
    assert await _planned(rt) == 5
    assert await _scan(rt) == 5
    assert demo["members"][ALINE] in {job.payload["member_id"] for job in await _reminder_jobs(rt)}
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    [text] = _texts(sim, ALINE)
    assert "Monthly Rent" in text and "01/12/2026" in text


async def test_a_type_whose_member_chooses_the_amount_is_paid_by_any_amount_kept(
        rt: Any, demo: dict[str, Any], sender: Any, aiohttp_server: Any) -> None:
    """Rent lets the member choose the amount (50,000 RWF only suggested): Aline paid 10,000 this period, which pays
    it. She is not reminded; the four who paid nothing are."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.id == demo["payment_types"]["Monthly Rent"])
                        .values(allow_custom_amount=True))
    await _payment(rt, demo, ALINE, amount_minor=10_000)
    assert await _planned(rt) == 4
    assert await _scan(rt) == 4
    assert demo["members"][ALINE] not in {job.payload["member_id"] for job in await _reminder_jobs(rt)}
    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(sender)
    assert ALINE not in sim.inbox and len(await _sent(rt)) == 4
