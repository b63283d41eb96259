"""Disputes: opened by a member (USSD) or an admin, moved through their state machine, SMS on each change."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import STAFF_LABEL, Actor, done_by, record
from core.db import iso_ms, iso_z, lock_row, parse_aware, serialise_on_sqlite, utcnow
from core.errors import (
    DISPUTE_ALREADY_OPEN,
    IDEMPOTENCY_KEY_IN_FLIGHT,
    IDEMPOTENCY_KEY_REUSED,
    INVALID_STATE,
    BusinessRuleError,
    Conflict,
    NotFound,
    ValidationError,
)
from core.models import Dispute, DisputeTransitionKey, Member, OutboxJob, Payment, Refund
from core.money import Money
from core.notify import changed_at, event_job, notice_jobs, sms_dedupe
from core.outbox import NewJob, enqueue_many
from core.payments import check_idempotency_key, keyed_request_hash, same_request
from core.references import cooperative_reference
from core.refunds import _her_row_first, _lock_disputes_noted, payer_to_tell
from core.state import transition
from core.state.dispute import DISPUTE, OPEN_VALUES, DisputeReason, DisputeStatus
from core.state.refund import OPEN_VALUES as UNSETTLED_REFUNDS

if TYPE_CHECKING:
    from core.crypto import PiiCipher
    from core.refunds import ReturnedByProvider
    from core.runtime import Runtime

D = DisputeStatus


def dispute_data(dispute: Dispute) -> dict[str, Any]:
    """The dispute as cooperatives' systems receive it in webhooks. `updatedAt` (to the millisecond) is what the
    change being told wrote (a move's is chosen by changed_at): the later of two events has the later one."""
    return {"id": dispute.id, "reference": dispute.reference, "paymentId": dispute.payment_id,
            "status": dispute.status, "reason": dispute.reason, "resolution": dispute.resolution,
            "refundId": dispute.refund_id, "createdAt": iso_z(dispute.created_at),
            "updatedAt": iso_ms(dispute.updated_at)}


async def _notify(session: AsyncSession, cipher: PiiCipher, dispute: Dispute, template: str, event_type: str,
                  step: str, *, actor: Actor, answer_days: int, payment: Payment | None = None) -> None:
    """The SMS (to the member, or without one to the phone that paid while it is still its payer's:
    core.refunds.payer_to_tell) and the webhook event. The SMS context names the status this change moved the
    dispute to: the worker fills the message in later, when the dispute may have moved on (OPEN -> UNDER_REVIEW ->
    REJECTED before it sends the first), and each SMS must tell its own change."""
    phone = None
    if not dispute.member_id:
        payment = payment or await session.get(Payment, dispute.payment_id)
        if payment is not None:
            phone = await payer_to_tell(session, cipher, payment, about=dispute, kind="dispute", template=template,
                                        actor=actor, answer_days=answer_days)
    jobs = notice_jobs(
        template=template, event_type=event_type, cooperative_id=dispute.cooperative_id, key=dispute.id, step=step,
        context={"dispute_id": dispute.id, "status": dispute.status}, data=dispute_data(dispute), cipher=cipher,
        member_id=dispute.member_id or None, phone=phone)
    # An earlier change's SMS is not sent yet (three moves in a second): this one goes after it, or the worker's
    # parallel sends may deliver "resolved" before "under review".
    await enqueue_many(session, await after_dispute_sms(session, dispute.id, jobs))  # SMS and event in one trip


async def after_dispute_sms(session: AsyncSession, dispute_id: str, jobs: list[NewJob]) -> list[NewJob]:
    """`jobs` with their SMS due after the dispute's SMS still waiting, if any (SMS_SPACING after the latest): a
    change of the dispute's, or the outcome of a refund made for it (core.refunds), is told after what came before.
    (A resolution's SMS waits for an earlier move's: without this, its refund, failed within seconds, reached the
    member first, "refund failed", then "resolved in your favour. Thank you.".)"""
    after = await _last_unsent_sms(session, dispute_id)
    if after is None:
        return jobs
    at = max(utcnow(), after + SMS_SPACING)
    return [replace(j, run_at=at) if j.kind == "sms.send" else j for j in jobs]


SMS_SPACING = timedelta(seconds=3)
_STEPS = tuple(s.value.lower() for s in DisputeStatus)
# The templates of a dispute's SMS (_notify), each keyed by the dispute's id and a step: see sms_keys.
DISPUTE_TEMPLATES = ("dispute_opened", "dispute_updated", "dispute_resolved")


def sms_keys(dispute_id: str) -> list[str]:
    """Every key (after "sms:") one dispute's SMS can have: the ones notice_jobs gives them (sms_dedupe), the
    opening's step "opened", a move's its target status. Exact keys: found by the unique index, here and by the
    payment's messages (admin_api.messages)."""
    return [sms_dedupe("dispute_opened", dispute_id, "opened")] + [
        sms_dedupe(template, dispute_id, step) for template in ("dispute_updated", "dispute_resolved")
        for step in _STEPS]


async def _last_unsent_sms(session: AsyncSession, dispute_id: str) -> datetime | None:
    """When the latest of this dispute's SMS still waiting is due (by their dedupe keys: the unique index)."""
    keys = [f"sms:{key}" for key in sms_keys(dispute_id)]
    rows = (await session.execute(select(OutboxJob.status, OutboxJob.run_at).where(
        OutboxJob.dedupe_key.in_(keys), OutboxJob.status.in_(("PENDING", "RUNNING"))))).all()
    # One being sent counts from now (its run_at is its lease's end), one waiting from when it is due.
    return max((utcnow() if status == "RUNNING" else run_at for status, run_at in rows), default=None)


async def _lock_payment(session: AsyncSession, payment: Payment) -> None:
    """Two opens of one payment at once: the payment's row lock makes the second wait, then see the first one's
    dispute. (FOR NO KEY UPDATE: serialises with every other locker, not with inserts whose key points here.)"""
    await serialise_on_sqlite(session, Payment, payment.id)
    if payment.member_id:
        # Her row first (FOR KEY SHARE, which the dispute's insert takes for its member_id anyway): an erasure
        # (core.members.erase_member) locks her, then her payments; taken after the payment, the two deadlocked.
        await session.execute(select(Member.id).where(Member.id == payment.member_id)
                              .with_for_update(read=True, key_share=True))
    await session.execute(select(Payment.id).where(Payment.id == payment.id).with_for_update(key_share=True))


# A keyed request's digest covers its note (free text that may name the member, a number she gave), which her
# erasure (core.members.erase_member) scrubs while the digest stays, so that a retry under the key is still answered:
# a plain SHA-256 would let anyone reading the database or a backup confirm a guess of a short note. So the rows
# (disputes.request_hash, dispute_transition_keys.request_hash) keep it keyed as a payment's is
# (core.payments.keyed_request_hash, under BLIND_INDEX_KEY); one written by a release before holds the plain digest
# and is compared as such (core.payments.same_request) until `main.py rehash-requests` rewrites it (the HMAC of the
# stored digest, what the same request gives now: no note needed).
def _request_hash(payment_id: str, reason: DisputeReason | str, note: str | None) -> str:
    """The plain digest of a POST /v1/disputes request, which a retry under its idempotency key must match (its
    row stores it keyed)."""
    fields = {"paymentId": payment_id, "reason": getattr(reason, "value", reason), "note": note}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


async def _by_key(session: AsyncSession, cooperative_id: str, key: str) -> Dispute | None:
    return (await session.execute(select(Dispute).where(Dispute.cooperative_id == cooperative_id,
                                                        Dispute.idempotency_key == key))).scalar_one_or_none()


def _same_or_refused(cipher: PiiCipher, existing: Dispute, digest: str) -> Dispute:
    # another payment, reason or note: not a retry
    if existing.request_hash is None or not same_request(cipher, existing.request_hash, digest):
        raise Conflict("Dispute with this idempotency key already exists with a different request",
                       field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
    return existing


async def open_keyed_dispute(session: AsyncSession, *, payment: Payment, reason: DisputeReason | str, channel: str,
                             actor: Actor, cipher: PiiCipher, answer_days: int, idempotency_key: str,
                             note: str | None = None) -> tuple[Dispute, bool]:
    """open_dispute under the client's idempotency key, unique in the payment's cooperative, as a payment's is
    (core.payments): (the dispute, True) when opened now; (the one the key opened, False) when this request is the
    same again (the same payment, reason and note), whatever that dispute's status since. A cooperative's system
    retrying after a lost answer got 409 DISPUTE_ALREADY_OPEN while its dispute was open, and a second dispute once
    it was closed. Another request under the key: 409 IDEMPOTENCY_KEY_REUSED. Two at once with one key: the
    payment's lock makes the second find the first's dispute; for two payments, the unique index refuses the
    second (uq_disputes_cooperative_key)."""
    key = check_idempotency_key(idempotency_key)
    digest = _request_hash(payment.id, reason, note)
    await _lock_payment(session, payment)
    existing = await _by_key(session, payment.cooperative_id, key)
    if existing is not None:
        return _same_or_refused(cipher, existing, digest), False
    cooperative_id = payment.cooperative_id
    try:
        return await _open_locked(session, payment=payment, reason=_checked_reason(reason, note), channel=channel,
                                  actor=actor, cipher=cipher, answer_days=answer_days, note=note,
                                  idempotency_key=key, request_hash=keyed_request_hash(cipher, digest)), True
    except IntegrityError as exc:
        # PostgreSQL names the index, SQLite its columns.
        if not any(name in str(exc.orig) for name in ("uq_disputes_cooperative_key", "disputes.idempotency_key")):
            raise
        await session.rollback()  # (another payment's dispute took the key meanwhile)
        existing = await _by_key(session, cooperative_id, key)
        if existing is None:
            raise Conflict("a request with this idempotency key is in flight", field="idempotencyKey",
                           code=IDEMPOTENCY_KEY_IN_FLIGHT) from None
        return _same_or_refused(cipher, existing, digest), False


async def open_dispute(session: AsyncSession, *, payment: Payment, reason: DisputeReason | str, channel: str,
                       actor: Actor, cipher: PiiCipher, answer_days: int, note: str | None = None) -> Dispute:
    """Open a dispute of `payment` and tell its member, or without one the number that paid it (`answer_days`:
    SMS_PAYER_ANSWER_DAYS, core.refunds.payer_to_tell), and the cooperative's system."""
    checked = _checked_reason(reason, note)
    await _lock_payment(session, payment)
    return await _open_locked(session, payment=payment, reason=checked, channel=channel, actor=actor, cipher=cipher,
                              answer_days=answer_days, note=note)


async def open_dispute_of(session: AsyncSession, payment_id: str) -> Dispute | None:
    """The payment's open dispute (OPEN or UNDER_REVIEW), None without one: what refuses another (_open_locked), and
    what the USSD tells a member at once when she picks a payment to complain about (before the reasons)."""
    return (await session.execute(
        select(Dispute).where(Dispute.payment_id == payment_id, Dispute.status.in_(OPEN_VALUES))
        .order_by(Dispute.created_at, Dispute.id).limit(1)  # several, left by an earlier race: name the first
    )).scalars().first()


def _checked_reason(reason: DisputeReason | str, note: str | None) -> DisputeReason:
    """A dispute's reason and note as its request gave them, or a ValidationError naming the field."""
    try:
        checked = DisputeReason(reason)
    except ValueError:
        raise ValidationError(f"reason must be one of {', '.join(r.value for r in DisputeReason)}",
                              field="reason") from None
    if note is not None and len(note) > 1000:
        raise ValidationError("note must be at most 1000 characters", field="note")
    return checked


async def _open_locked(session: AsyncSession, *, payment: Payment, reason: DisputeReason, channel: str, actor: Actor,
                       cipher: PiiCipher, answer_days: int, note: str | None, idempotency_key: str | None = None,
                       request_hash: str | None = None) -> Dispute:
    """open_dispute once the payment is locked (_lock_payment: open_keyed_dispute took it before looking its key up).
    `idempotency_key` and `request_hash`: kept on it, from open_keyed_dispute."""
    already = await open_dispute_of(session, payment.id)
    if already is not None:
        raise Conflict(f"dispute {already.reference} is already open for this payment", code=DISPUTE_ALREADY_OPEN)
    dispute = Dispute(
        id=str(uuid.uuid4()), cooperative_id=payment.cooperative_id, payment_id=payment.id,
        member_id=payment.member_id, reference=await cooperative_reference(session, "DSP", payment.cooperative_id),
        reason=reason.value,
        status=D.OPEN.value, channel=channel,
        # In the form of every later note (_note): the opening note had no `evidence` or `status`, the only note
        # of a dispute a client reading note["status"] failed on.
        notes=[_note(actor, note, None, D.OPEN.value)] if note else [],
        idempotency_key=idempotency_key, request_hash=request_hash,
    )
    session.add(dispute)
    await session.flush()
    await record(session, actor=actor, action="dispute.opened", entity_type="dispute", entity_id=dispute.id,
                 after={"paymentId": payment.id, "reason": reason.value}, cooperative_id=payment.cooperative_id)
    await _notify(session, cipher, dispute, "dispute_opened", "dispute.opened", "opened", actor=actor,
                  answer_days=answer_days, payment=payment)
    return dispute


# How a closed dispute was closed, as a refusal says it (_closed_already).
_CLOSED_AS = {D.RESOLVED: "resolved in the payer's favour", D.REJECTED: "rejected", D.WITHDRAWN: "withdrawn"}


async def _closed_already(session: AsyncSession, dispute: Dispute, current: DisputeStatus, *,
                          viewer: Actor) -> Conflict:
    """The refusal of a change to a closed dispute (RESOLVED, REJECTED, WITHDRAWN: final): 409, as every change
    that another admin's got ahead of (a refund withdrawn, a payment voided already), saying who closed it (its
    move's audit row, named as the caller, `viewer`, may see them: done_by) and when, how (its resolution, the
    refund it was resolved with) and what is left to do: a payment contested again gets a new dispute (open_dispute
    refuses only while one is open). One answer for a move and for a note (the same status again): the same request
    is both (a second admin's RESOLVED with her note)."""
    by = await done_by(session, DISPUTE.name, dispute.id, (f"{DISPUTE.name}.{current.value.lower()}",),
                       viewer=viewer)
    who = "" if by is None else f" by {by[0]}"
    when = dispute.resolved_at or (None if by is None else by[1])  # (the time its API shows: resolvedAt)
    who += "" if when is None else f" at {iso_z(when)}"
    how = ""
    if dispute.resolution and dispute.resolution != current.value.lower():
        how = f' ("{dispute.resolution}")'
    if dispute.refund_id is not None:
        refund = await session.get(Refund, dispute.refund_id)
        if refund is not None:
            how += (f" with refund {refund.reference} of {Money(refund.amount_minor, refund.currency)} "
                    f"({refund.status})")
    return Conflict(f"dispute {dispute.reference} was {_CLOSED_AS[current]} already{who}{how}: a closed dispute "
                    "takes no further move or note; if the payment is contested again, open a new dispute of it "
                    "(POST /v1/disputes)", field="status", code=INVALID_STATE)


def _note(actor: Actor, text: str | None, evidence: str | None, status: str) -> dict[str, Any]:
    """A note as stored: `at` written as the API writes every time (iso_z). Notes stored before were Python's
    isoformat (`…T07:03:17.960057+00:00`); present_note shows those the same way."""
    return {"at": iso_z(utcnow()), "actor": actor.id, "text": text, "evidence": evidence, "status": status}


# The actors (core.audit.Actor) whose id is the gateway's own business: a staff login's user id, an API key's id.
_STAFF_KINDS = ("admin", "apikey")
# What a caller who is not staff (a tenant, an API key) sees as the writer of a staff member's note, STAFF_LABEL,
# is core.audit's: a refusal names them so too (done_by).


def present_note(note: Any, *, staff: bool = True) -> Any:
    """A stored note as the API shows it: `at` in the API's form (iso_z), whichever form it was stored in (an
    `at` that is not a moment is left as it is). `staff` (a staff login) sees the actor as the audit log names
    it; anyone else (a tenant, an API key) sees a staff member's or a key's note as STAFF_LABEL's, never the
    internal id (a member's own note, the system's and a provider's are shown as they are)."""
    if not isinstance(note, dict):
        return note
    at = note.get("at")
    # Every note has the same keys, in _note's order (PostgreSQL's JSONB keeps none): an opening note stored before
    # _open_locked wrote it by _note had no `evidence` or `status`. It is the only note ever stored without them
    # (every other writer wrote both from the start), and a dispute is always opened OPEN: shown as one opened now.
    shown = {"at": iso_z(parse_aware(at)) or at, "actor": note.get("actor"), "text": note.get("text"),
             "evidence": None, "status": DisputeStatus.OPEN.value, **{k: v for k, v in note.items() if k != "at"}}
    actor = note.get("actor")
    if not staff and isinstance(actor, str) and actor.partition(":")[0] in _STAFF_KINDS:
        shown["actor"] = STAFF_LABEL
    return shown


async def add_note(session: AsyncSession, dispute: Dispute, *, actor: Actor, text: str | None,
                   evidence: str | None = None, action: str, audit: dict[str, Any]) -> None:
    """A note on a dispute that keeps its status (evidence gathered, a refund that failed), and its audit
    entry. The caller holds the dispute's row lock."""
    dispute.notes = [*(dispute.notes or []), _note(actor, text, evidence, dispute.status)]
    # Never earlier than the change before (changed_at): a note written by a host whose clock is behind the one that
    # moved the dispute set updated_at back, and the next move's event (at least a millisecond after it) then read
    # older than the move before, which a receiver applying only later events dropped (a RESOLVED never applied).
    dispute.updated_at = changed_at(dispute.updated_at)
    await record(session, actor=actor, action=action, entity_type="dispute", entity_id=dispute.id, after=audit,
                 cooperative_id=dispute.cooperative_id)


def _noted_event(dispute: Dispute) -> NewJob:
    """dispute.updated for a note (with or without evidence) added without a move: the cooperative's system that
    mirrors the case file learns of it now, not at the next move. Its data as every dispute event's (dispute_data:
    no notes; they are free text no event carries, read with GET /v1/disputes/{id}), the status unchanged, its
    updatedAt the note's (add_note: later than the change before). No SMS: the member is not messaged about a note.
    One event per note, in its transaction: keyed by the note's place among the dispute's notes (read under its
    lock; notes are only ever added), so two notes are two events and a job queued again is the same one."""
    return event_job(cooperative_id=dispute.cooperative_id, event_type="dispute.updated",
                     event_id=f"evt_dispute_updated_{dispute.id}_note_{len(dispute.notes or [])}",
                     data=dispute_data(dispute))


async def _rely_on_unsettled(session: AsyncSession, dispute: Dispute) -> list[str]:
    """A resolution in the member's favour without a refund of its own, while refunds of the payment linked to no
    dispute (made before it was opened) are not settled (PENDING, PROCESSING): the officer resolved it on them
    ("refunded already, on its way"). Linked to it, as a refund made while it was open is (core.refunds
    request_refund): one that then fails, or is withdrawn, is noted on it (core.refunds._note_on_dispute) and lists
    it in ?refundFailed=true (admin_api.disputes) until a refund made since is not FAILED; its disputeId names it.
    Without the link that failure reached no one who had resolved it. Their updated_at kept: the link is no change
    of the refund's own (its events tell its end). Returns their ids, for the resolution's audit row.

    Locked in id order first, as a member's erasure locks her refunds (core.members._refuse_open_money): one
    UPDATE locked them in the order it read them, and with two of them a resolution and an erasure at the same
    moment deadlocked (one rolled back)."""
    unsettled = (await session.execute(
        select(Refund.id).where(Refund.payment_id == dispute.payment_id, Refund.dispute_id.is_(None),
                                Refund.status.in_(UNSETTLED_REFUNDS))
        .order_by(Refund.id).with_for_update())).scalars().all()
    if unsettled:
        await session.execute(update(Refund).where(Refund.id.in_(unsettled))
                              .values(dispute_id=dispute.id, updated_at=Refund.updated_at)
                              .execution_options(synchronize_session="fetch"))
    return sorted(unsettled)


async def move_dispute(session: AsyncSession, rt: Runtime, *, dispute_id: str, cooperative_id: str | None,
                       target: DisputeStatus | str, actor: Actor, note: str | None = None,
                       evidence: str | None = None, refund_amount: Money | None = None,
                       returned: ReturnedByProvider | None = None, to_paying_number: bool = False) -> Dispute:
    """Move a dispute; RESOLVED may come with a refund of `refund_amount`, sent to the provider (`to_paying_number`:
    as core.refunds.request_refund takes it), or with `returned` recorded as one the provider already made (a
    chargeback: never sent, so the member is not paid twice)."""
    try:
        target = DisputeStatus(target)
    except ValueError:
        raise ValidationError(f"status must be one of {', '.join(s.value for s in DisputeStatus)}",
                              field="status") from None
    await _her_row_before_dispute(session, dispute_id, cooperative_id, returned)
    # Read fresh under the lock: the route may have loaded the row before (its identity map would hand back
    # that copy), and a note or move another admin committed meanwhile must not be written over.
    dispute = await lock_row(session, Dispute, dispute_id, cooperative_id)
    if dispute is None:
        raise NotFound("dispute not found")
    if returned is not None and refund_amount is None:
        raise ValidationError("returnedByProvider needs refundAmount: how much the provider sent back",
                              field="returnedByProvider")
    if to_paying_number and refund_amount is None:
        # The officer meant a refund (to the number that paid) and gave no amount: resolved without one, the
        # dispute was closed for good, the member told "resolved in your favour", and nothing went back.
        raise ValidationError("toPayingNumber needs refundAmount: how much to send back to the number that paid",
                              field="toPayingNumber")
    if refund_amount is not None and target is not D.RESOLVED:
        raise BusinessRuleError("a refund can only come with a resolution in the customer's favour",
                                field="refundAmount")
    for text, name in ((note, "note"), (evidence, "evidence")):
        if text is not None and len(text) > 2000:
            raise ValidationError(f"{name} must be at most 2000 characters", field=name)
    current = DisputeStatus(dispute.status)
    if current in DISPUTE.final:
        # Another admin closed it first (two resolving at once: this one waited on the lock above), or it was closed
        # long ago: what is true is that it is closed, by whom and how, not the state machine's "RESOLVED ->
        # RESOLVED is not allowed".
        raise await _closed_already(session, dispute, current, viewer=actor)
    if target is current and current in (D.OPEN, D.UNDER_REVIEW):
        # The same status again: evidence gathered while the dispute stays where it is (a note, a statement
        # line), kept on the dispute and in the audit log; the member is not messaged about it.
        if not (note or evidence) or refund_amount is not None:
            raise BusinessRuleError(f"the dispute is already {current.value}: send a note or evidence to add "
                                    "to it, or another status", field="status", code=INVALID_STATE)
        await add_note(session, dispute, actor=actor, text=note, evidence=evidence, action="dispute.note_added",
                       audit={"note": note, "evidence": evidence})
        await enqueue_many(session, [_noted_event(dispute)])
        await session.flush()
        return dispute
    # (A closed dispute's answer is that it is closed, above: before any refund is asked for, not a refund's refusal
    # (more than is left, or the key of the refund it was resolved with).)
    if not DISPUTE.allowed(current, target):  # UNDER_REVIEW -> OPEN: the one move left that the table refuses
        raise BusinessRuleError(f"dispute {dispute.reference} is {current.value}: it does not go back to "
                                f"{target.value}; send a note or evidence to add to it, or close it (RESOLVED, "
                                "REJECTED or WITHDRAWN)", field="status", code=INVALID_STATE)
    values: dict[str, Any] = {}
    audit: dict[str, Any] = {"note": note} if note else {}
    if target is D.RESOLVED and refund_amount is None:
        relied_on = await _rely_on_unsettled(session, dispute)
        if relied_on:
            audit["refundsReliedOn"] = relied_on
    if target in (D.RESOLVED, D.REJECTED, D.WITHDRAWN):
        values["resolved_at"] = utcnow()
        values["resolution"] = (note or target.value.lower())[:500]
    if refund_amount is not None:
        from core.refunds import request_refund

        refund, _ = await request_refund(session, rt, payment_id=dispute.payment_id,
                                         cooperative_id=dispute.cooperative_id, amount=refund_amount,
                                         reason=f"dispute {dispute.reference}",
                                         idempotency_key=f"dispute:{dispute.id}", actor=actor, dispute_id=dispute.id,
                                         returned=returned, to_paying_number=to_paying_number)
        values["refund_id"] = refund.id
    # The notes as they stand after the refund: a chargeback resolving it withdraws the refunds of the payment not
    # yet sent (core.refunds._withdraw_unsent), noting on this dispute those made while it was open; read before,
    # the notes written back here dropped that one.
    notes = list(dispute.notes or [])
    if note or evidence:
        notes.append(_note(actor, note, evidence, target.value))
    # At least a millisecond after the last change (read under the lock): its event orders after the one before.
    values.update(notes=notes, updated_at=changed_at(dispute.updated_at))
    updated = await transition(session, DISPUTE, dispute.id, DisputeStatus(dispute.status), target, actor=actor,
                               values=values, audit=audit or None)
    final = target in (D.RESOLVED, D.REJECTED, D.WITHDRAWN)
    await _notify(session, rt.cipher, updated, "dispute_resolved" if final else "dispute_updated",
                  "dispute.updated", target.value.lower(), actor=actor,
                  answer_days=rt.settings.sms_payer_answer_days)
    return updated


async def _her_row_before_dispute(session: AsyncSession, dispute_id: str, cooperative_id: str | None,
                                  returned: ReturnedByProvider | None) -> None:
    """For a resolution recording a chargeback (`returned`), the row of the member whose payment it is, FOR KEY SHARE,
    before the dispute is locked (core.refunds._her_row_first; found by the dispute's payment, which never changes, read
    without a lock). The chargeback completes at once and may write her payment twice (its flag beyond collected, then
    its refunded amount), or her dispute twice (a refund of hers not yet sent, withdrawn and noted on it, then the
    resolution): PostgreSQL checks a row version this transaction wrote against her row again, a KEY SHARE lock taken
    then, after the dispute and the payment. An erasure (core.members.erase_member) locks her row, then her refunds,
    disputes and payments: the two deadlocked, and one was rolled back (503). Taken first, one waits for the other. A
    refund sent to the provider writes neither twice (it is PENDING, its payment untouched): nothing is locked for it,
    nor for a move without a refund.

    Then, before the dispute alone, the disputes the chargeback locks (core.refunds._lock_disputes_noted: every dispute
    of the payment, this one and those of its refunds not yet sent, which it may withdraw and note), all in id order:
    locked after this one, an earlier dispute (resolved on a refund waiting, linked to it) was taken after a later one,
    against a late success locking them so too: the two deadlocked, and one was rolled back. (None can be opened
    after: this one is open, and held.)"""
    if returned is None:
        return
    payment = select(Dispute.payment_id).where(Dispute.id == dispute_id)
    if cooperative_id is not None:
        payment = payment.where(Dispute.cooperative_id == cooperative_id)
    await _her_row_first(session, payment)
    payment_id = (await session.execute(payment)).scalar_one_or_none()
    if payment_id is not None:
        await _lock_disputes_noted(session, payment_id, cooperative_id)


def _transition_hash(target: DisputeStatus | str, note: str | None, evidence: str | None,
                     refund_amount: Money | None, returned: ReturnedByProvider | None, to_paying_number: bool) -> str:
    """The plain digest of a POST /v1/disputes/{id}/transitions request, which a retry under its idempotency key must
    match (its row stores it keyed, as _request_hash's): its fields as the move takes them (an amount in minor
    units, a chargeback's time as read)."""
    fields = {"status": getattr(target, "value", target), "note": note, "evidence": evidence,
              "refundAmount": None if refund_amount is None else [refund_amount.minor, refund_amount.currency],
              "returnedByProvider": None if returned is None else [returned.provider_transaction_id,
                                                                   iso_z(returned.completed_at)],
              "toPayingNumber": to_paying_number}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


async def move_keyed_dispute(session: AsyncSession, rt: Runtime, *, idempotency_key: str, dispute_id: str,
                             cooperative_id: str | None, target: DisputeStatus | str, actor: Actor,
                             note: str | None = None, evidence: str | None = None, refund_amount: Money | None = None,
                             returned: ReturnedByProvider | None = None,
                             to_paying_number: bool = False) -> tuple[Dispute, bool]:
    """move_dispute under the client's idempotency key, scoped to the dispute: (the dispute, True) when moved or noted
    now; (the dispute as it is now, False) when this request is the same again (the same status, note, evidence,
    refundAmount, returnedByProvider and toPayingNumber), whatever happened to it since: nothing noted, audited,
    refunded or told again. Without it a retry after a lost answer was a second note and `dispute.updated` event,
    or, for a move that closed it, a 409 saying it was closed already. Another request under the key: 409
    IDEMPOTENCY_KEY_REUSED. Two at once with one key: the dispute's row lock, taken before the key is looked up,
    makes the second find the first's key (its primary key would refuse a second row). The key's row keeps the
    request's digest (keyed: see _request_hash), never its note (free text that may name the member)."""
    key = check_idempotency_key(idempotency_key)
    digest = _transition_hash(target, note, evidence, refund_amount, returned, to_paying_number)
    await _her_row_before_dispute(session, dispute_id, cooperative_id, returned)  # (before the dispute's lock too)
    dispute = await lock_row(session, Dispute, dispute_id, cooperative_id)
    if dispute is None:
        raise NotFound("dispute not found")
    done = (await session.execute(select(DisputeTransitionKey.request_hash).where(
        DisputeTransitionKey.dispute_id == dispute.id, DisputeTransitionKey.idempotency_key == key))).scalar()
    if done is not None:
        if not same_request(rt.cipher, done, digest):  # another status, note, evidence or refund: not a retry
            raise Conflict("Dispute transition with this idempotency key already exists with a different request",
                           field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
        return dispute, False
    moved = await move_dispute(session, rt, dispute_id=dispute.id, cooperative_id=cooperative_id, target=target,
                               actor=actor, note=note, evidence=evidence, refund_amount=refund_amount,
                               returned=returned, to_paying_number=to_paying_number)
    session.add(DisputeTransitionKey(dispute_id=dispute.id, idempotency_key=key,
                                     request_hash=keyed_request_hash(rt.cipher, digest)))
    await session.flush()
    return moved, True
