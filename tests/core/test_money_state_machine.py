"""A stateful property test of the money core: random sequences of its real operations on real PostgreSQL.

Hypothesis's RuleBasedStateMachine draws the operations: payments asked for (API and USSD, keys replayed and
reused for another request), provider callbacks through core.provider_events.handle_provider_event (success,
failure, decline, expiry, pending; duplicated, late, out of order, for another amount, a second transaction id),
outcomes recorded from a statement (record_collected) and payments recorded from a statement line
(record_payment, dated up to a few minutes back, across the month's turn), voids of those recordings, cancels,
refunds (partial, whole, beyond what is left, replayed, two at once), refund callbacks (success, failure,
duplicated), chargebacks (ReturnedByProvider), disputes opened and moved (resolved with a refund or a chargeback)
and the clock moving on across a month boundary. After every step the rows are checked against what must always
hold (the invariants below); tests/security/test_payment_lifecycle_model.py drives the HTTP API and the worker,
this one the core's functions and the reconciliation report.

The callbacks are signed ones (needs_confirmation False: Airtel with its key, IremboPay), applied as they say; the
confirmation by status query is the other model test's. The app's clock (core.db._clock_offset) starts a few
minutes before the current month began, so every job written is due and the reports have two months to add up.

The search is derandomized: the same sequences whatever ran before it in the process (the `world` fixture: no
constants from the modules loaded so far, the reference sequence put back for each example).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st

try:  # Hypothesis's pool of the loaded modules' constants (6.131 and later; private: see the `world` fixture)
    from hypothesis.internal.conjecture import providers as hypothesis_providers
    from hypothesis.internal.constants_ast import Constants
except ImportError:  # an older Hypothesis draws no such constants: nothing to keep out
    hypothesis_providers = Constants = None  # type: ignore[assignment,misc]
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, literal, select, text, union_all

import core.db
from core.audit import Actor
from core.db import Base, utcnow
from core.disputes import move_dispute, open_dispute
from core.errors import DomainError
from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.money import Money
from core.payments import NewPayment, create_payment
from core.ports import EventKind, ProviderEvent, ProviderOutcome
from core.provider_events import cancel_payment, handle_provider_event
from core.recorded_payments import StatementLine, record_collected, record_payment, void_recording
from core.refunds import ReturnedByProvider, collected, request_refund
from core.reports import reconciliation
from core.state.dispute import DISPUTE
from core.state.machine import StateMachine
from core.state.payment import COLLECTED, PAYMENT, PaymentStatus, holds_money, taken_after_failure
from core.state.refund import REFUND
from tests.conftest import clean_database, make_settings, requires_pg

pytestmark = requires_pg

ADMIN = Actor("admin:model", "api")
PHONE = "+250788000001"
# The machine's size: enough steps for money to be taken, refunded and disputed; few enough for CI (tens of seconds).
EXAMPLES = int(os.environ.get("MONEY_MODEL_EXAMPLES", "50"))
STEPS = int(os.environ.get("MONEY_MODEL_STEPS", "35"))
# A search for defects (MONEY_MODEL_SEARCH=1, with more examples): new sequences each run, not CI's fixed ones.
SEARCH = os.environ.get("MONEY_MODEL_SEARCH") == "1"
# The model's clock starts this many minutes before a month begins, and moves on by 1 to 8 at a time.
START = 4
OUTCOMES = [ProviderOutcome.SUCCEEDED] * 2 + [ProviderOutcome.FAILED, ProviderOutcome.CANCELLED,
                                              ProviderOutcome.EXPIRED, ProviderOutcome.PENDING]
# Webhook events one move of an entity queues, by (machine, target): exactly one each (core.notify.notice_jobs).
MOVE_EVENTS = {("payment", "COMPLETED"): "payment.completed", ("payment", "FAILED"): "payment.failed",
               ("payment", "CANCELLED"): "payment.failed", ("payment", "TIMEOUT"): "payment.timeout",
               ("payment", "VOIDED"): "payment.voided", ("refund", "COMPLETED"): "refund.completed",
               ("refund", "FAILED"): "refund.failed"}


def month_turn(now: datetime) -> datetime:
    """The start of the current month (UTC), or of the last one when this one began under two hours ago: the
    model's clock starts START minutes before it and must stay behind the database's (jobs due, nothing future)."""
    turn = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if now - turn < timedelta(hours=2):
        turn = (turn - timedelta(days=1)).replace(day=1)
    return turn


def next_month(moment: datetime) -> datetime:
    return (moment.replace(day=1) + timedelta(days=32)).replace(day=1)


@dataclass
class World:
    """What lives across examples: the event loop, the runtime and the demo cooperative (seeded once)."""

    loop: asyncio.AbstractEventLoop
    rt: Any
    demo: dict[str, Any]
    keep: frozenset[str]  # the tables the demo seeded, kept between examples
    last_audit: int  # the demo's last audit row
    kept_counts: dict[str, int]
    references: int  # human_reference_seq after the demo (core.references): each example numbers from there
    turn: datetime
    reached: Counter[str] = field(default_factory=Counter)  # the end states the examples reached

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@dataclass
class PaymentAsk:
    new: NewPayment
    payment_id: str


@dataclass
class Model:
    payments: list[str] = field(default_factory=list)
    asks: list[PaymentAsk] = field(default_factory=list)
    lines: list[tuple[StatementLine, str]] = field(default_factory=list)
    refund_asks: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # request_refund kwargs, refund id
    sent: list[ProviderEvent] = field(default_factory=list)  # callbacks given, for duplicates
    recorded: set[str] = field(default_factory=set)  # completed by an admin's recording (void_recording may void)
    disputes: list[str] = field(default_factory=list)  # opened (dispute_move runs only once there is one)


WORLD: World | None = None


async def _counts(rt: Any) -> dict[str, int]:
    """Every table's row count, in one round trip."""
    query = union_all(*[select(literal(t.name).label("name"), select(func.count()).select_from(t).scalar_subquery())
                        for t in Base.metadata.sorted_tables])
    async with rt.sessionmaker() as s:
        return {name: n for name, n in (await s.execute(query)).all()}


class MoneyCore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.w = WORLD
        self.rt, self.demo = WORLD.rt, WORLD.demo
        self.m = Model()
        self.w.run(self._reset())
        self.n = 0

    # --- plumbing ------------------------------------------------------------------------------------------
    async def _reset(self) -> None:
        """Each example on the demo's rows alone (every other table emptied) and the clock at its start."""
        drop = [t.name for t in reversed(Base.metadata.sorted_tables) if t.name not in self.w.keep]
        async with self.rt.engine.begin() as conn:
            await conn.execute(text("SET LOCAL session_replication_role = replica"))  # audit log refuses TRUNCATE
            await conn.execute(text(f"TRUNCATE {', '.join(drop)} RESTART IDENTITY CASCADE"))
            # The demo's own audit rows (its members added) stay; the example's go.
            await conn.execute(text("DELETE FROM audit_events WHERE id > :last"), {"last": self.w.last_audit})
            # Not an identity column's (RESTART IDENTITY leaves it): the references' numbers, hence their length
            # (three digits, then more) and what a detail cut to its column keeps, the same each example and run.
            await conn.execute(text("SELECT setval('human_reference_seq', :n)"), {"n": self.w.references})
        await self.rt.redis.flushdb()
        counts = await _counts(self.rt)
        assert {k: counts[k] for k in self.w.keep} == self.w.kept_counts, "the demo's rows changed"
        assert all(counts[name] == 0 for name in drop)
        core.db._clock_offset = (self.w.turn - timedelta(minutes=START)).timestamp() - time.time()

    def uid(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n:03d}-{uuid.uuid4().hex[:8]}"

    def run(self, coro: Any) -> Any:
        return self.w.run(coro)

    async def rows(self) -> tuple[dict[str, Payment], dict[str, Refund], dict[str, Dispute]]:
        async with self.rt.sessionmaker() as s:
            payments = {p.id: p for p in (await s.execute(select(Payment))).scalars()}
            refunds = {r.id: r for r in (await s.execute(select(Refund))).scalars()}
            disputes = {d.id: d for d in (await s.execute(select(Dispute))).scalars()}
        return payments, refunds, disputes

    async def payment(self, payment_id: str) -> Payment:
        async with self.rt.sessionmaker() as s:
            return await s.get(Payment, payment_id)

    async def refund_row(self, refund_id: str) -> Refund:
        async with self.rt.sessionmaker() as s:
            return await s.get(Refund, refund_id)

    async def attempt(self, work: Any) -> tuple[Any, DomainError | None, dict[str, int], dict[str, int]]:
        """`work(session)` in one transaction: (its result or None, the refusal or None, counts before, after).
        A refusal rolls back whole: nothing written."""
        before = await _counts(self.rt)
        try:
            async with self.rt.sessionmaker.begin() as s:
                result = await work(s)
        except DomainError as exc:
            after = await _counts(self.rt)
            note(f"  refused: {type(exc).__name__} {exc}")
            assert after == before, ("a refusal wrote rows", before, after)
            return None, exc, before, after
        return result, None, before, await _counts(self.rt)

    def pick(self, i: int, wanted: tuple[str, ...] | None = None) -> str | None:
        """The i-th payment in one of `wanted` (the payments' current statuses), else of all."""
        if not self.m.payments:
            return None
        if wanted:
            rows = self.run(self.rows())[0]
            fitting = [pid for pid in self.m.payments if rows[pid].status in wanted]
            if fitting:
                return fitting[i % len(fitting)]
        return self.m.payments[i % len(self.m.payments)]

    # --- rules: payments -------------------------------------------------------------------------------------
    @initialize()
    def first_payment(self) -> None:
        self.create(channel="api", water=False)

    @rule(channel=st.sampled_from(["api", "ussd"]), water=st.booleans())
    def create(self, channel: str, water: bool) -> None:
        ptype = self.demo["payment_types"]["Water" if water else "Monthly Rent"]
        new = NewPayment(cooperative_id=self.demo["cooperative_id"], payment_type_id=ptype, method="MOBILE_MONEY_MTN",
                         account=PHONE, idempotency_key=self.uid("pay"), channel=channel,
                         amount=Money(5_000 if water else 50_000, "RWF"),
                         member_id=self.demo["members"][PHONE] if channel == "ussd" else None,
                         member_from_account=channel == "api")
        result, refused, before, after = self.run(self.attempt(
            lambda s: create_payment(s, self.rt, new, actor=ADMIN)))
        note(f"create {channel} {'water' if water else 'rent'} -> {refused or result[0].id}")
        if refused is not None:
            return
        payment, created = result
        assert created and payment.status == "PENDING" and payment.id not in self.m.payments
        assert after["payments"] == before["payments"] + 1 and after["refunds"] == before["refunds"]
        self.m.payments.append(payment.id)
        self.m.asks.append(PaymentAsk(new, payment.id))

    @precondition(lambda self: self.m.asks)
    @rule(i=st.integers(0, 9), other=st.booleans())
    def replay_payment(self, i: int, other: bool) -> None:
        """The same key again: the same request answers its payment and writes nothing; another request under it
        (another amount) is refused and writes nothing."""
        ask = self.m.asks[i % len(self.m.asks)]
        new = ask.new
        if other:
            new = NewPayment(**{**new.__dict__, "amount": Money(new.amount.minor + 100, "RWF")})  # type: ignore[union-attr]
        result, refused, before, after = self.run(self.attempt(
            lambda s: create_payment(s, self.rt, new, actor=ADMIN)))
        note(f"replay payment {ask.payment_id} other={other} -> {refused or result[0].id}")
        assert after == before, "a replayed key wrote rows"
        if other:
            assert refused is not None
        else:
            assert refused is None, refused
            assert result[0].id == ask.payment_id and result[1] is False

    @precondition(lambda self: self.m.payments)
    @rule(i=st.integers(0, 30), outcome=st.sampled_from(OUTCOMES), short=st.booleans(), fresh_id=st.booleans(),
          again=st.integers(0, 3), late=st.booleans())
    def callback(self, i: int, outcome: ProviderOutcome, short: bool, fresh_id: bool, again: int, late: bool) -> None:
        """The provider calls back about a payment (an open one, or `late` any: again with another word, after the
        gateway gave up, after a refund); or (one time in four) sends a callback it sent before once more."""
        if again == 0 and self.m.sent:
            self.duplicate_callback(i)
            return
        pid = self.pick(i, None if late else ("PENDING", "PROCESSING"))
        assert pid is not None
        before = self.run(self.payment(pid))
        if before.provider_reference.startswith("REQUEST-UNKNOWN") or before.channel == "recorded":
            return  # never asked of the provider: no callback names it
        amount = Money(before.amount_minor - (1_000 if short else 0), before.currency)
        txn = (f"MP{self.uid('tx')}" if fresh_id or not before.provider_transaction_id
               else before.provider_transaction_id) if outcome is ProviderOutcome.SUCCEEDED else None
        event = ProviderEvent(provider=before.provider, kind=EventKind.COLLECTION,
                              event_id=f"{before.provider_reference}:{outcome.value}:{self.uid('e')}",
                              reference=before.provider_reference, outcome=outcome,
                              amount=amount if outcome is ProviderOutcome.SUCCEEDED else None,
                              provider_transaction_id=txn)
        result = self.run(handle_provider_event(self.rt, event))
        self.m.sent.append(event)
        after = self.run(self.payment(pid))
        note(f"callback {pid} {outcome.value} short={short} txn={txn} -> {result}: {before.status} -> {after.status}")
        current = PaymentStatus(before.status)
        moved = {ProviderOutcome.SUCCEEDED: PaymentStatus.COMPLETED, ProviderOutcome.FAILED: PaymentStatus.FAILED,
                 ProviderOutcome.CANCELLED: PaymentStatus.CANCELLED, ProviderOutcome.EXPIRED: PaymentStatus.TIMEOUT}
        target = moved.get(outcome)
        if target is None:
            assert after.status == before.status
        elif current in (PaymentStatus.PENDING, PaymentStatus.PROCESSING):
            assert after.status == target.value, (result, after.status)
        elif current in (PaymentStatus.CANCELLED, PaymentStatus.TIMEOUT) and target is PaymentStatus.COMPLETED:
            assert after.status == "COMPLETED" and after.late, (result, after.status)  # money taken after we gave up
        else:
            assert after.status == before.status, (result, before.status, after.status)  # a final word stands
        if after.status == "COMPLETED" and before.status != "COMPLETED":
            assert collected(after) == amount.minor  # what the provider says it took is what is held

    def duplicate_callback(self, i: int) -> None:
        event = self.m.sent[i % len(self.m.sent)]
        before = self.run(_counts(self.rt))
        rows = self.run(self.rows())
        result = self.run(handle_provider_event(self.rt, event))
        note(f"duplicate {event.kind.value} {event.event_id} -> {result}")
        assert result == "duplicate"
        assert self.run(_counts(self.rt)) == before
        after = self.run(self.rows())
        assert [{k: v.status for k, v in r.items()} for r in after] == [{k: v.status for k, v in r.items()}
                                                                         for r in rows]

    @precondition(lambda self: self.m.payments)
    @rule(i=st.integers(0, 9))
    def cancel(self, i: int) -> None:
        pid = self.pick(i, ("PENDING", "PROCESSING"))
        assert pid is not None
        was = self.run(self.payment(pid)).status
        _, refused, _, _ = self.run(self.attempt(lambda s: cancel_payment(
            s, self.rt, payment_id=pid, cooperative_id=None, note="member asked by mistake", actor=ADMIN)))
        note(f"cancel {pid} ({was}) -> {refused or 'CANCELLED'}")
        assert (refused is None) == (was in ("PENDING", "PROCESSING")), (was, refused)
        if refused is None:
            assert self.run(self.payment(pid)).status == "CANCELLED"

    @precondition(lambda self: self.m.payments)
    @rule(i=st.integers(0, 9), back=st.integers(0, 20))
    def record_outcome(self, i: int, back: int) -> None:
        """An admin records what the statement shows taken for a payment the gateway gave up on."""
        pid = self.pick(i, ("CANCELLED", "TIMEOUT", "PENDING", "PROCESSING"))
        assert pid is not None
        before = self.run(self.payment(pid))
        when = max(before.created_at, utcnow() - timedelta(minutes=back))
        _, refused, _, _ = self.run(self.attempt(lambda s: record_collected(
            s, self.rt, payment_id=pid, cooperative_id=None, provider_transaction_id=f"ST{self.uid('st')}",
            note="seen on the MTN statement", actor=ADMIN, completed_at=when)))
        note(f"record outcome {pid} ({before.status}) at {when} -> {refused or 'COMPLETED'}")
        if before.status not in ("CANCELLED", "TIMEOUT", "PENDING", "PROCESSING"):
            assert refused is not None
        if refused is None:
            after = self.run(self.payment(pid))
            assert after.status == "COMPLETED" and after.completed_at == when
            self.m.recorded.add(pid)

    @rule(back=st.integers(0, 30), replay=st.booleans())
    def record_statement_line(self, back: int, replay: bool) -> None:
        """Money on the statement no payment holds, recorded as a payment of its own (dated by the statement)."""
        if replay and self.m.lines:
            line, pid = self.m.lines[-1]
        else:
            when = utcnow() - timedelta(minutes=back)
            line = StatementLine(
                payment=NewPayment(cooperative_id=self.demo["cooperative_id"],
                                   payment_type_id=self.demo["payment_types"]["Monthly Rent"],
                                   method="MOBILE_MONEY_MTN", account=PHONE, idempotency_key=self.uid("line"),
                                   channel="api", amount=Money(50_000, "RWF"), member_from_account=True),
                provider_transaction_id=f"SL{self.uid('sl')}", completed_at=when, note="statement line",
                gateway_reference=str(uuid.uuid4()))
            pid = ""
        result, refused, before, after = self.run(self.attempt(
            lambda s: record_payment(s, self.rt, line, actor=ADMIN)))
        note(f"record statement line replay={bool(pid)} at {line.completed_at} -> {refused or result[0].id}")
        if refused is not None:
            assert not pid, refused
            return
        payment, created = result
        if pid:
            assert payment.id == pid and not created and after == before
            return
        assert created and payment.status == "COMPLETED" and payment.completed_at == line.completed_at
        self.m.payments.append(payment.id)
        self.m.lines.append((line, payment.id))
        self.m.recorded.add(payment.id)

    @precondition(lambda self: self.m.recorded)
    @rule(i=st.integers(0, 9))
    def void(self, i: int) -> None:
        pid = self.pick(i, ("COMPLETED",))
        assert pid is not None
        before = self.run(self.payment(pid))
        _, refused, _, _ = self.run(self.attempt(lambda s: void_recording(
            s, payment_id=pid, cooperative_id=None, note="wrong statement line", actor=ADMIN)))
        note(f"void {pid} ({before.status}) -> {refused or 'VOIDED'}")
        if refused is None:
            # Only an admin's recording is voided; money the provider itself reported is refunded instead.
            assert pid in self.m.recorded and before.status == "COMPLETED"
            after = self.run(self.payment(pid))
            assert after.status == "VOIDED" and not holds_money(after)

    # --- rules: refunds --------------------------------------------------------------------------------------
    def _left(self, pid: str) -> int:
        payment, refunds, _ = self.run(self.rows())
        row = payment[pid]
        held = sum(r.amount_minor for r in refunds.values() if r.payment_id == pid and r.status != "FAILED")
        return max(0, collected(row) - held) if holds_money(row) else 0

    def _chargeback_room(self, pid: str) -> int:
        payment, refunds, _ = self.run(self.rows())
        row = payment[pid]
        before = sum(r.amount_minor for r in refunds.values()
                     if r.payment_id == pid and r.status != "FAILED" and r.returned_by_provider)
        return max(0, collected(row) - before) if holds_money(row) else 0

    @precondition(lambda self: self.m.payments)
    @rule(i=st.integers(0, 9), amount=st.none() | st.integers(1, 60_000),
          how=st.sampled_from(["sent", "sent", "returned", "replayed", "twice at once"]))
    def refund(self, i: int, amount: int | None, how: str) -> None:
        """A refund (or a chargeback the provider already made) of part, all, or more than is left; or one asked for
        before asked again; or two asked for at the same moment."""
        if how == "replayed" and any(kwargs for kwargs, _ in self.m.refund_asks):
            self.replay_refund(i)
            return
        if how == "twice at once":
            self.refunds_at_once(i)
            return
        returned = how == "returned"
        pid = self.pick(i, ("COMPLETED", "PARTIALLY_REFUNDED", "FAILED"))
        assert pid is not None
        room = self._chargeback_room(pid) if returned else 0  # (before it: after, its own amount is counted in it)
        row = self.run(self.payment(pid))
        left = self._left(pid)
        kwargs: dict[str, Any] = {
            "payment_id": pid, "cooperative_id": None, "reason": "overcharged", "idempotency_key": self.uid("rf"),
            "actor": ADMIN, "amount": None if amount is None else Money(amount, row.currency),
            # A chargeback dated by the provider's statement, up to ten minutes back (maybe last month), not before
            # the money was taken (refused: check_statement_time).
            "returned": ReturnedByProvider(f"CB{self.uid('cb')}", max(
                row.completed_at or row.created_at, utcnow() - timedelta(minutes=i))) if returned else None}
        result, refused, before, after = self.run(self.attempt(
            lambda s: request_refund(s, self.rt, **kwargs)))
        note(f"refund {pid} ({row.status}, left {left}) amount={amount} returned={returned} -> "
             f"{refused or (result[0].id, result[0].status)}")
        # A refund to send fits in what is left; a chargeback of a given amount is the provider's statement: it fits
        # in what was collected less the chargebacks recorded before it, whatever the refunds hold (core.refunds).
        limit = room if returned and amount is not None else left
        if refused is None:
            refund, created = result
            assert created and holds_money(row) and refund.amount_minor == (left if amount is None else amount)
            assert refund.currency == row.currency
            assert refund.amount_minor <= limit, (refund.amount_minor, limit)  # never more than fits
            assert refund.status == ("COMPLETED" if returned else "PENDING")
            assert after["refunds"] == before["refunds"] + 1
            self.m.refund_asks.append((kwargs, refund.id))
        else:
            # Refused only when it does not fit: nothing held, nothing left, or more than fits (one cooperative,
            # its statement lines recorded with their request's reference: no other refusal applies).
            assert not holds_money(row) or limit == 0 or (amount is not None and amount > limit), refused

    def replay_refund(self, i: int) -> None:
        asked = [(kwargs, refund_id) for kwargs, refund_id in self.m.refund_asks if kwargs]
        kwargs, refund_id = asked[i % len(asked)]
        result, refused, before, after = self.run(self.attempt(lambda s: request_refund(s, self.rt, **kwargs)))
        note(f"replay refund {refund_id} -> {refused or result[0].id}")
        assert refused is None and result[0].id == refund_id and result[1] is False
        assert after == before

    def refunds_at_once(self, i: int) -> None:
        """Two refunds of most of what is left, asked for at the same moment: one at most is made."""
        pid = self.pick(i, ("COMPLETED", "PARTIALLY_REFUNDED"))
        assert pid is not None
        left = self._left(pid)
        if left < 2:
            return
        share = left // 2 + 1
        keys = [self.uid("rfc"), self.uid("rfc")]

        async def one(key: str) -> Any:
            try:
                async with self.rt.sessionmaker.begin() as s:
                    refund, _ = await request_refund(s, self.rt, payment_id=pid, cooperative_id=None,
                                                     amount=Money(share, "RWF"), reason="twice", idempotency_key=key,
                                                     actor=ADMIN)
                    return refund.id
            except DomainError as exc:
                return exc

        async def both() -> list[Any]:
            return list(await asyncio.gather(one(keys[0]), one(keys[1])))

        made = [r for r in self.run(both()) if isinstance(r, str)]
        note(f"two refunds of {share} of {pid} (left {left}) at once -> {len(made)} made")
        assert len(made) == 1, made  # each fits alone; both together do not

    @precondition(lambda self: self.m.refund_asks)
    @rule(i=st.integers(0, 9), success=st.booleans())
    def refund_callback(self, i: int, success: bool) -> None:
        """The provider calls back about a refund: one still open when there is one, else any."""
        refunds = self.run(self.rows())[1]
        ids = [refund_id for _, refund_id in self.m.refund_asks]
        open_ = [refund_id for refund_id in ids if refunds[refund_id].status in ("PENDING", "PROCESSING")]
        refund_id = (open_ or ids)[i % len(open_ or ids)]
        before = refunds[refund_id]
        payment = self.run(self.payment(before.payment_id))
        outcome = ProviderOutcome.SUCCEEDED if success else ProviderOutcome.FAILED
        event = ProviderEvent(provider=payment.provider, kind=EventKind.REFUND,
                              event_id=f"{before.provider_reference}:{outcome.value}:{self.uid('re')}",
                              reference=before.provider_reference, outcome=outcome,
                              provider_transaction_id=f"RF{self.uid('rt')}" if success else None,
                              reason=None if success else "could not perform transaction")
        result = self.run(handle_provider_event(self.rt, event))
        self.m.sent.append(event)
        after = self.run(self.refund_row(refund_id))
        note(f"refund callback {refund_id} {outcome.value} -> {result}: {before.status} -> {after.status}")
        if before.status in ("PENDING", "PROCESSING"):
            assert after.status == ("COMPLETED" if success else "FAILED")
        elif before.status == "FAILED" and success:
            assert after.status == "COMPLETED"  # sent after all: completes, flagged
        else:
            assert after.status == before.status

    # --- rules: disputes ---------------------------------------------------------------------------------------
    @precondition(lambda self: self.m.payments)
    @rule(i=st.integers(0, 9))
    def dispute_open(self, i: int) -> None:
        pid = self.pick(i, tuple(s.value for s in COLLECTED))
        assert pid is not None

        async def opening(s: Any) -> Any:
            payment = await core.db.lock_row(s, Payment, pid)
            return await open_dispute(s, payment=payment, reason="WRONG_AMOUNT", channel="api", actor=ADMIN,
                                      cipher=self.rt.cipher, answer_days=self.rt.settings.sms_payer_answer_days)

        result, refused, _, _ = self.run(self.attempt(opening))
        note(f"dispute open {pid} -> {refused or result.id}")
        if refused is None:
            self.m.disputes.append(result.id)

    # Only once a dispute was opened: drawn before, it did nothing, and the derandomized search's dispute moves then
    # hung on which examples the seed (the class's source) gave: one edit of this file left 2 moves in 51 disputes and
    # none resolved.
    @precondition(lambda self: self.m.disputes)
    @rule(i=st.integers(0, 9), to=st.sampled_from(["UNDER_REVIEW", "RESOLVED", "RESOLVED", "REJECTED", "WITHDRAWN"]),
          amount=st.none() | st.integers(1, 60_000), returned=st.booleans())
    def dispute_move(self, i: int, to: str, amount: int | None, returned: bool) -> None:
        disputes = self.run(self.rows())[2]
        # In the order they were opened (their ids are random: sorted by id, the same draw moved another one).
        open_ = [d.id for d in sorted(disputes.values(), key=lambda d: (d.created_at, d.reference))
                 if d.status in ("OPEN", "UNDER_REVIEW")]
        if not open_:
            return
        did = open_[i % len(open_)]
        kwargs: dict[str, Any] = {}
        if to == "RESOLVED" and amount is not None:
            kwargs = {"refund_amount": Money(amount, "RWF"),
                      "returned": ReturnedByProvider(f"CB{self.uid('cbd')}") if returned else None}
        result, refused, before, after = self.run(self.attempt(lambda s: move_dispute(
            s, self.rt, dispute_id=did, cooperative_id=None, target=to, actor=ADMIN, note="looked at it",
            **kwargs)))
        note(f"dispute move {did} -> {to} {kwargs} -> {refused or result.status}")
        if refused is None:
            assert result.status == to
            made = after["refunds"] - before["refunds"]
            assert made == (1 if kwargs else 0), made
            if kwargs:
                refund = self.run(self._dispute_refund(did))
                self.m.refund_asks.append(({}, refund))  # (callbacks only: its key is the dispute's)

    async def _dispute_refund(self, dispute_id: str) -> str:
        async with self.rt.sessionmaker() as s:
            return (await s.execute(select(Refund.id).where(Refund.dispute_id == dispute_id)
                                    .order_by(Refund.created_at.desc()).limit(1))).scalar_one()

    # --- rules: time -----------------------------------------------------------------------------------------
    @rule(minutes=st.integers(1, 8))
    def clock(self, minutes: int) -> None:
        core.db._clock_offset += minutes * 60
        note(f"clock +{minutes} min -> {utcnow()}")
        self.reports_add_up()

    def teardown(self) -> None:
        """The reports checked, and what the example reached (a run that never takes money tests little)."""
        self.reports_add_up()
        payments, refunds, disputes = self.run(self.rows())
        reached = [f"payment {p.status}" + (" taken after failure" if taken_after_failure(p) else "")
                   for p in payments.values()]
        reached += [f"refund {r.status}" + (" returned by provider" if r.returned_by_provider else "")
                    for r in refunds.values()]
        reached += [f"dispute {d.status}" for d in disputes.values()]
        reached += ["month crossed"] if utcnow() >= self.w.turn else []
        reached += [f"{entity} {source} -> {target}" for entity, source, target in self.run(self._all_moves())]
        for what in reached:
            event(what)
        self.w.reached.update(reached)

    async def _all_moves(self) -> list[tuple[str, str | None, str]]:
        async with self.rt.sessionmaker() as s:
            rows = (await s.execute(select(AuditEvent.entity_type, AuditEvent.action, AuditEvent.before,
                                           AuditEvent.after).where(AuditEvent.id > self.w.last_audit))).all()
        return [(kind, (before or {}).get("status"), after["status"]) for kind, action, before, after in rows
                if after and after.get("status") and before and "status" in before
                and action == f"{kind}.{after['status'].lower()}"]

    # --- what must always hold ---------------------------------------------------------------------------------
    @invariant()
    def money_and_moves(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        payments, refunds, disputes = await self.rows()
        async with self.rt.sessionmaker() as s:
            audit = list((await s.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars())
            events = [p for p, in (await s.execute(select(OutboxJob.payload).where(
                OutboxJob.kind == "webhook.event"))).all()]
        assert set(payments) == set(self.m.payments), "a payment the model did not make"
        by_subject = Counter((e["event_type"], e["data"]["id"]) for e in events)
        assert len({e["event_id"] for e in events}) == len(events), "an event queued twice"
        known = set(payments) | set(refunds) | set(disputes)
        assert all(subject in known for _, subject in by_subject), "an event about nothing the model made"

        for pid, row in payments.items():
            taken = collected(row) if holds_money(row) else 0
            mine = [r for r in refunds.values() if r.payment_id == pid]
            back = sum(r.amount_minor for r in mine if r.status == "COMPLETED")
            held = sum(r.amount_minor for r in mine if r.status != "FAILED")
            # Minor units, one currency: every amount an integer, every refund in its payment's currency.
            assert all(isinstance(v, int) for v in (row.amount_minor, row.refunded_minor, row.fee_minor or 0))
            assert all(r.currency == row.currency and isinstance(r.amount_minor, int) and r.amount_minor > 0
                       for r in mine)
            assert row.refunded_minor == back >= 0, (row.refunded_minor, back)
            # What is given back, or on its way, never exceeds what was taken ... unless a refund failed and then
            # went through after another had taken its place: the member paid back twice, flagged for a person.
            # Or a chargeback recorded beyond what the refunds left (refund.returned_beyond_collected): flagged too.
            late_refund = any((a.action == "refund.completed" and (a.before or {}).get("status") == "FAILED")
                              or a.action == "refund.returned_beyond_collected"
                              for a in audit if a.entity_id in {r.id for r in mine})
            if not late_refund:
                assert held <= taken or (row.status == "VOIDED" and back == 0), (row.status, held, taken)
                assert back <= taken or row.status == "VOIDED", (row.status, back, taken)
            elif back > taken:
                assert row.mismatch, "paid back more than taken, not flagged"
            # One flag per payment going beyond collected by chargebacks (core.refunds._returned_beyond_collected):
            # a chargeback while its flag is open replaces it (`updated`: the one before), naming the chargebacks
            # together; only a payment newly beyond collected gets a flag of its own. (Nothing here reviews a flag.)
            beyond = [a for a in audit if a.action == "refund.returned_beyond_collected"
                      and a.entity_id in {r.id for r in mine}]
            for earlier, later in itertools.pairwise(beyond):
                if later.after["updated"] is not None:
                    assert later.after["updated"] == earlier.entity_id, (earlier.after, later.after)
                    assert later.after["chargebacks"] == [*earlier.after["chargebacks"], later.entity_id]
            self.w.reached.update("chargeback beyond collected" + (", its flag updated" if a.after["updated"] else "")
                                  for a in beyond)
            # The payment's one flag beyond collected is written by a chargeback or by another refund that went
            # through beyond it (payment.beyond_collected, on the payment): each replaces the open one (`replaced`),
            # or starts a new one (None); the newest of either states what is beyond collected now.
            flags = [a for a in audit if a in beyond or (a.action == "payment.beyond_collected" and a.entity_id == pid)]
            detail = row.mismatch_detail or ""
            if flags and " … " not in detail:  # (not cut to the column's length: core.payments.fit_detail)
                assert detail.count(": recover it from the member") == sum(
                    a.after["replaced"] is None for a in flags), detail
                assert flags[-1].after["flag"] in detail, (flags[-1].after, detail)
            if row.status in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED") and not late_refund:
                assert row.status == ("COMPLETED" if back == 0 else "REFUNDED" if back >= taken
                                      else "PARTIALLY_REFUNDED"), (row.status, back, taken)
            self._moves(PAYMENT, row, "PENDING", audit, by_subject)
            assert by_subject[("payment.taken_after_failure", pid)] == (1 if taken_after_failure(row) else 0)
        for rid, r in refunds.items():
            self._moves(REFUND, r, "PENDING", audit, by_subject)
            if r.status == "COMPLETED":
                assert r.completed_at is not None
        for did, d in disputes.items():
            moves = self._moves(DISPUTE, d, "OPEN", audit, None)
            assert by_subject[("dispute.opened", did)] == 1
            # A move's event, and a note's added without one (UNDER_REVIEW again with the move's note).
            notes = sum(1 for a in audit if a.entity_id == did and a.action == "dispute.note_added")
            assert by_subject[("dispute.updated", did)] == len(moves) + notes, (did, moves, notes)

    def _moves(self, machine: StateMachine[Any], row: Any, first: str, audit: list[AuditEvent],
               events: Counter[tuple[str, str]] | None) -> list[tuple[str, str]]:
        """The row's audited moves (its machine's <name>.<target> rows): a chain of moves the machine allows, from
        where it starts to where the row is; and each move's webhook event queued exactly once."""
        moves = [(a.before["status"], a.after["status"]) for a in audit
                 if a.entity_type == machine.name and a.entity_id == row.id and a.before and a.after
                 and "status" in a.before and a.after.get("status")
                 and a.action == f"{machine.name}.{a.after['status'].lower()}"]
        state = first
        for n, (source, target) in enumerate(moves):
            if source is None:  # made in that state: a payment recorded from a statement line is made COMPLETED
                assert n == 0 and machine is PAYMENT and row.channel == "recorded", (row.id, moves)
                state = target
                continue
            assert source == state, (machine.name, row.id, moves)
            assert machine.allowed(machine.states(source), machine.states(target)), (machine.name, source, target)
            state = target
        assert state == row.status, (machine.name, row.id, moves, row.status)
        if events is not None:
            wanted = Counter(MOVE_EVENTS[(machine.name, t)] for _, t in moves if (machine.name, t) in MOVE_EVENTS)
            for event_type in {e for (name, _), e in MOVE_EVENTS.items() if name == machine.name}:
                assert events[(event_type, row.id)] == wanted[event_type], (row.id, event_type, moves,
                                                                             events[(event_type, row.id)])
        return moves

    def reports_add_up(self) -> None:
        """The reconciliation's figures (each month, and both) against the rows: checked whenever the clock moves and
        at the end of each example (after every step it took two thirds of the run)."""
        self.run(self._reports())

    async def _reports(self) -> None:
        payments, refunds, disputes = await self.rows()
        coop = self.demo["cooperative_id"]

        def scope(query: Any, model: Any) -> Any:
            return query.where(model.cooperative_id == coop)

        turn = self.w.turn
        periods = [(turn - timedelta(days=1)).replace(day=1), turn, next_month(turn)]
        async with self.rt.sessionmaker() as s:
            months = [await reconciliation(s, scope=scope, start=a, end=b) for a, b in itertools.pairwise(periods)]
            whole = await reconciliation(s, scope=scope, start=periods[0], end=periods[-1])
            completions = (await s.execute(select(AuditEvent.entity_id, func.min(AuditEvent.at)).where(
                AuditEvent.entity_type == "payment", AuditEvent.action.in_(
                    ("payment.completed", "payment.success_after_failure"))).group_by(AuditEvent.entity_id))).all()
            voids = dict((await s.execute(select(AuditEvent.entity_id, AuditEvent.at).where(
                AuditEvent.action == "payment.voided"))).all())
        recorded_at = dict(completions)
        # Last month's figures changed after it ended: money it saw move that the gateway learnt of this month (a
        # statement line, a chargeback dated back), and recordings of it voided this month.
        last = months[0]
        inside_last = lambda t: t is not None and periods[0] <= t < turn  # noqa: E731
        assert sorted(x["id"] for x in last["paymentsRecordedLater"]) == sorted(
            p.id for p in payments.values() if (holds_money(p) or p.status == "VOIDED")
            and inside_last(p.completed_at) and recorded_at[p.id] >= turn)
        assert sorted(x["id"] for x in last["paymentsVoidedLater"]) == sorted(
            p.id for p in payments.values() if p.status == "VOIDED" and inside_last(p.completed_at)
            and voids[p.id] >= turn)
        assert sorted(x["id"] for x in last["refundsRecordedLater"]) == sorted(
            r.id for r in refunds.values() if r.status == "COMPLETED" and inside_last(r.completed_at)
            and (r.created_at >= turn or r.updated_at >= turn))
        for (start, end), report in zip([*itertools.pairwise(periods), (periods[0], periods[-1])], [*months, whole]):
            inside = lambda t: t is not None and start <= t < end  # noqa: E731
            asked = [p for p in payments.values() if inside(p.created_at)]
            held = [p for p in asked if holds_money(p)]
            taken = sum(collected(p) for p in held)
            fees = sum(p.fee_minor or 0 for p in held)
            back = sum(p.refunded_minor for p in held)
            expected_totals = [{"currency": "RWF", "collectedCount": sum(1 for p in held if collected(p) > 0),
                                "collected": taken, "fees": fees, "refunded": back,
                                "net": taken - fees - back}] if held else []
            assert report["totals"] == expected_totals, (start, report["totals"], expected_totals)
            statuses = Counter(p.status for p in asked)
            amounts: Counter[str] = Counter()
            for p in asked:
                amounts[p.status] += p.amount_minor
            assert report["payments"]["byStatus"] == [
                {"status": k, "currency": "RWF", "count": statuses[k], "amount": amounts[k]} for k in sorted(statuses)]
            # Money that moved in the period, as the statement lists it: collections by completed_at, refunds by
            # theirs (a chargeback dated by the provider, a recording by the statement).
            came = [p for p in payments.values() if holds_money(p) and inside(p.completed_at)]
            went = [r for r in refunds.values() if r.status == "COMPLETED" and inside(r.completed_at)]
            if came or went:
                coll, fee, out = (sum(collected(p) for p in came), sum(p.fee_minor or 0 for p in came),
                                  sum(r.amount_minor for r in went))
                assert report["settled"] == [{
                    "provider": "mtn_momo", "paymentMethod": "MOBILE_MONEY_MTN", "currency": "RWF",
                    "collectedCount": sum(1 for p in came if collected(p) > 0), "collected": coll, "fees": fee,
                    "refundedCount": len(went), "refunded": out, "net": coll - fee - out}], report["settled"]
            else:
                assert report["settled"] == []
            made = Counter((r.status, r.currency) for r in refunds.values() if inside(r.created_at))
            assert sorted((x["status"], x["currency"], x["count"]) for x in report["refunds"]) == sorted(
                (s, c, n) for (s, c), n in made.items())
            assert report["disputesOpened"] == sum(1 for d in disputes.values() if inside(d.created_at))
            assert report["disputesOpenAtEnd"] == sum(1 for d in disputes.values() if d.created_at < end and (
                d.status in ("OPEN", "UNDER_REVIEW") or (d.resolved_at is not None and d.resolved_at >= end)))
            assert report["openDisputes"] == sum(1 for d in disputes.values() if d.status in ("OPEN", "UNDER_REVIEW"))
        # The two months add up to the whole.
        for key in ("collected", "fees", "refunded", "net", "collectedCount", "refundedCount"):
            assert sum(line[key] for m in months for line in m["settled"]) == sum(
                line[key] for line in whole["settled"]), key


async def _references(rt: Any, *, restart: bool = False) -> int:
    """Where human_reference_seq is (core.references); `restart`: put back to its start first."""
    async with rt.engine.begin() as conn:
        if restart:
            await conn.execute(text("ALTER SEQUENCE human_reference_seq RESTART"))
        return int((await conn.execute(text("SELECT last_value FROM human_reference_seq"))).scalar_one())


@pytest.fixture
def world(migrated_database: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The runtime on its own event loop (the state machine's rules are plain functions), the demo seeded once."""
    global WORLD
    from app import open_runtime
    from core.demo import seed_demo

    monkeypatch.setattr(core.db, "_clock_offset", 0.0)  # put back after: the rules move it
    # Hypothesis draws one value in twenty or so from the constants of the project's modules loaded so far
    # (providers._get_local_constants): which modules the files run before imported changed the derandomized
    # sequence (after tests/admin_api/test_refunds_disputes.py the admin API's and the channels' numbers joined
    # the pool, and another search ran). None here, and no pool cached by an earlier test (CONSTANTS_CACHE).
    pooled = getattr(hypothesis_providers, "CONSTANTS_CACHE", None)
    if pooled is not None and hasattr(hypothesis_providers, "_get_local_constants"):
        monkeypatch.setattr(hypothesis_providers, "_get_local_constants", Constants)
        pooled.cache.clear()
    loop = asyncio.new_event_loop()
    runtime_cm = open_runtime(make_settings(RATE_LIMIT_MULTIPLIER="0"))
    rt = loop.run_until_complete(runtime_cm.__aenter__())
    try:
        loop.run_until_complete(clean_database(rt))
        loop.run_until_complete(_references(rt, restart=True))  # (clean_database leaves the sequence where it was)

        async def seed() -> dict[str, Any]:
            async with rt.sessionmaker.begin() as s:
                return await seed_demo(s, rt.cipher)

        demo = loop.run_until_complete(seed())
        counts = loop.run_until_complete(_counts(rt))
        keep = frozenset(name for name, n in counts.items() if n)
        WORLD = World(loop, rt, demo, keep, counts["audit_events"], {k: counts[k] for k in keep},
                      loop.run_until_complete(_references(rt)), month_turn(utcnow()))
        yield WORLD
    finally:
        WORLD = None
        if pooled is not None:
            pooled.cache.clear()  # (the next test's pool: its modules' constants)
        loop.run_until_complete(runtime_cm.__aexit__(None, None, None))
        loop.close()


def test_the_money_core_keeps_its_invariants_through_any_sequence(world: World) -> None:
    run_state_machine_as_test(MoneyCore, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not SEARCH, database=None,
        suppress_health_check=list(HealthCheck)))
    # The harness itself: a run that never takes money, gives it back or disputes it checks little.
    print(dict(world.reached))
    for needed in ("payment PENDING -> COMPLETED", "payment COMPLETED -> PARTIALLY_REFUNDED",
                   "payment COMPLETED -> VOIDED", "refund PENDING -> COMPLETED",
                   "refund COMPLETED returned by provider", "dispute OPEN -> RESOLVED", "month crossed"):
        assert world.reached[needed], (needed, world.reached)
