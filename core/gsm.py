"""The GSM-7 alphabet (3GPP TS 23.038): length in septets, and transliteration so a USSD screen or an SMS
never switches to UCS-2 (which halves what fits) because of one pasted character."""

from __future__ import annotations

import unicodedata

# 3GPP TS 23.038 default alphabet and its extension table (extension characters cost two septets).
BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
EXTENSION = frozenset("^{}\\[~]|€\f")

# Characters people paste that look harmless but force UCS-2.
_REPLACE: dict[str, str] = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'", "´": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "«": '"', "»": '"',
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...", "\u00a0": " ", "\u2007": " ", "\u202f": " ", "\u2009": " ", "\t": " ",
    "•": "-", "·": ".", "×": "x", "÷": "/", "°": "o", "©": "(c)", "®": "(R)", "™": "TM",
    "ç": "c", "ß": "ss", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D",
    "\u200b": "", "\ufeff": "", "\r": "",
    # Letters of Ghanaian, Nigerian and East African languages that are not an accented Latin letter, so that
    # stripping accents leaves nothing of the alphabet: Akan and Ewe (Ɔ Ɛ Ŋ Ɖ Ʋ Ƒ Ɣ), Hausa (Ɓ Ɗ Ƙ Ƴ), Luganda
    # (Ŋ). Their nearest Latin letter, as a member would type it on a phone without them ("Ofori", not "?fori").
    "Ɔ": "O", "ɔ": "o", "Ɛ": "E", "ɛ": "e", "Ŋ": "N", "ŋ": "n", "Ɖ": "D", "ɖ": "d", "Ʋ": "V", "ʋ": "v",
    "Ƒ": "F", "ƒ": "f", "Ɣ": "G", "ɣ": "g", "Ɓ": "B", "ɓ": "b", "Ɗ": "D", "ɗ": "d", "Ƙ": "K", "ƙ": "k",
    "Ƴ": "Y", "ƴ": "y", "Ǝ": "E", "ǝ": "e", "Ə": "E", "ə": "e",
}


_ALPHABET = BASIC | EXTENSION


def is_gsm(text: str) -> bool:
    # issuperset walks the string in C: every screen is measured several times per hop.
    return _ALPHABET.issuperset(text)


def length(text: str) -> int:
    """Septets the text takes in GSM-7 (extension characters count two)."""
    return len(text) + sum(map(text.count, EXTENSION))


def _one(ch: str) -> str:
    if ch in BASIC or ch in EXTENSION:
        return ch
    if ch in _REPLACE:
        return _REPLACE[ch]
    if unicodedata.combining(ch):
        # A mark NFC could not fold into its letter (Yoruba's ẹ̀: no precomposed e with dot below and grave):
        # the letter before it stands alone, as stripped accents do.
        return ""
    # Strip accents the alphabet lacks (ê -> e, ô -> o), keeping the ones it has (é, è, à).
    decomposed = unicodedata.normalize("NFKD", ch)
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    if base and all(c in BASIC or c in EXTENSION for c in base):
        return base
    return "?"


def to_gsm(text: str) -> str:
    """Transliterate anything outside GSM-7; the result always satisfies is_gsm."""
    if is_gsm(text):
        return text
    return "".join(_one(ch) for ch in unicodedata.normalize("NFC", text))
