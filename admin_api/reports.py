"""Reports over the API: the reconciliation summary and streamed CSV exports of payments and refunds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from admin_api.common import AMOUNT_OUT, DATETIME, ID, META, NULL_DATETIME, capped_count, json_response, meta
from admin_api.errors import apply_rate_headers
from admin_api.payments import STATUSES as PAYMENT_STATUSES
from admin_api.routing import Ctx, Route
from admin_api.validation import LIMIT, PAGE, Param, period_params
from core import reports
from core.db import iso_z, utcnow
from core.errors import NotFound
from core.models import Cooperative, PaymentType
from core.money import total_to_api
from core.payments import METHODS, open_window
from core.state.refund import RefundStatus

_COUNT = {"type": "integer"}


def _lines(description: str, fields: dict[str, Any]) -> dict[str, Any]:
    """An array of report lines, each with every one of `fields` (amounts in AMOUNT_OUT's form: a client
    generated from the document needs their types, an integer for RWF and a decimal string for KES)."""
    return {"type": "array", "description": description,
            "items": {"type": "object", "required": list(fields), "properties": fields}}


_BY_STATUS = _lines("Payments asked for in the period, by their status at the time of the request (one completed "
                    "or failed after the period ended counts as it is now), and currency",
                    {"status": {"enum": list(PAYMENT_STATUSES)}, "currency": {"type": "string"}, "count": _COUNT,
                     "amount": AMOUNT_OUT})
_ASKED_AND_COLLECTED = {"currency": {"type": "string"}, "count": _COUNT, "amount": AMOUNT_OUT,
                        "completedCount": {**_COUNT, "description": "those whose money is held (collected) at the "
                                                                 "time of the request, whenever it moved (the money "
                                                                 "that moved in the period is `settled`)"},
                        "completedAmount": {**AMOUNT_OUT, "description": "what was collected of them"},
                        "refundedAmount": {**AMOUNT_OUT, "description": "what has been refunded of those held so far "
                                           "(whenever: a closed month's grows when one of its payments is refunded "
                                           "later), as `totals` counts it: the lines add up to its `refunded`"}}
_BY_METHOD = _lines("Payments asked for in the period, by method and currency",
                    {"paymentMethod": {"enum": list(METHODS)}, **_ASKED_AND_COLLECTED})
_BY_TYPE = _lines("Payments asked for in the period, by payment type and currency",
                  {"paymentTypeId": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                   **_ASKED_AND_COLLECTED})
_TOTALS = _lines("Payments asked for in the period whose money is held at the time of the request (whenever it "
                 "moved), with what has been refunded of them so far, per currency (the money that moved in the "
                 "period is `settled`)",
                 {"currency": {"type": "string"}, "collectedCount": _COUNT, "collected": AMOUNT_OUT,
                  "fees": AMOUNT_OUT, "refunded": AMOUNT_OUT, "net": AMOUNT_OUT})
_REFUNDS = _lines("Refunds asked for in the period, by their status at the time of the request, and currency",
                  {"status": {"enum": [s.value for s in RefundStatus]}, "currency": {"type": "string"},
                   "count": _COUNT, "amount": AMOUNT_OUT})
_SETTLED = _lines(
    "Money that moved in the period (completed_at), per provider account and currency",
    {
        "provider": {"type": "string", "description": "The provider that carried the money (mtn_momo, "
                                                      "irembopay...): its statement is the one to match"},
        "paymentMethod": {"type": "string"},
        "currency": {"type": "string"},
        "collectedCount": _COUNT,
        "collected": AMOUNT_OUT,
        "fees": AMOUNT_OUT,
        "refundedCount": _COUNT,
        "refunded": AMOUNT_OUT,
        "net": {**AMOUNT_OUT, "description": "collected less fees and refunded (below zero when more went back "
                                             "than was collected, as the statement shows: a chargeback beyond the "
                                             "refunds, flagged)"},
    },
)
_FLAGGED = {
    "type": "array",
    "description": "Late or mismatched payments asked for in the period or completed in it, and mismatched ones "
                   "a refund of which went back in it (at most 500)",
    "items": {
        "type": "object",
        "required": ["id", "reference", "createdAt", "completedAt", "flaggedIn"],
        "properties": {
            "createdAt": {"type": "string", "format": "date-time"},
            "completedAt": {"type": ["string", "null"], "format": "date-time"},
            "flaggedIn": {
                "type": "array",
                "items": {"type": "string", "enum": list(reports.FLAGGED_IN)},
                "description": "Why the payment is in this period's list: `created` (asked for in the period), "
                               "`completed` (its money moved in the period: it is in `settled`), `refunded` (it "
                               "is flagged for a person and a refund of it went back in the period: in "
                               "`settled` as refunded), or several",
            },
        },
    },
}
_RECORDED_LATER = {
    "type": "array",
    "description": "Refunds paid back in the period (in `settled`) but recorded at or after its end: a chargeback "
                   "recorded later and dated by the provider's statement, or a completion dated back into the period "
                   "(at most 500). A closed period's `settled` figures changed after it ended: these changed them",
    "items": {
        "type": "object",
        "required": ["id", "reference", "paymentId", "amount", "currency", "completedAt", "createdAt", "updatedAt",
                     "returnedByProvider", "providerTransactionId"],
        "properties": {
            "id": {"type": "string"},
            "reference": {"type": "string"},
            "paymentId": {"type": "string"},
            "amount": {"type": ["integer", "string"]},
            "currency": {"type": "string"},
            "completedAt": {"type": "string", "format": "date-time",
                            "description": "When the money went back, as the provider dates it: in the period"},
            "createdAt": {"type": "string", "format": "date-time"},
            "updatedAt": {"type": "string", "format": "date-time",
                          "description": "When it was recorded COMPLETED: at or after the period's end"},
            "returnedByProvider": {"type": "boolean",
                                   "description": "true: a chargeback recorded by an admin, never sent by the gateway"},
            "providerTransactionId": {"type": ["string", "null"],
                                      "description": "The provider's id for it, to match its statement line"},
        },
    },
}
_PAYMENTS_RECORDED_LATER = {
    "type": "array",
    "description": "Payments collected in the period (in `settled`) but whose completion was recorded at or after its "
                   "end: a provider's answer that came after the period closed dated by the provider's own time (a "
                   "bank payment paid at 23:59:59 on the last day, its webhook after midnight), or an admin's "
                   "statement line recorded with a `completedAt` in the period (at most 500). A closed period's "
                   "`settled` collections grew after it ended: these grew them. A recording voided since (`status` "
                   "VOIDED, no longer in `settled`) is still named, with what it counted until then: "
                   "`paymentsVoidedLater` names its void, and the two net out",
    "items": {
        "type": "object",
        "required": ["id", "reference", "status", "provider", "paymentMethod", "amount", "collected", "currency",
                     "completedAt", "createdAt", "recordedAt", "recordedBy", "late", "mismatch",
                     "providerTransactionId"],
        "properties": {
            "id": {"type": "string"},
            "reference": {"type": "string"},
            "status": {"type": "string"},
            "provider": {"type": "string", "description": "The provider that carried the money: its `settled` line"},
            "paymentMethod": {"type": "string"},
            "amount": {"type": ["integer", "string"], "description": "The amount asked for"},
            "collected": {"type": ["integer", "string"],
                          "description": "What the provider took, as `settled` counts it (a voided recording: what it "
                                         "counted until the void)"},
            "currency": {"type": "string"},
            "completedAt": {"type": "string", "format": "date-time",
                            "description": "When the money was taken, as the provider dates it: in the period"},
            "createdAt": {"type": "string", "format": "date-time"},
            "recordedAt": {"type": "string", "format": "date-time",
                           "description": "When the gateway recorded the money taken (the audit log's "
                                          "payment.completed, or payment.success_after_failure for money taken "
                                          "after a failure): at or after the period's end"},
            "recordedBy": {"type": "string",
                           "description": "Who recorded it: the provider (provider:<name>), or the admin "
                                          "(admin:<id>) who recorded the statement line (audited "
                                          "payment.outcome_recorded with the note)"},
            "late": {"type": "boolean"},
            "mismatch": {"type": "boolean"},
            "providerTransactionId": {"type": ["string", "null"],
                                      "description": "The provider's id for it, to match its statement line (a voided "
                                                     "recording: the one its void released)"},
        },
    },
}
_PAYMENTS_VOIDED_LATER = {
    "type": "array",
    "description": "Recordings of money taken dated in the period (their `completedAt` in it) and voided at or after "
                   "its end (POST /v1/payments/{id}/void: VOIDED, nothing collected; at most 500). A closed period's "
                   "`settled` collections shrank after it ended: these shrank them",
    "items": {
        "type": "object",
        "required": ["id", "reference", "provider", "paymentMethod", "amount", "collected", "currency",
                     "completedAt", "createdAt", "voidedAt", "voidedBy", "note", "providerTransactionId"],
        "properties": {
            "id": {"type": "string"},
            "reference": {"type": "string"},
            "provider": {"type": "string", "description": "The provider account whose `settled` line it left"},
            "paymentMethod": {"type": "string"},
            "amount": {"type": ["integer", "string"], "description": "The amount asked for"},
            "collected": {"type": ["integer", "string"],
                          "description": "What `settled` counted of it until the void"},
            "currency": {"type": "string"},
            "completedAt": {"type": "string", "format": "date-time",
                            "description": "When the recording said the money was taken: in the period"},
            "createdAt": {"type": "string", "format": "date-time"},
            "voidedAt": {"type": "string", "format": "date-time",
                         "description": "When it was voided (the audit log's payment.voided): at or after the "
                                        "period's end"},
            "voidedBy": {"type": "string", "description": "Who voided it (admin:<id>)"},
            "note": {"type": ["string", "null"], "description": "Why it was voided, as the admin wrote it"},
            "providerTransactionId": {"type": ["string", "null"],
                                      "description": "The transaction id it held until the void released it"},
        },
    },
}
RECONCILIATION = {
    "type": "object",
    "required": ["period", "payments", "totals", "refunds", "settled", "openDisputes", "disputesOpened",
                 "disputesOpenAtEnd", "flagged", "flaggedCount",
                 "refundsRecordedLater", "refundsRecordedLaterCount", "paymentsRecordedLater",
                 "paymentsRecordedLaterCount", "paymentsVoidedLater", "paymentsVoidedLaterCount"],
    "properties": {
        "period": {"type": "object", "required": ["from", "to"],
                   "properties": {"from": NULL_DATETIME, "to": NULL_DATETIME}},
        "payments": {
            "type": "object",
            "required": ["byStatus", "byMethod", "byPaymentType"],
            "properties": {"byStatus": _BY_STATUS, "byMethod": _BY_METHOD, "byPaymentType": _BY_TYPE},
        },
        "totals": _TOTALS,
        "refunds": _REFUNDS,
        "settled": _SETTLED,
        "openDisputes": {"type": "integer",
                         "description": "Disputes open (OPEN or UNDER_REVIEW) at the time of the request, whatever "
                                        "the period: September's report read in December counts December's. The "
                                        "period's own figures are `disputesOpened` and `disputesOpenAtEnd`"},
        "disputesOpened": {"type": "integer",
                           "description": "Disputes opened in the period, whatever became of them since"},
        "disputesOpenAtEnd": {"type": "integer",
                              "description": "Disputes open at the period's end: opened before the period ended "
                                             "and not closed (resolved, rejected or withdrawn) by then. Without "
                                             "`to`, its end is now: `openDisputes`"},
        "flagged": _FLAGGED,
        "flaggedCount": {"type": "integer"},
        "refundsRecordedLater": _RECORDED_LATER,
        "refundsRecordedLaterCount": {"type": "integer"},
        "paymentsRecordedLater": _PAYMENTS_RECORDED_LATER,
        "paymentsRecordedLaterCount": {"type": "integer"},
        "paymentsVoidedLater": _PAYMENTS_VOIDED_LATER,
        "paymentsVoidedLaterCount": {"type": "integer"},
    },
}
# With cooperativeId a super admin narrows a report to one cooperative (its bare dates are then that
# cooperative's local days); anyone else's reports are their cooperative's already, and naming another finds nothing.
PERIOD = period_params()
BASIS = Param(enum=reports.BASES, default="created",
              description="Which moment puts a row in the period: `created` (asked for) or `completed` (money moved, "
                          "as the reconciliation's `settled` section and the provider's statement count it)")
BOM = Param("boolean", "Start the file with a UTF-8 byte-order mark, so that Excel opening it with a double "
            "click reads it as UTF-8 (accents, em dashes) rather than as Windows-1252", False)
DELIMITER = Param(enum=tuple(reports.DELIMITERS), default="comma",
                  description="The separator between cells: `comma` (the default), or `semicolon` for Excel in a "
                              "locale whose decimal mark is a comma (French: Rwanda), which opens a comma file as one "
                              "column. A `semicolon` file also writes its amounts (amount, fee, refundedAmount, "
                              "collectedAmount) with a decimal comma (`1500,50` KES), as that Excel reads a number; "
                              "amounts without decimals (RWF) are the same either way, and nothing else changes")
EXCEL = Param("boolean", "For a person opening the file in Excel, not for a script: a UTF-8 byte-order mark first "
              "(as `bom=true`), and identifiers of digits only (reference, paymentReference, gatewayReference, "
              "gatewayTransactionId, providerTransactionId, paymentAccount, cooperativeShortCode) written as "
              "`=\"<digits>\"`, which Excel shows as text: a long provider transaction id keeps every digit instead "
              "of turning into 2,02610E+19, and a leading zero stays. Amounts stay numbers. Combine with "
              "`delimiter=semicolon` in a French locale", False)
CSV_OPTIONS = {"bom": BOM, "delimiter": DELIMITER, "excel": EXCEL}
UTF8_BOM = b"\xef\xbb\xbf"


async def _period(ctx: Ctx, request: web.Request) -> tuple[datetime | None, datetime | None]:
    # Bare dates already read as the cooperative's local days, and a reversed period refused (routing._period).
    return ctx.query.get("from"), ctx.query.get("to")


def _scope(ctx: Ctx) -> reports.Scope:
    """The caller's scope, narrowed to the cooperative the query names."""
    named = ctx.query.get("cooperativeId")
    if named is None:
        return ctx.who.scope

    def scoped(query: Any, model: Any) -> Any:
        return ctx.who.scope(query, model).where(model.cooperative_id == named)
    return scoped


async def reconciliation(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = await _period(ctx, request)
    summary = await reports.reconciliation(ctx.session, scope=_scope(ctx), start=start, end=end,
                                           work_mem_mb=ctx.rt.settings.report_work_mem_mb)
    return web.json_response(summary)


async def _send_csv(request: web.Request, ctx: Ctx, chunks: AsyncIterator[bytes], filename: str, *,
                    bom: bool = False) -> web.StreamResponse:
    # The request's own session (sign-in, the period's cooperative) ends here: its connection goes back to the
    # pool instead of waiting, in a transaction, for the whole download. The rows come in batches, each read in
    # a short session of its own that is closed before the batch is written (core.reports._stream).
    await ctx.session.commit()
    # The first chunk (the header line and the first rows: the query has run) before the status line, so a
    # database that fails at once answers with an error instead of a 200 and an empty or cut file. A failure
    # later ends the chunked body without its last chunk, which clients report as an incomplete transfer.
    first = await anext(chunks, b"")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        }
    )
    apply_rate_headers(request, response)
    await response.prepare(request)
    await response.write(UTF8_BOM + first if bom else first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


def _options(ctx: Ctx) -> dict[str, Any]:
    """How the cells are written: the separator (and with `;` the decimal comma) and Excel's text ids."""
    return {"delimiter": reports.DELIMITERS[ctx.query.get("delimiter") or "comma"],
            "excel": bool(ctx.query.get("excel"))}


def _bom(ctx: Ctx) -> bool:
    return bool(ctx.query.get("bom") or ctx.query.get("excel"))


async def payments_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = await _period(ctx, request)
    chunks = reports.payments_csv(
        ctx.rt.sessionmaker,
        scope=_scope(ctx),
        start=start,
        end=end,
        status=ctx.query.get("status"),
        method=ctx.query.get("paymentMethod"),
        payment_type_id=ctx.query.get("paymentTypeId"),
        member_id=ctx.query.get("member"),
        basis=ctx.query.get("basis") or "created",
        **_options(ctx),
    )
    return await _send_csv(request, ctx, chunks, "payments.csv", bom=_bom(ctx))


async def refunds_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = await _period(ctx, request)
    chunks = reports.refunds_csv(
        ctx.rt.sessionmaker,
        scope=_scope(ctx),
        start=start,
        end=end,
        status=ctx.query.get("status"),
        basis=ctx.query.get("basis") or "created",
        **_options(ctx),
    )
    return await _send_csv(request, ctx, chunks, "refunds.csv", bom=_bom(ctx))


async def _dues(ctx: Ctx) -> reports.Dues:
    """The period the query names of the payment type it names, which must be the caller's cooperative's (a super
    admin's: any), recurring and of a fixed amount (core.reports.dues_of)."""
    found = (await ctx.session.execute(ctx.who.scope(
        select(PaymentType, Cooperative.timezone).join(Cooperative, Cooperative.id == PaymentType.cooperative_id)
        .where(PaymentType.id == ctx.query["paymentTypeId"]), PaymentType))).first()
    if found is None:
        raise NotFound("payment type not found", field="paymentTypeId")
    ptype, timezone = found
    return reports.dues_of(ptype, timezone, ctx.query.get("period"), utcnow(),
                           grace=open_window(ctx.rt.settings)[1])


def _dues_head(dues: reports.Dues) -> dict[str, Any]:
    ptype, period = dues.ptype, dues.period
    return {
        "paymentType": {"id": ptype.id, "name": ptype.name, "currency": ptype.currency,
                        "amount": total_to_api(dues.owed, ptype.currency),
                        "recurringInterval": (ptype.recurring_interval or "MONTHLY").upper(),
                        "dueDay": ptype.due_day},
        "period": {"dueDate": dues.due.isoformat(), "previousDueDate": dues.previous_due.isoformat(),
                   "timezone": dues.timezone, "paidFrom": iso_z(period.since),
                   "paidUntil": iso_z(dues.paid_until), "dueDayStart": iso_z(period.due_from),
                   "dueDayEnd": iso_z(period.due_until)},
    }


async def dues_report(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    dues = await _dues(ctx)
    status = ctx.query.get("status")
    page, limit = ctx.query["page"], ctx.query["limit"]
    query = reports.dues_page(dues, status)
    offset = (page - 1) * limit
    total, capped = await capped_count(ctx.session, query, offset)
    rows = (await ctx.session.execute(query.offset(offset).limit(limit))).all()
    return json_response({**_dues_head(dues), "data": [reports.dues_line(dues, row) for row in rows],
                          "meta": meta(page, limit, total, capped=capped),
                          "totals": await reports.dues_totals(ctx.session, dues, status)})


async def dues_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    dues = await _dues(ctx)
    chunks = reports.dues_csv(ctx.rt.sessionmaker, dues, status=ctx.query.get("status"), **_options(ctx))
    return await _send_csv(request, ctx, chunks, f"dues-{dues.due.isoformat()}.csv", bom=_bom(ctx))


_DUES_STATUS = {"type": "string", "enum": list(reports.DUES_STATUSES),
                "description": "The first that applies: `PAID` (amountPaid reaches amountDue), `AWAITING_APPROVAL` (a "
                               "payment of the period is still open: waiting for her PIN or the provider's answer, "
                               "as amountAwaitingApproval counts it; the reminders leave her alone meanwhile), "
                               "`PARTIAL` (part of amountDue paid), `UNPAID` (nothing kept)"}
_DUES_LINE = {
    "type": "object",
    "required": ["memberId", "name", "unit", "status", "currency", "amountDue", "amountPaid",
                 "amountAwaitingApproval", "amountOutstanding", "lastPaymentAt"],
    "properties": {
        "memberId": ID,
        "name": {"type": "string"},
        "unit": {"type": ["string", "null"], "description": "Her unit (house, stall...), as the member list has it"},
        "status": _DUES_STATUS,
        "currency": {"type": "string", "description": "The payment type's: every amount of the line is in it"},
        "amountDue": {**AMOUNT_OUT, "description": "The payment type's price: what pays the period"},
        "amountPaid": {**AMOUNT_OUT, "description": "What her payments of the period keep: what the provider took "
                       "(less when it took less than asked) less what was refunded, in the type's currency, of "
                       "those COMPLETED or PARTIALLY_REFUNDED, and of a FAILED one whose money the provider then "
                       "reported taken (held: she was told not to pay again). A fully refunded payment (REFUNDED) "
                       "keeps nothing and "
                       "counts for nothing, as the reminders, the USSD and the BALANCE SMS count it. More than "
                       "amountDue when she paid more"},
        "amountAwaitingApproval": {**AMOUNT_OUT, "description": "What her payments of the period still open (PENDING "
                                   "or PROCESSING: her PIN, or the provider's answer) ask: money that may yet be "
                                   "taken, not counted in amountPaid. Open as the USSD and the BALANCE SMS judge it: "
                                   "PENDING inside its approval window, PROCESSING up to "
                                   "PAYMENT_PENDING_GRACE_SECONDS after it. A prompt past that can no longer be "
                                   "approved (the USSD asks her to pay again): not counted here, nor does it make "
                                   "the line AWAITING_APPROVAL, even before the worker closes it. Nor is a prompt "
                                   "left on a SIM she lost (made from a number she held before her number was "
                                   "corrected): she can no longer approve it, and the USSD lets her pay from her "
                                   "new number"},
        "amountOutstanding": {**AMOUNT_OUT, "description": "What is left to pay: amountDue when nothing was kept, "
                              "else amountDue less amountPaid, 0 when paid in full (what the USSD offers her and the "
                              "BALANCE SMS says, for the period a payment made now pays). Money awaiting approval "
                              "is not taken off"},
        "lastPaymentAt": {**NULL_DATETIME, "description": "When the money of her last payment of the period that "
                          "counts in amountPaid moved (its completedAt, UTC): of the payments amountPaid adds money "
                          "of (COMPLETED, PARTIALLY_REFUNDED or FAILED then reported taken, keeping more than 0 in "
                          "the type's currency). One the "
                          "provider completed in another currency, or that keeps nothing, is left out, as amountPaid "
                          "leaves it; null when none (amountPaid 0)"},
    },
}
DUES = {
    "type": "object",
    "required": ["paymentType", "period", "data", "meta", "totals"],
    "properties": {
        "paymentType": {"type": "object", "required": ["id", "name", "currency", "amount", "recurringInterval",
                                                        "dueDay"],
                        "properties": {"id": ID, "name": {"type": "string"}, "currency": {"type": "string"},
                                       "amount": {**AMOUNT_OUT, "description": "Its price: each line's amountDue"},
                                       "recurringInterval": {"type": "string",
                                                             "enum": ["MONTHLY", "QUARTERLY", "YEARLY"]},
                                       "dueDay": {"type": "integer"}}},
        "period": {
            "type": "object",
            "required": ["dueDate", "previousDueDate", "timezone", "paidFrom", "paidUntil", "dueDayStart",
                         "dueDayEnd"],
            "description": "The period that falls due on `dueDate`. A payment pays it when it names that due date "
                           "(a payment's dueDate on that day, in the cooperative's time zone, or the bare date), or "
                           "names none and was asked for after `paidFrom` (the midpoint since the previous due "
                           "date): one made late, after the due date, still pays it; one made in the second half "
                           "before the next due date pays the next one, as the reminders and the USSD count it",
            "properties": {
                "dueDate": {"type": "string", "format": "date",
                            "description": "The due date (the cooperative's local day)"},
                "previousDueDate": {"type": "string", "format": "date",
                                    "description": "The due date before it: the period runs from it"},
                "timezone": {"type": "string", "description": "The cooperative's time zone: the days above are its"},
                "paidFrom": {**DATETIME, "description": "UTC: a payment naming no due date, asked for after this "
                                                        "instant (local midnight at the period's midpoint), pays "
                                                        "this period (or a later one)"},
                "dueDayStart": {**DATETIME, "description": "UTC: local midnight starting the due day"},
                "paidUntil": {**DATETIME, "description": "UTC: from this instant (the next period's paidFrom) a "
                                                         "payment naming no due date pays the next period, and the "
                                                         "USSD and the BALANCE SMS ask for that one. A member "
                                                         "registered after it is listed only if she has a payment "
                                                         "of this period kept or still open (as "
                                                         "amountAwaitingApproval counts it)"},
                "dueDayEnd": {**DATETIME, "description": "UTC: local midnight ending the due day"},
            },
        },
        "data": {"type": "array", "items": _DUES_LINE,
                 "description": "One line per member listed, by name then member id: the cooperative's members "
                                "ACTIVE now (a suspended or pending one is left out: she is not reminded and cannot "
                                "pay by USSD) registered before `paidUntil`, and those registered after it with a "
                                "payment of the period kept or still open (as amountAwaitingApproval counts it: "
                                "not a prompt past its approval window)"},
        "meta": META,
        "totals": {
            "type": "object",
            "description": "Of every line the query selects (all pages; with status=, those in it)",
            "required": ["members", "byStatus", "currency", "amountDue", "amountPaid", "amountAwaitingApproval",
                         "amountOutstanding"],
            "properties": {
                "members": {"type": "integer"},
                "byStatus": {"type": "object", "required": list(reports.DUES_STATUSES),
                             "properties": {s: {"type": "integer"} for s in reports.DUES_STATUSES},
                             "description": "How many lines have each status"},
                "currency": {"type": "string"},
                "amountDue": AMOUNT_OUT,
                "amountPaid": AMOUNT_OUT,
                "amountAwaitingApproval": AMOUNT_OUT,
                "amountOutstanding": AMOUNT_OUT,
            },
        },
    },
}
DUES_QUERY = {
    "paymentTypeId": Param("uuid", "The payment type: recurring, of a fixed amount (a type whose member chooses "
                           "the amount owes nothing per period: 400), and the caller's cooperative's (another's: "
                           "404)", required=True),
    "period": Param("date", "The period, by its due date (YYYY-MM-DD, the cooperative's local day): one of the "
                    "type's due dates from its first, the first on or after the day it was created (another "
                    "day: 400 naming the due dates either side). Default: the period a payment made now pays "
                    "(the USSD's and the BALANCE SMS's: the next due date once past the "
                    "midpoint before it, else the last one)"),
    "status": Param(enum=reports.DUES_STATUSES, description="Only the lines in this status (`status` of a line)"),
}

ROUTES = [
    Route(
        "GET",
        "/reports/reconciliation",
        reconciliation,
        "Reconciliation summary for a period",
        "reports",
        "admin",
        query=PERIOD,
        response=RECONCILIATION,
    ),
    Route(
        "GET",
        "/reports/payments.csv",
        payments_csv,
        "Export payments as CSV (streamed)",
        "reports",
        "admin",
        query={**PERIOD, "status": Param(enum=PAYMENT_STATUSES, description="Only payments in this status (now)"),
               "paymentMethod": Param(enum=METHODS, description="Only payments by this method"),
               "paymentTypeId": Param("uuid", "Only payments of this payment type (its `byPaymentType` line of the "
                                              "reconciliation)"),
               "member": Param("uuid", "Only this member's payments (member id), as the payments list filters them"),
               "basis": BASIS, **CSV_OPTIONS},
        produces="text/csv",
    ),
    Route(
        "GET",
        "/reports/refunds.csv",
        refunds_csv,
        "Export refunds as CSV (streamed)",
        "reports",
        "admin",
        query={**PERIOD, "status": Param(enum=tuple(s.value for s in RefundStatus),
                                         description="Only refunds in this status (now)"), "basis": BASIS,
               **CSV_OPTIONS},
        produces="text/csv",
    ),
    Route(
        "GET",
        "/reports/dues",
        dues_report,
        "Dues of a period of a recurring payment type: who has paid, who has not",
        "reports",
        "admin",
        query={**DUES_QUERY, "page": PAGE, "limit": LIMIT},
        response=DUES,
    ),
    Route(
        "GET",
        "/reports/dues.csv",
        dues_csv,
        "Export the dues of a period as CSV (streamed)",
        "reports",
        "admin",
        query={**DUES_QUERY, **CSV_OPTIONS},
        produces="text/csv",
    ),
]
