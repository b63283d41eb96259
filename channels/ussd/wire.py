"""What every aggregator module returns from parsing: the core turn plus fields to echo back."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from channels.ussd.types import UssdTurn
from core.phone import DEFAULT_REGION, Phone, PhoneError, normalize

_UNUSABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class MalformedRequest(ValueError):
    """A callback body the adapter cannot turn into a turn; the message says which field."""


@dataclass(frozen=True)
class Parsed:
    turn: UssdTurn
    echo: Mapping[str, Any] = field(default_factory=dict)  # private to the aggregator module


@dataclass(frozen=True)
class Rendered:
    status: int
    body: bytes
    content_type: str


def text_field(data: Mapping[str, Any], name: str, *, required: bool = True, max_len: int = 200) -> str:
    value = data.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise MalformedRequest(f"{name} is required")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedRequest(f"{name} must be a string")
    text = str(value)
    if len(text) > max_len:
        raise MalformedRequest(f"{name} is too long")
    if _UNUSABLE.search(text):
        # No handset sends these; NUL cannot be stored in PostgreSQL and lone surrogates cannot be
        # encoded into a reply, so they would turn a garbled request into a server error.
        raise MalformedRequest(f"{name} contains control characters")
    return text


def network_field(data: Mapping[str, Any], name: str) -> str | None:
    """The network the aggregator names for the caller (an MCC-MNC or a name), None when absent or unusable. Only a
    hint (the number's range decides without it: core.phone.operator_on_network): a value too long, of another type
    or with control characters is read as no network rather than refusing the hop, which ended her session (a
    name longer than 16 characters answered Hubtel and Nalo 400). The session row keeps its first 16 characters."""
    try:
        return text_field(data, name, required=False, max_len=64) or None
    except MalformedRequest:
        return None


def phone_field(data: Mapping[str, Any], name: str, *, region: str = DEFAULT_REGION) -> Phone:
    """The caller's number; `region` reads a number in its country's local form (`0244123456`), which an
    aggregator serving one country may send instead of the international form."""
    raw = text_field(data, name, max_len=32)
    try:
        return normalize(raw, region)
    except PhoneError as exc:
        raise MalformedRequest(f"{name}: {exc.message}") from None
