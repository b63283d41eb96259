"""POST /v1/disputes/{id}/transitions under an idempotency key: an officer's browser or a cooperative's system
retrying after a timeout gets the dispute as it is now (200, Idempotent-Replayed), not a second note and
`dispute.updated` event, nor, for a resolution its first request made (with its refund), a 409 saying the dispute
is closed already; another request under the key is 409 IDEMPOTENCY_KEY_REUSED; the key is its dispute's; without
one, nothing changed."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from sqlalchemy import func, select

from core import ratelimit
from core.models import AuditEvent, DisputeTransitionKey, OutboxJob, Refund
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment
from tests.admin_api.test_replay_past_limit import T0


async def _disputed(admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Any]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    return await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "WRONG_AMOUNT"})


async def _move(caller: Caller, dispute: dict[str, Any], body: dict[str, Any]) -> tuple[int, str | None, Any]:
    resp = await caller.req("POST", f"/v1/disputes/{dispute['id']}/transitions", json=body)
    return resp.status, resp.headers.get("Idempotent-Replayed"), await resp.json()


async def _told(rt: Any, dispute_id: str) -> dict[str, int]:
    """What the dispute's changes left: audit rows by action, its jobs (SMS, webhook events), refunds made for it and
    their submissions."""
    async with rt.sessionmaker() as s:
        audit = dict((await s.execute(select(AuditEvent.action, func.count()).where(
            AuditEvent.entity_id == dispute_id).group_by(AuditEvent.action))).all())
        jobs = (await s.execute(select(func.count()).select_from(OutboxJob).where(
            OutboxJob.dedupe_key.like(f"%{dispute_id}%")))).scalar_one()
        refunds = list((await s.execute(select(Refund.id).where(Refund.dispute_id == dispute_id))).scalars())
        submits = (await s.execute(select(func.count()).select_from(OutboxJob).where(
            OutboxJob.kind == "refund.submit", OutboxJob.payload["refund_id"].as_string().in_(refunds or [""]))
        )).scalar_one()
    return {**audit, "jobs": int(jobs), "refunds": len(refunds), "submits": int(submits)}


async def test_a_retried_note_under_its_key_is_one_note(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    dispute = await _disputed(admin, rt, demo)
    body = {"status": "OPEN", "note": "Jeanne called: charged twice on 3 May", "idempotencyKey": idem()}
    status, replayed, first = await _move(admin, dispute, body)
    assert (status, replayed, len(first["notes"])) == (200, None, 1)
    told = await _told(rt, dispute["id"])
    assert told["dispute.note_added"] == 1
    # Its answer lost, the browser sends it again: the dispute as it is, marked a replay; nothing noted or told again.
    status, replayed, again = await _move(admin, dispute, body)
    assert (status, replayed, again) == (200, "true", first)
    assert await _told(rt, dispute["id"]) == told
    # Another request under the key is not a retry.
    for other in ({"note": "Jeanne called again"}, {"evidence": "statement line 12"}, {"status": "UNDER_REVIEW"}):
        refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409, json={**body, **other})
        assert (refused["code"], refused["field"], refused["message"]) == (
            "IDEMPOTENCY_KEY_REUSED", "idempotencyKey",
            "Dispute transition with this idempotency key already exists with a different request")
    assert await _told(rt, dispute["id"]) == told
    # The key keeps the request's digest, never the member's words (an erasure does not reach it).
    async with rt.sessionmaker() as s:
        [kept] = (await s.execute(select(DisputeTransitionKey).where(
            DisputeTransitionKey.dispute_id == dispute["id"]))).scalars()
    assert (kept.idempotency_key, len(kept.request_hash)) == (body["idempotencyKey"], 64)
    assert "Jeanne" not in kept.request_hash
    # The key is its dispute's: another dispute takes the same request under it as a new one.
    other = await _disputed(admin, rt, demo)
    status, replayed, noted = await _move(admin, other, body)
    assert (status, replayed, len(noted["notes"])) == (200, None, 1)
    # Without a key, as before: the same note sent again is a second note and a second event.
    no_key = {k: v for k, v in body.items() if k != "idempotencyKey"}
    status, _, twice = await _move(admin, dispute, no_key)
    assert (status, len(twice["notes"])) == (200, 2)
    assert (await _told(rt, dispute["id"]))["jobs"] == told["jobs"] + 1


async def test_a_retried_resolution_with_a_refund_refunds_once(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """Without a key the retry was answered 409 INVALID_STATE, "was resolved in the payer's favour already by ...
    with refund RFD_...": nothing refunded twice, but a client took its own resolution for another admin's."""
    dispute = await _disputed(admin, rt, demo)
    body = {"status": "RESOLVED", "note": "overcharged", "refundAmount": 5000, "idempotencyKey": idem()}
    status, replayed, resolved = await _move(admin, dispute, body)
    assert (status, replayed, resolved["status"]) == (200, None, "RESOLVED") and resolved["refundId"]
    told = await _told(rt, dispute["id"])
    assert (told["dispute.resolved"], told["refunds"], told["submits"]) == (1, 1, 1)
    status, replayed, again = await _move(admin, dispute, body)
    assert (status, replayed, again) == (200, "true", resolved)
    assert await _told(rt, dispute["id"]) == told  # no second refund, submission, SMS, event or audit row
    # Another amount (or none) under the key: refused as another request, not told the dispute is closed.
    without_refund = {k: v for k, v in body.items() if k != "refundAmount"}
    for other in ({**body, "refundAmount": 3000}, without_refund, {**body, "toPayingNumber": True}):
        refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409, json=other)
        assert (refused["code"], refused["field"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotencyKey")
    # Without a key: as before, closed already (a retry it cannot tell from another admin's).
    no_key = {k: v for k, v in body.items() if k != "idempotencyKey"}
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409, json=no_key)
    assert refused["code"] == "INVALID_STATE" and "was resolved in the payer's favour already" in refused["message"]
    assert await _told(rt, dispute["id"]) == told


async def test_a_key_the_gateway_gives_its_own_requests_is_refused(admin: Caller, rt: Any,
                                                                   demo: dict[str, Any]) -> None:
    dispute = await _disputed(admin, rt, demo)
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 400, json={
        "status": "RESOLVED", "refundAmount": 5000, "idempotencyKey": f"dispute:{dispute['id']}"})
    assert refused["field"] == "idempotencyKey"
    assert (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["status"] == "OPEN"


async def test_two_at_once_under_one_key_apply_once(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """Sent twice at once (a retry racing its first request): the dispute's lock makes the second find the first's
    key: one applied, the other answered as a replay; one note, one resolution, one refund."""
    for body in ({"status": "UNDER_REVIEW", "note": "statement asked for"},
                 {"status": "RESOLVED", "refundAmount": 5000, "note": "overcharged"}):
        dispute = await _disputed(admin, rt, demo)
        body = {**body, "idempotencyKey": idem()}
        answers = await asyncio.gather(*(_move(admin, dispute, body) for _ in range(2)))
        assert sorted((status, replayed or "") for status, replayed, _ in answers) == [(200, ""), (200, "true")], \
            answers
        assert answers[0][2] == answers[1][2] and len(answers[0][2]["notes"]) == 1
        told = await _told(rt, dispute["id"])
        assert told.get("dispute.under_review", 0) + told.get("dispute.resolved", 0) == 1
        assert told["refunds"] == told["submits"] == (1 if "refundAmount" in body else 0)


async def test_a_replay_takes_no_room_of_the_rate_limit(admin: Caller, rt: Any, demo: dict[str, Any],
                                                       monkeypatch: Any) -> None:
    """Route.replay, as for POST /v1/disputes: a retry under its key is not counted."""
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: T0))  # one window throughout
    dispute = await _disputed(admin, rt, demo)
    body = {"status": "OPEN", "note": "called", "idempotencyKey": idem()}
    made = await admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions", json=body)
    assert made.status == 200
    room = made.headers["X-RateLimit-Remaining"]
    for _ in range(2):
        retry = await admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions", json=body)
        assert (retry.status, retry.headers["Idempotent-Replayed"]) == (200, "true")
        assert retry.headers["X-RateLimit-Remaining"] == room
