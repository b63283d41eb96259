"""Per-address limits count the caller, not our own load balancer: behind TRUSTED_PROXIES the nearest untrusted
X-Forwarded-For hop is the caller (the API's unauthenticated buckets, provider callbacks, USSD allowlists), and
without them the header is ignored (a client cannot pick its own bucket)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from app import create_app, open_runtime
from core.inbound import client_address
from tests.conftest import clean_database, make_settings

REFRESH_LIMIT = 30  # admin_api.auth_routes: Limit("auth:refresh", 30) per address and minute


async def _refresh_statuses(settings_overrides: dict[str, str], migrated_database: str, aiohttp_client: Any,
                            forwarded_for: list[str]) -> list[int]:
    async with open_runtime(make_settings(**settings_overrides)) as rt:
        await clean_database(rt)
        await rt.redis.flushdb()
        client = await aiohttp_client(create_app(rt.settings, runtime=rt))
        statuses = []
        for hop in forwarded_for:
            resp = await client.post("/v1/auth/refresh", json={"refreshToken": "not-a-token"},
                                     headers={"X-Forwarded-For": hop})
            statuses.append(resp.status)
        return statuses


@pytest.mark.usefixtures("limiter_clock")
async def test_callers_behind_our_balancer_have_their_own_buckets(migrated_database, aiohttp_client):
    clients = [f"41.186.{n}.7" for n in range(REFRESH_LIMIT + 5)]
    statuses = await _refresh_statuses({"TRUSTED_PROXIES": "127.0.0.1/32"}, migrated_database, aiohttp_client,
                                       clients)
    assert set(statuses) == {401}, statuses  # each caller tried once: nobody is limited by the others


@pytest.mark.usefixtures("limiter_clock")
async def test_one_caller_behind_our_balancer_is_still_limited(migrated_database, aiohttp_client):
    # The client's own (spoofable) entries come first; our balancer appends the address it saw.
    statuses = await _refresh_statuses({"TRUSTED_PROXIES": "127.0.0.1/32"}, migrated_database, aiohttp_client,
                                       [f"10.{n}.0.1, 41.186.0.7" for n in range(REFRESH_LIMIT + 5)])
    assert statuses == [401] * REFRESH_LIMIT + [429] * 5, statuses  # the limit's clock held: exactly its count


@pytest.mark.usefixtures("limiter_clock")
async def test_without_trusted_proxies_the_header_is_ignored(migrated_database, aiohttp_client):
    statuses = await _refresh_statuses({}, migrated_database, aiohttp_client,
                                       [f"41.186.{n}.7" for n in range(REFRESH_LIMIT + 5)])
    # A forged X-Forwarded-For per request does not escape the limit: one bucket, exactly its count.
    assert statuses == [401] * REFRESH_LIMIT + [429] * 5, statuses


@pytest.mark.parametrize(("peer", "header", "expected"), [
    ("10.0.0.5", "41.186.0.7", "10.0.0.5"),  # the peer is not ours: its header is the client's word, ignored
    ("127.0.0.1", "41.186.0.7", "41.186.0.7"),
    ("127.0.0.1", "6.6.6.6, 41.186.0.7, 127.0.0.2", "41.186.0.7"),  # our two balancers, then the caller
    ("127.0.0.1", "", "127.0.0.1"),  # no header: the balancer itself (a health check)
    ("127.0.0.1", "not-an-address", None),  # a broken header behind our balancer: trust nothing
    ("127.0.0.1", "41.186.0.7, unknown", None),
])
def test_client_address(peer, header, expected):
    headers = {"X-Forwarded-For": header} if header else {}
    request = make_mocked_request("POST", "/", headers=headers, transport=_Transport(peer))
    found = client_address(request, ("127.0.0.0/8",))
    assert found == (ipaddress.ip_address(expected) if expected else None)


class _Transport:
    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


@pytest.mark.usefixtures("limiter_clock")
async def test_an_ipv6_caller_is_counted_by_its_64_not_each_address(migrated_database, aiohttp_client):
    """A subscriber line or a cloud host has a whole /64: one bucket per /128 was no limit at all (120 refresh
    or sign-in tries from ::1, ::2, ... all went through)."""
    statuses = await _refresh_statuses({"TRUSTED_PROXIES": "127.0.0.1/32"}, migrated_database, aiohttp_client,
                                       [f"2001:db8:41:186::{n:x}" for n in range(1, REFRESH_LIMIT + 5)])
    assert statuses == [401] * REFRESH_LIMIT + [429] * 4, statuses  # the limit's clock held: exactly its count


@pytest.mark.parametrize(("address", "key"), [
    ("41.186.0.7", "41.186.0.7"),
    ("2001:db8:41:186::1", "2001:db8:41:186::/64"),
    ("2001:db8:41:186:ffff:1:2:3", "2001:db8:41:186::/64"),
    ("2001:db8:41:187::1", "2001:db8:41:187::/64"),
    ("::ffff:41.186.0.7", "41.186.0.7"),  # an IPv4 caller on a dual-stack socket
    (None, "unknown"),
])
def test_limit_keys(address, key):
    from core.inbound import limit_key

    assert limit_key(ipaddress.ip_address(address) if address else None) == key
