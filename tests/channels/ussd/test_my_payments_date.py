"""USSD 'my payments': a payment's date is the cooperative's local day, as its SMS receipt says (it showed the UTC
date: every payment made between midnight and 02:00 in Kigali read as the day before)."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from channels.sms.templates import local_time
from core.models import Payment
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import requires_pg, sql_sent

EN_MTN = "+250788000002"


def option(screen: str, label: str) -> str:
    for line in screen[4:].split("\n"):
        number, _, text = line.partition(". ")
        if label in text and number.isdigit():
            return number
    raise AssertionError(f"{label!r} not offered in {screen!r}")


async def pay_rent(client: Any) -> None:
    """EN_MTN pays Monthly Rent on USSD: its payment row is made (PENDING)."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Monthly Rent"))
    await phone.send("1")


async def test_my_payment_detail_date_is_the_local_day(client: Any, demo: Any, rt: Any) -> None:
    await pay_rent(client)
    # 00:30 on 1 November in Kigali (UTC+2) is still 31 October in UTC.
    at = datetime(2026, 10, 31, 22, 30, tzinfo=UTC)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).values(created_at=at, updated_at=at, completed_at=at, status="COMPLETED"))
        ref = (await s.execute(select(Payment.reference))).scalar_one()
    assert local_time(at, "Africa/Kigali") == "01/11/2026 00:30"  # what the SMS receipt says
    member = AtPhone(client, EN_MTN)
    await member.dial()
    listing = await member.send("2")
    detail = await member.send(option(listing, ref))
    assert "Date: 01/11/2026" in detail, detail


@requires_pg
async def test_the_detail_hop_reads_the_zone_from_the_cooperative_it_already_has(client: Any, demo: Any,
                                                                                 rt: Any) -> None:
    """The date's zone comes with the cooperative's row the session already read: no transaction of its own."""
    await pay_rent(client)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).values(status="COMPLETED"))
        ref = (await s.execute(select(Payment.reference))).scalar_one()
    member = AtPhone(client, EN_MTN)
    await member.dial()
    listing = await member.send("2")
    with sql_sent(rt, lambda q: " ".join(q.split()[:4])) as seen:
        detail = await member.send(option(listing, ref))
    assert "Date:" in detail
    assert sum(q.startswith("BEGIN") for q in seen) <= 1 and not any("cooperatives" in q for q in seen), seen


async def test_my_payments_lists_her_five_newest(client: Any, demo: Any, rt: Any) -> None:
    """'My payments' is her last five payments, newest first: a sixth and seventh, older, are not listed."""
    from datetime import timedelta
    from uuid import uuid4

    from sqlalchemy import insert

    await pay_rent(client)
    base = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)
    async with rt.sessionmaker.begin() as s:
        first = (await s.execute(select(Payment))).scalar_one()
        row = {c.key: getattr(first, c.key) for c in Payment.__table__.columns}
        refs = []
        for n in range(7):
            at = base + timedelta(days=n)
            ref = f"PAY-T{n}"
            refs.append(ref)
            await s.execute(insert(Payment).values({**row, "id": str(uuid4()), "reference": ref,
                                                    "idempotency_key": f"k-{n}", "status": "COMPLETED",
                                                    "provider_reference": str(uuid4()),
                                                    "created_at": at, "updated_at": at, "completed_at": at}))
        await s.execute(update(Payment).where(Payment.id == first.id).values(created_at=base - timedelta(days=30),
                                                                              status="FAILED"))
    member = AtPhone(client, EN_MTN)
    await member.dial()
    screen = await member.send("2")
    pages = [screen]
    while "98. More" in screen and len(pages) < 5:
        screen = await member.send("98")
        pages.append(screen)
    listing = "\n".join(pages)
    shown = [line.rsplit(" ", 1)[-1] for line in listing.split("\n") if " PAY-T" in line]
    assert shown == ["PAY-T6", "PAY-T5", "PAY-T4", "PAY-T3", "PAY-T2"], listing  # newest first, five
