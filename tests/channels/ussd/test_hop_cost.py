"""What a USSD hop costs the database, and the short-lived caches that keep it low, on real servers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import update

from channels.ussd import cache, records
from channels.ussd.engine import Ctx, Engine, State
from channels.ussd.screens import SCREENS
from core.models import Payment, PaymentType, UssdSession
from core.references import reference_prefix
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, RW_MTN, option
from tests.conftest import is_postgres, sql_sent

STRANGER = "+250788555123"


def statements(rt: Any) -> Any:
    """Every SQL statement the service sends while the block runs (raw asyncpg ones too)."""
    return sql_sent(rt, lambda q: " ".join(q.split())[:60])


async def test_a_pay_session_reads_each_thing_once(client: Any, demo: Any, db: Any, rt: Any) -> None:
    warm = AtPhone(client, RW_MTN)  # another member's session has read the cooperative and its types
    await warm.dial()
    await warm.send("1")
    phone = AtPhone(client, EN_MTN)
    with statements(rt) as first:
        home = await phone.dial()
    assert home.startswith("CON Welcome to Kigali Heights Housing Cooperative")
    # The memberships and the session row: one statement on PostgreSQL, two elsewhere.
    assert len(first) == (1 if is_postgres() else 2), first
    with statements(rt) as second:
        types = await phone.send("1")
    assert "Monthly Rent" in types and second == []  # memberships kept in the session, types cached
    with sql_sent(rt) as third:
        confirm = await phone.send(option(types, "Monthly Rent"))
    # What she kept of the period's rent (a fixed amount due monthly: flows._owed, only once she picks such a
    # type), and the reference's number: one statement on PostgreSQL, two elsewhere (the counter row).
    assert confirm.startswith("CON Pay Monthly Rent") and len(third) == (1 if is_postgres() else 2), third
    assert "sum(" in third[0] and "payments" in third[0], third
    assert "nextval('human_reference_seq')" in third[0] if is_postgres() else "reference_counters" in third[1], third
    shown = confirm.split("Ref: ")[1].split()[0]
    with statements(rt) as fourth:
        done = await phone.send("1")
    assert done.startswith("END Approve the prompt")
    assert [s for s in fourth if s.startswith("UPDATE ussd_sessions")], fourth  # closed in one UPDATE
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert (row.status, row.hops, row.last_screen, row.member_id) == (
        "Success", 4, "pay_done", demo["members"][EN_MTN])
    # The payment carries the reference the confirmation showed, made of the number the balance's query took.
    payment = await db.one(Payment, Payment.member_id == demo["members"][EN_MTN])
    assert payment.reference == shown and shown.startswith(reference_prefix("PAY", ZoneInfo("Africa/Kigali")))


async def test_a_deactivated_type_goes_from_the_menu_when_the_cache_expires(client: Any, demo: Any,
                                                                           rt: Any) -> None:
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    assert "Water" in await phone.send("1")
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(PaymentType).where(PaymentType.id == demo["payment_types"]["Water"])
                        .values(is_active=False))
    cache.of(rt).types.clear()  # what TTL_SECONDS does on its own
    again = AtPhone(client, EN_MTN)
    await again.dial()
    types = await again.send("1")
    assert "Monthly Rent" in types and "Water" not in types


def test_ttl_cache_expires_and_stays_bounded(monkeypatch: Any) -> None:
    now = [100.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: now[0])
    ttl = cache.TtlCache(ttl=5.0, size=3)
    ttl.put("a", 1)
    assert ttl.get("a") == 1
    now[0] += 5.1
    assert ttl.get("a") is cache.MISSING
    for key in "bcdef":
        ttl.put(key, key)
    assert ttl.get("f") == "f" and len(ttl._items) <= 3
    ttl.put("none", None)
    assert ttl.get("none") is None  # "no such row" is remembered too


async def test_an_aggregator_status_is_not_overwritten_by_the_close(client: Any, demo: Any, db: Any,
                                                                    rt: Any) -> None:
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(UssdSession).where(UssdSession.session_id == phone.session_id)
                        .values(status="Failed"))
    await records.closed(rt, aggregator="africastalking", session_id=phone.session_id, hops=3,
                         last_screen="home", data={"c": demo["cooperative_id"]}, duration_ms=12)
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert (row.status, row.hops, row.last_screen, row.duration_ms, row.cooperative_id) == (
        "Failed", 3, "home", 12, demo["cooperative_id"])
    again = AtPhone(client, STRANGER)
    await again.dial()
    await records.closed(rt, aggregator="africastalking", session_id=again.session_id, hops=2,
                         last_screen="home", data={}, status="Incomplete")
    row = await db.one(UssdSession, UssdSession.session_id == again.session_id)
    assert (row.status, row.hops, row.duration_ms) == ("Incomplete", 2, None)


async def test_a_remembered_menu_is_the_menu_rendered_afresh() -> None:
    remembering = Engine(SCREENS)
    for lang in ("en", "rw", "fr", "sw"):
        for screen in ("home", "language", "resume"):
            for stack in ([], ["home"], ["home", "language"]):
                for error in (None, "Invalid choice"):
                    for _ in range(2):  # the second time from memory
                        states = []
                        for engine in (remembering, Engine(SCREENS)):
                            state = State(screen=screen, stack=list(stack), lang=lang, data={"hn": "Coop A"})
                            ctx = Ctx(rt=None, turn=None, state=state, limit=182)
                            reply = await engine.render(ctx, error=error)
                            states.append((reply, state))
                        assert states[0] == states[1]


async def test_the_opening_hop_reads_its_session_and_the_phone_in_one_redis_round_trip(client: Any, demo: Any,
                                                                                      rt: Any) -> None:
    from tests.channels.ussd.helpers import swapped_redis
    from tests.core.test_ops import CountingRedis

    counting = CountingRedis(rt.redis)
    phone = AtPhone(client, STRANGER)
    with swapped_redis(rt, counting):
        await phone.dial()
        await phone.send("4")  # Language
        await phone.send("4")  # Kiswahili: kept for the phone (of no cooperative) in Redis
        before = counting.trips
        home = await AtPhone(client, STRANGER).dial()
    # The session (none), the phone's resume route and language: one trip; the save: another.
    assert counting.trips - before == 2
    assert "Msaada" in home and "Help" not in home, home  # the language read in that trip


async def test_the_opening_row_names_the_cooperative_and_member_the_memberships_give(client: Any, demo: Any,
                                                                                    db: Any, rt: Any) -> None:
    """The session row written with the memberships (one statement on PostgreSQL) names what the first hop read:
    her cooperative and her when she has one membership there, the dialled extension's cooperative and nobody
    when she has none or several, nothing at all for a stranger with no extension; a previous session's row of
    the id is reset for the new one."""
    from core.audit import Actor
    from core.members import create_member
    from core.phone import normalize
    from tests.channels.ussd.test_lost_session_text import other_cooperative

    other = await other_cooperative(rt, "4")
    async with rt.sessionmaker.begin() as s:
        second = await create_member(s, rt.cipher, cooperative_id=other, name="Jean Bosco", phone=normalize(EN_MTN),
                                     language="en", actor=Actor("system", "system"))

    async def opened(phone: AtPhone) -> tuple[Any, ...]:
        await phone.dial()
        row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
        return row.cooperative_id, row.member_id, row.service_code, row.status, row.hops

    assert await opened(AtPhone(client, EN_MTN)) == (None, None, "*384*123#", "OPEN", 1)  # two memberships
    assert await opened(AtPhone(client, EN_MTN, service_code="*384*123*4#")) == (
        other, second.id, "*384*123*4#", "OPEN", 1)
    assert await opened(AtPhone(client, RW_MTN)) == (demo["cooperative_id"], demo["members"][RW_MTN], "*384*123#",
                                                     "OPEN", 1)
    assert await opened(AtPhone(client, STRANGER)) == (None, None, "*384*123#", "OPEN", 1)
    assert await opened(AtPhone(client, STRANGER, service_code="*384*123*4#")) == (
        other, None, "*384*123*4#", "OPEN", 1)
    # An id used again after the longest session: the previous session's row is reset for this one.
    reused = AtPhone(client, EN_MTN, service_code="*384*123*4#")
    await reused.dial()
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(UssdSession).where(UssdSession.session_id == reused.session_id)
                        .values(status="Success", hops=4, started_at=records.previous_before() - timedelta(seconds=1)))
    await rt.redis.delete(f"ussd:{{at:{reused.session_id}}}")
    again = AtPhone(client, RW_MTN, session_id=reused.session_id)
    assert await opened(again) == (demo["cooperative_id"], demo["members"][RW_MTN], "*384*123#", "OPEN", 1)


async def test_the_one_statement_opening_writes_what_the_two_statement_one_does(client: Any, demo: Any, db: Any,
                                                                                 rt: Any, monkeypatch: Any) -> None:
    """On PostgreSQL the SQL decides the row's cooperative and member; elsewhere Python does, from the same
    memberships. Both give the same row, session and screen for every mix: several memberships, a pending one
    (counted), a suspended one (not), an extension with and without a membership there, an unknown extension,
    a language chosen in another cooperative, and Hubtel's and Nalo's opening hops."""
    import pytest

    from channels.ussd import sessions
    from core.audit import Actor
    from core.members import create_member
    from core.models import Member
    from core.phone import normalize
    from tests.channels.ussd.test_flows_africastalking import FR_AIRTEL
    from tests.channels.ussd.test_hubtel_nalo_flows import HubtelPhone, nalo
    from tests.channels.ussd.test_lost_session_text import other_cooperative

    if not is_postgres():
        pytest.skip("one path only elsewhere")
    other = await other_cooperative(rt, "4")
    async with rt.sessionmaker.begin() as s:
        for number, language, status in ((EN_MTN, "sw", "ACTIVE"), (RW_MTN, "en", "PENDING"),
                                         (FR_AIRTEL, "en", "SUSPENDED")):
            member = await create_member(s, rt.cipher, cooperative_id=other, name="Second", language=language,
                                         phone=normalize(number), actor=Actor("system", "system"))
            await s.execute(update(Member).where(Member.id == member.id).values(status=status))

    async def opening(tag: str) -> list[Any]:
        seen: list[tuple[Any, ...]] = []
        for number in (EN_MTN, RW_MTN, FR_AIRTEL, STRANGER):
            for code in ("*384*123#", "*384*123*4#", "*384*123*9#"):
                phone = AtPhone(client, number, service_code=code)
                reply = await phone.dial()
                stored = await sessions.load(rt.redis, "africastalking", phone.session_id)
                assert stored is not None
                seen.append((reply, stored.state.data, stored.state.lang, phone.session_id))
        hubtel = await HubtelPhone(client, FR_AIRTEL[1:], f"hubtel-{tag}").post("Initiation", "*384*123#")
        seen.append((hubtel["Message"], f"hubtel-{tag}"))
        seen.append(((await nalo(client, f"nalo-{tag}", "*384*123#", True))["MSG"], f"nalo-{tag}"))
        out = []
        for *shown, session_id in seen:
            row = await db.one(UssdSession, UssdSession.session_id == session_id)
            out.append((*shown, row.aggregator, row.cooperative_id, row.member_id, row.phone_index, row.phone_masked,
                        row.service_code, row.network_code, row.status, row.hops, row.last_screen, row.ended_at))
        return out

    one_statement = await opening("a")

    async def elsewhere(*args: Any, **kwargs: Any) -> None:
        return None  # as on other databases: the memberships read, then records.opened()

    monkeypatch.setattr(records, "opened_reading", elsewhere)
    assert one_statement == await opening("b")
    # (a few that tell the cases apart: her one membership at the extension, pending included; none there)
    assert [row[4:6] for row in one_statement[3:6]] == [(None, None), (other, one_statement[4][1]["m"][0][0]),
                                                        (None, None)]
    assert one_statement[7][4:6] == (other, None) and one_statement[7][1]["m"] == []  # suspended there: none


async def test_redis_dropping_mid_pipeline_answers_unavailable(client: Any, demo: Any, rt: Any) -> None:
    """The opening hop's one Redis round trip (the session, the phone's route and language): a connection that
    answers the session's GET and drops before the MGET's answer fails the hop as Redis down does."""
    import asyncio

    from redis.asyncio import Redis

    from tests.channels.ussd.helpers import swapped_redis

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readline():
            args = []
            for _ in range(int(head[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2].upper())
            if args[0] == b"GET":
                writer.write(b"_\r\n")  # no session (RESP3 null); the MGET sent with it is never answered
                await writer.drain()
                writer.close()
                return
            writer.write(b"%1\r\n+proto\r\n:3\r\n" if args[0] == b"HELLO" else b"+OK\r\n")
            await writer.drain()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    broken = Redis.from_url(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", protocol=3,
                            socket_timeout=5.0)
    try:
        with swapped_redis(rt, broken):
            answer = await asyncio.wait_for(AtPhone(client, STRANGER).dial(), 30)
    finally:
        await broken.aclose()
        server.close()
    assert answer == "END Service unavailable, please try again later."


async def test_menu_hops_read_and_save_their_session_over_the_multiplexed_connection(client: Any, demo: Any,
                                                                                    rt: Any) -> None:
    """With Redis on TCP, a hop's session read and save go over the one multiplexed connection (core.redis_mux),
    one batch each, and nothing over redis-py's pool; with the embedded Redis (a Unix socket) redis-py does both."""
    import pytest

    from tests.core.test_ops import CountingRedis

    if rt.redis_mux is None:
        assert not rt.settings.redis_url.startswith("redis://")
        pytest.skip("the embedded Redis: no multiplexed connection")
    batches: list[int] = []
    send = rt.redis_mux._send

    async def counted(commands: Any) -> Any:
        batches.append(len(commands))
        return await send(commands)

    counting, original = CountingRedis(rt.redis), rt.redis
    rt.redis_mux._send, rt.redis = counted, counting
    try:
        phone = AtPhone(client, STRANGER)
        assert (await phone.dial()).startswith("CON ")
        assert (await phone.send("4")).startswith("CON ")  # Language
        assert (await phone.send("0")).startswith("CON ")  # Back
    finally:
        rt.redis = original
        del rt.redis_mux._send
    # The opening hop: the session, the phone's route and language in one batch (GET, MGET), the save and the
    # funnel's count in another; each later hop: the session's GET, then its compare-and-set.
    assert batches == [2, 2, 1, 1, 1, 1], batches
    assert counting.trips == 0
