"""A chargeback (POST /v1/payments/{id}/refunds with returnedByProvider) whose payment's disputes kept being opened and
held between its locks (core.refunds._lock_disputes_then_payment): 409 CONCURRENT_CHANGE after three tries, nothing
written (no refund, audit row, job or note), and the same request sent again under its key goes through once."""

from __future__ import annotations

from typing import Any

from core.errors import CODES
from tests.admin_api.conftest import Caller, complete_payment, idem, payment_body, refund_raced
from tests.conftest import requires_pg


@requires_pg
async def test_a_chargeback_raced_three_times_says_send_it_again_and_the_retry_goes_through(
        admin: Caller, rt: Any, demo: dict[str, Any], monkeypatch: Any) -> None:
    from sqlalchemy import func, select

    from core.models import AuditEvent, Dispute, OutboxJob, Refund

    rent = demo["payment_types"]["Monthly Rent"]
    paid = await admin.json("POST", "/v1/payments", 201, json=payment_body(rent))
    await complete_payment(rt, paid["id"])
    opened = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    async with rt.sessionmaker() as s:
        jobs_before = (await s.execute(select(func.count()).select_from(OutboxJob))).scalar_one()
        audit_before = (await s.execute(select(func.count()).select_from(AuditEvent))).scalar_one()

    body = {"amount": 1000, "idempotencyKey": idem(),
            "returnedByProvider": {"providerTransactionId": "CB-409"}}
    raced = await refund_raced(admin, rt, monkeypatch, paid["id"], opened["id"], "_lock_disputes_noted", body)
    assert raced["code"] == "CONCURRENT_CHANGE" and "send it again" in raced["message"]
    # The code's text (GET /v1/openapi.json) names what a chargeback is refused for, as the README's table does.
    assert "chargeback" in CODES["CONCURRENT_CHANGE"], CODES["CONCURRENT_CHANGE"]
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(Refund.id))).all() == []
        assert (await s.execute(select(func.count()).select_from(OutboxJob))).scalar_one() == jobs_before
        assert (await s.execute(select(func.count()).select_from(AuditEvent))).scalar_one() == audit_before
        notes = (await s.get(Dispute, opened["id"])).notes
    assert not notes
    again = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json=body)
    assert (again["amount"], again["status"]) == (1000, "COMPLETED")
    replay = await admin.req("POST", f"/v1/payments/{paid['id']}/refunds", json=body)
    assert replay.status == 201 and (await replay.json())["id"] == again["id"]
