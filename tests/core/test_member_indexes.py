"""Migration 0014: the indexes of the reminder scan's member chunks, a cooperative's member list and a super admin's
payments export by completion exist (the last partial), come and go with the revision, and the statements the
service sends for those reads are planned on them."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from core import reminders
from tests.admin_api.conftest import bearer
from tests.conftest import make_settings, requires_pg
from tests.core.test_growth_indexes import OTHER_COOP, _list_plans, _plans, _statements, pg_indexes, sqlite_indexes
from tests.core.test_reminder_scale import NOW, _cooperative

# name -> "table (columns)[ WHERE predicate]" as pg_get_indexdef prints it.
INDEXES = {
    "ix_members_coop_id": "members (cooperative_id, id)",
    "ix_members_coop_name": "members (cooperative_id, name, id)",
    "ix_payments_completed": "payments (completed_at) WHERE (completed_at IS NOT NULL)",
}


async def _indexes(conn: Any) -> dict[str, tuple[bool, str]]:
    return await pg_indexes(conn, list(INDEXES))


@requires_pg
async def test_0014_indexes_come_and_go_with_the_revision(migrated_database):
    """Valid after migrate; downgrading drops them; an INVALID leftover of an interrupted concurrent build (here
    without its predicate) is built again, as it should be."""
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await _indexes(conn) == {name: (True, d) for name, d in INDEXES.items()}
        await asyncio.to_thread(command.downgrade, cfg, "0013")
        assert await _indexes(conn) == {}
        await conn.execute("CREATE INDEX ix_payments_completed ON payments (completed_at)")
        await conn.execute("UPDATE pg_index SET indisvalid = false "
                           "WHERE indexrelid = 'ix_payments_completed'::regclass")
        await asyncio.to_thread(command.upgrade, cfg, "0014")
        assert await _indexes(conn) == {name: (True, d) for name, d in INDEXES.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0014_downgrades_and_upgrades_again_on_sqlite(tmp_path):
    """The embedded default: the same indexes, the partial one with its predicate; models and migrations agree,
    also after a migrate cut short between two of its builds."""
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
        assert set(INDEXES) <= set(after)
        assert after["ix_payments_completed"].endswith("WHERE completed_at IS NOT NULL")
        assert _diff(url) == []
        command.downgrade(_alembic_config(settings), "0013")
        assert not set(INDEXES) & set(indexes())
        engine.dispose()
        with engine.begin() as c:  # cut short after the first build
            c.execute(sa.text("CREATE INDEX ix_members_coop_id ON members (cooperative_id, id)"))
        migrate(settings)
        assert indexes() == after and _diff(url) == []
    finally:
        engine.dispose()


# --- the reads' plans ---------------------------------------------------------------------------------------------

async def _fill(rt: Any, demo: dict[str, Any], coop: str) -> None:
    """Members of three cooperatives (the reminder one's few among thousands), and payments of two, a third of
    them collected: enough rows for ANALYZE to give the planner a growing gateway's shape."""
    ptype = next(iter(demo["payment_types"].values()))
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration,"
            " created_at, updated_at) VALUES (:id, 'Other', 'OTHER14', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', true,"
            " now(), now())"), {"id": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO members (id, cooperative_id, name, phone_enc, phone_index, phone_masked, language, status,"
            " reminders_opt_out, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, CASE WHEN i % 3 = 0 THEN :demo ELSE :other END,"
            " 'Member ' || md5(i::text), 'x', 'idx14-' || i, '+25078****000', 'en', 'ACTIVE', false, now(), now()"
            " FROM generate_series(1, 6000) i"), {"demo": demo["cooperative_id"], "other": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at, completed_at)"
            " SELECT gen_random_uuid()::text, CASE WHEN i % 10 = 0 THEN :demo ELSE :other END, :ptype,"
            " 'PAY_T14_' || i, 50000, 'RWF', 0, 0, CASE WHEN i % 3 = 0 THEN 'COMPLETED' ELSE 'FAILED' END,"
            " 'MOBILE_MONEY_MTN', 'mtn_momo', 'pr14-' || i, 'x', 'acct' || (i % 50), '+25078****000', 'idem-t14-' || i,"
            " 'h', 'ussd', false, false, t, t, t + interval '40 seconds',"
            " CASE WHEN i % 3 = 0 THEN t + interval '30 seconds' END"
            " FROM (SELECT i, now() - (6000 - i) * interval '1 hour' AS t FROM generate_series(1, 6000) i) s"),
            {"demo": demo["cooperative_id"], "other": OTHER_COOP, "ptype": ptype})
        for table in ("members", "payments"):
            await conn.execute(text(f"ANALYZE {table}"))


def _ordered_by(sent: list[tuple[str, Any]], order: str) -> list[tuple[str, Any]]:
    return [(statement, parameters) for statement, parameters in sent if order in statement]


@requires_pg
async def test_member_chunks_member_list_and_settled_export_read_their_indexes(rt, client, demo, monkeypatch):
    monkeypatch.setattr(reminders, "CHUNK", 4)
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW)
    coop = await _cooperative(rt, "DDD", 10)  # a Monthly Rent due in 3 days, 10 members to remind
    await _fill(rt, demo, coop["id"])

    # The reminder scan's chunks: a cooperative's members in id order after the last one read.
    with _statements(rt) as sent:
        async with rt.sessionmaker.begin() as session:
            assert await reminders.scan(session, rt, now=NOW, cooperative_id=coop["id"]) == 10
    chunks = await _plans(rt, _ordered_by(sent, "ORDER BY members.id"), "members")
    assert len(chunks) == 3 and all("ix_members_coop_id" in plan for plan in chunks), "\n\n".join(chunks)

    # A cooperative admin's member list, page after page by name.
    admin, root = await bearer(client, *demo["admin"]), await bearer(client, *demo["super_admin"])
    with _statements(rt) as sent:
        page = await admin.json("GET", "/v1/members?page=3&limit=50", 200)
    assert len(page["data"]) == 50
    pages = await _plans(rt, _ordered_by(sent, "ORDER BY members.name"), "members")
    assert len(pages) == 1 and "ix_members_coop_name" in pages[0], pages[0]

    # A super admin's payments export by completion, batch after batch across cooperatives.
    with _statements(rt) as sent:
        resp = await root.req("GET", "/v1/reports/payments.csv?basis=completed")
        assert resp.status == 200
        lines = (await resp.text()).splitlines()
    assert len(lines) == 1 + 2000  # the header and every collected payment
    batches = await _plans(rt, _ordered_by(sent, "ORDER BY payments.completed_at"), "payments")
    assert len(batches) == 5 and all("ix_payments_completed" in plan for plan in batches), "\n\n".join(batches)

    # A super admin's payments list by completion, its rows the export's (money held: core.state.payment.HELD),
    # counted and paged on the same index.
    listed = await _list_plans(rt, root, "/v1/payments?basis=completed&limit=50&page=3", "payments")
    assert all("ix_payments_completed" in plan for plan in listed), "\n\n".join(listed)
