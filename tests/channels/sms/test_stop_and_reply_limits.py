"""STOP is the number's, not only its memberships' of the moment; keyword replies (paid SMS) bounded per number
and day, and sent only to numbers the gateway serves; a keyword read through the punctuation people type."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update

from channels.sms.routes import REPLY_DAILY_LIMIT, REPLY_LIMIT, parse_keyword
from core.audit import Actor
from core.members import create_member
from core.models import AuditEvent, Cooperative, Member, PhoneOptOut
from core.phone import normalize
from core.ratelimit import RateLimiter
from core.reminders import scan, why_not_send
from tests.admin_api.conftest import bearer
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_routes import ALINE, first_try_fails_after_its_count, inbound
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import LimiterClock, drain

NEWCOMER = "+250788555444"
# 28 November, 08:00 in Kigali: the demo's Monthly Rent (due day 1) falls due in 3 days (as tests/core/test_reminders).
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


async def _second_coop(rt: Any) -> Cooperative:
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Musanze Farmers", short_code="MSZF", country="RW", currency="RWF",
                           timezone="Africa/Kigali", ussd_extension="77", contact_phone="+250788123457",
                           status="ACTIVE")
        s.add(coop)
    return coop


async def _memberships(rt: Any, phone: str) -> list[Member]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(Member).where(
            Member.phone_index == rt.cipher.blind_index(phone)).order_by(Member.created_at))).scalars())


async def _opt_outs(rt: Any) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(PhoneOptOut.phone_index))).scalars())


async def _reminded(rt: Any) -> set[str]:
    return {j.payload["member_id"] for j in await jobs_of(rt, "sms.send")
            if j.payload["template"] == "payment_reminder"}


# ------------------------------------------------------------------------------------------- STOP is the number's


async def test_stop_before_joining_holds_for_every_membership_made_later(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """A number that sent STOP before it was registered: the API's member, the CSV import's and the USSD
    registration's memberships all hold it, and no reminder leaves for them. START undoes it. Their own flags and
    audit rows do not say it (each cooperative would read the STOP list: tests/admin_api/test_optout_not_disclosed):
    the reminder is queued as any other and dropped at its turn."""
    await inbound(sms_client, NEWCOMER, "STOP", "in-stop-first")
    await drain(worker)
    [told] = sim.messages(NEWCOMER)
    assert told["message"].startswith("You will no longer get reminders")  # and now it is true
    assert await _opt_outs(rt) == [rt.cipher.blind_index(NEWCOMER)]  # the blind index, never the number

    async with rt.sessionmaker.begin() as s:  # a cooperative that people join by USSD
        s.add(Cooperative(name="Huye Weavers", short_code="HUYW", country="RW", currency="RWF",
                          timezone="Africa/Kigali", ussd_extension="78", status="ACTIVE", self_registration=True))
    phone = AtPhone(sms_client, NEWCOMER)
    await phone.dial()
    for key in ("1", "HUYW"):
        await phone.send(key)
    assert (await phone.send("Diane Iradukunda")).startswith("END Thank you Diane Iradukunda")
    admin = await bearer(sms_client, *demo["admin"])
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Diane Iradukunda", "phone": NEWCOMER})
    other = await _second_coop(rt)
    async with rt.sessionmaker.begin() as s:
        from core.member_import import import_members

        await import_members(s, rt.cipher, cooperative=other, actor=Actor("system", "system"),
                             data=f"name,phone\nDiane Iradukunda,{NEWCOMER}\nEric Habimana,0788555445\n".encode())

    memberships = await _memberships(rt, NEWCOMER)
    assert len(memberships) == 3 and made["id"] in {m.id for m in memberships}
    # Changed with the fix of the STOP list read through member.created: these were [True] * 3 (the number's
    # STOP copied into each new membership's flag and audit row).
    assert [m.reminders_opt_out for m in memberships] == [False, False, False]
    [eric] = await _memberships(rt, "+250788555445")
    assert eric.reminders_opt_out is False  # the import's other row: its number never sent STOP
    async with rt.sessionmaker() as s:
        created = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "member.created", AuditEvent.entity_id.in_([m.id for m in memberships])))).scalars()
        assert [a.after.get("remindersOptOut") for a in created] == [None, None, None]

    async with rt.sessionmaker.begin() as s:
        assert await scan(s, rt, now=NOW) == 6  # the demo's five members and the API's one, queued alike
    [job] = [j for j in await jobs_of(rt, "sms.send") if j.payload.get("member_id") == made["id"]]
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, job.payload) == "opted_out"
    await drain(worker)
    assert sim.messages(NEWCOMER) == [told]  # no reminder left for the number that sent STOP

    await inbound(sms_client, NEWCOMER, "START", "in-start")
    assert [m.reminders_opt_out for m in await _memberships(rt, NEWCOMER)] == [False, False, False]
    assert await _opt_outs(rt) == []
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, job.payload) is None


async def test_a_member_who_sent_stop_is_not_reminded_by_the_next_cooperative(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """A member of Musanze Farmers texts STOP, then joins the demo cooperative: not reminded there, and her new
    membership's flag does not tell its cooperative (it said True before the fix of the STOP list read through
    member.created); her first membership's does (she sent it as its member)."""
    other = await _second_coop(rt)
    async with rt.sessionmaker.begin() as s:
        first = await create_member(s, rt.cipher, cooperative_id=other.id, name="Rose Mukamana",
                                    phone=normalize(NEWCOMER), actor=Actor("system", "system"))
    await inbound(sms_client, NEWCOMER, "STOP", "in-stop-rose")
    async with rt.sessionmaker.begin() as s:
        second = await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="Rose Mukamana",
                                     phone=normalize(NEWCOMER), actor=Actor("system", "system"))
    assert [(m.id, m.reminders_opt_out) for m in await _memberships(rt, NEWCOMER)] == [(first.id, True),
                                                                                         (second.id, False)]
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    [job] = [j for j in await jobs_of(rt, "sms.send") if j.payload.get("member_id") == second.id]
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, job.payload) == "opted_out"


async def test_a_reminder_is_not_sent_to_a_number_that_sent_stop_whatever_its_membership_says(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """The send-time check reads the number too: a membership written without the flag (by a process of the
    previous release during a deploy, or while the STOP was being recorded) gets no reminder."""
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=NOW)
    [job] = [j for j in await jobs_of(rt, "sms.send") if j.payload["member_id"] == demo["members"][ALINE]]
    await inbound(sms_client, ALINE, "STOP", "in-stop-late")
    async with rt.sessionmaker.begin() as s:  # as an older process would have left a membership
        await s.execute(update(Member).where(Member.id == demo["members"][ALINE]).values(reminders_opt_out=False))
    async with rt.engine.connect() as conn:
        assert await why_not_send(conn, job.payload) == "opted_out"


async def test_releasing_the_number_leaves_its_stop_to_its_holder(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """release-phone: the operator gave the number to someone else, whose membership must not start opted out
    by the last holder's STOP; while another membership still holds the number, its STOP stays."""
    admin = await bearer(sms_client, *demo["admin"])
    other = await _second_coop(rt)
    async with rt.sessionmaker.begin() as s:
        elsewhere = await create_member(s, rt.cipher, cooperative_id=other.id, name="Aline Uwase",
                                        phone=normalize(ALINE), actor=Actor("system", "system"))
    await inbound(sms_client, ALINE, "STOP", "in-stop-release")
    aline = demo["members"][ALINE]
    await admin.json("DELETE", f"/v1/members/{aline}", 200)
    await admin.json("POST", f"/v1/members/{aline}/release-phone", 200)
    assert await _opt_outs(rt) == [rt.cipher.blind_index(ALINE)]  # still hers in the other cooperative

    async with rt.sessionmaker.begin() as s:
        from core.members import release_phone

        row = await s.get(Member, elsewhere.id)
        row.status = "SUSPENDED"
        await s.flush()
        await release_phone(s, row, actor=Actor("system", "system"))
    assert await _opt_outs(rt) == []
    made = await admin.json("POST", "/v1/members", 201, json={"name": "New Holder", "phone": ALINE})
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, made["id"])).reminders_opt_out is False


async def test_an_aggregator_retry_of_an_earlier_start_does_not_undo_her_stop(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    """Africa's Talking posts an inbound text again when it did not get our answer (a timeout), though we had
    taken it: her START retried after the STOP she sent next must not turn the reminders back on (nor a STOP
    retried after her START turn them off)."""
    aline = demo["members"][ALINE]
    # Each reply sent before her next word (one still waiting when she sends the other is not sent at all:
    # tests/channels/sms/test_stop_start_order.py).
    await inbound(sms_client, ALINE, "START", "in-start-retried")
    await drain(worker)
    await inbound(sms_client, ALINE, "STOP", "in-stop-after")
    await drain(worker)
    await inbound(sms_client, ALINE, "START", "in-start-retried")  # the aggregator's retry of the first text
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, aline)).reminders_opt_out is True
    assert await _opt_outs(rt) == [rt.cipher.blind_index(ALINE)]
    await drain(worker)
    await inbound(sms_client, ALINE, "TANGIRA", "in-start-after")
    await drain(worker)
    await inbound(sms_client, ALINE, "STOP", "in-stop-after")  # retried after her START
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, aline)).reminders_opt_out is False
    assert await _opt_outs(rt) == []
    await drain(worker)
    assert len(sim.messages(ALINE)) == 3  # one reply per text she sent, none for the retries


async def test_a_stop_posted_without_id_or_date_is_never_taken_for_a_retry(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """With neither `id` nor `date` every STOP of the number reads alike (sender|date|text): her second STOP, after
    a START, is a text of its own, not a retry of the first, and must be taken."""
    aline = demo["members"][ALINE]
    for text in ("STOP", "START", "STOP"):
        response = await sms_client.post("/sms/africastalking/inbound", data={"from": ALINE, "text": text})
        assert response.status == 200
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, aline)).reminders_opt_out is True
    assert await _opt_outs(rt) == [rt.cipher.blind_index(ALINE)]


# ------------------------------------------------------------------------------------ who gets a (paid) reply


@pytest.mark.parametrize("foreign", ["+14155550123", "+447911123456", "+8613800138000"])
async def test_no_reply_to_a_number_outside_the_served_countries(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any, foreign: str
) -> None:
    await inbound(sms_client, foreign, "hello", "in-foreign-1")
    await inbound(sms_client, foreign, "HELP", "in-foreign-2")
    await inbound(sms_client, foreign, "STOP", "in-foreign-3")
    await drain(worker)
    assert sim.messages(foreign) == [] and await jobs_of(rt, "sms.send") == []
    assert [k async for k in rt.redis.scan_iter("rl:*")] == []  # not counted either
    assert await _opt_outs(rt) == [rt.cipher.blind_index(foreign)]  # its STOP is kept all the same


async def test_a_member_with_a_foreign_number_gets_replies(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    foreign = "+447911123456"
    async with rt.sessionmaker.begin() as s:
        await create_member(s, rt.cipher, cooperative_id=demo["cooperative_id"], name="John Smith",
                            phone=normalize(foreign), actor=Actor("system", "system"))
    await inbound(sms_client, foreign, "STOP", "in-member-abroad")
    await drain(worker)
    [reply] = sim.messages(foreign)
    assert reply["message"].startswith("You will no longer get reminders")


# ------------------------------------------------------------------------------------------------ reply limits


# The limiters' clock is tests.conftest.limiter_clock: held still, and moved by the tests of a window's turn (only
# the limiters' clock; this process's time.time, which the database, JWTs and logs read, keeps the real time).
MIDNIGHT = 1_799_971_200.0  # UTC: a multiple of 86,400
TEN_MINUTES_TURN = 1_800_000_000.0  # a multiple of 600


async def test_five_replies_in_ten_minutes_slide_over_the_windows_turn(
    rt: Any, demo: dict[str, Any], sms_client: Any, limiter_clock: LimiterClock
) -> None:
    """A fixed window let 5 through in the last second of a window and 5 more in the first of the next."""
    limiter_clock.now = TEN_MINUTES_TURN - 1
    for i in range(5):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"turn-a-{i}")
    limiter_clock.now += 2
    for i in range(5):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"turn-b-{i}")
    # The previous window still weighs 599/600 of its 5 (floored to 4): one more, not five.
    assert len(await jobs_of(rt, "sms.send")) == 6
    limiter_clock.now += 5 * 60  # half of the previous window left in: 2 of its 5, and 1 of this one
    for i in range(5):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"turn-c-{i}")
    assert len(await jobs_of(rt, "sms.send")) == 8


async def test_a_robot_texting_all_day_gets_20_replies_and_one_help(
    rt: Any, demo: dict[str, Any], sms_client: Any, limiter_clock: LimiterClock
) -> None:
    """An autoresponder: each of our replies answered within minutes, all day long."""
    limiter_clock.now = MIDNIGHT
    for i in range(60):  # every 24 minutes: the 10-minute limit never refuses
        await inbound(sms_client, "+250788999111", "STATUS PAY_20260115_999999", f"robot-{i}")
        limiter_clock.now += 24 * 60
    assert len(await jobs_of(rt, "sms.send")) == 20

    limiter_clock.now = MIDNIGHT + 2 * 86_400
    for i in range(30):  # what the robot says is "not understood": the help goes once
        await inbound(sms_client, "+250788999222", "Message not delivered", f"robot-help-{i}")
        limiter_clock.now += 120
    help_replies = [j for j in await jobs_of(rt, "sms.send") if j.payload["template"] in ("help", "unknown")]
    assert len(help_replies) == 1


async def test_a_reply_the_daily_limit_refuses_uses_none_of_the_ten_minutes(
    rt: Any, demo: dict[str, Any], sms_client: Any, limiter_clock: LimiterClock
) -> None:
    """Texts the daily limit refuses are counted in no window. Counted in the 10-minute one (which allowed them)
    before the daily one refused them, they refused her next text there, which the daily limit allows: the
    previous day's 20 replies weigh 19 until 72 minutes past midnight, 18 after."""
    limiter_clock.now = MIDNIGHT
    for i in range(20):  # the day's 20, every 24 minutes: the 10-minute limit never refuses
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"day-{i}")
        limiter_clock.now += 24 * 60
    limiter_clock.now = MIDNIGHT + 86_400 + 1
    await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "next-day")  # 19 + 0: allowed
    limiter_clock.now = MIDNIGHT + 86_400 + 4_200  # a 10-minute window's start; 19 + 1: refused
    for i in range(5):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"refused-{i}")
        limiter_clock.now += 5
    assert len(await jobs_of(rt, "sms.send")) == 21
    limiter_clock.now = MIDNIGHT + 86_400 + 4_330  # 18 + 1: the daily limit allows one more, in the same 10 minutes
    await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "allowed")
    assert len(await jobs_of(rt, "sms.send")) == 22


@pytest.mark.usefixtures("limiter_clock")
async def test_the_help_refused_uses_none_of_the_numbers_other_replies(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    for i in range(3):
        await inbound(sms_client, ALINE, "STAUTS PAY_20260115_999999", f"typo-{i}")
    for i in range(4):
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"status-{i}")
    templates = [j.payload["template"] for j in await jobs_of(rt, "sms.send")]
    assert sorted(templates) == ["not_found", "not_found", "not_found", "not_found", "unknown"]
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, demo["members"][ALINE])).reminders_opt_out is False


@pytest.mark.usefixtures("limiter_clock")
async def test_help_is_answered_after_a_text_that_was_not_understood(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """The "not understood" reply says "Send HELP": the member who does gets the keywords, that day too; HELP
    counts against the number's ordinary limits (5 per 10 minutes), not the once-a-day help."""
    await inbound(sms_client, ALINE, "STAUTS PAY_20260115_999999", "typo")
    for i in range(6):
        await inbound(sms_client, ALINE, "HELP", f"help-{i}")
    templates = [j.payload["template"] for j in await jobs_of(rt, "sms.send")]
    assert templates == ["unknown", "help", "help", "help", "help"]
    async with rt.sessionmaker() as s:
        assert (await s.get(Member, demo["members"][ALINE])).reminders_opt_out is False


# ------------------------------------------------------------------------------------------ keywords as typed


@pytest.mark.parametrize(("text", "expected"), [
    ('"STOP"', ("STOP", "en", None)),
    ("“Stop”", ("STOP", "en", None)),
    ("'stop'", ("STOP", "en", None)),
    ("(STOP)", ("STOP", "en", None)),
    ("STOP-", ("STOP", "en", None)),
    ("#STOP", ("STOP", "en", None)),
    ("STOP🙏", ("STOP", "en", None)),
    ("«Arrêt»", ("STOP", "fr", None)),
    ("STATUS:PAY_20260115_001", ("STATUS", "en", "PAY_20260115_001")),
    ("receipt (PAY_20260115_001).", ("RECEIPT", "en", "PAY_20260115_001")),
    ("ＳＴＯＰ！", ("STOP", "en", None)),  # full-width, with a full-width "!"
    ("STOPPED", (None, None, None)),
    ("-- ", (None, None, None)),
])
def test_keywords_are_read_through_punctuation(text: str, expected: tuple[Any, ...]) -> None:
    assert parse_keyword(text) == expected


async def test_a_quoted_stop_opts_out(rt: Any, demo: dict[str, Any], sms_client: Any) -> None:
    await inbound(sms_client, ALINE, "“Stop” 🙏", "in-quoted")
    assert [m.reminders_opt_out for m in await _memberships(rt, ALINE)] == [True]


# ------------------------------------------------------------------------------------------------ migration 0016


def test_0016_keeps_the_stops_already_sent_for_their_numbers(tmp_path: Any) -> None:
    """A number with an opted-out membership sent STOP (it was applied to every membership it had): it becomes
    an opted-out number, and its memberships made since, getting reminders against it, are opted out too."""
    import sqlalchemy as sa
    from alembic import command

    from main import _alembic_config, migrate
    from tests.conftest import make_settings

    settings = make_settings(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/m.db")
    migrate(settings)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")
    coops, members = Cooperative.__table__, Member.__table__
    try:
        with engine.begin() as conn:
            for code in ("AAA", "BBB"):
                conn.execute(coops.insert().values(id=code, name=code, short_code=code, country="RW",
                                                   currency="RWF", timezone="Africa/Kigali"))
            for member_id, coop, index, opted_out in [("m1", "AAA", "stopped", True), ("m2", "BBB", "stopped", False),
                                                      ("m3", "AAA", "never", False), ("m4", "BBB", None, True)]:
                conn.execute(members.insert().values(id=member_id, cooperative_id=coop, name="Member",
                                                     phone_enc=index and "x", phone_index=index, phone_masked="m",
                                                     reminders_opt_out=opted_out))
        command.downgrade(_alembic_config(settings), "0015")
        command.upgrade(_alembic_config(settings), "0016")
        with engine.connect() as conn:
            assert list(conn.execute(sa.text("SELECT phone_index FROM phone_opt_outs")).scalars()) == ["stopped"]
            flags = dict(conn.execute(sa.select(members.c.id, members.c.reminders_opt_out)).all())
        assert flags == {"m1": True, "m2": True, "m3": False, "m4": True}
    finally:
        engine.dispose()


@pytest.mark.usefixtures("limiter_clock")
async def test_a_retry_of_a_text_not_understood_gets_the_help_its_first_try_counted(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try of a text not understood counted the day's one help and then failed (the database away while
    the reply was queued: a 503, which Africa's Talking retries): its retry gets that help, counted once, instead of
    finding it used up by its own first try. A new text the same day still gets none."""
    response = await first_try_fails_after_its_count(sms_client, monkeypatch, "Helo?", "in-garbled",
                                                      "2026-01-15 10:00:00")
    assert response.headers["Retry-After"] == "1"  # an outage, not a bug
    assert await jobs_of(rt, "sms.send") == []
    await inbound(sms_client, ALINE, "Helo?", "in-garbled")  # the aggregator's retry
    await inbound(sms_client, ALINE, "Helo?", "in-garbled")  # and another, after our answer was late
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["unknown"]
    await inbound(sms_client, ALINE, "Hello??", "in-garbled-2")  # a new text: the day's help is used
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["unknown"]



@pytest.mark.usefixtures("limiter_clock")
async def test_a_retry_of_a_text_refused_a_reply_is_refused_it_again(
    rt: Any, demo: dict[str, Any], sms_client: Any
) -> None:
    """A text's reply verdict is kept by its inbound id, a refusal as much as a consent: the retry of a text the
    limits refused a reply (the day's one help used by an earlier text) gets none either, else every text the
    aggregator posted twice got around the limits."""
    await inbound(sms_client, ALINE, "Helo?", "in-first")
    await inbound(sms_client, ALINE, "Hello??", "in-second")  # the day's help is used: no reply
    await inbound(sms_client, ALINE, "Hello??", "in-second")  # the aggregator's retry of it
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["unknown"]


@pytest.mark.usefixtures("limiter_clock")
async def test_two_tries_of_a_text_taken_at_once_count_its_reply_once(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator posts a text again when our answer is slow: its retry can arrive while the first try is still
    at work. Both counted the reply before either kept the text's verdict, so one text used two of her five replies
    per 10 minutes (the reply itself went once: its dedupe key), and her fourth keyword after it got none. Lined up
    here, not left to timing: the first try's count comes back from Redis and that try waits there until the
    second try's count has come back too."""
    real_eval = rt.redis.eval
    second_counted = asyncio.Event()
    tries: list[str] = []

    async def lined_up(script: Any, numkeys: int, *keys_and_args: Any) -> Any:
        answer = await real_eval(script, numkeys, *keys_and_args)
        if any(":sms:reply:" in str(key) for key in keys_and_args[:numkeys]):  # a reply's count
            tries.append("counted")
            if len(tries) == 1:
                with contextlib.suppress(TimeoutError):  # a fix that made the second wait for the first
                    await asyncio.wait_for(second_counted.wait(), 5)
            else:
                second_counted.set()
        return answer

    with monkeypatch.context() as patched:
        patched.setattr(rt.redis, "eval", lined_up)
        both = await asyncio.gather(*(inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "in-twice")
                                      for _ in range(2)))
    assert [answer.status for answer in both] == [200, 200] and len(tries) == 2 and second_counted.is_set()
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["not_found"]
    index = rt.cipher.blind_index(ALINE)
    limiter = RateLimiter(rt.redis)
    assert [(await limiter.peek(limit, index)).used for limit in (REPLY_LIMIT, REPLY_DAILY_LIMIT)] == [1, 1]
    for i in range(5):  # four more get a reply, the fifth is refused
        await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", f"in-next-{i}")
    assert len(await jobs_of(rt, "sms.send")) == 5


@pytest.mark.usefixtures("limiter_clock")
async def test_a_count_kept_by_its_verdict_is_not_lost_when_the_release_befores_keys_cannot_be_written(
    rt: Any, demo: dict[str, Any], sms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text's reply is counted and its verdict kept by one command (RateLimiter.hit_all_once); writing it again
    as the release before keeps it is a second command. Redis failing between the two skipped the reply though the
    count and the verdict stood: her reply never went and one of her five was used (our 200: no retry)."""
    import redis.exceptions

    real_pipeline = rt.redis.pipeline

    class FailingPipeline:
        def __init__(self, pipe: Any) -> None:
            self._pipe = pipe

        async def __aenter__(self) -> Any:
            await self._pipe.__aenter__()
            return self

        async def __aexit__(self, *exc: Any) -> Any:
            return await self._pipe.__aexit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._pipe, name)

        async def execute(self, *_args: Any, **_kwargs: Any) -> Any:
            raise redis.exceptions.ConnectionError("Connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(rt.redis, "pipeline", lambda *a, **k: FailingPipeline(real_pipeline(*a, **k)))
        assert (await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "in-keys")).status == 200
    assert [j.payload["template"] for j in await jobs_of(rt, "sms.send")] == ["not_found"]
    await inbound(sms_client, ALINE, "STATUS PAY_20260115_999999", "in-keys")  # a retry: counted once, one reply
    index = rt.cipher.blind_index(ALINE)
    limiter = RateLimiter(rt.redis)
    assert [(await limiter.peek(limit, index)).used for limit in (REPLY_LIMIT, REPLY_DAILY_LIMIT)] == [1, 1]
    assert len(await jobs_of(rt, "sms.send")) == 1


async def test_stop_audits_only_the_memberships_it_changed(rt: Any, demo: dict[str, Any], sms_client: Any) -> None:
    """A number in two cooperatives whose membership in one was opted out already (by its admin): her STOP turns off
    the other's reminders and audits that one alone; an audit row saying the first went from false to true would be
    untrue (its admin set it). Her START then turns both on, each audited once."""
    other = await _second_coop(rt)
    async with rt.sessionmaker.begin() as s:
        elsewhere = await create_member(s, rt.cipher, cooperative_id=other.id, name="Aline Uwase",
                                        phone=normalize(ALINE), actor=Actor("system", "system"))
        await s.execute(update(Member).where(Member.id == elsewhere.id).values(reminders_opt_out=True))
    here = demo["members"][ALINE]

    async def audits() -> list[tuple[str, str, Any, Any]]:
        async with rt.sessionmaker() as s:
            rows = (await s.execute(select(AuditEvent).where(AuditEvent.action == "member.reminders_opt_out")
                                    .order_by(AuditEvent.at, AuditEvent.entity_id))).scalars()
            return [(a.entity_id, a.cooperative_id, a.before, a.after) for a in rows]

    await inbound(sms_client, ALINE, "STOP", "in-stop-two-coops")
    assert {m.id: m.reminders_opt_out for m in await _memberships(rt, ALINE)} == {here: True, elsewhere.id: True}
    assert await audits() == [(here, demo["cooperative_id"], {"remindersOptOut": False}, {"remindersOptOut": True})]

    await inbound(sms_client, ALINE, "START", "in-start-two-coops")
    assert {m.id: m.reminders_opt_out for m in await _memberships(rt, ALINE)} == {here: False, elsewhere.id: False}
    assert sorted((await audits())[1:]) == sorted([
        (here, demo["cooperative_id"], {"remindersOptOut": True}, {"remindersOptOut": False}),
        (elsewhere.id, other.id, {"remindersOptOut": True}, {"remindersOptOut": False})])
