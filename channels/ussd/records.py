"""The durable record of each USSD session (ussd_sessions row): opened, closed, end-of-session events.

The channel owns this table and no core service writes it, so the few statements live here.

A row is keyed by the aggregator's session id, which an aggregator uses again on another day: a row (or a
payment, or a receipt, keyed by the id) older than the longest session is a previous session's (previous_before).
The table keeps one row per (aggregator, session id): the previous session's row is reset for the new one.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, case, func, null, or_, select, update

from channels.ussd.cache import autocommit
from channels.ussd.sessions import SESSION_TTL
from core import metrics, pgraw
from core.db import insert_ignore, new_id, table_of, utcnow
from core.models import UssdSession
from core.phone import Phone

log = logging.getLogger("gateway.ussd")


@dataclass(frozen=True)
class SessionEvent:
    """Africa's Talking end-of-session notification, translated."""

    aggregator: str
    session_id: str
    phone: Phone
    service_code: str
    network: str | None
    status: str  # Success | Incomplete | Failed
    hops: int | None
    duration_ms: int | None
    cost: str | None
    error: str | None
    at: datetime | None = None


# The longest a session lasts: aggregators end one after about 180 s, and its Redis state lives SESSION_TTL
# (the margin covers their retries). Whatever a session id left before that is a previous session's.
LONGEST_SESSION = timedelta(seconds=SESSION_TTL)
# What a new session writes on its row; the rest (ended_at, duration, cost, error, payment) starts empty.
_OPENING = ("cooperative_id", "member_id", "phone_index", "phone_masked", "service_code", "network_code", "status",
            "hops", "last_screen", "started_at")
_CLEARED = ("ended_at", "duration_ms", "cost", "error", "payment_id")


# A session no aggregator reported ended, once its Redis state (SESSION_TTL after its last hop, which comes within
# LONGEST_SESSION of its start) is gone: no hop continues it any more. Nalo never reports an end; an Africa's
# Talking notification may be lost. Closed by the worker's sweep (close_abandoned) as Incomplete, the status the
# aggregators give a session the caller left or the network timed out, with TIMED_OUT as its error: the sweep's
# guess, which the session's own end (a late hop's END, the aggregator's notice) replaces.
ABANDONED_AFTER = LONGEST_SESSION + timedelta(seconds=SESSION_TTL)
TIMED_OUT = "no end of session reported: timed out"


def previous_before() -> datetime:
    """Rows, payments and receipts of a session id made before this instant are a previous session's: the
    aggregator used the id again (Hubtel's and Nalo's ids come back on another day)."""
    return utcnow() - LONGEST_SESSION


@functools.cache
def _open_statement(dialect_name: str) -> Any:
    """INSERT the row; a row of the id older than the longest session (a previous session's: the id came
    again) is reset for this one, as if new (the table keeps one row per (aggregator, session id)). A younger
    row is this session's (a hop after its state was lost from Redis) and is kept as it is."""
    table = table_of(UssdSession)
    stmt = insert_ignore(dialect_name, table)
    fresh = {**{c: stmt.excluded[c] for c in _OPENING}, **{c: null() for c in _CLEARED}}
    return stmt.on_conflict_do_update(index_elements=["aggregator", "session_id"], set_=fresh,
                                      where=table.c.started_at < bindparam("previous_before"))


@functools.cache
def _unanswered_statement(dialect_name: str) -> Any:
    """_open_statement, for a session's row written already closed (its end and error given): the row of a session
    whose opening hop was answered without its screen and wrote none (unanswered())."""
    table = table_of(UssdSession)
    stmt = insert_ignore(dialect_name, table)
    written = (*_OPENING, "ended_at", "error")
    fresh = {**{c: stmt.excluded[c] for c in written}, **{c: null() for c in _CLEARED if c not in written}}
    return stmt.on_conflict_do_update(index_elements=["aggregator", "session_id"], set_=fresh,
                                      where=table.c.started_at < bindparam("previous_before"))


def _opening_row(rt: Any, *, aggregator: str, session_id: str, phone: Phone, service_code: str,
                 network: str | None) -> dict[str, Any]:
    """What opened() writes, but the cooperative and the member."""
    return {
        "id": new_id(), "aggregator": aggregator, "session_id": session_id[:128],
        "phone_index": rt.cipher.blind_index(phone.e164), "phone_masked": phone.masked(),
        "service_code": service_code[:32], "network_code": (network or "")[:16] or None, "status": "OPEN",
        "hops": 1, "last_screen": None, "started_at": utcnow(),
    }


def unanswered_row(rt: Any, *, aggregator: str, session_id: str, phone: Phone, service_code: str,
                   network: str | None) -> dict[str, Any]:
    """The row closed() writes for a session whose opening hop wrote none (its `unanswered`): no cooperative, no
    member, no screen shown."""
    return {**_opening_row(rt, aggregator=aggregator, session_id=session_id, phone=phone, service_code=service_code,
                           network=network), "cooperative_id": None, "member_id": None, "hops": 0}


async def opened(rt: Any, *, aggregator: str, session_id: str, phone: Phone, service_code: str,
                 network: str | None, cooperative_id: str | None, member_id: str | None) -> None:
    # One statement, so no transaction around it: BEGIN and COMMIT were two of its four round trips.
    row = {**_opening_row(rt, aggregator=aggregator, session_id=session_id, phone=phone, service_code=service_code,
                          network=network), "cooperative_id": cooperative_id, "member_id": member_id}
    async with autocommit(rt) as conn:
        # straight on asyncpg on PostgreSQL
        await pgraw.first(conn, _open_statement(conn.dialect.name),
                          {**row, "previous_before": row["started_at"] - LONGEST_SESSION}, tuple(row))


@functools.cache
def _opening_with_statement(memberships: Any) -> Any:
    """`memberships` (a SELECT of member_id, cooperative `id` and its other columns, built once) and opened()'s
    write of the session row in one statement (PostgreSQL): the row's cooperative and member are what the first
    hop gives opened(): those of the one membership among them (narrowed to the dialled extension's cooperative
    `only` when named), else `only` and no member."""
    table = table_of(UssdSession)
    m = memberships.order_by(None).cte("m")
    only = bindparam("only", type_=String)
    n = select(m.c.member_id, m.c.id).where(or_(only.is_(None), m.c.id == only)).cte("n")
    one = func.count() == 1
    given = [c for c in _OPENING if c not in ("cooperative_id", "member_id")]
    source = select(bindparam("id", type_=table.c.id.type), bindparam("aggregator", type_=table.c.aggregator.type),
                    bindparam("session_id", type_=table.c.session_id.type),
                    case((one, func.min(n.c.id)), else_=only), case((one, func.min(n.c.member_id)), else_=null()),
                    *(bindparam(c, type_=table.c[c].type) for c in given)).select_from(n)
    stmt = insert_ignore("postgresql", table).from_select(
        ["id", "aggregator", "session_id", "cooperative_id", "member_id", *given], source)
    fresh = {**{c: stmt.excluded[c] for c in _OPENING}, **{c: null() for c in _CLEARED}}
    written = stmt.on_conflict_do_update(index_elements=["aggregator", "session_id"], set_=fresh,
                                         where=table.c.started_at < bindparam("previous_before")).cte("o")
    return select(m).add_cte(written).order_by(m.c.name, m.c.id)


async def opened_reading(conn: Any, rt: Any, memberships: Any, params: dict[str, Any], *, only: str | None,
                         aggregator: str, session_id: str, phone: Phone, service_code: str, network: str | None
                         ) -> list[Any] | None:
    """The rows of `memberships` (see _opening_with_statement; run with `params`), with the session row written as
    opened() writes it, in one round trip on PostgreSQL (the first hop's other one is the session's save). None
    elsewhere: the caller reads, then calls opened()."""
    if conn.dialect.name != "postgresql":
        return None
    row = _opening_row(rt, aggregator=aggregator, session_id=session_id, phone=phone, service_code=service_code,
                       network=network)
    return await pgraw.fetch(conn, pgraw.compiled(_opening_with_statement(memberships)),
                             {**params, **row, "only": only, "previous_before": row["started_at"] - LONGEST_SESSION})


@functools.cache
def _seen_statement() -> Any:
    table = table_of(UssdSession)
    return select(table.c.service_code, table.c.started_at).where(
        table.c.aggregator == bindparam("aggregator"), table.c.session_id == bindparam("session_id"),
        table.c.started_at >= bindparam("previous_before"))


async def _this_sessions(rt: Any, aggregator: str, session_id: str) -> Any:
    async with autocommit(rt) as conn:
        return await pgraw.first(conn, _seen_statement(), {"aggregator": aggregator, "session_id": session_id[:128],
                                                           "previous_before": previous_before()})


async def seen(rt: Any, *, aggregator: str, session_id: str) -> str | None:
    """The code this session was opened with (its row's service_code, the whole code the member dialled), or
    None when it was never opened: its row is written on every session's first hop (opened), on PostgreSQL
    and SQLite alike. A row older than the longest session is a previous session's of the id: not this one's.
    One indexed read (the unique (aggregator, session id)), no transaction."""
    row = await _this_sessions(rt, aggregator, session_id)
    return None if row is None else str(row[0])


async def opened_at(rt: Any, *, aggregator: str, session_id: str) -> datetime | None:
    """When this session opened (its row's started_at), None when it has no row of its own: the same for every
    hop of the session, whatever its Redis state went through. One indexed read."""
    row = await _this_sessions(rt, aggregator, session_id)
    return None if row is None else row[1]


# The columns that say how and when a session ended: a close writes them only on a row still OPEN, or the sweep's.
_ENDING = ("ended_at", "duration_ms", "error")


def _guessed(table: Any) -> Any:
    """The row is the sweep's guess (close_abandoned): closed by it as Incomplete, TIMED_OUT, and counted timed_out."""
    return and_(table.c.status == "Incomplete", table.c.error == TIMED_OUT)


# A session is counted once in gateway_ussd_sessions: by the first close of its row, whichever it is (the sweep, the
# aggregator's notice, the END hop, Hubtel's Timeout) and in whatever order the others come; they write the row's
# truth and count nothing (a counter cannot take the first one's count back). The first close is the write that
# finds the row OPEN: each closer writes `WHERE status = 'OPEN'` first, a statement of its own, and what it RETURNS
# tells whether it was (one round trip, the normal case); a closer that wrote nothing then writes the row whatever it
# is (a second). No row goes back to OPEN (but as a new session of the id, a new row), so the second write is right
# though run apart. Two closers at once: PostgreSQL makes the second wait for the first's row lock and checks its
# condition again on the row the first left, not OPEN any more; SQLite runs one write at a time: exactly one counts.
def _first_close(table: Any) -> Any:
    return table.c.status == "OPEN"


# What a session went through (its hops, its last screen, what it chose): a close that read the session's state before
# another close's hop finished knows less of it (knows_less).
_PROGRESS = ("hops", "last_screen", "cooperative_id", "member_id", "payment_id")


@functools.cache
def _close_statement(columns: tuple[str, ...], first: bool, young: bool, knows_less: bool = False) -> Any:
    """One UPDATE per set of columns, built once and run with the values as parameters, RETURNING the id of the row
    it wrote. `first`: only an OPEN row (the session's first close); else the row whatever it is, an aggregator's own
    end-of-session status, if it came first, not overwritten (the CASE), the sweep's guess (TIMED_OUT) replaced.
    `young`: only a row started since `w_since`. `knows_less`: what the session went through (_PROGRESS) is written
    as how it ended is, only on a row still OPEN or the sweep's guess (and where the row has none)."""
    table = table_of(UssdSession)
    # The sweep's Incomplete (close_abandoned) was a guess: a session whose state outlived it ended here.
    guessed = _guessed(table)
    which = [table.c.aggregator == bindparam("w_aggregator"), table.c.session_id == bindparam("w_session_id")]
    if young:
        which.append(table.c.started_at >= bindparam("w_since"))
    if first:
        which.append(_first_close(table))
    # What the first close wrote of how and when the session ended stands (a later close knows less: a Timeout
    # waited for after the session's end, a hop finishing in the background after its answer); what only this one
    # knows (hops, screen, cooperative, member, payment) is written. The sweep's guess is replaced whole.
    # (An end or duration the first close did not know, NULL, is filled in.)
    ends = or_(table.c.status == "OPEN", guessed)

    def ending(c: str) -> Any:
        written = ends if c == "error" else or_(ends, table.c[c].is_(None))
        # (typed: inside a CASE the column's type is not given to the value, and SQLite stored a bare datetime
        # with its offset, unlike every other time)
        return case((written, bindparam(f"v_{c}", type_=table.c[c].type)), else_=table.c[c])

    values: dict[Any, Any] = {table.c[c]: ending(c) if c in _ENDING or (knows_less and c in _PROGRESS)
                              else bindparam(f"v_{c}") for c in columns}
    values[table.c.status] = case((ends, bindparam("v_status", type_=String)), else_=table.c.status)
    if "error" not in columns:
        values[table.c.error] = case((guessed, null()), else_=table.c.error)
    return update(table).where(*which).values(values).returning(table.c.id)


async def closed(rt: Any, *, aggregator: str, session_id: str, status: str = "Success", hops: int | None = None,
                 last_screen: str | None = None, data: dict[str, Any] | None = None,
                 duration_ms: int | None = None, stateless: bool = False, error: str | None = None,
                 opening: bool = False, knows_less: bool = False, unanswered: dict[str, Any] | None = None) -> bool:
    """Record the session ended (by its END hop, or Hubtel's Timeout; what the hop does not know, None, is left as
    it is). Returns whether its row was closed before (by the sweep, the aggregator's notice, another hop): that
    close counted the session, so the caller counts no outcome of its own (see _first_close).

    `stateless`: a hop without the session's state (gone from Redis), which cannot tell the row is this session's
    (the session's state, or its first hop's write, tells a hop that): only a row younger than the longest session
    is (previous_before). An older one is left as it is, and told closed before: a late notice of the session the
    sweep closed and counted (past ABANDONED_AFTER, older than any stateless close reaches), or of a previous
    session of the id, counted by its own close. So is no row at all (not `opening`): the session's opening hop
    counted it without writing one, shed past the cap on hops in flight (busy) or failed (unavailable), and
    Hubtel's Release or Timeout after that END counted it a second time (abandoned); or it never reached us (a
    Timeout while its opening hop still runs: the row it writes then is the sweep's to count). (A new session of
    the id whose first hop could neither write its row nor close it, the database away, is counted by that hop
    itself: types.OpeningUnwritten.)

    A close with the session's state that finds no row (its END, Hubtel's Release or Timeout) is told closed before
    too: the session's opening hop saved its state but could not write the row, was answered "unavailable" and
    counted it (types.OpeningUnwritten; it takes the state back, but may fail to; one cut off by its time budget
    while writing the row is counted by its close, UssdService.ended_unanswered), and a Release after that END
    counted it a second time (abandoned).

    `opening`: the close is a hop's of the session, no late notice (its opening hop's, or any hop's ended
    unanswered: UssdService.ended_unanswered): an older row is a previous session's of the id, and this session,
    which has no row, is counted by the caller.

    `unanswered`: with `opening`, the session's row as opened() writes it (unanswered_row()), written closed when
    there is none: its opening hop was answered without its screen (busy, unavailable) before writing it, and counted
    the session; the aggregator's retry of that opening request (the same session id) goes on from that row and is
    not counted a second time (its closes find the row closed: its END, Hubtel's Release, Africa's Talking's notice,
    the sweep).

    `error`: why the session ended so, when the gateway ended it itself (the hop answered busy, unavailable or
    unsettled: UssdService.ended_unanswered), written with the status as the row's end.

    `knows_less`: the closer read the session's state at its start, before a hop of the session running at once on
    another process may have moved it on and closed the row itself (Hubtel's Release or Timeout sent while her last
    hop runs): the hops, screen and choices it read are written as its end is, only on a row no other close wrote.
    Written over the END's, a session that paid said it stopped at its confirmation.

    One statement, atomic on its own, so no transaction around it; a second only for a row closed before (which,
    failing, is logged, not raised: the first told the answer). The first failing raises: the row is left as it
    was, OPEN or not, and the caller judges who counts it (service._closed)."""
    values: dict[str, Any] = {"ended_at": utcnow()}
    if hops is not None:
        values["hops"] = hops
    if last_screen is not None:
        values["last_screen"] = last_screen[:48]
    if duration_ms is not None:
        values["duration_ms"] = duration_ms
    data = data or {}
    for column, key in (("cooperative_id", "c"), ("member_id", "mb"), ("payment_id", "pid")):
        if data.get(key):
            values[column] = data[key]
    if "cooperative_id" not in values and data.get("ic"):  # ended on member.inactive from the first menu
        values["cooperative_id"] = data["ic"]
    if error is not None:
        values["error"] = error[:300]
    params = {f"v_{c}": v for c, v in values.items()}
    params.update(v_status=status, w_aggregator=aggregator, w_session_id=session_id[:128])
    if stateless:
        params["w_since"] = previous_before()
    before: bool | None = None
    try:
        async with autocommit(rt) as conn:
            before = await pgraw.first(conn, _close_statement(tuple(values), True, stateless), params) is None
            if before:
                # No row at all: counted before, but by a hop's close (`opening`), whose session has none. With the
                # session's state, its opening hop could not write the row and counted the session (OpeningUnwritten);
                # without it, see `stateless`.
                before = await pgraw.first(conn, _close_statement(tuple(values), False, stateless, knows_less),
                                           params) is not None
                if not before and opening and unanswered is not None:
                    # The session's row, written closed, as this close counts it: the aggregator's retry of its
                    # opening request (the same session id) goes on from it, and its own closes count nothing more.
                    row = {**unanswered, "status": status, "ended_at": values["ended_at"], "error": values.get("error")}
                    await pgraw.first(conn, _unanswered_statement(conn.dialect.name),
                                      {**row, "previous_before": row["started_at"] - LONGEST_SESSION}, tuple(row))
                before = before or not opening
    except Exception:
        if before is None:
            raise  # whether the row was closed before is not known: the caller's to judge
        # The first write told it (closed before, or closed now: counted either way); what the hop knows is lost.
        log.warning("ussd session record not completed", exc_info=True, extra={"session_id": session_id})
    return before


async def record_event(rt: Any, event: SessionEvent) -> bool:
    """Upsert by (aggregator, session id): the notification may arrive before, after or without hops. Returns
    whether the row was closed before (by the sweep, the END hop, an earlier copy of this notice): that close
    counted the session, so the caller counts nothing (see _first_close). The aggregator's word is written either
    way: it replaces the sweep's guess (TIMED_OUT) and an END hop's Success."""
    values: dict[str, Any] = {"status": event.status, "ended_at": event.at or utcnow()}
    if event.hops is not None:
        values["hops"] = event.hops
    if event.duration_ms is not None:
        values["duration_ms"] = event.duration_ms
    if event.cost:
        values["cost"] = event.cost[:32]
    values["error"] = event.error[:300] if event.error else None
    table = table_of(UssdSession)
    async with rt.sessionmaker.begin() as session:
        stmt = insert_ignore(session.get_bind().dialect.name, UssdSession).values(
            id=new_id(), aggregator=event.aggregator, session_id=event.session_id[:128],
            phone_index=rt.cipher.blind_index(event.phone.e164), phone_masked=event.phone.masked(),
            service_code=event.service_code[:32], network_code=(event.network or "")[:16] or None,
            started_at=utcnow(), **{"hops": 0, **values},
        )
        # A new row, or an OPEN one, is the session's first close; a row closed before is left (no row RETURNED),
        # and written next.
        stmt = stmt.on_conflict_do_update(index_elements=["aggregator", "session_id"], set_=values,
                                          where=_first_close(table)).returning(table.c.id)
        if (await session.execute(stmt)).first() is not None:
            return False
        await session.execute(update(table).where(table.c.aggregator == event.aggregator,
                                                  table.c.session_id == event.session_id[:128]).values(values))
        return True


@functools.cache
def _abandoned_statement(bounded: bool) -> Any:
    """Up to `batch` OPEN rows started before `before` (and since `since` when `bounded`) recorded ended, as
    Incomplete with TIMED_OUT, RETURNING their aggregators and starts. Rows another worker's sweep holds are skipped
    (SKIP LOCKED), and the status is checked again as each row is written: a row is closed once, and a session's own
    end that came meanwhile stands. The batch is a MATERIALIZED CTE, picked once: as `id IN (SELECT ... LIMIT)`
    PostgreSQL may plan it as a semi join's inner side, run again for each row the UPDATE reads, each run past the
    rows the statement itself just closed, and one batch then closed every OPEN row.

    Read through ix_ussd_sessions_started: no index reads `status` (a partial index of the OPEN rows would),
    so that a session's end stays a HOT update."""
    table = table_of(UssdSession)
    picked = [table.c.status == "OPEN", table.c.started_at < bindparam("before")]
    if bounded:
        picked.append(table.c.started_at >= bindparam("since"))
    due = (select(table.c.id).where(*picked).order_by(table.c.started_at).limit(bindparam("batch"))
           .with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED"))
    return (update(table).where(table.c.id.in_(select(due.c.id)), table.c.status == "OPEN")
            .values(status="Incomplete", error=TIMED_OUT, ended_at=bindparam("v_ended_at"))
            .returning(table.c.aggregator, table.c.started_at))


class SweepUnfinished(Exception):
    """close_abandoned stopped at its `until` with OPEN rows maybe left: `closed` were closed (and counted), every
    one started before `reached` (the `since` to go on from: no OPEN row it read before it is left)."""

    def __init__(self, closed: int, reached: datetime) -> None:
        super().__init__(f"{closed} sessions closed; stopped at its time, more may be left")
        self.closed = closed
        self.reached = reached


async def close_abandoned(rt: Any, *, now: datetime | None = None, since: datetime | None = None,
                          batch: int = 500, until: float | None = None) -> int:
    """Record ended every session still OPEN ABANDONED_AFTER its start (started from `since` on, when given): no
    aggregator will (see ABANDONED_AFTER). One transaction per batch, until a batch comes short, each batch read
    from the latest start the one before closed (through the started_at index, not past every row the batches
    before closed again: a backlog of months is read once); safe with two workers sweeping at once (the rows one
    skips, held by the other, are the other's to close). Returns how many were closed (counted in
    gateway_ussd_sessions as timed_out, by aggregator). Its duration stays unknown (NULL): no one saw the session's
    last hop end it.

    `until` (a time.monotonic() instant): no batch starts after it, SweepUnfinished is raised instead (the batches
    done stay done), so a caller with a time limit stops between batches rather than be cut off in one."""
    now = now or utcnow()
    params: dict[str, Any] = {"before": now - ABANDONED_AFTER, "batch": batch, "v_ended_at": now}
    total = 0
    while True:
        if since is not None:
            params["since"] = since
        async with rt.sessionmaker.begin() as session:
            closed_by = (await session.execute(_abandoned_statement(since is not None), params)).all()
        aggregators = [aggregator for aggregator, _ in closed_by]
        for aggregator in set(aggregators):
            metrics.USSD_SESSIONS.labels(aggregator=aggregator, outcome="timed_out").inc(aggregators.count(aggregator))
        total += len(closed_by)
        if len(closed_by) < batch:
            return total
        since = max(started for _, started in closed_by)
        if until is not None and time.monotonic() >= until:
            raise SweepUnfinished(total, since)
