"""Migration 0022: a provider's transaction id finds its payment (ix_payments_transaction_id) and its refund
(ix_refunds_transaction_id). Without them every M-Pesa callback (found by the provider's id), every statement line
recorded (transaction_id_free), every completion's probe (_held_elsewhere), a refund's callback and the support desk's
search (GET /v1/payments?gatewayTransactionId=) read the whole table."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select, text

from tests.conftest import make_settings, requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip
from tests.core.test_growth_indexes import pg_indexes

INDEXES = {
    "ix_payments_transaction_id":
        "payments (provider_transaction_id, provider) WHERE (provider_transaction_id IS NOT NULL)",
    "ix_refunds_transaction_id": "refunds (provider_transaction_id) WHERE (provider_transaction_id IS NOT NULL)",
}


@requires_pg
async def test_0022_indexes_come_and_go_with_the_revision(migrated_database: str) -> None:
    import asyncpg
    from alembic import command

    from main import _alembic_config, migrate

    await check_comes_and_goes(migrated_database, INDEXES, "0022", "0021")
    settings = make_settings()
    cfg = _alembic_config(settings)
    conn = await asyncpg.connect(migrated_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        # Run again over a build an interruption left INVALID: dropped and built again.
        await asyncio.to_thread(command.downgrade, cfg, "0021")
        await conn.execute("CREATE INDEX ix_payments_transaction_id ON payments (provider)")
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
                           "'ix_payments_transaction_id'::regclass")
        await asyncio.to_thread(command.upgrade, cfg, "0022")
        assert await pg_indexes(conn, list(INDEXES)) == {name: (True, d) for name, d in INDEXES.items()}
    finally:
        await conn.close()
        await asyncio.to_thread(migrate, settings)  # at head again, whatever happened


def test_0022_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    after = check_sqlite_round_trip(tmp_path, list(INDEXES), "0021")
    assert all("WHERE provider_transaction_id IS NOT NULL" in after[name] for name in INDEXES)


async def _fill(rt: Any, demo: dict[str, Any], n: int) -> None:
    """`n` payments, most holding a provider's id (MTN's, M-Pesa's), a few none yet; a refund for one in ten."""
    ptype = next(iter(demo["payment_types"].values()))
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, provider_transaction_id,"
            " payment_account_enc, payment_account_index, payment_account_masked, idempotency_key, request_hash,"
            " channel, mismatch, late, expires_at, created_at, updated_at)"
            " SELECT md5('p' || i)::uuid::text, :coop, :ptype, 'PAY_T22_' || i, 50000, 'RWF', 0, 0, 'COMPLETED',"
            " 'MOBILE_MONEY_MTN', CASE WHEN i % 3 = 0 THEN 'mpesa' ELSE 'mtn_momo' END, 'pr-' || i,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE 'TX' || i END, 'x', 'acct' || (i % 50), '+25078****000',"
            " 'idem-t22-' || i, 'h', 'api', false, false, now(), now(), now() FROM generate_series(1, :n) i"),
            {"coop": demo["cooperative_id"], "ptype": ptype, "n": n})
        await conn.execute(text(
            "INSERT INTO refunds (id, cooperative_id, payment_id, reference, amount_minor, currency, status,"
            " idempotency_key, provider_reference, provider_transaction_id, returned_by_provider, created_at,"
            " updated_at) SELECT gen_random_uuid()::text, :coop, md5('p' || i)::uuid::text, 'REF_T22_' || i, 100,"
            " 'RWF', 'COMPLETED', 'k' || i, 'rr-' || i, 'RTX' || i, false, now(), now()"
            " FROM generate_series(10, :n, 10) i"), {"coop": demo["cooperative_id"], "n": n})
        for table in ("payments", "refunds"):
            await conn.execute(text(f"ANALYZE {table}"))


@requires_pg
async def test_the_lookups_by_the_providers_id_read_the_indexes(rt: Any, demo: dict[str, Any]) -> None:
    """On 20,000 payments: an M-Pesa callback's payment (the statement that stores the callback and locks it), a
    statement line's and a completion's probe, the support desk's search, a refund's callback and a recorded
    reversal's probe are index scans, not reads of the table."""
    from core.models import Payment, Refund
    from core.ports import EventKind, ProviderOutcome
    from core.ports import ProviderEvent as ProviderEventData
    from core.refunds import _refund_of_event
    from tests.core.test_member_rows_indexes import _explain

    await _fill(rt, demo, 20000)
    callback = ProviderEventData(provider="mpesa", event_id="e1", reference="RTX990", kind=EventKind.REFUND,
                                 outcome=ProviderOutcome.SUCCEEDED, raw={"lookup": "provider_transaction_id"})
    probe = (select(Payment.id, Payment.reference, Payment.cooperative_id)
             .where(Payment.provider == "mtn_momo", Payment.provider_transaction_id == "TX7", Payment.id != "x")
             .order_by(Payment.created_at, Payment.id).limit(1))
    reversal = (select(Refund.reference).join(Payment, Payment.id == Refund.payment_id)
                .where(Payment.provider == "mpesa", Refund.provider_transaction_id == "RTX990").limit(1))
    search = select(Payment).where(Payment.cooperative_id == demo["cooperative_id"],
                                   Payment.provider_transaction_id == "TX7").order_by(Payment.created_at.desc())
    # core.provider_events._find_payment's, and stored_and_locked's WHERE (an M-Pesa callback's payment).
    found = select(Payment).where(Payment.provider == "mpesa", Payment.provider_transaction_id == "TX9")
    async with rt.engine.connect() as conn:
        for query, index in ((probe, "ix_payments_transaction_id"), (search, "ix_payments_transaction_id"),
                             (found, "ix_payments_transaction_id"),
                             (_refund_of_event(callback), "ix_refunds_transaction_id"),
                             (reversal, "ix_refunds_transaction_id")):
            plan = "\n".join((await conn.execute(_explain(query))).scalars())
            assert index in plan and "Seq Scan on payments" not in plan and "Seq Scan on refunds" not in plan, plan
