"""M-Pesa Daraja adapter over recorded wire bodies, and against its simulator over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from channels.sms.templates import reason_key
from core.config import ProviderConfig, Secret
from core.jobs import CREDENTIALS_REFUSED
from core.logs import JsonFormatter
from core.metrics import REGISTRY
from core.money import Money
from core.phone import normalize
from core.ports import (
    CallbackRejected,
    CollectionRequest,
    CredentialsRefused,
    EventKind,
    InboundCallback,
    ProviderError,
    ProviderOutcome,
    ProviderTimeout,
    RefundRequest,
)
from providers.mpesa import MpesaAdapter
from providers.mpesa.adapter import STATUS, account_reference, remarks, transaction_desc
from providers.mpesa.simulator import STORE, create_simulator
from providers.simulation import STATE, SimulatorOptions

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mpesa"
BASE = "https://sandbox.safaricom.test"
PASSKEY = "test-passkey-0f3c9a1e7b2d4c6a8e0f1a2b3c4d5e6f"
CONSUMER_SECRET = "cs-test-secret"
SECURITY_CREDENTIAL = "sec-cred-test"
CALLBACK = "https://gateway.test/webhooks/payments/daraja?s=cb"
NOW = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)  # 08:00 in Nairobi


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def config(base: str = BASE, read_timeout: str = "", **creds: str) -> ProviderConfig:
    values = {"consumer_key": "ck-test", "consumer_secret": CONSUMER_SECRET, "passkey": PASSKEY,
              "initiator": "testapi", "security_credential": SECURITY_CREDENTIAL, **creds}
    return ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in values.items()},
                          options={"shortcode": "174379", "read_timeout": read_timeout})


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


def token_route(wire: Wire) -> Wire:
    token = fixture("token.json")
    return wire.on("GET", token["request"]["path"], token["response"]["status"], token["response"]["json"])


def collection(phone: str = "+254708000001", amount: Money | None = None, **kw: Any) -> CollectionRequest:
    values: dict[str, Any] = dict(
        provider_reference="5b0c1c3e-8f3e-4a57-9c1e-2f8d7a6b5c4d", payment_reference="PAY_20261122_001",
        amount=amount or Money(15000, "KES"), payer=normalize(phone), payer_account=phone,
        description="Monthly rent payment", callback_url=CALLBACK, method="MPESA")
    values.update(kw)
    return CollectionRequest(**values)


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


# --- outbound: recorded bodies ------------------------------------------------------------------

@pytest.mark.parametrize("case", fixture("stk_push.json")["cases"], ids=lambda c: c["name"])
async def test_stk_push(case: dict[str, Any]) -> None:
    recorded = fixture("stk_push.json")
    wire = token_route(Wire()).on("POST", "/mpesa/stkpush/v1/processrequest", case["status"], case["json"])
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config(), clock=lambda: NOW)
        if "error" in case["expect"]:
            with pytest.raises(ProviderError) as err:
                await adapter.request_collection(collection())
            assert err.value.code == case["expect"]["error"]
            assert err.value.retryable is case["expect"]["retryable"]
            # A 5xx may follow a prompt that went out: unanswered (ask the status), never sent again.
            assert isinstance(err.value, ProviderTimeout) is case["expect"].get("ambiguous", False)
            assert case["expect"].get("daraja_code", case["expect"]["error"]) in str(err.value)
        else:
            accepted = await adapter.request_collection(collection())
            assert accepted.provider_transaction_id == case["expect"]["provider_transaction_id"]
            assert accepted.gateway_reference == case["expect"]["gateway_reference"]
    wire.done()
    token_request, push = wire.requests
    token = fixture("token.json")["request"]
    assert token_request.url.query.decode() == token["query"]
    assert token_request.headers["Authorization"] == token["authorization"]
    assert push.headers["Authorization"] == "Bearer tok-test-0001"
    assert body_of(push) == recorded["request"]


def test_password_is_base64_of_shortcode_passkey_and_nairobi_timestamp() -> None:
    sent = fixture("stk_push.json")["request"]
    assert sent["Timestamp"] == "20261122080000"  # 05:00 UTC is 08:00 in Nairobi
    assert base64.b64decode(sent["Password"]).decode() == f"174379{PASSKEY}20261122080000"


@pytest.mark.parametrize(("reference", "expected"), [
    ("PAY_20261122_001", "20261122001"),
    ("PAY_20261122_9999", "202611229999"),
    ("PAY_20261122_12345", "26112212345"),  # the year's century goes first: the number stays whole
    ("PAY_20261122_123456", "261122123456"),
    ("PAY_20271122_3000123", "3000123"),  # a year of a federation's payments: the number alone
    ("PAY_20271122_1234567890123", "234567890123"),
    ("ABC", "ABC"),
    ("___", "PAYMENT"),
])
def test_account_reference_fits_twelve_characters(reference: str, expected: str) -> None:
    result = account_reference(reference)
    assert len(result) <= 12
    assert result == expected


def test_transaction_desc_fits_thirteen_characters() -> None:
    assert transaction_desc("Monthly rent payment") == "Monthly rent"
    assert transaction_desc("") == "Payment"
    assert len(transaction_desc("x" * 40)) == 13


@pytest.mark.parametrize(("amount", "phone", "code"), [
    (Money(15050, "KES"), "+254708000001", "AMOUNT_HAS_CENTS"),
    (Money(15000, "RWF"), "+254708000001", "CURRENCY_UNSUPPORTED"),
    (Money(0, "KES"), "+254708000001", "BAD_AMOUNT"),
    (Money(25_000_100, "KES"), "+254708000001", "AMOUNT_OVER_LIMIT"),  # Safaricom's KES 250,000 a transaction
    (Money(15000, "KES"), "+250788000001", "BAD_PHONE_NUMBER"),
])
async def test_refuses_bad_requests_before_calling(amount: Money, phone: str, code: str) -> None:
    wire = Wire()  # no request may leave
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await MpesaAdapter(http, config()).request_collection(collection(phone, amount))
    assert err.value.code == code
    assert err.value.retryable is False
    assert wire.requests == []


async def test_token_is_cached_and_fetched_once_under_concurrency() -> None:
    answer = fixture("stk_push.json")["cases"][0]["json"]
    wire = token_route(Wire())
    for _ in range(5):
        wire.on("POST", "/mpesa/stkpush/v1/processrequest", 200, answer)
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config(), clock=lambda: NOW)
        await asyncio.gather(*(adapter.request_collection(collection()) for _ in range(5)))
    wire.done()
    assert sum(r.url.path == "/oauth/v1/generate" for r in wire.requests) == 1


async def test_refused_token_is_refetched_once() -> None:
    answer = fixture("stk_push.json")["cases"][0]["json"]
    invalid = {"requestId": "1-1", "errorCode": "404.001.03", "errorMessage": "Invalid Access Token"}
    wire = (token_route(Wire()).on("POST", "/mpesa/stkpush/v1/processrequest", 401, invalid)
            .on("GET", "/oauth/v1/generate", 200, {"access_token": "tok-2", "expires_in": "3599"})
            .on("POST", "/mpesa/stkpush/v1/processrequest", 200, answer))
    async with wire.client() as http:
        accepted = await MpesaAdapter(http, config(), clock=lambda: NOW).request_collection(collection())
    wire.done()
    assert accepted.provider_transaction_id == answer["CheckoutRequestID"]
    assert wire.requests[-1].headers["Authorization"] == "Bearer tok-2"


async def test_bad_credentials_are_not_retryable() -> None:
    refused = {"requestId": "", "errorCode": "400.008.01", "errorMessage": "Invalid Authentication passed"}
    wire = Wire().on("GET", "/oauth/v1/generate", 400, refused)
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await MpesaAdapter(http, config()).request_collection(collection())
    assert err.value.retryable is False
    assert err.value.code == "400.008.01"


def test_accented_names_keep_their_letters_in_remarks_and_description() -> None:
    """A cooperative or payment type named in French or with a Swahili/Kinyarwanda diacritic keeps its letters
    (without the accent) in a reversal's Remarks and an STK push's TransactionDesc: not "Coop rative"."""
    assert remarks("Refund PAY_20261203_001 Coopérative Twitezimbere") == \
        "Refund PAY 20261203 001 Cooperative Twitezimbere"
    assert transaction_desc("Épargne mensuelle") == "Epargne mensu"
    assert remarks("Ré") == "Re"


def test_a_sign_without_a_letter_in_it_is_a_space_not_dropped() -> None:
    """A dash, a typographic apostrophe or a guillemet has no ASCII letter to keep: it is a space, as an ASCII sign
    is, so the words around it stay apart. Dropping it (the accent's way) ran them together: "RentMarch"."""
    assert transaction_desc("Rent\u2014March") == "Rent March"
    assert remarks("Refund \u00abKigali\u2013Heights\u00bb") == "Refund Kigali Heights"
    assert remarks("Aline\u2019s rent") == remarks("Aline's rent") == "Aline s rent"


@pytest.mark.parametrize("field", ["Password", "BusinessShortCode"])
async def test_our_passkey_or_shortcode_refused_is_our_credentials(field: str) -> None:
    """An STK push refused for its Password (base64 of our shortcode, passkey and time) or our shortcode: our
    configuration, never the payer's doing (the payer was told "you declined the request")."""
    refused = {"requestId": "1-1", "errorCode": "400.002.02", "errorMessage": f"Bad Request - Invalid {field}"}
    wire = token_route(Wire()).on("POST", "/mpesa/stkpush/v1/processrequest", 400, refused)
    async with wire.client() as http:
        with pytest.raises(CredentialsRefused) as err:
            await MpesaAdapter(http, config(), clock=lambda: NOW).request_collection(collection())
    wire.done()
    assert (err.value.code, err.value.retryable) == ("400.002.02", False)
    assert reason_key(f"{CREDENTIALS_REFUSED}: {err.value}") == "provider_unreachable"


async def test_fresh_token_refused_again_is_our_credentials() -> None:
    """Daraja's "Invalid Access Token" (404.001.03, whatever its HTTP status) for a token fetched a moment ago:
    our configuration (another app's keys, another environment), not a refund or payment to fail and text."""
    invalid = {"requestId": "1-1", "errorCode": "404.001.03", "errorMessage": "Invalid Access Token"}
    wire = (token_route(Wire()).on("POST", "/mpesa/reversal/v1/request", 404, invalid)
            .on("GET", "/oauth/v1/generate", 200, {"access_token": "tok-2", "expires_in": "3599"})
            .on("POST", "/mpesa/reversal/v1/request", 404, invalid))
    async with wire.client() as http:
        with pytest.raises(CredentialsRefused) as err:
            await MpesaAdapter(http, config()).request_refund(refund())
    wire.done()
    assert err.value.code == "404.001.03"


@pytest.mark.parametrize(("exc", "kind"), [
    (httpx.ReadTimeout("slow"), ProviderTimeout),
    (httpx.RemoteProtocolError("closed mid-answer"), ProviderTimeout),
    (httpx.ConnectError("refused"), ProviderError),
])
async def test_transport_failures(exc: Exception, kind: type[ProviderError]) -> None:
    wire = token_route(Wire()).on("POST", "/mpesa/stkpush/v1/processrequest", 0, exc)
    async with wire.client() as http:
        with pytest.raises(kind) as err:
            await MpesaAdapter(http, config()).request_collection(collection())
    if kind is ProviderTimeout:
        assert isinstance(err.value, ProviderTimeout)  # unknown: ask the status, never resend blind
    else:
        assert not isinstance(err.value, ProviderTimeout)
        assert err.value.retryable is True  # nothing was sent


async def test_token_timeout_is_retryable_not_a_collection_timeout() -> None:
    wire = Wire().on("GET", "/oauth/v1/generate", 0, httpx.ReadTimeout("slow"))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await MpesaAdapter(http, config()).request_collection(collection())
    assert not isinstance(err.value, ProviderTimeout)
    assert err.value.retryable is True


async def test_query_timeout_is_retryable() -> None:
    wire = token_route(Wire()).on("POST", "/mpesa/stkpushquery/v1/query", 0, httpx.ReadTimeout("slow"))
    async with wire.client() as http:
        with pytest.raises(ProviderError) as err:
            await MpesaAdapter(http, config()).collection_status("ref", "ws_CO_1", "KES")
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == ("TIMEOUT", True)


@pytest.mark.parametrize("case", fixture("stk_query.json")["cases"], ids=lambda c: c["name"])
async def test_stk_query(case: dict[str, Any]) -> None:
    recorded = fixture("stk_query.json")
    checkout = recorded["request"]["CheckoutRequestID"]
    wire = token_route(Wire()).on("POST", "/mpesa/stkpushquery/v1/query", case["status"], case["json"])
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config(), clock=lambda: NOW)
        if "error" in case["expect"]:
            with pytest.raises(ProviderError) as err:
                await adapter.collection_status("ref", checkout, "KES")
            assert err.value.code == case["expect"]["error"]
            assert err.value.retryable is case["expect"]["retryable"]
        else:
            result = await adapter.collection_status("ref", checkout, "KES")
            assert result.outcome == ProviderOutcome(case["expect"]["outcome"])
            assert result.reason == case["expect"].get("reason", result.reason)
    wire.done()
    assert body_of(wire.requests[-1]) == recorded["request"]


def test_every_status_row_has_a_recorded_case() -> None:
    codes = {c["json"].get("ResultCode") for c in fixture("stk_query.json")["cases"]}
    assert set(STATUS) <= codes
    callback_codes = {str(c["body"]["Body"]["stkCallback"]["ResultCode"])
                      for c in fixture("callbacks.json")["cases"] if "Body" in c["body"]}
    assert set(STATUS) <= callback_codes


async def test_status_without_checkout_id_is_ambiguous_and_sends_nothing() -> None:
    wire = Wire()
    async with wire.client() as http:
        result = await MpesaAdapter(http, config()).collection_status("ref", None, "KES")
    assert result.outcome is ProviderOutcome.AMBIGUOUS
    assert wire.requests == []


# --- refunds ------------------------------------------------------------------------------------

def refund(**kw: Any) -> RefundRequest:
    values: dict[str, Any] = dict(
        provider_reference="5b0c1c3e-8f3e-4a57-9c1e-2f8d7a6b5c4d", original_provider_reference="orig",
        original_provider_transaction_id="NLJ7RT61SV", amount=Money(15000, "KES"), full=True,
        payer=normalize("+254708000001"), reason="internal: paid twice", callback_url=CALLBACK,
        note="Refund PAY_20261203_001 Kigali Heights")
    values.update(kw)
    return RefundRequest(**values)


async def test_reversal_request() -> None:
    recorded = fixture("reversal.json")
    wire = token_route(Wire()).on("POST", "/mpesa/reversal/v1/request", recorded["response"]["status"],
                                  recorded["response"]["json"])
    async with wire.client() as http:
        accepted = await MpesaAdapter(http, config()).request_refund(refund())
    wire.done()
    assert body_of(wire.requests[-1]) == recorded["request"]
    assert accepted.provider_transaction_id == recorded["expect"]["provider_transaction_id"]
    assert accepted.gateway_reference == recorded["expect"]["gateway_reference"]


@pytest.mark.parametrize(("kw", "code"), [
    ({"full": False, "amount": Money(5000, "KES")}, "PARTIAL_REFUND_UNSUPPORTED"),
    ({"original_provider_transaction_id": None}, "RECEIPT_UNKNOWN"),
    ({"original_provider_transaction_id": "ws_CO_22112026080000123456789012"}, "RECEIPT_UNKNOWN"),
    ({"amount": Money(15050, "KES")}, "AMOUNT_HAS_CENTS"),
])
async def test_reversal_refusals(kw: dict[str, Any], code: str) -> None:
    wire = Wire()
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config())
        assert adapter.supports_partial_refund is False
        with pytest.raises(ProviderError) as err:
            await adapter.request_refund(refund(**kw))
    assert (err.value.code, err.value.retryable) == (code, False)
    assert wire.requests == []


# --- inbound ------------------------------------------------------------------------------------

def inbound(body: Any, raw: str | None = None, query: dict[str, str] | None = None) -> InboundCallback:
    data = raw.encode() if raw is not None else json.dumps(body).encode()
    return InboundCallback(method="POST", headers={"Content-Type": "application/json"}, query=query or {},
                           body=data)


@pytest.mark.parametrize("case", fixture("callbacks.json")["cases"], ids=lambda c: c["name"])
async def test_callbacks(case: dict[str, Any]) -> None:
    adapter = MpesaAdapter(httpx.AsyncClient(transport=httpx.MockTransport(Wire().handler)), config())
    callback = inbound(case["body"])
    await adapter.verify_callback(callback)
    event = adapter.parse_callback(callback)
    want = case["expect"]
    assert event.provider == "mpesa"
    assert event.kind == EventKind(want["kind"])
    assert (event.event_id, event.reference, event.outcome) == (want["event_id"], want["reference"],
                                                                ProviderOutcome(want["outcome"]))
    assert event.needs_confirmation is want["needs_confirmation"]
    assert event.raw["lookup"] == want["lookup"]
    if "amount_minor" in want:
        assert event.amount == Money(want["amount_minor"], want["currency"])
    if "provider_transaction_id" in want:
        assert event.provider_transaction_id == want["provider_transaction_id"]
    if "reason" in want:
        assert event.reason == want["reason"]
    assert "254708000001" not in json.dumps(event.raw)  # the stored event keeps a masked number only


@pytest.mark.parametrize(("code", "desc", "words"), [
    (2001, "The initiator information is invalid.", "initiator credentials invalid"),
    (21, "The initiator is not allowed to initiate this request.", "initiator not allowed"),
])
async def test_reversal_result_refusing_our_initiator_is_no_failure(code: int, desc: str, words: str) -> None:
    """Daraja took the reversal, then refused the gateway's initiator: nothing was processed, the refund is not
    FAILED (core.refunds puts it back to wait for the configuration), and the operator is told at once."""
    adapter = MpesaAdapter(httpx.AsyncClient(transport=httpx.MockTransport(Wire().handler)), config())
    body = {"Result": {"ResultType": 0, "ResultCode": code, "ResultDesc": desc,
                       "OriginatorConversationID": "8521-4298025-1", "ConversationID": "AG_20261122_00006bd489ff"}}
    event = adapter.parse_callback(inbound(body, query={"ref": "ref-of-ours"}))
    assert (event.kind, event.outcome, event.credentials_refused) == (EventKind.REFUND, ProviderOutcome.PENDING, True)
    assert words in (event.reason or "") and f"ResultCode {code}" in (event.reason or "") and desc in event.reason
    assert event.raw["provider_reference"] == "ref-of-ours"
    assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 1


async def test_refused_initiator_stays_reported_while_other_calls_are_answered() -> None:
    """gateway_provider_failing, set by a reversal refused for the initiator, read 0 again at the next STK push
    answered: M-Pesa calls succeed, but refunds still wait for the initiator. Only a reversal answered again (the
    configuration fixed) ends it."""
    push = fixture("stk_push.json")["cases"][0]
    reversal = fixture("reversal.json")["response"]
    wire = (token_route(Wire()).on("POST", "/mpesa/stkpush/v1/processrequest", push["status"], push["json"])
            .on("POST", "/mpesa/reversal/v1/request", reversal["status"], reversal["json"]))
    body = {"Result": {"ResultType": 0, "ResultCode": 2001, "ResultDesc": "The initiator information is invalid.",
                       "OriginatorConversationID": "8521-4298025-1", "ConversationID": "AG_20261122_00006bd489ff"}}
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config(), clock=lambda: NOW)
        adapter.parse_callback(inbound(body))
        await adapter.request_collection(collection())  # a token and an STK push, answered
        assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 1
        await adapter.request_refund(refund())  # a reversal answered: its initiator may be fixed
        assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 0
    wire.done()


async def test_refused_initiator_report_ends_with_a_reversal_result_processed() -> None:
    """The Result refusing the initiator reaches the serve process, which sends no reversal (the worker does): a
    call answered never ended its report there, and gateway_provider_failing{provider="mpesa"} read 1 for as long as
    that process lived, the initiator fixed and the refund sent back. A later reversal's Result other than 2001/21
    says Daraja accepted the initiator: the report ends."""
    adapter = MpesaAdapter(httpx.AsyncClient(transport=httpx.MockTransport(Wire().handler)), config())
    refused = {"Result": {"ResultType": 0, "ResultCode": 2001, "ResultDesc": "The initiator information is invalid.",
                          "OriginatorConversationID": "8521-4298025-1", "ConversationID": "AG_20261122_00006bd489ff"}}
    adapter.parse_callback(inbound(refused, query={"ref": "ref-of-ours"}))
    assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 1
    processed = {"Result": {"ResultType": 0, "ResultCode": 0,
                            "ResultDesc": "The service request is processed successfully.",
                            "OriginatorConversationID": "8521-4298025-2", "ConversationID": "AG_20261122_00006bd48a00",
                            "TransactionID": "SKL3ABC999"}}
    event = adapter.parse_callback(inbound(processed, query={"ref": "ref-of-ours"}))
    assert event.outcome is ProviderOutcome.SUCCEEDED
    assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": "mpesa"}) == 0


@pytest.mark.parametrize("case", fixture("callbacks.json")["rejected"], ids=lambda c: c["name"])
async def test_rejected_callbacks(case: dict[str, Any]) -> None:
    adapter = MpesaAdapter(httpx.AsyncClient(transport=httpx.MockTransport(Wire().handler)), config())
    callback = inbound(case.get("body"), case.get("raw"))
    with pytest.raises(CallbackRejected) as err:
        await adapter.verify_callback(callback)
        adapter.parse_callback(callback)
    assert err.value.status == case["status"]


# --- logs ---------------------------------------------------------------------------------------

async def test_logs_carry_no_secret_and_no_full_phone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    push = fixture("stk_push.json")
    query = fixture("stk_query.json")["cases"]
    wire = (token_route(Wire())
            .on("POST", "/mpesa/stkpush/v1/processrequest", 200, push["cases"][0]["json"])
            .on("POST", "/mpesa/stkpushquery/v1/query", 200, query[0]["json"])
            .on("POST", "/mpesa/stkpushquery/v1/query", 200, query[-3]["json"])  # unexpected code: logged
            .on("POST", "/mpesa/stkpushquery/v1/query", 400, query[-2]["json"])  # refused
            .on("POST", "/mpesa/stkpush/v1/processrequest", 400,
                {"errorCode": "400.002.02",
                 "errorMessage": "Bad Request - Invalid PhoneNumber 254708000001"}))
    async with wire.client() as http:
        adapter = MpesaAdapter(http, config(), clock=lambda: NOW)
        await adapter.request_collection(collection())
        await adapter.collection_status("ref", "ws_CO_1", "KES")
        assert query[-3]["name"] == "unexpected_code"
        assert (await adapter.collection_status("ref", "ws_CO_1", "KES")).outcome is ProviderOutcome.FAILED
        with pytest.raises(ProviderError):
            await adapter.collection_status("ref", "ws_CO_1", "KES")
        with pytest.raises(ProviderError) as err:
            await adapter.request_collection(collection())
        adapter.parse_callback(inbound(fixture("callbacks.json")["cases"][0]["body"]))
        with pytest.raises(CallbackRejected):
            adapter.parse_callback(inbound(fixture("callbacks.json")["rejected"][0]["body"]))
    assert caplog.records, "the adapter should log its calls"
    formatter = JsonFormatter()
    text = "\n".join([caplog.text, *(str(r.__dict__) for r in caplog.records),
                      *(formatter.format(r) for r in caplog.records), str(err.value)])
    basic = base64.b64encode(f"ck-test:{CONSUMER_SECRET}".encode()).decode()
    for secret in (PASSKEY, CONSUMER_SECRET, basic, push["request"]["Password"], "tok-test-0001",
                   "254708000001", "0708000001"):
        assert secret not in text


# --- simulator over real HTTP --------------------------------------------------------------------

class Receiver:
    """The gateway's callback endpoint, reduced to recording what arrives."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.arrived.set()
        return web.json_response({"ResultCode": 0, "ResultDesc": "Accepted"})

    async def wait(self, count: int = 1) -> None:
        async def enough() -> None:
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), 30.0)  # patience for a loaded machine


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/payments/daraja", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield rec, str(server.make_url("/webhooks/payments/daraja"))
    await server.close()


SIM_CREDS = {"consumer_key": "ck-test", "consumer_secret": CONSUMER_SECRET, "passkey": PASSKEY,
             "initiator": "testapi", "security_credential": SECURITY_CREDENTIAL}


async def start_sim(prefix: str = "", **opts: Any) -> tuple[TestServer, web.Application, str]:
    sim = create_simulator(SimulatorOptions(delay=0.05, credentials=SIM_CREDS, **opts))
    app = sim
    if prefix:
        app = web.Application()
        app.add_subapp(prefix, sim)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, sim, str(server.make_url(prefix or "/")).rstrip("/")


async def test_simulator_success_callback_and_query(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim(prefix="/_sim/mpesa")  # mounted like the embedded default
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base))
            accepted = await adapter.request_collection(collection("+254708000001", callback_url=url))
            await rec.wait()
            callback = inbound(None, rec.bodies[0].decode())
            await adapter.verify_callback(callback)
            event = adapter.parse_callback(callback)
            assert event.outcome is ProviderOutcome.SUCCEEDED
            assert event.reference == accepted.provider_transaction_id
            assert event.raw["lookup"] == "provider_transaction_id"
            assert event.amount == Money(15000, "KES")
            assert event.provider_transaction_id  # the M-Pesa receipt, needed for a reversal
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            assert status.outcome is ProviderOutcome.SUCCEEDED

            # A reversal naming the receipt with another amount is refused as Daraja does (R000002): the
            # simulator checks what a real reversal is checked for, and the receipt stays reversible.
            receipt = event.provider_transaction_id
            await adapter.request_refund(refund(original_provider_transaction_id=receipt, callback_url=url,
                                                amount=Money(10000, "KES")))
            await rec.wait(2)
            wrong = adapter.parse_callback(inbound(None, rec.bodies[1].decode()))
            assert (wrong.raw["ResultCode"], wrong.outcome) == ("R000002", ProviderOutcome.FAILED)

            # Reversal of that payment: accepted now, reported by the Result callback.
            await adapter.request_refund(refund(original_provider_transaction_id=receipt, callback_url=url))
            await rec.wait(3)
            result = adapter.parse_callback(inbound(None, rec.bodies[2].decode()))
            assert (result.kind, result.outcome) == (EventKind.REFUND, ProviderOutcome.SUCCEEDED)
            assert result.amount == Money(15000, "KES")
            # A second reversal of the same receipt is refused by M-Pesa: "already reversed", which is no
            # failure of the refund (the money went back), nor its success on that word alone.
            await adapter.request_refund(refund(original_provider_transaction_id=receipt, callback_url=url))
            await rec.wait(4)
            again = adapter.parse_callback(inbound(None, rec.bodies[3].decode()))
            assert again.outcome is ProviderOutcome.AMBIGUOUS
            assert "already been reversed" in (again.reason or "")
    finally:
        await server.close()


async def test_simulator_failure(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim()
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base))
            accepted = await adapter.request_collection(collection("+254708000002", callback_url=url))
            await rec.wait()
            event = adapter.parse_callback(inbound(None, rec.bodies[0].decode()))
            assert (event.outcome, event.reason) == (ProviderOutcome.FAILED, "insufficient funds")
            assert event.amount is None
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            assert (status.outcome, status.reason) == (ProviderOutcome.FAILED, "insufficient funds")
    finally:
        await server.close()


async def test_simulator_pending_query(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim()
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base))
            accepted = await adapter.request_collection(collection("+254708000003", callback_url=url))
            await sim[STATE].idle()
            await asyncio.sleep(0.1)
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            assert status.outcome is ProviderOutcome.PENDING
            assert rec.bodies == []
    finally:
        await server.close()


async def test_simulator_duplicate_and_out_of_order_callbacks(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, _sim, base = await start_sim(duplicate_callback=True, out_of_order=True)
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base))
            accepted = await adapter.request_collection(collection("+254708000001", callback_url=url))
            await rec.wait(3)
            events = [adapter.parse_callback(inbound(None, body.decode())) for body in rec.bodies]
            assert events[0].event_id == events[1].event_id  # the core drops the second
            assert events[0].outcome is ProviderOutcome.SUCCEEDED
            assert events[2].outcome is ProviderOutcome.FAILED  # stale 1037 after the success...
            assert events[2].needs_confirmation  # ...which the STK query contradicts:
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            assert status.outcome is ProviderOutcome.SUCCEEDED
    finally:
        await server.close()


async def test_simulator_dropped_callback_is_recovered_by_query(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim(drop_callback=True)
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base))
            accepted = await adapter.request_collection(collection("+254708000001", callback_url=url))
            await sim[STATE].idle()
            assert rec.bodies == []
            status = await adapter.collection_status("ref", accepted.provider_transaction_id, "KES")
            assert status.outcome is ProviderOutcome.SUCCEEDED
    finally:
        await server.close()


async def test_simulator_checks_password_and_credentials() -> None:
    server, _sim, base = await start_sim()
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ProviderError) as err:
                await MpesaAdapter(http, config(base, passkey="wrong")).request_collection(collection())
            assert (err.value.code, err.value.retryable) == ("400.002.02", False)
            assert "Password" in str(err.value)
            with pytest.raises(ProviderError) as err:
                wrong = MpesaAdapter(http, config(base, consumer_secret="wrong"))
                await wrong.request_collection(collection())
            assert err.value.retryable is False
            resp = await http.post(f"{base}/mpesa/stkpush/v1/processrequest", json={},
                                   headers={"Authorization": "Bearer forged"})
            assert resp.status_code == 401
            assert resp.json()["errorCode"] == "404.001.03"
    finally:
        await server.close()


async def test_simulator_validates_fields() -> None:
    server, _sim, base = await start_sim()
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base), clock=lambda: NOW)
            token = await adapter._tokens.get()
            good = fixture("stk_push.json")["request"]
            for field, value in [("AccountReference", "X" * 13), ("TransactionDesc", "Y" * 14),
                                 ("PhoneNumber", "250788000001"), ("Amount", 1.5),
                                 ("TransactionType", "Other"),
                                 # Words Daraja refuses in a URL (the gateway's own path once had "mpesa" in it)
                                 ("CallBackURL", "https://gateway.test/webhooks/payments/mpesa?s=cb"),
                                 ("CallBackURL", "https://pay.example/SAFARICOM/cb"),
                                 ("CallBackURL", "https://gateway.test/cb/M-Pesa")]:
                resp = await http.post(f"{base}/mpesa/stkpush/v1/processrequest", json={**good, field: value},
                                       headers={"Authorization": f"Bearer {token}"})
                assert resp.status_code == 400, field
                assert resp.json()["errorMessage"] == f"Bad Request - Invalid {field}"
    finally:
        await server.close()


async def test_simulator_outage_and_hang() -> None:
    server, sim, base = await start_sim(fail_request_500=True)
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ProviderTimeout):  # a 5xx on the push: ambiguous, ask the status
                await MpesaAdapter(http, config(base)).request_collection(collection())
            assert sim[STATE].options.fail_request_500 and not sim[STORE].stk  # nothing was stored
            sim[STATE].options.fail_request_500 = False
            sim[STATE].options.hang_request = 2.5  # past the read timeout, 2 s as usual: the token fetch has it too
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base, read_timeout="2"))
            with pytest.raises(ProviderTimeout):  # the push may have been taken: ask, never resend
                await adapter.request_collection(collection())
        # Like Safaricom, the simulator took the push before its answer was lost.
        assert [stk.phone for stk in sim[STORE].stk.values()] == ["254708000001"]
    finally:
        await server.close()


async def test_push_timeout_then_approved_callback_names_our_reference(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    server, sim, base = await start_sim(hang_request=2.5)  # past the read timeout, which the token fetch has too
    try:
        async with httpx.AsyncClient() as http:
            adapter = MpesaAdapter(http, config(base, read_timeout="2"))
            request = collection("+254708000001", callback_url=url + "?secret=s")
            with pytest.raises(ProviderTimeout):
                await adapter.request_collection(request)
            await rec.wait()  # the payer approved although our side never heard the answer
            [stk] = sim[STORE].stk.values()
            assert stk.callback_url == f"{url}?secret=s&ref={request.provider_reference}"
            event = adapter.parse_callback(inbound(None, rec.bodies[0].decode(),
                                                   query={"ref": request.provider_reference}))
            assert (event.outcome, event.reference) == (ProviderOutcome.SUCCEEDED, stk.checkout)
            assert event.raw["provider_reference"] == request.provider_reference
            assert event.provider_transaction_id == stk.receipt
            # Nothing else may pass for our reference.
            other = adapter.parse_callback(inbound(None, rec.bodies[0].decode(), query={"ref": "x" * 65}))
            assert "provider_reference" not in other.raw
    finally:
        await server.close()
