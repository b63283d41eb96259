"""A payments:write key reads only the payments it made; a retry of another key's request (a key rotated between
the first try and its retry) is refused with a 409 saying so, rather than answered with a payment the key then
cannot read or poll (and another key's payment shown to it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from core.models import Payment
from tests.admin_api.conftest import Caller, payment_body


async def _key(admin: Any, name: str, scopes: tuple[str, ...] = ("payments:write",)) -> dict[str, Any]:
    return await admin.json("POST", "/v1/api-keys", 201, json={"name": name, "scopes": list(scopes)})


async def test_a_retry_on_a_rotated_write_key_is_refused_not_answered_with_a_payment_it_cannot_read(
        admin: Any, client: Any, demo: dict[str, Any], rt: Any) -> None:
    old = await _key(admin, "ERP v1")
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    first = await Caller(client, {"X-API-Key": old["key"]}).json("POST", "/v1/payments", 201, json=body)
    new = await _key(admin, "ERP v2")
    await admin.json("DELETE", f"/v1/api-keys/{old['id']}", 200)
    erp = Caller(client, {"X-API-Key": new["key"]})
    refused = await erp.json("POST", "/v1/payments", 409, json=body)
    assert "made by another API key" in refused["message"] and first["id"] not in str(refused)
    await erp.json("GET", f"/v1/payments/{first['id']}/status", 404)  # as before: not its payment
    # A new key for a new payment works; a key that reads every payment still finds the first by its key.
    await erp.json("POST", "/v1/payments", 201, json={**body, "idempotencyKey": body["idempotencyKey"] + "-2"})
    reader = Caller(client, {"X-API-Key": (await _key(admin, "ERP v3", ("payments:write", "payments:read")))["key"]})
    replayed = await reader.req("POST", "/v1/payments", json=body)
    assert (replayed.status, (await replayed.json())["id"]) == (201, first["id"])
    assert replayed.headers["Idempotent-Replayed"] == "true"
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 2


async def test_the_same_key_replaying_its_own_request_still_gets_its_payment(admin: Any, client: Any,
                                                                            demo: dict[str, Any]) -> None:
    erp = Caller(client, {"X-API-Key": (await _key(admin, "ERP"))["key"]})
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    first = await erp.json("POST", "/v1/payments", 201, json=body)
    again = await erp.req("POST", "/v1/payments", json=body)
    assert (again.status, (await again.json())["id"]) == (201, first["id"])
