"""A request that moves money answered HTTP 200 with a body that is not the provider's answer (an HTML page from a
proxy, a cut-off body, Daraja's "0" without its id): the provider may have taken it, so the payment or the refund is
never failed on it. The request is taken as unanswered (ProviderTimeout): its status settles it, never a resend."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.config import ProviderConfig, Secret
from core.models import OutboxJob
from core.money import Money
from core.phone import Phone, normalize
from core.ports import CollectionRequest, ProviderTimeout, RefundRequest
from providers.airtel.adapter import AirtelAdapter
from providers.mpesa.adapter import MpesaAdapter
from tests.core.test_provider_faults_mpesa import PUSH, _payment
from tests.providers.conftest import Expected, FakeProvider, load
from tests.providers.wires import MPESA_BASE, MPESA_CREDS, mpesa_adapter, mpesa_payment, mpesa_wire

AIRTEL = "https://airtel.test"
REF = "3f0c8a52-6a8e-4c1e-9d0b-2b7f5b1e9a01"
HTML = b"<html><body>502 Bad Gateway</body></html>"
# Daraja's "accepted" without the id the answer exists for.
ACCEPTED_WITHOUT_ID = {"MerchantRequestID": "29115-34620561-1", "ResponseCode": "0",
                       "ResponseDescription": "Success. Request accepted for processing"}


def _raw(status: int, content: bytes) -> Any:
    return lambda _r: httpx.Response(status, content=content, headers={"Content-Type": "text/html"})


def _airtel(http: httpx.AsyncClient) -> AirtelAdapter:
    creds = {"client_id": "airtel-client-4411", "client_secret": "airtel-secret-7f7f"}
    return AirtelAdapter(http, ProviderConfig(base_url=AIRTEL, credentials={k: Secret(v) for k, v in creds.items()},
                                              options={"country": "RW", "currency": "RWF"}))


@pytest.fixture
async def airtel() -> Any:
    provider = FakeProvider(AIRTEL)
    provider.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    yield provider
    provider.assert_done()


@pytest.mark.parametrize("content", [HTML, b"", b'{"data": {"transaction": {"id": "x"', b"[]"])
async def test_airtel_collection_answered_200_unreadable_is_unanswered_not_refused(
        airtel: FakeProvider, content: bytes) -> None:
    airtel.expected.append(Expected("POST", "/merchant/v1/payments/", _raw(200, content)))
    request = CollectionRequest(provider_reference=REF, payment_reference="PAY_8K2M4Q", amount=Money(15000, "RWF"),
                                payer=Phone("+250733000001"), payer_account="+250733000001",
                                description="Rent", callback_url="", method="MOBILE_MONEY_AIRTEL")
    async with airtel.client() as http:
        with pytest.raises(ProviderTimeout):
            await _airtel(http).request_collection(request)


@pytest.mark.parametrize("content", [HTML, b""])
async def test_airtel_refund_answered_200_unreadable_may_have_been_carried_out(
        airtel: FakeProvider, content: bytes) -> None:
    airtel.expected.append(Expected("POST", "/standard/v1/payments/refund", _raw(200, content)))
    request = RefundRequest(provider_reference="9b1d6e33-0c4f-4e7a-8f55-6d2a1c3b4e02", original_provider_reference=REF,
                            original_provider_transaction_id="MP210603.1234.A12345", amount=Money(15000, "RWF"),
                            full=True, payer=Phone("+250733000001"), reason="Overpaid", callback_url="")
    async with airtel.client() as http:
        with pytest.raises(ProviderTimeout):  # never FAILED (the member paid back twice), never sent again
            await _airtel(http).request_refund(request)


def _mpesa_wire(answer: Any) -> tuple[list[httpx.Request], httpx.AsyncClient]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/oauth/v1/generate":
            return httpx.Response(200, json={"access_token": "tok-test-0001", "expires_in": "3599"})
        return answer(request)

    return seen, httpx.AsyncClient(transport=httpx.MockTransport(handle))


@pytest.mark.parametrize("answer", [_raw(200, HTML), lambda _r: httpx.Response(200, json=ACCEPTED_WITHOUT_ID)],
                         ids=["html", "accepted_without_conversation_id"])
async def test_mpesa_reversal_answered_200_unreadable_waits_for_its_result(answer: Any) -> None:
    seen, http = _mpesa_wire(answer)
    config = ProviderConfig(base_url=MPESA_BASE, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
                            options={"shortcode": "174379"})
    request = RefundRequest(provider_reference="7c2d", original_provider_reference="5b0c",
                            original_provider_transaction_id="SKL3ABC123", amount=Money(15000, "KES"), full=True,
                            payer=normalize("+254708000001"), reason="paid twice",
                            callback_url="https://gateway.test/webhooks/payments/mpesa", note="Refund PAY_1 Coop")
    async with http:
        with pytest.raises(ProviderTimeout):
            await MpesaAdapter(http, config).request_refund(request)
    assert [r.url.path for r in seen].count("/mpesa/reversal/v1/request") == 1  # never sent again


@pytest.mark.parametrize("answer", [(200, None), (200, ACCEPTED_WITHOUT_ID)], ids=["html", "accepted_without_id"])
async def test_mpesa_push_answered_200_unreadable_is_not_a_failed_payment(rt, demo, worker, answer) -> None:
    status, body = answer
    wire = mpesa_wire().on("POST", PUSH, (lambda _r: httpx.Response(status, content=HTML)) if body is None
                           else status, body)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await worker.run_once()  # the collect job
    held = await _payment(rt, payment.id)
    # The prompt may be on the payer's phone now: not "payment failed" (texted to her), left to the status path.
    assert (held.status, held.failure_reason) == ("PENDING", None)
    assert len(wire.sent("POST", PUSH)) == 1  # never pushed twice
    async with rt.sessionmaker() as s:
        sms = (await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "sms.send"))).scalars().all()
    assert f"sms:payment_failed:{payment.id}" not in sms
