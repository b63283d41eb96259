"""POST /v1/payments/{id}/cancel: the support desk cancels an open payment a member asked for by mistake, or whose
prompt never came. Before the collect job ran, nothing reaches MTN; after the prompt was sent, the member can still
approve it (MTN cannot withdraw a request to pay), and that money completes the payment late, never dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import select

from channels.sms.templates import CATALOGS
from core.config import ProviderConfig, Secret
from core.models import AuditEvent, OutboxJob, Payment, SmsMessage
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import TRANSACTIONS, create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, complete_payment, make_payment
from tests.admin_api.test_retried_key_after_restore import SIM_CREDS
from tests.conftest import deadlines_from_the_call, drain
from tests.core.test_provider_faults_mpesa import CHECKOUT, PUSH, QUERY
from tests.providers.wires import MPESA_BASE, due_now, mpesa_adapter, mpesa_payment, mpesa_wire

NOTE = "member asked for 50,000 instead of 5,000"
MEMBER = "+250788000001"


@contextlib.asynccontextmanager
async def interactive_mtn(rt: Any, aiohttp_server: Any, hang: float = 0.0
                          ) -> AsyncIterator[tuple[web.Application, str]]:
    """The MTN MoMo simulator over HTTP as the gateway's MTN, its payers answering PIN prompts by its control API
    (POST /_control/decide), its callbacks dropped (only the status poll can learn the outcome); the app and its
    base URL. `hang`: seconds it holds its answer to a request to pay (the prompt is on the phone meanwhile)."""
    app = create_simulator(SimulatorOptions(delay=0.02, drop_callback=True, interactive=True, hang_request=hang,
                                            credentials=SIM_CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    config = ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in SIM_CREDS.items()},
                            options={"target_environment": "mtnrwanda"})
    async with httpx.AsyncClient() as http:
        rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(http, config)}
        yield app, base


async def _prompt(http: httpx.AsyncClient, base: str, msisdn: str, rt: Any = None, worker: Any = None
                  ) -> dict[str, Any]:
    """The PIN prompt the collect job put on her phone. With `rt` and `worker` (a collect job drained before):
    a collect that failed once (a CI run on a loaded machine met it) is retried as the gateway would, brought
    forward instead of waited for; the errors it met are in the failure's message."""
    errors: list[str | None] = []
    for attempt in range(3 if worker is not None else 1):
        for _ in range(200):
            prompts = (await http.get(f"{base}/_control/pending", params={"msisdn": msisdn})).json()["prompts"]
            if prompts:
                return dict(prompts[0])
            await asyncio.sleep(0.01)
        if worker is not None:
            async with rt.sessionmaker() as s:
                errors += (await s.execute(select(OutboxJob.last_error).where(
                    OutboxJob.kind == "payment.collect"))).scalars().all()
            await due_now(rt, "payment.collect")
            await drain(worker)
    raise AssertionError(f"no PIN prompt for {msisdn}; the collect jobs' errors: {errors}")


async def _notices(rt: Any, payment_id: str) -> list[tuple[str, str]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(OutboxJob.kind, OutboxJob.dedupe_key, OutboxJob.payload).where(
            OutboxJob.kind.in_(("sms.send", "webhook.event")), OutboxJob.dedupe_key.like(f"%{payment_id}%"))
            .order_by(OutboxJob.created_at, OutboxJob.id))).all()
    return [(kind, payload.get("template") or payload.get("event_type") or payload.get("data", {}).get("status"))
            for kind, _key, payload in rows]


async def _events(rt: Any, payment_id: str) -> dict[str, dict[str, Any]]:
    """The webhook events queued for the payment, by their event id."""
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(OutboxJob.dedupe_key, OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event", OutboxJob.dedupe_key.like(f"%{payment_id}%")))).all()
    return {key: payload for key, payload in rows}


async def _watch_jobs(rt: Any, payment_id: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key == f"poll:{payment_id}:cancelled"))).scalars())


async def test_cancelled_before_its_collect_job_ran_nothing_reaches_mtn(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with interactive_mtn(rt, aiohttp_server) as (app, base):
        state = app[STATE]
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        cancelled = await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": f"  {NOTE} "})
        assert (cancelled["status"], cancelled["failureReason"], cancelled["late"]) == (
            "CANCELLED", f"cancelled by the cooperative: {NOTE}", False)
        await drain(worker)  # the collect job finds it closed
        # Then the watch (in the collect job's round it could run first, see that job still RUNNING, and wait).
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)  # the watch: MTN has no such request and no collect job is sending it, nothing to ask
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{base}/_control/stats")).json()
        assert stats == {"requests": 0} and state.requests == 0 and dict(app[TRANSACTIONS]) == {}
        [watch] = await _watch_jobs(rt, made["id"])
        assert (watch.status, watch.payload) == ("DONE", {"payment_id": made["id"], "cancelled": "PENDING"})
        async with rt.sessionmaker() as s:
            [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "payment.cancelled",
                                                                AuditEvent.entity_id == made["id"]))).scalars()
            [sms] = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_failed"))).scalars()
            stored = await s.get(Payment, made["id"])
        # One row: the move's, by the admin, with her note whole.
        assert audit.actor.startswith("admin:") and audit.cooperative_id == demo["cooperative_id"]
        assert audit.before == {"status": "PENDING"}
        assert {k: audit.after[k] for k in ("status", "failureReason", "note")} == {
            "status": "CANCELLED", "failureReason": f"cancelled by the cooperative: {NOTE}", "note": NOTE}
        assert stored is not None and stored.status == "CANCELLED"
        # The member is told, in her SMS, that her cooperative cancelled it (not that she declined it).
        assert sms.member_id == demo["members"][MEMBER] and sms.language == "rw"
        assert CATALOGS["rw"].REASONS["cancelled_by_cooperative"] in sms.body, sms.body
        events = await _events(rt, made["id"])
        assert set(events) == {f"wh:evt_payment_failed_{made['id']}"}
        data = events[f"wh:evt_payment_failed_{made['id']}"]["data"]
        assert (data["status"], data["failureReason"]) == ("CANCELLED", f"cancelled by the cooperative: {NOTE}")
        shown = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
        assert (shown["status"], shown["failureReason"]) == ("CANCELLED", cancelled["failureReason"])


async def test_cancelled_after_the_prompt_then_approved_completes_late_with_its_receipt(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with interactive_mtn(rt, aiohttp_server) as (app, base), httpx.AsyncClient() as http:
        state = app[STATE]
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await drain(worker)  # the collect job: MTN prompts the member
        prompt = await _prompt(http, base, MEMBER, rt, worker)
        assert (await admin.json("GET", f"/v1/payments/{made['id']}", 200))["status"] == "PROCESSING"
        cancelled = await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        assert cancelled["status"] == "CANCELLED"
        # She approves the prompt on her phone anyway: MTN takes the money (and its callback is lost).
        decided = await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"],
                                                                   "approve": True})
        assert decided.status_code == 200
        await state.idle()
        [taken] = app[TRANSACTIONS].values()
        assert taken["status"] == "SUCCESSFUL"
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)  # the watch asks MTN: paid
        assert state.requests == 1  # one request to pay, never sent again
    done = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (done["status"], done["late"], done["collectedAmount"], done["gatewayTransactionId"],
            done["failureReason"]) == ("COMPLETED", True, 50000, taken["financialTransactionId"], None)
    late = await admin.json("GET", "/v1/payments", 200, params={"late": "true"})
    assert [p["id"] for p in late["data"]] == [made["id"]]
    kinds = await _notices(rt, made["id"])
    assert ("sms.send", "payment_failed") in kinds and ("sms.send", "payment_late_receipt") in kinds
    assert {f"wh:evt_payment_failed_{made['id']}", f"wh:evt_payment_completed_{made['id']}"} <= set(
        await _events(rt, made["id"]))
    async with rt.sessionmaker() as s:
        [receipt] = (await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_late_receipt"))).scalars()
    assert taken["financialTransactionId"] in receipt.body
    [watch] = await _watch_jobs(rt, made["id"])
    assert (watch.status, watch.payload["cancelled"]) == ("DONE", "PROCESSING")
    # Her money is held: it can be refunded.
    await admin.json("POST", f"/v1/payments/{made['id']}/refunds", 201, json={"idempotencyKey": "cancel-refund-01"})


async def test_cancelled_while_its_request_is_on_its_way_still_completes_late(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """The collect job had read the payment PENDING and was waiting for MTN's answer when the support desk
    cancelled it: the request reached MTN (nothing can withdraw it), the cancel stands locally, the collect's
    answer does not move it back to PROCESSING, and the member's approval completes it late."""
    async with interactive_mtn(rt, aiohttp_server, hang=0.5) as (app, base), httpx.AsyncClient() as http:
        state = app[STATE]
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        collecting = asyncio.create_task(drain(worker))
        prompt = await _prompt(http, base, MEMBER)  # MTN has the request; its 202 is not back yet
        cancelled = await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        assert cancelled["status"] == "CANCELLED"
        await collecting
        assert (await admin.json("GET", f"/v1/payments/{made['id']}", 200))["status"] == "CANCELLED"
        await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
        await state.idle()
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)
        assert state.requests == 1
        [taken] = app[TRANSACTIONS].values()
    done = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (done["status"], done["late"], done["gatewayTransactionId"]) == (
        "COMPLETED", True, taken["financialTransactionId"])
    # Its request was accepted after the cancel: the watch takes a NOT_FOUND as a lookup behind from then on.
    [watch] = await _watch_jobs(rt, made["id"])
    assert (watch.status, watch.payload["cancelled"]) == ("DONE", "PROCESSING")


async def test_an_mpesa_push_answered_after_the_cancel_keeps_its_checkout_id_and_completes_late(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    """Daraja answers the STK push after the cancel: its CheckoutRequestID, the only id its status query (and its
    callback) names the payment by, is kept on the cancelled payment, which the query then finds paid."""
    payment = await mpesa_payment(rt, demo)

    async def push_answered_after_the_cancel(_request: httpx.Request) -> httpx.Response:
        await admin.json("POST", f"/v1/payments/{payment.id}/cancel", 200, json={"note": NOTE})
        return httpx.Response(200, json={"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT,
                                         "ResponseCode": "0", "ResponseDescription": "Success."})

    wire = mpesa_wire().on("POST", PUSH, push_answered_after_the_cancel)
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    await worker.run_once()  # the collect job (its poll is not due yet)
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment.id)
    assert stored is not None and (stored.status, stored.provider_transaction_id) == ("CANCELLED", CHECKOUT)
    wire.on("POST", QUERY, 200, {"ResponseCode": "0", "MerchantRequestID": "29115-34620561-1",
                                 "CheckoutRequestID": CHECKOUT, "ResultCode": "0",
                                 "ResultDesc": "The service request is processed successfully."})
    await due_now(rt, "payment.poll")
    await due_now(rt, "payment.watch")
    await drain(worker)
    [query] = wire.sent("POST", QUERY)
    assert json.loads(query.content)["CheckoutRequestID"] == CHECKOUT
    done = await admin.json("GET", f"/v1/payments/{payment.id}", 200)
    assert (done["status"], done["late"], done["collectedAmount"]) == ("COMPLETED", True, "150.00")


async def test_the_watch_after_a_cancel_has_the_calls_deadline(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, monkeypatch: Any) -> None:
    """Daraja took the push, the payment was cancelled, and its status query then hangs. The watch's query had no
    deadline of its own: the worker cut it off (INTERRUPTED), each try using an attempt (30, then parked with no
    word of what failed). It has the call's deadline now: unanswered by then, a failed query, asked again on the
    payment's cadence (its attempt given back) with TIMEOUT's reason."""
    wire = mpesa_wire().on("POST", PUSH, 200, {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": CHECKOUT,
                                               "ResponseCode": "0", "ResponseDescription": "Success."})
    mpesa_adapter(rt, MPESA_BASE, wire.client())
    payment = await mpesa_payment(rt, demo)
    await drain(worker)  # the push, answered
    await admin.json("POST", f"/v1/payments/{payment.id}/cancel", 200, json={"note": NOTE})
    await drain(worker)  # its notices
    asked: list[str] = []

    async def hangs(_request: httpx.Request) -> httpx.Response:
        asked.append("status")
        await asyncio.sleep(30)
        return httpx.Response(200, json={})

    wire.on("POST", QUERY, hangs)
    # The query's deadline half a second into it, inside the worker's cut-off (the watch's reads before it not counted).
    deadlines_from_the_call(monkeypatch, lookup=0.5, worker=4.0)
    await due_now(rt, "payment.watch")
    await worker.run_once()
    [watch] = await _watch_jobs(rt, payment.id)
    assert (watch.status, watch.attempts, watch.after_failure) == ("PENDING", 0, True), watch.last_error
    assert watch.last_error == "status query failed: mpesa status: no answer by the call's deadline"
    assert asked == ["status"]
    shown = await admin.json("GET", f"/v1/payments/{payment.id}", 200)
    assert (shown["status"], shown["late"]) == ("CANCELLED", False)


async def test_cancelled_while_the_prompt_stays_open_is_asked_again_then_left_once_declined(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with interactive_mtn(rt, aiohttp_server) as (app, base), httpx.AsyncClient() as http:
        state = app[STATE]
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await drain(worker)
        prompt = await _prompt(http, base, MEMBER, rt, worker)
        await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)  # MTN: still PENDING (her prompt is open): asked again later
        [watch] = await _watch_jobs(rt, made["id"])
        assert (watch.status, watch.attempts) == ("PENDING", 0)
        await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": False})
        await state.idle()
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)
        [watch] = await _watch_jobs(rt, made["id"])
        assert watch.status == "DONE"
    shown = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (shown["status"], shown["late"], shown["collectedAmount"]) == ("CANCELLED", False, 0)


async def test_only_an_open_payment_is_cancelled(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    refused = await admin.json("POST", f"/v1/payments/{paid['id']}/cancel", 409, json={"note": NOTE})
    assert refused["message"] == ("payment is COMPLETED: only an open payment (PENDING or PROCESSING) can be "
                                  "cancelled; its money is taken: refund it (POST /v1/payments/{id}/refunds)")
    assert (await admin.json("GET", f"/v1/payments/{paid['id']}", 200))["status"] == "COMPLETED"
    open_one = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await admin.json("POST", f"/v1/payments/{open_one['id']}/cancel", 200, json={"note": NOTE})
    again = await admin.json("POST", f"/v1/payments/{open_one['id']}/cancel", 409, json={"note": NOTE})
    assert again["message"] == (f"payment is CANCELLED (cancelled by the cooperative: {NOTE}): only an open payment "
                                "(PENDING or PROCESSING) can be cancelled")
    async with rt.sessionmaker() as s:
        audits = (await s.execute(select(AuditEvent.entity_id).where(AuditEvent.action == "payment.cancelled")
                                  )).scalars().all()
    assert audits == [open_one["id"]]


async def test_a_note_is_required_and_bounded(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    url = f"/v1/payments/{made['id']}/cancel"
    for body in ({}, {"note": "ab"}, {"note": "x" * 301}, {"note": 42}, {"note": None}, {"note": "   "},
                 {"note": NOTE, "extra": 1}):
        await admin.json("POST", url, 400, json=body)
    assert (await admin.req("POST", url, data="not json", headers={"Content-Type": "application/json"})).status == 400
    assert (await admin.json("GET", f"/v1/payments/{made['id']}", 200))["status"] == "PENDING"
    # 300 characters are kept whole in the audit log (the failureReason holds the first 200 of it).
    long = "y" * 300
    done = await admin.json("POST", url, 200, json={"note": long})
    assert done["failureReason"] == f"cancelled by the cooperative: {long}"[:200]
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "payment.cancelled"))).scalars()
    assert audit.after["note"] == long


async def test_a_tenant_and_another_cooperative_cannot_cancel_a_super_admin_can(
        admin: Caller, superadmin: Caller, tenant: Caller, rt: Any, demo: dict[str, Any],
        coop_b: dict[str, Any]) -> None:
    # The tenant's own open payment: she declines the prompt on her phone (the provider's own cancel), which no
    # cancel here can replace; the API refuses her.
    own = await tenant.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": MEMBER, "idempotencyKey": "tenant-cancel-0001"})
    assert (await tenant.req("POST", f"/v1/payments/{own['id']}/cancel", json={"note": NOTE})).status == 403
    assert (await coop_b["admin"].req("POST", f"/v1/payments/{own['id']}/cancel", json={"note": NOTE})).status == 404
    assert (await admin.json("GET", f"/v1/payments/{own['id']}", 200))["status"] == "PENDING"
    done = await superadmin.json("POST", f"/v1/payments/{own['id']}/cancel", 200, json={"note": NOTE})
    assert done["status"] == "CANCELLED"
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(AuditEvent.action == "payment.cancelled"))).scalars()
    assert audit.cooperative_id == demo["cooperative_id"]


async def test_the_route_is_documented(client: Any) -> None:
    doc = await (await client.get("/v1/openapi.json")).json()
    operation = doc["paths"]["/v1/payments/{id}/cancel"]["post"]
    assert {"200", "400", "404", "409"} <= set(operation["responses"])
    assert "late" in operation["requestBody"]["content"]["application/json"]["schema"]["description"]


async def test_a_late_completion_after_the_cancel_sms_tells_her_the_money_was_taken_after_all(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """She was told "failed: your cooperative cancelled it ... Dial ... to try again"; then she approved the prompt
    and the money was taken. A plain receipt after that reads like the retry she may be about to make: the SMS says
    it was received after all ("nyuma") and not to pay again (no second payment)."""
    async with interactive_mtn(rt, aiohttp_server) as (app, base), httpx.AsyncClient() as http:
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await drain(worker)
        prompt = await _prompt(http, base, MEMBER, rt, worker)
        await admin.json("POST", f"/v1/payments/{made['id']}/cancel", 200, json={"note": NOTE})
        await drain(worker)  # the cancel's SMS leaves
        await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
        await app[STATE].idle()
        await due_now(rt, "payment.poll")
        await due_now(rt, "payment.watch")
        await drain(worker)
        [taken] = app[TRANSACTIONS].values()
    async with rt.sessionmaker() as s:
        sent = list((await s.execute(select(SmsMessage).where(SmsMessage.idempotency_key.like(f"%{made['id']}%"))
                                     .order_by(SmsMessage.created_at))).scalars())
    assert [m.template for m in sent] == ["payment_failed", "payment_late_receipt"]
    cancelled, late = sent
    assert CATALOGS["rw"].REASONS["cancelled_by_cooperative"] in cancelled.body
    assert late.language == "rw", late.language
    assert late.body.startswith("Twakiriye 50,000 RWF ya Monthly Rent nyuma: ntimwongere kwishyura."), late.body
    assert made["reference"] in late.body and taken["financialTransactionId"] in late.body
    assert made["id"] not in late.body
