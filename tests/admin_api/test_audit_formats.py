"""The audit log as an auditor reads it after a month: one format for every row's before and after (camelCase
keys, times as the API writes them, amounts in minor units), whichever code path wrote it."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import insert, select

from core.models import AuditEvent
from tests.admin_api.conftest import complete_payment, idem, make_payment

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LOOKS_LIKE_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")


def _bad_formats(value: Any, path: str) -> list[str]:
    bad: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if "_" in k or not k[:1].islower():
                bad.append(f"{path}.{k}: key not camelCase")
            bad += _bad_formats(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad += _bad_formats(v, f"{path}[{i}]")
    elif isinstance(value, str) and LOOKS_LIKE_TIME.match(value) and not ISO_Z.match(value):
        bad.append(f"{path}: time {value!r} not as the API writes it")
    return bad


async def _all_events(caller) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    page = 1
    while True:
        got = await caller.json("GET", f"/v1/audit-events?limit=100&page={page}", 200)
        rows += got["data"]
        if len(got["data"]) < 100:
            return rows
        page += 1


async def test_month_of_activity_has_one_before_after_format(admin, superadmin, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    done = await make_payment(admin, rent)
    await complete_payment(rt, done["id"], fee=500)
    await admin.json("POST", f"/v1/payments/{done['id']}/refunds", 201,
                     json={"amount": 1000, "idempotencyKey": idem()})
    await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={"amount": 60000})
    coop = demo["cooperative_id"] if "cooperative_id" in demo else None
    if coop:
        await superadmin.json("PATCH", f"/v1/cooperatives/{coop}", 200, json={"language": "fr"})
    domain = await admin.json("POST", "/v1/webhook-domains", 201, json={"domain": "hooks.example.rw"})
    await superadmin.json("POST", f"/v1/webhook-domains/{domain['id']}/approve", 200)
    endpoint = await admin.json("POST", "/v1/webhook-endpoints", 201,
                                json={"url": "https://hooks.example.rw/x", "events": ["payment.completed"]})
    await admin.json("POST", f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret", 200)
    await admin.json("PATCH", f"/v1/webhook-endpoints/{endpoint['id']}", 200,
                     json={"events": ["payment.completed", "payment.failed"]})
    rows = await _all_events(superadmin)
    for r in rows:
        print(r["action"], r["actor"], r["channel"], r["before"], r["after"])
    bad = [b for r in rows for side in ("before", "after") for b in _bad_formats(r[side], f"{r['action']}.{side}")]
    assert bad == []


async def test_rows_written_before_read_in_the_one_format(admin, rt, demo):
    """A row a release before wrote (a state move's columns, Python's isoformat) is shown as the rows since are;
    its stored JSON is left as it was (the log is append-only)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(insert(AuditEvent).values(
            cooperative_id=demo["cooperative_id"], actor="provider:mtn_momo", channel="provider",
            action="payment.partially_refunded", entity_type="payment", entity_id="old-row",
            before={"status": "COMPLETED"},
            after={"status": "PARTIALLY_REFUNDED", "refunded_minor": 1000, "refundId": "r1",
                   "completed_at": "2026-11-02T07:03:17.960057+00:00", "reminders_opt_out": True}))
    got = await admin.json("GET", "/v1/audit-events?entityId=old-row", 200)
    assert [(e["before"], e["after"]) for e in got["data"]] == [(
        {"status": "COMPLETED"},
        {"status": "PARTIALLY_REFUNDED", "refunded": 1000, "refundId": "r1", "completedAt": "2026-11-02T07:03:17Z",
         "remindersOptOut": True})]
    async with rt.sessionmaker() as s:
        stored = (await s.execute(select(AuditEvent.after).where(AuditEvent.entity_id == "old-row"))).scalar_one()
    assert stored["refunded_minor"] == 1000


async def test_text_that_reads_as_an_instant_out_of_utcs_range_is_kept_as_given(admin, rt, demo):
    """A name or description that looks like an instant UTC cannot hold (9999-12-31T23:59:59-01:00 is in year 10000
    there) is free text: its audit row keeps it as written, where the formatting failed the request with a 500."""
    odd = "9999-12-31T23:59:59-01:00"
    made = await admin.json("POST", "/v1/payment-types", 201,
                            json={"name": odd, "description": "0001-01-01T00:00:00+01:00", "amount": 1000})
    assert made["name"] == odd
    renamed = await admin.json("PATCH", f"/v1/payment-types/{made['id']}", 200, json={"description": odd})
    assert renamed["description"] == odd
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == made["id"])
                                .order_by(AuditEvent.id))).scalars().all()
    assert [r.action for r in rows] == ["payment_type.created", "payment_type.updated"]
    assert (rows[0].after["name"], rows[0].after["description"]) == (odd, "0001-01-01T00:00:00+01:00")
    assert rows[1].after["description"] == odd
    listed = await admin.json("GET", f"/v1/audit-events?entityId={made['id']}", 200)
    assert odd in {e["after"].get("name") for e in listed["data"]} | {e["after"].get("description")
                                                                       for e in listed["data"]}
