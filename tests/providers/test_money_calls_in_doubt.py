"""Answers to a call that moves money which do not say it failed are never read as a refusal.

Airtel's response codes DP00800001000 ("ambiguous: do the transaction enquiry"), DP00800001006 ("in process") and
DP00800001024 ("timed out") leave a collection to its status enquiry, whatever the success flag; its definite codes
(not enough balance, refused...) fail it. A 2xx other than the documented one (MTN's 200 or 201 for its 202, Airtel's
201, an IremboPay push's 202, Daraja's 201) means the provider took the request: settled by the status path, never
failed, never sent twice. After a 401, a caller drops the shared access token only while it is still the one the 401
answered: a fresh one another caller fetched meanwhile is kept. The Airtel simulator refuses a refund with a definite
code, not ESB000045 (which the status enquiry reads as "no such transaction")."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.config import ProviderConfig, Secret
from core.models import OutboxJob, Payment
from core.money import Money
from core.payments import NewPayment, create_payment
from core.phone import Phone
from core.ports import CollectionAccepted, CollectionRequest, ProviderError, ProviderTimeout, RefundRequest
from providers.airtel.adapter import IN_DOUBT, NOT_FOUND_CODE, AirtelAdapter
from providers.airtel.simulator import create_simulator as airtel_simulator
from providers.irembopay.adapter import IremboPayAdapter
from providers.mpesa import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.simulation import SimulatorOptions
from tests.conftest import drain
from tests.providers.conftest import FakeProvider, load
from tests.providers.wires import ADMIN, MPESA_CREDS, Routes, due_now, mtn_adapter, mtn_payment, mtn_wire

AIRTEL_BASE = "https://airtel.test"
MTN_BASE = "https://mtn.test"
MPESA_BASE = "https://mpesa.test"
IREMBO_BASE = "https://irembo.test"
REF = "3f0c8a52-6a8e-4c1e-9d0b-2b7f5b1e9a01"
AIRTEL_CREDS = {"client_id": "airtel-client-4411", "client_secret": "airtel-secret-7f7f"}
MTN_CREDS = {"api_user": "mtn-user-id", "api_key": "mtn-api-key-8f2a", "subscription_key": "mtn-sub-collection-77",
             "disbursement_subscription_key": "mtn-sub-disbursement-55"}
COLLECT = "/merchant/v1/payments/"
REFUND = "/standard/v1/payments/refund"


def airtel_config(base: str = AIRTEL_BASE) -> ProviderConfig:
    return ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in AIRTEL_CREDS.items()},
                          options={"country": "RW", "currency": "RWF"})


def mtn_config() -> ProviderConfig:
    return ProviderConfig(base_url=MTN_BASE, credentials={k: Secret(v) for k, v in MTN_CREDS.items()},
                          options={"target_environment": "mtnrwanda"})


def mpesa_config() -> ProviderConfig:
    return ProviderConfig(base_url=MPESA_BASE, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
                          options={"shortcode": "174379"})


def airtel_answer(response_code: str, message: str, result_code: str = "ESB000001") -> dict[str, Any]:
    return {"data": {}, "status": {"code": "200", "message": message, "result_code": result_code,
                                   "response_code": response_code, "success": False}}


def collection(payer: str = "+250733000001") -> CollectionRequest:
    return CollectionRequest(provider_reference=REF, payment_reference="PAY_8K2M4Q", amount=Money(15000, "RWF"),
                             payer=Phone(payer), payer_account=payer, description="Rent November 2026",
                             callback_url="", method="MOBILE_MONEY_AIRTEL")


def refund(full: bool = True) -> RefundRequest:
    return RefundRequest(provider_reference="9b1d6e33-0c4f-4e7a-8f55-6d2a1c3b4e02", original_provider_reference=REF,
                         original_provider_transaction_id="MP210603.1234.A12345", amount=Money(15000, "RWF"),
                         full=full, payer=Phone("+250733000001"), reason="Overpaid", callback_url="")


# --- 1. Airtel's response codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["DP00800001000", "DP00800001006", "DP00800001024"])
async def test_airtel_collection_in_doubt_is_left_to_the_status_enquiry(code: str) -> None:
    fake = FakeProvider(AIRTEL_BASE)
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("POST", COLLECT, 200, airtel_answer(code, "Transaction is still processing"))
    async with fake.client() as http:
        with pytest.raises(ProviderTimeout, match="ask the status, do not send again"):
            await AirtelAdapter(http, airtel_config()).request_collection(collection())
    fake.assert_done()


@pytest.mark.parametrize(("code", "words"), [("DP00800001007", "Not enough balance"),
                                             ("DP00800001008", "Refused")])
async def test_airtel_collection_definitely_refused_fails(code: str, words: str) -> None:
    fake = FakeProvider(AIRTEL_BASE)
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("POST", COLLECT, 200, airtel_answer(code, words, "ESB000011"))
    async with fake.client() as http:
        with pytest.raises(ProviderError, match=words) as err:
            await AirtelAdapter(http, airtel_config()).request_collection(collection())
    assert not isinstance(err.value, ProviderTimeout) and err.value.retryable is False


async def test_airtel_refund_in_doubt_is_not_failed() -> None:
    fake = FakeProvider(AIRTEL_BASE)
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("POST", REFUND, 200, airtel_answer("DP00800001000", "Transaction is in ambiguous state"))
    async with fake.client() as http:
        with pytest.raises(ProviderTimeout, match="not sent again"):
            await AirtelAdapter(http, airtel_config()).request_refund(refund())


async def _airtel_payment(rt: Any, demo: dict[str, Any], key: str) -> Payment:
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key=key, channel="api",
            member_id=demo["members"]["+250733000001"]), actor=ADMIN)
    return payment


async def test_airtel_ambiguous_collection_is_completed_by_the_enquiry_not_failed(rt, demo, worker):
    # Airtel answers the USSD push "ambiguous" (success false); the payer approves at her phone all the same.
    wire = (Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
            .on("POST", COLLECT, 200, airtel_answer("DP00800001000", "Transaction is still processing")))
    rt.providers = {**rt.providers, "airtel": AirtelAdapter(wire.client(), airtel_config())}
    payment = await _airtel_payment(rt, demo, "key-airtel-ambiguous-1")
    await worker.run_once()  # the collect job
    async with rt.sessionmaker() as s:
        held = await s.get(Payment, payment.id)
        sms = list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "sms.send"))).scalars())
    assert (held.status, held.failure_reason) == ("PENDING", None)  # not FAILED: the money may move
    assert sms == []
    wire.on("GET", "/standard/v1/payments/*", 200, load("airtel", "status_ts.json"))
    await due_now(rt, "payment.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        done = await s.get(Payment, payment.id)
    assert (done.status, done.provider_transaction_id) == ("COMPLETED", "MP210603.1234.A12345")
    assert len(wire.sent("POST", COLLECT)) == 1  # never sent again


# --- 2. a 2xx other than the documented one ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
async def test_mtn_request_to_pay_and_refund_answered_other_2xx_are_settled_by_status(status: int) -> None:
    fake = FakeProvider(MTN_BASE)
    fake.expect("POST", "/collection/token/", 200, load("mtn_momo", "token.json"))
    fake.expect("POST", "/disbursement/token/", 200, load("mtn_momo", "token.json"))
    fake.expect("POST", "/collection/v1_0/requesttopay", status)
    fake.expect("POST", "/disbursement/v1_0/refund", status, {})
    async with fake.client() as http:
        adapter = MtnMomoAdapter(http, mtn_config())
        with pytest.raises(ProviderTimeout, match=f"HTTP {status}"):
            await adapter.request_collection(collection("+250788000001"))
        with pytest.raises(ProviderTimeout, match=f"HTTP {status}"):
            await adapter.request_refund(refund(full=False))
    fake.assert_done()


@pytest.mark.parametrize(("status", "body"), [(201, None), (202, {"status": {"success": False}}),
                                              (201, airtel_answer("DP00800001008", "Refused"))])
async def test_airtel_collection_and_refund_answered_other_2xx_are_settled_by_status(status: int, body: Any) -> None:
    fake = FakeProvider(AIRTEL_BASE)
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("POST", COLLECT, status, body)
    fake.expect("POST", REFUND, status, body)
    async with fake.client() as http:
        adapter = AirtelAdapter(http, airtel_config())
        with pytest.raises(ProviderTimeout):
            await adapter.request_collection(collection())
        with pytest.raises(ProviderTimeout):
            await adapter.request_refund(refund())
    fake.assert_done()


async def test_airtel_collection_accepted_with_201_is_accepted() -> None:
    fake = FakeProvider(AIRTEL_BASE)
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("POST", COLLECT, 201, load("airtel", "collection_accepted.json"))
    async with fake.client() as http:
        assert await AirtelAdapter(http, airtel_config()).request_collection(collection()) == CollectionAccepted()


async def test_mtn_request_to_pay_answered_201_is_completed_by_status_not_failed(rt, demo, worker):
    wire = mtn_wire().on("POST", "/collection/v1_0/requesttopay", 201)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, "key-mtn-201-1"), actor=ADMIN)
    await worker.run_once()  # the collect job
    async with rt.sessionmaker() as s:
        held = await s.get(Payment, payment.id)
    assert (held.status, held.failure_reason) == ("PENDING", None)
    successful = {**load("mtn_momo", "callback_successful.json"), "externalId": payment.provider_reference}
    wire.on("GET", "/collection/v1_0/requesttopay/*", 200, successful)
    await due_now(rt, "payment.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "COMPLETED"
    assert len(wire.sent("POST", "/collection/v1_0/requesttopay")) == 1


async def _irembopay_push(status: int, answer: dict[str, Any]) -> Any:
    """An IremboPay collection whose invoice is made and whose push is answered `status` with `answer`: what
    request_collection returns, or the exception it raised."""
    invoice = {"success": True, "data": {"invoiceNumber": "880000000001", "paymentStatus": "NEW", "amount": 15000,
                                         "currency": "RWF"}}
    fake = FakeProvider(IREMBO_BASE)
    fake.expect("POST", "/payments/invoices", 201, invoice)
    fake.expect("POST", "/payments/transactions/initiate", status, answer)
    request = CollectionRequest(provider_reference=REF, payment_reference="PAY_8K2M4Q", amount=Money(15000, "RWF"),
                                payer=Phone("+250788000001"), payer_account="+250788000001", description="Rent",
                                callback_url="", method="MOBILE_MONEY_MTN")
    async with fake.client() as http:
        adapter = IremboPayAdapter(http, ProviderConfig(
            base_url=IREMBO_BASE, credentials={"secret_key": Secret("irembo-test-key")},
            options={"payment_account": "PI-1", "payment_item_code": "PC-1"}))
        try:
            result: Any = await adapter.request_collection(request)
        except Exception as exc:  # the caller asserts which
            result = exc
    fake.assert_done()
    return result


async def test_irembopay_push_answered_202_is_accepted_not_failed() -> None:
    accepted = await _irembopay_push(202, {"success": True, "message": "Payment initiated"})
    assert accepted.provider_transaction_id == "880000000001"


async def test_irembopay_push_answered_2xx_without_a_known_code_is_settled_by_status() -> None:
    err = await _irembopay_push(200, {"success": False, "message": "Processing"})
    assert isinstance(err, ProviderTimeout), err
    assert err.provider_transaction_id == "880000000001"


async def test_mpesa_stk_push_answered_201_is_not_failed() -> None:
    accepted = next(c for c in load("mpesa", "stk_push.json")["cases"] if c["name"] == "accepted")["json"]
    fake = FakeProvider(MPESA_BASE)
    fake.expect("GET", "/oauth/v1/generate", 200, {"access_token": "tok-test-0001", "expires_in": "3599"})
    fake.expect("POST", "/mpesa/stkpush/v1/processrequest", 201, accepted)
    fake.expect("POST", "/mpesa/stkpush/v1/processrequest", 202, {"ResponseCode": "1", "errorMessage": "?"})
    request = CollectionRequest(provider_reference=REF, payment_reference="PAY_20261122_001",
                                amount=Money(15000, "KES"), payer=Phone("+254708000001"),
                                payer_account="+254708000001", description="Monthly rent",
                                callback_url="https://gateway.test/webhooks/payments/mpesa?s=cb", method="MPESA")
    async with fake.client() as http:
        adapter = MpesaAdapter(http, mpesa_config())
        result = await adapter.request_collection(request)
        assert result.provider_transaction_id == accepted["CheckoutRequestID"]
        with pytest.raises(ProviderTimeout):
            await adapter.request_collection(request)
    fake.assert_done()


# --- 3. a 401 drops only the token it answered ---------------------------------------------------------------------


class RevokingWire:
    """Tokens tok-1, tok-2...; once `revoked`, tok-1 is answered 401 (the first soon, the others later, after the
    first caller's fresh token has arrived); any other token is answered `ok`."""

    def __init__(self, token_path: str, token_answer: Callable[[str], Any], ok: Any) -> None:
        self.token_path, self.token_answer, self.ok = token_path, token_answer, ok
        self.fetches = 0
        self.refused = 0
        self.revoked = False

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == self.token_path:
            self.fetches += 1
            return httpx.Response(200, json=self.token_answer(f"tok-{self.fetches}"))
        if self.revoked and request.headers["Authorization"] == "Bearer tok-1":
            self.refused += 1
            # Every caller has sent with tok-1 before the first 401; the others come after its fresh token.
            await asyncio.sleep(0.01 if self.refused == 1 else 0.1)
            return httpx.Response(401, json={"error": "invalid_token"})
        return httpx.Response(200, json=self.ok)


async def _race(wire: RevokingWire, make: Callable[[httpx.AsyncClient], Any],
                call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(wire.handle)) as http:
        adapter = make(http)
        await adapter.prepare("collect")  # tok-1 cached
        wire.revoked = True
        results = await asyncio.gather(*(call(adapter) for _ in range(5)))
    return results


async def test_airtel_401s_to_one_revoked_token_fetch_one_fresh_token() -> None:
    wire = RevokingWire("/auth/oauth2/token", lambda t: {"access_token": t, "expires_in": "180"},
                        load("airtel", "status_tip.json"))
    results = await _race(wire, lambda http: AirtelAdapter(http, airtel_config()),
                          lambda a: a.collection_status(REF, None, "RWF"))
    assert len(results) == 5 and wire.refused == 5
    assert wire.fetches == 2  # tok-1, then one fresh token for all five callers


async def test_mtn_401s_to_one_revoked_token_fetch_one_fresh_token() -> None:
    wire = RevokingWire("/collection/token/", lambda t: {"access_token": t, "expires_in": 3600},
                        load("mtn_momo", "status_pending.json"))
    results = await _race(wire, lambda http: MtnMomoAdapter(http, mtn_config()),
                          lambda a: a.collection_status(REF, None, "RWF"))
    assert len(results) == 5 and wire.refused == 5
    assert wire.fetches == 2


async def test_mpesa_401s_to_one_revoked_token_fetch_one_fresh_token() -> None:
    pending = {"errorCode": "500.001.1001", "errorMessage": "The transaction is being processed"}
    wire = RevokingWire("/oauth/v1/generate", lambda t: {"access_token": t, "expires_in": "3599"}, pending)
    results = await _race(wire, lambda http: MpesaAdapter(http, mpesa_config()),
                          lambda a: a.collection_status(REF, "ws_CO_22112026080000123456789012", "KES"))
    assert len(results) == 5 and wire.refused == 5
    assert wire.fetches == 2


# --- 4. the Airtel simulator's refund refusal --------------------------------------------------------------------


async def test_airtel_simulator_refuses_a_second_refund_definitely_not_as_no_such_transaction(aiohttp_server, receiver):
    _recv, url = receiver
    app = airtel_simulator(SimulatorOptions(delay=0.02, credentials=AIRTEL_CREDS, callback_url=f"{url}/airtel"))
    server = await aiohttp_server(app, host="127.0.0.1")
    async with httpx.AsyncClient() as http:
        adapter = AirtelAdapter(http, airtel_config(str(server.make_url("")).rstrip("/")))
        await adapter.request_collection(collection())  # +250733000001: the payer approves
        for _ in range(250):
            status = await adapter.collection_status(REF, None, "RWF")
            if status.provider_transaction_id:
                break
            await asyncio.sleep(0.02)
        request = dataclasses.replace(refund(), original_provider_transaction_id=status.provider_transaction_id)
        await adapter.request_refund(request)
        token = await adapter._tokens.get()
        again = (await http.post(str(server.make_url(REFUND)), json={
            "transaction": {"airtel_money_id": status.provider_transaction_id}},
            headers={"Authorization": f"Bearer {token}", "X-Country": "RW", "X-Currency": "RWF"})).json()
        with pytest.raises(ProviderError, match="not eligible") as err:
            await adapter.request_refund(request)
    # Not Airtel's "no transaction found" (the status enquiry's never-sent), nor its "ambiguous".
    assert again["status"]["result_code"] != NOT_FOUND_CODE
    assert again["status"]["response_code"] not in IN_DOUBT
    assert not isinstance(err.value, ProviderTimeout) and err.value.retryable is False
