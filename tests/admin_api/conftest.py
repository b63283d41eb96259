"""Helpers for the API tests: signed-in callers for each role and a second cooperative B."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from admin_api import all_routes
from admin_api.openapi import build_document
from core import auth
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, PaymentType
from core.phone import normalize

_keys = itertools.count(1)
_DOC = build_document(all_routes())
_TEMPLATES = [(re.compile("^" + re.sub(r"{\w+}", "[^/]+", path) + "$"), path) for path in _DOC["paths"]]


def check_shape(method: str, url: str, status: int, body: Any) -> None:
    """Every answer a test sees must match the schema the OpenAPI document promises for it."""
    path = url.split("?", 1)[0]
    matches = [t for rx, t in _TEMPLATES if rx.match(path) and method.lower() in _DOC["paths"][t]]
    # Fixed segments win over {id} patterns, as in the router.
    matches.sort(key=lambda t: t.count("{"))
    assert matches, f"{method} {path} is not in the OpenAPI document"
    responses = _DOC["paths"][matches[0]][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which the document does not list"
    content = responses[str(status)].get("content", {}).get("application/json")
    if content is None:
        return
    schema = content["schema"]
    if "$ref" in schema:
        schema = _DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(body)


def idem() -> str:
    return f"idem-key-{next(_keys):06d}"


@dataclass
class Caller:
    """An HTTP client bound to one set of credentials."""

    client: Any
    headers: dict[str, str]

    async def req(self, method: str, path: str, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kw)

    async def json(self, method: str, path: str, status: int, **kw: Any) -> Any:
        """Call, check the status, and check the body against the OpenAPI document's schema for it."""
        resp = await self.req(method, path, **kw)
        body = await resp.json()
        assert resp.status == status, (resp.status, body)
        check_shape(method, path, status, body)
        return body


async def login(client: Any, username: str, password: str) -> dict[str, Any]:
    resp = await client.post("/v1/auth/token", json={"username": username, "password": password})
    body = await resp.json()
    assert resp.status == 200, body
    return body


async def bearer(client: Any, username: str, password: str) -> Caller:
    tokens = await login(client, username, password)
    return Caller(client, {"Authorization": f"Bearer {tokens['accessToken']}"})


@pytest.fixture
async def admin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["admin"])


@pytest.fixture
async def superadmin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


@pytest.fixture
async def tenant(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["tenant"])


@pytest.fixture
async def coop_b(rt: Any, client: Any, demo: dict[str, Any]) -> dict[str, Any]:
    """A second cooperative with its own admin, payment type and member."""
    actor = Actor("system", "system")
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(
            name="Other Coop",
            short_code="OTHER",
            country="RW",
            currency="RWF",
            timezone="Africa/Kigali",
            status="ACTIVE",
            self_registration=True,
        )
        s.add(coop)
        await s.flush()
        ptype = PaymentType(
            cooperative_id=coop.id, name="Levy", amount_minor=1000, currency="RWF", is_active=True
        )
        s.add(ptype)
        member = await create_member(
            s,
            rt.cipher,
            cooperative_id=coop.id,
            name="Bea Other",
            phone=normalize("+250788999001"),
            actor=actor,
        )
        await auth.create_user(
            s, username="admin@b.rw", password="b-admin-password", role="COOP_ADMIN", cooperative_id=coop.id
        )
        await s.flush()
        ids = {"cooperative_id": coop.id, "payment_type_id": ptype.id, "member_id": member.id}
    return {**ids, "admin": await bearer(client, "admin@b.rw", "b-admin-password")}


def payment_body(payment_type_id: str, **over: Any) -> dict[str, Any]:
    body = {
        "paymentTypeId": payment_type_id,
        "amount": 50000,
        "paymentMethod": "MOBILE_MONEY_MTN",
        "paymentAccount": "+250788000001",
        "description": "Rent",
        "idempotencyKey": idem(),
    }
    body.update(over)
    return body


async def complete_payment(rt: Any, payment_id: str, *, fee: int = 0) -> None:
    """Move a payment to COMPLETED the way a provider callback would (through the state machine)."""
    from core.db import utcnow
    from core.state import transition
    from core.state.payment import PAYMENT, PaymentStatus

    async with rt.sessionmaker.begin() as s:
        await transition(
            s,
            PAYMENT,
            payment_id,
            PaymentStatus.PENDING,
            PaymentStatus.COMPLETED,
            actor=Actor("provider:test", "provider"),
            values={"completed_at": utcnow(), "fee_minor": fee, "provider_transaction_id": "TX1"},
        )


async def refund_raced(admin: Caller, rt: Any, monkeypatch: Any, payment_id: str, dispute_id: str,
                       disputes_locked: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` as a refund of the payment while an officer's transition of dispute `dispute_id` holds its row, and
    core.refunds's `disputes_locked` (which reads the disputes it locks before the payment) reads none, as before the
    dispute was opened: the refund finds it when it locks the payment. The 409's body."""
    from sqlalchemy import select

    import core.refunds
    from core.models import Dispute

    async def read_before_it_was_opened(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    async with rt.sessionmaker() as officer:  # her transition of the dispute holds its row
        await officer.execute(select(Dispute).where(Dispute.id == dispute_id).with_for_update())
        with monkeypatch.context() as patched:
            patched.setattr(core.refunds, disputes_locked, read_before_it_was_opened)
            raced: dict[str, Any] = await admin.json("POST", f"/v1/payments/{payment_id}/refunds", 409, json=body)
        await officer.rollback()
    return raced


async def make_payment(caller: Caller, payment_type_id: str, **over: Any) -> dict[str, Any]:
    return await caller.json("POST", "/v1/payments", 201, json=payment_body(payment_type_id, **over))


async def kenyan_mpesa_payment(superadmin: Caller, amount: str) -> dict[str, Any]:
    """A payment of `amount` KES by M-Pesa, PENDING, of a new Kenyan cooperative's type of that price."""
    coop = await superadmin.json("POST", "/v1/cooperatives", 201, json={
        "name": "Nairobi Coop", "shortCode": "NRB", "country": "KE"})
    ptype = await superadmin.json("POST", "/v1/payment-types", 201, json={
        "name": "Levy", "amount": amount, "cooperativeId": coop["id"]})
    return await superadmin.json("POST", "/v1/payments", 201, json={
        "paymentTypeId": ptype["id"], "amount": amount, "paymentMethod": "MPESA", "paymentAccount": "0712345678",
        "idempotencyKey": idem(), "cooperativeId": coop["id"]})


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unreachable_redis() -> Any:
    """A Redis client of a port nothing listens on, failing at once (no retries with backoff: ~4 s a call):
    Redis down, for the paths that must keep working or refuse whole without it."""
    from redis.asyncio import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Redis(host="127.0.0.1", port=_unused_port(), socket_connect_timeout=0.5, socket_timeout=0.5,
                 retry=Retry(NoBackoff(), 0))


def unreachable_mux() -> Any:
    """The multiplexed client (core.redis_mux.MuxRedis) of a port nothing listens on: each command fails at once
    with redis-py's ConnectionError, as the runtime's own does while Redis is down."""
    from core.redis_mux import MuxRedis

    return MuxRedis("127.0.0.1", _unused_port(), timeout=0.5)


@contextlib.asynccontextmanager
async def redis_unreachable(rt: Any) -> AsyncIterator[Any]:
    """Redis down for `rt` while the block runs: its redis-py client and, where it has one, its multiplexed client
    (rt.redis_mux: what rt.hot_redis gives the API's rate limit and revocation mark, provider callbacks' limit,
    the USSD and SMS hot paths) each of a port nothing listens on; put back after. Swapping rt.redis alone
    left the hot paths talking to the live server: that part of the outage went untested. Yields the dead
    redis-py client."""
    dead = unreachable_redis()
    dead_mux = None if rt.redis_mux is None else unreachable_mux()  # the runtime's own kind: None on a cluster
    saved = rt.redis, rt.redis_mux
    rt.redis, rt.redis_mux = dead, dead_mux
    try:
        yield dead
    finally:
        rt.redis, rt.redis_mux = saved
        await dead.aclose()
        if dead_mux is not None:
            await dead_mux.aclose()


def redis_fallbacks(caplog: Any) -> list[str]:
    """The API requests whose rate limit and revocation mark Redis did not answer (admin_api.routing): served
    without a limit, a user token checked on its account's rows. Capture WARNING of gateway.api to see them."""
    return [r.getMessage() for r in caplog.records if r.name == "gateway.api"
            and r.getMessage().startswith("rate limit and token revocation unavailable in Redis")]


IREMBO_SECRET = "irembo-sim-secret-5c1e"


class Irembo:
    """The IremboPay simulator on 127.0.0.1, the gateway's adapter pointed at it, and every request it was sent."""

    def __init__(self, app: Any, base: str) -> None:
        self.app, self.base = app, base
        self.sent: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, bytes]] = []  # each request's path and body, in order

    async def record(self, request: Any) -> None:
        self.sent.append((request.method, request.url.path))
        self.bodies.append((request.url.path, request.content))

    def calls(self, method: str, path: str) -> int:
        return self.sent.count((method, path))


@pytest.fixture
async def irembo(rt: Any, aiohttp_server: Any) -> AsyncIterator[Irembo]:
    """The IremboPay simulator as `irembopay`, which takes the bank methods and MTN mobile money (its push)."""
    import httpx

    from core.config import ProviderConfig, Secret
    from providers.irembopay.adapter import IremboPayAdapter
    from providers.irembopay.simulator import create_simulator
    from providers.simulation import SimulatorOptions

    app = create_simulator(SimulatorOptions(delay=0.02, drop_callback=True, credentials={"secret_key": IREMBO_SECRET}))
    server = await aiohttp_server(app, host="127.0.0.1")
    sim = Irembo(app, str(server.make_url("")).rstrip("/"))
    config = ProviderConfig(base_url=sim.base, credentials={"secret_key": Secret(IREMBO_SECRET)},
                            options={"payment_account": "PI-coop", "payment_item_code": "PC-rent"})
    async with httpx.AsyncClient(event_hooks={"request": [sim.record]}) as http:
        rt.providers = {**rt.providers, "irembopay": IremboPayAdapter(http, config)}
        rt.routes = {**rt.routes, "MOBILE_MONEY_MTN": "irembopay"}
        yield sim
