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
    # The sender's corrections (channels.sms.jobs), each made by the run that knows what its own request did, under
    # its guards, and by no other writer (a delivery report for a FAILED text changes nothing):
    # - reopened: SENT Unconfirmed -> QUEUED, a text the run that took its job over recorded Unconfirmed, whose
    #   stalled run's own request never connected (or was refused for the account): nothing went, it is sent once;
    # - confirmed: FAILED -> SENT, a text a person's action marked "not sent" (an erasure, a number release, an admin's
    #   discard) while its request was out, which Africa's Talking took; and SENT -> SENT, AT's id written over the
    #   taker's Unconfirmed;
    # - sent: FAILED -> SENT Unconfirmed, that text's answer lost (it may have gone), or its previous attempt cut off
    #   or lost with its worker mid-send (Job.interrupted: the retry found it "not sent"), audited as a lost answer is;
    # - rejected: FAILED -> REJECTED, that text refused by Africa's Talking (as a refused send ends).
    recoveries={
        "reopened": frozenset({(M.SENT, M.QUEUED)}),
        "confirmed": frozenset({(M.FAILED, M.SENT), (M.SENT, M.SENT)}),
        "sent": frozenset({(M.FAILED, M.SENT)}),
        "rejected": frozenset({(M.FAILED, M.REJECTED)}),
    },
)
