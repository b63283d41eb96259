"""Checks on text that comes from outside (forms, paths, headers, USSD input)."""

from __future__ import annotations

import re
import unicodedata

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_uuid(value: str | None) -> bool:
    """An id as the gateway writes them (hyphenated UUID): checked before a lookup, so a malformed one is "not
    found" rather than a database error."""
    return bool(_UUID.fullmatch(value or ""))  # not match: its "$" let "<uuid>\n" through


def is_number(text: str) -> bool:
    """Only the ASCII digits 0-9, at least one. str.isdigit alone also takes "³" (then int() raises) and
    other scripts' digits such as "٣" (then int() reads 3): neither is a number a caller meant to send (where a
    handset may send another script's digits, USSD keys and amounts, ascii_digits reads them first)."""
    return text.isascii() and text.isdigit()


def ascii_digits(text: str) -> str:
    """`text` with each decimal digit of another script written as its ASCII digit (full-width "１", Arabic-Indic
    "١", Devanagari "१": what a handset set to such a keyboard sends for the key 1), the rest as it is. Decimal
    digits only (Unicode's Nd): "³" or "①" are no key on a keypad and stay, for is_number to refuse. For USSD
    keys and amounts, where a number is expected; is_number alone still refuses such digits elsewhere."""
    if text.isascii():
        return text
    return "".join(c if c.isascii() else str(d) if (d := unicodedata.decimal(c, None)) is not None else c
                   for c in text)


def admin_note(note: str | None, what: str) -> str:
    """An admin's note recording an outcome by hand (kept in the audit log): 3 to 300 characters, trimmed."""
    from core.errors import ValidationError

    text = (note or "").strip()
    if not 3 <= len(text) <= 300:
        raise ValidationError(f"note must be 3 to 300 characters: {what}", field="note")
    return text


# NUL, the other C0 control characters but tab, line feed and carriage return, and lone surrogates: no
# database column or SMS can hold them (PostgreSQL refuses a NUL in text outright). The JSON API and the
# CSV member import refuse them with the same check.
NOT_ALLOWED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def has_bad_characters(text: str) -> bool:
    return NOT_ALLOWED.search(text) is not None
