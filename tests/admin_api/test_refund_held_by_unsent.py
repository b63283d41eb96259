"""A refund refused because refunds not settled yet hold the money: the refusal names them.

Found walking a Kampala cooperative's refunds while MTN was down: a full refund queued (PENDING, its submission
waiting for MTN); meanwhile MTN's customer care reversed the payment itself; recording that reversal
(returnedByProvider) answered "refund of 20,000 UGX exceeds the refundable 0 UGX", which reads as if the member had
been paid back already. Nothing has reached her: the queued refund holds the amount. A refund to send is refused
so, naming it; the reversal itself is the provider's statement, recorded whatever the refunds hold, and withdraws
the queued refund (test_chargeback_beyond_refunds)."""

from __future__ import annotations

from typing import Any

from core import auth
from tests.admin_api.conftest import Caller, bearer, complete_payment, idem


async def test_the_refusal_names_the_refund_not_yet_sent(superadmin: Caller, rt: Any, client: Any) -> None:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Kampala Coop", "shortCode": "KLA", "country": "UG"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": "20000", "cooperativeId": coop["id"]})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@kla.test", password="kampala-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    admin = await bearer(client, "admin@kla.test", "kampala-admin-pw")
    paid = await admin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype["id"], "amount": 20000, "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "0772000001", "idempotencyKey": idem()})
    await complete_payment(rt, paid["id"])
    queued = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 15000, "idempotencyKey": idem()})  # MTN down: PENDING
    refused = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={
        "amount": 20000, "idempotencyKey": idem()})
    assert refused["message"] == (
        f"refund of 20,000 UGX exceeds the refundable 5,000 UGX; refunds not settled yet hold 15,000 UGX "
        f"({queued['reference']}): withdraw one not yet sent with POST /v1/refunds/{{id}}/cancel")
    # Nothing held: the refusal as before.
    await admin.json("POST", f"/v1/refunds/{queued['id']}/cancel", 200, json={"note": "asked for by mistake"})
    over = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                            json={"amount": 20001, "idempotencyKey": idem()})
    assert over["message"] == "refund of 20,001 UGX exceeds the refundable 20,000 UGX"
