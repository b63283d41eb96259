"""Airtel Money adapter: collection, status enquiry, hashed callbacks, full refunds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from core import config as core_config
from core.auth import previous_secret_used
from core.config import ProviderConfig
from core.cooperatives import COUNTRY_CURRENCY
from core.inbound import JSON_ERRORS
from core.logs import scrub
from core.metrics import PROVIDER_ERRORS
from core.money import Money, exponent
from core.ports import (
    CallbackRejected,
    CollectionAccepted,
    CollectionRequest,
    EventKind,
    InboundCallback,
    ProviderError,
    ProviderEvent,
    ProviderOutcome,
    ProviderTimeout,
    RefundRequest,
    StatusResult,
)
from providers.calls import http_error, json_body, send, taken_unconfirmed, timeout_from
from providers.tokens import TokenCache

log = logging.getLogger("gateway.providers.airtel")

NAME = "airtel"

# Airtel transaction status -> core outcome (status enquiry and callback status_code).
STATUS: dict[str, ProviderOutcome] = {
    "TS": ProviderOutcome.SUCCEEDED,
    "TF": ProviderOutcome.FAILED,
    "TA": ProviderOutcome.AMBIGUOUS,
    "TIP": ProviderOutcome.PENDING,
    "TE": ProviderOutcome.EXPIRED,
}
DUPLICATE = "ESB000041"  # the transaction id was used before: our earlier request stands
# Response codes (status.response_code) by which Airtel says a transaction is not settled yet, whatever its success
# flag says: DP00800001000 "Ambiguous" (still processing: do the transaction enquiry), DP00800001006 "In process",
# DP00800001024 "Transaction timed out" (Airtel's disbursement list says a timed-out one may have been processed or
# failed). Its money may still move, so it is never failed: as unanswered, the status enquiry settles a collection
# (a refund, having no enquiry, waits for a person). The other DP008 codes (incorrect PIN, not enough balance,
# refused, do not honour, expired...) are definite failures.
IN_DOUBT = frozenset({"DP00800001000", "DP00800001006", "DP00800001024"})
# The status enquiry says Airtel has no transaction with our id: HTTP 404 (our recorded answer: 404, ESB000008
# "Transaction not found"), or this result code ("No transaction found with provided transaction id", in Airtel's
# code list, where ESB000008 alone is "Field validation"). Any other refusal (ESB000001 "Something went wrong",
# ESB000014 "error while fetching the status") says nothing about the transaction: read as "not found", a
# payment Airtel charged would end "nothing was taken".
NOT_FOUND_CODE = "ESB000045"
TOKEN_LIFETIME = 180.0
# Currencies whose cents no Airtel Money wallet holds, though ISO 4217 gives them two decimals: the Tanzanian
# shilling's cents have long left circulation, and wallets in Tanzania hold and move whole shillings only. A TZS
# amount with cents ("1,500.50 TZS") was sent as "1500.50" and offered to members on USSD; it is refused when
# asked for (amount_rule), and a whole amount goes on the wire as the whole number it is.
_WHOLE_UNITS = frozenset({"TZS"})


def _wire_amount(amount: Money) -> int | float:
    """The amount as Airtel's body carries it: a JSON number, as Airtel's own examples and clients send it
    (`"amount": 1000`; a string, "1500.00", is not what it documents). A whole number when there are no cents
    (KES 1,500.00 as 1500; always in a currency of whole units here: 25000 TZS), else the number with its cents
    (1500.5): a float only on the wire, the one nearest the decimal amount (a division is correctly rounded), which
    JSON writes back as exactly that decimal (the shortest text that reads back as it)."""
    scale = 10 ** exponent(amount.currency)
    if amount.currency in _WHOLE_UNITS or amount.minor % scale == 0:
        return amount.minor // scale
    return amount.minor / scale


class UnknownStatus(ValueError):
    """Airtel sent a status this adapter does not know: never guess what happened to money."""


@dataclass(frozen=True)
class SettledRefund(CollectionAccepted):
    """Airtel answers a refund with its outcome at once and offers no refund status query."""

    outcome: ProviderOutcome = ProviderOutcome.SUCCEEDED


def callback_hash(transaction: Mapping[str, Any], key: str) -> str:
    """base64(HMAC-SHA256(JSON of the transaction object, key)), as Airtel's callback authentication."""
    message = json.dumps(transaction, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest()).decode()


def _hash_matches(given: str, transaction: Mapping[str, Any], key: str) -> bool:
    """Whether `given` is the transaction's hash under `key`. The serialisation Airtel hashes is not documented
    precisely: compact or spaced JSON is accepted (the spaced one built only when the compact one does not match)."""
    if hmac.compare_digest(given.encode(), callback_hash(transaction, key).encode()):
        return True
    spaced = base64.b64encode(hmac.new(key.encode(), json.dumps(transaction).encode(), hashlib.sha256).digest())
    return hmac.compare_digest(given.encode(), spaced)


def _status_block(body: Mapping[str, Any]) -> Mapping[str, Any]:
    block = body.get("status")
    return block if isinstance(block, Mapping) else {}


def _transaction(body: Mapping[str, Any]) -> Mapping[str, Any]:
    data = body.get("data")
    tx = data.get("transaction") if isinstance(data, Mapping) else None
    return tx if isinstance(tx, Mapping) else {}


def _succeeded(block: Mapping[str, Any]) -> bool:
    return block.get("success") is True or str(block.get("success")).lower() == "true"


def _detail(body: Mapping[str, Any]) -> str:
    """Airtel's words for a refusal, the subscriber's number masked (they become a payment's failureReason and a
    job's lastError)."""
    block = _status_block(body)
    message = scrub(str(block.get("message") or body.get("error_description") or body.get("error") or "no details"))
    code = block.get("result_code") or block.get("response_code")
    return f"{message} ({code})" if code else message


def _words(message: object) -> str | None:
    """A transaction's message as a failure reason, the subscriber's number masked; None when it has none."""
    return scrub(str(message)) if message else None


def _unreadable(operation: str, then: str) -> ProviderTimeout:
    """A request that moves money answered 200 with no `status` block we can read (not JSON, cut off, a proxy's
    page): not Airtel's refusal, and it may have been carried out. As unanswered: its status settles it."""
    PROVIDER_ERRORS.labels(provider=NAME, operation=operation).inc()
    return ProviderTimeout(f"Airtel Money {operation} answered 200 without a status we can read: it may have been "
                           f"carried out; {then}")


def _in_doubt(operation: str, answer: Mapping[str, Any], then: str) -> ProviderTimeout:
    """A request that moves money answered with a response code of IN_DOUBT: it may be carried out yet."""
    return ProviderTimeout(f"Airtel Money {operation} not settled yet: {_detail(answer)}; {then}")


def _outcome(status: object) -> ProviderOutcome:
    if not isinstance(status, str) or status not in STATUS:
        raise UnknownStatus(f"unknown Airtel Money status {status!r}")
    return STATUS[status]


class AirtelAdapter:
    """Collections for MOBILE_MONEY_AIRTEL. Refunds return the whole payment only."""

    name = NAME
    supports_partial_refund = False
    refund_names_request = False  # by the payment's airtel_money_id
    methods = frozenset({"MOBILE_MONEY_AIRTEL"})
    currencies: frozenset[str] | None = None

    @staticmethod
    def amount_rule(amount: Money) -> str | None:
        """Why Airtel Money cannot take `amount` (whole units of a currency its wallets hold no cents of),
        checked when the payment is asked for."""
        if amount.currency in _WHOLE_UNITS and amount.minor % 10 ** exponent(amount.currency):
            return f"Airtel Money takes whole units of {amount.currency}; {amount.format()} has cents"
        return None

    def __init__(self, http: httpx.AsyncClient, config: ProviderConfig) -> None:
        self._http = http
        self._config = config
        self._base = config.base_url.rstrip("/")
        self._timeout = timeout_from(config)
        # The account's country and currency: one country on the whole wire (headers and body), and payments in
        # its currency only (AIRTEL_COUNTRY, AIRTEL_CURRENCY; the currency defaults to the country's).
        self._country = (config.options.get("country") or "RW").upper()
        currency = config.options.get("currency") or COUNTRY_CURRENCY.get(self._country)
        self.currencies = frozenset({currency}) if currency else None
        self._tokens = TokenCache(self._fetch_token)
        key = config.secret("callback_key")
        # The development placeholder means "callback authentication not set up": callbacks are then
        # treated as unsigned hints and confirmed by a status query.
        self._callback_key = key if key and key != core_config.DEV_CREDENTIAL else ""
        # AIRTEL_CALLBACK_KEY_PREVIOUS (a rotation's overlap): callbacks Airtel still hashes with a key the current one
        # replaced verify too. Nothing the gateway sends uses the callback key.
        self._previous_keys = config.previous_secrets("callback_key") if self._callback_key else ()

    async def _fetch_token(self) -> tuple[str, float]:
        body = {"client_id": self._config.secret("client_id"),
                "client_secret": self._config.secret("client_secret"), "grant_type": "client_credentials"}
        response = await send(self._http, provider=NAME, operation="token", method="POST",
                              url=f"{self._base}/auth/oauth2/token", timeouts=self._timeout, creates=False,
                              headers={"Accept": "*/*"}, json=body)
        answer = json_body(response)
        if response.status_code != 200:
            raise http_error(NAME, "token", response, _detail(answer))
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderError("Airtel Money token answer has no access_token", retryable=True)
        try:
            lifetime = float(answer.get("expires_in", TOKEN_LIFETIME))  # a string: "180"
        except (TypeError, ValueError):
            lifetime = TOKEN_LIFETIME
        return token, lifetime

    async def _call(self, operation: str, method: str, path: str, *, currency: str, creates: bool,
                    body: Any = None) -> tuple[httpx.Response, dict[str, Any]]:
        for attempt in (1, 2):
            token = await self._tokens.get()
            headers = {"Authorization": f"Bearer {token}", "X-Country": self._country, "X-Currency": currency,
                       "Accept": "*/*"}
            response = await send(self._http, provider=NAME, operation=operation, method=method,
                                  url=f"{self._base}{path}", timeouts=self._timeout, creates=creates,
                                  headers=headers, json=body)
            if response.status_code == 401 and attempt == 1:
                # Nothing was processed under a rejected token; the same id may go again.
                self._tokens.invalidate(token)
                continue
            return response, json_body(response)
        raise AssertionError("unreachable")

    async def prepare(self, operation: str) -> None:
        """The OAuth token a collection or a refund is sent with, obtained before the core counts the request
        as sent (core.jobs.ready_to_send): a token endpoint slow or failing then costs the job a retry, never
        a refund taken for one that may have been carried out (it names only the payment: never resent)."""
        await self._tokens.get()

    # collections ------------------------------------------------------------
    async def request_collection(self, request: CollectionRequest) -> CollectionAccepted:
        if request.payer is None:
            raise ProviderError("Airtel Money needs the payer's phone number", retryable=False,
                                code="NO_PAYER")
        currency = request.amount.currency
        if self.currencies is not None and currency not in self.currencies:
            # Refused when the payment was asked for (core.ports.amount_refusal); kept as a guard.
            raise ProviderError(f"this Airtel Money account ({self._country}) collects "
                                f"{', '.join(sorted(self.currencies))} only, not {currency}", retryable=False,
                                code="CURRENCY_UNSUPPORTED")
        problem = self.amount_rule(request.amount)
        if problem:
            # Refused when the payment was asked for (core.ports.amount_refusal); kept as a guard.
            raise ProviderError(problem, retryable=False, code="AMOUNT_HAS_CENTS")
        if request.payer.region != self._country:
            # The subscriber's msisdn goes without its country code: only the account's country can be meant.
            raise ProviderError(f"this Airtel Money account ({self._country}) cannot collect from a "
                                f"{request.payer.region or 'foreign'} number", retryable=False,
                                code="COUNTRY_UNSUPPORTED")
        country = self._country
        body = {
            "reference": request.payment_reference,
            "subscriber": {"country": country, "currency": currency,
                           "msisdn": request.payer.national_significant},  # without country code
            "transaction": {"amount": _wire_amount(request.amount), "country": country, "currency": currency,
                            "id": request.provider_reference},
        }
        response, answer = await self._call("collection", "POST", "/merchant/v1/payments/", currency=currency,
                                            creates=True, body=body)
        block = _status_block(answer)
        log_extra = {"provider_reference": request.provider_reference, "payer": request.payer.masked()}
        if block.get("result_code") == DUPLICATE:
            log.info("Airtel Money already has this transaction id", extra=log_extra)
            return CollectionAccepted()
        if response.is_success and _succeeded(block):
            log.info("Airtel Money accepted collection", extra=log_extra)
            return CollectionAccepted()
        if response.is_success and block.get("response_code") in IN_DOUBT:
            raise _in_doubt("collection", answer, "ask the status, do not send again")
        if response.status_code == 200 and not block:
            raise _unreadable("collection", "ask the status, do not send again")
        if response.is_success and response.status_code != 200:
            raise taken_unconfirmed(NAME, "collection", response, "ask the status, do not send again",
                                    label="Airtel Money")
        if response.status_code == 200:
            # 200 with success false: Airtel refused the request itself.
            PROVIDER_ERRORS.labels(provider=NAME, operation="collection").inc()
            raise ProviderError(f"Airtel Money refused the collection: {_detail(answer)}", retryable=False,
                                code=str(block.get("result_code") or "REFUSED"))
        raise http_error(NAME, "collection", response, _detail(answer))

    async def collection_status(self, provider_reference: str, provider_transaction_id: str | None,
                                currency: str) -> StatusResult:
        response, answer = await self._call("collection_status", "GET",
                                            f"/standard/v1/payments/{provider_reference}", currency=currency,
                                            creates=False)
        tx = _transaction(answer)
        block = _status_block(answer)
        if response.status_code == 404 or block.get("result_code") == NOT_FOUND_CODE:
            raise ProviderError(f"Airtel Money has no transaction with this id: {_detail(answer)}",
                                retryable=False, code="NOT_FOUND")
        if response.status_code != 200:
            raise http_error(NAME, "collection_status", response, _detail(answer))
        if not tx.get("status"):
            # An error answered 200 with success false and no transaction: the status is unknown, asked again.
            PROVIDER_ERRORS.labels(provider=NAME, operation="collection_status").inc()
            raise ProviderError(f"Airtel Money status enquiry failed: {_detail(answer)}", retryable=True,
                                code=str(block.get("result_code") or "NO_STATUS"))
        try:
            outcome = _outcome(tx.get("status"))
        except UnknownStatus:
            log.error("Airtel Money answered an unknown status", extra={"status": str(tx.get("status"))})
            raise
        return StatusResult(outcome=outcome, provider_transaction_id=tx.get("airtel_money_id") or None,
                            reason=None if outcome is ProviderOutcome.SUCCEEDED else _words(tx.get("message")),
                            raw=dict(answer))

    # refunds ----------------------------------------------------------------
    async def request_refund(self, request: RefundRequest) -> CollectionAccepted:
        if not request.full:
            raise ProviderError("Airtel Money refunds only the whole payment, not part of it",
                                retryable=False, code="PARTIAL_REFUND_UNSUPPORTED")
        if not request.original_provider_transaction_id:
            raise ProviderError("the payment has no Airtel Money transaction id to refund", retryable=False,
                                code="NO_TRANSACTION_ID")
        currency = request.amount.currency
        body = {"transaction": {"airtel_money_id": request.original_provider_transaction_id}}
        response, answer = await self._call("refund", "POST", "/standard/v1/payments/refund",
                                            currency=currency, creates=True, body=body)
        block = _status_block(answer)
        tx = _transaction(answer)
        if response.is_success and _succeeded(block):
            log.info("Airtel Money refunded", extra={"provider_reference": request.provider_reference})
            return SettledRefund(provider_transaction_id=tx.get("airtel_money_id") or None,
                                 outcome=ProviderOutcome.SUCCEEDED)
        if response.is_success and block.get("response_code") in IN_DOUBT:
            raise _in_doubt("refund", answer, "not sent again")
        if response.status_code == 200 and not block:
            raise _unreadable("refund", "not sent again")
        if response.is_success and response.status_code != 200:
            raise taken_unconfirmed(NAME, "refund", response, "not sent again", label="Airtel Money")
        if response.status_code == 200:
            PROVIDER_ERRORS.labels(provider=NAME, operation="refund").inc()
            raise ProviderError(f"Airtel Money refused the refund: {_detail(answer)}", retryable=False,
                                code=str(block.get("result_code") or "REFUSED"))
        # The request names only the payment (no reference of ours): a refund sent again is not recognised
        # as the same one, and after a first that went through it is refused ("not eligible"). A 5xx is
        # therefore ambiguous, as an unanswered request is: never resent; with no refund status query to
        # ask, the refund is parked for a person to record its outcome.
        raise http_error(NAME, "refund", response, _detail(answer), deduplicated=False)

    async def refund_status(self, provider_reference: str, currency: str) -> StatusResult:
        raise ProviderError("Airtel Money has no refund status query: its outcome cannot be asked",
                            retryable=False, code="NO_REFUND_STATUS")

    # callbacks --------------------------------------------------------------
    @staticmethod
    def _body(callback: InboundCallback) -> dict[str, Any]:
        try:
            body = json.loads(callback.body)
        except JSON_ERRORS:
            raise CallbackRejected("Airtel Money callback is not JSON", status=400) from None
        if not isinstance(body, dict) or not isinstance(body.get("transaction"), dict):
            raise CallbackRejected("Airtel Money callback has no transaction object", status=400)
        return body

    async def verify_callback(self, callback: InboundCallback) -> None:
        """With callback authentication on, `hash` must match the transaction object."""
        if not self._callback_key:
            return
        body = self._body(callback)
        given = body.get("hash")
        if not isinstance(given, str) or not given:
            raise CallbackRejected("Airtel Money callback carries no hash")
        tx = body["transaction"]
        if _hash_matches(given, tx, self._callback_key):
            return
        if any(_hash_matches(given, tx, key) for key in self._previous_keys):
            previous_secret_used("airtel_callback_key", "AIRTEL_CALLBACK_KEY_PREVIOUS")
            return
        raise CallbackRejected("Airtel Money callback hash does not match")

    def parse_callback(self, callback: InboundCallback) -> ProviderEvent:
        body = self._body(callback)
        tx = body["transaction"]
        reference, status = tx.get("id"), tx.get("status_code")
        if not isinstance(reference, str) or not reference:
            raise CallbackRejected("Airtel Money callback has no transaction id", status=400)
        try:
            outcome = _outcome(status)
        except UnknownStatus as exc:
            raise CallbackRejected(str(exc), status=400, reference=reference) from None
        return ProviderEvent(
            provider=NAME, kind=EventKind.COLLECTION, event_id=f"{reference}:{status}", reference=reference,
            outcome=outcome, provider_transaction_id=tx.get("airtel_money_id") or None,
            reason=None if outcome is ProviderOutcome.SUCCEEDED else _words(tx.get("message")),
            needs_confirmation=not self._callback_key, raw=body)
