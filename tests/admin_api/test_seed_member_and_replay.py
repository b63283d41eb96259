"""Seed 001's POST /payments, as its integrators send it: no memberId, and a replay answered as the first request.

A payment an admin or API key makes from a member's own registered number is that member's (as a USSD payment is
the dialling member's): she sees it, it is in her transactions and USSD "my payments", she can dispute it, and
the reminder scan knows she paid. Only an ACTIVE member's number counts, only for a wallet (a bank account is no
member's). A replayed key answers 201, as the first answer did, marked Idempotent-Replayed (refunds too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, Member, OutboxJob, Payment, PaymentType
from core.payments import recent_payments_of_holder
from core.phone import normalize
from core.reminders import scan
from tests.admin_api.conftest import Caller, complete_payment, idem

ALINE = "+250788000001"


def seed_body(payment_type_id: str, **over: Any) -> dict[str, Any]:
    """POST /payments with exactly seed 001's fields (it has no memberId)."""
    body = {"paymentTypeId": payment_type_id, "amount": 50000, "paymentMethod": "MOBILE_MONEY_MTN",
            "paymentAccount": ALINE, "description": "Monthly rent payment", "idempotencyKey": idem()}
    body.update(over)
    return body


async def _stored_member(rt: Any, payment_id: str) -> str | None:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(Payment.member_id).where(Payment.id == payment_id))).scalar_one()


async def _set_status(rt: Any, member_id: str, status: str) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Member).where(Member.id == member_id).values(status=status))


async def _reminded(rt: Any, member_id: str, at: datetime) -> bool:
    async with rt.sessionmaker.begin() as s:
        await scan(s, rt, now=at)
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "sms.send"))).scalars().all()
    return any(j.payload.get("template") == "payment_reminder" and j.payload.get("member_id") == member_id
               for j in jobs)


def _next_first(now: datetime) -> datetime:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


async def test_a_seed_shaped_payment_from_a_members_number_is_hers(rt: Any, demo: dict[str, Any], admin: Any,
                                                                   tenant: Any) -> None:
    aline = demo["members"][ALINE]
    due = _next_first(datetime.now(UTC))
    payment = await admin.json("POST", "/v1/payments", 201, json=seed_body(
        demo["payment_types"]["Monthly Rent"], dueDate=due.strftime("%Y-%m-%dT00:00:00Z")))
    assert payment["memberId"] == aline
    assert await _stored_member(rt, payment["id"]) == aline
    await complete_payment(rt, payment["id"])
    # Hers everywhere: her own view, her transactions, USSD "my payments", a dispute she opens.
    mine = await tenant.json("GET", "/v1/payments", 200)
    assert [p["id"] for p in mine["data"]] == [payment["id"]]
    transactions = await admin.json("GET", f"/v1/members/{aline}/transactions", 200)
    assert [p["id"] for p in transactions["data"]] == [payment["id"]]
    async with rt.sessionmaker() as s:
        mine_by_ussd = await recent_payments_of_holder(s, aline, rt.cipher.blind_index(ALINE))
    assert mine_by_ussd is not None and [p.id for p in mine_by_ussd] == [payment["id"]]
    await tenant.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT"})
    # The month is paid: no "please pay your rent" three days before it is due.
    assert not await _reminded(rt, aline, due - timedelta(days=3) + timedelta(hours=6))


async def test_an_api_key_and_a_number_without_its_country_code_find_her_too(
        rt: Any, demo: dict[str, Any], admin: Any, client: Any) -> None:
    key = await admin.json("POST", "/v1/api-keys", 201, json={"name": "ERP", "scopes": ["payments:write"]})
    erp = Caller(client, {"X-API-Key": key["key"]})
    rent = demo["payment_types"]["Monthly Rent"]
    for account in (ALINE, "0788 000 001", "250788000001"):
        paid = await erp.json("POST", "/v1/payments", 201, json=seed_body(rent, paymentAccount=account))
        assert paid["memberId"] == demo["members"][ALINE], account
    claudine = await erp.json("POST", "/v1/payments", 201, json=seed_body(
        demo["payment_types"]["Water"], amount=5000, paymentMethod="MOBILE_MONEY_AIRTEL",
        paymentAccount="0733000001"))
    assert claudine["memberId"] == demo["members"]["+250733000001"]


async def test_no_member_for_a_stranger_an_inactive_member_or_a_bank_account(
        rt: Any, demo: dict[str, Any], admin: Any) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    stranger = await admin.json("POST", "/v1/payments", 201, json=seed_body(rent, paymentAccount="+250788555001"))
    assert stranger["memberId"] is None and await _stored_member(rt, stranger["id"]) is None
    bosco = demo["members"]["+250788000002"]
    for status in ("SUSPENDED", "PENDING"):
        await _set_status(rt, bosco, status)
        paid = await admin.json("POST", "/v1/payments", 201, json=seed_body(rent, paymentAccount="+250788000002"))
        assert paid["memberId"] is None, status
    bank = await admin.json("POST", "/v1/payments", 201, json=seed_body(
        rent, paymentMethod="BANK_BK", paymentAccount="aline@example.rw"))
    assert bank["memberId"] is None


async def test_a_named_member_or_a_tenant_keeps_the_member_asked_for(rt: Any, demo: dict[str, Any], admin: Any,
                                                                     tenant: Any) -> None:
    """Paying for someone else from one's own number: the member named is the payer, not the number's. A tenant
    pays from her own number only (from another, she put a PIN prompt on his phone and read his wallet's answer),
    refused alike whether the number is a member's or no one's; in the local form too."""
    rent = demo["payment_types"]["Monthly Rent"]
    bosco, aline = demo["members"]["+250788000002"], demo["members"][ALINE]
    for_bosco = await admin.json("POST", "/v1/payments", 201, json=seed_body(rent, memberId=bosco))
    assert for_bosco["memberId"] == bosco
    answers = []
    for other in ("+250788000002", "0788000002", "+250788999999"):
        refused = await tenant.json("POST", "/v1/payments", 400, json=seed_body(rent, paymentAccount=other))
        answers.append(refused["message"])
    assert answers[0] == answers[1] == answers[2] == [
        "paymentAccount must be your own registered number: a member pays from her own number (your cooperative's "
        "office can make a payment from another)"], answers
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count(Payment.id)))).scalar_one() == 1  # Bosco's, by the admin
    by_tenant = await tenant.json("POST", "/v1/payments", 201, json=seed_body(rent, paymentAccount="0788000001"))
    assert by_tenant["memberId"] == aline


async def test_another_countrys_cooperative_reads_a_local_number_in_its_own_country(
        rt: Any, demo: dict[str, Any], superadmin: Any) -> None:
    """0712... is a Kenyan number in a Kenyan cooperative: found by the second look the guess (read as Rwanda's,
    the default region) leaves to create_payment."""
    async with rt.sessionmaker.begin() as s:
        coop = Cooperative(name="Nairobi Sacco", short_code="NRBSACCO", country="KE", currency="KES",
                           timezone="Africa/Nairobi", status="ACTIVE")
        s.add(coop)
        await s.flush()
        ptype = PaymentType(cooperative_id=coop.id, name="Levy", amount_minor=150000, currency="KES", is_active=True)
        s.add(ptype)
        member = await create_member(s, rt.cipher, cooperative_id=coop.id, name="Wanjiru",
                                     phone=normalize("+254712345678"), actor=Actor("system", "system"))
        await s.flush()
        ids = (coop.id, ptype.id, member.id)
    paid = await superadmin.json("POST", "/v1/payments", 201, json=seed_body(
        ids[1], amount=1500, paymentMethod="MPESA", paymentAccount="0712 345 678", cooperativeId=ids[0]))
    assert paid["memberId"] == ids[2]


async def test_a_replay_answers_201_with_the_same_payment(rt: Any, demo: dict[str, Any], admin: Any) -> None:
    """Seed 001: 201, and the same key returns the existing payment. Still so after the number's member is
    suspended (the request's digest is of the body as sent, not of the member it found)."""
    body = seed_body(demo["payment_types"]["Monthly Rent"])
    first = await admin.req("POST", "/v1/payments", json=body)
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    created = await first.json()
    await _set_status(rt, demo["members"][ALINE], "SUSPENDED")
    again = await admin.req("POST", "/v1/payments", json=body)
    replay = await again.json()
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert replay["id"] == created["id"] and replay["memberId"] == demo["members"][ALINE]
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(Payment.id))).all()) == 1


async def test_a_replayed_refund_answers_201_marked_replayed(rt: Any, demo: dict[str, Any], admin: Any) -> None:
    payment = await admin.json("POST", "/v1/payments", 201, json=seed_body(demo["payment_types"]["Monthly Rent"]))
    await complete_payment(rt, payment["id"])
    url, body = f"/v1/payments/{payment['id']}/refunds", {"amount": 1000, "reason": "overpaid",
                                                          "idempotencyKey": idem()}
    first = await admin.req("POST", url, json=body)
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    again = await admin.req("POST", url, json=body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == (await first.json())["id"]
    assert len((await admin.json("GET", url, 200))["data"]) == 1


async def test_a_tenants_replay_answers_her_payment_after_her_number_changed(
        rt: Any, demo: dict[str, Any], admin: Any, tenant: Any) -> None:
    """Her integration retries a payment after a lost answer: the same key and body answer 201 with her payment (seed
    001's replay), also once her number was corrected since (NEW_SIM), when the body's number is no longer her own.
    Before, the own-number check came first and the retry was a 400 "must be your own registered number", though
    the payment is hers and went out from her own number then. A new payment from the old number is refused."""
    rent, aline = demo["payment_types"]["Monthly Rent"], demo["members"][ALINE]
    body = seed_body(rent, paymentAccount=ALINE)
    first = await tenant.json("POST", "/v1/payments", 201, json=body)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": "+250788000777"})
    resp = await tenant.req("POST", "/v1/payments", json=body)
    again = await resp.json()
    assert resp.status == 201, again
    assert again["id"] == first["id"] and resp.headers.get("Idempotent-Replayed") == "true"
    await tenant.json("POST", "/v1/payments", 400, json=seed_body(rent, paymentAccount=ALINE))
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count(Payment.id)))).scalar_one() == 1
