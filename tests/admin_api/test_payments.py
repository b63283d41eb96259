"""Payments over HTTP: creation, validation, idempotency (replay, conflict, races), listing, scoping."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from core.models import OutboxJob, Payment
from tests.admin_api.conftest import idem, make_payment, payment_body, redis_unreachable


async def test_create_payment_returns_the_seed_fields(admin, rt, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    body = await admin.json(
        "POST", "/v1/payments", 201, json=payment_body(rent, dueDate="2025-11-01T00:00:00Z")
    )
    for field in (
        "id",
        "amount",
        "currency",
        "status",
        "paymentMethod",
        "paymentAccount",
        "reference",
        "gatewayTransactionId",
        "gatewayReference",
        "paymentUrl",
        "description",
        "dueDate",
        "createdAt",
        "updatedAt",
    ):
        assert field in body
    assert body["amount"] == 50000 and body["currency"] == "RWF" and body["status"] == "PENDING"
    assert body["paymentAccount"] == "+25078****001"  # masked, never the full number
    assert body["dueDate"] == "2025-11-01T00:00:00Z"
    assert body["reference"].startswith("PAY_")
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, body["id"])
        jobs = (
            (
                await s.execute(
                    select(OutboxJob.kind).where(OutboxJob.payload["payment_id"].as_string() == body["id"])
                )
            )
            .scalars()
            .all()
        )
    assert row.amount_minor == 50000 and row.channel == "api" and row.created_by.startswith("admin:")
    assert sorted(jobs) == ["payment.collect", "payment.poll"]


async def test_validation_lists_every_bad_field_and_refuses_unknown_ones(admin, demo):
    body = await admin.json(
        "POST",
        "/v1/payments",
        400,
        json={
            "paymentTypeId": 5,
            "amount": "lots",
            "paymentMethod": "CASH",
            "idempotencyKey": "short",
            "extra": 1,
        },
    )
    msgs = body["message"]
    assert isinstance(msgs, list)
    assert "paymentTypeId must be a string" in msgs
    assert (
        "paymentMethod must be one of: MOBILE_MONEY_MTN, MOBILE_MONEY_AIRTEL, MPESA, BANK_BK, BANK_IM, "
        "BANK_ECOBANK" in msgs
    )
    assert "paymentAccount is required" in msgs
    assert "idempotencyKey must be at least 8 characters" in msgs
    assert "property extra should not exist" in msgs
    assert body["error"] == "Bad Request" and body["path"] == "/v1/payments"


async def test_business_validation_from_the_core(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    wrong_amount = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, amount=49999))
    assert "does not accept another amount" in wrong_amount["message"][0]
    fraction = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, amount="50000.5"))
    assert "decimal places" in fraction["message"][0]
    bad_phone = await admin.json("POST", "/v1/payments", 400, json=payment_body(rent, paymentAccount="12345"))
    assert bad_phone["statusCode"] == 400
    await admin.json("POST", "/v1/payments", 404, json=payment_body("00000000-0000-0000-0000-000000000000"))
    bad_json = await admin.req(
        "POST", "/v1/payments", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status == 400 and (await bad_json.json())["message"] == ["body is not valid JSON"]


async def test_same_key_same_body_replays_different_body_conflicts(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    first_body = payment_body(rent)
    first = await admin.json("POST", "/v1/payments", 201, json=first_body)
    resp = await admin.req("POST", "/v1/payments", json=first_body)
    replay = await resp.json()
    assert resp.status == 201 and resp.headers["Idempotent-Replayed"] == "true"  # as the first (seed 001)
    assert replay["id"] == first["id"]
    conflict = await admin.json(
        "POST", "/v1/payments", 409, json={**first_body, "paymentAccount": "+250788000003"}
    )
    assert conflict["error"] == "Conflict"
    assert conflict["message"].startswith("Payment with this idempotency key already exists")


async def test_a_retry_after_the_price_changed_still_finds_its_payment(admin, demo):
    """The integrator's retry of an accepted request (its answer was lost) after the admin changed the type's
    price: the same payment, not a 400 about today's price (nor a 409) that would lead to a second key."""
    rent = demo["payment_types"]["Monthly Rent"]
    body = payment_body(rent)  # no amount: the type's price, 50,000 RWF, then
    first = await admin.json("POST", "/v1/payments", 201, json=body)
    await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={"amount": 55000})
    for retry in (body, {**body, "amount": 50000}):
        resp = await admin.req("POST", "/v1/payments", json=retry)
        replay = await resp.json()
        assert resp.status == 201 and resp.headers["Idempotent-Replayed"] == "true", replay
        assert replay["id"] == first["id"] and replay["amount"] == 50000
    # A new request at the old price is refused with today's price; another body on the key is a conflict.
    fresh = await admin.json("POST", "/v1/payments", 400, json={**body, "idempotencyKey": idem(), "amount": 50000})
    assert fresh["message"] == ["Monthly Rent costs 55,000 RWF; this payment type does not accept another amount"]
    await admin.json("POST", "/v1/payments", 409, json={**body, "amount": 55000})
    await admin.json("PATCH", f"/v1/payment-types/{rent}", 200, json={"isActive": False})
    assert (await admin.json("POST", "/v1/payments", 201, json=body))["id"] == first["id"]


async def test_concurrent_duplicates_create_one_payment(admin, rt, demo):
    body = payment_body(demo["payment_types"]["Monthly Rent"])
    responses = await asyncio.gather(*(admin.req("POST", "/v1/payments", json=body) for _ in range(6)))
    statuses = sorted(r.status for r in responses)
    ids = {(await r.json())["id"] for r in responses}
    # Every answer is 201 (a replay answers as the first did); only the five replays are marked so.
    assert statuses == [201] * 6
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 5
    assert len(ids) == 1
    async with rt.sessionmaker() as s:
        count = (await s.execute(select(func.count()).select_from(Payment))).scalar_one()
        jobs = (
            await s.execute(
                select(func.count()).select_from(OutboxJob).where(OutboxJob.kind == "payment.collect")
            )
        ).scalar_one()
    assert count == 1 and jobs == 1


async def test_list_filters_and_meta(admin, demo):
    rent, water = demo["payment_types"]["Monthly Rent"], demo["payment_types"]["Water"]
    for _ in range(3):
        await make_payment(admin, rent)
    airtel = await make_payment(
        admin, water, amount=5000, paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001"
    )
    page = await admin.json("GET", "/v1/payments?page=1&limit=2", 200)
    assert page["meta"] == {
        "page": 1,
        "limit": 2,
        "total": 4,
        "totalPages": 2,
        "hasNext": True,
        "hasPrevious": False,
    }
    last = await admin.json("GET", "/v1/payments?page=2&limit=2", 200)
    assert last["meta"]["hasNext"] is False and last["meta"]["hasPrevious"] is True
    assert not {p["id"] for p in page["data"]} & {p["id"] for p in last["data"]}
    by_method = await admin.json("GET", "/v1/payments?paymentMethod=MOBILE_MONEY_AIRTEL", 200)
    assert [p["id"] for p in by_method["data"]] == [airtel["id"]]
    by_type = await admin.json("GET", f"/v1/payments?paymentTypeId={water}", 200)
    assert by_type["meta"]["total"] == 1
    assert (await admin.json("GET", "/v1/payments?status=COMPLETED", 200))["meta"]["total"] == 0
    assert (await admin.json("GET", "/v1/payments?status=PENDING", 200))["meta"]["total"] == 4
    future = await admin.json("GET", "/v1/payments?from=2999-01-01T00:00:00Z", 200)
    assert future["meta"]["total"] == 0
    past = await admin.json("GET", "/v1/payments?to=2000-01-01T00:00:00Z", 200)
    assert past["meta"]["total"] == 0


async def test_list_query_validation(admin):
    body = await admin.json(
        "GET", "/v1/payments?limit=101&page=0&status=WHATEVER&from=yesterday&bogus=1", 400
    )
    assert "limit must not be greater than 100" in body["message"]
    assert "page must not be less than 1" in body["message"]
    assert (
        "status must be one of: PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED, TIMEOUT, "
        "PARTIALLY_REFUNDED, REFUNDED, VOIDED" in body["message"]
    )
    assert "from must be a date (YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm:ssZ)" in body["message"]
    assert "query parameter bogus is not allowed" in body["message"]


async def test_get_and_status(admin, demo):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    got = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert got == payment
    status = await admin.json("GET", f"/v1/payments/{payment['id']}/status", 200)
    assert status["status"] == "PENDING" and status["reference"] == payment["reference"]
    await admin.json("GET", "/v1/payments/not-a-uuid", 404)
    await admin.json("GET", "/v1/payments/00000000-0000-0000-0000-000000000000/status", 404)


async def test_tenant_pays_as_themselves_and_sees_only_their_payments(admin, tenant, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    aline = demo["members"]["+250788000001"]
    bosco = demo["members"]["+250788000002"]
    own = await make_payment(tenant, rent)
    assert own["memberId"] == aline
    other = await make_payment(admin, rent, memberId=bosco, paymentAccount="+250788000002")
    # A number no member has (from Aline's own, an admin's payment is hers: test_seed_member_and_replay).
    unowned = await make_payment(admin, rent, paymentAccount="+250788555001")
    listed = await tenant.json("GET", "/v1/payments", 200)
    assert [p["id"] for p in listed["data"]] == [own["id"]]
    for pid in (other["id"], unowned["id"]):
        await tenant.json("GET", f"/v1/payments/{pid}", 404)
        await tenant.json("GET", f"/v1/payments/{pid}/status", 404)
    await tenant.json("POST", "/v1/payments", 404, json=payment_body(rent, memberId=bosco))
    await tenant.json("GET", f"/v1/members/{bosco}/transactions", 404)
    mine = await tenant.json("GET", f"/v1/members/{aline}/transactions", 200)
    assert [p["id"] for p in mine["data"]] == [own["id"]]


async def test_member_transactions_for_admin(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    bosco = demo["members"]["+250788000002"]
    paid = await make_payment(admin, rent, memberId=bosco, paymentAccount="+250788000002")
    await make_payment(admin, rent)
    page = await admin.json("GET", f"/v1/members/{bosco}/transactions", 200)
    assert [p["id"] for p in page["data"]] == [paid["id"]] and page["meta"]["total"] == 1
    await admin.json("GET", "/v1/members/00000000-0000-0000-0000-000000000000/transactions", 404)


async def test_cross_cooperative_payments_are_not_found(admin, coop_b, demo):
    mine = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    b = coop_b["admin"]
    for path in (
        f"/v1/payments/{mine['id']}",
        f"/v1/payments/{mine['id']}/status",
        f"/v1/members/{demo['members']['+250788000001']}/transactions",
    ):
        await b.json("GET", path, 404)
    assert (await b.json("GET", "/v1/payments", 200))["meta"]["total"] == 0
    # B cannot pay into A's payment type, charge A's member, or name A's cooperative.
    await b.json("POST", "/v1/payments", 404, json=payment_body(demo["payment_types"]["Monthly Rent"]))
    await b.json(
        "POST",
        "/v1/payments",
        404,
        json=payment_body(coop_b["payment_type_id"], amount=1000, memberId=demo["members"]["+250788000001"]),
    )
    await b.json(
        "POST",
        "/v1/payments",
        404,
        json=payment_body(coop_b["payment_type_id"], amount=1000, cooperativeId=demo["cooperative_id"]),
    )
    assert (await b.json("GET", f"/v1/payments?member={demo['members']['+250788000001']}", 200))["meta"][
        "total"
    ] == 0


async def test_super_admin_sees_all_and_names_the_cooperative_to_pay_into(superadmin, admin, coop_b, demo):
    await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await make_payment(coop_b["admin"], coop_b["payment_type_id"], amount=1000)
    assert (await superadmin.json("GET", "/v1/payments", 200))["meta"]["total"] == 2
    only_b = await superadmin.json("GET", f"/v1/payments?cooperativeId={coop_b['cooperative_id']}", 200)
    assert only_b["meta"]["total"] == 1
    missing = await superadmin.json("POST", "/v1/payments", 400, json=payment_body(coop_b["payment_type_id"]))
    assert missing["message"] == ["cooperativeId is required for a super admin"]
    await superadmin.json(
        "POST",
        "/v1/payments",
        201,
        json=payment_body(
            coop_b["payment_type_id"],
            amount=1000,
            cooperativeId=coop_b["cooperative_id"],
            idempotencyKey=idem(),
        ),
    )


@pytest.mark.usefixtures("limiter_clock")
async def test_rate_limit_on_payment_creation(admin, demo):
    rent = demo["payment_types"]["Monthly Rent"]
    last = None
    for i in range(10):
        resp = await admin.req("POST", "/v1/payments", json=payment_body(rent))
        assert resp.status == 201, await resp.text()
        assert resp.headers["X-RateLimit-Limit"] == "10"
        assert resp.headers["X-RateLimit-Remaining"] == str(9 - i)
        last = resp
    assert last is not None
    resp = await admin.req("POST", "/v1/payments", json=payment_body(rent))
    body = await resp.json()
    assert resp.status == 429 and body["statusCode"] == 429 and body["error"] == "Too Many Requests"
    assert body["code"] == "RATE_LIMITED"
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert int(resp.headers["X-RateLimit-Reset"]) >= int(last.headers["X-RateLimit-Reset"])
    assert int(resp.headers["Retry-After"]) >= 1
    # Another bucket (reads) and another user are not affected.
    assert (await admin.req("GET", "/v1/payments")).status == 200


async def test_api_answers_without_a_rate_limit_when_redis_is_down(admin, rt, demo):
    """Redis is for limits and sessions; the database holds the payments: a Redis outage is not a 500. Both of
    the runtime's clients down: the limit goes on the multiplexed one (rt.hot_redis)."""
    async with redis_unreachable(rt):
        resp = await admin.req("GET", "/v1/payments")
        assert resp.status == 200, await resp.text()
        assert "X-RateLimit-Limit" not in resp.headers
    again = await admin.req("GET", "/v1/payments")
    assert again.status == 200 and "X-RateLimit-Limit" in again.headers


async def test_a_method_that_cannot_collect_the_currency_is_refused_when_asked(admin, rt, demo):
    """M-Pesa (KES only) for a Rwandan cooperative's RWF payment is a 400 at once, not a 201 that the worker fails
    later (with a "payment failed" SMS to the payer); named by the wallets a Rwandan cooperative's members pay with,
    which M-Pesa is none of whatever the currency (a provider's currency refusal: test_payments_countries)."""
    body = payment_body(demo["payment_types"]["Monthly Rent"], paymentMethod="MPESA", paymentAccount="+254708000001")
    refused = await admin.json("POST", "/v1/payments", 400, json=body)
    assert refused["message"] == ["paymentMethod MPESA is not one a RW cooperative's members pay with: "
                                  "MOBILE_MONEY_MTN (MTN MoMo), MOBILE_MONEY_AIRTEL (Airtel Money), or a bank method"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Payment))).scalar_one() == 0
