"""An idempotency key names one payment request: sent again with another due date (another month's rent) or
another method, it is refused 409 as another request, never answered with the first payment as though it were
that one (the client would read the other month as paid for)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.models import Payment
from tests.admin_api.conftest import Caller, payment_body


async def test_the_same_key_with_another_due_date_or_method_is_another_request(admin: Caller, rt: Any,
                                                                              demo: dict[str, Any]) -> None:
    body = payment_body(demo["payment_types"]["Monthly Rent"], dueDate="2025-11-01T00:00:00Z")
    first = await admin.json("POST", "/v1/payments", 201, json=body)
    replay = await admin.json("POST", "/v1/payments", 201, json=body)
    assert replay["id"] == first["id"]
    for other in ({"dueDate": "2025-12-01T00:00:00Z"}, {"dueDate": None},
                  {"paymentMethod": "MOBILE_MONEY_AIRTEL", "paymentAccount": "+250788000001"}):
        refused = await admin.json("POST", "/v1/payments", 409, json={**body, **other})
        assert (refused["code"], refused["field"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotencyKey")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 1
