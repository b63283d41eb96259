"""M-Pesa's and IremboPay's calls count for the outage line as providers.calls.send's do: five failed in a row (no
connection, no answer, a 5xx) log one ERROR line and set gateway_provider_failing{provider}; an answer (a 4xx
too) ends it. Before, their adapters sent their own requests and were never counted: an M-Pesa or IremboPay outage
showed no line and no gauge."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from core.config import ProviderConfig, Secret
from core.metrics import REGISTRY
from core.money import Money
from core.phone import normalize
from core.ports import CollectionRequest, ProviderError, ProviderOutcome
from providers.irembopay import IremboPayAdapter
from providers.mpesa import MpesaAdapter
from tests.providers.conftest import FakeProvider

MPESA = "https://sandbox.safaricom.test"
IREMBOPAY = "https://api.irembopay.test"
QUERY = "/mpesa/stkpushquery/v1/query"
INVOICE = "/payments/invoices/880123456789"
# Daraja's word on a request sent as HTTP 500: the query's "still being processed", the push's "a transaction is
# already in process" on the payer's line.
PENDING = {"requestId": "1-2", "errorCode": "500.001.1001", "errorMessage": "The transaction is being processed"}
LOCKED = {"requestId": "1-3", "errorCode": "500.001.1001",
          "errorMessage": "Unable to lock subscriber, a transaction is already in process for the current subscriber"}
# Failures of every kind: (status, body) answered, or an exception the transport raises.
FAILURES: list[tuple[int, Any] | Exception] = [
    (503, {}), httpx.ReadTimeout("hung"), httpx.ConnectError("refused"), (502, None),
    (500, {"errors": [{"code": "INTERNAL_SERVER_ERROR", "detail": "boom"}]}), httpx.ConnectTimeout("no route"),
]


def _failing(provider: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_provider_failing", {"provider": provider})


def _expect(fake: FakeProvider, method: str, path: str, answer: tuple[int, Any] | Exception) -> None:
    if isinstance(answer, Exception):
        fake.expect(method, path, raises=answer)
    else:
        fake.expect(method, path, answer[0], answer[1])


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """What the outage reporting said (providers.calls' logger)."""
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.providers"]


def mpesa(http: httpx.AsyncClient) -> MpesaAdapter:
    secrets = {"consumer_key": "ck-test", "consumer_secret": "cs-test", "passkey": "pk-test", "initiator": "api",
               "security_credential": "cred"}
    return MpesaAdapter(http, ProviderConfig(base_url=MPESA, credentials={k: Secret(v) for k, v in secrets.items()},
                                             options={"shortcode": "174379"}))


def irembopay(http: httpx.AsyncClient) -> IremboPayAdapter:
    return IremboPayAdapter(http, ProviderConfig(base_url=IREMBOPAY, credentials={"secret_key": Secret("s3cret")},
                                                 options={"payment_account": "PI-1", "payment_item_code": "PC-1"}))


async def _calls(fake: FakeProvider, call: Callable[[], Awaitable[Any]], count: int) -> list[Any]:
    """`count` calls, each its outcome (a ProviderError raised is an outcome too)."""
    outcomes: list[Any] = []
    for _ in range(count):
        try:
            outcomes.append(await call())
        except ProviderError as exc:
            outcomes.append(exc)
    return outcomes


async def _outage_then_answer(caplog: pytest.LogCaptureFixture, provider: str, fake: FakeProvider,
                              call: Callable[[], Awaitable[Any]], method: str, path: str,
                              answer: tuple[int, Any]) -> None:
    for failure in FAILURES[:5]:
        _expect(fake, method, path, failure)
    _expect(fake, method, path, answer)
    with caplog.at_level(logging.INFO, logger="gateway.providers"):
        await _calls(fake, call, 4)
        assert _lines(caplog) == [] and _failing(provider) != 1  # four in a row: not yet an outage
        await _calls(fake, call, 1)
        assert _failing(provider) == 1
        [(level, said)] = _lines(caplog)
        assert level == "ERROR" and said.startswith(f"{provider} calls failing since 20")
        await _calls(fake, call, 1)  # the provider answers (a 4xx is its answer too)
        assert _failing(provider) == 0
    assert _lines(caplog)[1:] == [("WARNING", f"{provider} calls succeed again")]
    assert [r.failures_in_a_row for r in caplog.records if r.name == "gateway.providers"] == [5, 5]
    fake.assert_done()


async def test_five_failed_mpesa_calls_in_a_row_are_an_outage_and_an_answer_ends_it(caplog) -> None:
    fake = FakeProvider(MPESA)
    fake.expect("GET", "/oauth/v1/generate", 200, {"access_token": "tok", "expires_in": "3599"})
    async with fake.client() as http:
        adapter = mpesa(http)
        await adapter.prepare("collect")  # the token first: answered

        async def call() -> Any:
            return await adapter.collection_status("ref", "ws_CO_1", "KES")

        await _outage_then_answer(caplog, "mpesa", fake, call, "POST", QUERY,
                                  (400, {"errorCode": "400.002.02", "errorMessage": "Invalid CheckoutRequestID"}))


async def test_daraja_saying_pending_or_busy_with_an_http_500_is_an_answer(caplog) -> None:
    """Daraja answers a query about a payment the payer has not approved yet, and a push to a payer whose line is
    busy, with HTTP 500 and its code 500.001.1001: five of those in a row are payers, not M-Pesa failing."""
    fake = FakeProvider(MPESA)
    fake.expect("GET", "/oauth/v1/generate", 200, {"access_token": "tok", "expires_in": "3599"})
    for failure in FAILURES[:4]:
        _expect(fake, "POST", QUERY, failure)
    fake.expect("POST", "/mpesa/stkpush/v1/processrequest", 500, LOCKED)
    for failure in FAILURES[:4]:
        _expect(fake, "POST", QUERY, failure)
    fake.expect("POST", QUERY, 500, PENDING, times=5)
    async with fake.client() as http:
        adapter = mpesa(http)

        async def query() -> Any:
            return await adapter.collection_status("ref", "ws_CO_1", "KES")

        with caplog.at_level(logging.INFO, logger="gateway.providers"):
            await _calls(fake, query, 4)
            push = CollectionRequest(provider_reference="5b0c1c3e", payment_reference="PAY_20261122_001",
                                     amount=Money(15000, "KES"), payer=normalize("+254708000001"),
                                     payer_account="+254708000001", description="Rent",
                                     callback_url="https://gateway.test/webhooks/payments/mpesa", method="MPESA")
            with pytest.raises(ProviderError, match=r"500\.001\.1001"):
                await adapter.request_collection(push)
            await _calls(fake, query, 4)
            pending = await _calls(fake, query, 5)
    assert [r.outcome for r in pending] == [ProviderOutcome.PENDING] * 5
    assert _lines(caplog) == [] and _failing("mpesa") != 1
    fake.assert_done()


async def test_five_failed_irembopay_calls_in_a_row_are_an_outage_and_an_answer_ends_it(caplog) -> None:
    fake = FakeProvider(IREMBOPAY)
    async with fake.client() as http:
        adapter = irembopay(http)

        async def call() -> Any:
            return await adapter.collection_status("ref", "880123456789", "RWF")

        await _outage_then_answer(caplog, "irembopay", fake, call, "GET", INVOICE,
                                  (404, {"success": False, "errors": [{"code": "INVOICE_NOT_FOUND",
                                                                       "detail": "no invoice with that number"}]}))
