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
# provider_status marks the sender writes beside a status (channels.sms.jobs), which the operations view shows
# apart: a QUEUED message whose job was parked after its last attempt (a replay sends it), and a SENT one whose
# send the aggregator may or may not have taken (not resent; no delivery report can match it).
RETRIES_EXHAUSTED = "RetriesExhausted"
SENT_UNCONFIRMED = "Unconfirmed"
# And a FAILED one never handed to the aggregator: a reminder dropped at its turn ("not sent: ...", channels.sms.jobs)
# or a queued message of a member erased (core.members). Not sent: a reminder marked so does not count as sent
# (core.reminders), and the next morning's scan may queue its due date again.
SKIPPED = "Skipped"
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
    # Which text went to whom, on each of its audit rows (sms.sent, sms.delivered, ...): the template and the
    # member's id (null: a number of no member). Never the number or the text: the audit log is append-only, so
    # erasing a member (core.members) could not clear them there as it does on her SMS rows.
    audit_columns=(("template", "template"), ("memberId", "member_id")),
)
