"""SMS message states, driven by the send answer and by delivery reports."""

from __future__ import annotations

from enum import StrEnum

from core.models import SmsMessage
from core.state.machine import StateMachine


class SmsStatus(StrEnum):
    QUEUED = "QUEUED"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"


M = SmsStatus
SMS = StateMachine(
    name="sms",
    states=SmsStatus,
    model=SmsMessage,
    table={
        M.QUEUED: frozenset({M.SENT, M.FAILED, M.REJECTED}),
        M.SENT: frozenset({M.DELIVERED, M.FAILED, M.REJECTED, M.EXPIRED}),
        M.DELIVERED: frozenset(),
        M.FAILED: frozenset(),
        M.REJECTED: frozenset(),
        M.EXPIRED: frozenset(),
    },
)
