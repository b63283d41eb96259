"""A request that could not be made never left: providers.calls.send raises it as a retryable NOT_SENT, counted in
gateway_provider_errors_total, not timed as a call, and not in the provider's health (its outage line, its last
error): the provider did nothing. Before, httpx's exception while making the request (a credential a header cannot
carry) came out raw, timed as a call and in no error count, and a URL whose scheme httpx refuses was labelled a
provider that did not answer in time, a collection's ProviderTimeout ("ask the status, do not send again") and a
TIMEOUT on the ops page. A failure once the request was handed to the transport is still in doubt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.config import ProviderConfig, Secret
from core.metrics import REGISTRY
from core.ports import NOT_SENT, ProviderError, ProviderTimeout, watch_departures
from providers import calls
from providers.irembopay import IremboPayAdapter
from tests.providers.test_irembopay import collection
from tests.providers.wires import Routes

IREMBO = "https://irembo.test"


def _count(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def _errors(provider: str, operation: str) -> float:
    return _count("gateway_provider_errors_total", provider=provider, operation=operation)


def _timed(provider: str, operation: str) -> float:
    return _count("gateway_provider_call_seconds_count", provider=provider, operation=operation)


async def test_a_credential_a_header_cannot_carry_sends_nothing_and_says_so() -> None:
    """IremboPay's secret key pasted with a typographic quote: nothing checks it before its first request, whose
    header cannot carry it. Nothing reaches the wire (a request would fail the test), and the collection is a
    retryable NOT_SENT, not httpx's UnicodeEncodeError."""
    wire = Routes(IREMBO)  # answers nothing: any request fails the test
    adapter = IremboPayAdapter(wire.client(), ProviderConfig(
        base_url=IREMBO, credentials={"secret_key": Secret("sk_live_8f2a\u2019c1")},
        options={"payment_account": "PI-test", "payment_item_code": "PC-test"}))
    errors, timed = _errors("irembopay", "invoice"), _timed("irembopay", "invoice")
    with pytest.raises(ProviderError) as err:
        await adapter.request_collection(collection())
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert str(err.value) == ("IremboPay invoice: the request could not be made (UnicodeEncodeError); nothing was "
                              "sent, sent later")
    assert "sk_live" not in str(err.value)
    assert wire.seen == []
    assert _errors("irembopay", "invoice") == errors + 1
    assert _timed("irembopay", "invoice") == timed  # no call was made: none timed
    assert calls.health_view() == {}  # the provider did nothing wrong: no failure, no outage counted


async def test_a_url_httpx_refuses_before_connecting_is_not_a_provider_that_did_not_answer() -> None:
    """A scheme httpx has no transport for is refused before a connection is looked for. Before: caught with the
    transport errors as "no answer in time", a ProviderTimeout for a request that creates (asked about, never sent
    again) and TIMEOUT in the provider's health."""
    async with httpx.AsyncClient() as http:
        with pytest.raises(ProviderError) as err:
            await calls.send(http, provider="mtn_momo", operation="request_to_pay", method="POST",
                             url="ftp://127.0.0.1:9/collection/v1_0/requesttopay", timeouts=httpx.Timeout(1.0),
                             creates=True, json={"amount": "100"})
    assert not isinstance(err.value, ProviderTimeout)
    assert (err.value.code, err.value.retryable) == (NOT_SENT, True)
    assert "UnsupportedProtocol" in str(err.value)
    assert calls.health_view() == {}


@pytest.mark.parametrize("fault", [httpx.ReadError("connection reset by peer"),
                                   httpx.RemoteProtocolError("server disconnected without a response"),
                                   httpx.ReadTimeout("no answer")])
async def test_a_failure_once_the_request_was_handed_over_stays_in_doubt(fault: Exception) -> None:
    """What fails after the request left (a reset connection, no answer) is still a request that may have arrived:
    ProviderTimeout for one that creates, and the watch (core.jobs) counts it gone."""
    async def fails(_request: httpx.Request) -> httpx.Response:
        raise fault

    wire = Routes("https://mtn.test").on("POST", "/collection/v1_0/requesttopay", fails)
    with watch_departures() as watch:
        with pytest.raises(ProviderTimeout):
            await calls.send(wire.client(), provider="mtn_momo", operation="request_to_pay", method="POST",
                             url="https://mtn.test/collection/v1_0/requesttopay", timeouts=httpx.Timeout(1.0),
                             creates=True, json={"amount": "100"})
    assert watch.left and len(wire.seen) == 1
    assert calls.health_view()["mtn_momo"]["lastError"] == "TIMEOUT"


async def test_only_a_request_that_creates_counts_as_gone() -> None:
    """A status query or a token request moves no money: handed over, it leaves the watch as it was."""
    wire = Routes("https://mtn.test").on("GET", "/collection/v1_0/requesttopay/*", 200, {"status": "PENDING"})
    any_call: dict[str, Any] = {"method": "GET", "url": "https://mtn.test/collection/v1_0/requesttopay/abc",
                                "timeouts": httpx.Timeout(1.0), "provider": "mtn_momo"}
    with watch_departures() as watch:
        await calls.send(wire.client(), operation="request_to_pay_status", creates=False, **any_call)
        assert not watch.left
        await calls.send(wire.client(), operation="request_to_pay_status", creates=True, **any_call)
        assert watch.left
