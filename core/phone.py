"""Phone numbers: E.164 normalisation, operator detection by number range (phonenumbers' carrier data, then a
table), masking."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType, carrier

from core.errors import ValidationError

DEFAULT_REGION = "RW"

# Operator by E.164 prefix (country code + national prefix), for ranges phonenumbers' carrier data names no
# operator for (operator_of asks it first). Longest prefix wins.
# Sources: the national numbering plans of RURA, CA Kenya, UCC, TCRA, NCA.
_OPERATOR_PREFIXES: dict[str, str] = {
    # Rwanda
    "25078": "MTN", "25079": "MTN", "25072": "AIRTEL", "25073": "AIRTEL",
    # Kenya
    "25470": "SAFARICOM", "254710": "SAFARICOM", "254711": "SAFARICOM", "254712": "SAFARICOM",
    "254713": "SAFARICOM", "254714": "SAFARICOM", "254715": "SAFARICOM", "254716": "SAFARICOM",
    "254717": "SAFARICOM", "254718": "SAFARICOM", "254719": "SAFARICOM", "254720": "SAFARICOM",
    "254721": "SAFARICOM", "254722": "SAFARICOM", "254723": "SAFARICOM", "254724": "SAFARICOM",
    "254725": "SAFARICOM", "254726": "SAFARICOM", "254727": "SAFARICOM", "254728": "SAFARICOM",
    "254729": "SAFARICOM", "254740": "SAFARICOM", "254741": "SAFARICOM", "254742": "SAFARICOM",
    "254743": "SAFARICOM", "254745": "SAFARICOM", "254746": "SAFARICOM", "254748": "SAFARICOM",
    "254757": "SAFARICOM", "254758": "SAFARICOM", "254759": "SAFARICOM", "254768": "SAFARICOM",
    "254769": "SAFARICOM", "25479": "SAFARICOM", "254110": "SAFARICOM", "254111": "SAFARICOM",
    "25473": "AIRTEL", "254750": "AIRTEL", "254751": "AIRTEL", "254752": "AIRTEL",
    "254753": "AIRTEL", "254754": "AIRTEL", "254755": "AIRTEL", "254756": "AIRTEL",
    "25478": "AIRTEL", "254100": "AIRTEL", "254101": "AIRTEL", "254102": "AIRTEL",
    # Uganda
    "25677": "MTN", "25678": "MTN", "25676": "MTN", "25639": "MTN", "25670": "AIRTEL",
    "25675": "AIRTEL", "25674": "AIRTEL",
    # Tanzania
    "25568": "AIRTEL", "25569": "AIRTEL", "25578": "AIRTEL", "25574": "VODACOM",
    "25575": "VODACOM", "25576": "VODACOM",
    # Ghana
    "23324": "MTN", "23354": "MTN", "23355": "MTN", "23359": "MTN", "23320": "TELECEL",
    "23350": "TELECEL", "23326": "AIRTELTIGO", "23356": "AIRTELTIGO", "23327": "AIRTELTIGO",
    "23357": "AIRTELTIGO",
    # Zambia
    "26096": "MTN", "26076": "MTN", "26097": "AIRTEL", "26077": "AIRTEL",
}
_MAX_PREFIX = max(len(p) for p in _OPERATOR_PREFIXES)
_DIGITS = re.compile(r"[\s\-().]")
# 2.50788E+11: a spreadsheet showed a number too wide for its column in scientific notation and saved it so (Excel's
# CSV writes what the cell shows). Read as digits it is 25078811 or 2507881234 (the "." and "E" stripped or
# refused): the number's last digits are gone, and only the sheet's owner can put them back.
_SCIENTIFIC = re.compile(r"[+]?\d[.,]?\d*[eE][+]?\d+")
SCIENTIFIC = ("written in scientific notation (as 2.50788E+11), which lost the number's last digits: format the "
              "phone column as Text in the spreadsheet, type the numbers again and save it again")
# A letter among a number's digits: phonenumbers reads it as a phone keypad's (1-800-FLOWERS), so a letter O typed
# for a zero (0788OOO456) was another person's number (+250788666456). Words before the number (tel:, "Tel: ")
# are read past, as phonenumbers does.
_LETTER = re.compile(r"[A-Za-z]")
_FIRST_DIGIT = re.compile(r"\d")
LETTERS = "has a letter among its digits (an O typed for a 0?): type the number in digits only"


class PhoneError(ValidationError):
    """A value that is not a valid mobile number."""


@dataclass(frozen=True, slots=True)
class Phone:
    e164: str  # "+250788000001"

    @property
    def digits(self) -> str:
        return self.e164[1:]

    @property
    def region(self) -> str:
        return region_of(self.e164)

    @property
    def national(self) -> str:
        """National significant number with the trunk 0: '0788000001'."""
        parsed = phonenumbers.parse(self.e164)
        return "0" + str(parsed.national_number)

    @property
    def national_significant(self) -> str:
        return str(phonenumbers.parse(self.e164).national_number)

    @property
    def operator(self) -> str | None:
        return operator_of(self.e164)

    def masked(self) -> str:
        return mask(self.e164)

    def __str__(self) -> str:
        return self.e164

    def __repr__(self) -> str:
        return f"Phone({self.masked()})"


def normalize(raw: str, region: str = DEFAULT_REGION) -> Phone:
    """Parse a number in any common form into E.164, refusing non-mobile or invalid ones."""
    if not isinstance(raw, str) or not raw.strip():
        raise PhoneError("phone number is required", field="phone")
    return _normalize(raw, region)


# Parsing with phonenumbers costs about half a millisecond, and every USSD hop parses the caller's
# number again: remember recent answers (a refusal raises, so only valid numbers are kept).
@functools.lru_cache(maxsize=10_000)
def _normalize(raw: str, region: str) -> Phone:
    if _SCIENTIFIC.fullmatch(raw.strip()):
        raise PhoneError(SCIENTIFIC, field="phone")
    text = _DIGITS.sub("", raw.strip())
    first = _FIRST_DIGIT.search(text)
    if first is not None and _LETTER.search(text, first.start()):
        raise PhoneError(LETTERS, field="phone")
    if len(text) > 20:
        raise PhoneError("phone number is too long", field="phone")
    text = _international(text)
    try:
        parsed = phonenumbers.parse(text, region)
    except NumberParseException:
        raise PhoneError("not a phone number", field="phone") from None
    if not phonenumbers.is_valid_number(parsed):
        local = not text.startswith("+") and bool(region)
        _refuse_length(parsed, local=local)
        if local:
            # 0701234567, a Ugandan tenant's number typed into a Rwandan cooperative's list without +256: no
            # Rwandan number. (One in a range Rwanda's plan also has, 0772..., reads as Rwandan and is taken.)
            raise PhoneError(f"not a valid phone number of {region} ({_FOREIGN})", field="phone")
        raise PhoneError("not a valid phone number", field="phone")
    kind = phonenumbers.number_type(parsed)
    if kind not in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE):
        raise PhoneError("not a mobile phone number", field="phone")
    return Phone(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


_LENGTH = {phonenumbers.ValidationResult.TOO_SHORT: "too short", phonenumbers.ValidationResult.TOO_LONG: "too long"}


# The examples are shapes (+256 7XX XXX XXX), never whole numbers: these words reach logs (a USSD callback's
# malformed phoneNumber is logged with them), where a whole number, even a made-up one, reads as a member's.
_FOREIGN = "a number of another country is written with + and its country code, as +256 7XX XXX XXX"


def _shape(formatted: str, keep: int) -> str:
    """`formatted` (a number as its country writes it) with every digit after the first `keep` an X."""
    digits = 0
    out = []
    for ch in formatted:
        if ch.isdigit():
            digits += 1
            ch = ch if digits <= keep else "X"
        out.append(ch)
    return "".join(out)


def _refuse_length(parsed: phonenumbers.PhoneNumber, *, local: bool) -> None:
    """A mobile number of its country with a digit left out or one too many (078812345, 07881234567) is refused
    saying so: "not a valid phone number of RW (a number of another country is written with +...)" sent a clerk
    looking for a country code where a digit was missing. Typed `local`ly (no +), it may as well be another
    country's number of another length (a Burundian 79123456, eight digits, in a Rwandan list; a Nigerian
    08031234567): that is said too, or the clerk told "too short" adds a digit and registers someone else's number."""
    said = _LENGTH.get(phonenumbers.is_possible_number_for_type_with_reason(parsed, PhoneNumberType.MOBILE))
    country = phonenumbers.region_code_for_country_code(parsed.country_code or 0)
    example = phonenumbers.example_number_for_type(country, PhoneNumberType.MOBILE)
    if said is None or example is None:
        return
    national = _shape(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL), 2)
    international = _shape(phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
                           len(str(example.country_code)) + 1)
    raise PhoneError(f"{said} for a mobile number of {country}: one is written as {national} or {international}"
                     + (f"; {_FOREIGN}" if local else ""), field="phone")


_COUNTRY_PREFIXES = {"250", "254", "256", "255", "233", "260", "257", "265", "234", "27"}


def _international(text: str) -> str:
    """Digits as typed -> '+' and the country code when they carry one (00254..., or 254... long enough for it)."""
    if text.startswith("00"):
        return "+" + text[2:]
    # South Africa's code is two digits: 27821234567 is +27 82 123 4567.
    if not text.startswith("+") and len(text) >= 11 and _COUNTRY_PREFIXES & {text[:2], text[:3]}:
        return "+" + text
    return text


def has_country_code(raw: str) -> bool:
    """Whether `raw` says its own country (+254..., 00254..., 254..., tel:+254...), as `normalize` reads it: a number
    in local form (0712345678) is a number of whichever country the reader's region names."""
    text = _international(_DIGITS.sub("", (raw or "").strip()))
    if text.startswith("+"):
        return True
    try:
        # Read without a region, phonenumbers takes only a number that names its country (a tel: URI's +254...).
        phonenumbers.parse(text, None)
    except NumberParseException:
        return False
    return True


# phonenumbers' carrier names -> our operator codes. Ghana's "at" (formerly AirtelTigo) is not Airtel.
_CARRIER_OPERATOR = {"mtn": "MTN", "airtel": "AIRTEL", "safaricom": "SAFARICOM", "telecel": "TELECEL",
                     "at": "AIRTELTIGO", "airteltigo": "AIRTELTIGO", "vodacom": "VODACOM"}


@functools.lru_cache(maxsize=10_000)
def operator_of(e164: str) -> str | None:
    """The operator a number range was allocated to (a ported number keeps its first operator's range).

    phonenumbers' carrier data first (offline, and updated with the library: Safaricom 0110-0115, Airtel Kenya
    0762, MTN Ghana 053 ...), then the table above for a range it has no name for. Another operator than ours
    comes back under its own name ("TELKOM", "AIRTELTIGO"): known, and not one a method collects from.
    None: nobody knows this range."""
    try:
        name = carrier.name_for_number(phonenumbers.parse(e164), "en")
    except NumberParseException:
        name = ""
    if name:
        key = re.sub(r"[^a-z0-9]", "", name.lower())
        return _CARRIER_OPERATOR.get(key) or re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    digits = e164.lstrip("+")
    for size in range(min(_MAX_PREFIX, len(digits)), 2, -1):
        op = _OPERATOR_PREFIXES.get(digits[:size])
        if op:
            return op
    return None


# The network a number's subscriber is on now, as a USSD hop names it (mobile number portability: a number ported
# from Telecel to MTN keeps its Telecel range, and operator_of names the range's first operator). By its MCC-MNC:
# each code is one country's, and counts only for a number of that country.
# Sources: ITU-T E.212 list of mobile network codes; the networks merged since answer as the operator that runs them
# now (Tigo Rwanda and Warid Uganda as Airtel, yu as Airtel Kenya, Airtel and Tigo Ghana as AT).
_NETWORK_CODES: dict[str, tuple[str, str]] = {
    # Rwanda
    "63510": ("RW", "MTN"), "63513": ("RW", "AIRTEL"), "63514": ("RW", "AIRTEL"),
    # Kenya
    "63902": ("KE", "SAFARICOM"), "63903": ("KE", "AIRTEL"), "63905": ("KE", "AIRTEL"), "63907": ("KE", "TELKOM"),
    # Uganda
    "64101": ("UG", "AIRTEL"), "64110": ("UG", "MTN"), "64122": ("UG", "AIRTEL"), "64111": ("UG", "UTL"),
    "64114": ("UG", "AFRICELL"),
    # Tanzania
    "64002": ("TZ", "YAS"), "64003": ("TZ", "ZANTEL"), "64004": ("TZ", "VODACOM"), "64005": ("TZ", "AIRTEL"),
    "64007": ("TZ", "TTCL"), "64009": ("TZ", "HALOTEL"),
    # Ghana
    "62001": ("GH", "MTN"), "62002": ("GH", "TELECEL"), "62003": ("GH", "AIRTELTIGO"), "62006": ("GH", "AIRTELTIGO"),
    "62007": ("GH", "GLO"),
    # Zambia
    "64501": ("ZM", "AIRTEL"), "64502": ("ZM", "MTN"), "64503": ("ZM", "ZAMTEL"),
}
# By the network's name ("mtn", "VODAFONE", "AirtelTigo"), per country: a name counts only for a number of a
# country it is listed for (only Ghana's aggregators send names). Vodafone Ghana is Telecel now; Airtel and Tigo Ghana
# became AirtelTigo, now AT: neither is Airtel's wallet.
_NETWORK_NAMES: dict[str, dict[str, str]] = {
    "GH": {"mtn": "MTN", "mtnghana": "MTN", "vodafone": "TELECEL", "voda": "TELECEL", "telecel": "TELECEL",
           "airteltigo": "AIRTELTIGO", "at": "AIRTELTIGO", "tigo": "AIRTELTIGO", "airtel": "AIRTELTIGO",
           "glo": "GLO", "globacom": "GLO"},
}

# The country a network name may end with, per country of _NETWORK_NAMES (its name, then its ISO code).
_COUNTRY_SUFFIX = {"GH": re.compile(r"(?:ghana|gh)$")}


def operator_on_network(network: str | None, e164: str) -> str | None:
    """The operator `network` (an MCC-MNC or a network's name, as a USSD hop reports the number `e164` on now) is,
    when it is one we know for the number's country; None for a missing, unknown or other country's value (the
    caller then reads the range: operator_of). Never a reason to collect from another number: it only names the
    network of the number that dialled."""
    if not network:
        return None
    key = re.sub(r"[^a-z0-9]", "", network.lower())
    region = region_of(e164)
    if key.isdigit():
        found = _NETWORK_CODES.get(key)
        return found[1] if found is not None and found[0] == region else None
    names = _NETWORK_NAMES.get(region, {})
    # A name may carry its country ("mtn-gh", as Hubtel's channel names write them; "Telecel Ghana"): read without it.
    suffix = _COUNTRY_SUFFIX.get(region)
    return names.get(key) or (names.get(suffix.sub("", key)) if suffix else None)


def network_code_of(e164: str) -> str:
    """The MCC-MNC Africa's Talking would send for `e164` still on its range's operator (an unported number): what
    the simulators send as networkCode. "" when no code is known for that operator."""
    found = (region_of(e164), operator_of(e164))
    return next((code for code, known in _NETWORK_CODES.items() if known == found), "")


@functools.lru_cache(maxsize=10_000)
def region_of(e164: str) -> str:
    """The country (ISO code) a number belongs to, "" when none: a parse each time cost about 40 us, and a USSD pay
    session asks it twice (the methods offered, then the payment's account check)."""
    return phonenumbers.region_code_for_number(phonenumbers.parse(e164)) or ""


def mask(e164: str) -> str:
    """'+250788000456' -> '+25078****456': country and operator prefix, last three digits."""
    if not e164:
        return ""
    head = 6 if e164.startswith("+") else 5
    if len(e164) <= head + 3:
        return "*" * len(e164)
    return e164[:head] + "*" * (len(e164) - head - 3) + e164[-3:]
