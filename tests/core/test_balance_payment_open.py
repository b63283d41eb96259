"""create_payment checks a balance the USSD offered (core.payments._balance_refusal) when it is made: an open
payment of the type for the member in the period (its PIN prompt still on her phone) refuses it, whatever its
amount. Charged beside it, a whole price still open and the balance took 50,000 + 20,000 when 20,000 was owed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from core.audit import Actor, record
from core.errors import BusinessRuleError
from core.models import Payment
from core.money import Money
from core.payments import NewPayment, create_payment
from tests.channels.ussd.test_flows_africastalking import EN_MTN
from tests.channels.ussd.test_pay_balance import _kept


def _balance(demo: dict[str, Any], key: str) -> NewPayment:
    return NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                      method="MOBILE_MONEY_MTN", account=EN_MTN, idempotency_key=key, channel="ussd",
                      amount=Money(20_000, "RWF"), member_id=demo["members"][EN_MTN], balance_minor=20_000)


async def test_a_balance_is_refused_beside_an_open_payment_of_the_type(rt: Any, demo: dict[str, Any]) -> None:
    await _kept(rt, demo, EN_MTN)  # 30,000 of 50,000 taken
    waiting = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)  # the whole price, still open
    with pytest.raises(BusinessRuleError) as refused:
        async with rt.sessionmaker.begin() as s:
            await create_payment(s, rt, _balance(demo, "ussd:test:balance-1"), actor=Actor("member:test", "ussd"))
    assert waiting in str(refused.value)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 2  # none made


async def test_a_balance_with_no_open_payment_of_the_type_is_made(rt: Any, demo: dict[str, Any]) -> None:
    await _kept(rt, demo, EN_MTN)
    await _kept(rt, demo, EN_MTN, type_name="Water", amount=5_000, status="PENDING", collected=None)
    async with rt.sessionmaker.begin() as s:
        made, created = await create_payment(s, rt, _balance(demo, "ussd:test:balance-2"),
                                             actor=Actor("member:test", "ussd"))
    assert created and (made.amount_minor, made.status) == (20_000, "PENDING")


async def test_a_balance_is_made_beside_an_open_payment_of_a_number_she_no_longer_holds(
        rt: Any, demo: dict[str, Any]) -> None:
    """The open whole price was paid from her old SIM (lost; her number corrected since, member.updated naming the
    phone): its prompt waits on a SIM she no longer has, and does not stop her balance from her number."""
    await _kept(rt, demo, EN_MTN)
    await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)  # from another number ("x"), a minute ago
    async with rt.sessionmaker.begin() as s:
        await record(s, actor=Actor("admin:test", "api"), action="member.updated", entity_type="member",
                     entity_id=demo["members"][EN_MTN], before={"phone": "+25078****002"},
                     after={"phone": "+25078****003", "phoneChange": "NEW_SIM"}, cooperative_id=demo["cooperative_id"])
    async with rt.sessionmaker.begin() as s:
        made, created = await create_payment(s, rt, _balance(demo, "ussd:test:balance-3"),
                                             actor=Actor("member:test", "ussd"))
    assert created and (made.amount_minor, made.status) == (20_000, "PENDING")
