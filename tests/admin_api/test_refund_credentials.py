"""A provider refusing the gateway's own credentials (a rotated key: HTTP 401 on the token or the call) is our
configuration fault, not the refund's: the refund waits (retried, then parked) and goes through once the
configuration is fixed; the member is told nothing until then. The provider is sent a neutral note, never the
admin's reason. End to end against the simulators over HTTP."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from channels.sms.simulator import SimulatorState
from core.config import ProviderConfig, Secret
from core.metrics import REGISTRY
from core.models import OutboxJob, Payment
from core.outbox import CALL_SENT
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator
from providers.simulation import SimulatorOptions
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.admin_api.test_support_desk_refunds import Mtn, audit, events, settle, sms_of
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.providers.test_mtn_momo import CREDS as SIM_CREDS
from tests.providers.wires import due_now


class Sim(Mtn):
    def __init__(self, app: web.Application, sms: SimulatorState, base: str) -> None:
        super().__init__(app, sms)
        self.base = base
        self.collect_bodies: list[dict[str, Any]] = []

    async def record(self, request: httpx.Request) -> None:
        await super().record(request)
        if request.method == "POST" and request.url.path == "/collection/v1_0/requesttopay":
            self.collect_bodies.append(json.loads(request.content))


def adapter(http: httpx.AsyncClient, base: str, **creds: str) -> MtnMomoAdapter:
    config = ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in {**SIM_CREDS, **creds}.items()},
                            options={"target_environment": "mtnrwanda"})
    return MtnMomoAdapter(http, config)


@contextlib.asynccontextmanager
async def mtn(rt: Any, aiohttp_server: Any) -> AsyncIterator[tuple[Sim, httpx.AsyncClient]]:
    app = create_simulator(SimulatorOptions(delay=0.01, drop_callback=True, credentials=SIM_CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    _sms_server, sms = await start_simulator(aiohttp_server, rt)  # the member's SMS leave (as in Mtn's module)
    sim = Sim(app, sms, str(server.make_url("")).rstrip("/"))
    async with httpx.AsyncClient(event_hooks={"request": [sim.record]}) as http:
        rt.providers = {**rt.providers, "mtn_momo": adapter(http, sim.base)}
        yield sim, http


def failing(provider: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_provider_failing", {"provider": provider})


async def submit_job(rt: Any, refund_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(OutboxJob.kind == "refund.submit",
                                                        OutboxJob.dedupe_key == f"refund:{refund_id}"))).scalar_one()


@pytest.mark.parametrize("rotated", ["disbursement_api_key", "disbursement_subscription_key"])
async def test_refund_refused_our_credentials_waits_and_goes_through_once_fixed(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, caplog: Any,
        rotated: str) -> None:
    async with mtn(rt, aiohttp_server) as (sim, http):
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await settle(rt, worker, sim)
        payment = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
        assert payment["status"] == "COMPLETED", payment
        # The disbursement key was rotated at MTN and not in the gateway's configuration.
        rt.providers = {**rt.providers, "mtn_momo": adapter(http, sim.base, **{rotated: "rotated-away"})}
        with caplog.at_level(logging.WARNING):
            refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                      json={"amount": 10000, "reason": "charged twice", "idempotencyKey": idem()})
            for _ in range(12):  # every attempt of its budget
                await due_now(rt, "refund.submit")
                await drain(worker)
        shown = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
        assert shown["status"] == "PENDING", shown
        job = await submit_job(rt, refund["id"])
        assert job.status == "PARKED" and "credentials" in (job.last_error or ""), job.last_error
        assert not job.last_error.startswith(CALL_SENT)  # refused unprocessed: still a refund never sent
        assert not await sms_of(rt, "refund_")  # the member is told nothing of our fault
        assert not await events(rt, "refund.failed")
        assert failing("mtn_momo") == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("credentials" in e for e in errors), errors
        assert sim.refund_bodies == []  # never taken for a refund sent
        # The configuration is fixed; the operator replays the parked job.
        rt.providers = {**rt.providers, "mtn_momo": adapter(http, sim.base)}
        await admin.json("POST", f"/v1/jobs/{job.id}/replay", 200)
        await settle(rt, worker, sim)
        done = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
        assert done["status"] == "COMPLETED", done
        assert done["reason"] == "charged twice"  # kept in our records
        [sent] = sim.refund_bodies
    assert (sent["payerMessage"], sent["payeeNote"]) == (
        f"Refund {payment['reference']} Kigali Heights Housing Cooperative",) * 2, sent
    texts = [m.body for m in await sms_of(rt, "refund_")]
    assert len(texts) == 1 and texts[0].startswith("Twagusubije 10,000 RWF"), texts
    assert "refund.completed" in await audit(rt, refund["id"])


async def test_collection_refused_our_credentials_fails_fast_as_a_service_problem(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, caplog: Any) -> None:
    """A member waiting on her phone is not kept waiting for a configuration fix: the payment fails at once, she
    is told the service could not be reached (never that she declined), and the operator is told."""
    async with mtn(rt, aiohttp_server) as (sim, http):
        rt.providers = {**rt.providers, "mtn_momo": adapter(http, sim.base, api_key="rotated-away")}
        with caplog.at_level(logging.WARNING):
            made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
            await settle(rt, worker, sim)
        payment = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert payment["status"] == "FAILED", payment
    assert "credentials" in payment["failureReason"], payment
    texts = [m.body for m in await sms_of(rt, "payment_failed")]
    assert texts, texts
    # "mobile money unreachable; nothing was taken", never "you declined"
    assert all("ntiyabonetse" in t and "wanze" not in t for t in texts), texts
    assert failing("mtn_momo") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("credentials" in e for e in errors), errors


async def test_collect_request_names_payment_type_and_cooperative(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """A payment made without a description (as over USSD): the payer's prompt names what it is for and whom, from
    the gateway's own records (a description the cooperative's system gave is its own words, and is sent)."""
    async with mtn(rt, aiohttp_server) as (sim, _http):
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"], description=None)
        await settle(rt, worker, sim)
        [sent] = sim.collect_bodies
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(Payment.description).where(Payment.id == made["id"]))).scalar_one()
    assert stored is None
    assert sent["payerMessage"] == f"Monthly Rent {made['reference']} Kigali Heights Housing Cooperative", sent


