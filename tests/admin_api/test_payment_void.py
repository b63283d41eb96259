"""POST /v1/payments/{id}/void: the support desk voids a recording of money taken made in error (the wrong statement
line, member or transaction id, another cooperative's line), where a refund would send real money to someone. The
payment becomes VOIDED: nothing collected (the reconciliation and refunds no longer count it), its transaction id
released so the right line can be recorded, audited payment.voided with what it released, the cooperative's system
told (payment.voided), the member not texted. Refused for money the provider itself reported, for a payment not
recorded, while a refund may be moving money or a dispute is open, and twice."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.audit import Actor
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment, Refund, SmsMessage, WebhookDelivery
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.webhooks import subscribed
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.admin_api.test_chargeback_visibility import _last_month, _z
from tests.admin_api.test_payment_outcome import RECORD, _given_up
from tests.admin_api.test_payment_review import _mtn_says
from tests.admin_api.test_unmatched_callbacks import _lost_payment_reference, _mtn_callback
from tests.channels.sms.helpers import start_simulator
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint
from tests.providers.wires import mtn_adapter, mtn_wire

NOTE = "wrong line: MTN statement line 12 is Eric's rent, not Aline's"
TXN = "MTN-STMT-4821"


def _line(demo: dict[str, Any], member: str = "+250788000001", **over: Any) -> dict[str, Any]:
    body = {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "memberId": demo["members"][member],
            "providerTransactionId": TXN, "completedAt": _z(utcnow() - timedelta(hours=3)),
            "note": "MTN statement of 2 Dec, line 12", "idempotencyKey": idem()}
    body.update(over)
    return body


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return await s.get(Payment, payment_id)


async def _audit(rt: Any, payment_id: str, action: str = "payment.voided") -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == action).order_by(AuditEvent.id))).scalars())


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


def _money(report: dict[str, Any]) -> dict[str, Any]:
    """The reconciliation's money: what moved (settled), what the period's payments collected, by status, by method
    and in all."""
    return {"settled": [(s["provider"], s["collectedCount"], s["collected"], s["net"]) for s in report["settled"]],
            "byStatus": [(s["status"], s["count"], s["amount"]) for s in report["payments"]["byStatus"]],
            "byMethod": [(m["paymentMethod"], m["count"], m["completedCount"], m["completedAmount"])
                         for m in report["payments"]["byMethod"]],
            "totals": [(t["currency"], t["collectedCount"], t["collected"], t["net"]) for t in report["totals"]]}


async def test_a_recording_in_error_is_voided_then_the_right_line_recorded(rt: Any, admin: Caller,
                                                                           demo: dict[str, Any]) -> None:
    wrong = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    url = f"/v1/payments/{wrong['id']}"
    recorded = _money(await admin.json("GET", "/v1/reports/reconciliation", 200))
    assert recorded == {"settled": [("mtn_momo", 1, 50000, 50000)], "byStatus": [("COMPLETED", 1, 50000)],
                        "byMethod": [("MOBILE_MONEY_MTN", 1, 1, 50000)], "totals": [("RWF", 1, 50000, 50000)]}
    before = await _row(rt, wrong["id"])
    events = len(await _jobs(rt, "webhook.event"))

    voided = await admin.json("POST", f"{url}/void", 200, json={"note": f"  {NOTE} "})

    assert (voided["status"], voided["collectedAmount"], voided["gatewayTransactionId"], voided["failureReason"]) == (
        "VOIDED", 0, None, f"recording voided: {NOTE}")
    assert voided["completedAt"] == wrong["completedAt"] and voided["amount"] == 50000
    row = await _row(rt, wrong["id"])
    assert (row.status, row.collected_minor, row.provider_transaction_id) == ("VOIDED", 0, None)
    assert row.updated_at > before.updated_at
    [audit] = await _audit(rt, wrong["id"])
    assert audit.actor.startswith("admin:") and audit.cooperative_id == demo["cooperative_id"]
    assert audit.before == {"status": "COMPLETED", "collected": 50000, "providerTransactionId": TXN,
                            "completedAt": wrong["completedAt"]}
    after = audit.after or {}
    assert (after["status"], after["collected"], after["providerTransactionId"], after["note"],
            after["recordedBy"]) == ("VOIDED", 0, None, NOTE, "payment.recorded")
    # The cooperative's system is told; nobody is texted (she paid nothing through us).
    webhooks = await _jobs(rt, "webhook.event")
    assert len(webhooks) == events + 1
    told = webhooks[-1].payload
    assert (told["event_type"], told["data"]["id"], told["data"]["status"], told["data"]["collectedAmount"],
            told["data"]["gatewayTransactionId"]) == ("payment.voided", wrong["id"], "VOIDED", 0, None)
    assert subscribed(["payment.completed"], "payment.voided")  # an endpoint told it was paid is told
    assert await _jobs(rt, "sms.send") == []
    # Out of the money: nothing settled or collected (the payment is still listed, VOIDED), nothing refundable.
    assert _money(await admin.json("GET", "/v1/reports/reconciliation", 200)) == {
        "settled": [], "byStatus": [("VOIDED", 1, 50000)], "byMethod": [("MOBILE_MONEY_MTN", 1, 0, 0)], "totals": []}
    refused = await admin.json("POST", f"{url}/refunds", 422, json={"amount": 1000, "idempotencyKey": idem()})
    assert refused["message"] == "only collected payments can be refunded; this one is VOIDED"
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?status=VOIDED", 200))["data"]] == [wrong["id"]]

    # The right line (Eric's), under the same transaction id: recorded.
    right = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, member="+250788000002"))
    assert (right["status"], right["gatewayTransactionId"], right["memberId"]) == (
        "COMPLETED", TXN, demo["members"]["+250788000002"])
    assert _money(await admin.json("GET", "/v1/reports/reconciliation", 200)) == {
        **recorded, "byStatus": [("COMPLETED", 1, 50000), ("VOIDED", 1, 50000)],
        "byMethod": [("MOBILE_MONEY_MTN", 2, 1, 50000)]}
    # Voided once: a second void is refused, with what the first said.
    again = await admin.json("POST", f"{url}/void", 409, json={"note": NOTE})
    assert again["message"] == f"payment is VOIDED already: recording voided: {NOTE}"
    assert len(await _audit(rt, wrong["id"])) == 1


async def test_a_given_up_payment_recorded_in_error_is_voided_and_never_reopened(rt: Any, admin: Caller,
                                                                                demo: dict[str, Any]) -> None:
    payment = await _given_up(admin, rt, demo)
    url = f"/v1/payments/{payment['id']}"
    await admin.json("POST", f"{url}/outcome", 200, json=RECORD)

    voided = await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})
    assert (voided["status"], voided["collectedAmount"], voided["gatewayTransactionId"]) == ("VOIDED", 0, None)
    # The gateway's own request stays the payment's (the provider may still answer about it).
    assert voided["gatewayReference"] == payment["gatewayReference"]
    [audit] = await _audit(rt, payment["id"])
    assert (audit.before or {})["providerTransactionId"] == RECORD["providerTransactionId"]
    assert (audit.after or {})["recordedBy"] == "payment.outcome_recorded"
    again = await admin.json("POST", f"{url}/outcome", 409, json={**RECORD, "providerTransactionId": "MP-7782"})
    assert again["message"] == ("payment is VOIDED: its recording was voided; record the statement line as a "
                                "payment (POST /v1/payments/recorded)")

    # The provider then says the request was paid after all: flagged for a person, never reopened or dropped.
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        said = await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED,
                                              actor=Actor("provider:test", "provider"),
                                              provider_transaction_id="MP-9001")
    assert said == "flagged_success_after_void"
    row = await _row(rt, payment["id"])
    assert (row.status, row.collected_minor, row.provider_transaction_id, row.mismatch) == ("VOIDED", 0, None, True)
    assert "transaction MP-9001 after the recording was voided" in (row.mismatch_detail or "")
    assert len(await _audit(rt, payment["id"], "payment.success_after_void")) == 1
    # The same report again (a provider's retry under another event id): audited, the flag not written twice.
    flagged = row.mismatch_detail
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, payment["id"])
        await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=Actor("provider:test", "provider"),
                                       provider_transaction_id="MP-9001")
    assert (await _row(rt, payment["id"])).mismatch_detail == flagged
    assert len(await _audit(rt, payment["id"], "payment.success_after_void")) == 2
    # The right line is then recorded as a payment of its own.
    await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, providerTransactionId="MP-7781"))


async def test_a_confirmed_success_after_the_void_is_told_to_the_cooperatives_system(
        rt: Any, client: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """MTN confirms a voided payment's request paid after all (its callback, confirmed by its status query). The
    cooperative's system was told payment.voided (nothing collected): it is told the money was taken after all
    (payment.taken_after_void, with MTN's transaction id and amount), also at endpoints that asked only for
    payment.voided or payment.completed, and once: the same report again queues nothing more."""
    wire = mtn_wire()
    mtn_adapter(rt, wire)
    payment = await _given_up(admin, rt, demo)
    url = f"/v1/payments/{payment['id']}"
    await admin.json("POST", f"{url}/outcome", 200, json=RECORD)
    await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})
    [voided] = [j.payload for j in await _jobs(rt, "webhook.event") if j.payload["event_type"] == "payment.voided"]

    assert await _mtn_says(client, wire, payment["gatewayReference"], "50000", "MTN-LATE-1") == (
        "flagged_success_after_void")
    row = await _row(rt, payment["id"])
    assert (row.status, row.collected_minor, row.provider_transaction_id, row.mismatch) == ("VOIDED", 0, None, True)
    [told] = [j.payload for j in await _jobs(rt, "webhook.event")
              if j.payload["event_type"] == "payment.taken_after_void"]
    digest = hashlib.sha256(b"MTN-LATE-1").hexdigest()[:16]
    assert (told["event_id"], told["cooperative_id"], told["follows"]) == (
        f"evt_payment_taken_after_void_{payment['id']}_{digest}", demo["cooperative_id"], ["payment.voided"])
    data = told["data"]
    assert (data["id"], data["status"], data["collectedAmount"], data["gatewayTransactionId"], data["mismatch"],
            data["mismatchDetail"]) == (payment["id"], "VOIDED", 0, None, True, row.mismatch_detail)
    assert "transaction MTN-LATE-1 after the recording was voided" in data["mismatchDetail"]
    assert data["reportedPayment"] == {"moneyReference": "MTN-LATE-1", "amount": 50000, "currency": "RWF"}
    assert data["updatedAt"] > voided["data"]["updatedAt"]  # the newer news about the payment

    # MTN sends the callback again: a duplicate. Then the same money reported under another event id (a retry):
    # audited, nothing more queued.
    assert await _mtn_says(client, wire, payment["gatewayReference"], "50000", "MTN-LATE-1") == "duplicate"
    async def reported(transaction_id: str) -> str:
        async with rt.sessionmaker.begin() as s:
            return await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]),
                                                  ProviderOutcome.SUCCEEDED,
                                                  actor=Actor("provider:mtn_momo", "provider"),
                                                  provider_transaction_id=transaction_id, amount=Money(50000, "RWF"))

    assert await reported("MTN-LATE-1") == "flagged_success_after_void"
    assert len(await _audit(rt, payment["id"], "payment.success_after_void")) == 2
    assert [j.payload["event_id"] for j in await _jobs(rt, "webhook.event")
            if j.payload["event_type"] == "payment.taken_after_void"] == [told["event_id"]]
    # Another payment of the same amount under another transaction id is other money: flagged and told too.
    assert await reported("MTN-LATE-2") == "flagged_success_after_void"
    assert "transaction MTN-LATE-2 after the recording was voided" in (await _row(rt, payment["id"])).mismatch_detail
    assert len([j for j in await _jobs(rt, "webhook.event")
                if j.payload["event_type"] == "payment.taken_after_void"]) == 2

    # Delivered to the endpoints told of the payment (voided, or paid before that), not to one of failures only.
    for path, events in (("voided", ["payment.voided"]), ("paid", ["payment.completed"]),
                         ("failed", ["payment.failed"])):
        await approved_endpoint(rt, demo["cooperative_id"], f"http://127.0.0.1:9/{path}", events=events)
    assert await webhooks.fan_out(rt, told) == 2
    async with rt.sessionmaker() as s:
        urls = {e.id: e.url for e in (await s.execute(select(webhooks.WebhookEndpoint))).scalars()}
        sent = (await s.execute(select(WebhookDelivery).where(
            WebhookDelivery.event_type == "payment.taken_after_void"))).scalars().all()
    assert sorted(urls[d.endpoint_id] for d in sent) == ["http://127.0.0.1:9/paid", "http://127.0.0.1:9/voided"]
    assert all(d.payload["data"] == data for d in sent)


async def _receipt_job(rt: Any, payment_id: str) -> OutboxJob:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key == f"sms:payment_receipt:{payment_id}"))).scalar_one()


async def _receipts(rt: Any) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).where(SmsMessage.template == "payment_receipt"))).scalars())


async def test_a_receipt_queued_before_the_void_is_not_sent(rt: Any, admin: Caller, demo: dict[str, Any],
                                                            worker: Any, aiohttp_server: Any) -> None:
    """The receipt of a recording (sendReceipt) waits in the outbox (the worker is down); the recording is voided
    meanwhile. At its turn it does not go out: she would be told she paid what was just taken off her record. Its
    job ends (not retried), saying why; nothing is stored or sent."""
    wrong = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, sendReceipt=True))
    # A receipt of another recording, not voided, queued with it: sent.
    right = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, member="+250788000002", providerTransactionId="MTN-STMT-4822", sendReceipt=True))
    assert (await _receipt_job(rt, wrong["id"])).status == "PENDING"
    await admin.json("POST", f"/v1/payments/{wrong['id']}/void", 200, json={"note": NOTE})

    _server, sim = await start_simulator(aiohttp_server, rt)
    await drain(worker)
    assert list(sim.inbox) == ["+250788000002"]
    assert [(m.status, m.body.split(" ")[:2]) for m in await _receipts(rt)] == [("SENT", ["We", "received"])]
    assert [m.member_id for m in await _receipts(rt)] == [right["memberId"]]
    job = await _receipt_job(rt, wrong["id"])
    assert (job.status, job.attempts, job.last_error) == ("DONE", 1, "not sent: payment_voided")
    # The admin reads why in the job list.
    listed = (await admin.json("GET", "/v1/jobs?kind=sms.send&status=DONE", 200))["data"]
    assert [(j["id"], j["lastError"]) for j in listed if j["lastError"]] == [(job.id, "not sent: payment_voided")]


async def test_a_receipt_retried_through_an_outage_is_not_sent_once_voided(
        rt: Any, admin: Caller, demo: dict[str, Any], worker: Any, aiohttp_server: Any) -> None:
    """Its first try stored the message and the aggregator refused it (503): it waits for its retry, and the
    recording is voided meanwhile. At the retry it ends unsent: the stored message FAILED, "not sent"."""
    wrong = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, sendReceipt=True))
    _server, sim = await start_simulator(aiohttp_server, rt, global_failure="http503")
    await drain(worker)
    [stored] = await _receipts(rt)
    assert stored.status == "QUEUED" and sim.inbox == {}
    job = await _receipt_job(rt, wrong["id"])
    assert (job.status, job.attempts) == ("PENDING", 1)

    await admin.json("POST", f"/v1/payments/{wrong['id']}/void", 200, json={"note": NOTE})
    sim.set_failure(None)
    async with rt.sessionmaker.begin() as s:  # its backoff is over
        await s.execute(update(OutboxJob).where(OutboxJob.id == job.id).values(run_at=utcnow()))
    requests = len(sim.requests)
    await drain(worker)
    assert sim.inbox == {} and len(sim.requests) == requests
    [stored] = await _receipts(rt)
    assert (stored.status, stored.failure_reason, stored.provider_status) == (
        "FAILED", "not sent: payment_voided", "Skipped")
    job = await _receipt_job(rt, wrong["id"])
    assert (job.status, job.attempts, job.last_error) == ("DONE", 2, "not sent: payment_voided")


async def test_refused_while_money_may_move_or_a_dispute_is_open(rt: Any, admin: Caller,
                                                                 demo: dict[str, Any]) -> None:
    request = str(uuid.uuid4())
    payment = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, gatewayReference=request))
    url = f"/v1/payments/{payment['id']}"
    refund = await admin.json("POST", f"{url}/refunds", 201, json={"amount": 10000, "idempotencyKey": idem()})
    said = await admin.json("POST", f"{url}/void", 409, json={"note": NOTE})
    assert said["message"] == (f"refund {refund['reference']} of this payment is PENDING: money may be on its way "
                               "back to the payer, so the recording is not voided")
    async with rt.sessionmaker.begin() as s:  # the provider refused it
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="FAILED"))

    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    said = await admin.json("POST", f"{url}/void", 409, json={"note": NOTE})
    assert said["message"] == (f"dispute {dispute['reference']} of this payment is OPEN: close it before voiding "
                               "the recording")
    assert await _audit(rt, payment["id"]) == []
    assert (await _row(rt, payment["id"])).status == "COMPLETED"
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "REJECTED"})

    voided = await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})
    # A recorded payment's request is released too, kept in the audit row.
    assert voided["status"] == "VOIDED" and voided["gatewayReference"].startswith("recorded:")
    [audit] = await _audit(rt, payment["id"])
    assert (audit.before or {})["gatewayReference"] == request
    again = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, gatewayReference=request))
    assert again["gatewayReference"] == request


async def test_refused_for_money_the_provider_reported(rt: Any, client: Any, admin: Caller, superadmin: Caller,
                                                      demo: dict[str, Any]) -> None:
    # Completed on the provider's word: not a recording.
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    said = await admin.json("POST", f"/v1/payments/{paid['id']}/void", 409, json={"note": NOTE})
    assert said["message"] == ("payment is COMPLETED on the provider's own word, not recorded by an admin: only a "
                               "recording made in error is voided; its money is taken: refund it "
                               "(POST /v1/payments/{id}/refunds)")
    open_one = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    said = await admin.json("POST", f"/v1/payments/{open_one['id']}/void", 409, json={"note": NOTE})
    assert said["message"] == ("payment is PENDING on the provider's own word, not recorded by an admin: only a "
                               "recording made in error is voided")

    # Recorded for a callback of the provider's that matched no payment: its money is the provider's word.
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference, txn="MTN-9911")
    [callback] = (await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true", 200))["data"]
    recorded = await superadmin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, providerTransactionId="MTN-9911", callbackId=callback["id"], cooperativeId=demo["cooperative_id"]))
    said = await admin.json("POST", f"/v1/payments/{recorded['id']}/void", 409, json={"note": NOTE})
    assert said["message"] == (f"the provider itself reported this payment's money taken (the provider's callback "
                               f"{callback['id']} it accounts for): it is not voided; its money is taken: refund it "
                               "(POST /v1/payments/{id}/refunds)")
    for payment_id in (paid["id"], open_one["id"], recorded["id"]):
        assert await _audit(rt, payment_id) == []


async def test_notes_roles_and_cooperatives(rt: Any, admin: Caller, tenant: Caller, superadmin: Caller,
                                            coop_b: dict[str, Any], demo: dict[str, Any]) -> None:
    payment = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    url = f"/v1/payments/{payment['id']}/void"
    for bad in ({}, {"note": "ok"}, {"note": "x" * 301}, {"note": 12345}, {"note": NOTE, "status": "VOIDED"}):
        assert (await admin.json("POST", url, 400, json=bad))["message"], bad
    await tenant.json("POST", url, 403, json={"note": NOTE})
    other = await coop_b["admin"].json("POST", url, 404, json={"note": NOTE})
    assert other["message"] == "payment not found"
    await admin.json("POST", "/v1/payments/00000000-0000-4000-8000-000000000000/void", 404, json={"note": NOTE})
    assert (await _row(rt, payment["id"])).status == "COMPLETED" and await _audit(rt, payment["id"]) == []

    # A super admin voids any cooperative's recording.
    done = await superadmin.json("POST", url, 200, json={"note": NOTE})
    assert done["status"] == "VOIDED"
    [audit] = await _audit(rt, payment["id"])
    assert audit.cooperative_id == demo["cooperative_id"]


async def test_refused_while_the_money_is_counted_here_for_another_payment(rt: Any, admin: Caller,
                                                                          demo: dict[str, Any]) -> None:
    """A statement line recorded (after a restore), then the gateway's own payment of that money completed by the
    provider with the same transaction id: counted on the recording only (the other's collected 0, flagged "counted
    there, not here"). Voiding the recording would leave money the provider reported taken counted nowhere."""
    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    asked = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, asked["id"])
        said = await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED,
                                              actor=Actor("provider:test", "provider"), provider_transaction_id=TXN)
    assert said == "completed"
    row = await _row(rt, asked["id"])
    assert (row.status, row.collected_minor, row.provider_transaction_id) == ("COMPLETED", 0, TXN)
    counted = _money(await admin.json("GET", "/v1/reports/reconciliation", 200))
    assert counted["settled"] == [("mtn_momo", 1, 50000, 50000)]

    refused = await admin.json("POST", f"/v1/payments/{recorded['id']}/void", 409, json={"note": NOTE})
    assert refused["message"] == (
        f"payment {asked['reference']} completed with the same provider transaction {TXN} on the provider's own "
        "word, its money counted on this recording: voided, it would be counted nowhere")
    assert (await _row(rt, recorded["id"])).status == "COMPLETED" and await _audit(rt, recorded["id"]) == []
    assert _money(await admin.json("GET", "/v1/reports/reconciliation", 200)) == counted


async def test_a_void_of_money_dated_in_a_closed_month_is_named_in_its_reconciliation(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A statement line recorded into last month (closed: the treasurer signed its `settled` figures off), voided
    this month: last month's collections shrink after it ended, and its reconciliation names the void that shrank
    them, as it names the money recorded into it later (paymentsRecordedLater)."""
    start, end = _last_month()
    period = f"from={_z(start)}&to={_z(end)}"
    payment = await admin.json("POST", "/v1/payments/recorded", 201,
                               json=_line(demo, completedAt=_z(start + timedelta(days=9))))
    closed = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _money(closed)["settled"] == [("mtn_momo", 1, 50000, 50000)]
    assert (closed["paymentsVoidedLater"], closed["paymentsVoidedLaterCount"]) == ([], 0)

    await admin.json("POST", f"/v1/payments/{payment['id']}/void", 200, json={"note": NOTE})
    [audit] = await _audit(rt, payment["id"])
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _money(reread)["settled"] == []
    assert reread["paymentsVoidedLater"] == [{
        "id": payment["id"], "reference": payment["reference"], "provider": "mtn_momo",
        "paymentMethod": "MOBILE_MONEY_MTN", "amount": 50000, "collected": 50000, "currency": "RWF",
        "completedAt": payment["completedAt"], "createdAt": payment["createdAt"], "voidedAt": _z(audit.at),
        "voidedBy": audit.actor, "note": NOTE, "providerTransactionId": TXN}]
    assert reread["paymentsVoidedLaterCount"] == 1
    # This month's report: nothing of it (its money was last month's), and nothing named.
    this_month = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(end)}", 200)
    assert (this_month["paymentsVoidedLater"], this_month["paymentsVoidedLaterCount"]) == ([], 0)
    assert _money(this_month)["settled"] == []


async def test_a_failed_refund_sent_back_after_the_void_is_recorded_and_flagged(rt: Any, admin: Caller,
                                                                                demo: dict[str, Any]) -> None:
    """A refund of the recording failed (so the void was allowed); the provider's statement then shows it sent back
    after all. The money left the cooperative's account: the refund is recorded COMPLETED (counted in `settled` as
    refunded), the payment stays VOIDED (final, never reopened) with what went back on it, flagged for a person."""
    payment = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, gatewayReference=str(uuid.uuid4())))
    url = f"/v1/payments/{payment['id']}"
    refund = await admin.json("POST", f"{url}/refunds", 201, json={"amount": 10000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:  # the provider refused it, and the submission is over
        await s.execute(update(Refund).where(Refund.id == refund["id"]).values(status="FAILED"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})

    done = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "note": "MTN statement: sent back on 2 Dec after all"})
    assert done["status"] == "COMPLETED"
    row = await _row(rt, payment["id"])
    assert (row.status, row.collected_minor, row.refunded_minor, row.mismatch) == ("VOIDED", 0, 10000, True)
    assert f"refund {refund['reference']} reported sent back" in (row.mismatch_detail or "")
    [audit] = await _audit(rt, payment["id"], "payment.refunded_after_void")
    assert (audit.after or {})["refunded"] == 10000
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(s["provider"], s["collected"], s["refunded"], s["net"]) for s in report["settled"]] == [
        ("mtn_momo", 0, 10000, -10000)]


async def test_a_line_recorded_into_a_closed_month_then_voided_nets_out_in_its_reconciliation(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A statement line recorded into last month after it ended (paymentsRecordedLater: its `settled` grew), then
    voided (paymentsVoidedLater: it shrank). The figures are back to what they were when the month ended, and the
    two lists still say so: the recording stays named in paymentsRecordedLater (VOIDED, with what it counted until
    the void), or the void alone would read as money taken off a figure that never counted it."""
    start, end = _last_month()
    period = f"from={_z(start)}&to={_z(end)}"
    at_end = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    payment = await admin.json("POST", "/v1/payments/recorded", 201,
                               json=_line(demo, completedAt=_z(start + timedelta(days=9))))
    grown = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert [(p["id"], p["status"], p["collected"]) for p in grown["paymentsRecordedLater"]] == [
        (payment["id"], "COMPLETED", 50000)]

    await admin.json("POST", f"/v1/payments/{payment['id']}/void", 200, json={"note": NOTE})
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _money(reread)["settled"] == _money(at_end)["settled"] == []
    assert [(p["id"], p["status"], p["collected"], p["providerTransactionId"])
            for p in reread["paymentsRecordedLater"]] == [(payment["id"], "VOIDED", 50000, TXN)]
    assert reread["paymentsRecordedLaterCount"] == 1
    assert [(p["id"], p["collected"]) for p in reread["paymentsVoidedLater"]] == [(payment["id"], 50000)]
    # What grew the figure after its end, less what shrank it: nothing, as `settled` says.
    assert sum(p["collected"] for p in reread["paymentsRecordedLater"]) == sum(
        p["collected"] for p in reread["paymentsVoidedLater"])


async def _period_ended() -> datetime:
    """The end of a period that ends now, to the second (as the report's `to` reads it): waited for, so that what
    follows happens after it."""
    end = (utcnow() + timedelta(seconds=1)).replace(microsecond=0)
    await asyncio.sleep((end - utcnow()).total_seconds() + 0.01)
    return end


def _asked(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the payments asked for in the period (by method, by type, totals)."""
    return {"byMethod": [(m["paymentMethod"], m["count"], m["completedCount"], m["completedAmount"])
                         for m in report["payments"]["byMethod"]],
            "byType": [(t["name"], t["count"], t["completedCount"], t["completedAmount"])
                       for t in report["payments"]["byPaymentType"]],
            "totals": [(t["currency"], t["collectedCount"], t["collected"]) for t in report["totals"]]}


async def test_a_payment_asked_for_in_a_closed_period_completed_after_it_then_voided_is_back_to_its_close(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Asked for in a period and given up in it; its money recorded after the period ended (dated then), then
    voided. The period's by-method and by-type figures (payments asked for in it) grew with the late recording (the
    payment named in `flagged`, late) and the void takes them back to what they were when the period ended: nothing
    is owed a list. Its `settled` lines never counted it (the money is dated after the period)."""
    start = utcnow().replace(microsecond=0) - timedelta(seconds=1)
    payment = await _given_up(admin, rt, demo)
    end = await _period_ended()
    period = f"from={_z(start)}&to={_z(end)}"
    closed = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _asked(closed) == {"byMethod": [("MOBILE_MONEY_MTN", 1, 0, 0)], "byType": [("Monthly Rent", 1, 0, 0)],
                              "totals": []}

    await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)
    grown = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _asked(grown) == {"byMethod": [("MOBILE_MONEY_MTN", 1, 1, 50000)],
                             "byType": [("Monthly Rent", 1, 1, 50000)], "totals": [("RWF", 1, 50000)]}
    assert [(f["id"], f["late"], f["flaggedIn"]) for f in grown["flagged"]] == [(payment["id"], True, ["created"])]

    await admin.json("POST", f"/v1/payments/{payment['id']}/void", 200, json={"note": NOTE})
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _asked(reread) == _asked(closed)
    assert reread["settled"] == closed["settled"] == []
    assert (reread["paymentsVoidedLater"], reread["paymentsRecordedLater"]) == ([], [])
    assert [(f["id"], f["status"], f["late"]) for f in reread["flagged"]] == [(payment["id"], "VOIDED", True)]


async def test_a_payment_asked_for_and_recorded_in_a_closed_period_then_voided_is_named_in_it(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """The other way a void can move a closed period's by-method and by-type figures: the payment was asked for and
    its money recorded before the period ended (counted in them when it closed). Then its money is dated in the
    period too (an /outcome's completedAt is neither before the request nor after the recording; a statement line
    recorded with POST /v1/payments/recorded is asked for when it is dated), so paymentsVoidedLater names the void,
    with the method and the amount the figures lost."""
    start = utcnow().replace(microsecond=0) - timedelta(seconds=1)
    payment = await _given_up(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json=RECORD)
    line = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, member="+250788000002", providerTransactionId="MTN-STMT-4822", completedAt=_z(utcnow())))
    end = await _period_ended()
    period = f"from={_z(start)}&to={_z(end)}"
    closed = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _asked(closed) == {"byMethod": [("MOBILE_MONEY_MTN", 2, 2, 100000)],
                              "byType": [("Monthly Rent", 2, 2, 100000)], "totals": [("RWF", 2, 100000)]}

    for voided in (payment, line):
        await admin.json("POST", f"/v1/payments/{voided['id']}/void", 200, json={"note": NOTE})
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _asked(reread) == {"byMethod": [("MOBILE_MONEY_MTN", 2, 0, 0)], "byType": [("Monthly Rent", 2, 0, 0)],
                              "totals": []}
    named = reread["paymentsVoidedLater"]
    assert sorted(v["id"] for v in named) == sorted([payment["id"], line["id"]])
    assert all(start <= datetime.fromisoformat(v[k]) < end for v in named for k in ("createdAt", "completedAt"))
    # What the closed figures lost is what the voids it names counted.
    lost = closed["payments"]["byMethod"][0]["completedAmount"] - reread["payments"]["byMethod"][0]["completedAmount"]
    assert lost == sum(v["collected"] for v in named if v["paymentMethod"] == "MOBILE_MONEY_MTN") == 100000


async def test_a_repeat_report_after_the_flag_was_reviewed_flags_nothing_again(rt: Any, admin: Caller,
                                                                              demo: dict[str, Any]) -> None:
    """The provider reports a voided payment's request paid, a person reviews the flag (the statement checked, the
    right line recorded), then the provider's retry of the same report (another event id) comes: audited, nothing
    flagged again. It set the payment back in the flagged lists, the review's finding written again as new."""
    payment = await _given_up(admin, rt, demo)
    url = f"/v1/payments/{payment['id']}"
    await admin.json("POST", f"{url}/outcome", 200, json=RECORD)
    await admin.json("POST", f"{url}/void", 200, json={"note": NOTE})

    async def report() -> str:
        async with rt.sessionmaker.begin() as s:
            return await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]),
                                                  ProviderOutcome.SUCCEEDED, actor=Actor("provider:test", "provider"),
                                                  provider_transaction_id="MP-9001")

    assert await report() == "flagged_success_after_void"
    reviewed = await admin.json("POST", f"{url}/review", 200,
                                json={"note": "statement checked: MP-9001 recorded as its own payment"})
    assert "transaction MP-9001 after the recording was voided" in reviewed["review"]["mismatchDetail"]
    assert await report() == "flagged_success_after_void"
    shown = await admin.json("GET", url, 200)
    assert (shown["status"], shown["mismatch"], shown["mismatchDetail"]) == ("VOIDED", False, None)
    assert shown["review"] == reviewed["review"]
    assert len(await _audit(rt, payment["id"], "payment.success_after_void")) == 2


async def test_a_short_recording_in_a_closed_month_then_voided_names_what_it_counted(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A given-up payment of last month whose statement line shows less taken than asked (30,000 of 50,000),
    recorded this month into last month, then voided: both lists name the 30,000 `settled` counted, not the amount
    asked."""
    start, end = _last_month()
    period = f"from={_z(start)}&to={_z(end)}"
    payment = await _given_up(admin, rt, demo)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(
            created_at=start + timedelta(days=8), expires_at=start + timedelta(days=8, minutes=5)))
    await admin.json("POST", f"/v1/payments/{payment['id']}/outcome", 200, json={
        **RECORD, "amount": 30000, "completedAt": _z(start + timedelta(days=9))})
    grown = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _money(grown)["settled"] == [("mtn_momo", 1, 30000, 30000)]
    assert [(p["id"], p["status"], p["amount"], p["collected"]) for p in grown["paymentsRecordedLater"]] == [
        (payment["id"], "COMPLETED", 50000, 30000)]

    await admin.json("POST", f"/v1/payments/{payment['id']}/void", 200, json={"note": NOTE})
    row = await _row(rt, payment["id"])
    assert (row.status, row.collected_minor, row.provider_transaction_id) == ("VOIDED", 0, None)
    reread = await admin.json("GET", f"/v1/reports/reconciliation?{period}", 200)
    assert _money(reread)["settled"] == []
    assert [(p["id"], p["status"], p["amount"], p["collected"], p["providerTransactionId"])
            for p in reread["paymentsRecordedLater"]] == [(payment["id"], "VOIDED", 50000, 30000, "MP-7781")]
    assert [(p["id"], p["amount"], p["collected"], p["providerTransactionId"])
            for p in reread["paymentsVoidedLater"]] == [(payment["id"], 50000, 30000, "MP-7781")]
