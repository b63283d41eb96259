"""IremboPay adapter over recorded wire bodies, webhook signatures and replays, and its simulator."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import ProviderConfig, Secret
from core.logs import JsonFormatter
from core.money import Money
from core.phone import Phone, normalize
from core.ports import (
    CallbackRejected,
    CollectionRequest,
    EventKind,
    InboundCallback,
    ProviderError,
    ProviderOutcome,
    ProviderTimeout,
    RefundRequest,
)
from providers.irembopay import IremboPayAdapter, redis_nonce_store
from providers.irembopay.adapter import STATUS, MemoryNonceStore, signature_header
from providers.irembopay.simulator import STORE, create_simulator
from providers.simulation import STATE, SimulatorOptions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "irembopay"
BASE = "https://api.irembopay.test"
SECRET = "irembo-secret-test-4f9b2c7d1e"
NOW = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
TX = "7d1f0c2a-4b5e-4c6d-8e9f-0a1b2c3d4e5f"
RECORDED_EXPIRY = NOW + timedelta(minutes=10)  # the expiryAt in the recorded invoice requests


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def config(base: str = BASE, secret: str = SECRET, **options: str) -> ProviderConfig:
    return ProviderConfig(base_url=base, credentials={"secret_key": Secret(secret)},
                          options={"payment_account": "PI-test", "payment_item_code": "PC-test", **options})


class Wire:
    """httpx.MockTransport that answers only the requests a test declared, in order; anything else fails."""

    def __init__(self) -> None:
        self.expected: list[tuple[str, str, int, Any]] = []
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, status: int, body: Any) -> Wire:
        self.expected.append((method, path, status, body))
        return self

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.expected:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        method, path, status, body = self.expected.pop(0)
        if (request.method, request.url.path) != (method, path):
            raise AssertionError(f"expected {method} {path}, got {request.method} {request.url.path}")
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))

    def done(self) -> None:
        assert not self.expected, f"requests never sent: {self.expected}"


def collection(method: str = "MOBILE_MONEY_MTN", phone: str | None = "+250788000001",
               **kw: Any) -> CollectionRequest:
    values: dict[str, Any] = dict(
        provider_reference=TX, payment_reference="PAY_20261122_001", amount=Money(50000, "RWF"),
        payer=normalize(phone) if phone else None, payer_account=phone or "jane@example.test",
        description="Monthly rent", callback_url="https://gateway.test/webhooks/payments/irembopay",
        method=method, language="rw", payer_name="Jane Uwase",
        expires_at=datetime.now(UTC) + timedelta(minutes=10))
    values.update(kw)
    return CollectionRequest(**values)


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


def assert_headers(request: httpx.Request, secret: str = SECRET) -> None:
    assert request.headers["irembopay-secretKey"] == secret
    assert request.headers["X-API-Version"] == "2"


# --- outbound -----------------------------------------------------------------------------------

async def test_mobile_money_invoice_then_push() -> None:
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 200, rec["push_answer"]))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        accepted = await adapter.request_collection(collection(expires_at=RECORDED_EXPIRY))
    wire.done()
    invoice, push = wire.requests
    assert body_of(invoice) == rec["mobile_invoice_request"]
    assert body_of(push) == rec["push_request"]
    for request in wire.requests:
        assert_headers(request)
    assert accepted.gateway_reference == accepted.provider_transaction_id == "880123456789"
    assert accepted.payment_url is None  # a mobile payer approves on the phone


@pytest.mark.parametrize(("method", "provider"), [
    ("BANK_BK", None), ("BANK_IM", None), ("BANK_ECOBANK", None), ("MOBILE_MONEY_AIRTEL", "AIRTEL")])
async def test_bank_invoice_carries_payment_url(method: str, provider: str | None) -> None:
    rec = fixture("invoice.json")
    wire = Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
    if provider:
        wire.on("POST", "/payments/transactions/initiate", 200, rec["push_answer"])
    phone = "+250733000001" if provider else None
    request = collection(method, phone, language="en", expires_at=RECORDED_EXPIRY)
    async with wire.client() as http:
        accepted = await IremboPayAdapter(http, config()).request_collection(request)
    wire.done()
    if provider:
        assert body_of(wire.requests[1])["paymentProvider"] == provider
        assert body_of(wire.requests[1])["accountIdentifier"] == "0733000001"
        assert accepted.payment_url is None
    else:
        assert body_of(wire.requests[0]) == rec["bank_invoice_request"]
        assert accepted.payment_url == rec["invoice_answer"]["data"]["paymentLinkUrl"]


@pytest.mark.parametrize(("account", "customer_phone"), [
    ("+250788000001", "0788000001"),  # a Rwandan number: in IremboPay's local form
    ("+254788123456", None),  # Kenyan: its local form 0788123456 is another person's MTN Rwanda number
    ("+256772123456", None),
    ("+12", None),  # a bank account that is no number at all: it crashed the collect job (NumberParseException)
])
async def test_bank_invoice_names_only_a_rwandan_customer_phone(account: str, customer_phone: str | None) -> None:
    """A bank payment's account is any text (an account number, an e-mail; one starting with "+" is taken for a
    number): IremboPay's customer.phoneNumber is a Rwandan 07xxxxxxxx, so only a Rwandan mobile number goes there."""
    rec = fixture("invoice.json")
    wire = Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
    request = collection("BANK_BK", None, payer=Phone(account), payer_account=account)
    async with wire.client() as http:
        accepted = await IremboPayAdapter(http, config()).request_collection(request)
    wire.done()
    assert body_of(wire.requests[0])["customer"].get("phoneNumber") == customer_phone
    assert accepted.payment_url == rec["invoice_answer"]["data"]["paymentLinkUrl"]


@pytest.mark.parametrize("case", fixture("invoice.json")["push_errors"], ids=lambda c: c["name"])
async def test_push_errors(case: dict[str, Any]) -> None:
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", case["status"], case["json"]))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
    wire.done()
    code = case.get("code", case["json"].get("errors", [{}])[0].get("code"))
    if case.get("settled_by_status"):
        # The payer may be at a PIN prompt all the same: never pushed again, the invoice's status tells
        # (its number carried for the core to store), the refusal kept as the cause.
        assert isinstance(err.value, ProviderTimeout)
        assert err.value.provider_transaction_id == rec["invoice_answer"]["data"]["invoiceNumber"]
        assert isinstance(err.value.__cause__, ProviderError) and err.value.__cause__.code == code
    else:
        assert not isinstance(err.value, ProviderTimeout)
        assert err.value.code == code
    assert err.value.retryable is case["retryable"]
    assert "0788000001" not in str(err.value)


@pytest.mark.parametrize(("kw", "code"), [
    ({"amount": Money(5000, "KES")}, "CURRENCY_UNSUPPORTED"),
    ({"method": "MPESA"}, "METHOD_UNSUPPORTED"),
    ({"payer": normalize("+254708000001")}, "BAD_PHONE_NUMBER"),
    ({"payer": None}, "BAD_PHONE_NUMBER"),
    ({"amount": Money(0, "RWF")}, "BAD_AMOUNT"),
])
async def test_refuses_bad_requests_before_calling(kw: dict[str, Any], code: str) -> None:
    wire = Wire()
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection(**kw))
    assert (err.value.code, err.value.retryable) == (code, False)
    assert wire.requests == []


async def test_invoice_timeout_may_be_retried() -> None:
    # No money moves on an invoice, and our transactionId keeps it unique.
    wire = Wire().on("POST", "/payments/invoices", 0, httpx.ReadTimeout("slow"))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == ("TIMEOUT", True)


async def test_push_timeout_is_a_provider_timeout_and_the_status_finds_the_invoice() -> None:
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 0, httpx.ReadTimeout("slow"))
            .on("GET", "/payments/invoices/880123456789", 200, fixture("status.json")["cases"][1]["json"]))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        with pytest.raises(ProviderTimeout):
            await adapter.request_collection(collection())
        # The core never learnt the invoice number; the adapter remembers it for the status query.
        status = await adapter.collection_status(TX, None, "RWF")
    wire.done()
    assert status.outcome is ProviderOutcome.SUCCEEDED


async def test_push_timeout_carries_the_invoice_number_for_any_process() -> None:
    rec = fixture("invoice.json")
    number = rec["invoice_answer"]["data"]["invoiceNumber"]
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 0, httpx.ReadTimeout("slow"))
            .on("GET", f"/payments/invoices/{number}", 200, fixture("status.json")["cases"][1]["json"]))
    async with wire.client() as http:
        with pytest.raises(ProviderTimeout) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
        assert err.value.provider_transaction_id == number
        # Another worker process (a fresh adapter, nothing remembered) asks with the number the core stored.
        status = await IremboPayAdapter(http, config()).collection_status(TX, err.value.provider_transaction_id,
                                                                          "RWF")
    wire.done()
    assert status.outcome is ProviderOutcome.SUCCEEDED


async def test_push_refused_with_a_rate_limit_may_be_sent_again() -> None:
    # 429: IremboPay did not take the push at all, so no prompt can be live.
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 429, {"success": False, "message": "Too many"}))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == ("HTTP_429", True)  # core.outbox.NOTHING_PROCESSED


async def test_status_timeout_is_retryable() -> None:
    wire = Wire().on("GET", "/payments/invoices/880123456789", 0, httpx.ReadTimeout("slow"))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).collection_status(TX, "880123456789", "RWF")
    assert not isinstance(err.value, ProviderTimeout)
    assert err.value.retryable is True


async def test_invoice_server_error_is_retryable() -> None:
    wire = Wire().on("POST", "/payments/invoices", 502, {"success": False, "message": "bad gateway"})
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
    assert err.value.retryable is True


@pytest.mark.parametrize("case", fixture("status.json")["cases"], ids=lambda c: c["name"])
async def test_status(case: dict[str, Any]) -> None:
    wire = Wire().on("GET", "/payments/invoices/880123456789", case["status"], case["json"])
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        if "error" in case["expect"]:
            with pytest.raises(ProviderError) as err:
                await adapter.collection_status(TX, "880123456789", "RWF")
            want = (case["expect"]["error"], case["expect"]["retryable"])
            assert (err.value.code, err.value.retryable) == want
        else:
            result = await adapter.collection_status(TX, "880123456789", "RWF")
            assert result.outcome == ProviderOutcome(case["expect"]["outcome"])
            assert result.amount == Money(50000, "RWF")
            assert result.provider_transaction_id == "880123456789"
    wire.done()
    assert_headers(wire.requests[0])


async def test_status_amount_is_read_in_the_currency_the_invoice_names() -> None:
    """An invoice the status answers in another currency than the payment's is reported so (the core flags a paid
    amount it did not ask for), never read as that many francs."""
    paid = fixture("status.json")["cases"][1]["json"]
    answer = {**paid, "data": {**paid["data"], "amount": 40, "currency": "USD"}}
    wire = Wire().on("GET", "/payments/invoices/880123456789", 200, answer)
    async with wire.client() as http:
        result = await IremboPayAdapter(http, config()).collection_status(TX, "880123456789", "RWF")
    wire.done()
    assert (result.outcome, result.amount) == (ProviderOutcome.SUCCEEDED, Money(4000, "USD"))


def test_every_status_row_has_a_recorded_case() -> None:
    cases = fixture("status.json")["cases"]
    recorded = {c["json"]["data"]["paymentStatus"] for c in cases if "data" in c["json"]}
    assert set(STATUS) <= recorded


async def test_status_without_invoice_number_asks_for_the_invoice_by_our_transaction_id() -> None:
    """The invoice answer never arrived (another process, or the collect job cut off): Get Invoice takes our
    transactionId too; the invoice found gives its status and its number (remembered for the next query)."""
    paid = fixture("status.json")["cases"][1]["json"]
    number = paid["data"]["invoiceNumber"]
    wire = (Wire().on("GET", f"/payments/invoices/{TX}", 200, paid)
            .on("GET", f"/payments/invoices/{number}", 200, paid))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        result = await adapter.collection_status(TX, None, "RWF")
        again = await adapter.collection_status(TX, None, "RWF")
    wire.done()
    assert (result.outcome, result.provider_transaction_id) == (ProviderOutcome.SUCCEEDED, number)
    assert again.outcome is ProviderOutcome.SUCCEEDED
    assert [r.url.path for r in wire.requests] == [f"/payments/invoices/{TX}", f"/payments/invoices/{number}"]


async def test_no_invoice_under_our_transaction_id_is_not_found() -> None:
    """IremboPay never got the request (no invoice under our transactionId): NOT_FOUND, which the core answers by
    sending it again inside the payment's window, or by ending it unreachable after (nothing can have been paid)."""
    wire = Wire().on("GET", f"/payments/invoices/{TX}", 404, {
        "success": False, "errors": [{"code": "INVOICE_NOT_FOUND", "detail": "Invoice not found"}]})
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).collection_status(TX, None, "RWF")
    wire.done()
    assert (err.value.code, err.value.retryable) == ("NOT_FOUND", False)


async def test_refund_is_refused_clearly() -> None:
    wire = Wire()
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        assert adapter.supports_partial_refund is True  # refunded by a person's transfer, of any amount
        with pytest.raises(ProviderError) as err:
            await adapter.request_refund(RefundRequest(
                provider_reference="r1", original_provider_reference=TX,
                original_provider_transaction_id="880", amount=Money(50000, "RWF"), full=True, payer=None,
                reason="x", callback_url="https://x"))
    assert (err.value.code, err.value.retryable) == ("REFUND_UNSUPPORTED", False)
    assert "through the bank" in str(err.value) and "manually" in str(err.value)
    assert wire.requests == []


# --- webhooks -----------------------------------------------------------------------------------

def signed(body: Any, t: int = NOW_MS, secret: str = SECRET, raw: bytes | None = None) -> InboundCallback:
    data = raw if raw is not None else json.dumps(body).encode()
    return InboundCallback(method="POST", headers={"irembopay-signature": signature_header(secret, t, data),
                                                   "Content-Type": "application/json"}, query={}, body=data)


def adapter_at(now: datetime = NOW, **kw: Any) -> IremboPayAdapter:
    return IremboPayAdapter(httpx.AsyncClient(transport=httpx.MockTransport(Wire().handler)), config(),
                            clock=lambda: now, **kw)


@pytest.mark.parametrize("case", fixture("webhooks.json")["cases"], ids=lambda c: c["name"])
async def test_webhooks(case: dict[str, Any]) -> None:
    adapter = adapter_at()
    callback = signed(case["body"])
    await adapter.verify_callback(callback)
    event = adapter.parse_callback(callback)
    want = case["expect"]
    assert (event.provider, event.kind) == ("irembopay", EventKind.COLLECTION)
    assert (event.event_id, event.reference, event.outcome) == (want["event_id"], want["reference"],
                                                                ProviderOutcome(want["outcome"]))
    assert event.amount == Money(want["amount_minor"], want["currency"])
    assert event.provider_transaction_id == want["provider_transaction_id"]
    assert event.needs_confirmation is False  # signed: no status query needed


@pytest.mark.parametrize("case", fixture("webhooks.json")["rejected"], ids=lambda c: c["name"])
async def test_rejected_webhooks(case: dict[str, Any]) -> None:
    adapter = adapter_at()
    callback = signed(case["body"])
    await adapter.verify_callback(callback)  # genuine, but not understood
    with pytest.raises(CallbackRejected) as err:
        adapter.parse_callback(callback)
    assert err.value.status == case["status"]


PAID = fixture("webhooks.json")["cases"][0]["body"]


async def test_signature_good_then_replay_refused() -> None:
    adapter = adapter_at()
    callback = signed(PAID)
    await adapter.verify_callback(callback)
    with pytest.raises(CallbackRejected) as err:
        await adapter.verify_callback(callback)
    assert err.value.status == 409
    # A fresh delivery of the same event (new timestamp) is genuine; the core drops it by event id.
    await adapter.verify_callback(signed(PAID, t=NOW_MS + 1000))


@pytest.mark.parametrize(("name", "make"), [
    ("wrong_secret", lambda: signed(PAID, secret="not-the-secret")),
    ("tampered_body", lambda: InboundCallback(
        "POST", signed(PAID).headers, {},
        json.dumps({**PAID, "data": {**PAID["data"], "amount": 1}}).encode())),
    ("stale", lambda: signed(PAID, t=NOW_MS - 301_000)),
    ("future", lambda: signed(PAID, t=NOW_MS + 301_000)),
    ("seconds_not_ms", lambda: signed(PAID, t=NOW_MS // 1000)),
    ("missing", lambda: InboundCallback("POST", {}, {}, json.dumps(PAID).encode())),
    ("malformed", lambda: InboundCallback("POST", {"irembopay-signature": "sha256=abc"}, {}, b"{}")),
])
async def test_signature_refused(name: str, make: Any) -> None:
    adapter = adapter_at()
    with pytest.raises(CallbackRejected) as err:
        await adapter.verify_callback(make())
    assert err.value.status == 401


async def test_signature_within_tolerance_and_header_case() -> None:
    adapter = adapter_at()
    callback = signed(PAID, t=NOW_MS - 299_000)
    upper = InboundCallback("POST", {"IremboPay-Signature": callback.headers["irembopay-signature"]}, {},
                            callback.body)
    await adapter.verify_callback(upper)


async def test_forged_signature_does_not_use_up_the_nonce() -> None:
    seen: list[str] = []

    async def store(key: str, ttl: int) -> bool:
        seen.append(key)
        return True

    adapter = adapter_at(nonce_store=store)
    with pytest.raises(CallbackRejected):
        await adapter.verify_callback(signed(PAID, secret="forged"))
    assert seen == []
    await adapter.verify_callback(signed(PAID))
    assert len(seen) == 1 and seen[0].startswith("nonce:{irembopay}:")


async def test_signature_is_hmac_of_the_timestamp_a_hash_sign_and_the_raw_body_in_either_hex_case() -> None:
    """PROTOCOLS.md: s = hex HMAC_SHA256(secretKey, t + "#" + rawBody), t in milliseconds. Computed here, not by the
    adapter's sign(): the simulator signs with that same function, so a formula of ours that IremboPay does not use
    (another separator, seconds) passed every test and refused every real webhook. Hex is hex in either case."""
    raw = json.dumps(PAID).encode()
    digest = hmac.new(SECRET.encode(), str(NOW_MS).encode() + b"#" + raw, hashlib.sha256).hexdigest()
    assert signature_header(SECRET, NOW_MS, raw) == f"t={NOW_MS},s={digest}"
    for given in (digest, digest.upper()):
        await adapter_at().verify_callback(
            InboundCallback("POST", {"irembopay-signature": f"t={NOW_MS},s={given}"}, {}, raw))


async def test_one_time_key_outlives_every_moment_the_timestamp_is_accepted() -> None:
    """A timestamp up to the tolerance (300 s) ahead of our clock is accepted until the tolerance after it: 600 s
    from its first arrival. Its one-time key must last that long, else the same signed request replays inside the
    window (a key kept 30 s let a captured webhook through again at 31 s)."""
    ttls: list[int] = []

    async def store(key: str, ttl: int) -> bool:
        ttls.append(ttl)
        return True

    await adapter_at(nonce_store=store).verify_callback(signed(PAID, t=NOW_MS + 299_000))
    assert len(ttls) == 1 and ttls[0] >= 2 * 300


async def test_an_invoice_answered_success_false_is_refused_and_nobody_is_prompted() -> None:
    """IremboPay's envelope says whether the call worked (`success`), whatever the HTTP status: an invoice answered
    2xx with success false is its refusal (its errors say why), even with a data object, and no push follows."""
    wire = Wire().on("POST", "/payments/invoices", 200, {
        "success": False, "message": "Payment item not found",
        "errors": [{"code": "VALIDATION_ERROR", "detail": "Payment item not found"}],
        "data": {"invoiceNumber": "880000000001", "paymentStatus": "NEW", "amount": 50000, "currency": "RWF"}})
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await IremboPayAdapter(http, config()).request_collection(collection())
    assert err.value.code == "VALIDATION_ERROR" and not isinstance(err.value, ProviderTimeout)
    assert [r.url.path for r in wire.requests] == ["/payments/invoices"]
    wire.done()


async def test_a_replay_with_the_signature_in_upper_case_is_still_a_replay() -> None:
    """The signature is accepted in either hex case: its one-time key is the same for both, else a captured webhook
    replays once more with its hex in capitals."""
    adapter = adapter_at()
    callback = signed(PAID)
    await adapter.verify_callback(callback)
    header = callback.headers["irembopay-signature"]
    t, s = header.split(",")
    shouted = InboundCallback("POST", {"irembopay-signature": f"{t},{s.upper().replace('S=', 's=')}"}, {},
                              callback.body)
    with pytest.raises(CallbackRejected) as err:
        await adapter.verify_callback(shouted)
    assert err.value.status == 409


async def test_memory_nonce_store_expires() -> None:
    clock = [0.0]
    store = MemoryNonceStore(clock=lambda: clock[0])
    assert await store("k", 10) is True
    assert await store("k", 10) is False
    clock[0] = 11.0
    assert await store("k", 10) is True


@pytest.mark.redis
async def test_redis_nonce_store_refuses_replay_across_adapters() -> None:
    from redis.asyncio import Redis

    url = os.environ.get("REDIS_URL", "")
    redis = Redis.from_url(url if url.startswith("redis://") else "redis://127.0.0.1:39279/4")
    try:
        await redis.ping()
    except Exception:
        await redis.aclose()
        pytest.skip("no Redis server")
    # A body unique to this run, so the test touches only its own key in a shared database.
    body = {**PAID, "data": {**PAID["data"], "paymentReference": uuid.uuid4().hex}}
    callback = signed(body)
    key = "nonce:{irembopay}:" + callback.headers["irembopay-signature"].split("s=")[1]
    try:
        await adapter_at(nonce_store=redis_nonce_store(redis)).verify_callback(callback)
        with pytest.raises(CallbackRejected) as err:  # another gateway process, same Redis
            await adapter_at(nonce_store=redis_nonce_store(redis)).verify_callback(callback)
        assert err.value.status == 409
        assert await redis.get(key) == b"1"
        assert 0 < await redis.ttl(key) <= 600
    finally:
        await redis.delete(key)
        await redis.aclose()


# --- logs ---------------------------------------------------------------------------------------

async def test_logs_carry_no_secret_and_no_full_phone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 200, rec["push_answer"])
            .on("POST", "/payments/invoices", 201, rec["invoice_answer"])
            .on("POST", "/payments/transactions/initiate", 400, rec["push_errors"][4]["json"])
            .on("GET", "/payments/invoices/880123456789", 200, fixture("status.json")["cases"][5]["json"]))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config(), clock=lambda: NOW)
        await adapter.request_collection(collection())
        with pytest.raises(ProviderError) as err:
            await adapter.request_collection(collection())
        with pytest.raises(ProviderError):
            await adapter.collection_status(TX, "880123456789", "RWF")
        with pytest.raises(CallbackRejected):
            await adapter.verify_callback(signed(PAID, secret="forged"))
        with pytest.raises(CallbackRejected):
            adapter.parse_callback(signed(fixture("webhooks.json")["rejected"][0]["body"]))
    assert caplog.records
    formatter = JsonFormatter()
    text = "\n".join([caplog.text, *(str(r.__dict__) for r in caplog.records),
                      *(formatter.format(r) for r in caplog.records), str(err.value)])
    for secret in (SECRET, "250788000001", "0788000001"):
        assert secret not in text


# --- simulator over real HTTP --------------------------------------------------------------------

class Receiver:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return web.json_response({"ok": True})

    async def wait(self, count: int = 1) -> None:
        async def enough() -> None:
            while len(self.calls) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), 30.0)  # patience for a loaded machine

    def inbound(self, index: int) -> InboundCallback:
        headers, body = self.calls[index]
        return InboundCallback("POST", headers, {}, body)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/payments/irembopay", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield rec, str(server.make_url("/webhooks/payments/irembopay"))
    await server.close()


async def start_sim(callback_url: str, prefix: str = "",
                    **opts: Any) -> tuple[TestServer, web.Application, str]:
    sim = create_simulator(SimulatorOptions(delay=0.05, callback_url=callback_url,
                                            credentials={"secret_key": SECRET}, **opts))
    app = sim
    if prefix:
        app = web.Application()
        app.add_subapp(prefix, sim)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, sim, str(server.make_url(prefix or "/")).rstrip("/")


def live(base: str, http: httpx.AsyncClient) -> IremboPayAdapter:
    return IremboPayAdapter(http, config(base))


async def test_simulator_mobile_money_success(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim(url)
    try:
        async with httpx.AsyncClient() as http:
            adapter = live(base, http)
            accepted = await adapter.request_collection(collection(expires_at=None))
            await rec.wait()
            callback = rec.inbound(0)
            await adapter.verify_callback(callback)
            event = adapter.parse_callback(callback)
            assert (event.reference, event.outcome) == (TX, ProviderOutcome.SUCCEEDED)
            assert event.amount == Money(50000, "RWF")
            status = await adapter.collection_status(TX, accepted.provider_transaction_id, "RWF")
            assert status.outcome is ProviderOutcome.SUCCEEDED
            with pytest.raises(CallbackRejected):  # the same delivery again is a replay
                await adapter.verify_callback(callback)
            # Retrying the whole collection (say after a timeout) reuses the invoice, finds it paid and
            # pushes nothing to the payer again.
            again = await adapter.request_collection(collection(expires_at=None))
            assert again.provider_transaction_id == accepted.provider_transaction_id
            assert sim[STATE].requests == 3  # invoice, push, invoice replay
    finally:
        await server.close()


async def test_simulator_mobile_money_failure(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim(url)
    try:
        async with httpx.AsyncClient() as http:
            adapter = live(base, http)
            accepted = await adapter.request_collection(collection(phone="+250788000002"))
            await rec.wait()
            await adapter.verify_callback(rec.inbound(0))
            assert adapter.parse_callback(rec.inbound(0)).outcome is ProviderOutcome.FAILED
            status = await adapter.collection_status(TX, accepted.provider_transaction_id, "RWF")
            assert status.outcome is ProviderOutcome.FAILED
    finally:
        await server.close()


async def test_simulator_pending(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim(url)
    try:
        async with httpx.AsyncClient() as http:
            adapter = live(base, http)
            accepted = await adapter.request_collection(collection(phone="+250788000003"))
            await sim[STATE].idle()
            status = await adapter.collection_status(TX, accepted.provider_transaction_id, "RWF")
            assert status.outcome is ProviderOutcome.PENDING
            assert rec.calls == []
    finally:
        await server.close()


async def test_simulator_bank_payment_page(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim(url, prefix="/_sim/irembopay")
    try:
        async with httpx.AsyncClient() as http:
            adapter = live(base, http)
            accepted = await adapter.request_collection(collection("BANK_BK", None))
            assert accepted.payment_url == f"{base}/pay/{accepted.gateway_reference}"
            page = await http.get(accepted.payment_url)
            assert page.status_code == 200 and "Pay with BK" in page.text and "50,000 RWF" in page.text
            paid = await http.post(accepted.payment_url, data={"bank": "BK"})
            assert paid.status_code == 200
            again = await http.post(accepted.payment_url, data={"bank": "BK"})
            assert again.status_code == 409  # a double click pays nothing twice
            await rec.wait()
            await adapter.verify_callback(rec.inbound(0))
            event = adapter.parse_callback(rec.inbound(0))
            assert event.outcome is ProviderOutcome.SUCCEEDED
            assert event.raw["paymentMethod"] == "BANK_BK"
            assert len(rec.calls) == 1
    finally:
        await server.close()


async def test_simulator_duplicate_and_out_of_order_webhooks(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim(url, duplicate_callback=True, out_of_order=True)
    try:
        async with httpx.AsyncClient() as http:
            adapter = live(base, http)
            await adapter.request_collection(collection())
            await rec.wait(3)
            events = [adapter.parse_callback(rec.inbound(i)) for i in range(3)]
            assert events[0].event_id == events[1].event_id  # the core drops the duplicate
            assert events[2].outcome is ProviderOutcome.PENDING  # stale NEW after PAID
            await adapter.verify_callback(rec.inbound(0))
            await adapter.verify_callback(rec.inbound(2))
    finally:
        await server.close()


async def test_simulator_checks_secret_and_validates() -> None:
    server, _sim, base = await start_sim("")
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ProviderError) as err:
                await IremboPayAdapter(http, config(base, secret="wrong")).request_collection(collection())
            assert (err.value.code, err.value.retryable) == ("UNAUTHORIZED", False)
            headers = {"irembopay-secretKey": SECRET, "X-API-Version": "2"}
            resp = await http.post(f"{base}/payments/invoices", headers=headers,
                                   json={**fixture("invoice.json")["mobile_invoice_request"],
                                         "customer": {"phoneNumber": "+250788000001"}})
            assert resp.status_code == 400
            assert resp.json()["errors"][0]["code"] == "BAD_PHONE_NUMBER"
            for phone in ("0701234567", "0750000000", "078800000", "07880000011"):
                # ten digits from 07 that no Rwandan operator gives out, and numbers a digit short or long
                resp = await http.post(f"{base}/payments/transactions/initiate", headers=headers,
                                       json={**fixture("invoice.json")["push_request"], "accountIdentifier": phone})
                assert resp.status_code == 400 and resp.json()["errors"][0]["code"] == "BAD_PHONE_NUMBER", phone
            resp = await http.post(f"{base}/payments/transactions/initiate", headers=headers,
                                   json={**fixture("invoice.json")["push_request"], "invoiceNumber": "nope"})
            assert resp.status_code == 404
            assert resp.json()["errors"][0]["code"] == "INVOICE_NOT_FOUND"
            resp = await http.get(f"{base}/payments/invoices/nope", headers={**headers, "X-API-Version": "1"})
            assert resp.status_code == 400
    finally:
        await server.close()


async def test_simulator_outage_and_hang() -> None:
    server, sim, base = await start_sim("", fail_request_500=True)
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ProviderError) as err:
                await live(base, http).request_collection(collection())
            assert err.value.retryable is True
            sim[STATE].options.fail_request_500 = False
            sim[STATE].options.hang_request = 2.5  # past the read timeout, 2 s as usual (every call has it)
        async with httpx.AsyncClient() as http:
            adapter = IremboPayAdapter(http, config(base, read_timeout="2"))
            with pytest.raises(ProviderError) as err:  # the invoice call hangs: safe to send again
                await adapter.request_collection(collection())
            assert (err.value.code, err.value.retryable) == ("TIMEOUT", True)
        # Like IremboPay, the simulator made the invoice before its answer was lost.
        assert list(sim[STORE].by_transaction) == [TX]
    finally:
        await server.close()


async def test_push_whose_answer_is_lost_still_prompts_the_payer(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim(url, hang_request=2.5)  # past the read timeout, which the status query has too
    try:
        async with httpx.AsyncClient() as http:
            adapter = IremboPayAdapter(http, config(base, read_timeout="2"))
            # One request, as the core retries it (expiresAt is the payment's own: the same body both times;
            # two built a second apart would differ, which IremboPay answers 409 for a reused transactionId).
            request = collection()
            with pytest.raises(ProviderError):  # the invoice's answer is lost; a retry finds the invoice
                await adapter.request_collection(request)
            with pytest.raises(ProviderTimeout):  # then the push's: ask the status, never push again
                await adapter.request_collection(request)
            await rec.wait()  # the payer was prompted and paid all the same
            event = adapter.parse_callback(rec.inbound(0))
            assert (event.reference, event.outcome) == (TX, ProviderOutcome.SUCCEEDED)
            status = await adapter.collection_status(TX, None, "RWF")  # the invoice number was kept
            assert status.outcome is ProviderOutcome.SUCCEEDED
            assert sim[STATE].requests == 3  # invoice, invoice again, one push
    finally:
        await server.close()


async def test_a_previous_key_verifies_webhooks_only_and_every_call_sends_the_current_one(
        receiver: tuple[Receiver, str]) -> None:
    """IREMBOPAY_SECRET_KEY is both the key every call sends (irembopay-secretKey) and the webhooks' signing key: during
    a rotation only the signature check falls back on IREMBOPAY_SECRET_KEY_PREVIOUS, never a call."""
    rec, url = receiver
    server, _sim, base = await start_sim(url)  # IremboPay holds SECRET: it takes calls with it and signs with it

    def rotated(current: str, *previous: str) -> ProviderConfig:
        return ProviderConfig(base_url=base, credentials={"secret_key": Secret(current)},
                              options={"payment_account": "PI-test", "payment_item_code": "PC-test"},
                              previous={"secret_key": tuple(map(Secret, previous))})
    try:
        async with httpx.AsyncClient() as http:
            # The gateway switched before IremboPay did: its calls carry the new key, refused, never the previous one.
            with pytest.raises(ProviderError) as err:
                await IremboPayAdapter(http, rotated("irembo-new-key-0001", SECRET)).request_collection(collection())
            assert (err.value.code, err.value.retryable) == ("UNAUTHORIZED", False)
            assert rec.calls == []
            # IremboPay switched as well but still signs a webhook with the key it held: the new key's adapter,
            # with the old key as previous, takes it; without the previous key it is refused.
            await IremboPayAdapter(http, config(base)).request_collection(collection(expires_at=None))
            await rec.wait()
            await IremboPayAdapter(http, rotated("irembo-new-key-0001", SECRET)).verify_callback(rec.inbound(0))
            with pytest.raises(CallbackRejected):
                await IremboPayAdapter(http, rotated("irembo-new-key-0001")).verify_callback(rec.inbound(0))
    finally:
        await server.close()
