"""Security suite fixtures: a runtime with every callback secret set, a demo payment per provider,
database snapshots to prove an attack changed nothing, and metric readers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core.db import Base, utcnow
from core.metrics import CALLBACK_REJECTED
from tests.conftest import clean_database, make_settings

# Secrets configured for the secured runtime: the log scan (tests/logscan.py) also hunts for them.
SECRETS = {
    "CALLBACK_SECRET_AFRICASTALKING": "cb-at-5ecret-9f2c",
    "CALLBACK_SECRET_HUBTEL": "cb-hubtel-5ecret-71aa",
    "CALLBACK_SECRET_NALO": "cb-nalo-5ecret-03be",
    "CALLBACK_SECRET_MTN_MOMO": "cb-mtn-5ecret-4d11",
    "CALLBACK_SECRET_AIRTEL": "cb-airtel-5ecret-8e02",
    "CALLBACK_SECRET_MPESA": "cb-daraja-5ecret-6c9d",
    "CALLBACK_SECRET_IREMBOPAY": "cb-irembo-5ecret-2b7e",
    "CALLBACK_SECRET_SMS": "cb-sms-5ecret-5a40",
    "AIRTEL_CALLBACK_KEY": "airtel-hash-key-c0ffee-1234",
    "IREMBOPAY_SECRET_KEY": "irembo-signing-key-beef-5678",
    "JWT_SECRET": "security-suite-jwt-secret-0123456789abcdef",
}


def rejected(source: str) -> float:
    """Current value of the callback verification-failure counter for one source."""
    return CALLBACK_REJECTED.labels(source=source)._value.get()


async def snapshot(rt: Any) -> dict[str, Any]:
    """Row count of every table plus the status columns that money depends on."""
    from core.models import Payment, Refund

    counts: dict[str, Any] = {}
    async with rt.sessionmaker() as s:
        for table in Base.metadata.sorted_tables:
            counts[table.name] = (await s.execute(select(func.count()).select_from(table))).scalar_one()
        counts["payments"] = sorted(
            (await s.execute(select(Payment.id, Payment.status, Payment.refunded_minor,
                                    Payment.provider_transaction_id))).all())
        counts["refunds"] = sorted((await s.execute(select(Refund.id, Refund.status))).all())
    return counts


@pytest.fixture
async def srt(settings: Any) -> AsyncIterator[Any]:
    """A Runtime whose settings carry a secret for every callback source (and its own JWT key)."""
    from app import open_runtime

    secured = make_settings(**SECRETS)
    async with open_runtime(secured) as runtime:
        await clean_database(runtime)
        await runtime.redis.flushdb()
        yield runtime


@pytest.fixture
async def sclient(srt: Any, aiohttp_client: Any) -> Any:
    from app import create_app

    return await aiohttp_client(create_app(srt.settings, runtime=srt))


@pytest.fixture
async def sdemo(srt: Any) -> dict[str, Any]:
    from core.demo import seed_demo

    async with srt.sessionmaker.begin() as s:
        return await seed_demo(s, srt.cipher)


async def pending_payment(rt: Any, demo: dict[str, Any], *, provider: str, method: str,
                          status: str = "PENDING", amount_minor: int = 50_000,
                          currency: str = "RWF", txn: str | None = None) -> Any:
    """A payment row as the collect job leaves it: provider reference set, waiting for the callback."""
    from core.models import Payment
    from core.payments import account_context

    async with rt.sessionmaker.begin() as s:
        phone = "+250788000001"
        p = Payment(
            cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
            member_id=demo["members"][phone], reference=f"PAY_SEC_{uuid.uuid4().hex[:8]}",
            amount_minor=amount_minor, currency=currency, status=status, method=method, provider=provider,
            provider_reference=str(uuid.uuid4()), provider_transaction_id=txn,
            payment_account_enc=rt.cipher.encrypt(phone, context=account_context(demo["cooperative_id"])),
            payment_account_index=rt.cipher.blind_index(phone), payment_account_masked="+25078****001",
            idempotency_key=uuid.uuid4().hex, request_hash="h", channel="api",
            expires_at=utcnow() + timedelta(minutes=5),
        )
        s.add(p)
        await s.flush()
        return p


# The API suite's signed-in callers and second cooperative, reused here.
from tests.admin_api.conftest import admin, coop_b, superadmin, tenant  # noqa: E402, F401
