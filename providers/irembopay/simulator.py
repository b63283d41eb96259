"""A local IremboPay: invoices, mobile-money push, a bank payment page, and signed webhooks."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from core.phone import PhoneError, mask, normalize
from providers.irembopay.adapter import signature_header
from providers.simulation import (
    LOOPBACK,
    STATE,
    Outcome,
    SimulatorOptions,
    SimulatorState,
    new_id,
    new_simulator_app,
    run_standalone,
)

log = logging.getLogger("gateway.simulator.irembopay")

# The gateway's development default for every provider credential (core.config): used to sign
# webhooks when the simulator is not told the secret key.
DEV_SECRET = "sim-dev-credential"
PROVIDERS = ("MTN", "AIRTEL")
LANGUAGES = ("EN", "FR", "RW")
BANKS = {"BK": "Bank of Kigali", "IM": "I&M Bank", "ECOBANK": "Ecobank"}
BUTTONS = {"BK": "BK", "IM": "I&M", "ECOBANK": "Ecobank"}


@dataclass
class _Invoice:
    invoice_number: str
    transaction_id: str
    amount: int
    payment_account: str
    description: str
    expiry_at: datetime | None
    request_body: dict[str, Any]
    payment_status: str = "NEW"
    payment_method: str | None = None
    payment_reference: str | None = None
    paid_at: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def status(self) -> str:
        if self.payment_status == "NEW" and self.expiry_at is not None and self.expiry_at < datetime.now(UTC):
            return "EXPIRED"
        return self.payment_status

    def to_json(self, base_url: str) -> dict[str, Any]:
        return {"invoiceNumber": self.invoice_number, "transactionId": self.transaction_id,
                "amount": self.amount, "currency": "RWF", "paymentStatus": self.status(),
                "paymentAccountIdentifier": self.payment_account, "description": self.description,
                "expiryAt": self.expiry_at.isoformat() if self.expiry_at else None,
                "paymentMethod": self.payment_method, "paymentReference": self.payment_reference,
                "paidAt": self.paid_at, "createdAt": self.created_at,
                "paymentLinkUrl": f"{base_url}/pay/{self.invoice_number}"}


class _Webhooks:
    """Posts signed webhooks to the configured URL (this machine only), re-signed on every send."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0

    async def post(self, url: str, secret: str, payload: dict[str, Any]) -> int | None:
        if urlparse(url).hostname not in LOOPBACK:
            log.warning("irembopay simulator webhook refused: not a loopback host")
            return None
        raw = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   "irembopay-signature": signature_header(secret, int(time.time() * 1000), raw)}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.sent += 1
        try:
            async with self._session.post(url, data=raw, headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("irembopay simulator webhook failed", extra={"error": type(exc).__name__})
            return None

    async def close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class _Store:
    invoices: dict[str, _Invoice] = field(default_factory=dict)
    by_transaction: dict[str, _Invoice] = field(default_factory=dict)
    webhooks: _Webhooks = field(default_factory=_Webhooks)


STORE = web.AppKey("irembopay_store", _Store)


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"success": False, "message": detail,
                              "errors": [{"code": code, "detail": detail}]}, status=status)


def _base_url(request: web.Request, suffix: str) -> str:
    """This simulator's own URL, prefix included when mounted as a sub-app."""
    path = request.path[: len(request.path) - len(suffix)] if request.path.endswith(suffix) else ""
    return f"{request.scheme}://{request.host}{path}"


async def _authorised(request: web.Request) -> dict[str, Any] | web.Response | None:
    """None for a GET that passed; the JSON body for a POST; a Response to answer with otherwise."""
    state = request.app[STATE]
    if not state.credential_ok("secret_key", request.headers.get("irembopay-secretKey")):
        return _error(401, "UNAUTHORIZED", "Invalid or missing secret key")
    if request.headers.get("X-API-Version") != "2":
        return _error(400, "UNSUPPORTED_API_VERSION", "X-API-Version must be 2")
    if request.method == "GET":
        return None
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "VALIDATION_ERROR", "body is not JSON")
    return body if isinstance(body, dict) else _error(400, "VALIDATION_ERROR", "body must be an object")


def _local_phone(value: object) -> bool:
    """A Rwandan mobile number written as IremboPay takes it, 07xxxxxxxx: one a Rwandan operator gives out (072,
    073, 078, 079: core.phone.normalize's check), not any ten digits starting 07."""
    if not (isinstance(value, str) and len(value) == 10 and value.isdigit() and value.startswith("07")):
        return False
    try:
        normalize(value, "RW")
    except PhoneError:
        return False
    return True


def _validate_invoice(body: dict[str, Any]) -> tuple[str, str] | None:
    """(code, detail) of the first problem, or None."""
    tid = body.get("transactionId")
    if not isinstance(tid, str) or not 1 <= len(tid) <= 100:
        return "VALIDATION_ERROR", "transactionId is required (1-100 characters)"
    if not isinstance(body.get("paymentAccountIdentifier"), str) or not body["paymentAccountIdentifier"]:
        return "VALIDATION_ERROR", "paymentAccountIdentifier is required"
    items = body.get("paymentItems")
    if not isinstance(items, list) or not items:
        return "VALIDATION_ERROR", "paymentItems must be a non-empty list"
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("code"), str) or not item["code"]:
            return "VALIDATION_ERROR", "each payment item needs a code"
        for name in ("quantity", "unitAmount"):
            value = item.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                return "VALIDATION_ERROR", f"paymentItems.{name} must be a positive integer"
    if body.get("language", "EN") not in LANGUAGES:
        return "VALIDATION_ERROR", "language must be EN, FR or RW"
    customer = body.get("customer", {})
    if not isinstance(customer, dict):
        return "VALIDATION_ERROR", "customer must be an object"
    if "phoneNumber" in customer and not _local_phone(customer["phoneNumber"]):
        return "BAD_PHONE_NUMBER", "customer.phoneNumber must look like 07xxxxxxxx"
    expiry = body.get("expiryAt")
    if expiry is not None:
        try:
            parsed = datetime.fromisoformat(str(expiry))
        except ValueError:
            return "VALIDATION_ERROR", "expiryAt must be an ISO 8601 date-time"
        if parsed.tzinfo is None:
            return "VALIDATION_ERROR", "expiryAt needs a UTC offset"
    return None


async def _create_invoice(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    body = await _authorised(request)
    if isinstance(body, web.Response):
        return body
    assert body is not None
    if state.fail_now():
        return _error(500, "INTERNAL_SERVER_ERROR", "simulated internal error")
    problem = _validate_invoice(body)
    if problem:
        return _error(400, *problem)
    base = _base_url(request, "/payments/invoices")
    existing = store.by_transaction.get(body["transactionId"])
    if existing is not None:
        # A retry of the same invoice answers the invoice already made; another body is a conflict.
        if existing.request_body == body:
            return web.json_response({"success": True, "message": "Invoice already exists",
                                      "data": existing.to_json(base)})
        return _error(409, "DUPLICATE_TRANSACTION_ID", "transactionId was used for another invoice")
    expiry = datetime.fromisoformat(body["expiryAt"]) if body.get("expiryAt") else None
    invoice = _Invoice(
        invoice_number="880" + new_id(10), transaction_id=body["transactionId"],
        amount=sum(item["quantity"] * item["unitAmount"] for item in body["paymentItems"]),
        payment_account=body["paymentAccountIdentifier"], description=str(body.get("description", "")),
        expiry_at=expiry, request_body=body)
    store.invoices[invoice.invoice_number] = invoice
    store.by_transaction[invoice.transaction_id] = invoice
    await state.hang()  # the invoice exists; only the answer is late (a retry finds it)
    return web.json_response({"success": True, "message": "Invoice created successfully",
                              "data": invoice.to_json(base)}, status=201)


async def _get_invoice(request: web.Request) -> web.Response:
    body = await _authorised(request)
    if isinstance(body, web.Response):
        return body
    # Like IremboPay's, the path takes the invoice number or the merchant's transactionId (Get Invoice's
    # invoice_reference): a merchant whose create was refused as a reused transactionId finds its invoice so.
    store, reference = request.app[STORE], request.match_info["invoice"]
    invoice = store.invoices.get(reference) or store.by_transaction.get(reference)
    if invoice is None:
        return _error(404, "INVOICE_NOT_FOUND", "no invoice with that number or transactionId")
    base = _base_url(request, f"/payments/invoices/{reference}")
    return web.json_response({"success": True, "message": "Invoice found", "data": invoice.to_json(base)})


async def _initiate(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    body = await _authorised(request)
    if isinstance(body, web.Response):
        return body
    assert body is not None
    if state.fail_now():
        return _error(500, "INTERNAL_SERVER_ERROR", "simulated internal error")
    if not _local_phone(body.get("accountIdentifier")):
        return _error(400, "BAD_PHONE_NUMBER", "accountIdentifier must look like 07xxxxxxxx")
    if body.get("paymentProvider") not in PROVIDERS:
        return _error(400, "VALIDATION_ERROR", "paymentProvider must be MTN or AIRTEL")
    if not isinstance(body.get("transactionReference"), str) or not body["transactionReference"]:
        return _error(400, "VALIDATION_ERROR", "transactionReference is required")
    invoice = store.invoices.get(str(body.get("invoiceNumber", "")))
    if invoice is None:
        return _error(404, "INVOICE_NOT_FOUND", "no invoice with that number")
    if invoice.status() == "PAID":
        return _error(400, "INVOICE_ALREADY_PAID", "the invoice is already paid")
    if invoice.status() == "EXPIRED":
        return _error(400, "INVOICE_EXPIRED", "the invoice has expired")
    msisdn = "250" + body["accountIdentifier"][1:]
    state.spawn(_push(state, store, invoice, msisdn, body["paymentProvider"]))
    log.info("irembopay simulator push", extra={"payer": mask("+" + msisdn)})
    await state.hang()  # the payer is already prompted: only the answer is lost
    return web.json_response({"success": True, "message": "Payment initiated, waiting for the payer",
                              "data": {"accountIdentifier": body["accountIdentifier"],
                                       "paymentProvider": body["paymentProvider"],
                                       "invoiceNumber": invoice.invoice_number,
                                       "transactionReference": body["transactionReference"],
                                       "amount": invoice.amount}})


async def _push(state: SimulatorState, store: _Store, invoice: _Invoice, msisdn: str, provider: str) -> None:
    outcome = await state.payer_decides(invoice.invoice_number, msisdn, str(invoice.amount), "RWF",
                                        "IremboPay")
    if outcome is Outcome.SUCCEED:
        await _settle(state, store, invoice, "PAID", f"MOMO_{provider}")
    elif outcome in (Outcome.FAIL, Outcome.REJECT, Outcome.PAYER_NOT_FOUND):
        await _settle(state, store, invoice, "FAILED", f"MOMO_{provider}")
    # EXPIRE / PENDING: the invoice stays NEW and no webhook comes; the gateway's timeout decides.


async def _settle(state: SimulatorState, store: _Store, invoice: _Invoice, status: str, method: str) -> None:
    notes = _mark(invoice, status, method)
    if notes is not None:
        await _deliver(state, store, *notes)


def _mark(invoice: _Invoice, status: str, method: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Close a NEW invoice; (final webhook, stale webhook), or None when it was closed already."""
    if invoice.status() != "NEW":
        return None
    stale = _webhook(invoice)  # what a delayed "NEW" notification would look like
    invoice.payment_status = status
    invoice.payment_method = method
    if status == "PAID":
        invoice.payment_reference = "IPR" + new_id(12)
        invoice.paid_at = datetime.now(UTC).isoformat(timespec="seconds")
    return _webhook(invoice), stale


def _webhook(invoice: _Invoice) -> dict[str, Any]:
    return {"success": True, "message": f"Payment {invoice.payment_status.lower()}",
            "data": {"amount": invoice.amount, "invoiceNumber": invoice.invoice_number,
                     "transactionId": invoice.transaction_id, "paidAt": invoice.paid_at,
                     "paymentStatus": invoice.payment_status, "paymentMethod": invoice.payment_method,
                     "paymentReference": invoice.payment_reference, "currency": "RWF"}}


async def _deliver(state: SimulatorState, store: _Store, final: dict[str, Any],
                   stale: dict[str, Any]) -> None:
    """Like SimulatorState.deliver, but the signature lives in a header over the exact raw body."""
    options = state.options
    url = options.callback_url
    if not url:
        log.info("irembopay simulator has no callback_url: webhook not sent")
        return
    if options.drop_callback:
        log.info("irembopay simulator dropped a webhook")
        return
    secret = options.credentials.get("secret_key") or DEV_SECRET
    await store.webhooks.post(url, secret, final)
    if options.duplicate_callback:
        await store.webhooks.post(url, secret, final)
    if options.out_of_order:
        await asyncio.sleep(min(options.delay, 0.2))
        await store.webhooks.post(url, secret, stale)


async def _pay_page(request: web.Request) -> web.Response:
    invoice = request.app[STORE].invoices.get(request.match_info["invoice"])
    if invoice is None:
        return web.Response(status=404, text="<h1>Invoice not found</h1>", content_type="text/html")
    number = html.escape(invoice.invoice_number)
    if invoice.status() != "NEW":
        body = f"<h1>Invoice {number}</h1><p>Status: {html.escape(invoice.status())}</p>"
        return web.Response(text=_page(body), content_type="text/html")
    buttons = "".join(f'<button name="bank" value="{code}">Pay with {html.escape(label)}</button> '
                      for code, label in BUTTONS.items())
    body = (f"<h1>Invoice {number}</h1><p>{html.escape(invoice.description)}</p>"
            f"<p>Amount: <b>{invoice.amount:,} RWF</b></p>"
            f'<form method="post" action="{number}">{buttons}</form>')
    return web.Response(text=_page(body), content_type="text/html")


async def _pay(request: web.Request) -> web.Response:
    state, store = request.app[STATE], request.app[STORE]
    invoice = store.invoices.get(request.match_info["invoice"])
    if invoice is None:
        return web.Response(status=404, text=_page("<h1>Invoice not found</h1>"), content_type="text/html")
    form = await request.post()
    bank = str(form.get("bank", "BK"))
    if bank not in BANKS:
        return web.Response(status=400, text=_page("<h1>Unknown bank</h1>"), content_type="text/html")
    # Marked before answering, so a double click finds the invoice paid and pays nothing twice.
    notes = _mark(invoice, "PAID", f"BANK_{bank}")
    if notes is None:
        number, status = html.escape(invoice.invoice_number), html.escape(invoice.status())
        text = _page(f"<h1>Invoice {number} is {status}</h1>")
        return web.Response(status=409, text=text, content_type="text/html")
    state.spawn(_deliver(state, store, *notes))
    text = _page(f"<h1>Paid with {html.escape(BANKS[bank])}</h1><p>You may close this page.</p>")
    return web.Response(text=text, content_type="text/html")


def _page(body: str) -> str:
    return ('<!doctype html><html><head><meta charset="utf-8"><title>IremboPay</title></head>'
            f"<body>{body}</body></html>")


def create_simulator(options: SimulatorOptions | None = None) -> web.Application:
    """The IremboPay simulator app; mount it under /_sim/irembopay or run it on its own."""
    app, _state = new_simulator_app("irembopay", options or SimulatorOptions())
    store = _Store()
    app[STORE] = store
    app.on_cleanup.append(store.webhooks.close)
    app.router.add_post("/payments/invoices", _create_invoice)
    app.router.add_get("/payments/invoices/{invoice}", _get_invoice)
    app.router.add_post("/payments/transactions/initiate", _initiate)
    app.router.add_get("/pay/{invoice}", _pay_page)
    app.router.add_post("/pay/{invoice}", _pay)
    return app


def main(argv: list[str] | None = None) -> None:
    run_standalone("IremboPay simulator", 8093, create_simulator, argv)


if __name__ == "__main__":
    main()
