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
    handset may send another script's digits, USSD keys and amounts, keypad reads them first)."""
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


def keypad(text: str) -> str:
    """`text` as the keys she pressed: full-width and half-width forms as the plain characters (what a CJK or
    Arabic keyboard sends: "ＫＨＨＣ" is KHHC, "１＃" 1#, "１２．５０" 12.50), and each decimal digit of another script
    as its ASCII digit (ascii_digits). Only the width part of NFKC (the characters Unicode decomposes as <wide> or
    <narrow>): the rest reads "³" and "①" as 3 and 1, "½" as "1⁄2", "™" as TM, none a key on a keypad (is_number
    and a code's form refuse them as before). For what the USSD menus read as keys, a code and an amount; free text
    (a name) is stored as typed."""
    if text.isascii():
        return text
    return ascii_digits("".join(unicodedata.normalize("NFKC", c) if _WIDTH.match(unicodedata.decomposition(c))
                                else c for c in text))


_WIDTH = re.compile(r"<(?:wide|narrow)> ")


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
