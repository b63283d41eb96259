"""Money in integer minor units with an ISO 4217 exponent table; never a float."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from core.errors import ValidationError

# ISO 4217 minor-unit exponents for the currencies the gateway handles.
EXPONENTS: dict[str, int] = {
    "RWF": 0, "UGX": 0, "BIF": 0, "KES": 2, "TZS": 2, "GHS": 2, "ZMW": 2, "MWK": 2,
    "NGN": 2, "ZAR": 2, "XOF": 0, "XAF": 0, "USD": 2, "EUR": 2, "GBP": 2,
}

# A decimal string ("50000", "12.50"); a JSON number's text may also carry an exponent ("1e-7", "5E4"). Bounded in
# length (a longer one is no amount), not in digits: "12.1234567" is told it has too many decimal places, and a
# sixteen-digit number that it is too large, rather than that either is not a number.
_AMOUNT = re.compile(r"-?\d+(\.\d+)?", re.ASCII)
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?", re.ASCII)
_MAX_TEXT = 64
MAX_MINOR = 10**15


# How a language the gateway speaks writes a number other than '50,000.50' (thousands, decimals): a French
# reader takes "5,000 BIF" for five francs. A plain space, since a no-break one is not GSM-7 (an SMS costs twice).
NUMBER_MARKS: dict[str, tuple[str, str]] = {"fr": (" ", ",")}
# Currencies whose people write the code before the number: Ghanaians write "GHS 50.00" ("50.00 GHS" reads foreign).
# The code, not the sign GH₵, which is not GSM-7 (an SMS costs twice, a USSD screen holds half).
CODE_FIRST = frozenset({"GHS"})


class MoneyError(ValidationError):
    """An amount or currency the gateway cannot represent exactly."""


class JsonNumber(float):
    """A JSON number with the text it was written as: an amount is read from that text, exactly (1e-7 has seven
    decimal places, 1e999 is too large), never from the binary float the text rounds to (1e-07, inf). Anything
    else takes it as the float it is."""

    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number


def _places(dec: Decimal) -> int:
    """The decimal places `dec` (finite) writes, its trailing zeros aside ("50000.00": none); counted from its
    digits, so no arithmetic context rounds a long one to fewer."""
    _, digits, exp = dec.as_tuple()
    assert isinstance(exp, int)
    kept = len("".join(map(str, digits)).rstrip("0"))
    return 0 if kept == 0 else max(0, -(exp + len(digits) - kept))


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
    def parse(cls, value: str | int | Decimal | JsonNumber, currency: str, field: str = "amount") -> Money:
        """Parse a major-unit amount ("50000", "12.50", 50000); refuse fractions the currency lacks. `field`: the
        name the errors give it (a dispute's refundAmount)."""
        exp = exponent(currency)
        if isinstance(value, bool):
            raise MoneyError(f"{field} must be a number", field=field)
        if isinstance(value, JsonNumber):
            return cls._exact(value.text, _NUMBER, currency, field)
        if isinstance(value, float):
            raise MoneyError(f"{field} must not be a binary float; send an integer or a string", field=field)
        if isinstance(value, int):
            if abs(value) * 10**exp >= MAX_MINOR:
                shown = str(value) if len(str(abs(value))) <= _MAX_TEXT else "given"
                raise MoneyError(f"{field} {shown} is too large", field=field)
            return cls(value * 10**exp, currency)
        return cls._exact(str(value).strip(), _AMOUNT, currency, field)

    @classmethod
    def _exact(cls, text: str, form: re.Pattern[str], currency: str, field: str) -> Money:
        """The amount `text` writes, exactly (no context rounding), or the error that says what is wrong with it:
        not a number, more decimal places than `currency` has, too large."""
        exp = exponent(currency)
        if len(text) > _MAX_TEXT or not form.fullmatch(text):
            shown = text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."
            raise MoneyError(f"{field} {shown!r} is not a decimal number", field=field)
        try:
            dec = Decimal(text)
        except InvalidOperation:
            # Only an exponent past what Decimal holds (1e9999999999999999999: the form matched): a number no
            # amount is, told as the one it writes is (its mantissa has at most _MAX_TEXT digits), not a 500.
            mantissa, _, power = text.lower().partition("e")
            if not mantissa.strip("-0."):
                dec = Decimal(0)
            elif power.startswith("-"):
                raise MoneyError(f"{currency} has {exp} decimal places; {text} has more", field=field) from None
            else:
                raise MoneyError(f"{field} {text} is too large", field=field) from None
        if _places(dec) > exp:
            raise MoneyError(f"{currency} has {exp} decimal places; {text} has more", field=field)
        if abs(dec) >= Decimal(MAX_MINOR).scaleb(-exp):
            raise MoneyError(f"{field} {text} is too large", field=field)
        return cls(int(dec.scaleb(exp)), currency)

    @classmethod
    def from_api(cls, value: object, currency: str, field: str = "amount") -> Money:
        """An API amount in major units: int, a JSON number (admin_api.validation.parse_json reads it as a
        JsonNumber: its text, exactly), integral float from JSON, or decimal string."""
        if isinstance(value, float) and not isinstance(value, JsonNumber):
            if not math.isfinite(value):
                raise MoneyError(f"{field} must be a finite number", field=field)
            if not value.is_integer():
                return cls.parse(JsonNumber(repr(value)), currency, field)
            value = int(value)
        if not isinstance(value, int | str | Decimal | JsonNumber) or isinstance(value, bool):
            raise MoneyError(f"{field} must be a number", field=field)
        return cls.parse(value, currency, field)

    def major(self) -> Decimal:
        return Decimal(self.minor).scaleb(-exponent(self.currency))

    def to_api(self) -> int | str:
        """Major units for JSON: an int when the currency has no minor unit, else a decimal string."""
        return total_to_api(self.minor, self.currency)

    def format(self, language: str | None = None) -> str:
        """Human form with thousands separators: '50,000 RWF', '1,234.50 KES', the code first where its people
        write it so (CODE_FIRST: 'GHS 1,234.50'); as `language` writes numbers (NUMBER_MARKS): in French
        '50 000 RWF', '1 234,50 KES'."""
        number = self.number(language)
        return f"{self.currency} {number}" if self.currency in CODE_FIRST else f"{number} {self.currency}"

    def number(self, language: str | None = None) -> str:
        """The number alone, as format() writes it ('1,234.50'; French '1 234,50'): an example of what to type."""
        exp = exponent(self.currency)
        number = f"{self.major():,.{exp}f}"
        marks = NUMBER_MARKS.get(language or "")
        if marks is not None:
            table: dict[str, str | int | None] = {",": marks[0], ".": marks[1]}
            number = number.translate(str.maketrans(table))
        return number

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
