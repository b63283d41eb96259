"""IremboPay refuses an invoice whose transactionId it already holds (ours: an invoice whose answer was lost, or the
invoice of a payment a PostgreSQL restore lost, whose request the cooperative sent again under the same derived
transactionId). The adapter finds that invoice by our transactionId (Get Invoice takes the invoice number or the
merchant's transactionId) and collects with it: pushed only when it is this payment's own and unpaid, never a
second PIN prompt for an earlier payment's invoice, and a paid one settled by the status poll."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.ports import ProviderError, ProviderOutcome, ProviderTimeout
from providers.irembopay import IremboPayAdapter
from tests.providers.test_irembopay import (
    RECORDED_EXPIRY,
    TX,
    Wire,
    assert_headers,
    body_of,
    collection,
    config,
    fixture,
)

INVOICES = "/payments/invoices"
PUSH = "/payments/transactions/initiate"
LOOKUP = f"/payments/invoices/{TX}"
NUMBER = "880123456789"
DUPLICATE = {"success": False, "message": "transactionId was used for another invoice",
             "errors": [{"code": "DUPLICATE_TRANSACTION_ID", "detail": "transactionId was used for another invoice"}]}


def held(status: str = "NEW", expiry: str | None = "2026-11-22T07:10:00.000+02:00", **over: Any) -> dict[str, Any]:
    """Get Invoice's answer for the invoice under our transactionId (expiryAt by default the payment's own,
    written as IremboPay writes it: Kigali time, milliseconds)."""
    data = {**fixture("invoice.json")["invoice_answer"]["data"], "paymentStatus": status, "expiryAt": expiry,
            "createdAt": "2026-11-22T07:00:00.000+02:00", **over}
    return {"success": True, "message": "Invoice found", "data": data}


async def collect(wire: Wire, **kw: Any) -> Any:
    async with wire.client() as http:
        return await IremboPayAdapter(http, config()).request_collection(collection(expires_at=RECORDED_EXPIRY, **kw))


async def test_a_paid_invoice_found_by_transaction_id_is_collected_without_a_push() -> None:
    # After a restore: the earlier payment's invoice (its own expiryAt), paid by the member then.
    wire = (Wire().on("POST", INVOICES, 409, DUPLICATE)
            .on("GET", LOOKUP, 200, held("PAID", expiry="2026-11-21T09:05:00+00:00", paidAt="2026-11-21T11:01:00")))
    accepted = await collect(wire)
    wire.done()  # exactly the create and the lookup: no push
    create, lookup = wire.requests
    assert body_of(create) == fixture("invoice.json")["mobile_invoice_request"]
    assert lookup.content == b""
    for request in wire.requests:
        assert_headers(request)
    assert accepted.provider_transaction_id == accepted.gateway_reference == NUMBER  # the poll asks about it


async def test_the_payments_own_unpaid_invoice_is_pushed_once() -> None:
    # The create's answer was lost and IremboPay refuses the same transactionId again: this payment's invoice
    # (its expiryAt), whose payer was never pushed (a push follows the invoice's answer).
    rec = fixture("invoice.json")
    wire = (Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held())
            .on("POST", PUSH, 200, rec["push_answer"]))
    accepted = await collect(wire)
    wire.done()
    assert body_of(wire.requests[2]) == rec["push_request"]
    assert accepted.provider_transaction_id == NUMBER


async def test_an_earlier_payments_open_invoice_is_not_pushed_again() -> None:
    # The same request sent again inside the earlier payment's window: that payment's push may be on her phone.
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held(expiry="2026-11-22T05:06:00Z"))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        accepted = await adapter.request_collection(collection(expires_at=RECORDED_EXPIRY))
    wire.done()  # no push
    assert accepted.provider_transaction_id == NUMBER


@pytest.mark.parametrize("expiry", [None, "soon"], ids=["no_expiry", "unreadable_expiry"])
async def test_an_invoice_whose_expiry_cannot_be_read_is_not_pushed(expiry: str | None) -> None:
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held(expiry=expiry))
    assert (await collect(wire)).provider_transaction_id == NUMBER
    wire.done()


async def test_a_conflict_without_a_code_is_looked_up_too() -> None:
    wire = (Wire().on("POST", INVOICES, 409, {"success": False, "message": "Conflict"})
            .on("GET", LOOKUP, 200, held("PAID")))
    assert (await collect(wire)).provider_transaction_id == NUMBER
    wire.done()


async def test_a_bank_payer_is_sent_to_the_found_invoices_page() -> None:
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held())
    accepted = await collect(wire, method="BANK_BK", phone=None)
    wire.done()
    assert accepted.payment_url == f"https://pay.irembo.test/payment/{NUMBER}"


async def test_the_status_of_the_found_invoice_settles_the_payment() -> None:
    wire = (Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held("PAID"))
            .on("GET", f"/payments/invoices/{NUMBER}", 200, held("PAID", paidAt="2026-11-22T07:01:00+02:00")))
    async with wire.client() as http:
        adapter = IremboPayAdapter(http, config())
        accepted = await adapter.request_collection(collection(expires_at=RECORDED_EXPIRY))
        status = await IremboPayAdapter(http, config()).collection_status(TX, accepted.provider_transaction_id, "RWF")
    wire.done()
    assert (status.outcome, status.provider_transaction_id, status.amount.minor if status.amount else None) == (
        ProviderOutcome.SUCCEEDED, NUMBER, 50000)


async def test_no_invoice_under_the_refused_transaction_id_leaves_the_payment_to_the_poll() -> None:
    # IremboPay contradicts itself: nobody can tell whether she paid, so the payment is neither failed nor pushed.
    wire = (Wire().on("POST", INVOICES, 409, DUPLICATE)
            .on("GET", LOOKUP, 404, {"success": False, "errors": [{"code": "INVOICE_NOT_FOUND", "detail": "none"}]}))
    with pytest.raises(ProviderTimeout) as err:
        await collect(wire)
    wire.done()
    assert err.value.provider_transaction_id is None


async def test_an_invoice_for_another_amount_is_not_this_requests() -> None:
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held("PAID", amount=40000))
    with pytest.raises(ProviderError) as err:
        await collect(wire)
    wire.done()
    assert (err.value.code, err.value.retryable) == ("DUPLICATE_TRANSACTION_ID", False)
    assert "40000 RWF" in str(err.value)


@pytest.mark.parametrize(("status", "body"), [
    (502, {"success": False, "message": "Bad gateway"}),
    (0, httpx.ReadTimeout("slow")),
], ids=["5xx", "no_answer"])
async def test_a_lookup_that_fails_may_be_sent_again(status: int, body: Any) -> None:
    # Neither call moves money: the collect job sends both again.
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, status, body)
    with pytest.raises(ProviderError) as err:
        await collect(wire)
    wire.done()
    assert not isinstance(err.value, ProviderTimeout) and err.value.retryable is True


async def test_other_invoice_refusals_still_refuse() -> None:
    wire = Wire().on("POST", INVOICES, 400, {"success": False, "errors": [
        {"code": "VALIDATION_ERROR", "detail": "paymentAccountIdentifier is required"}]})
    with pytest.raises(ProviderError) as err:
        await collect(wire)
    wire.done()  # no lookup
    assert (err.value.code, err.value.retryable) == ("VALIDATION_ERROR", False)



async def test_an_invoice_whose_amount_cannot_be_read_is_left_to_the_poll() -> None:
    wire = Wire().on("POST", INVOICES, 409, DUPLICATE).on("GET", LOOKUP, 200, held(amount="many"))
    with pytest.raises(ProviderTimeout) as err:
        await collect(wire)
    wire.done()  # no push
    assert err.value.provider_transaction_id == NUMBER  # stored: the poll asks about it
