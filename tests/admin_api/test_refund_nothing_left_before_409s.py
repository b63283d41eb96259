"""A payment refunded in full is said to be so before any refusal that tells the admin how to get its money back.

Found reviewing h3: a statement line naming a member who left (her number released: paymentAccount "unknown") was
sent back by the provider (returnedByProvider, the 409's remedy), and a second refund asked of it answered 409
PAYING_NUMBER_UNKNOWN, "have the provider send the money back and record that with returnedByProvider", though all
of it was back already; a payment of an erased member refunded in full answered 409 MEMBER_ERASED, "record a refund
the provider made with returnedByProvider" (doing so was then refused: more than was collected). Nothing being
left is what is true: 422 REFUND_EXCEEDS_REFUNDABLE, "refunded in full", as for any other payment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.models import Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.admin_api.test_recorded_member_number_then import MARIE, TWO_DAYS_AGO, _recorded
from tests.admin_api.test_recorded_number_holder import _member


async def _refunds(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(Refund))).scalar_one())


async def _refused_in_full(admin: Caller, rt: Any, payment_id: str, back: str) -> None:
    before = await _refunds(rt)
    for asked in ({"amount": 50000}, {}, {"amount": 1000, "toPayingNumber": True}):
        refused = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 422,
                                   json={"idempotencyKey": idem(), **asked})
        assert (refused["code"], refused["field"], refused["message"]) == (
            "REFUND_EXCEEDS_REFUNDABLE", "amount",
            "the payment has been refunded in full: nothing is left to refund (50,000 RWF back of 50,000 RWF "
            f"collected: {back})"), refused
    assert await _refunds(rt) == before


async def test_a_line_of_a_member_who_left_sent_back_by_the_provider_is_refunded_in_full(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    marie = await _member(admin, "Marie Uwase", MARIE)
    await admin.json("DELETE", f"/v1/members/{marie}", 200)
    await admin.json("POST", f"/v1/members/{marie}/release-phone", 200)
    left = await _recorded(admin, demo, marie, TWO_DAYS_AGO)
    assert left["paymentAccount"] == "unknown"
    # Nothing back yet: the number is not known, and the message says why (her number was released, not changed).
    unknown = await admin.json("POST", f"/v1/payments/{left['id']}/refunds", 409,
                               json={"amount": 50000, "idempotencyKey": idem()})
    assert (unknown["code"], unknown["message"]) == (
        "PAYING_NUMBER_UNKNOWN", "the payment was recorded without the number that paid it (its member's number "
        "changed, or was released, since): the account to refund is not known; have the provider send the money back "
        "and record that with returnedByProvider"), unknown
    back = await admin.json("POST", f"/v1/payments/{left['id']}/refunds", 201, json={
        "amount": 50000, "reason": "paid twice", "idempotencyKey": idem(),
        "returnedByProvider": {"providerTransactionId": "MTN-R-" + idem()[:10]}})
    assert back["status"] == "COMPLETED", back

    await _refused_in_full(admin, rt, left["id"], f"chargeback {back['reference']}")


async def test_a_payment_of_an_erased_member_refunded_in_full_says_so(rt: Any, admin: Caller,
                                                                     demo: dict[str, Any]) -> None:
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": "Jeanne Uwimana", "phone": "+250788555301"})
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], memberId=jeanne["id"],
                              paymentAccount="+250788555301")
    await complete_payment(rt, paid["id"])
    back = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-R-" + idem()[:10]}})
    assert (back["status"], back["amount"]) == ("COMPLETED", 50000), back
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    await _refused_in_full(admin, rt, paid["id"], f"chargeback {back['reference']}")


async def test_a_payment_held_by_a_refund_at_the_provider_is_not_told_to_withdraw_it(
        rt: Any, admin: Caller, demo: dict[str, Any]) -> None:
    """A refund of all of it sent to the provider (PROCESSING) holds the payment: the refusal said "withdraw one not
    yet sent with POST /v1/refunds/{id}/cancel", and that withdrawal is refused (409: already PROCESSING). It says
    the refund is at the provider, to wait for its outcome; with one not sent yet besides, which one can go."""
    from sqlalchemy import update

    from core.models import OutboxJob

    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    sent = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                            json={"amount": 30000, "idempotencyKey": idem()})
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == sent["id"]).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    queued = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 20000, "idempotencyKey": idem()})
    assert queued["status"] == "PENDING"

    both = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert both["message"] == (
        f"nothing is left to refund; refunds not settled yet hold 50,000 RWF ({sent['reference']}, "
        f"{queued['reference']}): withdraw one not yet sent ({queued['reference']}) with "
        "POST /v1/refunds/{id}/cancel; the others are at the provider: wait for their outcome"), both
    await admin.json("POST", f"/v1/refunds/{queued['id']}/cancel", 200, json={"note": "asked for by mistake"})
    rest = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    assert rest["amount"] == 20000
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == rest["id"]).values(status="PROCESSING"))

    at_the_provider = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                                       json={"amount": 1000, "idempotencyKey": idem()})
    assert at_the_provider["message"] == (
        f"nothing is left to refund; refunds not settled yet hold 50,000 RWF ({sent['reference']}, "
        f"{rest['reference']}): sent to the provider, none can be withdrawn: wait for their outcome (one that fails "
        "frees its amount)"), at_the_provider
    withdraw = await admin.json("POST", f"/v1/refunds/{sent['id']}/cancel", 409, json={"note": "told to"})
    assert withdraw["code"] == "INVALID_STATE"
