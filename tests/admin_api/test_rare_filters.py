"""Lists filtered by something a few rows have read those rows through an index, not the table: the audit log by an
entityId given without its entityType (under each entity type the log holds: ix_audit_entity leads with the type),
the payments of a bank method (ix_payments_bank_method, migration 0032, partial: bank payments only) and those of a
payment type (ix_payments_type_created, migration 0035). The rows answered are the ones the filter names, as before
(SQLite and PostgreSQL); on PostgreSQL the plans are pinned on data enough for the planner to choose (a page and its
count), even in a plan cached for a prepared statement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select, text, update

from core.db import utcnow
from core.models import AuditEvent, Payment
from tests.admin_api.conftest import Caller, make_payment
from tests.conftest import requires_pg


@contextlib.contextmanager
def _statements(rt: Any) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))

    event.listen(rt.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(rt.engine.sync_engine, "before_cursor_execute", before)


def _literal(value: Any) -> str:
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


async def _plans(rt: Any, statements: list[tuple[str, Any]], custom: bool = False) -> list[str]:
    """Each statement's plan as PostgreSQL would cache it for a prepared statement (generic: its parameters
    unknown), or with `custom` as it plans it for the values sent, sequential scans ruled out so that a missing index
    shows on a small table."""
    plans = []
    async with rt.engine.connect() as conn:
        await conn.exec_driver_sql("SET enable_seqscan = off")
        await conn.exec_driver_sql(f"SET plan_cache_mode = force_{'custom' if custom else 'generic'}_plan")
        for n, (statement, parameters) in enumerate(statements):
            # A generic plan holds for any values: EXECUTE takes no bound ones, so NULLs stand for them (a custom
            # plan's are the values sent).
            await conn.exec_driver_sql(f"PREPARE read_{n} AS {statement}")
            values = ", ".join(_literal(v) if custom else "NULL" for v in parameters)
            execute = f"EXECUTE read_{n}({values})" if parameters else f"EXECUTE read_{n}"
            plans.append("\n".join((await conn.exec_driver_sql(f"EXPLAIN {execute}")).scalars().all()))
            await conn.exec_driver_sql(f"DEALLOCATE read_{n}")  # session-wide: the pooled connection is used again
        await conn.rollback()
    return plans


async def _ids(caller: Caller, query: str) -> tuple[list[Any], int]:
    page = await caller.json("GET", query, 200)
    return [row["id"] for row in page["data"]], page["meta"]["total"]


# --- the audit log by entityId ----------------------------------------------------------------------------------------

async def test_an_entity_id_alone_finds_its_rows_of_every_type_and_no_other(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    pid = payment["id"]
    async with rt.sessionmaker.begin() as s:
        s.add_all([
            # A type no release writes any more, under the same id; another cooperative's row of it; another id.
            AuditEvent(cooperative_id=demo["cooperative_id"], actor="system", channel="system", action="legacy.noted",
                       entity_type="legacy_thing", entity_id=pid, at=utcnow()),
            AuditEvent(cooperative_id=coop_b["cooperative_id"], actor="system", channel="system",
                       action="zz.noted", entity_type="zz_last", entity_id=pid, at=utcnow()),
            AuditEvent(cooperative_id=demo["cooperative_id"], actor="system", channel="system", action="aa.noted",
                       entity_type="aa_first", entity_id="not-the-payment", at=utcnow()),
        ])
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent.id, AuditEvent.cooperative_id, AuditEvent.entity_type)
                                .where(AuditEvent.entity_id == pid)
                                .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()))).all()
    assert {t for _, _, t in rows} == {"payment", "legacy_thing", "zz_last"}

    assert await _ids(superadmin, f"/v1/audit-events?entityId={pid}&limit=100") == ([r[0] for r in rows], len(rows))
    ours = [r[0] for r in rows if r[1] == demo["cooperative_id"]]
    assert await _ids(admin, f"/v1/audit-events?entityId={pid.upper()}&limit=100") == (ours, len(ours))
    assert await _ids(superadmin, f"/v1/audit-events?entityId={pid}&entityType=legacy_thing") == (
        [r[0] for r in rows if r[2] == "legacy_thing"], 1)
    assert await _ids(superadmin, "/v1/audit-events?entityId=nothing-has-this-id") == ([], 0)


@requires_pg
async def test_an_entity_id_alone_is_looked_up_by_the_entity_index_under_each_type(
        rt: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO audit_events (cooperative_id, actor, channel, action, entity_type, entity_id, at)"
            " SELECT :coop, 'system', 'system', 'x.noted', (ARRAY['payment', 'member', 'sms', 'user'])[1 + i % 4],"
            " 'e-' || (i % 5000), now() - i * interval '1 minute' FROM generate_series(1, 20000) i"),
            {"coop": demo["cooperative_id"]})
        await conn.execute(text("ANALYZE audit_events"))
    for caller in (admin, superadmin):
        with _statements(rt) as sent:
            page = await caller.json("GET", "/v1/audit-events?entityId=e-42", 200)
        assert page["meta"]["total"] == 4
        ours = [(s, p) for s, p in sent if "audit_events.entity_id =" in s]
        plans = await _plans(rt, ours)
        assert len(plans) == 2, plans  # the count and the page (the types are read before: one probe each)
        for plan in plans:
            by_id = [line for line in plan.splitlines() if "Index Cond" in line and "entity_id" in line]
            # The id is looked up under a type (the index's leading column), never across the whole index.
            assert by_id and all("entity_type" in line for line in by_id), plan


# --- payments by method -----------------------------------------------------------------------------------------------

async def test_a_bank_methods_payments_are_listed_newest_first_and_no_other(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    made = [(await make_payment(admin, rent))["id"] for _ in range(5)]
    theirs = (await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000))["id"]
    banks = {made[0]: "BANK_BK", made[2]: "BANK_BK", made[3]: "BANK_ECOBANK", theirs: "BANK_BK"}
    async with rt.sessionmaker.begin() as s:
        for pid, method in banks.items():
            await s.execute(update(Payment).where(Payment.id == pid).values(method=method))
    assert await _ids(admin, "/v1/payments?paymentMethod=BANK_BK") == ([made[2], made[0]], 2)
    assert await _ids(admin, "/v1/payments?paymentMethod=BANK_ECOBANK") == ([made[3]], 1)
    assert await _ids(admin, "/v1/payments?paymentMethod=BANK_IM") == ([], 0)
    assert await _ids(superadmin, "/v1/payments?paymentMethod=BANK_BK") == ([theirs, made[2], made[0]], 3)
    assert await _ids(superadmin, f"/v1/payments?paymentMethod=BANK_BK&cooperativeId={coop_b['cooperative_id']}") == (
        [theirs], 1)
    async with rt.sessionmaker() as s:
        wallet = list((await s.execute(select(Payment.id).where(
            Payment.cooperative_id == demo["cooperative_id"], Payment.method == "MOBILE_MONEY_MTN")
            .order_by(Payment.created_at.desc(), Payment.id.desc()))).scalars())
    assert {made[1], made[4]} <= set(wallet)
    assert await _ids(admin, "/v1/payments?paymentMethod=MOBILE_MONEY_MTN&limit=100") == (wallet, len(wallet))


@requires_pg
async def test_a_bank_methods_list_reads_its_partial_index(
        rt: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    """Two cooperatives' 4,000 payments, one in two hundred by BANK_ECOBANK: the count reads the bank payments'
    index alone, for a cooperative admin and a super admin, and so does the cooperative's page. The method is
    inline in the SQL: a plan cached for the statement (generic) proves the index's predicate as well."""
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at)"
            " SELECT md5('pm-' || i)::uuid::text, CASE WHEN i % 2 = 0 THEN :coop ELSE :other END,"
            " CASE WHEN i % 2 = 0 THEN :ptype ELSE :other_type END, 'PAY_PM_' || i, 50000, 'RWF', 0, 0, 'COMPLETED',"
            " CASE WHEN i % 200 < 2 THEN 'BANK_ECOBANK' WHEN i % 3 = 0 THEN 'MOBILE_MONEY_AIRTEL'"
            " ELSE 'MOBILE_MONEY_MTN' END, 'mtn_momo', 'pm-' || i, 'x', 'acct' || (i % 50), '+25078****000',"
            " 'idem-pm-' || i, 'h', 'ussd', false, false, t, t, t"
            " FROM (SELECT i, now() - (4000 - i) * interval '2 hours' AS t FROM generate_series(1, 4000) i) s"),
            {"coop": demo["cooperative_id"], "other": coop_b["cooperative_id"],
             "ptype": demo["payment_types"]["Monthly Rent"], "other_type": coop_b["payment_type_id"]})
        await conn.execute(text("ANALYZE payments"))
    for caller, theirs in ((admin, 20), (superadmin, 40)):
        with _statements(rt) as sent:
            assert (await caller.json("GET", "/v1/payments?paymentMethod=BANK_ECOBANK", 200))["meta"]["total"] == theirs
        ours = [(s, p) for s, p in sent if "FROM payments" in s]
        count, page = await _plans(rt, ours)
        assert "ix_payments_bank_method" in count, count
        if caller is admin:
            assert "ix_payments_bank_method" in page, page


# --- payments by type -------------------------------------------------------------------------------------------------

@requires_pg
async def test_a_payment_types_list_reads_the_type_index(
        rt: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    """Two cooperatives' 20,000 payments, one of the cooperative's in five hundred of Monthly Rent: its count reads
    ix_payments_type_created (migration 0035), for a cooperative admin and a super admin, with a status too, even in
    a plan cached for the statement (generic); so does its page, as planned for the type asked for (PostgreSQL keeps
    planning so while a cached plan would cost more). Without it the count read the table and the page walked the
    payments from the newest until twenty were of the type."""
    async with rt.engine.begin() as conn:
        # The other cooperative's payments of twelve types: a cached plan estimates a type's rows by how many the
        # table names (a deployment's cooperatives have a few each), not by the type asked for.
        await conn.execute(text(
            "INSERT INTO payment_types (id, cooperative_id, name, amount_minor, currency, allow_custom_amount,"
            " is_recurring, is_active, created_at, updated_at) SELECT md5('ptt-' || k)::uuid::text, :other,"
            " 'Levy ' || k, 50000, 'RWF', true, false, true, now(), now() FROM generate_series(0, 11) k"),
            {"other": coop_b["cooperative_id"]})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at)"
            " SELECT md5('pt-' || i)::uuid::text, CASE WHEN i % 2 = 0 THEN :coop ELSE :other END,"
            " CASE WHEN i % 1000 = 0 THEN :rent WHEN i % 2 = 0 THEN :water ELSE md5('ptt-' || (i / 2 % 12))::uuid::text"
            " END, 'PAY_PT_' || i,"
            " 50000, 'RWF', 0, 0, CASE WHEN i % 3 = 0 THEN 'FAILED' ELSE 'COMPLETED' END, 'MOBILE_MONEY_MTN',"
            " 'mtn_momo', 'pt-' || i, 'x', 'acct' || (i % 50), '+25078****000', 'idem-pt-' || i, 'h', 'ussd', false,"
            " false, t, t, t"
            " FROM (SELECT i, now() - (20000 - i) * interval '24 minutes' AS t FROM generate_series(1, 20000) i) s"),
            {"coop": demo["cooperative_id"], "other": coop_b["cooperative_id"],
             "rent": demo["payment_types"]["Monthly Rent"], "water": demo["payment_types"]["Water"]})
        await conn.execute(text("ANALYZE payments"))
    rent = demo["payment_types"]["Monthly Rent"]
    for query, total in ((f"paymentTypeId={rent}", 20), (f"paymentTypeId={rent}&status=COMPLETED", 14)):
        for caller in (admin, superadmin):
            with _statements(rt) as sent:
                page = await caller.json("GET", f"/v1/payments?{query}", 200)
            assert page["meta"]["total"] == total and {p["paymentTypeId"] for p in page["data"]} == {rent}, query
            count, listed = [(s, p) for s, p in sent if "FROM payments" in s]
            assert "ix_payments_type_created" in (await _plans(rt, [count]))[0], query
            assert "ix_payments_type_created" in (await _plans(rt, [listed], custom=True))[0], query


# --- pages, counts and what the filters refuse --------------------------------------------------------------------

async def test_an_entity_ids_pages_and_count_agree_for_each_caller(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    """An id under three types and two cooperatives, paged one row at a time: the pages hold the rows of the whole
    list once each, in its order, and every page's total is the same, for a super admin and a cooperative's admin
    (who reads her cooperative's rows alone). With `entityType=` empty the id is still looked up under every type."""
    pid = (await make_payment(admin, demo["payment_types"]["Monthly Rent"]))["id"]
    async with rt.sessionmaker.begin() as s:
        s.add_all([AuditEvent(cooperative_id=coop, actor="system", channel="system", action=f"{kind}.noted",
                              entity_type=kind, entity_id=pid, at=utcnow())
                   for coop in (demo["cooperative_id"], coop_b["cooperative_id"]) for kind in ("member", "zz_last")])
    for caller, count in ((superadmin, 5), (admin, 3)):  # the payment's creation, and two types per cooperative
        whole = await _ids(caller, f"/v1/audit-events?entityId={pid}&limit=100")
        assert whole[1] == count == len(whole[0]), whole
        pages = [await _ids(caller, f"/v1/audit-events?entityId={pid}&limit=1&page={n}") for n in range(1, count + 2)]
        assert [i for ids, _ in pages for i in ids] == whole[0]
        assert {total for _, total in pages} == {count}
        assert await _ids(caller, f"/v1/audit-events?entityId={pid}&entityType=&limit=100") == whole


async def test_a_payment_method_outside_the_list_is_refused_and_a_sync_reads_a_bank_methods_rows(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """The method goes into the SQL as a literal: only one of METHODS gets there (400 for anything else, a quote
    included, with nothing listed). A sync by method (updatedFrom, then its cursor) lists that method's payments
    alone, each once, and pages through them as the plain list counts them."""
    for bad in ("BANK_BK'--", "bank_bk", "BANK_BK' OR '1'='1", ""):
        refused = await admin.req("GET", "/v1/payments", params={"paymentMethod": bad})
        assert refused.status == 400, (bad, refused.status, await refused.text())
    rent = demo["payment_types"]["Monthly Rent"]
    made = [(await make_payment(admin, rent))["id"] for _ in range(4)]
    async with rt.sessionmaker.begin() as s:
        for n, pid in enumerate(made):
            await s.execute(update(Payment).where(Payment.id == pid).values(
                method="BANK_IM" if n != 1 else "MOBILE_MONEY_MTN", updated_at=utcnow() - timedelta(minutes=10 - n)))
    banks = [pid for n, pid in enumerate(made) if n != 1]
    assert await _ids(admin, "/v1/payments?paymentMethod=BANK_IM&limit=100") == (banks[::-1], 3)
    seen, path = [], "/v1/payments?paymentMethod=BANK_IM&updatedFrom=2000-01-01T00:00:00Z&limit=2"
    while True:
        page = await admin.json("GET", path, 200)
        if not page["data"]:
            break
        seen += [row["id"] for row in page["data"]]
        path = f"/v1/payments?paymentMethod=BANK_IM&after={page['nextCursor']}&limit=2"
    assert seen == banks
