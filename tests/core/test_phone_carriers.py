"""Operator detection for current number ranges (phonenumbers' carrier data, then core.phone's table)."""

from __future__ import annotations

import pytest
from phonenumbers import carrier, parse

from core.phone import normalize, operator_of


def test_the_carrier_data_is_installed() -> None:
    """phonenumbers ships it (not phonenumberslite): without it every range would fall back to the table."""
    assert carrier.name_for_number(parse("+254113345678"), "en") == "Safaricom"


@pytest.mark.parametrize(("number", "region", "operator"), [
    ("0113345678", "KE", "SAFARICOM"),  # Safaricom 0110-0115: missing from the table (it stopped at 0111)
    ("0115345678", "KE", "SAFARICOM"),
    ("0762345678", "KE", "AIRTEL"),  # Airtel Kenya 0762
    ("0531234567", "GH", "MTN"),  # MTN Ghana 053
    ("0712345678", "KE", "SAFARICOM"),
    ("0733123456", "KE", "AIRTEL"),
    ("0788000001", "RW", "MTN"),
    ("0733000001", "RW", "AIRTEL"),
    ("0772123456", "UG", "MTN"),
    ("0701234567", "UG", "AIRTEL"),
    ("0961234567", "ZM", "MTN"),
    ("0244123456", "GH", "MTN"),
])
def test_operator_of_current_ranges(number: str, region: str, operator: str) -> None:
    phone = normalize(number, region)
    assert phone.operator == operator, (phone.e164, phone.operator)


@pytest.mark.parametrize(("number", "region", "operator"), [
    ("0201234567", "GH", "TELECEL"),
    ("0271234567", "GH", "AIRTELTIGO"),  # Ghana's "AT" (formerly AirtelTigo) is not Airtel
    ("0571234567", "GH", "AIRTELTIGO"),
    ("0771234567", "KE", "TELKOM"),  # an operator no method collects from keeps its own name
    ("0741234567", "TZ", "VODACOM"),
])
def test_other_operators_are_known_by_name(number: str, region: str, operator: str) -> None:
    assert normalize(number, region).operator == operator


def test_a_range_the_carrier_data_does_not_name_falls_back_to_the_table() -> None:
    # +256 39 is in the table (MTN Uganda) and has no carrier name in phonenumbers' data.
    assert carrier.name_for_number(parse("+256391234567"), "en") == ""
    assert operator_of("+256391234567") == "MTN"
    assert operator_of("+999123") is None
