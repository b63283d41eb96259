"""A provider transaction id names one payment of one cooperative (the provider accounts are the deployment's). When
cooperative B's admin records from a statement (POST /v1/payments/recorded) an id that is really cooperative A's money
(a typo, or a guess: receipts' ids are guessable) and A's genuine payment then completes with it, A's payment keeps its
money, its member's receipt and its place in A's reconciliation; both payments are flagged for a person (A's at once,
B's by a job, payment.contested), each cooperative audited on its own payment, neither naming the other. Before, A's
payment was left holding nothing (collected 0), texted no receipt and dropped from A's `settled`, while B's wrong
record counted the money: one cooperative's admin changed another's books."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.transaction_ids import CONTESTED_JOB
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, idem, make_payment, payment_body
from tests.admin_api.test_chargeback_visibility import _z
from tests.admin_api.test_retried_key_after_restore import mtn_simulator
from tests.admin_api.test_transaction_id_held_twice import (
    PROVIDER,
    _audit,
    _completed_by_query,
    _late_receipt,
    _row,
)
from tests.conftest import drain
from tests.providers.wires import due_now

X = "7700112233"


def _ours(txn: str) -> str:
    """A's flag: the money counted on A's payment, the statement to check, the other cooperative not named."""
    return (f"provider transaction {txn} is recorded by another cooperative's payment too: counted here; check the "
            "provider's statement for whose money it is")


def _theirs(txn: str) -> str:
    """B's flag, set by the job."""
    return (f"provider transaction {txn} is recorded by another cooperative's payment too: counted here too; check "
            "the provider's statement for whose money it is")


async def _b_records(coop_b: dict[str, Any], txn: str) -> dict[str, Any]:
    """B's admin records, from a statement, a line with A's transaction id."""
    return dict(await coop_b["admin"].json("POST", "/v1/payments/recorded", 201, json={
        "paymentTypeId": coop_b["payment_type_id"], "amount": 1000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "+250788999001", "providerTransactionId": txn,
        "completedAt": _z(utcnow().replace(microsecond=0) - timedelta(minutes=5)),
        "note": "MTN statement, line 7", "idempotencyKey": idem()}))


async def _jobs(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind).order_by(OutboxJob.id)))
                    .scalars())


async def _contested(rt: Any, holder: dict[str, Any], coop_b: dict[str, Any], txn: str) -> AuditEvent:
    """B's cooperative is told on its own payment, naming no other cooperative: one audit row and one job."""
    [audit] = await _audit(rt, holder["id"], "payment.transaction_id_contested")
    assert (audit.cooperative_id, audit.entity_type, audit.after) == (
        coop_b["cooperative_id"], "payment", {"providerTransactionId": txn})
    [job] = await _jobs(rt, CONTESTED_JOB)
    assert (job.cooperative_id, job.payload) == (coop_b["cooperative_id"],
                                                 {"payment_id": holder["id"], "provider_transaction_id": txn})
    return audit


async def test_another_cooperatives_recording_of_the_id_leaves_a_genuine_payment_its_money(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any, coop_b: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("providers.mtn_momo.simulator.new_id", lambda size=10: X)  # MTN's id of A's money
    theirs = await _b_records(coop_b, X)
    async with mtn_simulator(rt, aiohttp_server) as app:
        ours = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
        await drain(worker)  # MTN prompts A's member, who approves: the money is taken, as X
        await app[STATE].idle()
        await due_now(rt, "payment.poll")
        await drain(worker)  # the poll: MTN's status says SUCCESSFUL, with X
    receipts = [j for j in await _jobs(rt, "sms.send") if j.payload["context"].get("payment_id") == ours["id"]]
    # A's payment: completed with X, keeps its money, flagged for a person without naming B.
    done = await admin.json("GET", f"/v1/payments/{ours['id']}", 200)
    assert (done["status"], done["gatewayTransactionId"], done["collectedAmount"], done["mismatch"]) == (
        "COMPLETED", X, 50000, True)
    assert done["mismatchDetail"] == _ours(X)
    assert theirs["reference"] not in json.dumps(done) and theirs["id"] not in json.dumps(done)
    # Its member is texted her receipt.
    assert [(j.payload["template"], j.cooperative_id) for j in receipts] == [
        ("payment_receipt", demo["cooperative_id"])]
    [audit] = await _audit(rt, ours["id"], "payment.transaction_id_held_twice")
    assert (audit.cooperative_id, audit.after) == (demo["cooperative_id"], {
        "providerTransactionId": X, "heldBy": None, "heldById": None, "collected": None})  # None: the amount asked
    # A's reconciliation counts the money and lists the payment as flagged.
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    [line] = [lin for lin in report["settled"] if lin["provider"] == "mtn_momo"]
    assert line["collected"] == 50000
    assert [f["reference"] for f in report["flagged"]] == [done["reference"]]

    # B's cooperative: told on its own payment (audit, then flagged by the job the worker ran), nothing of A's.
    contested = await _contested(rt, theirs, coop_b, X)
    assert contested.actor == "system"  # the poll that asked MTN
    [job] = await _jobs(rt, CONTESTED_JOB)
    assert job.status == "DONE"
    b = coop_b["admin"]
    flagged = await b.json("GET", "/v1/payments?mismatch=true", 200)
    assert [(p["id"], p["collectedAmount"], p["mismatchDetail"]) for p in flagged["data"]] == [
        (theirs["id"], 1000, _theirs(X))]
    assert [p["id"] for p in (await b.json("GET", f"/v1/payments?gatewayTransactionId={X}", 200))["data"]] == [
        theirs["id"]]
    await b.json("GET", f"/v1/payments/{ours['id']}", 404)
    b_report = await b.json("GET", "/v1/reports/reconciliation", 200)
    assert [f["reference"] for f in b_report["flagged"]] == [theirs["reference"]]
    audit_b = await b.json("GET", "/v1/audit-events?limit=100", 200)
    assert [(e["entityId"], e["after"]) for e in audit_b["data"] if e["action"] == "payment.transaction_id_contested"
            ] == [(theirs["id"], {"providerTransactionId": X})]
    seen = json.dumps([audit_b, flagged, b_report])
    for of_a in (ours["id"], ours["reference"], demo["cooperative_id"]):
        assert of_a not in seen
    # The job again (a repeat) flags nothing twice.
    async with rt.sessionmaker.begin() as s:
        from core.transaction_ids import flag_contested

        await flag_contested(s, theirs["id"], X)
    assert (await _row(rt, theirs["id"])).mismatch_detail == _theirs(X)


async def test_money_reported_after_a_failure_is_kept_when_another_cooperative_recorded_its_id(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    theirs = await _b_records(coop_b, "MTN-XC-2")
    failed = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, failed["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="payer declined")
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(
            s, rt, await s.get(Payment, failed["id"]), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
            amount=Money(50_000, "RWF"), provider_transaction_id="MTN-XC-2") == "flagged_success_after_failure"
    row = await _row(rt, failed["id"])
    assert (row.status, row.provider_transaction_id, row.collected_minor, row.mismatch) == (
        "FAILED", "MTN-XC-2", 50_000, True)
    assert row.mismatch_detail.endswith(f"after the payment had failed; {_ours('MTN-XC-2')}")
    [audit] = await _audit(rt, failed["id"], "payment.transaction_id_held_twice")
    assert audit.after == {"providerTransactionId": "MTN-XC-2", "heldBy": None, "heldById": None,
                           "collected": 50_000}
    [after] = await _audit(rt, failed["id"], "payment.success_after_failure")
    assert after.after["collected"] == 50_000  # the audit log alone says it holds the money
    # Counted here: the member told it failed is texted that the money was taken after all.
    async with rt.sessionmaker() as s:
        texts = [j.payload["template"] for j in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "sms.send"))).scalars() if j.payload["context"].get("payment_id") == failed["id"]]
    assert texts == ["payment_failed", "payment_taken_after_failure"]
    contested = await _contested(rt, theirs, coop_b, "MTN-XC-2")
    assert contested.actor == "provider:test"
    # Refundable here: the money is A's member's to get back.
    async with rt.sessionmaker() as s:
        from core.refunds import collected

        assert collected(await s.get(Payment, failed["id"])) == 50_000


async def test_a_late_receipt_another_cooperative_recorded_leaves_the_money_counted_here(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    theirs = await _b_records(coop_b, "RCPT-1")
    payment = await _completed_by_query(admin, rt, demo)
    row = await _late_receipt(rt, payment)
    assert (row.provider_transaction_id, row.mismatch, row.collected_minor) == ("RCPT-1", True, None)
    assert row.mismatch_detail == _ours("RCPT-1")
    [audit] = await _audit(rt, payment["id"], "payment.transaction_id_held_twice")
    assert audit.after == {"providerTransactionId": "RCPT-1", "heldBy": None, "heldById": None, "collected": None}
    await _contested(rt, theirs, coop_b, "RCPT-1")
    # Still refundable here: its money was never moved to B's payment.
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"reason": "charged twice", "idempotencyKey": "late-receipt-refund"})
