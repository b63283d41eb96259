"""The open flag beyond collected taken out of a payment's mismatch_detail that the column's limit cut when it was
written (core.refunds._other_flags): the " … " that says something was cut stays."""

from __future__ import annotations

import pytest

from core.payments import add_flag, detail_head
from core.refunds import _other_flags


@pytest.mark.parametrize("length", [195, 196, 197])
def test_a_flag_starting_right_after_the_cut_leaves_the_cut_marked(length: int) -> None:
    """A flag of 195 to 197 characters (the counted forms are that long: "2 chargebacks of 35,000 RWF in all and
    refund RFD_… completed: … if refund RFD_… completes: …" is 195) added after 150 characters of other flags: the
    detail keeps their first 100, " … " and the flag. Taken out, "<first 100> … " was left, the next flag then read
    "<first 100> … ; next" (195), or the first 100 alone, "<first 100> ; next" (197): a cut flag read as whole."""
    earlier = "refund RFD_20261206_001 reported failed after it was completed: " + "; ".join(["declined"] * 9)
    flag = ("x" * (length - 28)) + ": recover it from the member"
    written = add_flag(earlier, flag)
    assert (len(flag), len(written), written[detail_head():detail_head() + 3]) == (length, 300, " … ")
    assert written.endswith(flag)
    assert _other_flags(written, written, flag) == f"{earlier[:detail_head()]} …"
    assert add_flag(_other_flags(written, written, flag), "next") == f"{earlier[:detail_head()]} …; next"
