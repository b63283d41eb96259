"""The append-only audit log: who did what to which entity, when, through which channel."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import iso_z, row_insert, utcnow
from core.models import AdminUser, ApiKey, AuditEvent


@dataclass(frozen=True, slots=True)
class Actor:
    """Who caused a change, by kind and id; the channel says through what.

    'admin:<user id>': a staff login (super or cooperative admin) through the API. 'member:<member id>': the
    member herself, on USSD or through the API signed in with her own (tenant) login. 'phone:<masked number>':
    a number not yet known as a member (USSD, SMS). 'apikey:<key id>', 'provider:<name>', 'system'."""

    id: str
    channel: str  # api | ussd | sms | provider | worker | system

    @classmethod
    def system(cls, channel: str = "system") -> Actor:
        return cls("system", channel)


SYSTEM = Actor.system()

# An instant as Python's isoformat wrote it (rows of state moves and some admin acts before this release:
# `2026-12-03T14:41:39.447999+00:00`), read again to write it as the API does (iso_z). Only under a key naming an
# instant (_instant_key): the same shape under any other key (a note, a description) is what someone wrote.
_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)")

_COLUMN = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")


def phone_changes(member: Any) -> tuple[Any, ...]:
    """SQL conditions on AuditEvent: the rows recording a correction of the member's number (`member`: her id, or a
    column naming it): member.updated rows whose after names a phone (core.members.number_came_since,
    core.payments.approvable_by)."""
    return (AuditEvent.entity_type == "member", AuditEvent.entity_id == member, AuditEvent.action == "member.updated",
            AuditEvent.after["phone"].as_string().is_not(None))


@functools.lru_cache(maxsize=4096)  # the columns' names, a few hundred: every audit row's keys (2% of a callback)
def _key(name: str) -> str:
    """A column's name as the API names its field: camelCase, an amount without `_minor` (audit amounts are all
    integer minor units: `amount_minor` is `amount`, `refunded_minor` `refunded`, as hand-written rows say)."""
    if not _COLUMN.fullmatch(name):
        return name
    head, *rest = name.removesuffix("_minor").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _instant_key(key: Any) -> bool:
    """Whether an audit key (camelCase, as _key makes it) names an instant: `at`, `completedAt`, `runAt`,
    `previousSecretValidUntil`, `failingSince`. Every instant the code has written as text went under such a key (a
    state move's `*_at` column, a webhook attempt's `at`, a rotated secret's end); free text (a note, a name, a
    description, a reason, an error) never does."""
    return isinstance(key, str) and (key == "at" or key.endswith(("At", "Until", "Since")))


def formatted(value: Any, key: Any = None) -> Any:
    """An audit row's before or after in the log's one format: keys camelCase (the API's), instants as the API
    writes them (iso_z: UTC to the second, `Z`), amounts integer minor units with no `_minor` suffix. Applied to
    every row written (record, core.state's moves) and, by the reader, to rows written before it was (their
    stored JSON is never rewritten: the log is append-only); idempotent. An instant is a datetime, or text shaped
    like one under a key naming one (`key`, _instant_key: an older row's isoformat time); any other text is kept
    exactly as written, whatever it looks like (a note "2026-01-01T10:00:00+02:00" is not a time to convert)."""
    if isinstance(value, dict):
        return {(name := _key(k) if isinstance(k, str) else k): formatted(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [formatted(v, key) for v in value]
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, str) and _instant_key(key) and _INSTANT.fullmatch(value):
        try:
            return iso_z(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except (ValueError, OverflowError):  # no date, or one UTC cannot hold (9999-12-31T23:59:59-01:00): as given
            return value
    return value


async def record(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    entity_type: str,
    entity_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    cooperative_id: str | None = None,
) -> None:
    await session.execute(
        row_insert(session.get_bind().dialect.name, AuditEvent),
        {
            "cooperative_id": cooperative_id,
            "actor": actor.id,
            "channel": actor.channel,
            "action": action,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "before": formatted(before),
            "after": formatted(after),
            "at": utcnow(),
        },
    )


# What a caller who is not staff (a tenant, an API key) reads as the writer of a staff member's act or note
# (core.disputes.present_note, done_by).
STAFF_LABEL = "gateway staff"


async def done_by(session: AsyncSession, entity_type: str, entity_id: str, actions: tuple[str, ...], *,
                  viewer: Actor) -> tuple[str, datetime] | None:
    """Who did the latest of `actions` to the entity, as `viewer` (the caller being refused: another admin got there
    first) may read it, and when; None without such a row. A staff login (admin:) reads a staff login of her
    cooperative by its username and an API key by its name; a super admin every one. A super admin's login is "a
    super admin" to a cooperative's admin (her GET /v1/users lists none), and any other account she may not see "an
    administrator". A caller who is not staff (an API key, an integrator's; a tenant) reads a staff login's or a
    key's act as STAFF_LABEL, as a dispute's notes name them to it (core.disputes.present_note). Anyone else (a
    member, the system, a provider) as the audit log names them."""
    row = (await session.execute(
        select(AuditEvent.actor, AuditEvent.at).where(
            AuditEvent.entity_type == entity_type, AuditEvent.entity_id == entity_id,
            AuditEvent.action.in_(actions)).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1))).first()
    if row is None:
        return None
    kind, _, ident = row.actor.partition(":")
    if kind not in ("admin", "apikey"):
        return row.actor, row.at
    seer_kind, _, seer_id = viewer.id.partition(":")
    seer = None if seer_kind != "admin" else (await session.execute(
        select(AdminUser.role, AdminUser.cooperative_id).where(AdminUser.id == seer_id))).first()
    if seer is None:
        return STAFF_LABEL, row.at
    sees_all = seer.role == "SUPER_ADMIN"
    if kind == "admin":
        user = (await session.execute(select(AdminUser.username, AdminUser.role, AdminUser.cooperative_id)
                                      .where(AdminUser.id == ident))).first()
        if user is None:
            return row.actor, row.at
        if sees_all or (user.cooperative_id is not None and user.cooperative_id == seer.cooperative_id):
            return user.username, row.at
        return ("a super admin" if user.role == "SUPER_ADMIN" else "an administrator"), row.at
    key = (await session.execute(select(ApiKey.name, ApiKey.cooperative_id).where(ApiKey.id == ident))).first()
    if key is None:
        return row.actor, row.at
    return (f"API key {key.name}" if sees_all or key.cooperative_id == seer.cooperative_id
            else "an API key"), row.at
