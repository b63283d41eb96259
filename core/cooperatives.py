"""Cooperatives: the tenants of the gateway; created and suspended by a super admin, never deleted."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import ColumnElement, false, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor, record
from core.config import USSD_AGGREGATORS
from core.db import serialise_on_sqlite, utcnow
from core.errors import NAME_TAKEN, Conflict, NotFound, ValidationError
from core.members import LANGUAGES
from core.models import Cooperative
from core.money import EXPONENTS
from core.phone import normalize

STATUSES = ("ACTIVE", "SUSPENDED")
COUNTRY_CURRENCY = {
    "RW": "RWF",
    "KE": "KES",
    "UG": "UGX",
    "TZ": "TZS",
    "GH": "GHS",
    "ZM": "ZMW",
    "BI": "BIF",
    "MW": "MWK",
    "NG": "NGN",
    "ZA": "ZAR",
}
# The time zone a cooperative of each country gets when none is given (reports, periods, reminders and SMS dates
# are in it).
COUNTRY_TIMEZONE = {
    "RW": "Africa/Kigali",
    "KE": "Africa/Nairobi",
    "UG": "Africa/Kampala",
    "TZ": "Africa/Dar_es_Salaam",
    "GH": "Africa/Accra",
    "ZM": "Africa/Lusaka",
    "BI": "Africa/Bujumbura",
    "MW": "Africa/Blantyre",
    "NG": "Africa/Lagos",
    "ZA": "Africa/Johannesburg",
}
# The language a cooperative of each country gets when none is given (its members added without one, its payers
# who are no members, its menu for a caller it does not know): Swahili in Tanzania, where it is the language of
# daily business; elsewhere English, which its admin changes (`language`) as the members use.
COUNTRY_LANGUAGE = {"TZ": "sw"}
_SHORT_CODE = re.compile(r"^[A-Za-z0-9_-]{2,32}$")
_EXTENSION = re.compile(r"^[0-9]{1,8}$")
_FIELDS = (
    "name",
    "short_code",
    "country",
    "currency",
    "timezone",
    "ussd_extension",
    "ussd_aggregator",
    "status",
    "contact_phone",
    "self_registration",
    "language",
)


def zone_of(name: str | None) -> ZoneInfo:
    """A cooperative's time zone (UTC when unset or unknown: a row written before validation)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _mornings(zone: ZoneInfo) -> bool:
    """Whether the reminders' daily scan (core.reminders.SCAN_HOUR_UTC) is a morning hour there, in winter and in
    summer: west of UTC-1 it is the night before (past the 20:00 send cut-off: no reminder would ever go out),
    east of UTC+6 the afternoon."""
    from datetime import UTC, datetime

    from core.reminders import SCAN_HOUR_UTC

    return all(5 <= datetime(2026, month, 1, SCAN_HOUR_UTC, tzinfo=UTC).astimezone(zone).hour < 12
               for month in (1, 7))


def _validate(values: dict[str, Any]) -> list[str]:
    """Every problem with `values`; a valid contact_phone in them is rewritten to E.164."""
    errors: list[str] = []
    if "name" in values and not (2 <= len((values["name"] or "").strip()) <= 200):
        errors.append("name must be 2 to 200 characters")
    if "short_code" in values and not _SHORT_CODE.match(values["short_code"] or ""):
        errors.append("shortCode must be 2 to 32 letters, digits, '-' or '_'")
    if "country" in values and values["country"] not in COUNTRY_CURRENCY:
        errors.append(f"country must be one of {', '.join(sorted(COUNTRY_CURRENCY))}")
    if "currency" in values and values["currency"] not in EXPONENTS:
        errors.append("currency is not supported")
    elif values.get("currency") and values.get("country") in COUNTRY_CURRENCY \
            and values["currency"] != COUNTRY_CURRENCY[values["country"]]:
        # Every method of a country collects its currency only (payments check the method against both), and a
        # currency never changes: a Kampala cooperative made in RWF could never be paid.
        local = COUNTRY_CURRENCY[values["country"]]
        errors.append(f"currency must be {local} for a cooperative in {values['country']} (its mobile money "
                      f"collects {local} only)")
    if "timezone" in values:
        try:
            zone = ZoneInfo(values["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            errors.append("timezone must be an IANA time zone name")
        else:
            if not _mornings(zone):
                errors.append("timezone must be one where the daily reminder scan (06:00 UTC) falls between 05:00 "
                              "and 12:00 local time (UTC-1 to UTC+6, e.g. Africa/Accra, Africa/Nairobi)")
    if values.get("ussd_extension") is not None and not _EXTENSION.match(values["ussd_extension"]):
        errors.append("ussdExtension must be 1 to 8 digits")
    if values.get("ussd_aggregator") is not None and values["ussd_aggregator"] not in USSD_AGGREGATORS:
        errors.append(f"ussdAggregator must be one of {', '.join(USSD_AGGREGATORS)}")
    if "language" in values and values["language"] not in LANGUAGES:
        errors.append(f"language must be one of {', '.join(LANGUAGES)}")
    if "status" in values and values["status"] not in STATUSES:
        errors.append(f"status must be one of {', '.join(STATUSES)}")
    if values.get("contact_phone") is not None:
        try:
            values["contact_phone"] = normalize(values["contact_phone"], values.get("country") or "RW").e164
        except ValidationError:
            errors.append("contactPhone must be a valid mobile number")
    return errors


def code_is(code: str) -> ColumnElement[bool]:
    """Where a cooperative's short code is `code`, whatever the case of either: members type it as they like,
    and no two cooperatives have codes that differ only in case (the unique index on upper(short_code),
    migration 0017)."""
    return func.upper(Cooperative.short_code) == func.upper(code.strip())


async def _unique(session: AsyncSession, values: dict[str, Any], exclude: str | None) -> None:
    for column, label in (("short_code", "shortCode"), ("ussd_extension", "ussdExtension")):
        if values.get(column) is None:
            continue
        where = code_is(values[column]) if column == "short_code" else Cooperative.ussd_extension == values[column]
        stmt = select(Cooperative.id, getattr(Cooperative, column), Cooperative.status).where(where)
        if exclude:
            stmt = stmt.where(Cooperative.id != exclude)
        holder = (await session.execute(stmt.limit(1))).first()
        if holder is not None:
            raise Conflict(_taken(label, values[column], *holder), field=label, code=NAME_TAKEN)


def _taken(label: str, value: str, holder_id: str, held: str, status: str) -> str:
    """Why `value` cannot be had: which cooperative holds it when that is not plain (another case of it, or a
    suspended cooperative, which keeps its codes: DELETE only suspends) and how to free it."""
    message = f"{label} {value!r} is already used"
    if held != value:
        message += f" (as {held!r}: codes are the same whatever their case)"
    if status != "ACTIVE":
        other = f"another {label}" + (" or null" if label == "ussdExtension" else "")
        message += (f" by a suspended cooperative, which keeps its codes: PATCH /v1/cooperatives/{holder_id} with "
                    f"{other} frees it")
    return message


async def _take_turns_on_sqlite(session: AsyncSession) -> None:
    """SQLite: the database's write lock, taken before `_unique` reads (an UPDATE that matches no row still takes
    it, and begins the transaction the savepoint of `_write` nests in), so two writes at once take turns and
    the second's check sees the first. PostgreSQL needs no turn: its unique indexes decide (see `_write`)."""
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(update(Cooperative).where(false()).values(id=Cooperative.id))


async def _write(session: AsyncSession, values: dict[str, Any], exclude: str | None,
                 change: Callable[[], None]) -> None:
    """Make `change` to the session and flush it in a savepoint. Two requests given one shortCode or
    ussdExtension at once both pass `_unique` before either writes; the unique index refuses the second, which
    gets the same 409 as the check (read again, it now sees the first), and the caller's transaction stays
    usable. Any other integrity error is raised as it is."""
    try:
        async with session.begin_nested():
            change()
            await session.flush()
    except IntegrityError:
        await _unique(session, values, exclude)
        raise


def snapshot(coop: Cooperative) -> dict[str, Any]:
    return {k: getattr(coop, k) for k in _FIELDS if k != "contact_phone"}


async def create_cooperative(session: AsyncSession, *, values: dict[str, Any], actor: Actor) -> Cooperative:
    """Add a cooperative; the currency and the time zone default to the country's. Caller commits."""
    values = dict(values)
    values.setdefault("currency", COUNTRY_CURRENCY.get(values.get("country", ""), ""))
    values.setdefault("timezone", COUNTRY_TIMEZONE.get(values.get("country", ""), "Africa/Kigali"))
    values.setdefault("language", COUNTRY_LANGUAGE.get(values.get("country", ""), "en"))
    values.setdefault("status", "ACTIVE")
    missing = [f for f in ("name", "short_code", "country") if not values.get(f)]
    errors = [f"{m} is required" for m in missing] + _validate(values)
    if errors:
        raise ValidationError(errors[0], errors=errors)
    await _take_turns_on_sqlite(session)
    await _unique(session, values, None)
    coop = Cooperative(**{k: v for k, v in values.items() if k in _FIELDS})
    await _write(session, values, None, lambda: session.add(coop))
    await record(
        session,
        actor=actor,
        action="cooperative.created",
        entity_type="cooperative",
        entity_id=coop.id,
        after=snapshot(coop),
        cooperative_id=coop.id,
    )
    return coop


async def get_cooperative(session: AsyncSession, cooperative_id: str) -> Cooperative:
    coop = await session.get(Cooperative, cooperative_id)
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def hold(session: AsyncSession, cooperative_id: str) -> Cooperative:
    """The cooperative read fresh, its row locked until the caller commits (FOR NO KEY UPDATE, as its UPDATE takes
    anyway: inserts pointing at it are not held; on SQLite the database's write lock), before a change reads it.
    Two changes at once take turns, the second seeing the first: unheld, a suspension that read it SUSPENDED while
    a reactivation was written set nothing, ended no session and answered SUSPENDED, the cooperative left ACTIVE;
    an audit row's `before` was what another change had just replaced. Taken first, as payment types' and webhook
    endpoints' writes take it (then their own rows), and a suspension then its accounts (record_sessions_ended)."""
    await serialise_on_sqlite(session, Cooperative, cooperative_id)
    query = select(Cooperative).where(Cooperative.id == cooperative_id).with_for_update(key_share=True)
    coop = (await session.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def update_cooperative(
    session: AsyncSession, coop: Cooperative, *, changes: dict[str, Any], actor: Actor
) -> Cooperative:
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise ValidationError(f"cannot change {', '.join(sorted(unknown))}")
    if "currency" in changes and changes["currency"] != coop.currency:
        raise ValidationError("currency cannot change once a cooperative exists", field="currency")
    checked = {"country": coop.country, **changes} if "contact_phone" in changes else dict(changes)
    errors = _validate(checked)  # normalises in place: the phone is stored as _validate made it (E.164)
    if errors:
        raise ValidationError(errors[0], errors=errors)
    changes = {key: checked[key] for key in changes}
    await _take_turns_on_sqlite(session)
    await _unique(session, changes, coop.id)
    before = snapshot(coop)

    def change() -> None:
        for key, value in changes.items():
            setattr(coop, key, value)
        coop.updated_at = utcnow()

    await _write(session, changes, coop.id, change)
    await record(
        session,
        actor=actor,
        action="cooperative.updated",
        entity_type="cooperative",
        entity_id=coop.id,
        before=before,
        after=snapshot(coop),
        cooperative_id=coop.id,
    )
    return coop
