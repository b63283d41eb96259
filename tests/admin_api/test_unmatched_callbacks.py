"""A provider's callback for a payment the gateway does not have (PostgreSQL restored to an earlier point, say):
answered "unknown_payment" so that the provider stops sending it, and then counted, logged at ERROR when it says
money was taken, listed for a super admin (GET /v1/provider-callbacks) and resolved with a note. Before, it was
kept only in provider_events, which nothing read.

The same for a refund callback that matches no refund ("unknown_refund"): a refund the provider paid out (money out
of the cooperative's account) that a restore lost was kept with no outcome and its whole body, logged as a
WARNING with no ids, counted nowhere, listed nowhere and never pruned."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text

from core import metrics
from core.models import AuditEvent, ProviderEvent
from core.payments import create_payment
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from core.refunds import request_refund
from tests.admin_api.conftest import Caller, make_payment
from tests.conftest import drain
from tests.providers.wires import ADMIN, Routes, completed, mtn_adapter, mtn_payment, mtn_wire

PAYER = "250788000002"
LIST = "/v1/provider-callbacks?unmatched=true&resolved=false"


def _unmatched(provider: str, outcome: str, kind: str = "collection") -> float:
    return metrics.REGISTRY.get_sample_value(
        "gateway_callbacks_unmatched_total", {"provider": provider, "kind": kind, "outcome": outcome}) or 0.0


async def _lost_payment_reference(rt: Any, admin: Caller, demo: dict[str, Any]) -> str:
    """A payment made, then lost with a restore to a point before it: its row and jobs are gone."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_MTN",
                                 paymentAccount=f"+{PAYER}")
    async with rt.engine.begin() as conn:
        reference = (await conn.execute(text("SELECT provider_reference FROM payments WHERE id = :i"),
                                        {"i": payment["id"]})).scalar_one()
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM payments WHERE id = :i"), {"i": payment["id"]})
    return str(reference)


async def _mtn_callback(client: Any, reference: str, status: str = "SUCCESSFUL", txn: str = "MTN-9911") -> Any:
    body = {"referenceId": reference, "externalId": reference, "status": status, "financialTransactionId": txn,
            "amount": "50000", "currency": "RWF", "payer": {"partyIdType": "MSISDN", "partyId": PAYER}}
    answer = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert answer.status == 200, await answer.text()
    return await answer.json()


async def _ops(caller: Caller) -> dict[str, Any]:
    answer = await caller.req("GET", "/ops/data")
    assert answer.status == 200, await answer.text()
    return dict(await answer.json())


async def test_money_taken_for_a_payment_lost_in_a_restore_is_counted_logged_and_listed(
        rt: Any, client: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    before = _unmatched("mtn_momo", "SUCCEEDED")
    with caplog.at_level(logging.WARNING, logger="gateway.payments"):
        ack = await _mtn_callback(client, reference)
    assert ack["result"] == "unknown_payment"  # acknowledged: MTN will not send it again

    assert _unmatched("mtn_momo", "SUCCEEDED") == before + 1
    [line] = [r for r in caplog.records if r.name == "gateway.payments" and r.levelno >= logging.WARNING]
    assert line.levelno == logging.ERROR and "money was taken" in line.getMessage()
    fields = line.__dict__
    assert (fields["provider"], fields["reference"], fields["provider_transaction_id"], fields["outcome"]) == (
        "mtn_momo", reference, "MTN-9911", "SUCCEEDED")
    assert fields["event_id"] and fields["confirmed"] is False  # MTN's callbacks are unsigned
    assert PAYER not in line.getMessage() and PAYER not in json.dumps(fields, default=str)

    listed = await superadmin.json("GET", LIST, 200)
    [shown] = listed["data"]
    assert listed["meta"]["total"] == 1
    assert (shown["provider"], shown["kind"], shown["status"], shown["outcome"], shown["resolution"]) == (
        "mtn_momo", "collection", "SUCCEEDED", "unknown_payment", None)
    assert shown["payload"]["financialTransactionId"] == "MTN-9911"  # to match with MTN's statement
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 1, "refundsPaidUnresolved": 0}
    # It names no cooperative: a cooperative admin's page does not count it.
    assert (await _ops(admin))["unmatchedCallbacks"] is None


async def test_a_super_admin_resolves_one_with_a_note_once(
        rt: Any, client: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference)
    [shown] = (await superadmin.json("GET", LIST, 200))["data"]
    note = "MTN statement line MTN-9911: 50,000 RWF credited to the member's rent by hand"

    resolved = await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 200,
                                     json={"note": f"  {note} "})
    assert resolved["outcome"] == "unknown_payment_resolved"
    assert resolved["resolution"]["note"] == note and resolved["resolution"]["by"].startswith("admin:")
    assert resolved["payload"] == shown["payload"]  # the provider's body as it came
    again = await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 409,
                                  json={"note": "a second note"})
    assert "resolved already" in json.dumps(again)

    assert (await superadmin.json("GET", LIST, 200))["data"] == []
    [done] = (await superadmin.json("GET", "/v1/provider-callbacks?resolved=true", 200))["data"]
    assert done["id"] == shown["id"] and done["resolution"]["note"] == note
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 0, "refundsPaidUnresolved": 0}
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "provider_callback.resolved"))).scalars().all()
        row = await s.get(ProviderEvent, shown["id"])
    assert (audit.entity_type, audit.entity_id, audit.cooperative_id) == ("provider_event", shown["id"], None)
    assert audit.before == {"outcome": "unknown_payment"}
    assert audit.after["note"] == note and audit.after["outcome"] == "unknown_payment_resolved"
    assert row is not None and row.outcome == "unknown_payment_resolved"


async def test_only_a_super_admin_and_only_for_callbacks_that_matched_nothing(
        rt: Any, client: Any, admin: Caller, tenant: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference)
    [shown] = (await superadmin.json("GET", LIST, 200))["data"]
    # They name no cooperative: a cooperative admin sees none (scoped as every list) and cannot resolve one (its
    # id answers as a missing one); a tenant is refused the routes.
    assert (await admin.json("GET", LIST, 200))["data"] == []
    await admin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 404, json={"note": "mine now"})
    await tenant.json("GET", LIST, 403)
    await tenant.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 403, json={"note": "mine now"})

    # A callback that matched its payment is not one of these.
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    matched = str(uuid.uuid4())
    async with rt.sessionmaker.begin() as s:
        s.add(ProviderEvent(id=matched, provider="mtn_momo", event_id="cb-paid", payment_id=paid["id"],
                            kind="collection", status="SUCCEEDED", payload={}, outcome="completed"))
    await superadmin.json("POST", f"/v1/provider-callbacks/{matched}/resolve", 404, json={"note": "not this one"})
    await superadmin.json("POST", "/v1/provider-callbacks/not-an-id/resolve", 404, json={"note": "not this one"})
    assert [r["id"] for r in (await superadmin.json("GET", LIST, 200))["data"]] == [shown["id"]]  # still open

    await superadmin.json("GET", "/v1/provider-callbacks?unmatched=false", 400)
    await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 400, json={"note": "ok"})
    await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 400, json={})


async def test_newest_first_and_filtered(rt: Any, client: Any, superadmin: Caller, demo: dict[str, Any],
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Signed callbacks (no status query) for no payment take the same path: a failure is a WARNING."""
    before = _unmatched("airtel", "FAILED")
    with caplog.at_level(logging.WARNING, logger="gateway.payments"):
        for n, outcome in enumerate((ProviderOutcome.SUCCEEDED, ProviderOutcome.FAILED, ProviderOutcome.SUCCEEDED)):
            event = Event(provider="airtel", kind=EventKind.COLLECTION, event_id=f"ghost-{n}", reference=f"ref-{n}",
                          outcome=outcome, provider_transaction_id=f"AT-{n}", raw={"n": n})
            assert await handle_provider_event(rt, event) == "unknown_payment"
    assert await handle_provider_event(rt, event) == "duplicate"  # counted and logged once
    assert _unmatched("airtel", "FAILED") == before + 1
    levels = [(r.levelname, r.__dict__["event_id"]) for r in caplog.records if r.name == "gateway.payments"]
    assert levels == [("ERROR", "ghost-0"), ("WARNING", "ghost-1"), ("ERROR", "ghost-2")]

    everything = await superadmin.json("GET", "/v1/provider-callbacks", 200)
    assert [r["eventId"] for r in everything["data"]] == ["ghost-2", "ghost-1", "ghost-0"]
    taken = await superadmin.json("GET", "/v1/provider-callbacks?status=SUCCEEDED&provider=airtel&limit=1", 200)
    assert [r["eventId"] for r in taken["data"]] == ["ghost-2"]
    assert (taken["meta"]["total"], taken["meta"]["hasNext"]) == (2, True)
    assert (await superadmin.json("GET", "/v1/provider-callbacks?provider=mpesa", 200))["data"] == []


async def test_the_ops_page_counts_every_unresolved_callback_a_person_must_resolve(
        rt: Any, superadmin: Caller) -> None:
    """As prune keeps them: any status but one saying no money moved (an AMBIGUOUS or PENDING one may be money
    taken or paid out), not only SUCCEEDED ones."""
    for kind, answer in ((EventKind.COLLECTION, "unknown_payment"), (EventKind.REFUND, "unknown_refund")):
        for outcome in ProviderOutcome:
            event = Event(provider="airtel", kind=kind, event_id=f"ops-{kind.value}-{outcome.value}",
                          reference=f"ref-{kind.value}-{outcome.value}", outcome=outcome, raw={})
            assert await handle_provider_event(rt, event) == answer
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 3, "refundsPaidUnresolved": 3}
    listed = await superadmin.json("GET", "/v1/provider-callbacks?unmatched=true&resolved=false&kind=collection", 200)
    assert listed["meta"]["total"] == len(ProviderOutcome)


PAYEE = "250788000001"
REFUND_STATUS = "/disbursement/v1_0/refund/*"
LOGGERS = ("gateway.payments", "gateway.refunds")


async def _lost_refund_reference(rt: Any, demo: dict[str, Any], worker: Any) -> tuple[str, Routes]:
    """A refund sent to MTN, then lost with a restore to a point after its payment but before the refund: its row
    and jobs are gone, while MTN has it (and pays it out)."""
    wire = mtn_wire().on("POST", "/disbursement/v1_0/refund", 202)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=demo["cooperative_id"],
                                         amount=None, reason="duplicate payment", idempotency_key="refund-lost-1",
                                         actor=ADMIN)
    await drain(worker)
    assert [r.headers["X-Reference-Id"] for r in wire.sent("POST", "/disbursement/v1_0/refund")] == [
        refund.provider_reference]
    async with rt.engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM refunds WHERE id = :i"), {"i": refund.id})
    return refund.provider_reference, wire


async def _mtn_refund_callback(client: Any, reference: str, status: str = "SUCCESSFUL") -> Any:
    body = {"amount": "50000", "currency": "RWF", "financialTransactionId": "RF-4411", "externalId": reference,
            "payee": {"partyIdType": "MSISDN", "partyId": PAYEE}, "status": status}
    answer = await client.put(f"/webhooks/payments/mtn_momo?ref={reference}&kind=refund", json=body)
    assert answer.status == 200, await answer.text()
    return await answer.json()


async def test_a_refund_paid_out_for_a_refund_lost_in_a_restore_is_counted_logged_listed_and_resolved(
        rt: Any, client: Any, worker: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    reference, wire = await _lost_refund_reference(rt, demo, worker)
    before = _unmatched("mtn_momo", "SUCCEEDED", kind="refund")
    with caplog.at_level(logging.WARNING):
        ack = await _mtn_refund_callback(client, reference)
    assert ack["result"] == "unknown_refund"  # acknowledged: MTN will not send it again
    # MTN's callbacks are unsigned, but there is no refund of ours to ask MTN about: no status query.
    assert wire.sent("GET", REFUND_STATUS) == []

    assert _unmatched("mtn_momo", "SUCCEEDED", kind="refund") == before + 1
    [line] = [r for r in caplog.records if r.name in LOGGERS and r.levelno >= logging.WARNING]
    assert (line.name, line.levelno) == ("gateway.refunds", logging.ERROR)
    assert "refund was paid out" in line.getMessage()
    fields = line.__dict__
    assert (fields["provider"], fields["kind"], fields["reference"], fields["provider_transaction_id"],
            fields["outcome"], fields["confirmed"]) == ("mtn_momo", "refund", reference, "RF-4411", "SUCCEEDED", False)
    assert PAYEE not in line.getMessage() and PAYEE not in json.dumps(fields, default=str)

    async with rt.sessionmaker() as s:
        [row] = (await s.execute(select(ProviderEvent).where(ProviderEvent.kind == "refund"))).scalars().all()
    assert (row.outcome, row.status, row.payment_id) == ("unknown_refund", "SUCCEEDED", None)

    [shown] = (await superadmin.json("GET", LIST, 200))["data"]
    assert (shown["id"], shown["provider"], shown["kind"], shown["status"], shown["outcome"]) == (
        row.id, "mtn_momo", "refund", "SUCCEEDED", "unknown_refund")
    assert shown["payload"]["financialTransactionId"] == "RF-4411"  # to match with MTN's statement
    assert [r["id"] for r in (await superadmin.json("GET", f"{LIST}&kind=refund", 200))["data"]] == [row.id]
    assert (await superadmin.json("GET", f"{LIST}&kind=collection", 200))["data"] == []
    await superadmin.json("GET", f"{LIST}&kind=payout", 400)
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 0, "refundsPaidUnresolved": 1}
    assert (await admin.json("GET", LIST, 200))["data"] == []  # it names no cooperative

    note = "MTN statement RF-4411: 50,000 RWF paid back to the member, booked by hand"
    resolved = await superadmin.json("POST", f"/v1/provider-callbacks/{row.id}/resolve", 200, json={"note": note})
    assert (resolved["outcome"], resolved["resolution"]["note"]) == ("unknown_refund_resolved", note)
    await superadmin.json("POST", f"/v1/provider-callbacks/{row.id}/resolve", 409, json={"note": "again"})
    assert (await superadmin.json("GET", LIST, 200))["data"] == []
    [done] = (await superadmin.json("GET", "/v1/provider-callbacks?resolved=true&kind=refund", 200))["data"]
    assert done["id"] == row.id
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 0, "refundsPaidUnresolved": 0}
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "provider_callback.resolved"))).scalars().all()
    assert audit.before == {"outcome": "unknown_refund"}
    assert (audit.after["outcome"], audit.after["kind"], audit.after["note"]) == (
        "unknown_refund_resolved", "refund", note)


async def test_signed_callbacks_for_no_refund_or_payment_keep_a_bounded_body(
        rt: Any, superadmin: Caller, demo: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A signed callback (no status query: M-Pesa's reversal result, say) is stored whole before its refund or
    payment is looked for; one that matches none keeps at most 2 KiB of it, as an unsigned one does. A refund
    that did not go through is a WARNING."""
    big = {"ConversationID": "AG_lost", "junk": "x" * 20_000}
    before = _unmatched("mpesa", "FAILED", kind="refund")
    with caplog.at_level(logging.WARNING):
        for n, (kind, outcome) in enumerate(((EventKind.REFUND, ProviderOutcome.FAILED),
                                             (EventKind.REFUND, ProviderOutcome.SUCCEEDED),
                                             (EventKind.COLLECTION, ProviderOutcome.SUCCEEDED))):
            event = Event(provider="mpesa", kind=kind, event_id=f"lost-{n}", reference=f"AG_lost_{n}",
                          outcome=outcome, provider_transaction_id=f"RV-{n}", raw={**big, "n": n})
            assert await handle_provider_event(rt, event) == f"unknown_{'refund' if n < 2 else 'payment'}"
    assert await handle_provider_event(rt, event) == "duplicate"
    assert _unmatched("mpesa", "FAILED", kind="refund") == before + 1
    assert [(r.name, r.levelname, r.__dict__["event_id"]) for r in caplog.records if r.name in LOGGERS] == [
        ("gateway.refunds", "WARNING", "lost-0"), ("gateway.refunds", "ERROR", "lost-1"),
        ("gateway.payments", "ERROR", "lost-2")]

    async with rt.sessionmaker() as s:
        rows = {e.event_id: e for e in (await s.execute(select(ProviderEvent))).scalars()}
    assert {k: (e.kind, e.outcome) for k, e in rows.items()} == {
        "lost-0": ("refund", "unknown_refund"), "lost-1": ("refund", "unknown_refund"),
        "lost-2": ("collection", "unknown_payment")}
    for row in rows.values():
        assert set(row.payload) == {"truncated"} and row.payload["truncated"]["bytes"] > 20_000
    listed = await superadmin.json("GET", "/v1/provider-callbacks?kind=refund&status=SUCCEEDED", 200)
    assert [r["eventId"] for r in listed["data"]] == ["lost-1"]
