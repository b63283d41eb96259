"""The dues report (core.reminders.period_money) reads one period's payments through ix_payments_coop_type_due (those
naming its due date) and ix_payments_coop_created (those naming none), on its page, its count and totals, a status
filter and the CSV's batches: its condition on status and the approval window (core.payments.still_open, judged at
the read's moment) is checked on those rows, never the reason to read the cooperative's payments, or all of them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tests.admin_api.conftest import bearer
from tests.admin_api.test_reports_recorded_later import _statements  # every statement and its parameters
from tests.conftest import requires_pg

OTHER_COOP = "00000000-0000-4000-8000-000000000077"


@requires_pg
async def test_the_dues_report_reads_the_periods_payments_by_their_indexes(
        rt: Any, client: Any, demo: dict[str, Any]) -> None:
    """A year and more of two cooperatives' payments of every status, a third naming a due date: each statement of
    the report that reads payments is planned on the two indexes, with no walk of the table."""
    coop, rent = demo["cooperative_id"], demo["payment_types"]["Monthly Rent"]
    async with rt.engine.begin() as conn:
        await conn.execute(text("UPDATE payment_types SET created_at = '2025-01-05' WHERE cooperative_id = :c"),
                           {"c": coop})
        await conn.execute(text("UPDATE members SET created_at = '2025-01-05' WHERE cooperative_id = :c"),
                           {"c": coop})
        await conn.execute(text(
            "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration,"
            " created_at, updated_at) VALUES (:id, 'Other', 'OTHER77', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', true,"
            " now(), now())"), {"id": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, member_id, reference, amount_minor, currency,"
            " fee_minor, refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at, completed_at, due_date)"
            " SELECT 'p77-' || i, CASE WHEN i % 10 = 0 THEN :coop ELSE :other END, :ptype,"
            " CASE WHEN i % 10 = 0 THEN (SELECT id FROM members WHERE cooperative_id = :coop"
            "  ORDER BY id OFFSET (i / 10) % 5 LIMIT 1) END,"
            " 'PAY_T77_' || i, 50000, 'RWF', 0, 0,"
            " (ARRAY['COMPLETED', 'FAILED', 'EXPIRED', 'COMPLETED', 'PENDING', 'PROCESSING', 'CANCELLED',"
            "  'PARTIALLY_REFUNDED'])[1 + i % 8], 'MOBILE_MONEY_MTN', 'mtn_momo', 'pr77-' || i, 'x',"
            " 'acct' || (i % 50), '+25078****000', 'idem-t77-' || i, 'h', 'ussd', false, false,"
            " t + interval '2 minutes', t, t + interval '40 seconds', t + interval '30 seconds',"
            " CASE WHEN i % 3 = 0 THEN (date_trunc('month', t) + interval '1 month')::date END"
            " FROM (SELECT i, now() - (40000 - i) * interval '20 minutes' AS t"
            " FROM generate_series(1, 40000) i) s"), {"coop": coop, "other": OTHER_COOP, "ptype": rent})
        period = (await conn.execute(text(
            "SELECT to_char(date_trunc('month', now()) - interval '1 month', 'YYYY-MM-DD')"))).scalar_one()
        await conn.execute(text("ANALYZE payments"))
    admin = await bearer(client, *demo["admin"])
    query = f"paymentTypeId={rent}&period={period}"
    for path in (f"/v1/reports/dues?{query}", f"/v1/reports/dues?{query}&status=AWAITING_APPROVAL",
                 f"/v1/reports/dues.csv?{query}"):
        with _statements(rt) as sent:
            resp = await admin.req("GET", path)
            assert resp.status == 200, await resp.text()
            await resp.read()
        ours = [(s, p) for s, p in sent if "FROM payments" in s]
        assert len(ours) >= 2, (path, ours)  # the page and the totals; the CSV's ids and a batch
        async with rt.engine.connect() as conn:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            for statement, parameters in ours:
                plan = "\n".join((await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)).scalars().all())
                assert "ix_payments_coop_type_due" in plan and "ix_payments_coop_created" in plan, (path, plan)
                assert "Seq Scan on payments" not in plan, (path, plan)
            await conn.rollback()
