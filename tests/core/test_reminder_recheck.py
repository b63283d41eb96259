"""A queued reminder whose payment type was deactivated, or whose cooperative was suspended, since the scan is
not sent: "Dial *384*123# to pay" for what the menu no longer offers would only confuse the member."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from core import metrics
from core.audit import Actor
from core.cooperatives import get_cooperative, update_cooperative
from core.db import utcnow
from core.models import Cooperative, OutboxJob, SmsMessage
from core.payment_types import deactivate_payment_type
from core.reminders import scan
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_reminders import NOW

ADMIN = Actor("admin:test", "api")


def skipped(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("gateway_reminders_skipped_total", {"reason": reason}) or 0.0


async def _job_statuses(rt: Any) -> set[str]:
    async with rt.sessionmaker() as s:
        return set((await s.execute(select(OutboxJob.status).where(OutboxJob.kind == "sms.send"))).scalars())


async def test_reminders_of_a_type_deactivated_after_the_scan_are_not_sent(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 5  # Monthly Rent, every member
    before = skipped("type_inactive")
    async with rt.sessionmaker.begin() as s:
        await deactivate_payment_type(s, cooperative_id=demo["cooperative_id"],
                                      payment_type_id=demo["payment_types"]["Monthly Rent"], actor=ADMIN)

    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    assert sim.inbox == {} and sim.requests == []
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(SmsMessage))).scalars().all() == []
    assert await _job_statuses(rt) == {"DONE"}  # dropped, not retried nor parked
    assert skipped("type_inactive") - before == 5


async def test_a_stored_reminder_of_a_suspended_cooperative_ends_failed_unsent(
        rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """The aggregator down for the first attempt (the message stored, QUEUED); by the retry the cooperative
    is suspended: the message ends FAILED "not sent: cooperative_inactive" and nothing leaves."""
    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 5
    _server, sim = await start_simulator(aiohttp_server, rt)
    sim.set_failure("http503")
    await drain(worker)
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(SmsMessage))).scalars().all()
    assert stored and {m.status for m in stored} == {"QUEUED"} and sim.inbox == {}

    before = skipped("cooperative_inactive")
    async with rt.sessionmaker.begin() as s:
        coop = await get_cooperative(s, demo["cooperative_id"])
        await update_cooperative(s, coop, changes={"status": "SUSPENDED"}, actor=ADMIN)
        await s.execute(update(OutboxJob).where(OutboxJob.status == "PENDING").values(run_at=utcnow()))
    sim.set_failure(None)
    await drain(worker)

    assert sim.inbox == {}
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage))).scalars().all()
    assert {(m.status, m.failure_reason) for m in rows} == {("FAILED", "not sent: cooperative_inactive")}
    assert len(rows) == len(stored)
    assert await _job_statuses(rt) == {"DONE"}
    assert skipped("cooperative_inactive") - before == 5


async def test_the_scan_queues_nothing_for_a_suspended_cooperative(rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"])
                        .values(status="SUSPENDED"))
        assert await scan(s, rt, now=NOW) == 0
    assert await _job_statuses(rt) == set()  # no sms.send job at all
