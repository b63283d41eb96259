"""A bank payment's 201 carries the `paymentUrl` the client redirects the payer to (seed 001's bank flow): the serve
process that made the payment runs its collect job at once when no worker has it (core.collect_now), over HTTP
against the IremboPay simulator, or watches the row while a worker runs it; past PAYMENT_URL_WAIT_SECONDS the 201
goes without it. The job runs once whoever takes it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from sqlalchemy import select

from core.collect_now import CollectNow
from core.config import ConfigError, load_settings
from core.models import OutboxJob, Payment
from core.outbox import CALL_STARTED
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, Irembo, payment_body
from tests.conftest import drain

INVOICES = ("POST", "/payments/invoices")


def _wait(rt: Any, seconds: float) -> None:
    rt.settings = dataclasses.replace(rt.settings, payment_url_wait_seconds=seconds)


def _bank(demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    return payment_body(demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                        paymentAccount="aline@example.rw", **over)


async def _collect_job(rt: Any, payment_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"collect:{payment_id}"))).scalar_one()


async def test_the_201_carries_the_invoice_url_made_by_the_api_process(admin: Caller, rt: Any, demo: Any,
                                                                      irembo: Irembo, worker: Any) -> None:
    _wait(rt, 10)
    body = _bank(demo)
    created = await admin.json("POST", "/v1/payments", 201, json=body)
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, created["id"])
    assert stored is not None and stored.status == "PROCESSING" and stored.payment_url
    assert created["status"] == "PROCESSING"
    assert created["paymentUrl"] == stored.payment_url and created["paymentUrl"].startswith("http")
    assert created["gatewayReference"] == stored.gateway_reference is not None
    assert irembo.calls(*INVOICES) == 1
    job = await _collect_job(rt, created["id"])
    assert job.status == "DONE" and job.attempts == 1  # run before any worker ran: by the API process
    # The worker finds nothing left to collect, and IremboPay is asked once.
    await drain(worker)
    assert irembo.calls(*INVOICES) == 1
    # A retry of the request (the answer lost) answers the same invoice.
    again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["paymentUrl"] == created["paymentUrl"]
    assert irembo.calls(*INVOICES) == 1


async def test_a_job_a_worker_holds_is_watched_not_run_twice(admin: Caller, rt: Any, demo: Any, irembo: Irembo,
                                                            worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _wait(rt, 0)
    body = _bank(demo)
    created = await admin.json("POST", "/v1/payments", 201, json=body)
    assert created["paymentUrl"] is None and created["status"] == "PENDING"
    [job] = await worker.claim(key=f"collect:{created['id']}")  # a worker took it first
    collect = CollectNow.of(rt)
    assert await collect._may_change(created["id"])  # its run is what the wait watches for
    watching, look = asyncio.Event(), collect._may_change

    async def may_change(payment_id: str) -> bool:
        changing = await look(payment_id)
        watching.set()
        return changing

    # Until the wait looks at the row, not for a fixed pause: a loaded host's pause could end before a wait that
    # ran the job itself had finished its call, and the test passed without the wait having watched.
    monkeypatch.setattr(collect, "_may_change", may_change)
    waiting = asyncio.create_task(collect.wait(created["id"], 20))
    watch = asyncio.create_task(watching.wait())
    await asyncio.wait([waiting, watch], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    assert watching.is_set() and not waiting.done()  # the API process does not run a job a worker holds: it watches
    assert irembo.sent == []
    await worker.run_job(job)
    await asyncio.wait_for(waiting, 20)
    assert irembo.calls(*INVOICES) == 1
    done = await _collect_job(rt, created["id"])
    assert done.status == "DONE" and done.attempts == 1  # the worker's one run
    _wait(rt, 10)  # the client's retry finds the URL, at once: nothing is left to run
    again = await admin.req("POST", "/v1/payments", json=body)
    assert again.status == 201 and (await again.json())["paymentUrl"]
    assert irembo.calls(*INVOICES) == 1


async def test_past_the_wait_the_201_goes_without_the_url_and_the_job_finishes(admin: Caller, rt: Any, demo: Any,
                                                                              irembo: Irembo, worker: Any) -> None:
    _wait(rt, 0.5)
    _options(irembo).hang_request = 3.0  # IremboPay answers the invoice after 3 s
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["paymentUrl"] is None and created["status"] == "PENDING"
    # The job goes on in the API process and records the invoice when IremboPay answers.
    for _ in range(200):
        async with rt.sessionmaker() as s:
            stored = await s.get(Payment, created["id"])
        if stored is not None and stored.payment_url:
            break
        await asyncio.sleep(0.1)
    assert stored is not None and stored.status == "PROCESSING" and stored.payment_url
    job = await _collect_job(rt, created["id"])
    assert job.status == "DONE" and job.attempts == 1
    await drain(worker)
    assert irembo.calls(*INVOICES) == 1


async def test_with_no_wait_the_job_is_the_workers(admin: Caller, rt: Any, demo: Any, irembo: Irembo,
                                                  worker: Any) -> None:
    _wait(rt, 0)
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["paymentUrl"] is None
    job = await _collect_job(rt, created["id"])
    assert job.status == "PENDING" and job.attempts == 0 and irembo.sent == []
    await drain(worker)
    assert irembo.calls(*INVOICES) == 1
    got = await admin.json("GET", f"/v1/payments/{created['id']}", 200)
    assert got["paymentUrl"] and got["status"] == "PROCESSING"


async def test_mobile_money_does_not_wait_or_collect_in_the_api(admin: Caller, rt: Any, demo: Any,
                                                               irembo: Irembo) -> None:
    _wait(rt, 10)
    created = await admin.json("POST", "/v1/payments", 201,
                               json=payment_body(demo["payment_types"]["Monthly Rent"]))
    assert created["status"] == "PENDING" and created["paymentUrl"] is None
    job = await _collect_job(rt, created["id"])
    assert job.status == "PENDING" and job.attempts == 0 and job.locked_by is None


async def test_an_invoice_answered_500_is_left_to_the_workers_retry(admin: Caller, rt: Any, demo: Any,
                                                                irembo: Irembo) -> None:
    _wait(rt, 10)
    _options(irembo).fail_request_500 = True  # IremboPay answers 500: retried later by the worker, not here
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["status"] == "PENDING" and created["paymentUrl"] is None
    job = await _collect_job(rt, created["id"])
    assert job.status == "PENDING" and job.attempts == 1 and "500" in (job.last_error or "")
    # Its retry is due later: a replay of the POST has nothing to watch for, and answers at once.
    assert not await CollectNow.of(rt)._may_change(created["id"])


def _options(irembo: Irembo) -> SimulatorOptions:
    return irembo.app[STATE].options


def test_the_wait_is_configured_and_bounded() -> None:
    assert load_settings({}).payment_url_wait_seconds == 5.0
    assert load_settings({"PAYMENT_URL_WAIT_SECONDS": "0"}).payment_url_wait_seconds == 0
    for bad in ("-1", "21", "nan", "soon"):
        with pytest.raises(ConfigError):
            load_settings({"PAYMENT_URL_WAIT_SECONDS": bad})


async def _until_processing(rt: Any, payment_id: str) -> Payment:
    for _ in range(300):
        async with rt.sessionmaker() as s:
            stored = await s.get(Payment, payment_id)
        if stored is not None and stored.payment_url:
            return stored
        await asyncio.sleep(0.1)
    raise AssertionError("no invoice made")


async def test_a_claim_slower_than_the_wait_does_not_hold_the_201(admin: Caller, rt: Any, demo: Any, irembo: Irembo,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The claim's connection is slow to come (a busy pool, SQLite's write lock): the 201 goes at the wait's end,
    # and the claim, when it gets the job, still runs it (not left leased to no one until its lease lapses).
    _wait(rt, 0.5)
    collect = CollectNow.of(rt)
    claim, release = collect._worker.claim, asyncio.Event()

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await claim(*args, **kwargs)

    monkeypatch.setattr(collect._worker, "claim", slow_claim)
    created = await asyncio.wait_for(admin.json("POST", "/v1/payments", 201, json=_bank(demo)), 30)
    assert created["status"] == "PENDING" and created["paymentUrl"] is None
    job = await _collect_job(rt, created["id"])
    assert job.status == "PENDING" and job.attempts == 0 and irembo.sent == []  # the claim is still waiting
    release.set()
    stored = await _until_processing(rt, created["id"])
    assert stored.status == "PROCESSING"
    job = await _collect_job(rt, created["id"])
    assert job.status == "DONE" and job.attempts == 1 and job.locked_by is None
    assert irembo.calls(*INVOICES) == 1


async def test_after_shutdown_began_a_request_in_flight_starts_no_job(admin: Caller, rt: Any, demo: Any,
                                                                      irembo: Irembo, worker: Any) -> None:
    # aiohttp runs on_shutdown (collect_now.close) before it waits for the requests in flight: one reaching the
    # wait then must not start a job the runtime's cleanup would cut off; it is the workers'.
    from core import collect_now

    _wait(rt, 0.3)
    CollectNow.of(rt)
    await collect_now.close(rt)
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["status"] == "PENDING" and created["paymentUrl"] is None
    job = await _collect_job(rt, created["id"])
    assert job.status == "PENDING" and job.attempts == 0 and job.locked_by is None and irembo.sent == []
    await drain(worker)
    assert irembo.calls(*INVOICES) == 1


async def test_a_run_that_cannot_record_its_result_is_logged(admin: Caller, rt: Any, demo: Any, irembo: Irembo,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # As a worker's (_guarded): the database gone while the job records its end is said, not lost as a task's
    # exception nobody reads; the lease brings the job back.
    _wait(rt, 10)
    collect = CollectNow.of(rt)

    async def run_job(job: Any) -> None:
        raise ConnectionResetError("database went away")

    monkeypatch.setattr(collect._worker, "run_job", run_job)
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["status"] == "PENDING"
    [record] = [r for r in caplog.records if r.getMessage() == "could not record job result"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ConnectionResetError)
    assert record.payment_id == created["id"]  # type: ignore[attr-defined]
    job = await _collect_job(rt, created["id"])
    assert job.status == "RUNNING" and job.locked_by is not None  # leased: a worker takes it when the lease lapses


async def test_a_job_cut_at_shutdown_is_left_leased_and_counted_cancelled(admin: Caller, rt: Any, demo: Any,
                                                                        irembo: Irembo,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # IremboPay hangs past the shutdown's grace: the job is cancelled mid-call, left RUNNING with its call stamped
    # (a worker takes it back at the lease's end and asks before sending again), and /metrics does not count it
    # a job done.
    from core import collect_now
    from core.metrics import JOBS

    _wait(rt, 0.3)
    _options(irembo).hang_request = 30.0
    monkeypatch.setattr(collect_now, "CLOSE_GRACE_SECONDS", 0.5)
    done_before = JOBS.labels(kind="payment.collect", outcome="done")._value.get()
    cancelled_before = JOBS.labels(kind="payment.collect", outcome="cancelled")._value.get()
    created = await admin.json("POST", "/v1/payments", 201, json=_bank(demo))
    assert created["status"] == "PENDING" and created["paymentUrl"] is None
    for _ in range(300):  # the invoice request has left
        if irembo.calls(*INVOICES):
            break
        await asyncio.sleep(0.1)
    await collect_now.close(rt)
    job = await _collect_job(rt, created["id"])
    assert job.status == "RUNNING" and job.attempts == 1 and job.locked_by is not None
    assert job.last_error == CALL_STARTED
    assert JOBS.labels(kind="payment.collect", outcome="done")._value.get() == done_before
    assert JOBS.labels(kind="payment.collect", outcome="cancelled")._value.get() == cancelled_before + 1
