"""Members as payers and as search results: only an active member pays; a number is searched in the
cooperative's own country."""

from __future__ import annotations

from sqlalchemy import func, select

from core import auth
from core.models import Payment
from tests.admin_api.conftest import bearer, idem, payment_body


async def _payments_of(rt, member_id):
    async with rt.sessionmaker() as s:
        return (await s.execute(select(func.count(Payment.id)).where(Payment.member_id == member_id))).scalar()


async def test_a_suspended_or_pending_member_cannot_be_charged(admin, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    member = demo["members"]["+250788000001"]
    key = idem()
    before = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent, memberId=member, idempotencyKey=key))
    await admin.json("DELETE", f"/v1/members/{member}", 200)
    refused = await admin.json("POST", "/v1/payments", 422, json=payment_body(rent, memberId=member))
    assert refused["message"] == "member is suspended; only an active member can pay"
    assert refused["error"] == "Unprocessable Entity"
    # A retry of a request accepted before the suspension still answers with its payment.
    replay = await admin.req("POST", "/v1/payments", json=payment_body(rent, memberId=member, idempotencyKey=key))
    assert replay.status == 201 and (await replay.json())["id"] == before["id"]
    assert await _payments_of(rt, member) == 1

    pending = await admin.json("POST", "/v1/members", 201,
                               json={"name": "Not Yet", "phone": "0788666111", "status": "PENDING"})
    refused = await admin.json("POST", "/v1/payments", 422, json=payment_body(rent, memberId=pending["id"]))
    assert refused["message"] == "member is pending; only an active member can pay"
    await admin.json("POST", f"/v1/members/{pending['id']}/approve", 200)
    await admin.json("POST", "/v1/payments", 201, json=payment_body(rent, memberId=pending["id"]))


async def test_an_active_tenant_still_pays(tenant, demo):
    made = await tenant.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    assert made["memberId"] == demo["members"]["+250788000001"]


async def test_a_kenyan_cooperative_finds_a_member_by_national_number(superadmin, rt, client):
    coop = await superadmin.json("POST", "/v1/cooperatives", 201,
                                 json={"name": "Nairobi Coop", "shortCode": "NRB", "country": "KE"})
    made = await superadmin.json("POST", "/v1/members", 201,
                                 json={"name": "Wanjiru", "phone": "0712345678", "cooperativeId": coop["id"]})
    found = await superadmin.json("GET", f"/v1/members?cooperativeId={coop['id']}&phone=0712345678", 200)
    assert [m["id"] for m in found["data"]] == [made["id"]]
    # A super admin searching every cooperative: a number with its country code is found anywhere.
    anywhere = await superadmin.json("GET", "/v1/members?phone=%2B254712345678", 200)
    assert [m["id"] for m in anywhere["data"]] == [made["id"]]
    # The cooperative's own admin types the number as it is written in Kenya.
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@nrb.ke", password="nrb-admin-password", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    kenyan = await bearer(client, "admin@nrb.ke", "nrb-admin-password")
    mine = await kenyan.json("GET", "/v1/members?phone=0712%20345%20678", 200)
    assert [m["id"] for m in mine["data"]] == [made["id"]]
