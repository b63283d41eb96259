"""Reports over the API: the reconciliation summary and streamed CSV exports of payments and refunds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from aiohttp import web

from admin_api.errors import apply_rate_headers
from admin_api.payments import STATUSES as PAYMENT_STATUSES
from admin_api.routing import Ctx, Route
from admin_api.validation import Param
from core import reports
from core.errors import ValidationError
from core.payments import METHODS
from core.state.refund import RefundStatus

_GROUP = {"type": "array", "items": {"type": "object"}}
RECONCILIATION = {
    "type": "object",
    "required": ["period", "payments", "totals", "refunds", "openDisputes", "flagged"],
    "properties": {
        "period": {"type": "object", "required": ["from", "to"]},
        "payments": {
            "type": "object",
            "required": ["byStatus", "byMethod", "byPaymentType"],
            "properties": {"byStatus": _GROUP, "byMethod": _GROUP, "byPaymentType": _GROUP},
        },
        "totals": _GROUP,
        "refunds": _GROUP,
        "openDisputes": {"type": "integer"},
        "flagged": _GROUP,
    },
}
PERIOD = {
    "from": Param("date-time", "Start of the period (inclusive)"),
    "to": Param("date-time", "End of the period (exclusive)"),
}


def _period(ctx: Ctx) -> tuple[datetime | None, datetime | None]:
    start, end = ctx.query.get("from"), ctx.query.get("to")
    if start is not None and end is not None and start >= end:
        raise ValidationError("from must be before to", field="from")
    return start, end


async def reconciliation(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = _period(ctx)
    summary = await reports.reconciliation(ctx.session, scope=ctx.who.scope, start=start, end=end)
    return web.json_response(summary)


async def _send_csv(request: web.Request, chunks: AsyncIterator[bytes], filename: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        }
    )
    apply_rate_headers(request, response)
    await response.prepare(request)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def payments_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = _period(ctx)
    chunks = reports.payments_csv(
        ctx.session,
        scope=ctx.who.scope,
        start=start,
        end=end,
        status=ctx.query.get("status"),
        method=ctx.query.get("paymentMethod"),
    )
    return await _send_csv(request, chunks, "payments.csv")


async def refunds_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    start, end = _period(ctx)
    chunks = reports.refunds_csv(
        ctx.session,
        scope=ctx.who.scope,
        start=start,
        end=end,
        status=ctx.query.get("status"),
    )
    return await _send_csv(request, chunks, "refunds.csv")


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
        query={**PERIOD, "status": Param(enum=PAYMENT_STATUSES), "paymentMethod": Param(enum=METHODS)},
        produces="text/csv",
    ),
    Route(
        "GET",
        "/reports/refunds.csv",
        refunds_csv,
        "Export refunds as CSV (streamed)",
        "reports",
        "admin",
        query={**PERIOD, "status": Param(enum=tuple(s.value for s in RefundStatus))},
        produces="text/csv",
    ),
]
