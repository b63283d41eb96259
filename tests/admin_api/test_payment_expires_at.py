"""A payment's `expiresAt`: the end of its approval window (PAYMENT_TIMEOUT_SECONDS for mobile money,
BANK_PAYMENT_TIMEOUT_SECONDS for a bank payment), as the database holds it and the poll judges it: the desk tells a
member how long her prompt may still be approved, an integrator how long to wait."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from core.models import Payment
from tests.admin_api.conftest import Caller, make_payment


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_a_payment_says_when_its_approval_window_ends(rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    mobile = await make_payment(admin, rent)
    bank = await make_payment(admin, rent, paymentMethod="BANK_BK", paymentAccount="000400012345")
    for made, seconds in ((mobile, rt.settings.payment_timeout_seconds),
                          (bank, rt.settings.bank_payment_timeout_seconds)):
        async with rt.sessionmaker() as s:
            row = await s.get(Payment, made["id"])
        assert _at(made["expiresAt"]) == row.expires_at.replace(microsecond=0)  # to the second, as every date
        assert _at(made["expiresAt"]) - _at(made["createdAt"]) == timedelta(seconds=seconds)
        got = await admin.json("GET", f"/v1/payments/{made['id']}", 200)
        assert got["expiresAt"] == made["expiresAt"]
    assert rt.settings.payment_timeout_seconds != rt.settings.bank_payment_timeout_seconds
