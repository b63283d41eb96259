"""Sign-in limits count wrong passwords, per (username, address) and per username across addresses, so knowing
an admin's username does not let anyone keep them out; with Redis down sign-in still works and guessing is
still counted, in the process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from admin_api import all_routes, auth_routes
from admin_api.openapi import build_document
from app import create_app, open_runtime
from core.demo import seed_demo
from tests.admin_api.conftest import check_shape, redis_unreachable
from tests.conftest import clean_database, make_settings

BALANCER = "127.0.0.1/32"  # the test client's own address plays our load balancer


@asynccontextmanager
async def _behind_balancer(aiohttp_client: Any, **env: str) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """A client whose callers each have their own address (X-Forwarded-For through a trusted balancer)."""
    async with open_runtime(make_settings(TRUSTED_PROXIES=BALANCER, **env)) as rt:
        await clean_database(rt)
        await rt.redis.flushdb()
        async with rt.sessionmaker.begin() as s:
            demo = await seed_demo(s, rt.cipher)
        yield await aiohttp_client(create_app(rt.settings, runtime=rt)), demo


async def _sign_in(client: Any, username: str, password: str, address: str) -> Any:
    return await client.post("/v1/auth/token", json={"username": username, "password": password},
                             headers={"X-Forwarded-For": address})


@pytest.mark.usefixtures("limiter_clock")
async def test_wrong_passwords_from_elsewhere_do_not_lock_the_admin_out(migrated_database, aiohttp_client):
    async with _behind_balancer(aiohttp_client) as (client, demo):
        username, password = demo["admin"]
        for _ in range(10):
            assert (await _sign_in(client, username, "guess-guess", "41.186.0.66")).status == 401
        guesser = await _sign_in(client, username, password, "41.186.0.66")
        assert guesser.status == 429 and int(guesser.headers["Retry-After"]) >= 1
        assert (await guesser.json())["error"] == "Too Many Requests"
        real = await _sign_in(client, username, password, "41.186.7.7")
        assert real.status == 200, await real.json()


@pytest.mark.usefixtures("limiter_clock")
async def test_only_failures_are_counted(migrated_database, aiohttp_client):
    async with _behind_balancer(aiohttp_client) as (client, demo):
        username, password = demo["admin"]
        for _ in range(9):
            assert (await _sign_in(client, username, "guess-guess", "41.186.0.8")).status == 401
        for _ in range(5):  # signing in again and again fills no bucket
            assert (await _sign_in(client, username, password, "41.186.0.8")).status == 200
        assert (await _sign_in(client, username, "guess-guess", "41.186.0.8")).status == 401  # the 10th failure
        assert (await _sign_in(client, username, password, "41.186.0.8")).status == 429


@pytest.mark.usefixtures("limiter_clock")
async def test_guessing_spread_over_addresses_is_bounded_per_username(migrated_database, aiohttp_client):
    # Scaled down (x0.2): 2 failures a minute per address, 20 an hour per username.
    async with _behind_balancer(aiohttp_client, RATE_LIMIT_MULTIPLIER="0.2") as (client, demo):
        username, password = demo["admin"]
        for n in range(20):
            assert (await _sign_in(client, username, "guess-guess", f"41.186.1.{n}")).status == 401
        # An address that failed once has room in its own bucket, but the username's is full.
        again = await _sign_in(client, username, password, "41.186.1.3")
        assert again.status == 429 and int(again.headers["Retry-After"]) >= 1
        # A new address gets one try; then it has failed too.
        assert (await _sign_in(client, username, "guess-guess", "41.186.2.1")).status == 401
        assert (await _sign_in(client, username, password, "41.186.2.1")).status == 429
        # The real admin from an address that has not failed signs in; other users are not affected.
        assert (await _sign_in(client, username, password, "41.186.7.7")).status == 200
        assert (await _sign_in(client, *demo["tenant"], "41.186.1.3")).status == 200




@pytest.fixture
async def redis_down(rt: Any) -> AsyncIterator[None]:
    """The runtime's Redis clients (the multiplexed one too) pointed at a port nothing listens on, and this
    process's own failure counts emptied."""
    auth_routes.LOCAL_FAILURES.clear()
    try:
        async with redis_unreachable(rt):
            yield
    finally:
        auth_routes.LOCAL_FAILURES.clear()


@pytest.mark.usefixtures("limiter_clock")
async def test_sign_in_works_with_redis_down_and_guessing_is_still_limited(client, demo, redis_down):
    username, password = demo["admin"]
    resp = await client.post("/v1/auth/token", json={"username": username, "password": password})
    body = await resp.json()
    assert resp.status == 200, body
    check_shape("POST", "/v1/auth/token", 200, body)
    for _ in range(10):
        resp = await client.post("/v1/auth/token", json={"username": username, "password": "guess-guess"})
        assert resp.status == 401
    resp = await client.post("/v1/auth/token", json={"username": username, "password": password})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1  # counted in this process


async def test_refresh_with_redis_down_works_once(client, demo, rt):
    tokens = await (await client.post("/v1/auth/token", json={"username": demo["admin"][0],
                                                             "password": demo["admin"][1]})).json()
    async with redis_unreachable(rt):
        # The single use of a refresh token is kept in the database (core.auth._spend): Redis is not needed.
        resp = await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
        body = await resp.json()
    assert resp.status == 200
    check_shape("POST", "/v1/auth/refresh", 200, body)
    again = await client.post("/v1/auth/refresh", json={"refreshToken": tokens["refreshToken"]})
    assert again.status == 401  # spent, with Redis down as with it up


def test_public_routes_document_503_where_a_dependency_can_fail():
    doc = build_document(all_routes())
    for path in ("/v1/auth/token", "/v1/auth/refresh"):
        assert "503" in doc["paths"][path]["post"]["responses"], path
    assert "503" not in doc["paths"]["/v1/openapi.json"]["get"]["responses"]
