"""A payment's request hash (its idempotency check) is keyed: a backup without BLIND_INDEX_KEY does not give back the
payer's number by trying the 10,000 numbers its masked account leaves. A key accepted before the upgrade (its row
holds the plain digest) still replays, before and after `main.py rehash-requests` replaces that digest."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core.db import utcnow
from core.models import Payment
from main import _rehash_requests
from tests.admin_api.conftest import bearer, make_payment, payment_body

PAYER = "+250788123456"


def _plain_digest(row: Any, account: str) -> str:
    """The request's SHA-256 over the row's clear columns and a guessed account: what the release before stored,
    and what anyone holding a backup can compute."""
    return hashlib.sha256(json.dumps({
        "paymentTypeId": row.payment_type_id, "amount": row.amount_minor, "currency": row.currency,
        "method": row.method, "account": account, "description": row.description,
        "dueDate": row.due_date.isoformat() if row.due_date else None, "member": row.member_id,
    }, sort_keys=True).encode()).hexdigest()


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(Payment).where(Payment.id == payment_id))).scalar_one()


async def test_a_backup_without_the_keys_does_not_give_back_the_payer_number(rt: Any, demo: dict[str, Any],
                                                                            client: Any) -> None:
    admin = await bearer(client, *demo["admin"])
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    row = await _row(rt, paid["id"])
    head, tail, hidden = row.payment_account_masked.split("*")[0], row.payment_account_masked.rsplit("*", 1)[1], \
        row.payment_account_masked.count("*")
    candidates = [f"{head}{n:0{hidden}d}{tail}" for n in range(10 ** hidden)]
    assert PAYER in candidates  # the search a backup allows holds the number

    assert [c for c in candidates if _plain_digest(row, c) == row.request_hash] == []
    assert row.request_hash.startswith("v2:") and len(row.request_hash) == 64
    assert all(_plain_digest(row, c)[:61] not in row.request_hash for c in candidates)


async def test_a_key_accepted_before_the_upgrade_replays_before_and_after_the_rehash(
        rt: Any, demo: dict[str, Any], client: Any, capsys: Any) -> None:
    admin = await bearer(client, *demo["admin"])
    body = payment_body(demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    old = await admin.json("POST", "/v1/payments", 201, json=body)
    new = await make_payment(admin, body["paymentTypeId"], paymentAccount=PAYER, description="Rent, March")
    since = utcnow() - timedelta(hours=5)
    plain = _plain_digest(await _row(rt, old["id"]), PAYER)
    async with rt.sessionmaker.begin() as s:  # as the release before wrote it
        await s.execute(update(Payment).where(Payment.id == old["id"]).values(request_hash=plain))
        await s.execute(update(Payment).values(updated_at=since))
    keyed_new = (await _row(rt, new["id"])).request_hash

    async def replays() -> None:
        again = await admin.req("POST", "/v1/payments", json=body)
        assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert (await again.json())["id"] == old["id"]
        other = await admin.json("POST", "/v1/payments", 409, json={**body, "paymentAccount": "+250788123457"})
        assert other["message"].startswith("Payment with this idempotency key already exists")

    await replays()  # the old row compared the old way

    assert await _rehash_requests(rt.settings) == 0
    assert "payments.request_hash: 1 rehashed under BLIND_INDEX_KEY" in capsys.readouterr().out
    rehashed = await _row(rt, old["id"])
    assert rehashed.request_hash.startswith("v2:") and rehashed.request_hash != plain
    assert plain[:61] not in rehashed.request_hash
    assert (await _row(rt, new["id"])).request_hash == keyed_new  # written keyed: left alone
    async with rt.sessionmaker() as s:  # the payments did not change: a cooperative's sync does not list them
        stamps = (await s.execute(select(Payment.updated_at))).scalars().all()
    assert len(stamps) == 2 and all(abs((at - since).total_seconds()) < 1 for at in stamps)
    await replays()  # the rewritten row compared keyed

    assert await _rehash_requests(rt.settings) == 0  # run again: nothing left
    assert "no payment or dispute request hash left from before they were keyed" in capsys.readouterr().out
