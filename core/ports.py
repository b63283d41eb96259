"""Core types the edges translate into and out of, and the interfaces adapters implement.

Nothing in here knows a provider's or an aggregator's field names or status strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from core.money import Money
from core.phone import Phone


class ProviderOutcome(StrEnum):
    """What a provider says about a collection or refund, in core words."""

    PENDING = "PENDING"  # accepted, waiting for the payer / still in progress
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"  # the payer never approved in time
    CANCELLED = "CANCELLED"  # the payer declined
    AMBIGUOUS = "AMBIGUOUS"  # provider cannot tell yet; keep polling


class EventKind(StrEnum):
    COLLECTION = "collection"
    REFUND = "refund"


# The provider's id of the money a success reports, in a callback's raw body (set by the adapter when the payment's
# provider_transaction_id names the request, not the money: IremboPay's paymentReference, one per payment of an
# invoice) and in every stored success (the core writes the final id there otherwise): a success naming another
# one than an earlier success of the payment is a second payment (core.provider_events._second_payment).
MONEY_REFERENCE = "money_reference"


@dataclass(frozen=True)
class ProviderEvent:
    """A provider's callback or status answer, translated."""

    provider: str
    kind: EventKind
    event_id: str  # unique per provider event: used to drop duplicates
    reference: str  # our provider reference (payment.provider_reference or refund.provider_reference)
    outcome: ProviderOutcome
    amount: Money | None = None
    provider_transaction_id: str | None = None
    reason: str | None = None  # provider's failure reason, in plain words
    needs_confirmation: bool = False  # unsigned callback: confirm with a status query first
    # The provider sends this callback once, and it carries what a status query cannot give (M-Pesa: the receipt
    # number a reversal needs): when its confirming query fails it is kept pending for the poll, not refused.
    sent_once: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict)
    # When the money moved by the provider's own clock (IremboPay's paidAt, M-Pesa's TransactionDate), UTC;
    # None when the provider does not say (MTN, Airtel): the gateway dates it when it learns it.
    occurred_at: datetime | None = None
    # The provider took the request, then refused it for the gateway's own credentials (M-Pesa's reversal Result
    # 2001, "the initiator information is invalid", and 21, "initiator not allowed"): nothing was processed. As a call
    # refused so (CredentialsRefused), never a failure of the request: its outcome is PENDING, and a refund goes back
    # to waiting, unsent, for the configuration to be fixed (core.refunds.handle_refund_event). `reason` says which.
    credentials_refused: bool = False


@dataclass(frozen=True)
class CollectionRequest:
    provider_reference: str  # our UUID, saved on the payment before the call
    payment_reference: str  # human reference (PAY_...)
    amount: Money
    payer: Phone | None  # None for bank payments through an invoice
    payer_account: str  # phone in E.164, or account/email for banks
    description: str
    callback_url: str
    method: str  # MOBILE_MONEY_MTN, MOBILE_MONEY_AIRTEL, MPESA, BANK_BK, BANK_IM, BANK_ECOBANK
    language: str = "en"
    payer_name: str = ""
    expires_at: datetime | None = None


@dataclass(frozen=True)
class CollectionAccepted:
    """The provider took the request; the outcome comes later."""

    provider_transaction_id: str | None = None
    gateway_reference: str | None = None  # e.g. an invoice number
    payment_url: str | None = None  # where a bank payer completes the payment
    # Set when the provider settled synchronously (Airtel refunds): no status polling follows.
    outcome: ProviderOutcome | None = None


@dataclass(frozen=True)
class RefundRequest:
    provider_reference: str  # our UUID for the refund
    original_provider_reference: str
    original_provider_transaction_id: str | None
    amount: Money
    full: bool  # the refund covers the whole collected amount
    payer: Phone | None
    reason: str  # the admin's, for our records: never sent to the provider (the member may see what it is sent)
    callback_url: str
    # What the provider's note or remarks fields carry, which the member may see in her wallet: "Refund
    # PAY_20261203_001 Kigali Heights Housing Cooperative" (core.jobs.refund_note). Each adapter fits it to its fields.
    note: str = "Refund"


@dataclass(frozen=True)
class StatusResult:
    outcome: ProviderOutcome
    amount: Money | None = None
    provider_transaction_id: str | None = None
    reason: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    occurred_at: datetime | None = None  # as ProviderEvent's


# ProviderError.code of a provider that has no refund API (IremboPay): its refunds are made outside the gateway
# and recorded by a person.
REFUND_UNSUPPORTED = "REFUND_UNSUPPORTED"

# How the provider reference of a payment recorded from a provider's statement starts when the request that took its
# money is not known (core.recorded_payments.record_payment): no provider was ever sent it, so a refund that names that
# request (MTN's referenceIdToRefund) is refused before it is sent (core.refunds; the MTN adapter too).
REQUEST_UNKNOWN = "recorded:"


class ProviderError(Exception):
    """A provider call failed. `retryable` says whether the same call may be sent again."""

    def __init__(self, message: str, *, retryable: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class ProviderTimeout(ProviderError):
    """We do not know whether the provider received the request: ask its status, never resend blind.

    `provider_transaction_id`: the provider's id for the request, when the adapter learnt it before the
    unanswered call (IremboPay's invoice number, made before its push): stored, so any process can ask."""

    def __init__(self, message: str = "provider did not answer in time", *,
                 provider_transaction_id: str | None = None) -> None:
        super().__init__(message, retryable=False, code="TIMEOUT")
        self.provider_transaction_id = provider_transaction_id


class CredentialsRefused(ProviderError):
    """The provider refused the gateway's own credentials (HTTP 401 on its token, or on a call made with a fresh one;
    M-Pesa's initiator refused): our configuration is wrong (a rotated key), not the request. Nothing was processed.
    The same call fails the same way until the configuration is fixed: a collection, whose payer is waiting, fails
    at once; a refund waits for the fix (core.jobs)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, retryable=False, code=code)


# ProviderError.code of a refund (or its status query) held back by CredentialsRefused: retryable, as the configuration
# will be fixed; nothing was processed (core.outbox.NOTHING_PROCESSED), so it is still a refund never sent.
AWAITING_CONFIGURATION = "AWAITING_CONFIGURATION"
# How such a refusal's message ends (core.jobs.awaiting_configuration), so its job's last_error, once its retries
# run out and it is parked, still says what parked it (core.refunds.cancel_refund).
AWAITING_CONFIGURATION_NOTE = "; waits for the provider's configuration to be fixed"


# ProviderError.code of a request that never left this process (retryable): the token it needed was not obtained
# (core.jobs.ready_to_send; or, fetched again inside the call, it failed or came after the call's deadline:
# core.jobs._until_it_leaves), the call's deadline had passed before it started (_until_it_leaves), another request
# it needs first failed retryably (a token's, an IremboPay invoice's: _until_it_leaves), or the request could not be
# made (providers.calls.not_sent: a credential a header cannot carry, a header with a control character refused by
# core.http.GatewayClient.build_request, a body that is not JSON, an adapter's exception before its request left).
# Nothing was processed (core.outbox.NOTHING_PROCESSED): a try that failed so, after its stamp, is still one never
# sent.
NOT_SENT = "NOT_SENT"


@dataclass
class Departures:
    """How many requests that move money (a payment's or a refund's: providers.calls.send's `creates`) were handed to
    the transport while watched (watch_departures), and how many of those are known to have reached nothing that acts
    on them (turned_back): the transport failed before it wrote a byte (no connection), the provider refused the
    gateway's token (HTTP 401: nothing was processed, and the adapter may send it again with a new one) or its
    credentials (CredentialsRefused: nothing was processed), or its rate limit refused the request (HTTP 429: nothing
    was processed, sent again after its Retry-After)."""

    handed: int = 0
    turned_back: int = 0
    # The provider's id for the request, learnt before its request that moves money left (known_as).
    provider_transaction_id: str | None = None

    @property
    def left(self) -> bool:
        """A request that moves money may have arrived: from then on, nothing raised says it was not sent."""
        return self.handed > self.turned_back


_DEPARTURES: ContextVar[Departures | None] = ContextVar("provider_departures", default=None)


@contextmanager
def watch_departures() -> Iterator[Departures]:
    """Watch one adapter call (core.jobs: a collection's or a refund's request): what it returns says whether a
    request that moves money left during it. Set in this task's context: the adapter's calls see it."""
    watch = Departures()
    token = _DEPARTURES.set(watch)
    try:
        yield watch
    finally:
        _DEPARTURES.reset(token)


def departing() -> None:
    """A request that moves money is being handed to the transport now (providers.calls.send): the watch in force,
    if any, counts it as left, whatever happens to it next, unless it is turned back."""
    watch = _DEPARTURES.get()
    if watch is not None:
        watch.handed += 1


def turned_back() -> None:
    """The request that moves money last handed over (departing) is known to have reached nothing that acts on it: the
    transport could not connect (providers.calls.send: httpx's ConnectError, ConnectTimeout, PoolTimeout and
    UnsupportedProtocol are raised before a byte of the request is written), the provider refused the gateway's
    token (HTTP 401, or M-Pesa's "Invalid Access Token") or its credentials (M-Pesa's push refused for its Password, a
    reversal for its Initiator: a CredentialsRefused), or the provider's rate limit refused it (an HTTP 429 answer:
    providers.calls.ProviderBusy). Only for those: a failure that may follow a byte written (a write or read timeout,
    a reset, a malformed answer) never turns one back."""
    watch = _DEPARTURES.get()
    if watch is not None and watch.left:
        watch.turned_back += 1


def known_as(provider_transaction_id: str) -> None:
    """The adapter learnt the provider's id for the request before its request that moves money leaves (IremboPay's
    invoice number, made before its push): the watch in force, if any, keeps it, so a call still out at the job's
    deadline is stored with it (core.jobs._until_it_leaves), as one a ProviderTimeout carries is."""
    watch = _DEPARTURES.get()
    if watch is not None:
        watch.provider_transaction_id = provider_transaction_id


class CallbackRejected(Exception):
    """A callback that failed verification or could not be parsed; answered 4xx, nothing changes.

    `reference`: the payment's reference the callback named, when the adapter had read one before refusing it
    (e.g. an unknown status): the refusal's log line carries it, so a search by the payment finds it."""

    def __init__(self, message: str, *, status: int = 401, reference: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reference = reference


@dataclass(frozen=True)
class InboundCallback:
    """What an HTTP callback carried, independent of aiohttp."""

    method: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes


class PaymentProvider(Protocol):
    """Implemented by each package under providers/."""

    name: str
    supports_partial_refund: bool
    # Whether its refund names the request that took the money (our provider reference: MTN's referenceIdToRefund)
    # rather than its own transaction id (Airtel's airtel_money_id, M-Pesa's receipt): a payment recorded from its
    # statement without that request's reference cannot be refunded through it (core.refunds).
    refund_names_request: bool
    # Payment methods this provider collects (MOBILE_MONEY_MTN, ...).
    methods: frozenset[str]
    # The currencies it collects in (M-Pesa: KES; IremboPay: RWF; MTN and Airtel: their account's, from
    # configuration); None: any (MTN's sandbox with no MTN_MOMO_CURRENCY). A payment in another is refused when
    # asked for, not failed later by the worker. A provider may also define `amount_rule(amount) -> str | None`
    # (M-Pesa: whole shillings): see amount_refusal. And `refund_rule(provider_transaction_id) -> str | None`: why a
    # payment holding that id cannot be refunded through it (M-Pesa: no receipt number yet; core.refunds, 409). And
    # `transaction_id_is_request = True` when its transaction id is the request's own, made with it and never another
    # (IremboPay's invoice number): a callback naming another than the payment's gatewayReference is not about it. And
    # a static `payer_sees(provider_transaction_id) -> bool` when a payment may hold an id its payer never sees
    # (M-Pesa's CheckoutRequestID before the receipt): the receipt SMS asks it through providers.registry.payer_sees.
    currencies: frozenset[str] | None

    async def request_collection(self, request: CollectionRequest) -> CollectionAccepted: ...

    async def collection_status(self, provider_reference: str, provider_transaction_id: str | None,
                                currency: str) -> StatusResult: ...

    async def request_refund(self, request: RefundRequest) -> CollectionAccepted: ...

    async def refund_status(self, provider_reference: str, currency: str) -> StatusResult: ...

    async def verify_callback(self, callback: InboundCallback) -> None:
        """Raise CallbackRejected when the signature, secret or timestamp does not hold."""

    def parse_callback(self, callback: InboundCallback) -> ProviderEvent: ...


def amount_refusal(provider: object, amount: Money, method: str) -> tuple[str, str] | None:
    """(field, message) when `provider` cannot collect `amount` by `method`, checked when a payment is asked
    for; None when it can. Its `currencies` first, then its optional `amount_rule` (the adapter's own check in
    the worker stays, as a guard)."""
    currencies = getattr(provider, "currencies", None)
    if currencies is not None and amount.currency not in currencies:
        return "paymentMethod", (f"{method} collects {', '.join(sorted(currencies))} only; this payment is in "
                                 f"{amount.currency}")
    problem = amount_rule_refusal(provider, amount)
    return ("amount", problem) if problem else None


def amount_rule_refusal(provider: object, amount: Money) -> str | None:
    """Why `provider` never moves `amount` (its optional `amount_rule`: M-Pesa's whole shillings, a wallet's
    ceiling), or None. Also checked of amounts recorded from a statement (a payment's outcome, a reversal the
    provider made): one the provider cannot move is a typo, and recorded it would leave money no refund sends back."""
    rule = getattr(provider, "amount_rule", None)
    problem = rule(amount) if callable(rule) else None
    return str(problem) if problem else None


def refusal_for(routes: Mapping[str, str], providers: Mapping[str, object], method: str,
                amount: Money) -> tuple[str, str] | None:
    """amount_refusal of the provider that `routes` sends `method` to (`providers`: name -> adapter). When no
    provider serves the method (no route, or a route to a provider this deployment did not configure):
    ("paymentMethod", Runtime.provider_for's "not available" message), a refusal that is not the amount's, so a
    method nobody serves is never offered and never blamed on the amount."""
    name = routes.get(method)
    provider = providers.get(name) if name is not None else None
    if provider is None:
        return "paymentMethod", f"payment method {method!r} is not available"
    return amount_refusal(provider, amount, method)


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str | None
    accepted: bool
    provider_status: str
    cost: str | None = None
    failure_reason: str | None = None
    permanent: bool = False  # a rejection that a retry would not fix


class SmsSender(Protocol):
    async def send(self, phone: Phone, body: str) -> SendResult: ...


@dataclass(frozen=True)
class DeliveryReport:
    provider_message_id: str
    status: str  # core SmsStatus value: SENT | DELIVERED | FAILED | REJECTED | EXPIRED
    provider_status: str
    failure_reason: str | None = None
