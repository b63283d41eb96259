"""Scale-out: two `serve` and two `worker` processes on one PostgreSQL and Redis, every payment exactly once.

Thirty members dial at the same time; every session's hops alternate between the two servers (the
session lives in Redis, not in a process). Worker n asks MTN to call back server n, so callbacks
reach both servers too. Afterwards: one payment per session, each collected once, completed once,
one receipt SMS each, and no outbox job run twice or left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from core.models import OutboxJob, Payment, ProviderEvent, UssdSession
from tests.conftest import requires_pg
from tests.integration.conftest import needs_servers, start_stack
from tests.integration.helpers import UssdPhone, admin_token, inbox, sms_rows, transitions, wait_for
from tests.integration.procs import Stack

pytestmark = [requires_pg, needs_servers]
SESSIONS = 30
PHONES = [f"+2507881{n:05d}" for n in range(1, SESSIONS + 1)]  # MTN Rwanda numbers the simulator pays


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("scale"), os.environ["DATABASE_URL"], os.environ["REDIS_URL"],
                    serves=2, workers=2,
                    # Small batches so both workers claim from the same queue at the same time.
                    env_overrides={"OUTBOX_BATCH_SIZE": "4"})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[Any]:
    from app import open_runtime

    async with open_runtime(stack.settings()) as rt:
        yield rt


async def _add_members(http: aiohttp.ClientSession, stack: Stack) -> None:
    from core.demo import DEMO_ADMIN

    token = await admin_token(http, stack.serve_url(1), DEMO_ADMIN)

    async def add(n: int, phone: str) -> None:
        async with http.post(f"{stack.serve_url(n % 2)}/v1/members",
                             json={"name": f"Tenant {n:02d}", "phone": phone, "language": "en", "unit": f"S-{n}"},
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 201, await resp.text()

    await asyncio.gather(*(add(n, phone) for n, phone in enumerate(PHONES)))


async def test_sessions_hop_between_two_servers_and_every_payment_is_processed_once(
        stack: Stack, gw: Any, http: aiohttp.ClientSession) -> None:
    await _add_members(http, stack)
    urls = stack.serve_urls
    phones = [UssdPhone(http, urls if n % 2 == 0 else urls[::-1], number) for n, number in enumerate(PHONES)]
    references = await asyncio.gather(*(p.pay_first_type() for p in phones))

    # Every hop alternated: hops 1 and 3 on one server, 2 and 4 on the other.
    for phone in phones:
        assert len(set(phone.served_by)) == 2 and phone.served_by[0] != phone.served_by[1]
    assert len(set(references)) == SESSIONS

    async with gw.sessionmaker() as s:
        keys = [f"ussd:africastalking:{p.session_id}" for p in phones]
        per_key = dict((await s.execute(select(Payment.idempotency_key, func.count()).where(
            Payment.idempotency_key.in_(keys)).group_by(Payment.idempotency_key))).all())
        sessions = (await s.execute(select(UssdSession).where(
            UssdSession.session_id.in_([p.session_id for p in phones])))).scalars().all()
    assert per_key == dict.fromkeys(keys, 1), "one payment per USSD session"
    assert sorted((r.status, r.hops, r.last_screen) for r in sessions) == [("Success", 4, "pay_done")] * SESSIONS

    async def all_completed() -> list[Payment]:
        async with gw.sessionmaker() as s:
            rows = (await s.execute(select(Payment).where(Payment.reference.in_(references)))).scalars().all()
        return list(rows) if len(rows) == SESSIONS and all(r.status == "COMPLETED" for r in rows) else []

    try:
        payments = await wait_for(all_completed, timeout=40, interval=0.5, what="every payment COMPLETED")
    except AssertionError:
        async with gw.sessionmaker() as s:
            counts = Counter((await s.execute(select(Payment.status).where(
                Payment.reference.in_(references)))).scalars())
        raise AssertionError(f"payments not all completed: {dict(counts)}") from None

    for payment in payments:
        assert await transitions(gw, payment.id, "payment.completed") == 1

    # One receipt per payment, in each payer's own inbox.
    sms_url = stack.sim_url("africastalking")

    async def receipts_arrived() -> dict[str, list[str]]:
        found = {}
        for phone, reference in zip(phones, references, strict=True):
            found[reference] = [m["message"] for m in await inbox(http, sms_url, phone.phone)
                                if reference in m["message"]]
        return found if all(found.values()) else {}

    receipts = await wait_for(receipts_arrived, timeout=30, interval=0.5, what="a receipt per payment")
    assert all(len(messages) == 1 for messages in receipts.values()), receipts
    for phone in phones:
        assert len(await inbox(http, sms_url, phone.phone)) == 1, "nothing else was sent to the payer"
    for payment in payments:
        assert [r.template for r in await sms_rows(gw, payment.id)] == ["payment_receipt"]

    # Outbox: one job of each kind per payment, each run to DONE once.
    async def outbox_settled() -> list[OutboxJob]:
        async with gw.sessionmaker() as s:
            rows = list((await s.execute(select(OutboxJob).where(
                OutboxJob.kind.in_(("payment.collect", "sms.send"))))).scalars())
        return rows if rows and all(r.status == "DONE" for r in rows) else []

    done = await wait_for(outbox_settled, timeout=15, what="collect and SMS jobs DONE")
    ids = {p.id for p in payments}
    collects = Counter(j.payload["payment_id"] for j in done if j.kind == "payment.collect")
    assert collects == Counter(dict.fromkeys(ids, 1))
    assert all(j.attempts == 1 for j in done), [(j.kind, j.attempts, j.last_error) for j in done if j.attempts != 1]
    async with gw.sessionmaker() as s:
        parked = (await s.execute(select(func.count()).select_from(OutboxJob).where(
            OutboxJob.status == "PARKED"))).scalar_one()
        events = Counter((await s.execute(select(ProviderEvent.payment_id).where(
            ProviderEvent.payment_id.in_(ids)))).scalars())
    assert parked == 0
    assert events == Counter(dict.fromkeys(ids, 1)), "one stored callback per payment"

    # Each collection went to the provider exactly once, across the two workers.
    sent = Counter()
    for worker in stack.worker_procs:
        sent.update(re.findall(r'"MTN MoMo accepted request to pay", "provider_reference": "([0-9a-f-]+)"',
                               worker.log.read_text()))
    assert sent == Counter({p.provider_reference: 1 for p in payments})
    # Both servers took callbacks.
    for serve in stack.serve_procs:
        assert "provider callback handled" in serve.log.read_text(), f"{serve.name} got no callback"
