"""One provider transaction id named at once by an admin's recording from the provider's statement (a new payment:
POST /v1/payments/recorded; or a given-up payment's money: POST /v1/payments/{id}/outcome), by the provider's late
success callback for a payment of hers, and, in the same moment, by her erasure (POST /v1/members/{id}/erase), on
PostgreSQL. Each takes its locks in one order: her member row, her payment's row, then the id's lock (a callback
takes its payment's row, then the id's, in one statement; a recording of a given-up payment the same; the erasure
her row, then her payments). A recording of a new payment took the id's lock first, then, inserting the payment that
names her, her row (the foreign key's KEY SHARE lock): with the callback holding her payment and waiting for the id,
and the erasure holding her row and waiting for her payment, the three deadlocked and PostgreSQL rolled one back (a
503 to the admin, or the provider's callback refused). Whichever order they come in, none is rolled back, one payment
counts the money, and each writes the audit rows it writes alone."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from core.db import ADVISORY_XACT_LOCK, utcnow
from core.errors import Conflict
from core.models import AuditEvent, Member, Payment
from core.money import Money
from core.payments import NewPayment
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as ProviderEventData
from core.provider_events import handle_provider_event
from core.recorded_payments import StatementLine, record_collected, record_payment
from core.transaction_ids import _id_lock_key
from tests.admin_api.conftest import Caller, idem
from tests.admin_api.test_erase_races import ADMIN, NAME, PHONE, _erased, _lined_up, _patient
from tests.channels.sms.helpers import make_payment
from tests.conftest import requires_pg

TXN = "MTN-STMT-4242"


async def _her_given_up_payment(rt: Any, admin: Caller, demo: Any) -> tuple[str, Payment]:
    """Jeanne (suspended: she may be erased) and a payment of hers the gateway gave up on (TIMEOUT, no provider
    transaction id): its money, taken after all, is what the statement line and the late callback are about."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"], status="TIMEOUT")
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("UPDATE payments SET provider_transaction_id = NULL WHERE id = :id"), {"id": paid.id})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    return jeanne["id"], paid


async def _recorded_line(rt: Any, demo: Any, member_id: str) -> Any:
    """The statement line recorded as a new payment of hers (core.recorded_payments.record_payment)."""
    line = StatementLine(
        payment=NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                           method="MOBILE_MONEY_MTN", account=PHONE, idempotency_key=idem(), channel="api",
                           amount=Money(50_000, "RWF"), member_id=member_id),
        provider_transaction_id=TXN, completed_at=utcnow() - timedelta(minutes=5), note="on the MTN statement")
    async with _patient(rt) as s:
        payment, _ = await record_payment(s, rt, line, actor=ADMIN)
        return payment.id


async def _recorded_outcome(rt: Any, paid: Payment) -> Any:
    """The statement line recorded on her given-up payment (core.recorded_payments.record_collected)."""
    async with _patient(rt) as s:
        return (await record_collected(s, rt, payment_id=paid.id, cooperative_id=None, provider_transaction_id=TXN,
                                       note="on the MTN statement", actor=ADMIN)).id


async def _late_success(rt: Any, paid: Payment) -> str:
    """The provider's late success callback for her payment, with the statement's transaction id."""
    return await handle_provider_event(rt, ProviderEventData(
        provider=paid.provider, kind=EventKind.COLLECTION, event_id="late-success-1",
        reference=paid.provider_reference, outcome=ProviderOutcome.SUCCEEDED, provider_transaction_id=TXN,
        amount=Money(50_000, "RWF")))


def _ids_lock(provider: str) -> Any:
    """The transaction id's lock (core.transaction_ids._ID_LOCK), which a blocker holds while the parties line up."""
    return ADVISORY_XACT_LOCK.params(key=_id_lock_key(provider, TXN))


async def _holding(rt: Any) -> list[Payment]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(Payment).where(Payment.provider_transaction_id == TXN)
                                     .order_by(Payment.created_at))).scalars())


async def _actions(rt: Any, payment_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(AuditEvent.action).where(AuditEvent.entity_id == payment_id))
                       ).scalars())


@requires_pg
@pytest.mark.parametrize("order", ["recording callback", "callback recording", "recording callback erasure",
                                   "callback recording erasure", "callback erasure recording"])
@pytest.mark.parametrize("recording", ["line", "outcome"])
async def test_a_statement_recording_and_a_late_callback_naming_one_id_never_deadlock(
        rt: Any, admin: Caller, demo: Any, recording: str, order: str) -> None:
    """`recording`: the statement line recorded as a new payment of hers, or on her given-up payment (the callback's).
    `order`: the order they come to wait in, a blocker holding the id's lock: the recording of a new payment at her
    row's lock or the id's; of her payment's outcome, and the callback, at her payment's row or the id's lock; the
    erasure at her row or her payment's."""
    member_id, paid = await _her_given_up_payment(rt, admin, demo)
    parties = {"recording": _recorded_line(rt, demo, member_id) if recording == "line" else _recorded_outcome(rt, paid),
               "callback": _late_success(rt, paid), "erasure": _erased(rt, member_id)}
    names = order.split()
    for unused in set(parties) - set(names):
        parties.pop(unused).close()
    results = await asyncio.wait_for(_lined_up(rt, _ids_lock(paid.provider), *(parties[n] for n in names)), 60)
    by_party = dict(zip(names, results, strict=True))
    said, told, first = by_party["recording"], by_party["callback"], names[0]
    if "erasure" in by_party:
        gone = by_party["erasure"]
        assert not isinstance(gone, BaseException), (gone, results)
        assert isinstance(gone, Member) and (gone.name, gone.phone_enc) == ("Erased member", None), gone
    assert not isinstance(told, BaseException), (told, results)  # a provider's callback is never refused

    holders = await _holding(rt)
    # The money counted once: on one payment (the other, if any, flagged and counting nothing).
    counted = [p for p in holders if p.collected_minor != 0]
    assert [(p.status, p.amount_minor) for p in counted] == [("COMPLETED", 50_000)], holders
    if recording == "line" and first == "recording":
        # The line recorded a payment of its own; the callback that came after it completes hers flagged, holding
        # nothing (core.transaction_ids._flag_held_twice): the money stays on the recorded payment.
        assert isinstance(said, str), said
        assert [p.id for p in counted] == [said] and told == "late_completed"
        her = await _row(rt, paid.id)
        assert (her.status, her.collected_minor, her.mismatch) == ("COMPLETED", 0, True)
        assert await _actions(rt, said) == ["payment.completed", "payment.recorded"]
        assert await _actions(rt, paid.id) == ["payment.completed", "payment.transaction_id_held_twice"]
    else:
        # The callback came first (the line is refused: the id is held), or the recording of her payment's outcome
        # did (the callback then finds it completed with the id): her payment alone holds the money.
        assert [p.id for p in holders] == [paid.id]
        if first == "callback":
            # (A line: the id is held; her payment's outcome: it is recorded already, by the callback.)
            refusal = (f"{TXN} is held already by payment {paid.reference}" if recording == "line"
                       else "payment is COMPLETED: its money is recorded already")
            assert isinstance(said, Conflict) and refusal in str(said), said
            assert told == "late_completed"
            assert await _actions(rt, paid.id) == ["payment.completed"]
        else:
            assert said == paid.id and told == "already_completed", (said, told)
            assert await _actions(rt, paid.id) == ["payment.completed", "payment.outcome_recorded"]
    if "erasure" in by_party:
        for payment in holders:
            assert (payment.payment_account_enc, payment.payment_account_masked) == ("", "erased"), payment.id
        async with rt.sessionmaker() as s:
            assert (await s.execute(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.entity_id == member_id, AuditEvent.action == "member.erased"))).scalar_one() == 1


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment_id)
        assert row is not None
        return row

