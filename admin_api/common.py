"""Shared pieces of the API: timestamps, money on the wire, paging, JSON answers and schema fragments."""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from time import monotonic
from typing import Any

from aiohttp import web
from sqlalchemy import Select, and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from admin_api.routing import Ctx
from admin_api.validation import Param
from core import metrics
from core.cooperatives import zone_of
from core.db import iso_z, json_text, utcnow
from core.errors import CODES, NotFound, ValidationError
from core.models import Cooperative
from core.money import Money
from core.reports import BASES
from core.text import is_uuid

log = logging.getLogger("gateway.api")
ID = {"type": "string", "format": "uuid"}
DATETIME = {"type": "string", "format": "date-time"}
NULL_DATETIME = {"type": ["string", "null"], "format": "date-time"}
NULL_STRING = {"type": ["string", "null"]}
# Major units: an integer for currencies without minor units (RWF), a decimal string otherwise.
AMOUNT_OUT = {"type": ["integer", "string"], "examples": [50000, "1500.00"],
              "description": "major units: an integer for RWF or UGX (50000), else a decimal string with the "
                            "currency's decimal places (\"1500.00\" KES)"}
AMOUNT_IN = {"type": ["integer", "number", "string"], "examples": [50000, "1500.00"],
             "description": "major units of the currency: an integer for RWF or UGX (50000), else an integer or a "
                           "decimal string (\"1500.00\" KES); a JSON number is read as written (5E4 is 50000, "
                           "1e-7 has seven decimal places). Zero or less, more decimal places than the currency "
                           "has, or 10^15 minor units and more: 400"}

META = {
    "type": "object",
    "required": ["page", "limit", "total", "totalPages", "hasNext", "hasPrevious"],
    "additionalProperties": False,
    "properties": {
        "page": {"type": "integer"},
        "limit": {"type": "integer"},
        "total": {"type": "integer"},
        "totalPages": {"type": "integer"},
        "hasNext": {"type": "boolean"},
        "hasPrevious": {"type": "boolean"},
        "totalCapped": {
            "type": "boolean",
            "description": "Present (true) only when the count stopped early: there are more than `total` rows "
                           "(the count goes no further than 10,000 rows past this page's start; totalPages and "
                           "hasNext follow from that). Absent when `total` is exact",
        },
    },
}
ERROR = {
    "type": "object",
    "required": ["statusCode", "message", "error", "code", "timestamp", "path"],
    "properties": {
        "statusCode": {"type": "integer"},
        "message": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "error": {"type": "string"},
        "code": {"type": "string", "enum": sorted(CODES),
                 "description": "the machine-readable reason, stable across releases (branch on it, not on message): "
                 "the status's default, or a finer one. " + "; ".join(f"{code} ({text})" for code, text in
                                                                       CODES.items())},
        "timestamp": DATETIME,
        "path": {"type": "string"},
        "field": {"type": "string", "description": "the one request field (body or query) the refusal is about, "
                  "as the request names it (paymentTypeId, amount, idempotencyKey...); absent when it is about "
                  "none or several (a 400 of the request's shape lists each in message)"},
    },
}


def obj(
    properties: dict[str, Any],
    required: list[str] | None = None,
    *,
    strict: bool = True,
    min_properties: int | None = None,
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": not strict}
    if required:
        schema["required"] = required
    if min_properties:
        schema["minProperties"] = min_properties
    return schema


def out(properties: dict[str, Any]) -> dict[str, Any]:
    """A response schema: every listed field is always present."""
    return {"type": "object", "properties": properties, "required": list(properties)}


def out_plus(schema: dict[str, Any], **extra: dict[str, Any]) -> dict[str, Any]:
    """`schema` with more always-present fields (e.g. a secret shown once, at creation)."""
    return out({**schema["properties"], **extra})


def out_only(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """The same response schema cut down to `names` (a smaller view of the same object)."""
    return out({name: schema["properties"][name] for name in names})


def page_of(item: dict[str, Any], *, cursor: bool = False) -> dict[str, Any]:
    """A list's answer: `data` and the seed's `meta`; `cursor`: a list that can also be synced (see synced),
    whose answer then carries `nextCursor` as well."""
    properties: dict[str, Any] = {"data": {"type": "array", "items": item}, "meta": META}
    if cursor:
        properties["nextCursor"] = NEXT_CURSOR
    return {"type": "object", "required": ["data", "meta"], "properties": properties}


iso = iso_z  # every timestamp the API writes (core.db.iso_z: the webhooks' event data use the same)


def money_out(minor: int, currency: str) -> int | str:
    return Money(minor, currency).to_api()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=json_text)


def meta(page: int, limit: int, total: int, *, capped: bool = False) -> dict[str, Any]:
    """The seed's meta block; `capped`: `total` is where the count stopped (there are more), said by
    `totalCapped: true` (absent otherwise, so an exact count keeps the seed's shape)."""
    pages = math.ceil(total / limit) if total else 0
    block = {
        "page": page,
        "limit": limit,
        "total": total,
        "totalPages": pages,
        "hasNext": page < pages or capped,
        "hasPrevious": page > 1,
    }
    return {**block, "totalCapped": True} if capped else block


# How far past a page's start a list's meta.total is counted. A count reads every row it counts: unbounded, it
# read a whole table's worth for each page (a super admin's payments or audit log, a sync's backlog: hundreds of
# ms a page with a year of traffic, and a sync of N rows read N^2/limit). Past the cap the total is the cap, marked
# totalCapped; the page itself is unaffected. Counting from the page's start keeps hasNext true on every page
# before the last (an offset page already reads the rows before it).
COUNT_CAP = 10_000


async def capped_count(session: AsyncSession, query: Select[Any], start: int = 0) -> tuple[int, bool]:
    """`query`'s rows, counted no further than `start` + COUNT_CAP: (that count, whether it stopped there)."""
    bound = start + COUNT_CAP
    counted = (await session.execute(
        select(func.count()).select_from(query.order_by(None).limit(bound + 1).subquery()))).scalar_one()
    return (bound, True) if counted > bound else (int(counted), False)


def matching(ctx: Ctx, query: Select[Any], columns: dict[str, Any], moment: Any) -> Select[Any]:
    """`query` filtered by the list's query parameters: each of `columns` (a parameter's name: its column) equal to
    its value when given, and `moment` within the period (`from` inclusive, `to` exclusive, as admin_api.routing
    read them: period_params)."""
    q = ctx.query
    for param, column in columns.items():
        if q.get(param) is not None:
            query = query.where(column == q[param])
    if q.get("from") is not None:
        query = query.where(moment >= q["from"])
    if q.get("to") is not None:
        query = query.where(moment < q["to"])
    return query


def basis_param(rows: str) -> Param:
    """`basis` as a list takes it (the payments', the refunds'): the values, default and 400 of the CSV exports'
    (admin_api.reports.BASIS), `rows` naming what the list holds."""
    return Param(enum=BASES, default="created",
                 description=f"Which moment puts {rows} in the period (from/to) and orders the pages: `created` "
                             f"(createdAt: asked for) or `completed` (completedAt: money moved, as the "
                             f"reconciliation's `settled` section, the exports' basis=completed and the provider's "
                             f"statement count it). With `completed` only {rows} whose money moved are listed, "
                             f"newest completion first, even without a period")


def by_basis(ctx: Ctx, query: Select[Any], created: Any, completed: Any,
             held: Any = None) -> tuple[Select[Any], Any]:
    """`query` and the moment its period and pages go by, per the list's `basis` (basis_param): `created`, or with
    basis=completed `completed`, the rows without one (never moved, or not yet) left out. Set once, never moved or
    cleared after (core.reports._stream), a completedAt orders pages as steadily as a createdAt does; that filter is
    also the predicate of the super admin's completion index (migration 0014). `held`: what else the CSV export's
    basis=completed keeps a row by (core.reports.payments_csv: a payment's money held, not a recording voided since or
    a failure reported taken for nothing), so the list and the export of a period hold the same rows; a filter on
    the index's rows, the index still read."""
    if ctx.query.get("basis") == "completed":
        query = query.where(completed.is_not(None))
        return (query if held is None else query.where(held)), completed
    return query, created


async def paged(ctx: Ctx, query: Select[Any], present: Any,
                prepare: Callable[[Sequence[Any]], Awaitable[None]] | None = None) -> web.Response:
    """Count (capped: COUNT_CAP), fetch one page and present it with the seed's meta block. `prepare`: run on the
    page's rows before they are presented (what `present` needs read for the whole page in one query)."""
    page, limit = ctx.query["page"], ctx.query["limit"]
    offset = (page - 1) * limit
    total, capped = await capped_count(ctx.session, query, offset)
    rows = (await ctx.session.execute(query.offset(offset).limit(limit))).scalars().all()
    if prepare is not None:
        await prepare(rows)
    return json_response({"data": [present(r) for r in rows], "meta": meta(page, limit, total, capped=capped)})


# --- syncing: keyset pages in the order rows changed ------------------------------------------------------------

# How long after its updated_at a change is first listed by a sync (the database's clock: core.db.utcnow is aligned
# to it). An updated_at is stamped before its transaction commits, so commits do not come in updated_at order: a
# reader that listed everything up to some instant and moved its cursor there would skip a change stamped before
# that instant and committed after the read. So a sync lists only changes older than a horizon that no change
# still uncommitted can be behind (sync_horizon): SYNC_LAG before the database's now, and on PostgreSQL also
# SYNC_LAG before the start of the oldest transaction still writing the table. The lag covers what happens
# between the stamp and that transaction's first write (milliseconds: provider calls run outside write
# transactions) and the hosts' clock alignment (under a second; core.db.align_clock warns past one).
SYNC_LAG = timedelta(seconds=5)
NEXT_CURSOR = {
    "type": ["string", "null"],
    "description": "Sync (updatedFrom or after given): pass it as `after` to read on from the last row of this "
                   "page; keep it between runs to ask what changed since. null when this page is empty (nothing "
                   "more yet: ask again later with the cursor you have)",
}
_CURSOR_VERSION = "1"
_BAD_CURSOR = "after must be a nextCursor returned by this list, passed back unchanged"


def encode_cursor(updated_at: datetime, row_id: str) -> str:
    """An opaque position in (updated_at, id) order: the row's updated_at to the microsecond and its id."""
    stamp = updated_at.astimezone(UTC)
    micros = (stamp - _EPOCH) // timedelta(microseconds=1)
    raw = f"{_CURSOR_VERSION}:{micros}:{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position encode_cursor wrote, or a 400 naming `after` (anything else is a caller's mistake)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, micros, row_id = raw.split(":")
        if version != _CURSOR_VERSION or not _DIGITS.fullmatch(micros) or not is_uuid(row_id):
            raise ValueError(raw)
        return _EPOCH + timedelta(microseconds=int(micros)), row_id
    except (ValueError, UnicodeDecodeError, binascii.Error, OverflowError):
        raise ValidationError(_BAD_CURSOR, field="after") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGITS = re.compile(r"\d{1,18}")

# The start of the oldest transaction holding a write lock on the table (every INSERT or UPDATE takes
# RowExclusiveLock on it until commit; a writer still waiting for it is counted too), other than this one.
_OLDEST_WRITER = text(
    "SELECT least(now(), (SELECT min(a.xact_start) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock' AND l.pid <> pg_backend_pid()"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.relation = to_regclass(:table))), now()"
)
SYNC_HELD_WARNING = 60.0  # seconds a sync may be held back before a warning (at most one a minute) says so
_last_held_warning = -math.inf


async def sync_horizon(session: AsyncSession, table: str) -> datetime:
    """The instant before which every change to `table` that will ever be visible is already visible (see SYNC_LAG).

    PostgreSQL: SYNC_LAG before the earlier of now() and the start of the oldest transaction writing the table: a
    change still in flight was stamped after its transaction began, so a long transaction holds syncs back rather
    than being skipped. SQLite (embedded, one process): SYNC_LAG before the local clock."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow() - SYNC_LAG
    since, now = (await session.execute(_OLDEST_WRITER, {"table": table})).one()
    held = (now - since).total_seconds()
    metrics.SYNC_HELD_BACK.set(held)
    global _last_held_warning
    if held > SYNC_HELD_WARNING and monotonic() - _last_held_warning > 60:
        _last_held_warning = monotonic()
        # A transaction left open (an operator's psql session, a stuck process) holds every sync back: find it in
        # pg_stat_activity (oldest xact_start) and end it; idle_in_transaction_session_timeout keeps it from lasting.
        log.warning("payment sync held back by an open transaction writing payments",
                    extra={"held_back_seconds": round(held), "table": table})
    return since - SYNC_LAG


async def synced(ctx: Ctx, query: Select[Any], present: Any, *, updated: Any, ident: Any, table: str) -> web.Response:
    """One page of `query`'s rows in the order they changed, (updated, ident) ascending, from the `after` cursor.

    A sync reads every row's latest state at least once: a row that changes again later moves to the end and is
    listed again; none is skipped, as only rows stamped before sync_horizon are listed. The answer has the seed's
    shape (`meta` counts what is left from this position, this page included, up to COUNT_CAP: a sync's backlog
    is counted on every page, read by (cooperative_id, updated_at, id), migration 0013) and `nextCursor`."""
    limit = ctx.query["limit"]
    query = query.order_by(None).where(updated < await sync_horizon(ctx.session, table))
    if ctx.query.get("after") is not None:
        stamp, row_id = decode_cursor(ctx.query["after"])
        # updated >= stamp alone is the index's range; the id breaks ties between rows of one instant.
        query = query.where(updated >= stamp, or_(updated > stamp, and_(updated == stamp, ident > row_id)))
    total, capped = await capped_count(ctx.session, query)
    rows = (await ctx.session.execute(query.order_by(updated, ident).limit(limit))).scalars().all()
    last = rows[-1] if rows else None
    return json_response({
        "data": [present(r) for r in rows],
        "meta": {**meta(1, limit, total, capped=capped), "hasPrevious": ctx.query.get("after") is not None},
        "nextCursor": None if last is None else encode_cursor(
            getattr(last, updated.key), getattr(last, ident.key)),
    })


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


async def local_bound(ctx: Ctx, name: str) -> datetime | None:
    """A date-time query parameter besides `from`/`to`, read as they are (admin_api.routing._period): a bare date
    is midnight in the caller's cooperative's time zone (a super admin's: the one `cooperativeId` names, else
    UTC); a date-time without an offset is UTC."""
    value: datetime | None = ctx.query.get(name)
    coop_id = ctx.who.cooperative_id or ctx.query.get("cooperativeId")
    if value is None or not coop_id or not _DATE_ONLY.match(ctx.request.query.get(name, "").strip()):
        return value
    coop = await ctx.session.get(Cooperative, coop_id)
    try:
        return datetime.combine(value.date(), time(), tzinfo=zone_of(coop.timezone if coop else None)).astimezone(UTC)
    except OverflowError:
        return value  # 0001-01-01 or 9999-12-31 moved out of range: keep the UTC bound, as _period does


async def target_cooperative(ctx: Ctx, requested: str | None) -> Cooperative:
    """The cooperative a write goes to (the caller's own, or the one a super admin names), loaded."""
    coop_id = ctx.who.target_cooperative(requested)
    coop = (
        await ctx.session.execute(
            ctx.who.scope(select(Cooperative).where(Cooperative.id == coop_id), Cooperative)
        )
    ).scalar_one_or_none()
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def one(ctx: Ctx, model: Any, entity_id: str, what: str) -> Any:
    """Fetch one row through the caller's scope; anything outside it is simply not found."""
    from admin_api.validation import check_path_id

    entity_id = check_path_id(entity_id, what)
    row = (
        await ctx.session.execute(ctx.who.scope(select(model).where(model.id == entity_id), model))
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{what} not found")
    return row


async def cooperative_zone(ctx: Ctx, cooperative_id: str | None) -> Any:
    """The cooperative's time zone (UTC when it has none): a time read on its provider's statement is local."""
    coop = await ctx.session.get(Cooperative, cooperative_id) if cooperative_id else None
    return zone_of(coop.timezone if coop else None)
