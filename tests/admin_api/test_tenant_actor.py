"""A tenant's acts through the API are the member's own in the audit log (`member:<member id>`, channel api), as
her USSD acts are (channel ussd): not `admin:<her user id>`, which mixed them with the staff's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from admin_api import all_routes
from admin_api.openapi import build_document
from core.models import AdminUser, Payment
from tests.admin_api.conftest import Caller, bearer, make_payment
from tests.channels.ussd.helpers import AtPhone

ALINE = "+250788000001"  # the demo tenant's member


async def _user_id(rt: Any, username: str) -> str:
    async with rt.sessionmaker() as s:
        return str((await s.execute(select(AdminUser.id).where(AdminUser.username == username))).scalar_one())


async def _by_actor(admin: Caller, actor: str) -> list[dict[str, Any]]:
    body = await admin.json("GET", f"/v1/audit-events?actor={actor}&limit=100", 200)
    return list(reversed(body["data"]))


async def _entity(admin: Caller, entity_type: str, entity_id: str) -> list[dict[str, Any]]:
    body = await admin.json("GET", f"/v1/audit-events?entityType={entity_type}&entityId={entity_id}&limit=100", 200)
    return list(reversed(body["data"]))


def _option(screen: str, label: str) -> str:
    """The number in front of the screen's line that names `label`."""
    for line in screen[4:].split("\n"):
        number, _, text = line.partition(". ")
        if label in text and number.isdigit():
            return number
    raise AssertionError(f"{label!r} not offered in {screen!r}")


async def test_a_tenants_payment_and_dispute_are_audited_as_her_member(
        admin: Caller, tenant: Caller, client: Any, rt: Any, demo: dict[str, Any]) -> None:
    aline = demo["members"][ALINE]
    member = f"member:{aline}"
    tenant_user = await _user_id(rt, demo["tenant"][0])
    admin_user = await _user_id(rt, demo["admin"][0])

    paid = await make_payment(tenant, demo["payment_types"]["Water"], amount=5000)
    disputed = await tenant.json("POST", "/v1/disputes", 201,
                                 json={"paymentId": paid["id"], "reason": "OTHER", "note": "I paid this twice"})

    created = [e for e in await _entity(admin, "payment", paid["id"]) if e["action"] == "payment.created"]
    opened = [e for e in await _entity(admin, "dispute", disputed["id"]) if e["action"] == "dispute.opened"]
    assert [(e["actor"], e["channel"]) for e in created + opened] == [(member, "api"), (member, "api")]
    # Where else the act is named: the payment's creator and the dispute's note.
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid["id"])).created_by == member  # type: ignore[union-attr]
    shown = await tenant.json("GET", f"/v1/disputes/{disputed['id']}", 200)
    assert [n["actor"] for n in shown["notes"]] == [member]

    # Her login's id names nothing; a staff member's acts are still hers as admin, and not the member's.
    assert await _by_actor(admin, f"admin:{tenant_user}") == []
    staff = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    assert [e["entityId"] for e in await _by_actor(admin, f"admin:{admin_user}")
            if e["action"] == "payment.created"] == [staff["id"]]

    # The same member paying on USSD: one actor, the channel tells the two apart.
    phone = AtPhone(client, ALINE)
    assert (await phone.dial()).startswith("CON ")
    types = await phone.send("1")
    confirm = await phone.send(_option(types, "Monthly Rent"))
    assert (await phone.send("1")).startswith("END "), confirm
    mine = [(e["action"], e["channel"]) for e in await _by_actor(admin, member)]
    assert mine == [("user.signed_in", "api"), ("payment.created", "api"), ("dispute.opened", "api"),
                    ("payment.created", "ussd")]  # her sign-in too (the tenant fixture's), as the member


async def test_a_tenants_own_password_change_is_audited_as_her_member(
        client: Any, rt: Any, demo: dict[str, Any]) -> None:
    username, password = demo["tenant"]
    me = await bearer(client, username, password)
    await me.json("POST", "/v1/auth/password", 200,
                  json={"currentPassword": password, "newPassword": "her-new-password-7"})
    admin = await bearer(client, *demo["admin"])
    [changed] = [e for e in await _entity(admin, "user", await _user_id(rt, username))
                 if e["action"] == "user.password_changed"]
    # The row's entity is the login whose password changed; the actor is the member who changed it.
    assert (changed["actor"], changed["channel"]) == (f"member:{demo['members'][ALINE]}", "api")


def test_the_audit_documentation_says_who_each_actor_is() -> None:
    operation = build_document(all_routes())["paths"]["/v1/audit-events"]["get"]
    [actor] = [p for p in operation["parameters"] if p["name"] == "actor"]
    assert "member:<member id>" in actor["description"] and "tenant login" in actor["description"]
    assert "member:<member id> with channel api" in operation["description"]
