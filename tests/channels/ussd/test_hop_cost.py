"""What a USSD hop costs the database, and the short-lived caches that keep it low, on real servers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from channels.ussd import cache, records
from channels.ussd.engine import Ctx, Engine, State
from channels.ussd.screens import SCREENS
from core.models import PaymentType, UssdSession
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, RW_MTN, option
from tests.conftest import sql_sent

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
    assert len(first) == 2, first  # the memberships, the session row
    with statements(rt) as second:
        types = await phone.send("1")
    assert "Monthly Rent" in types and second == []  # memberships kept in the session, types cached
    with statements(rt) as third:
        confirm = await phone.send(option(types, "Monthly Rent"))
    assert confirm.startswith("CON Pay Monthly Rent") and len(third) == 1, third  # the reference
    assert "nextval" in third[0] or "reference_counters" in third[0]  # PostgreSQL or SQLite
    with statements(rt) as fourth:
        done = await phone.send("1")
    assert done.startswith("END Approve the prompt")
    assert [s for s in fourth if s.startswith("UPDATE ussd_sessions")], fourth  # closed in one UPDATE
    row = await db.one(UssdSession, UssdSession.session_id == phone.session_id)
    assert (row.status, row.hops, row.last_screen, row.member_id) == (
        "Success", 4, "pay_done", demo["members"][EN_MTN])


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
