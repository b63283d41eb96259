"""Safaricom M-Pesa Daraja adapter: STK push, STK query, reversal as refund, callback parsing."""

from __future__ import annotations

import base64
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx

from core.config import ProviderConfig
from core.inbound import JSON_ERRORS
from core.logs import scrub
from core.metrics import PROVIDER_ERRORS
from core.money import Money, MoneyError
from core.phone import mask
from core.ports import (
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
    turned_back,
)
from providers.calls import (
    ProviderBusy,
    credentials_accepted,
    credentials_refused,
    provider_time,
    retry_after,
    send,
    timeout_from,
    with_query,
)
from providers.tokens import TokenCache

log = logging.getLogger(__name__)

try:
    from zoneinfo import ZoneInfo

    _NAIROBI: Any = ZoneInfo("Africa/Nairobi")
except Exception:  # no tz database: Kenya has kept UTC+3 without DST since 1942
    _NAIROBI = timezone(timedelta(hours=3), "EAT")

# STK ResultCode -> core outcome. Callbacks send it as a number, the STK query as a string.
# 1037 ("DS timeout, user cannot be reached") is FAILED, not EXPIRED: the prompt never reached the
# phone, so the payer did not let it lapse; Safaricom has closed the request (no late success can
# follow) and the useful message to the payer is "switch your phone on and try again".
# Daraja's documented failures beyond PROTOCOLS.md's six (1001, 1025, 9999, 17, 26) are as final: nothing was
# taken and the payer may try again. Any other non-zero code is a failure too (0 is Daraja's only success; see
# _stk_outcome), except the query's "still processing" answers (_STILL_PENDING, _STILL_PROCESSING).
STATUS: dict[str, ProviderOutcome] = {
    "0": ProviderOutcome.SUCCEEDED,
    "1": ProviderOutcome.FAILED,
    "1032": ProviderOutcome.CANCELLED,
    "1037": ProviderOutcome.FAILED,
    "2001": ProviderOutcome.FAILED,
    "1019": ProviderOutcome.EXPIRED,
    "1001": ProviderOutcome.FAILED,
    "1025": ProviderOutcome.FAILED,
    "9999": ProviderOutcome.FAILED,
    "17": ProviderOutcome.FAILED,
    "26": ProviderOutcome.FAILED,
}
# M-Pesa's own fault before the prompt reached the payer ("1025", "9999"): nothing to fix on the payer's side.
_PROMPT_NOT_SENT = ("M-Pesa service error: the prompt could not be sent to the payer's phone; nothing was taken, "
                    "pay again")
# What the payer can act on (a payment's failure_reason; channels.sms.templates.reason_key sorts it for the SMS).
REASONS: dict[str, str] = {
    "1": "insufficient funds",
    "1032": "cancelled by the payer",
    "1037": "payer's phone could not be reached",
    "2001": "wrong M-Pesa PIN",
    "1019": "the request expired before the payer approved it",
    "1001": "another M-Pesa transaction was in process on the payer's phone (M-Pesa service busy): "
            "finish it, then pay again",
    "1025": _PROMPT_NOT_SENT,
    "9999": _PROMPT_NOT_SENT,
    "17": "an M-Pesa limit or rule stopped the transaction: nothing was taken, pay again in a few minutes",
    "26": "M-Pesa service busy: nothing was taken, pay again in a few minutes",
}
# Reversal Result ResultCode -> core outcome (Daraja's documented reversal answers).
REFUND_STATUS: dict[str, ProviderOutcome] = {
    "0": ProviderOutcome.SUCCEEDED,
    "1": ProviderOutcome.FAILED,  # the organisation's balance cannot cover the reversal
    "11": ProviderOutcome.FAILED,  # debit party in an invalid state
    # "The transaction has already been reversed": the money went back to the payer, but not necessarily
    # by this request (an earlier reversal of ours whose answer was lost, or one made by hand). Never a
    # failure (that would invite paying the member twice), nor a success on this word alone: the refund
    # waits for the Result of the reversal that did it, else is parked for a person to record.
    "R000001": ProviderOutcome.AMBIGUOUS,
    "R000002": ProviderOutcome.FAILED,  # original transaction id invalid
}
# Reversal Results that refuse the gateway's own initiator (MPESA_INITIATOR and its password,
# MPESA_SECURITY_CREDENTIAL): Daraja took the reversal and processed nothing. Not the refund's failure (the member
# was texted "refund failed" for a password rotated at Safaricom): the refund waits for the configuration as a
# CredentialsRefused call does (ProviderEvent.credentials_refused).
_INITIATOR_REFUSED: dict[str, str] = {
    "2001": "initiator credentials invalid (MPESA_INITIATOR or MPESA_SECURITY_CREDENTIAL)",
    "21": "initiator not allowed to reverse transactions (MPESA_INITIATOR needs the reversal role)",
}
# Calls that start a payment or refund: with no answer we cannot tell whether it was taken.
_CREATES = frozenset({"stk_push", "reversal"})
# The STK query answers this error code while the payer has not acted yet.
_STILL_PENDING = "500.001.1001"
# ...or this ResultCode ("The transaction is still under processing"; no callback is known to carry it).
_STILL_PROCESSING = "4999"
# Error codes of a refused STK push (HTTP 5xx) that say no prompt went out, so nothing can be taken: the payment
# fails with the reason for the payer. The same 500.001.1001 on the query means "still processing" (above): it is
# read per operation. Any other 5xx on the push stays "may have gone out" (ProviderTimeout).
_PUSH_NOT_SENT: dict[str, str] = {
    "500.001.1001": REASONS["1001"],  # "Unable to lock subscriber, a transaction is already in process"
}
_INVALID_TOKEN = "404.001.03"
# Refusals of the gateway's own credentials (core.ports.CredentialsRefused): the consumer key and secret (the
# token's "Invalid Authentication passed", or a token fetched a moment ago refused again as "Invalid Access Token"),
# a reversal's Initiator or SecurityCredential, and an STK push's Password (our shortcode and passkey) or our
# BusinessShortCode (Daraja's generic "400.002.02 Bad Request - Invalid <field>", read by the field it names).
_BAD_AUTHENTICATION = "400.008.01"
_OUR_CREDENTIALS = ("Initiator", "SecurityCredential", "Password", "BusinessShortCode")
# Daraja's answers sent as HTTP 500 that are its word on the request, not a fault: the query's "still being
# processed" and the push's "a transaction is already in process" on the payer's line (both 500.001.1001). Counted
# as answered for the outage line (providers.calls): five payers slow to approve are not M-Pesa failing.
_ANSWERED_AS_500 = frozenset({_STILL_PENDING, *_PUSH_NOT_SENT})
# Daraja's CheckoutRequestIDs start so ('ws_CO_22112026080000123456789012'); its receipts never do.
CHECKOUT_PREFIX = "ws_CO_"
_ACCOUNT_REFERENCE_MAX = 12
_REFERENCE_MAX = 64  # our provider reference (a UUID) as the CallBackURL's ref carries it
_DESCRIPTION_MAX = 13
_REMARKS_MAX = 100
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")
# Safaricom's ceiling on one customer-to-paybill transaction (KES 250,000 since 2023): a push for more is refused by
# Daraja, so a payment of more is refused when asked for (amount_rule) instead of failed by the worker, with an SMS.
MAX_SHILLINGS = 250_000


def account_reference(reference: str) -> str:
    """Our human reference cut to Daraja's 12 characters, its number always whole.

    'PAY_20251016_001' -> '20251016001'; past four digits of number the year loses its century
    ('PAY_20261122_12345' -> '26112212345'); past six, the number alone. The number comes from one sequence
    across days (core.references), so it is unique by itself: it is what must survive the cut (keeping the last
    12 characters cut the year in half: '026112212345'). Matching never depends on it (callbacks carry the
    CheckoutRequestID, and our reference in the CallBackURL); it is what the payer sees on the phone and in the
    M-Pesa statement.
    """
    parts = reference.split("_")
    if len(parts) == 3 and parts[1].isdigit() and len(parts[1]) == 8 and parts[2].isdigit():
        day, number = parts[1], parts[2]
        for date in (day, day[2:], ""):
            if len(date) + len(number) <= _ACCOUNT_REFERENCE_MAX:
                return date + number
        return number[-_ACCOUNT_REFERENCE_MAX:]
    text = _NOT_ALNUM.sub("", reference)
    if len(text) > _ACCOUNT_REFERENCE_MAX:
        text = text.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") or text
    return text[-_ACCOUNT_REFERENCE_MAX:] or "PAYMENT"


def is_receipt(provider_transaction_id: str | None) -> bool:
    """An M-Pesa receipt number (MpesaReceiptNumber, 'SKL3ABC123': the id on the payer's M-Pesa SMS and the
    statement), not the CheckoutRequestID ('ws_CO_...') a payment holds until Daraja's callback brings the receipt."""
    return bool(provider_transaction_id) and not str(provider_transaction_id).startswith(CHECKOUT_PREFIX)


def _plain(text: str) -> str:
    """`text` in ASCII letters, digits and single spaces: an accented letter keeps its letter ("Coopérative" ->
    "Cooperative", not "Coop rative"), anything else is a space."""
    # Only the accents are dropped (the combining marks NFKD splits off): a dash or a guillemet is a space.
    bare = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^A-Za-z0-9 ]", " ", bare).split())


def transaction_desc(description: str) -> str:
    return (_plain(description)[:_DESCRIPTION_MAX].strip() or "Payment")


def remarks(note: str) -> str:
    """A reversal's Remarks (2 to 100 characters): `note` in letters, digits and spaces, as TransactionDesc."""
    text = _plain(note)[:_REMARKS_MAX].strip()
    return text if len(text) >= 2 else "Refund"


def _whole_shillings(amount: Money) -> int:
    if amount.currency != "KES":
        raise ProviderError(f"M-Pesa collects KES only, not {amount.currency}", retryable=False,
                            code="CURRENCY_UNSUPPORTED")
    if amount.minor % 100:
        raise ProviderError(f"M-Pesa takes whole shillings; {amount.format()} has cents", retryable=False,
                            code="AMOUNT_HAS_CENTS")
    if amount.minor <= 0:
        raise ProviderError("M-Pesa amount must be at least 1 KES", retryable=False, code="BAD_AMOUNT")
    if amount.minor > MAX_SHILLINGS * 100:
        raise ProviderError(f"M-Pesa takes at most {Money(MAX_SHILLINGS * 100, 'KES').format()} in one "
                            f"transaction; {amount.format()} is more", retryable=False, code="AMOUNT_OVER_LIMIT")
    return amount.minor // 100


class MpesaAdapter:
    """PaymentProvider for Safaricom M-Pesa (Daraja API)."""

    name = "mpesa"
    supports_partial_refund = False
    refund_names_request = False  # a reversal of the payment's receipt (MpesaReceiptNumber)
    methods = frozenset({"MPESA"})
    currencies: frozenset[str] | None = frozenset({"KES"})

    @staticmethod
    def payer_sees(provider_transaction_id: str | None) -> bool:
        """The payer's M-Pesa SMS and statement name the receipt (is_receipt), never the CheckoutRequestID: asked
        through providers.registry.payer_sees by the receipt SMS."""
        return is_receipt(provider_transaction_id)

    @staticmethod
    def refund_rule(provider_transaction_id: str | None) -> str | None:
        """Why a payment holding `provider_transaction_id` cannot be reversed, checked when its refund is asked for
        (core.refunds): a payment completed by the STK query alone (its callback lost) holds the CheckoutRequestID,
        and Daraja's reversal names the receipt only its callback carries. Queued, the refund failed at once and
        the member was texted that her refund failed."""
        if is_receipt(provider_transaction_id):
            return None
        return ("M-Pesa confirmed this payment by its status query, which carries no M-Pesa receipt number, and a "
                "reversal names that receipt: nothing was sent. It is taken from Daraja's callback if it still "
                "comes; else reverse the payment in the M-Pesa portal and record that refund with "
                "returnedByProvider")

    @staticmethod
    def amount_rule(amount: Money) -> str | None:
        """Why M-Pesa cannot take `amount` (whole shillings, at most MAX_SHILLINGS), checked when the payment is
        asked for."""
        try:
            _whole_shillings(amount)
        except ProviderError as exc:
            return str(exc)
        return None

    def __init__(self, http: httpx.AsyncClient, config: ProviderConfig, *,
                 clock: Callable[[], datetime] | None = None) -> None:
        self._http = http
        self._config = config
        self._base = config.base_url.rstrip("/")
        self._shortcode = config.options.get("shortcode", "")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._timeouts = timeout_from(config)
        self._tokens = TokenCache(self._fetch_token)

    # --- outbound -------------------------------------------------------------------------------

    def _password(self) -> tuple[str, str]:
        """(Password, Timestamp): base64(shortcode + passkey + timestamp), Nairobi local time."""
        timestamp = self._clock().astimezone(_NAIROBI).strftime("%Y%m%d%H%M%S")
        raw = f"{self._shortcode}{self._config.secret('passkey')}{timestamp}"
        return base64.b64encode(raw.encode()).decode(), timestamp

    async def prepare(self, operation: str) -> None:
        """The OAuth token the STK push ("collect") or the reversal ("refund") is sent with, obtained before
        the core counts the request as sent (core.jobs.ready_to_send): a token endpoint slow or failing costs
        the job a retry, never a push taken for one that may have gone out, which could never be asked
        about (Daraja's status query needs the CheckoutRequestID the push's answer brings)."""
        await self._tokens.get()

    async def request_collection(self, request: CollectionRequest) -> CollectionAccepted:
        if request.method not in self.methods:
            raise ProviderError(f"M-Pesa does not collect {request.method}", retryable=False,
                                code="METHOD_UNSUPPORTED")
        amount = _whole_shillings(request.amount)
        if request.payer is None or not request.payer.digits.startswith("254"):
            raise ProviderError("M-Pesa needs a Kenyan mobile number (2547...)", retryable=False,
                                code="BAD_PHONE_NUMBER")
        password, timestamp = self._password()
        phone = request.payer.digits
        body = {
            "BusinessShortCode": self._shortcode,
            "Password": password,
            "Timestamp": timestamp,
            "TransactionType": "CustomerPayBillOnline",
            "Amount": amount,
            "PartyA": phone,
            "PartyB": self._shortcode,
            "PhoneNumber": phone,
            # Our reference rides in the URL: the callback names only the CheckoutRequestID, which we
            # never learn when the push's answer is lost (a timeout), and the payer may still approve.
            "CallBackURL": with_query(request.callback_url, ref=request.provider_reference),
            "AccountReference": account_reference(request.payment_reference),
            "TransactionDesc": transaction_desc(request.description),
        }
        resp = await self._post("stk_push", "/mpesa/stkpush/v1/processrequest", body)
        answer = self._json(resp)
        if resp.status_code >= 500:
            error = self._error("stk_push", resp, answer)
            not_sent = _PUSH_NOT_SENT.get(str(error.code))
            if not_sent is not None:
                # Daraja refused the push before prompting (the payer's line is busy with another
                # transaction): a definite failure, which a status query could never settle (no CheckoutRequestID).
                raise ProviderError(f"{not_sent} (Daraja {error.code})", retryable=False, code=error.code)
            # Daraja's 5xx does not say whether the prompt went out, and a second push is a second
            # charge (no idempotency key): as unanswered, so the status path settles it, never a resend.
            raise ProviderTimeout(f"{error}; the push may have gone out: ask the status, do not send again")
        checkout = answer.get("CheckoutRequestID")
        if resp.status_code == 200 and self._unreadable(answer, checkout):
            # Daraja's answer, but not one we can read (not JSON, cut off; "0" without its CheckoutRequestID): the
            # push may have gone out, and a second is a second charge. As unanswered: its callback (our `ref`)
            # or the payment's settling grace ends it, never "payment failed" while the payer may be approving.
            raise self._unanswered("stk_push", "answer has no CheckoutRequestID we can read: the push may have "
                                               "gone out; ask the status, do not send again")
        if resp.is_success and resp.status_code != 200 and (str(answer.get("ResponseCode")) != "0" or not checkout):
            # Taken (2xx), but not Daraja's documented 200 acceptance: as unanswered, never "payment failed".
            raise self._unanswered("stk_push", f"answered HTTP {resp.status_code} without an acceptance we can read: "
                                               "the push may have gone out; ask the status, do not send again")
        if not resp.is_success or str(answer.get("ResponseCode")) != "0":
            raise self._error("stk_push", resp, answer)
        assert isinstance(checkout, str)
        log.info("mpesa stk push accepted", extra={"checkout_request_id": checkout,
                                                   "payer": request.payer.masked(),
                                                   "provider_reference": request.provider_reference})
        return CollectionAccepted(provider_transaction_id=checkout,
                                  gateway_reference=answer.get("MerchantRequestID") or None)

    async def collection_status(self, provider_reference: str, provider_transaction_id: str | None,
                                currency: str) -> StatusResult:
        if not provider_transaction_id:
            # Daraja can only be asked by CheckoutRequestID; without it (the push answer never
            # arrived) nobody can tell, and the core's payment timeout closes the payment.
            return StatusResult(ProviderOutcome.AMBIGUOUS,
                                reason="no CheckoutRequestID: the STK push answer never arrived")
        password, timestamp = self._password()
        body = {"BusinessShortCode": self._shortcode, "Password": password, "Timestamp": timestamp,
                "CheckoutRequestID": provider_transaction_id}
        resp = await self._post("stk_query", "/mpesa/stkpushquery/v1/query", body)
        answer = self._json(resp)
        if answer.get("errorCode") == _STILL_PENDING:
            return StatusResult(ProviderOutcome.PENDING, raw=dict(answer))
        if resp.status_code != 200 or "ResultCode" not in answer:
            raise self._error("stk_query", resp, answer)
        code = str(answer["ResultCode"])
        outcome, reason = self._stk_outcome("stk_query", code, answer.get("ResultDesc"), provider_transaction_id)
        return StatusResult(outcome, reason=reason, raw=dict(answer))

    async def request_refund(self, request: RefundRequest) -> CollectionAccepted:
        if not request.full:
            raise ProviderError("M-Pesa reverses whole transactions only; partial refunds are not possible",
                                retryable=False, code="PARTIAL_REFUND_UNSUPPORTED")
        amount = _whole_shillings(request.amount)
        receipt = request.original_provider_transaction_id
        if not is_receipt(receipt):
            raise ProviderError("a reversal needs the M-Pesa receipt number (MpesaReceiptNumber) of the "
                                "payment, which is not known", retryable=False, code="RECEIPT_UNKNOWN")
        body = {
            "Initiator": self._config.secret("initiator"),
            "SecurityCredential": self._config.secret("security_credential"),
            "CommandID": "TransactionReversal",
            "TransactionID": receipt,
            "Amount": amount,
            "ReceiverParty": self._shortcode,
            "RecieverIdentifierType": "11",  # Safaricom's spelling; 11 = the organisation's shortcode
            # Our reference rides on the URL (Daraja's Result names only its own ConversationID): a reversal
            # whose answer was lost is still found when its Result comes.
            "ResultURL": with_query(request.callback_url, ref=request.provider_reference),
            "QueueTimeOutURL": with_query(request.callback_url, ref=request.provider_reference),
            # Our neutral note (the payment's reference, the cooperative), never the admin's reason.
            "Remarks": remarks(request.note),
            "Occasion": request.provider_reference[:100],
        }
        resp = await self._post("reversal", "/mpesa/reversal/v1/request", body)
        answer = self._json(resp)
        if resp.status_code >= 500:
            # As for the STK push: Daraja's 5xx does not say whether the reversal was taken, and the request
            # carries no idempotency key, so a second one is a second reversal (refused as "already
            # reversed" if the first went through). As unanswered: its Result finds the refund by our `ref`.
            error = self._error("reversal", resp, answer)
            raise ProviderTimeout(f"{error}; the reversal may have been taken: wait for its Result, "
                                  "do not send again")
        conversation = answer.get("ConversationID")
        if resp.status_code == 200 and self._unreadable(answer, conversation):
            # As for the STK push: the reversal may have been taken; its Result finds the refund by our `ref`.
            raise self._unanswered("reversal", "answer has no ConversationID we can read: the reversal may have "
                                               "been taken; wait for its Result, do not send again")
        if resp.is_success and resp.status_code != 200 and (str(answer.get("ResponseCode")) != "0"
                                                            or not conversation):
            raise self._unanswered("reversal", f"answered HTTP {resp.status_code} without an acceptance we can "
                                               "read: the reversal may have been taken; wait for its Result, do not "
                                               "send again")
        if not resp.is_success or str(answer.get("ResponseCode")) != "0":
            raise self._error("reversal", resp, answer)
        assert isinstance(conversation, str)
        log.info("mpesa reversal accepted", extra={"conversation_id": conversation,
                                                   "provider_reference": request.provider_reference})
        return CollectionAccepted(provider_transaction_id=conversation,
                                  gateway_reference=answer.get("OriginatorConversationID") or None)

    async def refund_status(self, provider_reference: str, currency: str) -> StatusResult:
        # Daraja's Transaction Status API answers asynchronously too; the reversal Result callback
        # is the only report, so a poll can only say "still in progress".
        return StatusResult(ProviderOutcome.PENDING,
                            reason="M-Pesa reports reversals only through the Result callback")

    # --- inbound --------------------------------------------------------------------------------

    async def verify_callback(self, callback: InboundCallback) -> None:
        # Daraja does not sign callbacks: check the shape here; the URL secret is checked by the
        # route and every STK result is confirmed by a query (needs_confirmation=True).
        self._parse_body(callback)

    def parse_callback(self, callback: InboundCallback) -> ProviderEvent:
        kind, payload = self._parse_body(callback)
        ours = callback.query.get("ref", "")
        if kind == "stk":
            return self._stk_event(payload, ours if 0 < len(ours) <= _REFERENCE_MAX else None)
        return self._reversal_event(payload, ours if 0 < len(ours) <= _REFERENCE_MAX else None)

    def _parse_body(self, callback: InboundCallback) -> tuple[str, Mapping[str, Any]]:
        try:
            body = json.loads(callback.body)
        except JSON_ERRORS:
            raise CallbackRejected("M-Pesa callback is not JSON", status=400) from None
        if not isinstance(body, dict):
            raise CallbackRejected("M-Pesa callback is not a JSON object", status=400)
        stk = body.get("Body", {}).get("stkCallback") if isinstance(body.get("Body"), dict) else None
        if isinstance(stk, dict):
            if not isinstance(stk.get("CheckoutRequestID"), str) or not stk["CheckoutRequestID"]:
                raise CallbackRejected("stkCallback without CheckoutRequestID", status=400)
            if not isinstance(stk.get("ResultCode"), int | str):
                raise CallbackRejected("stkCallback without ResultCode", status=400)
            return "stk", stk
        result = body.get("Result")
        if isinstance(result, dict):
            if not isinstance(result.get("ConversationID"), str) or not result["ConversationID"]:
                raise CallbackRejected("Result without ConversationID", status=400)
            if not isinstance(result.get("ResultCode"), int | str):
                raise CallbackRejected("Result without ResultCode", status=400)
            return "result", result
        raise CallbackRejected("not an M-Pesa stkCallback or Result body", status=400)

    def _stk_event(self, stk: Mapping[str, Any], ours: str | None) -> ProviderEvent:
        checkout = stk["CheckoutRequestID"]
        code = str(stk["ResultCode"])
        outcome, reason = self._stk_outcome("callback", code, stk.get("ResultDesc"), checkout)
        items = _metadata(stk.get("CallbackMetadata"))
        amount = None
        if "Amount" in items:
            try:
                amount = Money.from_api(items["Amount"], "KES")
            except MoneyError:
                raise CallbackRejected(f"M-Pesa callback Amount {items['Amount']!r} is not a number",
                                       status=400) from None
        receipt = items.get("MpesaReceiptNumber")
        phone = str(items.get("PhoneNumber", ""))
        raw = {
            # The body names no reference of ours: the core finds the payment by the CheckoutRequestID
            # it saved as provider_transaction_id, else (the push's answer never arrived) by our
            # reference from the CallBackURL, which it then confirms by querying this CheckoutRequestID.
            "lookup": "provider_transaction_id",
            "MerchantRequestID": stk.get("MerchantRequestID"),
            "CheckoutRequestID": checkout,
            "ResultCode": code,
            "ResultDesc": stk.get("ResultDesc"),
            "MpesaReceiptNumber": receipt,
            "TransactionDate": items.get("TransactionDate"),
            "Amount": items.get("Amount"),
            "PhoneNumber": mask("+" + phone) if phone else None,
        }
        if ours:
            raw["provider_reference"] = ours
        return ProviderEvent(
            provider=self.name, kind=EventKind.COLLECTION, event_id=f"{checkout}:{code}", reference=checkout,
            outcome=outcome, amount=amount, provider_transaction_id=str(receipt) if receipt else None,
            # Daraja sends each STK callback once (a 503 is never followed by a resend), and only the callback
            # carries the MpesaReceiptNumber a reversal needs (the STK query has none): one whose confirming query
            # fails is kept as pending with its receipt, for the payment's poll to settle.
            reason=reason, needs_confirmation=True, sent_once=True, raw=raw,
            occurred_at=provider_time(items.get("TransactionDate"), _NAIROBI) if code == "0" else None)

    def _reversal_event(self, result: Mapping[str, Any], ours: str | None) -> ProviderEvent:
        conversation = result["ConversationID"]
        code = str(result["ResultCode"])
        refused = _INITIATOR_REFUSED.get(code)
        outcome = ProviderOutcome.PENDING if refused else REFUND_STATUS.get(code)
        if outcome is None:
            PROVIDER_ERRORS.labels(self.name, "callback").inc()
            log.error("mpesa reversal Result with unknown ResultCode",
                      extra={"result_code": code, "conversation_id": conversation})
            raise CallbackRejected(f"unknown M-Pesa reversal ResultCode {code!r}", status=400, reference=conversation)
        params = _result_parameters(result.get("ResultParameters"))
        amount = None
        if "Amount" in params:
            try:
                amount = Money.from_api(params["Amount"], "KES")
            except MoneyError:
                amount = None
        raw = {
            "lookup": "provider_transaction_id",
            "ResultType": result.get("ResultType"),
            "ResultCode": code,
            "ResultDesc": result.get("ResultDesc"),
            "OriginatorConversationID": result.get("OriginatorConversationID"),
            "ConversationID": conversation,
            "TransactionID": result.get("TransactionID"),
            "OriginalTransactionID": params.get("OriginalTransactionID"),
        }
        if ours:
            raw["provider_reference"] = ours  # found by it when the ConversationID was never stored
        reason = None if code == "0" else scrub(str(result.get("ResultDesc") or f"ResultCode {code}"))
        if refused:
            reason = (f"M-Pesa refused the gateway's reversal initiator: {refused} (ResultCode {code}: {reason}); "
                      "nothing was processed")
            credentials_refused(self.name, "reversal", reason)
        else:
            credentials_accepted(self.name, "reversal")  # Daraja processed it: the initiator is accepted again
        # Not confirmable: Daraja has no synchronous reversal status. The callback URL secret
        # (checked by the route) is what authenticates it.
        return ProviderEvent(
            provider=self.name, kind=EventKind.REFUND, event_id=f"reversal:{conversation}:{code}",
            reference=conversation, outcome=outcome, amount=amount,
            provider_transaction_id=result.get("TransactionID") or None,
            reason=reason, needs_confirmation=False, raw=raw, credentials_refused=bool(refused),
            occurred_at=provider_time(params.get("TransCompletedTime"), _NAIROBI) if code == "0" else None)

    def _stk_outcome(self, operation: str, code: str, desc: object,
                     checkout: str) -> tuple[ProviderOutcome, str | None]:
        """An STK ResultCode (callback or query) as (outcome, reason for the payer).

        A code outside STATUS is a failure with Daraja's own words for it: Daraja reports success with 0 only, and
        a payment left open on a code we never saw would wait out its settling grace (a day) before ending
        "unconfirmed", when Safaricom has long closed the request. Logged loudly, for STATUS to learn it."""
        outcome = STATUS.get(code)
        if outcome is not None:
            return outcome, REASONS.get(code)
        if code == _STILL_PROCESSING:
            return ProviderOutcome.PENDING, None
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        code, words = code[:20], scrub(str(desc or "")).strip()[:150]
        log.error("mpesa unexpected STK ResultCode: taken as a failure",
                  extra={"operation": operation, "result_code": code, "result_desc": words,
                         "checkout_request_id": checkout})
        return ProviderOutcome.FAILED, f"M-Pesa: {words or 'failed'} (ResultCode {code})"

    # --- plumbing -------------------------------------------------------------------------------

    async def _fetch_token(self) -> tuple[str, float]:
        basic = base64.b64encode(
            f"{self._config.secret('consumer_key')}:{self._config.secret('consumer_secret')}".encode()).decode()
        resp = await self._send("token", "GET", "/oauth/v1/generate",
                                params={"grant_type": "client_credentials"},
                                headers={"Authorization": f"Basic {basic}"})
        answer = self._json(resp)
        if resp.status_code != 200:
            raise self._error("token", resp, answer)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._fail("token", "token answer has no access_token", retryable=True)
        try:
            lifetime = float(answer.get("expires_in", 3599))
        except (TypeError, ValueError):
            lifetime = 3599.0
        return token, lifetime

    async def _post(self, operation: str, path: str, body: dict[str, Any]) -> httpx.Response:
        resp = None
        for _attempt in range(2):
            token = await self._tokens.get()
            resp = await self._send(operation, "POST", path, json=body,
                                    headers={"Authorization": f"Bearer {token}"})
            if resp.status_code != 401 and self._json(resp).get("errorCode") != _INVALID_TOKEN:
                return resp
            # A revoked or expired token was refused before anything ran: fetch a new one once. (providers.calls.send
            # turned a push or reversal answered 401 back; Daraja's "Invalid Access Token" under another status too.)
            if resp.status_code != 401 and operation in _CREATES:
                turned_back()
            self._tokens.invalidate(token)
        assert resp is not None
        return resp

    async def _send(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to Daraja (providers.calls.send; its errors are counted as _error reads them). A 500 that is
        one of Daraja's answers (_ANSWERED_AS_500) is not a failing call for the outage line."""
        return await send(self._http, provider=self.name, operation=operation, method=method, url=self._base + path,
                          timeouts=self._timeouts, creates=operation in _CREATES, label="M-Pesa", count_5xx=False,
                          answered=lambda resp: self._json(resp).get("errorCode") in _ANSWERED_AS_500, **kwargs)

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _error(self, operation: str, resp: httpx.Response, answer: Mapping[str, Any]) -> ProviderError:
        code = answer.get("errorCode") or answer.get("ResponseCode") or str(resp.status_code)
        message = scrub(str(answer.get("errorMessage") or answer.get("ResponseDescription")
                            or resp.reason_phrase))
        retryable = resp.status_code >= 500 or resp.status_code == 429
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        log.warning("mpesa %s refused", operation,
                    extra={"http_status": resp.status_code, "error_code": code, "error": message})
        if resp.status_code == 401 or code in (_BAD_AUTHENTICATION, _INVALID_TOKEN) or (
                resp.status_code == 400 and any(f"Invalid {name}" in message for name in _OUR_CREDENTIALS)):
            credentials_refused(self.name, operation, message)
            if operation in _CREATES and resp.status_code not in (401, 429) and resp.status_code < 500 and (
                    code != _INVALID_TOKEN):
                # A push or reversal refused for our credentials (its Password, our shortcode, its Initiator) was
                # processed by nothing: turned back, as one answered 401 (providers.calls.send) or "Invalid Access
                # Token" (_post) is, so core.jobs ends it at once as never processed, not as one that may have arrived.
                turned_back()
            return CredentialsRefused(f"M-Pesa refused the gateway's credentials for {operation} "
                                      f"({resp.status_code} {code}): {message}", code=str(code))
        if resp.status_code == 429:
            # Daraja's rate limit refused it, nothing processed (providers.calls.send turned a push or reversal
            # back): as http_error's, HTTP_429 (core.outbox.NOTHING_PROCESSED) with its Retry-After. Under its own
            # errorCode it was taken for a push or reversal that may have arrived (CALL_SENT), its Retry-After unread.
            return ProviderBusy(f"M-Pesa is rate limiting {operation} ({resp.status_code} {code}): {message}",
                                code="HTTP_429", retry_after=retry_after(resp))
        return ProviderError(f"M-Pesa {operation} refused ({resp.status_code} {code}): {message}",
                             retryable=retryable, code=str(code))

    @staticmethod
    def _unreadable(answer: Mapping[str, Any], request_id: object) -> bool:
        """A 200 that is not Daraja's answer we can read: neither a ResponseCode nor an errorCode (not JSON, cut off,
        a proxy's page), or "0" (accepted) without the id it names the request by. A non-zero ResponseCode, or an
        errorCode, is Daraja's refusal."""
        if "ResponseCode" not in answer:
            return "errorCode" not in answer
        return str(answer.get("ResponseCode")) == "0" and (not isinstance(request_id, str) or not request_id)

    def _unanswered(self, operation: str, message: str) -> ProviderTimeout:
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        log.warning("mpesa %s: %s", operation, message)
        return ProviderTimeout(f"M-Pesa {operation}: {message}")

    def _fail(self, operation: str, message: str, *, retryable: bool) -> ProviderError:
        PROVIDER_ERRORS.labels(self.name, operation).inc()
        log.warning("mpesa %s: %s", operation, message)
        return ProviderError(f"M-Pesa {operation}: {message}", retryable=retryable, code="BAD_ANSWER")


def _metadata(meta: object) -> dict[str, Any]:
    items = meta.get("Item") if isinstance(meta, dict) else None
    if not isinstance(items, list):
        return {}
    return {item["Name"]: item.get("Value") for item in items if isinstance(item, dict) and "Name" in item}


def _result_parameters(params: object) -> dict[str, Any]:
    items = params.get("ResultParameter") if isinstance(params, dict) else None
    if isinstance(items, dict):  # Daraja sends a lone parameter as an object, not a list
        items = [items]
    if not isinstance(items, list):
        return {}
    return {item["Key"]: item.get("Value") for item in items if isinstance(item, dict) and "Key" in item}
