"""MTN MoMo adapter: request to pay, status, Disbursement refunds, callbacks into ProviderEvent."""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import httpx

from core.config import MTN_ENVIRONMENT_CURRENCY, ProviderConfig
from core.inbound import JSON_ERRORS
from core.logs import scrub
from core.money import Money, MoneyError
from core.phone import mask
from core.ports import (
    REQUEST_UNKNOWN,
    CallbackRejected,
    CollectionAccepted,
    CollectionRequest,
    EventKind,
    InboundCallback,
    ProviderError,
    ProviderEvent,
    ProviderOutcome,
    RefundRequest,
    StatusResult,
)
from providers.calls import http_error, json_body, send, taken_unconfirmed, timeout_from, with_query
from providers.tokens import TokenCache

log = logging.getLogger("gateway.providers.mtn_momo")

NAME = "mtn_momo"

# MTN status -> core outcome. PENDING/SUCCESSFUL/FAILED are documented; the others appear in some
# sandbox answers and are mapped rather than refused.
STATUS: dict[str, ProviderOutcome] = {
    "PENDING": ProviderOutcome.PENDING,
    "CREATED": ProviderOutcome.PENDING,
    "ONGOING": ProviderOutcome.PENDING,
    "SUCCESSFUL": ProviderOutcome.SUCCEEDED,
    "FAILED": ProviderOutcome.FAILED,
    "REJECTED": ProviderOutcome.CANCELLED,
    "TIMEOUT": ProviderOutcome.EXPIRED,
}
# A FAILED status says more through its reason.
FAILED_REASON_OUTCOME: dict[str, ProviderOutcome] = {
    "APPROVAL_REJECTED": ProviderOutcome.CANCELLED,
    "EXPIRED": ProviderOutcome.EXPIRED,
}
REASON_WORDS: dict[str, str] = {
    "APPROVAL_REJECTED": "the payer declined the payment",
    "EXPIRED": "the payer did not approve in time",
    "PAYER_NOT_FOUND": "the number has no MTN MoMo account",
    "PAYEE_NOT_FOUND": "the receiving account does not exist",
    "NOT_ENOUGH_FUNDS": "the payer does not have enough money",
    "PAYER_LIMIT_REACHED": "the payer has reached a transaction limit",
    "COULD_NOT_PERFORM_TRANSACTION": "MTN could not perform the transaction",
    "INTERNAL_PROCESSING_ERROR": "MTN had an internal error",
    "SERVICE_UNAVAILABLE": "MTN MoMo is unavailable",
    "TRANSACTION_CANCELED": "the transaction was cancelled",
}
_NOTE_LIMIT = 160
# What payerMessage / payeeNote keep: MTN is reported to refuse a request whose notes hold '&' (and then has no
# such request when asked), and to answer 500 to an empty one; which other characters it refuses is not
# documented, so only these go (accents are dropped first: "Réparation" goes as "Reparation").
_NOTE_REFUSED = re.compile(r"[^A-Za-z0-9 _.,/-]+")


class UnknownStatus(ValueError):
    """MTN sent a status this adapter does not know: never guess what happened to money."""


def _reason(raw: object) -> tuple[str | None, str | None]:
    """(code, plain words) from a reason given as a string or as {code, message}."""
    if isinstance(raw, Mapping):
        code = raw.get("code")
        message = raw.get("message")
        code = str(code) if code else None
        return code, REASON_WORDS.get(code or "") or (scrub(str(message)) if message else code)
    if isinstance(raw, str) and raw:
        return raw, REASON_WORDS.get(raw, scrub(raw))
    return None, None


def _outcome(status: object, reason_code: str | None) -> ProviderOutcome:
    if not isinstance(status, str) or status not in STATUS:
        raise UnknownStatus(f"unknown MTN MoMo status {status!r}")
    outcome = STATUS[status]
    if outcome is ProviderOutcome.FAILED and reason_code in FAILED_REASON_OUTCOME:
        return FAILED_REASON_OUTCOME[reason_code]
    return outcome


def _amount(body: Mapping[str, Any]) -> Money | None:
    if body.get("amount") in (None, "") or not body.get("currency"):
        return None
    return Money.from_api(body["amount"], str(body["currency"]))


def _scrubbed(body: Mapping[str, Any]) -> dict[str, Any]:
    """The wire body kept for the record, with the payer's or payee's number masked."""
    kept = dict(body)
    for party in ("payer", "payee"):
        value = kept.get(party)
        if isinstance(value, Mapping) and value.get("partyId"):
            kept[party] = {**value, "partyId": mask("+" + str(value["partyId"]).lstrip("+"))}
    return kept


def _status_result(body: Mapping[str, Any]) -> StatusResult:
    code, words = _reason(body.get("reason"))
    outcome = _outcome(body.get("status"), code)
    try:
        amount = _amount(body)
    except MoneyError as exc:
        raise ProviderError(f"MTN MoMo sent an amount we cannot read: {exc}", retryable=False) from None
    return StatusResult(outcome=outcome, amount=amount,
                        provider_transaction_id=body.get("financialTransactionId") or None,
                        reason=words if outcome is not ProviderOutcome.SUCCEEDED else None,
                        raw=_scrubbed(body))


def _note(text: str, fallback: str) -> str:
    """`text` as a payerMessage / payeeNote MTN takes: letters, digits, spaces and -_.,/ only, one space between
    words, at most 160 characters; `fallback` (our payment reference) when nothing is left: never an empty one."""
    for candidate in (text, fallback):
        plain = unicodedata.normalize("NFKD", candidate).encode("ascii", "ignore").decode("ascii")
        kept = " ".join(_NOTE_REFUSED.sub(" ", plain).split())[:_NOTE_LIMIT].rstrip()
        if kept:
            return kept
    return "payment"


def _detail(response: httpx.Response) -> str:
    """MTN's words for a refusal or failure, the payer's number masked: some name it ("Account holder with
    FRI:<number>/MSISDN not found"), and they become a payment's failureReason and a job's lastError."""
    body = json_body(response)
    return scrub(str(body.get("message") or body.get("code") or body.get("error") or "no details"))


class MtnMomoAdapter:
    """Collections for MOBILE_MONEY_MTN; refunds are Disbursement transfers with their own credentials."""

    name = NAME
    supports_partial_refund = True
    refund_names_request = True  # referenceIdToRefund: the request to pay's X-Reference-Id
    methods = frozenset({"MOBILE_MONEY_MTN"})
    currencies: frozenset[str] | None = None

    def __init__(self, http: httpx.AsyncClient, config: ProviderConfig) -> None:
        self._http = http
        self._config = config
        self._base = config.base_url.rstrip("/")
        self._timeout = timeout_from(config)
        self._environment = config.options.get("target_environment") or "sandbox"
        # The account collects in its market's currency only (MTN_MOMO_CURRENCY, else the target environment's);
        # in the sandbox with none configured, any.
        currency = config.options.get("currency") or MTN_ENVIRONMENT_CURRENCY.get(self._environment)
        self.currencies = frozenset({currency}) if currency else None
        self._tokens = {
            "collection": TokenCache(lambda: self._fetch_token("collection")),
            "disbursement": TokenCache(lambda: self._fetch_token("disbursement")),
        }

    # credentials ------------------------------------------------------------
    def _product_credentials(self, product: str) -> tuple[str, str, str]:
        """(api user, api key, subscription key) for a product."""
        c = self._config
        if product == "collection":
            return c.secret("api_user"), c.secret("api_key"), c.secret("subscription_key")
        return (c.secret("disbursement_api_user") or c.secret("api_user"),
                c.secret("disbursement_api_key") or c.secret("api_key"),
                c.secret("disbursement_subscription_key"))

    async def _fetch_token(self, product: str) -> tuple[str, float]:
        user, key, subscription = self._product_credentials(product)
        response = await send(self._http, provider=NAME, operation=f"{product}_token", method="POST",
                              url=f"{self._base}/{product}/token/", timeouts=self._timeout, creates=False,
                              headers={"Ocp-Apim-Subscription-Key": subscription}, auth=(user, key))
        if response.status_code != 200:
            raise http_error(NAME, f"{product}_token", response, _detail(response))
        body = json_body(response)
        token = body.get("access_token")
        try:
            lifetime = float(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600.0
        if not isinstance(token, str) or not token:
            raise ProviderError("MTN MoMo token answer has no access_token", retryable=True)
        return token, lifetime

    async def _call(self, product: str, operation: str, method: str, path: str, *, creates: bool,
                    headers: Mapping[str, str] | None = None, body: Any = None) -> httpx.Response:
        """Send with the product's bearer token; a 401 (token revoked early) is retried once."""
        _, _, subscription = self._product_credentials(product)
        for attempt in (1, 2):
            token = await self._tokens[product].get()
            all_headers = {"Authorization": f"Bearer {token}", "Ocp-Apim-Subscription-Key": subscription,
                           "X-Target-Environment": self._environment, **(headers or {})}
            response = await send(self._http, provider=NAME, operation=operation, method=method,
                                  url=f"{self._base}{path}", timeouts=self._timeout, creates=creates,
                                  headers=all_headers, json=body)
            if response.status_code == 401 and attempt == 1:
                # A 401 means nothing was processed, so sending the same reference again is safe.
                self._tokens[product].invalidate(token)
                continue
            return response
        raise AssertionError("unreachable")

    async def prepare(self, operation: str) -> None:
        """The product's token a request to pay ("collect": collection) or a refund ("refund": disbursement) is
        sent with, obtained before the core counts the request as sent (core.jobs.ready_to_send): a token
        endpoint slow or failing then costs the job a retry, not a request taken for one that may have arrived."""
        await self._tokens["disbursement" if operation == "refund" else "collection"].get()

    # collections ------------------------------------------------------------
    async def request_collection(self, request: CollectionRequest) -> CollectionAccepted:
        if request.payer is None:
            raise ProviderError("MTN MoMo needs the payer's phone number", retryable=False, code="NO_PAYER")
        if self.currencies is not None and request.amount.currency not in self.currencies:
            # Refused when the payment was asked for (core.ports.amount_refusal); kept as a guard.
            raise ProviderError(f"this MTN MoMo account ({self._environment}) collects "
                                f"{', '.join(sorted(self.currencies))} only, not {request.amount.currency}",
                                retryable=False, code="CURRENCY_UNSUPPORTED")
        headers = {"X-Reference-Id": request.provider_reference}
        if request.callback_url:
            headers["X-Callback-Url"] = with_query(request.callback_url, ref=request.provider_reference)
        body = {
            "amount": str(request.amount.to_api()),
            "currency": request.amount.currency,
            # Our reference doubles as externalId: MTN echoes it in every callback.
            "externalId": request.provider_reference,
            "payer": {"partyIdType": "MSISDN", "partyId": request.payer.digits},
            "payerMessage": _note(request.description, request.payment_reference),
            "payeeNote": _note(request.payment_reference, "payment"),
        }
        response = await self._call("collection", "request_to_pay", "POST", "/collection/v1_0/requesttopay",
                                    creates=True, headers=headers, body=body)
        log_extra = {"provider_reference": request.provider_reference, "payer": request.payer.masked()}
        if response.status_code == 202:
            log.info("MTN MoMo accepted request to pay", extra=log_extra)
            return CollectionAccepted()
        if response.status_code == 409:
            # We sent this reference before (a retry after a lost answer): the first request stands.
            log.info("MTN MoMo already has this request to pay", extra=log_extra)
            return CollectionAccepted()
        if response.is_success:
            raise taken_unconfirmed(NAME, "request_to_pay", response, "ask the status, do not send again",
                                    label="MTN MoMo")
        raise http_error(NAME, "request_to_pay", response, _detail(response))

    async def collection_status(self, provider_reference: str, provider_transaction_id: str | None,
                                currency: str) -> StatusResult:
        response = await self._call("collection", "request_to_pay_status", "GET",
                                    f"/collection/v1_0/requesttopay/{provider_reference}", creates=False)
        return self._status_answer(response, "request_to_pay_status", "request to pay")

    # refunds ----------------------------------------------------------------
    async def request_refund(self, request: RefundRequest) -> CollectionAccepted:
        if request.original_provider_reference.startswith(REQUEST_UNKNOWN):
            # A payment recorded from the statement without its request's reference, whose refund was queued
            # before core.refunds refused them: MTN never had that value. Refused unsent.
            raise ProviderError("the payment's request to pay is not known (recorded from MTN's statement without "
                                "its reference), and an MTN refund names it: record the money MTN sends back with "
                                "returnedByProvider", retryable=False, code="NO_REQUEST_TO_REFUND")
        headers = {"X-Reference-Id": request.provider_reference}
        if request.callback_url:
            headers["X-Callback-Url"] = with_query(request.callback_url, ref=request.provider_reference,
                                                   kind="refund")
        body = {
            "amount": str(request.amount.to_api()),
            "currency": request.amount.currency,
            "externalId": request.provider_reference,
            # The member sees the notes in her wallet: our neutral note, never the admin's reason.
            "payerMessage": _note(request.note, "refund"),
            "payeeNote": _note(request.note, "refund"),
            "referenceIdToRefund": request.original_provider_reference,
        }
        response = await self._call("disbursement", "refund", "POST", "/disbursement/v1_0/refund",
                                    creates=True, headers=headers, body=body)
        if response.status_code in (202, 409):
            log.info("MTN MoMo accepted refund", extra={"provider_reference": request.provider_reference,
                                                       "duplicate": response.status_code == 409})
            return CollectionAccepted()
        if response.is_success:
            raise taken_unconfirmed(NAME, "refund", response, "ask its status, do not send again", label="MTN MoMo")
        raise http_error(NAME, "refund", response, _detail(response))

    async def refund_status(self, provider_reference: str, currency: str) -> StatusResult:
        response = await self._call("disbursement", "refund_status", "GET",
                                    f"/disbursement/v1_0/refund/{provider_reference}", creates=False)
        return self._status_answer(response, "refund_status", "refund")

    def _status_answer(self, response: httpx.Response, operation: str, thing: str) -> StatusResult:
        if response.status_code == 404:
            raise ProviderError(f"MTN MoMo has no {thing} with this reference",
                                retryable=False, code="NOT_FOUND")
        if response.status_code != 200:
            raise http_error(NAME, operation, response, _detail(response))
        body = json_body(response)
        try:
            return _status_result(body)
        except UnknownStatus:
            log.error("MTN MoMo answered an unknown status", extra={"status": str(body.get("status"))})
            raise

    # callbacks --------------------------------------------------------------
    async def verify_callback(self, callback: InboundCallback) -> None:
        """MTN signs nothing: the secret in the callback URL (checked by the route) is all there is.

        That is why every MTN event asks for confirmation by a status query.
        """

    def parse_callback(self, callback: InboundCallback) -> ProviderEvent:
        try:
            body = json.loads(callback.body)
        except JSON_ERRORS:
            raise CallbackRejected("MTN MoMo callback is not JSON", status=400) from None
        if not isinstance(body, dict):
            raise CallbackRejected("MTN MoMo callback is not a JSON object", status=400)
        reference = body.get("referenceId") or callback.query.get("ref") or body.get("externalId")
        if not isinstance(reference, str) or not reference:
            raise CallbackRejected("MTN MoMo callback names no reference", status=400)
        try:
            result = _status_result(body)
        except UnknownStatus as exc:
            raise CallbackRejected(str(exc), status=400, reference=reference) from None
        except ProviderError as exc:
            raise CallbackRejected(str(exc), status=400, reference=reference) from None
        status = body["status"]
        event_id = f"{reference}:{status}"
        if result.provider_transaction_id:
            event_id += f":{result.provider_transaction_id}"
        kind = EventKind.REFUND if callback.query.get("kind") == "refund" else EventKind.COLLECTION
        return ProviderEvent(provider=NAME, kind=kind, event_id=event_id, reference=reference,
                             outcome=result.outcome, amount=result.amount,
                             provider_transaction_id=result.provider_transaction_id, reason=result.reason,
                             needs_confirmation=True, raw=result.raw)
