"""A statement line recorded for a member who was erased (POST /v1/payments/recorded naming her, or her number
finding her as she was erased): the money is recorded on her record, as a late callback's is on her payments, but
her number is not kept (the account "erased", as on her other payments): recorded with the account the admin typed,
her number came back on an erased member's payment, found again by GET /v1/payments?paymentAccount=, its mask shown,
its ciphertext there to decrypt."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.db import ADVISORY_XACT_LOCK, utcnow
from core.models import Member, Payment
from core.money import Money
from core.payments import NewPayment
from core.recorded_payments import StatementLine, record_payment
from core.transaction_ids import _id_lock_key
from tests.admin_api.conftest import Caller, idem
from tests.admin_api.test_chargeback_visibility import _z
from tests.admin_api.test_erase_races import ADMIN, NAME, PHONE, _erased, _held, _lined_up, _patient
from tests.channels.sms.helpers import make_payment
from tests.conftest import requires_pg, waiting_for_locks

ENCODED = PHONE.replace("+", "%2B")


def _line(demo: Any, member_id: str | None, **over: Any) -> dict[str, Any]:
    body = {"paymentTypeId": demo["payment_types"]["Monthly Rent"], "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "memberId": member_id, "paymentAccount": PHONE,
            "providerTransactionId": "MTN-STMT-7001", "completedAt": _z(utcnow() - timedelta(days=2)),
            "note": "MTN statement, line 7", "idempotencyKey": idem()}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


async def _no_number_on(rt: Any, payment_id: str) -> None:
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment_id)
        assert row is not None
        assert (row.payment_account_enc, row.payment_account_index, row.payment_account_masked, row.request_hash) == (
            "", "", "erased", ""), row.payment_account_masked
        assert (row.status, row.collected_minor) == ("COMPLETED", 50000)


@pytest.mark.parametrize("account", [PHONE, None])
async def test_a_line_recorded_for_her_after_her_erasure_keeps_no_number(
        rt: Any, admin: Caller, demo: Any, account: str | None) -> None:
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)

    body = _line(demo, jeanne["id"], paymentAccount=account)
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=body)
    assert (done["memberId"], done["paymentAccount"], done["collectedAmount"]) == (jeanne["id"], "erased", 50000)
    await _no_number_on(rt, done["id"])
    assert (await admin.json("GET", f"/v1/payments?paymentAccount={ENCODED}", 200))["data"] == []
    # The same request again answers it (its key alone, as her other payments'), and records nothing more.
    again = await admin.req("POST", "/v1/payments/recorded", json=body)
    assert (again.status, (await again.json())["id"]) == (201, done["id"])
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(Payment.id).where(Payment.member_id == jeanne["id"]))).all()) == 1


@requires_pg
async def test_a_line_recorded_for_her_while_she_is_erased_waits_and_keeps_no_number(
        rt: Any, admin: Caller, demo: Any) -> None:
    """The erasure holds her row (waiting for her payment, which a blocker holds); the recording naming her waits for
    her row, then goes ahead once she is erased: her number is not kept on it."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)

    async def recorded() -> str:
        line = StatementLine(
            payment=NewPayment(cooperative_id=demo["cooperative_id"],
                               payment_type_id=demo["payment_types"]["Monthly Rent"], method="MOBILE_MONEY_MTN",
                               account=PHONE, idempotency_key=idem(), channel="recorded",
                               amount=Money(50_000, "RWF"), member_id=jeanne["id"]),
            provider_transaction_id="MTN-STMT-7002", completed_at=utcnow() - timedelta(days=2), note="line 8")
        async with _patient(rt) as s:
            payment, _ = await record_payment(s, rt, line, actor=ADMIN)
            return payment.id

    erased, said = await asyncio.wait_for(_lined_up(rt, _held(Payment, paid.id), _erased(rt, jeanne["id"]),
                                                     recorded()), 60)
    assert isinstance(erased, Member) and isinstance(said, str), (erased, said)
    await _no_number_on(rt, said)


@requires_pg
async def test_a_line_whose_number_found_her_as_she_was_erased_keeps_no_number(
        rt: Any, admin: Caller, demo: Any, monkeypatch: Any) -> None:
    """A line naming only her number found her (ACTIVE), and she was suspended and erased before it took her row."""
    import core.recorded_payments as recorded_payments

    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    found = recorded_payments.number_holder_at

    async def erased_meanwhile(*args: Any, **kwargs: Any) -> Any:
        member_id = await found(*args, **kwargs)
        await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
        await admin.json("POST", f"/v1/members/{jeanne['id']}/erase", 200)
        return member_id

    monkeypatch.setattr(recorded_payments, "number_holder_at", erased_meanwhile)
    done = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo, None))
    assert (done["memberId"], done["paymentAccount"]) == (jeanne["id"], "erased")
    await _no_number_on(rt, done["id"])


async def _recorded_by_number(rt: Any, demo: Any, txn: str, when: Any) -> str:
    """Her number's line at `when`, recorded naming no member (the number finds whose it was), in a transaction of
    its own (_patient)."""
    line = StatementLine(
        payment=NewPayment(cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Monthly Rent"],
                           method="MOBILE_MONEY_MTN", account=PHONE, idempotency_key=idem(), channel="recorded",
                           amount=Money(50_000, "RWF"), member_from_account=True),
        provider_transaction_id=txn, completed_at=when, note="MTN statement, line 9")
    async with _patient(rt) as s:
        payment, _ = await record_payment(s, rt, line, actor=ADMIN)
        return payment.id


async def _as_she_is_erased(rt: Any, demo: Any, jeanne: str, paid: Payment, when: Any, recording_first: bool) -> str:
    """Her erasure and a line of her number at `when` recorded at once (PostgreSQL). Recording first: it holds the
    transaction id's lock (a blocker holds it), her erasure then comes; erasure first: it holds her row, waiting for
    her payment (the blocker holds it), the recording then comes. Each waits for the other's locks once the blocker
    lets go (the erasure for her row; the recording, erasure first, for hers too)."""
    txn = "MTN-STMT-" + idem()[:12]
    if recording_first:
        blocker = rt.sessionmaker()
        try:
            await blocker.begin()
            await blocker.execute(ADVISORY_XACT_LOCK.params(key=_id_lock_key("mtn_momo", txn)))
            recording = asyncio.create_task(_recorded_by_number(rt, demo, txn, when))
            await waiting_for_locks(rt, 1)
            erasure = asyncio.create_task(_erased(rt, jeanne))
            await waiting_for_locks(rt, 2, done=erasure)  # (without her row's lock, it went through meanwhile)
            await blocker.commit()
        finally:
            await blocker.close()
        erased, said = await asyncio.wait_for(asyncio.gather(erasure, recording, return_exceptions=True), 60)
    else:
        erased, said = await asyncio.wait_for(_lined_up(rt, _held(Payment, paid.id), _erased(rt, jeanne),
                                                         _recorded_by_number(rt, demo, txn, when)), 60)
    assert isinstance(erased, Member) and isinstance(said, str), (erased, said)
    return said


@requires_pg
@pytest.mark.parametrize("recording_first", [True, False])
async def test_a_line_her_number_finds_her_by_as_she_is_erased_keeps_no_number(
        rt: Any, admin: Caller, demo: Any, recording_first: bool) -> None:
    """Found by her number (hers at completedAt): the recording takes her row before the id's lock, as naming her
    does; erasure first, it waits for her row and finds her erased; recording first, the erasure waits for her row
    and then scrubs the payment with her others."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": PHONE})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    said = await _as_she_is_erased(rt, demo, jeanne["id"], paid, utcnow() - timedelta(days=2), recording_first)
    await _no_number_on(rt, said)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, said)).member_id == jeanne["id"]


@requires_pg
@pytest.mark.parametrize("recording_first", [True, False])
async def test_a_line_of_no_member_her_erasure_counts_hers_keeps_no_number(
        rt: Any, admin: Caller, demo: Any, recording_first: bool) -> None:
    """A line of her number from half an hour before a NEW_SIM gave it to her: nobody's then (no member named), but
    her erasure counts a payment of no member her number made since an hour before she got it as hers (it may be
    hers: core.members.NUMBER_MARGIN), and scrubs it. The recording took no row: with the erasure at once, her
    erasure scrubbed her payments before the recording's was there (recording first), or the recording kept her
    number on it once she was erased (erasure first)."""
    jeanne = await admin.json("POST", "/v1/members", 201, json={"name": NAME, "phone": "+250788777222"})
    await admin.json("PATCH", f"/v1/members/{jeanne['id']}", 200, json={"phone": PHONE, "phoneChange": "NEW_SIM"})
    paid = await make_payment(rt, demo["cooperative_id"], account=PHONE, member_id=jeanne["id"])
    await admin.json("DELETE", f"/v1/members/{jeanne['id']}", 200)
    said = await _as_she_is_erased(rt, demo, jeanne["id"], paid, utcnow() - timedelta(minutes=30), recording_first)
    await _no_number_on(rt, said)
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, said)).member_id is None
