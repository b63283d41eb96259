"""One provider transaction id, one payment's money. After a restore of PostgreSQL an admin records the lost payment
from the provider's statement (POST /v1/payments/recorded, MTN's financialTransactionId X); the cooperative's system
then retries its original POST /v1/payments with the lost payment's key: a new payment, whose provider request id is
the lost one's, so MTN answers 409 and its status query says SUCCESSFUL with X. Before, the retry completed with X as
well, unflagged: the money counted twice in the reconciliation's `settled`, refundable twice. Now it completes (the
provider says the money moved: never dropped) flagged (mismatch, naming the other payment, audited), holding nothing
(collected 0: counted and refundable on the recorded payment only). The support desk finds both by the id
(GET /v1/payments?gatewayTransactionId=X)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from core.audit import Actor
from core.db import utcnow
from core.models import AuditEvent, OutboxJob, Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from providers.mtn_momo.simulator import TRANSACTIONS
from providers.simulation import STATE
from tests.admin_api.conftest import Caller, idem, make_payment, payment_body
from tests.admin_api.test_chargeback_visibility import _z
from tests.admin_api.test_retried_key_after_restore import _lose, mtn_simulator
from tests.conftest import behind_a_lock, drain, requires_pg, waiting_for_locks
from tests.providers.wires import due_now

PROVIDER = Actor("provider:test", "provider")


async def _audit(rt: Any, payment_id: str, action: str) -> list[AuditEvent]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent).where(AuditEvent.entity_id == payment_id,
                                                              AuditEvent.action == action))).scalars())


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment_id)
        assert row is not None
        return row


async def test_a_retry_after_the_restore_completing_with_a_recorded_id_is_flagged_and_counted_once(
        admin: Caller, rt: Any, demo: dict[str, Any], worker: Any, aiohttp_server: Any,
        coop_b: dict[str, Any]) -> None:
    async with mtn_simulator(rt, aiohttp_server) as app:
        state = app[STATE]
        body = payment_body(demo["payment_types"]["Monthly Rent"])
        first = await admin.json("POST", "/v1/payments", 201, json=body)
        await drain(worker)  # MTN prompts the member, who approves: the money is taken once, as X
        await state.idle()
        [taken] = app[TRANSACTIONS].values()
        x = taken["financialTransactionId"]

        await _lose(rt, first["id"])  # the restore
        # The admin records the lost payment from MTN's statement.
        recorded = await admin.json("POST", "/v1/payments/recorded", 201, json={
            "paymentTypeId": body["paymentTypeId"], "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": body["paymentAccount"], "providerTransactionId": x,
            "completedAt": _z(utcnow().replace(microsecond=0) - timedelta(minutes=5)),
            "note": "MTN statement of the restore's gap", "idempotencyKey": idem()})
        # Then the cooperative's system retries its timed-out request: MTN answers 409, its status says X.
        retry = await admin.json("POST", "/v1/payments", 201, json=body)
        await drain(worker)
        await due_now(rt, "payment.poll")
        await drain(worker)
        await state.idle()
    assert list(app[TRANSACTIONS]) == [first["gatewayReference"]]  # the member charged once

    done = await admin.json("GET", f"/v1/payments/{retry['id']}", 200)
    # Completed (the provider says the money moved), with X, but flagged and holding nothing.
    assert (done["status"], done["gatewayTransactionId"], done["mismatch"], done["collectedAmount"]) == (
        "COMPLETED", x, True, 0)
    assert done["mismatchDetail"] == (f"provider transaction {x} is held by payment {recorded['reference']} too: "
                                      "the same money recorded twice? counted there, not here")
    [audit] = await _audit(rt, retry["id"], "payment.transaction_id_held_twice")
    assert (audit.actor, audit.channel) == ("system", "worker")  # the poll that asked MTN
    assert audit.after == {"providerTransactionId": x, "heldBy": recorded["reference"], "heldById": recorded["id"],
                           "collected": 0}
    assert audit.cooperative_id == demo["cooperative_id"]
    # The recorded payment keeps the money: unflagged, collected.
    kept = await admin.json("GET", f"/v1/payments/{recorded['id']}", 200)
    assert (kept["mismatch"], kept["collectedAmount"]) == (False, 50000)
    # The cooperative's system is told the retry completed, flagged and holding nothing.
    async with rt.sessionmaker() as s:
        events = [j.payload["data"] for j in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "webhook.event"))).scalars() if j.payload["data"]["id"] == retry["id"]
            and j.payload["event_type"] == "payment.completed"]
    assert [(e["mismatch"], e["collectedAmount"]) for e in events] == [(True, 0)]
    # No second receipt for one payment (hers is the recorded one's), and nothing contested: the same cooperative.
    async with rt.sessionmaker() as s:
        jobs = list((await s.execute(select(OutboxJob))).scalars())
    assert [j for j in jobs if j.kind == "sms.send" and j.payload["context"].get("payment_id") == retry["id"]] == []
    assert [j for j in jobs if j.kind == "payment.contested"] == []
    assert await _audit(rt, recorded["id"], "payment.transaction_id_contested") == []

    # The reconciliation counts the money once (what MTN's statement shows), and lists the retry as flagged.
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    [line] = [lin for lin in report["settled"] if lin["provider"] == "mtn_momo"]
    assert line["collected"] == 50000
    assert [f["reference"] for f in report["flagged"]] == [done["reference"]]
    # Refunded once at most: the retry holds nothing to give back.
    await admin.json("POST", f"/v1/payments/{retry['id']}/refunds", 422, json={"idempotencyKey": idem()})

    # The support desk finds both by the id, newest first; another cooperative finds none.
    found = await admin.json("GET", f"/v1/payments?gatewayTransactionId={x}", 200)
    assert [p["id"] for p in found["data"]] == [retry["id"], recorded["id"]]
    assert (await coop_b["admin"].json("GET", f"/v1/payments?gatewayTransactionId={x}", 200))["data"] == []


async def _completed_holding(admin: Caller, rt: Any, demo: dict[str, Any], txn: str) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                              actor=PROVIDER, provider_transaction_id=txn) == "completed"
    return payment


async def test_money_reported_after_a_failure_with_a_held_id_is_flagged_and_held_nowhere_else(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    holder = await _completed_holding(admin, rt, demo, "MTN-HELD-1")
    failed = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, failed["id"]), ProviderOutcome.FAILED,
                                       actor=PROVIDER, reason="payer declined")
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(
            s, rt, await s.get(Payment, failed["id"]), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
            amount=Money(50_000, "RWF"), provider_transaction_id="MTN-HELD-1") == "flagged_success_after_failure"
    row = await _row(rt, failed["id"])
    assert (row.status, row.provider_transaction_id, row.collected_minor, row.mismatch) == (
        "FAILED", "MTN-HELD-1", 0, True)
    assert row.mismatch_detail.endswith(f"held by payment {holder['reference']} too: the same money recorded "
                                        "twice? counted there, not here")
    [audit] = await _audit(rt, failed["id"], "payment.transaction_id_held_twice")
    assert audit.after["heldById"] == holder["id"]
    [after] = await _audit(rt, failed["id"], "payment.success_after_failure")
    assert after.after["collected"] == 0  # the audit log alone says it holds nothing
    # Her money is the other payment's, whose receipt she has: no "the money was taken after all" for this one.
    async with rt.sessionmaker() as s:
        texts = [j.payload["template"] for j in (await s.execute(select(OutboxJob).where(
            OutboxJob.kind == "sms.send"))).scalars() if j.payload["context"].get("payment_id") == failed["id"]]
    assert texts == ["payment_failed"]


async def test_another_cooperatives_holder_is_not_named(admin: Caller, rt: Any, demo: dict[str, Any],
                                                          coop_b: dict[str, Any]) -> None:
    theirs = await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000,
                                paymentAccount="+250788999001")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, theirs["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, provider_transaction_id="MTN-B-1")
    ours = await _completed_holding(admin, rt, demo, "MTN-B-1")
    row = await _row(rt, ours["id"])
    # Another cooperative's holder never moves this payment's money (tests/admin_api/test_transaction_id_contested).
    assert (row.mismatch, row.collected_minor) == (True, None)
    assert row.mismatch_detail == ("provider transaction MTN-B-1 is recorded by another cooperative's payment too: "
                                   "counted here; check the provider's statement for whose money it is")
    assert theirs["reference"] not in row.mismatch_detail
    [audit] = await _audit(rt, ours["id"], "payment.transaction_id_held_twice")
    assert (audit.after["heldBy"], audit.after["heldById"]) == (None, None)
    [told] = await _audit(rt, theirs["id"], "payment.transaction_id_contested")
    assert told.cooperative_id == coop_b["cooperative_id"]
    # Each cooperative's search shows its own payment only.
    found = await admin.json("GET", "/v1/payments?gatewayTransactionId=MTN-B-1", 200)
    assert [p["id"] for p in found["data"]] == [ours["id"]]


async def _completed_by_query(admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    """M-Pesa's way: the payment holds the CheckoutRequestID from its request; a status query without a receipt
    completes it (nothing to compare: the provisional id is no money's id)."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(
            provider_transaction_id="ws_CO_1"))
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                              actor=PROVIDER, provisional_transaction_id="ws_CO_1") == "completed"
    row = await _row(rt, payment["id"])
    assert (row.provider_transaction_id, row.mismatch, row.collected_minor) == ("ws_CO_1", False, None)
    return payment


async def _late_receipt(rt: Any, payment: dict[str, Any]) -> Payment:
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(
            s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
            provider_transaction_id="RCPT-1", provisional_transaction_id="ws_CO_1") == "already_completed"
    return await _row(rt, payment["id"])


async def test_a_provisional_id_is_not_probed_and_a_late_receipt_held_elsewhere_counts_there(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """The late callback's receipt, held by another payment, is recorded and flagged; nothing of it refunded here,
    its money is counted and refundable on the other payment only (collected 0), as when the id comes with the
    completion."""
    holder = await _completed_holding(admin, rt, demo, "RCPT-1")
    payment = await _completed_by_query(admin, rt, demo)
    row = await _late_receipt(rt, payment)
    assert (row.provider_transaction_id, row.mismatch, row.collected_minor) == ("RCPT-1", True, 0)
    assert row.mismatch_detail == (f"provider transaction RCPT-1 is held by payment {holder['reference']} too: the "
                                   "same money recorded twice? counted there, not here")
    [audit] = await _audit(rt, payment["id"], "payment.transaction_id_held_twice")
    assert audit.after["collected"] == 0
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                     json={"reason": "charged twice", "idempotencyKey": "late-receipt-refund"})


async def test_a_late_receipt_held_elsewhere_leaves_money_being_refunded_as_it_is(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """A refund of the payment already holds its money (sent, or being sent): the payment keeps what it collected
    (the refund is paying it back from here) and is flagged for a person to check the statement."""
    holder = await _completed_holding(admin, rt, demo, "RCPT-1")
    payment = await _completed_by_query(admin, rt, demo)
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"reason": "charged twice", "idempotencyKey": "late-receipt-refund"})
    row = await _late_receipt(rt, payment)
    assert (row.provider_transaction_id, row.mismatch, row.collected_minor) == ("RCPT-1", True, None)
    assert row.mismatch_detail == (f"provider transaction RCPT-1 is held by payment {holder['reference']} too: the "
                                   "same money recorded twice? check the statement before refunding either")
    [audit] = await _audit(rt, payment["id"], "payment.transaction_id_held_twice")
    assert audit.after["collected"] is None


async def test_a_completion_with_its_own_id_again_is_not_flagged(admin: Caller, rt: Any,
                                                                  demo: dict[str, Any]) -> None:
    """A payment holding the id already (adopted from its callback) completing with it: itself, not another."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(provider_transaction_id="OWN-1"))
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED,
                                              actor=PROVIDER, provider_transaction_id="OWN-1") == "completed"
    row = await _row(rt, payment["id"])
    assert (row.mismatch, row.collected_minor) == (False, None)
    assert await _audit(rt, payment["id"], "payment.transaction_id_held_twice") == []


@requires_pg
async def test_two_completions_of_one_id_at_once_take_turns_and_one_is_flagged(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """Each completion holds its own payment's row lock: without the id's lock neither probe sees the other's
    uncommitted payment, and both complete unflagged. With it the second waits for the first's commit, then sees it."""
    one = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    two = await make_payment(admin, demo["payment_types"]["Monthly Rent"])

    async def complete(payment_id: str, started: asyncio.Event | None, go: asyncio.Event | None) -> str:
        async with rt.sessionmaker.begin() as s:
            payment = (await s.execute(select(Payment).where(Payment.id == payment_id).with_for_update())
                       ).scalar_one()
            result = await apply_collection_outcome(s, rt, payment, ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                                    provider_transaction_id="MTN-RACE-1")
            if started is not None and go is not None:
                started.set()
                await go.wait()  # the first's transaction is open, its payment written, not committed
        return result

    started, go = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(complete(one["id"], started, go))
    await started.wait()
    second = asyncio.create_task(complete(two["id"], None, None))
    await behind_a_lock(rt, second)
    assert not second.done()  # waiting for the id's lock
    go.set()
    assert (await first, await second) == ("completed", "completed")
    rows = [await _row(rt, one["id"]), await _row(rt, two["id"])]
    assert [(r.mismatch, r.collected_minor) for r in rows] == [(False, None), (True, 0)]
    async with rt.engine.connect() as conn:
        held = (await conn.execute(text("SELECT count(*) FROM payments WHERE provider_transaction_id = 'MTN-RACE-1'"))
                ).scalar_one()
    assert held == 2  # both recorded: nothing the provider said is dropped


@pytest.mark.parametrize(("query", "message"), [
    ("gatewayTransactionId=", "gatewayTransactionId must not be empty"),
    ("gatewayTransactionId=%20%20", "gatewayTransactionId must not be empty"),
    (f"gatewayTransactionId={'X' * 129}", "gatewayTransactionId is too long"),
    ("gatewayTransactionId=A&gatewayTransactionId=B", "query parameter gatewayTransactionId is given more than once"),
    ("gatewayTransactionId=A%00B", "gatewayTransactionId contains characters that are not allowed"),
])
async def test_a_bad_transaction_id_search_is_refused(admin: Caller, query: str, message: str) -> None:
    refused = await admin.json("GET", f"/v1/payments?{query}", 400)
    assert message in str(refused)


async def test_the_search_is_exact_and_combines_with_other_filters(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    payment = await _completed_holding(admin, rt, demo, "MTN-Case-7")
    await _completed_holding(admin, rt, demo, "MTN-OTHER-8")
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?gatewayTransactionId=MTN-Case-7", 200))["data"]
            ] == [payment["id"]]
    assert (await admin.json("GET", "/v1/payments?gatewayTransactionId=mtn-case-7", 200))["data"] == []
    # Copied from a statement with spaces around it: found, as its recording drops them.
    assert [p["id"] for p in (await admin.json("GET", "/v1/payments?gatewayTransactionId=%20MTN-Case-7%20%20", 200)
                              )["data"]] == [payment["id"]]
    assert (await admin.json("GET", "/v1/payments?gatewayTransactionId=MTN-Case-7&status=FAILED", 200)
            )["data"] == []
    spec = await admin.json("GET", "/v1/openapi.json", 200)
    params = {p["name"]: p for p in spec["paths"]["/v1/payments"]["get"]["parameters"]}
    assert params["gatewayTransactionId"]["in"] == "query"
    assert "provider's id of the money" in params["gatewayTransactionId"]["description"]


@requires_pg  # PostgreSQL's advisory locks and lock_timeout
async def test_a_callback_takes_the_ids_lock_after_its_payments_row_and_probes_after_both(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """A success callback takes the transaction id's lock in the statement that locks its payment (one round trip
    fewer): its row first, then the id's lock, the order every path takes them in (a completion under the id's
    lock never waits for a row). The probe for another payment holding the id runs after both: it sees the payment
    that completed with the id while the callback waited."""
    from core.ports import EventKind, ProviderEvent
    from core.provider_events import handle_provider_event

    one = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    two = await _row(rt, (await make_payment(admin, demo["payment_types"]["Monthly Rent"]))["id"])
    callback = ProviderEvent(provider=two.provider, kind=EventKind.COLLECTION, event_id="cb-held-1",
                             reference=two.provider_reference, outcome=ProviderOutcome.SUCCEEDED,
                             provider_transaction_id="MTN-RACE-2")
    async with rt.engine.connect() as other:
        await other.begin()
        await other.execute(text("SET LOCAL lock_timeout = '5s'"))
        # Another completion of the id holds its lock (core.transaction_ids._ID_LOCK's key).
        await other.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"collected:{two.provider}:MTN-RACE-2"})
        task = asyncio.create_task(handle_provider_event(rt, callback))
        await waiting_for_locks(rt, 1, "advisory")
        async with rt.engine.connect() as probe:
            with pytest.raises(DBAPIError, match="could not obtain lock"):
                await probe.execute(text("SELECT id FROM payments WHERE id = :id FOR UPDATE NOWAIT"),
                                    {"id": two.id})
        assert not task.done()
        # The other completion writes its payment with the id and commits: the callback's probe must see it.
        await other.execute(update(Payment).where(Payment.id == one["id"])
                            .values(status="COMPLETED", provider_transaction_id="MTN-RACE-2"))
        await other.commit()
    assert await task == "completed"
    flagged = await _row(rt, two.id)
    assert (flagged.status, flagged.mismatch, flagged.collected_minor) == ("COMPLETED", True, 0)
    assert one["reference"] in flagged.mismatch_detail
    assert len(await _audit(rt, two.id, "payment.transaction_id_held_twice")) == 1
