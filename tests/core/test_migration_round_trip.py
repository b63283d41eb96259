"""Every migration downgrades and upgrades again on PostgreSQL with rows in the tables it changes, and what a
round trip loses is exactly what the README says a downgrade drops ("Rolling back the code after a migration").

An operator rolling back a release runs the newer release's `alembic downgrade <older head>` on the live database,
rows and all, then deploys the newer release again later: a downgrade that fails on a row, or an upgrade that
fails on what a downgrade left, stops that rollback or the next deploy; a column whose values a downgrade drops
comes back with its default (a Tanzanian cooperative greeted in English again). The chain is walked one revision
at a time from the head to 0001 and back, each step as `alembic downgrade`/`upgrade` runs it (the lock timeout,
the advisory lock, CONCURRENTLY index builds), then every seeded row is compared with what it was.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from core.db import make_engine
from tests.conftest import make_settings, requires_pg
from tests.core.test_migrations import _diff

T0 = "2026-01-01 00:00:00+00"
# Rows written by the head's code, with a value other than the column's default wherever a migration adds, drops or
# fills a column (and in the tables a migration creates), so that a round trip that loses one shows it.
ROWS = [
    "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration, "
    "ussd_aggregator, language, created_at, updated_at) VALUES ('rt-c1', 'Coop', 'RTC1', 'TZ', 'TZS', "
    f"'Africa/Dar_es_Salaam', 'ACTIVE', false, 'nalo', 'sw', '{T0}', '{T0}')",
    "INSERT INTO payment_types (id, cooperative_id, name, amount_minor, currency, allow_custom_amount, is_recurring, "
    f"is_active, created_at, updated_at) VALUES ('rt-t1', 'rt-c1', 'Rent', 100, 'TZS', false, false, true, '{T0}', "
    f"'{T0}')",
    "INSERT INTO members (id, cooperative_id, name, phone_enc, phone_index, phone_masked, language, status, "
    f"reminders_opt_out, created_at, updated_at) VALUES ('rt-m1', 'rt-c1', 'Ann', 'e', 'rt-i1', '+2557****01', 'sw', "
    f"'ACTIVE', true, '{T0}', '{T0}'), ('rt-m2', 'rt-c1', 'Ben (number released)', NULL, NULL, '', 'sw', 'ACTIVE', "
    f"false, '{T0}', '{T0}')",
    # An underpaid payment (collected 60 of 100, flagged), reviewed by a person; a second one paid in full.
    "INSERT INTO payments (id, cooperative_id, member_id, payment_type_id, reference, amount_minor, currency, "
    "fee_minor, refunded_minor, status, method, provider, provider_reference, provider_transaction_id, "
    "payment_account_enc, payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, "
    "mismatch, mismatch_detail, late, expires_at, created_at, updated_at, completed_at, collected_minor, "
    "reviewed_detail, reviewed_by, reviewed_at, review_note) VALUES "
    "('rt-p1', 'rt-c1', 'rt-m1', 'rt-t1', 'RT_PAY_1', 100, 'TZS', 0, 50, 'PARTIALLY_REFUNDED', 'MPESA', 'mpesa', "
    "'rt-pr1', 'RT-TXN-1', 'e', 'rt-i1', '+2557****01', 'rt-k1', 'v2:h', 'api', false, NULL, false, "
    f"'{T0}', '{T0}', '{T0}', '{T0}', 60, 'provider reported 60 TZS, expected 100 TZS', 'admin:u1', '{T0}', "
    "'checked the statement'), "
    "('rt-p2', 'rt-c1', 'rt-m1', 'rt-t1', 'RT_PAY_2', 100, 'TZS', 0, 0, 'COMPLETED', 'MPESA', 'mpesa', 'rt-pr2', "
    "'RT-TXN-2', 'e', 'rt-i1', '+2557****01', 'rt-k2', 'v2:h', 'ussd', false, NULL, false, "
    f"'{T0}', '{T0}', '{T0}', '{T0}', NULL, NULL, NULL, NULL, NULL)",
    # A chargeback recorded as sent back by the provider (never sent by us).
    "INSERT INTO refunds (id, cooperative_id, payment_id, reference, amount_minor, currency, status, reason, "
    "idempotency_key, provider_reference, provider_transaction_id, created_at, updated_at, completed_at, "
    "request_hash, returned_by_provider) VALUES ('rt-r1', 'rt-c1', 'rt-p1', 'RT_RFD_1', 50, 'TZS', 'COMPLETED', "
    f"'chargeback', 'rt-rk1', 'rt-rpr1', 'RT-RTXN-1', '{T0}', '{T0}', '{T0}', 'rh', true)",
    # A dispute opened over the API under the client's idempotency key (0038).
    "INSERT INTO disputes (id, cooperative_id, payment_id, member_id, reference, reason, status, channel, notes, "
    "created_at, updated_at, idempotency_key, request_hash) VALUES ('rt-s1', 'rt-c1', 'rt-p2', 'rt-m1', "
    f"'RT_DSP_1', 'OTHER', 'OPEN', 'api', '[]', '{T0}', '{T0}', 'rt-dk1', 'dh')",
    # A note added to it under the client's idempotency key (0041).
    "INSERT INTO dispute_transition_keys (dispute_id, idempotency_key, request_hash, created_at) VALUES ('rt-s1', "
    f"'rt-tk1', 'th', '{T0}')",
    "INSERT INTO webhook_endpoints (id, cooperative_id, url, secret_enc, events, status, consecutive_failures, "
    "previous_secrets, created_at, updated_at) VALUES ('rt-w1', 'rt-c1', 'https://erp.example/hook', 's', "
    f"'[\"payment.completed\"]', 'ACTIVE', 0, '[]', '{T0}', '{T0}')",
    "INSERT INTO webhook_deliveries (id, cooperative_id, endpoint_id, event_id, event_type, payload, status, "
    "attempts, created_at, updated_at) VALUES ('rt-d1', 'rt-c1', 'rt-w1', 'rt-e1', 'payment.completed', '{}', "
    f"'PENDING', '[]', '{T0}', '{T0}')",
    # An unfinished job of a provider's lane (0020's trigger writes it; its backfill fills it again), waiting after a
    # failed try its handler retried with its attempt given back (0031).
    "INSERT INTO outbox_jobs (id, kind, payload, cooperative_id, status, attempts, max_attempts, run_at, created_at, "
    "updated_at, after_failure) VALUES (990001, 'payment.poll', '{\"payment_id\": \"rt-p2\"}', 'rt-c1', 'PENDING', "
    f"0, 25, '{T0}', '{T0}', '{T0}', true)",
    f"INSERT INTO phone_opt_outs (phone_index, created_at) VALUES ('rt-i1', '{T0}')",  # Ann's STOP (opted out above)
    f"INSERT INTO phone_opt_out_words (phone_index, said_at) VALUES ('rt-i1', '{T0}')",
    f"INSERT INTO used_refresh_tokens (id, expires_at) VALUES ('rt-jti', '{T0}')",
]
# Each table's seeded rows, by primary key. An opted-out number's row is compared by the number alone: 0016 builds it
# again from the memberships' flags, dated when it runs.
TABLES = {"cooperatives": "id LIKE 'rt-%'", "payment_types": "id LIKE 'rt-%'", "members": "id LIKE 'rt-%'",
          "payments": "id LIKE 'rt-%'", "refunds": "id LIKE 'rt-%'", "disputes": "id LIKE 'rt-%'",
          "dispute_transition_keys": "dispute_id LIKE 'rt-%'", "webhook_endpoints": "id LIKE 'rt-%'",
          "webhook_deliveries": "id LIKE 'rt-%'", "outbox_jobs": "id = 990001",
          "phone_opt_outs": "true", "phone_opt_out_words": "true", "used_refresh_tokens": "true"}
COLUMNS = {"phone_opt_outs": "phone_index"}
KEYS = {"phone_opt_outs": "phone_index", "phone_opt_out_words": "phone_index", "outbox_jobs": "id",
        "dispute_transition_keys": "dispute_id, idempotency_key"}

# What a downgrade past each revision drops (the README's list under "Rolling back the code after a migration"),
# as (table, column) -> the value it comes back with after upgrading again; a column None: the table's rows.
LOST: dict[tuple[str, str | None], Any] = {
    ("payments", "collected_minor"): None,  # 0002 (0009 fills only mismatches its audit rows name)
    ("refunds", "request_hash"): None,  # 0003
    ("cooperatives", "ussd_aggregator"): None,  # 0008
    ("refunds", "returned_by_provider"): False,  # 0012
    ("used_refresh_tokens", None): [],  # 0015
    ("payments", "reviewed_detail"): None,  # 0024 (the review stays in the audit log, payment.reviewed)
    ("payments", "reviewed_by"): None,
    ("payments", "reviewed_at"): None,
    ("payments", "review_note"): None,
    ("cooperatives", "language"): "en",  # 0026
    ("phone_opt_out_words", None): [],  # 0028
    ("outbox_jobs", "after_failure"): False,  # 0031
    ("disputes", "idempotency_key"): None,  # 0038 (a retry of its request then opens another once it is closed)
    ("disputes", "request_hash"): None,
    ("dispute_transition_keys", None): [],  # 0041 (a retry of a transition under its key then applies again)
}


async def _rows(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return {table: [dict(row) for row in (await conn.execute(text(
                f"SELECT {COLUMNS.get(table, '*')} FROM {table} WHERE {where} ORDER BY {KEYS.get(table, 'id')}")
            )).mappings()]
                for table, where in TABLES.items()}
    finally:
        await engine.dispose()


async def _execute(url: str, statements: list[str]) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def _lost(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> dict:
    """(table, column) -> what it came back as, for every value a round trip changed; (table, None) for rows."""
    lost: dict[tuple[str, str | None], Any] = {}
    for table, rows in before.items():
        if len(after[table]) != len(rows):
            lost[(table, None)] = after[table]
            continue
        for old, new in zip(rows, after[table], strict=True):
            for column, value in old.items():
                if new.get(column) != value:
                    lost[(table, column)] = new.get(column)
    return lost


@requires_pg
async def test_every_migration_downgrades_and_upgrades_again_with_rows_and_loses_only_what_the_readme_says(
        migrated_database):
    from alembic import command
    from alembic.script import ScriptDirectory

    from main import _alembic_config

    config = _alembic_config(make_settings())
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]  # head first
    await _execute(migrated_database, ROWS)
    try:
        before = await _rows(migrated_database)
        assert all(before.values())
        for revision in revisions[1:]:
            await asyncio.to_thread(command.downgrade, config, revision)
        for revision in reversed(revisions[:-1]):
            await asyncio.to_thread(command.upgrade, config, revision)
        after = await _rows(migrated_database)
        assert _lost(before, after) == LOST
        assert await asyncio.to_thread(_diff, migrated_database) == []
    finally:
        await asyncio.to_thread(command.upgrade, config, "head")
        await _execute(migrated_database, [f"DELETE FROM {table} WHERE {TABLES[table]}" for table in reversed(
            ["cooperatives", "payment_types", "members", "payments", "refunds", "disputes", "dispute_transition_keys",
             "webhook_endpoints", "webhook_deliveries", "outbox_jobs", "phone_opt_outs", "phone_opt_out_words",
             "used_refresh_tokens"])])
