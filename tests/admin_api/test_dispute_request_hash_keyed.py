"""The request hashes kept under a dispute's idempotency keys (disputes.request_hash, dispute_transition_keys
.request_hash) cover the note, which the member's erasure scrubs while the hash stays: keyed as a payment's is
(under BLIND_INDEX_KEY), so the database or a backup does not confirm a guess of a short note. A key accepted before
the upgrade (its row holds the plain SHA-256) still replays, before and after `main.py rehash-requests` rewrites it,
and another request under it is still 409."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core.db import utcnow
from core.models import Dispute, DisputeTransitionKey
from core.rekey import rehash_requests
from main import _rehash_requests
from tests.admin_api.conftest import Caller, complete_payment, idem, make_payment

NOTE = "called Jeanne +250788123456"


def _plain(fields: dict[str, Any]) -> str:
    """A request's SHA-256 over its fields: what the release before stored, and what anyone reading the database
    can compute for a guessed note."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _opening(payment_id: str, note: str) -> str:
    return _plain({"paymentId": payment_id, "reason": "WRONG_AMOUNT", "note": note})


def _moving(note: str) -> str:
    return _plain({"status": "UNDER_REVIEW", "note": note, "evidence": None, "refundAmount": None,
                   "returnedByProvider": None, "toPayingNumber": False})


async def _hashes(rt: Any, dispute_id: str) -> tuple[str | None, list[str]]:
    async with rt.sessionmaker() as s:
        opened = (await s.execute(select(Dispute.request_hash).where(Dispute.id == dispute_id))).scalar_one()
        moved = list((await s.execute(select(DisputeTransitionKey.request_hash).where(
            DisputeTransitionKey.dispute_id == dispute_id))).scalars())
    return opened, moved


async def _open_and_move(admin: Caller, rt: Any, demo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                                 dict[str, Any]]:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    opening = {"paymentId": payment["id"], "reason": "WRONG_AMOUNT", "note": NOTE, "idempotencyKey": idem()}
    dispute = await admin.json("POST", "/v1/disputes", 201, json=opening)
    moving = {"status": "UNDER_REVIEW", "note": NOTE, "idempotencyKey": idem()}
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json=moving)
    return dispute, opening, moving


async def _replays(admin: Caller, dispute: dict[str, Any], opening: dict[str, Any], moving: dict[str, Any]) -> None:
    """Both requests sent again are answered as replays; with another note, 409."""
    again = await admin.req("POST", "/v1/disputes", json=opening)
    assert (again.status, again.headers.get("Idempotent-Replayed")) == (201, "true")
    assert (await again.json())["id"] == dispute["id"]
    again = await admin.req("POST", f"/v1/disputes/{dispute['id']}/transitions", json=moving)
    assert (again.status, again.headers.get("Idempotent-Replayed")) == (200, "true")
    for path, body in (("/v1/disputes", opening), (f"/v1/disputes/{dispute['id']}/transitions", moving)):
        refused = await admin.json("POST", path, 409, json={**body, "note": "called Jeanne +250788123457"})
        assert (refused["code"], refused["field"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotencyKey")


async def test_a_dispute_request_hash_does_not_confirm_a_guessed_note(admin: Caller, rt: Any,
                                                                      demo: dict[str, Any]) -> None:
    dispute, opening, moving = await _open_and_move(admin, rt, demo)
    opened, moved = await _hashes(rt, dispute["id"])
    plain_open, plain_move = _opening(opening["paymentId"], NOTE), _moving(NOTE)
    assert opened is not None and opened.startswith("v2:") and len(opened) == 64
    assert len(moved) == 1 and moved[0].startswith("v2:") and len(moved[0]) == 64
    # The right guess of the note gives neither stored value, nor a part of it.
    assert plain_open != opened and plain_open[:61] not in opened
    assert plain_move != moved[0] and plain_move[:61] not in moved[0]
    await _replays(admin, dispute, opening, moving)


async def test_a_key_accepted_before_the_upgrade_replays_before_and_after_the_rehash(
        admin: Caller, rt: Any, demo: dict[str, Any], capsys: Any) -> None:
    old, old_opening, old_moving = await _open_and_move(admin, rt, demo)
    new, new_opening, new_moving = await _open_and_move(admin, rt, demo)
    since = utcnow() - timedelta(hours=5)
    plain_open, plain_move = _opening(old_opening["paymentId"], NOTE), _moving(NOTE)
    async with rt.sessionmaker.begin() as s:  # as the release before wrote them
        await s.execute(update(Dispute).where(Dispute.id == old["id"]).values(request_hash=plain_open))
        await s.execute(update(DisputeTransitionKey).where(DisputeTransitionKey.dispute_id == old["id"])
                        .values(request_hash=plain_move))
        await s.execute(update(Dispute).values(updated_at=since))
    keyed_new = await _hashes(rt, new["id"])

    await _replays(admin, old, old_opening, old_moving)  # the old rows compared the old way
    await _replays(admin, new, new_opening, new_moving)

    assert await _rehash_requests(rt.settings) == 0
    out = capsys.readouterr().out
    assert "disputes.request_hash: 1 rehashed under BLIND_INDEX_KEY" in out
    assert "dispute_transition_keys.request_hash: 1 rehashed under BLIND_INDEX_KEY" in out
    opened, moved = await _hashes(rt, old["id"])
    assert opened is not None and opened.startswith("v2:") and plain_open[:61] not in opened
    assert len(moved) == 1 and moved[0].startswith("v2:") and plain_move[:61] not in moved[0]
    assert await _hashes(rt, new["id"]) == keyed_new  # written keyed: left alone
    async with rt.sessionmaker() as s:  # the disputes did not change: no updatedAt moved
        stamps = (await s.execute(select(Dispute.updated_at))).scalars().all()
    assert len(stamps) == 2 and all(abs((at - since).total_seconds()) < 1 for at in stamps)
    await _replays(admin, old, old_opening, old_moving)  # the rewritten rows compared keyed
    await _replays(admin, new, new_opening, new_moving)

    assert await _rehash_requests(rt.settings) == 0  # run again: nothing left
    assert "no payment or dispute request hash left from before they were keyed" in capsys.readouterr().out


async def test_the_rehash_reads_every_table_batch_by_batch(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    # Batches of one: each next one is read after the last one's primary key (two columns for a transition's key).
    made = [await _open_and_move(admin, rt, demo) for _ in range(3)]
    async with rt.sessionmaker.begin() as s:
        for dispute, opening, _ in made:
            await s.execute(update(Dispute).where(Dispute.id == dispute["id"])
                            .values(request_hash=_opening(opening["paymentId"], NOTE)))
        await s.execute(update(DisputeTransitionKey).values(request_hash=_moving(NOTE)))
    report = await rehash_requests(rt.sessionmaker, rt.cipher, batch=1)
    assert report.rewritten == {"disputes.request_hash": 3, "dispute_transition_keys.request_hash": 3}
    assert report.changed_meanwhile == 0
    for dispute, opening, moving in made:
        opened, moved = await _hashes(rt, dispute["id"])
        assert opened is not None and opened.startswith("v2:") and moved[0].startswith("v2:")
        await _replays(admin, dispute, opening, moving)
    assert (await rehash_requests(rt.sessionmaker, rt.cipher, batch=1)).rewritten == {}
