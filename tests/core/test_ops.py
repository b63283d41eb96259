"""Operations figures computed from real rows."""

from __future__ import annotations

from core.audit import Actor
from core.ops import dashboard
from core.payments import NewPayment, create_payment, handle_provider_event
from core.ports import EventKind, ProviderEvent, ProviderOutcome


async def test_dashboard_counts_payments_providers_and_outbox(rt, demo):
    made = []
    async with rt.sessionmaker.begin() as s:
        for i, account in enumerate(["0788000001", "0788000002", "0788000003"]):
            p, _ = await create_payment(s, rt, NewPayment(
                cooperative_id=demo["cooperative_id"], payment_type_id=demo["payment_types"]["Water"],
                method="MOBILE_MONEY_MTN", account=account, idempotency_key=f"ops-test-{i:04d}", channel="api"),
                actor=Actor("admin:t", "api"))
            made.append(p)
    for p, outcome in zip(made[:2], (ProviderOutcome.SUCCEEDED, ProviderOutcome.FAILED), strict=True):
        await handle_provider_event(rt, ProviderEvent(provider="mtn_momo", kind=EventKind.COLLECTION, event_id=p.id,
                                                      reference=p.provider_reference, outcome=outcome))
    async with rt.sessionmaker() as s:
        figures = await dashboard(s, demo["cooperative_id"])
        other = await dashboard(s, "another-cooperative")
    mtn = figures["providers"]["mtn_momo"]
    assert (mtn["settled"], mtn["succeeded"], mtn["rate"]) == (2, 1, 0.5)
    assert figures["openPayments"]["count"] == 1
    assert sum(r["count"] for r in figures["paymentsPerMinute"]) == 3
    assert {r["status"] for r in figures["paymentsPerMinute"]} == {"COMPLETED", "FAILED", "PENDING"}
    # 3 collect + 3 poll jobs, one receipt and one failure SMS, two webhook events, all still pending
    assert figures["outbox"]["pending"] == 10
    assert other["openPayments"]["count"] == 0 and other["providers"] == {}
