"""A member whose provider took less than a fixed-amount recurring type's price is offered the balance of the
period, not the whole price again (core.reminders.balance_owed): paying 50,000 more after 30,000 were taken
overpaid by 30,000."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core.db import utcnow
from core.models import Payment, PaymentType
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL, RW_MTN, SW_AIRTEL, option


async def _kept(rt: Any, demo: dict[str, Any], phone: str, *, type_name: str = "Monthly Rent",
                collected: int | None = 30_000, amount: int = 50_000, currency: str = "RWF",
                status: str = "COMPLETED") -> str:
    """A COMPLETED payment of the member's, made a minute ago, the provider having taken `collected` of it (or one
    in `status`, still inside its approval window); its reference."""
    created = utcnow() - timedelta(minutes=1)
    reference = f"PAY_{uuid.uuid4().hex[:10].upper()}"
    async with rt.sessionmaker.begin() as s:
        s.add(Payment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"][type_name],
                      member_id=demo["members"][phone], reference=reference,
                      amount_minor=amount, currency=currency, status=status, collected_minor=collected,
                      method="MOBILE_MONEY_MTN", provider="mtn_momo", provider_reference=str(uuid.uuid4()),
                      payment_account_enc="x", payment_account_index="x", payment_account_masked="+25078****002",
                      idempotency_key=uuid.uuid4().hex, request_hash="h", channel="ussd",
                      expires_at=created + timedelta(minutes=5), created_at=created,
                      completed_at=created if status == "COMPLETED" else None))
    return reference


async def _confirmation(client: Any, phone_number: str, type_label: str = "Monthly Rent") -> tuple[AtPhone, str]:
    phone = AtPhone(client, phone_number)
    await phone.dial()
    types = await phone.send("1")
    return phone, await phone.send(option(types, type_label))


async def _new_payment(rt: Any, member_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(Payment).where(Payment.member_id == member_id, Payment.status == "PENDING"))
                ).scalar_one()


async def test_the_balance_of_the_period_is_offered_and_charged_after_an_underpayment(
        client: Any, demo: Any, rt: Any) -> None:
    await _kept(rt, demo, EN_MTN)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert confirm.startswith("CON Pay Monthly Rent\nAmount: 20,000 RWF (balance of 50,000 RWF)\n"), confirm
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 20,000 RWF."), done
    payment = await _new_payment(rt, demo["members"][EN_MTN])
    assert (payment.amount_minor, payment.currency, payment.payment_type_id) == (
        20_000, "RWF", demo["payment_types"]["Monthly Rent"])


async def test_the_balance_is_said_in_each_language(client: Any, demo: Any, rt: Any) -> None:
    said = {RW_MTN: "20,000 RWF (asigaye kuri 50,000 RWF)", FR_AIRTEL: "20 000 RWF (reste sur 50 000 RWF)",
            SW_AIRTEL: "20,000 RWF (salio la 50,000 RWF)"}
    labels = {RW_MTN: "Monthly Rent", FR_AIRTEL: "Monthly Rent", SW_AIRTEL: "Monthly Rent"}
    for number, text in said.items():
        await _kept(rt, demo, number)
        _phone, confirm = await _confirmation(client, number, labels[number])
        assert text in confirm, confirm


async def _due_now(rt: Any, demo: dict[str, Any]) -> str:
    """The due date of the Monthly Rent period a payment made now pays, as her reminder writes it."""
    from core.cooperatives import zone_of
    from core.reminders import current_period

    async with rt.sessionmaker() as s:
        ptype = await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])
        period = current_period(ptype, utcnow(), zone_of("Africa/Kigali"))
    assert period is not None
    return period[0].strftime("%d/%m/%Y")


async def test_a_period_paid_in_full_is_said_paid_before_anything_is_offered(
        client: Any, demo: Any, rt: Any) -> None:
    """Paid in full this period, she picked the type again and was offered its price as if nothing was paid: a
    second 50,000 overpaid the month. She is told the period is paid (its due date, as her reminder names it), and
    may go back to the list or pay again."""
    due = await _due_now(rt, demo)
    await _kept(rt, demo, EN_MTN, collected=None)
    phone, paid = await _confirmation(client, EN_MTN)
    assert paid == (f"CON You have already paid Monthly Rent for {due}.\n1. Pay again\n0. Back\n00. Home"), paid
    types = await phone.send("0")  # Back: the list, nothing reserved or made
    assert types.startswith("CON Choose what to pay:") and "Monthly Rent" in types, types
    paid = await phone.send(option(types, "Monthly Rent"))
    confirm = await phone.send("1")  # paying again is not refused: the price, confirmed as any payment
    assert confirm.startswith("CON Pay Monthly Rent\nAmount: 50,000 RWF\n"), confirm
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 50,000 RWF."), done
    assert (await _new_payment(rt, demo["members"][EN_MTN])).amount_minor == 50_000


async def test_a_period_paid_in_full_is_said_in_each_language(client: Any, demo: Any, rt: Any) -> None:
    due = await _due_now(rt, demo)
    said = {RW_MTN: f"CON Wamaze kwishyura Monthly Rent (itariki {due}).\n1. Ongera wishyure\n",
            FR_AIRTEL: f"CON Vous avez déjà payé Monthly Rent pour le {due}.\n1. Payer à nouveau\n",
            SW_AIRTEL: f"CON Tayari umelipa Monthly Rent (tarehe {due}).\n1. Lipa tena\n"}
    for number, text in said.items():
        await _kept(rt, demo, number, collected=None)
        _phone, paid = await _confirmation(client, number)
        assert paid.startswith(text), paid


async def test_a_period_nothing_was_kept_of_offers_the_price_as_before(client: Any, demo: Any, rt: Any) -> None:
    # Taken in another currency (collected 0): nothing kept, the price, not said paid.
    await _kept(rt, demo, RW_MTN, collected=0)
    _phone, confirm = await _confirmation(client, RW_MTN)
    assert confirm.startswith("CON Kwishyura Monthly Rent\n"), confirm
    assert "50,000 RWF" in confirm and "20,000" not in confirm and "asigaye" not in confirm, confirm


async def test_a_type_whose_amount_the_member_chooses_asks_for_it_as_before(client: Any, demo: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        rent = await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])
        rent.allow_custom_amount = True
    await _kept(rt, demo, EN_MTN)
    _phone, screen = await _confirmation(client, EN_MTN)
    assert screen.startswith("CON Enter amount in RWF (usual: 50,000 RWF):"), screen


async def test_the_underpayment_of_another_type_leaves_this_ones_price(client: Any, demo: Any, rt: Any) -> None:
    await _kept(rt, demo, EN_MTN, type_name="Water", amount=5_000, collected=2_000)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "\nAmount: 50,000 RWF\n" in confirm, confirm
    assert (await phone.send("2")).startswith("END Payment cancelled")
    _phone, confirm = await _confirmation(client, EN_MTN, "Water")
    assert "\nAmount: 3,000 RWF (balance of 5,000 RWF)\n" in confirm, confirm


# Confirm refused (core.payments._balance_refusal): she dials again, and is offered what is owed then.
# Told what changed and that nothing was charged (flows.TypeChanged), not "Sorry, we could not complete your request.
# Please try again later.": the same confirmation would be refused again.
REFUSED = "END The amount of Monthly Rent has changed. Nothing was charged. Dial again to see it."


async def test_a_balance_paid_meanwhile_is_not_charged_again(client: Any, demo: Any, rt: Any) -> None:
    """The balance is the session's (offered when she picked the type): paid in full since (another session, the
    office), Confirm charged it again (the payment type accepted that amount on the session's word)."""
    await _kept(rt, demo, EN_MTN)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "\nAmount: 20,000 RWF (balance of 50,000 RWF)\n" in confirm, confirm
    await _kept(rt, demo, EN_MTN, amount=20_000, collected=None)  # the rest, paid meanwhile
    done = await phone.send("1")
    assert done == REFUSED, done
    async with rt.sessionmaker() as s:
        made = (await s.execute(select(Payment).where(Payment.member_id == demo["members"][EN_MTN],
                                                      Payment.status == "PENDING"))).scalars().all()
    assert made == [], [(p.amount_minor, p.reference) for p in made]


async def test_a_balance_of_a_type_repriced_meanwhile_is_not_charged(client: Any, demo: Any, rt: Any) -> None:
    await _kept(rt, demo, EN_MTN)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "20,000 RWF (balance of 50,000 RWF)" in confirm, confirm
    async with rt.sessionmaker.begin() as s:
        rent = await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])
        rent.amount_minor = 40_000  # 10,000 left now
    done = await phone.send("1")
    assert done == REFUSED, done
    async with rt.sessionmaker() as s:
        made = (await s.execute(select(Payment).where(Payment.member_id == demo["members"][EN_MTN],
                                                      Payment.status == "PENDING"))).scalars().all()
    assert made == [], [(p.amount_minor, p.reference) for p in made]


# An open payment of the type beside the underpaid one (channels.ussd.flows._create, core.payments._balance_refusal).
WAITING_EN = ("END Payment {ref} of {amount} for {type} awaits your approval on your phone or mobile money. "
              "Do not pay again. If it is not completed, you will get an SMS.")


async def _pending(rt: Any, member_id: str) -> list[tuple[str, int]]:
    async with rt.sessionmaker() as s:
        rows = await s.execute(select(Payment.reference, Payment.amount_minor).where(
            Payment.member_id == member_id, Payment.status == "PENDING"))
    return sorted((reference, amount) for reference, amount in rows)


async def test_an_open_payment_of_the_price_stops_the_balance(client: Any, demo: Any, rt: Any) -> None:
    """Her payment of the whole price is still open (its PIN prompt on her phone) beside the period the provider
    took 30,000 of: confirming the balance too charged 50,000 + 20,000 when 20,000 was owed. She is told which
    payment waits, with its own amount, and no second one is made."""
    await _kept(rt, demo, EN_MTN)
    waiting = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "\nAmount: 20,000 RWF (balance of 50,000 RWF)\n" in confirm, confirm
    done = await phone.send("1")
    assert done == WAITING_EN.format(ref=waiting, amount="50,000 RWF", type="Monthly Rent"), done
    assert await _pending(rt, demo["members"][EN_MTN]) == [(waiting, 50_000)]
    assert await phone.resend() == done  # the aggregator's retry of the hop: the same answer, still nothing made
    assert await _pending(rt, demo["members"][EN_MTN]) == [(waiting, 50_000)]


async def test_the_open_payment_is_said_in_her_language(client: Any, demo: Any, rt: Any) -> None:
    await _kept(rt, demo, RW_MTN)
    waiting = await _kept(rt, demo, RW_MTN, status="PENDING", collected=None)
    phone, _confirm = await _confirmation(client, RW_MTN)
    done = await phone.send("1")
    assert done == (f"END Kwishyura 50,000 RWF ya Monthly Rent (Ref {waiting}) biracyategereje ko ubyemeza "
                    "kuri telefoni yawe cyangwa mobile money. Ntukongere kwishyura. Nibidakunda, uzabona SMS."), done


async def test_an_open_payment_past_its_window_or_of_another_type_does_not_stop_the_balance(
        client: Any, demo: Any, rt: Any) -> None:
    """As for the price (test_open_payment_guard): a prompt that can no longer be approved, or a payment of another
    type, is no payment waiting for this balance."""
    member = demo["members"][EN_MTN]
    await _kept(rt, demo, EN_MTN)
    water = await _kept(rt, demo, EN_MTN, type_name="Water", amount=5_000, status="PENDING", collected=None)
    stale = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.reference == stale)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "20,000 RWF (balance of 50,000 RWF)" in confirm, confirm
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 20,000 RWF."), done
    made = [row for row in await _pending(rt, member) if row[0] not in (water, stale)]
    assert [amount for _reference, amount in made] == [20_000], made


async def test_an_open_payment_of_another_period_does_not_stop_the_balance(client: Any, demo: Any, rt: Any) -> None:
    """A payment of the type for another period (the API's dueDate naming an earlier one), its prompt still open,
    takes none of this period's balance: as create_payment's re-check judges it (_balance_refusal), the balance is
    made, not refused with "payment ... is waiting" (she still owed it once that one was paid)."""
    from core.cooperatives import zone_of
    from core.reminders import current_period, utc_midnight

    member = demo["members"][EN_MTN]
    await _kept(rt, demo, EN_MTN)
    arrears = await _kept(rt, demo, EN_MTN, status="PENDING", collected=None)
    async with rt.sessionmaker.begin() as s:
        ptype = await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])
        period = current_period(ptype, utcnow(), zone_of("Africa/Kigali"))
        assert period is not None
        await s.execute(update(Payment).where(Payment.reference == arrears)
                        .values(due_date=utc_midnight(period[0] - timedelta(days=62))))
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "20,000 RWF (balance of 50,000 RWF)" in confirm, confirm
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 20,000 RWF."), done
    assert [amount for reference, amount in await _pending(rt, member) if reference != arrears] == [20_000]


async def test_the_paid_screen_is_never_stored_where_a_previous_release_shows_it(
        client: Any, demo: Any, rt: Any) -> None:
    """During a deploy a hop may land on a serve of the previous release, which knows no "pay_paid": popped from
    the back stack (Back from the confirmation after Pay again) or resumed from the route (Continue), it was shown
    as a screen (KeyError: her Back or Continue failed). Neither the stack nor the route names it; Back after Pay
    again is the list she chose the type from."""
    from channels.ussd import sessions
    from channels.ussd.screens import SCREENS
    from core.phone import normalize

    previous = set(SCREENS) - {"pay_paid"}
    await _kept(rt, demo, EN_MTN, collected=None)
    phone, paid = await _confirmation(client, EN_MTN)
    assert paid.startswith("CON You have already paid Monthly Rent"), paid
    route = await sessions.load_resume(rt.redis, rt.cipher, normalize(EN_MTN))
    assert route is None or {route.screen, *route.stack} <= previous, route
    confirm = await phone.send("1")
    assert confirm.startswith("CON Pay Monthly Rent\n"), confirm
    route = await sessions.load_resume(rt.redis, rt.cipher, normalize(EN_MTN))
    assert route is not None and {route.screen, *route.stack} <= previous, route
    back = await phone.send("0")
    assert back.startswith("CON Choose what to pay:"), back


async def test_back_from_a_balance_to_another_type_offers_that_types_price(client: Any, demo: Any, rt: Any) -> None:
    """Shown the Monthly Rent balance, she goes Back and picks Water (nothing of it paid): its price, not said to be
    the balance of the rent's 50,000, and that is what is charged."""
    await _kept(rt, demo, EN_MTN)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "Amount: 20,000 RWF (balance of 50,000 RWF)\n" in confirm, confirm
    types = await phone.send("0")
    water = await phone.send(option(types, "Water"))
    assert water.startswith("CON Pay Water\nAmount: 5,000 RWF\nFee: 0 RWF\n"), water
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 5,000 RWF."), done
    payment = await _new_payment(rt, demo["members"][EN_MTN])
    assert (payment.amount_minor, payment.payment_type_id) == (5_000, demo["payment_types"]["Water"])


async def test_a_period_overpaid_is_said_paid_not_offered_a_negative_balance(client: Any, demo: Any, rt: Any) -> None:
    """The provider took 60,000 of the 50,000 RWF rent: the period is paid (nothing owed), not a balance of
    -10,000 RWF to confirm."""
    due = await _due_now(rt, demo)
    await _kept(rt, demo, EN_MTN, collected=60_000)
    _phone, paid = await _confirmation(client, EN_MTN)
    assert paid.startswith(f"CON You have already paid Monthly Rent for {due}.\n1. Pay again\n"), paid


async def test_a_balance_refused_for_another_reason_than_its_amount_is_not_told_the_amount_changed(
        client: Any, demo: Any, rt: Any, monkeypatch: Any) -> None:
    """The balance (20,000 of 50,000) is what she owes still, but the confirmation is refused for something else: here
    MTN MoMo no longer served (a restart with another PROVIDERS while her session, kept in Redis, was on its
    confirmation; create_payment: "payment method 'MOBILE_MONEY_MTN' is not available", field paymentMethod). She was
    told "The amount of Monthly Rent has changed ... Dial again to see it": it has not, and dialling again shows the
    same 20,000. The generic answer, as the whole price's confirmation refused the same way gets."""
    await _kept(rt, demo, EN_MTN)
    phone, confirm = await _confirmation(client, EN_MTN)
    assert "20,000 RWF (balance of 50,000 RWF)" in confirm, confirm
    monkeypatch.setattr(rt, "routes", {m: p for m, p in rt.routes.items() if m != "MOBILE_MONEY_MTN"})
    done = await phone.send("1")
    assert done == "END Sorry, we could not complete your request. Please try again later.", done
    async with rt.sessionmaker() as s:
        made = (await s.execute(select(Payment).where(Payment.member_id == demo["members"][EN_MTN],
                                                      Payment.status == "PENDING"))).scalars().all()
    assert made == []
