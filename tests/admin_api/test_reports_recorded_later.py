"""Money dated back into a month already reconciled is named in that month's report (`paymentsRecordedLater`): a bank
payment paid at 23:59:59 on the last day whose webhook came after midnight (the provider's own time dates it), or an
admin's statement line recorded with a `completedAt` in the month (POST /v1/payments/{id}/outcome). The month's
`settled` collections grow after the treasurer signed them off; neither payment is late or mismatched, so `flagged`
does not explain it. When the completion was recorded is read from the audit log (payment.completed, or
payment.success_after_failure for money taken after a failure), not from updated_at (a refund changes it later)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, select, text, update

from core.audit import Actor
from core.db import utcnow
from core.models import AuditEvent, Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import bearer, idem, make_payment
from tests.admin_api.test_chargeback_visibility import _last_month, _z
from tests.conftest import requires_pg


async def _report(admin: Any, start: datetime, end: datetime) -> dict[str, Any]:
    return await admin.json("GET", f"/v1/reports/reconciliation?from={_z(start)}&to={_z(end)}", 200)


async def _recorded_in_time(rt: Any, payment: dict[str, Any], completed: datetime, *, action: str = "payment.completed",
                            status: str = "COMPLETED") -> None:
    """What a payment whose money moved last month, and was recorded then, looks like: its completion audited at
    the time (the audit log takes no UPDATE, so the row is written as it was then)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment["id"]).values(
            status=status, created_at=completed - timedelta(minutes=1), completed_at=completed,
            collected_minor=payment["amount"] if status == "FAILED" else None, mismatch=status == "FAILED",
            provider_transaction_id=f"TX-{payment['id'][:8]}"))
        s.add(AuditEvent(cooperative_id=payment["cooperativeId"], actor="provider:mtn_momo", channel="provider",
                         action=action, entity_type="payment", entity_id=payment["id"], before=None, after=None,
                         at=completed))


async def _provider_says(rt: Any, payment_id: str, outcome: ProviderOutcome, *, provider: str,
                         when: datetime | None = None, amount: int | None = None) -> str:
    async with rt.sessionmaker.begin() as s:
        p = await s.get(Payment, payment_id)
        return await apply_collection_outcome(
            s, rt, p, outcome, actor=Actor(f"provider:{provider}", "provider"),
            amount=Money(amount, "RWF") if amount is not None else None,
            provider_transaction_id=f"TX-{payment_id[:8]}", reason=None if outcome is ProviderOutcome.SUCCEEDED
            else "declined", occurred_at=when)


async def _audited(admin: Any, payment_id: str, action: str) -> dict[str, Any]:
    rows = (await admin.json("GET", f"/v1/audit-events?entityType=payment&entityId={payment_id}&action={action}",
                             200))["data"]
    assert len(rows) == 1, rows
    return rows[0]


async def test_a_statement_line_recorded_into_a_closed_month_is_named_in_its_reconciliation(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Asked for two hours before the month ended; the provider's status query kept failing, so it stayed open past
    its window. Now the admin records it from MTN's statement, taken an hour before the end."""
    start, end = _last_month()
    on_time = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await _recorded_in_time(rt, on_time, start + timedelta(days=9))
    stuck = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == stuck["id"]).values(
            created_at=end - timedelta(hours=2), expires_at=end - timedelta(hours=2) + timedelta(minutes=5)))
    closed = await _report(admin, start, end)  # what the treasurer signed off
    assert [line["collected"] for line in closed["settled"]] == [50000]
    assert (closed["paymentsRecordedLater"], closed["paymentsRecordedLaterCount"]) == ([], 0)

    when = end - timedelta(hours=1)
    done = await admin.json("POST", f"/v1/payments/{stuck['id']}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-STMT-77", "note": "on MTN statement",
        "completedAt": when.isoformat()})
    assert done["completedAt"] == _z(when)
    reread = await _report(admin, start, end)
    assert [line["collected"] for line in reread["settled"]] == [100000]  # the signed-off month grew...
    completion = await _audited(admin, stuck["id"], "payment.completed")
    by = (await _audited(admin, stuck["id"], "payment.outcome_recorded"))["actor"]
    assert by.startswith("admin:") and completion["actor"] == by
    assert reread["paymentsRecordedLater"] == [{  # ...and says which payment grew it, when and by whom recorded
        "id": stuck["id"], "reference": stuck["reference"], "status": "COMPLETED", "provider": "mtn_momo",
        "paymentMethod": "MOBILE_MONEY_MTN", "amount": 50000, "collected": 50000, "currency": "RWF",
        "completedAt": _z(when), "createdAt": _z(end - timedelta(hours=2)), "recordedAt": completion["at"],
        "recordedBy": by, "late": False, "mismatch": False, "providerTransactionId": "MTN-STMT-77"}]
    assert reread["paymentsRecordedLaterCount"] == 1
    assert completion["at"] >= _z(end)
    assert reread["flagged"] == []  # neither late nor mismatched: nothing else in the report names it

    # A refund of it now changes its updated_at, not when its completion was recorded: still listed, once; and a
    # refund is this month's money, not last month's.
    await admin.json("POST", f"/v1/payments/{stuck['id']}/refunds", 201, json={"idempotencyKey": idem(),
                                                                                "amount": 10000})
    again = await _report(admin, start, end)
    assert [(p["id"], p["recordedAt"]) for p in again["paymentsRecordedLater"]] == [(stuck["id"], completion["at"])]
    # This month's report: its money is last month's, nothing to explain here.
    this_month = await admin.json("GET", f"/v1/reports/reconciliation?from={_z(end)}", 200)
    assert (this_month["paymentsRecordedLater"], this_month["paymentsRecordedLaterCount"]) == ([], 0)
    # Open-ended, nothing has closed: nothing recorded later.
    assert (await admin.json("GET", "/v1/reports/reconciliation", 200))["paymentsRecordedLater"] == []


async def test_a_webhook_after_midnight_dated_by_the_provider_is_named_and_a_repeat_report_is_not(
        admin: Any, rt: Any, demo: dict[str, Any], monkeypatch: Any) -> None:
    """A bank payment paid a second before the end (IremboPay's paidAt), its webhook recorded after it; money taken
    after a failure, first reported now and dated in the month; and money taken after a failure reported in time
    and again now (a second report changes nothing: not listed)."""
    from core import reports

    start, end = _last_month()
    bank = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                              paymentAccount="treasurer@example.rw")
    failed = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    for p, asked in ((bank, end - timedelta(minutes=10)), (failed, end - timedelta(hours=3))):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(created_at=asked))
    repeated = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await _recorded_in_time(rt, repeated, start + timedelta(days=3), action="payment.success_after_failure",
                            status="FAILED")
    closed = await _report(admin, start, end)
    assert sum(line["collected"] for line in closed["settled"]) == 5000
    assert closed["paymentsRecordedLater"] == []

    assert await _provider_says(rt, bank["id"], ProviderOutcome.SUCCEEDED, provider="irembopay",
                                when=end - timedelta(seconds=1)) == "completed"
    assert await _provider_says(rt, failed["id"], ProviderOutcome.FAILED, provider="mtn_momo") == "failed"
    assert await _provider_says(rt, failed["id"], ProviderOutcome.SUCCEEDED, provider="mtn_momo",
                                when=end - timedelta(minutes=30), amount=5000) == "flagged_success_after_failure"
    assert await _provider_says(rt, repeated["id"], ProviderOutcome.SUCCEEDED, provider="mtn_momo",
                                when=start + timedelta(days=4)) == "flagged_success_after_failure"

    report = await _report(admin, start, end)
    assert sum(line["collected"] for line in report["settled"]) == 5000 + 5000 + 50000
    listed = [(p["id"], p["status"], p["provider"], p["completedAt"], p["recordedBy"], p["mismatch"])
              for p in report["paymentsRecordedLater"]]
    assert listed == [
        (failed["id"], "FAILED", "mtn_momo", _z(end - timedelta(minutes=30)), "provider:mtn_momo", True),
        (bank["id"], "COMPLETED", "irembopay", _z(end - timedelta(seconds=1)), "provider:irembopay", False)]
    assert report["paymentsRecordedLaterCount"] == 2
    assert all(p["recordedAt"] >= _z(end) for p in report["paymentsRecordedLater"])
    assert bank["id"] not in {f["id"] for f in report["flagged"]}  # on time for the provider: not flagged

    # The cap: the list stops, the count still counts them all.
    monkeypatch.setattr(reports, "FLAGGED_LIMIT", 1)
    capped = await _report(admin, start, end)
    assert [p["id"] for p in capped["paymentsRecordedLater"]] == [failed["id"]]
    assert capped["paymentsRecordedLaterCount"] == 2


async def test_another_cooperatives_payment_recorded_later_is_not_listed(
        admin: Any, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any]) -> None:
    start, end = _last_month()
    theirs = await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == theirs["id"]).values(created_at=end - timedelta(hours=1)))
    await _provider_says(rt, theirs["id"], ProviderOutcome.SUCCEEDED, provider="mtn_momo",
                         when=end - timedelta(minutes=1))
    assert (await _report(admin, start, end))["paymentsRecordedLater"] == []
    assert [p["id"] for p in (await _report(coop_b["admin"], start, end))["paymentsRecordedLater"]] == [theirs["id"]]


# --- the plan on a year of data -------------------------------------------------------------------------------------

OTHER_COOP = "00000000-0000-4000-8000-000000000021"


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


@requires_pg
async def test_the_list_reads_the_months_completions_and_each_ones_audit_rows(
        rt: Any, client: Any, demo: dict[str, Any]) -> None:
    """A year of two cooperatives' payments, each with its audit rows: the list and its count start from the
    payments updated since shortly before the month ended (the updated_at indexes: a completion recorded after the
    end updated its payment then) and probe each one's audit rows by entity, for a cooperative admin and for a super
    admin; never one probe for each payment completed in the month (a year's report took seconds so), nor a walk of
    the audit log since the month ended."""
    coop = demo["cooperative_id"]
    ptype = next(iter(demo["payment_types"].values()))
    async with rt.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO cooperatives (id, name, short_code, country, currency, timezone, status, self_registration,"
            " created_at, updated_at) VALUES (:id, 'Other', 'OTHER21', 'RW', 'RWF', 'Africa/Kigali', 'ACTIVE', true,"
            " now(), now())"), {"id": OTHER_COOP})
        await conn.execute(text(
            "INSERT INTO payments (id, cooperative_id, payment_type_id, reference, amount_minor, currency, fee_minor,"
            " refunded_minor, status, method, provider, provider_reference, payment_account_enc,"
            " payment_account_index, payment_account_masked, idempotency_key, request_hash, channel, mismatch, late,"
            " expires_at, created_at, updated_at, completed_at)"
            " SELECT 'p21-' || i, CASE WHEN i % 10 = 0 THEN :coop ELSE :other END, :ptype,"
            " 'PAY_T21_' || i, 50000, 'RWF', 0, 0, 'COMPLETED', 'MOBILE_MONEY_MTN', 'mtn_momo', 'pr21-' || i, 'x',"
            " 'acct' || (i % 50), '+25078****000', 'idem-t21-' || i, 'h', 'ussd', false, false,"
            " t, t, t + interval '40 seconds', t + interval '30 seconds'"
            " FROM (SELECT i, now() - (4000 - i) * interval '2 hours' AS t FROM generate_series(1, 4000) i) s"),
            {"coop": coop, "other": OTHER_COOP, "ptype": ptype})
        await conn.execute(text(
            "INSERT INTO audit_events (cooperative_id, actor, channel, action, entity_type, entity_id, at)"
            " SELECT p.cooperative_id, 'provider:mtn_momo', 'provider', a.action, 'payment', p.id,"
            " p.created_at + a.after FROM payments p CROSS JOIN (VALUES ('payment.created', interval '0'),"
            " ('payment.processing', interval '5 seconds'), ('payment.completed', interval '40 seconds')) a(action,"
            " after) WHERE p.id LIKE 'p21-%'"))
        for table in ("payments", "audit_events"):
            await conn.execute(text(f"ANALYZE {table}"))
    admin, root = await bearer(client, *demo["admin"]), await bearer(client, *demo["super_admin"])
    now = utcnow()
    end = datetime(now.year, now.month, 1, tzinfo=UTC) - timedelta(days=150)
    start = end - timedelta(days=30)
    for caller in (admin, root):
        with _statements(rt) as sent:
            await caller.json("GET", f"/v1/reports/reconciliation?from={_z(start)}&to={_z(end)}", 200)
        ours = [(s, p) for s, p in sent if "FROM audit_events" in s and "FROM payments" in s]
        plans = []
        async with rt.engine.connect() as conn:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            for statement, parameters in ours:
                plans.append("\n".join((await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
                                       .scalars().all()))
            await conn.rollback()
        assert len(plans) == 1, plans  # the page (the count only when the page is full)
        for plan in plans:
            assert "ix_audit_entity" in plan, plan
            assert "ix_payments_coop_updated" in plan or "ix_payments_updated" in plan, plan
            assert "ix_audit_events_action" not in plan and "Seq Scan" not in plan, plan


async def test_a_completion_recorded_on_the_instant_the_month_ended_is_named(admin: Any, rt: Any,
                                                                            demo: dict[str, Any]) -> None:
    """The month ends at `to` (excluded): a completion recorded at that very instant was recorded after it, one a
    microsecond before it in time."""
    start, end = _last_month()
    on_end = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    in_time = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    for p, recorded in ((on_end, end), (in_time, end - timedelta(microseconds=1))):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(
                status="COMPLETED", created_at=end - timedelta(hours=2), completed_at=end - timedelta(hours=1),
                provider_transaction_id=f"TX-{p['id'][:8]}"))
            s.add(AuditEvent(cooperative_id=p["cooperativeId"], actor="provider:mtn_momo", channel="provider",
                             action="payment.completed", entity_type="payment", entity_id=p["id"], before=None,
                             after=None, at=recorded))

    report = await _report(admin, start, end)
    assert sum(line["collected"] for line in report["settled"]) == 10000
    assert [(p["id"], p["recordedAt"], p["recordedBy"]) for p in report["paymentsRecordedLater"]] == [
        (on_end["id"], _z(end), "provider:mtn_momo")]
    assert report["paymentsRecordedLaterCount"] == 1

    # So with a void: one on the instant the month ended was after it, one a microsecond before in time.
    for p, voided in ((on_end, end), (in_time, end - timedelta(microseconds=1))):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(
                status="VOIDED", collected_minor=0, provider_transaction_id=None))
            s.add(AuditEvent(cooperative_id=p["cooperativeId"], actor="admin:treasurer", channel="api",
                             action="payment.voided", entity_type="payment", entity_id=p["id"],
                             before={"status": "COMPLETED", "collected": 5000,
                                     "providerTransactionId": f"TX-{p['id'][:8]}"},
                             after={"status": "VOIDED", "note": "wrong line"}, at=voided))
    report = await _report(admin, start, end)
    assert report["settled"] == []
    assert [(p["id"], p["voidedAt"], p["collected"], p["note"]) for p in report["paymentsVoidedLater"]] == [
        (on_end["id"], _z(end), 5000, "wrong line")]
    assert report["paymentsVoidedLaterCount"] == 1


async def test_a_completion_audited_just_after_its_payment_was_stamped_across_the_end_is_named(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """The move stamps the payment's updated_at, then its audit row's at (changed_at also rounds down to the
    millisecond): a completion audited on the instant the month ended may be on a payment stamped a moment before
    it. The list reads the payments updated since a day before the end (reports.RECORDED_SLACK), so it is named; one
    completed and recorded well in time is not."""
    start, end = _last_month()
    across = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    in_time = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    for p, stamped, recorded in ((across, end - timedelta(milliseconds=3), end),
                                 (in_time, end - timedelta(days=3), end - timedelta(days=3))):
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(
                status="COMPLETED", created_at=end - timedelta(days=4), completed_at=end - timedelta(days=3),
                updated_at=stamped, provider_transaction_id=f"TX-{p['id'][:8]}"))
            s.add(AuditEvent(cooperative_id=p["cooperativeId"], actor="provider:mtn_momo", channel="provider",
                             action="payment.completed", entity_type="payment", entity_id=p["id"], before=None,
                             after=None, at=recorded))
    report = await _report(admin, start, end)
    assert [(p["id"], p["recordedAt"]) for p in report["paymentsRecordedLater"]] == [(across["id"], _z(end))]
    assert report["paymentsRecordedLaterCount"] == 1


async def test_recorded_by_is_who_recorded_the_money_first(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """Money taken after a failure reported after the month ended by the provider's callback, then again by its
    status poll: recordedAt and recordedBy are the first report's."""
    start, end = _last_month()
    failed = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == failed["id"]).values(
            status="FAILED", created_at=end - timedelta(hours=2), completed_at=end - timedelta(hours=1),
            collected_minor=5000, mismatch=True, provider_transaction_id=f"TX-{failed['id'][:8]}"))
        for actor, recorded in (("provider:mtn_momo", end + timedelta(hours=1)),
                                ("provider:mtn_momo:poll", end + timedelta(hours=2))):
            s.add(AuditEvent(cooperative_id=failed["cooperativeId"], actor=actor, channel="provider",
                             action="payment.success_after_failure", entity_type="payment", entity_id=failed["id"],
                             before=None, after=None, at=recorded))

    report = await _report(admin, start, end)
    assert [(p["id"], p["status"], p["recordedAt"], p["recordedBy"]) for p in report["paymentsRecordedLater"]] == [
        (failed["id"], "FAILED", _z(end + timedelta(hours=1)), "provider:mtn_momo")]


async def test_every_way_of_recording_money_later_names_a_payment_untouched_for_weeks(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """The list reads only the payments updated since a day before the end (reports.RECORDED_SLACK), on the premise
    that whatever records a completion stamps its payment's updated_at then. Each way money is recorded taken, on a
    payment last changed three weeks before the end (given up on, cancelled, failed), its money dated in the month:
    an admin's statement line (POST /v1/payments/{id}/outcome) for a TIMEOUT and a CANCELLED payment, the provider's
    late answer (a callback, a poll or a cancelled payment's watch: apply_collection_outcome) for both, money taken
    after a failure, and a lost payment recorded from the statement (POST /v1/payments/recorded). Each is named."""
    from tests.admin_api.test_recorded_payments import _line

    start, end = _last_month()
    asked, paid = end - timedelta(days=21), end - timedelta(days=21) + timedelta(minutes=2)
    made = {}
    for way, status in (("outcome_timeout", "TIMEOUT"), ("outcome_cancelled", "CANCELLED"),
                        ("late_timeout", "TIMEOUT"), ("late_cancelled", "CANCELLED"), ("after_failure", "FAILED")):
        p = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
        async with rt.sessionmaker.begin() as s:
            await s.execute(update(Payment).where(Payment.id == p["id"]).values(
                status=status, created_at=asked, expires_at=asked + timedelta(minutes=1), updated_at=asked,
                failure_reason="declined" if status == "FAILED" else None))
        made[way] = p["id"]
    assert (await _report(admin, start, end))["paymentsRecordedLater"] == []

    for way in ("outcome_timeout", "outcome_cancelled"):
        await admin.json("POST", f"/v1/payments/{made[way]}/outcome", 200, json={
            "status": "COMPLETED", "providerTransactionId": f"MTN-{way}", "note": "on MTN statement",
            "completedAt": paid.isoformat()})
    for way in ("late_timeout", "late_cancelled"):
        assert await _provider_says(rt, made[way], ProviderOutcome.SUCCEEDED, provider="mtn_momo",
                                    when=paid) == "late_completed"
    assert await _provider_says(rt, made["after_failure"], ProviderOutcome.SUCCEEDED, provider="mtn_momo",
                                when=paid, amount=5000) == "flagged_success_after_failure"
    made["recorded"] = (await admin.json("POST", "/v1/payments/recorded", 201, json=_line(
        demo, completedAt=_z(paid), providerTransactionId="MTN-STMT-LOST")))["id"]

    async with rt.sessionmaker() as s:
        stamped = dict((await s.execute(select(Payment.id, Payment.updated_at)
                                        .where(Payment.id.in_(list(made.values()))))).all())
    assert all(at >= end for at in stamped.values()), stamped
    report = await _report(admin, start, end)
    assert sorted(p["id"] for p in report["paymentsRecordedLater"]) == sorted(made.values())
    assert report["paymentsRecordedLaterCount"] == len(made)
    assert all(p["recordedAt"] >= _z(end) and p["completedAt"] == _z(paid) for p in report["paymentsRecordedLater"])
