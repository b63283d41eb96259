"""core.text.keypad: what a handset's keyboard sends, read as the keys pressed (the USSD menus, codes, amounts)."""

from __future__ import annotations

import pytest

from core.text import is_number, keypad


@pytest.mark.parametrize(("typed", "read"), [
    ("1", "1"), ("abc", "abc"),
    ("\uff11\uff03", "1#"),  # full-width 1 and Send key
    ("\uff4b\uff28\uff28\uff23\uff0d\uff12", "kHHC-2"),  # full-width letters and hyphen
    ("\uff11\uff12\uff0e\uff15\uff10", "12.50"), ("\uff12\uff10\uff0c\uff10\uff10\uff10", "20,000"),
    ("\u0661\u0662", "12"), ("\u096a", "4"),  # Arabic-Indic, Devanagari digits
    ("\u3000\uff11", " 1"),  # ideographic space
    ("\u0661\u066b\u0665", "1\u066b5"),  # the Arabic separators are no width form: an amount reads them itself
])
def test_keypad_reads_width_forms_and_other_scripts_digits(typed: str, read: str) -> None:
    assert keypad(typed) == read


@pytest.mark.parametrize("typed", ["\u00b3", "\u2460", "\u00bd", "\u2474", "\u2488", "\u2122", "\u2070"])
def test_keypad_leaves_what_is_no_key(typed: str) -> None:
    """The rest of NFKC reads these as 3, 1, 1⁄2, (1), 1., TM, 0: none is a key on a keypad."""
    assert keypad(typed) == typed
    assert not is_number(keypad(typed))
