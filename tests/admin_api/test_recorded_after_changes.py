"""Money a statement shows taken is recorded whatever changed since it was paid (a member suspended, a type closed
or repriced since the restore point: POST /v1/payments' refusals of a new request refused it), and a reference the
gateway never handed out is refused (taken, it made the payment that later drew that number fail with a 500)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from core.db import utcnow
from core.models import Member, Payment, PaymentType
from tests.admin_api.conftest import Caller, idem, payment_body
from tests.admin_api.test_chargeback_visibility import _z
from tests.conftest import requires_pg

ALINE = "+250788000001"


def _line(demo: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "memberId": demo["members"][ALINE],
            "providerTransactionId": "MTN-" + idem(), "completedAt": _z(utcnow() - timedelta(hours=3)),
            "note": "MTN statement line", "idempotencyKey": idem(), **over}


@pytest.mark.parametrize("since", ["member suspended", "type closed", "type repriced"])
async def test_money_taken_is_recorded_whatever_changed_since(admin: Caller, rt: Any, demo: dict[str, Any],
                                                              since: str) -> None:
    async with rt.sessionmaker.begin() as s:
        if since == "member suspended":
            await s.execute(update(Member).where(Member.id == demo["members"][ALINE]).values(status="SUSPENDED"))
        elif since == "type closed":
            await s.execute(update(PaymentType).where(PaymentType.id == demo["payment_types"]["Monthly Rent"])
                            .values(is_active=False))
        else:
            await s.execute(update(PaymentType).where(PaymentType.id == demo["payment_types"]["Monthly Rent"])
                            .values(amount_minor=60000))
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, done["id"])
    assert (row.status, row.collected_minor, row.amount_minor) == ("COMPLETED", 50000, 50000)


async def test_a_reference_never_handed_out_is_refused(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    first = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    head, _, number = first["reference"].rpartition("_")
    ahead = f"{head}_{int(number) + 1:03d}"
    refused = await admin.json("POST", "/v1/payments/recorded", 400, json=_line(demo, reference=ahead))
    assert "was never handed out" in str(refused["message"])
    # The payment that draws that number is made as usual.
    nxt = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"],
                                                                           paymentAccount="+250788000002"))
    assert nxt["reference"] == ahead
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Payment.reference).where(Payment.channel == "recorded"))).all() == []
    # A reference handed out before (a lost payment's, below the sequence) is taken.
    old = f"{head}_{int(number) - 1:03d}" if int(number) > 1 else None
    if old is not None:
        done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, reference=old))
        assert done["reference"] == old


@requires_pg
async def test_a_number_the_sequence_still_has_to_hand_out_is_refused(admin: Caller, rt: Any,
                                                                      demo: dict[str, Any]) -> None:
    """`setval(n, false)` (how a restore's tools set a sequence) leaves last_value at n with n still to hand out:
    the number is no lost payment's, and the payment that draws it next must not fail on a taken reference."""
    first = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    head, _, number = first["reference"].rpartition("_")
    nxt = int(number) + 1
    async with rt.sessionmaker.begin() as s:
        await s.execute(text("SELECT setval('human_reference_seq', :n, false)"), {"n": nxt})
    refused = await admin.json("POST", "/v1/payments/recorded", 400,
                               json=_line(demo, reference=f"{head}_{nxt:03d}"))
    assert f"the references' sequence is at {int(number)}" in str(refused["message"])
    drawn = await admin.json("POST", "/v1/payments", 201, json=payment_body(demo["payment_types"]["Monthly Rent"],
                                                                            paymentAccount="+250788000002"))
    assert drawn["reference"] == f"{head}_{nxt:03d}"
