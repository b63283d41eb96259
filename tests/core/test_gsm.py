"""The GSM-7 alphabet: septet lengths (extension characters count two) and transliteration, which always leaves
text an SMS or a USSD screen sends in GSM-7 (one character outside it makes the whole text UCS-2)."""

from __future__ import annotations

import pytest

from channels.ussd.engine import fit
from core.gsm import is_gsm, length, to_gsm


@pytest.mark.parametrize(("text", "septets"), [
    ("", 0), ("Muraho", 6), ("€", 2), ("[1] {a}", 11), ("^~|\\", 8), ("Réf: é à Ñ", 10),
])
def test_length_counts_extension_characters_twice(text: str, septets: int) -> None:
    assert length(text) == septets


def test_a_ussd_screen_of_extension_characters_is_cut_by_its_septets() -> None:
    """100 '€' are 200 septets: counted as 100 characters, the screen went whole and the aggregator cut it."""
    screen = fit("€" * 100, 160)
    assert length(screen) <= 160 and screen.endswith("..")
    assert fit("€" * 80, 160) == "€" * 80


@pytest.mark.parametrize(("typed", "sent"), [
    ("Ɔfori Ɛkua Susu", "Ofori Ekua Susu"),  # Akan's open o and open e: their nearest Latin letter, not '?'
    ("Ŋkɔsoɔ Group", "Nkosoo Group"),
    ("Ɗanjuma Ƙofar", "Danjuma Kofar"),  # Hausa's hooked letters
    ("Uniﬁed Traders", "Unified Traders"),  # the fi ligature a PDF copies
    ("ＫＨＨＣ", "KHHC"),  # full-width letters an Asian keyboard types
    ("Pay now…", "Pay now..."),  # a phone's ellipsis: three dots, as she would type them
])
def test_names_are_transliterated_to_their_nearest_gsm_letters(typed: str, sent: str) -> None:
    assert to_gsm(typed) == sent
    assert is_gsm(sent)


@pytest.mark.parametrize("typed", ["½ share", "¾", "№ 5", "㎡ rent", "✓ paid", "ẹ̀"])
def test_what_transliteration_leaves_is_always_gsm(typed: str) -> None:
    """A character whose compatibility form is part GSM-7 (½ is 1, a fraction slash, 2) is a '?', never a
    fraction slash that would turn the whole SMS into UCS-2."""
    assert is_gsm(to_gsm(typed)), repr(to_gsm(typed))
