"""Which money requests are sent again (NOT_SENT: they never left this process) and which are only asked about
(they were handed to the transport: core.ports.watch_departures), through the worker and the real adapters.

A request the provider may have (it reached the wire, whatever came after: an exception of ours, of the transport,
an answer we cannot read) is never sent a second time: a second STK push is a second PIN prompt, a second Airtel
refund or M-Pesa reversal a second refund. One that failed while it was being made, before it left, is sent later.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

import core.jobs as core_jobs
import providers.mpesa.adapter as mpesa_module
from app import create_worker
from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.http import make_client
from core.jobs import _until_it_leaves
from core.models import OutboxJob, Payment
from core.money import Money
from core.outbox import CALL_SENT, CALL_STARTED, INTERRUPTED, WORKER_LOST, OutboxWorker
from core.payments import create_payment
from core.phone import Phone
from core.ports import (
    NOT_SENT,
    CredentialsRefused,
    ProviderError,
    ProviderTimeout,
    departing,
    known_as,
    watch_departures,
)
from providers import calls
from providers.irembopay import IremboPayAdapter
from providers.mpesa import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from tests import logscan
from tests.admin_api.conftest import bearer
from tests.conftest import deadlines_from_the_call, drain
from tests.core.test_lost_before_call import ACCEPTED, PUSH, _lease_lapses
from tests.core.test_provider_faults_mpesa import RECEIPT, REVERSAL, _pushed
from tests.providers import test_mtn_momo
from tests.providers.conftest import FakeProvider, load
from tests.providers.test_irembopay import BASE as IREMBO_BASE
from tests.providers.test_irembopay import RECORDED_EXPIRY, Wire, collection, config, fixture
from tests.providers.test_irembopay_duplicate import DUPLICATE, INVOICES, LOOKUP, held
from tests.providers.test_irembopay_duplicate import PUSH as IREMBO_PUSH
from tests.providers.test_refund_ambiguous import ACCEPTED as REVERSAL_ACCEPTED
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, MTN_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import (
    ADMIN,
    MPESA_BASE,
    MPESA_CREDS,
    Routes,
    completed,
    due_now,
    mpesa_adapter,
    mpesa_payment,
    mpesa_wire,
    mtn_payment,
    mtn_wire,
)

TOKEN = "/oauth/v1/generate"


class TransportBroke(Exception):
    """Something of ours failing after the request was written (not an httpx error, not a ProviderError)."""


def _arrives_then_breaks(_request: httpx.Request) -> httpx.Response:
    raise TransportBroke("the answer could not be read")


async def _job(rt: Any, kind: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalar_one()


async def _twice(rt: Any, worker: Any, kind: str) -> None:
    await drain(worker)
    await due_now(rt, kind)
    await drain(worker)



def _mpesa_collection() -> Any:
    """A collection of 15,000 KES from a Safaricom number, as the Daraja tests below push it."""
    return dataclasses.replace(collection(), method="MPESA", amount=Money(15_000, "KES"),
                               payer=Phone("+254708000001"), payer_account="+254708000001")

async def test_an_stk_push_that_reached_the_wire_is_never_pushed_again(rt: Any, demo: dict[str, Any],
                                                                      worker: Any) -> None:
    wire = mpesa_wire().on("POST", PUSH, _arrives_then_breaks)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await drain(worker)
    collect = await _job(rt, "payment.collect")
    assert (collect.last_error or "").startswith(INTERRUPTED) and NOT_SENT not in (collect.last_error or "")
    wire.on("POST", PUSH, 200, ACCEPTED)
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert len(wire.sent("POST", PUSH)) == 1  # asked about, never a second prompt
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"


async def test_an_stk_push_sent_again_with_a_fresh_token_is_still_never_pushed_a_third_time(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """Daraja refused the first push's token (401: nothing ran), the adapter fetched a new one and pushed again,
    and that second push broke after it left: in doubt, as the first push alone would be."""
    answers = [httpx.Response(401, json={"errorCode": "404.001.03", "errorMessage": "Invalid Access Token"})]

    def push(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop()
        return _arrives_then_breaks(request)

    wire = mpesa_wire().on("POST", PUSH, push)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    await mpesa_payment(rt, demo)
    await _twice(rt, worker, "payment.collect")
    assert len(wire.sent("POST", PUSH)) == 2
    assert len(wire.sent("GET", TOKEN)) == 2


async def test_an_stk_push_that_could_not_be_made_is_sent_later_once(rt: Any, demo: dict[str, Any], worker: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wire = mpesa_wire().on("POST", PUSH, 200, ACCEPTED)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    real = mpesa_module.transaction_desc
    failures = [ValueError("a description the adapter could not fit")]

    def flaky(text: str) -> str:
        if failures:
            raise failures.pop()
        return real(text)

    monkeypatch.setattr(mpesa_module, "transaction_desc", flaky)
    await drain(worker)
    collect = await _job(rt, "payment.collect")
    assert not wire.sent("POST", PUSH)
    assert collect.status == "PENDING" and "nothing was sent" in (collect.last_error or "")
    assert not (collect.last_error or "").startswith((INTERRUPTED, CALL_SENT))
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert len(wire.sent("POST", PUSH)) == 1
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", "ws_CO_1")


async def test_a_worker_lost_after_a_retried_push_left_is_not_pushed_again(rt: Any, demo: dict[str, Any],
                                                                          worker: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A first attempt that sent nothing (NOT_SENT) does not speak for the next: that one's stamp does. Lost with its
    worker while its push was out, the attempt after it asks; the earlier "nothing was sent" never lets it push."""
    wire = mpesa_wire()
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    failures = [ValueError("a description the adapter could not fit")]
    real = mpesa_module.transaction_desc

    def flaky(text: str) -> str:
        if failures:
            raise failures.pop()
        return real(text)

    monkeypatch.setattr(mpesa_module, "transaction_desc", flaky)
    await drain(worker)
    assert "nothing was sent" in ((await _job(rt, "payment.collect")).last_error or "")
    await due_now(rt, "payment.collect")
    seen: list[str | None] = []

    async def hang(_request: httpx.Request) -> httpx.Response:
        seen.append((await _job(rt, "payment.collect")).last_error)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    wire.on("POST", PUSH, hang)
    lost = create_worker(rt)
    [job] = [j for j in await lost.claim() if j.kind == "payment.collect"]
    task = asyncio.create_task(lost.run_job(job))
    for _ in range(300):
        if seen:
            break
        await asyncio.sleep(0.01)
    task.cancel()  # SIGKILL: nothing more is written
    await asyncio.gather(task, return_exceptions=True)
    assert seen == [CALL_STARTED]
    await _lease_lapses(rt)
    wire.on("POST", PUSH, 200, ACCEPTED)
    [again] = [j for j in await create_worker(rt).claim() if j.kind == "payment.collect"]
    assert again.last_error == WORKER_LOST and again.call_may_have_arrived
    await create_worker(rt).run_job(again)
    assert len(wire.sent("POST", PUSH)) == 1
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"  # left to the status poll


async def test_an_airtel_refund_that_reached_the_wire_is_never_sent_again(rt: Any, demo: dict[str, Any],
                                                                         worker: Any) -> None:
    wire, payment = await airtel_collected(rt, demo, "key-airtel-departed")
    wire.on("POST", AIRTEL_REFUND, _arrives_then_breaks)
    refund = await _ask_refund(rt, demo, payment, key="refund-departed-1")
    await _twice(rt, worker, "refund.submit")
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING"  # waits for a person (Airtel cannot be asked), never a second refund


async def test_an_mpesa_reversal_that_reached_the_wire_is_never_sent_again(rt: Any, demo: dict[str, Any],
                                                                          worker: Any) -> None:
    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    wire.on("POST", REVERSAL, _arrives_then_breaks)
    refund = await _ask_refund(rt, demo, payment, key="reversal-departed-1")
    await drain(worker)
    wire.on("POST", REVERSAL, 200, REVERSAL_ACCEPTED)
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", REVERSAL)) == 1  # its Result (by our ref) settles it, never a second reversal
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING"


async def test_an_mpesa_reversal_that_could_not_be_made_is_sent_later_once(rt: Any, demo: dict[str, Any],
                                                                          worker: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    wire.on("POST", REVERSAL, 200, REVERSAL_ACCEPTED)
    real = mpesa_module.remarks
    failures = [UnicodeError("a note the adapter could not fit")]

    def flaky(note: str) -> str:
        if failures:
            raise failures.pop()
        return real(note)

    monkeypatch.setattr(mpesa_module, "remarks", flaky)
    refund = await _ask_refund(rt, demo, payment, key="reversal-not-made-1")
    await drain(worker)
    assert not wire.sent("POST", REVERSAL)
    submit = await _job(rt, "refund.submit")
    assert submit.status == "PENDING" and "nothing was sent" in (submit.last_error or "")
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", REVERSAL)) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", "AG_2")


async def test_a_departure_in_a_task_started_by_the_call_is_seen() -> None:
    """An adapter that hands its request over from a task of its own (the context is copied): still counted."""
    with watch_departures() as watch:
        await asyncio.get_running_loop().create_task(_depart())
    assert watch.left
    with watch_departures() as other:
        pass
    assert not other.left


async def _depart() -> None:
    departing()


async def test_an_irembopay_push_that_reached_the_wire_stays_in_doubt() -> None:
    """The invoice was made and the push handed over, then something of ours broke: not NOT_SENT (the payer may be
    at her PIN prompt), so the job asks the invoice's status instead of pushing again."""
    rec = fixture("invoice.json")
    wire = Wire().on("POST", INVOICES, 201, rec["invoice_answer"]).on("POST", IREMBO_PUSH, 200,
                                                                        TransportBroke("lost"))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        with pytest.raises(TransportBroke):
            await _until_it_leaves("irembopay", "collect", adapter.request_collection(
                collection(expires_at=RECORDED_EXPIRY)))
    wire.done()


async def test_an_irembopay_invoice_made_but_no_push_is_not_sent_then_pushed_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The invoice was made, then the adapter failed before the push was made: NOT_SENT, and the next attempt finds
    the payment's own invoice under our transactionId and pushes it once."""
    rec = fixture("invoice.json")
    wire = Wire().on("POST", INVOICES, 201, rec["invoice_answer"])
    real = IremboPayAdapter._remember
    failures = [KeyError("memo")]

    def flaky(self: IremboPayAdapter, reference: str, number: str) -> None:
        if failures:
            raise failures.pop()
        real(self, reference, number)

    monkeypatch.setattr(IremboPayAdapter, "_remember", flaky)
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        with pytest.raises(ProviderError) as err:
            await _until_it_leaves("irembopay", "collect", adapter.request_collection(
                collection(expires_at=RECORDED_EXPIRY)))
        assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
        wire.on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held()).on(
            "POST", IREMBO_PUSH, 200, rec["push_answer"])
        await _until_it_leaves("irembopay", "collect", adapter.request_collection(
            collection(expires_at=RECORDED_EXPIRY)))
    wire.done()
    assert [r.url.path for r in wire.requests].count(IREMBO_PUSH) == 1


async def test_a_request_to_pay_whose_header_cannot_be_made_is_not_sent_and_its_secret_is_not_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """A callback URL a header cannot carry (a host outside ASCII): nothing reaches MTN, the error says NOT_SENT
    (sent later, never asked about), and its ERROR line's traceback holds neither the URL's secret nor the payer."""
    secret = "cb-secret-5be1f0c9a7"
    logscan.register_secret(secret)
    fake = FakeProvider(test_mtn_momo.BASE)
    fake.expect("POST", "/collection/token/", 200, load("mtn_momo", "token.json"))
    request = test_mtn_momo.collection(callback=f"https://pay.coopérative.test/webhooks/payments/mtn?secret={secret}")
    async with fake.client() as http:
        adapter = MtnMomoAdapter(http, test_mtn_momo.config())
        with caplog.at_level("ERROR", logger="gateway.providers"):
            with pytest.raises(ProviderError) as err:
                await _until_it_leaves("mtn_momo", "collect", adapter.request_collection(request))
    fake.assert_done()  # the token only: no request to pay
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    [line] = [r for r in caplog.records if "could not be made" in r.getMessage()]
    assert line.exc_info is not None and line.operation == "request_to_pay"  # type: ignore[attr-defined]
    assert secret not in caplog.text and "788000001" not in caplog.text


async def test_over_the_real_client_a_push_the_server_hung_up_on_is_in_doubt_and_a_refused_scheme_is_not_sent(
        ) -> None:
    """The gateway's own client (core.http) to a Daraja on 127.0.0.1 that reads the push and hangs up: in doubt (asked,
    never pushed again). The same adapter at a URL whose scheme the client refuses connects to nothing: NOT_SENT."""
    received: list[bytes] = []

    async def daraja(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            received.append(head + await reader.readexactly(length))
            if head.startswith(b"POST"):
                writer.close()  # the push arrived; the answer never comes
                return
            token = b'{"access_token": "tok-test-0001", "expires_in": "3599"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(token)).encode() + b"\r\n\r\n" + token)
            await writer.drain()

    server = await asyncio.start_server(daraja, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    request = _mpesa_collection()
    async with server, make_client() as http:
        adapter = mpesa_adapter_at(f"http://127.0.0.1:{port}", http)
        await adapter.prepare("collect")  # as core.jobs.ready_to_send does, before the job's stamp
        with pytest.raises(ProviderTimeout):
            await _until_it_leaves("mpesa", "collect", adapter.request_collection(request))
        refused = mpesa_adapter_at("ftp://127.0.0.1:21", http)
        refused._tokens._token, refused._tokens._expires = "tok-test-0001", float("inf")  # its token in hand
        with pytest.raises(ProviderError) as err:
            await _until_it_leaves("mpesa", "collect", refused.request_collection(request))
        assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert [r.split(b" ", 2)[:2] for r in received] == [[b"GET", b"/oauth/v1/generate?grant_type=client_credentials"],
                                                       [b"POST", PUSH.encode()]]


async def test_over_the_real_client_a_push_whose_deadline_passed_before_its_call_is_not_sent() -> None:
    """The job waited for a slot until its call's deadline had passed (its token in hand, its stamp written). The push
    was handed over all the same and cut off where the transport first waited (connecting, here): a TimeoutError,
    taken for a push that may have arrived, asked about by a poll that cannot ask M-Pesa without the CheckoutRequestID
    its answer brings: the payer never prompted. (Over a kept-alive connection the push is even written before that
    first wait.) A call whose deadline has passed is not started: NOT_SENT, sent later, nothing reached Daraja."""
    received: list[bytes] = []

    async def daraja(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(daraja, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    request = _mpesa_collection()
    async with server, make_client() as http:
        adapter = mpesa_adapter_at(f"http://127.0.0.1:{port}", http)
        adapter._tokens._token, adapter._tokens._expires = "tok-test-0001", float("inf")  # its token in hand
        deadline = asyncio.get_running_loop().time() - 0.5
        with pytest.raises(ProviderError) as err:
            await _until_it_leaves("mpesa", "collect", adapter.request_collection(request), deadline)
        assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
        await asyncio.sleep(0.1)
    assert received == []


def mpesa_adapter_at(base: str, http: httpx.AsyncClient) -> MpesaAdapter:
    return MpesaAdapter(http, ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
                                             options={"shortcode": "174379"}))


# --- A request that never left, wherever its attempt ended; one that left, whatever is raised after it ---------------

MTN_PAY = "/collection/v1_0/requesttopay"
MTN_TOKEN = "/collection/token/"
INVALID_TOKEN = {"errorCode": "404.001.03", "errorMessage": "Invalid Access Token"}


async def _slow_token_kept(adapter: Any, asked: list[str]) -> None:
    """Until every token asked for has been brought and kept (the adapter's TokenCache: its `fetches`), the slow one
    too, though the call that asked for it has ended: so the next attempt takes it from the cache. Not a fixed pause
    (a loaded host's could end with the fetch still out, and the next attempt joined it: its keeping not tested).
    10 s at most: a token never kept fails the test."""
    give_up = asyncio.get_running_loop().time() + 10
    while adapter._tokens.fetches < len(asked):
        assert asyncio.get_running_loop().time() < give_up, (adapter._tokens.fetches, asked)
        await asyncio.sleep(0.02)


async def test_a_push_whose_token_refresh_outlasts_the_deadline_is_sent_later_once(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daraja refused the first push's token (401: nothing ran) and the token fetched again inside the call took longer
    than the call's deadline: the push the payer would see never left. Before: taken for one that may have arrived
    (the deadline's TimeoutError), asked about by a status poll that cannot ask without a CheckoutRequestID: the payer
    was never prompted. Now NOT_SENT, and the next attempt pushes once."""
    deadlines_from_the_call(monkeypatch, send=1.0)  # from the push's start: the token before it not counted
    tokens: list[str] = []

    async def token(_request: httpx.Request) -> httpx.Response:
        tokens.append("asked")
        if len(tokens) == 2:
            await asyncio.sleep(2.0)  # past the call's deadline (it ends, so the next attempt is not held by it)
        return httpx.Response(200, json={"access_token": f"tok-{len(tokens)}", "expires_in": "3599"})

    pushes = [httpx.Response(401, json=INVALID_TOKEN)]
    wire = mpesa_wire().on("GET", TOKEN, token).on(
        "POST", PUSH, lambda _r: pushes.pop() if pushes else httpx.Response(200, json=ACCEPTED))
    adapter = mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await drain(worker)
    collect = await _job(rt, "payment.collect")
    assert collect.status == "PENDING" and "nothing was sent" in (collect.last_error or ""), collect.last_error
    assert not (collect.last_error or "").startswith((INTERRUPTED, CALL_SENT))
    assert len(wire.sent("POST", PUSH)) == 1
    await _slow_token_kept(adapter, tokens)  # the slow token arrives, and is kept for the next attempt
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert len(wire.sent("POST", PUSH)) == 2 and len(tokens) == 2
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", "ws_CO_1")


async def test_a_request_to_pay_whose_token_is_not_fetched_by_the_deadline_is_not_sent() -> None:
    """The token had lapsed between the job's prepare and the call (none in hand here): fetched inside the call, it
    takes past the deadline. Nothing reached MTN's request-to-pay: NOT_SENT, not a TimeoutError (in doubt)."""
    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        raise AssertionError("cut off by the deadline")

    wire = Routes(test_mtn_momo.BASE).on("POST", MTN_TOKEN, slow)  # a request to pay would fail the test
    adapter = MtnMomoAdapter(wire.client(), test_mtn_momo.config())
    deadline = asyncio.get_running_loop().time() + 0.3
    with pytest.raises(ProviderError) as err:
        await _until_it_leaves("mtn_momo", "collect", adapter.request_collection(test_mtn_momo.collection()), deadline)
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert [r.url.path for r in wire.seen] == [MTN_TOKEN]


async def test_an_irembopay_invoice_unanswered_by_the_deadline_is_not_sent_and_says_so() -> None:
    """IremboPay has no token: what the deadline cut off was the invoice's request, before any push. NOT_SENT, and its
    error (the job's last_error, on the ops page) names what was late rather than a token IremboPay never issues."""
    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        raise AssertionError("cut off by the deadline")

    wire = Routes(IREMBO_BASE).on("POST", INVOICES, slow)  # a push would fail the test
    adapter = IremboPayAdapter(wire.client(), config())
    deadline = asyncio.get_running_loop().time() + 0.3
    with pytest.raises(ProviderError) as err:
        await _until_it_leaves("irembopay", "collect", adapter.request_collection(
            collection(expires_at=RECORDED_EXPIRY)), deadline)
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert "an invoice, not answered in time" in str(err.value)
    assert [r.url.path for r in wire.seen] == [INVOICES]


@pytest.mark.parametrize("token_answer", [503, 200])
async def test_a_request_to_pay_refused_401_whose_new_token_fails_is_not_sent(token_answer: int) -> None:
    """MTN refused the request to pay's token (401: nothing processed) and the new token's request failed (a 5xx, an
    answer without a token): the request to pay was not taken. Before: a retryable HTTP_503 (or code-less) error after
    the job's stamp, which the outbox marks "may have arrived" (CALL_SENT). Now NOT_SENT."""
    token = load("mtn_momo", "token.json")
    answers = [httpx.Response(token_answer, json={}), httpx.Response(200, json=token)]
    wire = (Routes(test_mtn_momo.BASE).on("POST", MTN_TOKEN, lambda _r: answers.pop())
            .on("POST", MTN_PAY, 401, {"code": "INVALID_TOKEN"}))
    adapter = MtnMomoAdapter(wire.client(), test_mtn_momo.config())
    await adapter.prepare("collect")
    with watch_departures() as watch, pytest.raises(ProviderError) as err:
        await _until_it_leaves("mtn_momo", "collect", adapter.request_collection(test_mtn_momo.collection()))
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True), err.value
    assert not watch.left
    assert [r.url.path for r in wire.seen] == [MTN_TOKEN, MTN_PAY, MTN_TOKEN]


async def test_a_push_refused_as_invalid_token_under_another_status_then_no_token_is_not_sent() -> None:
    """Daraja's "Invalid Access Token" under a status other than 401: the adapter takes it as nothing run (it fetches a
    new token and pushes again), so it is turned back too; the new token's request failing is NOT_SENT."""
    answers = [httpx.Response(503, json={}), httpx.Response(200, json={"access_token": "tok-1", "expires_in": "3599"})]
    wire = Routes(MPESA_BASE).on("GET", TOKEN, lambda _r: answers.pop()).on("POST", PUSH, 400, INVALID_TOKEN)
    adapter = mpesa_adapter_at(MPESA_BASE, wire.client())
    await adapter.prepare("collect")
    request = _mpesa_collection()
    with pytest.raises(ProviderError) as err:
        await _until_it_leaves("mpesa", "collect", adapter.request_collection(request))
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True), err.value
    assert len(wire.sent("POST", PUSH)) == 1


async def test_a_request_to_pay_refused_401_whose_new_token_cannot_be_sent_is_still_not_sent() -> None:
    """After a 401 (nothing processed), a new token a header cannot carry: NOT_SENT is honoured, the 401 having turned
    the first request to pay back; it is not taken for a request that left."""
    answers = [httpx.Response(200, json={"access_token": "tök-2", "expires_in": 3600}),
               httpx.Response(200, json={"access_token": "tok-1", "expires_in": 3600})]
    wire = (Routes(test_mtn_momo.BASE).on("POST", MTN_TOKEN, lambda _r: answers.pop())
            .on("POST", MTN_PAY, 401, {"code": "INVALID_TOKEN"}))
    adapter = MtnMomoAdapter(wire.client(), test_mtn_momo.config())
    await adapter.prepare("collect")
    with pytest.raises(ProviderError) as err:
        await _until_it_leaves("mtn_momo", "collect", adapter.request_collection(test_mtn_momo.collection()))
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True), err.value
    assert len(wire.sent("POST", MTN_PAY)) == 1


@pytest.mark.parametrize("code", [NOT_SENT, "UNREACHABLE", "HTTP_429"])
async def test_a_not_sent_raised_after_a_money_request_left_is_in_doubt(code: str) -> None:
    """A request that moves money left and was answered (not turned back), then another request failed before it
    left, or was refused by the provider's rate limit (HTTP_429, which the outbox reads as nothing processed):
    "nothing was sent" speaks of that other one. Before, _until_it_leaves trusted any NOT_SENT (and any 429), and the
    job would send the money request again. Now in doubt: asked about, never sent again blind."""
    after = ((lambda _r: httpx.Response(429, headers={"Retry-After": "30"})) if code == "HTTP_429"
             else (lambda _r: (_ for _ in ()).throw(httpx.ConnectError("refused"))))
    wire = Routes(test_mtn_momo.BASE).on("POST", MTN_PAY, 500).on("GET", "/after", after)

    async def call() -> None:
        async with wire.client() as http:
            common: dict[str, Any] = {"provider": "mtn_momo", "timeouts": httpx.Timeout(1.0)}
            await calls.send(http, operation="request_to_pay", method="POST", url=test_mtn_momo.BASE + MTN_PAY,
                             creates=True, json={"amount": "100"}, **common)
            if code == NOT_SENT:  # a header the next request cannot carry
                await calls.send(http, operation="request_to_pay_status", method="GET", creates=False,
                                 url=test_mtn_momo.BASE + "/after", headers={"X-Note": "é"}, **common)
            answer = await calls.send(http, operation="request_to_pay_status", method="GET", creates=False,
                                      url=test_mtn_momo.BASE + "/after", **common)
            raise calls.http_error("mtn_momo", "request_to_pay_status", answer, "rate limited")

    with pytest.raises(ProviderTimeout) as err:
        await _until_it_leaves("mtn_momo", "collect", call())
    assert isinstance(err.value.__cause__, ProviderError) and err.value.__cause__.code == code
    assert len(wire.sent("POST", MTN_PAY)) == 1


# --- A refusal of the gateway's credentials after a request that moves money left -----------------------------------


class _ConfirmingMtn(MtnMomoAdapter):
    """An MTN adapter that asks the status of its request to pay or refund as soon as it is accepted (no adapter does
    today): a second call after the money request left, refused 401 for the gateway's credentials."""

    async def request_collection(self, request: Any) -> Any:
        accepted = await super().request_collection(request)
        await self.collection_status(request.provider_reference, None, request.amount.currency)
        return accepted

    async def request_refund(self, request: Any) -> Any:
        accepted = await super().request_refund(request)
        await self.refund_status(request.provider_reference, request.amount.currency)
        return accepted


def _confirming_mtn(rt: Any) -> Routes:
    """MTN's tokens answered; a request to pay or a refund taken (202), and its status lookup refused 401 (its fresh
    token too): any other request fails the test."""
    wire = (mtn_wire().on("POST", MTN_PAY, 202).on("GET", f"{MTN_PAY}/*", 401, {"code": "INVALID_CREDENTIALS"})
            .on("POST", MTN_REFUND, 202).on("GET", f"{MTN_REFUND}/*", 401, {"code": "INVALID_CREDENTIALS"}))
    rt.providers = {**rt.providers, "mtn_momo": _ConfirmingMtn(wire.client(), test_mtn_momo.config())}
    return wire


async def test_a_collection_refused_our_credentials_after_its_request_left_is_in_doubt_not_failed(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """The request to pay left and was taken (202); a call after it was refused for the gateway's credentials. Before:
    the payment FAILED at once, "the request never reached the provider; nothing was taken", while the payer could
    approve the prompt on her phone. Now in doubt, as a NOT_SENT after it is: left to the status poll, never sent
    again."""
    wire = _confirming_mtn(rt)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, "key-refused-after-left"), actor=ADMIN)
    await _twice(rt, worker, "payment.collect")
    collect = await _job(rt, "payment.collect")
    assert (collect.status, collect.attempts) == ("DONE", 1), collect.last_error
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.failure_reason) == ("PENDING", None)
    assert len(wire.sent("POST", MTN_PAY)) == 1
    assert len(wire.sent("GET", f"{MTN_PAY}/*")) == 2  # its status lookup, and once more with a fresh token


async def test_a_refund_refused_our_credentials_after_its_request_left_waits_for_its_outcome(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """The refund left and was taken (202); a call after it was refused for the gateway's credentials. Before: a
    refund "awaiting configuration" (nothing processed), sent again at its next try and withdrawable as never sent
    (then refunded again: paid twice). Now in doubt: PROCESSING, its outcome asked, never sent again."""
    wire = _confirming_mtn(rt)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, "key-refund-refused-after-left"), actor=ADMIN)
    await completed(rt, payment)
    refund = await _ask_refund(rt, demo, payment, key="refund-refused-after-left")
    await _twice(rt, worker, "refund.submit")
    stored, _, jobs = await _rows(rt, refund.id, payment.id)
    [submit] = [j for j in jobs if j.kind == "refund.submit"]
    assert (submit.status, submit.attempts) == ("DONE", 1), submit.last_error
    assert stored.status == "PROCESSING"
    assert [j.status for j in jobs if j.kind == "refund.poll"] == ["PENDING"]
    assert len(wire.sent("POST", MTN_REFUND)) == 1


async def test_a_push_refused_for_our_passkey_is_still_failed_at_once_as_nothing_taken() -> None:
    """Daraja refused the push itself for its Password (400 "Invalid Password": nothing ran): turned back, so the
    CredentialsRefused stays what it is (the payment fails at once, the payer told the service could not be reached),
    not taken for a refusal of another call after the push left."""
    refused = {"requestId": "1-1", "errorCode": "400.002.02", "errorMessage": "Bad Request - Invalid Password"}
    wire = mpesa_wire().on("POST", PUSH, 400, refused)
    adapter = mpesa_adapter_at(MPESA_BASE, wire.client())
    with watch_departures() as watch, pytest.raises(CredentialsRefused) as err:
        await _until_it_leaves("mpesa", "collect", adapter.request_collection(_mpesa_collection()))
    assert not isinstance(err.value, ProviderTimeout)
    assert not watch.left and len(wire.sent("POST", PUSH)) == 1


@pytest.mark.parametrize("raised", [CredentialsRefused("IremboPay refused the gateway's credentials", code="HTTP_401"),
                                    ProviderError("a later request not made", retryable=True, code=NOT_SENT)])
async def test_a_refusal_after_a_money_request_left_keeps_the_providers_id_for_it(raised: ProviderError) -> None:
    """The provider's id for the request was learnt before it left (IremboPay's invoice number: known_as), then a
    refusal of another call came after it. Before: in doubt, but without that id (the deadline's ProviderTimeout
    carries it), so a push the payer may approve was stored with none, and its status could never be asked. Now
    carried, as the deadline's is."""

    async def call() -> None:
        known_as("INV-1")
        departing()
        raise raised

    with pytest.raises(ProviderTimeout) as err:
        await _until_it_leaves("irembopay", "collect", call())
    assert err.value.provider_transaction_id == "INV-1"


@pytest.mark.parametrize("fault", [httpx.ConnectError("connection refused"), httpx.ConnectTimeout("no connection"),
                                   httpx.PoolTimeout("no free connection in the pool")])
async def test_a_money_request_that_got_no_connection_is_turned_back_and_sent_later(fault: Exception) -> None:
    """httpx raises these before a byte of the request is written (no connection was had): UNREACHABLE (retryable,
    nothing processed), and the watch does not count the request as gone. A PoolTimeout was, before, "no answer in
    time": a ProviderTimeout, the payment only asked about."""
    def fails(_request: httpx.Request) -> httpx.Response:
        raise fault

    wire = Routes(test_mtn_momo.BASE).on("POST", MTN_PAY, fails)
    with watch_departures() as watch, pytest.raises(ProviderError) as err:
        await calls.send(wire.client(), provider="mtn_momo", operation="request_to_pay", method="POST",
                         url=test_mtn_momo.BASE + MTN_PAY, timeouts=httpx.Timeout(1.0), creates=True,
                         json={"amount": "100"})
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == ("UNREACHABLE", True)
    assert not watch.left and len(wire.seen) == 1


@pytest.mark.parametrize("fault", [httpx.WriteTimeout("part of the body written"), httpx.WriteError("broken pipe"),
                                   httpx.LocalProtocolError("body longer than its Content-Length"),
                                   httpx.ProxyError("the proxy failed")])
async def test_a_money_request_that_failed_once_it_may_have_been_written_stays_in_doubt(fault: Exception) -> None:
    """A write that timed out or broke may follow part of the request written (a server may act on a request whose
    body it has, or an intermediary on its own); a protocol error of ours can follow the headers: in doubt."""
    def fails(_request: httpx.Request) -> httpx.Response:
        raise fault

    wire = Routes(test_mtn_momo.BASE).on("POST", MTN_PAY, fails)
    with watch_departures() as watch, pytest.raises(ProviderTimeout):
        await calls.send(wire.client(), provider="mtn_momo", operation="request_to_pay", method="POST",
                         url=test_mtn_momo.BASE + MTN_PAY, timeouts=httpx.Timeout(1.0), creates=True,
                         json={"amount": "100"})
    assert watch.left


async def test_over_the_real_client_a_refused_connection_is_turned_back() -> None:
    """The gateway's own client (core.http) to a port on 127.0.0.1 nobody listens on: ConnectError, UNREACHABLE,
    nothing counted as gone."""
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with make_client() as http:
        with watch_departures() as watch, pytest.raises(ProviderError) as err:
            await calls.send(http, provider="mtn_momo", operation="request_to_pay", method="POST",
                             url=f"http://127.0.0.1:{port}{MTN_PAY}", timeouts=httpx.Timeout(1.0), creates=True,
                             json={"amount": "100"})
    assert (err.value.code, err.value.retryable) == ("UNREACHABLE", True)
    assert not watch.left


async def test_over_the_real_client_a_money_request_whose_header_carries_a_line_break_is_not_sent() -> None:
    """A header value with a control character (a credential or token with its line break): httpx builds the request,
    and aiohttp refused it only once connected, as it wrote its head, with a ValueError, after the request to pay was
    counted as gone: taken for one that may have arrived (asked about, never sent; an M-Pesa payer never prompted).
    The gateway's client refuses it as it is built: NOT_SENT, nothing connected, nothing counted as gone."""
    connected: list[bool] = []

    async def provider(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.append(True)
        writer.close()

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, make_client() as http:
        with pytest.raises(ProviderError) as err:
            await _until_it_leaves("mtn_momo", "collect", calls.send(
                http, provider="mtn_momo", operation="request_to_pay", method="POST",
                url=f"http://127.0.0.1:{port}{MTN_PAY}", timeouts=httpx.Timeout(1.0), creates=True,
                headers={"X-Reference-Id": "ref-1", "Ocp-Apim-Subscription-Key": "sub-key\n"}, json={"amount": "100"}))
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert "could not be made (ValueError)" in str(err.value)
    assert connected == []


async def test_an_airtel_refund_refused_401_whose_new_token_fails_is_a_refund_never_sent(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """Airtel refused the refund's token (401: nothing processed) and the new token's request was answered 503: the
    refund never reached Airtel. Before: a retryable HTTP_503 after the job's stamp, marked "may have arrived"
    (CALL_SENT), so the refund could no longer be withdrawn as unsent. Now NOT_SENT: still a refund never sent."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-401-then-503")
    tokens = [httpx.Response(200, json={"access_token": "t1", "expires_in": "180"}), httpx.Response(503, json={})]
    wire.on("POST", "/auth/oauth2/token", lambda _r: tokens.pop(0))
    wire.on("POST", AIRTEL_REFUND, 401, {"status": {"message": "Invalid token", "success": False}})
    refund = await _ask_refund(rt, demo, payment, key="refund-401-then-503")
    await drain(worker)
    submit = await _job(rt, "refund.submit")
    assert submit.status == "PENDING" and "nothing was sent" in (submit.last_error or ""), submit.last_error
    assert not (submit.last_error or "").startswith((INTERRUPTED, CALL_SENT))
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1 and tokens == []
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PENDING"


# --- A money request the provider's rate limit refused (HTTP 429: nothing processed) ---------------------------------

BUSY = {"requestId": "8574-1234570-1", "errorCode": "500.003.03", "errorMessage": "Quota Violation"}  # Daraja's


def _busy(retry_after: str = "120", body: Any = None) -> Any:
    return lambda _r: httpx.Response(429, json=BUSY if body is None else body, headers={"Retry-After": retry_after})


async def test_a_money_request_answered_429_is_turned_back() -> None:
    """A 429 is the provider's rate limit refusing the request unprocessed (http_error's ProviderBusy,
    core.outbox.NOTHING_PROCESSED), as a 401 is: the watch does not count it as gone, so a failure of the call after it
    (here a request that could not be made) is what it says, NOT_SENT. Before: the 429'd request counted as gone, and
    that failure was made a ProviderTimeout, the payment only asked about."""
    wire = Routes(test_mtn_momo.BASE).on("POST", MTN_PAY, _busy())

    async def call() -> None:
        async with wire.client() as http:
            common: dict[str, Any] = {"provider": "mtn_momo", "timeouts": httpx.Timeout(1.0)}
            await calls.send(http, operation="request_to_pay", method="POST", url=test_mtn_momo.BASE + MTN_PAY,
                             creates=True, json={"amount": "100"}, **common)
            await calls.send(http, operation="request_to_pay", method="POST", creates=True,
                             url=test_mtn_momo.BASE + MTN_PAY, headers={"X-Note": "é"}, **common)

    with watch_departures() as watch, pytest.raises(ProviderError) as err:
        await _until_it_leaves("mtn_momo", "collect", call())
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert not watch.left and len(wire.sent("POST", MTN_PAY)) == 1


async def test_an_stk_push_rate_limited_is_pushed_again_after_its_retry_after(rt: Any, demo: dict[str, Any],
                                                                             worker: Any) -> None:
    """Daraja answered the push 429 (nothing processed) with Retry-After: 120. The job waits that long and pushes again
    under the same reference, a try never processed. Before: Daraja's errorCode as the error's code, so the job was
    marked "provider call sent, may have arrived" (CALL_SENT: a later try took the push for one M-Pesa may hold) and
    retried on its own backoff (seconds), the Retry-After unread."""
    wire = mpesa_wire().on("POST", PUSH, _busy())
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    before = utcnow()
    await drain(worker)
    collect = await _job(rt, "payment.collect")
    assert collect.status == "PENDING" and "rate limiting stk_push (429 500.003.03)" in (collect.last_error or "")
    assert not (collect.last_error or "").startswith((INTERRUPTED, CALL_SENT)), collect.last_error
    assert collect.run_at >= before + timedelta(seconds=119)
    wire.on("POST", PUSH, 200, ACCEPTED)
    await due_now(rt, "payment.collect")
    await drain(worker)
    assert len(wire.sent("POST", PUSH)) == 2
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert (stored.status, stored.provider_transaction_id) == ("PROCESSING", "ws_CO_1")


async def test_an_mpesa_reversal_rate_limited_is_still_a_refund_never_sent(client: Any, rt: Any, demo: dict[str, Any],
                                                                          worker: Any) -> None:
    """A reversal answered 429: nothing processed, so the refund is still one never sent, which an admin may withdraw.
    Before: CALL_SENT ("may have arrived"), and its withdrawal refused 409."""
    wire, payment = await _pushed(rt, demo, worker)
    await completed(rt, payment, RECEIPT)
    wire.on("POST", REVERSAL, _busy("60"))
    refund = await _ask_refund(rt, demo, payment, key="reversal-rate-limited-1")
    before = utcnow()
    await drain(worker)
    submit = await _job(rt, "refund.submit")
    assert submit.status == "PENDING" and "rate limiting reversal" in (submit.last_error or "")
    assert not (submit.last_error or "").startswith((INTERRUPTED, CALL_SENT)), submit.last_error
    assert submit.run_at >= before + timedelta(seconds=59) and len(wire.sent("POST", REVERSAL)) == 1
    admin = await bearer(client, *demo["admin"])
    cancelled = await admin.json("POST", f"/v1/refunds/{refund.id}/cancel", 200, json={"note": "asked by mistake"})
    assert cancelled["status"] == "FAILED"


async def test_an_irembopay_push_rate_limited_is_sent_again_after_its_retry_after() -> None:
    """IremboPay refused the push 429: nothing processed, no prompt can be live. As http_error's: HTTP_429 with its
    Retry-After (core.outbox.NOTHING_PROCESSED), the push not counted as gone. Before: code "429", which the outbox took
    for a push that may have arrived (CALL_SENT), its Retry-After unread."""
    rec = fixture("invoice.json")
    wire = Routes(IREMBO_BASE).on("POST", INVOICES, 201, rec["invoice_answer"]).on(
        "POST", IREMBO_PUSH, _busy("30", {"success": False, "message": "Too many"}))
    adapter = IremboPayAdapter(wire.client(), config())
    with watch_departures() as watch, pytest.raises(ProviderError) as err:
        await _until_it_leaves("irembopay", "collect", adapter.request_collection(
            collection(expires_at=RECORDED_EXPIRY)))
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable, getattr(err.value, "retry_after", None)) == ("HTTP_429", True, 30.0)
    assert not watch.left and len(wire.sent("POST", IREMBO_PUSH)) == 1


async def test_an_irembopay_push_refused_429_for_the_provider_behind_it_is_still_asked_about() -> None:
    """Only IremboPay's own rate limit is a push never processed: a 429 naming PAYMENT_PROVIDER_ERROR (MTN or Airtel
    behind it failing part-way) may have prompted the payer, and stays in doubt, carrying the invoice number."""
    rec = fixture("invoice.json")
    behind = {"success": False, "errors": [{"code": "PAYMENT_PROVIDER_ERROR", "detail": "MTN is busy"}]}
    wire = Routes(IREMBO_BASE).on("POST", INVOICES, 201, rec["invoice_answer"]).on(
        "POST", IREMBO_PUSH, _busy("30", behind))
    adapter = IremboPayAdapter(wire.client(), config())
    with pytest.raises(ProviderTimeout) as err:
        await _until_it_leaves("irembopay", "collect", adapter.request_collection(
            collection(expires_at=RECORDED_EXPIRY)))
    assert err.value.provider_transaction_id == rec["invoice_answer"]["data"]["invoiceNumber"]


# --- A refund's call, by the job's call deadline as a collection's ---------------------------------------------------


async def test_an_airtel_refund_whose_token_refresh_outlasts_the_deadline_is_sent_later_once(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Airtel refused the refund's token (401: nothing processed) and the token fetched again inside the call took
    past the worker's cut-off. Before: the refund's call had no deadline of its own, the worker cancelled it
    (INTERRUPTED), and the next try took it for a refund that may have arrived: PROCESSING, parked for a person (Airtel
    cannot be asked). Now the call's deadline (inside the worker's) makes it NOT_SENT; the next try sends it once."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-refund-deadline")
    deadlines_from_the_call(monkeypatch, send=1.0, worker=2.0)  # from the refund's start
    tokens: list[str] = []

    async def token(_request: httpx.Request) -> httpx.Response:
        tokens.append("asked")
        if len(tokens) == 2:
            await asyncio.sleep(3.0)  # past the call's deadline and the worker's cut-off
        return httpx.Response(200, json={"access_token": f"t{len(tokens)}", "expires_in": "180"})

    refunds = [httpx.Response(401, json={"status": {"message": "Invalid token", "success": False}})]
    settled = load("airtel", "refund_success.json")
    wire.on("POST", "/auth/oauth2/token", token).on(
        "POST", AIRTEL_REFUND, lambda _r: refunds.pop() if refunds else httpx.Response(200, json=settled))
    refund = await _ask_refund(rt, demo, payment, key="refund-deadline-1")
    await drain(worker)
    submit = await _job(rt, "refund.submit")
    assert submit.status == "PENDING" and "nothing was sent" in (submit.last_error or ""), submit.last_error
    assert not (submit.last_error or "").startswith((INTERRUPTED, CALL_SENT))
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    await _slow_token_kept(rt.providers["airtel"], tokens)  # the slow token arrives, and is kept for the next try
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 2 and len(tokens) == 2
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "COMPLETED"


async def test_an_airtel_refund_still_out_at_the_deadline_waits_for_its_outcome_never_sent_again(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refund itself was handed over and not answered by the call's deadline: it may have been carried out, so
    it waits for its outcome (PROCESSING; Airtel, which cannot be asked, to a person) and is never sent again."""
    wire, payment = await airtel_collected(rt, demo, "key-airtel-refund-out")
    deadlines_from_the_call(monkeypatch, send=0.5)  # from the refund's start

    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)  # past the call's deadline (it ends, so nothing is left running)
        return httpx.Response(200, json=load("airtel", "refund_success.json"))

    wire.on("POST", AIRTEL_REFUND, slow)
    refund = await _ask_refund(rt, demo, payment, key="refund-out-at-deadline-1")
    await _twice(rt, worker, "refund.submit")
    submit = await _job(rt, "refund.submit")
    assert (submit.status, submit.attempts) == ("DONE", 1)
    assert len(wire.sent("POST", AIRTEL_REFUND)) == 1
    stored, _, _ = await _rows(rt, refund.id, payment.id)
    assert stored.status == "PROCESSING"


async def test_an_mtn_refund_resent_and_still_out_at_the_deadline_counts_as_a_resend(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """MTN took the refund (202), then its status lookup answered 404 (no such refund): it is sent again, same
    reference, and that resend was not answered by the call's deadline. Before: the resend had no deadline of its own,
    the worker cut the poll off (INTERRUPTED) and retried it, resending at every try, uncounted (REFUND_RESENDS), until
    its 30 attempts parked it as "handler interrupted". Now it counts as a resend that may have arrived: the poll is
    done, and the next one (resent 1) asks the status."""
    sent: list[str] = []

    async def refund(_request: httpx.Request) -> httpx.Response:
        sent.append("refund")
        if len(sent) > 1:
            await asyncio.sleep(3.0)  # the resend: past the call's deadline and the worker's cut-off
        return httpx.Response(202)

    wire = mtn_wire().on("POST", MTN_REFUND, refund).on("GET", f"{MTN_REFUND}/*", 404, {"code": "RESOURCE_NOT_FOUND"})
    rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(wire.client(), test_mtn_momo.config())}
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, "key-refund-resent-out"), actor=ADMIN)
    await completed(rt, payment)
    refund_row = await _ask_refund(rt, demo, payment, key="refund-resent-out")
    await drain(worker)
    assert (await _rows(rt, refund_row.id, payment.id))[0].status == "PROCESSING"
    # The resend half a second from its start (the submission, the poll's reads and its lookup before it not
    # counted); the worker's cut-off, the real one, is no longer what ends it (it ended it before the fix).
    deadlines_from_the_call(monkeypatch, send=0.5)
    await due_now(rt, "refund.poll")
    await drain(worker)
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    polls = [(j.dedupe_key, j.status, j.attempts, j.payload.get("resent")) for j in jobs if j.kind == "refund.poll"]
    assert polls == [(f"refund-poll:{refund_row.id}", "DONE", 1, None),
                     (f"refund-poll:{refund_row.id}:resent:1", "PENDING", 0, 1)], polls
    assert stored.status == "PROCESSING" and len(wire.sent("POST", MTN_REFUND)) == 2


async def _mtn_refund_polled(rt: Any, demo: dict[str, Any], worker: Any, wire: Any, key: str) -> Any:
    """An MTN payment completed, its refund taken (202) by its submission: PROCESSING, its poll due."""
    rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(wire.client(), test_mtn_momo.config())}
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, f"key-{key}"), actor=ADMIN)
    await completed(rt, payment)
    refund_row = await _ask_refund(rt, demo, payment, key=key)
    await drain(worker)
    assert (await _rows(rt, refund_row.id, payment.id))[0].status == "PROCESSING"
    await due_now(rt, "refund.poll")
    return refund_row, payment


async def test_an_mtn_refund_resent_and_answered_5xx_counts_as_a_resend(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """MTN took the refund (202), its status lookup answers 404 (no such refund), and every resend (same reference,
    which MTN deduplicates) is answered 503: it may have been processed. Before: the poll raised the 503 and was
    tried again, resending uncounted (REFUND_RESENDS) at every try, until its 30 attempts parked it with the bare
    error. Now each counts as a resend that may have arrived: after 3, the poll is parked for a person."""
    sent: list[str] = []

    def refund(_request: httpx.Request) -> httpx.Response:
        sent.append("refund")
        return httpx.Response(202 if len(sent) == 1 else 503, json=None if len(sent) == 1 else {"code": "DOWN"})

    wire = mtn_wire().on("POST", MTN_REFUND, refund).on("GET", f"{MTN_REFUND}/*", 404, {"code": "RESOURCE_NOT_FOUND"})
    refund_row, payment = await _mtn_refund_polled(rt, demo, worker, wire, "refund-resent-5xx")
    await drain(worker)
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    polls = [(j.dedupe_key, j.status, j.attempts, j.payload.get("resent")) for j in jobs if j.kind == "refund.poll"]
    assert polls == [(f"refund-poll:{refund_row.id}", "DONE", 1, None),
                     (f"refund-poll:{refund_row.id}:resent:1", "PENDING", 0, 1)], polls
    for _ in range(3):
        await due_now(rt, "refund.poll")
        await drain(worker)
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    polls = [(j.dedupe_key, j.status, j.attempts) for j in jobs if j.kind == "refund.poll"]
    assert polls == [(f"refund-poll:{refund_row.id}", "DONE", 1)] + [
        (f"refund-poll:{refund_row.id}:resent:{n}", "DONE", 1) for n in (1, 2)] + [
        (f"refund-poll:{refund_row.id}:resent:3", "PARKED", 1)], polls
    parked = next(j for j in jobs if j.status == "PARKED")
    assert "after 3 resends" in (parked.last_error or "") and \
        f"POST /v1/refunds/{refund_row.id}/outcome" in (parked.last_error or ""), parked.last_error
    assert stored.status == "PROCESSING" and len(wire.sent("POST", MTN_REFUND)) == len(sent) == 4  # 1 + 3 resends


async def test_a_refund_poll_parked_by_resends_not_sent_in_time_says_what_to_do(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status lookup answers 404 in time, but so late that the resend's call deadline has passed before it
    starts: not sent (NOT_SENT), the poll tried again. Its last attempt so used up, it was parked with that bare
    error; now it says what a person does (replay it, or record the outcome), as every other parked refund poll
    does."""
    note = core_jobs.refund_note

    async def slow_note(*args: Any) -> str:
        await asyncio.sleep(0.9)  # the lookup's 0.3 s and this: past the call's deadline, counted from the claim
        return await note(*args)

    monkeypatch.setattr("core.jobs.refund_note", slow_note)

    async def late_not_found(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(404, json={"code": "RESOURCE_NOT_FOUND"})

    wire = mtn_wire().on("POST", MTN_REFUND, 202).on("GET", f"{MTN_REFUND}/*", late_not_found)
    refund_row, payment = await _mtn_refund_polled(rt, demo, worker, wire, "refund-resend-late")
    # The poll's call deadline, from here: the submission before it had the usual one (given this one, a slow host
    # left the refund PENDING, its submission's own call past 1 s). Its lookup has a deadline of its own, ample (a
    # slow host's claim and reads before it could use up the second): the resend's, from the claim, has passed.
    monkeypatch.setattr("core.jobs.collect_call_budget", lambda _lease: 1.0)
    status_by = core_jobs._status_by
    monkeypatch.setattr("core.jobs._status_by", lambda _deadline, *call: status_by(
        asyncio.get_running_loop().time() + 60, *call))
    async with rt.sessionmaker.begin() as s:  # its 29 tries before failed so
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.poll").values(attempts=29))
    await drain(worker)
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    [poll] = [j for j in jobs if j.kind == "refund.poll"]
    assert (poll.status, poll.attempts) == ("PARKED", 30), (poll.status, poll.last_error)
    assert "the call's deadline had passed" in (poll.last_error or "") and \
        f"record it with POST /v1/refunds/{refund_row.id}/outcome" in (poll.last_error or ""), poll.last_error
    assert stored.status == "PROCESSING" and len(wire.sent("POST", MTN_REFUND)) == 1  # never resent


async def test_a_refund_polls_status_lookup_has_the_calls_deadline(
        rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status lookup before a resend had no deadline of its own: the worker cut it off (INTERRUPTED), and so
    parked it on its last attempt. It has the call's deadline now, as the resend after it: unanswered by then, it
    is a failed lookup, retried, and on the poll's last attempt parked saying what a person does."""
    asked: list[str] = []

    async def unanswered(_request: httpx.Request) -> httpx.Response:
        asked.append("status")
        await asyncio.sleep(1.0)  # past the lookup's deadline
        return httpx.Response(404, json={"code": "RESOURCE_NOT_FOUND"})

    wire = mtn_wire().on("POST", MTN_REFUND, 202).on("GET", f"{MTN_REFUND}/*", unanswered)
    refund_row, payment = await _mtn_refund_polled(rt, demo, worker, wire, "refund-lookup-late")
    # The lookup's deadline, from here and from its start: the submission before it had the usual one (given this
    # one, a slow host left the refund PENDING, its submission's own call past 1 s), as the poll's reads before it.
    deadlines_from_the_call(monkeypatch, lookup=0.3)
    async with rt.sessionmaker.begin() as s:  # its 28 tries before failed so
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.poll").values(attempts=28))
    await worker.run_once()
    [poll] = [j for j in (await _rows(rt, refund_row.id, payment.id))[2] if j.kind == "refund.poll"]
    assert (poll.status, poll.attempts, poll.last_error) == (
        "PENDING", 29, "ProviderError: mtn_momo refund_status: no answer by the call's deadline"), poll.last_error
    await due_now(rt, "refund.poll")
    await worker.run_once()
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    [poll] = [j for j in jobs if j.kind == "refund.poll"]
    assert (poll.status, poll.attempts) == ("PARKED", 30), (poll.status, poll.last_error)
    assert poll.last_error == (
        f"refund {refund_row.id} needs manual review: its status was not settled in 30 tries (last: ProviderError: "
        "mtn_momo refund_status: no answer by the call's deadline); replay this job once that is fixed, or check "
        f"with the provider, then record it with POST /v1/refunds/{refund_row.id}/outcome")
    assert stored.status == "PROCESSING" and asked == ["status"] * 2
    assert len(wire.sent("POST", MTN_REFUND)) == 1  # never resent


async def test_a_refund_poll_cut_off_on_its_last_attempt_says_what_to_do(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """The worker cuts a refund poll off on its last attempt (here its status lookup, under a worker whose handler
    time is shorter than the call's deadline): its handler sees only a cancellation, and it was parked with the bare
    "handler interrupted". Now it says what a person does, as the poll's own last-attempt failures do (its kind's
    hint: core.outbox.Hinted)."""
    from app import job_handlers

    async def hangs(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(404, json={"code": "RESOURCE_NOT_FOUND"})

    wire = mtn_wire().on("POST", MTN_REFUND, 202).on("GET", f"{MTN_REFUND}/*", hangs)
    refund_row, payment = await _mtn_refund_polled(rt, demo, worker, wire, "refund-poll-cut-off")
    async with rt.sessionmaker.begin() as s:  # its 29 tries before failed
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.poll").values(attempts=29))
    short = OutboxWorker(rt.sessionmaker, job_handlers(rt), lease_seconds=5)  # handlers get 2.5 s
    assert await short.run_once() == 1
    stored, _, jobs = await _rows(rt, refund_row.id, payment.id)
    [poll] = [j for j in jobs if j.kind == "refund.poll"]
    assert (poll.status, poll.attempts) == ("PARKED", 30), (poll.status, poll.last_error)
    error = poll.last_error or ""
    assert error.startswith(f"refund {refund_row.id} needs manual review: its status was not settled in 30 tries "
                            f"(last: {INTERRUPTED}: still running after ") and error.endswith(
        f"and cancelled); replay this job once that is fixed, or check with the provider, then record it with "
        f"POST /v1/refunds/{refund_row.id}/outcome"), error
    assert stored.status == "PROCESSING" and len(wire.sent("POST", MTN_REFUND)) == 1
