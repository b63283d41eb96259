"""Provider transaction ids held by one payment: the id's lock, the probe for its holder, flags."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core import pgraw
from core.audit import Actor, record
from core.db import ADVISORY_XACT_LOCK, lock_row
from core.errors import DUPLICATE_REFERENCE, Conflict
from core.models import Payment
from core.notify import changed_at
from core.outbox import NewJob, enqueue_many
from core.payments import add_flag

log = logging.getLogger("gateway.payments")


async def _lock_transaction_id(session: AsyncSession, provider: str, txn: str) -> None:
    """Two recordings of one transaction id at once take turns (transaction_id_free): on PostgreSQL a lock on the id
    for the rest of the transaction, as core.refunds takes for a reversal; the embedded
    default has one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_ID_LOCK, {"key": _id_lock_key(provider, txn)})


async def transaction_id_free(session: AsyncSession, provider: str, txn: str, cooperative_id: str, *,
                              exclude: str | None = None) -> None:
    """A Conflict when a payment of `provider` (other than `exclude`) holds `txn` as its transaction id: a line of the
    provider's statement is money taken once, credited on one payment (recorded on two, it is counted twice in the
    reconciliation's `settled` and could be refunded twice). Another cooperative's payment is not named. The caller
    holds the id's lock (_lock_transaction_id), so that two recordings of it take turns."""
    held = await _holder(session, provider, txn, exclude)
    if held is not None:
        where = f"by payment {held.reference}" if held.cooperative_id == cooperative_id \
            else "by another cooperative's payment"
        raise Conflict(f"providerTransactionId {txn} is held already {where} of this provider: a statement line is "
                       "recorded once (check the id on the statement)", field="providerTransactionId",
                       code=DUPLICATE_REFERENCE)


@dataclass(frozen=True)
class _Holder:
    """The payment that holds a provider's transaction id (_holder)."""

    id: str
    reference: str
    cooperative_id: str


# _holder's probe and the id's lock (_lock_transaction_id's key), built once: a completion runs them straight on
# asyncpg in its transaction (pgraw: through the session, their two round trips cost more CPU than the rest of a
# callback's statements together).
_HOLDER = (select(Payment.id, Payment.reference, Payment.cooperative_id)
           .where(Payment.provider == bindparam("provider"), Payment.provider_transaction_id == bindparam("txn"),
                  Payment.id != bindparam("exclude"))
           .order_by(Payment.created_at, Payment.id).limit(1))
_ID_LOCK = ADVISORY_XACT_LOCK


def _id_lock_key(provider: str, txn: str) -> str:
    return f"collected:{provider}:{txn}"


async def _holder(session: AsyncSession, provider: str, txn: str, exclude: str | None) -> _Holder | None:
    """The payment of `provider` other than `exclude` that holds `txn` as its transaction id, or None: one probe of
    ix_payments_transaction_id."""
    row = (await session.execute(_HOLDER, {"provider": provider, "txn": txn, "exclude": exclude or ""})).first()
    return None if row is None else _Holder(*row)


@dataclass(frozen=True)
class IdLocked:
    """A transaction id whose lock (_ID_LOCK) a callback's transaction took with its payment's row, and what the probe
    run under that lock by the same statement found (core.payment_statements.stored_and_locked, the database's
    gateway_id_holder): the id of another payment of the provider holding it, or None."""

    txn: str
    holder_id: str | None


async def _held_elsewhere(session: AsyncSession | AsyncConnection, payment: Payment, txn: str,
                          locked: IdLocked | None = None) -> _Holder | None:
    """The other payment of `payment`'s provider that holds `txn` already (_holder), as `payment` completes with it
    (or is reported paid after a failure): one index probe per completion. Under the id's lock (_lock_transaction_id,
    held to the commit, as a statement line's recording takes it): two completions of one id at once take turns,
    and the second's probe (its own snapshot, READ COMMITTED) sees the first's payment, so that one of them is
    flagged; the payment's row lock, taken before, is never waited for under this one (nothing takes them in the
    other order: a recording of a new payment takes its member's row, KEY SHARE, as this transaction may, then the
    id's lock, then only inserts its payment). `locked`: the id whose lock the transaction took already (with the
    payment's row: _store_event_and_lock), not taken again; and probed then, under that lock: found free, it is not
    probed again (held, the holder is read in full here). `session` may be a Core connection in a transaction on
    PostgreSQL (core.pgraw.Transaction's): the statements are raw either way."""
    if locked is not None and locked.txn == txn and locked.holder_id is None:
        return None
    if pgraw.dialect_name(session) == "postgresql" and await pgraw.in_transaction(session):
        if locked is None or txn != locked.txn:
            await pgraw.fetchrow(session, pgraw.compiled(_ID_LOCK), {"key": _id_lock_key(payment.provider, txn)})
        row = await pgraw.fetchrow(session, pgraw.compiled(_HOLDER),
                                   {"provider": payment.provider, "txn": txn, "exclude": payment.id})
        return None if row is None else _Holder(*row)
    assert isinstance(session, AsyncSession), "a Core connection's transaction is PostgreSQL's"
    await _lock_transaction_id(session, payment.provider, txn)
    return await _holder(session, payment.provider, txn, payment.id)


async def held_by_another_cooperative(session: AsyncSession, payment: Payment, txn: str) -> bool:
    """Whether a payment of another cooperative than `payment`'s holds `txn` as its transaction id at `payment`'s
    provider (a contested id, _contest): one probe of ix_payments_transaction_id."""
    return (await session.execute(
        select(Payment.id).where(Payment.provider == payment.provider, Payment.provider_transaction_id == txn,
                                 Payment.cooperative_id != payment.cooperative_id).limit(1))).first() is not None


def _same_money(payment: Payment, holder: _Holder) -> bool:
    """Whether `holder`'s recording of the transaction id `payment` completes with is taken for the same money, counted
    there and not on `payment` (_flag_held_twice): only within one cooperative (a restore's recording and the retry
    of the payment it lost). A transaction id names one payment of one cooperative (the provider accounts are the
    deployment's): another cooperative's recording of it (an admin's typo, or a guess) never moves this payment's
    money, its receipt or its reconciliation; both are flagged for a person (_contest)."""
    return holder.cooperative_id == payment.cooperative_id


async def _flag_held_twice(session: AsyncSession, payment: Payment, txn: str, holder: _Holder, *, actor: Actor,
                           collected: int | None) -> str:
    """Audit (payment.transaction_id_held_twice) and log a payment recording the provider's transaction `txn` that
    `holder` (_holder) holds already: the same money recorded on two payments (after a restore, the retry of a lost
    payment completing with the id an admin recorded from the statement). `collected`: the collected_minor this
    payment is left holding (0: the money is counted on `holder` only; None: the amount asked). Returns the flag's
    text, naming the other payment only within the cooperative (as transaction_id_free does); another cooperative's
    holder is told in its own cooperative (_contest)."""
    ours = _same_money(payment, holder)
    await record(session, actor=actor, action="payment.transaction_id_held_twice", entity_type="payment",
                 entity_id=payment.id, before={"status": payment.status},
                 after={"providerTransactionId": txn, "heldBy": holder.reference if ours else None,
                        "heldById": holder.id if ours else None, "collected": collected},
                 cooperative_id=payment.cooperative_id)
    log.error("a provider's transaction id is held by two payments: the same money recorded twice? (flagged)",
              extra={"payment_id": payment.id, "held_by": holder.id, "provider": payment.provider,
                     "provider_transaction_id": txn[:128]})
    if not ours:
        await _contest(session, holder, txn, actor=actor)
        return _contested_detail(txn, "counted here")
    where = "counted there, not here" if collected == 0 else "check the statement before refunding either"
    return f"provider transaction {txn[:64]} is held by payment {holder.reference} too: the same money recorded " \
           f"twice? {where}"


def _contested_detail(txn: str, counted: str) -> str:
    """The flag of a payment whose provider transaction id another cooperative's payment holds too (_contest): which
    cooperative's money it is, only the provider's statement says; the other is never named. `counted`: where the
    money is counted meanwhile, as this cooperative's reconciliation sees it."""
    return f"provider transaction {txn[:64]} is recorded by another cooperative's payment too: {counted}; check " \
           "the provider's statement for whose money it is"


# The outbox job that flags the payment of another cooperative holding a transaction id a completion brings
# (_contest), run by the worker (core.jobs) in its own transaction.
CONTESTED_JOB = "payment.contested"


async def _contest(session: AsyncSession, holder: _Holder, txn: str, *, actor: Actor) -> None:
    """Tell `holder`'s cooperative that a payment of another cooperative completed with the transaction id its
    payment holds (a recording from the statement of what may be the other's money): audited there
    (payment.transaction_id_contested, naming no other cooperative), and its payment flagged for a person by a job
    (CONTESTED_JOB, flag_contested). Not flagged here: this transaction holds the id's lock
    (_lock_transaction_id), and taking the holder's row lock under it could deadlock with that payment's own
    completion or refund, which take its row lock first (see _held_elsewhere). One job per holder and id. The row's
    actor is the provider or the gateway: a person of the other cooperative (an admin replaying its callback) is not
    named there either."""
    if actor.id != "system" and not actor.id.startswith("provider:"):
        actor = Actor.system(actor.channel)
    await record(session, actor=actor, action="payment.transaction_id_contested", entity_type="payment",
                 entity_id=holder.id, after={"providerTransactionId": txn}, cooperative_id=holder.cooperative_id)
    digest = hashlib.sha256(txn.encode()).hexdigest()[:16]
    await enqueue_many(session, [NewJob(CONTESTED_JOB, {"payment_id": holder.id, "provider_transaction_id": txn},
                                        dedupe_key=f"{CONTESTED_JOB}:{holder.id}:{digest}",
                                        cooperative_id=holder.cooperative_id)])


async def flag_contested(session: AsyncSession, payment_id: str, txn: str) -> None:
    """The worker's half of _contest: flag (mismatch) the payment that holds `txn` another cooperative's payment
    completed with, under its row lock alone (in the job's own transaction: no id's lock held). Nothing when it no
    longer holds the id, or says so already (a repeat of the job)."""
    payment = await lock_row(session, Payment, payment_id)
    if payment is None or payment.provider_transaction_id != txn:
        return
    said = _contested_detail(txn, "counted here too")
    if (payment.mismatch and said in (payment.mismatch_detail or "")) or said in (payment.reviewed_detail or ""):
        # A repeat: flagged already, or flagged and reviewed since (the job's dedupe key makes one job per holder
        # and id, so a second run is always the same contest).
        return
    payment.mismatch = True
    payment.mismatch_detail = add_flag(payment.mismatch_detail, said)
    payment.updated_at = changed_at(payment.updated_at)
    from core.provider_events import emit_flagged  # local: core.provider_events imports this module

    await emit_flagged(session, payment, "transaction_id_contested", said)
    log.warning("a payment's provider transaction id was reported for another cooperative's payment too (flagged)",
                extra={"payment_id": payment.id, "provider": payment.provider})
