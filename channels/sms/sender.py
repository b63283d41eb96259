"""Africa's Talking SMS sender: one REST call per message through the shared httpx client.

Why httpx and not the official `africastalking` SDK (v2.0.3): the SDK hard-codes its base URL
(`https://api.africastalking.com` or the sandbox host, chosen from the username) in
`Service.__init__`/`APIService._init_service`, with no parameter or setting to point it elsewhere, so it
cannot reach our simulator or a proxy without overwriting a private attribute (`_baseUrl`) that any
release may rename. It also turns every non-2xx answer into `AfricasTalkingException(response.text)`,
dropping the HTTP status, so a 5xx (retry) cannot be told from a 4xx (do not retry); it opens a new
`requests` connection per call, and being synchronous it would need a thread pool next to the event loop.
The call itself is small and documented (`POST {base}/version1/messaging`, form body, `apiKey` header),
so we send exactly what the SDK sends (same fields, `bulkSMSMode=1`, `enqueue=1`) through the process's
pooled httpx client, with a configurable base URL, a 10 s timeout and the status code kept.

Africa's Talking has no idempotency key and no lookup by our id, so a message is sent again only when
nothing of it can have reached AT (SmsTemporaryError: no connection, or an answer refusing it). Once the
whole request is out and the answer is lost or unreadable, or AT's front end gave up waiting for its API
(HTTP 504), AT may have queued it: SmsUnconfirmedError, and the caller records it without sending it
again (a second copy to the member is worse than a missing confirmation). Our own account's problems
(credit, sender id, risk hold, credentials) refuse every message alike: SmsAccountError, retried slowly
until someone fixes the account.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from core import metrics
from core.config import Secret, Settings
from core.phone import Phone
from core.ports import SendResult, SmsSender
from providers.calls import call_answered, call_failed, credentials_refused, request_not_made

log = logging.getLogger("gateway.sms.sender")
NAME = "africastalking"  # its label in the provider metrics and outage lines (providers.calls)

# Recipient statusCode values (Africa's Talking messaging API).
ACCEPTED_CODES = frozenset({100, 101, 102})  # Processed, Sent, Queued
# 401 RiskHold, 402 InvalidSenderId, 405 InsufficientBalance: our account, not the number. Every message
# gets the same answer until the account is fixed (topped up, sender id approved, hold lifted), after
# which the same message goes through: retried slowly, never recorded as refused.
ACCOUNT_CODES = {401: "RiskHold", 402: "InvalidSenderId", 405: "InsufficientBalance"}
# 403 InvalidPhoneNumber, 404 UnsupportedNumberType, 406 UserInBlacklist, 407 CouldNotRoute,
# 409 DoNotDisturbRejection (and 408, unassigned): this number refuses it; sending again gives the same answer.
PERMANENT_CODES = frozenset(range(401, 410)) - frozenset(ACCOUNT_CODES)
# Seconds before a message refused for an account reason is tried again: someone has to act (a top-up
# takes minutes to hours), so the attempt budget (10 for SMS) spans about four and a half hours before
# the job is parked for a replay.
ACCOUNT_RETRY_SECONDS = 1800.0

# HTTP 504 Gateway Timeout comes from AT's front end (its load balancer) when its API was too slow to answer
# it: the API may have queued the message all the same (our own read timeout, one hop further in), so it is not
# sent again. A 502 Bad Gateway is the front end not reaching the API (down, being redeployed): it never saw the
# message, which is sent again once AT is back (taken as "may have it", every message of an AT outage was
# recorded unconfirmed and never sent). 500 and 503 are the API refusing it: resent.
IN_DOUBT_STATUSES = frozenset({504})

# Raised before the request was all written: AT cannot have read a whole message, so sending it again
# cannot double it. (A write cut off mid-body leaves AT an incomplete request, which it does not act on.) A payment's
# or refund's request stays in doubt after one (providers.calls.send), the stricter rule for money. The gateway's
# own transport (core.http) raises no Write* nor LocalProtocolError: a write that fails comes out of it as a
# ReadError or ReadTimeout, and the SMS is recorded unconfirmed, not resent.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


class SmsTemporaryError(Exception):
    """AT does not have the message: no connection, or an answer refusing it for now (HTTP 5xx but 504, 408,
    429). Sending it again is safe; retry later."""


class SmsNotSentError(SmsTemporaryError):
    """No connection to AT was made, or the request was not all written (_NOT_SENT): AT cannot have the message, for
    sure, where a refusing answer (a 5xx) may come from a front end after the API took it. What lets a run whose job
    was taken over meanwhile hand the message back to be sent (channels.sms.jobs: SmsJobs._reopen)."""


class SmsAccountError(SmsTemporaryError):
    """AT refused the message for a reason of our account (credit, sender id, risk hold, credentials), not
    of the number: safe to send again, but only worth it once someone fixes the account, so the outbox
    waits `retry_after` seconds between attempts (it reads the attribute)."""

    def __init__(self, message: str, *, retry_after: float = ACCOUNT_RETRY_SECONDS) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SmsUnconfirmedError(Exception):
    """The whole request reached AT, but its answer was lost or unreadable (read timeout, connection
    dropped mid-answer, a 2xx we cannot read, a 504 from AT's front end): AT may have queued the
    message. It has no idempotency key and no lookup by our id, so sending it again may give the member a
    second copy: do not resend."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"Africa's Talking may have the message (not resent): {cause}")
        self.cause = cause  # short: it goes on the message row


@dataclass(frozen=True)
class AfricasTalkingConfig:
    base_url: str
    username: str
    api_key: Secret
    sender_id: str | None = None
    timeout: float = 10.0


class AfricasTalkingSender:
    """Implements core.ports.SmsSender against the Africa's Talking messaging API."""

    def __init__(self, http: httpx.AsyncClient, config: AfricasTalkingConfig) -> None:
        self._http = http
        self._config = config
        self._url = config.base_url.rstrip("/") + "/version1/messaging"

    @property
    def sender_id(self) -> str:
        return self._config.sender_id or self._config.username

    async def send(self, phone: Phone, body: str) -> SendResult:
        form = {
            "username": self._config.username,
            "to": phone.e164,
            "message": body,
            "bulkSMSMode": "1",
            "enqueue": "1",
        }
        if self._config.sender_id:
            form["from"] = self._config.sender_id
        headers = {"apiKey": self._config.api_key.get(), "Accept": "application/json"}
        try:
            # Made before anything is sent: one that cannot be made (an SMS_API_KEY a header cannot carry, an
            # SMS_BASE_URL httpx refuses) never left. Our configuration, the same for every message: it waits as an
            # account problem does, counted and logged as a provider's request not made (providers.calls), with no
            # call timed and Africa's Talking's health untouched (it never saw the request).
            request = self._http.build_request("POST", self._url, data=form, headers=headers,
                                               timeout=self._config.timeout)
        except Exception as exc:
            request_not_made(NAME, "sms.send", exc, label="Africa's Talking")
            raise SmsAccountError(f"the request to Africa's Talking could not be made ({type(exc).__name__}): check "
                                  "SMS_API_KEY and SMS_BASE_URL; nothing was sent") from None
        started = time.perf_counter()
        try:
            response = await self._http.send(request)
        except _NOT_SENT as exc:
            metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.send").inc()
            call_failed(NAME, started, error="UNREACHABLE", summary=f"sms.send: cannot connect ({type(exc).__name__})")
            raise SmsNotSentError(
                f"network error talking to Africa's Talking: {type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            # ReadTimeout, ReadError, RemoteProtocolError, ...: the request was out, the answer was not read.
            metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.send").inc()
            call_failed(NAME, started, error="TIMEOUT",
                        summary=f"sms.send: no answer read ({type(exc).__name__})")
            raise SmsUnconfirmedError(f"{type(exc).__name__} after the send") from exc
        finally:
            metrics.PROVIDER_CALLS.labels(provider="africastalking", operation="sms.send").observe(
                time.perf_counter() - started
            )
        # An outage (5xx, no connection, no answer: several in a row) is reported once, as a payment provider's is
        # (providers.calls): one error line and gateway_provider_failing, not only a warning per message.
        if response.status_code >= 500:
            call_failed(NAME, started, error=f"HTTP_{response.status_code}",
                        summary=f"sms.send: HTTP {response.status_code}")
        elif response.status_code == 401:
            # SMS_API_KEY or SMS_USERNAME refused, as a payment provider's credentials are: the ops page's "Providers
            # now" said Africa's Talking was OK (an answered call) while every text waited on the key.
            credentials_refused(NAME, "sms.send", response.text)
        else:
            call_answered(NAME)
        return self._parse(phone, response)

    def _parse(self, phone: Phone, response: httpx.Response) -> SendResult:
        status = response.status_code
        if status in IN_DOUBT_STATUSES:
            metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.send").inc()
            raise SmsUnconfirmedError(f"HTTP {status} after the send")
        if status >= 500 or status in (408, 429):
            metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.send").inc()
            raise SmsTemporaryError(f"Africa's Talking answered HTTP {status}")
        if status == 401:
            # Wrong username or key is our configuration, not the message: retry so it goes out once fixed.
            raise _account_error("Africa's Talking refused the credentials (HTTP 401)")
        if status >= 400:
            text = response.text[:200]
            log.warning(
                "sms request refused", extra={"http_status": status, "answer": text, "to": phone.masked()}
            )
            return SendResult(
                None,
                accepted=False,
                provider_status=f"HTTP{status}",
                failure_reason=text or f"HTTP {status}",
                permanent=True,
            )
        try:
            data: Any = response.json()
            message_data = data["SMSMessageData"]
            recipients = message_data.get("Recipients") or []
            if not isinstance(recipients, list) or not all(isinstance(r, dict) for r in recipients):
                raise TypeError("Recipients is not a list of objects")  # read as any other unreadable answer
        except (ValueError, KeyError, TypeError, AttributeError):
            if 200 <= status < 300:  # AT took the request; what it did with it is unknown
                raise SmsUnconfirmedError(f"unreadable HTTP {status} answer") from None
            raise SmsTemporaryError(f"unreadable answer from Africa's Talking (HTTP {status})") from None
        if not recipients:
            # e.g. {"Message": "InvalidSenderId", "Recipients": []}: nothing was queued.
            reason = str(message_data.get("Message") or "no recipient accepted")
            if reason in ACCOUNT_CODES.values():  # our account: every message gets this until it is fixed
                raise _account_error(f"AT account: {reason}")
            return SendResult(
                None, accepted=False, provider_status=reason[:32], failure_reason=reason[:64], permanent=True
            )
        recipient = _recipient_for(recipients, phone)
        try:
            code = int(str(recipient.get("statusCode")))
        except (TypeError, ValueError):
            raise SmsUnconfirmedError("answer without a statusCode") from None
        provider_status = str(recipient.get("status") or code)[:32]
        message_id = recipient.get("messageId") or None
        # A string ("RWF 20.0000"); anything else made one that fits its column, or writing the outcome would fail
        # on every attempt and the message AT has would stay QUEUED.
        cost = str(recipient.get("cost"))[:32] if recipient.get("cost") else None
        if code in ACCEPTED_CODES:
            if not message_id or message_id == "None":
                # Accepted all the same: sending it again would double it. Without an id no delivery
                # report can be matched to it; it stays SENT.
                log.warning("sms accepted without a messageId", extra={"to": phone.masked(), "status": code})
                return SendResult(None, accepted=True, provider_status=provider_status, cost=cost)
            return SendResult(str(message_id), accepted=True, provider_status=provider_status, cost=cost)
        if code in ACCOUNT_CODES:
            raise _account_error(f"AT account: {provider_status} ({code})")
        if code in PERMANENT_CODES:
            return SendResult(
                None,
                accepted=False,
                provider_status=provider_status,
                failure_reason=provider_status,
                permanent=True,
                cost=None,
            )
        raise SmsTemporaryError(f"recipient status {code} {provider_status}")


def _account_error(reason: str) -> SmsAccountError:
    """Counted and logged for an operator: no SMS goes out until the account is fixed."""
    metrics.PROVIDER_ERRORS.labels(provider="africastalking", operation="sms.send").inc()
    log.error(
        "Africa's Talking refuses our account: SMS wait and are retried every %d min until it is fixed "
        "(top up the balance, check the sender id, the API key and username, or a risk hold)",
        ACCOUNT_RETRY_SECONDS // 60,
        extra={"reason": reason},
    )
    return SmsAccountError(reason)


def _recipient_for(recipients: list[dict[str, Any]], phone: Phone) -> dict[str, Any]:
    for recipient in recipients:
        if recipient.get("number") == phone.e164:
            return recipient
    return recipients[0]


def build_sender(settings: Settings, http: httpx.AsyncClient) -> SmsSender:
    return AfricasTalkingSender(
        http,
        AfricasTalkingConfig(
            base_url=settings.sms_base_url,
            username=settings.sms_username,
            api_key=settings.sms_api_key,
            sender_id=settings.sms_sender_id or None,
        ),
    )
