"""Dispute states: opened by a member or admin, reviewed, then closed one way or another."""

from __future__ import annotations

from enum import StrEnum

from core.models import Dispute
from core.state.machine import StateMachine


class DisputeStatus(StrEnum):
    OPEN = "OPEN"
    UNDER_REVIEW = "UNDER_REVIEW"
    RESOLVED = "RESOLVED"  # in the customer's favour
    REJECTED = "REJECTED"
    WITHDRAWN = "WITHDRAWN"


class DisputeReason(StrEnum):
    CHARGED_NOT_RECORDED = "CHARGED_NOT_RECORDED"
    WRONG_AMOUNT = "WRONG_AMOUNT"
    NOT_AUTHORISED = "NOT_AUTHORISED"
    OTHER = "OTHER"


D = DisputeStatus
# A dispute still to be decided: one opened on a payment refuses another, and a refund made meanwhile is noted on it.
OPEN_VALUES = (D.OPEN.value, D.UNDER_REVIEW.value)
DISPUTE = StateMachine(
    name="dispute",
    states=DisputeStatus,
    model=Dispute,
    table={
        D.OPEN: frozenset({D.UNDER_REVIEW, D.RESOLVED, D.REJECTED, D.WITHDRAWN}),
        D.UNDER_REVIEW: frozenset({D.RESOLVED, D.REJECTED, D.WITHDRAWN}),
        D.RESOLVED: frozenset(),
        D.REJECTED: frozenset(),
        D.WITHDRAWN: frozenset(),
    },
)
