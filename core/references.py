"""Human references (PAY_20251016_001): short enough to type in an SMS, unique. The day is the day it was made, in
its cooperative's time zone (the day its receipt and the USSD "My payments" show: in UTC, every payment made
between midnight and 02:00 in Kigali carried the day before); a payment recorded from a provider's statement was
made when the statement shows its money taken, and is dated that day (next_reference's `at`). The number comes
from one PostgreSQL sequence across days and kinds (no hot counter row), so it grows past three digits (a
federation's year of payments reaches seven) and is unique on its own; on SQLite, a counter per day."""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import Text, case, cast, func, literal_column, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core import pgraw
from core.cooperatives import zone_of
from core.db import utcnow
from core.models import Cooperative


async def next_reference(session: AsyncSession | AsyncConnection, prefix: str, zone: tzinfo = UTC,
                         at: datetime | None = None) -> str:
    """The next reference, dated today in `zone` (the cooperative's: core.cooperatives.zone_of), or the day of `at`
    there (a payment recorded from a statement: when its money was taken); `session` may also be a bare
    connection (one statement, no transaction needed). The number is unique whatever the day: PostgreSQL's
    sequence is one across days, SQLite's counter one per day."""
    start = reference_prefix(prefix, zone, at)
    dialect = session.dialect if isinstance(session, AsyncConnection) else session.get_bind().dialect
    if dialect.name == "postgresql":
        # A sequence never blocks concurrent writers, unlike a counter row held until commit. Straight on
        # asyncpg: it joins the session's transaction if one is open, and needs none otherwise.
        number = (await pgraw.first(session, _NEXTVAL, {}))[0]
    else:
        number = (await session.execute(
            text("INSERT INTO reference_counters (key, value) VALUES (:k, 1) "
                 "ON CONFLICT (key) DO UPDATE SET value = reference_counters.value + 1 RETURNING value"),
            {"k": start.rstrip("_")})).scalar_one()
    return f"{start}{number:03d}"


def next_number() -> Any:
    """The sequence's next number as a column of another statement (PostgreSQL only): a read that precedes a
    reference's use takes the number with it (numbered_reference) instead of a round trip of its own."""
    return func.nextval(literal_column("'human_reference_seq'"))


def numbered_reference(prefix: str, zone: tzinfo, number: int) -> str:
    """The reference next_reference makes of a number next_number() took (on PostgreSQL), dated today in `zone`."""
    return f"{reference_prefix(prefix, zone)}{number:03d}"


async def cooperative_reference(session: AsyncSession, prefix: str, cooperative_id: str) -> str:
    """The next reference of the cooperative's refund or dispute, dated by its day (its zone read here: a refund or
    a dispute is made far less often than a payment, whose context query reads the zone with the rest)."""
    timezone = (await session.execute(select(Cooperative.timezone).where(Cooperative.id == cooperative_id))
                ).scalar_one_or_none()
    return await next_reference(session, prefix, zone_of(timezone))


# What a reference looks like: PAY_20251016_001 (prefix, day, a number of at least three digits).
REFERENCE_SHAPE = re.compile(r"^[A-Z]{2,5}_\d{8}_\d{1,9}$", re.ASCII)
_NEXTVAL = text("SELECT nextval('human_reference_seq')")


def reference_prefix(prefix: str, zone: tzinfo = UTC, at: datetime | None = None) -> str:
    """'PAY_20251016_': what a reference starts with today in `zone` (the cooperative's), or on the day of `at`
    (timezone-aware) there; the number follows."""
    day = (utcnow() if at is None else at).astimezone(zone)
    return f"{prefix}_{day.year:04d}{day.month:02d}{day.day:02d}_"


def sql_reference(prefix_param: Any, number: Any) -> Any:
    """The reference as a PostgreSQL expression: `prefix_param || number`, the number zero-padded to at
    least three digits as next_reference() does (lpad alone would cut 1234 to '123')."""
    text_number = cast(number, Text)
    return prefix_param + case((number < 1000, func.lpad(text_number, 3, "0")), else_=text_number)
