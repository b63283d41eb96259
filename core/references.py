"""Human references (PAY_20251016_001): short enough to type in an SMS, unique, per-day counters."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import utcnow


async def next_reference(session: AsyncSession, prefix: str) -> str:
    day = utcnow().strftime("%Y%m%d")
    if session.get_bind().dialect.name == "postgresql":
        # A sequence never blocks concurrent writers, unlike a counter row held until commit.
        number = (await session.execute(text("SELECT nextval('human_reference_seq')"))).scalar_one()
    else:
        key = f"{prefix}_{day}"
        number = (await session.execute(
            text("INSERT INTO reference_counters (key, value) VALUES (:k, 1) "
                 "ON CONFLICT (key) DO UPDATE SET value = reference_counters.value + 1 RETURNING value"),
            {"k": key})).scalar_one()
    return f"{prefix}_{day}_{number:03d}"
