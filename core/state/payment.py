"""Payment states and the moves between them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import and_, or_

from core.models import Payment
from core.state.machine import StateMachine


class PaymentStatus(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"
    # An admin's recording of money taken (POST /v1/payments/recorded, /outcome) made in error and voided
    # (core.recorded_payments.void_recording): nothing collected, final.
    VOIDED = "VOIDED"


P = PaymentStatus
# The failure reason of a payment given up after its settling grace with the provider never saying what became of
# it (core.jobs): the money may have been taken.
UNCONFIRMED = "provider status unknown: no answer to status queries"
OPEN = frozenset({P.PENDING, P.PROCESSING})
OPEN_VALUES = tuple(sorted(s.value for s in OPEN))  # OPEN as the stored strings, for SQL IN and plain comparisons
COLLECTED = frozenset({P.COMPLETED, P.PARTIALLY_REFUNDED, P.REFUNDED})

PAYMENT = StateMachine(
    name="payment",
    states=PaymentStatus,
    model=Payment,
    table={
        P.PENDING: frozenset({P.PROCESSING, P.COMPLETED, P.FAILED, P.CANCELLED, P.TIMEOUT}),
        P.PROCESSING: frozenset({P.COMPLETED, P.FAILED, P.CANCELLED, P.TIMEOUT}),
        P.COMPLETED: frozenset({P.PARTIALLY_REFUNDED, P.REFUNDED, P.VOIDED}),
        P.PARTIALLY_REFUNDED: frozenset({P.PARTIALLY_REFUNDED, P.REFUNDED}),
        P.REFUNDED: frozenset(),
        P.FAILED: frozenset(),
        # Final: a provider's success reported afterwards is flagged for a person, never completes it
        # (core.provider_events._apply_outcome), and the right statement line is recorded as a payment of its own.
        P.VOIDED: frozenset(),
        # Money reported taken after we gave up: recorded, flagged late, audited.
        P.CANCELLED: frozenset({P.COMPLETED}),
        P.TIMEOUT: frozenset({P.COMPLETED}),
    },
    exceptional=frozenset({(P.CANCELLED, P.COMPLETED), (P.TIMEOUT, P.COMPLETED)}),
)


class MoneyState(Protocol):
    """What taken_after_failure and holds_money read of a payment: its row, or the three columns a query read."""

    @property
    def status(self) -> str: ...
    @property
    def completed_at(self) -> datetime | None: ...
    @property
    def collected_minor(self) -> int | None: ...


def taken_after_failure(payment: MoneyState) -> bool:
    """A FAILED payment whose money the provider then reported taken: it stays FAILED (never reopened) but
    the money is held, counted in the reconciliation's `settled` and refundable (core.provider_events)."""
    return payment.status == P.FAILED.value and payment.completed_at is not None and bool(payment.collected_minor)


def holds_money(payment: MoneyState) -> bool:
    """The cooperative holds money from this payment: collected, or taken after it failed."""
    return PaymentStatus(payment.status) in COLLECTED or taken_after_failure(payment)


def taken_after_failure_where(columns: Any) -> Any:
    """taken_after_failure() as a SQL condition on `columns` (the Payment entity, or a payments table's `.c`)."""
    return and_(columns.status == P.FAILED.value, columns.completed_at.is_not(None), columns.collected_minor > 0)


# holds_money() as a SQL condition on payments (the reconciliation and its exports).
HELD = or_(Payment.status.in_([s.value for s in COLLECTED]), taken_after_failure_where(Payment))


def shown_status(status: str, failure_reason: str | None, completed_at: object) -> str:
    """The status a payer is told (SMS, USSD): a TIMEOUT whose outcome the provider never confirmed is not "not
    approved" (UNCONFIRMED), and a FAILED payment whose money was then taken is not just "failed"
    (TAKEN_AFTER_FAILURE); otherwise the status itself."""
    if status == P.TIMEOUT.value and failure_reason == UNCONFIRMED:
        return "UNCONFIRMED"
    if status == P.FAILED.value and completed_at is not None:
        return "TAKEN_AFTER_FAILURE"
    return status
