"""Edits checked as the row will be after them: a cooperative's contact phone is stored as normalised, and a
payment type cannot be patched into one nobody can pay."""

from __future__ import annotations

from core.models import Cooperative, PaymentType
from tests.admin_api.conftest import payment_body


async def _stored(rt, model, row_id):
    async with rt.sessionmaker() as s:
        return await s.get(model, row_id)


async def test_contact_phone_is_stored_in_e164(superadmin, rt, demo):
    coop_id = demo["cooperative_id"]
    shown = await superadmin.json("PATCH", f"/v1/cooperatives/{coop_id}", 200, json={"contactPhone": "0788 123 999"})
    assert shown["contactPhone"] == "+25078****999"
    assert (await _stored(rt, Cooperative, coop_id)).contact_phone == "+250788123999"
    # In the cooperative's own country: a Kenyan national number becomes +254...
    kenyan = await superadmin.json("POST", "/v1/cooperatives", 201,
                                   json={"name": "Nairobi Coop", "shortCode": "NRB", "country": "KE"})
    await superadmin.json("PATCH", f"/v1/cooperatives/{kenyan['id']}", 200, json={"contactPhone": "0712-345-678"})
    assert (await _stored(rt, Cooperative, kenyan["id"])).contact_phone == "+254712345678"
    bad = await superadmin.json("PATCH", f"/v1/cooperatives/{coop_id}", 400, json={"contactPhone": "12"})
    assert bad["message"] == ["contactPhone must be a valid mobile number"]
    assert (await _stored(rt, Cooperative, coop_id)).contact_phone == "+250788123999"


async def test_a_free_type_cannot_lose_its_custom_amount(admin, rt, demo):
    free = await admin.json("POST", "/v1/payment-types", 201,
                            json={"name": "Donation", "amount": 0, "allowCustomAmount": True})
    refused = await admin.json("PATCH", f"/v1/payment-types/{free['id']}", 400, json={"allowCustomAmount": False})
    assert refused["message"] == ["amount is 0, so allowCustomAmount must stay true unless a positive amount is set"]
    stored = await _stored(rt, PaymentType, free["id"])
    assert (stored.amount_minor, stored.allow_custom_amount) == (0, True)
    await admin.json("POST", "/v1/payments", 201, json=payment_body(free["id"], amount=100))
    # With a price in the same patch it is a fixed-price type, and payable at that price.
    fixed = await admin.json("PATCH", f"/v1/payment-types/{free['id']}", 200,
                             json={"allowCustomAmount": False, "amount": 2500})
    assert (fixed["amount"], fixed["allowCustomAmount"]) == (2500, False)
    await admin.json("POST", "/v1/payments", 201, json=payment_body(free["id"], amount=2500))
    # And a fixed-price type still cannot be patched down to 0.
    zero = await admin.json("PATCH", f"/v1/payment-types/{free['id']}", 400, json={"amount": 0})
    assert zero["message"] == ["amount must be a positive number"]
