"""Migration 0018: a member's SMS and USSD session rows are found by member_id through an index (partial: rows of no
member are no entry). Erasing a member clears her number from them in one UPDATE per table inside the transaction
that holds her payments locked: without the index each erasure read both whole tables (a deployment's 90 days of
USSD sessions) and failed at the statement timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from tests.conftest import make_settings, requires_pg
from tests.core.test_growth_indexes import pg_indexes, sqlite_indexes

INDEXES = {
    "ix_sms_messages_member": "sms_messages (member_id) WHERE (member_id IS NOT NULL)",
    "ix_ussd_sessions_member": "ussd_sessions (member_id) WHERE (member_id IS NOT NULL)",
}


@requires_pg
async def test_0018_indexes_come_and_go_with_the_revision(migrated_database: str) -> None:
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await pg_indexes(conn, list(INDEXES)) == {name: (True, d) for name, d in INDEXES.items()}
        await asyncio.to_thread(command.downgrade, cfg, "0017")
        assert await pg_indexes(conn, list(INDEXES)) == {}
        await asyncio.to_thread(command.upgrade, cfg, "0018")
        assert await pg_indexes(conn, list(INDEXES)) == {name: (True, d) for name, d in INDEXES.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0018_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate
    from tests.core.test_migrations import _diff

    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    settings = make_settings(DATABASE_URL=url)
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        after = sqlite_indexes(engine)
        assert all(after[name].endswith("WHERE member_id IS NOT NULL") for name in INDEXES)
        assert _diff(url) == []
        command.downgrade(_alembic_config(settings), "0017")
        assert not set(INDEXES) & set(sqlite_indexes(engine))
        migrate(settings)
        assert sqlite_indexes(engine) == after and _diff(url) == []
    finally:
        engine.dispose()


@requires_pg
async def test_the_erasures_updates_are_planned_on_the_indexes(rt: Any, demo: dict[str, Any]) -> None:
    """The erasure's statements (core.members: her rows by member_id, or her number's rows of no member since she
    got it), on tables of 20,000 rows of other people: index scans, not a read of the whole table."""
    from sqlalchemy import update

    from core.db import utcnow
    from core.members import _Hers
    from core.models import SmsMessage, UssdSession

    coop = demo["cooperative_id"]
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO ussd_sessions (id, aggregator, session_id, cooperative_id, member_id, phone_index,"
            " phone_masked, service_code, status, hops, started_at)"
            " SELECT gen_random_uuid()::text, 'africastalking', 'S' || i, :coop,"
            " CASE WHEN i % 2 = 0 THEN gen_random_uuid()::text END, md5(i::text), '+25078****000', '*384*123#',"
            " 'Success', 3, now() - (i || ' minutes')::interval FROM generate_series(1, 20000) i"), {"coop": coop})
        await conn.execute(text(
            "INSERT INTO sms_messages (id, cooperative_id, member_id, phone_enc, phone_index, phone_masked, template,"
            " language, body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, :coop, CASE WHEN i % 2 = 0 THEN gen_random_uuid()::text END, 'x',"
            " md5(i::text), '+25078****000', 'help', 'en', 'b', 'GSM-7', 1, 1, 'SENT', 'k' || i,"
            " now() - (i || ' minutes')::interval, now() FROM generate_series(1, 20000) i"), {"coop": coop})
        await conn.execute(text("ANALYZE ussd_sessions"))
        await conn.execute(text("ANALYZE sms_messages"))
    hers = _Hers("00000000-0000-4000-8000-0000000000aa", coop, "f" * 64, utcnow())
    statements = [
        update(UssdSession).where(hers.rows(UssdSession.member_id, UssdSession.cooperative_id,
                                            UssdSession.phone_index, UssdSession.started_at, no_cooperative=True))
        .values(phone_index=""),
        update(SmsMessage).where(hers.rows(SmsMessage.member_id, SmsMessage.cooperative_id, SmsMessage.phone_index,
                                           SmsMessage.created_at, no_cooperative=True))
        .values(phone_index=""),
    ]
    async with rt.engine.connect() as conn:
        for statement in statements:
            plan = "\n".join((await conn.execute(_explain(statement))).scalars())
            assert "Seq Scan" not in plan, plan
        await conn.rollback()


def _explain(statement: Any) -> Any:
    from sqlalchemy.dialects import postgresql

    compiled = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    return text(f"EXPLAIN {compiled}")
