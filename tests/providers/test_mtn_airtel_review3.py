"""Airtel: a status enquiry answered 200 with success false and no transaction is "not found" only with Airtel's
explicit code (ESB000045) or a 404; any other (ESB000001 "Something went wrong") is an unknown status, asked
again, never a payment ended "nothing was taken". MTN: payerMessage / payeeNote carry only characters MTN takes
(it is reported to refuse '&' and to answer 500 to an empty note), falling back to our payment reference."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.models import OutboxJob, Payment
from core.money import Money
from core.payments import NewPayment, create_payment
from core.phone import Phone
from core.ports import CollectionAccepted, CollectionRequest, ProviderError, ProviderOutcome, RefundRequest
from providers.airtel.adapter import AirtelAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.conftest import drain
from tests.providers.conftest import FakeProvider, load
from tests.providers.wires import ADMIN, Routes, due_now, mtn_adapter, mtn_payment, mtn_wire

AIRTEL_BASE = "https://airtel.test"
MTN_BASE = "https://mtn.test"
REF = "3f0c8a52-6a8e-4c1e-9d0b-2b7f5b1e9a01"
AIRTEL_CREDS = {"client_id": "airtel-client-4411", "client_secret": "airtel-secret-7f7f",
                "callback_key": "airtel-callback-key-9d1e"}
MTN_CREDS = {"api_user": "mtn-user-id", "api_key": "mtn-api-key-8f2a", "subscription_key": "mtn-sub-collection-77",
             "disbursement_api_user": "mtn-dis-user", "disbursement_api_key": "mtn-dis-key-3c1d",
             "disbursement_subscription_key": "mtn-sub-disbursement-55"}
# A transient Airtel failure, answered 200 with success false and no transaction.
SOMETHING_WENT_WRONG = {"data": {}, "status": {"code": "500", "message": "Something went wrong",
                                               "result_code": "ESB000001", "response_code": "DP00800001000",
                                               "success": False}}
NO_SUCH_TRANSACTION = {"data": {}, "status": {"code": "200", "message": "No transaction found with provided "
                                              "transaction id", "result_code": "ESB000045",
                                              "response_code": "DP00800001000", "success": False}}
STATUS_PATH = f"/standard/v1/payments/{REF}"
OTHER = "8c1f2d9e-0000-4000-8000-00000000000"  # + one digit: references of requests sent by hand


def airtel_config(base: str = AIRTEL_BASE) -> ProviderConfig:
    return ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in AIRTEL_CREDS.items()},
                          options={"country": "RW", "currency": "RWF"})


def mtn_config(base: str = MTN_BASE) -> ProviderConfig:
    return ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in MTN_CREDS.items()},
                          options={"target_environment": "mtnrwanda"})


def collection(description: str, ref: str = REF) -> CollectionRequest:
    return CollectionRequest(provider_reference=ref, payment_reference="PAY_8K2M4Q", amount=Money(15000, "RWF"),
                             payer=Phone("+250788000001"), payer_account="+250788000001", description=description,
                             callback_url="", method="MOBILE_MONEY_MTN")


def refund(note: str, ref: str = "9b1d6e33-0c4f-4e7a-8f55-6d2a1c3b4e02") -> RefundRequest:
    return RefundRequest(provider_reference=ref, original_provider_reference=REF,
                         original_provider_transaction_id="1843215792", amount=Money(5000, "RWF"), full=False,
                         payer=Phone("+250788000001"), reason="internal: charged twice", callback_url="", note=note)


@pytest.fixture
async def fake() -> Any:
    provider = FakeProvider(AIRTEL_BASE)
    yield provider
    provider.assert_done()


# --- Airtel: what "not found" is ----------------------------------------------------------------------


async def test_airtel_error_answered_200_is_an_unknown_status_not_not_found(fake: FakeProvider) -> None:
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("GET", STATUS_PATH, 200, SOMETHING_WENT_WRONG)
    async with fake.client() as http:
        with pytest.raises(ProviderError) as err:
            await AirtelAdapter(http, airtel_config()).collection_status(REF, None, "RWF")
    assert (err.value.code, err.value.retryable) == ("ESB000001", True)
    assert "Something went wrong" in str(err.value)


@pytest.mark.parametrize(("http_status", "body"), [(200, NO_SUCH_TRANSACTION), (404, NO_SUCH_TRANSACTION),
                                                   (404, load("airtel", "status_not_found.json"))])
async def test_airtel_explicit_not_found_is_not_found(fake: FakeProvider, http_status: int, body: Any) -> None:
    fake.expect("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
    fake.expect("GET", STATUS_PATH, http_status, body)
    async with fake.client() as http:
        with pytest.raises(ProviderError) as err:
            await AirtelAdapter(http, airtel_config()).collection_status(REF, None, "RWF")
    assert err.value.code == "NOT_FOUND"


async def test_airtel_error_at_the_window_end_keeps_a_payment_airtel_may_have_charged_open(rt, demo, worker):
    # The collection reaches Airtel (the PIN prompt is shown) but its answer is lost: PENDING, asked, never resent.
    def lost(_request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("answer lost")

    wire = (Routes(AIRTEL_BASE).on("POST", "/auth/oauth2/token", 200, load("airtel", "token.json"))
            .on("POST", "/merchant/v1/payments/", lost)
            .on("GET", "/standard/v1/payments/*", 200, SOMETHING_WENT_WRONG))
    rt.providers = {**rt.providers, "airtel": AirtelAdapter(wire.client(), airtel_config())}
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            method="MOBILE_MONEY_AIRTEL", account="0733000001", idempotency_key="key-airtel-esb1-01",
            channel="api", member_id=demo["members"]["+250733000001"]), actor=ADMIN)
    await worker.run_once()  # the collect job: unanswered
    async with rt.sessionmaker.begin() as s:
        assert (await s.get(Payment, payment.id)).status == "PENDING"
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            expires_at=utcnow() - timedelta(seconds=1)))
    # The payer approved (Airtel took the money, its callback lost); at the window's end Airtel's enquiry fails.
    await due_now(rt, "payment.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        held = await s.get(Payment, payment.id)
        poll = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll"))).scalar_one()
        sms = list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "sms.send"))).scalars())
    assert (held.status, held.failure_reason) == ("PENDING", None)  # not FAILED "provider unreachable"
    assert sms == []
    assert poll.status == "PENDING" and "outcome unknown after the approval window" in poll.last_error
    assert "Something went wrong" in poll.last_error
    assert len(wire.sent("POST", "/merchant/v1/payments/")) == 1  # never sent again
    # Airtel answers again: the money was taken.
    wire.on("GET", "/standard/v1/payments/*", 200, load("airtel", "status_ts.json"))
    await due_now(rt, "payment.poll")
    await drain(worker)
    async with rt.sessionmaker() as s:
        done = await s.get(Payment, payment.id)
    assert (done.status, done.late, done.provider_transaction_id) == ("COMPLETED", False, "MP210603.1234.A12345")


# --- MTN: the notes it takes ------------------------------------------------------------------------


def _sent(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content)


@pytest.mark.parametrize(("description", "payer_message"), [
    ("Rent & water <Nov>", "Rent water Nov"),
    ("Réparation du toit, lot 4/B", "Reparation du toit, lot 4/B"),
    ("&&& <>", "PAY_8K2M4Q"),  # nothing left: our payment reference
    ("   ", "PAY_8K2M4Q"),
    ("a" * 150 + " & " + "b" * 20, "a" * 150 + " " + "b" * 9),  # still at most 160 characters
])
async def test_mtn_request_to_pay_notes_keep_only_what_mtn_takes(description: str, payer_message: str) -> None:
    provider = FakeProvider(MTN_BASE)
    provider.expect("POST", "/collection/token/", 200, load("mtn_momo", "token.json"))
    provider.expect("POST", "/collection/v1_0/requesttopay", 202)
    async with provider.client() as http:
        assert await MtnMomoAdapter(http, mtn_config()).request_collection(collection(description)) == \
            CollectionAccepted()
    [sent] = provider.requests_to("/collection/v1_0/requesttopay")
    assert (_sent(sent)["payerMessage"], _sent(sent)["payeeNote"]) == (payer_message, "PAY_8K2M4Q")
    assert len(payer_message) <= 160
    provider.assert_done()


@pytest.mark.parametrize(("given", "note"), [("Refund PAY_1 Kigali & Co", "Refund PAY_1 Kigali Co"), ("&", "refund")])
async def test_mtn_refund_notes_keep_only_what_mtn_takes(given: str, note: str) -> None:
    provider = FakeProvider(MTN_BASE)
    provider.expect("POST", "/disbursement/token/", 200, load("mtn_momo", "token.json"))
    provider.expect("POST", "/disbursement/v1_0/refund", 202)
    async with provider.client() as http:
        await MtnMomoAdapter(http, mtn_config()).request_refund(refund(given))
    [sent] = provider.requests_to("/disbursement/v1_0/refund")
    assert (_sent(sent)["payerMessage"], _sent(sent)["payeeNote"]) == (note, note)
    provider.assert_done()


async def test_mtn_collect_job_sends_an_api_description_mtn_takes(rt, demo, worker):
    wire = mtn_wire().on("POST", "/collection/v1_0/requesttopay", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, dataclasses.replace(mtn_payment(demo), description="Rent & water"),
                                          actor=ADMIN)
    await worker.run_once()  # the collect job
    [sent] = wire.sent("POST", "/collection/v1_0/requesttopay")
    assert (_sent(sent)["payerMessage"], _sent(sent)["payeeNote"]) == ("Rent water", payment.reference)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, payment.id)).status == "PROCESSING"


@pytest.fixture
async def mtn_sim(aiohttp_server: Any) -> Any:
    app = create_simulator(SimulatorOptions(delay=0.02, credentials=MTN_CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    async with httpx.AsyncClient() as http:
        yield MtnMomoAdapter(http, mtn_config(base)), app[STATE], base, http


async def test_mtn_simulator_refuses_what_mtn_refuses_and_takes_what_the_adapter_sends(mtn_sim: Any) -> None:
    adapter, state, base, http = mtn_sim
    # Over real HTTP: the description with '&' goes as MTN takes it, and the request stands.
    assert await adapter.request_collection(collection("Rent & water <Nov>")) == CollectionAccepted()
    await state.idle()
    status = await adapter.collection_status(REF, None, "RWF")
    assert status.outcome is ProviderOutcome.SUCCEEDED
    assert (status.raw["payerMessage"], status.raw["payeeNote"]) == ("Rent water Nov", "PAY_8K2M4Q")
    await adapter.request_refund(refund("Overpaid & refunded"))
    # What it refuses, as MTN is reported to: '&' in a note (400), an empty or missing one (500).
    token = await adapter._tokens["collection"].get()
    headers = {"Authorization": f"Bearer {token}", "Ocp-Apim-Subscription-Key": MTN_CREDS["subscription_key"],
               "X-Target-Environment": "mtnrwanda"}
    body = load("mtn_momo", "requesttopay_request.json")
    url = f"{base}/collection/v1_0/requesttopay"
    refused = [("payerMessage", "Rent & water", 400), ("payeeNote", "A&B", 400), ("payerMessage", "", 500),
               ("payeeNote", "  ", 500), ("payerMessage", None, 500)]
    for n, (name, value, code) in enumerate(refused):
        sent = {**body, name: value} if value is not None else {k: v for k, v in body.items() if k != name}
        answer = await http.post(url, json=sent, headers={**headers, "X-Reference-Id": f"{OTHER}{n}"})
        assert answer.status_code == code, (name, value, answer.text)
    assert (await http.post(url, json=body, headers={**headers, "X-Reference-Id": f"{OTHER}9"})).status_code == 202
