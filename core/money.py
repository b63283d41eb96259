"""Money in integer minor units with an ISO 4217 exponent table; never a float."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from core.errors import ValidationError

# ISO 4217 minor-unit exponents for the currencies the gateway handles.
EXPONENTS: dict[str, int] = {
    "RWF": 0, "UGX": 0, "BIF": 0, "KES": 2, "TZS": 2, "GHS": 2, "ZMW": 2, "MWK": 2,
    "NGN": 2, "ZAR": 2, "XOF": 0, "XAF": 0, "USD": 2, "EUR": 2, "GBP": 2,
}

_AMOUNT = re.compile(r"^-?\d{1,15}(\.\d{1,6})?$", re.ASCII)
MAX_MINOR = 10**15


# How a language the gateway speaks writes a number other than '50,000.50' (thousands, decimals): a French
# reader takes "5,000 BIF" for five francs. A plain space, since a no-break one is not GSM-7 (an SMS costs twice).
NUMBER_MARKS: dict[str, tuple[str, str]] = {"fr": (" ", ",")}


class MoneyError(ValidationError):
    """An amount or currency the gateway cannot represent exactly."""


def exponent(currency: str) -> int:
    try:
        return EXPONENTS[currency]
    except KeyError:
        raise MoneyError(f"unsupported currency {currency!r}", field="currency") from None


@dataclass(frozen=True, slots=True)
class Money:
    minor: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.minor, bool) or not isinstance(self.minor, int):
            raise MoneyError("amount must be an integer number of minor units", field="amount")
        exponent(self.currency)
        if abs(self.minor) >= MAX_MINOR:
            raise MoneyError("amount is too large", field="amount")

    @classmethod
    def parse(cls, value: str | int | Decimal, currency: str) -> Money:
        """Parse a major-unit amount ("50000", "12.50", 50000); refuse fractions the currency lacks."""
        exp = exponent(currency)
        if isinstance(value, bool):
            raise MoneyError("amount must be a number", field="amount")
        if isinstance(value, float):
            raise MoneyError("amount must not be a binary float; send an integer or a string",
                             field="amount")
        if isinstance(value, int):
            return cls(value * 10**exp, currency)
        text = str(value).strip()
        if not _AMOUNT.match(text):
            raise MoneyError(f"amount {text!r} is not a decimal number", field="amount")
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise MoneyError(f"amount {text!r} is not a decimal number", field="amount") from None
        scaled = dec.scaleb(exp)
        if scaled != scaled.to_integral_value():
            raise MoneyError(f"{currency} has {exp} decimal places; {text} has more", field="amount")
        return cls(int(scaled), currency)

    @classmethod
    def from_api(cls, value: object, currency: str) -> Money:
        """An API amount in major units: int, integral float from JSON, or decimal string."""
        if isinstance(value, float):
            if not value.is_integer():
                return cls.parse(repr(value), currency)
            value = int(value)
        if not isinstance(value, int | str | Decimal) or isinstance(value, bool):
            raise MoneyError("amount must be a number", field="amount")
        return cls.parse(value, currency)

    def major(self) -> Decimal:
        return Decimal(self.minor).scaleb(-exponent(self.currency))

    def to_api(self) -> int | str:
        """Major units for JSON: an int when the currency has no minor unit, else a decimal string."""
        return total_to_api(self.minor, self.currency)

    def format(self, language: str | None = None) -> str:
        """Human form with thousands separators: '50,000 RWF', '1,234.50 KES'; as `language` writes numbers
        (NUMBER_MARKS): in French '50 000 RWF', '1 234,50 KES'."""
        exp = exponent(self.currency)
        number = f"{self.major():,.{exp}f}"
        marks = NUMBER_MARKS.get(language or "")
        if marks is not None:
            table: dict[str, str | int | None] = {",": marks[0], ".": marks[1]}
            number = number.translate(str.maketrans(table))
        return f"{number} {self.currency}"

    def _same(self, other: Money) -> None:
        if self.currency != other.currency:
            raise MoneyError(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    # Ordering is only defined within one currency: 5 KES is neither more nor less than 3 RWF.
    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.minor < other.minor

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.minor <= other.minor

    def __gt__(self, other: Money) -> bool:
        self._same(other)
        return self.minor > other.minor

    def __ge__(self, other: Money) -> bool:
        self._same(other)
        return self.minor >= other.minor

    def is_positive(self) -> bool:
        return self.minor > 0

    def __str__(self) -> str:
        return self.format()


def total_to_api(minor: int, currency: str) -> int | str:
    """A sum of amounts in major units for JSON, as Money.to_api writes one amount, without the per-amount
    ceiling: a report's total of many payments may pass what any single payment may be."""
    exp = exponent(currency)
    if exp == 0:
        return int(minor)
    return f"{Decimal(int(minor)).scaleb(-exp):.{exp}f}"
