"""Migration 0027: a period's payments that name their due date are found through ix_payments_coop_type_due
(partial: a payment naming no due date is no entry). Built on a database holding payments, gone at 0026, the same
again at 0027; on SQLite the revision goes down and up again with the models and the migrations agreeing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tests.admin_api.conftest import bearer, make_payment
from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_payments_coop_type_due":
         "payments (cooperative_id, payment_type_id, due_date) WHERE (due_date IS NOT NULL)"}


@requires_pg
async def test_0027_index_comes_and_goes_with_the_revision_on_a_database_with_payments(
        rt: Any, client: Any, demo: dict[str, Any], migrated_database: str) -> None:
    admin = await bearer(client, *demo["admin"])
    rent = demo["payment_types"]["Monthly Rent"]
    await make_payment(admin, rent, dueDate="2026-11-01")
    await make_payment(admin, rent, paymentAccount="+250788000002")
    await check_comes_and_goes(migrated_database, INDEX, "0027", "0026")
    async with rt.engine.connect() as conn:
        kept = (await conn.execute(text("SELECT count(*), count(due_date) FROM payments"))).one()
    assert tuple(kept) == (2, 1)


def test_0027_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    after = check_sqlite_round_trip(tmp_path, list(INDEX), "0026")
    assert after["ix_payments_coop_type_due"].endswith("WHERE due_date IS NOT NULL")
