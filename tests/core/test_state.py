"""State machines: every allowed move succeeds, every other is refused, races have one winner."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import bindparam, select, update

from core.audit import Actor
from core.db import utcnow
from core.models import AuditEvent, OutboxJob
from core.outbox import NewJob
from core.state import IllegalTransition, StaleTransition, transition
from core.state.dispute import DISPUTE
from core.state.payment import PAYMENT, PaymentStatus
from core.state.refund import REFUND
from core.state.sms import SMS
from tests.conftest import requires_pg
from tests.core.factories import row_in_state

MACHINES = [PAYMENT, REFUND, DISPUTE, SMS]
ACTOR = Actor("admin:test", "api")
ALLOWED = [(m, s, t) for m in MACHINES for s, t in m.pairs()]
REFUSED = [(m, s, t) for m in MACHINES for s in m.states for t in m.states if not m.allowed(s, t)]
RECOVERIES = [(m, name, s, t) for m in MACHINES for name, s, t in m.recovery_pairs()]


def test_tables_cover_every_state():
    for machine in MACHINES:
        assert set(machine.table) == set(machine.states)


def test_final_states():
    assert PAYMENT.final == {PaymentStatus.FAILED, PaymentStatus.REFUNDED, PaymentStatus.VOIDED}
    # A voided recording is never reopened (a provider's success afterwards is flagged: core.provider_events).
    assert PAYMENT.allowed(PaymentStatus.COMPLETED, PaymentStatus.VOIDED)
    assert not PAYMENT.allowed(PaymentStatus.VOIDED, PaymentStatus.COMPLETED)
    # TIMEOUT and CANCELLED are final except for money reported taken late, which is flagged.
    assert PAYMENT.is_exceptional(PaymentStatus.TIMEOUT, PaymentStatus.COMPLETED)
    assert not PAYMENT.is_exceptional(PaymentStatus.PENDING, PaymentStatus.COMPLETED)
    assert not PAYMENT.allowed(PaymentStatus.FAILED, PaymentStatus.COMPLETED)


@pytest.mark.parametrize(("machine", "source", "target"), ALLOWED,
                         ids=[f"{m.name}:{s}->{t}" for m, s, t in ALLOWED])
async def test_allowed_pair_succeeds_and_is_audited(sm, machine, source, target):
    async with sm.begin() as session:
        row = await row_in_state(session, machine.name, source.value)
        updated = await transition(session, machine, row.id, source, target, actor=ACTOR)
        assert updated.status == target.value
    async with sm() as session:
        fresh = await session.get(machine.model, row.id)
        assert fresh.status == target.value
        audit = (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == row.id))).scalars().all()
        assert [(a.action, a.before, a.after["status"], a.actor, a.channel) for a in audit] == [
            (f"{machine.name}.{target.value.lower()}", {"status": source.value}, target.value, "admin:test", "api")]
        if machine.is_exceptional(source, target):
            assert audit[0].after["exceptional"] is True


@pytest.mark.parametrize(("machine", "source", "target"), REFUSED,
                         ids=[f"{m.name}:{s}->{t}" for m, s, t in REFUSED])
async def test_refused_pair_raises_typed_error_and_changes_nothing(sm, machine, source, target):
    async with sm.begin() as session:
        row = await row_in_state(session, machine.name, source.value)
    async with sm.begin() as session:
        with pytest.raises(IllegalTransition) as info:
            await transition(session, machine, row.id, source, target, actor=ACTOR)
        assert (info.value.source, info.value.target) == (source.value, target.value)
    async with sm() as session:
        assert (await session.get(machine.model, row.id)).status == source.value


def test_sms_recoveries_are_the_senders_corrections_only():
    """Declared (the README's SMS section lists them) and none of them a move of the table: a caller that names none,
    a delivery report, cannot make them."""
    from core.state.sms import SmsStatus as M
    assert SMS.recovery_pairs() == [("reopened", M.SENT, M.QUEUED), ("confirmed", M.FAILED, M.SENT),
                                    ("confirmed", M.SENT, M.SENT), ("sent", M.FAILED, M.SENT),
                                    ("rejected", M.FAILED, M.REJECTED)]
    assert not any(SMS.allowed(s, t) for _, s, t in SMS.recovery_pairs() if s != t)
    assert SMS.final >= {M.FAILED} and not SMS.allowed(M.FAILED, M.SENT)


@pytest.mark.parametrize(("machine", "name", "source", "target"), RECOVERIES,
                         ids=[f"{m.name}:{n}:{s}->{t}" for m, n, s, t in RECOVERIES])
async def test_a_recovery_is_made_only_when_named_and_audited_so(sm, machine, name, source, target):
    async with sm.begin() as session:
        row = await row_in_state(session, machine.name, source.value)
    others = [other for other in (*machine.recoveries, "nonesuch") if (source, target) not in machine.recoveries.get(
        other, ())]
    async with sm.begin() as session:
        for wrong in (None, *others):  # unnamed, or named as a recovery that does not make it: refused
            if wrong is None and machine.allowed(source, target):
                continue
            with pytest.raises(IllegalTransition) as info:
                await transition(session, machine, row.id, source, target, actor=ACTOR, recovery=wrong)
            assert (info.value.source, info.value.target, info.value.recovery) == (source.value, target.value, wrong)
        table = machine.model.__table__
        with pytest.raises(StaleTransition):  # its guard not met: nothing moves
            await transition(session, machine, row.id, source, target, actor=ACTOR, recovery=name,
                             where=table.c.id != row.id)
    async with sm.begin() as session:
        moved = await transition(session, machine, row.id, source, target, actor=ACTOR, recovery=name,
                                 was={"note": "why"})
        assert moved.status == target.value
    async with sm() as session:
        assert (await session.get(machine.model, row.id)).status == target.value
        audit = (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == row.id))).scalars().all()
        assert [(a.action, a.before, a.after["status"], a.after["recovery"]) for a in audit] == [
            (f"{machine.name}.{name}", {"status": source.value, "note": "why"}, target.value, name)]


async def test_stale_source_is_refused(sm):
    async with sm.begin() as session:
        row = await row_in_state(session, "payment", "COMPLETED")
    async with sm.begin() as session:
        with pytest.raises(StaleTransition):
            await transition(session, PAYMENT, row.id, PaymentStatus.PENDING, PaymentStatus.FAILED, actor=ACTOR)


_NOTE = (update(PAYMENT.model.__table__).where(PAYMENT.model.__table__.c.id == bindparam("b_id"))
         .values(failure_reason=bindparam("b_note"), updated_at=bindparam("b_at")))


@pytest.mark.parametrize("opened", [False, True], ids=["first-statement", "in-open-transaction"])
async def test_jobs_and_the_write_alongside_happen_only_with_the_move(sm, opened):
    async with sm.begin() as session:
        row = await row_in_state(session, "payment", "PENDING")
        other = await row_in_state(session, "payment", "PENDING")
    jobs = [NewJob("test.receipt", {"n": 1}, dedupe_key=f"r:{row.id}"),
            NewJob("test.event", {"n": 2}, dedupe_key=f"e:{row.id}")]

    async def queued(session):
        return sorted((await session.execute(select(OutboxJob.kind, OutboxJob.payload)
                                             .where(OutboxJob.kind.like("test.%")))).all())

    async with sm.begin() as session:
        if opened:
            await session.execute(select(1))  # an earlier statement began the transaction
        with pytest.raises(StaleTransition):
            await transition(session, PAYMENT, row.id, PaymentStatus.PROCESSING, PaymentStatus.FAILED, actor=ACTOR,
                             jobs=jobs, alongside=(_NOTE, {"b_id": other.id, "b_note": "written", "b_at": utcnow()}))
        # Nothing was queued or written with a move that did not happen (read in the same transaction).
        assert await queued(session) == []
        assert (await session.get(PAYMENT.model, other.id)).failure_reason is None
    async with sm.begin() as session:
        if opened:
            await session.execute(select(1))
        await transition(session, PAYMENT, row.id, PaymentStatus.PENDING, PaymentStatus.FAILED, actor=ACTOR,
                         jobs=jobs, alongside=(_NOTE, {"b_id": other.id, "b_note": "written", "b_at": utcnow()}))
    async with sm.begin() as session:
        assert await queued(session) == [("test.event", {"n": 2}), ("test.receipt", {"n": 1})]
        assert (await session.get(PAYMENT.model, other.id)).failure_reason == "written"
        assert (await session.get(PAYMENT.model, row.id)).status == "FAILED"
        # A job already queued (same dedupe key) is skipped; one without a key is queued after the move.
        other_row = await row_in_state(session, "payment", "PENDING")
        await transition(session, PAYMENT, other_row.id, PaymentStatus.PENDING, PaymentStatus.COMPLETED,
                         actor=ACTOR, jobs=[jobs[0], NewJob("test.unkeyed", {"n": 3})])
    async with sm() as session:
        assert await queued(session) == [("test.event", {"n": 2}), ("test.receipt", {"n": 1}),
                                          ("test.unkeyed", {"n": 3})]


@requires_pg
async def test_concurrent_transitions_from_same_state_exactly_one_wins(sm):
    async with sm.begin() as session:
        row = await row_in_state(session, "payment", "PENDING")

    async def attempt(target: PaymentStatus) -> str:
        try:
            async with sm.begin() as session:
                await transition(session, PAYMENT, row.id, PaymentStatus.PENDING, target, actor=ACTOR)
                await asyncio.sleep(0.05)  # hold the row lock so the other writer really waits
            return target.value
        except StaleTransition:
            return "lost"

    for _ in range(5):
        async with sm.begin() as session:
            fresh = await session.get(PAYMENT.model, row.id)
            fresh.status = "PENDING"
        results = await asyncio.gather(*(attempt(t) for t in
                                         (PaymentStatus.COMPLETED, PaymentStatus.FAILED, PaymentStatus.TIMEOUT)))
        winners = [r for r in results if r != "lost"]
        assert len(winners) == 1
        async with sm() as session:
            assert (await session.get(PAYMENT.model, row.id)).status == winners[0]


@given(st.lists(st.sampled_from(list(PaymentStatus)), min_size=1, max_size=12))
def test_any_walk_through_the_table_only_uses_declared_moves(walk):
    state = PaymentStatus.PENDING
    for target in walk:
        if PAYMENT.allowed(state, target):
            state = target
        else:
            with pytest.raises(IllegalTransition):
                PAYMENT.check(state, target)
    assert state in PaymentStatus


@pytest.mark.parametrize("change", [None, "flushed", "not flushed", "expired", "one column expired"])
async def test_the_loaded_instance_holds_the_moved_row_after_the_move(sm, change):
    """The session's instance of the moved row is refreshed from what the move returned: every column as stored,
    nothing left to flush, nothing expired. A change it held when the move began is written first by the move's
    transaction (autoflush); with autoflush off it is dropped, each column set to what the move returned. An
    instance expired whole or in part (as a rollback or session.expire leaves it) is loaded and no longer expired."""
    from sqlalchemy import inspect

    async with sm.begin() as session:
        row = await row_in_state(session, "payment", "PENDING")
    async with sm.begin() as session:
        loaded = await session.get(PAYMENT.model, row.id)
        if change in ("flushed", "not flushed"):
            loaded.failure_reason = "typed in by hand"
        elif change == "expired":
            session.expire(loaded)  # as a rollback leaves it
        elif change == "one column expired":
            session.expire(loaded, ["failure_reason"])
        session.sync_session.autoflush = change != "not flushed"
        moved = await transition(session, PAYMENT, row.id, PaymentStatus.PENDING, PaymentStatus.FAILED, actor=ACTOR)
        assert moved is loaded
        state = inspect(loaded)
        assert not state.expired and not state.expired_attributes
        assert not any(a.history.has_changes() for a in state.attrs)
        seen = {c.key: getattr(loaded, c.key) for c in PAYMENT.model.__table__.c}
    async with sm() as session:
        stored = await session.get(PAYMENT.model, row.id)
        assert seen == {c.key: getattr(stored, c.key) for c in PAYMENT.model.__table__.c}
        assert stored.status == "FAILED"
        assert stored.failure_reason == ("typed in by hand" if change == "flushed" else None)
