"""Migration 0035: a payment type's payments are found through ix_payments_type_created (the type, creation, then
the cooperative: the list filtered by paymentTypeId, a cooperative admin's or a super admin's). Built on a database
holding payments, gone at 0034, the same again at 0035; on SQLite the revision goes down and up again with the
models and the migrations agreeing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tests.admin_api.conftest import bearer, make_payment
from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_payments_type_created": "payments (payment_type_id, created_at, cooperative_id)"}


@requires_pg
async def test_0035_index_comes_and_goes_with_the_revision_on_a_database_with_payments(
        rt: Any, client: Any, demo: dict[str, Any], migrated_database: str) -> None:
    admin = await bearer(client, *demo["admin"])
    await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await make_payment(admin, demo["payment_types"]["Water"], amount=5000, paymentAccount="+250788000002")
    await check_comes_and_goes(migrated_database, INDEX, "0035", "0034")
    async with rt.engine.connect() as conn:
        kept = (await conn.execute(text("SELECT count(DISTINCT payment_type_id) FROM payments"))).scalar_one()
    assert kept == 2


def test_0035_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    after = check_sqlite_round_trip(tmp_path, list(INDEX), "0034")
    assert after["ix_payments_type_created"].endswith("(payment_type_id, created_at, cooperative_id)")
