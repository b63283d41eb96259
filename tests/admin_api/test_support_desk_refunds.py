"""The support desk's refunds and disputes of MTN MoMo payments, end to end against the MTN simulator over HTTP
(its callbacks dropped: the worker's status polls learn every outcome), the member's SMS sent to the Africa's
Talking simulator: what the member's SMS say, what the cooperative's system is told, what MTN was sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import select

from channels.sms.simulator import SimulatorState
from core.config import ProviderConfig, Secret
from core.models import AuditEvent, OutboxJob, SmsMessage
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import REFUNDS, TRANSACTIONS, create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.providers.test_mtn_momo import CREDS as SIM_CREDS
from tests.providers.wires import due_now

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Mtn:
    def __init__(self, app: web.Application, sms: SimulatorState) -> None:
        self.app = app
        self.sms = sms  # Africa's Talking's: the SMS that left
        self.refund_bodies: list[dict[str, Any]] = []

    async def record(self, request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path == "/disbursement/v1_0/refund":
            self.refund_bodies.append({**json.loads(request.content),
                                       "X-Reference-Id": request.headers["X-Reference-Id"]})


@contextlib.asynccontextmanager
async def mtn(rt: Any, aiohttp_server: Any, **options: str) -> AsyncIterator[Mtn]:
    app = create_simulator(SimulatorOptions(delay=0.01, drop_callback=True, credentials=SIM_CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    config = ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in SIM_CREDS.items()},
                            options={"target_environment": "mtnrwanda", **options})
    # The member's SMS leave, each at its first attempt. Failing (no Africa's Talking to reach), every one was
    # retried at each settle: enough attempts to reach the sender's send rate, so that an SMS the test counts could
    # still be waiting for its slot, its row not yet stored, when the test counted them.
    _sms_server, sms = await start_simulator(aiohttp_server, rt)
    sim = Mtn(app, sms)
    async with httpx.AsyncClient(event_hooks={"request": [sim.record]}) as http:
        rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(http, config)}
        yield sim


async def settle(rt: Any, worker: Any, sim: Mtn) -> None:
    """Run the worker until MTN has settled what it was sent and the polls have learned it."""
    for _ in range(3):
        await drain(worker)
        await sim.app[STATE].idle()
        await asyncio.sleep(0.05)
        for kind in ("payment.poll", "refund.poll", "sms.send"):
            await due_now(rt, kind)
        await drain(worker)


async def paid(admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, sim: Mtn) -> dict[str, Any]:
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await settle(rt, worker, sim)
    done = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert done["status"] == "COMPLETED", done
    return done


async def sms_of(rt: Any, template_prefix: str) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).where(SmsMessage.template.startswith(template_prefix))
                                     .order_by(SmsMessage.created_at, SmsMessage.id))).scalars())


async def events(rt: Any, prefix: str) -> list[dict[str, Any]]:
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "webhook.event").order_by(OutboxJob.id))).scalars().all()
    return [p for p in rows if p["event_type"].startswith(prefix)]


async def audit(rt: Any, entity_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == entity_id)
                                     .order_by(AuditEvent.id))).scalars())


async def test_two_partial_refunds_then_one_beyond_what_is_left(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        first = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                 json={"amount": 10000, "reason": "charged twice", "idempotencyKey": idem()})
        second = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                  json={"amount": 15000.00, "reason": "late fee waived", "idempotencyKey": idem()})
        await settle(rt, worker, sim)
        third = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                                 json={"amount": 25001, "idempotencyKey": idem()})
        assert "exceeds the refundable 25,000 RWF" in third["message"], third
        [[collect_ref, taken]] = sim.app[TRANSACTIONS].items()
        sent = sorted(sim.refund_bodies, key=lambda b: int(b["amount"]))
    assert [(b["amount"], b["currency"], b["referenceIdToRefund"]) for b in sent] == [
        ("10000", "RWF", collect_ref), ("15000", "RWF", collect_ref)]
    assert taken["_refunded"] == 25000
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("PARTIALLY_REFUNDED", 25000), shown
    for refund in (first, second):
        got = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
        assert got["status"] == "COMPLETED" and got["providerTransactionId"], got
        assert "refund.requested" in await audit(rt, refund["id"])
    texts = [m.body for m in await sms_of(rt, "refund_")]
    assert len(texts) == 2, texts
    assert sorted(texts) == sorted([
        f"Twagusubije 10,000 RWF yo kwishyura {payment['reference']} (Kigali Heights Housing Cooperative). "
        f"Nimero: {first['reference']}.",
        f"Twagusubije 15,000 RWF yo kwishyura {payment['reference']} (Kigali Heights Housing Cooperative). "
        f"Nimero: {second['reference']}."]), texts
    assert not any(UUID.search(t) for t in texts)
    told = await events(rt, "refund.")
    assert sorted((e["event_type"], e["data"]["id"], e["data"]["amount"]) for e in told) == sorted([
        ("refund.completed", first["id"], 10000), ("refund.completed", second["id"], 15000)])


async def test_two_admins_refund_at_once(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, client: Any) -> None:
    from tests.admin_api.conftest import bearer

    other = await bearer(client, *demo["admin"])
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        url = f"/v1/payments/{payment['id']}/refunds"
        key = idem()
        same = [admin.req("POST", url, json={"amount": 20000, "reason": "dup", "idempotencyKey": key}),
                other.req("POST", url, json={"amount": 20000, "reason": "dup", "idempotencyKey": key})]
        answers = [(r.status, await r.json()) for r in await asyncio.gather(*same)]
        assert [a[0] for a in answers] == [201, 201], answers
        assert answers[0][1]["id"] == answers[1][1]["id"]
        apart = [admin.req("POST", url, json={"amount": 20000, "idempotencyKey": idem()}),
                 other.req("POST", url, json={"amount": 20000, "idempotencyKey": idem()})]
        statuses = sorted([r.status for r in await asyncio.gather(*apart)])
        assert statuses == [201, 422], statuses
        await settle(rt, worker, sim)
        assert sorted(int(b["amount"]) for b in sim.refund_bodies) == [20000, 20000]
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("PARTIALLY_REFUNDED", 40000)
    assert len(await sms_of(rt, "refund_completed")) == 2
    assert len(await events(rt, "refund.completed")) == 2


async def test_refund_reasons_with_emoji_and_too_long(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        url = f"/v1/payments/{payment['id']}/refunds"
        long = await admin.json("POST", url, 400, json={"amount": 100, "reason": "x" * 500, "idempotencyKey": idem()})
        assert "reason must be at most 300 characters" in str(long["message"])
        reason = "Yishyuye kabiri 🙏🏽 " + "é" * 280
        made = await admin.json("POST", url, 201, json={"amount": 100, "reason": reason, "idempotencyKey": idem()})
        assert made["reason"] == reason
        await settle(rt, worker, sim)
        [sent] = sim.refund_bodies
    [sms] = await sms_of(rt, "refund_")
    assert "🙏" not in sms.body and "é" * 5 not in sms.body
    [event] = await events(rt, "refund.")
    assert event["data"]["reason"] == reason
    assert "🙏" not in sent.get("payerMessage", "") + sent.get("payeeNote", "")
    assert len(sent.get("payerMessage", "")) <= 160 and len(sent.get("payeeNote", "")) <= 160


async def test_refund_the_provider_cannot_take_then_sent_again(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        sim.app[STATE].options.fail_request_500 = True
        made = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                json={"amount": 5000, "idempotencyKey": idem()})
        await drain(worker)
        waiting = await admin.json("GET", f"/v1/refunds/{made['id']}", 200)
        assert waiting["status"] in ("PENDING", "PROCESSING"), waiting
        sim.app[STATE].options.fail_request_500 = False
        await due_now(rt, "refund.submit")
        await settle(rt, worker, sim)
        assert len(sim.app[REFUNDS]) == 1
    done = await admin.json("GET", f"/v1/refunds/{made['id']}", 200)
    assert done["status"] == "COMPLETED", done
    assert [m.template for m in await sms_of(rt, "refund_")] == ["refund_completed"]
    assert [e["event_type"] for e in await events(rt, "refund.")] == ["refund.completed"]


async def test_disputes_won_lost_withdrawn_and_refunds_while_open(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        outcomes = {}
        for status in ("RESOLVED", "REJECTED", "WITHDRAWN"):
            payment = await paid(admin, rt, demo, worker, sim)
            opened = await admin.json("POST", "/v1/disputes", 201,
                                      json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT"})
            # A refund while it is open: the desk refunds part at once.
            await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                             json={"amount": 10000, "idempotencyKey": idem()})
            body: dict[str, Any] = {"status": status, "note": "checked"}
            if status == "RESOLVED":
                over = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 422,
                                        json={**body, "refundAmount": 40001})
                assert "exceeds the refundable" in over["message"]
                body["refundAmount"] = 40000
            moved = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200, json=body)
            outcomes[status] = (payment, moved)
            await settle(rt, worker, sim)
    won_payment, won = outcomes["RESOLVED"]
    refund = await admin.json("GET", f"/v1/refunds/{won['refundId']}", 200)
    assert (refund["amount"], refund["status"], refund["disputeId"]) == (40000, "COMPLETED", won["id"])
    shown = await admin.json("GET", f"/v1/payments/{won_payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 50000), shown
    texts = [(m.template, m.body) for m in await sms_of(rt, "dispute_")]
    assert len(texts) == 6, texts
    stored = sorted(body for _, body in texts)
    left = sorted(m["message"] for inbox in sim.sms.inbox.values() for m in inbox if m["message"] in stored)
    assert left == stored, (stored, left)  # each sent, once
    assert not any(UUID.search(t) for _, t in texts)
    told = [(e["event_type"], e["data"]["status"]) for e in await events(rt, "dispute.")]
    assert sorted(told) == sorted([("dispute.opened", "OPEN")] * 3 + [
        ("dispute.updated", "RESOLVED"), ("dispute.updated", "REJECTED"), ("dispute.updated", "WITHDRAWN")]), told


async def test_refund_whose_answer_times_out_is_learned_by_its_poll(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server, read_timeout="0.3") as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        sim.app[STATE].options.hang_request = 1.0
        made = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                json={"amount": 7000, "idempotencyKey": idem()})
        await drain(worker)
        waiting = await admin.json("GET", f"/v1/refunds/{made['id']}", 200)
        assert waiting["status"] == "PROCESSING", waiting
        sim.app[STATE].options.hang_request = 0.0
        await due_now(rt, "refund.submit")
        await settle(rt, worker, sim)
        assert len(sim.refund_bodies) == 1, sim.refund_bodies  # never sent twice
    done = await admin.json("GET", f"/v1/refunds/{made['id']}", 200)
    assert done["status"] == "COMPLETED", done
    assert [m.template for m in await sms_of(rt, "refund_")] == ["refund_completed"]
    assert [e["event_type"] for e in await events(rt, "refund.")] == ["refund.completed"]
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert shown["refundedAmount"] == 7000


async def test_chargeback_recorded_after_a_partial_refund(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                         json={"amount": 20000, "idempotencyKey": idem()})
        await settle(rt, worker, sim)
        opened = await admin.json("POST", "/v1/disputes", 201,
                                  json={"paymentId": payment["id"], "reason": "NOT_AUTHORISED"})
        back = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200, json={
            "status": "RESOLVED", "note": "MTN charged back the rest", "refundAmount": 30000,
            "returnedByProvider": {"providerTransactionId": "CB-99120"}})
        await settle(rt, worker, sim)
        assert len(sim.refund_bodies) == 1  # the chargeback is never sent
    refund = await admin.json("GET", f"/v1/refunds/{back['refundId']}", 200)
    assert (refund["status"], refund["returnedByProvider"], refund["providerTransactionId"]) == (
        "COMPLETED", True, "CB-99120")
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 50000)
    texts = [m.body for m in await sms_of(rt, "refund_completed")]
    assert len(texts) == 2 and any("30,000 RWF" in t for t in texts), texts
    assert [e["data"]["amount"] for e in await events(rt, "refund.completed")] == [20000, 30000]


async def test_airtel_refunds_only_the_whole_payment_once(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    from providers.airtel.adapter import AirtelAdapter
    from providers.airtel.simulator import create_simulator as airtel_simulator
    from tests.providers.test_airtel import CREDS, config

    app = airtel_simulator(SimulatorOptions(delay=0.01, drop_callback=True, credentials=CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    sent: list[dict[str, Any]] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path == "/standard/v1/payments/refund":
            sent.append(json.loads(request.content))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        rt.providers = {**rt.providers, "airtel": AirtelAdapter(http, config(str(server.make_url("")).rstrip("/")))}
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_AIRTEL",
                                  paymentAccount="+250733000001")
        for _ in range(3):
            await drain(worker)
            await app[STATE].idle()
            await due_now(rt, "payment.poll")
        await drain(worker)
        payment = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
        assert payment["status"] == "COMPLETED", payment
        url = f"/v1/payments/{payment['id']}/refunds"
        part = await admin.json("POST", url, 422, json={"amount": 10000, "idempotencyKey": idem()})
        assert "refunds only the full amount" in part["message"]
        key = idem()
        answers = await asyncio.gather(*(admin.req("POST", url, json={"idempotencyKey": key}) for _ in range(2)))
        assert sorted(r.status for r in answers) == [201, 201]
        await drain(worker)
        again = await admin.json("POST", url, 422, json={"idempotencyKey": idem()})
        [whole] = (await admin.json("GET", f"{url}", 200))["data"]
        assert again["message"] == ("the payment has been refunded in full: nothing is left to refund (50,000 RWF "
                                    f"back of 50,000 RWF collected: refund {whole['reference']})")
    assert sent == [{"transaction": {"airtel_money_id": payment["gatewayTransactionId"]}}]
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 50000)
    [sms] = await sms_of(rt, "refund_")
    assert (sms.template, sms.language) == ("refund_completed", "fr")
    assert "50 000 RWF" in sms.body and payment["reference"] in sms.body
    assert [e["event_type"] for e in await events(rt, "refund.")] == ["refund.completed"]


async def test_an_overpaid_payment_gives_back_all_that_was_taken(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
        await drain(worker)  # the request to pay
        [taken] = sim.app[TRANSACTIONS].values()
        taken["amount"] = "60000"  # MTN took more than was asked
        await settle(rt, worker, sim)
        payment = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
        assert (payment["status"], payment["collectedAmount"], payment["mismatch"]) == ("COMPLETED", 60000, True)
        refund = await admin.json("POST", f"/v1/payments/{made['id']}/refunds", 201,
                                  json={"reason": "overpaid", "idempotencyKey": idem()})
        assert refund["amount"] == 60000
        await settle(rt, worker, sim)
        assert [(b["amount"], b["currency"]) for b in sim.refund_bodies] == [("60000", "RWF")]
    shown = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 60000), shown
    [receipt] = await sms_of(rt, "payment_receipt")
    assert "60,000 RWF" in receipt.body and "50,000 RWF" in receipt.body, receipt.body
    [sms] = await sms_of(rt, "refund_")
    assert "60,000 RWF" in sms.body, sms.body


async def test_another_cooperatives_admin_finds_none_of_it(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any,
        coop_b: dict[str, Any]) -> None:
    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                                  json={"amount": 1000, "idempotencyKey": idem()})
        dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
        b = coop_b["admin"]
        await b.json("POST", f"/v1/payments/{payment['id']}/refunds", 404,
                     json={"amount": 1000, "idempotencyKey": idem()})
        await b.json("POST", f"/v1/refunds/{refund['id']}/cancel", 404, json={"note": "not ours"})
        await b.json("POST", f"/v1/refunds/{refund['id']}/outcome", 404, json={"status": "FAILED", "note": "x" * 5})
        await b.json("POST", "/v1/disputes", 404, json={"paymentId": payment["id"], "reason": "OTHER"})
        await b.json("GET", f"/v1/disputes/{dispute['id']}", 404)
        await b.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 404,
                     json={"status": "RESOLVED", "refundAmount": 1000})
        await settle(rt, worker, sim)
        assert [int(x["amount"]) for x in sim.refund_bodies] == [1000]
    still = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
    assert (still["status"], still["refundId"]) == ("OPEN", None)


async def test_a_refund_mtn_fails_then_asked_again(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    from decimal import Decimal

    async with mtn(rt, aiohttp_server) as sim:
        payment = await paid(admin, rt, demo, worker, sim)
        [taken] = sim.app[TRANSACTIONS].values()
        taken["_refunded"] = Decimal(50000)  # MTN cannot perform it
        url = f"/v1/payments/{payment['id']}/refunds"
        failed = await admin.json("POST", url, 201, json={"amount": 12500, "idempotencyKey": idem()})
        await settle(rt, worker, sim)
        got = await admin.json("GET", f"/v1/refunds/{failed['id']}", 200)
        assert got["status"] == "FAILED", got
        taken["_refunded"] = Decimal(0)
        again = await admin.json("POST", url, 201, json={"amount": 50000, "idempotencyKey": idem()})
        await settle(rt, worker, sim)
        first, second = sim.refund_bodies
        assert (first["amount"], second["amount"]) == ("12500", "50000")
        assert first["X-Reference-Id"] != second["X-Reference-Id"]
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("REFUNDED", 50000)
    texts = [(m.template, m.body) for m in await sms_of(rt, "refund_")]
    assert [t for t, _ in texts] == ["refund_failed", "refund_completed"], texts
    assert "12,500 RWF" in texts[0][1] and "50,000 RWF" in texts[1][1]
    told = [(e["event_type"], e["data"]["id"]) for e in await events(rt, "refund.")]
    assert told == [("refund.failed", failed["id"]), ("refund.completed", again["id"])]


async def test_irembopay_refund_waits_for_the_desk_to_record_it(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, irembo: Any) -> None:
    made = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    for _ in range(3):
        await drain(worker)
        await irembo.app[STATE].idle()
        await due_now(rt, "payment.poll")
    await drain(worker)
    payment = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert payment["status"] == "COMPLETED", payment
    sent_before = list(irembo.sent)
    refund = await admin.json("POST", f"/v1/payments/{made['id']}/refunds", 201,
                              json={"amount": 20000, "reason": "overcharged", "idempotencyKey": idem()})
    await drain(worker)
    assert irembo.sent == sent_before  # IremboPay has no refund API: nothing is sent
    waiting = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
    assert waiting["status"] == "PROCESSING", waiting
    assert await sms_of(rt, "refund_") == []
    done = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "sent back by bank transfer", "providerTransactionId": "BK-2231"})
    assert done["status"] == "COMPLETED"
    await drain(worker)
    [sms] = await sms_of(rt, "refund_")
    assert sms.template == "refund_completed" and "20,000 RWF" in sms.body and "BK-2231" not in sms.body
    assert [e["event_type"] for e in await events(rt, "refund.")] == ["refund.completed"]
    shown = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    assert (shown["status"], shown["refundedAmount"]) == ("PARTIALLY_REFUNDED", 20000)
    assert "refund.outcome_recorded" in await audit(rt, refund["id"])
