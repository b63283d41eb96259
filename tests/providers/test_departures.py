"""Which money requests are sent again (NOT_SENT: they never left this process) and which are only asked about
(they were handed to the transport: core.ports.watch_departures), through the worker and the real adapters.

A request the provider may have (it reached the wire, whatever came after: an exception of ours, of the transport,
an answer we cannot read) is never sent a second time: a second STK push is a second PIN prompt, a second Airtel
refund or M-Pesa reversal a second refund. One that failed while it was being made, before it left, is sent later.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import providers.mpesa.adapter as mpesa_module
from app import create_worker
from core.config import ProviderConfig, Secret
from core.http import make_client
from core.jobs import _until_it_leaves
from core.models import OutboxJob, Payment
from core.money import Money
from core.outbox import CALL_SENT, CALL_STARTED, INTERRUPTED, WORKER_LOST
from core.phone import Phone
from core.ports import NOT_SENT, ProviderError, ProviderTimeout, departing, watch_departures
from providers.irembopay import IremboPayAdapter
from providers.mpesa import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from tests import logscan
from tests.conftest import drain
from tests.core.test_lost_before_call import ACCEPTED, PUSH, _lease_lapses
from tests.core.test_provider_faults_mpesa import RECEIPT, REVERSAL, _pushed
from tests.providers import test_mtn_momo
from tests.providers.conftest import FakeProvider, load
from tests.providers.test_irembopay import RECORDED_EXPIRY, Wire, collection, config, fixture
from tests.providers.test_irembopay_duplicate import DUPLICATE, INVOICES, LOOKUP, held
from tests.providers.test_irembopay_duplicate import PUSH as IREMBO_PUSH
from tests.providers.test_refund_ambiguous import ACCEPTED as REVERSAL_ACCEPTED
from tests.providers.test_refund_ambiguous import AIRTEL_REFUND, _ask_refund, _rows, airtel_collected
from tests.providers.wires import MPESA_BASE, MPESA_CREDS, completed, due_now, mpesa_adapter, mpesa_payment, mpesa_wire

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
    request = dataclasses.replace(collection(), method="MPESA", amount=Money(15_000, "KES"),
                                  payer=Phone("+254708000001"), payer_account="+254708000001")
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


def mpesa_adapter_at(base: str, http: httpx.AsyncClient) -> MpesaAdapter:
    return MpesaAdapter(http, ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
                                             options={"shortcode": "174379"}))
