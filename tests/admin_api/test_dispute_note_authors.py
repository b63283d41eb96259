"""Who wrote a dispute's note, as each caller sees it: the cooperative's and the gateway's staff see the actor as the
audit log names it (admin:<user id>); a tenant, and an API key (the cooperative's system), see a staff member's
note as written by "gateway staff", never an internal user id. A member's own notes stay hers (member:<id>, as
the dispute's memberId says)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from core.disputes import STAFF_LABEL
from core.models import AdminUser
from tests.admin_api.conftest import Caller, make_payment

ALINE = "+250788000001"  # the demo tenant's member


async def _user_id(rt: Any, username: str) -> str:
    async with rt.sessionmaker() as s:
        return str((await s.execute(select(AdminUser.id).where(AdminUser.username == username))).scalar_one())


async def test_staff_notes_name_no_staff_id_to_tenants_or_keys(rt, client, admin: Caller, tenant: Caller,
                                                               demo: dict[str, Any]) -> None:
    member = f"member:{demo['members'][ALINE]}"
    admin_id = await _user_id(rt, demo["admin"][0])
    paid = await make_payment(tenant, demo["payment_types"]["Water"], amount=5000)
    opened = await tenant.json("POST", "/v1/disputes", 201,
                               json={"paymentId": paid["id"], "reason": "OTHER", "note": "I paid this twice"})
    await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                     json={"status": "UNDER_REVIEW", "note": "checking the statement", "evidence": "line 42"})
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "desk", "scopes": ["payments:read"]})
    desk = Caller(client, {"X-API-Key": key["key"]})

    # Staff: the actor as the audit log names it.
    shown = await admin.json("GET", f"/v1/disputes/{opened['id']}", 200)
    assert [n["actor"] for n in shown["notes"]] == [member, f"admin:{admin_id}"]

    for caller in (tenant, desk):
        one = await caller.json("GET", f"/v1/disputes/{opened['id']}", 200)
        [listed] = [d for d in (await caller.json("GET", "/v1/disputes", 200))["data"] if d["id"] == opened["id"]]
        for body in (one, listed):
            assert [n["actor"] for n in body["notes"]] == [member, STAFF_LABEL]
            # The rest of each note as staff see it (its documented fields: at, actor, text, evidence, status).
            assert [{k: v for k, v in n.items() if k != "actor"} for n in body["notes"]] == [
                {k: v for k, v in n.items() if k != "actor"} for n in shown["notes"]]
            assert admin_id not in json.dumps(body)
