"""Keyword SMS from a number that is a member of two cooperatives: each membership has its own language, and a
reply about one cooperative's payment is in that cooperative's membership's language."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from channels.sms.templates import render
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, PaymentType, SmsMessage
from core.phone import normalize
from tests.channels.sms.helpers import make_payment
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

ALINE = "+250788000001"  # Kigali Heights (first membership), Kinyarwanda
SYSTEM = Actor("system", "system")


async def _savings_membership(rt: Any, phone: str, language: str) -> tuple[str, str]:
    """(cooperative, member): a savings cooperative with one type, and the number's membership there."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Twisungane Savings", short_code="TWISU", country="RW", currency="RWF",
                           timezone="Africa/Kigali", status="ACTIVE", ussd_extension="7", language="fr")
        s.add(coop)
        await s.flush()
        s.add(PaymentType(cooperative_id=coop.id, name="Monthly Savings", amount_minor=20_000, currency="RWF",
                          is_recurring=True, recurring_interval="MONTHLY", due_day=15))
        member = await create_member(s, rt.cipher, cooperative_id=coop.id, name="Aline U.",
                                     phone=normalize(phone), language=language, actor=SYSTEM)
        return coop.id, member.id


async def test_status_of_the_other_cooperatives_payment_is_in_that_memberships_language(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Aline is Kinyarwanda at Kigali Heights (her first membership) and English at her savings cooperative: STATUS
    and RECEIPT of her savings payment were answered in Kinyarwanda, while listed with her savings membership."""
    coop, member = await _savings_membership(rt, ALINE, "en")
    saved = await make_payment(rt, coop, account=ALINE, member_id=member)
    rent = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await inbound(sms_client, ALINE, f"STATUS {saved.reference}", "two-1")
    await drain(worker)
    await inbound(sms_client, ALINE, f"RECEIPT {saved.reference}", "two-2")
    await drain(worker)
    await inbound(sms_client, ALINE, f"STATUS {rent.reference}", "two-3")
    await drain(worker)
    status, receipt, rent_status = [m["message"] for m in sim.messages(ALINE)]
    assert status.startswith("Payment ") and saved.reference in status, status
    assert receipt.startswith("We received") and "Twisungane Savings" in receipt, receipt
    assert rent_status.startswith("Kwishyura ") and rent.reference in rent_status, rent_status  # her own there
    async with rt.sessionmaker() as s:
        rows = (await s.execute(select(SmsMessage.member_id, SmsMessage.language)
                                .order_by(SmsMessage.created_at, SmsMessage.id))).all()
    assert [tuple(row) for row in rows] == [(member, "en"), (member, "en"), (demo["members"][ALINE], "rw")]


async def test_a_keyword_in_another_language_still_chooses_the_replys_language(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    coop, member = await _savings_membership(rt, ALINE, "en")
    saved = await make_payment(rt, coop, account=ALINE, member_id=member)
    await inbound(sms_client, ALINE, f"HALI {saved.reference}", "two-4")  # Swahili STATUS
    await drain(worker)
    await inbound(sms_client, ALINE, "HELP", "two-5")  # no cooperative named: her first membership's
    await drain(worker)
    status, help_ = [m["message"] for m in sim.messages(ALINE)]
    assert status.startswith("Malipo ") and saved.reference in status, status
    assert help_ == render("help", "rw", {"dial": "*384*123*123#"}), help_
