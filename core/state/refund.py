"""Refund states and the moves between them."""

from __future__ import annotations

from enum import StrEnum

from core.models import Refund
from core.state.machine import StateMachine


class RefundStatus(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


R = RefundStatus
REFUND = StateMachine(
    name="refund",
    states=RefundStatus,
    model=Refund,
    table={
        R.PENDING: frozenset({R.PROCESSING, R.COMPLETED, R.FAILED}),
        R.PROCESSING: frozenset({R.COMPLETED, R.FAILED}),
        R.COMPLETED: frozenset(),
        R.FAILED: frozenset(),
    },
)
