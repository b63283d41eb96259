"""Valid ISO 8601 date-times whose instant falls outside years 1 to 9999 in UTC: a 400 naming the field and
the range, for every date the API reads (query filters and the payment's dueDate), never a 500."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.admin_api.conftest import payment_body

RANGE = "between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z"
EDGES = ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"]
FILTERED = ["/v1/payments", "/v1/refunds", "/v1/audit-events", "/v1/reports/reconciliation",
            "/v1/reports/payments.csv", "/v1/reports/refunds.csv"]


@pytest.mark.parametrize("value", EDGES)
async def test_query_dates_beyond_utc_are_a_400(admin, value):
    for path in FILTERED:
        for name in ("from", "to"):
            resp = await admin.req("GET", f"{path}?{name}={quote(value)}")
            body = await resp.json()
            assert resp.status == 400, (path, name, body)
            assert body["message"] == [f"{name} must be a date-time {RANGE}"], (path, body)


@pytest.mark.parametrize("value", EDGES)
async def test_a_due_date_beyond_utc_is_a_400(admin, demo, value):
    body = await admin.json("POST", "/v1/payments", 400,
                            json=payment_body(demo["payment_types"]["Monthly Rent"], dueDate=value))
    assert body["message"] == [f"dueDate must be a date-time {RANGE}"]


async def test_the_last_and_first_instants_themselves_are_accepted(admin, demo):
    await admin.json("GET", f"/v1/payments?from={quote('0001-01-01T00:00:00Z')}&to={quote('9999-12-31T23:59:59Z')}",
                     200)
    # (A type that is not recurring: any day is its dueDate; a recurring type's must be one of its due dates.)
    one_off = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Joining fee", "amount": 50000})
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(
        one_off["id"], dueDate="9999-12-31T23:59:59+00:00"))
    assert made["dueDate"] == "9999-12-31T23:59:59Z"
