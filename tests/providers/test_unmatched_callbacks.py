"""A callback that names no payment of ours keeps at most 2 KiB of its body (else its size and digest): MTN's
callbacks are unsigned, and each made-up reference stored its whole body (up to the 64 KiB limit) for ever.
Production now also requires CALLBACK_SECRET_MTN_MOMO, so only MTN can reach that URL."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from sqlalchemy import select

from core.models import ProviderEvent


async def test_an_unknown_references_callback_keeps_a_bounded_body(rt: Any, client: Any) -> None:
    small = {"referenceId": str(uuid.uuid4()), "status": "SUCCESSFUL", "financialTransactionId": "t-small",
             "amount": "100", "currency": "RWF"}
    large = {**small, "referenceId": str(uuid.uuid4()), "junk": os.urandom(20_000).hex()}
    for body in (small, large):
        answer = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
        assert answer.status == 200, await answer.text()
    async with rt.sessionmaker() as s:
        rows = {e.event_id: e for e in (await s.execute(select(ProviderEvent))).scalars()}
    kept = [e.payload for e in rows.values()]
    assert len(kept) == 2 and all(e.outcome == "unknown_payment" for e in rows.values())
    assert any(p.get("financialTransactionId") == "t-small" for p in kept)  # a small one is kept as it came
    [cut] = [p for p in kept if "truncated" in p]
    assert len(json.dumps(cut)) < 200 and cut["truncated"]["bytes"] > 40_000
    assert len(cut["truncated"]["sha256"]) == 64  # enough to match it with the provider's records
