"""Members of cooperatives: created, found by phone through a blind index, phone kept encrypted."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import users
from core.audit import Actor, formatted, phone_changes, record
from core.crypto import PiiCipher
from core.db import event_data_id, insert_ignore, lock_row, utcnow
from core.errors import CONCURRENT_CHANGE, INVALID_STATE, MEMBER_PHONE_TAKEN, Conflict, NotFound, ValidationError
from core.models import (
    AdminUser,
    AuditEvent,
    Cooperative,
    Dispute,
    Member,
    OutboxJob,
    Payment,
    PhoneOptOut,
    PhoneOptOutWord,
    Refund,
    SmsMessage,
    UssdSession,
    WebhookDelivery,
)
from core.notify import SMS_PHONE_CONTEXT, send_sms
from core.outbox import DISCARDED, LIVE, SMS_GIVE_BACK_KIND, SMS_KIND
from core.phone import Phone
from core.state import StaleTransition, transition
from core.state.dispute import DISPUTE
from core.state.payment import OPEN_VALUES as OPEN_PAYMENT_VALUES
from core.state.refund import OPEN_VALUES as OPEN_REFUND_VALUES
from core.state.sms import SKIPPED, SMS, SmsStatus

LANGUAGES = ("en", "rw", "fr", "sw")
MEMBER_STATUSES = ("PENDING", "ACTIVE", "SUSPENDED")
DUPLICATE_PHONE = "a member with this phone number already exists in this cooperative"
PHONE_RELEASED = "the member's phone number was released"
# The Conflict for a change a released number rules out (a status back from SUSPENDED, a number corrected).
REGISTER_AGAIN = f"{PHONE_RELEASED}: register the person again as a new member"
RELEASED_MASK = "released"
# What an erased member (erase_member) leaves where her name and number were: on her row, her payments' account
# mask and her SMS rows' phone mask. Her payments' and messages' encrypted number, blind index and request hash
# become '' (the columns are NOT NULL; '' decrypts to nothing and no number's blind index is '').
ERASED_NAME = "Erased member"
ERASED_MASK = "erased"
# The account mask of a payment recorded from a statement line naming its member alone, paid from a number the audit
# does not tell (hers changed by a NEW_SIM since: core.recorded_payments._members_number): no number kept, its
# ciphertext, blind index '' as an erased payer's; a refund the provider sends to the number that paid is refused.
ACCOUNT_NOT_KNOWN = "unknown"


def phone_context(cooperative_id: str) -> str:
    """The encryption context of a member's phone number (bound to its cooperative)."""
    return f"member:{cooperative_id}"


def member_row(cipher: PiiCipher, *, cooperative_id: str, name: str, phone: Phone, language: str,
               unit: str | None, status: str) -> dict[str, Any]:
    """A member's columns as written (the phone encrypted for its cooperative, blind-indexed and masked),
    from values already checked: by create_member, or by the import for every row of its file."""
    return {
        "cooperative_id": cooperative_id,
        "name": name,
        "phone_enc": cipher.encrypt(phone.e164, context=phone_context(cooperative_id)),
        "phone_index": cipher.blind_index(phone.e164),
        "phone_masked": phone.masked(),
        "language": language,
        "unit": (unit or "").strip() or None,
        "status": status,
    }


# ------------------------------------------------------------------------------------ a number's opt-out
# STOP is the number's person's, not a membership's: it is kept by the number's blind index (phone_opt_outs), and
# holds for every membership the number has later, whichever way it is made (create_member: the API and USSD
# registration; the CSV import), silently: the send-time check (core.reminders.why_not_send) reads the number's
# opt-out with the membership's flag. A new membership's own flag (reminders_opt_out) starts False whatever the
# number did: copied, it showed in the cooperative's audit log (member.created) that a number its admin typed in
# had texted STOP, as another cooperative's member or as nobody's (a 50-row import read 50 numbers of the list).
# The flag says what the number sent while a member of this cooperative (channels.sms.routes). The reminder scan
# reads the flag alone (no join per chunk): a reminder for a number opted out elsewhere is queued, as any other,
# and dropped at its turn (not sent, nothing the cooperative sees tells it from one sent).


def number_opted_out(phone_index: Any) -> Any:
    """SQL condition: the number of this blind index (a value or a column) sent STOP and not START since."""
    return exists().where(PhoneOptOut.phone_index == phone_index)


async def set_number_opt_out(session: AsyncSession, phone_index: str, opt_out: bool,
                             said_at: datetime | None = None) -> bool:
    """Remember (STOP) or forget (START) the number's opt-out, in the caller's transaction; idempotent. The
    caller also sets the flag on the number's memberships (channels.sms.routes).

    `said_at`: when the number sent this STOP or START (the aggregator's date of the text). A word sent before the
    latest one taken for the number (phone_opt_out_words) changes nothing, and False is returned: her STOP and
    START texted seconds apart are taken by two handlers at once, or the second first, and must end as she sent
    them. The number's row there is written first and stays locked until the caller commits, so a second word of
    the number waits for the first, then is judged against it (the caller reads the memberships' flags again after
    this: they may have changed while it waited)."""
    if said_at is not None:
        insert = insert_ignore(session.get_bind().dialect.name, PhoneOptOutWord).values(
            phone_index=phone_index, said_at=said_at)
        latest = PhoneOptOutWord.__table__.c.said_at
        taken = (await session.execute(insert.on_conflict_do_update(
            index_elements=["phone_index"], set_={"said_at": insert.excluded.said_at},
            where=latest <= insert.excluded.said_at).returning(PhoneOptOutWord.phone_index))).first()
        if taken is None:
            return False  # she sent a later STOP or START, taken already: this older one changes nothing
    if opt_out:
        await session.execute(insert_ignore(session.get_bind().dialect.name, PhoneOptOut)
                              .values(phone_index=phone_index, created_at=utcnow())
                              .on_conflict_do_nothing(index_elements=["phone_index"]))
    else:
        await session.execute(delete(PhoneOptOut).where(PhoneOptOut.phone_index == phone_index))
    return True


# The audit row every STOP or START that changed a membership's flag leaves, one per membership, written alike by
# this release (channels.sms.routes) and the one before 0016: before {"remindersOptOut": not x}, after
# {"remindersOptOut": x} (rows before the audit log's one format: "reminders_opt_out"; read through
# core.audit.formatted), channel "sms".
SMS_OPT_OUT_ACTION = "member.reminders_opt_out"


@dataclass(frozen=True)
class OptOutReplayed:
    """A number's latest STOP (opted_out) or START, by its audit row: what replay_opt_outs reads, and what it
    reports for a number whose opt-out it changed."""

    phone_masked: str
    opted_out: bool
    at: datetime
    audit_id: int


def _opt_out_rows(since: datetime) -> Any:
    """The STOP/START audit rows since `since`, each with its membership's current number (released: none)."""
    return (select(AuditEvent.id, AuditEvent.at, AuditEvent.after, Member.phone_index, Member.phone_masked)
            .join(Member, Member.id == AuditEvent.entity_id)
            .where(AuditEvent.action == SMS_OPT_OUT_ACTION, AuditEvent.entity_type == "member",
                   AuditEvent.channel == "sms", AuditEvent.at >= since, Member.phone_index.is_not(None)))


async def _last_word(session: AsyncSession, phone_index: str, since: datetime) -> OptOutReplayed | None:
    """The number's latest STOP or START since `since` (by the audit row's time, then id), through its
    memberships' current number; None when none holds it any more (released meanwhile)."""
    row = (await session.execute(_opt_out_rows(since).where(Member.phone_index == phone_index)
                                 .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1))).first()
    if row is None:
        return None
    opted_out = bool(formatted(row.after or {}).get("remindersOptOut"))
    return OptOutReplayed(row.phone_masked or "", opted_out, row.at, row.id)


class _ReleasedMeanwhile(Exception):
    """The number left its last membership while it was replayed: its opt-out is release_phone's to forget."""


async def replay_opt_outs(sessionmaker: async_sessionmaker[AsyncSession], since: datetime) -> list[OptOutReplayed]:
    """After a rolling deploy to the release with migration 0016: the STOP and START taken meanwhile by a process
    of the release before it changed the memberships' flags (and left their audit rows) but not the number's
    opt-out (phone_opt_outs), which the worker's send-time check reads. Each number with a STOP or START since
    `since` gets the one its latest audit row says (time, then id: a STOP then a START is a START), through its
    memberships' current number (released ones are skipped). This
    release's own STOP and START wrote the same rows and the same opt-out: replayed, they change nothing.

    Safe while serving: one short transaction a number. A STOP or START of the number taken meanwhile writes
    the opt-out before its audit row, in one transaction: the latest row is read again after the write, and
    written again until the two agree (a START whose delete our insert waited for is then seen; a STOP not yet
    committed writes its own row after ours)."""
    async with sessionmaker() as session:
        numbers = (await session.execute(
            select(_opt_out_rows(since).subquery().c.phone_index).distinct())).scalars().all()
    changed: list[OptOutReplayed] = []
    for phone_index in sorted(numbers):
        try:
            replayed = await _replay_number(sessionmaker, phone_index, since)
        except _ReleasedMeanwhile:
            continue
        if replayed is not None:
            changed.append(replayed)
    return sorted(changed, key=lambda c: (c.at, c.audit_id))


async def _replay_number(sessionmaker: async_sessionmaker[AsyncSession], phone_index: str,
                         since: datetime) -> OptOutReplayed | None:
    async with sessionmaker() as session, session.begin():
        word = await _last_word(session, phone_index, since)
        if word is None:
            raise _ReleasedMeanwhile
        had = bool((await session.execute(select(number_opted_out(phone_index)))).scalar_one())
        while True:
            await set_number_opt_out(session, phone_index, word.opted_out)
            again = await _last_word(session, phone_index, since)
            if again is None:
                raise _ReleasedMeanwhile  # rolls this number back
            if again.audit_id == word.audit_id:
                break
            word = again
    return None if had == word.opted_out else word


def created_audit(status: str, phone_masked: str) -> dict[str, Any]:
    """A member.created audit row's `after` (create_member, and the CSV import's rows). Nothing of the number's
    opt-out: the cooperative does not learn that the number texted STOP elsewhere (see above)."""
    return {"status": status, "phone": phone_masked}


class PhoneReleased(Conflict):
    """The member's number was released (release_phone): nothing is sent to it for this member any more."""


def member_phone(cipher: PiiCipher, member: Any) -> Phone:
    if member.phone_enc is None:
        raise PhoneReleased(PHONE_RELEASED)
    return Phone(cipher.decrypt(member.phone_enc, context=phone_context(member.cooperative_id)))


def check_language(language: str) -> str:
    language = (language or "en").strip().lower()
    if language not in LANGUAGES:
        raise ValidationError(f"language must be one of {', '.join(LANGUAGES)}", field="language")
    return language


async def find_memberships(session: AsyncSession, cipher: PiiCipher, phone: Phone) -> list[tuple[Member, Cooperative]]:
    """Every non-suspended membership of this phone number, across cooperatives."""
    rows = await session.execute(
        select(Member, Cooperative)
        .join(Cooperative, Cooperative.id == Member.cooperative_id)
        .where(Member.phone_index == cipher.blind_index(phone.e164),
               Member.status != "SUSPENDED", Cooperative.status == "ACTIVE")
        .order_by(Cooperative.name)
    )
    return [(m, c) for m, c in rows.all()]


async def membership_rows(conn: Any, cipher: PiiCipher, phone: Phone, coop_columns: Sequence[Any]) -> list[Any]:
    """find_memberships as plain rows (member_id, member_status, member_language, *coop_columns).

    For hot reads (a USSD session's first hop) that need a few columns: no ORM objects to build.
    `conn` is anything with `execute` (an AsyncConnection or AsyncSession).
    """
    rows = await conn.execute(_membership_rows(tuple(coop_columns)), {"phone_index": cipher.blind_index(phone.e164)})
    return list(rows.all())


def membership_query(coop_columns: Sequence[Any]) -> Any:
    """membership_rows' SELECT (built once per set of columns), run with {"phone_index": the phone's blind index}."""
    return _membership_rows(tuple(coop_columns))


@functools.cache  # built once per set of columns: building it per hop cost about as much as running it
def _membership_rows(coop_columns: tuple[Any, ...]) -> Any:
    return (select(Member.id.label("member_id"), Member.status.label("member_status"),
                   Member.language.label("member_language"), *coop_columns)
            .join(Cooperative, Cooperative.id == Member.cooperative_id)
            .where(Member.phone_index == bindparam("phone_index"),
                   Member.status != "SUSPENDED", Cooperative.status == "ACTIVE")
            .order_by(Cooperative.name))


async def get_member(session: AsyncSession, member_id: str, cooperative_id: str | None = None) -> Member:
    query = select(Member).where(Member.id == member_id)
    if cooperative_id is not None:
        query = query.where(Member.cooperative_id == cooperative_id)
    member = (await session.execute(query)).scalar_one_or_none()
    if member is None:
        raise NotFound("member not found")
    return member


async def create_member(
    session: AsyncSession,
    cipher: PiiCipher,
    *,
    cooperative_id: str,
    name: str,
    phone: Phone,
    actor: Actor,
    language: str = "en",
    unit: str | None = None,
    status: str = "ACTIVE",
) -> Member:
    name = (name or "").strip()
    if not 2 <= len(name) <= 200:
        raise ValidationError("name must be 2 to 200 characters", field="name")
    if status not in MEMBER_STATUSES:
        raise ValidationError(f"status must be one of {', '.join(MEMBER_STATUSES)}", field="status")
    values = member_row(cipher, cooperative_id=cooperative_id, name=name, phone=phone,
                        language=check_language(language), unit=unit, status=status)
    # A number that sent STOP (before registering, or as a member elsewhere) gets no reminders here either, but
    # the membership's flag is not set from it: the send-time check reads the number (see a number's opt-out).
    # The unique (cooperative, phone) index decides, not a SELECT before: of two creates of one number at
    # once, the second inserts nothing (ON CONFLICT DO NOTHING) and is told so, as a later one would be.
    stmt = (insert_ignore(session.get_bind().dialect.name, Member).values(values)
            .on_conflict_do_nothing(index_elements=["cooperative_id", "phone_index"]).returning(Member))
    member = (await session.scalars(stmt)).one_or_none()
    if member is None:
        raise Conflict(DUPLICATE_PHONE, field="phone", code=MEMBER_PHONE_TAKEN)
    await record(session, actor=actor, action="member.created", entity_type="member", entity_id=member.id,
                 after=created_audit(status, member.phone_masked),
                 cooperative_id=cooperative_id)
    return member


# The member's own words about herself: their audit rows say that they changed, not what they were or became (the
# audit log is append-only: a value written there could never be erased, erase_member).
PERSONAL_FIELDS = ("name", "unit")
CHANGED = "changed"
# Why a number is corrected (update_member's phone_change). NEW_SIM: she changed numbers; the STOP she sent as
# this membership's member stays hers. TYPO: the number was never hers; a STOP sent from it was its holder's.
PHONE_CHANGES = ("NEW_SIM", "TYPO", "SWAP")
# The 409 of a swap with a suspended member: her number is on its way out (release-phone), nothing is sent to her.
SWAP_SUSPENDED = ("member {member} is SUSPENDED: a suspended member's number is not swapped (make her ACTIVE first, "
                  "or release her number and correct the other member's with NEW_SIM)")
# The 409 of a correction to a number another member of the cooperative holds (_change_phone), with her id.
TAKEN_BY = (DUPLICATE_PHONE + " (member {holder}): correct hers first, or, if the two members exchange their "
            "numbers (sisters swapping phones), send phoneChange SWAP")


async def update_member(session: AsyncSession, member: Member, *, actor: Actor, name: str | None = None,
                        language: str | None = None, unit: str | None = None, status: str | None = None,
                        phone: Phone | None = None, cipher: PiiCipher | None = None,
                        phone_change: str | None = None) -> Member:
    """Edit a member; `phone` (with `cipher`) corrects her number (_change_phone), `phone_change` (PHONE_CHANGES,
    only with `phone`; NEW_SIM when not given) says why. The member.updated audit row holds her language and status
    before and after, which of her name and unit changed (PERSONAL_FIELDS: "changed", not the values), her number
    masked when it changed with the phoneChange that changed it, and her remindersOptOut when the correction changed
    it (a flag, not her data)."""
    if phone_change is not None and phone is None:
        raise ValidationError("phoneChange is only given with phone (the number being corrected)",
                              field="phoneChange")
    if phone_change is not None and phone_change not in PHONE_CHANGES:
        raise ValidationError(f"phoneChange must be one of {', '.join(PHONE_CHANGES)}", field="phoneChange")
    before: dict[str, Any] = {"language": member.language, "status": member.status}
    was = {field: getattr(member, field) for field in PERSONAL_FIELDS}
    if name is not None:
        if not 2 <= len(name.strip()) <= 200:
            raise ValidationError("name must be 2 to 200 characters", field="name")
        member.name = name.strip()
    if language is not None:
        member.language = check_language(language)
    if unit is not None:
        member.unit = unit.strip() or None
    if status is not None:
        if status not in MEMBER_STATUSES:
            raise ValidationError(f"status must be one of {', '.join(MEMBER_STATUSES)}", field="status")
        if status != "SUSPENDED" and status != member.status and await _released(session, member.id):
            raise Conflict(REGISTER_AGAIN, field="status", code=INVALID_STATE)
        member.status = status
    after: dict[str, Any] = {"language": member.language, "status": member.status}
    after.update({field: CHANGED for field in PERSONAL_FIELDS if getattr(member, field) != was[field]})
    if phone is not None:
        assert cipher is not None, "a new phone number is encrypted: pass the cipher"
        changed = await _change_phone(session, cipher, member, phone, typo=phone_change == "TYPO",
                                      swap=phone_change == "SWAP", actor=actor)
        if changed is not None:
            before.update(changed[0])
            after.update({**changed[1], "phoneChange": phone_change or "NEW_SIM"})
    await session.flush()
    await record(session, actor=actor, action="member.updated", entity_type="member", entity_id=member.id,
                 before=before, after=after, cooperative_id=member.cooperative_id)
    return member


async def _change_phone(session: AsyncSession, cipher: PiiCipher, member: Member, phone: Phone, *,
                        typo: bool = False, swap: bool = False,
                        actor: Actor | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Correct the member's number (typed wrong at registration, a new SIM): encrypted, blind-indexed and masked
    as create_member writes it, her history kept. The unique (cooperative, phone) index decides whether another
    member of the cooperative has it (a 409, as for a create). A new SIM (the default): her own flag stays, a STOP
    she sent as this cooperative's member is hers, not her SIM's (a START from the new number clears it). A typo
    (`typo`): the old number was never hers, and a STOP from it was its holder's (who got her reminders), one she
    could never undo (she does not know of it, and cannot send START from a number she never had): her flag is
    reset, since what she sent herself is not known. Either way what the new number sent elsewhere holds at send
    time, unseen here. The old number's STOP is forgotten once no membership holds it (release_phone). The audit's
    before and after (masked numbers; remindersOptOut when it was reset), or None when the number is the one she
    has. The caller locked the row first (lock_member), and forgets the old number's USSD keys in Redis
    (admin_api.members). A swap (`swap`): the member of the cooperative holding the number gets hers in exchange
    (_swap_with)."""
    if await _released(session, member.id):  # under the row's lock: none can release it meanwhile
        raise Conflict(REGISTER_AGAIN, field="phone", code=INVALID_STATE)
    index = cipher.blind_index(phone.e164)
    old_index, old_mask = member.phone_index, member.phone_masked
    if index == old_index:
        return None
    holder = await _holder(session, member.cooperative_id, index)
    if swap:
        if holder is None:
            raise Conflict("no other member of the cooperative has this number: nothing to swap (send phoneChange "
                           "NEW_SIM or TYPO)", field="phoneChange")
        for one in (member, holder):
            if one.status == "SUSPENDED":
                raise Conflict(SWAP_SUSPENDED.format(member=one.id), field="phoneChange", code=INVALID_STATE)
        old_phone = member_phone(cipher, member)
        holder.phone_enc = holder.phone_index = None  # for a moment: the unique index holds one number once
        await session.flush()
    elif holder is not None:
        raise Conflict(TAKEN_BY.format(holder=holder.id), field="phone", code=MEMBER_PHONE_TAKEN)
    member.phone_enc = cipher.encrypt(phone.e164, context=phone_context(member.cooperative_id))
    member.phone_index = index
    member.phone_masked = phone.masked()
    try:
        async with session.begin_nested():  # a savepoint: the refused number leaves the caller's transaction usable
            await session.flush()
    except IntegrityError:
        raise Conflict(DUPLICATE_PHONE, field="phone", code=MEMBER_PHONE_TAKEN) from None
    if holder is not None and old_index is not None:
        # Each number's STOP follows it (a telco opt-out is the number's): the number's own opt-out stays with it,
        # and a membership's flag goes with the number when it is that number's STOP (its opt-out shows it). A flag
        # without it was sent from an earlier SIM (NEW_SIM keeps it hers): it stays hers, not given to the other.
        mine = member.reminders_opt_out and await _opted_out(session, old_index)
        theirs = holder.reminders_opt_out and await _opted_out(session, index)
        was_out = member.reminders_opt_out
        member.reminders_opt_out = (was_out and not mine) or theirs
        await _swap_with(session, cipher, holder, old_phone, phone, member, actor=actor,
                         opt_out=(holder.reminders_opt_out and not theirs) or mine)
        await _readdress_queued(session, cipher, member.id, old_index, phone)
        swapped: tuple[dict[str, Any], dict[str, Any]] = (
            {"phone": old_mask}, {"phone": member.phone_masked, "swappedWith": holder.id})
        if was_out != member.reminders_opt_out:
            swapped[0]["remindersOptOut"], swapped[1]["remindersOptOut"] = was_out, member.reminders_opt_out
        return swapped
    if old_index is not None:
        await _readdress_queued(session, cipher, member.id, old_index, phone)
        await _forget_opt_out_if_unheld(session, old_index)
    before: dict[str, Any] = {"phone": old_mask}
    after: dict[str, Any] = {"phone": member.phone_masked}
    if typo and member.reminders_opt_out:
        member.reminders_opt_out = False
        before["remindersOptOut"], after["remindersOptOut"] = True, False
    return before, after


async def _opted_out(session: AsyncSession, phone_index: str) -> bool:
    """Whether the number of this blind index sent STOP (and not START since): its own opt-out."""
    return bool((await session.execute(select(number_opted_out(phone_index)))).scalar_one())


async def _holder(session: AsyncSession, cooperative_id: str, index: str) -> Member | None:
    """The cooperative's member holding the number (blind index), locked: a swap gives her another."""
    return (await session.execute(select(Member).where(
        Member.cooperative_id == cooperative_id, Member.phone_index == index).with_for_update())).scalar_one_or_none()


async def _swap_with(session: AsyncSession, cipher: PiiCipher, holder: Member, phone: Phone, phone_given: Phone,
                     member: Member, *, actor: Actor | None, opt_out: bool) -> None:
    """The other side of a swap: `holder` (her number `phone_given` just given to `member`) gets `member`'s old
    number `phone`, and with it that number's STOP (`opt_out`, her flag as _change_phone works it out: both numbers
    stay held, so neither number's own opt-out is forgotten), her texts waiting for the number she gave go to the
    one she gets, audited as her own correction."""
    was, was_out = holder.phone_masked, holder.reminders_opt_out
    holder.reminders_opt_out = opt_out
    holder.phone_enc = cipher.encrypt(phone.e164, context=phone_context(holder.cooperative_id))
    holder.phone_index = cipher.blind_index(phone.e164)
    holder.phone_masked = phone.masked()
    await session.flush()
    await _readdress_queued(session, cipher, holder.id, cipher.blind_index(phone_given.e164), phone)
    before: dict[str, Any] = {"language": holder.language, "status": holder.status, "phone": was}
    after: dict[str, Any] = {"language": holder.language, "status": holder.status, "phone": holder.phone_masked,
                             "phoneChange": "SWAP", "swappedWith": member.id}
    if was_out != opt_out:
        before["remindersOptOut"], after["remindersOptOut"] = was_out, opt_out
    await record(session, actor=actor or Actor("system", "system"), action="member.updated", entity_type="member",
                 entity_id=holder.id, before=before, after=after, cooperative_id=holder.cooperative_id)


async def _readdress_queued(session: AsyncSession, cipher: PiiCipher, member_id: str, old_index: str,
                            phone: Phone) -> None:
    """Her texts still waiting to go to the number being corrected (a first try stored the row with its number,
    and an aggregator outage, an empty balance or a parked job keeps it QUEUED for hours): they go to the new one.
    The old number was never hers (a typo), or is no longer (a new SIM): her receipt would reach a stranger. A text
    whose send is under way as this commits goes where it was going."""
    await session.execute(
        update(SmsMessage).where(SmsMessage.member_id == member_id, SmsMessage.phone_index == old_index,
                                 SmsMessage.status == SmsStatus.QUEUED.value)
        .values(phone_enc=cipher.encrypt(phone.e164, context=SMS_PHONE_CONTEXT),
                phone_index=cipher.blind_index(phone.e164), phone_masked=phone.masked(), updated_at=utcnow())
        .execution_options(synchronize_session=False))


# Why a member's texts still waiting were not sent: she was erased, or her number released (_hold_back_queued).
ERASED_SMS_REASON = "not sent: member_erased"
RELEASED_SMS_REASON = "not sent: phone_released"


async def _hold_back_queued(session: AsyncSession, which: ColumnElement[bool], reason: str, *, actor: Actor) -> None:
    """Her texts (`which`) still waiting to go to a number she no longer holds (released, erased): not sent
    (FAILED with `reason`), so the job finds them finished and its next holder does not get them. One sent (or
    refused) meanwhile is left as it ended."""
    queued = (await session.execute(select(SmsMessage.id).where(
        which, SmsMessage.status == SmsStatus.QUEUED.value))).scalars().all()
    for message_id in queued:
        try:
            await transition(session, SMS, message_id, SmsStatus.QUEUED, SmsStatus.FAILED, actor=actor,
                             values={"failure_reason": reason, "provider_status": SKIPPED})
        except StaleTransition:
            pass


async def _forget_opt_out_if_unheld(session: AsyncSession, phone_index: str) -> None:
    """A number's STOP was its person's: once no membership holds the number any more, its next holder does not
    inherit it (while another membership still holds it, its person still has it, and it stays)."""
    if (await session.execute(
            select(Member.id).where(Member.phone_index == phone_index).limit(1))).first() is None:
        await set_number_opt_out(session, phone_index, False)
        await session.execute(delete(PhoneOptOutWord).where(PhoneOptOutWord.phone_index == phone_index))


async def _released(session: AsyncSession, member_id: str) -> bool:
    """Whether the member's phone number was released, read under a lock on the row: a release committed
    since the caller read it is seen, and none can commit before the caller's change."""
    row = (await session.execute(
        select(Member.phone_enc).where(Member.id == member_id).with_for_update())).one()
    return row[0] is None


async def approve_member(session: AsyncSession, member: Member, *, actor: Actor, cipher: PiiCipher) -> Member:
    """PENDING -> ACTIVE, and the "you are now a member" SMS queued in the same transaction."""
    # Lock the row and re-read it: of two approvals at once, the second waits and then sees ACTIVE.
    locked = (await session.execute(
        select(Member).where(Member.id == member.id).with_for_update()
        .execution_options(populate_existing=True)
    )).scalar_one()
    if locked.status != "PENDING":
        raise Conflict(f"member is {locked.status}, not PENDING", code=INVALID_STATE)
    approved_at = utcnow()
    member = await update_member(session, locked, actor=actor, status="ACTIVE")
    # One SMS per approval (the job and the sms_messages row both dedupe on this key); a member set back
    # to PENDING and approved again is a new approval and is told again.
    await send_sms(session, template="member_approved", cooperative_id=member.cooperative_id, context={},
                   cipher=cipher, member_id=member.id,
                   dedupe=f"member_approved:{member.id}:{approved_at:%Y%m%dT%H%M%S%f}")
    return member


async def release_phone(session: AsyncSession, member: Member, *, actor: Actor) -> Member:
    """A SUSPENDED member's phone number given up (the person left; the operator may give the number to
    someone else): its ciphertext and blind index cleared, so the number can be registered again, in this
    cooperative or any, and nothing sent to or received from it is taken for this member any more. The row,
    its payments and disputes stay; the masked form stays for the record. Releasing it again changes nothing.
    The number's STOP was its person's: released from its last membership, the number's next holder does not
    inherit it (while another membership still holds the number, its person still has it, and it stays)."""
    locked = await _locked_suspended(session, member, "releasing the phone number")
    if locked.phone_enc is None:
        return locked
    if locked.phone_index is not None:
        await _hold_back_queued(session, and_(SmsMessage.member_id == locked.id,
                                              SmsMessage.phone_index == locked.phone_index),
                                RELEASED_SMS_REASON, actor=actor)
    await _let_number_go(session, locked, locked.phone_masked or RELEASED_MASK)
    await record(session, actor=actor, action="member.phone_released", entity_type="member", entity_id=locked.id,
                 before={"phone": locked.phone_masked, "phoneReleased": False},
                 after={"phone": locked.phone_masked, "phoneReleased": True}, cooperative_id=locked.cooperative_id)
    return locked


async def lock_member(session: AsyncSession, member: Member, *, swapping_to: str | None = None) -> Member:
    """The member's row locked and read again, before changing it (core.db.lock_row: on SQLite, the write lock
    too): of two changes at once, the second waits and sees the first's (a number corrected twice at once forgets
    the number each replaces, not one twice). `swapping_to`: the blind index of the number a swap takes (phoneChange
    SWAP): the two members' rows are locked in the order of their ids (the other's, _change_phone's _holder, after
    hers when hers comes first), so two opposite swaps at once wait for each other instead of each holding her row
    and waiting for the other's (a deadlock: one refused)."""
    if swapping_to is not None:
        holder = (await session.execute(select(Member.id).where(
            Member.cooperative_id == member.cooperative_id, Member.phone_index == swapping_to))).scalar_one_or_none()
        if holder is not None and holder < member.id:
            await lock_row(session, Member, holder)
    locked: Member | None = await lock_row(session, Member, member.id)
    if locked is None:  # members are never deleted: only a row never written is missing
        raise NotFound("member not found")
    return locked


async def _locked_suspended(session: AsyncSession, member: Member, doing: str) -> Member:
    """lock_member, and a Conflict unless it is SUSPENDED."""
    locked = await lock_member(session, member)
    if locked.status != "SUSPENDED":
        raise Conflict(f"member is {locked.status}: suspend the member before {doing}", code=INVALID_STATE)
    return locked


async def _let_number_go(session: AsyncSession, locked: Member, mask: str) -> None:
    """Clear the locked member's number (ciphertext and blind index; `mask` shown in its place), and forget its
    STOP if no other membership holds it (release_phone)."""
    index = locked.phone_index
    await session.execute(
        update(Member).where(Member.id == locked.id)
        .values(phone_enc=None, phone_index=None, phone_masked=mask,
                updated_at=utcnow()))  # the loaded row is updated too (synchronize_session)
    if index is not None:
        await _forget_opt_out_if_unheld(session, index)


# ------------------------------------------------------------------------------------ erasure
# A member who left asks to be erased (Rwanda law 058/2021, Kenya DPA s.40). The money records stay (amounts,
# references, provider transaction ids, dates: what the cooperative's books and the provider's statements are
# reconciled against); what named or reached her goes. Old audit rows stay as written (the log is append-only):
# those written since member.updated stopped holding names (update_member) name nobody.



async def erase_member(session: AsyncSession, member: Member, *, actor: Actor) -> Member:
    """Erase a SUSPENDED member's personal data, in the caller's transaction: her name, unit and number on her row
    (placeholders; the number released as release_phone does, and its STOP forgotten if no other membership
    holds it); on her payments the account (ciphertext, blind index: the number no longer finds them), its mask
    and the request hash (a digest of the account); on her SMS rows the number and the text (a message still
    QUEUED is not sent: FAILED); on her USSD session rows the number's blind index and mask; her tenant logins
    turned off and their usernames replaced (core.users). "Hers" is what names her (member_id) and, while she
    still holds her number, what her number left in her cooperative with no member attached since she got it
    (a payment or SMS from just before she registered, a USSD session of an unregistered dial: _Hers). Amounts,
    references, provider transaction ids and statuses stay. A payment or a refund of hers still open is a
    Conflict: erase once it settles. Erasing again changes nothing. The audit row names her by id only.
    The caller forgets her number's USSD keys in Redis (admin_api.members, as for a release)."""
    locked = await _locked_suspended(session, member, "erasing it")
    if (locked.name, locked.unit, locked.phone_masked, locked.phone_enc) == (ERASED_NAME, None, ERASED_MASK, None):
        return locked  # erased already (a name typed since is cleared again)
    hers = await whose_records(session, locked)
    await _refuse_open_money(session, hers)
    await _let_number_go(session, locked, ERASED_MASK)
    await session.execute(update(Member).where(Member.id == locked.id).values(name=ERASED_NAME, unit=None))
    # Before _erase_payments: they find her payments by her number's index too. The disputes first: one opened as
    # her payments were locked is locked there, and the event of a move made on it meanwhile is then scrubbed too.
    await _erase_disputes(session, hers)
    await _erase_events(session, hers)
    payments = await _erase_payments(session, hers)
    messages = await _erase_messages(session, hers, actor=actor)
    sessions = await _erase_ussd_sessions(session, hers)
    logins = await _erase_logins(session, locked.id, actor=actor)
    await record(session, actor=actor, action="member.erased", entity_type="member", entity_id=locked.id,
                 after={"erased": True, "payments": payments, "smsMessages": messages, "ussdSessions": sessions,
                        "users": logins},
                 cooperative_id=locked.cooperative_id)
    return locked


async def whose_records(session: AsyncSession, member: Member) -> _Hers:
    """What an erasure of the member reaches (_Hers): admin_api.members chooses her USSD sessions' Redis keys by it."""
    return _Hers(member.id, member.cooperative_id, member.phone_index,
                 await holds_number_since(session, member) - NUMBER_MARGIN)


# How long before she registered her number (or had it corrected to it) what it left with no member attached
# counts as hers: the dial she registered in, a payment made just before. Earlier, a recycled number was someone
# else's (operators give a number out again after months unused).
NUMBER_MARGIN = timedelta(hours=1)


async def holds_number_since(session: AsyncSession, member: Member) -> datetime:
    """When the member got the number she holds: her registration, or the last correction of her number (its
    member.updated audit row names the phone)."""
    return (await number_history(session, member))[0]


async def number_history(session: AsyncSession, member: Member) -> tuple[datetime, set[str]]:
    """When the member got the number she holds (holds_number_since), and the masks of the numbers she held before
    it: each correction's number before, but a TYPO's (never hers: its holder was taken for her). Rows from before
    the audit named the phoneChange count as NEW_SIM (the default)."""
    changes = [(at, before, after) for at, before, after in (await session.execute(
        select(AuditEvent.at, AuditEvent.before, AuditEvent.after)
        .where(AuditEvent.entity_type == "member", AuditEvent.entity_id == member.id,
               AuditEvent.action == "member.updated"))).all() if isinstance(after, dict) and "phone" in after]
    held = {before["phone"] for _at, before, after in changes
            if isinstance(before, dict) and before.get("phone") and after.get("phoneChange") != "TYPO"}
    return max([member.created_at, *(at for at, _before, _after in changes)]), held


async def number_came_since(session: AsyncSession, phone_index: str, moment: datetime, *,
                            but: str | None = None) -> bool:
    """Whether a member (of any cooperative; not `but`) holding the number of this blind index got it by a correction
    after `moment` (NEW_SIM, SWAP: until then the number was someone else's, a sister's, a stranger's; not a TYPO,
    which gave her the number that was hers all along)."""
    found = (await session.execute(number_came_since_rows(phone_index, moment, but=but).limit(1))).first()
    return found is not None


def number_came_since_rows(phone_index: Any, moment: Any, *, but: Any = None) -> Select[Any]:
    """The audit rows number_came_since looks for; `phone_index` and `moment` may be columns of an enclosing query
    (channels.sms.jobs asks it of the payment an SMS is about, in the statement that reads the payment)."""
    return (select(AuditEvent.id).join(Member, Member.id == AuditEvent.entity_id)
            .where(Member.phone_index == phone_index, *((Member.id != but,) if but is not None else ()),
                   *phone_changes(Member.id), AuditEvent.at > moment,
                   func.coalesce(AuditEvent.after["phoneChange"].as_string(), "NEW_SIM") != "TYPO"))


def _phone_change(after: Any) -> str:
    """The phoneChange of a number correction's member.updated `after` (NEW_SIM for rows from before it was named)."""
    return str(after.get("phoneChange") or "NEW_SIM") if isinstance(after, dict) else "NEW_SIM"


async def number_holder_at(session: AsyncSession, cooperative_id: str, phone_index: str,
                           moment: datetime) -> str | None:
    """The cooperative's member who held the number of this blind index at `moment` (a statement line's
    completedAt: core.recorded_payments), whatever her status now, read back from the number corrections' audit rows
    as number_came_since reads them: its holder now, unless a NEW_SIM or SWAP after `moment` gave it to her. Then,
    for a SWAP, the member she swapped with (his own side of it, written in the same transaction: _swap_with), asked
    the same, back through each swap; for a NEW_SIM the number came from outside the gateway's records (a stranger's, or
    a member's who released it or moved to another number: only its mask is kept, which two numbers can share) and
    None is returned, as for a number no member holds. A TYPO gave her the number that was hers all along: it moves
    nothing (a NEW_SIM typed wrong and corrected by TYPO dates her number from the NEW_SIM). A change at `moment`
    exactly has given the number already (number_came_since's `at > moment`). Her registration bounds nothing: what
    her number paid before she registered is taken to be hers, as the SMS and refund checks take it, unless another
    member of the cooperative let a number of its mask go (released, erased, moved to a NEW_SIM) after `moment` and
    before she got it (_let_go_between): then the line may be that member's, and None is returned (the mask is all the
    audit keeps: it does not tell, and a wrong member is not guessed)."""
    found = (await session.execute(select(Member.id, Member.created_at, Member.phone_masked).where(
        Member.cooperative_id == cooperative_id, Member.phone_index == phone_index))).first()
    if found is None:
        return None
    holder, registered, mask = str(found.id), found.created_at, found.phone_masked
    rows = await _phone_change_rows(session, holder)
    bound: int | None = None  # each swap gone back through is older than the last: the walk ends
    while True:
        got = next((row for row in rows if _phone_change(row.after) != "TYPO"), None)
        if got is not None and got.at <= moment:
            return holder
        if got is None:
            # Hers since she registered (or since a TYPO there gave it): before that, no correction says whose it was.
            since = rows[0].at if rows else registered
            if since > moment and await _let_go_between(session, cooperative_id, mask, moment, since, but=holder):
                return None
            return holder
        if _phone_change(got.after) != "SWAP" or got is not rows[0]:
            return None  # a NEW_SIM (or a swap whose number a TYPO replaced since): no member known to have held it
        gave, holder = holder, str(got.after.get("swappedWith"))
        # The other side of that swap (its own row, written in the same transaction: the nearest such row of hers to
        # it); the changes before it are how she got the number she gave.
        theirs = await _phone_change_rows(session, holder)
        sides = [row for row in theirs if _phone_change(row.after) == "SWAP" and row.after.get("swappedWith") == gave]
        pair = min(sides, key=functools.partial(_apart, got.id), default=None)
        if pair is None or (bound is not None and pair.id >= bound):
            return None
        bound = pair.id
        rows = [row for row in theirs if row.id < pair.id]
        registered = (await session.execute(select(Member.created_at).where(Member.id == holder))).scalar_one()


async def number_of_at(session: AsyncSession, cipher: PiiCipher, member: Member, moment: datetime) -> Phone | None:
    """The number the member held at `moment` (a statement line naming her, without its number:
    core.recorded_payments), when the audit tells it exactly: the one whose line at `moment` number_holder_at gives
    her, as a line recorded by that number would go to her. Her number now (no NEW_SIM or SWAP since), or the one she
    gave in a SWAP since, which the member she swapped with holds now, or the one the swaps since gave on (each member
    linked to hers by a SWAP since `moment` is asked). None when none is: a NEW_SIM since (her number then is kept as
    its mask alone; by her, or by whoever it was given to), or a line from before she registered that another member's
    let-go number of its mask may have paid (number_holder_at)."""
    holders, seen, queue = [member], {member.id}, [member.id]
    while queue:  # each member a SWAP since `moment` links to hers, through any number of swaps (given on, again)
        for row in await _phone_change_rows(session, queue.pop()):
            other_id = str(row.after.get("swappedWith"))
            if _phone_change(row.after) != "SWAP" or row.at <= moment or other_id in seen:
                continue
            seen.add(other_id)
            other = await session.get(Member, other_id)
            if other is not None and other.cooperative_id == member.cooperative_id:
                holders.append(other)
                queue.append(other.id)
    for holder in holders:
        if holder.phone_enc is None or holder.phone_index is None:
            continue
        if await number_holder_at(session, member.cooperative_id, holder.phone_index, moment) == member.id:
            return member_phone(cipher, holder)
    return None


_LET_GO = ("member.phone_released", "member.updated", "member.erased")


async def _let_go_between(session: AsyncSession, cooperative_id: str, mask: str | None, after: datetime,
                          until: datetime, *, but: str) -> bool:
    """Whether a member of the cooperative (not `but`) let a number of this mask go in (`after`, `until`]: released
    it, moved from it to a NEW_SIM, or was erased holding it (her number's mask read from her last audit row naming
    one; one released before her erasure let it go at its release). One query on the cooperative's audit rows of
    those actions in that span (ix_audit_events_coop_action), and one per member erased in it."""
    if not mask:
        return True  # nothing to compare with: not known
    rows = (await session.execute(
        select(AuditEvent.id, AuditEvent.entity_id, AuditEvent.action, AuditEvent.before, AuditEvent.after)
        .where(AuditEvent.cooperative_id == cooperative_id, AuditEvent.action.in_(_LET_GO),
               AuditEvent.at > after, AuditEvent.at <= until, AuditEvent.entity_type == "member",
               AuditEvent.entity_id != but,
               or_(AuditEvent.action != "member.updated", AuditEvent.after["phone"].as_string().is_not(None))))).all()
    for row in rows:
        before = row.before if isinstance(row.before, dict) else {}
        if row.action == "member.phone_released" and before.get("phone") == mask:
            return True
        if row.action == "member.updated" and _phone_change(row.after) == "NEW_SIM" and before.get("phone") == mask:
            return True
        if row.action == "member.erased":
            last = (await session.execute(
                select(AuditEvent.action, AuditEvent.after).where(
                    AuditEvent.entity_type == "member", AuditEvent.entity_id == row.entity_id,
                    AuditEvent.action.in_(("member.created", "member.updated", "member.phone_released")),
                    AuditEvent.id < row.id, AuditEvent.after["phone"].as_string().is_not(None))
                .order_by(AuditEvent.id.desc()).limit(1))).first()
            if last is None or not isinstance(last.after, dict):
                return True  # her number not known: it may be this one
            if last.action != "member.phone_released" and last.after.get("phone") == mask:
                return True  # (released before: that release let it go, not her erasure)
    return False


def _apart(audit_id: int, row: Any) -> int:
    """How far the audit row is from the row `audit_id`, in the log's order."""
    return abs(int(row.id) - audit_id)


async def _phone_change_rows(session: AsyncSession, member_id: str) -> list[Any]:
    """The member's number corrections' audit rows (id, at, after), newest first."""
    return list((await session.execute(select(AuditEvent.id, AuditEvent.at, AuditEvent.after)
                                       .where(*phone_changes(member_id)).order_by(AuditEvent.id.desc()))).all())


@dataclass(frozen=True)
class _Hers:
    """Whose records an erasure clears: the member's, and while she holds a number (index, None once released)
    the ones its blind index left in her cooperative with no member attached since she got it (`since`, less
    NUMBER_MARGIN): before that, or once she released it, the number may have been someone else's, and those rows
    are left. Another cooperative's rows are never touched."""
    member_id: str
    cooperative_id: str
    index: str | None
    since: datetime

    def rows(self, member: Any, cooperative: Any, index: Any, at: Any, *,
             no_cooperative: bool = False) -> ColumnElement[bool]:
        """The condition on a table's member, cooperative, blind index and creation time columns (`no_cooperative`:
        rows written before any cooperative was known, an unregistered dial or text, count as hers too)."""
        if self.index is None:
            return member == self.member_id  # type: ignore[no-any-return]
        scope = cooperative == self.cooperative_id
        if no_cooperative:
            scope = or_(scope, cooperative.is_(None))
        return or_(member == self.member_id, and_(member.is_(None), scope, index == self.index, at >= self.since))


async def _refuse_open_money(session: AsyncSession, hers: _Hers) -> None:
    """A Conflict if a payment of the member, or a refund of one, is still open: an open payment still moves money
    (the provider may yet take it, a job still sends), an open refund's job pays out to the payment's account,
    which must be known. Her payments' refunds are locked first, then their disputes, then her payments:
    a refund asked for meanwhile (core.refunds locks its payment) waits, and then finds the account erased."""
    of_hers = hers.rows(Payment.member_id, Payment.cooperative_id, Payment.payment_account_index, Payment.created_at)
    # Their refunds before them (_erase_payments writes both): a refund's outcome (its callback, an admin recording
    # it) locks the refund, then its payment; taken the other way, a late word on a settled refund of hers (failed
    # after all, sent back after all) and the erasure deadlocked, and one was rolled back. (A success takes her row
    # first, FOR KEY SHARE: core.refunds._her_row_first; it waits for this erasure's lock, or this one for it.)
    # The settled ones only: one still open is refused below, and held here it was skipped by the refunds' withdrawal
    # (core.refunds._withdraw_unsent, SKIP LOCKED: a chargeback, a late success of another refund) on a payment of no
    # member (from her number: no row of hers to wait on), which this erasure then waited for: it was left PENDING
    # and sent (the member paid back twice), and this erasure refused for it all the same. Now withdrawn.
    #
    # A dispute of a payment from her number with no member attached is opened without her row's lock
    # (core.disputes._lock_payment): one committed between the disputes' lock and the payments' is not among those
    # locked, and _erase_disputes waited for it while holding the payments, against an officer's resolution holding
    # it and waiting for the payment (a refund, a chargeback): a deadlock, one rolled back (503). Such a dispute is
    # taken if it is free (SKIP LOCKED: no wait, so the order holds); if another holds it, the locks taken here are
    # let go (their savepoint rolled back) and taken again in order, waiting for it this time. (PostgreSQL only: on
    # SQLite the write lock serialises every writer.)
    postgres = session.get_bind().dialect.name != "sqlite"
    for _ in range(3):
        savepoint = await session.begin_nested() if postgres else None
        await session.execute(select(Refund.id).join(Payment, Payment.id == Refund.payment_id)
                              .where(of_hers, Refund.status.not_in(OPEN_REFUND_VALUES)).order_by(Refund.id)
                              .with_for_update(of=Refund))
        open_before = (await session.execute(
            select(func.count()).select_from(Refund).join(Payment, Payment.id == Refund.payment_id)
            .where(of_hers, Refund.status.in_(OPEN_REFUND_VALUES)))).scalar_one()
        locked: Sequence[str] = []
        if not open_before:
            # The disputes of her payments (_erase_disputes writes them) after the refunds, before the payments: a
            # refund's late outcome locks the refund, its disputes, then the payment (core.refunds), and a
            # resolution or a refund asked for its dispute, then the payment. With a refund open the erasure is
            # refused below (even if it settles meanwhile: its disputes were not locked before the payments).
            locked = (await session.execute(
                select(Dispute.id).join(Payment, Payment.id == Dispute.payment_id).where(of_hers)
                .order_by(Dispute.id).with_for_update(of=Dispute))).scalars().all()
        statuses = (await session.execute(select(Payment.status).where(of_hers)
                                          .order_by(Payment.id).with_for_update())).scalars().all()
        if savepoint is None:
            break
        if open_before or await disputes_free_since(
                session, select(Dispute.id).join(Payment, Payment.id == Dispute.payment_id).where(of_hers), locked):
            await savepoint.commit()
            break
        await savepoint.rollback()
    else:
        raise Conflict("disputes of the member's payments were opened and changed while she was erased: nothing was "
                       "erased; erase her again", code=CONCURRENT_CHANGE)
    open_payments = sum(status in OPEN_PAYMENT_VALUES for status in statuses)
    if open_payments:
        raise Conflict(f"the member has {open_payments} payment(s) still open (PENDING or PROCESSING): "
                       "erase the member once they have settled", code=INVALID_STATE)
    open_refunds = (await session.execute(
        select(func.count()).select_from(Refund).join(Payment, Payment.id == Refund.payment_id)
        .where(of_hers, Refund.status.in_(OPEN_REFUND_VALUES)))).scalar_one() or open_before
    if open_refunds:
        raise Conflict(f"the member has {open_refunds} refund(s) still open (PENDING or PROCESSING): "
                       "erase the member once they have settled", code=INVALID_STATE)


async def disputes_free_since(session: AsyncSession, disputes: Any, locked: Sequence[str]) -> bool:
    """Under the payments' locks: the disputes `disputes` (a select of their ids) finds beyond `locked` (those opened
    since the disputes' locks were taken), taken without waiting (SKIP LOCKED); False if another transaction holds
    one. The check of the let-go-and-retake pattern of _refuse_open_money and core.refunds.
    _lock_disputes_then_payment: waiting for such a dispute while holding a payment inverts the lock order."""
    new = set((await session.execute(disputes)).scalars().all()) - set(locked)
    if not new:
        return True
    taken = (await session.execute(select(Dispute.id).where(Dispute.id.in_(new)).order_by(Dispute.id)
                                   .with_for_update(skip_locked=True))).scalars().all()
    return len(taken) == len(new)


# What is left of a person's note (a review's, and one after a failure reason's own words: a cancellation, a void, a
# refund recorded or withdrawn by an admin) once the member it was about is erased (_erase_payments).
NOTE_ERASED = "[note erased]"


def _without_note(column: Any, prefixes: Sequence[str]) -> Any:
    """A failure reason that is the gateway's words and a person's note after them (`prefixes`): the words kept (they
    say what happened; channels.sms.templates reads them), the note replaced by NOTE_ERASED; any other as it is."""
    return case(*((column.startswith(prefix, autoescape=True), prefix + NOTE_ERASED) for prefix in prefixes),
                else_=column)


async def _erase_payments(session: AsyncSession, hers: _Hers) -> int:
    """Her payments: the account, and the free text people wrote on them, which may name her (the cooperative's
    system's `description`, shown in her PIN prompt: "Rent Jeanne M. D-707"; a review's note; the note of a
    cancellation or a void in `failure_reason`), and on their refunds the cooperative's `reason` and an admin's note
    in `failure_reason`; on both, the request's hash (a payment's covers the account, a refund's the reason). What
    the gateway wrote (statuses, flags and what a review cleared, who and when), amounts, references and provider
    transaction ids stay: the reconciliation reads those, never the text."""
    from core.provider_events import CANCELLED_BY_COOPERATIVE
    from core.recorded_payments import VOIDED_RECORDING
    from core.refunds import BY_A_PERSON

    of_hers = hers.rows(Payment.member_id, Payment.cooperative_id, Payment.payment_account_index, Payment.created_at)
    # First: the refunds are found by their payments' account, which the next statement clears. Their updated_at
    # kept: a COMPLETED refund changed after its period's end is one recorded later (core.reports._recorded_later).
    await session.execute(
        update(Refund).where(Refund.payment_id.in_(select(Payment.id).where(of_hers)))
        .values(reason=None, failure_reason=_without_note(Refund.failure_reason, BY_A_PERSON),
                request_hash=None,  # a digest of the request, its reason among the fields: as a payment's
                updated_at=Refund.updated_at)
        .execution_options(synchronize_session=False))
    done = await session.execute(
        update(Payment)
        .where(of_hers)
        .values(payment_account_enc="", payment_account_index="", payment_account_masked=ERASED_MASK,
                request_hash="", description=None,
                review_note=case((Payment.review_note.is_(None), None), else_=NOTE_ERASED),  # the API's review has one
                failure_reason=_without_note(Payment.failure_reason, (CANCELLED_BY_COOPERATIVE, VOIDED_RECORDING)),
                updated_at=utcnow())  # changed: a cooperative's sync picks the mask up
        .execution_options(synchronize_session=False))
    return int(done.rowcount)  # type: ignore[attr-defined]


# A dispute's resolution as the gateway writes it when the officer closing it typed no note (core.disputes
# move_dispute: the status it was closed with, in lower case): kept by an erasure, as the gateway's own words.
_CLOSED_AS_WORDS = tuple(sorted(status.value.lower() for status in DISPUTE.final))


def _erased_resolution(resolution: Any) -> Any:
    """A dispute's resolution once the member is erased: NOTE_ERASED, but none, or the gateway's own word."""
    return resolution if resolution is None or resolution in _CLOSED_AS_WORDS else NOTE_ERASED


async def _erase_disputes(session: AsyncSession, hers: _Hers) -> None:
    """The disputes of her payments (locked: _refuse_open_money): the free text officers and she wrote on them,
    which may name her as a review's note may: each note's text and evidence (a statement line, a file's name:
    typed, as the note is), and the gateway's own notes' text too (it quotes a refund's failure reason or an
    admin's words on it), become NOTE_ERASED, and the resolution (a closing note; the gateway's own word kept:
    _erased_resolution). What the gateway wrote stays: each note's time, writer and status, the dispute's status,
    reason, dates and refund, and the request hashes of those opened or moved under an idempotency key (a retry is
    still answered; keyed, they confirm no guess of a note: core.disputes._request_hash). Their updated_at kept: no
    move of the dispute's (its next event orders after it).
    Read locked: one opened while the erasure waited for her payments (on a payment of no member, opened without
    her row's lock) is not locked yet, and an officer's note or resolution on it meanwhile was written over with the
    dispute as read (erase_member runs this before _erase_events, which then scrubs that move's event too)."""
    of_hers = hers.rows(Payment.member_id, Payment.cooperative_id, Payment.payment_account_index, Payment.created_at)
    disputes = (await session.execute(select(Dispute.id, Dispute.notes, Dispute.resolution)
                                      .join(Payment, Payment.id == Dispute.payment_id).where(of_hers)
                                      .order_by(Dispute.id).with_for_update(of=Dispute))).all()
    for dispute_id, notes, resolution in disputes:
        erased = [{**note, **{key: NOTE_ERASED for key in ("text", "evidence") if note.get(key) is not None}}
                  if isinstance(note, dict) else note for note in notes or []]
        if (erased, _erased_resolution(resolution)) == (notes or [], resolution):
            continue
        await session.execute(update(Dispute).where(Dispute.id == dispute_id)
                              .values(notes=erased, resolution=_erased_resolution(resolution),
                                      updated_at=Dispute.updated_at)
                              .execution_options(synchronize_session=False))


def _note_erased(text: Any, prefixes: Sequence[str]) -> Any:
    """_without_note on a stored webhook event's failureReason."""
    for prefix in prefixes:
        if isinstance(text, str) and text.startswith(prefix):
            return prefix + NOTE_ERASED
    return text


def _erased_event_data(event_type: str, data: Any) -> Any:
    """A stored webhook event's `data` about her payment, refund or dispute as _erase_payments and _erase_disputes
    leave the row it was built from: the payment's account mask "erased", a person's note in failureReason and a
    review's note NOTE_ERASED; a refund's reason null and an admin's note in failureReason NOTE_ERASED; a dispute's
    resolution NOTE_ERASED but the gateway's own word (_erased_resolution). Anything else as sent.
    What _erased_event_sql writes in the database (_erase_events), said in Python: the tests compare the two."""
    from core.provider_events import CANCELLED_BY_COOPERATIVE
    from core.recorded_payments import VOIDED_RECORDING
    from core.refunds import BY_A_PERSON

    if not isinstance(data, dict):
        return data
    erased = dict(data)
    if event_type.startswith("payment."):
        if "paymentAccount" in erased:
            erased["paymentAccount"] = ERASED_MASK
        if "failureReason" in erased:
            erased["failureReason"] = _note_erased(erased["failureReason"],
                                                   (CANCELLED_BY_COOPERATIVE, VOIDED_RECORDING))
        review = erased.get("review")
        if isinstance(review, dict) and review.get("note") is not None:
            erased["review"] = {**review, "note": NOTE_ERASED}
    elif event_type.startswith("refund."):
        if "reason" in erased:
            erased["reason"] = None
        if "failureReason" in erased:
            erased["failureReason"] = _note_erased(erased["failureReason"], BY_A_PERSON)
    elif event_type.startswith("dispute.") and "resolution" in erased:
        erased["resolution"] = _erased_resolution(erased["resolution"])
    return erased


async def _erase_events(session: AsyncSession, hers: _Hers) -> None:
    """The webhook events told of her payments and their refunds, as stored until retention prunes them: each
    delivery's body (webhook_deliveries.payload, sent as it is, a retry or an admin's replay too) and each
    webhook.event job's (outbox_jobs.payload, fanned out as it is), scrubbed as the rows are (_erased_event_data,
    computed by the database: _erased_event_sql). So a delivery still waiting is sent scrubbed, under the same event
    id (a receiver that had it drops the repeat), and a job being fanned out meanwhile writes its deliveries scrubbed,
    or before this scrubs them (core.webhooks.fan_out). One a worker is sending at this moment goes as it read it.
    Found by the id in their data (ix_webhook_deliveries_subject, ix_outbox_jobs_event_subject), a bounded batch at a
    time, one UPDATE a table for each; their updated_at kept (retention reads it). The events of their disputes
    too (dispute.*: their resolution, as _erase_disputes leaves the row)."""
    of_hers = hers.rows(Payment.member_id, Payment.cooperative_id, Payment.payment_account_index, Payment.created_at)
    payment_ids = (await session.execute(select(Payment.id).where(of_hers))).scalars().all()
    of_payments: list[str] = []  # their refunds' and disputes' ids
    for start in range(0, len(payment_ids), _JOBS_AT_ONCE):
        some_payments = payment_ids[start:start + _JOBS_AT_ONCE]
        of_payments += (await session.execute(select(Refund.id).where(
            Refund.payment_id.in_(some_payments)))).scalars().all()
        of_payments += (await session.execute(select(Dispute.id).where(
            Dispute.payment_id.in_(some_payments)))).scalars().all()
    ids = [*payment_ids, *of_payments]
    # Inline: a cached generic plan proves ix_outbox_jobs_event_subject's predicate too.
    webhook_event: ColumnElement[str] = literal_column("'webhook.event'")
    dialect = session.get_bind().dialect.name
    for start in range(0, len(ids), _JOBS_AT_ONCE):
        some = ids[start:start + _JOBS_AT_ONCE]
        # The jobs first: a worker fanning one out holds its row (core.webhooks.fan_out), so their UPDATE waits for
        # the delivery rows it writes, and the deliveries' UPDATE after it finds them. Each row's updated_at kept as
        # the row has it then: a worker's outcome written meanwhile (a delivery's attempt, a job's end) moved it.
        await session.execute(
            update(OutboxJob).where(OutboxJob.kind == webhook_event, event_data_id(OutboxJob.payload).in_(some))
            .values(payload=_erased_event_sql(dialect, OutboxJob.payload,
                                              _json_text_at(dialect, OutboxJob.payload, "event_type")),
                    updated_at=OutboxJob.updated_at)
            .execution_options(synchronize_session=False))
        await session.execute(
            update(WebhookDelivery).where(event_data_id(WebhookDelivery.payload).in_(some))
            .values(payload=_erased_event_sql(dialect, WebhookDelivery.payload, WebhookDelivery.event_type),
                    updated_at=WebhookDelivery.updated_at)
            .execution_options(synchronize_session=False))


def _json_text_at(dialect: str, payload: Any, *path: str) -> Any:
    """SQL: the value at `path` in a JSON column, as text (a string's own characters); NULL where there is none."""
    if dialect == "postgresql":
        return payload.op("#>>")(literal_column(f"'{{{','.join(path)}}}'"))
    return func.json_extract(payload, literal_column(f"'$.{'.'.join(path)}'"))  # ->> is SQLite 3.38's


def _starts_with(text: Any, prefix: str) -> Any:
    """SQL: `text` starts with `prefix`, as str.startswith: case and wildcards as written (LIKE is neither on
    SQLite)."""
    return func.substr(text, 1, literal_column(str(len(prefix)))) == literal(prefix, String)


def _erased_event_sql(dialect: str, payload: Any, event_type: Any) -> Any:
    """SQL: a stored event's payload (a JSON column: `payload`, of event `event_type`) with its `data` as
    _erased_event_data leaves it, in one UPDATE of many rows, none read into Python (an erasure of a member with
    10,000 payments, 60,000 events: 9.5-12.6 s of the erasure's 10.7-13.7 s were their reads and writes back, row
    by row). PostgreSQL's JSONB: the data merged (||) with the keys it changes; SQLite's JSON: json_replace, which
    writes only paths present. tests/core/test_erased_event_sql.py compares both with _erased_event_data."""
    from core.provider_events import CANCELLED_BY_COOPERATIVE
    from core.recorded_payments import VOIDED_RECORDING
    from core.refunds import BY_A_PERSON

    def text(value: str) -> Any:
        return cast(literal(value, String), Text)

    # A resolution to erase (_erased_resolution): one that is there and not null (NULL as text, absent or JSON
    # null), but the gateway's own word (a string: JSON's other values are never one as text).
    erased_resolution = _json_text_at(dialect, payload, "data", "resolution").not_in(_CLOSED_AS_WORDS)

    if dialect == "postgresql":
        data = payload.op("->")(literal_column("'data'"))

        def at(*keys: str) -> Any:
            return payload.op("#>")(literal_column(f"'{{data,{','.join(keys)}}}'"))

        def typed(*keys: str) -> Any:
            return func.jsonb_typeof(at(*keys))

        def changed(*pairs: tuple[ColumnElement[bool], Any]) -> Any:  # the data's keys to write, or none
            return case(*pairs, else_=literal_column("'{}'::jsonb"))

        def without_note(prefixes: Sequence[str]) -> Any:
            return changed(*((and_(typed("failureReason") == "string",
                                   _starts_with(_json_text_at(dialect, payload, "data", "failureReason"), prefix)),
                              func.jsonb_build_object(literal_column("'failureReason'"), text(prefix + NOTE_ERASED)))
                             for prefix in prefixes))

        payment = (data.op("||")(changed((at("paymentAccount").is_not(None),
                                          func.jsonb_build_object(literal_column("'paymentAccount'"),
                                                                  text(ERASED_MASK)))))
                   .op("||")(without_note((CANCELLED_BY_COOPERATIVE, VOIDED_RECORDING)))
                   .op("||")(changed((and_(typed("review") == "object", typed("review", "note") != "null"),
                                      func.jsonb_build_object(literal_column("'review'"), at("review").op("||")(
                                          func.jsonb_build_object(literal_column("'note'"), text(NOTE_ERASED))))))))
        refund = (data.op("||")(changed((at("reason").is_not(None), literal_column("""'{"reason": null}'::jsonb"""))))
                  .op("||")(without_note(BY_A_PERSON)))
        dispute = data.op("||")(changed((erased_resolution, func.jsonb_build_object(literal_column("'resolution'"),
                                                                                    text(NOTE_ERASED)))))
        is_object = func.jsonb_typeof(data) == "object"

        def scrubbed(new_data: Any) -> Any:
            return payload.op("||")(func.jsonb_build_object(literal_column("'data'"), new_data))
    else:
        def path(*keys: str) -> Any:
            return literal_column(f"'$.data.{'.'.join(keys)}'")

        def typed_sqlite(*keys: str) -> Any:
            return func.json_type(payload, path(*keys))

        def kept_or(key: tuple[str, ...], *pairs: tuple[ColumnElement[bool], Any]) -> Any:
            """The JSON value written at `key`: a pair's, or the one there (json_replace writes only a path present;
            json(): a JSON value, not a string of its text). The one there as JSON text without SQLite 3.38's ->
            (Debian 11, Ubuntu 22.04: 3.34, 3.37): json_extract gives true and false as 1 and 0."""
            typed_at = typed_sqlite(*key)
            there = case((typed_at.in_(("true", "false")), typed_at),
                         else_=func.json_quote(func.json_extract(payload, path(*key))))
            return func.json(case(*((when, func.json_quote(value)) for when, value in pairs), else_=there))

        def without_note_sqlite(prefixes: Sequence[str]) -> tuple[Any, Any]:
            return path("failureReason"), kept_or(("failureReason",), *(
                (and_(typed_sqlite("failureReason") == "text",
                      _starts_with(_json_text_at(dialect, payload, "data", "failureReason"), prefix)),
                 text(prefix + NOTE_ERASED)) for prefix in prefixes))

        payment = func.json_replace(
            payload, path("paymentAccount"), text(ERASED_MASK),
            *without_note_sqlite((CANCELLED_BY_COOPERATIVE, VOIDED_RECORDING)),
            path("review", "note"), kept_or(("review", "note"), (
                and_(typed_sqlite("review") == "object", typed_sqlite("review", "note") != "null"),
                text(NOTE_ERASED))))
        refund = func.json_replace(payload, path("reason"), null(), *without_note_sqlite(BY_A_PERSON))
        dispute = func.json_replace(payload, path("resolution"),
                                    kept_or(("resolution",), (erased_resolution, text(NOTE_ERASED))))
        is_object = func.json_type(payload, literal_column("'$.data'")) == "object"

        def scrubbed(new_data: Any) -> Any:
            return new_data
    return case((and_(is_object, _starts_with(event_type, "payment.")), scrubbed(payment)),
                (and_(is_object, _starts_with(event_type, "refund.")), scrubbed(refund)),
                (and_(is_object, _starts_with(event_type, "dispute.")), scrubbed(dispute)),
                else_=payload)


async def _erase_messages(session: AsyncSession, hers: _Hers, *, actor: Actor) -> int:
    """Her SMS rows: number and text cleared. One still QUEUED (its job parked, or not yet run) is moved to
    FAILED first, so its job finds it finished and sends nothing."""
    of_hers = hers.rows(SmsMessage.member_id, SmsMessage.cooperative_id, SmsMessage.phone_index,
                        SmsMessage.created_at, no_cooperative=True)
    await _hold_back_queued(session, of_hers, ERASED_SMS_REASON, actor=actor)
    await _erase_jobs_numbers(session, (await session.execute(
        select(SmsMessage.idempotency_key).where(of_hers))).scalars().all(), hers.member_id)
    await _erase_give_backs_index(session, hers)
    done = await session.execute(
        update(SmsMessage).where(of_hers)
        .values(phone_enc="", phone_index="", phone_masked=ERASED_MASK, body="", updated_at=utcnow())
        .execution_options(synchronize_session=False))
    return int(done.rowcount)  # type: ignore[attr-defined]


# How many of her texts' jobs one statement reads (_erase_jobs_numbers): a bound on its IN list.
_JOBS_AT_ONCE = 500


async def _erase_jobs_numbers(session: AsyncSession, keys: Sequence[str], member_id: str) -> None:
    """The number her texts' outbox jobs carry (notify.sms_job's phone_enc: a keyword's reply, a text to a payer
    who is none of the members) goes with the row's: a DONE job is kept RETENTION_OUTBOX_DONE_DAYS, a parked one
    until replayed, a discarded one (which may have stored no row: found by her id) as long as a DONE one. Found by
    their unique dedupe key ("sms:" and the text's key); the rows are FAILED or sent by now,
    so a job run again finds its text finished and sends nothing. A job of hers that has stored no row yet (not
    run: the worker behind, the send rate reached) is found by her id: without the number it is built for hers,
    released, and nothing is stored or sent (PhoneReleased)."""
    waiting = select(OutboxJob).where(OutboxJob.kind == SMS_KIND,
                                      OutboxJob.status.in_((*LIVE, DISCARDED)),
                                      OutboxJob.payload["member_id"].as_string() == member_id)
    found = [*(await session.execute(waiting)).scalars().all()]
    for start in range(0, len(keys), _JOBS_AT_ONCE):
        found += (await session.execute(select(OutboxJob).where(
            OutboxJob.dedupe_key.in_([f"sms:{key}" for key in keys[start:start + _JOBS_AT_ONCE]])))).scalars().all()
    for job in found:
        if (job.payload or {}).get("phone_enc") is not None:
            job.payload = {**job.payload, "phone_enc": None}
    await session.flush()


async def _erase_give_backs_index(session: AsyncSession, hers: _Hers) -> None:
    """The number's blind index that the inbound route's give-back jobs carry (channels.sms.routes.give_back_job: a
    STOP or START she texted that queued no reply; of no cooperative, as her texts' SMS rows): cleared as her SMS
    rows' is, from the texts sent since she got the number. A DONE one is kept RETENTION_OUTBOX_DONE_DAYS; one not
    run yet gives nothing back (the count stays, as for the worker's give-back once her number is off its reply)."""
    if hers.index is None:
        return
    jobs = (await session.execute(select(OutboxJob).where(
        OutboxJob.kind == SMS_GIVE_BACK_KIND, OutboxJob.payload["index"].as_string() == hers.index,
        OutboxJob.created_at >= hers.since))).scalars().all()
    for job in jobs:
        job.payload = {**job.payload, "index": ""}
    await session.flush()


async def _erase_ussd_sessions(session: AsyncSession, hers: _Hers) -> int:
    """Her USSD session rows (kept RETENTION_USSD_SESSIONS_DAYS for the operations view): the number's blind index
    and mask go; the screens, hops, codes and the payment made stay."""
    done = await session.execute(
        update(UssdSession)
        .where(hers.rows(UssdSession.member_id, UssdSession.cooperative_id, UssdSession.phone_index,
                         UssdSession.started_at, no_cooperative=True))
        .values(phone_index="", phone_masked=ERASED_MASK)
        .execution_options(synchronize_session=False))
    return int(done.rowcount)  # type: ignore[attr-defined]


async def _erase_logins(session: AsyncSession, member_id: str, *, actor: Actor) -> list[str]:
    """Her tenant logins: turned off (their API keys revoked) and their usernames, often her e-mail, replaced."""
    logins = (await session.execute(select(AdminUser).where(AdminUser.member_id == member_id)
                                    .order_by(AdminUser.id))).scalars().all()
    for login in logins:
        await users.deactivate(session, login, actor=actor)
        await users.anonymise(session, login, actor=actor)
    return [login.id for login in logins]


async def set_language(session: AsyncSession, member_id: str, language: str, *, actor: Actor) -> None:
    member = await get_member(session, member_id)
    await update_member(session, member, actor=actor, language=language)
