"""An API payment states its amount: the balance the USSD offers a member after an underpayment
(channels.ussd.flows, core.reminders.balance_owed) does not make a fixed-amount type take another amount there."""

from __future__ import annotations

from typing import Any

from tests.admin_api.conftest import payment_body
from tests.channels.ussd.test_pay_balance import _kept


async def test_the_api_still_takes_a_fixed_amount_at_its_price_only(admin: Any, rt: Any, demo: Any) -> None:
    await _kept(rt, demo, "+250788000001")  # 30,000 of 50,000 taken: 20,000 left to pay this period
    rent = demo["payment_types"]["Monthly Rent"]
    refused = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, amount=20000))
    assert "does not accept another amount" in refused["message"][0]
    made = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    assert made["amount"] == 50000
