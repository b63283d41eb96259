"""The X-RateLimit-* and Retry-After headers of the API: a client that waits Retry-After after a 429 is let
through, and retrying while refused does not push that back. The limiter's clock is set by the test."""

from __future__ import annotations

import types
from typing import Any

import pytest

from core import ratelimit
from tests.admin_api.conftest import Caller, payment_body

T0 = 1_800_000_000 - (1_800_000_000 % 60)  # the start of a minute


def _rate_headers(resp: Any) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith(("X-RateLimit-", "Retry-After"))}


async def test_waiting_retry_after_gets_the_next_payment_through(admin: Any, demo: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [T0 + 52.25]  # ten payments 8 s before the minute ends (payments:create: 10 a minute)
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: clock[0]))
    rent = demo["payment_types"]["Monthly Rent"]

    async def pay() -> Any:
        return await admin.req("POST", "/v1/payments", json=payment_body(rent))

    for left in range(9, 0, -1):
        resp = await pay()
        assert resp.status == 201 and _rate_headers(resp) == {
            "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": str(left), "X-RateLimit-Reset": str(T0 + 53)}
    # The last that fits says when the next will: not at the minute's turn (the full minute then still weighs
    # in whole) but a second after it.
    last = await pay()
    assert last.status == 201 and _rate_headers(last) == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(T0 + 61)}
    refused = await pay()
    assert refused.status == 429 and _rate_headers(refused) == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(T0 + 61),
        "Retry-After": "8"}
    for waited in range(1, 8):  # asking again every second meanwhile changes nothing
        clock[0] = T0 + 52.25 + waited
        again = await pay()
        assert again.status == 429 and _rate_headers(again)["X-RateLimit-Reset"] == str(T0 + 61)
        assert again.headers["Retry-After"] == str(8 - waited)
    clock[0] = T0 + 52.25 + 8
    through = await pay()
    assert through.status == 201, await through.json()
    assert _rate_headers(through)["X-RateLimit-Remaining"] == "0"  # 9 of the ten still weigh in, and this one


async def test_each_api_key_has_its_own_limit(admin: Any, client: Any, demo: Any, coop_b: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One cooperative's integration using up its payments:create limit does not refuse another cooperative's:
    the limit is counted per API key, not for API keys as a whole."""
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0 + 5.0))
    scopes = {"scopes": ["payments:read", "payments:write"]}
    ours = Caller(client, {"X-API-Key": (await admin.json("POST", "/v1/api-keys", 201,
                                                          json={"name": "ERP", **scopes}))["key"]})
    theirs = Caller(client, {"X-API-Key": (await coop_b["admin"].json("POST", "/v1/api-keys", 201,
                                                                      json={"name": "ERP", **scopes}))["key"]})
    rent = demo["payment_types"]["Monthly Rent"]
    for _ in range(10):
        assert (await ours.req("POST", "/v1/payments", json=payment_body(rent))).status == 201
    assert (await ours.req("POST", "/v1/payments", json=payment_body(rent))).status == 429
    levy = payment_body(coop_b["payment_type_id"], amount=1000, paymentAccount="+250788999001")
    resp = await theirs.req("POST", "/v1/payments", json=levy)
    assert resp.status == 201, await resp.json()
    assert resp.headers["X-RateLimit-Remaining"] == "9"


async def test_a_route_that_answers_no_replays_is_refused_past_its_limit(admin: Any, rt: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating payment types (20 a minute, no idempotency key to replay): the 21st is a 429 and makes nothing;
    a read on another route's default bucket says its own limit (100 a minute for reads)."""
    from sqlalchemy import func, select

    from core.models import PaymentType

    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0 + 5.0))
    async with rt.sessionmaker() as s:
        before = (await s.execute(select(func.count()).select_from(PaymentType))).scalar_one()
    for i in range(20):
        resp = await admin.req("POST", "/v1/payment-types", json={"name": f"Levy {i}", "amount": 1000})
        assert resp.status == 201, await resp.json()
        assert resp.headers["X-RateLimit-Limit"] == "20" and resp.headers["X-RateLimit-Remaining"] == str(19 - i)
    refused = await admin.req("POST", "/v1/payment-types", json={"name": "Levy 20", "amount": 1000})
    body = await refused.json()
    assert (refused.status, body["code"]) == (429, "RATE_LIMITED")
    assert (refused.headers["X-RateLimit-Limit"], refused.headers["X-RateLimit-Remaining"]) == ("20", "0")
    assert int(refused.headers["Retry-After"]) >= 1
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(PaymentType))).scalar_one() == before + 20
    read = await admin.req("GET", "/v1/payment-types")
    assert read.status == 200 and read.headers["X-RateLimit-Limit"] == "100"
    assert read.headers["X-RateLimit-Remaining"] == "99"
