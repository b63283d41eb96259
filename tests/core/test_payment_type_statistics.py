"""Migration 0030: the planner knows a payment type belongs to one cooperative (extended statistics on payments'
cooperative_id and payment_type_id). Without them a type's payments were estimated at a row or two in a federation of
many cooperatives and types, and the reminders' per-member check of a period's payments (core.reminders.paid_clause)
read every payment of the type that ever named a due date, once per member: the daily fan-out of 300 cooperatives
ran past its job's time limit at each attempt and no member was reminded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import text

from core import reminders
from tests.admin_api.test_reports_recorded_later import _statements  # every statement and its parameters
from tests.conftest import make_settings, requires_pg

# 28 November, 08:10 in Kigali: the demo's Monthly Rent, due on the 1st, falls due in 3 days.
NOW = datetime(2036, 11, 28, 6, 10, tzinfo=UTC)
COOPERATIVES = 120  # besides the demo's, three recurring types each


async def _federation(rt: Any, demo: dict[str, Any]) -> None:
    """120 other cooperatives with three types and 20 members each, 120 payments of each type naming a due date (each
    a member's), and 400 of the demo's Monthly Rent naming past due dates; analysed, as autovacuum leaves a table."""
    coop, rent = demo["cooperative_id"], demo["payment_types"]["Monthly Rent"]
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration,"
            " created_at, updated_at) SELECT 'c30-' || c, 'Other ' || c, 'O30X' || c, 'RW', 'RWF', 'Africa/Kigali',"
            " 'ACTIVE', true, now(), now() FROM generate_series(1, :n) c"), {"n": COOPERATIVES})
        await conn.execute(text(
            "INSERT INTO payment_types (id, cooperative_id, name, amount_minor, currency, allow_custom_amount,"
            " is_recurring, recurring_interval, due_day, is_active, created_at, updated_at)"
            " SELECT 't30-' || c || '-' || k, 'c30-' || c, 'Type ' || k, 5000, 'RWF', false, true, 'MONTHLY', 1,"
            " true, now(), now() FROM generate_series(1, :n) c, generate_series(1, 3) k"), {"n": COOPERATIVES})
        await conn.execute(text(
            "INSERT INTO members (id, cooperative_id, name, phone_enc, phone_index, phone_masked, language, status,"
            " reminders_opt_out, created_at, updated_at) SELECT 'm30-' || c || '-' || m, 'c30-' || c, 'Member ' || m,"
            " 'x', 'i30-' || c || '-' || m, '+25078****000', 'en', 'ACTIVE', false, now(), now()"
            " FROM generate_series(1, :n) c, generate_series(1, 20) m"), {"n": COOPERATIVES})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, member_id, reference, amount_minor, currency,"
            " fee_minor, refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at, completed_at, due_date)"
            " SELECT 'p30-' || i, coalesce(t.cooperative_id, :coop), coalesce(t.id, :rent),"
            " CASE WHEN t.id IS NOT NULL THEN 'm30-' || (1 + i % :n) || '-' || (1 + i % 20) END, 'PAY_T30_' || i,"
            " 5000, 'RWF', 0, 0, 'COMPLETED', 'MOBILE_MONEY_MTN', 'mtn_momo', 'pr30-' || i, 'x', 'acct' || (i % 97),"
            " '+25078****000', 'idem-t30-' || i, 'h', 'api', false, false, d + interval '2 minutes', d, d, d,"
            " date_trunc('month', d) FROM generate_series(1, :n * 360 + 400) i"
            " LEFT JOIN payment_types t ON t.id = 't30-' || (1 + i % :n) || '-' || (1 + i / :n % 3) AND i > 400"
            " CROSS JOIN LATERAL (SELECT CAST(:now AS timestamptz) - (i % 700) * interval '1 day'"
            " - interval '5 days' AS d) s"),
            {"n": COOPERATIVES, "coop": coop, "rent": rent, "now": NOW})
        await conn.execute(text("ANALYZE payments"))


def _blind_reads(plan: str) -> list[str]:
    """The plan's reads of ix_payments_coop_type_due bounded by no due date: a type's every payment naming one."""
    return [cond for line, cond in pairwise(plan.splitlines())
            if "ix_payments_coop_type_due" in line and "Index Cond" in cond
            and "due_date >=" not in cond and "due_date =" not in cond]


@requires_pg
async def test_the_reminders_check_of_each_member_reads_the_period_not_the_types_history(
        rt: Any, demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The daily fan-out's count and a chunk's reminders, each member's payments of the type due read by the period's
    due date or by the member, never through every payment of the type that named a due date."""
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW)
    await _federation(rt, demo)
    with _statements(rt) as sent:
        async with rt.sessionmaker.begin() as session:
            await reminders.fan_out(session, rt, NOW.date(), NOW)
            assert await reminders.scan(session, rt, now=NOW, cooperative_id=demo["cooperative_id"]) > 0
            await session.rollback()
    ours = [(s, p) for s, p in sent if "payments.payment_type_id" in s and "FROM members" in s]
    assert len(ours) >= 2, ours  # the fan-out's count and the chunk's INSERT of its reminders
    async with rt.engine.connect() as conn:
        for statement, parameters in ours:
            plan = "\n".join((await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)).scalars().all())
            assert _blind_reads(plan) == [], plan


async def statistics_come_and_go(url: str, name: str, expected: tuple[list[str], list[str]], before: str,
                                  revision: str) -> None:
    """Extended statistics `name` ((kinds, columns) as `expected`) are there at head (filled by the migration's
    ANALYZE), gone once downgraded to `before`, there again at `revision`; the database back at head after."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))

    async def kinds() -> list[Any]:
        return [tuple(r) for r in await conn.fetch(
            "SELECT stxkind::text[], (SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute"
            " WHERE attrelid = stxrelid AND attnum = ANY(stxkeys)) FROM pg_statistic_ext"
            " WHERE stxname = $1", name)]

    try:
        assert await kinds() == [expected]
        await asyncio.to_thread(command.downgrade, _alembic_config(settings), before)
        assert await kinds() == []
        await asyncio.to_thread(command.upgrade, _alembic_config(settings), revision)
        assert await kinds() == [expected]
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)


@requires_pg
async def test_0030_statistics_come_and_go_with_the_revision(migrated_database: str) -> None:
    """Created at head (filled by the migration's ANALYZE), gone at 0029, created again at 0030."""
    await statistics_come_and_go(migrated_database, "st_payments_coop_type",
                                 (["f"], ["cooperative_id", "payment_type_id"]), "0029", "0030")
