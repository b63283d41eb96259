"""POST /v1/disputes under an idempotency key, as POST /v1/payments and refunds are: a cooperative's system retrying
after a lost answer gets the dispute its first request opened (201, Idempotent-Replayed), not 409
DISPUTE_ALREADY_OPEN while it is open nor a second dispute once it is closed; another request under the key is 409
IDEMPOTENCY_KEY_REUSED; the key is the cooperative's; without one, nothing changed."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from sqlalchemy import func, select

from core import ratelimit
from core.models import AuditEvent, Dispute, OutboxJob
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.admin_api.test_replay_past_limit import T0


async def _paid(caller: Caller, rt: Any, payment_type_id: str, **over: Any) -> dict[str, Any]:
    payment = await make_payment(caller, payment_type_id, **over)
    await complete_payment(rt, payment["id"])
    return payment


async def _disputes(rt: Any, payment_id: str) -> list[str]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(Dispute.id).where(Dispute.payment_id == payment_id)
                                     .order_by(Dispute.created_at))).scalars())


async def _told(rt: Any, dispute_id: str) -> tuple[int, int]:
    """The dispute.opened audit rows and the jobs (SMS, webhook event) telling of its opening."""
    async with rt.sessionmaker() as s:
        audit = (await s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.entity_id == dispute_id, AuditEvent.action == "dispute.opened"))).scalar_one()
        jobs = (await s.execute(select(func.count()).select_from(OutboxJob).where(
            OutboxJob.dedupe_key.like(f"%{dispute_id}%")))).scalar_one()
    return int(audit), int(jobs)


async def _post(caller: Caller, body: dict[str, Any]) -> tuple[int, str | None, dict[str, Any]]:
    resp = await caller.req("POST", "/v1/disputes", json=body)
    return resp.status, resp.headers.get("Idempotent-Replayed"), await resp.json()


async def test_a_retry_under_its_key_answers_the_dispute_it_opened_open_or_closed(admin: Caller, rt: Any,
                                                                                  demo: dict[str, Any]) -> None:
    payment = await _paid(admin, rt, demo["payment_types"]["Monthly Rent"])
    body = {"paymentId": payment["id"], "reason": "WRONG_AMOUNT", "note": "charged twice", "idempotencyKey": idem()}
    status, replayed, first = await _post(admin, body)
    assert (status, replayed) == (201, None)
    told = await _told(rt, first["id"])
    # Its answer lost, the system sends it again while the dispute is open: the same dispute, marked a replay.
    status, replayed, again = await _post(admin, body)
    assert (status, replayed, again) == (201, "true", first)
    assert await _told(rt, first["id"]) == told == (1, told[1])  # opened once: audited and told once
    # Another request under the key (another reason, note or payment) is not a retry.
    for other in ({"reason": "OTHER"}, {"note": "charged three times"}, {"note": None}):
        refused = await admin.json("POST", "/v1/disputes", 409, json={**body, **other})
        assert (refused["code"], refused["field"], refused["message"]) == (
            "IDEMPOTENCY_KEY_REUSED", "idempotencyKey",
            "Dispute with this idempotency key already exists with a different request")
    # Without a key, as before: refused while it is open, naming it.
    no_key = {k: v for k, v in body.items() if k != "idempotencyKey"}
    refused = await admin.json("POST", "/v1/disputes", 409, json=no_key)
    assert (refused["code"], refused["message"]) == (
        "DISPUTE_ALREADY_OPEN", f"dispute {first['reference']} is already open for this payment")
    # Closed since: the retry still answers the dispute it opened, as it is now, and opens no second one.
    await admin.json("POST", f"/v1/disputes/{first['id']}/transitions", 200, json={"status": "REJECTED",
                                                                                  "note": "paid once"})
    told = await _told(rt, first["id"])
    status, replayed, late = await _post(admin, body)
    assert (status, replayed, late["id"], late["status"]) == (201, "true", first["id"], "REJECTED")
    assert await _disputes(rt, payment["id"]) == [first["id"]]
    assert await _told(rt, first["id"]) == told  # nothing opened nor told again
    # A new key (or none) opens a new dispute of the closed one's payment, as before.
    status, replayed, second = await _post(admin, {**body, "idempotencyKey": idem()})
    assert (status, replayed) == (201, None) and second["id"] != first["id"]


async def test_the_key_is_the_cooperatives(admin: Caller, rt: Any, demo: dict[str, Any],
                                           coop_b: dict[str, Any]) -> None:
    """Unique in the cooperative, as a payment's key is: another payment of hers under it is another request; another
    cooperative's system may use the same key for its own."""
    rent = demo["payment_types"]["Monthly Rent"]
    one, two = await _paid(admin, rt, rent), await _paid(admin, rt, rent)
    key = idem()
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": one["id"], "reason": "OTHER",
                                                        "idempotencyKey": key})
    refused = await admin.json("POST", "/v1/disputes", 409, json={"paymentId": two["id"], "reason": "OTHER",
                                                                  "idempotencyKey": key})
    assert refused["code"] == "IDEMPOTENCY_KEY_REUSED" and await _disputes(rt, two["id"]) == []
    theirs = await _paid(coop_b["admin"], rt, coop_b["payment_type_id"], paymentAccount="+250788999001", amount=1000)
    status, replayed, opened = await _post(coop_b["admin"], {"paymentId": theirs["id"], "reason": "OTHER",
                                                             "idempotencyKey": key})
    assert (status, replayed, opened["paymentId"]) == (201, None, theirs["id"])


async def test_a_key_the_gateway_gives_its_own_requests_is_refused(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    """`dispute:` keys the refund a dispute is resolved with, `ussd:` a member's USSD payment: refused here too, as
    by every route that takes a client's key (one rule for them all), and nothing is opened."""
    payment = await _paid(admin, rt, demo["payment_types"]["Monthly Rent"])
    for key, whose in (("dispute:0f9a3c1e", "refunds of disputes"), ("ussd:nalo:12345678", "USSD payments")):
        refused = await admin.json("POST", "/v1/disputes", 400, json={"paymentId": payment["id"], "reason": "OTHER",
                                                                      "idempotencyKey": key})
        assert (refused["field"], refused["message"]) == (
            "idempotencyKey", [f"idempotencyKey must not start with {key.split(':')[0] + ':'!r}: the gateway keys "
                               f"its own {whose} so"])
    assert await _disputes(rt, payment["id"]) == []


async def test_concurrent_requests_under_one_key_open_one_dispute(admin: Caller, rt: Any,
                                                                  demo: dict[str, Any]) -> None:
    """Sent twice at once (a client's retry racing its first request): one dispute, both answered with it, one of
    them as a replay. Under one key for two payments at once: one opens, the other is refused (the unique index,
    on PostgreSQL; the payments' locks do not serialise them)."""
    rent = demo["payment_types"]["Monthly Rent"]
    payment = await _paid(admin, rt, rent)
    body = {"paymentId": payment["id"], "reason": "NOT_AUTHORISED", "idempotencyKey": idem()}
    answers = await asyncio.gather(*(_post(admin, body) for _ in range(2)))
    assert sorted((status, replayed or "") for status, replayed, _ in answers) == [(201, ""), (201, "true")], answers
    assert len({answer["id"] for _, _, answer in answers}) == 1
    assert await _disputes(rt, payment["id"]) == [answers[0][2]["id"]]

    one, two = await _paid(admin, rt, rent), await _paid(admin, rt, rent)
    key = idem()
    answers = await asyncio.gather(*(_post(admin, {"paymentId": p["id"], "reason": "OTHER", "idempotencyKey": key})
                                     for p in (one, two)))
    assert sorted((status, answer.get("code")) for status, _, answer in answers) == [
        (201, None), (409, "IDEMPOTENCY_KEY_REUSED")], answers
    assert len(await _disputes(rt, one["id"]) + await _disputes(rt, two["id"])) == 1


async def test_a_replay_takes_no_room_of_the_rate_limit(admin: Caller, rt: Any, demo: dict[str, Any],
                                                       monkeypatch: Any) -> None:
    """Route.replay, as for payments and refunds: a retry under its key is not counted (nor refused past the limit)."""
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0))  # one window throughout
    payment = await _paid(admin, rt, demo["payment_types"]["Monthly Rent"])
    body = {"paymentId": payment["id"], "reason": "OTHER", "idempotencyKey": idem()}
    made = await admin.req("POST", "/v1/disputes", json=body)
    assert made.status == 201
    room = made.headers["X-RateLimit-Remaining"]
    for _ in range(3):
        retry = await admin.req("POST", "/v1/disputes", json=body)
        assert (retry.status, retry.headers["Idempotent-Replayed"]) == (201, "true")
        assert retry.headers["X-RateLimit-Remaining"] == room
    # A new dispute under another key is counted.
    other = await _paid(admin, rt, demo["payment_types"]["Monthly Rent"])
    fresh = await admin.req("POST", "/v1/disputes", json={**body, "paymentId": other["id"], "idempotencyKey": idem()})
    assert fresh.status == 201 and int(fresh.headers["X-RateLimit-Remaining"]) == int(room) - 1


async def test_past_the_limit_a_key_used_in_another_cooperative_opens_nothing(
        admin: Caller, superadmin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any],
        monkeypatch: Any) -> None:
    """Route.replay looks for the key where the handler does, in the cooperative of the request's payment. A super
    admin sees every cooperative's disputes: the key of one opened in another cooperative let the request past the
    limit, and the handler, finding no dispute under it in its payment's, opened a new one (201, not a replay)."""
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0))  # one window throughout
    key = idem()
    ours = await _paid(admin, rt, demo["payment_types"]["Monthly Rent"])
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": ours["id"], "reason": "OTHER",
                                                        "idempotencyKey": key})
    theirs = await _paid(coop_b["admin"], rt, coop_b["payment_type_id"], paymentAccount="+250788999001", amount=1000)
    for _ in range(60):  # disputes:write, 60 a minute: a request the body check refuses counts too
        assert (await superadmin.req("POST", "/v1/disputes", json={"paymentId": theirs["id"],
                                                                    "reason": "BOGUS"})).status == 400
    past = await superadmin.req("POST", "/v1/disputes", json={"paymentId": theirs["id"], "reason": "OTHER",
                                                              "idempotencyKey": key})
    assert past.status == 429, await past.json()
    assert await _disputes(rt, theirs["id"]) == []
    # Its own retry, once opened under the key, is still answered past the limit.
    async with rt.sessionmaker.begin() as s:
        await s.execute(Dispute.__table__.update().where(Dispute.payment_id == ours["id"]).values(
            idempotency_key=None))  # (the key free in the demo cooperative, so only coop B holds it next)
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0 + 120))
    opened = await superadmin.json("POST", "/v1/disputes", 201, json={"paymentId": theirs["id"], "reason": "OTHER",
                                                                      "idempotencyKey": key})
    for _ in range(60):
        await superadmin.req("POST", "/v1/disputes", json={"paymentId": theirs["id"], "reason": "BOGUS"})
    retry = await superadmin.req("POST", "/v1/disputes", json={"paymentId": theirs["id"], "reason": "OTHER",
                                                               "idempotencyKey": key})
    assert (retry.status, retry.headers.get("Idempotent-Replayed"), (await retry.json())["id"]) == (
        201, "true", opened["id"])
