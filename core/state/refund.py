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
# Still moving money: a refund's job may yet pay out to the payment's account.
OPEN = frozenset({R.PENDING, R.PROCESSING})
OPEN_VALUES = tuple(sorted(s.value for s in OPEN))  # OPEN as the stored strings, for SQL IN and plain comparisons
REFUND = StateMachine(
    name="refund",
    states=RefundStatus,
    model=Refund,
    table={
        R.PENDING: frozenset({R.PROCESSING, R.COMPLETED, R.FAILED}),
        # The provider took the request, then refused it for the gateway's own credentials (M-Pesa's reversal Result
        # 2001/21): nothing was processed, so it is a refund not sent again, waiting for the configuration to be fixed
        # (core.refunds.handle_refund_event).
        R.PROCESSING: frozenset({R.COMPLETED, R.FAILED, R.PENDING}),
        R.COMPLETED: frozenset(),
        # The provider reports the money sent back after all (a late answer, or a person recorded FAILED too
        # soon): the member has it, so the refund completes, flagged and audited (core.refunds).
        R.FAILED: frozenset({R.COMPLETED}),
    },
    exceptional=frozenset({(R.FAILED, R.COMPLETED)}),
)
