"""A refund of what is left of an M-Pesa payment part of which the provider already sent back: the officer is told
that M-Pesa cannot send part of a payment back, not to ask for the whole, which is no longer refundable.

Found walking a Nairobi cooperative's refunds: Safaricom's customer care reversed 500 KES of a 1,500 KES payment
(recorded with returnedByProvider); the rest, asked for (no amount: everything still refundable), answered "MPESA
refunds only the full amount (1,500.00 KES)", and 1,500 then answered "refund of 1,500.00 KES exceeds the refundable
1,000.00 KES": each answer sent her to the other."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core import auth
from core.models import Refund
from tests.admin_api.conftest import Caller, bearer, complete_payment, idem, kenyan_mpesa_payment


async def test_the_rest_of_a_partly_reversed_mpesa_payment(superadmin: Caller, rt: Any, client: Any) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Coop", "shortCode": "NRB", "country": "KE"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": "1500.00", "cooperativeId": coop["id"]})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@nrb.test", password="nairobi-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    admin = await bearer(client, "admin@nrb.test", "nairobi-admin-pw")
    paid = await admin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype["id"], "amount": "1500.00", "paymentMethod": "MPESA", "paymentAccount": "0712345678",
        "idempotencyKey": idem()})
    await complete_payment(rt, paid["id"])
    await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "amount": "500.00", "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "QKR1REV500"}})

    for body in ({}, {"amount": "1000.00"}):
        rest = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                                json={**body, "idempotencyKey": idem()})
        assert rest["message"] == ("MPESA refunds only the full amount (1,500.00 KES), and 1,000.00 KES of it is "
                                   "left to refund: have the provider send that back and record it with "
                                   "returnedByProvider")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 1


async def test_a_reversal_of_cents_mpesa_never_makes_is_refused(superadmin: Caller, rt: Any, client: Any) -> None:
    """M-Pesa moves whole shillings: a reversal recorded as 500.50 KES is a typo. Taken, it left 999.50 KES of the
    payment refundable and, for a recurring type, a balance of cents that no M-Pesa payment could take."""
    paid = await kenyan_mpesa_payment(superadmin, "1500.00")
    await complete_payment(rt, paid["id"])
    refused = await superadmin.json("POST", f"/v1/payments/{paid['id']}/refunds", 400, json={
        "amount": "500.50", "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "QKR1REV500"}})
    assert refused["message"] == ["returnedByProvider: M-Pesa takes whole shillings; 500.50 KES has cents"]
    assert (refused["field"], refused["code"]) == ("amount", "PROVIDER_REFUSED")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 0
    taken = await superadmin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={
        "amount": "500", "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "QKR1REV500"}})
    assert (taken["amount"], taken["status"]) == ("500.00", "COMPLETED")
