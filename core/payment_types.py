"""Payment types: what a cooperative's members can pay (rent, water, a levy), and their services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.db import serialise_on_sqlite, utcnow
from core.errors import Conflict, NotFound, ValidationError
from core.models import Cooperative, PaymentType
from core.money import Money

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
    is_recurring: bool = False
    recurring_interval: str | None = None
    due_day: int | None = None
    is_active: bool = True


def _check(
    name: str | None,
    amount: Money | None,
    is_recurring: bool,
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
    if is_recurring and interval is None:
        errors.append("recurringInterval is required when isRecurring is true")
    if due_day is not None and not (1 <= due_day <= 31):  # 29-31: the last day of a shorter month
        errors.append("dueDay must be between 1 and 31")
    return errors


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


async def _name_taken(session: AsyncSession, cooperative_id: str, name: str, exclude_id: str | None) -> bool:
    stmt = select(PaymentType.id).where(
        PaymentType.cooperative_id == cooperative_id, func.lower(PaymentType.name) == name.strip().lower()
    )
    if exclude_id:
        stmt = stmt.where(PaymentType.id != exclude_id)
    return (await session.execute(stmt.limit(1))).first() is not None


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
    session: AsyncSession, *, cooperative_id: str, fields: PaymentTypeFields, actor: Actor
) -> PaymentType:
    """Add a payment type; the amount must be in the cooperative's currency. Caller commits."""
    coop = await _cooperative(session, cooperative_id)
    errors = _check(
        fields.name,
        fields.amount,
        fields.is_recurring,
        fields.recurring_interval,
        fields.due_day,
        fields.allow_custom_amount,
    )
    if fields.amount.currency != coop.currency:
        errors.append(f"currency must be the cooperative's currency ({coop.currency})")
    if errors:
        raise ValidationError(errors[0], errors=errors)
    if await _name_taken(session, cooperative_id, fields.name, None):
        raise Conflict(f"a payment type named {fields.name.strip()!r} already exists")
    pt = PaymentType(
        cooperative_id=cooperative_id,
        name=fields.name.strip(),
        description=fields.description,
        amount_minor=fields.amount.minor,
        currency=fields.amount.currency,
        allow_custom_amount=fields.allow_custom_amount,
        is_recurring=fields.is_recurring,
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


async def update_payment_type(
    session: AsyncSession, *, cooperative_id: str, payment_type_id: str, changes: dict[str, Any], actor: Actor
) -> PaymentType:
    """Apply a partial update (keys from _UPDATABLE; 'amount' is Money). Caller commits."""
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
    is_recurring = changes.get("is_recurring", pt.is_recurring)
    interval = changes.get("recurring_interval", pt.recurring_interval)
    allow_custom = changes.get("allow_custom_amount", pt.allow_custom_amount)
    # The type as it will be, not the patch alone: {"allowCustomAmount": false} on a free type is unpayable.
    errors = _check(
        changes.get("name"),
        amount,
        is_recurring,
        interval,
        changes.get("due_day"),
        allow_custom,
    )
    if amount is None and pt.amount_minor == 0 and not allow_custom:
        errors.append("amount is 0, so allowCustomAmount must stay true unless a positive amount is set")
    if amount is not None and amount.currency != pt.currency:
        errors.append(f"currency must be {pt.currency}")
    if errors:
        raise ValidationError(errors[0], errors=errors)
    if "name" in changes:
        await _cooperative(session, cooperative_id)  # the lock: see _cooperative
        if await _name_taken(session, cooperative_id, changes["name"], pt.id):
            raise Conflict(f"a payment type named {changes['name'].strip()!r} already exists")
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
