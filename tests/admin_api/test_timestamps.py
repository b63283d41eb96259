"""Timestamps as the API, its errors and the webhooks write them (seed 001: "2025-10-16T10:30:00Z"), and the date
forms a period accepts. Before: webhook event data carried Python's isoformat (microseconds, "+00:00") where the
API said "...Z" for the same payment; an event's `created` was when a worker fanned it out; years before 1000
came out with three digits; 20261101 and 2026-W44-7 were read as UTC midnight instead of a local day."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from sqlalchemy import select, update

from core import webhooks
from core.db import utcnow
from core.models import OutboxJob, Payment
from tests.admin_api.conftest import make_payment, payment_body
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint, emit, receiver  # noqa: F401

SEED_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# A webhook event's `created` and its data's `updatedAt`: the same, to the millisecond (what orders one entity's
# changes: two in one second must not read alike).
EVENT_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def test_an_early_due_date_and_a_period_from_year_one_are_written_with_four_digit_years(admin, demo):
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        demo["payment_types"]["Monthly Rent"], dueDate="0999-12-01T00:00:00Z"))  # (a due date of rent: the 1st)
    assert made["dueDate"] == "0999-12-01T00:00:00Z"
    report = await admin.json("GET", f"/v1/reports/reconciliation?from={quote('0001-01-01T00:00:00Z')}", 200)
    assert report["period"]["from"] == "0001-01-01T00:00:00Z"


async def test_webhook_event_data_write_timestamps_as_the_api_does(admin, rt, demo):
    made = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    from core.ports import EventKind, ProviderEvent, ProviderOutcome
    from core.provider_events import handle_provider_event

    async with rt.sessionmaker() as s:
        p = await s.get(Payment, made["id"])
    await handle_provider_event(rt, ProviderEvent(provider=p.provider, kind=EventKind.COLLECTION, event_id=p.id,
                                                  reference=p.provider_reference, outcome=ProviderOutcome.SUCCEEDED))
    api = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event"))).scalars().all()
    [job] = [j for j in jobs if j.payload["data"].get("id") == made["id"]]
    data = job.payload["data"]
    assert (data["createdAt"], data["completedAt"]) == (api["createdAt"], api["completedAt"])
    assert SEED_FORMAT.match(data["completedAt"]) and EVENT_FORMAT.match(job.payload["created"])
    assert EVENT_FORMAT.match(data["updatedAt"])


async def test_an_events_created_is_when_it_happened_not_when_a_late_worker_sent_it(
        rt, demo, receiver, worker, monkeypatch):  # noqa: F811
    hook, url = receiver
    coop = demo["cooperative_id"]
    await approved_endpoint(rt, coop, url)
    happened = utcnow()
    await emit(rt, coop)
    monkeypatch.setattr(webhooks, "utcnow", lambda: utcnow() + timedelta(minutes=40))  # workers 40 min behind
    await drain(worker)
    [request] = hook.requests
    created = json.loads(request["body"])["created"]
    assert EVENT_FORMAT.match(created)
    assert abs(datetime.fromisoformat(created) - happened) < timedelta(minutes=1)


@pytest.mark.parametrize("november", ["20261101", "2026-W44-7", "2026-11-01T00:00:00+0200x", "2026-305"])
async def test_a_period_in_a_form_other_than_rfc_3339_is_refused(admin, november):
    answer = await admin.json("GET", f"/v1/payments?from={quote(november)}", 400)
    assert any("from" in m for m in answer["message"]), answer


@pytest.mark.parametrize("form", ["2026-11-01", "2026-11-01T00:00:00+02:00", "2026-10-31T22:00:00Z",
                                  "2026-10-31T22:00Z", "2026-11-01T00:00:00.000+0200",
                                  "2026-10-31T22:00:00.0000000Z", "2026-10-31T22:00:00.000000000Z",
                                  "2026-10-31t22:00:00z"])
async def test_the_forms_a_period_takes_still_read_the_same_instant(admin, rt, demo, form):
    made = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    async with rt.sessionmaker.begin() as s:  # 00:30 on 1 November in Kigali
        await s.execute(update(Payment).where(Payment.id == made["id"])
                        .values(created_at=datetime(2026, 10, 31, 22, 30, tzinfo=UTC)))
    listed = await admin.json("GET", f"/v1/payments?from={quote(form)}", 200)
    assert [p["id"] for p in listed["data"]] == [made["id"]], form


def test_an_error_timestamp_is_read_once(monkeypatch):
    from admin_api import errors

    reads = iter([datetime(2026, 12, 1, 10, 0, 0, 999_900, tzinfo=UTC),
                  datetime(2026, 12, 1, 10, 0, 1, 100, tzinfo=UTC)])
    monkeypatch.setattr(errors, "utcnow", lambda: next(reads))
    assert errors.timestamp() == "2026-12-01T10:00:00.999Z"


async def test_a_due_date_with_seven_fraction_digits_is_taken(admin, demo):
    """.NET's round-trip format ("o") writes 7 digits, Go's RFC3339Nano up to 9: RFC 3339 allows any number."""
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        demo["payment_types"]["Monthly Rent"], dueDate="2026-12-01T00:00:00.0000000Z"))
    assert made["dueDate"] == "2026-12-01T00:00:00Z"
