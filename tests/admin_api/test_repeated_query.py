"""A query parameter given twice is refused: read as its first value, `status=PENDING&status=PROCESSING` answered
200 with the PENDING payments only, and a treasurer asking for both statuses got half an answer with no warning."""

from __future__ import annotations

from tests.admin_api.conftest import make_payment


async def test_a_repeated_filter_is_refused_and_named(admin, demo):
    await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    resp = await admin.req("GET", "/v1/payments?status=PENDING&status=PROCESSING")
    assert resp.status == 400
    body = await resp.json()
    assert "query parameter status is given more than once" in str(body)
    # Each alone still answers, and the one payment is PENDING.
    assert (await admin.json("GET", "/v1/payments?status=PENDING", 200))["meta"]["total"] == 1


async def test_an_unknown_parameter_given_twice_is_named_once(admin):
    resp = await admin.req("GET", "/v1/payments?colour=red&colour=blue")
    assert resp.status == 400
    assert str(await resp.json()).count("query parameter colour is not allowed") == 1
