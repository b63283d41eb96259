"""Who closed a dispute or withdrew a refund, as a refusal names them (core.audit.done_by), is named only to a
caller who may see that account: a super admin's login is never named to a cooperative's admin (her GET /v1/users
lists no super admin), and an API key (an integrator's) is told "gateway staff", as a dispute's notes name staff to
it (core.disputes.present_note), never an admin's username (often her e-mail) or another key's name."""

from __future__ import annotations

from typing import Any

from tests.admin_api.conftest import Caller, complete_payment, make_payment
from tests.admin_api.test_refund_cancel import _queued_while_mtn_is_down


async def _closed_by(closer: Caller, admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    await closer.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                      json={"status": "REJECTED", "note": "decided"})
    return dispute


async def test_a_super_admin_who_closed_a_dispute_is_not_named_to_a_cooperative_admin(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    dispute = await _closed_by(superadmin, admin, rt, demo)
    url = f"/v1/disputes/{dispute['id']}/transitions"
    refused = await admin.json("POST", url, 409, json={"status": "OPEN", "note": "again"})
    assert demo["super_admin"][0] not in refused["message"]
    assert "was rejected already by a super admin at " in refused["message"], refused["message"]
    # The super admin herself, and any super admin, is told who it was.
    told = await superadmin.json("POST", url, 409, json={"status": "OPEN", "note": "again"})
    assert f"already by {demo['super_admin'][0]} at " in told["message"], told["message"]


async def test_an_api_key_is_told_gateway_staff(admin: Caller, client: Any, rt: Any, demo: dict[str, Any]) -> None:
    made = await admin.json("POST", "/v1/api-keys", 201, json={"name": "back-office sync", "scopes": ["admin"]})
    key = Caller(client, {"X-API-Key": made["key"]})
    dispute = await _closed_by(admin, admin, rt, demo)
    url = f"/v1/disputes/{dispute['id']}/transitions"
    refused = await key.json("POST", url, 409, json={"status": "OPEN", "note": "again"})
    assert demo["admin"][0] not in refused["message"]
    assert "was rejected already by gateway staff at " in refused["message"], refused["message"]
    # The admin who closed it is named to a staff login of the cooperative; a key that closed one, by its name.
    other = await _closed_by(key, admin, rt, demo)
    told = await admin.json("POST", f"/v1/disputes/{other['id']}/transitions", 409, json={"status": "OPEN"})
    assert "already by API key back-office sync at " in told["message"], told["message"]
    refused = await key.json("POST", f"/v1/disputes/{other['id']}/transitions", 409, json={"status": "OPEN"})
    assert "already by gateway staff at " in refused["message"], refused["message"]


async def test_a_refund_withdrawn_by_a_super_admin_is_not_named_to_a_cooperative_admin(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any], worker: Any) -> None:
    _wire, _payment, refund = await _queued_while_mtn_is_down(admin, rt, demo, worker)
    url = f"/v1/refunds/{refund['id']}/cancel"
    await superadmin.json("POST", url, 200, json={"note": "MTN reversed it itself"})
    again = await admin.json("POST", url, 409, json={"note": "MTN reversed it, per its statement"})
    assert demo["super_admin"][0] not in again["message"]
    assert "was withdrawn already by a super admin at " in again["message"], again["message"]
