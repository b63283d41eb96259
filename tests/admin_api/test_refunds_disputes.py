"""Refunds and disputes through HTTP: limits, idempotency, transitions with notes and refunds, scoping."""

from __future__ import annotations

from sqlalchemy import func, select

from core.models import OutboxJob, Refund
from tests.admin_api.conftest import complete_payment, idem, make_payment


async def _paid(admin, rt, demo, **over):
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], **over)
    await complete_payment(rt, payment["id"])
    return payment


async def test_partial_then_rest_then_over_the_limit(admin, rt, demo):
    payment = await _paid(admin, rt, demo)
    part = await admin.json(
        "POST",
        f"/v1/payments/{payment['id']}/refunds",
        201,
        json={"amount": 20000, "reason": "overcharged", "idempotencyKey": idem()},
    )
    assert part["amount"] == 20000 and part["status"] == "PENDING" and part["paymentId"] == payment["id"]
    over = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"amount": 30001, "idempotencyKey": idem()}
    )
    assert over["error"] == "Unprocessable Entity" and "exceeds the refundable" in over["message"]
    rest = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"idempotencyKey": idem()}
    )
    assert rest["amount"] == 30000  # amount omitted = everything still refundable
    nothing = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()}
    )
    assert nothing["message"] == (
        f"nothing is left to refund; refunds not settled yet hold 50,000 RWF ({part['reference']}, "
        f"{rest['reference']}): withdraw one not yet sent with POST /v1/refunds/{{id}}/cancel")
    listed = await admin.json("GET", f"/v1/payments/{payment['id']}/refunds", 200)
    assert listed["meta"]["total"] == 2
    assert (await admin.json("GET", "/v1/refunds?status=PENDING", 200))["meta"]["total"] == 2
    got = await admin.json("GET", f"/v1/refunds/{part['id']}", 200)
    assert got["reason"] == "overcharged"
    async with rt.sessionmaker() as s:
        jobs = (
            (await s.execute(select(OutboxJob.kind).where(OutboxJob.kind == "refund.submit"))).scalars().all()
        )
    assert len(jobs) == 2


async def test_refund_idempotency_and_pending_payment(admin, rt, demo):
    payment = await _paid(admin, rt, demo)
    key = idem()
    first = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"amount": 1000, "idempotencyKey": key}
    )
    replay = await admin.json(  # answered as the first was (seed 001: 201), marked replayed
        "POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"amount": 1000, "idempotencyKey": key}
    )
    assert replay["id"] == first["id"]
    conflict = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 409, json={"amount": 2000, "idempotencyKey": key}
    )
    assert conflict["message"] == "Refund with this idempotency key already exists with a different request"
    # "Everything" (no amount) or another reason under the same key is another request too, not a retry: a
    # client must not read the first (1,000) refund as the full refund it asked for.
    for other in ({"idempotencyKey": key}, {"amount": 1000, "reason": "full refund", "idempotencyKey": key}):
        await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 409, json=other)
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(func.count()).select_from(Refund))).scalar_one() == 1
    pending = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    refused = await admin.json(
        "POST", f"/v1/payments/{pending['id']}/refunds", 422, json={"idempotencyKey": idem()}
    )
    assert "only collected payments can be refunded" in refused["message"]
    bad = await admin.json(
        "POST",
        f"/v1/payments/{payment['id']}/refunds",
        400,
        json={"amount": "1.5", "idempotencyKey": "x", "note": "n"},
    )
    assert "idempotencyKey must be at least 8 characters" in bad["message"]
    assert "property note should not exist" in bad["message"]
    async with rt.sessionmaker() as s:
        assert len((await s.execute(select(Refund))).scalars().all()) == 1


async def test_cross_cooperative_refunds_are_not_found(admin, rt, coop_b, demo, tenant):
    payment = await _paid(admin, rt, demo)
    refund = await admin.json(
        "POST", f"/v1/payments/{payment['id']}/refunds", 201, json={"amount": 100, "idempotencyKey": idem()}
    )
    b = coop_b["admin"]
    await b.json("POST", f"/v1/payments/{payment['id']}/refunds", 404, json={"idempotencyKey": idem()})
    await b.json("GET", f"/v1/payments/{payment['id']}/refunds", 404)
    await b.json("GET", f"/v1/refunds/{refund['id']}", 404)
    assert (await b.json("GET", "/v1/refunds", 200))["meta"]["total"] == 0
    await tenant.json("POST", f"/v1/payments/{payment['id']}/refunds", 403, json={"idempotencyKey": idem()})


async def test_dispute_lifecycle_with_refund_on_resolution(admin, tenant, rt, demo):
    payment = await make_payment(tenant, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    opened = await tenant.json(
        "POST",
        "/v1/disputes",
        201,
        json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT", "note": "paid twice"},
    )
    assert opened["status"] == "OPEN" and opened["memberId"] == demo["members"]["+250788000001"]
    await tenant.json("POST", "/v1/disputes", 409, json={"paymentId": payment["id"], "reason": "OTHER"})
    assert (await tenant.json("GET", "/v1/disputes", 200))["meta"]["total"] == 1
    await tenant.json("POST", f"/v1/disputes/{opened['id']}/transitions", 403, json={"status": "WITHDRAWN"})

    review = await admin.json(
        "POST",
        f"/v1/disputes/{opened['id']}/transitions",
        200,
        json={"status": "UNDER_REVIEW", "note": "checking MTN statement", "evidence": "statement line 42"},
    )
    assert review["status"] == "UNDER_REVIEW" and review["notes"][-1]["evidence"] == "statement line 42"
    # More evidence while it stays under review: added to its notes, no status change, no SMS to the member.
    more = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                            json={"status": "UNDER_REVIEW", "note": "MTN ticket 8812 opened"})
    assert more["status"] == "UNDER_REVIEW" and [n["text"] for n in more["notes"]][-2:] == [
        "checking MTN statement", "MTN ticket 8812 opened"]
    empty = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 422,
                             json={"status": "UNDER_REVIEW"})
    assert empty["message"].startswith("the dispute is already UNDER_REVIEW: send a note or evidence")
    assert empty["code"] == "INVALID_STATE"
    early_refund = await admin.json(
        "POST",
        f"/v1/disputes/{opened['id']}/transitions",
        422,
        json={"status": "REJECTED", "refundAmount": 100},
    )
    assert "refund can only come with a resolution" in early_refund["message"]
    assert early_refund["code"] == "BUSINESS_RULE_VIOLATED"
    resolved = await admin.json(
        "POST",
        f"/v1/disputes/{opened['id']}/transitions",
        200,
        json={"status": "RESOLVED", "note": "refunding", "refundAmount": 10000},
    )
    assert resolved["status"] == "RESOLVED" and resolved["refundId"] and resolved["resolvedAt"]
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert refund["amount"] == 10000 and refund["disputeId"] == opened["id"]
    illegal = await admin.json(
        "POST", f"/v1/disputes/{opened['id']}/transitions", 409, json={"status": "OPEN"}
    )
    assert illegal["code"] == "INVALID_STATE"
    assert illegal["message"].startswith(f"dispute {opened['reference']} was resolved in the payer's favour already")
    async with rt.sessionmaker() as s:
        sms = (await s.execute(select(OutboxJob.payload).where(OutboxJob.kind == "sms.send"))).scalars().all()
    templates = sorted(p["template"] for p in sms)
    assert templates.count("dispute_opened") == 1 and templates.count("dispute_updated") == 1
    assert templates.count("dispute_resolved") == 1


async def test_dispute_validation_and_scoping(admin, tenant, coop_b, rt, demo):
    # Paid from a number no member has (from Aline's own, an admin's payment would be hers, the tenant's).
    other = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount="+250788555001")
    bad = await admin.json("POST", "/v1/disputes", 400, json={"paymentId": other["id"], "reason": "BORED"})
    assert any(m.startswith("reason must be one of") for m in bad["message"])
    await admin.json("POST", "/v1/disputes", 404, json={"paymentId": "nope", "reason": "OTHER"})
    # A tenant cannot dispute someone else's payment.
    await tenant.json("POST", "/v1/disputes", 404, json={"paymentId": other["id"], "reason": "OTHER"})
    dispute = await admin.json(
        "POST", "/v1/disputes", 201, json={"paymentId": other["id"], "reason": "OTHER"}
    )
    await tenant.json("GET", f"/v1/disputes/{dispute['id']}", 404)
    b = coop_b["admin"]
    await b.json("POST", "/v1/disputes", 404, json={"paymentId": other["id"], "reason": "OTHER"})
    await b.json("GET", f"/v1/disputes/{dispute['id']}", 404)
    await b.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 404, json={"status": "REJECTED"})
    assert (await b.json("GET", "/v1/disputes", 200))["meta"]["total"] == 0
    by_payment = await admin.json("GET", f"/v1/disputes?paymentId={other['id']}&status=OPEN", 200)
    assert [d["id"] for d in by_payment["data"]] == [dispute["id"]]


async def test_a_refunds_outcome_queues_the_members_sms_and_the_webhook_event(tenant, rt, demo):
    """The refund's end tells the member (SMS) and the cooperative's system (webhook event), once each."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome, refund_data, request_refund

    payment = await make_payment(tenant, demo["payment_types"]["Monthly Rent"])  # the member's own payment
    await complete_payment(rt, payment["id"])
    async with rt.sessionmaker.begin() as s:
        done, _ = await request_refund(s, rt, payment_id=payment["id"], cooperative_id=None, amount=None,
                                       reason="moved out", idempotency_key=idem(), actor=Actor("admin:test", "api"))
    provider = Actor("provider:mtn_momo", "provider")
    for outcome in (ProviderOutcome.SUCCEEDED, ProviderOutcome.SUCCEEDED):  # the second changes nothing
        async with rt.sessionmaker.begin() as s:
            refund = await s.get(Refund, done.id)
            await apply_refund_outcome(s, rt, refund, outcome, actor=provider, provider_transaction_id="RF-1")
    async with rt.sessionmaker() as s:
        stored = await s.get(Refund, done.id)
        jobs = (await s.execute(select(OutboxJob.kind, OutboxJob.dedupe_key, OutboxJob.payload)
                                .where(OutboxJob.kind.in_(("sms.send", "webhook.event")),
                                       OutboxJob.dedupe_key.like(f"%{done.id}%")))).all()
    assert stored.status == "COMPLETED"
    by_kind = {kind: (key, body) for kind, key, body in jobs}
    assert len(jobs) == 2, jobs
    assert by_kind["sms.send"][0] == f"sms:refund_completed:{done.id}"
    assert by_kind["sms.send"][1]["member_id"] == demo["members"]["+250788000001"]
    assert by_kind["webhook.event"][0] == f"wh:evt_refund_completed_{done.id}"
    assert by_kind["webhook.event"][1]["data"] == refund_data(stored)


async def _parked(rt, refund_id):
    """The refund as the worker leaves one the provider never settled: PROCESSING, its poll parked."""
    from sqlalchemy import update

    from core.db import utcnow

    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Refund).where(Refund.id == refund_id).values(status="PROCESSING"))
        await s.execute(update(OutboxJob).where(OutboxJob.dedupe_key == f"refund:{refund_id}")
                        .values(status="DONE", done_at=utcnow()))
        s.add(OutboxJob(kind="refund.poll", payload={"refund_id": refund_id}, dedupe_key=f"refund-poll:{refund_id}",
                        status="PARKED", last_error="refund needs manual review: airtel has no refund status"))


async def test_an_admin_records_the_outcome_of_a_refund_the_provider_never_settled(admin, rt, demo):
    from core.models import AuditEvent, Payment

    payment = await _paid(admin, rt, demo)  # 50,000 RWF
    first = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                             json={"amount": 20000, "idempotencyKey": idem()})
    await _parked(rt, first["id"])
    # Until its outcome is known the refund holds its amount: only 30,000 left.
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                     json={"amount": 30001, "idempotencyKey": idem()})
    url = f"/v1/refunds/{first['id']}/outcome"
    await admin.json("POST", url, 400, json={"status": "COMPLETED"})  # the note is required
    await admin.json("POST", url, 400, json={"status": "PENDING", "note": "asked MTN"})
    done = await admin.json("POST", url, 200, json={"status": "COMPLETED", "providerTransactionId": "AIR-RF-778",
                                                   "note": "Airtel support confirmed, ticket 4521"})
    assert done["status"] == "COMPLETED" and done["completedAt"] is not None
    async with rt.sessionmaker() as s:
        stored = await s.get(Refund, first["id"])
        paid = await s.get(Payment, payment["id"])
        audit = (await s.execute(select(AuditEvent).where(AuditEvent.entity_id == first["id"],
                                                          AuditEvent.action == "refund.outcome_recorded"))).scalar_one()
        poll = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == f"refund-poll:{first['id']}"))
                ).scalar_one()
        notices = (await s.execute(select(OutboxJob.kind).where(OutboxJob.dedupe_key.like(f"%{first['id']}%"),
                                                                OutboxJob.kind.in_(("sms.send", "webhook.event")))
                                   )).scalars().all()
    assert stored.provider_transaction_id == "AIR-RF-778"
    assert (paid.status, paid.refunded_minor) == ("PARTIALLY_REFUNDED", 20000)
    assert audit.after["note"] == "Airtel support confirmed, ticket 4521" and audit.before == {"status": "PROCESSING"}
    assert (poll.status, poll.last_error) == ("DONE", "settled: refund outcome recorded (COMPLETED)")
    assert sorted(notices) == ["sms.send", "webhook.event"]  # the payer's SMS and the cooperative's webhook
    again = await admin.json("POST", url, 409, json={"status": "FAILED", "note": "changed my mind"})
    assert again["message"] == "refund is already COMPLETED"

    # A failed one frees its amount again.
    second = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 30000, "idempotencyKey": idem()})
    # Not yet sent (its submission still queued): the provider may be about to take it.
    refused = await admin.json("POST", f"/v1/refunds/{second['id']}/outcome", 409,
                               json={"status": "FAILED", "note": "never mind"})
    assert refused["message"] == ("refund has not been sent to the provider yet: wait for its submission; or "
                                  "withdraw it with POST /v1/refunds/{id}/cancel")
    await _parked(rt, second["id"])
    failed = await admin.json("POST", f"/v1/refunds/{second['id']}/outcome", 200,
                              json={"status": "FAILED", "note": "Airtel: reversal rejected"})
    assert (failed["status"], failed["failureReason"]) == ("FAILED", "recorded by an admin: Airtel: reversal rejected")
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"amount": 30000, "idempotencyKey": idem()})


async def test_recording_a_refund_outcome_is_for_admins_of_its_cooperative(admin, client, rt, demo, superadmin,
                                                                          coop_b):
    from tests.admin_api.conftest import bearer

    payment = await _paid(admin, rt, demo)
    refund = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                              json={"amount": 1000, "idempotencyKey": idem()})
    await _parked(rt, refund["id"])
    await superadmin.json("POST", "/v1/users", 201, json={
        "username": "boss@b.rw", "password": "a-long-password-1", "role": "COOP_ADMIN",
        "cooperativeId": coop_b["cooperative_id"]})
    other = await bearer(client, "boss@b.rw", "a-long-password-1")
    await other.json("POST", f"/v1/refunds/{refund['id']}/outcome", 404, json={"status": "COMPLETED", "note": "x" * 5})
    async with rt.sessionmaker() as s:
        assert (await s.get(Refund, refund["id"])).status == "PROCESSING"


async def test_a_dispute_resolved_with_a_refund_that_fails_says_so(admin, rt, demo):
    """Resolved in the member's favour with a refund, and the refund then fails: the dispute's notes say the
    member has not been paid back (it read as settled)."""
    payment = await _paid(admin, rt, demo)
    opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    resolved = await admin.json("POST", f"/v1/disputes/{opened['id']}/transitions", 200,
                                json={"status": "RESOLVED", "note": "refunding", "refundAmount": 10000})
    await _parked(rt, resolved["refundId"])
    await admin.json("POST", f"/v1/refunds/{resolved['refundId']}/outcome", 200,
                     json={"status": "FAILED", "note": "MTN rejected the reversal"})
    dispute = await admin.json("GET", f"/v1/disputes/{opened['id']}", 200)
    refund = await admin.json("GET", f"/v1/refunds/{resolved['refundId']}", 200)
    assert dispute["status"] == "RESOLVED"
    assert dispute["notes"][-1]["text"] == (f"refund {refund['reference']} failed: recorded by an admin: MTN "
                                           "rejected the reversal; the member has not been paid back")
    # RESOLVED, so out of the desk's ?open=true queue: ?refundFailed=true finds it (a note alone was found by no one).
    settled = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": (await _paid(admin, rt, demo))["id"],
                                                                  "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{settled['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "the statement shows one payment"})

    # Resolved with a refund still on its way (not FAILED): not one to send again (the member would be paid twice).
    sending = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": (await _paid(admin, rt, demo))["id"],
                                                                  "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{sending['id']}/transitions", 200,
                     json={"status": "RESOLVED", "note": "refunding", "refundAmount": 10000})

    async def ids(query: str) -> list[str]:
        return [d["id"] for d in (await admin.json("GET", f"/v1/disputes?{query}", 200))["data"]]

    assert await ids("open=true") == []
    assert await ids("refundFailed=true") == [opened["id"]]
    assert await ids("refundFailed=false") == [sending["id"], settled["id"]]
    # Paid back another way (a refund of the payment since, which cannot name the settled dispute): off the list.
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 201,
                     json={"amount": 10000, "idempotencyKey": "dispute-refund-again"})
    assert await ids("refundFailed=true") == []
    assert sorted(await ids("refundFailed=false")) == sorted([opened["id"], sending["id"], settled["id"]])


async def test_the_desk_finds_disputes_by_what_is_left_to_answer_reason_member_reference_and_period(
        admin, tenant, coop_b, superadmin, rt, demo):
    hers = await make_payment(tenant, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, hers["id"])
    nobodys = await _paid(admin, rt, demo, paymentAccount="+250788555001")
    aline = demo["members"]["+250788000001"]
    wrong = await tenant.json("POST", "/v1/disputes", 201, json={"paymentId": hers["id"], "reason": "WRONG_AMOUNT"})
    other = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": nobodys["id"], "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{other['id']}/transitions", 200,
                     json={"status": "REJECTED", "note": "the statement shows one payment"})

    async def ids(caller, query):
        return [d["id"] for d in (await caller.json("GET", f"/v1/disputes?{query}", 200))["data"]]

    assert await ids(admin, "open=true") == [wrong["id"]]
    assert await ids(admin, "open=false") == [other["id"]]
    assert await ids(admin, "reason=OTHER") == [other["id"]]
    assert await ids(admin, f"member={aline}") == [wrong["id"]]
    assert await ids(admin, f"reference=%20{wrong['reference'].lower()}%20") == [wrong["id"]]
    assert await ids(admin, "reference=DSP_20000101_999") == []
    assert await ids(admin, "from=2000-01-01&to=2999-01-01&open=true&reason=WRONG_AMOUNT") == [wrong["id"]]
    assert await ids(admin, "from=2999-01-01") == []
    assert await ids(tenant, "open=false") == []  # hers only: the rejected one is not
    assert await ids(coop_b["admin"], f"reference={wrong['reference']}") == []
    assert await ids(superadmin, f"cooperativeId={demo['cooperative_id']}&open=true") == [wrong["id"]]
    assert await ids(superadmin, f"cooperativeId={coop_b['cooperative_id']}") == []
    for query, said in (("reason=BORED", "reason must be one of"), ("open=maybe", "open must be"),
                        ("member=nope", "member must be"), ("from=2026-13-01", "from")):
        refused = await admin.json("GET", f"/v1/disputes?{query}", 400)
        assert said in str(refused["message"]), (query, refused)


async def test_refunds_listed_by_payment_id_are_pointed_to_the_payments_own_list(admin, rt, demo):
    """`GET /v1/refunds?paymentId=` (as `GET /v1/disputes?paymentId=` takes it) was refused "query parameter
    paymentId is not allowed" without saying where a payment's refunds are: the 400 names the route."""
    payment = await _paid(admin, rt, demo)
    refused = await admin.json("GET", f"/v1/refunds?paymentId={payment['id']}", 400)
    assert refused["message"] == ["query parameter paymentId is not allowed: a payment's refunds are listed by "
                                  "GET /v1/payments/{id}/refunds"]
    assert (await admin.json("GET", f"/v1/payments/{payment['id']}/refunds", 200))["meta"]["total"] == 0
    other = await admin.json("GET", "/v1/refunds?nonsense=1", 400)
    assert other["message"] == ["query parameter nonsense is not allowed"]  # others as before
