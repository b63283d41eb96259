"""Migration 0020: an outbox job carries its lane (the payment provider its handler calls), written by the database
as the job is inserted, so the claim that spares a provider at its share skips that provider's backlog by an index
instead of reading each skipped job's payment row again at every claim (16 ms to half a second a claim with 20,000
of a down provider's jobs due on rent day, as every slot that freed claimed again)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from alembic import command
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor
from core.db import make_engine, utcnow
from core.models import OutboxJob, Refund
from core.outbox import NewJob, OutboxWorker, enqueue, enqueue_job, enqueue_many
from core.payments import NewPayment, create_payment
from main import _alembic_config, migrate
from tests.conftest import make_settings, requires_pg
from tests.core import factories


async def _payment(session: AsyncSession, coop: Any, provider: str) -> str:
    payment = await factories.payment(session, coop, "COMPLETED")
    payment.provider = provider
    await session.flush()
    return payment.id


async def _refund(session: AsyncSession, coop: Any, payment_id: str) -> str:
    refund = Refund(cooperative_id=coop.id, payment_id=payment_id, reference=f"RFD_{uuid.uuid4().hex[:10]}",
                    amount_minor=100, currency="RWF", status="PENDING", idempotency_key=uuid.uuid4().hex,
                    provider_reference=str(uuid.uuid4()))
    session.add(refund)
    await session.flush()
    return refund.id


async def _lanes(sm: Any) -> dict[str, str | None]:
    async with sm() as session:
        return dict((await session.execute(select(OutboxJob.dedupe_key, OutboxJob.lane))).all())


async def test_every_job_of_a_payment_or_refund_is_written_with_its_providers_lane(sm: Any) -> None:
    """Each way a job is inserted (one row, several in one statement, in the raw statement of a transaction, or SQL
    of another release's code): a payment's and a refund's jobs carry the payment's provider; others none."""
    async with sm.begin() as session:
        coop = await factories.cooperative(session)
        airtel = await _payment(session, coop, "airtel")
        mpesa = await _payment(session, coop, "mpesa")
        refund = await _refund(session, coop, mpesa)
        await enqueue(session, "payment.collect", {"payment_id": airtel}, dedupe_key="collect")
        await enqueue_job(session, NewJob("refund.submit", {"refund_id": refund}, dedupe_key="submit"))
        # Several with dedupe keys in an open transaction: PostgreSQL's one raw INSERT of every row.
        await enqueue_many(session, [
            NewJob("payment.poll", {"payment_id": mpesa}, dedupe_key="poll"),
            NewJob("refund.poll", {"refund_id": refund}, dedupe_key="refund-poll"),
            NewJob("sms.send", {"context": {"payment_id": mpesa}}, dedupe_key="sms"),
            NewJob("webhook.event", {"event_id": f"evt_payment_completed_{mpesa}"}, dedupe_key="webhook"),
        ])
        # As the previous release (or any SQL) writes a job: it names no lane.
        await session.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, created_at, "
            "updated_at) VALUES ('payment.poll', :payload, 'old-release', 'PENDING', 0, 8, :now, :now, :now)"),
            {"payload": f'{{"payment_id": "{airtel}"}}', "now": utcnow()})
    assert await _lanes(sm) == {"collect": "airtel", "submit": "mpesa", "poll": "mpesa", "refund-poll": "mpesa",
                                "sms": None, "webhook": None, "old-release": "airtel"}


async def test_a_new_payments_jobs_have_its_providers_lane(rt: Any, demo: dict[str, Any]) -> None:
    """The payment and its jobs are inserted by one statement on PostgreSQL (core.payments): the jobs' trigger reads
    the payment row the same statement wrote."""
    new = NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                     method="MOBILE_MONEY_MTN", account="0788000001", idempotency_key="lane-key-0001", channel="api",
                     member_id=demo["members"]["+250788000001"])
    async with rt.sessionmaker.begin() as session:
        payment, created = await create_payment(session, rt, new, actor=Actor("admin:test", "api"))
    assert created and payment.provider == "mtn_momo"
    assert await _lanes(rt.sessionmaker) == {f"collect:{payment.id}": "mtn_momo", f"poll:{payment.id}": "mtn_momo"}


async def test_a_job_written_without_its_lane_is_still_held_to_it(sm: Any) -> None:
    """A payment's or refund's job with no lane on its row (written where no trigger ran) is held by the provider read
    from its payment, as before the column: not claimed while that provider is at its share, and counted in it."""
    now = utcnow()
    async with sm.begin() as session:
        coop = await factories.cooperative(session)
        hangs = await _payment(session, coop, "hangs")
        refund = await _refund(session, coop, hangs)
        await enqueue_many(session, [
            NewJob("payment.collect", {"payment_id": hangs}, dedupe_key="collect", run_at=now - timedelta(seconds=9)),
            NewJob("refund.poll", {"refund_id": refund}, dedupe_key="refund", run_at=now - timedelta(seconds=8)),
            NewJob("sms.send", {}, dedupe_key="sms", run_at=now - timedelta(seconds=1)),
        ])
        await session.execute(update(OutboxJob).values(lane=None))
    worker = OutboxWorker(sm, {}, concurrency=4, batch_size=10)
    spared = await worker.claim(sparing=["hangs"])
    assert [(job.kind, job.lane) for job in spared] == [("sms.send", None)]
    claimed = await worker.claim()
    assert [(job.kind, job.lane) for job in claimed] == [("payment.collect", "hangs"), ("refund.poll", "hangs")]


async def test_a_claim_spares_exactly_the_full_lanes_whatever_their_order(sm: Any) -> None:
    """The claim reads the lanes between and around the full ones (byte order, as the column compares: names a
    language's collation orders otherwise, '-' and '_' and capitals, included) and the jobs of no lane."""
    names = ["A", "a-b", "a_b", "ab", "mtn_momo", "mtnmomo", "z"]
    now = utcnow()
    async with sm.begin() as session:
        coop = await factories.cooperative(session)
        jobs = [NewJob("payment.poll", {"payment_id": await _payment(session, coop, name)}, dedupe_key=name,
                       run_at=now - timedelta(seconds=60 - n)) for n, name in enumerate(names)]
        await enqueue_many(session, [*jobs, NewJob("sms.send", {}, dedupe_key="sms", run_at=now)])
    worker = OutboxWorker(sm, {}, concurrency=16, batch_size=20)
    for full in (["a_b"], ["A", "z"], ["a-b", "ab", "mtnmomo"], names):
        claimed = await worker.claim(sparing=full)
        assert [job.lane for job in claimed] == [name for name in names if name not in full] + [None], full
        await worker._unclaim(claimed)  # back as they were, for the next


@requires_pg
async def test_the_sparing_claim_never_reads_a_full_lanes_backlog(sm: Any) -> None:
    """5,000 due jobs of a provider at its share ahead of three SMS: the claim finds the SMS on ix_outbox_due_lane,
    its plan filtering none of the provider's jobs out one by one (each was a read of its payment row)."""
    async with sm.begin() as session:
        coop = await factories.cooperative(session)
        down = await _payment(session, coop, "down")
        await session.execute(text(
            "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, created_at, "
            "updated_at) SELECT CASE WHEN g % 2 = 0 THEN 'payment.collect' ELSE 'payment.poll' END, "
            "jsonb_build_object('payment_id', CAST(:payment AS text)), 'j' || g, 'PENDING', 0, 8, "
            "now() - interval '1 hour' + g * interval '1 ms', now(), now() FROM generate_series(1, 5000) g"),
            {"payment": down})
        await enqueue_many(session, [NewJob("sms.send", {}, dedupe_key=f"sms{n}") for n in range(3)])
    engine = sm.kw["bind"]
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE outbox_jobs"))
        await conn.commit()
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().startswith("WITH due AS"):
            seen.append((statement, parameters))

    worker = OutboxWorker(sm, {}, concurrency=16, batch_size=20)
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        claimed = await worker.claim(8, sparing=["down"])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert [job.kind for job in claimed] == ["sms.send"] * 3
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).where(OutboxJob.kind == "sms.send")
                              .values(status="PENDING", locked_by=None, attempts=0, run_at=utcnow()))
    statement, parameters = seen[0]
    async with engine.connect() as conn:
        plan = "\n".join(row[0] for row in await conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, COSTS OFF) {statement}", tuple(parameters)))
        await conn.rollback()
    assert "ix_outbox_due_lane" in plan, plan
    removed = [int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)]
    assert all(n < 100 for n in removed), plan


# --- the migration ---------------------------------------------------------------------------------------------------

JOBS = sa.table("outbox_jobs", sa.column("id"), sa.column("dedupe_key"), sa.column("status"))
# dedupe key -> (kind, status), as the previous release left them (the keys this run's own: the database of the
# suite is not emptied for a migration's test).
RUN = uuid.uuid4().hex[:8]
OLD_JOBS = {f"{RUN}-collect": ("payment.collect", "PENDING"), f"{RUN}-poll": ("payment.poll", "RUNNING"),
            f"{RUN}-submit": ("refund.submit", "PARKED"), f"{RUN}-refund-poll": ("refund.poll", "PENDING"),
            f"{RUN}-done": ("payment.poll", "DONE"), f"{RUN}-sms": ("sms.send", "PENDING")}


async def _payments_and_refund(url: str) -> tuple[str, str]:
    """An MTN payment, and an Airtel payment's refund: made at head (by the models of this release, which name
    columns added after 0020), before the downgrade that keeps them. Their ids."""
    engine = make_engine(url)
    try:
        async with AsyncSession(engine) as session, session.begin():
            coop = await factories.cooperative(session)
            mtn = await _payment(session, coop, "mtn_momo")
            return mtn, await _refund(session, coop, await _payment(session, coop, "airtel"))
    finally:
        await engine.dispose()


async def _as_the_previous_release_wrote_them(url: str, mtn: str, refund: str) -> None:
    """Jobs of each state written before 0020 (no lane column), by the statements that release used."""
    engine = make_engine(url)
    try:
        async with AsyncSession(engine) as session, session.begin():
            payloads = {"payment.collect": {"payment_id": mtn}, "payment.poll": {"payment_id": mtn},
                        "refund.submit": {"refund_id": refund}, "refund.poll": {"refund_id": refund},
                        "sms.send": {"context": {"payment_id": mtn}}}
            for key, (kind, status) in OLD_JOBS.items():
                await enqueue(session, kind, payloads[kind], dedupe_key=key)
                await session.execute(JOBS.update().where(JOBS.c.dedupe_key == key).values(status=status))
    finally:
        await engine.dispose()


async def _read(url: str) -> dict[str, str | None]:
    """This run's jobs: dedupe key (less the run's prefix) -> lane."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT dedupe_key, lane FROM outbox_jobs WHERE dedupe_key LIKE :run"),
                                      {"run": f"{RUN}-%"})
            return {key.removeprefix(f"{RUN}-"): lane for key, lane in rows}
    finally:
        await engine.dispose()


async def _has_lane(url: str) -> bool:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: "lane" in {col["name"] for col in sa.inspect(c)
                                                            .get_columns("outbox_jobs")})
    finally:
        await engine.dispose()


async def _insert_after(url: str) -> None:
    """A job inserted once 0020 is applied, by SQL that names no lane."""
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            refund = (await conn.execute(text("SELECT payload FROM outbox_jobs WHERE dedupe_key = :key"),
                                         {"key": f"{RUN}-submit"})).scalar_one()
            await conn.execute(text(
                "INSERT INTO outbox_jobs (kind, payload, dedupe_key, status, attempts, max_attempts, run_at, "
                "created_at, updated_at) VALUES ('refund.poll', :payload, :key, 'PENDING', 0, 8, :now, :now, :now)"),
                {"payload": refund if isinstance(refund, str) else json.dumps(refund), "key": f"{RUN}-after",
                 "now": utcnow()})
    finally:
        await engine.dispose()


def _backfill(url: str) -> None:
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    cfg = _alembic_config(settings)
    mtn, refund = asyncio.run(_payments_and_refund(url))
    command.downgrade(cfg, "0019")  # as an install before 0020
    assert not asyncio.run(_has_lane(url))
    asyncio.run(_as_the_previous_release_wrote_them(url, mtn, refund))
    migrate(settings)
    expected = {"collect": "mtn_momo", "poll": "mtn_momo", "submit": "airtel", "refund-poll": "airtel",
                "done": None, "sms": None}  # DONE is never claimed again: left as it was
    assert asyncio.run(_read(url)) == expected
    asyncio.run(_insert_after(url))
    expected["after"] = "airtel"
    assert asyncio.run(_read(url)) == expected

    # Down (the column, trigger and function gone) and up again: the same lanes.
    command.downgrade(cfg, "0019")
    assert not asyncio.run(_has_lane(url))
    migrate(settings)
    assert asyncio.run(_read(url)) == expected


def test_the_migration_fills_the_jobs_not_finished_on_sqlite(tmp_path: Any) -> None:
    _backfill(f"sqlite+aiosqlite:///{tmp_path}/m.db")


@requires_pg
def test_the_migration_fills_the_jobs_not_finished_on_postgres(migrated_database: str) -> None:
    try:
        _backfill(migrated_database)
    finally:
        migrate(make_settings())  # at head again, whatever happened


@requires_pg
async def test_the_lane_compares_in_byte_order_on_postgres(sm: Any) -> None:
    """The claim's ranges are built in Python's order of str (code points: UTF-8's byte order)."""
    async with sm() as session:
        collation = (await session.execute(text(
            "SELECT collation_name FROM information_schema.columns "
            "WHERE table_name = 'outbox_jobs' AND column_name = 'lane'"))).scalar_one()
    assert collation == "C"
