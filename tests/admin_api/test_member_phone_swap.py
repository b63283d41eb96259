"""phoneChange SWAP: two members of a cooperative exchanging their numbers (sisters swapping phones). Two opposite
swaps at once neither deadlock nor leave a number held twice or by no one; a suspended member is not swapped with;
the audit says which phoneChange was used; each number's STOP follows it (a telco opt-out is the number's)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from core import members as service
from core.models import AuditEvent, Member
from tests.admin_api.conftest import Caller
from tests.admin_api.test_member_phone_change import _opted_out, _stop
from tests.conftest import requires_pg

ALINE, SISTER = "+250788555001", "+250788555002"
WAIT = 1.0


async def _two(admin: Caller) -> tuple[str, str]:
    a = await admin.json("POST", "/v1/members", 201, json={"name": "Aline Mukamana", "phone": ALINE})
    b = await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER})
    return a["id"], b["id"]


async def _numbers(rt: Any, *ids: str) -> list[str | None]:
    async with rt.sessionmaker() as s:
        rows = {m.id: m for m in (await s.execute(select(Member).where(Member.id.in_(ids)))).scalars()}
    return [rows[i].phone_index for i in ids]


@requires_pg
async def test_two_opposite_swaps_at_once_neither_deadlock_nor_lose_a_number(
        rt: Any, admin: Caller, demo: Any, monkeypatch: Any) -> None:
    """Aline's PATCH takes Béatrice's number while Béatrice's takes Aline's, at the same moment. Each request locked
    its own member, then waited on the other's row to take her number: PostgreSQL found the deadlock and one request
    failed (500). Now both rows are locked in one order first: the second waits and finds the swap done."""
    aline, sister = await _two(admin)
    original, seen, both = service.lock_member, [], asyncio.Event()

    async def lock_then_wait(*args: Any, **kwargs: Any) -> Any:
        out = await original(*args, **kwargs)
        seen.append(1)
        if len(seen) == 2:
            both.set()
        await asyncio.wait([asyncio.ensure_future(both.wait())], timeout=WAIT)
        return out

    monkeypatch.setattr(service, "lock_member", lock_then_wait)
    answers = await asyncio.gather(
        admin.req("PATCH", f"/v1/members/{aline}", json={"phone": SISTER, "phoneChange": "SWAP"}),
        admin.req("PATCH", f"/v1/members/{sister}", json={"phone": ALINE, "phoneChange": "SWAP"}))
    assert [a.status for a in answers] == [200, 200], [await a.json() for a in answers]
    assert await _numbers(rt, aline, sister) == [rt.cipher.blind_index(SISTER), rt.cipher.blind_index(ALINE)]
    async with rt.sessionmaker() as s:
        swaps = (await s.execute(select(AuditEvent.entity_id).where(
            AuditEvent.action == "member.updated", AuditEvent.after["phoneChange"].as_string() == "SWAP"))).all()
    assert sorted(e for (e,) in swaps) == sorted([aline, sister])  # one swap, audited on both sides


async def test_a_swap_says_so_in_the_audit_and_each_numbers_stop_follows_it(
        rt: Any, admin: Caller, demo: Any) -> None:
    """Aline sent STOP from her number; her sister never did. The STOP is the number's (the opt-out row stays with
    it): after the swap it silenced both sisters, Béatrice on Aline's old number by the number's opt-out and Aline
    on Béatrice's by her membership's flag. Now the flags follow the numbers too."""
    aline, sister = await _two(admin)
    await _stop(rt, ALINE)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is False
    assert (await admin.json("GET", f"/v1/members/{sister}", 200))["remindersOptOut"] is True
    async with rt.sessionmaker() as s:
        events = {e.entity_id: e for e in (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "member.updated"))).scalars()}
    assert (events[aline].after["phoneChange"], events[sister].after["phoneChange"]) == ("SWAP", "SWAP")
    assert (events[aline].before["remindersOptOut"], events[aline].after["remindersOptOut"]) == (True, False)
    assert (events[sister].before["remindersOptOut"], events[sister].after["remindersOptOut"]) == (False, True)


async def test_every_phone_change_is_named_in_the_audit(rt: Any, admin: Caller, demo: Any) -> None:
    aline, _sister = await _two(admin)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": "+250788555003"})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": "+250788555004", "phoneChange": "TYPO"})
    async with rt.sessionmaker() as s:
        events = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "member.updated", AuditEvent.entity_id == aline)
            .order_by(AuditEvent.id))).scalars().all()
    assert [e.after.get("phoneChange") for e in events] == ["NEW_SIM", "TYPO"]


async def test_no_swap_with_a_suspended_member(rt: Any, admin: Caller, demo: Any) -> None:
    """A suspended member's number is on its way out (release-phone): swapping would give the active sister's old
    number to a membership nothing is sent to, and put the suspended one's on an active member. Refused either way
    round, nothing changed; a PENDING member swaps as an active one."""
    aline, sister = await _two(admin)
    await admin.json("DELETE", f"/v1/members/{sister}", 200)
    for who, number in ((aline, SISTER), (sister, ALINE)):
        refused = await admin.json("PATCH", f"/v1/members/{who}", 409, json={"phone": number, "phoneChange": "SWAP"})
        assert (refused["code"], refused["field"]) == ("INVALID_STATE", "phoneChange"), refused
        assert "SUSPENDED" in refused["message"], refused
    assert await _numbers(rt, aline, sister) == [rt.cipher.blind_index(ALINE), rt.cipher.blind_index(SISTER)]
    await admin.json("PATCH", f"/v1/members/{sister}", 200, json={"status": "PENDING"})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    assert await _numbers(rt, aline, sister) == [rt.cipher.blind_index(SISTER), rt.cipher.blind_index(ALINE)]


async def test_no_swap_with_an_erased_member_either_way(rt: Any, admin: Caller, demo: Any) -> None:
    """Erased, her number is released: she holds none to swap (409 nothing to swap), and she gets none (409, as any
    correction of a released number)."""
    aline, sister = await _two(admin)
    await admin.json("DELETE", f"/v1/members/{sister}", 200)
    await admin.json("POST", f"/v1/members/{sister}/erase", 200)
    nothing = await admin.json("PATCH", f"/v1/members/{aline}", 409, json={"phone": SISTER, "phoneChange": "SWAP"})
    assert nothing["field"] == "phoneChange", nothing
    await admin.json("PATCH", f"/v1/members/{sister}", 409, json={"phone": ALINE, "phoneChange": "SWAP"})
    assert await _numbers(rt, aline, sister) == [rt.cipher.blind_index(ALINE), None]


async def test_a_stop_kept_from_an_earlier_sim_stays_hers_in_a_swap(rt: Any, admin: Caller, demo: Any) -> None:
    """Aline sent STOP from the SIM she lost; moved to her new number (NEW_SIM) her flag stayed hers, and the old
    number's opt-out went with it. Neither her new number nor her sister's ever sent STOP. The swap handed her flag
    to Béatrice, whose reminders stopped though she never asked (and Aline's came back though she had): a flag
    follows a number only when it is that number's STOP (the number's own opt-out shows it)."""
    lost = "+250788555009"
    aline = (await admin.json("POST", "/v1/members", 201, json={"name": "Aline Mukamana", "phone": lost}))["id"]
    sister = (await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER}))["id"]
    await _stop(rt, lost)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": ALINE, "phoneChange": "NEW_SIM"})
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is True
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    assert await _numbers(rt, aline, sister) == [rt.cipher.blind_index(SISTER), rt.cipher.blind_index(ALINE)]
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is True
    assert (await admin.json("GET", f"/v1/members/{sister}", 200))["remindersOptOut"] is False
    assert not await _opted_out(rt, ALINE) and not await _opted_out(rt, SISTER)
    async with rt.sessionmaker() as s:
        swaps = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "member.updated", AuditEvent.after["phoneChange"].as_string() == "SWAP"))).scalars()
        assert all("remindersOptOut" not in e.after for e in swaps)  # no flag changed


async def test_the_swapped_numbers_stops_follow_them_each_way(rt: Any, admin: Caller, demo: Any) -> None:
    """Both numbers sent STOP: each sister keeps a silenced number, and so stays opted out."""
    aline, sister = await _two(admin)
    await _stop(rt, ALINE)
    await _stop(rt, SISTER)
    await admin.json("PATCH", f"/v1/members/{sister}", 200, json={"phone": ALINE, "phoneChange": "SWAP"})
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is True
    assert (await admin.json("GET", f"/v1/members/{sister}", 200))["remindersOptOut"] is True
