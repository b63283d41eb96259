"""GSM-7 versus UCS-2 detection, message length and segment count, as a handset and the SMSC count them."""

from __future__ import annotations

from dataclasses import dataclass

from core.gsm import EXTENSION as GSM7_EXTENDED  # sent as ESC + char: two septets each
from core.gsm import is_gsm

GSM7 = "GSM-7"
UCS2 = "UCS-2"

# Single-message capacity, and per-part capacity once a User Data Header is needed.
_LIMITS = {GSM7: (160, 153), UCS2: (70, 67)}


@dataclass(frozen=True, slots=True)
class SmsSize:
    encoding: str  # GSM-7 | UCS-2
    length: int  # septets for GSM-7 (extension chars count 2), UTF-16 code units for UCS-2
    segments: int


def is_gsm7(text: str) -> bool:
    return is_gsm(text)


def _units(text: str, encoding: str) -> list[int]:
    """Size of each character in its encoding's units; a unit group is never split across parts."""
    if encoding == GSM7:
        return [2 if ch in GSM7_EXTENDED else 1 for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]  # astral chars are a surrogate pair


def measure(text: str) -> SmsSize:
    encoding = GSM7 if is_gsm7(text) else UCS2
    units = _units(text, encoding)
    length = sum(units)
    single, part = _LIMITS[encoding]
    if length <= single:
        return SmsSize(encoding, length, 1 if length else 0)
    # Count parts exactly: an escape pair or surrogate pair that does not fit moves to the next part.
    segments, used = 1, 0
    for size in units:
        if used + size > part:
            segments += 1
            used = 0
        used += size
    return SmsSize(encoding, length, segments)
