"""Payments over the API: initiate with an idempotency key, read one, its status, and filtered pages; the
support desk cancels an open one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web
from sqlalchemy import String, literal, select

from admin_api.common import (
    AMOUNT_IN,
    AMOUNT_OUT,
    DATETIME,
    ID,
    NULL_DATETIME,
    NULL_STRING,
    SYNC_LAG,
    basis_param,
    by_basis,
    cooperative_zone,
    iso,
    json_response,
    local_bound,
    matching,
    money_out,
    obj,
    one,
    out,
    page_of,
    paged,
    synced,
)
from admin_api.members import SEARCHED_NUMBER_RULE, search_regions, searched_number
from admin_api.routing import IDEMPOTENT_REPLAYED, Ctx, Route
from admin_api.validation import (
    ID_KEYWORD,
    LIMIT,
    PAGE,
    Param,
    body_datetime,
    own_idempotency_key,
    period_params,
    statement_time,
)
from core.auth import OWN_PAYMENTS
from core.collect_now import CollectNow
from core.db import autocommit
from core.errors import (
    IDEMPOTENCY_KEY_OTHER_CALLER,
    IDEMPOTENCY_KEY_REUSED,
    MEMBER_NOT_FOUND,
    Conflict,
    NotFound,
    ValidationError,
)
from core.models import Member, Payment, PaymentType
from core.money import Money
from core.payments import (
    METHOD_OPERATOR,
    METHODS,
    Db,
    NewPayment,
    collected_to_credit,
    create_payment,
    load_context,
    payer_index_guess,
    review_flags,
)
from core.phone import PhoneError, normalize
from core.provider_events import cancel_payment
from core.ratelimit import Limit
from core.recorded_payments import (
    RECORDED,
    StatementLine,
    record_collected,
    record_payment,
    set_gateway_reference,
    void_recording,
)
from core.state.payment import HELD, PaymentStatus

STATUSES = tuple(s.value for s in PaymentStatus)

PAYMENT = out(
    {
        "id": ID,
        "amount": AMOUNT_OUT,
        "currency": {"type": "string"},
        "collectedAmount": {
            "type": ["integer", "string"],
            "description": "what the provider reported taken and the payment still holds, to credit (amount is "
            "what was asked; mismatch: they differ); 0 while nothing is taken (completedAt null), and when taken "
            "in another currency, counted on another payment holding the same gatewayTransactionId, or VOIDED. "
            "Refunds are not taken off it (refundedAmount: a REFUNDED payment keeps what was taken here). "
            "payments.csv's collectedAmount is the same figure",
        },
        "status": {"enum": list(STATUSES)},
        "paymentMethod": {"enum": list(METHODS)},
        "paymentAccount": {"type": "string", "description": "the account paid from, masked (the full number is "
                           "never given back): a phone number keeps its country code, two digits and its last three "
                           "(+25078****001), a bank account its last four, an e-mail its first letter and domain; "
                           "\"erased\" once the payer's personal data was erased, \"unknown\" for a statement line "
                           "recorded naming its member alone whose number then her corrections do not tell (a "
                           "NEW_SIM since). "
                           "GET /v1/payments?paymentAccount= "
                           "finds payments by the full number"},
        "reference": {"type": "string"},
        "gatewayTransactionId": NULL_STRING,
        "gatewayReference": NULL_STRING,
        "paymentUrl": {**NULL_STRING, "description": "bank methods (BANK_*): where the payer pays the IremboPay "
                       "invoice, in the 201 (status PROCESSING) when IremboPay makes it within "
                       "PAYMENT_URL_WAIT_SECONDS (5 s); null past it, and GET /v1/payments/{id} carries it once made "
                       "(mobile money needs none: the payer approves a prompt on the phone); null again once the "
                       "payment is CANCELLED (its invoice cannot be withdrawn at IremboPay: money paid on it "
                       "still completes the payment, late)"},
        "description": NULL_STRING,
        "dueDate": NULL_DATETIME,
        "completedAt": NULL_DATETIME,
        "expiresAt": {**DATETIME, "description": "the end of its approval window: a payment still open then is "
                      "asked about once more and ends not approved in time (one the provider still shows waiting "
                      "for the payer is given its grace first); a success reported later still completes it, "
                      "flagged late"},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
        "paymentTypeId": ID,
        "memberId": {"type": ["string", "null"]},
        "cooperativeId": ID,
        "fee": AMOUNT_OUT,
        "refundedAmount": {**AMOUNT_OUT, "description": "refunds completed so far, chargebacks (returnedByProvider) "
                                                        "included: more than collectedAmount when the member got a "
                                                        "refund and the provider took the payment back too "
                                                        "(flagged: mismatchDetail)"},
        "channel": {"type": "string", "description": "how it was made: ussd, api, sms, or recorded (an admin "
                    "recorded money a provider's statement shows taken, POST /v1/payments/recorded)"},
        "failureReason": NULL_STRING,
        "mismatch": {"type": "boolean"},
        "mismatchDetail": {**NULL_STRING, "description": "why the payment is flagged, e.g. the amount the "
                           "provider reported against the amount asked; null while not flagged (what a reviewed "
                           "flag said: review.mismatchDetail)"},
        "review": {
            "type": ["object", "null"],
            "description": "The last review of its flags (POST /v1/payments/{id}/review): what they said, who cleared "
                           "them, when, and their note; null if never reviewed. A flag raised after it sets "
                           "mismatch again (mismatchDetail says only what is new); earlier reviews are in the "
                           "audit log (payment.reviewed)",
            "properties": {"mismatchDetail": {**NULL_STRING, "description": "the flag's detail when it was reviewed"},
                           "note": {"type": "string"}, "by": {"type": "string"}, "at": DATETIME},
            "required": ["mismatchDetail", "note", "by", "at"],
        },
        "late": {"type": "boolean"},
    }
)
PAYMENT_STATUS = out(
    {
        "id": ID,
        "reference": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "failureReason": NULL_STRING,
        "completedAt": NULL_DATETIME,
        "updatedAt": DATETIME,
    }
)
# Not `format: uuid`: one that is no UUID is answered "payment type not found" (404), as one of another cooperative.
PAYMENT_TYPE_ID = {"type": "string", "minLength": 1, "maxLength": 64, ID_KEYWORD: True}
PAYMENT_CREATE = obj(
    {
        "paymentTypeId": PAYMENT_TYPE_ID,
        "amount": AMOUNT_IN,
        "paymentMethod": {"enum": list(METHODS)},
        "paymentAccount": {"type": "string", "minLength": 3, "maxLength": 120},
        "description": {"type": ["string", "null"], "maxLength": 500},
        "dueDate": {"type": ["string", "null"], "format": "date-time", "minLength": 1,
                    "description": "The due date of the period the payment pays, for a recurring payment type: one "
                                   "of its due dates (its dueDay, every month, quarter or year), as the bare date "
                                   "(2026-11-01, 2026-11-01T00:00:00Z) or an instant on that day in the "
                                   "cooperative's time zone. Another day is refused (400 VALIDATION_FAILED, field "
                                   "dueDate, naming the due dates either side): it would pay no period, and the "
                                   "member would still be reminded and listed UNPAID in the dues report "
                                   "(GET /v1/reports/dues). Without it, the payment pays the period a payment made "
                                   "at that moment pays, as the USSD's do (null is the same). An empty string is "
                                   "refused (400 VALIDATION_FAILED, field dueDate), not read as none. Any day for a "
                                   "type that is not recurring"},
        "idempotencyKey": {"type": "string", "minLength": 8, "maxLength": 128},
        "memberId": {"type": "string", "format": "uuid",
                     "description": "admins: the member paying. Without it, a mobile-money payment is the "
                                    "cooperative's ACTIVE member's whose registered number is paymentAccount "
                                    "(none for another number or a bank method); a tenant always pays as themselves"},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
    },
    ["paymentTypeId", "amount", "paymentMethod", "paymentAccount", "idempotencyKey"],
)

COLLECTED_OUTCOME = obj(
    {
        "status": {"enum": [PaymentStatus.COMPLETED.value]},
        "providerTransactionId": {"type": "string", "minLength": 1, "maxLength": 128,
                                  "description": "the provider's id of the money taken (a refund needs it); 409 "
                                                 "when another payment of that provider holds it"},
        "amount": {**AMOUNT_IN, "description": "what the provider took, major units (default: the payment's amount)"},
        "note": {"type": "string", "minLength": 3, "maxLength": 300,
                 "description": "what the provider's statement shows (kept in the audit log)"},
        "completedAt": {"type": ["string", "null"], "format": "date-time",
                        "description": "when the provider's statement shows the money taken (default: now; without "
                                       "an offset, the cooperative's local time, as statements show it); the "
                                       "reconciliation's settled figures date the payment so"},
    },
    ["status", "providerTransactionId", "note"],
)
# Our request id at a provider, as an admin copies it (a recorded payment's, given with it or after it): a UUID, as
# core.recorded_payments checks it again (_request_reference).
GATEWAY_REFERENCE = {"type": "string", "format": "uuid"}
REVIEW = obj(
    {"note": {"type": "string", "minLength": 3, "maxLength": 300,
              "description": "what was checked and done, e.g. what the provider's statement shows and how the "
                             "money was accounted for (kept with the payment's review and in the audit log)"}},
    ["note"],
)
RECORDED_PAYMENT = obj(
    {
        "paymentTypeId": PAYMENT_TYPE_ID,
        "amount": {**AMOUNT_IN, "description": "what the statement shows taken, major units of the type's currency"},
        "paymentMethod": {"enum": list(METHODS),
                          "description": "the provider follows from it, as for POST /v1/payments"},
        "paymentAccount": {"type": "string", "minLength": 3, "maxLength": 120,
                           "description": "the account the statement shows paying, as POST /v1/payments takes it; "
                                          "without it (mobile money), the number the member held at "
                                          "completedAt as her number corrections tell it, else none: "
                                          "\"unknown\" (a refund through the provider is then 409)"},
        "memberId": {"type": "string", "format": "uuid",
                     "description": "the member who paid. Without it, the cooperative's member who held "
                                    "paymentAccount at completedAt, whatever her status now, as her number "
                                    "corrections tell it (none for another number or a bank method)"},
        "providerTransactionId": {"type": "string", "minLength": 1, "maxLength": 128,
                                  "description": "the provider's id of the money on its statement (a refund needs "
                                                 "it); 409 when a payment of that provider holds it"},
        "completedAt": {"type": "string", "format": "date-time",
                        "description": "when the statement shows the money taken (without an offset, the "
                                       "cooperative's local time); the reconciliation's settled figures date the "
                                       "payment so, and a new reference its day. Not in the future, nor more than "
                                       "RECORDED_PAYMENT_MAX_AGE_DAYS (400 by default) before now: 400 naming the "
                                       "bound"},
        "note": {"type": "string", "minLength": 3, "maxLength": 300,
                 "description": "what the provider's statement shows (kept in the audit log)"},
        "reference": {"type": "string", "minLength": 1, "maxLength": 32,
                      "description": "the lost payment's reference (PAY_20261201_001) from the member's receipt or "
                                     "the webhook log, so that her receipt and STATUS SMS find it: 409 if a payment "
                                     "has it, 400 if it was never handed out; its day must be a date, and its "
                                     "number is kept as receipts write it (PAY_20261201_1 is PAY_20261201_001). "
                                     "Without it, a new one dated the day of completedAt in the cooperative's time "
                                     "zone"},
        "id": {"type": "string", "format": "uuid",
               "description": "the lost payment's id from the webhook log, so that the cooperative's records match "
                              "again: 409 if a payment has it. Without it, a new one"},
        "callbackId": {"type": "string", "format": "uuid",
                       "description": "super admin: a provider callback that matched no payment "
                                      "(GET /v1/provider-callbacks) that this money accounts for: resolved with the "
                                      "note in the same transaction; the request it names (its payload's "
                                      "gatewayReference) is the payment's"},
        "gatewayReference": {**GATEWAY_REFERENCE,
                             "description": "the lost payment's gatewayReference (GET /v1/payments/{id} gave it; "
                                            "MTN's statement shows it as the externalId): the request that took the "
                                            "money, which an MTN refund names. Without it (or a callbackId naming "
                                            "it) a refund of the payment through MTN is refused: record the money "
                                            "MTN sends back with returnedByProvider instead (or give it later: "
                                            "POST /v1/payments/{id}/gateway-reference). 409 if a payment of the "
                                            "provider has it (the message says what that payment's status makes "
                                            "true of the request's money: a FAILED one's is not recorded, so the "
                                            "line is recorded without gatewayReference)"},
        "idempotencyKey": {"type": "string", "minLength": 8, "maxLength": 128,
                           "description": "as for POST /v1/payments: the same request again answers the payment it "
                                          "recorded, another request under it is a 409"},
        "sendReceipt": {"type": "boolean", "default": False,
                        "description": "send the payer the receipt SMS (she may hold the lost payment's already)"},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
    },
    ["paymentTypeId", "amount", "paymentMethod", "providerTransactionId", "completedAt", "note", "idempotencyKey"],
)
REQUEST_FOUND = obj(
    {
        "gatewayReference": {**GATEWAY_REFERENCE,
                             "description": "the request that took the payment's money, found after it was recorded "
                                            "(MTN's statement export shows it as the externalId; the lost payment's "
                                            "gatewayReference, as GET /v1/payments/{id} gave it): an MTN refund "
                                            "names it. 409 if a payment of the provider has it"},
    },
    ["gatewayReference"],
)
CANCEL = {
    **obj({"note": {"type": "string", "minLength": 3, "maxLength": 300,
                    "description": "why it is cancelled, e.g. what the member asked (kept in the audit log; the "
                                   "payment's failureReason is \"cancelled by the cooperative: <note>\")"}},
          ["note"]),
    "description": "The support desk cancels an open payment (PENDING or PROCESSING) a member asked for by mistake "
                   "(the wrong amount or type) or whose prompt never came, instead of waiting for its approval window "
                   "to end. It becomes CANCELLED at once: the member's SMS and the payment.failed webhook event, as "
                   "when a payer declines. Its request is never sent if it has not been yet. No provider can withdraw "
                   "a request it holds: a prompt already on the member's phone (or a bank payment's IremboPay "
                   "invoice) can still be paid, and so can a request being sent at that moment; the gateway keeps "
                   "asking the provider, and money taken after the cancel completes the payment late (late: true, "
                   "the receipt SMS, payment.completed): refund it then if the member wants it back. 409 when the "
                   "payment is no longer open (its status is named).",
}
VOID = {
    **obj({"note": {"type": "string", "minLength": 3, "maxLength": 300,
                    "description": "what was recorded in error and why, e.g. the statement line it really was "
                                   "(kept in the audit log; the payment's failureReason is \"recording voided: "
                                   "<note>\")"}},
          ["note"]),
    "description": "The support desk voids a recording of money taken made in error (POST /v1/payments/recorded, or "
                   "POST /v1/payments/{id}/outcome): the wrong statement line, member or transaction id, or another "
                   "cooperative's line. A refund would send real money to someone; this moves none. The payment "
                   "becomes VOIDED (final): collectedAmount 0, out of the reconciliation's collected and settled "
                   "figures and not refundable (a period that had ended names it in paymentsVoidedLater); its "
                   "gatewayTransactionId is released (and a recorded payment's gatewayReference), both kept in the "
                   "audit row (payment.voided, its before, with the note), so the right line can be recorded with "
                   "POST /v1/payments/recorded (under a new idempotencyKey). The "
                   "payment.voided webhook event is queued (sent to endpoints of payment.completed too); no SMS. "
                   "409 for a payment the provider itself reported paid (a callback, or the one a recording accounts "
                   "for: refund it instead), one not recorded by an admin, one with a refund that is not FAILED (money "
                   "may be on its way back), one with an open dispute, one whose transaction id a payment the "
                   "provider reported paid holds too with its money counted on this recording, and one VOIDED "
                   "already. A success the provider reports afterwards for its request flags it (mismatch) and "
                   "never reopens it: payment.taken_after_void is queued (data.reportedPayment: the provider's "
                   "transaction id and amount; sent to endpoints of payment.voided and payment.completed too), "
                   "once per transaction id.",
}
LIST_QUERY = {
    "page": PAGE,
    "limit": LIMIT,
    "status": Param(enum=STATUSES, description="Filter by payment status"),
    "paymentMethod": Param(enum=METHODS, description="Filter by payment method"),
    "paymentTypeId": Param("uuid", "Filter by payment type"),
    "member": Param("uuid", "Filter by member id"),
    "reference": Param(description="The payment's reference as its receipt gives it (PAY_20261201_001)",
                       nonempty=True),
    "gatewayTransactionId": Param(description="The provider's id of the money, exact, as the payment's "
                                  "`gatewayTransactionId` and the provider's statement give it (MTN's "
                                  "financialTransactionId, an M-Pesa receipt number): the payment(s) holding it; "
                                  "more than one is flagged (`mismatch`: the same money recorded twice)",
                                  max_length=128, nonempty=True),
    "paymentAccount": Param(description="Exact paying account: a phone number, a bank account or an e-mail (as "
                                        "given: with paymentMethod a bank's, never read as a phone number). "
                                        f"{SEARCHED_NUMBER_RULE}", nonempty=True),
    **period_params("createdAt, or completedAt with basis=completed"),
    "basis": basis_param("payments"),
    "cooperativeId": Param("uuid", "Super admin: one cooperative"),
    "mismatch": Param("boolean", "true: only payments flagged for a person (`mismatchDetail` says why: another amount "
                      "taken, money taken after a failure, a refund the provider contradicted, the member paid back "
                      "twice); false: only those not flagged"),
    "late": Param("boolean", "true: only payments completed after they were given up (TIMEOUT or CANCELLED)"),
    # Sync (admin_api.common.synced): oldest change first, by cursor. page/limit pages (newest first) shift while
    # payments are made or change status, repeating or skipping rows; a cursor does not.
    "updatedFrom": Param("date-time", "Sync: payments changed at or after this instant (read as `from`), oldest "
                         "change first, each in its latest state; page on with `after`. A change is listed once "
                         f"it is {SYNC_LAG.seconds} seconds old (later while a transaction that began before it "
                         "is still writing payments)"),
    "after": Param(description="Sync: the `nextCursor` of the previous answer, passed back unchanged: the payments "
                   "changed after the last one it listed (a payment that changes again is listed again)"),
}


# Every column of a payment (its mapped attributes' keys).
_COLUMNS = frozenset(attribute.key for attribute in Payment.__mapper__.column_attrs)


class _Attributes(Mapping[str, Any]):
    """A payment's columns read through its attributes, each when asked for: only those present shows are read, as
    before _columns. (Reading every column read ones it does not show: one expired on a detached payment raised
    DetachedInstanceError, or MissingGreenlet on an async session's, where present had answered.)"""

    __slots__ = ("_payment",)

    def __init__(self, payment: Payment) -> None:
        self._payment = payment

    def __getitem__(self, key: str) -> Any:
        return getattr(self._payment, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_COLUMNS)

    def __len__(self) -> int:
        return len(_COLUMNS)


def _columns(p: Payment) -> Mapping[str, Any]:
    """`p`'s column values by key, as its attributes give them. An instance holding every one (loaded, or built from
    the row just written: core.payments._loaded) has them in its __dict__, where its attributes read them: read
    there, the 34 that present reads cost about 1 us instead of 15 through SQLAlchemy's descriptors. One missing some
    (expired) goes through the attributes, as before: those present reads, each when it reads it (_Attributes)."""
    values = p.__dict__
    if _COLUMNS <= values.keys():
        return values
    return _Attributes(p)


def present(p: Payment) -> dict[str, Any]:
    v = _columns(p)
    currency = v["currency"]
    return {
        "id": v["id"],
        "amount": money_out(v["amount_minor"], currency),
        "currency": currency,
        "collectedAmount": _collected(p),
        "status": v["status"],
        "paymentMethod": v["method"],
        "paymentAccount": v["payment_account_masked"],
        "reference": v["reference"],
        "gatewayTransactionId": v["provider_transaction_id"],
        "gatewayReference": v["gateway_reference"] or v["provider_reference"],
        # A cancelled payment's invoice stays payable at IremboPay (it has no call to withdraw one): its link is not
        # handed out any more, so no client sends the payer to pay what her cooperative cancelled.
        "paymentUrl": None if v["status"] == PaymentStatus.CANCELLED.value else v["payment_url"],
        "description": v["description"],
        "dueDate": iso(v["due_date"]),
        "completedAt": iso(v["completed_at"]),
        "expiresAt": iso(v["expires_at"]),
        "createdAt": iso(v["created_at"]),
        "updatedAt": iso(v["updated_at"]),
        "paymentTypeId": v["payment_type_id"],
        "memberId": v["member_id"],
        "cooperativeId": v["cooperative_id"],
        "fee": money_out(v["fee_minor"], currency),
        "refundedAmount": money_out(v["refunded_minor"], currency),
        "channel": v["channel"],
        "failureReason": v["failure_reason"],
        "mismatch": bool(v["mismatch"]),
        "mismatchDetail": v["mismatch_detail"],
        "review": _review(v),
        "late": bool(v["late"]),
    }


def _review(v: Mapping[str, Any]) -> dict[str, Any] | None:
    if v["reviewed_at"] is None:
        return None
    return {"mismatchDetail": v["reviewed_detail"], "note": v["review_note"], "by": v["reviewed_by"],
            "at": iso(v["reviewed_at"])}


def _collected(p: Payment) -> int | str:
    # Formatted as `amount` is; the webhook's `collectedAmount` (core.provider_events.event_data) and payments.csv's
    # read the same.
    taken = collected_to_credit(p)
    return money_out(taken.minor, taken.currency)


async def _tenants_own_number(ctx: Ctx, db: Db, account: str, country: str) -> None:
    """A tenant's mobile-money payment is paid from her own registered number. From any number, a tenant put a PIN
    prompt on another member's phone and read his wallet's answer in the payment's failureReason ("insufficient
    funds"). Refused alike for any other number, so it tells nothing of whose number it is; an admin makes a
    payment from another number. A number that cannot be read is left to create_payment's own refusal."""
    try:
        index = ctx.rt.cipher.blind_index(normalize(account, country).e164)
    except PhoneError:
        return
    own = await db.scalar(select(Member.phone_index).where(Member.id == ctx.who.member_id))
    if index != own:
        raise ValidationError("paymentAccount must be your own registered number: a member pays from her own "
                              "number (your cooperative's office can make a payment from another)",
                              field="paymentAccount")


async def initiate_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    held = ctx.held.made
    if ctx.rt.engine.dialect.name == "postgresql" and (held is None or not held.in_transaction()):
        # A Core connection in autocommit, no ORM session: the request's statements are raw and each atomic alone
        # (the context's read, the payment with its audit row and jobs in one statement, a replay's read), and the
        # session around them (its checkout, commit and close; the payment added to it) cost more CPU than they did
        # (bench/README.md's forty-sixth round). Not beside a session holding a connection already (a replay past
        # the limit was looked up in it): one connection a request, as the pool is sized for.
        async with autocommit(ctx.rt.engine) as conn:
            payment, created = await _create(ctx, conn)
    else:
        payment, created = await _create(ctx, ctx.session)
        await ctx.session.commit()
    wait = ctx.rt.settings.payment_url_wait_seconds
    if (wait > 0 and payment.method not in METHOD_OPERATOR and payment.payment_url is None
            and payment.status == PaymentStatus.PENDING.value):
        # A bank payment: the client redirects the payer to its invoice's paymentUrl (seed 001), made within the
        # wait when IremboPay answers in time (core.collect_now); a replay waits for it too.
        await CollectNow.of(ctx.rt).wait(payment.id, wait)
        payment = await ctx.session.get(Payment, payment.id, populate_existing=True) or payment
    # A replay answers as the first request did (seed 001: 201, the same key "returns existing payment"): a
    # client retrying after a lost answer checks for 201; Idempotent-Replayed tells the two apart.
    response = json_response(present(payment), status=201)
    if not created:
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    return response


async def _create(ctx: Ctx, db: Db) -> tuple[Payment, bool]:
    """The request's payment made, or the one its key made (created False), on `db`: the request's session, or on
    PostgreSQL a Core connection in autocommit (the payment then comes back detached)."""
    body, who = ctx.body, ctx.who
    own_idempotency_key(body["idempotencyKey"])
    coop_id = who.target_cooperative(body.get("cooperativeId"))
    member_id = body.get("memberId")
    if who.is_tenant:
        if member_id and member_id != who.member_id:
            raise NotFound("member not found", field="memberId", code=MEMBER_NOT_FOUND)
        member_id = who.member_id
    elif member_id:
        visible = await db.execute(who.scope(select(Member.id).where(Member.id == member_id), Member))
        if visible.scalar_one_or_none() is None:
            raise NotFound("member not found", field="memberId", code=MEMBER_NOT_FOUND)
    # No member named by an admin or a key (seed 001 has no memberId): the payment is the cooperative's active
    # member's whose registered number pays, as a USSD payment is the dialling member's.
    by_account = member_id is None and not who.is_tenant
    guess = payer_index_guess(ctx.rt.cipher, body["paymentMethod"], body["paymentAccount"]) if by_account else None
    # The cooperative, the type and the members in one query, handed to create_payment (not read twice).
    context = await load_context(db, coop_id, body["paymentTypeId"], member_id, payer_index=guess)
    ptype = context.ptype
    if ptype is None:
        raise NotFound("payment type not found", field="paymentTypeId")
    if (who.is_tenant and body["paymentMethod"] in METHOD_OPERATOR and context.coop is not None
            and not await _key_used(db, coop_id, body["idempotencyKey"])):
        # (A key used already makes nothing: her retry answers her payment, made from her number then, as any
        # replay does; another's payment or another request under it is a 409 below.)
        await _tenants_own_number(ctx, db, body["paymentAccount"], context.coop.country)
    due = body.get("dueDate")
    new = NewPayment(
        cooperative_id=coop_id,
        payment_type_id=ptype.id,
        method=body["paymentMethod"],
        account=body["paymentAccount"],
        idempotency_key=body["idempotencyKey"],
        channel="api",
        amount=Money.from_api(body["amount"], ptype.currency),
        member_id=member_id,
        description=body.get("description"),
        due_date=_parse_due(due) if due is not None else None,  # ("": refused by the schema, never "none")
        member_from_account=by_account,
    )
    payment, created = await create_payment(db, ctx.rt, new, actor=who.actor, context=context)
    if not created and who.is_tenant and payment.member_id != who.member_id:
        # The key names another member's payment (one whose payer was erased keeps no request to compare, so the
        # key alone matched it): refused as any other request under a used key, not answered with that payment.
        raise Conflict("Payment with this idempotency key already exists with a different request",
                       field="idempotencyKey", code=IDEMPOTENCY_KEY_REUSED)
    if not created and not who.has("payments:read") and payment.created_by != who.actor.id:
        # A key that reads only its own payments (payments:write) replaying another key's request (a retry sent
        # with a rotated key): the payment it would answer with is one it cannot read or poll afterwards.
        raise Conflict("a payment with this idempotency key was made by another API key, which this key cannot "
                       "read: look it up with a key that has payments:read, or use a new idempotency key for a "
                       "new payment", field="idempotencyKey", code=IDEMPOTENCY_KEY_OTHER_CALLER)
    return payment, created


async def payment_key_used(ctx: Ctx) -> bool:
    """Route.replay of both payment creates: whether the cooperative holds a payment made under the request's key
    (POST /v1/payments and a recorded payment share a cooperative's keys: either's handler answers it or a 409)."""
    return await _key_used(ctx.session, ctx.who.target_cooperative(ctx.body.get("cooperativeId")),
                           ctx.body["idempotencyKey"])


async def _key_used(db: Db, coop_id: str, key: str) -> bool:
    made = await db.execute(select(Payment.id).where(Payment.cooperative_id == coop_id,
                                                     Payment.idempotency_key == key.strip()))
    return made.first() is not None


def _parse_due(text: str) -> Any:
    return body_datetime(text, "dueDate")


async def filtered(ctx: Ctx) -> Any:
    q = ctx.query
    query = ctx.who.scope(select(Payment), Payment)
    updated_from = await local_bound(ctx, "updatedFrom")
    if updated_from is not None:
        query = query.where(Payment.updated_at >= updated_from)
    if q.get("reference") is not None:
        query = query.where(Payment.reference == q["reference"].strip().upper())
    if q.get("gatewayTransactionId") is not None:
        # Exact, as stored (providers' ids are case-sensitive): ix_payments_transaction_id, the id first.
        query = query.where(Payment.provider_transaction_id == q["gatewayTransactionId"])
    for flag, marked in (("mismatch", Payment.mismatch), ("late", Payment.late)):
        if q.get(flag) is not None:
            query = query.where(marked.is_(True) if q[flag] else marked.is_not(True))
    if q.get("paymentAccount") is not None:
        # Stored encrypted: found through its blind index, as it was normalised when the payment was made.
        # A bank payment's account is stored as given (core.payments._normalise_account), a wallet's as E.164:
        # with paymentMethod a bank's, never read as a number (0788123456 may be an account number there).
        account = q["paymentAccount"].strip()
        if q.get("paymentMethod") is None or q["paymentMethod"] in METHOD_OPERATOR:
            regions = await search_regions(ctx, ctx.who.cooperative_id or q.get("cooperativeId"))
            try:
                account = searched_number(account, regions, "paymentAccount").e164
            except PhoneError:
                pass  # not a phone number: a bank account or an e-mail, stored as given
        query = query.where(Payment.payment_account_index == ctx.rt.cipher.blind_index(account))
    # Pages by completion hold the export's rows (money held); a sync by completion keeps the rows whose money left
    # since (a recording voided): it listed them as collected, and must list the change.
    syncing = q.get("updatedFrom") is not None or q.get("after") is not None
    query, moment = by_basis(ctx, query, Payment.created_at, Payment.completed_at, None if syncing else HELD)
    if q.get("paymentMethod") is not None:
        # Inline (one of METHODS, validated): a plan of its own per method, so that a bank method's proves the partial
        # index's predicate (migration 0032) even in a plan PostgreSQL caches for a prepared statement, which a
        # bound parameter's could not.
        query = query.where(Payment.method == literal(q["paymentMethod"], String, literal_execute=True))
    query = matching(ctx, query, {"status": Payment.status,
                                  "paymentTypeId": Payment.payment_type_id, "member": Payment.member_id,
                                  "cooperativeId": Payment.cooperative_id}, moment)
    # A sync orders by its cursor instead (admin_api.common.synced); the basis then only picks the period's rows.
    return query.order_by(moment.desc(), Payment.id.desc())


async def list_payments(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Newest first by page/limit; with updatedFrom or after, a sync: oldest change first, by cursor."""
    if ctx.query.get("updatedFrom") is None and ctx.query.get("after") is None:
        return await paged(ctx, await filtered(ctx), present)
    if "page" in request.query:
        raise ValidationError("page cannot be combined with updatedFrom or after: a sync pages by cursor (after)",
                              field="page")
    return await synced(ctx, await filtered(ctx), present, updated=Payment.updated_at, ident=Payment.id,
                        table=Payment.__tablename__)


async def _readable(ctx: Ctx, payment_id: str) -> Payment:
    """The payment, for a caller that reads payments, or for a key that may read only those it made
    (payments:write: auth.OWN_PAYMENTS); any other is not found, as another cooperative's is."""
    payment: Payment = await one(ctx, Payment, payment_id, "payment")
    if not ctx.who.has("payments:read") and payment.created_by != ctx.who.actor.id:
        raise NotFound("payment not found")
    return payment


async def get_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(present(await _readable(ctx, request.match_info["id"])))


async def record_payment_outcome(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Money the provider's statement shows taken, for a payment the gateway gave up on (TIMEOUT, CANCELLED) or
    one still open past its approval window (core.recorded_payments.record_collected)."""
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    body = ctx.body
    amount = Money.from_api(body["amount"], payment.currency) if body.get("amount") is not None else None
    payment = await record_collected(
        ctx.session, ctx.rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
        provider_transaction_id=body["providerTransactionId"], note=body["note"], amount=amount,
        actor=ctx.who.actor,
        completed_at=statement_time(body.get("completedAt"), await cooperative_zone(ctx, payment.cooperative_id)))
    await ctx.session.commit()
    return json_response(present(payment))


async def review_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """A person checked a flagged payment and dealt with it: the flag is cleared, what it said kept as the
    payment's review (core.payments.review_flags). Another cooperative's payment is not found, as for the reads."""
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    payment = await review_flags(ctx.session, payment.id, payment.cooperative_id, ctx.body["note"],
                                 actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(payment))


async def record_statement_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """Money a provider's statement shows taken that no payment holds (a payment lost with a restore of PostgreSQL,
    or money no request of ours asked for), recorded as a COMPLETED payment (core.recorded_payments.record_payment). The
    same callers as recording a payment's outcome; a callback to resolve with it only a super admin's (none is a
    cooperative's: admin_api.provider_callbacks)."""
    body, who = ctx.body, ctx.who
    own_idempotency_key(body["idempotencyKey"])
    coop_id = who.target_cooperative(body.get("cooperativeId"))
    member_id = body.get("memberId")
    if member_id is not None:
        visible = await ctx.session.execute(who.scope(
            select(Member.id).where(Member.id == member_id, Member.cooperative_id == coop_id), Member))
        if visible.scalar_one_or_none() is None:
            raise NotFound("memberId: member not found in the cooperative", field="memberId", code=MEMBER_NOT_FOUND)
    if body.get("callbackId") is not None and not who.is_super:
        raise NotFound("callbackId: provider callback not found", field="callbackId")
    currency = (await ctx.session.execute(select(PaymentType.currency).where(
        PaymentType.id == body["paymentTypeId"], PaymentType.cooperative_id == coop_id))).scalar_one_or_none()
    if currency is None:
        raise NotFound("paymentTypeId: payment type not found in the cooperative", field="paymentTypeId")
    new = NewPayment(
        cooperative_id=coop_id, payment_type_id=body["paymentTypeId"], method=body["paymentMethod"],
        account=body.get("paymentAccount") or "", idempotency_key=body["idempotencyKey"], channel=RECORDED,
        amount=Money.from_api(body["amount"], currency), member_id=member_id, reference=body.get("reference"),
        member_from_account=member_id is None,
    )
    line = StatementLine(
        payment=new, provider_transaction_id=body["providerTransactionId"], note=body["note"],
        completed_at=statement_time(body["completedAt"], await cooperative_zone(ctx, coop_id)),
        payment_id=body.get("id"), callback_id=body.get("callbackId"), send_receipt=bool(body.get("sendReceipt")),
        gateway_reference=body.get("gatewayReference"),
    )
    payment, created = await record_payment(ctx.session, ctx.rt, line, actor=who.actor)
    await ctx.session.commit()
    response = json_response(present(payment), status=201)
    if not created:
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    return response


async def give_gateway_reference(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The request that took a recorded payment's money, found after it was recorded without it
    (core.recorded_payments.set_gateway_reference): its MTN refund can then be sent. The same callers as recording
    it."""
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    payment = await set_gateway_reference(ctx.session, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                          gateway_reference=ctx.body["gatewayReference"], actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(payment))


async def cancel_open_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The support desk cancels an open payment (core.provider_events.cancel_payment). Admins only: a member declines
    the prompt on her phone, the provider's own cancel, which a cancel here cannot replace (the prompt stays
    payable at the provider)."""
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    payment = await cancel_payment(ctx.session, ctx.rt, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                   note=ctx.body["note"], actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(payment))


async def void_recorded_payment(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """The support desk voids a recording of money taken made in error (core.recorded_payments.void_recording). The same
    callers as recording it; another cooperative's payment is not found, as for the reads."""
    payment = await one(ctx, Payment, request.match_info["id"], "payment")
    payment = await void_recording(ctx.session, payment_id=payment.id, cooperative_id=payment.cooperative_id,
                                   note=ctx.body["note"], actor=ctx.who.actor)
    await ctx.session.commit()
    return json_response(present(payment))


async def payment_status(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    p = await _readable(ctx, request.match_info["id"])
    return json_response(
        {
            "id": p.id,
            "reference": p.reference,
            "status": p.status,
            "failureReason": p.failure_reason,
            "completedAt": iso(p.completed_at),
            "updatedAt": iso(p.updated_at),
        }
    )


async def member_transactions(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    member = await one(ctx, Member, request.match_info["id"], "member")
    query = (
        ctx.who.scope(select(Payment), Payment)
        .where(Payment.member_id == member.id)
        .order_by(Payment.created_at.desc(), Payment.id.desc())
    )
    return await paged(ctx, query, present)


ROUTES = [
    Route(
        "POST",
        "/payments",
        initiate_payment,
        "Initiate a payment",
        "payments",
        "payments:write",
        status=201,
        body=PAYMENT_CREATE,
        response=PAYMENT,
        limit=Limit("payments:create", 10),
        tenants=True,
        replay=payment_key_used,
    ),
    Route(
        "GET",
        "/payments",
        list_payments,
        "List payments",
        "payments",
        "payments:read",
        query=LIST_QUERY,
        response=page_of(PAYMENT, cursor=True),
        limit=Limit("payments:list", 100),
        tenants=True,
    ),
    Route(
        "GET",
        "/payments/{id}",
        get_payment,
        "Get a payment by id",
        "payments",
        "payments:read",
        own_scope=OWN_PAYMENTS,
        response=PAYMENT,
        tenants=True,
    ),
    Route(
        "POST",
        "/payments/{id}/outcome",
        record_payment_outcome,
        "Record money the provider took for a payment the gateway gave up on (TIMEOUT or CANCELLED) "
        "or one still open past its approval window",
        "payments",
        "admin",
        body=COLLECTED_OUTCOME,
        response=PAYMENT,
    ),
    Route(
        "POST",
        "/payments/{id}/review",
        review_payment,
        "Clear a payment's flag (mismatch) once a person has checked it against the provider's statement and dealt "
        "with it: what the flag said is kept as the payment's review, with who, when and the note. 409 for a "
        "payment not flagged; no money figure changes; a later flag sets mismatch again. Told as the webhook event "
        "payment.flag_cleared",
        "payments",
        "admin",
        body=REVIEW,
        response=PAYMENT,
    ),
    Route(
        "POST",
        "/payments/recorded",
        record_statement_payment,
        "Record a payment the provider's statement shows collected that no payment holds (lost with a restore "
        "of the database, or never asked for): COMPLETED at once, at completedAt",
        "payments",
        "admin",
        status=201,
        body=RECORDED_PAYMENT,
        response=PAYMENT,
        replay=payment_key_used,
    ),
    Route(
        "POST",
        "/payments/{id}/gateway-reference",
        give_gateway_reference,
        "Give a payment recorded from the provider's statement without its gatewayReference the request that took "
        "its money, found since: its MTN refund can then be sent",
        "payments",
        "admin",
        body=REQUEST_FOUND,
        response=PAYMENT,
    ),
    Route(
        "POST",
        "/payments/{id}/cancel",
        cancel_open_payment,
        "Cancel an open payment (PENDING or PROCESSING) for a member: CANCELLED at once; money the provider "
        "still takes completes it late",
        "payments",
        "admin",
        body=CANCEL,
        response=PAYMENT,
    ),
    Route(
        "POST",
        "/payments/{id}/void",
        void_recorded_payment,
        "Void a recording of money taken made in error (the wrong statement line, member or transaction id): "
        "VOIDED, nothing collected, its transaction id released for the right line; no money moves",
        "payments",
        "admin",
        body=VOID,
        response=PAYMENT,
    ),
    Route(
        "GET",
        "/payments/{id}/status",
        payment_status,
        "Get a payment's status",
        "payments",
        "payments:read",
        own_scope=OWN_PAYMENTS,
        response=PAYMENT_STATUS,
        tenants=True,
    ),
    Route(
        "GET",
        "/members/{id}/transactions",
        member_transactions,
        "A member's payments",
        "members",
        "payments:read",
        query={"page": PAGE, "limit": LIMIT},
        response=page_of(PAYMENT),
        tenants=True,
    ),
]
