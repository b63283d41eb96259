"""A refund's late success (it FAILED, then the provider says it went through after all), a dispute's resolution and a
chargeback on one payment, run truly at the same moment on PostgreSQL, one held at its locks while the others line
up, in each order. What holds after, whichever went first: the refunds asked for since that would now give back more
than was collected are withdrawn before they are sent (what still goes back beyond it is flagged), no refund is left
PENDING with nothing to move it, each audit row, webhook event and SMS is written once, and none of them is rolled
back in a deadlock.

The defect these found: a resolution in the member's favour without a refund of its own links (and so locks) the
payment's refunds not yet settled (core.disputes._rely_on_unsettled), and a late success at that moment skipped the
refund it held (core.refunds._withdraw_unsent, SKIP LOCKED): it was left PENDING and sent, and the member was paid
back twice, flagged only once the second refund completed. The late success now locks every dispute of the payment
before the payment (core.refunds._lock_disputes_noted), so it waits for the resolution and then withdraws it. A
dispute opened in the instant between those two locks escaped them (the last tests here): it is now taken under the
payment's lock without waiting, or both locks are let go and taken again in order
(core.refunds._lock_disputes_then_payment)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.disputes import move_dispute, open_dispute
from core.models import AuditEvent, Dispute, OutboxJob, Payment, Refund
from core.money import Money
from core.payments import create_payment
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from core.refunds import ReturnedByProvider, apply_refund_outcome, lock_for_outcome, request_refund
from tests.conftest import requires_pg, waiting_for_locks
from tests.providers.wires import ADMIN, completed, mtn_payment

pytestmark = requires_pg

Step = Callable[[Any], Awaitable[Any]]


async def _paid(rt: Any, demo: dict[str, Any]) -> Payment:
    """A completed 50,000 RWF MTN payment of a member."""
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key=f"key-{uuid.uuid4().hex}"), actor=ADMIN)
    await completed(rt, payment, transaction_id=f"TX-{uuid.uuid4().hex[:12]}")
    return payment


async def _refund(rt: Any, payment: Payment) -> Refund:
    """A refund of all that is left, PENDING (its submission queued, untried)."""
    async with rt.sessionmaker.begin() as s:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                         amount=None, reason="paid twice", idempotency_key=f"r-{uuid.uuid4().hex}",
                                         actor=ADMIN)
    return refund


async def _setup(rt: Any, demo: dict[str, Any]) -> tuple[Payment, Refund, Refund, Dispute]:
    """The payment; `failed`, a full refund the provider refused (FAILED); `waiting`, the full refund asked for since
    (PENDING, untried, linked to no dispute); and a dispute opened after both (OPEN)."""
    payment, failed, waiting = await _undisputed(rt, demo)
    dispute = await _opened(rt, payment)
    assert waiting.dispute_id is None and failed.dispute_id is None
    return payment, failed, waiting, dispute


def _provider_says(refund: Refund, outcome: ProviderOutcome, txn: str | None = None) -> Event:
    return Event(provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex,
                 reference=refund.provider_reference, outcome=outcome, provider_transaction_id=txn,
                 reason=None if outcome is ProviderOutcome.SUCCEEDED else "COULD_NOT_PERFORM_TRANSACTION")


def _late_success(rt: Any, failed: Refund) -> Step:
    """The provider's late word that `failed` went through, as a worker applies it (its poll, its submission's
    answer): the refund locked for the outcome, then applied."""
    async def step(s: Any) -> Any:
        fresh = await lock_for_outcome(s, failed.id, ProviderOutcome.SUCCEEDED)
        return await apply_refund_outcome(s, rt, fresh, ProviderOutcome.SUCCEEDED, actor=ADMIN,
                                          provider_transaction_id="RF-LATE")
    return step


def _resolution(rt: Any, dispute: Dispute) -> Step:
    """The officer resolves the dispute in the member's favour without a refund of its own (on the refund on its
    way: core.disputes._rely_on_unsettled)."""
    async def step(s: Any) -> Any:
        return await move_dispute(s, rt, dispute_id=dispute.id, cooperative_id=dispute.cooperative_id,
                                  target="RESOLVED", actor=ADMIN, note="paid back already")
    return step


def _chargeback(rt: Any, payment: Payment) -> Step:
    """An admin records the provider's chargeback of the whole payment (POST /v1/payments/{id}/refunds with
    returnedByProvider)."""
    async def step(s: Any) -> Any:
        refund, _ = await request_refund(s, rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                         amount=Money(50_000, "RWF"), reason="chargeback",
                                         idempotency_key=f"cb-{uuid.uuid4().hex}", actor=ADMIN,
                                         returned=ReturnedByProvider("CB-1"))
        return refund
    return step


async def _run(rt: Any, step: Step) -> Any:
    async with rt.sessionmaker.begin() as s:
        return await step(s)


async def _first_held(rt: Any, first: Step, *then: Step) -> list[Any]:
    """`first` run to its end and held uncommitted (its locks kept), each of `then` started in turn into its wait for
    a lock (or to its end, if it takes none `first` holds), then `first` committed: every result, or exception."""
    tasks: list[asyncio.Task[Any]] = []
    async with rt.sessionmaker() as held:
        await held.begin()
        try:
            results: list[Any] = [await first(held)]
        except Exception as exc:  # refused (its locks still held, as a request's are until it answers)
            results = [exc]
        for step in then:
            tasks.append(asyncio.create_task(_run(rt, step)))
            await waiting_for_locks(rt, len(tasks), done=tasks[-1])
        await (held.rollback() if isinstance(results[0], Exception) else held.commit())
    return results + list(await asyncio.gather(*tasks, return_exceptions=True))


async def _count(rt: Any, model: Any, *where: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one())


async def _audited(rt: Any, action: str, entity_id: str) -> int:
    return await _count(rt, AuditEvent, AuditEvent.action == action, AuditEvent.entity_id == entity_id)


async def _jobs(rt: Any, dedupe_key: str) -> int:
    return await _count(rt, OutboxJob, OutboxJob.dedupe_key == dedupe_key)


async def _withdrawn_once(rt: Any, waiting: Refund, payment: Payment) -> None:
    """`waiting` withdrawn before it was sent (FAILED "not sent"), once: its audit row and refund.failed event once, no
    SMS (the member has her money back), its submission ended; no refund of the payment left PENDING."""
    async with rt.sessionmaker() as s:
        row = await s.get(Refund, waiting.id)
        submission = (await s.execute(select(OutboxJob.status, OutboxJob.last_error).where(
            OutboxJob.dedupe_key == f"refund:{waiting.id}"))).one()
        pending = (await s.execute(select(func.count()).select_from(Refund).where(
            Refund.payment_id == payment.id, Refund.status.in_(("PENDING", "PROCESSING"))))).scalar_one()
    assert (row.status, (row.failure_reason or "").startswith("not sent: ")) == ("FAILED", True), row.failure_reason
    assert submission[0] == "DONE" and submission[1].startswith("withdrawn: "), submission
    assert pending == 0
    assert await _audited(rt, "refund.withdrawn", waiting.id) == 1
    assert await _jobs(rt, f"wh:evt_refund_failed_{waiting.id}") == 1
    assert await _count(rt, OutboxJob, OutboxJob.kind == "sms.send",
                        OutboxJob.dedupe_key.like(f"sms:refund_%:{waiting.id}%")) == 0


async def _resolved_once(rt: Any, dispute: Dispute) -> Dispute:
    """The dispute RESOLVED once: one audit row of it, one dispute.updated event and one SMS of it."""
    async with rt.sessionmaker() as s:
        row = await s.get(Dispute, dispute.id)
    assert row.status == "RESOLVED"
    assert await _count(rt, AuditEvent, AuditEvent.entity_id == dispute.id,
                        AuditEvent.action.in_(("dispute.resolved", "dispute.RESOLVED"))) == 1
    assert await _count(rt, OutboxJob, OutboxJob.kind == "sms.send",
                        OutboxJob.dedupe_key == f"sms:dispute_resolved:{dispute.id}:resolved") == 1
    assert await _count(rt, OutboxJob, OutboxJob.kind == "webhook.event",
                        OutboxJob.dedupe_key.like(f"wh:evt_dispute_updated_{dispute.id}%")) == 1
    return row


@pytest.mark.parametrize("first", ["resolution", "late_success"])
async def test_a_late_success_and_a_resolution_relying_on_the_refund_waiting_withdraw_it(
        rt: Any, demo: dict[str, Any], first: str) -> None:
    """The late success of `failed` makes `waiting` (asked for since, not yet sent) give back more than was
    collected: it is withdrawn, whether the resolution linking it (and so locking it) came first or second."""
    payment, failed, waiting, dispute = await _setup(rt, demo)
    late, resolve = _late_success(rt, failed), _resolution(rt, dispute)
    results = await _first_held(rt, *((resolve, late) if first == "resolution" else (late, resolve)))
    assert not [r for r in results if isinstance(r, BaseException)], results
    await _withdrawn_once(rt, waiting, payment)
    row = await _resolved_once(rt, dispute)
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        assert (await s.get(Refund, failed.id)).status == "COMPLETED"
    # Paid back once, what was collected: nothing beyond it, nothing flagged beyond it.
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)
    assert "more than collected" not in (paid.mismatch_detail or "")
    if first == "resolution":
        # It relied on the refund then on its way, linked to it: its withdrawal is noted there.
        assert any(waiting.reference in (n["text"] or "") and "not sent" in (n["text"] or "")
                   for n in row.notes), row.notes


async def test_a_late_success_by_callback_while_a_resolution_holds_the_refund_waiting_withdraws_it(
        rt: Any, demo: dict[str, Any]) -> None:
    """The same through the provider's callback (handle_provider_event), which retries a deadlock: it waits for the
    resolution rather than skipping the refund it holds."""
    payment, failed, waiting, dispute = await _setup(rt, demo)
    said = _provider_says(failed, ProviderOutcome.SUCCEEDED, "RF-LATE")
    results = await _first_held(rt, _resolution(rt, dispute), lambda _s: handle_provider_event(rt, said))
    assert results[1] == "completed", results
    await _withdrawn_once(rt, waiting, payment)
    await _resolved_once(rt, dispute)


@pytest.mark.parametrize("order", list(itertools.permutations(["late_success", "chargeback", "resolution"])))
async def test_a_late_success_a_chargeback_and_a_resolution_at_once(
        rt: Any, demo: dict[str, Any], order: tuple[str, str, str]) -> None:
    """Three transactions on one payment, the first held while the other two line up in the order given: the late
    success and the chargeback each give back the whole payment, so the refund waiting is withdrawn and the payment
    flagged (100,000 RWF gone back of 50,000 collected: recover it), once; the dispute resolved once."""
    payment, failed, waiting, dispute = await _setup(rt, demo)
    steps = {"late_success": _late_success(rt, failed), "resolution": _resolution(rt, dispute),
             "chargeback": _chargeback(rt, payment)}
    results = await _first_held(rt, *(steps[name] for name in order))
    assert not [r for r in results if isinstance(r, BaseException)], (order, results)
    await _withdrawn_once(rt, waiting, payment)
    await _resolved_once(rt, dispute)
    chargeback = results[order.index("chargeback")]
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        assert (await s.get(Refund, failed.id)).status == "COMPLETED"
        assert (await s.get(Refund, chargeback.id)).status == "COMPLETED"
    assert (paid.refunded_minor, paid.mismatch) == (100_000, True), (order, paid.mismatch_detail)
    assert "50,000 RWF more than collected has gone back to the payer" in paid.mismatch_detail, paid.mismatch_detail
    # The payment's one flag beyond collected, counted once; each refund told once, its SMS once.
    beyond = await _count(rt, AuditEvent, AuditEvent.action.in_(
        ("refund.returned_beyond_collected", "payment.beyond_collected")))
    assert beyond >= 1
    for refund_id in (failed.id, chargeback.id):
        assert await _jobs(rt, f"wh:evt_refund_completed_{refund_id}") == 1, refund_id
        assert await _count(rt, OutboxJob, OutboxJob.kind == "sms.send",
                            OutboxJob.dedupe_key.like(f"sms:refund_completed:{refund_id}%")) == 1


def _resolution_with_refund(rt: Any, dispute: Dispute) -> Step:
    """The officer resolves the dispute with a refund of the whole payment (core.refunds.request_refund under the
    dispute's lock: the dispute, then the payment)."""
    async def step(s: Any) -> Any:
        return await move_dispute(s, rt, dispute_id=dispute.id, cooperative_id=dispute.cooperative_id,
                                  target="RESOLVED", actor=ADMIN, note="refund it", refund_amount=Money(50_000, "RWF"))
    return step


@pytest.mark.parametrize("first", ["resolution", "late_success"])
async def test_a_late_success_and_a_resolution_with_a_refund_of_its_own(rt: Any, demo: dict[str, Any],
                                                                       first: str) -> None:
    """Resolved first, its refund (asked for while `failed` held nothing) is withdrawn by the late success, noted on
    the dispute; the late success first, the resolution's refund is refused (nothing left: 422) and the dispute stays
    OPEN for the officer. Either way the member is paid back once and nothing is left PENDING."""
    from core.errors import BusinessRuleError

    payment, failed, waiting, dispute = await _setup(rt, demo)
    async with rt.sessionmaker.begin() as s:  # (the refund queued since withdrawn by an admin: room for the officer's)
        await s.execute(update(Refund).where(Refund.id == waiting.id).values(status="FAILED", failure_reason="x"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting.id}").values(status="DONE"))
    late, resolve = _late_success(rt, failed), _resolution_with_refund(rt, dispute)
    results = await _first_held(rt, *((resolve, late) if first == "resolution" else (late, resolve)))
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        row = await s.get(Dispute, dispute.id)
        pending = (await s.execute(select(func.count()).select_from(Refund).where(
            Refund.payment_id == payment.id, Refund.status.in_(("PENDING", "PROCESSING"))))).scalar_one()
    assert (paid.status, paid.refunded_minor, pending) == ("REFUNDED", 50_000, 0)
    assert "more than collected" not in (paid.mismatch_detail or "")
    if first == "resolution":
        assert not [r for r in results if isinstance(r, BaseException)], results
        withdrawn = results[0].refund_id
        assert await _audited(rt, "refund.withdrawn", withdrawn) == 1
        assert any("not sent" in (n["text"] or "") for n in row.notes), row.notes
        await _resolved_once(rt, dispute)
    else:
        assert results[0] == "completed" and isinstance(results[1], BusinessRuleError), results
        assert (row.status, row.refund_id) == ("OPEN", None)


@pytest.mark.parametrize("first", ["resolution", "late_success"])
async def test_a_payment_taken_late_while_its_dispute_is_resolved_with_a_refund(rt: Any, demo: dict[str, Any],
                                                                               first: str) -> None:
    """A payment given up (TIMEOUT) that the member disputes ("charged, not recorded"); the provider then reports it
    taken after all while the officer resolves the dispute with a refund of it. The callback first: the payment is
    COMPLETED (late) and the resolution's refund is made on it. The resolution first: it is refused (422, nothing was
    collected yet), the dispute stays OPEN, and the payment completes. No deadlock; each told once."""
    from core.errors import BusinessRuleError

    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo, key=f"key-{uuid.uuid4().hex}"), actor=ADMIN)
        await s.execute(update(Payment).where(Payment.id == payment.id).values(
            status="TIMEOUT", failure_reason="not approved in time"))
        dispute = await open_dispute(s, payment=await s.get(Payment, payment.id), reason="CHARGED_NOT_RECORDED",
                                     channel="api", actor=ADMIN, cipher=rt.cipher, answer_days=90)
    taken = Event(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=f"late-{payment.id}",
                  reference=payment.provider_reference, outcome=ProviderOutcome.SUCCEEDED,
                  provider_transaction_id=f"TX-{uuid.uuid4().hex[:12]}")
    resolve = _resolution_with_refund(rt, dispute)

    async def callback(_s: Any) -> Any:
        return await handle_provider_event(rt, taken)

    if first == "resolution":
        results = await _first_held(rt, resolve, callback)
    else:  # the callback runs in a transaction of its own: held by a lock on the payment it waits for, then let go
        async with rt.engine.connect() as holder:
            await holder.begin()
            await holder.execute(select(Payment.id).where(Payment.id == payment.id).with_for_update())
            tasks = [asyncio.create_task(callback(None))]
            await waiting_for_locks(rt, 1)
            tasks.append(asyncio.create_task(_run(rt, resolve)))
            await waiting_for_locks(rt, 2, done=tasks[-1])
            await holder.rollback()
        results = list(await asyncio.gather(*tasks, return_exceptions=True))
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        row = await s.get(Dispute, dispute.id)
    assert paid.status == "COMPLETED" and paid.late is True
    assert await _jobs(rt, f"wh:evt_payment_completed_{payment.id}") == 1
    callback_result = results[1] if first == "resolution" else results[0]
    resolution_result = results[0] if first == "resolution" else results[1]
    assert callback_result == "late_completed", results
    if isinstance(resolution_result, BaseException):
        assert isinstance(resolution_result, BusinessRuleError), results
        assert (row.status, row.refund_id) == ("OPEN", None)
    else:
        assert row.status == "RESOLVED" and row.refund_id is not None
        await _resolved_once(rt, dispute)


async def test_a_late_success_recorded_by_an_admin_while_a_resolution_holds_the_refund_waiting_withdraws_it(
        rt: Any, demo: dict[str, Any]) -> None:
    """The same recorded by an admin from the statement (core.refunds.record_refund_outcome, COMPLETED on a FAILED
    refund): it waits for the resolution, then withdraws the refund it relied on."""
    from core.refunds import record_refund_outcome

    payment, failed, waiting, dispute = await _setup(rt, demo)

    async def recorded(s: Any) -> Any:
        return await record_refund_outcome(s, rt, refund_id=failed.id, cooperative_id=None, succeeded=True,
                                           note="on the statement", actor=ADMIN, provider_transaction_id="RF-LATE")

    results = await _first_held(rt, _resolution(rt, dispute), recorded)
    assert not [r for r in results if isinstance(r, BaseException)], results
    await _withdrawn_once(rt, waiting, payment)
    await _resolved_once(rt, dispute)


@pytest.mark.parametrize("submission", ["retrying", "parked"])
async def test_a_late_success_withdraws_a_refund_waiting_for_the_providers_configuration(
        rt: Any, demo: dict[str, Any], submission: str) -> None:
    """The refund waiting was refused by the provider for the gateway's credentials when it was sent (nothing
    processed: core.jobs.awaiting_configuration), its submission retried, then parked until the configuration is
    fixed: not sent, and withdrawable (core.refunds.cancel_refund withdraws it). The failed refund then goes through
    after all: the refund waiting would give back more than was collected. It was left to go (only a submission at
    0 attempts was withdrawn), sent when the job was replayed, and the member was paid back twice (flagged only once
    it completed). Withdrawn as an admin's withdrawal would (by its marks: no try of it may have arrived)."""
    from core.ports import AWAITING_CONFIGURATION, AWAITING_CONFIGURATION_NOTE

    payment, failed, waiting, _dispute = await _setup(rt, demo)
    error = ("401 credentials refused" + AWAITING_CONFIGURATION_NOTE if submission == "retrying" else
             f"{AWAITING_CONFIGURATION}: the provider refused the gateway's credentials")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting.id}").values(
            status="PENDING" if submission == "retrying" else "PARKED", attempts=3, last_error=error))
    assert await _run(rt, _late_success(rt, failed)) == "completed"
    await _withdrawn_once(rt, waiting, payment)
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)


# A dispute opened (and committed) in the instant between a late success's lock on the payment's disputes and its lock
# on the payment: the late success's locks on them are held between the two (`between`, run just before its payment
# lock: the dispute opened then) and after the payment's (`after`: the officer's move started then). Its first lock of
# the payment only: each path locks it again later (apply_refund_outcome, under record_refund_outcome's).
Hook = Callable[[], Awaitable[None]]


def _payment_lock_held(monkeypatch: pytest.MonkeyPatch, between: Hook, after: Hook) -> None:
    import core.refunds

    lock_row, seen = core.refunds.lock_row, []

    async def held(session: Any, model: Any, row_id: Any, cooperative_id: Any = None) -> Any:
        first = model is Payment and not seen
        if model is Payment:
            seen.append(row_id)
        if first:
            await between()
        row = await lock_row(session, model, row_id, cooperative_id)
        if first:
            await after()
        return row
    monkeypatch.setattr(core.refunds, "lock_row", held)


async def _opened(rt: Any, payment: Payment) -> Dispute:
    async with rt.sessionmaker.begin() as s:
        return await open_dispute(s, payment=await s.get(Payment, payment.id), reason="OTHER", channel="api",
                                  actor=ADMIN, cipher=rt.cipher, answer_days=90, note="charged twice")


async def _undisputed(rt: Any, demo: dict[str, Any]) -> tuple[Payment, Refund, Refund]:
    """The payment; `failed`, a full refund the provider refused (FAILED); and `waiting`, the full refund asked for
    since (PENDING, untried, linked to no dispute): _setup's, without a dispute (_opened, once a test's race is
    under way, opens its only one)."""
    payment = await _paid(rt, demo)
    failed = await _refund(rt, payment)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{failed.id}").values(status="DONE"))
        await s.execute(update(Refund).where(Refund.id == failed.id).values(status="PROCESSING"))
    assert await handle_provider_event(rt, _provider_says(failed, ProviderOutcome.FAILED)) == "failed"
    return payment, failed, await _refund(rt, payment)


def _late_success_by(rt: Any, failed: Refund, path: str) -> Callable[[], Awaitable[Any]]:
    """The late success of `failed` as each path records it, in a transaction of its own: the worker (its poll), the
    provider's callback, an admin from the statement with its line's id (the payment locked early, to check the id is
    no other refund's) and without."""
    from core.refunds import record_refund_outcome

    async def recorded(txn: str | None) -> Any:
        async with rt.sessionmaker.begin() as s:
            return (await record_refund_outcome(s, rt, refund_id=failed.id, cooperative_id=None, succeeded=True,
                                                note="on the statement", actor=ADMIN,
                                                provider_transaction_id=txn)).status.lower()

    if path == "callback":
        return lambda: handle_provider_event(rt, _provider_says(failed, ProviderOutcome.SUCCEEDED, "RF-LATE"))
    if path == "admin_with_id":
        return lambda: recorded("RF-LATE")
    if path == "admin":
        return lambda: recorded(None)
    return lambda: _run(rt, _late_success(rt, failed))


LATE_PATHS = ["worker", "callback", "admin_with_id", "admin"]


@pytest.mark.parametrize("path", LATE_PATHS)
async def test_a_dispute_opened_between_a_late_successs_locks_and_resolved_with_a_refund(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The officer opens a dispute while a late success holds the payment's disputes (before it locks the payment) and
    resolves it with a refund while the late success holds the payment: her resolution holds the new dispute and waits
    for the payment. The late success locked that dispute after the payment (the admin's recording by the statement
    line's id, which locks the payment early): a deadlock, one of the two rolled back. Now it never waits for a dispute
    while it holds the payment. Either the resolution's refund is made, then withdrawn by the late success, noted on
    the dispute (it lets the payment go and waits for the dispute), or the late success goes first and the refund is
    refused (nothing left: 422), the dispute left OPEN: the member is paid back once, each told once."""
    from core.errors import BusinessRuleError

    payment, failed, waiting = await _undisputed(rt, demo)
    async with rt.sessionmaker.begin() as s:  # (withdrawn by an admin: room for the officer's refund)
        await s.execute(update(Refund).where(Refund.id == waiting.id).values(status="FAILED", failure_reason="x"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting.id}").values(status="DONE"))
    opened: list[Dispute] = []
    tasks: list[asyncio.Task[Any]] = []

    async def between() -> None:
        opened.append(await _opened(rt, payment))

    async def after() -> None:
        tasks.append(asyncio.create_task(_run(rt, _resolution_with_refund(rt, opened[0]))))
        await waiting_for_locks(rt, 1, done=tasks[0])  # her resolution holds the dispute, waits for the payment

    _payment_lock_held(monkeypatch, between, after)
    late = await asyncio.gather(_late_success_by(rt, failed, path)(), return_exceptions=True)
    results = late + list(await asyncio.gather(*tasks, return_exceptions=True))
    assert results[0] == "completed", results
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        dispute = await s.get(Dispute, opened[0].id)
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)
    assert "more than collected" not in (paid.mismatch_detail or "")
    if isinstance(results[1], BaseException):
        assert isinstance(results[1], BusinessRuleError) and "refundable 0 RWF" in str(results[1]), results
        assert (dispute.status, dispute.refund_id) == ("OPEN", None)
        return
    await _resolved_once(rt, dispute)
    async with rt.sessionmaker() as s:
        theirs = await s.get(Refund, dispute.refund_id)
    await _withdrawn_once(rt, theirs, payment)
    assert any(theirs.reference in (n["text"] or "") and "not sent" in (n["text"] or "") for n in dispute.notes)


@pytest.mark.parametrize("path", LATE_PATHS)
async def test_a_dispute_opened_between_a_late_successs_locks_and_resolved_on_the_refund_waiting(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The same dispute resolved without a refund, on the refund waiting to be sent (core.disputes._rely_on_unsettled
    links it, and so holds it), in a transaction held until the late success has gone as far as it can: the late
    success skipped the refund it held (_withdraw_unsent, SKIP LOCKED), which was left PENDING and sent (the member
    paid back twice). Now it waits for the resolution and withdraws it; each once."""
    payment, failed, waiting = await _undisputed(rt, demo)
    opened: list[Dispute] = []
    held = asyncio.Event()
    async with rt.sessionmaker() as officer:

        async def between() -> None:
            opened.append(await _opened(rt, payment))
            await officer.begin()
            await _resolution(rt, opened[0])(officer)  # held: the dispute and the refund waiting locked
            held.set()

        async def nothing() -> None:
            return None

        _payment_lock_held(monkeypatch, between, nothing)
        late = asyncio.create_task(_late_success_by(rt, failed, path)())
        await held.wait()
        await waiting_for_locks(rt, 1, done=late)  # (unless it went on without the refund held)
        await officer.commit()
    result = (await asyncio.gather(late, return_exceptions=True))[0]
    assert result == "completed", result
    await _withdrawn_once(rt, waiting, payment)
    await _resolved_once(rt, opened[0])
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
    assert (paid.status, paid.refunded_minor) == ("REFUNDED", 50_000)


async def _dispute_with_id(rt: Any, payment: Payment, monkeypatch: pytest.MonkeyPatch, first: str) -> Dispute:
    """A dispute of `payment` opened with an id starting `first` (its place in the id order every locker takes)."""
    import core.disputes

    fixed = uuid.UUID(first + uuid.uuid4().hex[len(first):])
    with monkeypatch.context() as m:
        m.setattr(core.disputes.uuid, "uuid4", lambda: fixed)
        return await _opened(rt, payment)


@pytest.mark.parametrize("path", LATE_PATHS)
async def test_a_late_success_and_a_chargeback_resolving_a_later_dispute_with_an_earlier_one_noted(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """A dispute (`earlier`, first in id order) resolved on the refund waiting (linked to it), then a second one
    (`later`) that the officer resolves by recording the provider's chargeback. Her resolution locked its own dispute,
    then (core.refunds._lock_open_disputes, for the refund waiting it may withdraw) `earlier`: against a late success
    of `failed`, which locks every dispute of the payment in id order (`earlier`, then `later`), a deadlock, one of
    the two rolled back (the officer's 503, or the late success's). Now the chargeback's resolution locks them in id
    order too: the late success waits for it, then completes; the refund waiting is withdrawn once."""
    import core.disputes

    payment, failed, waiting = await _undisputed(rt, demo)
    earlier = await _dispute_with_id(rt, payment, monkeypatch, "0000")
    await _run(rt, _resolution(rt, earlier))  # relies on `waiting`: linked to it
    later = await _dispute_with_id(rt, payment, monkeypatch, "ffff")
    tasks: list[asyncio.Task[Any]] = []
    lock_row = core.disputes.lock_row

    async def held(session: Any, model: Any, row_id: Any, cooperative_id: Any = None) -> Any:
        row = await lock_row(session, model, row_id, cooperative_id)
        if model is Dispute and not tasks:  # the resolution holds its dispute: the late success starts now
            tasks.append(asyncio.create_task(_late_success_by(rt, failed, path)()))
            await waiting_for_locks(rt, 1, done=tasks[0])
        return row
    monkeypatch.setattr(core.disputes, "lock_row", held)

    async def chargeback(s: Any) -> Any:
        return await move_dispute(s, rt, dispute_id=later.id, cooperative_id=later.cooperative_id,
                                  target="RESOLVED", actor=ADMIN, note="charged back",
                                  refund_amount=Money(50_000, "RWF"), returned=ReturnedByProvider("CB-1"))

    resolution = await asyncio.gather(_run(rt, chargeback), return_exceptions=True)
    results = resolution + list(await asyncio.gather(*tasks, return_exceptions=True))
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[1] == "completed", results
    await _withdrawn_once(rt, waiting, payment)
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        row = await s.get(Dispute, later.id)
        assert (await s.get(Refund, failed.id)).status == "COMPLETED"
    assert row.status == "RESOLVED" and row.refund_id is not None
    assert (paid.refunded_minor, paid.mismatch) == (100_000, True), paid.mismatch_detail


# A chargeback recorded (POST /v1/payments/{id}/refunds with returnedByProvider) may withdraw the payment's refunds not
# yet sent and note each on its dispute (core.refunds._withdraw_unsent), after it holds the payment. It locked, before
# the payment, the open disputes and those of the refunds then PENDING: a dispute of a refund withdrawable by the time
# it withdraws, but not then, was locked after the payment, against a late success holding every dispute of the
# payment and waiting for the payment (a deadlock, one of the two rolled back). Two ways in, each between its dispute
# locks and its payment lock: a dispute opened then and resolved on the refund waiting (linked to it), and a refund
# PROCESSING then, whose provider refused the gateway's credentials for it (PENDING again, to be sent once fixed).
# The late success's paths that do not run again after a deadlock (the provider's callback does: its second run
# hid it).
CHARGEBACK_RACE_PATHS = ["worker", "admin_with_id", "admin"]


async def _chargeback_raced(rt: Any, monkeypatch: pytest.MonkeyPatch, payment: Payment, failed: Refund, path: str,
                            between: Hook) -> list[Any]:
    """The chargeback of the whole payment, `between` run just before it locks the payment, and the late success of
    `failed` (by `path`) started once it holds it, into its wait for a lock: both results, or exceptions."""
    tasks: list[asyncio.Task[Any]] = []

    async def after() -> None:
        tasks.append(asyncio.create_task(_late_success_by(rt, failed, path)()))
        await waiting_for_locks(rt, 1, done=tasks[0])

    _payment_lock_held(monkeypatch, between, after)
    charged = await asyncio.gather(_run(rt, _chargeback(rt, payment)), return_exceptions=True)
    return charged + list(await asyncio.gather(*tasks, return_exceptions=True))


async def _paid_back_twice_once(rt: Any, payment: Payment, failed: Refund, chargeback: Refund) -> None:
    """The late success and the chargeback each gave back the whole payment: 100,000 RWF of 50,000 collected, the
    payment flagged for it; each refund told once."""
    async with rt.sessionmaker() as s:
        paid = await s.get(Payment, payment.id)
        assert (await s.get(Refund, failed.id)).status == "COMPLETED"
        assert (await s.get(Refund, chargeback.id)).status == "COMPLETED"
    assert (paid.refunded_minor, paid.mismatch) == (100_000, True), paid.mismatch_detail
    assert "50,000 RWF more than collected has gone back to the payer" in paid.mismatch_detail, paid.mismatch_detail
    for refund_id in (failed.id, chargeback.id):
        assert await _jobs(rt, f"wh:evt_refund_completed_{refund_id}") == 1, refund_id


def _noted_withdrawn_once(dispute: Dispute, refund: Refund) -> None:
    notes = [n for n in dispute.notes or []
             if refund.reference in (n["text"] or "") and "not sent" in (n["text"] or "")]
    assert len(notes) == 1, dispute.notes


async def _neither_rolled_back(rt: Any, results: list[Any], payment: Payment, failed: Refund, waiting: Refund,
                               dispute: Dispute) -> None:
    """_chargeback_raced's `results`: both committed, the late success completed; `waiting` withdrawn once and noted
    on `dispute` once, the member paid back twice (_paid_back_twice_once)."""
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[1] == "completed", results
    await _withdrawn_once(rt, waiting, payment)
    await _paid_back_twice_once(rt, payment, failed, results[0])
    async with rt.sessionmaker() as s:
        _noted_withdrawn_once(await s.get(Dispute, dispute.id), waiting)


@pytest.mark.parametrize("path", CHARGEBACK_RACE_PATHS)
async def test_a_dispute_opened_and_resolved_on_the_refund_waiting_between_a_chargebacks_locks(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """No dispute when the chargeback locks the payment's disputes; one opened and resolved on the refund waiting
    (linked to it) before it locks the payment; the late success then holds that dispute and waits for the payment.
    The chargeback withdrew the refund waiting and locked its dispute for the note: a deadlock. Now neither is rolled
    back: the refund waiting is withdrawn once, noted on the dispute once, the member paid back twice, flagged."""
    payment, failed, waiting = await _undisputed(rt, demo)
    opened: list[Dispute] = []

    async def between() -> None:
        opened.append(await _opened(rt, payment))
        await _run(rt, _resolution(rt, opened[0]))  # relies on `waiting`: linked to it

    results = await _chargeback_raced(rt, monkeypatch, payment, failed, path, between)
    await _neither_rolled_back(rt, results, payment, failed, waiting, opened[0])


@pytest.mark.parametrize("path", CHARGEBACK_RACE_PATHS)
async def test_a_refund_of_a_closed_dispute_waiting_again_since_a_chargebacks_locks(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The refund made during a dispute since rejected is at the provider (PROCESSING) when the chargeback locks the
    payment's disputes; before it locks the payment the provider refuses the gateway's credentials for it (PENDING
    again, its submission parked, nothing sent: withdrawable); the late success then holds that dispute and waits for
    the payment. The chargeback withdrew the refund and locked its dispute for the note: a deadlock. Now neither is
    rolled back; each once."""
    payment, failed, _waiting = await _undisputed(rt, demo)
    async with rt.sessionmaker.begin() as s:  # (withdrawn by an admin: the refund below is made during the dispute)
        await s.execute(update(Refund).where(Refund.id == _waiting.id).values(status="FAILED", failure_reason="x"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{_waiting.id}").values(status="DONE"))
    dispute = await _opened(rt, payment)
    waiting = await _refund(rt, payment)
    assert waiting.dispute_id == dispute.id
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{waiting.id}").values(status="DONE"))
        await s.execute(update(Refund).where(Refund.id == waiting.id).values(status="PROCESSING"))
        await move_dispute(s, rt, dispute_id=dispute.id, cooperative_id=dispute.cooperative_id, target="REJECTED",
                           actor=ADMIN, note="not ours")
    refused = Event(provider="mtn_momo", kind=EventKind.REFUND, event_id=uuid.uuid4().hex,
                    reference=waiting.provider_reference, outcome=ProviderOutcome.PENDING,
                    reason="initiator not allowed", credentials_refused=True)

    async def between() -> None:
        assert await handle_provider_event(rt, refused) != "ignored"
        async with rt.sessionmaker() as s:
            assert (await s.get(Refund, waiting.id)).status == "PENDING"

    results = await _chargeback_raced(rt, monkeypatch, payment, failed, path, between)
    await _neither_rolled_back(rt, results, payment, failed, waiting, dispute)
