"""Money: exact minor units, currency exponents, parsing and formatting."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import EXPONENTS, JsonNumber, Money, MoneyError, total_to_api


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [
        ("50000", "RWF", 50_000),
        (50000, "RWF", 50_000),
        ("12.50", "KES", 1250),
        ("12.5", "KES", 1250),
        ("0.01", "USD", 1),
        (7, "UGX", 7),
        (Decimal("3.20"), "GHS", 320),
        ("1000000", "TZS", 100_000_000),
        ("5.00", "ZMW", 500),
        ("2.10", "EUR", 210),
    ],
)
def test_parse(value, currency, minor):
    assert Money.parse(value, currency) == Money(minor, currency)


@pytest.mark.parametrize(
    ("value", "currency"),
    [("50000.5", "RWF"), ("1.001", "KES"), ("abc", "RWF"), ("", "RWF"), ("1e5", "RWF"), ("--1", "KES"),
     ("12", "XXX"), (12.5, "KES"), (True, "RWF"),
     ("\u0665\u0660\u0660\u0660\u0660", "RWF"), ("\uff15\uff10", "RWF")],  # Arabic-Indic, fullwidth digits
)
def test_parse_refuses(value, currency):
    with pytest.raises(MoneyError):
        Money.parse(value, currency)


def test_from_api_accepts_integral_json_floats_only():
    assert Money.from_api(50000.0, "RWF") == Money(50000, "RWF")
    with pytest.raises(MoneyError):
        Money.from_api(50000.5, "RWF")
    with pytest.raises(MoneyError):
        Money.from_api([1], "RWF")


@pytest.mark.parametrize(("value", "currency", "outcome"), [
    (JsonNumber("1e999"), "RWF", "amount 1e999 is too large"),  # the float it rounds to is inf
    (JsonNumber("1e-7"), "KES", "KES has 2 decimal places; 1e-7 has more"),  # the float's repr is 1e-07
    (JsonNumber("1.000000000000000000000000000001"), "KES", "KES has 2 decimal places; "
                                                            "1.000000000000000000000000000001 has more"),
    (JsonNumber("1e-999999999999"), "KES", "KES has 2 decimal places; 1e-999999999999 has more"),  # not 0
    # Exponents past Decimal's own bound (999999999999999999): read as written still, never an InvalidOperation.
    (JsonNumber("1e9999999999999999999"), "RWF", "amount 1e9999999999999999999 is too large"),
    (JsonNumber("-2.5E+9999999999999999999"), "KES", "amount -2.5E+9999999999999999999 is too large"),
    (JsonNumber("1e-9999999999999999999"), "KES", "KES has 2 decimal places; 1e-9999999999999999999 has more"),
    (JsonNumber("0.0e9999999999999999999"), "RWF", Money(0, "RWF")),
    ("12.1234567", "KES", "KES has 2 decimal places; 12.1234567 has more"),
    ("1234567890123456", "RWF", "amount 1234567890123456 is too large"),
    (10**14, "KES", "amount 100000000000000 is too large"),
    (float("inf"), "RWF", "amount must be a finite number"),
    (float("nan"), "RWF", "amount must be a finite number"),
    (JsonNumber("12.50"), "KES", Money(1250, "KES")),
    (JsonNumber("5E4"), "RWF", Money(50_000, "RWF")),
    (JsonNumber("50000.000"), "RWF", Money(50_000, "RWF")),
    (1e-2, "KES", Money(1, "KES")),  # a provider's plain float, read from its shortest text
])
def test_from_api_says_what_is_wrong_with_the_number_as_written(value, currency, outcome):
    if isinstance(outcome, Money):
        assert Money.from_api(value, currency) == outcome
        return
    with pytest.raises(MoneyError) as refused:
        Money.from_api(value, currency)
    assert refused.value.message == outcome


def test_format_and_api():
    assert Money(50_000, "RWF").format() == "50,000 RWF"
    assert Money(123450, "KES").format() == "1,234.50 KES"
    assert Money(50_000, "RWF").to_api() == 50_000
    assert Money(1250, "KES").to_api() == "12.50"


def test_cedis_are_written_as_ghanaians_write_them_the_code_first():
    """Ghanaians write "GHS 50.00" (the SMS and USSD texts said "50.00 GHS"); every other currency keeps its code
    after the number."""
    assert Money(5_000, "GHS").format() == "GHS 50.00"
    assert Money(123_456, "GHS").format() == "GHS 1,234.56"
    assert Money(2_050, "GHS").format("fr") == "GHS 20,50"
    assert str(Money(-1_234, "GHS")) == "GHS -12.34"
    assert Money(50_000, "RWF").format() == "50,000 RWF" and Money(100_000, "KES").format() == "1,000.00 KES"


def test_arithmetic_refuses_mixed_currencies():
    assert Money(5, "RWF") + Money(7, "RWF") == Money(12, "RWF")
    with pytest.raises(MoneyError):
        Money(5, "RWF") + Money(5, "KES")


def test_minor_must_be_int():
    with pytest.raises(MoneyError):
        Money(1.5, "RWF")  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        Money(10**16, "RWF")


@given(st.sampled_from(sorted(EXPONENTS)), st.integers(min_value=-(10**12), max_value=10**12))
def test_round_trip_through_major_units(currency, minor):
    money = Money(minor, currency)
    assert Money.parse(str(money.major()), currency) == money


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_addition_is_exact(a, b):
    assert (Money(a, "KES") + Money(b, "KES")).minor == a + b


def test_totals_pass_the_per_amount_ceiling() -> None:
    """A report's sum of many payments may pass what one payment may be: written like one amount, not refused."""
    assert total_to_api(2 * 999_999_999_999_999, "RWF") == 1_999_999_999_999_998
    assert total_to_api(10**17 + 5, "KES") == "1000000000000000.05"
    assert total_to_api(-150, "KES") == "-1.50"
    with pytest.raises(MoneyError):
        Money(10**15, "RWF")
    for minor, currency in ((0, "RWF"), (123_456, "KES"), (-7, "UGX")):
        assert total_to_api(minor, currency) == Money(minor, currency).to_api()


def test_an_amount_is_written_as_its_readers_language_writes_numbers() -> None:
    """A French reader takes "5,000 BIF" for five francs: USSD screens and SMS both write 5 000 (a plain space,
    GSM-7) and decimals with a comma; the other languages, and no language, as before."""
    assert Money(5000, "BIF").format("fr") == "5 000 BIF"
    assert Money(150050, "KES").format("fr") == "1 500,50 KES"
    assert [Money(150050, "KES").format(lang) for lang in (None, "en", "rw", "sw")] == ["1,500.50 KES"] * 4


def test_amounts_of_two_currencies_are_never_ordered() -> None:
    """5 KES is neither more nor less than 3 RWF: every comparison refuses, as adding them does."""
    kes, rwf = Money(500, "KES"), Money(3, "RWF")
    for compare in (lambda: kes < rwf, lambda: kes <= rwf, lambda: kes > rwf, lambda: kes >= rwf):
        with pytest.raises(MoneyError, match="cannot combine KES with RWF"):
            compare()
    assert Money(3, "RWF") < Money(4, "RWF") <= Money(4, "RWF")
