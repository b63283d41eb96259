"""The core USSD turn and reply types every aggregator adapter translates into and out of."""

from __future__ import annotations

from dataclasses import dataclass

from core.phone import Phone


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
    extension: str | None = None  # digits dialled after the base code (*384*123*3# -> "3")
    closed: bool = False  # the aggregator reports the session over (user cancelled, timeout)


@dataclass(frozen=True, slots=True)
class UssdReply:
    text: str
    end: bool


def extension_of(dialled: str, base: str) -> str | None:
    """The part of a dialled code after the base code: ('*384*123*3#', '*384*123#') -> '3'."""
    dialled, base = dialled.strip(), base.strip()
    if not dialled or not base:
        return None
    stem_d, stem_b = dialled.rstrip("#"), base.rstrip("#")
    if stem_d == stem_b or not stem_d.startswith(stem_b + "*"):
        return None
    rest = stem_d[len(stem_b) + 1:]
    return rest or None
