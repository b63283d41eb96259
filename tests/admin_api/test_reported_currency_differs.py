"""A provider's success for the same number in another currency (50,000 UGX for a 50,000 RWF payment: an account
in the wrong currency) is not the money asked for: completed, flagged for a person, collected 0 (nothing counted
or refundable in RWF), the cooperative's system told so, and the mismatch audited."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.audit import Actor
from core.models import AuditEvent, Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import Caller, idem, make_payment

PROVIDER = Actor("provider:test", "provider")


async def test_the_same_number_in_another_currency_is_a_mismatch(admin: Caller, rt: Any,
                                                                 demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        result = await apply_collection_outcome(s, rt, await s.get(Payment, payment["id"]),
                                                ProviderOutcome.SUCCEEDED, actor=PROVIDER,
                                                amount=Money(50_000, "UGX"), provider_transaction_id="MTN-UGX-1")
    assert result == "completed"
    shown = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (shown["status"], shown["mismatch"], shown["collectedAmount"], shown["mismatchDetail"]) == (
        "COMPLETED", True, 0, "provider reported 50,000 UGX, expected 50,000 RWF")
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == payment["id"], AuditEvent.action == "payment.amount_mismatch"))).scalars().all()
    assert audit == {"reported": 50_000, "reportedCurrency": "UGX", "expected": 50_000}
    # Nothing of it is refundable in RWF; the reconciliation counts nothing collected.
    await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422, json={"idempotencyKey": idem()})
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(t["currency"], t["collectedCount"], t["collected"]) for t in report["totals"]] == [("RWF", 0, 0)]
    # Not a line of the provider's statement in RWF either: `settled` counts no collection of it.
    assert [(x["currency"], x["collectedCount"], x["collected"]) for x in report["settled"]] == [("RWF", 0, 0)]
