"""Gettext-style catalogs (msgid -> text) per language, loaded once from locale/<lang>.json."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from core.gsm import length, to_gsm

LANGUAGES = ("en", "rw", "fr", "sw")
DEFAULT = "en"
_DIR = Path(__file__).with_name("locale")


@cache
def catalog(lang: str) -> dict[str, str]:
    with (_DIR / f"{lang}.json").open(encoding="utf-8") as fh:
        data = json.load(fh)
    return {k: v for k, v in data.items() if not k.startswith("#")}


def language(lang: str | None) -> str:
    return lang if lang in LANGUAGES else DEFAULT


def has(lang: str | None, msgid: str) -> bool:
    return msgid in catalog(language(lang)) or msgid in catalog(DEFAULT)


# The shorter forms translate_fit tries, in order. `.short` and `.shorter` keep every name the message has (KEEP); only
# `.shortest` drops one (the payment detail's type): the engine's fit_names takes a form of KEEP, its names shortened
# as far as they may go in `.short` (SHORT) before `.shorter` is tried, and `.shortest` only when neither fits.
VARIANTS = (".short", ".shorter", ".shortest")
SHORT = (".short",)
KEEP = (".short", ".shorter")


def translate_fit(lang: str | None, msgid: str, room: int, *, variants: tuple[str, ...] = VARIANTS,
                  **args: Any) -> str:
    """The message, or the first of its `variants` (where it has them) that fits in `room` septets, else the last
    it has: the payment detail's short and shorter forms keep the payment type, and only the shortest drops it (one
    short form without it dropped the type on Nalo as soon as the labels did not fit). `variants` SHORT stops at
    `.short`, KEEP at `.shorter` (fit_names shortens the names in them before the type is dropped)."""
    text = translate(lang, msgid, **args)
    for variant in variants:
        if length(text) <= room:
            break
        if has(lang, msgid + variant):
            text = translate(lang, msgid + variant, **args)
    return text


def translate(lang: str | None, msgid: str, **args: Any) -> str:
    """The message in `lang`, falling back to English, formatted and made GSM-7 safe."""
    text = catalog(language(lang)).get(msgid)
    if text is None:
        text = catalog(DEFAULT)[msgid]  # a missing English msgid is a programming error: KeyError
    if args:
        text = text.format(**args)
    return to_gsm(text)
