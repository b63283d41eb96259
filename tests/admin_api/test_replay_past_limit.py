"""A replayed idempotent create (the same key and body: a client retrying after a lost answer, a timeout) is
answered with what its key made, 201 and `Idempotent-Replayed: true`, without consuming the route's rate limit,
even once the limit is reached; before, the limit was counted first, and a retry of a payment that exists got
429. A new key past the limit, or a "replay" under a key nothing was made with, is still refused. The limiter's
clock is set by the test (every request in one window); the counts are read from Redis."""

from __future__ import annotations

import types
from typing import Any

import pytest
from sqlalchemy import func, select

from core import ratelimit
from core.models import Payment, Refund
from tests.admin_api.conftest import (
    _DOC,
    _TEMPLATES,
    Caller,
    check_shape,
    complete_payment,
    idem,
    make_payment,
    payment_body,
)
from tests.admin_api.test_recorded_payments import _line

T0 = 1_800_000_000 - (1_800_000_000 % 60) + 10  # ten seconds into a minute


@pytest.fixture(autouse=True)
def _one_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0))


async def _counted(rt: Any, bucket: str) -> int:
    """The caller's count in `bucket` for the current window, as Redis holds it (one caller per test)."""
    keys = [k for k in await rt.redis.keys(f"rl:*:{bucket}:*") if k.rsplit(b":", 1)[1].isdigit()
            and k.rsplit(b":", 1)[0].endswith(f"}}:{bucket}".encode())]
    current = [k for k in keys if k.endswith(f":{T0 - T0 % 60}".encode())]
    assert len(current) == 1, keys
    return int(await rt.redis.get(current[0]))


async def _rows(rt: Any, model: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count(model.id)))).scalar_one())


async def _refused(resp: Any, method: str, path: str) -> None:
    """A 429 in the API's error shape with the headers the README and the OpenAPI document give it."""
    body = await resp.json()
    assert resp.status == 429, body
    check_shape(method, path, 429, body)
    [template] = [t for rx, t in _TEMPLATES if rx.match(path) and method.lower() in _DOC["paths"][t]]
    documented = _DOC["paths"][template][method.lower()]["responses"]["429"]["headers"]
    assert set(documented) == {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}
    assert all(resp.headers[name].isdigit() for name in documented)
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert int(resp.headers["Retry-After"]) >= 1
    assert int(resp.headers["X-RateLimit-Reset"]) >= T0 + int(resp.headers["Retry-After"])
    assert resp.headers["X-RateLimit-Limit"]


async def _replayed(resp: Any, first: dict[str, Any]) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == 201, body
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert body["id"] == first["id"]
    return body


async def test_a_payment_replayed_past_the_limit_is_answered_and_not_counted(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    sent = payment_body(rent)
    first = await admin.json("POST", "/v1/payments", 201, json=sent)
    for _ in range(9):  # payments:create: 10 a minute
        await make_payment(admin, rent)
    assert await _counted(rt, "payments:create") == 10
    await _refused(await admin.req("POST", "/v1/payments", json=payment_body(rent)), "POST", "/v1/payments")

    # The client that lost the first answer retries it: its payment, as the first time, past the limit.
    retry = await admin.req("POST", "/v1/payments", json=sent)
    again = await _replayed(retry, first)
    check_shape("POST", "/v1/payments", 201, again)
    assert again["reference"] == first["reference"]
    # Its headers still say that no new payment is allowed, and until when, but it was not refused.
    assert retry.headers["X-RateLimit-Remaining"] == "0" and "Retry-After" not in retry.headers
    assert await _counted(rt, "payments:create") == 10

    # A new key is still refused; so is a key nothing was made with posing as a retry, and another request under
    # the first key (a 409 below the limit): nothing made, nothing counted.
    await _refused(await admin.req("POST", "/v1/payments", json=payment_body(rent)), "POST", "/v1/payments")
    for fake in range(3):
        await _refused(await admin.req("POST", "/v1/payments", json={**sent, "idempotencyKey": f"never-made-{fake}"}),
                       "POST", "/v1/payments")
    await _refused(await admin.req("POST", "/v1/payments", json={**sent, "amount": 50001}), "POST", "/v1/payments")
    await _refused(await admin.req("POST", "/v1/payments", json={**sent, "paymentMethod": "BOGUS"}),
                   "POST", "/v1/payments")
    assert await _rows(rt, Payment) == 10
    assert await _counted(rt, "payments:create") == 10


async def test_a_replay_below_the_limit_leaves_its_room(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    sent = payment_body(rent)
    made = await admin.req("POST", "/v1/payments", json=sent)
    first = await made.json()
    assert made.status == 201 and made.headers["X-RateLimit-Remaining"] == "9"
    for _ in range(3):
        retry = await admin.req("POST", "/v1/payments", json=sent)
        await _replayed(retry, first)
        assert retry.headers["X-RateLimit-Remaining"] == "9"  # as after the first: the replay was taken back
        assert retry.headers["X-RateLimit-Reset"] == str(T0)
    assert await _counted(rt, "payments:create") == 1
    for _ in range(9):  # all ten new payments still fit
        await make_payment(admin, rent)
    await _refused(await admin.req("POST", "/v1/payments", json=payment_body(rent)), "POST", "/v1/payments")
    assert await _rows(rt, Payment) == 10


async def test_a_refund_replayed_past_the_limit_is_answered_and_not_counted(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    path = f"/v1/payments/{payment['id']}/refunds"
    sent = {"amount": 10000, "reason": "overpaid", "idempotencyKey": idem()}
    first = await admin.json("POST", path, 201, json=sent)
    for _ in range(59):  # refunds:write, 60 a minute: a request the body check refuses counts too
        assert (await admin.req("POST", path, json={"idempotencyKey": "short"})).status == 400
    assert await _counted(rt, "refunds:write") == 60
    await _refused(await admin.req("POST", path, json={**sent, "idempotencyKey": idem()}), "POST", path)

    retry = await admin.req("POST", path, json=sent)
    check_shape("POST", path, 201, await _replayed(retry, first))
    assert await _counted(rt, "refunds:write") == 60
    await _refused(await admin.req("POST", path, json={**sent, "idempotencyKey": "never-made-1"}), "POST", path)
    await _refused(await admin.req("POST", path, json={**sent, "amount": 10001}), "POST", path)  # 409 below it
    assert await _rows(rt, Refund) == 1
    assert await _counted(rt, "refunds:write") == 60


async def test_a_recorded_payment_replayed_past_the_limit_is_answered_and_not_counted(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    path = "/v1/payments/recorded"
    sent = _line(demo)
    first = await admin.json("POST", path, 201, json=sent)
    for _ in range(59):  # payments:write, 60 a minute
        assert (await admin.req("POST", path, json={"idempotencyKey": "short"})).status == 400
    assert await _counted(rt, "payments:write") == 60
    await _refused(await admin.req("POST", path, json=_line(demo, providerTransactionId="MTN-STMT-4822")),
                   "POST", path)

    retry = await admin.req("POST", path, json=sent)
    check_shape("POST", path, 201, await _replayed(retry, first))
    assert await _counted(rt, "payments:write") == 60
    await _refused(await admin.req("POST", path, json={**sent, "idempotencyKey": "never-made-1"}), "POST", path)
    assert await _rows(rt, Payment) == 1


async def test_replays_past_the_limit_have_a_budget_of_their_own(admin: Caller, rt: Any, demo: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the limit each would-be replay was looked up in the database, without end: a client repeating its
    key in a loop, or posing as a retry with keys nothing was made with, made every request a database read (a
    bank payment's a wait for its URL). They are counted in a bucket of their own, as many a window as the
    route's limit; past it, 429 before the database is asked."""
    rent = demo["payment_types"]["Monthly Rent"]
    sent = payment_body(rent)
    first = await admin.json("POST", "/v1/payments", 201, json=sent)
    for _ in range(9):  # payments:create: 10 a minute
        await make_payment(admin, rent)
    looked: list[str] = []
    for fake in range(4):  # would-be replays under keys nothing was made with: refused, and counted
        await _refused(await admin.req("POST", "/v1/payments", json={**sent, "idempotencyKey": f"never-made-{fake}"}),
                       "POST", "/v1/payments")
    for _ in range(6):  # the real retry: answered, and counted among the replays past the limit
        await _replayed(await admin.req("POST", "/v1/payments", json=sent), first)
    assert await _counted(rt, "payments:create:past-limit") == 10
    assert await _counted(rt, "payments:create") == 10

    # The budget spent, even the real replay is refused, and the database is not asked.
    from admin_api import routing

    async def never(route: Any, ctx: Any) -> bool:
        looked.append(route.name)
        raise AssertionError("past the replay budget, the database is not asked")
    monkeypatch.setattr(routing, "_names_earlier", never)
    await _refused(await admin.req("POST", "/v1/payments", json=sent), "POST", "/v1/payments")
    assert looked == []
    assert await _rows(rt, Payment) == 10
