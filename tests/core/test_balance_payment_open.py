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
from core.payments import NewPayment, create_payment, like_open, load_context
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


async def _someone_elses(rt: Any, reference: str) -> None:
    """The payment `reference` made from another's number (her husband's, +25078****999): never hers."""
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment).where(Payment.reference == reference))).scalar_one()
        payment.payment_account_masked = "+25078****999"


async def _number_changed(rt: Any, demo: dict[str, Any], change: str = "NEW_SIM") -> None:
    """Her number corrected (her old SIM +25078****002, the one _kept's payments are made from)."""
    async with rt.sessionmaker.begin() as s:
        await record(s, actor=Actor("admin:test", "api"), action="member.updated", entity_type="member",
                     entity_id=demo["members"][EN_MTN], before={"phone": "+25078****002"},
                     after={"phone": "+25078****003", "phoneChange": change}, cooperative_id=demo["cooperative_id"])


async def test_a_balance_is_refused_beside_an_open_payment_made_for_her_from_another_number(
        rt: Any, demo: dict[str, Any]) -> None:
    """Her husband's phone paid the whole price for her (at the office) just before her lost SIM's number was
    corrected: its prompt is on his phone, not on her old SIM, and can still be approved. Her balance from her new
    number beside it was taken too (both approved: 50,000 + 20,000 when 20,000 was owed)."""
    await _kept(rt, demo, EN_MTN)
    waiting = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    await _someone_elses(rt, waiting)
    await _number_changed(rt, demo)
    with pytest.raises(BusinessRuleError) as refused:
        async with rt.sessionmaker.begin() as s:
            await create_payment(s, rt, _balance(demo, "ussd:test:balance-4"), actor=Actor("member:test", "ussd"))
    assert waiting in str(refused.value)


async def test_the_ussd_confirmation_finds_an_open_payment_made_for_her_from_another_number(
        rt: Any, demo: dict[str, Any]) -> None:
    """The USSD confirmation's own look (load_context's open_reference) judges it alike: waiting on his phone."""
    waiting = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    await _someone_elses(rt, waiting)
    await _number_changed(rt, demo)
    async with rt.sessionmaker() as s:
        found = await load_context(s, demo["cooperative_id"], demo["payment_types"]["Monthly Rent"],
                                   demo["members"][EN_MTN], payer_index=rt.cipher.blind_index(EN_MTN),
                                   open_like=like_open(rt.settings, Money(50_000, "RWF"), "ussd:test:open-1"))
    assert found.open_reference == waiting


async def test_an_open_payment_of_a_number_a_typo_replaced_does_not_stop_her(rt: Any, demo: dict[str, Any]) -> None:
    """The number typed wrong at registration was a stranger's: a prompt on it is no one's she knows (he ignores
    it), and does not stop her paying from her own number."""
    waiting = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    await _number_changed(rt, demo, "TYPO")
    async with rt.sessionmaker() as s:
        found = await load_context(s, demo["cooperative_id"], demo["payment_types"]["Monthly Rent"],
                                   demo["members"][EN_MTN], payer_index=rt.cipher.blind_index(EN_MTN),
                                   open_like=like_open(rt.settings, Money(50_000, "RWF"), "ussd:test:open-2"))
    assert waiting and found.open_reference is None
