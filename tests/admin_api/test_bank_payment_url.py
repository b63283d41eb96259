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
                                                            worker: Any) -> None:
    _wait(rt, 0)
    body = _bank(demo)
    created = await admin.json("POST", "/v1/payments", 201, json=body)
    assert created["paymentUrl"] is None and created["status"] == "PENDING"
    [job] = await worker.claim(key=f"collect:{created['id']}")  # a worker took it first
    waiting = asyncio.create_task(CollectNow.of(rt).wait(created["id"], 20))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the API process does not run a job a worker holds: it watches the row
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


def _options(irembo: Irembo) -> SimulatorOptions:
    return irembo.app[STATE].options


def test_the_wait_is_configured_and_bounded() -> None:
    assert load_settings({}).payment_url_wait_seconds == 5.0
    assert load_settings({"PAYMENT_URL_WAIT_SECONDS": "0"}).payment_url_wait_seconds == 0
    for bad in ("-1", "21", "nan", "soon"):
        with pytest.raises(ConfigError):
            load_settings({"PAYMENT_URL_WAIT_SECONDS": bad})
