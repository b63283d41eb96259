"""Migration 0013: the indexes of the payment sync, the flagged-payment lists, the audit log's actor and action
filters and the SMS text pruning exist (partial where they should be), come and go with the revision, and the
statements the service sends for those lists are planned on them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import event, text

from core.db import utcnow
from core.retention import RetentionPolicy, prune
from tests.admin_api.conftest import bearer
from tests.conftest import make_settings, requires_pg

# name -> "table (columns)[ WHERE predicate]" as pg_get_indexdef prints it.
GROWTH_INDEXES = {
    "ix_payments_coop_updated": "payments (cooperative_id, updated_at, id)",
    "ix_payments_coop_mismatch": "payments (cooperative_id, created_at) WHERE (mismatch IS TRUE)",
    "ix_payments_coop_late": "payments (cooperative_id, created_at) WHERE (late IS TRUE)",
    "ix_audit_events_coop_actor": "audit_events (cooperative_id, actor, at)",
    "ix_audit_events_coop_action": "audit_events (cooperative_id, action, at)",
    "ix_audit_events_actor": "audit_events (actor, at)",
    "ix_audit_events_action": "audit_events (action, at)",
    "ix_sms_messages_body_kept": "sms_messages (created_at) WHERE (body <> ''::text)",
    "ix_refunds_created": "refunds (created_at)",
    "ix_refunds_completed": "refunds (completed_at)",
}
DROPPED = "ix_audit_events_cooperative_id"  # covered by the two scoped audit composites


async def pg_indexes(conn: Any, names: list[str]) -> dict[str, tuple[bool, str]]:
    """name -> (valid, "table (columns)[ WHERE predicate]") of those of `names` that exist (an asyncpg connection)."""
    rows = await conn.fetch(
        "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY($1::text[])", names)
    return {r["relname"]: (r["indisvalid"], r["def"].split(" ON ")[1].replace("public.", "")
                           .replace("USING btree ", "")) for r in rows}


async def _indexes(conn: Any) -> dict[str, tuple[bool, str]]:
    return await pg_indexes(conn, [*GROWTH_INDEXES, DROPPED])


@requires_pg
async def test_0013_indexes_exist_and_are_valid_after_migrate(migrated_database):
    import asyncpg

    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await _indexes(conn) == {name: (True, d) for name, d in GROWTH_INDEXES.items()}
    finally:
        await conn.close()


@requires_pg
async def test_0013_downgrades_and_rebuilds_an_invalid_leftover(migrated_database):
    """Downgrading drops them and builds the cooperative_id index again; an INVALID index an interrupted
    concurrent build left is built again, with its predicate."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await asyncio.to_thread(command.downgrade, cfg, "0012")
        assert await _indexes(conn) == {DROPPED: (True, "audit_events (cooperative_id)")}
        # What a killed `migrate` leaves: an INVALID index (here also without its predicate).
        await conn.execute("CREATE INDEX ix_payments_coop_mismatch ON payments (cooperative_id)")
        await conn.execute("UPDATE pg_index SET indisvalid = false "
                           "WHERE indexrelid = 'ix_payments_coop_mismatch'::regclass")
        await asyncio.to_thread(command.upgrade, cfg, "0013")
        assert await _indexes(conn) == {name: (True, d) for name, d in GROWTH_INDEXES.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0013_downgrades_and_upgrades_again_on_sqlite(tmp_path):
    """The embedded default: the same indexes, the partial ones with their predicate; models and migrations agree."""
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migrations import _diff

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")

    def indexes() -> dict[str, str]:
        return sqlite_indexes(engine)

    try:
        after = indexes()
        assert set(GROWTH_INDEXES) <= set(after) and DROPPED not in after
        assert after["ix_payments_coop_mismatch"].endswith("WHERE mismatch IS true")
        assert after["ix_payments_coop_late"].endswith("WHERE late IS true")
        assert after["ix_sms_messages_body_kept"].endswith("WHERE body <> ''")
        assert _diff(url) == []
        command.downgrade(_alembic_config(settings), "0012")
        before = indexes()
        assert not set(GROWTH_INDEXES) & set(before) and DROPPED in before
        migrate(settings)
        assert indexes() == after and _diff(url) == []
        # A migrate cut short on SQLite (Ctrl-C, a container stopped): each CREATE INDEX committed at once, the
        # revision stayed 0012. The next migrate goes on; it failed "index ... already exists" for good.
        command.downgrade(_alembic_config(settings), "0012")
        engine.dispose()
        with engine.begin() as c:
            c.execute(sa.text("CREATE INDEX ix_payments_coop_updated ON payments (cooperative_id, updated_at, id)"))
            c.execute(sa.text("DROP INDEX ix_audit_events_cooperative_id"))  # as if cut short after the drop
        migrate(settings)
        assert indexes() == after and _diff(url) == []
    finally:
        engine.dispose()


def sqlite_indexes(engine: Any) -> dict[str, str]:
    """name -> CREATE INDEX statement of every index of an SQLite database (a synchronous engine)."""
    import sqlalchemy as sa

    with engine.connect() as c:
        return {name: sql for name, sql in c.execute(sa.text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))}


# --- the hot queries' plans ---------------------------------------------------------------------------------------

OTHER_COOP = "00000000-0000-4000-8000-000000000013"


async def _fill(rt: Any, demo: dict[str, Any]) -> None:
    """A year of two cooperatives, the demo's a tenth: payments (a few flagged mismatch or late), audit rows of
    several actors and actions, SMS the oldest of whose texts a prune already emptied. Enough rows for ANALYZE to
    give the planner the shape a real year has."""
    coop = demo["cooperative_id"]
    ptype = next(iter(demo["payment_types"].values()))
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration,"
            " created_at, updated_at) VALUES (:id, 'Other', 'OTHER13', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', true,"
            " now(), now())"), {"id": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, CASE WHEN i % 10 = 0 THEN :coop ELSE :other END, :ptype,"
            " 'PAY_T13_' || i, 50000, 'RWF', 0, 0, 'COMPLETED', 'MOBILE_MONEY_MTN', 'mtn_momo', 'pr-' || i, 'x',"
            " 'acct' || (i % 50), '+25078****000', 'idem-t13-' || i, 'h', 'ussd', i % 500 = 1, i % 700 = 2,"
            " t, t, t + interval '40 seconds'"
            " FROM (SELECT i, now() - (4000 - i) * interval '2 hours' AS t FROM generate_series(1, 4000) i) s"
            # Stored in no particular order of updated_at: a payment is rewritten when it changes.
            " ORDER BY random()"),
            {"coop": coop, "other": OTHER_COOP, "ptype": ptype})
        await conn.execute(text(
            "INSERT INTO audit_events (cooperative_id, actor, channel, action, entity_type, entity_id, at)"
            " SELECT CASE WHEN i % 10 = 0 THEN :coop ELSE :other END,"
            " (ARRAY['system', 'system', 'system', 'admin:a', 'apikey:k'])[1 + i % 5], 'worker',"
            " CASE WHEN i % 150 = 0 THEN 'dispute.opened'"
            " ELSE (ARRAY['payment.created', 'payment.processing', 'payment.completed', 'refund.created'])[1 + i % 4]"
            " END,"
            " 'payment', 'p' || i, now() - (6000 - i) * interval '1 hour' FROM generate_series(1, 6000) i"),
            {"coop": coop, "other": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO sms_messages (id, cooperative_id, phone_enc, phone_index, phone_masked, template, language,"
            " body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, :coop, 'x', 'p' || (i % 50), '+25078****000', 'receipt', 'en',"
            " CASE WHEN i < 1500 THEN '' ELSE 'Payment received. Thank you.' END, 'GSM-7', 28, 1, 'DELIVERED',"
            " 'sms-t13-' || i, now() - (4000 - i) * interval '2 hours', now() - (4000 - i) * interval '2 hours'"
            " FROM generate_series(1, 4000) i"), {"coop": coop})
        for table in ("payments", "audit_events", "sms_messages"):
            await conn.execute(text(f"ANALYZE {table}"))


@contextlib.contextmanager
def _statements(rt: Any) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the service sends through SQLAlchemy while the block runs, with its parameters."""
    seen: list[tuple[str, Any]] = []
    engine = rt.engine.sync_engine

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


async def _plans(rt: Any, sent: list[tuple[str, Any]], table: str) -> list[str]:
    """The plans of the SELECTs of `table` among `sent`, as sent (with their parameters), with sequential scans
    disabled: on a table of a year's rows they are what the indexes replace; here a few thousand rows fit a page
    or two."""
    plans = []
    async with rt.engine.connect() as conn:
        await conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in sent:
            if statement.lstrip().startswith("SELECT") and f"FROM {table}" in statement:
                rows = (await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)).scalars().all()
                plans.append("\n".join(rows))
        await conn.rollback()
    return plans


async def _list_plans(rt: Any, caller: Any, url: str, table: str) -> list[str]:
    with _statements(rt) as sent:
        await caller.json("GET", url, 200)
    plans = await _plans(rt, sent, table)
    assert len(plans) == 2, plans  # the (capped) count and the page
    return plans


@requires_pg
async def test_the_sync_and_the_flagged_and_audit_lists_read_their_indexes(rt, client, demo, monkeypatch):
    """A cooperative admin's payment sync, mismatch and late lists and audit log by actor or action, and a super
    admin's across cooperatives: the count and the page are each planned on the index made for them."""
    await _fill(rt, demo)
    admin, root = await bearer(client, *demo["admin"]), await bearer(client, *demo["super_admin"])
    since = (utcnow() - timedelta(days=60)).date().isoformat()  # a sync catching up on two months
    cases = [
        (admin, f"/v1/payments?updatedFrom={since}&limit=100", "payments", "ix_payments_coop_updated"),
        (admin, "/v1/payments?mismatch=true", "payments", "ix_payments_coop_mismatch"),
        (admin, "/v1/payments?late=true&limit=100", "payments", "ix_payments_coop_late"),
        (root, "/v1/payments?mismatch=true", "payments", "ix_payments_coop_mismatch"),
        (admin, "/v1/audit-events?actor=system", "audit_events", "ix_audit_events_coop_actor"),
        (admin, "/v1/audit-events?action=refund.created", "audit_events", "ix_audit_events_coop_action"),
        (root, "/v1/audit-events?actor=admin:nobody", "audit_events", "ix_audit_events_actor"),
        (root, "/v1/audit-events?action=dispute.opened", "audit_events", "ix_audit_events_action"),
    ]
    for caller, url, table, index in cases:
        plans = await _list_plans(rt, caller, url, table)
        assert all(index in plan for plan in plans), "\n\n".join([url, *plans])


@requires_pg
async def test_prune_walks_only_the_sms_texts_still_there(rt, demo):
    """The text-emptying walk reads ix_sms_messages_body_kept (rows whose text is still there), not every old SMS
    from the oldest on; the texts it was due to empty are emptied."""
    await _fill(rt, demo)
    policy = RetentionPolicy(outbox_done_days=0, ussd_sessions_days=0, unknown_callbacks_days=0,
                             webhook_deliveries_days=0, sms_body_days=180, batch_size=100)
    with _statements(rt) as sent:
        report = await prune(rt.engine, policy)
    walks = await _plans(rt, sent, "sms_messages")
    assert walks and all("ix_sms_messages_body_kept" in plan for plan in walks), "\n\n".join(walks)
    # 4000 SMS two hours apart, the oldest 1499 already emptied: the other 341 older than 180 days are emptied now.
    async with rt.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM sms_messages WHERE body <> '' "
                                        "AND created_at < now() - interval '180 days'"))).scalar()
        emptied = (await conn.execute(text("SELECT count(*) FROM sms_messages WHERE body = ''"))).scalar()
    assert (left, emptied, report[-1].count) == (0, 1499 + 341, 341)
