"""A payment's `"dueDate": ""` is a 400 naming the field, not a payment paying whatever period its moment pays
(as null or no dueDate does): a client that sent an empty field meant a date it did not fill in."""

from __future__ import annotations

from sqlalchemy import func, select

from core.models import Payment
from tests.admin_api.conftest import payment_body


async def _payments(rt) -> int:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(func.count()).select_from(Payment))).scalar_one()


async def test_an_empty_due_date_is_a_400_naming_the_field(admin, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    before = await _payments(rt)
    for empty in ("", "   "):
        body = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, dueDate=empty))
        assert body["code"] == "VALIDATION_FAILED"
        assert body["message"] == ["dueDate must not be empty" if empty == "" else "dueDate must be a valid date-time"]
    assert await _payments(rt) == before


async def test_null_or_no_due_date_is_still_none(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    assert (await admin.json("POST", "/v1/payments", 201, json=payment_body(rent, dueDate=None)))["dueDate"] is None
    assert (await admin.json("POST", "/v1/payments", 201, json=payment_body(rent)))["dueDate"] is None
