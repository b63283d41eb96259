"""Airtel Money and M-Pesa refusing the gateway's own credentials for a refund (a rotated client secret, a wrong
SecurityCredential), against their simulators over HTTP: the refund waits for the configuration to be fixed, the
member is told nothing, and once fixed the refund is sent (with a neutral note, never the admin's reason)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from core.config import ProviderConfig, Secret
from core.errors import Conflict
from core.metrics import REGISTRY
from core.models import OutboxJob, Refund, SmsMessage
from core.outbox import CALL_SENT, replay_job
from core.payments import create_payment
from core.refunds import cancel_refund, request_refund
from providers.airtel.adapter import AirtelAdapter
from providers.airtel.simulator import create_simulator as airtel_simulator
from providers.mpesa.adapter import MpesaAdapter
from providers.mpesa.simulator import create_simulator as mpesa_simulator
from providers.simulation import SimulatorOptions
from tests.conftest import drain
from tests.providers.test_airtel import CREDS as AIRTEL_CREDS
from tests.providers.wires import ADMIN, MPESA_CREDS, completed, due_now, mpesa_payment, mtn_payment

REASON = "member flagged for fraud review"  # internal wording the member must never see


class Recorder:
    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.sent.append(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.sent if r.method == "POST" and r.url.path == path]


async def _refund(rt: Any, demo: dict[str, Any], payment_id: str) -> str:
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment_id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason=REASON, idempotency_key="refund-creds-1", actor=ADMIN)
        return refund.id


async def _waits(rt: Any, worker: Any, refund_id: str, provider: str) -> OutboxJob:
    """Every attempt of the refund's submission run: the refund still PENDING, its job parked, the member told
    nothing, the operator told."""
    for _ in range(10):
        await due_now(rt, "refund.submit")
        await drain(worker)
    async with rt.sessionmaker() as s:
        refund = await s.get(Refund, refund_id)
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))).scalar_one()
        texts = (await s.execute(select(SmsMessage.body).where(SmsMessage.template.startswith("refund_")))).all()
    assert refund.status == "PENDING", (refund.status, refund.failure_reason)
    assert job.status == "PARKED" and "credentials" in (job.last_error or ""), (job.status, job.last_error)
    assert not texts
    assert REGISTRY.get_sample_value("gateway_provider_failing", {"provider": provider}) == 1
    return job


async def test_airtel_refund_waits_for_its_credentials(rt, demo, worker, aiohttp_server) -> None:
    server = await aiohttp_server(airtel_simulator(SimulatorOptions(delay=0.01, drop_callback=True,
                                                                    credentials=AIRTEL_CREDS)), host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    recorder = Recorder()

    def airtel(http: httpx.AsyncClient, **creds: str) -> AirtelAdapter:
        return AirtelAdapter(http, ProviderConfig(base_url=base, credentials={
            k: Secret(v) for k, v in {**AIRTEL_CREDS, **creds}.items()}, options={"country": "RW", "currency": "RWF"}))

    async with httpx.AsyncClient(event_hooks={"request": [recorder]}) as http:
        rt.providers = {**rt.providers, "airtel": airtel(http, client_secret="rotated-away")}
        async with rt.sessionmaker.begin() as s:
            new = dataclasses.replace(mtn_payment(demo, key="airtel-creds-1"), method="MOBILE_MONEY_AIRTEL",
                                      account="+250738000001")
            payment, _ = await create_payment(s, rt, new, actor=ADMIN)
        await completed(rt, payment, "AM12345678")
        refund_id = await _refund(rt, demo, payment.id)
        job = await _waits(rt, worker, refund_id, "airtel")
        assert not recorder.bodies("/standard/v1/payments/refund")
        rt.providers = {**rt.providers, "airtel": airtel(http)}  # fixed
        async with rt.sessionmaker.begin() as s:
            await replay_job(s, job.id)
        await drain(worker)
    assert len(recorder.bodies("/standard/v1/payments/refund")) == 1  # sent once fixed


async def test_mpesa_reversal_waits_for_its_security_credential(rt, demo, worker, aiohttp_server) -> None:
    server = await aiohttp_server(mpesa_simulator(SimulatorOptions(delay=0.01, drop_callback=True,
                                                                   credentials=MPESA_CREDS)), host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    recorder = Recorder()

    def mpesa(http: httpx.AsyncClient, **creds: str) -> MpesaAdapter:
        return MpesaAdapter(http, ProviderConfig(base_url=base, credentials={
            k: Secret(v) for k, v in {**MPESA_CREDS, **creds}.items()}, options={"shortcode": "174379"}))

    async with httpx.AsyncClient(event_hooks={"request": [recorder]}) as http:
        rt.providers = {**rt.providers, "mpesa": mpesa(http, security_credential="an-old-one")}
        payment = await mpesa_payment(rt, demo)
        await completed(rt, payment, "SKL3ABC123")
        refund_id = await _refund(rt, demo, payment.id)
        job = await _waits(rt, worker, refund_id, "mpesa")
        rt.providers = {**rt.providers, "mpesa": mpesa(http)}  # fixed
        async with rt.sessionmaker.begin() as s:
            await replay_job(s, job.id)
        await drain(worker)
    async with rt.sessionmaker() as s:
        refund = await s.get(Refund, refund_id)
    assert refund.status == "PROCESSING" and refund.provider_transaction_id, refund.status  # Daraja took it
    remarks = {b["Remarks"] for b in recorder.bodies("/mpesa/reversal/v1/request")}
    assert remarks == {f"Refund {payment.reference.replace('_', ' ')} Kigali Heights Housing Cooperative"}, remarks


async def test_a_refund_parked_for_its_credentials_can_be_withdrawn(rt, demo, worker, aiohttp_server) -> None:
    """Its submission, refused a 401 at every try and parked, sent nothing (the README: PENDING and withdrawable):
    an admin may withdraw it, the member told nothing. It was refused 409 "parked for manual review": its job's
    last_error is the outbox's (`ProviderError: ...`), not the `AWAITING_CONFIGURATION: ` a reversal's Result
    writes."""
    server = await aiohttp_server(airtel_simulator(SimulatorOptions(delay=0.01, drop_callback=True,
                                                                    credentials=AIRTEL_CREDS)), host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    recorder = Recorder()
    async with httpx.AsyncClient(event_hooks={"request": [recorder]}) as http:
        rt.providers = {**rt.providers, "airtel": AirtelAdapter(http, ProviderConfig(base_url=base, credentials={
            k: Secret(v) for k, v in {**AIRTEL_CREDS, "client_secret": "rotated-away"}.items()},
            options={"country": "RW", "currency": "RWF"}))}
        async with rt.sessionmaker.begin() as s:
            new = dataclasses.replace(mtn_payment(demo, key="airtel-creds-2"), method="MOBILE_MONEY_AIRTEL",
                                      account="+250738000002")
            payment, _ = await create_payment(s, rt, new, actor=ADMIN)
        await completed(rt, payment, "AM12345679")
        refund_id = await _refund(rt, demo, payment.id)
        parked = await _waits(rt, worker, refund_id, "airtel")
        # One whose earlier try may have arrived (a 5xx, say: its CALL_SENT is carried on) is not withdrawn.
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(OutboxJob).where(OutboxJob.id == parked.id).values(
                last_error=f"{CALL_SENT}: {parked.last_error}"))
        with pytest.raises(Conflict, match="parked for manual review"):
            async with rt.sessionmaker.begin() as s:
                await cancel_refund(s, rt, refund_id=refund_id, cooperative_id=demo["cooperative_id"],
                                    note="paid back by hand", actor=ADMIN)
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(OutboxJob).where(OutboxJob.id == parked.id).values(last_error=parked.last_error))
        async with rt.sessionmaker.begin() as s:
            withdrawn = await cancel_refund(s, rt, refund_id=refund_id, cooperative_id=demo["cooperative_id"],
                                            note="paid back by hand", actor=ADMIN)
        assert (withdrawn.status, withdrawn.failure_reason) == ("FAILED", "withdrawn by an admin: paid back by hand")
        async with rt.sessionmaker() as s:
            job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}"))
                   ).scalar_one()
            member_sms = (await s.execute(select(OutboxJob.dedupe_key).where(
                OutboxJob.kind == "sms.send", OutboxJob.dedupe_key.like(f"%{refund_id}%")))).scalars().all()
        assert (job.status, job.last_error) == ("DONE", withdrawn.failure_reason)
        assert not member_sms
    assert not recorder.bodies("/standard/v1/payments/refund")
