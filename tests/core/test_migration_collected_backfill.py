"""Migration 0009: payments recorded before the gateway kept what a provider took get it from the audit log.

Before it, an upgraded install read an underpaid payment's empty collected_minor as "all of it taken" (the API
said 50,000 collected and accepted a refund of 50,000 for 40,000 received), and a payment whose money was taken
after it FAILED (no completed_at) could not be refunded at all."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import make_engine, utcnow
from core.models import AuditEvent, Payment
from core.refunds import collected
from main import _alembic_config, migrate
from tests.conftest import make_settings, requires_pg
from tests.core.factories import cooperative, payment

TAKEN_AT = utcnow().replace(microsecond=0) - timedelta(days=40)


async def _as_an_old_release_wrote_them(url: str) -> dict[str, str]:
    """Payments as releases before 0002 (and before money taken after a failure was kept) left them. Written at
    head (by the models of this release, which name columns added after 0009) before the downgrade to 0008,
    which keeps them as they are."""
    engine = make_engine(url)
    ids: dict[str, str] = {}
    try:
        async with AsyncSession(engine) as s, s.begin():
            coop = await cooperative(s)

            async def made(name: str, status: str, **values: Any) -> str:
                p = await payment(s, coop, status)
                for key, value in values.items():
                    setattr(p, key, value)
                ids[name] = p.id
                return p.id

            def audit(payment_id: str, action: str, after: dict[str, Any]) -> AuditEvent:
                return AuditEvent(actor="provider:mtn", channel="provider", action=action, entity_type="payment",
                                  entity_id=payment_id, after=after, at=TAKEN_AT, cooperative_id=coop.id)

            under = await made("under", "COMPLETED", mismatch=True, completed_at=TAKEN_AT,
                               mismatch_detail="provider reported 40,000 RWF, expected 50,000 RWF")
            dollars = await made("dollars", "COMPLETED", mismatch=True, completed_at=TAKEN_AT,
                                 mismatch_detail="provider reported 40.00 USD, expected 50,000 RWF")
            after_failure = await made("after_failure", "FAILED", mismatch=True, failure_reason="not_enough_funds",
                                       mismatch_detail="provider reported success after the payment had failed")
            await made("plain", "COMPLETED", completed_at=TAKEN_AT)
            kept = await made("kept", "COMPLETED", mismatch=True, completed_at=TAKEN_AT, collected_minor=45_000)
            await made("failed", "FAILED", failure_reason="not_enough_funds")
            s.add_all([
                audit(under, "payment.amount_mismatch", {"reported": 40_000, "reportedCurrency": "RWF",
                                                         "expected": 50_000}),
                audit(dollars, "payment.amount_mismatch", {"reported": 4_000, "reportedCurrency": "USD",
                                                           "expected": 50_000}),
                audit(after_failure, "payment.success_after_failure", {"providerTransactionId": "tx-late"}),
                audit(kept, "payment.amount_mismatch", {"reported": 40_000, "reportedCurrency": "RWF",
                                                        "expected": 50_000}),
            ])
    finally:
        await engine.dispose()
    return ids


async def _payments(url: str, ids: dict[str, str]) -> dict[str, Payment]:
    engine = make_engine(url)
    try:
        async with AsyncSession(engine) as s:
            rows = (await s.execute(sa.select(Payment).where(Payment.id.in_(ids.values())))).scalars().all()
            by_id = {p.id: p for p in rows}
    finally:
        await engine.dispose()
    return {name: by_id[payment_id] for name, payment_id in ids.items()}


def _backfill(url: str) -> None:
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    ids = asyncio.run(_as_an_old_release_wrote_them(url))
    command.downgrade(_alembic_config(settings), "0008")  # as an install before 0009
    migrate(settings)
    got = asyncio.run(_payments(url, ids))
    assert collected(got["under"]) == 40_000  # not 50,000: only what was received can go back
    assert got["dollars"].collected_minor == 0  # another currency: a person looks, nothing automatic
    assert (got["after_failure"].collected_minor, got["after_failure"].completed_at) == (50_000, TAKEN_AT)
    assert got["after_failure"].status == "FAILED"  # held, never reopened
    assert got["kept"].collected_minor == 45_000  # already filled: left alone
    for untouched in ("plain", "failed"):
        assert got[untouched].collected_minor is None
    assert got["failed"].completed_at is None

    # Again (or after a downgrade to 0001 and back): the same result.
    command.downgrade(_alembic_config(settings), "0008")
    migrate(settings)
    again = asyncio.run(_payments(url, ids))
    assert {n: (p.collected_minor, p.completed_at) for n, p in again.items()} == \
        {n: (p.collected_minor, p.completed_at) for n, p in got.items()}


def test_the_backfill_on_sqlite(tmp_path: Any) -> None:
    _backfill(f"sqlite+aiosqlite:///{tmp_path}/m.db")


@requires_pg
def test_the_backfill_on_postgres(migrated_database: str) -> None:
    _backfill(migrated_database)
