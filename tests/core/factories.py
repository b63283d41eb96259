"""Minimal rows for core tests that work below the services."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.db import utcnow
from core.models import Cooperative, Dispute, Payment, PaymentType, Refund, SmsMessage


async def cooperative(session: AsyncSession, **kw: Any) -> Cooperative:
    coop = Cooperative(name=kw.get("name", "Test Coop"), short_code=kw.get("short_code", uuid.uuid4().hex[:8]),
                       country="RW", currency="RWF", timezone="Africa/Kigali")
    session.add(coop)
    await session.flush()
    return coop


async def payment(session: AsyncSession, coop: Cooperative, status: str = "PENDING") -> Payment:
    ptype = PaymentType(cooperative_id=coop.id, name="Rent", amount_minor=50_000, currency="RWF")
    session.add(ptype)
    await session.flush()
    p = Payment(cooperative_id=coop.id, payment_type_id=ptype.id, reference=f"PAY_{uuid.uuid4().hex[:10]}",
                amount_minor=50_000, currency="RWF", status=status, method="MOBILE_MONEY_MTN", provider="mtn_momo",
                provider_reference=str(uuid.uuid4()), payment_account_enc="x", payment_account_index="x",
                payment_account_masked="+25078****001", idempotency_key=uuid.uuid4().hex, request_hash="h",
                channel="api", expires_at=utcnow() + timedelta(minutes=5))
    session.add(p)
    await session.flush()
    return p


async def row_in_state(session: AsyncSession, machine_name: str, status: str) -> Any:
    coop = await cooperative(session)
    if machine_name == "payment":
        return await payment(session, coop, status)
    pay = await payment(session, coop, "COMPLETED")
    if machine_name == "refund":
        row: Any = Refund(cooperative_id=coop.id, payment_id=pay.id, reference=f"RFD_{uuid.uuid4().hex[:10]}",
                          amount_minor=100, currency="RWF", status=status, idempotency_key=uuid.uuid4().hex,
                          provider_reference=str(uuid.uuid4()))
    elif machine_name == "dispute":
        row = Dispute(cooperative_id=coop.id, payment_id=pay.id, reference=f"DSP_{uuid.uuid4().hex[:10]}",
                      reason="OTHER", status=status, channel="api")
    else:
        row = SmsMessage(cooperative_id=coop.id, phone_enc="x", phone_index="x", phone_masked="x",
                         template="t", language="en", body="b", encoding="GSM-7", length=1, segments=1,
                         status=status, idempotency_key=uuid.uuid4().hex)
    session.add(row)
    await session.flush()
    return row
