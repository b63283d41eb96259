"""Query values of the pages (/ops/data, /simulator/payment) are checked before they reach the database.

PostgreSQL refuses a NUL in text outright (asyncpg: invalid byte sequence for encoding "UTF8": 0x00), so
an unchecked value was a 500; an id that is not a UUID cannot exist. Both are answered as /v1 answers them.
"""

from __future__ import annotations

from typing import Any

from tests.web.test_pages import _pay, _token


async def _get(client: Any, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await client.get(path, headers=headers)
    return resp.status, await resp.json()


async def test_ops_data_refuses_cooperative_ids_that_cannot_exist(pages: Any, demo: dict[str, Any]) -> None:
    for user in (demo["super_admin"], demo["admin"]):
        token = await _token(pages, *user)
        for raw in ("%00", "a%00b", "%01", "a" * 40, "not-a-uuid",
                    demo["cooperative_id"] + "%00", "00000000-0000-0000-0000-00000000000%1F"):
            status, body = await _get(pages, f"/ops/data?cooperativeId={raw}", token)
            assert status == 400, (user[0], raw, status, body)
            assert body["path"] == "/ops/data" and "cooperativeId" in body["message"], body
    # A well-formed id is still looked up: in any case, and a missing one is 404.
    token = await _token(pages, *demo["super_admin"])
    status, body = await _get(pages, f"/ops/data?cooperativeId={demo['cooperative_id'].upper()}", token)
    assert status == 200 and body["scope"]["cooperativeId"] == demo["cooperative_id"]
    assert body["scope"]["name"] == "Kigali Heights Housing Cooperative"
    status, _ = await _get(pages, "/ops/data?cooperativeId=00000000-0000-0000-0000-000000000000", token)
    assert status == 404
    admin = await _token(pages, *demo["admin"])
    status, body = await _get(pages, f"/ops/data?cooperativeId={demo['cooperative_id'].upper()}", admin)
    assert status == 200 and body["scope"]["cooperativeId"] == demo["cooperative_id"]


async def test_ops_data_refuses_bad_minutes(pages: Any, demo: dict[str, Any]) -> None:
    token = await _token(pages, *demo["admin"])
    # "1" * 5000: int() refuses more than 4300 digits with ValueError (was a 500).
    for raw in ("%00", "6%000", "1" * 5000, "0" * 10 + "60", "-5", "1441"):
        status, body = await _get(pages, f"/ops/data?minutes={raw}", token)
        assert status == 400, (raw[:20], status, body)
        assert "minutes must be an integer from 1 to 1440" in body["message"]
    status, body = await _get(pages, "/ops/data?minutes=%2015%20", token)
    assert status == 200 and body["scope"]["minutes"] == 15


async def test_simulator_payment_refuses_control_characters(sim: Any, rt: Any, demo: dict[str, Any]) -> None:
    payment = await _pay(rt, demo["cooperative_id"], demo["payment_types"]["Monthly Rent"], "pages-input-1")
    for raw in ("%00", payment.reference + "%00", "%00" + payment.provider_reference, "ws_CO_1%1B"):
        status, body = await _get(sim, f"/simulator/payment?reference={raw}")
        assert status == 400, (raw, status, body)
        assert "not allowed" in body["message"]
    # Anything else is looked up: ours in any case, the provider's as it is; unknown ones are 404.
    for ref in (payment.reference.lower(), payment.provider_reference):
        status, body = await _get(sim, f"/simulator/payment?reference={ref}")
        assert status == 200 and body["reference"] == payment.reference, (ref, body)
    for unknown in ("x" * 128, "PAY_20000101_1", "caf%C3%A9"):
        status, _ = await _get(sim, f"/simulator/payment?reference={unknown}")
        assert status == 404, unknown
