"""A provider request is counted as one that may have arrived only once it has left: the OAuth token it is sent
with is obtained first (core.jobs.ready_to_send, the adapters' prepare), so a slow or failing token endpoint
makes an attempt that was never sent (retried, then sent once) rather than a push or a refund taken for sent -
which M-Pesa could never be asked about (no CheckoutRequestID) and Airtel would never send again. And the
callers waiting for a token share the fetch in progress, its token or its failure (providers.tokens)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.jobs import collect_call_budget
from core.models import OutboxJob, Payment
from core.money import Money
from core.outbox import INTERRUPTED, handler_timeout
from core.ports import ProviderError, RefundRequest
from providers.tokens import TokenCache
from tests.conftest import drain
from tests.core.test_lost_before_call import AIRTEL_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import (
    MPESA_BASE,
    due_now,
    mpesa_adapter,
    mpesa_payment,
    mpesa_wire,
    mtn_adapter,
    mtn_wire,
)

PUSH = "/mpesa/stkpush/v1/processrequest"
TOKEN = "/oauth/v1/generate"
PAYMENTS = 8
# Scaled down: a 50 s collect budget -> 3 s (not 1 s: once the token is there, the jobs' reads, token and push
# must fit in it, eight at once, which a loaded machine can take over a second for).
BUDGET = 3.0


def _accept_push(request: httpx.Request) -> httpx.Response:
    n = json.loads(request.content)["PhoneNumber"][-4:]  # the payment's number (the whole phone is never logged)
    return httpx.Response(200, json={"MerchantRequestID": f"m-{n}", "CheckoutRequestID": f"ws_CO_DMZ_{n}",
                                     "ResponseCode": "0", "ResponseDescription": "Success."})


async def _mpesa_payments(rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, token: Any,
                          budget: float = BUDGET) -> Any:
    """PAYMENTS M-Pesa payments whose collect jobs are due at once, the token endpoint answering by `token`."""
    monkeypatch.setattr("core.jobs.collect_call_budget", lambda _lease: budget)
    wire = mpesa_wire().on("GET", TOKEN, token).on("POST", PUSH, _accept_push)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payments = [await mpesa_payment(rt, demo, phone=f"+25470800{i:04d}", key=f"key-token-{i:04d}")
                for i in range(PAYMENTS)]
    return wire, payments


async def _collects(rt: Any) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.collect"))).scalars())


def _none_taken_for_sent(jobs: list[OutboxJob], error: str) -> None:
    """Every collect job failed its attempt as one that sent nothing (not INTERRUPTED), and is due again."""
    assert [(j.status, j.attempts) for j in jobs] == [("PENDING", 1)] * PAYMENTS
    for job in jobs:
        assert job.last_error and not job.last_error.startswith(INTERRUPTED), job.last_error
        assert error in job.last_error, job.last_error


def _usual_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retries once the token endpoint is well have the usual call budget and handler time (the 60-s lease's):
    the scaled-down ones had to cover eight jobs' reads, token and push at once, which a loaded CI host can take
    longer than for. Their deadline is not what is tested there."""
    monkeypatch.setattr("core.jobs.collect_call_budget", collect_call_budget)
    monkeypatch.setattr("core.outbox.handler_timeout", handler_timeout)


async def _each_pushed_once(rt: Any, worker: Any, wire: Any, payments: list[Payment],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Retried once the token endpoint is well: every payer prompted, exactly once, and the push recorded."""
    _usual_budgets(monkeypatch)
    await due_now(rt, "payment.collect")
    await drain(worker)
    phones = sorted(json.loads(r.content)["PhoneNumber"] for r in wire.sent("POST", PUSH))
    assert phones == sorted(f"25470800{i:04d}" for i in range(PAYMENTS))
    async with rt.sessionmaker() as s:
        rows = [await s.get(Payment, p.id) for p in payments]
    assert {(r.status, r.provider_transaction_id) for r in rows} == {
        ("PROCESSING", f"ws_CO_DMZ_{i:04d}") for i in range(PAYMENTS)}
    assert [j.status for j in await _collects(rt)] == ["DONE"] * PAYMENTS


async def test_pushes_waiting_on_a_token_slower_than_their_budget_are_sent_once_it_comes(rt, demo, worker,
                                                                                       monkeypatch):
    """The reviewer's case: the token answers after the jobs' deadline. Before, the job holding the token lock
    was cut off at its deadline, taken for a push that may have arrived, and ended DONE: never sent."""
    # The token answers once every job has given up on it, whatever the clock: a deadline counted from before
    # the eight payments were made let it come within the jobs' budget when making them took over 0.5 s.
    token_comes = asyncio.Event()

    async def slow_token(_request: httpx.Request) -> httpx.Response:
        await token_comes.wait()
        return httpx.Response(200, json={"access_token": "tok-slow-0001", "expires_in": "3599"})

    wire, payments = await _mpesa_payments(rt, demo, monkeypatch, slow_token)
    assert await worker.run_once() == PAYMENTS  # all at once, all out of time before the token comes
    assert wire.sent("POST", PUSH) == []
    _none_taken_for_sent(await _collects(rt), "mpesa collect: its token was not obtained in time; nothing was sent")
    token_comes.set()
    await asyncio.sleep(0.2)  # the fetch goes on without them
    await _each_pushed_once(rt, worker, wire, payments, monkeypatch)
    assert len(wire.sent("GET", TOKEN)) == 1  # one fetch for all eight, its token kept for their retries
    assert {r.headers["Authorization"] for r in wire.sent("POST", PUSH)} == {"Bearer tok-slow-0001"}


async def test_pushes_waiting_on_a_failing_token_endpoint_share_its_failure_and_are_sent_later(rt, demo, worker,
                                                                                               monkeypatch):
    """Each token fetch fails: the waiters take the failure of the fetch in progress, not a fetch of their own in
    turn (before: four fetches, 0.8 s, and the four jobs left ran out of time and were lost)."""
    outage = {"on": True}
    # The fetch fails once all eight jobs wait for the token (not after a fixed 0.2 s, within which a loaded host
    # had not brought all eight there: the last started a fetch of its own); their budget is the usual one, its
    # deadline not what is tested here.
    all_waiting = asyncio.Event()

    async def token(_request: httpx.Request) -> httpx.Response:
        if outage["on"]:
            await asyncio.wait_for(all_waiting.wait(), 60)
            raise httpx.ReadTimeout("token endpoint did not answer in time")
        return httpx.Response(200, json={"access_token": "tok-back-0002", "expires_in": "3599"})

    wire, payments = await _mpesa_payments(rt, demo, monkeypatch, token, budget=collect_call_budget(60))
    adapter = rt.providers["mpesa"]
    prepare, waiting = adapter.prepare, []

    async def counted(operation: str) -> None:
        waiting.append(operation)
        if len(waiting) == PAYMENTS:
            all_waiting.set()
        await prepare(operation)

    monkeypatch.setattr(adapter, "prepare", counted)
    assert await worker.run_once() == PAYMENTS
    assert len(wire.sent("GET", TOKEN)) == 1  # one fetch, its failure shared by all eight
    assert wire.sent("POST", PUSH) == []
    _none_taken_for_sent(await _collects(rt), "M-Pesa token: no answer in time")
    outage["on"] = False
    await _each_pushed_once(rt, worker, wire, payments, monkeypatch)
    assert len(wire.sent("GET", TOKEN)) == 2


async def test_a_refund_waiting_on_a_slow_token_is_sent_once_it_comes(rt, demo, worker, monkeypatch):
    """Airtel's refund names only the payment, so one that may have arrived is never sent again (a person
    records it). Before, the worker cut the submit off during the token fetch (its handler timeout): taken for
    a refund that may have arrived, it was never sent."""
    monkeypatch.setattr("core.jobs.collect_call_budget", lambda _lease: BUDGET)
    monkeypatch.setattr("core.outbox.handler_timeout", lambda _lease: 2 * BUDGET + 0.5)  # the worker's cut-off, scaled
    wire, payment = await airtel_collected(rt, demo, "key-airtel-token")
    token_comes = asyncio.Event()  # once the submit has given up on it (not a clock started before the refund)

    async def slow_token(_request: httpx.Request) -> httpx.Response:
        await token_comes.wait()
        return httpx.Response(200, json={"access_token": "tok-airtel-slow", "expires_in": "180"})

    wire.on("POST", "/auth/oauth2/token", slow_token)
    wire.on("POST", AIRTEL_REFUND, 200, {
        "data": {"transaction": {"airtel_money_id": "RF-1", "status": "SUCCESS"}},
        "status": {"code": "200", "message": "SUCCESS", "result_code": "ESB000010", "success": True}})
    refund = await _ask_refund(rt, demo, payment, key="refund-token-1")
    await worker.run_once()
    _, _, jobs = await _rows(rt, refund.id, payment.id)
    [submit] = [j for j in jobs if j.kind == "refund.submit"]
    assert (submit.status, submit.attempts) == ("PENDING", 1)
    assert submit.last_error and not submit.last_error.startswith(INTERRUPTED), submit.last_error
    assert wire.sent("POST", AIRTEL_REFUND) == []
    token_comes.set()
    await asyncio.sleep(0.2)
    _usual_budgets(monkeypatch)
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    assert len(wire.sent("POST", "/auth/oauth2/token")) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED"


async def test_mtn_prepares_the_token_of_the_product_it_sends_with() -> None:
    """Collections go with the collection product's token, refunds with the disbursement product's: prepare
    fetches that one, and the request then goes with it, no second token request inside its window."""
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)

    class Rt:
        providers: dict[str, Any] = {}

    adapter = mtn_adapter(Rt(), wire)
    await adapter.prepare("refund")
    assert [r.url.path for r in wire.seen] == ["/disbursement/token/"]
    await adapter.request_refund(RefundRequest(
        provider_reference="00000000-0000-4000-8000-000000000001", original_provider_reference="ref-1",
        original_provider_transaction_id=None, amount=Money(5000, "RWF"), full=True, payer=None, reason="refund",
        callback_url=""))
    assert [r.url.path for r in wire.seen] == ["/disbursement/token/", "/disbursement/v1_0/refund"]
    await adapter.prepare("collect")
    assert wire.seen[-1].url.path == "/collection/token/"


# --- TokenCache --------------------------------------------------------------------------------------------

async def test_token_waiters_share_one_fetch_and_its_failure() -> None:
    calls: list[str] = []
    answers: list[Any] = [ProviderError("token endpoint down", retryable=True), ("tok-1", 3600.0)]

    async def fetch() -> tuple[str, float]:
        calls.append("fetch")
        await asyncio.sleep(0.05)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = TokenCache(fetch)
    failed = await asyncio.gather(*(cache.get() for _ in range(5)), return_exceptions=True)
    assert calls == ["fetch"]  # one fetch for five callers, its failure given to each
    assert all(isinstance(f, ProviderError) for f in failed)
    assert await asyncio.gather(*(cache.get() for _ in range(5))) == ["tok-1"] * 5  # the next fetch, shared
    assert calls == ["fetch", "fetch"] and cache.fetches == 1
    assert await cache.get() == "tok-1" and len(calls) == 2  # cached


async def test_a_token_waiter_that_gives_up_does_not_cancel_the_fetch() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def fetch() -> tuple[str, float]:
        started.set()
        await release.wait()
        return "tok-2", 3600.0

    cache = TokenCache(fetch)
    impatient = asyncio.create_task(cache.get())
    await started.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await cache.get()  # a job's deadline
    impatient.cancel()
    await asyncio.gather(impatient, return_exceptions=True)
    release.set()
    for _ in range(100):
        if cache.fetches:
            break
        await asyncio.sleep(0.01)
    assert cache.fetches == 1  # the fetch went on after every caller left; its token is kept
    assert await cache.get() == "tok-2"


async def test_a_token_fetch_that_never_ends_fails_at_its_own_deadline_and_the_next_caller_fetches_again() -> None:
    """A token endpoint trickling its answer a byte at a time never trips a read timeout: the shared fetch, which
    no caller's deadline ends, would hold every later caller (every payment and refund of the provider) until a
    restart. It fails at its own deadline, retryable, and the next caller gets a fresh token."""
    calls = 0

    async def fetch() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # the first fetch never ends
        return "tok-2", 3600.0

    cache = TokenCache(fetch, deadline=0.3)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):  # a job's deadline passes first: the fetch goes on
            await cache.get()
    with pytest.raises(ProviderError) as failed:
        await asyncio.wait_for(cache.get(), 10)  # joins the stuck fetch, which ends at its own deadline
    assert (failed.value.retryable, failed.value.code) == (True, "TOKEN_TIMEOUT")
    assert await asyncio.wait_for(cache.get(), 10) == "tok-2"
    assert (calls, cache.fetches) == (2, 1)
