"""IremboPay adapter: invoices, mobile-money push, bank payment URLs, signed webhooks with replay refusal."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx

from core.auth import previous_secret_used
from core.config import ProviderConfig
from core.inbound import JSON_ERRORS
from core.logs import scrub
from core.metrics import PROVIDER_ERRORS
from core.money import Money, MoneyError
from core.phone import Phone, PhoneError, normalize
from core.ports import (
    MONEY_REFERENCE,
    REFUND_UNSUPPORTED,
    CallbackRejected,
    CollectionAccepted,
    CollectionRequest,
    CredentialsRefused,
    EventKind,
    InboundCallback,
    ProviderError,
    ProviderEvent,
    ProviderOutcome,
    ProviderTimeout,
    RefundRequest,
    StatusResult,
    known_as,
)
from core.text import is_number
from providers.calls import ProviderBusy, credentials_refused, provider_time, retry_after, send, timeout_from

log = logging.getLogger(__name__)

# Invoice paymentStatus -> core outcome. PROTOCOLS.md documents NEW and PAID only; EXPIRED,
# CANCELLED and FAILED are assumed (an invoice past expiryAt, one withdrawn, a declined push) and
# mapped conservatively. Anything else raises: we would rather stop than guess about money.
STATUS: dict[str, ProviderOutcome] = {
    "NEW": ProviderOutcome.PENDING,
    "PAID": ProviderOutcome.SUCCEEDED,
    "EXPIRED": ProviderOutcome.EXPIRED,
    "CANCELLED": ProviderOutcome.CANCELLED,
    "FAILED": ProviderOutcome.FAILED,
}
# A FAILED invoice's reason: the webhook and the status carry paymentStatus only (PROTOCOLS.md), and a push's prompt
# ends FAILED when the payer declines it or it is not approved (her PIN, her balance: IremboPay does not say which).
# channels.sms.templates.reason_key tells her so; "payment failed" told her nothing ("not completed").
FAILED_REASON = "declined or not approved"
# Error code -> may the same call be sent again?
ERRORS: dict[str, bool] = {
    "INVOICE_EXPIRED": False,  # a new invoice is needed
    "INVOICE_ALREADY_PAID": False,  # nothing to push; the status query tells the outcome
    "PAYMENT_PROVIDER_ERROR": True,  # MTN / Airtel behind IremboPay failed for now (a push: see below)
    "BAD_PHONE_NUMBER": False,
    "INVOICE_NOT_FOUND": False,
}
# Refusals of an invoice whose transactionId IremboPay already holds: ours, sent before (an answer lost, or a payment
# a PostgreSQL restore lost whose request the cooperative sent again: core.payments.derived_provider_reference).
# PROTOCOLS.md names no code for it; the simulator answers 409 DUPLICATE_TRANSACTION_ID, and any 409 to a create is
# taken as it (a lookup that finds nothing leaves the payment to the status poll: _existing_invoice).
DUPLICATE_TRANSACTION_ID = "DUPLICATE_TRANSACTION_ID"
# Only the push moves money; an invoice is a request to pay, unique by our transactionId, so an
# unanswered invoice call may be sent again while an unanswered push must be followed by a status query.
_CREATES = frozenset({"push"})
# Push refusals after which the payer may be at a PIN prompt all the same (MTN / Airtel behind IremboPay
# failing part-way; a paid invoice): ask the invoice's status, never push again (a second prompt). A push
# answered 5xx without a definite code is the same case (the server may have sent it on before failing).
_PUSH_SETTLED_BY_STATUS = frozenset({"PAYMENT_PROVIDER_ERROR", "INVOICE_ALREADY_PAID"})
_MEMO_SIZE = 10_000
BANK_METHODS = frozenset({"BANK_BK", "BANK_IM", "BANK_ECOBANK"})
MOBILE_PROVIDERS: dict[str, str] = {"MOBILE_MONEY_MTN": "MTN", "MOBILE_MONEY_AIRTEL": "AIRTEL"}
LANGUAGES: dict[str, str] = {"en": "EN", "fr": "FR", "rw": "RW", "kin": "RW"}
SIGNATURE_HEADER = "irembopay-signature"
DEFAULT_TOLERANCE = 300  # seconds a signed webhook stays acceptable

NonceStore = Callable[[str, int], Awaitable[bool]]


class MemoryNonceStore:
    """Process-local one-time check: True the first time a key is seen within its TTL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: dict[str, float] = {}
        self._clock = clock

    async def __call__(self, key: str, ttl: int) -> bool:
        now = self._clock()
        if len(self._seen) > 1024:  # prune now and then, so the dict stays bounded by the TTL window
            self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        self._seen[key] = now + ttl
        return True

    async def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class RedisNonceStore:
    """One-time check shared by every gateway process: SET key 1 NX EX ttl, in one round trip."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def __call__(self, key: str, ttl: int) -> bool:
        return bool(await self._redis.set(key, b"1", nx=True, ex=ttl))

    async def forget(self, key: str) -> None:
        await self._redis.delete(key)


def redis_nonce_store(redis: Any) -> NonceStore:
    return RedisNonceStore(redis)


def _nonce_key(signature: str) -> str:
    return f"nonce:{{irembopay}}:{signature.lower()}"


def sign(secret: str, timestamp_ms: int, body: bytes) -> str:
    """IremboPay's signature: hex HMAC-SHA256(secretKey, "<t>#<raw body>")."""
    return hmac.new(secret.encode(), str(timestamp_ms).encode() + b"#" + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp_ms: int, body: bytes) -> str:
    return f"t={timestamp_ms},s={sign(secret, timestamp_ms, body)}"


class IremboPayAdapter:
    """PaymentProvider for IremboPay: MTN / Airtel pushes and bank payments (BK, I&M, Ecobank)."""

    name = "irembopay"
    # No refund API: a person sends the money back (a bank or mobile-money transfer, of any amount) and records
    # it (core.jobs: the refund waits for them); nothing here limits it to the whole payment.
    supports_partial_refund = True
    refund_names_request = False  # no refund API: a person's transfer
    # The invoice number, our transactionId's one invoice: a webhook naming another is not the payment's.
    transaction_id_is_request = True
    methods = frozenset({"BANK_BK", "BANK_IM", "BANK_ECOBANK", "MOBILE_MONEY_MTN", "MOBILE_MONEY_AIRTEL"})
    currencies: frozenset[str] | None = frozenset({"RWF"})

    def __init__(self, http: httpx.AsyncClient, config: ProviderConfig, *,
                 nonce_store: NonceStore | None = None, tolerance: int = DEFAULT_TOLERANCE,
                 clock: Callable[[], datetime] | None = None) -> None:
        self._http = http
        self._config = config
        self._base = config.base_url.rstrip("/")
        self._nonce_store = nonce_store or MemoryNonceStore()
        self._tolerance = tolerance
        self._clock = clock or (lambda: datetime.now(UTC))
        self._timeouts = timeout_from(config)
        # provider reference -> invoice number, for a status query after a push that got no answer in
        # this process before the core stored it (ProviderTimeout carries it). Process-local, bounded: a hint.
        self._invoices: dict[str, str] = {}

    # --- outbound -------------------------------------------------------------------------------

    async def request_collection(self, request: CollectionRequest) -> CollectionAccepted:
        if request.method not in self.methods:
            raise ProviderError(f"IremboPay does not collect {request.method}", retryable=False,
                                code="METHOD_UNSUPPORTED")
        if request.amount.currency != "RWF":
            raise ProviderError(f"IremboPay collects RWF only, not {request.amount.currency}",
                                retryable=False, code="CURRENCY_UNSUPPORTED")
        if not request.amount.is_positive():
            raise ProviderError("IremboPay amount must be positive", retryable=False, code="BAD_AMOUNT")
        mobile = MOBILE_PROVIDERS.get(request.method)
        if mobile and (request.payer is None or not request.payer.digits.startswith("250")):
            raise ProviderError("IremboPay mobile money needs a Rwandan number (07...)", retryable=False,
                                code="BAD_PHONE_NUMBER")
        invoice, ours = await self._create_invoice(request)
        invoice_number = invoice.get("invoiceNumber")
        if not isinstance(invoice_number, str) or not invoice_number:
            raise self._fail("invoice", "answer has no invoiceNumber")
        self._remember(request.provider_reference, invoice_number)
        status = invoice.get("paymentStatus", "NEW")
        if mobile and status == "NEW" and not ours:
            # An earlier payment's invoice (made before a restore lost that payment), still open: that payment's
            # push may be at the payer's phone now. A second would be a second PIN prompt for one invoice (both
            # approved, paid twice); her answer to the first, by webhook or the status poll, settles this one.
            log.warning("irembopay invoice of an earlier request found unpaid: not pushed again",
                        extra={"invoice_number": invoice_number, "provider_reference": request.provider_reference})
        elif mobile and status == "NEW":
            assert request.payer is not None
            body = {"accountIdentifier": request.payer.national, "paymentProvider": mobile,
                    "invoiceNumber": invoice_number, "transactionReference": request.provider_reference}
            await self._push(body, invoice_number)
        payment_url = invoice.get("paymentLinkUrl") if request.method in BANK_METHODS else None
        log.info("irembopay collection accepted",
                 extra={"invoice_number": invoice_number, "method": request.method,
                        "payer": request.payer.masked() if request.payer else None,
                        "provider_reference": request.provider_reference})
        # The invoice number is what the status query needs, so it doubles as the transaction id.
        return CollectionAccepted(provider_transaction_id=invoice_number, gateway_reference=invoice_number,
                                  payment_url=payment_url if isinstance(payment_url, str) else None)

    async def _push(self, body: Mapping[str, Any], invoice_number: str) -> None:
        """Prompt the payer. Whenever it may have reached them without our knowing, raise ProviderTimeout
        carrying the invoice number, which the core stores for the status query of any process (and so it does
        should the job's deadline cut the push off: known_as)."""
        known_as(invoice_number)
        try:
            resp = await self._send("push", "POST", "/payments/transactions/initiate", json=body)
        except ProviderTimeout as exc:
            raise ProviderTimeout(str(exc), provider_transaction_id=invoice_number) from exc
        answer = self._json(resp)
        if resp.is_success and answer.get("success") is not False:
            return  # 200 or 201, or any other 2xx: IremboPay took the push
        error = self._error("push", resp, answer)
        # A 2xx or a 5xx without one of IremboPay's definite codes: the payer may be prompted.
        if error.code in _PUSH_SETTLED_BY_STATUS or ((resp.is_success or resp.status_code >= 500)
                                                      and error.code not in ERRORS):
            raise ProviderTimeout(f"{error}; ask the invoice status, do not push again",
                                  provider_transaction_id=invoice_number) from error
        raise error

    async def _create_invoice(self, request: CollectionRequest) -> tuple[Mapping[str, Any], bool]:
        """The invoice for the request, made now or found under our transactionId, and whether it is this payment's
        own (its expiryAt is the payment's): only then may the payer be pushed for it (see request_collection)."""
        customer: dict[str, str] = {}
        phone = _customer_phone(request.payer)
        if phone:
            customer["phoneNumber"] = phone
        if "@" in request.payer_account:
            customer["email"] = request.payer_account
        if request.payer_name:
            customer["name"] = request.payer_name
        body: dict[str, Any] = {
            # Our provider reference, saved before this call: a retry after a timeout sends the same
            # transactionId, which IremboPay keeps unique (it answers the existing invoice, or refuses the
            # transactionId as used: the invoice is then found by it, _existing_invoice).
            "transactionId": request.provider_reference,
            "paymentAccountIdentifier": self._config.options.get("payment_account", ""),
            "paymentItems": [{"code": self._config.options.get("payment_item_code", ""), "quantity": 1,
                              "unitAmount": request.amount.to_api()}],
            "description": request.description[:200] or request.payment_reference,
            "customer": customer,
            "language": LANGUAGES.get(request.language.lower(), "EN"),
        }
        if request.expires_at is not None:
            body["expiryAt"] = request.expires_at.astimezone(UTC).isoformat(timespec="seconds")
        resp = await self._send("invoice", "POST", "/payments/invoices", json=body)
        answer = self._json(resp)
        data = answer.get("data")
        if resp.status_code in (200, 201) and answer.get("success") is not False and isinstance(data, dict):
            return data, True
        if resp.status_code != 409 and _error_code(resp, answer) != DUPLICATE_TRANSACTION_ID:
            raise self._error("invoice", resp, answer)
        existing = await self._existing_invoice(request)
        # The payment's own invoice (its answer was lost: its payer was never pushed) has the payment's expiryAt; an
        # earlier payment's (the same request, sent again after a restore lost it) has that payment's, or one we
        # cannot read: not ours to push for.
        expires_at = _whole_seconds(request.expires_at)
        return existing, expires_at is not None and _expires_at(existing) == expires_at

    async def _existing_invoice(self, request: CollectionRequest) -> Mapping[str, Any]:
        """The invoice IremboPay refused to make again: GET /payments/invoices/{invoice_reference} takes the invoice
        number or the merchant's transactionId (IremboPay's API reference, Get Invoice). One IremboPay cannot show
        is left to the status poll and the webhook (ProviderTimeout), never pushed: the poll asks for it by the same
        transactionId (collection_status), and while IremboPay shows none the payment ends, after its window, as a
        request that never reached it (no invoice it can show can have been paid). One for another amount is not
        this request's: refused."""
        path = f"/payments/invoices/{quote(request.provider_reference, safe='')}"
        resp = await self._send("invoice", "GET", path)
        answer = self._json(resp)
        data = answer.get("data")
        if resp.status_code == 404:
            PROVIDER_ERRORS.labels(self.name, "invoice").inc()
            log.error("irembopay refused our transactionId as used but shows no invoice under it",
                      extra={"provider_reference": request.provider_reference})
            raise ProviderTimeout("IremboPay refused the transactionId as used and shows no invoice under it: "
                                  "left to the status poll and the webhook")
        if resp.status_code != 200 or answer.get("success") is False or not isinstance(data, dict):
            raise self._error("invoice", resp, answer)
        number = data.get("invoiceNumber")
        try:
            amount = Money.from_api(data.get("amount"), str(data.get("currency") or request.amount.currency))
        except MoneyError:
            # Not known to be this request's, nor known not to be: never pushed, left to the status poll.
            PROVIDER_ERRORS.labels(self.name, "invoice").inc()
            log.error("irembopay invoice under our transactionId has no amount we can read",
                      extra={"provider_reference": request.provider_reference, "invoice_number": number})
            raise ProviderTimeout(f"IremboPay invoice amount {data.get('amount')!r} not understood: left to the "
                                  "status poll", provider_transaction_id=number if isinstance(number, str) and number
                                  else None) from None
        if data.get("transactionId", request.provider_reference) != request.provider_reference \
                or amount != request.amount:
            PROVIDER_ERRORS.labels(self.name, "invoice").inc()
            log.error("irembopay invoice under our transactionId is not this request's",
                      extra={"provider_reference": request.provider_reference,
                             "invoice_number": number, "amount": str(data.get("amount"))})
            raise ProviderError(f"IremboPay holds another invoice under transactionId {request.provider_reference} "
                                f"({amount.minor} {amount.currency})", retryable=False,
                                code=DUPLICATE_TRANSACTION_ID)
        log.info("irembopay invoice already held under our transactionId: collected with it",
                 extra={"invoice_number": number, "payment_status": data.get("paymentStatus"),
                        "provider_reference": request.provider_reference})
        return data

    async def collection_status(self, provider_reference: str, provider_transaction_id: str | None,
                                currency: str) -> StatusResult:
        provider_transaction_id = provider_transaction_id or self._invoices.get(provider_reference)
        # Without the invoice number (its answer never arrived, or the collect job was cut off), the invoice is
        # asked for by our transactionId, which Get Invoice takes too.
        asked = provider_transaction_id or provider_reference
        resp = await self._send("status", "GET", f"/payments/invoices/{quote(asked, safe='')}")
        answer = self._json(resp)
        data = answer.get("data")
        if resp.status_code == 404 and not provider_transaction_id:
            # No invoice under our transactionId: the request never reached IremboPay (nothing can have been paid).
            # The core sends it again inside the payment's window, or ends it unreachable after.
            raise ProviderError("IremboPay has no invoice under our transactionId", retryable=False,
                                code="NOT_FOUND")
        if resp.status_code != 200 or not isinstance(data, dict):
            raise self._error("status", resp, answer)
        if not provider_transaction_id:
            number = data.get("invoiceNumber")
            provider_transaction_id = number if isinstance(number, str) and number else None
            if provider_transaction_id:
                self._remember(provider_reference, provider_transaction_id)
        status = str(data.get("paymentStatus"))
        outcome = STATUS.get(status)
        if outcome is None:
            PROVIDER_ERRORS.labels(self.name, "status").inc()
            log.error("irembopay unknown paymentStatus", extra={"payment_status": status,
                                                                "invoice_number": provider_transaction_id})
            raise ProviderError(f"IremboPay: unknown paymentStatus {status!r}", retryable=False,
                                code="UNKNOWN_STATUS")
        amount = None
        if data.get("amount") is not None:
            try:
                amount = Money.from_api(data["amount"], str(data.get("currency") or currency))
            except MoneyError:
                raise self._fail("status", f"amount {data['amount']!r} is not a number") from None
        return StatusResult(outcome, amount=amount, provider_transaction_id=provider_transaction_id,
                            reason=None if outcome is not ProviderOutcome.FAILED else FAILED_REASON,
                            raw=dict(data), occurred_at=_paid_at(data, outcome))

    async def request_refund(self, request: RefundRequest) -> CollectionAccepted:
        raise ProviderError("IremboPay has no refund API: refund bank payments through the bank and "
                            "mobile-money payments by a transfer, then record the refund manually",
                            retryable=False, code=REFUND_UNSUPPORTED)

    async def refund_status(self, provider_reference: str, currency: str) -> StatusResult:
        raise ProviderError("IremboPay has no refund API: send the money back through the bank (a bank payment) or "
                            "by a mobile-money transfer", retryable=False, code=REFUND_UNSUPPORTED)

    # --- inbound --------------------------------------------------------------------------------

    async def verify_callback(self, callback: InboundCallback) -> None:
        header = _header(callback.headers, SIGNATURE_HEADER)
        if not header:
            raise CallbackRejected("missing irembopay-signature header")
        parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
        t, s = parts.get("t", ""), parts.get("s", "")
        if not is_number(t) or len(t) > 15 or not s:  # ms since 1970: 13 digits
            raise CallbackRejected("malformed irembopay-signature header")
        # As bytes: a header byte outside ASCII (read as a surrogate escape) made compare_digest raise TypeError.
        given = s.lower().encode("utf-8", "surrogateescape")
        # The current key first, then each IREMBOPAY_SECRET_KEY_PREVIOUS (a rotation's overlap: IremboPay signs with
        # the key it holds until it is changed there). Only this check falls back; every call to IremboPay sends the
        # current key (_send).
        keys = (self._config.secret("secret_key"), *self._config.previous_secrets("secret_key"))
        signed_with = next((n for n, key in enumerate(keys)
                            if hmac.compare_digest(sign(key, int(t), callback.body).encode(), given)), None)
        if signed_with is None:
            raise CallbackRejected("irembopay signature does not match")
        # The timestamp is in milliseconds (PROTOCOLS.md); a skew either way beyond the tolerance fails.
        now_ms = int(self._clock().timestamp() * 1000)
        if abs(now_ms - int(t)) > self._tolerance * 1000:
            raise CallbackRejected("irembopay signature timestamp outside the tolerance")
        # Checked last, so only a genuine signature can use up its one-time key.
        if not await self._nonce_store(_nonce_key(s), 2 * self._tolerance):
            raise CallbackRejected("irembopay webhook already received (replay)", status=409)
        if signed_with:
            previous_secret_used("irembopay_secret_key", "IREMBOPAY_SECRET_KEY_PREVIOUS")

    async def release_callback(self, callback: InboundCallback) -> None:
        """We could not process a verified webhook (database down): let IremboPay's retry through."""
        forget = getattr(self._nonce_store, "forget", None)
        header = _header(callback.headers, SIGNATURE_HEADER) or ""
        parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
        if forget is not None and parts.get("s"):
            await forget(_nonce_key(parts["s"]))

    def parse_callback(self, callback: InboundCallback) -> ProviderEvent:
        try:
            body = json.loads(callback.body)
        except JSON_ERRORS:
            raise CallbackRejected("IremboPay webhook is not JSON", status=400) from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise CallbackRejected("IremboPay webhook has no data object", status=400)
        reference, invoice = data.get("transactionId"), data.get("invoiceNumber")
        if not isinstance(reference, str) or not reference or not isinstance(invoice, str) or not invoice:
            raise CallbackRejected("IremboPay webhook without transactionId or invoiceNumber", status=400)
        status = str(data.get("paymentStatus"))
        outcome = STATUS.get(status)
        if outcome is None:
            PROVIDER_ERRORS.labels(self.name, "callback").inc()
            log.error("irembopay webhook with unknown paymentStatus",
                      extra={"payment_status": status, "invoice_number": invoice})
            raise CallbackRejected(f"unknown IremboPay paymentStatus {status!r}", status=400, reference=reference)
        amount = None
        if data.get("amount") is not None:
            try:
                amount = Money.from_api(data["amount"], str(data.get("currency") or "RWF"))
            except MoneyError:
                raise CallbackRejected(f"IremboPay amount {data['amount']!r} / currency "
                                       f"{data.get('currency')!r} not understood", status=400) from None
        raw = dict(data)
        event_id = f"{invoice}:{status}"
        paid_with = data.get("paymentReference")
        if isinstance(paid_with, str | int) and not isinstance(paid_with, bool) and str(paid_with).strip():
            # One invoice can be paid twice (a second push approved, a bank transfer after a mobile payment):
            # each payment has its own paymentReference, which IremboPay's retries of a webhook repeat. In the
            # event id, a second payment is not dropped as a duplicate of the first; as the money reference,
            # the core tells it from the first (core.ports.MONEY_REFERENCE): the invoice number is the same.
            paid_with = str(paid_with).strip()[:100]
            event_id += f":{paid_with}"
            raw[MONEY_REFERENCE] = paid_with
        return ProviderEvent(
            provider=self.name, kind=EventKind.COLLECTION, event_id=event_id,
            reference=reference, outcome=outcome, amount=amount, provider_transaction_id=invoice,
            reason=FAILED_REASON if outcome is ProviderOutcome.FAILED else None,
            needs_confirmation=False, raw=raw, occurred_at=_paid_at(data, outcome))

    # --- plumbing -------------------------------------------------------------------------------

    def _remember(self, provider_reference: str, invoice_number: str) -> None:
        if len(self._invoices) >= _MEMO_SIZE:
            self._invoices.pop(next(iter(self._invoices)))
        self._invoices[provider_reference] = invoice_number

    async def _send(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to IremboPay (providers.calls.send; its errors are counted as _error reads them)."""
        headers = {"irembopay-secretKey": self._config.secret("secret_key"), "X-API-Version": "2",
                   "Accept": "application/json"}
        return await send(self._http, provider=self.name, operation=operation, method=method, url=self._base + path,
                          timeouts=self._timeouts, creates=operation in _CREATES, headers=headers, label="IremboPay",
                          count_5xx=False, **kwargs)

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _error(self, operation: str, resp: httpx.Response, answer: Mapping[str, Any]) -> ProviderError:
        code = _error_code(resp, answer)
        detail = _first_error(answer).get("detail") or answer.get("message") or resp.reason_phrase
        message = scrub(str(detail))
        retryable = ERRORS.get(code, resp.status_code >= 500 or resp.status_code == 429)
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        log.warning("irembopay %s refused", operation,
                    extra={"http_status": resp.status_code, "error_code": code, "error": message})
        if resp.status_code == 401:  # its secret key refused: our configuration
            credentials_refused(self.name, operation, message)
            return CredentialsRefused(f"IremboPay refused the gateway's credentials for {operation} "
                                      f"({resp.status_code} {code}): {message}", code=code)
        if resp.status_code == 429 and code not in ERRORS:
            # Its rate limit refused it, nothing processed (providers.calls.send turned a push back): as
            # http_error's, HTTP_429 (core.outbox.NOTHING_PROCESSED) with its Retry-After. (One of its own codes
            # keeps what it says: PAYMENT_PROVIDER_ERROR's push is asked about.)
            return ProviderBusy(f"IremboPay is rate limiting {operation} ({resp.status_code} {code}): {message}",
                                code="HTTP_429", retry_after=retry_after(resp))
        return ProviderError(f"IremboPay {operation} refused ({resp.status_code} {code}): {message}",
                             retryable=retryable, code=code)

    def _fail(self, operation: str, message: str) -> ProviderError:
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        log.warning("irembopay %s: %s", operation, message)
        return ProviderError(f"IremboPay {operation}: {message}", retryable=False, code="BAD_ANSWER")


def _customer_phone(payer: Phone | None) -> str | None:
    """The payer's number as an invoice's customer.phoneNumber (07xxxxxxxx), for a Rwandan mobile number only. A bank
    payment's account is any text, taken for a number when it starts with "+": one that is none crashed the collect
    job, and another country's in local form reads as someone else's Rwandan number (+254788123456 as 0788123456)."""
    if payer is None:
        return None
    try:
        phone = normalize(payer.e164, "RW")
    except PhoneError:
        return None
    return phone.national if phone.region == "RW" else None


def _first_error(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    errors = answer.get("errors")
    return errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}


def _error_code(resp: httpx.Response, answer: Mapping[str, Any]) -> str:
    """An error answer's code (`errors[0].code`, else `code`), else its HTTP status."""
    return str(_first_error(answer).get("code") or answer.get("code") or resp.status_code)


def _whole_seconds(moment: datetime | None) -> datetime | None:
    """`moment` as the invoice's expiryAt carries it: UTC, to the second (_create_invoice writes it so)."""
    return moment.astimezone(UTC).replace(microsecond=0) if moment is not None else None


def _expires_at(invoice: Mapping[str, Any]) -> datetime | None:
    """An invoice's expiryAt (one written without an offset is Kigali time), to the second; None without one."""
    return _whole_seconds(provider_time(invoice.get("expiryAt"), _KIGALI))


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), "")


_KIGALI = ZoneInfo("Africa/Kigali")


def _paid_at(data: Mapping[str, Any], outcome: ProviderOutcome) -> datetime | None:
    """When the invoice was paid (`paidAt`; one written without an offset is Kigali time), for a PAID one only."""
    return provider_time(data.get("paidAt"), _KIGALI) if outcome is ProviderOutcome.SUCCEEDED else None
