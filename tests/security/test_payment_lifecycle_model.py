"""A model-based property test of one cooperative's payments through the gateway's real paths.

Hypothesis draws a random program: payments asked for through `POST /v1/payments` (and the same keys replayed),
MTN MoMo deciding them and calling back through `/webhooks/payments/mtn_momo` (honest, forged, duplicated, late),
the worker's collect, poll and watch jobs, cancels, admins' recordings and voids, partial and full refunds with
their own callbacks and polls, refund withdrawals, and disputes opened and settled. MTN is faked at its wire
(tests.providers.wires) by a small model of its own truth: what its status endpoints answer is what it decided,
so every callback is confirmed by a real status query, as in production. After every step the database and the
API are checked against what must always hold, whatever the order the program took.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from channels.sms.jobs import RECEIPT_TEMPLATES
from core.db import utcnow
from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.payments import collected_amount
from core.state.payment import COLLECTED, OPEN_VALUES, PAYMENT, PaymentStatus, taken_after_failure
from tests.admin_api.conftest import check_shape, payment_body
from tests.conftest import drain, make_settings, requires_pg
from tests.providers.wires import Routes, mtn_adapter, mtn_wire

pytestmark = requires_pg

COLLECT = "/collection/v1_0/requesttopay"
REFUND = "/disbursement/v1_0/refund"
# What MTN's decision makes of a payment (core.provider_events._FAILED_TARGET through the adapter's reason codes).
DECIDED = {("SUCCESSFUL", None): "COMPLETED", ("FAILED", "NOT_ENOUGH_FUNDS"): "FAILED",
           ("FAILED", "APPROVAL_REJECTED"): "CANCELLED"}
# What a payer does with the prompt, most often paying (a program must reach money taken to test refunds).
CHOICES = [("SUCCESSFUL", None)] * 3 + [("FAILED", "NOT_ENOUGH_FUNDS"), ("FAILED", "APPROVAL_REJECTED")]
POLLED_KINDS = ("payment.poll", "payment.watch", "refund.submit", "refund.poll")
# More with LIFECYCLE_EXAMPLES (a search for defects; past 15 minutes the admin's access token expires).
LIFECYCLE = hypothesis_settings(max_examples=int(os.environ.get("LIFECYCLE_EXAMPLES", "25")), deadline=None,
                                suppress_health_check=list(HealthCheck))


@pytest.fixture
def settings(migrated_database: str) -> Any:
    """The suite's settings with rate limits off: a program makes more payments a minute than one client may."""
    return make_settings(RATE_LIMIT_MULTIPLIER="0")


@dataclass
class Mtn:
    """MTN MoMo as the gateway sees it over the wire: what it was asked, and what it decided."""

    collections: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)  # ref -> decision
    refunds: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)
    amounts: dict[str, str] = field(default_factory=dict)
    planned: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)  # decided before received

    def wire(self) -> Routes:
        return (mtn_wire().on("POST", COLLECT, self._received(self.collections))
                .on("POST", REFUND, self._received(self.refunds))
                .on("GET", f"{COLLECT}/*", self._status(self.collections))
                .on("GET", f"{REFUND}/*", self._status(self.refunds)))

    def _received(self, book: dict[str, Any]) -> Any:
        def answer(request: httpx.Request) -> httpx.Response:
            ref = request.headers["X-Reference-Id"]
            book.setdefault(ref, self.planned.pop(ref, ("PENDING", None, None)))
            self.amounts[ref] = json.loads(request.content)["amount"]
            return httpx.Response(202)
        return answer

    def _status(self, book: dict[str, Any]) -> Any:
        def answer(request: httpx.Request) -> httpx.Response:
            ref = request.url.path.rsplit("/", 1)[-1]
            if ref not in book:
                return httpx.Response(404, json={"code": "RESOURCE_NOT_FOUND"})
            return httpx.Response(200, json=self.body(ref, *book[ref]))
        return answer

    def body(self, ref: str, status: str, reason: str | None, txn: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"amount": self.amounts.get(ref, "50000"), "currency": "RWF", "externalId": ref,
                                "payer": {"partyIdType": "MSISDN", "partyId": "250788000001"}, "status": status}
        if txn:
            body["financialTransactionId"] = txn
        if reason:
            body["reason"] = reason
        return body


def same(status: str, expected: str) -> bool:
    """`status` is what the model expects: open (PENDING or PROCESSING: whether the request went out is the
    worker's business) or the very state."""
    return status == expected or (status in OPEN_VALUES and expected in OPEN_VALUES)


class Program:
    """One example's run: the HTTP calls, the model of what must hold, and the checks."""

    def __init__(self, rt: Any, client: Any, admin: Any, worker: Any, demo: Any, mtn: Mtn, *,
                 say: Any = lambda _line: None) -> None:
        self.say = say  # hypothesis.note under @given: the failing example's calls are printed with it
        self.rt, self.client, self.admin, self.worker, self.demo, self.mtn = rt, client, admin, worker, demo, mtn
        self.payments: list[str] = []
        self.keys: list[tuple[str, dict[str, Any]]] = []  # each payment's first request
        self.refund_keys: list[tuple[str, dict[str, Any], str]] = []  # (payment id, body, refund id)
        self.sent: list[tuple[str, str, dict[str, Any]]] = []  # callbacks sent: (method, url, body)
        self.event_ids: set[str] = set()
        self.first_job = 0
        self.recorded: set[str] = set()  # completed by an admin's recording (POST /v1/payments/{id}/outcome)

    # --- HTTP --------------------------------------------------------------------------------------------
    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
        resp = await self.admin.req(method, path, json=body)
        data = await resp.json()
        assert resp.status < 500, (method, path, resp.status, data)
        check_shape(method, path, resp.status, data)
        self.say(f"{method} {path} {body} -> {resp.status}")
        return resp.status, data, resp

    async def callback(self, method: str, url: str, body: dict[str, Any]) -> str:
        resp = await self.client.request(method, url, json=body)
        data = await resp.json()
        self.say(f"callback {method} {url} {body.get('status')} -> {resp.status} {data}")
        assert resp.status == 200, (url, body, resp.status, data)
        return str(data["result"])

    # --- reads ---------------------------------------------------------------------------------------------
    async def row(self, payment_id: str) -> Payment:
        async with self.rt.sessionmaker() as s:
            return await s.get(Payment, payment_id)

    async def refunds(self, payment_id: str | None = None) -> list[Refund]:
        async with self.rt.sessionmaker() as s:
            query = select(Refund).where(Refund.payment_id.in_(self.payments)).order_by(Refund.created_at)
            if payment_id is not None:
                query = query.where(Refund.payment_id == payment_id)
            return list((await s.execute(query)).scalars())

    async def disputes(self) -> list[Dispute]:
        async with self.rt.sessionmaker() as s:
            return list((await s.execute(select(Dispute).where(Dispute.payment_id.in_(self.payments))
                                         .order_by(Dispute.created_at))).scalars())

    async def counts(self) -> tuple[int, ...]:
        async with self.rt.sessionmaker() as s:
            return tuple([(await s.execute(select(func.count()).select_from(model))).scalar_one()
                          for model in (Payment, Refund, OutboxJob, Dispute)])

    async def statuses(self) -> dict[str, str]:
        return {pid: (await self.row(pid)).status for pid in self.payments}

    async def pick(self, i: int, statuses: tuple[str, ...]) -> str:
        """The i-th of the payments in one of `statuses`, else of all: a step about money taken is about a payment
        that has some, when there is one."""
        fitting = [pid for pid, status in (await self.statuses()).items() if status in statuses]
        chosen = fitting or self.payments
        return chosen[i % len(chosen)]

    # --- steps ---------------------------------------------------------------------------------------------
    async def create(self) -> None:
        if not self.payments:  # the jobs this program queues are those after the last one queued before it
            async with self.rt.sessionmaker() as s:
                self.first_job = (await s.execute(select(func.coalesce(func.max(OutboxJob.id), 0)))).scalar_one()
        body = payment_body(self.demo["payment_types"]["Monthly Rent"], paymentAccount="+250788000001",
                            idempotencyKey=f"prop-{uuid.uuid4().hex}")
        before = await self.counts()
        status, data, _ = await self.call("POST", "/v1/payments", body)
        assert status == 201, data
        assert data["status"] == "PENDING" and data["id"] not in self.payments
        after = await self.counts()
        assert after[0] == before[0] + 1 and after[1] == before[1]
        self.payments.append(data["id"])
        self.keys.append((data["id"], body))

    async def replay(self, i: int) -> None:
        payment_id, body = self.keys[i % len(self.keys)]
        before = await self.counts()
        status, data, resp = await self.call("POST", "/v1/payments", body)
        assert status == 201 and data["id"] == payment_id, data
        assert resp.headers.get("Idempotent-Replayed") == "true"
        assert await self.counts() == before  # a replay creates nothing: no payment, refund, job or dispute

    async def decide(self, i: int, choice: int) -> None:
        """MTN settles a request it holds (its answer is final once given)."""
        ref = (await self.row(self.payments[i % len(self.payments)])).provider_reference
        status, reason = CHOICES[choice % len(CHOICES)]
        decision = (status, reason, f"MP{uuid.uuid4().hex[:10]}" if status == "SUCCESSFUL" else None)
        if ref not in self.mtn.collections:
            self.mtn.planned.setdefault(ref, decision)  # the payer answers the prompt as soon as it comes
        elif self.mtn.collections[ref][0] == "PENDING":
            self.mtn.collections[ref] = decision

    async def payment_callback(self, i: int, honest: bool, claim: int, put: bool) -> None:
        payment_id = self.payments[i % len(self.payments)]
        before = await self.row(payment_id)
        ref = before.provider_reference
        if ref not in self.mtn.collections:
            return  # MTN calls back only about a request it received
        truth = self.mtn.collections[ref]
        if honest and truth[0] != "PENDING":
            body = self.mtn.body(ref, *truth)
        else:  # stale or forged: any status, a made-up transaction id for a success
            status, reason = [("SUCCESSFUL", None), ("FAILED", "NOT_ENOUGH_FUNDS"), ("PENDING", None)][claim % 3]
            body = self.mtn.body(ref, status, reason, f"FAKE{claim}" if status == "SUCCESSFUL" else None)
        url = f"/webhooks/payments/mtn_momo?ref={ref}"
        method = "PUT" if put else "POST"
        event_id = f"{ref}:{body['status']}" + (f":{body['financialTransactionId']}"
                                                if body.get("financialTransactionId") else "")
        fresh = event_id not in self.event_ids
        self.event_ids.add(event_id)
        self.sent.append((method, url, body))
        result = await self.callback(method, url, body)
        after = await self.row(payment_id)
        if not fresh:
            assert result == "duplicate" and after.status == before.status, (result, before.status, after.status)
        elif body["status"] != "PENDING":
            # Confirmed by MTN's status: what MTN decided is applied, whatever the callback claimed.
            assert same(after.status, self.expected(before.status, truth)), (before.status, truth, after.status,
                                                                              result)

    async def duplicate(self, i: int) -> None:
        if not self.sent:
            return
        method, url, body = self.sent[i % len(self.sent)]
        before, counts = await self.statuses(), await self.counts()
        assert await self.callback(method, url, body) == "duplicate"
        assert await self.statuses() == before and await self.counts() == counts

    def expected(self, status: str, truth: tuple[str, str | None, str | None]) -> str:
        """Where a payment in `status` must be once MTN's decision `truth` is applied to it."""
        decided = DECIDED.get((truth[0], truth[1]))
        if decided is None:
            return status
        if status in OPEN_VALUES:
            return decided
        if status in ("CANCELLED", "TIMEOUT") and decided == "COMPLETED":
            return "COMPLETED"  # money taken after the gateway gave up: completed late
        return status

    async def work(self) -> None:
        """The worker runs what is due, then the polls and watches as if their time had come."""
        before = {pid: (await self.row(pid)) for pid in self.payments}
        await drain(self.worker)
        async with self.rt.sessionmaker.begin() as s:
            await s.execute(update(OutboxJob).where(OutboxJob.kind.in_(POLLED_KINDS), OutboxJob.status == "PENDING")
                            .values(run_at=utcnow()))
        await drain(self.worker)
        for pid, row in before.items():
            truth = self.mtn.collections.get(row.provider_reference)
            if truth is None or row.status not in OPEN_VALUES:
                continue
            after = await self.row(pid)
            assert same(after.status, self.expected(row.status, truth)), (row.status, truth, after.status)

    async def cancel(self, i: int) -> None:
        payment_id = self.payments[i % len(self.payments)]
        was = (await self.row(payment_id)).status
        status, data, _ = await self.call("POST", f"/v1/payments/{payment_id}/cancel",
                                          {"note": "member asked by mistake"})
        assert status == (200 if was in OPEN_VALUES else 409), (was, data)
        if status == 200:
            assert (await self.row(payment_id)).status == "CANCELLED"

    async def record_outcome(self, i: int) -> None:
        payment_id = await self.pick(i, ("CANCELLED", "TIMEOUT"))
        was = (await self.row(payment_id)).status
        status, data, _ = await self.call("POST", f"/v1/payments/{payment_id}/outcome", {
            "status": "COMPLETED", "providerTransactionId": f"ST{uuid.uuid4().hex[:10]}",
            "note": "seen on the MTN statement"})
        if was not in ("CANCELLED", "TIMEOUT", *OPEN_VALUES):
            assert status in (409, 422), (was, status, data)
        if status == 200:
            assert (await self.row(payment_id)).status == "COMPLETED"
            self.recorded.add(payment_id)

    async def void(self, i: int) -> None:
        payment_id = await self.pick(i, ("COMPLETED",))
        before = await self.row(payment_id)
        status, data, _ = await self.call("POST", f"/v1/payments/{payment_id}/void", {"note": "wrong statement line"})
        if status == 200:
            # Only an admin's recording is voided; money the provider itself reported taken is refunded instead.
            assert before.status == "COMPLETED" and payment_id in self.recorded, (before.status, data)
            assert (await self.row(payment_id)).status == "VOIDED"
        else:
            assert status in (409, 422), data
            assert (await self.row(payment_id)).status == before.status

    async def refund(self, i: int, amount: int | None, replay: int | None) -> None:
        if replay is not None and self.refund_keys:
            payment_id, first, refund_id = self.refund_keys[replay % len(self.refund_keys)]
            counts = await self.counts()
            status, data, resp = await self.call("POST", f"/v1/payments/{payment_id}/refunds", first)
            assert status == 201 and data["id"] == refund_id and resp.headers.get("Idempotent-Replayed") == "true"
            assert await self.counts() == counts
            return
        payment_id = await self.pick(i, tuple(s.value for s in COLLECTED))
        row = await self.row(payment_id)
        held = sum(r.amount_minor for r in await self.refunds(payment_id) if r.status != "FAILED")
        taken = collected_amount(row)
        left = (taken.minor if taken is not None else 0) - held
        body: dict[str, Any] = {"idempotencyKey": f"prop-refund-{uuid.uuid4().hex}", "reason": "overcharged"}
        if amount is not None:
            body["amount"] = amount
        counts = await self.counts()
        status, data, _ = await self.call("POST", f"/v1/payments/{payment_id}/refunds", body)
        refundable = PaymentStatus(row.status) in COLLECTED and left > 0
        if amount is not None and amount <= 0:
            assert status == 400 and data["message"] == ["amount must be a positive number"], data
            assert await self.counts() == counts
        elif refundable and (amount is None or amount <= left):
            assert status == 201, (row.status, left, amount, data)
            assert data["amount"] == (left if amount is None else amount)
            self.refund_keys.append((payment_id, body, data["id"]))
        else:
            assert status in (409, 422), (row.status, left, amount, data)
            assert await self.counts() == counts

    async def refund_decide(self, i: int, success: bool) -> None:
        """MTN settles a refund it holds, or will settle one as soon as it is sent."""
        open_ = [r.provider_reference for r in await self.refunds()
                 if self.mtn.refunds.get(r.provider_reference, ("PENDING",))[0] == "PENDING"
                 and r.provider_reference not in self.mtn.planned]
        if not open_:
            return
        ref = open_[i % len(open_)]
        decision = (("SUCCESSFUL", None, f"RF{uuid.uuid4().hex[:10]}") if success
                    else ("FAILED", "COULD_NOT_PERFORM_TRANSACTION", None))
        if ref in self.mtn.refunds:
            self.mtn.refunds[ref] = decision
        else:
            self.mtn.planned[ref] = decision

    async def refund_callback(self, i: int, honest: bool) -> None:
        sent = [r for r in await self.refunds() if r.provider_reference in self.mtn.refunds]
        if not sent:
            return
        refund = sent[i % len(sent)]
        truth = self.mtn.refunds[refund.provider_reference]
        if honest and truth[0] != "PENDING":
            body = self.mtn.body(refund.provider_reference, *truth)
        else:
            body = self.mtn.body(refund.provider_reference, "SUCCESSFUL", None, f"FAKE{i}")
        url = f"/webhooks/payments/mtn_momo?ref={refund.provider_reference}&kind=refund"
        event_id = f"{refund.provider_reference}:{body['status']}" + (
            f":{body['financialTransactionId']}" if body.get("financialTransactionId") else "")
        fresh = event_id not in self.event_ids
        self.event_ids.add(event_id)
        self.sent.append(("PUT", url, body))
        result = await self.callback("PUT", url, body)
        async with self.rt.sessionmaker() as s:
            after = await s.get(Refund, refund.id)
        if not fresh:
            assert result == "duplicate" and after.status == refund.status
        elif truth[0] != "PENDING" and refund.status in ("PENDING", "PROCESSING"):
            assert after.status == ("COMPLETED" if truth[0] == "SUCCESSFUL" else "FAILED"), (truth, after.status)

    async def refund_cancel(self, i: int) -> None:
        refunds = await self.refunds()
        if not refunds:
            return
        refund = refunds[i % len(refunds)]
        status, data, _ = await self.call("POST", f"/v1/refunds/{refund.id}/cancel", {"note": "asked by mistake"})
        if status == 200:
            assert refund.status == "PENDING" and refund.provider_reference not in self.mtn.refunds
        else:
            assert status in (409, 422), data

    async def dispute_open(self, i: int) -> None:
        payment_id = await self.pick(i, tuple(s.value for s in COLLECTED))
        already = [d for d in await self.disputes()
                   if d.payment_id == payment_id and d.status in ("OPEN", "UNDER_REVIEW")]
        status, data, _ = await self.call("POST", "/v1/disputes", {"paymentId": payment_id, "reason": "WRONG_AMOUNT"})
        if already:
            assert status == 409, data
        else:
            assert status in (201, 409, 422), data

    async def dispute_move(self, i: int, target: str, amount: int | None) -> None:
        open_ = [d for d in await self.disputes() if d.status in ("OPEN", "UNDER_REVIEW")]
        if not open_:
            return
        dispute = open_[i % len(open_)]
        body: dict[str, Any] = {"status": target, "note": "looked at the statement"}
        if target == "RESOLVED" and amount is not None:
            body["refundAmount"] = amount
        counts = await self.counts()
        status, data, _ = await self.call("POST", f"/v1/disputes/{dispute.id}/transitions", body)
        if status == 200:
            assert data["status"] == target
        else:
            assert status in (409, 422), data
            assert await self.counts() == counts

    # --- what must always hold -------------------------------------------------------------------------------
    async def check(self) -> None:
        async with self.rt.sessionmaker() as s:
            rows = {p.id: p for p in (await s.execute(select(Payment).where(Payment.id.in_(self.payments)))).scalars()}
            refunds = list((await s.execute(select(Refund).where(Refund.payment_id.in_(self.payments)))).scalars())
            jobs = list((await s.execute(select(OutboxJob.kind, OutboxJob.payload).where(
                OutboxJob.id > self.first_job, OutboxJob.kind.in_(("sms.send", "webhook.event"))))).all())
            audit = list((await s.execute(select(AuditEvent).where(
                AuditEvent.entity_id.in_(self.payments), AuditEvent.entity_type == "payment")
                .order_by(AuditEvent.id))).scalars())
        for pid in self.payments:
            row = rows[pid]
            # Money: what is given back, or on its way, never exceeds what was taken.
            taken = collected_amount(row)
            held = sum(r.amount_minor for r in refunds if r.payment_id == pid and r.status != "FAILED")
            completed = sum(r.amount_minor for r in refunds if r.payment_id == pid and r.status == "COMPLETED")
            assert held <= (taken.minor if taken is not None else 0), (row.status, held, taken)
            assert row.refunded_minor == completed
            if row.status in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"):
                assert taken is not None
                assert row.status == ("COMPLETED" if completed == 0 else "REFUNDED" if completed >= taken.minor
                                      else "PARTIALLY_REFUNDED"), (row.status, completed, taken)
            # Every status change is audited, and the audited moves are the state machine's, ending where it is.
            # (The move's own row, payment.<target>; others beside it describe it: payment.outcome_recorded.)
            moves = [(a.before["status"], a.after["status"]) for a in audit if a.entity_id == pid
                     and (a.before or {}).get("status") and (a.after or {}).get("status")
                     and a.before["status"] != a.after["status"]
                     and a.action == f"payment.{a.after['status'].lower()}"]
            state = "PENDING"
            for source, target in moves:
                assert source == state, (pid, moves)
                assert PAYMENT.allowed(PaymentStatus(source), PaymentStatus(target)), (source, target)
                state = target
            assert state == row.status, (moves, row.status)
            # One receipt and one payment.completed event for a payment that completed; none for one that never did.
            ever = any(target == "COMPLETED" for _, target in moves)
            receipts = [p for k, p in jobs if k == "sms.send" and p["template"] in RECEIPT_TEMPLATES
                        and p["context"].get("payment_id") == pid]
            events = [p for k, p in jobs if k == "webhook.event" and p["event_type"] == "payment.completed"
                      and p["data"]["id"] == pid]
            # Money taken after it FAILED (it stays FAILED, the money held): the one text saying so, and its one event.
            held_after_failure = taken_after_failure(row)
            assert len(receipts) == (1 if ever or held_after_failure else 0), (pid, moves, len(receipts))
            # Completed after a cancel or a timeout (she was told it failed): the receipt says so.
            late = any(target == "COMPLETED" and source in ("CANCELLED", "TIMEOUT") for source, target in moves)
            assert [r["template"] for r in receipts] == (
                ["payment_late_receipt" if late else "payment_receipt"] if ever
                else ["payment_taken_after_failure"] if held_after_failure else []), (pid, moves)
            assert len(events) == (1 if ever else 0), (pid, moves, len(events))
            taken_events = [p for k, p in jobs if k == "webhook.event"
                            and p["event_type"] == "payment.taken_after_failure" and p["data"]["id"] == pid]
            assert len(taken_events) == (1 if held_after_failure else 0), (pid, moves, len(taken_events))
            # The API says what the row holds.
            status, shown, _ = await self.call("GET", f"/v1/payments/{pid}")
            assert status == 200
            assert (shown["status"], shown["refundedAmount"], shown["collectedAmount"], shown["late"],
                    shown["gatewayTransactionId"]) == (
                row.status, row.refunded_minor, 0 if taken is None else taken.minor, bool(row.late),
                row.provider_transaction_id), (shown, row.status)


_STEP = {
    "create": st.tuples(st.just("create")),
    "replay": st.tuples(st.just("replay"), st.integers(0, 5)),
    "decide": st.tuples(st.just("decide"), st.integers(0, 5), st.integers(0, 5)),
    "callback": st.tuples(st.just("callback"), st.integers(0, 5), st.booleans(), st.integers(0, 5), st.booleans()),
    "duplicate": st.tuples(st.just("duplicate"), st.integers(0, 20)),
    "work": st.tuples(st.just("work")),
    "cancel": st.tuples(st.just("cancel"), st.integers(0, 5)),
    "outcome": st.tuples(st.just("outcome"), st.integers(0, 5)),
    "void": st.tuples(st.just("void"), st.integers(0, 5)),
    "refund": st.tuples(st.just("refund"), st.integers(0, 5), st.none() | st.integers(-1, 60_000),
                        st.none() | st.integers(0, 5)),
    "refund_decide": st.tuples(st.just("refund_decide"), st.integers(0, 5), st.booleans()),
    "refund_callback": st.tuples(st.just("refund_callback"), st.integers(0, 5), st.booleans()),
    "refund_cancel": st.tuples(st.just("refund_cancel"), st.integers(0, 5)),
    "dispute_open": st.tuples(st.just("dispute_open"), st.integers(0, 5)),
    "dispute_move": st.tuples(st.just("dispute_move"), st.integers(0, 5),
                              st.sampled_from(["UNDER_REVIEW", "RESOLVED", "REJECTED", "WITHDRAWN"]),
                              st.none() | st.integers(1, 60_000)),
}
# How often each step is drawn: money has to be asked for, sent, decided and reported before it can be refunded,
# so those steps come more often than the ones that end a payment's story early.
_WEIGHTS = {"create": 2, "work": 4, "decide": 4, "callback": 3, "refund": 4, "refund_decide": 3,
            "refund_callback": 2, "duplicate": 2}
_METHOD = {"callback": "payment_callback", "outcome": "record_outcome"}  # the Program method a step calls
STEPS = st.sampled_from([name for name in _STEP for _ in range(_WEIGHTS.get(name, 1))]).flatmap(_STEP.__getitem__)


@LIFECYCLE
@given(steps=st.lists(STEPS, min_size=8, max_size=18))
async def test_a_cooperatives_payments_keep_their_invariants_through_any_program(
        rt: Any, demo: Any, client: Any, admin: Any, worker: Any, steps: list[tuple[Any, ...]]) -> None:
    mtn = Mtn()
    mtn_adapter(rt, mtn.wire())
    program = Program(rt, client, admin, worker, demo, mtn, say=note)
    await program.create()
    for step in steps:
        name, *args = step
        note(f"step {step}")
        if name != "create" or len(program.payments) < 3:  # three payments at most: steps then meet again
            await getattr(program, _METHOD.get(name, name))(*args)
        await program.check()
    # What the program reached, for --hypothesis-show-statistics: a run that never takes money tests little.
    for pid in program.payments:
        event(f"payment ends {(await program.row(pid)).status}")
    for r in await program.refunds():
        event(f"refund ends {r.status}")
    for d in await program.disputes():
        event(f"dispute ends {d.status}")


async def test_the_model_reaches_money_taken_and_given_back(rt: Any, demo: Any, client: Any, admin: Any,
                                                            worker: Any) -> None:
    """The harness itself: a payment MTN approves completes, and its refund MTN pays completes (a program that can
    never get there would check nothing)."""
    mtn = Mtn()
    mtn_adapter(rt, mtn.wire())
    program = Program(rt, client, admin, worker, demo, mtn)
    await program.create()
    await program.decide(0, 0)
    await program.work()
    await program.check()
    assert (await program.row(program.payments[0])).status == "COMPLETED"
    await program.refund(0, 20_000, None)
    await program.work()
    await program.refund_decide(0, True)
    await program.work()
    await program.check()
    assert [r.status for r in await program.refunds()] == ["COMPLETED"]
    assert (await program.row(program.payments[0])).status == "PARTIALLY_REFUNDED"


async def test_the_model_checks_money_taken_after_a_failure(rt: Any, demo: Any, client: Any, admin: Any,
                                                            worker: Any) -> None:
    """The harness itself: a payment MTN failed whose money is then reported taken (outside what the model's final
    MTN can do) stays FAILED with its one text and one event saying the money is held, and the checks hold."""
    from core.audit import Actor
    from core.money import Money
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    mtn = Mtn()
    mtn_adapter(rt, mtn.wire())
    program = Program(rt, client, admin, worker, demo, mtn)
    await program.create()
    await program.decide(0, 3)  # not enough funds
    await program.work()
    [pid] = program.payments
    assert (await program.row(pid)).status == "FAILED"
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(
            s, rt, await s.get(Payment, pid), ProviderOutcome.SUCCEEDED, actor=Actor("provider:mtn_momo", "provider"),
            amount=Money(50_000, "RWF"), provider_transaction_id="MP-LATE-1") == "flagged_success_after_failure"
    await program.work()
    await program.check()
    async with rt.sessionmaker() as s:
        texts = [p["template"] for p in (await s.execute(select(OutboxJob.payload).where(
            OutboxJob.kind == "sms.send").order_by(OutboxJob.id))).scalars() if p["context"].get("payment_id") == pid]
    assert texts == ["payment_failed", "payment_taken_after_failure"]
