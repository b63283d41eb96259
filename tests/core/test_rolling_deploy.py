"""A rolling deploy: for a while the previous release's workers run on the new schema (README, "Deploying a
release"). A handler that meets a column or table its code expects and the schema no longer (or not yet) has
(PostgreSQL's 42703 / 42P01) is not the job's failure: the job is handed back, its attempt kept, for a worker
of the matching release, and the worker says so at most once a minute. Before, such jobs used up their
attempts in ~3.5 minutes and parked (every webhook of an old worker after migration 0006)."""

from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg
from sqlalchemy import select, text, update
from sqlalchemy.exc import ProgrammingError

from core.db import utcnow
from core.models import OutboxJob
from core.outbox import INTERRUPTED, SCHEMA_MISMATCH, OutboxWorker, call_starting, enqueue, schema_mismatch
from tests.conftest import requires_pg


async def _jobs(sm) -> dict[str, OutboxJob]:
    async with sm() as session:
        return {j.kind: j for j in (await session.execute(select(OutboxJob))).scalars()}


async def _due_now(sm) -> None:
    async with sm.begin() as session:
        await session.execute(update(OutboxJob).values(run_at=utcnow() - timedelta(seconds=1)))


def test_undefined_column_and_table_are_a_schema_mismatch_however_wrapped():
    column = asyncpg.exceptions.UndefinedColumnError("column webhook_endpoints.previous_secret_enc does not exist")
    table = asyncpg.exceptions.UndefinedTableError('relation "webhook_endpoints" does not exist')
    assert schema_mismatch(column) and schema_mismatch(table)
    assert schema_mismatch(ProgrammingError("select", {}, table))  # SQLAlchemy's, .orig
    try:
        try:
            raise column
        except asyncpg.PostgresError as exc:
            raise RuntimeError("webhook delivery failed") from exc
    except RuntimeError as wrapped:
        assert schema_mismatch(wrapped)  # __cause__
    syntax = asyncpg.exceptions.PostgresSyntaxError("syntax error at or near")
    assert not schema_mismatch(ProgrammingError("select", {}, syntax)) and not schema_mismatch(ValueError("x"))


async def test_a_schema_mismatch_hands_the_job_back_without_an_attempt_and_logs_once_a_minute(sm, caplog):
    async def old_release(job):
        raise ProgrammingError("select previous_secret_enc from webhook_endpoints", {},
                               asyncpg.exceptions.UndefinedColumnError("column previous_secret_enc does not exist"))

    async def other(job):
        raise ProgrammingError("selct", {}, asyncpg.exceptions.PostgresSyntaxError("syntax error"))

    async with sm.begin() as session:
        for n in range(3):
            await enqueue(session, f"webhook.event.{n}", {}, max_attempts=2)
        await enqueue(session, "broken", {}, max_attempts=2)
    worker = OutboxWorker(sm, {**{f"webhook.event.{n}": old_release for n in range(3)}, "broken": other})
    with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
        for _ in range(4):  # twice the attempts the jobs have
            await worker.run_once()
            await _due_now(sm)
    jobs = await _jobs(sm)
    for n in range(3):
        job = jobs[f"webhook.event.{n}"]
        assert (job.status, job.attempts, job.locked_by) == ("PENDING", 0, None)
        assert job.last_error.startswith(SCHEMA_MISMATCH) and "previous_secret_enc" in job.last_error
    assert jobs["broken"].status == "PARKED"  # any other database error still counts its attempts
    said = [r for r in caplog.records if "does not match the database schema" in r.getMessage()]
    assert len(said) == 1 and said[0].jobs_handed_back == 1  # 12 hand-backs, one line (the next in a minute)
    # Due again 30 s later, as the old release's workers stop and the new one's take over (counted from before
    # the run: a loaded machine can take seconds over it and the read below).
    ran = utcnow()
    await worker.run_once()
    job = (await _jobs(sm))["webhook.event.0"]
    assert job.run_at > ran + timedelta(seconds=25)


async def test_a_doubt_about_the_provider_call_survives_the_hand_back(sm):
    async def stamped_then_old_schema(job):
        await call_starting(sm, job)
        raise ProgrammingError("update", {}, asyncpg.exceptions.UndefinedTableError("relation does not exist"))

    async with sm.begin() as session:
        await enqueue(session, "payment.collect", {})
    worker = OutboxWorker(sm, {"payment.collect": stamped_then_old_schema})
    await worker.run_once()
    job = (await _jobs(sm))["payment.collect"]
    assert job.status == "PENDING" and job.attempts == 0 and job.last_error.startswith(INTERRUPTED)
    await _due_now(sm)
    [claimed] = await OutboxWorker(sm, {}).claim()
    assert claimed.interrupted and claimed.call_may_have_arrived  # the next attempt asks, not resends


@requires_pg
async def test_the_previous_release_reading_a_dropped_column_parks_nothing(sm):
    """The reviewer's case on the real schema: 0005's worker reads webhook_endpoints.previous_secret_enc,
    which 0006 dropped; SQLAlchemy's error through the session and asyncpg's own on a raw connection."""
    async def old_worker_session(job):
        async with sm() as session:
            await session.execute(text("SELECT previous_secret_enc FROM webhook_endpoints"))

    async def old_worker_raw(job):
        async with sm() as session:
            conn = await session.connection()
            raw = (await conn.get_raw_connection()).driver_connection
            await raw.fetch("SELECT id FROM webhook_endpoint_previous_secrets")

    async with sm.begin() as session:
        await enqueue(session, "session", {}, max_attempts=1)
        await enqueue(session, "raw", {}, max_attempts=1)
    worker = OutboxWorker(sm, {"session": old_worker_session, "raw": old_worker_raw})
    for _ in range(3):
        assert await worker.run_once() == 2
        await _due_now(sm)
    jobs = await _jobs(sm)
    assert {(j.kind, j.status, j.attempts) for j in jobs.values()} == {("session", "PENDING", 0),
                                                                        ("raw", "PENDING", 0)}
    assert "previous_secret_enc" in jobs["session"].last_error
    assert "UndefinedTableError" in jobs["raw"].last_error


async def test_the_new_release_runs_the_job_the_old_one_handed_back(sm):
    async def old(job):
        raise asyncpg.exceptions.UndefinedColumnError("column does not exist")

    ran = []

    async def new(job):
        ran.append(job.attempts)

    async with sm.begin() as session:
        await enqueue(session, "webhook.event", {})
    await OutboxWorker(sm, {"webhook.event": old}).run_once()
    await _due_now(sm)
    assert await OutboxWorker(sm, {"webhook.event": new}).run_once() == 1
    assert ran == [1] and (await _jobs(sm))["webhook.event"].status == "DONE"


async def test_a_job_of_a_kind_this_worker_does_not_know_is_handed_back_not_parked(sm, caplog):
    """A newer release queues a kind the previous release's workers have no handler for (reminders.cooperative,
    ussd.forget_phone): handed back for a worker that has it, its attempts kept. It was parked at once (no
    retries), and the cooperative missed its reminders until a person replayed it."""
    async with sm.begin() as session:
        await enqueue(session, "reminders.cooperative", {"cooperative_id": "c1"}, max_attempts=2)
    old_worker = OutboxWorker(sm, {"sms.send": lambda job: None})
    with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
        for _ in range(4):  # twice the attempts the job has
            await old_worker.run_once()
            await _due_now(sm)
    job = (await _jobs(sm))["reminders.cooperative"]
    assert (job.status, job.attempts, job.locked_by) == ("PENDING", 0, None)
    assert job.last_error.startswith(SCHEMA_MISMATCH) and "no handler for job kind 'reminders.cooperative'" in \
        job.last_error
    assert [r.kind for r in caplog.records if "does not match" in r.getMessage()] == ["reminders.cooperative"]
    ran = []

    async def new_release(job):
        ran.append(job.payload)

    await OutboxWorker(sm, {"reminders.cooperative": new_release}).run_once()
    assert ran == [{"cooperative_id": "c1"}] and (await _jobs(sm))["reminders.cooperative"].status == "DONE"


async def test_a_job_no_release_has_handled_for_hours_is_parked_for_a_person(sm):
    """Not a deploy's window any more (a kind a newer release removed, or queued by mistake): parked, in the list
    a person reads, rather than handed back every 30 s for ever."""
    async with sm.begin() as session:
        await enqueue(session, "removed.kind", {})
        await session.execute(update(OutboxJob).values(created_at=utcnow() - timedelta(hours=7)))
    await OutboxWorker(sm, {}).run_once()
    job = (await _jobs(sm))["removed.kind"]
    assert job.status == "PARKED" and job.last_error.startswith("no handler for job kind 'removed.kind' after 6:00")
