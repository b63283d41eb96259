"""A statement line recorded by its number alone (POST /v1/payments/recorded without memberId) is the payment of the
member who held the number when the money was taken (`completedAt`), not of its holder now. Before, a line of a
number from before a SWAP or a NEW_SIM that gave it to Marie was recorded as hers: her history listed it and the
reminders counted her period paid, while the member who paid (the holder then) stayed unpaid."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.db import utcnow
from core.models import AuditEvent, Payment
from tests.admin_api.conftest import Caller, idem

JEAN, MARIE, PAUL = "+250788555101", "+250788555102", "+250788555103"
NEW = "+250788555104"
TWO_DAYS_AGO = utcnow() - timedelta(days=2)


def _iso(moment: datetime) -> str:
    """To the microsecond: a line between two changes made a moment apart, or at one exactly."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _member(admin: Caller, name: str, phone: str) -> str:
    return str((await admin.json("POST", "/v1/members", 201, json={"name": name, "phone": phone}))["id"])


async def _change(rt: Any, admin: Caller, member_id: str, phone: str, change: str) -> datetime:
    """Correct her number; returns when her correction's audit row says it was made."""
    await admin.json("PATCH", f"/v1/members/{member_id}", 200, json={"phone": phone, "phoneChange": change})
    async with rt.sessionmaker() as s:
        return (await s.execute(select(AuditEvent.at).where(
            AuditEvent.entity_id == member_id, AuditEvent.action == "member.updated")
            .order_by(AuditEvent.id.desc()).limit(1))).scalar_one()


async def _recorded(admin: Caller, demo: dict[str, Any], account: str, when: datetime) -> dict[str, Any]:
    """The line of `account` at `when`, recorded naming no member."""
    body = {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "paymentAccount": account,
            "providerTransactionId": "MTN-" + idem(), "completedAt": _iso(when),
            "note": "MTN statement line", "idempotencyKey": idem()}
    return dict(await admin.json("POST", "/v1/payments/recorded", 201, json=body))


async def _history(admin: Caller, member_id: str) -> list[str]:
    return [p["id"] for p in (await admin.json("GET", f"/v1/members/{member_id}/transactions", 200))["data"]]


async def _stored(rt: Any, payment_id: str) -> tuple[str | None, str | None]:
    """The payment row's member and the member its payment.recorded audit row names."""
    async with rt.sessionmaker() as s:
        member = (await s.execute(select(Payment.member_id).where(Payment.id == payment_id))).scalar_one()
        audit = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment_id, AuditEvent.action == "payment.recorded"))).scalar_one()
    return member, audit["memberId"]


async def test_a_line_from_before_a_swap_is_the_one_who_held_the_number_then(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    swapped = await _change(rt, admin, marie, JEAN, "SWAP")  # Marie gets Jean's number, Jean hers

    his = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    hers_then = await _recorded(admin, demo, MARIE, TWO_DAYS_AGO)
    at_the_swap = await _recorded(admin, demo, JEAN, swapped)
    just_before = await _recorded(admin, demo, JEAN, swapped - timedelta(microseconds=1))
    hers_now = await _recorded(admin, demo, JEAN, utcnow())
    assert (his["memberId"], hers_then["memberId"], at_the_swap["memberId"], just_before["memberId"],
            hers_now["memberId"]) == (jean, marie, marie, jean, marie)
    for payment, member in ((his, jean), (hers_then, marie), (at_the_swap, marie), (just_before, jean),
                            (hers_now, marie)):
        assert await _stored(rt, payment["id"]) == (member, member)
    assert sorted(await _history(admin, jean)) == sorted([his["id"], just_before["id"]])
    assert sorted(await _history(admin, marie)) == sorted([hers_then["id"], at_the_swap["id"], hers_now["id"]])
    # The number that paid is kept as the statement shows it: his payment's is the number Marie holds now.
    assert his["paymentAccount"] == "+25078****101"


async def test_a_line_from_before_two_swaps_goes_back_through_both(rt: Any, admin: Caller, demo: dict[str, Any]
                                                                    ) -> None:
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    paul = await _member(admin, "Paul Mugisha", PAUL)
    first = await _change(rt, admin, marie, JEAN, "SWAP")  # Jean's number to Marie
    second = await _change(rt, admin, paul, JEAN, "SWAP")  # then from Marie to Paul
    lines = [await _recorded(admin, demo, JEAN, when) for when in (
        TWO_DAYS_AGO, first + (second - first) / 2, second, utcnow())]
    assert [line["memberId"] for line in lines] == [jean, marie, paul, paul]
    assert await _history(admin, jean) == [lines[0]["id"]]
    assert await _history(admin, marie) == [lines[1]["id"]]
    assert [await _stored(rt, line["id"]) for line in lines] == [(m, m) for m in (jean, marie, paul, paul)]


async def test_a_line_from_before_a_new_sim_gave_her_the_number_names_no_member(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Jean moved to a new SIM, and his number went to Marie's new SIM: who held it before is not known by the number
    (the audit keeps only its mask), so the line is recorded with no member, as for a number no member holds."""
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    await _change(rt, admin, jean, NEW, "NEW_SIM")
    hers_from = await _change(rt, admin, marie, JEAN, "NEW_SIM")

    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    since = await _recorded(admin, demo, JEAN, hers_from)
    assert (before["memberId"], since["memberId"]) == (None, marie)
    assert await _stored(rt, before["id"]) == (None, None)
    assert await _history(admin, marie) == [since["id"]]
    assert await _history(admin, jean) == []
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, before["id"])
        assert row is not None and row.payment_account_masked == "+25078****101" and row.payment_account_index


async def test_a_typo_moves_nothing_a_new_sim_typed_wrong_dates_her_number(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Marie got a new SIM (Jean's number before him), typed wrong, then corrected by TYPO: the number was hers from
    the NEW_SIM, not from the TYPO; before the NEW_SIM it was not."""
    marie = await _member(admin, "Marie Uwase", MARIE)
    new_sim = await _change(rt, admin, marie, NEW, "NEW_SIM")  # her new SIM is JEAN's number, typed as NEW
    typo = await _change(rt, admin, marie, JEAN, "TYPO")
    between = await _recorded(admin, demo, JEAN, new_sim + (typo - new_sim) / 2)
    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    assert (between["memberId"], before["memberId"]) == (marie, None)
    assert await _history(admin, marie) == [between["id"]]


async def test_the_holder_then_is_found_whatever_her_status_now(rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Suspended since (the line is recorded later, as a suspension does not undo a payment made), or erased since:
    then the payment keeps no number, as her erasure left her other payments."""
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    await _change(rt, admin, marie, JEAN, "SWAP")
    await admin.json("DELETE", f"/v1/members/{marie}", 200)  # suspended, holding Jean's old number
    hers = await _recorded(admin, demo, JEAN, utcnow())
    assert hers["memberId"] == marie

    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/erase", 200)
    his = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    assert (his["memberId"], his["paymentAccount"]) == (jean, "erased")
    assert await _stored(rt, his["id"]) == (jean, jean)
    assert await _history(admin, jean) == [his["id"]]
    assert await _history(admin, marie) == [hers["id"]]
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, his["id"])
        assert row is not None
        assert (row.payment_account_enc, row.payment_account_index, row.request_hash) == ("", "", "")


async def test_a_line_from_before_a_number_was_released_is_not_its_next_holders(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Jean left: suspended, his number released; Paul registered later with that number. A line from when Jean held
    it is not Paul's (it counted Paul's period paid with Jean's money): the audit shows a member of the cooperative
    letting a number of that mask go after the line, so who held it then is not known by the number: no member, as
    for a NEW_SIM. A line from after Paul registered is his."""
    jean = await _member(admin, "Jean Habimana", JEAN)
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/release-phone", 200)
    paul = await _member(admin, "Paul Mugisha", JEAN)
    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    since = await _recorded(admin, demo, JEAN, utcnow())
    assert (before["memberId"], since["memberId"]) == (None, paul)
    assert await _stored(rt, before["id"]) == (None, None)
    assert await _history(admin, paul) == [since["id"]]


async def test_a_line_from_before_its_holder_moved_to_a_new_sim_is_not_the_next_registered(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Jean moved to a new SIM; Paul registered later with Jean's old number: a line from before is not Paul's."""
    jean = await _member(admin, "Jean Habimana", JEAN)
    await _change(rt, admin, jean, NEW, "NEW_SIM")
    paul = await _member(admin, "Paul Mugisha", JEAN)
    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    assert before["memberId"] is None
    assert await _history(admin, paul) == []


async def test_a_line_from_before_its_holder_was_erased_is_not_the_next_registered(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """Jean was erased (his number let go with no release of its own); Paul registered later with it."""
    jean = await _member(admin, "Jean Habimana", JEAN)
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/erase", 200)
    paul = await _member(admin, "Paul Mugisha", JEAN)
    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    assert before["memberId"] is None
    assert await _history(admin, paul) == []


async def test_a_line_from_before_its_holder_registered_is_still_hers_when_no_number_was_let_go(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A member imported (or registered) after the line, her number let go by nobody since: the line is hers. A number
    let go before the line does not count, nor one of another cooperative's member."""
    jean = await _member(admin, "Jean Habimana", MARIE)
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/release-phone", 200)  # another number, another mask
    paul = await _member(admin, "Paul Mugisha", JEAN)
    before = await _recorded(admin, demo, JEAN, TWO_DAYS_AGO)
    assert before["memberId"] == paul
