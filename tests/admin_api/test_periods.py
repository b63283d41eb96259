"""Every route that takes a `from`/`to` period reads it the same way: a bare date is the cooperative's local
midnight (the payment list, the refund list and the audit log agree with the reports and exports), a date-time
without an offset is UTC, and a reversed period is refused instead of answered with nothing."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from core.models import AuditEvent, Payment
from tests.admin_api.conftest import make_payment

OCTOBER = "from=2026-10-01&to=2026-11-01"  # Kigali: 2026-09-30T22:00Z to 2026-10-31T22:00Z


async def _dated(rt, payment_id: str, at: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == payment_id)
                        .values(created_at=datetime.fromisoformat(at).replace(tzinfo=UTC)))


async def test_list_and_export_agree_on_local_days(admin, rt, demo):
    water = demo["payment_types"]["Water"]
    # 00:30 on 1 November in Kigali: November's, though it is still 31 October in UTC.
    november = await make_payment(admin, water, amount=5000)
    await _dated(rt, november["id"], "2026-10-31T22:30:00")
    # 23:30 on 31 October in Kigali: October's.
    october = await make_payment(admin, water, amount=5000)
    await _dated(rt, october["id"], "2026-10-31T21:30:00")
    listed = await admin.json("GET", f"/v1/payments?{OCTOBER}", 200)
    resp = await admin.req("GET", f"/v1/reports/payments.csv?{OCTOBER}")
    exported = [r["id"] for r in csv.DictReader(io.StringIO(await resp.text()))]
    assert [p["id"] for p in listed["data"]] == exported == [october["id"]]
    next_month = await admin.json("GET", "/v1/payments?from=2026-11-01&to=2026-12-01", 200)
    assert [p["id"] for p in next_month["data"]] == [november["id"]]
    # A date-time without an offset stays UTC: 31 October 00:00 UTC onwards holds both.
    utc = await admin.json("GET", "/v1/payments?from=2026-10-31T00:00:00", 200)
    assert {p["id"] for p in utc["data"]} == {october["id"], november["id"]}


async def test_a_super_admin_naming_the_cooperative_reads_its_local_days(admin, superadmin, rt, demo):
    """The cooperative's admin and a super admin asking about that cooperative see the same October; across
    cooperatives (no cooperativeId) bare dates are UTC days."""
    november = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await _dated(rt, november["id"], "2026-10-31T22:30:00")  # 00:30 on 1 November in Kigali
    coop = demo["cooperative_id"]
    for path in ("/v1/payments", "/v1/reports/payments.csv"):
        october = await superadmin.req("GET", f"{path}?{OCTOBER}&cooperativeId={coop}")
        later = await superadmin.req("GET", f"{path}?from=2026-11-01&to=2026-12-01&cooperativeId={coop}")
        assert (october.status, later.status) == (200, 200), (path, await october.text())
        assert november["id"] not in await october.text() and november["id"] in await later.text()
    everywhere = await superadmin.json("GET", f"/v1/payments?{OCTOBER}", 200)
    assert [p["id"] for p in everywhere["data"]] == [november["id"]]
    report = await superadmin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}&cooperativeId={coop}", 200)
    assert report["payments"]["byStatus"] == []
    audit = await superadmin.json("GET", f"/v1/audit-events?from=2020-01-01&cooperativeId={coop}&entityId="
                                         f"{november['id']}", 200)
    assert [e["cooperativeId"] for e in audit["data"]] == [coop]
    # Another cooperative named: nothing of this one.
    other = await superadmin.json("GET", f"/v1/reports/reconciliation?from=2026-11-01&cooperativeId={uuid.uuid4()}",
                                  200)
    assert other["payments"]["byStatus"] == [] and other["totals"] == []


async def test_audit_log_reads_local_days(admin, rt, demo):
    entity = "periods-test-entity"
    async with rt.sessionmaker.begin() as s:  # append-only: written with its moment, never updated
        s.add(AuditEvent(cooperative_id=demo["cooperative_id"], actor="admin:test", channel="api", action="test.noted",
                         entity_type="payment", entity_id=entity, at=datetime(2026, 10, 31, 22, 30, tzinfo=UTC)))
    october = await admin.json("GET", f"/v1/audit-events?entityId={entity}&{OCTOBER}", 200)
    november = await admin.json("GET", f"/v1/audit-events?entityId={entity}&from=2026-11-01", 200)
    assert october["data"] == [] and [e["entityId"] for e in november["data"]] == [entity]


@pytest.mark.parametrize("path", ["/v1/payments", "/v1/refunds", "/v1/audit-events", "/v1/reports/reconciliation",
                                  "/v1/reports/payments.csv", "/v1/reports/refunds.csv"])
async def test_a_reversed_period_is_refused_everywhere(admin, path):
    for period in ("from=2026-11-01&to=2026-10-01", "from=2026-10-02T00:00:00Z&to=2026-10-01"):
        body = await admin.json("GET", f"{path}?{period}", 400)
        assert body["message"] == ["from must be before to"], (path, period, body)
    # A treasurer asking for one day as she would write it (from and to the same date): told that `to` is not in the
    # period and what to send, not that 1 October is not before 1 October.
    body = await admin.json("GET", f"{path}?from=2026-10-01&to=2026-10-01", 400)
    assert body["message"] == ["from must be before to: to is the day after the period (for 2026-10-01 alone, "
                               "from=2026-10-01&to=2026-10-02)"], (path, body)
