"""A payment that failed and whose money the provider then reported taken stays FAILED, but the money is held: its
member was texted "Do not pay again". It pays its period, as a COMPLETED one does, for the reminders (the scan and
the re-check when one is sent), the USSD's and the BALANCE SMS's balance and the dues report; refunded in full, it
pays nothing again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import reminders
from core.audit import Actor
from core.models import Member, OutboxJob, Payment, PaymentType, Refund
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from core.refunds import apply_refund_outcome
from core.state.payment import taken_after_failure
from tests.admin_api.conftest import idem, make_payment
from tests.admin_api.test_reports_dues import _registered
from tests.core.test_reminders import NOW

PROVIDER = Actor("provider:t", "provider")
DECEMBER = "2026-12-01"  # Monthly Rent's due date three days after NOW (28 November, 08:00 in Kigali)


async def _failed_then_taken(admin: Any, rt: Any, rent: str, account: str) -> str:
    """A payment of December's rent by the member whose number is `account`: FAILED, then reported taken."""
    made = await make_payment(admin, rent, amount=50000, paymentAccount=account, dueDate=DECEMBER)
    for outcome, extra in ((ProviderOutcome.FAILED, {"reason": "insufficient balance"}),
                           (ProviderOutcome.SUCCEEDED, {"provider_transaction_id": f"MTN-{made['id'][:8]}"})):
        async with rt.sessionmaker.begin() as s:
            await apply_collection_outcome(s, rt, await s.get(Payment, made["id"]), outcome, actor=PROVIDER, **extra)
    async with rt.sessionmaker() as s:
        payment = await s.get(Payment, made["id"])
        assert payment is not None and payment.status == "FAILED" and taken_after_failure(payment)
    return str(made["id"])


async def _refunded_in_full(admin: Any, rt: Any, payment_id: str) -> None:
    """Its 50,000 sent back to the member, the provider reporting the refund done."""
    refund = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 201,
                              json={"amount": 50000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await apply_refund_outcome(s, rt, await s.get(Refund, refund["id"]), ProviderOutcome.SUCCEEDED,
                                   actor=PROVIDER)


async def _reminded(rt: Any) -> dict[str, dict[str, Any]]:
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return {j.payload["member_id"]: j.payload for j in jobs if j.payload["template"] == "payment_reminder"}


async def test_money_taken_after_a_failure_pays_its_period(admin: Any, rt: Any, demo: dict[str, Any],
                                                           monkeypatch: Any) -> None:
    await _registered(rt, demo["cooperative_id"])
    rent, aline, jean = (demo["payment_types"]["Monthly Rent"], demo["members"]["+250788000001"],
                         demo["members"]["+250788000002"])
    # Aline's reminder was queued before the provider's word came.
    async with rt.sessionmaker.begin() as s:
        assert await reminders.scan(s, rt, now=NOW) == 5
    queued = await _reminded(rt)
    await _failed_then_taken(admin, rt, rent, "+250788000001")
    async with rt.sessionmaker() as s:
        conn = await s.connection()
        assert await reminders.why_not_send(conn, queued[aline]) == "paid"
    # Jean's was taken after failing too, then refunded in full: nothing kept, she owes the rent.
    await _refunded_in_full(admin, rt, await _failed_then_taken(admin, rt, rent, "+250788000002"))
    async with rt.sessionmaker() as s:
        conn = await s.connection()
        assert await reminders.why_not_send(conn, queued[jean]) is None

    # The next morning's scan (another due-date key) reminds neither Aline again nor anyone twice.
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.delete().where(OutboxJob.kind == "sms.send"))
        assert await reminders.scan(s, rt, now=NOW + timedelta(days=1)) == 4
    assert aline not in await _reminded(rt) and jean in await _reminded(rt)

    # The dues report: Aline PAID (the money held), Jean UNPAID.
    report = await admin.json("GET", f"/v1/reports/dues?paymentTypeId={rent}&period={DECEMBER}&limit=100", 200)
    lines = {line["memberId"]: line for line in report["data"]}
    assert (lines[aline]["status"], lines[aline]["amountPaid"], lines[aline]["amountOutstanding"]) == ("PAID", 50000, 0)
    assert lines[aline]["lastPaymentAt"] is not None
    assert (lines[jean]["status"], lines[jean]["amountPaid"], lines[jean]["amountOutstanding"]) == (
        "UNPAID", 0, 50000)

    # The USSD's and the BALANCE SMS's balance of that period, on 29 November: nothing left for Aline.
    monkeypatch.setattr(reminders, "utcnow", lambda: NOW + timedelta(days=1))
    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, rent)
        for member_id, left in ((aline, 0), (jean, 50000)):
            member = await s.get(Member, member_id)
            assert member is not None
            assert await reminders.owed_now(s, member_id, ptype, "Africa/Kigali") == (NOW.date() + timedelta(days=3),
                                                                                      left)
            found = await reminders.balance_now(s, member_id, ptype, "Africa/Kigali", payer=member.phone_index,
                                                grace=timedelta(minutes=5))
            assert found is not None and (found.left, found.waiting) == (left, 0)


async def test_money_taken_after_a_failure_then_refunded_in_full_pays_no_period_of_a_free_amount(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    """A type whose member chooses the amount is paid by any payment that keeps money: one taken after failing and
    then refunded in full keeps none (as a REFUNDED one), so she is still reminded."""
    await _registered(rt, demo["cooperative_id"])
    rent, jean = demo["payment_types"]["Monthly Rent"], demo["members"]["+250788000002"]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.id == rent).values(allow_custom_amount=True))
        assert await reminders.scan(s, rt, now=NOW) == 5
    queued = await _reminded(rt)
    back = await _failed_then_taken(admin, rt, rent, "+250788000002")
    async with rt.sessionmaker() as s:
        assert await reminders.why_not_send(await s.connection(), queued[jean]) == "paid"  # the money held
    await _refunded_in_full(admin, rt, back)
    async with rt.sessionmaker() as s:
        assert await reminders.why_not_send(await s.connection(), queued[jean]) is None
    async with rt.sessionmaker.begin() as s:
        await s.execute(OutboxJob.__table__.delete().where(OutboxJob.kind == "sms.send"))
        assert await reminders.scan(s, rt, now=NOW + timedelta(days=1)) == 5
    assert jean in await _reminded(rt)
