"""A reference's day is its cooperative's day, as the receipt and USSD "My payments" date it: in UTC, a payment
made at 00:30 on 1 December in Kigali was PAY_20261130_..., the day before the date its receipt printed beside it
("Payment PAY_20261130_123 ... Date: 01/12/2026 00:30"), and a Nairobi member's M-Pesa statement read 261130."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update

import core.references
from core.models import Cooperative, Payment
from tests.admin_api.conftest import complete_payment, idem, make_payment
from tests.channels.ussd.helpers import AtPhone

# 22:30 UTC on 30 November: 00:30 on 1 December in Kigali, 01:30 in Nairobi, still 30 November in Accra.
LATE = datetime(2026, 11, 30, 22, 30, tzinfo=UTC)


@pytest.fixture
def late_evening_utc(monkeypatch: Any) -> None:
    monkeypatch.setattr(core.references, "utcnow", lambda: LATE)


async def _zone(rt: Any, demo: dict[str, Any], timezone: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(timezone=timezone))


def _day(reference: str) -> str:
    found = re.fullmatch(r"[A-Z]+_(\d{8})_\d+", reference)
    assert found, reference
    return found.group(1)


@pytest.mark.parametrize(("timezone", "day"), [("Africa/Kigali", "20261201"), ("Africa/Nairobi", "20261201"),
                                               ("Africa/Accra", "20261130")])
async def test_a_payment_refund_and_dispute_are_dated_by_the_cooperatives_day(
        admin: Any, tenant: Any, rt: Any, demo: dict[str, Any], late_evening_utc: None, timezone: str,
        day: str) -> None:
    await _zone(rt, demo, timezone)
    payment = await make_payment(tenant, demo["payment_types"]["Monthly Rent"])
    assert _day(payment["reference"]) == day
    await complete_payment(rt, payment["id"])
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 1000, "reason": "overcharged", "idempotencyKey": idem()})
    dispute = await tenant.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    assert (_day(refund["reference"]), _day(dispute["reference"])) == (day, day)


async def test_a_ussd_payment_is_dated_by_the_cooperatives_day(client: Any, rt: Any, demo: dict[str, Any],
                                                                 late_evening_utc: None) -> None:
    phone = AtPhone(client, "+250788000002")
    await phone.dial()
    types = await phone.send("1")
    number = next(line.partition(". ")[0] for line in types[4:].split("\n") if "Monthly Rent" in line)
    confirm = await phone.send(number)
    shown = re.search(r"PAY_\d{8}_\d+", confirm)
    assert shown and _day(shown.group(0)) == "20261201", confirm  # Kigali's 1 December
    await phone.send("1")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment.reference))).scalar_one() == shown.group(0)
