"""The core USSD turn and reply types every aggregator adapter translates into and out of."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.phone import Phone

# Outages expected in production (Redis or PostgreSQL away, restarting, or slow): logged without a traceback.
EXPECTED_OUTAGES: tuple[type[BaseException], ...] = (OSError, RedisError, DBAPIError, PoolTimeout)  # OSError: timeouts


@dataclass(frozen=True, slots=True)
class UssdTurn:
    """One hop of a USSD session, free of any aggregator's field names.

    `input` is the latest thing the user typed (None on the first hop). Aggregators that send
    every input so far (Africa's Talking) fill `accumulated` instead and leave `input` None: only
    the session store, which remembers the previous accumulated text, can tell what is new.
    """

    aggregator: str
    session_id: str
    phone: Phone
    service_code: str
    input: str | None
    is_new: bool
    network: str | None = None
    accumulated: str | None = None  # the whole '*'-joined text, for accumulating aggregators
    hop_key: str | None = None  # identifies a hop so a retried request is recognised
    sequence: int | None = None  # the hop's number, where the aggregator numbers them (Hubtel's Sequence)
    extension: str | None = None  # digits dialled after the base code (*384*123*3# -> "3")
    closed: bool = False  # the aggregator reports the session over (user cancelled, timeout)


@dataclass(frozen=True, slots=True)
class UssdReply:
    text: str
    end: bool


def extends(dialled: str, base: str) -> bool:
    """Whether the dialled code is the base code, or the base code followed by more: *384*123# or *384*123*7#
    (not *384*1234#, another code)."""
    stem_d, stem_b = dialled.strip().rstrip("#"), base.strip().rstrip("#")
    return bool(stem_d) and bool(stem_b) and (stem_d == stem_b or stem_d.startswith(stem_b + "*"))


def extension_of(dialled: str, base: str) -> str | None:
    """The part of a dialled code after the base code: ('*384*123*3#', '*384*123#') -> '3'."""
    if not extends(dialled, base):
        return None
    return dialled.strip().rstrip("#")[len(base.strip().rstrip("#")) + 1:] or None


class HopProgress:
    """What one hop has done so far, read by the router when the hop's time budget runs out.

    Once a flow starts a write the user must hear about (a payment, a dispute, a member), the hop is
    no longer cut short: answering "service unavailable" while the payment goes ahead would leave a
    payer charged for something they were told failed.

    `unwritten`: the hop opens a session whose row is not known written yet (set by UssdService._first_hop, cleared
    once the row is written): cut off by its budget meanwhile, it is an opening hop without its row
    (OpeningUnwritten), whose failing close counts the session, as on Africa's Talking.
    """

    __slots__ = ("side_effects", "unwritten")

    def __init__(self) -> None:
        self.side_effects = False
        self.unwritten = False


class HopUnsettled(Exception):
    """A hop failed or ran out of time after it began a side effect: whether the payment (or other write)
    went through is not known here, so the user must not be told "try again"."""


class OpeningUnwritten(Exception):
    """A session's opening hop could not write the session's row (the database away; raised from that error). The
    hop is answered "unavailable" and its row closed as any failed hop's (UssdService.ended_unanswered, `unwritten`):
    a write that failed may still have been committed (its answer lost), and the row left OPEN was counted again by a
    Release or the sweep. A close failing too counts the session itself: most likely there is no row for the sweep
    to count (on Hubtel and Nalo a failing close took the row for one left OPEN that the sweep would count). Its
    session state is not left in Redis (UssdService._answer): a Release or Timeout after it counted the session a
    second time (abandoned).

    `kept`: the session state it saved was left, another copy of the hop having answered from it (its member goes on
    from it: sessions.unsave); the row's write, tried again by its close in place of closing the row
    (UssdService.ended_unanswered). Closed, the row of the session she went on with said "unavailable", counted so,
    and her session's own end counted nothing."""

    def __init__(self, message: str, *, kept: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(message)
        self.kept = kept


HOP_PROGRESS: contextvars.ContextVar[HopProgress | None] = contextvars.ContextVar("ussd_hop_progress",
                                                                                  default=None)


def side_effect_began() -> bool:
    """True when the current hop has begun a side effect (see HopProgress)."""
    progress = HOP_PROGRESS.get()
    return progress is not None and progress.side_effects


def row_unwritten(unwritten: bool) -> None:
    """The current hop opens a session whose row is not written yet (True), or is now (False): see HopProgress."""
    progress = HOP_PROGRESS.get()
    if progress is not None:
        progress.unwritten = unwritten


def side_effect_started() -> None:
    """Flows call this right before a transaction whose outcome the user must be told."""
    progress = HOP_PROGRESS.get()
    if progress is not None:
        progress.side_effects = True
