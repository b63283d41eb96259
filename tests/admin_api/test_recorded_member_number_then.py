"""A statement line recorded naming its member alone (POST /v1/payments/recorded with memberId, no paymentAccount)
keeps the number she held at its `completedAt`, as the number corrections' audit tells it: her number now when no
NEW_SIM or SWAP moved it since, the number she gave in a SWAP since (the other member's now), and no number
("unknown") after a NEW_SIM, whose old number the audit keeps as a mask alone. Before, it kept her number now: the
line showed a number she did not pay from, and GET /v1/payments?paymentAccount= of her new number found it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.db import utcnow
from core.models import Payment
from tests.admin_api.conftest import Caller, idem
from tests.admin_api.test_recorded_number_holder import _change, _iso, _member

JEAN, MARIE, NEW = "+250788555201", "+250788555202", "+250788555204"
TWO_DAYS_AGO = utcnow() - timedelta(days=2)


def _body(demo: dict[str, Any], member_id: str, when: datetime) -> dict[str, Any]:
    return {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "memberId": member_id, "providerTransactionId": "MTN-" + idem(),
            "completedAt": _iso(when), "note": "MTN statement line", "idempotencyKey": idem()}


async def _recorded(admin: Caller, demo: dict[str, Any], member_id: str, when: datetime) -> dict[str, Any]:
    """The line of `member_id` at `when`, recorded naming her alone."""
    return dict(await admin.json("POST", "/v1/payments/recorded", 201, json=_body(demo, member_id, when)))


async def _found_by(admin: Caller, number: str) -> list[str]:
    encoded = number.replace("+", "%2B")
    return [p["id"] for p in (await admin.json("GET", f"/v1/payments?paymentAccount={encoded}", 200))["data"]]


async def test_a_line_from_before_her_new_sim_keeps_no_number(rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    marie = await _member(admin, "Marie Uwase", MARIE)
    changed = await _change(rt, admin, marie, NEW, "NEW_SIM")

    before = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    just_before = await _recorded(admin, demo, marie, changed - timedelta(microseconds=1))
    at_the_change = await _recorded(admin, demo, marie, changed)
    since = await _recorded(admin, demo, marie, utcnow())
    assert [p["paymentAccount"] for p in (before, just_before, at_the_change, since)] == [
        "unknown", "unknown", "+25078****204", "+25078****204"]
    assert all(p["memberId"] == marie for p in (before, just_before, at_the_change, since))
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, before["id"])
        assert row is not None
        assert (row.payment_account_enc, row.payment_account_index, row.payment_account_masked) == ("", "", "unknown")
        assert row.request_hash  # a request under its key with another body is still refused
    assert sorted(await _found_by(admin, NEW)) == sorted([at_the_change["id"], since["id"]])
    assert await _found_by(admin, MARIE) == []

    # Her number then is not known: a refund the provider would send to it is refused, before anything is sent.
    refused = await admin.json("POST", f"/v1/payments/{before['id']}/refunds", 409,
                               json={"amount": 50000, "reason": "paid twice", "idempotencyKey": idem()})
    assert refused["code"] == "PAYING_NUMBER_UNKNOWN" and "not known" in refused["message"], refused
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment.refunded_minor).where(Payment.id == before["id"]))).scalar_one() == 0


async def test_a_line_from_before_her_swap_keeps_the_number_she_gave(rt: Any, admin: Caller,
                                                                        demo: dict[str, Any]) -> None:
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    swapped = await _change(rt, admin, marie, JEAN, "SWAP")  # Marie gets Jean's number, Jean hers

    hers_then = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    his_then = await _recorded(admin, demo, jean, TWO_DAYS_AGO)
    hers_now = await _recorded(admin, demo, marie, swapped)
    assert (hers_then["paymentAccount"], his_then["paymentAccount"], hers_now["paymentAccount"]) == (
        "+25078****202", "+25078****201", "+25078****201")
    assert (hers_then["memberId"], his_then["memberId"], hers_now["memberId"]) == (marie, jean, marie)
    # Found by the number that paid each, as a payment made from it then is.
    assert sorted(await _found_by(admin, MARIE)) == [hers_then["id"]]
    assert sorted(await _found_by(admin, JEAN)) == sorted([his_then["id"], hers_now["id"]])


async def test_a_line_before_a_typo_keeps_her_number_now(rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A TYPO gave her the number that was hers all along: a line from before it paid from that number."""
    marie = await _member(admin, "Marie Uwase", MARIE)
    await _change(rt, admin, marie, NEW, "TYPO")
    before = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    assert (before["memberId"], before["paymentAccount"]) == (marie, "+25078****204")
    assert await _found_by(admin, NEW) == [before["id"]]


async def test_a_line_from_before_two_swaps_keeps_the_number_she_paid_from(rt: Any, admin: Caller,
                                                                          demo: dict[str, Any]) -> None:
    """Her number went on by a second SWAP (Marie gave hers to Jean, Jean then gave it to Eric): the audit still tells
    it exactly (a line recorded by that number goes to her), so a line naming her alone keeps it, as one recorded by
    the number does, and not "unknown"."""
    jean, marie = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Marie Uwase", MARIE)
    eric = await _member(admin, "Eric Mugisha", NEW)
    await _change(rt, admin, marie, JEAN, "SWAP")  # Marie has 201, Jean 202 (hers)
    await _change(rt, admin, jean, NEW, "SWAP")  # Jean has 204, Eric 202 (hers then)

    by_number = await admin.json("POST", "/v1/payments/recorded", 201, json={
        **{k: v for k, v in _body(demo, marie, TWO_DAYS_AGO).items() if k != "memberId"}, "paymentAccount": MARIE})
    assert (by_number["memberId"], by_number["paymentAccount"]) == (marie, "+25078****202")
    hers_then = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    assert (hers_then["memberId"], hers_then["paymentAccount"]) == (marie, "+25078****202")
    assert sorted(await _found_by(admin, MARIE)) == sorted([by_number["id"], hers_then["id"]])
    assert eric


async def test_a_refund_of_a_line_kept_without_its_number_has_its_own_code(rt: Any, admin: Caller,
                                                                          demo: dict[str, Any]) -> None:
    """PAYING_NUMBER_CHANGED tells the caller to send the refund again with toPayingNumber: true (core.errors.CODES,
    the README's table). For a line kept with no number ("unknown") that is refused all the same: nothing can be
    sent, whatever the caller says. Its own code, whose remedy is the one that works (returnedByProvider)."""
    from core.errors import CODES

    marie = await _member(admin, "Marie Uwase", MARIE)
    await _change(rt, admin, marie, NEW, "NEW_SIM")
    before = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    assert before["paymentAccount"] == "unknown"
    refunds = f"/v1/payments/{before['id']}/refunds"
    for asked in ({}, {"toPayingNumber": True}):
        refused = await admin.json("POST", refunds, 409, json={"amount": 50000, "reason": "paid twice",
                                                               "idempotencyKey": idem(), **asked})
        assert refused["code"] == "PAYING_NUMBER_UNKNOWN", refused
        assert "toPayingNumber" not in CODES[refused["code"]]
    done = await admin.json("POST", refunds, 201, json={
        "amount": 50000, "reason": "paid twice", "idempotencyKey": idem(),
        "returnedByProvider": {"providerTransactionId": "MTN-R-" + idem()[:10]}})
    assert done["status"] == "COMPLETED", done


async def test_a_line_naming_a_member_whose_number_was_released_keeps_the_number_she_held_then(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A member who left (suspended, her number released) holds no number now: a statement line naming her alone was
    refused, "paymentAccount is required: the member has no registered number" (400), though the money was hers. It
    is recorded as one from before a NEW_SIM is: the release kept her number as a mask alone, so no number ("unknown",
    and a refund through the provider 409 PAYING_NUMBER_UNKNOWN); the number she gave in a SWAP before leaving is
    known exactly (the other member's now), and kept."""
    marie = await _member(admin, "Marie Uwase", MARIE)
    await admin.json("DELETE", f"/v1/members/{marie}", 200)
    await admin.json("POST", f"/v1/members/{marie}/release-phone", 200)

    left = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    assert (left["memberId"], left["paymentAccount"], left["status"]) == (marie, "unknown", "COMPLETED")
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, left["id"])
        assert row is not None
        assert (row.member_id, row.amount_minor, row.payment_account_enc, row.payment_account_index,
                row.payment_account_masked) == (marie, 50000, "", "", "unknown")
    for asked in ({}, {"toPayingNumber": True}):
        refused = await admin.json("POST", f"/v1/payments/{left['id']}/refunds", 409, json={
            "amount": 50000, "reason": "paid twice", "idempotencyKey": idem(), **asked})
        assert refused["code"] == "PAYING_NUMBER_UNKNOWN" and "not known" in refused["message"], refused
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment.refunded_minor).where(Payment.id == left["id"]))).scalar_one() == 0

    # Jean swapped numbers with Eric, then left: a line of Jean's from before the swap paid from the number Eric
    # holds now.
    jean, eric = await _member(admin, "Jean Habimana", JEAN), await _member(admin, "Eric Mugisha", NEW)
    await _change(rt, admin, jean, NEW, "SWAP")  # Jean has 204, Eric 201 (his then)
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/release-phone", 200)
    his_then = await _recorded(admin, demo, jean, TWO_DAYS_AGO)
    assert (his_then["memberId"], his_then["paymentAccount"]) == (jean, "+25078****201")
    assert await _found_by(admin, JEAN) == [his_then["id"]]
    assert eric
