"""Fail-closed provider wires and real adapters over them, for tests that run the core and its worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import update

from core.audit import Actor
from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.models import Cooperative, OutboxJob, Payment, PaymentType
from core.payments import NewPayment, create_payment
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from core.provider_events import handle_provider_event
from providers.mpesa import MpesaAdapter
from providers.mtn_momo.adapter import MtnMomoAdapter
from tests.providers.conftest import load

ADMIN = Actor("admin:test", "api")
MTN_BASE = "https://mtn.test"
MPESA_BASE = "https://mpesa.test"
MPESA_PASSKEY = "test-passkey-0f3c9a1e7b2d4c6a8e0f1a2b3c4d5e6f"
MPESA_CREDS = {"consumer_key": "ck-test", "consumer_secret": "cs-test-secret", "passkey": MPESA_PASSKEY,
               "initiator": "testapi", "security_credential": "sec-cred-test"}

Answer = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


class Routes:
    """httpx.MockTransport for tests that run the worker: a declared route answers as often as it is
    called (declaring it again changes the answer), and a request nobody declared fails the call."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.routes: dict[tuple[str, str], Answer] = {}
        self.seen: list[httpx.Request] = []

    def on(self, method: str, path: str, answer: Answer | int, body: Any = None) -> Routes:
        """`path` ending in '*' matches every path that starts with the rest."""
        if isinstance(answer, int):
            status = answer
            self.routes[(method, path)] = (lambda _r: httpx.Response(status, json=body)) if body is not None \
                else (lambda _r: httpx.Response(status))
        elif callable(answer) and not isinstance(answer, httpx.Response):
            self.routes[(method, path)] = answer
        else:  # (an httpx.Response given as the answer raised TypeError at the call: a test of nothing)
            raise TypeError(f"answer for {method} {path} must be a status code or a function, not {answer!r}")
        return self

    @staticmethod
    def _matches(pattern: str, path: str) -> bool:
        return path == pattern or (pattern.endswith("*") and path.startswith(pattern[:-1]))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == httpx.URL(self.base).host, f"request to an unexpected host: {request.url}"
        for (method, pattern), answer in reversed(list(self.routes.items())):
            if method == request.method and self._matches(pattern, request.url.path):
                self.seen.append(request)
                result = answer(request)
                return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.method == method and self._matches(path, r.url.path)]


def mtn_wire() -> Routes:
    token = load("mtn_momo", "token.json")
    return (Routes(MTN_BASE).on("POST", "/collection/token/", 200, token)
            .on("POST", "/disbursement/token/", 200, token))


def mtn_adapter(rt: Any, wire: Routes) -> MtnMomoAdapter:
    """A real MTN MoMo adapter over `wire`, in place of the runtime's."""
    config = ProviderConfig(base_url=MTN_BASE, credentials={
        k: Secret(f"{k}-test") for k in ("api_user", "api_key", "subscription_key",
                                         "disbursement_subscription_key")},
        options={"target_environment": "mtnrwanda"})
    adapter = MtnMomoAdapter(wire.client(), config)
    rt.providers = {**rt.providers, "mtn_momo": adapter}
    return adapter


def mpesa_wire() -> Routes:
    return Routes(MPESA_BASE).on("GET", "/oauth/v1/generate", 200,
                                 {"access_token": "tok-test-0001", "expires_in": "3599"})


def mpesa_adapter(rt: Any, base: str, http: httpx.AsyncClient, **options: str) -> MpesaAdapter:
    """A real M-Pesa adapter at `base`, in place of the runtime's."""
    config = ProviderConfig(base_url=base, credentials={k: Secret(v) for k, v in MPESA_CREDS.items()},
                            options={"shortcode": "174379", **options})
    adapter = MpesaAdapter(http, config)
    rt.providers = {**rt.providers, "mpesa": adapter}
    return adapter


def mtn_payment(demo: dict[str, Any], key: str = "key-0001-abcdef") -> NewPayment:
    return NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                      method="MOBILE_MONEY_MTN", account="0788000001", idempotency_key=key, channel="api",
                      member_id=demo["members"]["+250788000001"])


async def mpesa_payment(rt: Any, demo: dict[str, Any], phone: str = "+254708000001",
                        key: str = "key-mpesa-0001") -> Payment:
    """A 150 KES M-Pesa payment of the demo cooperative (a KES payment type is added for it, and the cooperative
    made Kenyan: a mobile-money payment is collected from the cooperative's country's numbers only)."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == demo["cooperative_id"]).values(country="KE"))
        ptype = PaymentType(cooperative_id=demo["cooperative_id"], name=f"Rent KES {key}", amount_minor=15_000,
                            currency="KES", is_active=True)
        s.add(ptype)
        await s.flush()
        payment, _ = await create_payment(s, rt, NewPayment(
            cooperative_id=demo["cooperative_id"], payment_type_id=ptype.id, method="MPESA", account=phone,
            idempotency_key=key, channel="api"), actor=ADMIN)
    return payment


async def completed(rt: Any, payment: Payment, transaction_id: str = "TX-1") -> None:
    """The payment completed by a (signed) callback; its jobs put aside, so only a test's own run."""
    event = Event(provider=payment.provider, kind=EventKind.COLLECTION, event_id=f"done-{payment.id}",
                  reference=payment.provider_reference, outcome=ProviderOutcome.SUCCEEDED,
                  provider_transaction_id=transaction_id)
    assert await handle_provider_event(rt, event) == "completed"
    await jobs_done(rt)


async def jobs_done(rt: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).values(status="DONE"))


async def due_now(rt: Any, kind: str) -> None:
    """Make every waiting job of `kind` due."""
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == kind, OutboxJob.status == "PENDING")
                        .values(run_at=utcnow()))
