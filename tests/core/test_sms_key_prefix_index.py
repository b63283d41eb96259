"""Migration 0021: a payment's SMS are found by their key's prefix through ix_sms_messages_key_prefix
(idempotency_key text_pattern_ops): the key's unique index compares in the database's collation, which LIKE cannot
read by prefix, so without it GET /v1/payments/{id}/messages read the whole table."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select, text

from tests.conftest import make_settings, requires_pg
from tests.core.test_growth_indexes import pg_indexes, sqlite_indexes

INDEX = {"ix_sms_messages_key_prefix": "sms_messages (idempotency_key text_pattern_ops)"}


@requires_pg
async def test_0021_index_comes_and_goes_with_the_revision(migrated_database: str) -> None:
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert await pg_indexes(conn, list(INDEX)) == {name: (True, d) for name, d in INDEX.items()}
        await asyncio.to_thread(command.downgrade, cfg, "0020")
        assert await pg_indexes(conn, list(INDEX)) == {}
        await asyncio.to_thread(command.upgrade, cfg, "0021")
        assert await pg_indexes(conn, list(INDEX)) == {name: (True, d) for name, d in INDEX.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0021_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
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
        assert "ix_sms_messages_key_prefix" in after and _diff(url) == []
        command.downgrade(_alembic_config(settings), "0020")
        assert "ix_sms_messages_key_prefix" not in sqlite_indexes(engine)
        migrate(settings)
        assert sqlite_indexes(engine) == after and _diff(url) == []
    finally:
        engine.dispose()


@requires_pg
async def test_a_payments_messages_are_read_through_the_index(rt: Any, demo: dict[str, Any]) -> None:
    """On 20,000 texts of 5,000 payments, the page and its count read the index, not the table."""
    from admin_api.messages import of_payment
    from core.models import SmsMessage
    from tests.core.test_member_rows_indexes import _explain

    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO sms_messages (id, cooperative_id, member_id, phone_enc, phone_index, phone_masked, template,"
            " language, body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, NULL, NULL, 'x', md5(i::text), '+25078****000', 'payment_receipt',"
            " 'en', 'b', 'GSM-7', 1, 1, 'SENT', CASE i % 4 WHEN 0 THEN 'payment_receipt:' || p"
            " WHEN 1 THEN 'ussd-receipt:' || p || chr(58) || i WHEN 2 THEN 'reply:' || p || chr(58) || 'in' || i"
            " ELSE 'payment_reminder:' || md5(i::text) END, now() - (i || ' seconds')::interval, now()"
            " FROM (SELECT i, md5((i / 4)::text)::uuid::text AS p FROM generate_series(1, 20000) i) s"))
        await conn.execute(text("ANALYZE sms_messages"))
        payment = (await conn.execute(text("SELECT md5('1234')::uuid::text"))).scalar_one()
    query = select(SmsMessage).where(of_payment(payment)).order_by(SmsMessage.created_at.desc()).limit(10)
    async with rt.engine.connect() as conn:
        plan = "\n".join((await conn.execute(_explain(query))).scalars())
        assert "ix_sms_messages_key_prefix" in plan and "Seq Scan" not in plan, plan
        assert len((await conn.execute(query)).all()) == 3
