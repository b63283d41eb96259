"""Migration 0021: a payment's SMS are found by their key's prefix through ix_sms_messages_key_prefix
(idempotency_key text_pattern_ops): the key's unique index compares in the database's collation, which LIKE cannot
read by prefix, so without it GET /v1/payments/{id}/messages read the whole table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text

from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_sms_messages_key_prefix": "sms_messages (idempotency_key text_pattern_ops)"}


def _explain(statement: Any) -> Any:
    """EXPLAIN of the statement with its values written in (the keys' ":<step>" escaped, not read as binds)."""
    from sqlalchemy.dialects import postgresql

    compiled = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    return text("EXPLAIN " + str(compiled).replace(":", "\\:"))


async def _payment(rt: Any, conn: Any, payment_id: str, refunds: Sequence[str] = (), disputes: Sequence[str] = ()
                   ) -> None:
    """A payment of id `payment_id`, with refunds and disputes of those ids (their notices are read from them)."""
    from tests.core import factories

    async with rt.sessionmaker.begin() as session:
        made = await factories.payment(session, await factories.cooperative(session))
    await conn.execute(text("UPDATE payments SET id = :new WHERE id = :old"), {"new": payment_id, "old": made.id})
    for i, refund in enumerate(refunds):
        await conn.execute(text(
            "INSERT INTO refunds (id, cooperative_id, payment_id, reference, amount_minor, currency, status,"
            " idempotency_key, provider_reference, created_at, updated_at, returned_by_provider)"
            " VALUES (:id, :coop, :payment, :ref, 1, 'RWF', 'COMPLETED', :ref, :ref, now(), now(), false)"),
            {"id": refund, "coop": made.cooperative_id, "payment": payment_id, "ref": f"RF{i}"})
    for i, dispute in enumerate(disputes):
        await conn.execute(text(
            "INSERT INTO disputes (id, cooperative_id, payment_id, reference, reason, status, channel, notes,"
            " created_at, updated_at) VALUES (:id, :coop, :payment, :ref, 'OTHER', 'OPEN', 'api', '[]', now(), now())"),
            {"id": dispute, "coop": made.cooperative_id, "payment": payment_id, "ref": f"DSP{i}"})
    await conn.execute(text("ANALYZE refunds"))
    await conn.execute(text("ANALYZE disputes"))


@requires_pg
async def test_0021_index_comes_and_goes_with_the_revision(migrated_database: str) -> None:
    await check_comes_and_goes(migrated_database, INDEX, "0021", "0020")


def test_0021_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    check_sqlite_round_trip(tmp_path, list(INDEX), "0020")


@requires_pg
async def test_a_payments_messages_are_read_through_the_index(rt: Any, demo: dict[str, Any]) -> None:
    """On 20,000 texts of 5,000 payments, the page and its count read the index, not the table."""
    from admin_api.messages import of_payment
    from core.models import SmsMessage

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
        await _payment(rt, conn, payment)
    query = select(SmsMessage).where(of_payment(payment)).order_by(SmsMessage.created_at.desc()).limit(10)
    async with rt.engine.connect() as conn:
        plan = "\n".join((await conn.execute(_explain(query))).scalars())
        assert "ix_sms_messages_key_prefix" in plan and "Seq Scan on sms_messages" not in plan, plan
        assert len((await conn.execute(query)).all()) == 3


@requires_pg
async def test_a_payments_refund_notices_are_read_through_an_index(rt: Any, demo: dict[str, Any]) -> None:
    """Its refunds' notices ("refund_completed:<refund id>"), among 20,000 texts, are found by their exact keys
    alongside the payment's own, not by reading the table."""
    from admin_api.messages import of_payment
    from core.models import SmsMessage

    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO sms_messages (id, cooperative_id, member_id, phone_enc, phone_index, phone_masked, template,"
            " language, body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, NULL, NULL, 'x', md5(i::text), '+25078****000', t, 'en', 'b', 'GSM-7',"
            " 1, 1, 'SENT', t || chr(58) || md5(i::text)::uuid::text, now() - (i || ' seconds')::interval, now()"
            " FROM (SELECT i, CASE i % 3 WHEN 0 THEN 'payment_receipt' WHEN 1 THEN 'refund_completed'"
            " ELSE 'refund_failed' END AS t FROM generate_series(1, 20000) i) s"))
        await conn.execute(text("ANALYZE sms_messages"))
        payment, *refunds = (await conn.execute(text(
            "SELECT md5(i::text)::uuid::text FROM unnest(ARRAY[3, 1, 4, 5]) i"))).scalars()
        await _payment(rt, conn, payment, refunds)
    query = select(SmsMessage).where(of_payment(payment)).order_by(SmsMessage.created_at.desc()).limit(10)
    async with rt.engine.connect() as conn:
        plan = "\n".join((await conn.execute(_explain(query))).scalars())
        assert "Seq Scan on sms_messages" not in plan and "Index" in plan, plan
        found = (await conn.execute(query)).scalars().all()
    assert len(found) == 4  # the receipt, refund_completed of 1 and 4, refund_failed of 5


@requires_pg
async def test_a_payments_dispute_sms_are_read_through_an_index(rt: Any, demo: dict[str, Any]) -> None:
    """Its disputes' SMS ("dispute_updated:<dispute id>:<step>", every step's key), among 20,000 texts, are found
    by their exact keys alongside the payment's own and its refunds', not by reading the table."""
    from admin_api.messages import of_payment
    from core.models import SmsMessage

    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO sms_messages (id, cooperative_id, member_id, phone_enc, phone_index, phone_masked, template,"
            " language, body, encoding, length, segments, status, idempotency_key, created_at, updated_at)"
            " SELECT gen_random_uuid()::text, NULL, NULL, 'x', md5(i::text), '+25078****000', t, 'en', 'b', 'GSM-7',"
            " 1, 1, 'SENT', t || chr(58) || md5(i::text)::uuid::text || s, now() - (i || ' seconds')::interval, now()"
            " FROM (SELECT i, CASE i % 4 WHEN 0 THEN 'payment_receipt' WHEN 1 THEN 'dispute_opened'"
            " WHEN 2 THEN 'dispute_updated' ELSE 'refund_completed' END AS t,"
            " CASE i % 4 WHEN 1 THEN chr(58) || 'opened' WHEN 2 THEN chr(58) || 'under_review' ELSE '' END AS s"
            " FROM generate_series(1, 20000) i) s"))
        await conn.execute(text("ANALYZE sms_messages"))
        payment, refund, *disputes = (await conn.execute(text(
            "SELECT md5(i::text)::uuid::text FROM unnest(ARRAY[4, 3, 1, 6, 9]) i"))).scalars()
        await _payment(rt, conn, payment, [refund], disputes)
    query = (select(SmsMessage).where(of_payment(payment))
             .order_by(SmsMessage.created_at.desc()).limit(10))
    async with rt.engine.connect() as conn:
        plan = "\n".join((await conn.execute(_explain(query))).scalars())
        assert "Seq Scan on sms_messages" not in plan and "Index" in plan, plan
        found = (await conn.execute(query)).scalars().all()
    # The receipt, the refund's notice, the opening of 1 and 9, the review of 6.
    assert len(found) == 5
