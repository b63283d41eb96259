"""Every USSD flow end to end through POST /ussd/africastalking, on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from sqlalchemy import select

from channels.ussd import sessions
from core.models import Cooperative, Dispute, Member, OutboxJob, Payment, PaymentType, UssdSession
from core.money import Money
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone, swapped_redis

EN_MTN = "+250788000002"  # Jean Bosco, English, MTN
RW_MTN = "+250788000001"  # Aline, Kinyarwanda, MTN
FR_AIRTEL = "+250733000001"  # Claudine, French, Airtel
SW_AIRTEL = "+250733000002"  # Eric, Swahili, Airtel
STRANGER = "+250788555123"  # a valid MTN number that belongs to no cooperative


def lines(screen: str) -> list[str]:
    return screen[4:].split("\n")


def reference_on(screen: str) -> str:
    """The payment reference a screen shows (PAY_YYYYMMDD_N)."""
    found = re.search(r"PAY_\d{8}_\d{3,}", screen)
    assert found, screen
    return found.group(0)


def option(screen: str, label: str) -> str:
    """The number in front of the line that contains `label` (so tests do not hard-code positions)."""
    for line in lines(screen):
        number, _, text = line.partition(". ")
        if label in text and number.isdigit():
            return number
    raise AssertionError(f"{label!r} not offered in {screen!r}")


async def test_pay_creates_exactly_one_pending_payment_and_one_collect_job(client: Any, demo: Any,
                                                                           db: Any) -> None:
    from core.metrics import REGISTRY

    def paid_sessions() -> float:
        return REGISTRY.get_sample_value("gateway_ussd_sessions_total",
                                         {"aggregator": "africastalking", "outcome": "payment"}) or 0.0

    before = paid_sessions()
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    assert home.startswith("CON Welcome to Kigali Heights Housing Cooperative")
    types = await phone.send("1")
    assert "Monthly Rent 50,000 RWF (due day 1)" in types and "Water 5,000 RWF (due day 10)" in types
    confirm = await phone.send(option(types, "Monthly Rent"))
    assert confirm.startswith("CON Pay Monthly Rent\nAmount: 50,000 RWF\nFee: 0 RWF\nVia MTN MoMo\nRef: PAY_")
    shown = reference_on(confirm)
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt on your phone to pay 50,000 RWF. Ref PAY_")

    payment = await db.one(Payment)
    # The reference on the confirmation is the one on the END screen and on the payment.
    assert payment.reference == shown and done.endswith(" " + shown)
    assert (payment.status, payment.amount_minor, payment.currency, payment.method, payment.channel) == (
        "PENDING", 50_000, "RWF", "MOBILE_MONEY_MTN", "ussd")
    assert payment.member_id == demo["members"][EN_MTN]
    assert payment.payment_type_id == demo["payment_types"]["Monthly Rent"]
    assert payment.idempotency_key == f"ussd:africastalking:{phone.session_id}"
    assert payment.created_by == f"member:{demo['members'][EN_MTN]}"
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1

    row = await db.one(UssdSession)
    assert (row.aggregator, row.session_id, row.status, row.hops, row.last_screen) == (
        "africastalking", phone.session_id, "Success", 4, "pay_done")
    assert row.payment_id == payment.id and row.member_id == payment.member_id
    assert row.phone_masked == "+25078****002" and row.ended_at is not None
    assert paid_sessions() == before + 1


async def test_retried_hops_answer_the_same_screen_and_never_pay_twice(client: Any, demo: Any,
                                                                       db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    first = await phone.dial()
    assert await phone.resend() == first
    await phone.send("1")
    confirm = await phone.send("2")  # Water
    assert await phone.resend() == confirm
    done = await phone.send("1")
    # The aggregator retries the confirming hop, twice.
    assert await phone.resend() == done
    assert await phone.resend() == done
    # A late extra key on a closed session changes nothing either.
    again = await phone.send("1")
    assert again.startswith("END ") and "Ref PAY_" in again
    assert await db.count(Payment) == 1
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1
    payment = await db.one(Payment)
    assert payment.amount_minor == 5_000


async def test_double_confirmation_from_a_replayed_session_state_creates_one_payment(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """Even if the session store lost the last answer, the idempotency key holds the line."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    await phone.send("1")
    stored = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert stored is not None
    done = await phone.send("1")
    # Put the session back as it was before the confirmation and confirm again (written over what is there:
    # not compared with it, as a hop's save is).
    stored.seen = None
    await sessions.save(rt.redis, "africastalking", phone.session_id, stored)
    assert await phone.resend() == done
    assert await db.count(Payment) == 1


async def test_paging_with_more_and_back(client: Any, demo: Any, db: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        for n in range(1, 10):
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=f"Levy number {n} for the year",
                              amount_minor=1_000 * n, currency="RWF", is_active=True, due_day=n))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    first = await phone.send("1")
    assert "98. More" in first and "0. Back" in first
    assert len(first) - 4 <= 182
    second = await phone.send("98")
    assert second != first and len(second) - 4 <= 182
    first_numbers = {line.split(".")[0] for line in lines(first) if line[0].isdigit()} - {"98", "0", "00"}
    second_numbers = {line.split(".")[0] for line in lines(second) if line[0].isdigit()} - {"98", "0", "00"}
    assert first_numbers and second_numbers and not first_numbers & second_numbers
    # Numbers keep counting across pages; a number from another page is refused.
    assert (await phone.send(min(first_numbers, key=int))).startswith("CON Invalid choice.")
    assert await phone.send("0") == first  # Back from page two shows page one
    # Walk to the last page and pick its last item.
    screen = first
    while "98. More" in screen:
        screen = await phone.send("98")
    last = max((line for line in lines(screen)
                if line.split(".")[0].isdigit() and line.split(".")[0] not in ("98", "0", "00")),
               key=lambda line: int(line.split(".")[0]))
    picked = await phone.send(last.split(".")[0])
    assert picked.startswith("CON Pay ")
    assert await phone.send("1") != ""
    assert await db.count(Payment) == 1


async def test_back_home_and_invalid_input(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    assert await phone.send("7") == "CON Invalid choice.\n" + home[4:]
    invalid = await phone.send("abc")
    assert invalid.startswith("CON Invalid choice.") and "1. Pay" in invalid
    types = await phone.send("1")
    assert types.startswith("CON Choose what to pay:")
    assert await phone.send("0") == home  # Back to the main menu
    await phone.send("1")
    confirm = await phone.send("1")
    assert "00. Home" in confirm
    assert await phone.send("00") == home
    cancelled_path = await phone.send("1")
    assert cancelled_path == types
    await phone.send("1")
    cancelled = await phone.send("2")
    assert cancelled == "END Payment cancelled. Nothing was charged."
    assert await db.count(Payment) == 0


async def test_custom_amount_is_validated(client: Any, demo: Any, db: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=10_000,
                          currency="RWF", is_active=True, allow_custom_amount=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    prompt = await phone.send(option(types, "Donation"))
    assert prompt.startswith("CON Enter amount in RWF (usual: 10,000 RWF):")
    # "²⁰⁰⁰⁰" is digits to str.isdigit (and made int() fail), no keys of a keypad (Arabic-Indic "٢٠٠٠٠" is 20000:
    # test_typed_keys).
    # "1,0000" and "1,00" group no thousands as the screens do ("1,000" is a thousand: test_uganda_tanzania).
    for bad in ("12.5", "abc", "1,0000", "1,00", "-5", "000", "²⁰⁰⁰⁰"):
        answer = await phone.send(bad)
        assert answer.startswith("CON Enter a whole amount in RWF, e.g. 5000:"), (bad, answer)
    too_big = await phone.send("5000001")
    assert too_big.startswith("CON Amount too high. The maximum is 5,000,000 RWF:")
    # Digits beyond what an amount can hold are too high as well, not "not a whole amount".
    assert (await phone.send("9" * 20)).startswith("CON Amount too high. The maximum is 5,000,000 RWF:")
    confirm = await phone.send("20000")
    assert "Amount: 20,000 RWF" in confirm
    done = await phone.send("1")
    assert "pay 20,000 RWF" in done
    assert (await db.one(Payment)).amount_minor == 20_000


async def test_custom_amount_of_exactly_the_maximum_is_taken(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The screen says "the maximum is 5,000,000 RWF": that amount itself is payable, and charged as typed."""
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=10_000,
                          currency="RWF", is_active=True, allow_custom_amount=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Donation"))
    confirm = await phone.send("5000000")
    assert "Amount: 5,000,000 RWF" in confirm, confirm
    await phone.send("1")
    assert (await db.one(Payment)).amount_minor == 5_000_000


async def test_resume_after_a_dropped_session(client: Any, demo: Any, db: Any) -> None:
    dropped = AtPhone(client, EN_MTN)
    await dropped.dial()
    await dropped.send("1")
    confirm = await dropped.send("2")  # Water, then the network drops the session
    again = AtPhone(client, EN_MTN)
    offer = await again.dial()
    assert offer == ("CON You did not finish your last session.\n1. Continue where you left off\n"
                     "2. Start again")
    resumed = await again.send("1")
    assert resumed == confirm
    done = await again.send("1")
    assert "pay 5,000 RWF" in done
    payment = await db.one(Payment)
    assert payment.idempotency_key == f"ussd:africastalking:{again.session_id}"
    # Finished: nothing is offered any more.
    third = AtPhone(client, EN_MTN)
    assert (await third.dial()).startswith("CON Welcome to")


async def test_resume_start_again(client: Any, demo: Any) -> None:
    dropped = AtPhone(client, EN_MTN)
    await dropped.dial()
    await dropped.send("1")
    again = AtPhone(client, EN_MTN)
    await again.dial()
    assert (await again.send("2")).startswith("CON Welcome to")
    third = AtPhone(client, EN_MTN)
    assert (await third.dial()).startswith("CON Welcome to")


def _hop_failures(caplog: Any) -> list[str]:
    """The errors that failed hops, as the channel logged them ("ussd hop failed (<error>)")."""
    return [r.error for r in caplog.records if r.getMessage().startswith("ussd hop failed")]


async def test_redis_down_answers_end_within_the_budget(client: Any, demo: Any, rt: Any,
                                                        dead_redis: Any, caplog: Any) -> None:
    """A Redis that refuses connections fails the hop by itself, at once: it is not left to the hop's budget.
    Told by the error that ended the hop, not by this process's clock (a loaded machine pauses it for seconds);
    the budget is set far out of reach so that only the Redis error can answer."""
    from channels.ussd.routes import USSD

    phone = AtPhone(client, RW_MTN)
    await phone.dial()  # the language (Kinyarwanda) is now known to this process
    client.server.app[USSD].budget = 60.0
    caplog.set_level("WARNING", logger="gateway.ussd")
    with swapped_redis(rt, dead_redis):
        answer = await asyncio.wait_for(phone.send("1"), 30)
        stranger = await asyncio.wait_for(AtPhone(client, STRANGER).dial(), 30)
    assert answer == "END Serivisi ntiboneka ubu, ongera ugerageze nyuma."
    assert stranger == "END Service unavailable, please try again later."
    # Both failed by Redis's own error (refused; the budget cannot have cut them), and said so.
    assert _hop_failures(caplog) == ["ConnectionError", "ConnectionError"]


async def test_redis_hanging_is_cut_by_the_hop_budget(client: Any, demo: Any, rt: Any,
                                                      hanging_redis: Any, caplog: Any) -> None:
    """A Redis that accepts and never answers (no client timeout here) would hold the hop for ever: the budget
    cuts it. Told by the cut's error and an answer at all, not by this process's clock (see above)."""
    from channels.ussd.routes import USSD

    client.server.app[USSD].budget = 0.5
    caplog.set_level("WARNING", logger="gateway.ussd")
    with swapped_redis(rt, hanging_redis):
        answer = await asyncio.wait_for(AtPhone(client, EN_MTN).dial(), 30)
    assert answer == "END Service unavailable, please try again later."
    assert _hop_failures(caplog) == ["TimeoutError"]  # the budget's cut ("hop over budget")


async def test_database_down_answers_end(client: Any, demo: Any, rt: Any) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from core.db import make_engine

    dead = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    original = rt.sessionmaker
    rt.sessionmaker = async_sessionmaker(dead, expire_on_commit=False)
    try:
        answer = await AtPhone(client, EN_MTN).dial()
    finally:
        rt.sessionmaker = original
        await dead.dispose()
    assert answer == "END Service unavailable, please try again later."


async def test_database_down_is_one_warning_per_hop_without_a_traceback(client: Any, demo: Any, rt: Any,
                                                                        caplog: Any) -> None:
    """PostgreSQL restarting: every hop answers "unavailable" and says why in one WARNING ("ussd hop failed"). The
    session's row, which cannot be written either, added an ERROR with a full traceback to each hop: at 2 a.m. the
    log was a wall of tracebacks (and an alert on ERROR lines) for an outage already told, hop by hop."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from core.db import make_engine

    caplog.set_level("WARNING", logger="gateway.ussd")
    dead = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    original = rt.sessionmaker
    rt.sessionmaker = async_sessionmaker(dead, expire_on_commit=False)
    try:
        answers = [await AtPhone(client, EN_MTN).dial() for _ in range(3)]
    finally:
        rt.sessionmaker = original
        await dead.dispose()
    assert answers == ["END Service unavailable, please try again later."] * 3
    assert _hop_failures(caplog) == ["ConnectionRefusedError"] * 3
    ussd = [r for r in caplog.records if r.name == "gateway.ussd"]
    assert not [r for r in ussd if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in ussd]
    unrecorded = [r for r in ussd if r.getMessage().startswith("ussd session record not updated")]
    assert [(r.levelname, r.error) for r in unrecorded] == [  # type: ignore[attr-defined]
        ("WARNING", "ConnectionRefusedError")] * 3


async def test_non_member_registers_as_pending(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, STRANGER)
    home = await phone.dial()
    assert home.startswith("CON Welcome to CoopPay")
    code = await phone.send("1")
    assert code.startswith("CON You are not registered yet. Enter your cooperative's code:")
    wrong = await phone.send("KH*HC")  # a '*' inside an input must not confuse the accumulated text
    assert wrong.startswith("CON No cooperative has this code.")
    name = await phone.send("khhc")
    assert name.startswith("CON Enter your full name to join Kigali Heights Housing Cooperative:")
    assert (await phone.send("X")).startswith("CON Enter your name: 2 to 60 letters.")
    done = await phone.send("Alice Mukamana")
    assert done.startswith("END Thank you Alice Mukamana. Your request to join Kigali Heights")
    member = await db.one(Member, Member.name == "Alice Mukamana")
    assert member.status == "PENDING" and member.cooperative_id == demo["cooperative_id"]
    # Pending members cannot pay yet.
    later = AtPhone(client, STRANGER)
    await later.dial()
    assert (await later.send("1")).startswith("END Your membership of Kigali Heights Housing Cooperative is "
                                              "awaiting approval.")
    assert await db.count(Payment) == 0


async def test_non_member_refused_when_the_cooperative_does_not_self_register(client: Any, demo: Any,
                                                                             db: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        coop = await s.get(Cooperative, demo["cooperative_id"])
        coop.self_registration = False
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    await phone.send("1")
    refused = await phone.send("KHHC")
    assert refused.startswith("END Kigali Heights Housing Cooperative does not register members by phone.")
    assert await db.count(Member, Member.name.like("%")) == 5  # only the demo members


async def test_non_member_my_payments_and_help(client: Any, demo: Any) -> None:
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    assert (await phone.send("2")).startswith("END This phone is not registered with any cooperative.")
    helper = AtPhone(client, STRANGER)
    await helper.dial()
    assert (await helper.send("5")).startswith("END CoopPay lets cooperative members pay by phone.")


@pytest.mark.parametrize(("phone", "welcome", "pay_label"), [
    (EN_MTN, "Welcome to Kigali Heights", "Pay"),
    (RW_MTN, "Murakaza neza kuri Kigali Heights", "Kwishyura"),
    (FR_AIRTEL, "Bienvenue à Kigali Heights", "Payer"),
    (SW_AIRTEL, "Karibu Kigali Heights", "Lipa"),
])
async def test_each_language_end_to_end(client: Any, demo: Any, db: Any, phone: str, welcome: str,
                                        pay_label: str) -> None:
    user = AtPhone(client, phone)
    home = await user.dial()
    assert home.startswith("CON " + welcome), home
    assert f"1. {pay_label}" in home
    types = await user.send("1")
    confirm = await user.send(option(types, "Water"))
    # As the language writes numbers: a French reader takes "5,000" for five.
    assert ("5 000 RWF" if phone == FR_AIRTEL else "5,000 RWF") in confirm
    done = await user.send("1")
    assert done.startswith("END ") and "PAY_" in done
    payment = await db.one(Payment)
    expected = "MOBILE_MONEY_AIRTEL" if phone.startswith("+25073") else "MOBILE_MONEY_MTN"
    assert payment.method == expected


async def test_language_change_is_remembered(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    assert languages.startswith("CON Choose your language:")
    french = await phone.send(option(languages, "Francais"))
    assert french.startswith("CON Bienvenue à Kigali Heights")
    member = await db.one(Member, Member.id == demo["members"][EN_MTN])
    assert member.language == "fr"
    later = AtPhone(client, EN_MTN)
    assert (await later.dial()).startswith("CON Bienvenue")


async def _pay(client: Any, phone_number: str, type_label: str = "Monthly Rent") -> str:
    phone = AtPhone(client, phone_number)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, type_label))
    return await phone.send("1")


async def test_my_payments_details_and_receipt_by_sms(client: Any, demo: Any, db: Any, rt: Any) -> None:
    await _pay(client, EN_MTN, "Water")
    await _pay(client, EN_MTN, "Monthly Rent")
    payments = {p.reference: p for p in await db.all(Payment)}
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    listing = await phone.send("2")
    assert listing.startswith("CON Your recent payments:")
    for ref, p in payments.items():
        assert ref in listing
        assert f"{p.amount_minor:,} RWF" in listing
    assert "Waiting for your approval" in listing and "Monthly Rent" in listing  # the SMS's words
    raw = await rt.redis.get(sessions.session_key("africastalking", phone.session_id))
    assert len(raw) < 1024, len(raw)  # a page of payment ids, the screen and the route
    newest = max(payments.values(), key=lambda p: p.created_at)
    detail = await phone.send(option(listing, newest.reference))
    assert detail.startswith(
        f"CON {newest.reference}\nMonthly Rent: 50,000 RWF\nStatus: Waiting for your approval\nDate: "), detail
    assert "receipt" not in detail  # not paid yet: no receipt to send, its status
    sent = await phone.send(option(detail, "Send status by SMS"))
    assert sent == f"END The status of {newest.reference} will arrive by SMS shortly."
    job = await db.one(OutboxJob, OutboxJob.kind == "sms.send")
    opened = (await db.one(UssdSession, UssdSession.session_id == phone.session_id)).started_at
    # this session's own: with when it opened (a reused session id's next session has its own receipt)
    assert job.dedupe_key == f"sms:ussd-receipt:{newest.id}:{phone.session_id}@{round(opened.timestamp() * 1000)}"
    assert job.payload["template"] == "payment_status"  # not collected yet
    assert job.payload["member_id"] == demo["members"][EN_MTN]
    assert job.payload["context"] == {"payment_id": newest.id}
    assert await phone.resend() == sent
    assert await db.count(OutboxJob, OutboxJob.kind == "sms.send") == 1


async def test_receipt_for_a_collected_payment_uses_the_receipt_template(client: Any, demo: Any, db: Any,
                                                                         rt: Any) -> None:
    await _pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment))).scalar_one()
        payment.status = "COMPLETED"  # test set-up only; the app moves status through core.state
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    listing = await phone.send("2")
    assert "Paid" in listing
    await phone.send("1")
    await phone.send("1")
    job = await db.one(OutboxJob, OutboxJob.kind == "sms.send")
    assert job.payload["template"] == "payment_receipt"


async def test_problem_with_a_payment_opens_one_dispute(client: Any, demo: Any, db: Any) -> None:
    await _pay(client, EN_MTN)
    payment = await db.one(Payment)
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    pick = await phone.send("3")
    assert pick.startswith("CON Which payment has a problem?") and payment.reference in pick
    reasons = await phone.send(option(pick, payment.reference))
    assert reasons == ("CON What went wrong?\n1. Charged but not recorded\n2. Wrong amount\n"
                       "3. I did not authorise it\n4. Other\n0. Back\n00. Home")
    done = await phone.send("2")
    dispute = await db.one(Dispute)
    assert done == (f"END Complaint {dispute.reference} opened. "
                    "Kigali Heights Housing Cooperative will contact you.")
    assert (dispute.reason, dispute.channel, dispute.payment_id, dispute.status) == (
        "WRONG_AMOUNT", "ussd", payment.id, "OPEN")
    assert await phone.resend() == done
    # A second complaint about the same payment shows the open one, as soon as she picks it (no reasons first).
    again = AtPhone(client, EN_MTN)
    await again.dial()
    await again.send("3")
    assert await again.send("1") == f"END A complaint is already open for this payment: {dispute.reference}."
    assert await db.count(Dispute) == 1


async def test_member_without_payments(client: Any, demo: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    assert await phone.send("3") == "END You have no payments yet."


async def test_my_payments_list_only_her_own_not_her_cooperatives(client: Any, demo: Any, db: Any) -> None:
    """Another member of the same cooperative has paid: her "My payments" and "Problem" list none of that (nor
    its reference, to complain about or get a receipt of); the payer's list has hers only."""
    await _pay(client, EN_MTN, "Water")
    theirs = await db.one(Payment)
    assert theirs.member_id == demo["members"][EN_MTN]
    phone = AtPhone(client, SW_AIRTEL)
    await phone.dial()
    listing = await phone.send("2")
    assert listing.startswith("END") and theirs.reference not in listing, listing
    phone = AtPhone(client, SW_AIRTEL)
    await phone.dial()
    problem = await phone.send("3")
    assert problem.startswith("END") and theirs.reference not in problem, problem
    await _pay(client, SW_AIRTEL, "Monthly Rent")
    hers = await db.one(Payment, Payment.member_id == demo["members"][SW_AIRTEL])
    payer = AtPhone(client, EN_MTN)
    await payer.dial()
    mine = await payer.send("2")
    assert theirs.reference in mine and hers.reference not in mine, mine


async def test_help_shows_the_cooperative_contact(client: Any, demo: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    assert await phone.send("5") == "END Kigali Heights Housing Cooperative: for help call +250788123456."


async def test_several_cooperatives_choose_first(client: Any, demo: Any, db: Any, rt: Any) -> None:
    from core.audit import Actor
    from core.members import create_member

    async with rt.sessionmaker.begin() as s:
        other = Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                            status="ACTIVE", self_registration=True)
        s.add(other)
        await s.flush()
        s.add(PaymentType(cooperative_id=other.id, name="Savings", amount_minor=2_000, currency="RWF",
                          is_active=True))
        await create_member(s, rt.cipher, cooperative_id=other.id, name="Jean Bosco Habimana",
                            phone=normalize(EN_MTN), actor=Actor.system())
    phone = AtPhone(client, EN_MTN)
    assert (await phone.dial()).startswith("CON Welcome to CoopPay")
    pick = await phone.send("1")
    assert pick.startswith("CON Choose your cooperative:") and "Remera Teachers SACCO" in pick
    types = await phone.send(option(pick, "Remera"))
    assert "Savings 2,000 RWF" in types and "Monthly Rent" not in types
    await phone.send(option(types, "Savings"))
    await phone.send("1")
    assert (await db.one(Payment)).cooperative_id == other.id


async def test_extension_sent_as_first_text_selects_the_cooperative(client: Any, demo: Any, db: Any,
                                                                    rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                          status="ACTIVE", ussd_extension="7", self_registration=True))
    # *384*123*7# arriving as serviceCode *384*123# with text "7": a stranger joins that cooperative.
    phone = AtPhone(client, STRANGER)
    phone.inputs.append("7")
    assert (await phone.dial()).startswith("CON Welcome to CoopPay")
    prompt = await phone.send("1")
    assert prompt.startswith("CON Enter your full name to join Remera Teachers SACCO:")
    await phone.send("Alice Mukamana")
    member = await db.one(Member, Member.name == "Alice Mukamana")
    remera = await db.one(Cooperative, Cooperative.short_code == "RTS")
    assert member.cooperative_id == remera.id
    # The whole code in serviceCode works the same.
    whole = AtPhone(client, "+250788555124", service_code="*384*123*7#")
    await whole.dial()
    assert (await whole.send("1")).startswith("CON Enter your full name to join Remera Teachers SACCO:")


async def test_a_member_of_another_cooperative_dialling_an_extension_is_told_which(client: Any, demo: Any,
                                                                                   rt: Any) -> None:
    """A Kigali Heights member dials Remera's extension and asks for their payments: "not registered with Remera
    Teachers SACCO" (it said "with any cooperative", though they are a member of one)."""
    async with rt.sessionmaker.begin() as s:
        s.add(Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                          status="ACTIVE", ussd_extension="7", self_registration=True))
    phone = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    await phone.dial()
    assert await phone.send("2") == ("END This phone is not registered with Remera Teachers SACCO. "
                                     "Choose Pay to register.")
    stranger = AtPhone(client, STRANGER)
    await stranger.dial()
    assert (await stranger.send("2")).startswith("END This phone is not registered with any cooperative.")


async def test_session_kept_compact_in_one_key_with_ttl(client: Any, demo: Any, rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    key = sessions.session_key("africastalking", phone.session_id)
    raw = await rt.redis.get(key)
    assert raw is not None and len(raw) < 1024
    ttl = await rt.redis.ttl(key)
    assert 0 < ttl <= sessions.SESSION_TTL
    assert key.startswith("ussd:{at:")


async def test_hops_are_logged_with_masked_phone_and_counted(client: Any, demo: Any, caplog: Any) -> None:
    from core.metrics import REGISTRY

    def hops(screen: str) -> float:
        return REGISTRY.get_sample_value("gateway_ussd_hops_total",
                                         {"aggregator": "africastalking", "screen": screen}) or 0.0

    before = hops("pay_type")
    caplog.set_level("INFO", logger="gateway.ussd")
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    assert hops("pay_type") == before + 1
    records = [r for r in caplog.records if r.getMessage() == "ussd hop"]
    assert records and all(r.phone == "+25078****002" and r.session_id == phone.session_id for r in records)
    assert EN_MTN not in caplog.text


@pytest.mark.parametrize(("country", "operator", "routed", "expected"), [
    ("RW", "MTN", {"MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL"}, ["MOBILE_MONEY_MTN"]),
    ("RW", "AIRTEL", {"MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL"}, ["MOBILE_MONEY_AIRTEL"]),
    ("RW", None, {"MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL"}, ["MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL"]),
    ("KE", "SAFARICOM", {"MPESA", "MOBILE_MONEY_AIRTEL"}, ["MPESA"]),
    ("KE", "AIRTEL", {"MPESA", "MOBILE_MONEY_AIRTEL"}, ["MOBILE_MONEY_AIRTEL"]),
    ("KE", None, {"MPESA"}, ["MPESA"]),
    ("RW", "MTN", {"MOBILE_MONEY_AIRTEL"}, []),
    ("RW", "MTN", set(), []),
])
def test_payment_method_follows_the_operator_and_country(country: str, operator: str | None,
                                                         routed: set[str], expected: list[str]) -> None:
    from channels.ussd.flows import methods_for

    assert methods_for(country, operator, routed) == expected


async def test_no_method_for_the_number_is_a_clear_end(client: Any, demo: Any, db: Any, rt: Any) -> None:
    original = rt.routes
    rt.routes = {k: v for k, v in original.items() if k != "MOBILE_MONEY_MTN"}
    try:
        phone = AtPhone(client, EN_MTN)
        await phone.dial()
        await phone.send("1")
        answer = await phone.send("1")
    finally:
        rt.routes = original
    assert answer == ("END No payment method is available for your number. "
                      "Please contact Kigali Heights Housing Cooperative.")
    assert await db.count(Payment) == 0


async def test_a_refusal_from_the_core_ends_cleanly(client: Any, demo: Any, db: Any, rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    await phone.send("1")
    async with rt.sessionmaker.begin() as s:  # the cooperative retires the type meanwhile
        ptype = await s.get(PaymentType, demo["payment_types"]["Monthly Rent"])
        ptype.is_active = False
    answer = await phone.send("1")
    assert answer == ("END Monthly Rent can no longer be paid to Kigali Heights Housing Cooperative. Nothing was "
                      "charged.")
    assert await db.count(Payment) == 0


# The hop budgets below are far above what a hop does before its payment starts (a few Redis and database
# round trips: ~30 ms measured on a loaded 2-CPU machine), so that a slow CI host never has the hop cut before
# the side effect even begins; what is slow here is the payment itself, held past the budget from where it starts.
# The service's own 3 s (not 1 s: a pause of this process, which is the server too, can outlast a second).
BUDGET = 3.0


async def _slow_create_payment(monkeypatch: Any, seconds: float = 0.0, release: asyncio.Event | None = None) -> None:
    """create_payment starts `seconds` late (a slow database, after the hop's budget is gone), or only once
    `release` is set."""
    import core.payments

    real = core.payments.create_payment

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        if release is not None:
            await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(core.payments, "create_payment", slow)


async def _at_rent_confirmation(client: Any) -> tuple[Any, AtPhone]:
    """The USSD channel object and a phone on the Monthly Rent confirmation screen."""
    from channels.ussd.routes import USSD

    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Monthly Rent"))
    return client.server.app[USSD], phone


async def _settled(channel: Any, within: float = 30.0) -> None:
    """Wait for the hops finishing in the background (each ends once its payment and answer are saved)."""
    if channel._finishing:
        await asyncio.wait(set(channel._finishing), timeout=within)
    await asyncio.sleep(0)  # their done callbacks (which empty the set) run at the next turn


async def test_a_slow_confirmation_is_not_cut_once_the_payment_has_started(client: Any, demo: Any, db: Any,
                                                                           monkeypatch: Any) -> None:
    channel, phone = await _at_rent_confirmation(client)
    channel.budget, channel.grace = BUDGET, 30.0
    # Started within the budget, the payment goes on past it (it is called no earlier than the hop began).
    await _slow_create_payment(monkeypatch, BUDGET + 0.3)
    done = await phone.send("1")
    # Told the truth: the payment exists and the payer approves it, never "service unavailable".
    payment = await db.one(Payment)
    assert done == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {payment.reference}"


async def test_a_confirmation_past_the_grace_finishes_and_a_retry_gets_its_answer(client: Any, demo: Any, db: Any,
                                                                                 monkeypatch: Any) -> None:
    channel, phone = await _at_rent_confirmation(client)
    channel.budget, channel.grace = BUDGET, 0.1
    release = asyncio.Event()  # the payment is held until the payer has been answered (past budget and grace)
    await _slow_create_payment(monkeypatch, release=release)
    first = await phone.send("1")
    # Not "try again" (that would charge twice): the payment may be going through.
    assert first == ("END Your request is still being processed. If it went through you will get an SMS "
                     "shortly; wait for it before trying again.")
    assert len(channel._finishing) == 1  # held until it finishes (asyncio keeps weak references only)
    assert await db.count(Payment) == 0
    release.set()
    await _settled(channel)  # the hop finishes in the background: payment, then the session's answer
    assert not channel._finishing
    payment = await db.one(Payment)
    # The aggregator retries the same hop: the real answer, and still one payment.
    retried = await phone.resend()
    assert retried == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {payment.reference}"
    assert await db.count(Payment) == 1
    assert not channel._finishing


async def test_a_session_not_saved_after_the_payment_still_gets_the_real_answer(client: Any, demo: Any, db: Any,
                                                                               monkeypatch: Any) -> None:
    """Redis fails right after the payment committed: the payer hears the truth, not "try again", and the
    aggregator's retry of that hop finds the same payment (its reserved reference) instead of a second."""
    import channels.ussd.sessions as sessions

    _channel, phone = await _at_rent_confirmation(client)
    real = sessions.save
    failures: list[str] = []

    async def failing(redis: Any, aggregator: str, session_id: str, stored: Any, **kwargs: Any) -> Any:
        if stored.state.screen == "pay_done":
            failures.append(stored.state.screen)
            raise ConnectionError("Redis went away")
        return await real(redis, aggregator, session_id, stored, **kwargs)

    monkeypatch.setattr(sessions, "save", failing)
    done = await phone.send("1")
    payment = await db.one(Payment)
    assert done == f"END Approve the prompt on your phone to pay 50,000 RWF. Ref {payment.reference}"
    assert failures == ["pay_done"]
    again = await phone.resend()  # the session still holds the confirmation screen
    assert again == done and len(failures) == 2
    assert await db.count(Payment) == 1
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1


async def test_a_failure_before_the_payment_still_says_unavailable(client: Any, demo: Any, db: Any,
                                                                  monkeypatch: Any) -> None:
    import channels.ussd.sessions as sessions

    _channel, phone = await _at_rent_confirmation(client)

    async def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(sessions, "save", failing)
    assert await phone.send("2") == "END Service unavailable, please try again later."  # (Cancel: no payment)
    assert await db.count(Payment) == 0


async def test_an_empty_first_reply_then_a_choice(client: Any, demo: Any) -> None:
    """Africa's Talking joins every reply with '*': after an empty reply the next choice arrives as '*1'."""
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    assert await phone.send("") == home  # nothing chosen: the same menu
    assert (await phone.send("1")).startswith("CON Choose what to pay:\n1. Monthly Rent")


async def test_a_hop_over_budget_before_any_side_effect_is_cancelled(client: Any, demo: Any, db: Any,
                                                                     monkeypatch: Any) -> None:
    import channels.ussd.flows as flows
    from channels.ussd.routes import USSD

    channel = client.server.app[USSD]
    real = flows.memberships
    calls: list[str] = []

    async def slow(ctx: Any) -> Any:
        calls.append("start")
        try:
            await asyncio.Event().wait()  # a read that never ends
        except asyncio.CancelledError:
            calls.append("cancelled")
            raise
        calls.append("end")  # never reached
        return await real(ctx)

    monkeypatch.setattr(flows, "memberships", slow)
    # The budget far above what the hop does before the read (see BUDGET), and the grace further still: an
    # answer before the grace could run out is the budget's cut.
    channel.budget, channel.grace = BUDGET, 60.0
    dial = AtPhone(client, EN_MTN).dial()
    assert await asyncio.wait_for(dial, 30) == "END Service unavailable, please try again later."
    for _ in range(500):  # the cancel is delivered at the task's next turn
        if len(calls) > 1:
            break
        await asyncio.sleep(0.01)
    assert calls == ["start", "cancelled"]  # cut mid-read, not left running


# -- the reference on the confirmation ----------------------------------------------------------------

async def test_reference_survives_back_and_forth_and_errors_on_the_confirmation(client: Any, demo: Any,
                                                                                db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    first = await phone.send(option(types, "Water"))
    reserved = reference_on(first)
    assert "Amount: 5,000 RWF" in first
    # An invalid key redisplays the confirmation with the same reference.
    wrong = await phone.send("7")
    assert wrong.startswith("CON Invalid choice.") and reference_on(wrong) == reserved
    # Back to the list, another payment type, and the confirmation again: still the same reference.
    assert await phone.send("0") == types
    second = await phone.send(option(types, "Monthly Rent"))
    assert "Amount: 50,000 RWF" in second and reference_on(second) == reserved
    # Home and all the way back in: the session still holds its reservation.
    assert (await phone.send("00")).startswith("CON Welcome to")
    third = await phone.send("1")
    again = await phone.send(option(third, "Water"))
    assert reference_on(again) == reserved
    done = await phone.send("1")
    payment = await db.one(Payment)
    assert payment.reference == reserved == reference_on(done)
    assert payment.amount_minor == 5_000


async def test_two_sessions_never_share_a_reference(client: Any, demo: Any, db: Any) -> None:
    phones = [AtPhone(client, number) for number in (EN_MTN, RW_MTN, FR_AIRTEL, SW_AIRTEL)]
    for phone in phones:
        await phone.dial()
        await phone.send("1")
    # Interleaved, then all at once: each session reserves its own reference.
    confirms = [await phones[0].send("2"), await phones[1].send("2")]
    confirms += await asyncio.gather(phones[2].send("2"), phones[3].send("2"))
    shown = [reference_on(screen) for screen in confirms]
    assert len(set(shown)) == 4, shown
    dones = await asyncio.gather(*(phone.send("1") for phone in phones))
    assert [reference_on(done) for done in dones] == shown
    payments = {p.idempotency_key: p.reference for p in await db.all(Payment)}
    assert payments == {f"ussd:africastalking:{phone.session_id}": ref
                        for phone, ref in zip(phones, shown, strict=True)}


async def test_a_cancelled_confirmation_reserves_but_pays_nothing(client: Any, demo: Any, db: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    cancelled_ref = reference_on(await phone.send("2"))
    assert await phone.send("2") == "END Payment cancelled. Nothing was charged."
    assert await db.count(Payment) == 0
    # The next session gets a new reference; the cancelled one is simply never used.
    other = AtPhone(client, EN_MTN)
    await other.dial()
    await other.send("1")
    assert reference_on(await other.send("2")) != cancelled_ref


async def test_resumed_session_keeps_the_reference_and_a_lost_answer_never_pays_twice(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """A session confirmed, committed, and then lost its answer (so the phone's resume route survived):
    the resumed session shows the same reference and confirming again finds that payment."""
    dropped = AtPhone(client, EN_MTN)
    await dropped.dial()
    await dropped.send("1")
    confirm = await dropped.send("2")
    reserved = reference_on(confirm)
    route_key = sessions.resume_key(rt.cipher, normalize(EN_MTN))
    route = await rt.redis.get(route_key)
    assert route is not None
    done = await dropped.send("1")
    assert reference_on(done) == reserved
    await rt.redis.set(route_key, route, ex=sessions.RESUME_TTL)  # as if the END answer was never saved

    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    resumed = await again.send("1")
    assert resumed == confirm and reference_on(resumed) == reserved
    second = await again.send("1")
    assert second.startswith("END Approve the prompt") and reference_on(second) == reserved
    payment = await db.one(Payment)
    assert payment.reference == reserved
    assert payment.idempotency_key == f"ussd:africastalking:{dropped.session_id}"
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1
    assert (await db.one(UssdSession, UssdSession.session_id == again.session_id)).payment_id == payment.id



async def test_a_language_chosen_through_an_extension_is_the_persons_everywhere(client: Any, demo: Any, db: Any,
                                                                                 rt: Any) -> None:
    """A member of two cooperatives picks French while dialling one's extension: the main code then greets
    them in French too (only the extension's membership used to be updated)."""
    from core.audit import Actor
    from core.members import create_member

    async with rt.sessionmaker.begin() as s:
        remera = Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                             status="ACTIVE", ussd_extension="7")
        s.add(remera)
        await s.flush()
        await create_member(s, rt.cipher, cooperative_id=remera.id, name="Jean Bosco", phone=normalize(EN_MTN),
                            actor=Actor("system", "system"), language="en")
    phone = AtPhone(client, EN_MTN, service_code="*384*123*7#")
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    assert (await phone.send(option(languages, "Francais"))).startswith("CON Bienvenue")
    again = AtPhone(client, EN_MTN)  # the main code: both memberships
    assert (await again.dial()).startswith("CON Bienvenue")
    rows = (await db.all(Member, Member.phone_index == rt.cipher.blind_index(EN_MTN)))
    assert sorted(m.language for m in rows) == ["fr", "fr"]


async def test_going_back_to_the_menu_withdraws_the_resume_offer(client: Any, demo: Any) -> None:
    """Pay, then Back to the menu and on to the language screen, then the session drops: the next dial is
    the menu, not "you did not finish" (which would land on the payment list they had left)."""
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    await phone.send("1")  # the payment list: worth resuming
    assert (await phone.send("0")) == home  # Back to the menu
    await phone.send(option(home, "Language"))
    again = AtPhone(client, EN_MTN)
    assert (await again.dial()) == home


async def test_a_type_whose_amount_the_payer_chooses_is_not_listed_at_zero(client: Any, demo: Any, rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        s.add(PaymentType(cooperative_id=demo["cooperative_id"], name="Donation", amount_minor=0,
                          currency="RWF", is_active=True, allow_custom_amount=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    assert "Donation any amount" in types and "Donation 0 RWF" not in types
    prompt = await phone.send(option(types, "Donation"))
    assert prompt.startswith("CON Enter amount in RWF:")  # no "(usual: -)"


async def test_a_member_of_two_cooperatives_can_reach_both_in_one_session(client: Any, demo: Any, rt: Any) -> None:
    """Pay at one, Home, Pay again: the cooperative is asked again (the first choice stuck for the whole
    session, and the other cooperative could not be reached)."""
    from core.audit import Actor
    from core.members import create_member

    async with rt.sessionmaker.begin() as s:
        remera = Cooperative(name="Remera Teachers SACCO", short_code="RTS", country="RW", currency="RWF",
                             status="ACTIVE")
        s.add(remera)
        await s.flush()
        s.add(PaymentType(cooperative_id=remera.id, name="Savings", amount_minor=2_000, currency="RWF",
                          is_active=True))
        await create_member(s, rt.cipher, cooperative_id=remera.id, name="Jean Bosco", phone=normalize(EN_MTN),
                            actor=Actor("system", "system"), language="en")
    phone = AtPhone(client, EN_MTN)
    home = await phone.dial()
    pick = await phone.send(option(home, "Pay"))
    assert pick.startswith("CON Choose your cooperative:")
    types = await phone.send(option(pick, "Remera"))
    assert "Savings" in types and "Monthly Rent" not in types
    assert (await phone.send("00")) == home
    again = await phone.send(option(home, "Pay"))
    assert again == pick
    kigali = await phone.send(option(again, "Kigali"))
    assert "Monthly Rent" in kigali and "Savings" not in kigali


async def test_long_names_that_begin_alike_can_be_told_apart_in_the_list(client: Any, demo: Any, rt: Any) -> None:
    """Both were "Monthly Rent - Buildi." on the screen: whole where the screen has room (test_member_truths), and
    shortened, the end that differs is kept."""
    from channels.ussd.flows import shorts

    names = [f"Monthly Rent - Building {block}" for block in ("A", "B")]
    async with rt.sessionmaker.begin() as s:
        for name in names:
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=60_000, currency="RWF",
                              is_active=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    assert "Monthly Rent - Building A 60,000 RWF" in types and "Monthly Rent - Building B 60,000 RWF" in types
    assert shorts(names) == ["Monthly Rent..lding A", "Monthly Rent..lding B"]
    chosen = await phone.send(option(types, "lding B"))
    assert "Monthly Rent - Building B" in chosen, chosen
    assert shorts(["Water", "Same name", "Same name"]) == ["Water", "Same name", "Same name"]


async def test_names_that_share_a_long_start_and_end_are_told_apart_by_where_they_differ(
        client: Any, demo: Any, rt: Any) -> None:
    """ "Monthly Rent - Block A - Ground Floor Shops" and "... B ...", "Loan repayment - Group 1 (Kicukiro branch)" and
    "... 2 ...", all at one price: the list read two identical lines twice; a hurried member paid the wrong one."""
    from channels.ussd.flows import shorts

    names = ["Monthly Rent - Block A - Ground Floor Shops", "Monthly Rent - Block B - Ground Floor Shops",
             "Loan repayment - Group 1 (Kicukiro branch)", "Loan repayment - Group 2 (Kicukiro branch)"]
    async with rt.sessionmaker.begin() as s:
        for name in names:
            s.add(PaymentType(cooperative_id=demo["cooperative_id"], name=name, amount_minor=50_000, currency="RWF",
                              is_active=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    more = await phone.send("98")
    lines = [line.split(". ", 1)[1] for screen in (types, more) for line in screen.splitlines()
             if "50,000 RWF" in line and "due day" not in line]
    assert len(lines) == 4 and len(set(lines)) == 4, (types, more)
    await phone.send("0")
    chosen = await phone.send(option(types, "Group 2"))
    assert "Group 2" in chosen, chosen
    labels = shorts(names)
    assert len(set(labels)) == 4 and all(len(label) <= 22 for label in labels), labels
    assert shorts([*names, "Same name", "Same name"], 22)[-2:] == ["Same name", "Same name"]
    coops = shorts(["Zone A - Kicukiro District Savings Cooperative", "Zone B - Kicukiro District Savings "
                    "Cooperative"], 30)
    assert len(set(coops)) == 2, coops


async def test_a_non_members_language_is_remembered_on_every_server(client: Any, demo: Any, rt: Any) -> None:
    """A phone of no cooperative chooses Kinyarwanda: the next session greets it in Kinyarwanda even on
    another serve process (its memory of languages is empty there), from the phone's key in Redis."""
    from channels.ussd.routes import USSD
    from channels.ussd.service import LanguageMemory

    phone = AtPhone(client, STRANGER)
    home = await phone.dial()
    languages = await phone.send(option(home, "Language"))
    chosen = await phone.send(option(languages, "Ikinyarwanda"))
    client.server.app[USSD].service.languages = LanguageMemory()  # another process: nothing in memory
    again = AtPhone(client, STRANGER)
    assert (await again.dial()) == chosen
    key = sessions.language_key(rt.cipher, normalize(STRANGER))
    assert await rt.redis.get(key) == b"rw" and 0 < await rt.redis.ttl(key) <= sessions.LANGUAGE_TTL


async def test_a_late_copy_of_an_earlier_hop_is_not_taken_as_a_new_key(client: Any, demo: Any, db: Any) -> None:
    """Africa's Talking sends every input so far: a delayed copy of an earlier hop ("1" on the confirmation
    screen, whose text is now "1*1") is old, not a press of 1 (which there means Confirm)."""
    phone = AtPhone(client, EN_MTN)
    opening = await phone.dial()
    await phone.send("1")
    confirm = await phone.send("1")
    assert "1. Confirm" in confirm
    for stale in ("1", ""):  # the types hop, then the opening hop, arriving late
        status, body = await phone.post({**phone.form(), "text": stale})
        assert (status, body) == (200, confirm)
    assert await db.count(Payment) == 0
    # The member's real key presses still work after them.
    done = await phone.send("1")
    assert done.startswith("END Approve the prompt")
    assert await db.count(Payment) == 1
    assert opening.startswith("CON ")


async def test_a_text_that_rewrites_the_history_shows_the_screen_again(client: Any, demo: Any, db: Any) -> None:
    """A text that neither extends nor repeats the inputs so far is not guessed at: the screen again, no
    step, and the member's next key (after that text) works."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    confirm = await phone.send("1")
    phone.inputs = ["9", "1"]
    assert await phone.dial() == confirm
    assert await db.count(Payment) == 0
    assert (await phone.send("1")).startswith("END Approve the prompt")
    assert await db.count(Payment) == 1


async def test_a_hop_from_another_phone_cannot_continue_a_session(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """A session belongs to the phone that opened it: a hop with its session id and another number (forged or
    misrouted) neither reads nor pays on it, and the owner's session goes on untouched."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    await phone.send("1")
    confirm = await phone.send("1")
    before = await sessions.load(rt.redis, "africastalking", phone.session_id)
    status, body = await phone.post({**phone.form(), "text": "1*1*1", "phoneNumber": "+250788000001"})
    assert status == 200 and body.startswith("END ") and "Approve" not in body
    assert await db.count(Payment) == 0
    assert await sessions.load(rt.redis, "africastalking", phone.session_id) == before
    assert confirm.startswith("CON ")
    assert (await phone.send("1")).startswith("END Approve the prompt")
    payment = await db.one(Payment)
    assert payment.payment_account_masked == "+25078****002"


async def test_my_payments_show_what_was_taken_when_the_provider_took_less(client: Any, demo: Any, db: Any,
                                                                          rt: Any) -> None:
    """The provider took 40,000 of the 50,000 RWF asked: "my payments" says 40,000, as the receipt does."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    await _pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        payment = (await s.execute(select(Payment))).scalar_one()
        await apply_collection_outcome(s, rt, payment, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"),
                                       amount=Money(40_000, "RWF"), provider_transaction_id="MP-1")
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    listing = await phone.send("2")
    assert "40,000 RWF" in listing and "50,000" not in listing
    detail = await phone.send("1")
    assert "Monthly Rent: 40,000 RWF\nStatus: Paid" in detail


@pytest.mark.parametrize(("now", "shown"), [("2026-11-29T12:00:00+00:00", 30),  # November: its 31st is the 30th
                                            ("2026-11-30T22:30:00+00:00", 31)])  # 00:30 on 1 December in Kigali
async def test_a_due_day_past_the_months_end_is_shown_as_this_months_last_day(
        client: Any, demo: Any, rt: Any, monkeypatch: pytest.MonkeyPatch, now: str, shown: int) -> None:
    from datetime import datetime

    from channels.ussd import flows

    async with rt.sessionmaker.begin() as s:
        water = await s.get(PaymentType, demo["payment_types"]["Water"])
        water.due_day = 31
        coop = await s.get(Cooperative, water.cooperative_id)
        assert coop.timezone == "Africa/Kigali"
    monkeypatch.setattr(flows, "utcnow", lambda: datetime.fromisoformat(now))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    assert f"Water 5,000 RWF (due day {shown})" in types, types


async def test_my_payments_show_the_amount_asked_of_a_voided_recording(client: Any, demo: Any, db: Any,
                                                                       rt: Any) -> None:
    """A recording of money taken voided by the desk (core.recorded_payments.void_recording: collected 0, its
    completedAt kept): nothing was taken, so "my payments" says the amount asked, as for a failed payment, never "0
    RWF"."""
    from sqlalchemy import update

    await _pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).values(status="VOIDED", collected_minor=0, completed_at=Payment.created_at,
                                               failure_reason="recording voided: wrong statement line"))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    listing = await phone.send("2")
    # The SMS's words ("not paid: recorded in error"), where the list line and the detail have room for them.
    assert "50,000 RWF Monthly Rent Not paid: recorded in error" in listing and " 0 RWF" not in listing, listing
    detail = await phone.send("1")
    assert "Monthly Rent: 50,000 RWF\nStatus: Not paid: recorded in error" in detail, detail


async def test_my_payments_never_show_0_for_money_taken_that_counts_as_nothing(client: Any, demo: Any, db: Any,
                                                                             rt: Any) -> None:
    """Money the provider reported taken in another currency (or a zero or negative amount) completes the payment
    with collected 0, flagged for a person: her wallet was charged, so "my payments" says the amount asked (as her
    receipt says the payment was received, under review), never "0 RWF"."""
    from sqlalchemy import update

    await _pay(client, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).values(status="COMPLETED", collected_minor=0, completed_at=Payment.created_at,
                                               mismatch=True))
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    listing = await phone.send("2")
    assert "50,000 RWF" in listing and " 0 RWF" not in listing, listing
    detail = await phone.send("1")
    assert "Monthly Rent: 50,000 RWF\n" in detail, detail
