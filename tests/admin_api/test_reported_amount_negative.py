"""A provider reporting money taken with a negative amount (a reversal's sign, a provider's bug): nothing the gateway
can count as taken. The payment is flagged with what the provider said, as another currency's report is, and
collects nothing, never a negative sum that the reconciliation's `collected` would subtract from the money the
cooperative's other payments brought in."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.audit import Actor
from core.models import Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import complete_payment, idem, make_payment

PROVIDER = Actor("provider:t", "provider")


async def _reported(rt: Any, payment_id: str, outcome_first: ProviderOutcome | None, amount: Money) -> Payment:
    """The payment (after `outcome_first`, if any) reported SUCCEEDED with `amount`; its row as stored."""
    for outcome in ([outcome_first] if outcome_first else []) + [ProviderOutcome.SUCCEEDED]:
        async with rt.sessionmaker.begin() as s:
            row = (await s.execute(select(Payment).where(Payment.id == payment_id).with_for_update())).scalar_one()
            await apply_collection_outcome(s, rt, row, outcome, actor=PROVIDER, reason="declined",
                                           amount=amount if outcome is ProviderOutcome.SUCCEEDED else None,
                                           provider_transaction_id="TX-NEGATIVE")
    async with rt.sessionmaker() as s:
        stored = await s.get(Payment, payment_id)
        assert stored is not None
        return stored


async def test_a_negative_amount_reported_taken_collects_nothing(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    full = await make_payment(admin, demo["payment_types"]["Water"], amount=5000)
    await complete_payment(rt, full["id"])

    stored = await _reported(rt, payment["id"], None, Money(-50000, "RWF"))

    assert (stored.status, stored.collected_minor, stored.mismatch) == ("COMPLETED", 0, True)
    assert stored.mismatch_detail == "provider reported -50,000 RWF, expected 50,000 RWF"
    got = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert got["collectedAmount"] == 0
    report = await admin.json("GET", "/v1/reports/reconciliation", 200)
    assert [(t["collected"], t["net"]) for t in report["totals"]] == [(5000, 5000)]
    refused = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                               json={"amount": 1000, "idempotencyKey": idem()})
    assert refused["message"] == "nothing is left to refund: the provider collected 0 RWF on this payment"


async def test_a_negative_amount_reported_after_a_failure_holds_nothing(
        admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])

    stored = await _reported(rt, payment["id"], ProviderOutcome.FAILED, Money(-50000, "RWF"))

    assert (stored.status, stored.collected_minor, stored.mismatch) == ("FAILED", 0, True)
    refused = await admin.json("POST", f"/v1/payments/{payment['id']}/refunds", 422,
                               json={"idempotencyKey": idem()})
    assert "only collected payments can be refunded" in refused["message"]
