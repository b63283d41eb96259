"""Money is dated when it moved, as the provider's statement dates it: by the provider's own time where its
callback or status answer gives one (IremboPay's paidAt, M-Pesa's TransactionDate and TransCompletedTime), by
the time an admin reads on the statement when recording an outcome, within the request and now; otherwise when
the gateway learnt it. The reconciliation's `settled` follows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from core.db import utcnow
from core.models import OutboxJob, Payment, Refund
from core.ports import EventKind, InboundCallback, ProviderOutcome
from tests.admin_api.conftest import complete_payment, idem, make_payment

OCTOBER = "from=2026-10-01&to=2026-11-01"  # Kigali: 2026-09-30T22:00Z .. 2026-10-31T22:00Z
NOVEMBER = "from=2026-11-01&to=2026-12-01"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def _set(rt: Any, model: Any, row_id: str, **values: Any) -> None:
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(model).where(model.id == row_id).values(**values))


def _settled(report: dict[str, Any], figure: str = "collected") -> list[tuple[str, int]]:
    return [(line["paymentMethod"], line[figure]) for line in report["settled"]]


def _irembopay_paid(ours: str, paid_at: str | None) -> InboundCallback:
    data = {"amount": 50000, "invoiceNumber": "880000000001", "transactionId": ours, "paymentStatus": "PAID",
            "paymentMethod": "BANK_BK", "paymentReference": "BK-1", "currency": "RWF"}
    if paid_at is not None:
        data["paidAt"] = paid_at
    return InboundCallback(method="POST", headers={"Content-Type": "application/json"}, query={},
                           body=json.dumps({"success": True, "data": data}).encode())


async def test_a_bank_payment_paid_at_2359_is_octobers_though_its_webhook_came_in_november(
        admin: Any, rt: Any, demo: dict[str, Any], monkeypatch: Any) -> None:
    import core.provider_events as provider_events
    from core.provider_events import handle_provider_event

    bank = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                              paymentAccount="treasurer@kigali-heights.rw")
    await _set(rt, Payment, bank["id"], created_at=_at("2026-10-31T12:00:00"))
    async with rt.sessionmaker() as s:
        ours = (await s.get(Payment, bank["id"])).provider_reference
    event = rt.providers["irembopay"].parse_callback(_irembopay_paid(ours, "2026-10-31T23:59:59+02:00"))
    assert event.occurred_at == _at("2026-10-31T21:59:59")
    monkeypatch.setattr(provider_events, "utcnow", lambda: _at("2026-10-31T22:00:05"))  # 00:00:05 on 1 November
    assert await handle_provider_event(rt, event) == "completed"

    assert (await admin.json("GET", f"/v1/payments/{bank['id']}", 200))["completedAt"] == "2026-10-31T21:59:59Z"
    assert _settled(await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)) == [("BANK_BK", 50000)]
    assert _settled(await admin.json("GET", f"/v1/reports/reconciliation?{NOVEMBER}", 200)) == []


async def test_a_providers_time_is_kept_between_the_request_and_now(rt: Any, demo: dict[str, Any],
                                                                    admin: Any) -> None:
    """A provider's clock running behind never dates money before it was asked for, one running ahead never
    in the future; a paidAt without an offset is Kigali time; one written oddly costs only the exact time."""
    from core.provider_events import handle_provider_event

    adapter = rt.providers["irembopay"]
    assert adapter.parse_callback(_irembopay_paid("x", "2026-10-31T23:59:59")).occurred_at == \
        _at("2026-10-31T21:59:59")
    for odd in ("yesterday", "", "2026-13-45T00:00:00Z", None):
        assert adapter.parse_callback(_irembopay_paid("x", odd)).occurred_at is None
    made = {}
    for name, paid_at in (("behind", "2020-01-01T00:00:00Z"), ("ahead", "2099-01-01T00:00:00Z")):
        payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="BANK_BK",
                                     paymentAccount=f"{name}@kigali-heights.rw")
        async with rt.sessionmaker() as s:
            row = await s.get(Payment, payment["id"])
        event = adapter.parse_callback(_irembopay_paid(row.provider_reference, paid_at))
        event = type(event)(**{**event.__dict__, "event_id": f"inv-{name}:PAID"})
        before = utcnow()
        assert await handle_provider_event(rt, event) == "completed"
        async with rt.sessionmaker() as s:
            made[name] = (row.created_at, before, (await s.get(Payment, payment["id"])).completed_at)
    created, _before, completed = made["behind"]
    assert completed == created
    _created, before, completed = made["ahead"]
    assert before <= completed <= utcnow()


def test_mpesa_dates_money_by_its_transaction_date_in_nairobi_time(rt: Any) -> None:
    adapter = rt.providers["mpesa"]
    stk = {"Body": {"stkCallback": {
        "MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_191220191020363925", "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.", "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 500}, {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
            {"Name": "TransactionDate", "Value": 20261031235959}, {"Name": "PhoneNumber", "Value": 254708374149}]}}}}
    event = adapter.parse_callback(InboundCallback(method="POST", headers={}, query={}, body=json.dumps(stk).encode()))
    assert event.occurred_at == _at("2026-10-31T20:59:59")
    reversal = {"Result": {
        "ResultType": 0, "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
        "OriginatorConversationID": "8521-4298025-1", "ConversationID": "AG_20261031_00004e48cf7e3533f581",
        "TransactionID": "OKA41H5ZT1", "ResultParameters": {"ResultParameter": [
            {"Key": "Amount", "Value": 500}, {"Key": "OriginalTransactionID", "Value": "NLJ7RT61SV"},
            {"Key": "TransCompletedTime", "Value": 20261101001500}]}}}
    event = adapter.parse_callback(InboundCallback(method="POST", headers={}, query={},
                                                   body=json.dumps(reversal).encode()))
    assert (event.kind, event.occurred_at) == (EventKind.REFUND, _at("2026-10-31T21:15:00"))
    stk["Body"]["stkCallback"].update(ResultCode=1032, ResultDesc="Request cancelled by user")
    event = adapter.parse_callback(InboundCallback(method="POST", headers={}, query={}, body=json.dumps(stk).encode()))
    assert (event.outcome, event.occurred_at) == (ProviderOutcome.CANCELLED, None)


async def _timed_out(admin: Any, rt: Any, demo: dict[str, Any], created: str) -> dict[str, Any]:
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await _set(rt, Payment, paid["id"], status="TIMEOUT", failure_reason="not approved in time",
               created_at=_at(created))
    return paid


async def test_money_recorded_from_octobers_statement_is_octobers(admin: Any, rt: Any,
                                                                  demo: dict[str, Any]) -> None:
    paid = await _timed_out(admin, rt, demo, "2026-10-31T21:50:00")  # asked 23:50 Kigali, 31 October
    done = await admin.json("POST", f"/v1/payments/{paid['id']}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-31OCT-2358", "completedAt": "2026-10-31T23:58:00+02:00",
        "note": "on MTN's statement of 31 October, 23:58"})
    assert (done["status"], done["completedAt"]) == ("COMPLETED", "2026-10-31T21:58:00Z")
    assert _settled(await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)) == \
        [("MOBILE_MONEY_MTN", 50000)]
    [entry] = (await admin.json("GET", f"/v1/audit-events?entityId={paid['id']}&action=payment.outcome_recorded",
                                200))["data"]
    assert entry["after"]["completedAt"] == "2026-10-31T21:58:00Z"


async def test_a_statement_time_in_the_future_or_before_the_request_is_refused(admin: Any, rt: Any,
                                                                               demo: dict[str, Any]) -> None:
    paid = await _timed_out(admin, rt, demo, "2026-10-31T21:50:00")
    body = {"status": "COMPLETED", "providerTransactionId": "MTN-1", "note": "statement of 31 October"}
    future = (utcnow() + timedelta(hours=1)).isoformat()
    for when, says in ((future, "completedAt is in the future"),
                       ("2026-10-31T21:49:59Z", "completedAt is before the payment was asked for "
                                                "(2026-10-31T21:50:00Z)"),
                       ("31/10/2026 23:58", "completedAt must be a valid date-time")):
        refused = await admin.json("POST", f"/v1/payments/{paid['id']}/outcome", 400,
                                   json={**body, "completedAt": when})
        assert any(says in m for m in refused["message"]), refused
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid["id"])).status == "TIMEOUT"  # nothing recorded


async def test_a_refund_recorded_from_octobers_statement_is_octobers(admin: Any, rt: Any,
                                                                     demo: dict[str, Any]) -> None:
    """Airtel has no refund status query: a refund whose answer was lost is recorded by a person, from the
    statement that shows it paid back on 31 October."""
    paid = await make_payment(admin, demo["payment_types"]["Water"], amount=5000,
                              paymentMethod="MOBILE_MONEY_AIRTEL", paymentAccount="+250733000001")
    await complete_payment(rt, paid["id"])
    await _set(rt, Payment, paid["id"], created_at=_at("2026-10-10T08:00:00"), completed_at=_at("2026-10-10T08:01:00"))
    refund = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201,
                              json={"amount": 5000, "idempotencyKey": idem()})
    await _set(rt, Refund, refund["id"], status="PROCESSING", created_at=_at("2026-10-31T10:00:00"))
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(OutboxJob).where(OutboxJob.kind == "refund.submit").values(status="DONE"))
    failed = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 400, json={
        "status": "FAILED", "note": "Airtel says not sent", "completedAt": "2026-10-31T12:00:00Z"})
    assert failed["message"] == ["completedAt is for a refund that went through (status COMPLETED)"]
    done = await admin.json("POST", f"/v1/refunds/{refund['id']}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": "AIR-RF-31OCT", "completedAt": "2026-10-31T12:00:00Z",
        "note": "Airtel statement 31 Oct: refunded"})
    assert (done["status"], done["completedAt"]) == ("COMPLETED", "2026-10-31T12:00:00Z")
    october = await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)
    assert _settled(october, "refunded") == [("MOBILE_MONEY_AIRTEL", 5000)]
    # Asked for in October, recorded COMPLETED in December: October's `settled` changed after it closed, and its
    # report names the refund that changed it.
    assert [(r["id"], r["completedAt"], r["returnedByProvider"], r["providerTransactionId"])
            for r in october["refundsRecordedLater"]] == [
        (refund["id"], "2026-10-31T12:00:00Z", False, "AIR-RF-31OCT")]
    assert october["refundsRecordedLaterCount"] == 1


async def test_a_statement_time_without_an_offset_is_the_cooperatives_local_time(admin: Any, rt: Any,
                                                                                  demo: dict[str, Any]) -> None:
    """The MTN statement line says 23:30 on 31 October (Kigali): typed as it shows, it is October's money."""
    paid = await _timed_out(admin, rt, demo, "2026-10-31T21:20:00")  # asked 23:20 Kigali
    done = await admin.json("POST", f"/v1/payments/{paid['id']}/outcome", 200, json={
        "status": "COMPLETED", "providerTransactionId": "MTN-2330", "completedAt": "2026-10-31T23:30:00",
        "note": "statement of 31 October, 23:30"})
    assert done["completedAt"] == "2026-10-31T21:30:00Z"
    assert _settled(await admin.json("GET", f"/v1/reports/reconciliation?{OCTOBER}", 200)) == \
        [("MOBILE_MONEY_MTN", 50000)]
