"""A deployment that leaves a provider out of PROVIDERS (here Airtel): its methods are refused by the API and not
offered by USSD, its callback route is not there, and the rows it served before it was left out park with a reason
a person can act on instead of failing in the worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app import assemble, create_app, create_worker
from core.audit import Actor
from core.config import ConfigError, Settings
from core.db import utcnow
from core.members import create_member
from core.models import OutboxJob, Payment, Refund
from core.phone import normalize
from core.state import transition
from core.state.payment import PAYMENT, PaymentStatus
from providers.registry import build_providers, build_routes, mount_simulators
from tests.admin_api.conftest import Caller, bearer, complete_payment, idem, payment_body
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import drain, make_settings

WITHOUT_AIRTEL = "mtn_momo,mpesa,irembopay"
AIRTEL_MEMBER = "+250733000077"


@pytest.fixture
def settings(migrated_database: str) -> Settings:
    return make_settings(PROVIDERS=WITHOUT_AIRTEL)


@pytest.fixture
async def admin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["admin"])


@pytest.fixture
async def before(rt: Any, aiohttp_client: Any, demo: dict[str, Any]) -> AsyncIterator[tuple[Any, Caller]]:
    """The same deployment before Airtel was left out (every provider), on the same database: its runtime and an
    admin of the demo cooperative signed in to it."""
    full = assemble(make_settings(), rt.engine, rt.redis, rt.http)
    client = await aiohttp_client(create_app(full.settings, runtime=full))
    yield full, await bearer(client, *demo["admin"])


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalars())


async def _due_now(rt: Any, kind: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == kind, OutboxJob.status == "PENDING")
                        .values(run_at=utcnow() - timedelta(seconds=1)))


# --- registry ----------------------------------------------------------------------------------------------------


async def test_only_the_used_providers_are_built_and_routed(settings: Settings) -> None:
    async with httpx.AsyncClient() as http:
        providers = build_providers(settings, http)
        assert set(providers) == {"mtn_momo", "mpesa", "irembopay"}
        routes = build_routes(settings, providers, env={})
        assert "MOBILE_MONEY_AIRTEL" not in routes and routes["MOBILE_MONEY_MTN"] == "mtn_momo"
        # A route to a provider left out is a mistake to name, not a route to drop.
        with pytest.raises(ConfigError, match="MOBILE_MONEY_AIRTEL routes to 'airtel', which is not in PROVIDERS"):
            build_routes(settings, providers, env={"PAYMENT_ROUTES": "MOBILE_MONEY_AIRTEL=airtel"})
        # A method whose usual provider is left out may go to another that collects it.
        no_mtn = make_settings(PROVIDERS="airtel,irembopay")
        routed = build_routes(no_mtn, build_providers(no_mtn, http),
                              env={"PAYMENT_ROUTES": "MOBILE_MONEY_MTN=irembopay"})
        assert routed["MOBILE_MONEY_MTN"] == "irembopay" and "MPESA" not in routed


def test_only_the_used_providers_simulators_are_mounted() -> None:
    from aiohttp import web

    app = web.Application()
    mount_simulators(app, make_settings(PROVIDERS="mtn_momo,airtel"))
    mounted = {resource.canonical for resource in app.router.resources()}
    assert mounted == {"/_sim/mtn_momo", "/_sim/airtel"}


# --- the API, USSD and callbacks ---------------------------------------------------------------------------------


async def test_the_api_refuses_a_method_of_a_provider_left_out(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    refused = await admin.json("POST", "/v1/payments", 400, json=payment_body(
        rent, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001"))
    assert (refused["code"], refused["field"]) == ("PAYMENT_METHOD_NOT_AVAILABLE", "paymentMethod")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment))).first() is None
    await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))  # MTN still is


async def test_ussd_offers_no_method_of_a_provider_left_out(client: Any, rt: Any, demo: dict[str, Any]) -> None:
    async with rt.sessionmaker.begin() as s:
        await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="Airtel Member",
                            phone=normalize(AIRTEL_MEMBER), actor=Actor("system", "system"))
    phone = AtPhone(client, AIRTEL_MEMBER)
    await phone.dial()
    await phone.send("1")
    answer = await phone.send("1")
    assert answer == ("END No payment method is available for your number. "
                      "Please contact Kigali Heights Housing Cooperative.")
    mtn = AtPhone(client, "+250788000002")
    await mtn.dial()
    await mtn.send("1")
    assert "MTN" in await mtn.send("1")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment))).first() is None


async def test_the_callback_route_of_a_provider_left_out_is_not_there(client: Any) -> None:
    resp = await client.post("/webhooks/payments/airtel", json={"transaction": {"id": "x", "status_code": "TS"}})
    assert resp.status == 404
    assert (await resp.json())["message"] == "unknown payment provider 'airtel'"


# --- rows of the provider from before it was left out ------------------------------------------------------------


async def test_a_collection_not_sent_yet_fails_and_sends_nothing(rt: Any, before: tuple[Any, Caller],
                                                                demo: dict[str, Any]) -> None:
    _full, old_admin = before
    paid = await old_admin.json("POST", "/v1/payments", 201, json=payment_body(
        demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001"))
    await drain(create_worker(rt))  # the worker of the deployment without Airtel
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
    assert payment is not None and payment.status == PaymentStatus.FAILED.value
    assert payment.failure_reason == ("provider airtel is not in PROVIDERS (this deployment does not use it): the "
                                      "request never reached the provider; nothing was taken")
    [collect] = await _jobs(rt, "payment.collect")
    assert collect.status == "DONE"


async def test_an_open_payment_of_a_provider_left_out_parks_its_poll(rt: Any, before: tuple[Any, Caller],
                                                                     demo: dict[str, Any]) -> None:
    _full, old_admin = before
    paid = await old_admin.json("POST", "/v1/payments", 201, json=payment_body(
        demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001"))
    async with rt.sessionmaker.begin() as s:  # Airtel took the request before it was left out
        await transition(s, PAYMENT, paid["id"], PaymentStatus.PENDING, PaymentStatus.PROCESSING,
                         actor=Actor("system", "worker"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "payment.collect").values(status="DONE"))
    await _due_now(rt, "payment.poll")
    worker = create_worker(rt)
    await drain(worker)
    [poll] = await _jobs(rt, "payment.poll")
    assert poll.status == "PARKED"
    assert poll.last_error == (
        f"payment {paid['reference']}: provider airtel is not in PROVIDERS (this deployment does not use it), so "
        "its status cannot be asked; add airtel back to PROVIDERS (with its variables) and replay this job, or "
        f"check the provider's statement and record its outcome with POST /v1/payments/{paid['id']}/outcome")
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, paid["id"])
    assert payment is not None and payment.status == PaymentStatus.PROCESSING.value  # never guessed
    # The sweep does not queue a poll every few minutes that would only park again.
    from core.jobs import sweep_open_payments

    assert await sweep_open_payments(rt, now=utcnow() + timedelta(hours=1)) == 0
    assert len(await _jobs(rt, "payment.poll")) == 1
    # Cancelled by its cooperative while Airtel held its request: its watch for a late approval parks the same way.
    from core.outbox import enqueue
    from core.provider_events import WATCH_AFTER_CANCEL, WATCH_JOB

    async with rt.sessionmaker.begin() as s:
        await transition(s, PAYMENT, paid["id"], PaymentStatus.PROCESSING, PaymentStatus.CANCELLED,
                         actor=Actor("system", "worker"))
        await enqueue(s, WATCH_JOB, {"payment_id": paid["id"], WATCH_AFTER_CANCEL: "PROCESSING"})
    await drain(worker)
    [watch] = await _jobs(rt, WATCH_JOB)
    assert watch.status == "PARKED" and watch.last_error == poll.last_error


async def test_a_refund_of_a_provider_left_out_is_refused_or_parked(rt: Any, admin: Caller,
                                                                    before: tuple[Any, Caller],
                                                                    demo: dict[str, Any]) -> None:
    _full, old_admin = before
    rent = demo["payment_types"]["Monthly Rent"]
    first, second = [await old_admin.json("POST", "/v1/payments", 201, json=payment_body(
        rent, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001")) for _ in range(2)]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind.in_(("payment.collect", "payment.poll")))
                        .values(status="DONE"))
    for paid in (first, second):
        await complete_payment(rt, paid["id"])
    # Asked before Airtel was left out: its submission is queued, and runs after.
    refund = await old_admin.json("POST", f"/v1/payments/{first['id']}/refunds", 201,
                                  json={"idempotencyKey": idem()})
    await drain(create_worker(rt))
    [submit] = await _jobs(rt, "refund.submit")
    assert submit.status == "PARKED"
    assert submit.last_error == (
        f"AWAITING_CONFIGURATION: refund {refund['reference']}: provider airtel is not in PROVIDERS (this deployment "
        "does not use it), so it cannot be sent; add airtel back to PROVIDERS (with its variables) and replay this "
        f"job, or withdraw it with POST /v1/refunds/{refund['id']}/cancel")
    async with rt.sessionmaker() as s:
        row = await s.get(Refund, refund["id"])
    assert row is not None and row.status == "PENDING"
    # Never sent: it may be withdrawn, and its amount is refundable again.
    withdrawn = await admin.json("POST", f"/v1/refunds/{refund['id']}/cancel", 200,
                                 json={"note": "Airtel no longer used; paid back in cash"})
    assert withdrawn["status"] == "FAILED"
    # Asked now: refused before anything is queued.
    refused = await admin.json("POST", f"/v1/payments/{second['id']}/refunds", 400,
                               json={"idempotencyKey": idem()})
    assert refused["code"] == "PAYMENT_METHOD_NOT_AVAILABLE"
    assert refused["message"] == [f"payment {second['reference']} was made with MOBILE_MONEY_AIRTEL, whose provider "
                                  "airtel is not in PROVIDERS (this deployment does not use it): no refund can be "
                                  "sent to it"]
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(Refund))).all()) == 1


async def test_a_refund_that_may_have_reached_a_provider_left_out_is_never_withdrawn(
        rt: Any, admin: Caller, before: tuple[Any, Caller], demo: dict[str, Any]) -> None:
    from core.outbox import CALL_SENT, enqueue
    from core.state.refund import REFUND, RefundStatus

    _full, old_admin = before
    rent = demo["payment_types"]["Monthly Rent"]
    first, second = [await old_admin.json("POST", "/v1/payments", 201, json=payment_body(
        rent, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001")) for _ in range(2)]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind.in_(("payment.collect", "payment.poll")))
                        .values(status="DONE"))
    for paid in (first, second):
        await complete_payment(rt, paid["id"])
    tried, taken = [await old_admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                                         json={"idempotencyKey": idem()}) for paid in (first, second)]
    async with rt.sessionmaker.begin() as s:
        # `tried`: a try before Airtel was left out was answered 503 after its call was sent.
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{tried['id']}")
                        .values(last_error=f"{CALL_SENT}: ProviderError: HTTP 503", attempts=1))
        # `taken`: Airtel took it (PROCESSING), its status to be asked.
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{taken['id']}").values(status="DONE"))
        await transition(s, REFUND, taken["id"], RefundStatus.PENDING, RefundStatus.PROCESSING,
                         actor=Actor("system", "worker"))
        await enqueue(s, "refund.poll", {"refund_id": taken["id"]}, dedupe_key=f"refund-poll:{taken['id']}")
    await drain(create_worker(rt))
    async with rt.sessionmaker() as s:
        jobs = {job.payload["refund_id"]: job for job in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind.in_(("refund.submit", "refund.poll")), OutboxJob.status == "PARKED"))).scalars()}
    assert jobs[tried["id"]].last_error == (
        f"{CALL_SENT}: refund {tried['reference']}: provider airtel is not in PROVIDERS (this deployment does not use "
        "it), so it cannot be sent; add airtel back to PROVIDERS (with its variables) and replay this job, or check "
        f"with the provider (an earlier try may have reached it) and record its outcome with POST /v1/refunds/"
        f"{tried['id']}/outcome")
    await admin.json("POST", f"/v1/refunds/{tried['id']}/cancel", 409, json={"note": "Airtel no longer used"})
    assert jobs[taken["id"]].kind == "refund.poll" and jobs[taken["id"]].last_error == (
        f"refund {taken['reference']}: provider airtel is not in PROVIDERS (this deployment does not use it), so its "
        "status cannot be asked; add airtel back to PROVIDERS (with its variables) and replay this job, or check "
        f"with the provider and record its outcome with POST /v1/refunds/{taken['id']}/outcome")
    recorded = await admin.json("POST", f"/v1/refunds/{taken['id']}/outcome", 200,
                                json={"status": "COMPLETED", "note": "on Airtel's statement",
                                      "providerTransactionId": "AIR-REF-1"})
    assert recorded["status"] == "COMPLETED"
