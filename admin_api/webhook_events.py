"""The webhook events the gateway sends to cooperatives' systems, described for the OpenAPI document (its 3.1
`webhooks`): one entry per type core.webhooks.EVENTS lists (fan_out parks any other as a bad payload, so no
other is ever sent), its body the envelope core.webhooks.envelope builds, its `data` the one the event's subject
builds (core.provider_events.event_data, core.refunds.refund_data, core.disputes.dispute_data; the subject is the type's
first word, as core.webhooks.event_subject reads it), with `reportedPayment` for the events about money a provider
reported (core.provider_events._emit_reported's, which core.webhooks.MAY_FOLLOW lists: one it left out would be given
up). The data's fields are each required and no other is allowed: a field added to a builder and not here fails the
tests that validate real deliveries against this (tests/admin_api/test_webhook_events_documented.py)."""

from __future__ import annotations

from typing import Any

from admin_api.disputes import DISPUTE
from admin_api.payments import PAYMENT
from admin_api.refunds import REFUND
from core.provider_events import FLAG_KINDS, FLAGGED
from core.webhooks import (
    ATTEMPT_HEADER,
    DELIVERY_TIMEOUT,
    EVENT_HEADER,
    EVENT_ID_HEADER,
    EVENTS,
    FLAG_CLEARED,
    MAY_FOLLOW,
    RETRY_FOR,
    SIGNATURE_HEADER,
    SUBJECT_TYPES,
    TOLERANCE_SECONDS,
    still_subscribed,
)

# The data's `updatedAt`, and the envelope's `created`: to the millisecond (core.db.iso_ms), unlike the API's
# timestamps (to the second, as the data's other timestamps are).
_MS = {"type": "string", "format": "date-time", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"}
_UPDATED = {**_MS, "description": "when the change told was made, UTC to the millisecond: strictly later for every "
                                  "later change of the entity; apply an event only if it is later than the last "
                                  "applied for that id (events can arrive in any order)"}


def _data(schema: dict[str, Any], names: tuple[str, ...], description: str, **own: dict[str, Any]) -> dict[str, Any]:
    """An event's data: `names` as the API's view of the entity (`schema`) describes them, and `own`; each always
    present, none other."""
    properties = {**{name: schema["properties"][name] for name in names}, **own}
    return {"type": "object", "description": description, "properties": properties, "required": list(properties),
            "additionalProperties": False}


PAYMENT_DATA = _data(
    PAYMENT,
    ("id", "reference", "status", "amount", "currency", "collectedAmount", "paymentMethod", "paymentAccount",
     "paymentTypeId", "memberId", "gatewayTransactionId", "failureReason", "late", "mismatch", "mismatchDetail",
     "completedAt", "createdAt"),
    "The payment as GET /v1/payments/{id} shows these fields (paymentAccount masked); collectedAmount is what to "
    "credit",
    updatedAt=_UPDATED,
)
REFUND_DATA = _data(
    REFUND,
    ("id", "reference", "paymentId", "amount", "currency", "status", "reason", "failureReason", "disputeId",
     "providerTransactionId", "returnedByProvider", "createdAt", "completedAt"),
    "The refund as GET /v1/refunds/{id} shows these fields; told once it ends, COMPLETED or FAILED. disputeId: the "
    "dispute it was made during or resolved with, or whose resolution without a refund of its own found it not yet "
    "settled (its failure is noted there); returnedByProvider: a chargeback "
    "recorded, never sent; providerTransactionId: the statement's line",
    updatedAt=_UPDATED,
)
DISPUTE_DATA = _data(
    DISPUTE,
    ("id", "reference", "paymentId", "status", "reason", "resolution", "refundId", "createdAt"),
    "The dispute as GET /v1/disputes/{id} shows these fields",
    updatedAt=_UPDATED,
)
REPORTED_PAYMENT = {
    "type": "object",
    "description": "what the provider reported, the payment itself unchanged but flagged (mismatch): check the "
                   "provider's statement, then refund, credit or record it",
    "properties": {
        "moneyReference": {"type": ["string", "null"], "description": "the provider's id of the money it reported"},
        "amount": {**PAYMENT["properties"]["amount"], "type": ["integer", "string", "null"]},
        "currency": {"type": ["string", "null"]},
    },
    "required": ["moneyReference", "amount", "currency"],
    "additionalProperties": False,
}
PAYMENT_REPORTED_DATA = {
    **PAYMENT_DATA,
    "description": PAYMENT_DATA["description"] + "; reportedPayment is what the provider reported",
    "properties": {**PAYMENT_DATA["properties"], "reportedPayment": {"$ref": "#/components/schemas/ReportedPayment"}},
    "required": [*PAYMENT_DATA["required"], "reportedPayment"],
}
PAYMENT_FLAG = {
    "type": "object",
    "description": "the flag just added to the payment (mismatch), for a person to check and then clear with POST "
                   "/v1/payments/{id}/review",
    "properties": {
        "kind": {"type": "string", "enum": list(FLAG_KINDS),
                 "description": "what was found: " + "; ".join(f"{k}: {v}" for k, v in FLAG_KINDS.items())},
        "detail": {"type": "string", "description": "what the flag says, as mismatchDetail ends with it (that one "
                                                    "also keeps the flags not yet reviewed before it)"},
    },
    "required": ["kind", "detail"],
    "additionalProperties": False,
}
PAYMENT_FLAGGED_DATA = {
    **PAYMENT_DATA,
    "description": PAYMENT_DATA["description"] + "; flag is the flag just added",
    "properties": {**PAYMENT_DATA["properties"], "flag": {"$ref": "#/components/schemas/PaymentFlag"}},
    "required": [*PAYMENT_DATA["required"], "flag"],
}
PAYMENT_FLAG_CLEARED_DATA = {
    **PAYMENT_DATA,
    "description": PAYMENT_DATA["description"] + "; review is what a person just cleared",
    "properties": {**PAYMENT_DATA["properties"], "review": {
        **PAYMENT["properties"]["review"], "type": "object",
        "description": "the flags just cleared (POST /v1/payments/{id}/review), as the payment's review shows them: "
                       "what they said (mismatchDetail), who cleared them (by), when (at) and their note",
        "additionalProperties": False}},
    "required": [*PAYMENT_DATA["required"], "review"],
}
# The data of each kind of subject (an event type's first word: SUBJECT_TYPES).
_SUBJECT_DATA = {"payment": "PaymentEventData", "refund": "RefundEventData", "dispute": "DisputeEventData"}
SCHEMAS = {"PaymentEventData": PAYMENT_DATA, "PaymentReportedEventData": PAYMENT_REPORTED_DATA,
           "RefundEventData": REFUND_DATA, "DisputeEventData": DISPUTE_DATA, "ReportedPayment": REPORTED_PAYMENT,
           "PaymentFlaggedEventData": PAYMENT_FLAGGED_DATA, "PaymentFlag": PAYMENT_FLAG,
           "PaymentFlagClearedEventData": PAYMENT_FLAG_CLEARED_DATA}

_SAYS = {
    "payment.completed": "The payment's money was taken (COMPLETED; late: true when it was given up first, TIMEOUT "
                         "or CANCELLED). Also sent for a payment an admin recorded from the provider's statement.",
    "payment.failed": "The payment failed or was cancelled (FAILED or CANCELLED): nothing was taken.",
    "payment.taken_after_failure": "The provider took the money after all for a FAILED payment: it stays FAILED, the "
                                   "money is held and refundable.",
    "payment.paid_twice": "The payer paid a second time (an invoice paid twice): the payment keeps its status, "
                          "flagged; reportedPayment is the second payment: refund or credit it.",
    "payment.unconfirmed_success": "A provider said money was taken for a TIMEOUT, CANCELLED, FAILED or VOIDED "
                                   "payment but its status query failed: status unchanged, flagged; reportedPayment is "
                                   "what it claimed.",
    "payment.timeout": "The payer did not approve in time (TIMEOUT); money reported later completes it, late.",
    "payment.voided": "An admin voided a recording of money taken made in error (VOIDED): nothing collected.",
    "payment.taken_after_void": "The provider confirmed money taken for a VOIDED payment's request: status "
                                "unchanged, nothing collected, flagged; reportedPayment is the transaction id and "
                                "amount (record the statement line with POST /v1/payments/recorded). Once per "
                                "transaction id.",
    "payment.flagged": "The payment was flagged (mismatch) for a person: flag says why. Sent for each flag with no "
                       "event of its own (those, payment.taken_after_failure, payment.paid_twice, "
                       "payment.unconfirmed_success and payment.taken_after_void, are sent instead, to this event's "
                       "endpoints too); the status is unchanged unless payment.completed, failed or timeout tells "
                       "the same change. Once per flag. Its updatedAt is its change's (payment.completed... written "
                       "with it share it): read the flag even if not later than the last applied, unless earlier than "
                       "a payment.flag_cleared's, which cleared it.",
    "payment.flag_cleared": "A person cleared the payment's flags (POST /v1/payments/{id}/review) once they were "
                            "checked and dealt with: mismatch false, mismatchDetail null; review says what they said, "
                            "who cleared them, when and the note. Nothing else changed (status, money). Once per "
                            "review; a later flag is told again (payment.flagged...). It cleared every flag told "
                            "with an earlier updatedAt, also one arriving after it (a delivery retried).",
    "refund.completed": "The refund's money went back to the payer (COMPLETED).",
    "refund.failed": "The refund failed (FAILED); told again as refund.completed if the provider later reports the "
                     "money sent back.",
    "dispute.opened": "A dispute was opened about a payment.",
    "dispute.updated": "A dispute moved: UNDER_REVIEW, or ended RESOLVED (refundId: the refund it was resolved "
                       "with, if any), REJECTED or WITHDRAWN; or a note or evidence was added to it without a move "
                       "(once per note; status unchanged, updatedAt the note's; notes are not in the event: read "
                       "them with GET /v1/disputes/{id}). The notes the gateway writes itself (a refund made on the "
                       "payment, or one that failed) send none: the refund's events, once it ends, name the dispute "
                       "(disputeId).",
}

_HEADERS = [
    {"name": SIGNATURE_HEADER, "in": "header", "required": True,
     "description": f"t=<unix seconds>,v1=<hex>: the HMAC-SHA256, lowercase hex, of t + \".\" + the raw body, keyed "
                    f"with the endpoint's whole secret as returned, whsec_ included, as UTF-8 bytes (not "
                    f"base64-decoded). While a rotated secret still signs (rotate-secret's overlap) one v1 per "
                    f"secret, newest first: accept the event if any matches. Refuse a t more than "
                    f"{TOLERANCE_SECONDS} seconds from now.",
     "schema": {"type": "string", "pattern": r"^t=\d+(,v1=[0-9a-f]{64})+$"}},
    {"name": EVENT_ID_HEADER, "in": "header", "required": True,
     "description": "the event's id, the body's id: the same on every attempt; ignore one already processed",
     "schema": {"type": "string"}},
    {"name": ATTEMPT_HEADER, "in": "header", "required": True,
     "description": "which attempt at delivering this event to this endpoint this is: 1 the first time, one more on "
                    "each retry, and on from there when the delivery is sent again (its job replayed, the endpoint "
                    "enabled again); the number of attempts recorded before it (GET "
                    "/v1/webhook-endpoints/{id}/deliveries) plus one. For logs: a number above 1 is no new event, "
                    "drop it by X-Gateway-Event-Id if it was processed",
     "schema": {"type": "string", "pattern": r"^[1-9][0-9]*$"}},
]


def _also_to(event_type: str) -> str:
    """Which endpoints an event may also go to besides those that asked for it: the events it follows
    (core.webhooks.still_subscribed, as update_endpoint reads it)."""
    others = [other for other in EVENTS if other != event_type and still_subscribed([other], event_type)]
    if not others:
        return ""
    told = " (the one its system was told of that payment)" if event_type in MAY_FOLLOW else ""
    return f" Also sent to endpoints that asked for {' or '.join(others)}{told}."


def event_schema(event_type: str) -> dict[str, Any]:
    """The body POSTed for `event_type` (core.webhooks.envelope)."""
    subject = event_type.partition(".")[0]
    if subject not in SUBJECT_TYPES:
        raise ValueError(f"{event_type}: no subject of {SUBJECT_TYPES}")
    name = ("PaymentReportedEventData" if event_type in MAY_FOLLOW else
            "PaymentFlaggedEventData" if event_type == FLAGGED else
            "PaymentFlagClearedEventData" if event_type == FLAG_CLEARED else _SUBJECT_DATA[subject])
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string", "maxLength": 64, "description": "the event's id (X-Gateway-Event-Id)"},
            "type": {"const": event_type},
            "created": {**_MS, "description": "when the event happened, UTC to the millisecond"},
            "cooperativeId": {"type": "string", "format": "uuid"},
            "data": {"$ref": f"#/components/schemas/{name}"},
        },
        "required": ["id", "type", "created", "cooperativeId", "data"],
        "additionalProperties": False,
    }


def webhooks() -> dict[str, Any]:
    """The OpenAPI 3.1 `webhooks`: one per event type the gateway sends, in EVENTS' order. An event type with
    no description here fails the document's build (KeyError), not silently."""
    described: dict[str, Any] = {}
    for event_type in EVENTS:
        described[event_type] = {"post": {
            "operationId": f"webhook_{event_type.replace('.', '_')}",
            "summary": event_type,
            "description": _SAYS[event_type] + _also_to(event_type) + " POSTed to the endpoints registered for it "
                           f"(POST /v1/webhook-endpoints). Answer 2xx within {DELIVERY_TIMEOUT:.0f} seconds once the "
                           "signature checks and the event is stored (the answer's body is not read); anything else, "
                           f"a redirect included, is retried with backoff for {RETRY_FOR.days} days.",
            "tags": ["webhooks"],
            "parameters": [*_HEADERS, {"name": EVENT_HEADER, "in": "header", "required": True,
                                       "description": "the event's type, the body's type",
                                       "schema": {"const": event_type}}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": event_schema(event_type)}}},
            "responses": {"2XX": {"description": "Received: the event is not sent again"},
                          "default": {"description": "A failure: the event is sent again later"}},
        }}
    return described
