"""Payment types: what a cooperative's members can pay (rent, water, a levy), and their services.

A type is checked as it will be saved, so none is saved that members cannot pay or that is never reminded of:
its amount must be one a payment method of the cooperative's country can collect (M-Pesa takes whole
shillings), and a recurring type has both its interval and its due day (the day reminders count to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.auth import folded
from core.db import serialise_on_sqlite, utcnow
from core.errors import NAME_TAKEN, Conflict, NotFound, ValidationError
from core.models import Cooperative, PaymentType
from core.money import Money
from core.payments import METHOD_OPERATOR, METHODS, wallets_by_operator
from core.ports import refusal_for

if TYPE_CHECKING:
    from core.runtime import Runtime

RECURRING_INTERVALS = ("MONTHLY", "QUARTERLY", "YEARLY")
_UPDATABLE = (
    "name",
    "description",
    "amount",
    "allow_custom_amount",
    "is_recurring",
    "recurring_interval",
    "due_day",
    "is_active",
)
_RECURRENCE = ("is_recurring", "recurring_interval", "due_day")
# The banks (IremboPay): every method that is no mobile operator's wallet.
_BANKS = tuple(m for m in METHODS if m not in METHOD_OPERATOR)
async def active_payment_types(session: AsyncSession, cooperative_id: str) -> list[PaymentType]:
    """What the USSD menu offers: active types of one cooperative, ordered by name."""
    rows = await session.execute(
        select(PaymentType)
        .where(PaymentType.cooperative_id == cooperative_id, PaymentType.is_active.is_(True))
        .order_by(PaymentType.name, PaymentType.id)
    )
    return list(rows.scalars())


async def get_payment_type(
    session: AsyncSession, cooperative_id: str, payment_type_id: str, *, for_update: bool = False
) -> PaymentType | None:
    """One payment type, only if it belongs to the cooperative (active or not). `for_update`: locked until the
    caller commits and read fresh (not the copy the session already holds), for a change checked against the
    whole row (see update_payment_type)."""
    query = select(PaymentType).where(
        PaymentType.id == payment_type_id, PaymentType.cooperative_id == cooperative_id
    )
    if for_update:
        await serialise_on_sqlite(session, PaymentType, payment_type_id)
        # FOR NO KEY UPDATE, as the UPDATE takes anyway: payments pointing at the type are not held up.
        query = query.with_for_update(key_share=True).execution_options(populate_existing=True)
    return (await session.execute(query)).scalar_one_or_none()


async def list_payment_types(
    session: AsyncSession,
    cooperative_id: str,
    *,
    include_inactive: bool = False,
    page: int = 1,
    limit: int = 10,
) -> tuple[list[PaymentType], int]:
    """A page of payment types ordered by name, and the total count for the filter."""
    where = [PaymentType.cooperative_id == cooperative_id]
    if not include_inactive:
        where.append(PaymentType.is_active.is_(True))
    total = (await session.execute(select(func.count()).select_from(PaymentType).where(*where))).scalar_one()
    rows = await session.execute(
        select(PaymentType)
        .where(*where)
        .order_by(PaymentType.name, PaymentType.id)
        .offset((page - 1) * limit)
        .limit(limit)
    )
    return list(rows.scalars()), int(total)


@dataclass(frozen=True)
class PaymentTypeFields:
    """Validated values for a new payment type; amount in the cooperative's currency."""

    name: str
    amount: Money
    description: str | None = None
    allow_custom_amount: bool = False
    # None: recurring when a recurringInterval or dueDay is given (one given alone meant it recurs, and it was
    # saved as a one-off type nobody was ever reminded of).
    is_recurring: bool | None = None
    recurring_interval: str | None = None
    due_day: int | None = None
    is_active: bool = True


def _check(
    name: str | None,
    amount: Money | None,
    interval: str | None,
    due_day: int | None,
    allow_custom: bool,
) -> list[str]:
    errors: list[str] = []
    if name is not None and not (1 <= len(name.strip()) <= 120):
        errors.append("name must be 1 to 120 characters")
    if amount is not None and (amount.minor < 0 or (amount.minor == 0 and not allow_custom)):
        errors.append("amount must be a positive number")
    if interval is not None and interval not in RECURRING_INTERVALS:
        errors.append(f"recurringInterval must be one of {', '.join(RECURRING_INTERVALS)}")
    if due_day is not None and not (1 <= due_day <= 31):  # 29-31: the last day of a shorter month
        errors.append("dueDay must be between 1 and 31")
    return errors


def _check_recurrence(is_recurring: bool, interval: str | None, due_day: int | None) -> list[str]:
    """A recurring type needs its interval and its due day: reminders count to that day, and a type without
    one is never reminded of (core.reminders.due_dates). A one-off type has neither: USSD would show members
    "(due day 5)" for a type nobody reminds them of."""
    if not is_recurring:
        if interval is not None or due_day is not None:
            return ["isRecurring is false, so recurringInterval and dueDay must be null (or left out)"]
        return []
    errors = []
    if interval is None:
        errors.append("recurringInterval is required when isRecurring is true")
    if due_day is None:
        errors.append("dueDay is required when isRecurring is true: reminders go out before it")
    return errors


def uncollectable(rt: Runtime, country: str, amount: Money) -> str | None:
    """Why no payment method of `country` can collect `amount` by its provider's amount rule (M-Pesa: whole
    shillings); None when one can. A type of that amount would be offered to members who are then told that no
    method can take it. Methods whose provider does not collect the currency at all (this deployment's accounts)
    do not make it refused: that is the deployment's to fix, not the type's, and a payment asked for says so."""
    if not amount.is_positive():
        return None  # a free type (allowCustomAmount): the payer names the amount
    rules: list[str] = []
    for method in (*wallets_by_operator(country).values(), *_BANKS):
        refusal = refusal_for(rt.routes, rt.providers, method, amount)
        if refusal is None:
            return None
        if refusal[0] == "amount" and refusal[1] not in rules:
            rules.append(refusal[1])
    if not rules:
        return None
    return f"no payment method can collect {amount.format()}: {'; '.join(rules)}"


async def _cooperative(session: AsyncSession, cooperative_id: str) -> Cooperative:
    """The cooperative, its row locked until the caller commits: names are unique per cooperative by
    check-then-write, so two creates (or renames) of one name take turns and the second sees the first.
    FOR NO KEY UPDATE: it does not block inserts of rows that point at the cooperative (payments)."""
    await serialise_on_sqlite(session, Cooperative, cooperative_id)
    coop = (await session.execute(
        select(Cooperative).where(Cooperative.id == cooperative_id).with_for_update(key_share=True)
    )).scalar_one_or_none()
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def _refuse_taken_name(session: AsyncSession, cooperative_id: str, name: str, exclude_id: str | None) -> None:
    """409 NAME_TAKEN when another type of the cooperative has the name, whatever its case. The refusal names that
    type as it is written, with its id and how to change it: "a payment type named 'Monthly rent' already exists"
    quoted the request, so an admin adding 'Monthly rent' beside the seeded 'Monthly Rent' was told of a type
    she could not find by that name, nor where it was."""
    # Folded by the database on both sides (SQLite's lower() folds A-Z only: 'Électricité' lowered by Python was
    # not the stored one lowered by SQLite, and the same name was taken twice), and the request's by Python too, for
    # a PostgreSQL database whose LC_CTYPE is plain C (core.auth.username_is does the same).
    typed = name.strip()
    stmt = select(PaymentType.id, PaymentType.name, PaymentType.is_active).where(
        PaymentType.cooperative_id == cooperative_id,
        or_(folded(PaymentType.name) == folded(typed), folded(PaymentType.name) == typed.lower()),
    )
    if exclude_id:
        stmt = stmt.where(PaymentType.id != exclude_id)
    taken = (await session.execute(stmt.limit(1))).first()
    if taken is not None:
        state = "" if taken.is_active else ", inactive"
        raise Conflict(f"a payment type named {taken.name!r} already exists ({taken.id}{state}): change it with "
                       f"PATCH /v1/payment-types/{taken.id}, or give this one another name", field="name",
                       code=NAME_TAKEN)


def _refusal(errors: list[str]) -> ValidationError:
    """The refusal of a type's fields, naming in `field` the one every message is about (README "API errors"): each
    message starts with its field's name, but that no method collects the amount, which is the amount's. The
    cooperative's currency refused alone said so without `field`."""
    about = {_about(text) for text in errors}
    return ValidationError(errors[0], errors=errors, field=about.pop() if len(about) == 1 else None)


# The refusals about two fields together (a message's first word is one of them, whichever the request sent):
# `field` is absent, as for any refusal about several (README "API errors").
_SEVERAL = ("isRecurring is false, so ", "amount is 0, so ")


def _about(text: str) -> str | None:
    if text.startswith("no payment method"):
        return "amount"
    return None if text.startswith(_SEVERAL) else text.split(" ", 1)[0]


def snapshot(pt: PaymentType) -> dict[str, Any]:
    return {
        "name": pt.name,
        "amount_minor": pt.amount_minor,
        "currency": pt.currency,
        "is_active": pt.is_active,
        "is_recurring": pt.is_recurring,
        "recurring_interval": pt.recurring_interval,
        "due_day": pt.due_day,
        "allow_custom_amount": pt.allow_custom_amount,
        "description": pt.description,
    }


async def create_payment_type(
    session: AsyncSession,
    *,
    cooperative_id: str,
    fields: PaymentTypeFields,
    actor: Actor,
    rt: Runtime | None = None,
) -> PaymentType:
    """Add a payment type; the amount must be in the cooperative's currency and, with `rt` (its providers and
    routes), one a payment method of the cooperative's country can collect. Caller commits."""
    coop = await _cooperative(session, cooperative_id)
    is_recurring = fields.is_recurring
    if is_recurring is None:
        is_recurring = fields.recurring_interval is not None or fields.due_day is not None
    errors = _check(
        fields.name,
        fields.amount,
        fields.recurring_interval,
        fields.due_day,
        fields.allow_custom_amount,
    )
    errors += _check_recurrence(is_recurring, fields.recurring_interval, fields.due_day)
    if fields.amount.currency != coop.currency:
        errors.append(f"currency must be the cooperative's currency ({coop.currency})")
    elif rt is not None and (why := uncollectable(rt, coop.country, fields.amount)):
        errors.append(why)
    if errors:
        raise _refusal(errors)
    await _refuse_taken_name(session, cooperative_id, fields.name, None)
    pt = PaymentType(
        cooperative_id=cooperative_id,
        name=fields.name.strip(),
        description=fields.description,
        amount_minor=fields.amount.minor,
        currency=fields.amount.currency,
        allow_custom_amount=fields.allow_custom_amount,
        is_recurring=is_recurring,
        recurring_interval=fields.recurring_interval,
        due_day=fields.due_day,
        is_active=fields.is_active,
    )
    session.add(pt)
    await session.flush()
    await record(
        session,
        actor=actor,
        action="payment_type.created",
        entity_type="payment_type",
        entity_id=pt.id,
        after=snapshot(pt),
        cooperative_id=cooperative_id,
    )
    return pt


def _recurrence_patch(pt: PaymentType, changes: dict[str, Any]) -> dict[str, Any]:
    """The patch with what its recurrence fields imply: a recurringInterval or dueDay set on a one-off type makes
    it recurring (as on create); isRecurring false also clears the interval and due day it does not name."""
    changes = dict(changes)
    if "is_recurring" not in changes:
        if not pt.is_recurring and any(changes.get(key) is not None for key in ("recurring_interval", "due_day")):
            changes["is_recurring"] = True
    elif changes["is_recurring"] is False:
        changes.setdefault("recurring_interval", None)
        changes.setdefault("due_day", None)
    return changes


async def update_payment_type(
    session: AsyncSession,
    *,
    cooperative_id: str,
    payment_type_id: str,
    changes: dict[str, Any],
    actor: Actor,
    rt: Runtime | None = None,
) -> PaymentType:
    """Apply a partial update (keys from _UPDATABLE; 'amount' is Money). With `rt`, a new amount must be one a
    payment method of the cooperative's country can collect, as on create. Caller commits."""
    unknown = set(changes) - set(_UPDATABLE)
    if unknown:
        raise ValidationError(f"cannot change {', '.join(sorted(unknown))}")
    # Locked and read fresh: the rules below join the patch to the row as committed, so two edits at once, each
    # fine alone ({"amount": 0} and {"allowCustomAmount": false}), cannot together save a type nobody can pay.
    pt = await get_payment_type(session, cooperative_id, payment_type_id, for_update=True)
    if pt is None:
        raise NotFound("payment type not found")
    before = snapshot(pt)
    amount: Money | None = changes.get("amount")
    allow_custom = changes.get("allow_custom_amount", pt.allow_custom_amount)
    # The type as it will be, not the patch alone: {"allowCustomAmount": false} on a free type is unpayable.
    errors = _check(
        changes.get("name"),
        amount,
        changes.get("recurring_interval"),
        changes.get("due_day"),
        allow_custom,
    )
    # Checked when the patch touches them, so a type saved before these rules can still be renamed or retired.
    if any(key in changes for key in _RECURRENCE):
        changes = _recurrence_patch(pt, changes)
        errors += _check_recurrence(
            changes.get("is_recurring", pt.is_recurring),
            changes.get("recurring_interval", pt.recurring_interval),
            changes.get("due_day", pt.due_day),
        )
    if amount is None and pt.amount_minor == 0 and not allow_custom:
        errors.append("amount is 0, so allowCustomAmount must stay true unless a positive amount is set")
    if amount is not None and amount.currency != pt.currency:
        errors.append(f"currency must be {pt.currency}")
    elif amount is not None and rt is not None:
        country = (await session.execute(
            select(Cooperative.country).where(Cooperative.id == cooperative_id)
        )).scalar_one()
        if why := uncollectable(rt, country, amount):
            errors.append(why)
    if errors:
        raise _refusal(errors)
    if "name" in changes:
        await _cooperative(session, cooperative_id)  # the lock: see _cooperative
        await _refuse_taken_name(session, cooperative_id, changes["name"], pt.id)
    for key, value in changes.items():
        if key == "amount":
            pt.amount_minor = value.minor
        elif key == "name":
            pt.name = value.strip()
        else:
            setattr(pt, key, value)
    pt.updated_at = utcnow()
    await session.flush()
    await record(
        session,
        actor=actor,
        action="payment_type.updated",
        entity_type="payment_type",
        entity_id=pt.id,
        before=before,
        after=snapshot(pt),
        cooperative_id=cooperative_id,
    )
    return pt


async def deactivate_payment_type(
    session: AsyncSession, *, cooperative_id: str, payment_type_id: str, actor: Actor
) -> PaymentType:
    """Hide a type from the menu; past payments keep pointing at it, so it is never deleted."""
    return await update_payment_type(
        session,
        cooperative_id=cooperative_id,
        payment_type_id=payment_type_id,
        changes={"is_active": False},
        actor=actor,
    )
