"""Migration 0025: a member's disputes are found through ix_disputes_member (partial: disputes of no member are no
entry). The support desk lists the disputes of a member who calls about hers (GET /v1/disputes?member=); without the
index each list read every dispute of the cooperative."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text

from tests.admin_api.conftest import bearer, make_payment
from tests.conftest import requires_pg
from tests.core.revision_indexes import check_comes_and_goes, check_sqlite_round_trip

INDEX = {"ix_disputes_member": "disputes (member_id) WHERE (member_id IS NOT NULL)"}


@requires_pg
async def test_0025_index_comes_and_goes_with_the_revision(migrated_database: str) -> None:
    await check_comes_and_goes(migrated_database, INDEX, "0025", "0024")


def test_0025_downgrades_and_upgrades_again_on_sqlite(tmp_path: Any) -> None:
    after = check_sqlite_round_trip(tmp_path, list(INDEX), "0024")
    assert after["ix_disputes_member"].endswith("WHERE member_id IS NOT NULL")


@requires_pg
async def test_a_members_disputes_are_listed_through_the_index(rt: Any, client: Any, demo: dict[str, Any]) -> None:
    """20,000 disputes of other members and of no member, two of hers: the list's page and its count (the statements
    GET /v1/disputes?member= sends, as sent) read the index, not the whole table."""
    admin = await bearer(client, *demo["admin"])
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    others, her = list(demo["members"].values())[:2]
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO disputes (id, cooperative_id, payment_id, member_id, reference, reason, status, channel,"
            " notes, created_at, updated_at) SELECT gen_random_uuid()::text, :coop, :payment,"
            " CASE WHEN g % 2 = 0 THEN :others END, 'DSP_' || g, 'OTHER',"
            " CASE WHEN g <= 2 OR g % 3 = 0 THEN 'OPEN' ELSE 'RESOLVED' END, 'api', '[]'::jsonb,"
            " now() - g * interval '1 minute', now() FROM generate_series(1, 20002) g"),
            {"coop": demo["cooperative_id"], "payment": paid["id"], "others": others})
        # The two newest are hers.
        await conn.execute(text("UPDATE disputes SET member_id = :her WHERE reference IN ('DSP_1', 'DSP_2')"),
                           {"her": her})
        await conn.execute(text("ANALYZE disputes"))
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if "FROM disputes" in statement:
            seen.append((statement, parameters))

    event.listen(rt.engine.sync_engine, "before_cursor_execute", capture)
    try:
        listed = await admin.json("GET", f"/v1/disputes?member={her}", 200)
    finally:
        event.remove(rt.engine.sync_engine, "before_cursor_execute", capture)
    assert [d["reference"] for d in listed["data"]] == ["DSP_1", "DSP_2"]
    assert listed["meta"]["total"] == 2
    assert len(seen) == 2, seen  # the count and the page
    async with rt.engine.connect() as conn:
        for statement, parameters in seen:
            plan = "\n".join(row[0] for row in await conn.exec_driver_sql(f"EXPLAIN {statement}", tuple(parameters)))
            assert "ix_disputes_member" in plan and "Seq Scan on disputes" not in plan, plan
        await conn.rollback()
