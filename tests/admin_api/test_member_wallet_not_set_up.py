"""A member whose network's wallet this deployment has no account for in her cooperative's currency.

The deployment's Airtel Money account is Rwanda's (AIRTEL_COUNTRY unset: RW, RWF only). A Kenyan cooperative's
member on Airtel Kenya was added with no warning; on USSD she was then told that no payment method is available
for her number, and the admin had not been told why."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core import auth
from core.models import Member
from tests.admin_api.conftest import bearer, idem


async def _kenyan_admin(superadmin: Any, rt: Any, client: Any) -> tuple[dict[str, Any], Any]:
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Umoja SACCO", "shortCode": "UMJ", "country": "KE"})
    async with rt.sessionmaker.begin() as s:
        await auth.create_user(s, username="admin@umj.test", password="umoja-admin-pw", role="COOP_ADMIN",
                               cooperative_id=coop["id"])
    return coop, await bearer(client, "admin@umj.test", "umoja-admin-pw")


async def test_an_airtel_kenya_member_is_warned_when_the_airtel_account_collects_another_currency(
        superadmin: Any, rt: Any, client: Any) -> None:
    coop, admin = await _kenyan_admin(superadmin, rt, client)
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Akinyi Otieno", "phone": "0733123456"})
    assert made["warnings"] == [{"field": "phone", "message": (
        "+25473****456 is an Airtel number, and this deployment's Airtel Money account collects RWF only, not KES, "
        "and no bank method collects KES; this member can never pay")}]
    async with rt.sessionmaker() as s:  # registered all the same, as a foreign number is
        assert (await s.execute(select(Member.status).where(Member.id == made["id"]))).scalar_one() == "ACTIVE"
    # The API refuses her Airtel payment for the same reason, before anything is sent.
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Ada ya mwezi", "amount": "1500.00", "cooperativeId": coop["id"]})
    refused = await admin.json("POST", "/v1/payments", 400, json={
        "paymentTypeId": ptype["id"], "amount": "1500.00", "paymentMethod": "MOBILE_MONEY_AIRTEL",
        "paymentAccount": "0733123456", "idempotencyKey": idem()})
    assert (refused["code"], refused["message"]) == (
        "PROVIDER_REFUSED", ["MOBILE_MONEY_AIRTEL collects RWF only; this payment is in KES"])


async def test_a_safaricom_member_of_the_same_cooperative_gets_no_warning(superadmin: Any, rt: Any,
                                                                         client: Any) -> None:
    _, admin = await _kenyan_admin(superadmin, rt, client)
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Wanjiru Kamau", "phone": "0712345678"})
    assert made["warnings"] == []
    moved = await admin.json("PATCH", f"/v1/members/{made['id']}", 200, json={"phone": "0733123456"})
    assert [w["field"] for w in moved["warnings"]] == ["phone"]
    assert "collects RWF only, not KES" in moved["warnings"][0]["message"]


async def test_an_airtel_kenya_member_is_not_warned_when_the_airtel_account_is_kenyas(
        rt: Any, client: Any, superadmin: Any, monkeypatch: Any) -> None:
    """The same number where the deployment's Airtel account is Kenya's: her wallet collects KES."""
    monkeypatch.setattr(rt.providers["airtel"], "currencies", frozenset({"KES"}))
    _, admin = await _kenyan_admin(superadmin, rt, client)
    made = await admin.json("POST", "/v1/members", 201, json={"name": "Akinyi Otieno", "phone": "0733123456"})
    assert made["warnings"] == []
