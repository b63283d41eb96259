"""Checks on text that comes from outside (forms, paths, headers, USSD input)."""

from __future__ import annotations


def is_number(text: str) -> bool:
    """Only the ASCII digits 0-9, at least one. str.isdigit alone also takes "³" (then int() raises) and
    other scripts' digits such as "٣" (then int() reads 3): neither is a number a caller meant to send."""
    return text.isascii() and text.isdigit()
