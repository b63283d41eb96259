"""Request checking: bounded body reads, JSON Schema validation naming every bad field, query params."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

import fastjsonschema
from aiohttp import web
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError as SchemaError

from admin_api.errors import ApiError
from core.errors import ValidationError
from core.inbound import unreadable
from core.money import JsonNumber
from core.text import NOT_ALLOWED, is_uuid

_FORMATS = FormatChecker()
# An id is a UUID in the form the gateway writes them (core.text.is_uuid: hyphenated, nothing before or after).
# jsonschema's own "uuid" check takes Python's UUID() forms too: "<uuid>}" or "<uuid>-" passed it and then
# could only be not found, or failed to fit the 36-character column.
_FORMATS.checks("uuid")(lambda instance: not isinstance(instance, str) or is_uuid(instance))
# Marks an id field that is not `format: uuid` (a malformed one is answered not found, 404, by its route rather
# than refused by the shape check): normalised lower-cases it as it does a `format: uuid` one.
ID_KEYWORD = "x-gateway-id"


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read at most `limit` bytes; 413 as soon as the declared or actual size is over it, 400 when the body
    cannot be decoded (a Content-Encoding its bytes do not follow)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is larger than {limit} bytes")
            chunks.append(chunk)
    except web.RequestPayloadError as exc:
        raise ApiError(400, unreadable(request, exc)) from None
    return b"".join(chunks)


def _not_json(name: str) -> Any:
    """NaN, Infinity and -Infinity: Python's parser takes them, JSON (RFC 8259) has no such numbers, and no amount,
    count or day can be one; refused here as any other text that is not JSON, naming it."""
    raise ValidationError(f"body is not valid JSON: {name} is not a JSON value (JSON numbers are finite)")


# json.loads with parse_float or parse_constant builds a new decoder (and its scanner) on every call: about two thirds
# of a payment body's parse (9 of 13 us). One decoder is built once and reused; decode keeps no state between calls.
_DECODER = json.JSONDecoder(parse_float=JsonNumber, parse_constant=_not_json)


def parse_json(raw: bytes, request: web.Request) -> Any:
    """The body as JSON. A number with a fraction or an exponent is read as a JsonNumber: a float that keeps the
    text it was written as, from which an amount is read exactly (core.money.Money.from_api). Decoded as json.loads
    decodes bytes (UTF-8, 16 or 32 by its first bytes, a UTF-8 BOM dropped), then by the one decoder."""
    ctype = request.content_type
    if raw and ctype not in ("application/json", "") and not ctype.endswith("+json"):
        raise ApiError(415, "Content-Type must be application/json")
    if not raw.strip():
        return {}
    try:
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("body is not valid JSON") from None
    except RecursionError:  # "[[[[..." a few thousand deep: Python's parser gives up, no request nests so
        raise ValidationError("body is nested too deeply") from None


# A request field's pattern in words: "shortCode has an invalid format" did not say that "KAMPALA SACCO"'s space was
# the fault, nor what a code may hold (the words core.cooperatives uses for the same rules).
PATTERN_WORDS = {
    "^[A-Za-z0-9_-]{2,32}$": "must be 2 to 32 letters, digits, '-' or '_'",
    "^[0-9]{1,8}$": "must be 1 to 8 digits",
}


# A field a client sends by habit where the gateway takes none, and why (said after "should not exist" on a body
# with an amount): money is amount + currency, but an amount here is always in the currency of what it pays or
# gives back, so `"currency": "RWF"` on a refund was refused without saying that the amount alone is wanted.
_AMOUNTS = {"amount", "refundAmount"}
_EXTRA_HINTS = {"currency": ": the amount is in the currency its payment type (or payment) has, which a request "
                            "does not change; send the amount alone"}
# A schema's own hints for the properties it refuses, instead of _EXTRA_HINTS ({name: text after "should not
# exist"}): a payment type's PATCH takes an amount but its currency is no field of it to change, not one to leave out.
HINTS_KEYWORD = "x-gateway-refused"


def _where(error: SchemaError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "body"


def _describe(error: SchemaError) -> list[str]:
    where = _where(error)
    instance = error.instance
    value = error.validator_value
    match error.validator:
        case "required":
            return [
                f"{name} is required" if where == "body" else f"{where}.{name} is required"
                for name in value
                if isinstance(instance, dict) and name not in instance
            ]
        case "additionalProperties":
            allowed = set(error.schema.get("properties", {}))
            # A name with characters that are not allowed is refused without being repeated back (_bad_text).
            extra = sorted(k for k in instance if k not in allowed and not NOT_ALLOWED.search(k)) \
                if isinstance(instance, dict) else []
            prefix = "" if where == "body" else f"{where}."
            hints = error.schema.get(HINTS_KEYWORD, _EXTRA_HINTS if allowed & _AMOUNTS else {})
            return [f"property {prefix}{name} should not exist{hints.get(name, '')}" for name in extra]
        case "type":
            kinds = value if isinstance(value, list) else [value]
            readable = " or ".join(
                f"an {k}" if k in ("integer", "array", "object") else f"a {k}" for k in kinds if k != "null"
            )
            return [f"{where} must be {readable}"]
        case "enum":
            return [f"{where} must be one of: {', '.join(str(v) for v in value)}"]
        case "minLength":
            return [
                f"{where} must be at least {value} characters" if value > 1 else f"{where} must not be empty"
            ]
        case "maxLength":
            return [f"{where} must be at most {value} characters"]
        case "minimum":
            return [f"{where} must not be less than {value}"]
        case "exclusiveMinimum":
            return [f"{where} must be greater than {value}"]
        case "maximum":
            return [f"{where} must not be greater than {value}"]
        case "format":
            return [f"{where} must be a valid {value}"]
        case "pattern":
            return [f"{where} {PATTERN_WORDS.get(value, 'has an invalid format')}"]
        case "minItems":
            return [f"{where} must contain at least {value} item{'s' if value != 1 else ''}"]
        case "maxItems":
            return [f"{where} must contain at most {value} item{'s' if value != 1 else ''}"]
        case "uniqueItems":
            return [f"{where} must not contain duplicates"]
        case "minProperties":
            return ["body must contain at least one field" if where == "body" else f"{where} is empty"]
        case _:
            return [f"{where}: {error.message}"]


_VALIDATORS: dict[int, Draft202012Validator] = {}


def validator_for(schema: Mapping[str, Any]) -> Draft202012Validator:
    key = id(schema)
    found = _VALIDATORS.get(key)
    if found is None:
        found = _VALIDATORS[key] = Draft202012Validator(schema, format_checker=_FORMATS)
    return found


class _Formats(dict[str, Callable[[Any], bool]]):
    """fastjsonschema's format checks: jsonschema's own (_FORMATS) for every name, so both read a format alike; a
    name _FORMATS does not know ("date-time": its checker needs a package not installed) passes in both, and the
    handler reads the value."""

    def __missing__(self, name: str) -> Callable[[Any], bool]:
        return self.setdefault(name, lambda value: _FORMATS.conforms(value, name))

    def __contains__(self, name: object) -> bool:
        return True


_FAST: dict[int, Callable[[Any], Any] | None] = {}
_MISSING: Any = object()


def _fast_valid(instance: Any, schema: Mapping[str, Any]) -> bool:
    """Whether `instance` is valid by a check fastjsonschema compiled to Python code from `schema` (about a tenth of
    jsonschema's time: a payment's body 3 against 25 us). Only a True is taken: anything else (invalid, or a schema
    or a value it cannot read) goes to jsonschema, which names every error as before. That it never passes what
    jsonschema refuses is checked for every route's schema (tests/admin_api/test_fast_validation.py)."""
    key = id(schema)
    check: Any = _FAST.get(key, _MISSING)
    if check is _MISSING:
        try:
            # use_default=False: the check must not write a schema's defaults into the body.
            check = fastjsonschema.compile(dict(schema), formats=_Formats(), use_default=False, use_formats=True)
        except Exception:  # a keyword it does not compile: jsonschema alone, as before
            check = None
        _FAST[key] = check
    if check is None:
        return False
    try:
        check(instance)
    except Exception:  # JsonSchemaValueException, or a value its code did not expect: jsonschema decides
        return False
    return True


def _bad_text(value: Any, where: str) -> list[tuple[str, str | None]]:
    """NUL, other control characters and lone surrogates: no database column or SMS can hold them. Each message
    with the body's field it is about (None: the body's own, a field name that cannot be repeated back)."""
    if isinstance(value, str):
        return [(f"{where} contains characters that are not allowed", _top(where))] \
            if NOT_ALLOWED.search(value) else []
    if isinstance(value, dict):
        found: list[tuple[str, str | None]] = []
        for key, item in value.items():
            if isinstance(key, str) and NOT_ALLOWED.search(key):
                found.append(("body has a field name with characters that are not allowed", None))
                continue
            found += _bad_text(item, key if where == "body" else f"{where}.{key}")
        return found
    if isinstance(value, list):
        return [m for i, item in enumerate(value) for m in _bad_text(item, f"{where}.{i}")]
    return []


def _top(where: str) -> str | None:
    """The body's field a path names ("returnedByProvider.completedAt": returnedByProvider; "body": none)."""
    return None if where == "body" else where.split(".", 1)[0]


def _fields_of(error: SchemaError) -> set[str | None]:
    """The body's fields a schema error is about, as _describe words it: a missing field, each field not allowed,
    or the field its path starts with; None for the body itself (not an object, no field at all)."""
    if error.absolute_path:
        return {str(error.absolute_path[0])}
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        return {name for name in error.validator_value if name not in instance}
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = set(error.schema.get("properties", {}))
        return {k if not NOT_ALLOWED.search(k) else None for k in instance if k not in allowed}
    return {None}


def _one_field(about: AbstractSet[str | None]) -> str | None:
    """The field a refusal names in `field`: the one every message is about (none when they are about several, or
    one about none: README "API errors"). The error answer keeps it only when the route takes such a field."""
    return next(iter(about)) if len(about) == 1 else None


def validate(instance: Any, schema: Mapping[str, Any]) -> None:
    """Raise a ValidationError whose message list names every bad field, not just the first; `field` when they
    are all about one (`"dueDate": ""`, a missing idempotencyKey), as a refusal by the handler names it."""
    bad = _bad_text(instance, "body")
    messages = [text for text, _ in bad]
    about = {field for _, field in bad}
    if messages or not _fast_valid(instance, schema):
        for error in sorted(validator_for(schema).iter_errors(instance), key=lambda e: list(e.absolute_path)):
            texts = [text for text in _describe(error) if text not in messages]
            if texts:
                messages += texts
                about |= _fields_of(error)
    if messages:
        raise ValidationError(messages[0], errors=messages, field=_one_field(about))
    found = normalised(instance, schema, "body")
    if found:
        # Each is "<path> must be an integer", its path starting with the body's field.
        field = _one_field({_top(text.split(" ", 1)[0]) for text in found})
        raise ValidationError(found[0], errors=found, field=field)


def _whole(schema: Mapping[str, Any]) -> bool:
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    return "integer" in kinds and "number" not in kinds


def normalised(instance: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    """A checked body put in the form the gateway reads, in place, in one walk by its schema; the errors of its
    whole-number fields that are not whole.

    Whole numbers: JSON Schema counts 5.0 as an integer, so `"dueDay": 5.0` (or 5e0) passed the shape check as a
    float, was stored as 5 and echoed back as 5.0; and 31.000000000000001, which rounds to the float 31.0, passed as
    31. Read as an amount is (core.money.Money.from_api: "50000.00" is 50000, "50000.5" in RWF refused), from the
    text it was written as: a whole number written with a fraction or an exponent is that int, any other is
    refused as a fraction is.

    Ids: UUIDs compare case-insensitively (RFC 4122 section 3): a client that writes them in upper case (.NET's
    Guid.ToString("D").ToUpper(), some spreadsheets) named a payment type, member or callback that exists, and
    was answered not found. Paths and query parameters are lower-cased where they are read (check_path_id,
    parse_query); a body by its schema here: each string declared `format: uuid` or ID_KEYWORD that holds a
    UUID. Nothing else is touched: an idempotency key or a provider's transaction id may look like a UUID and is
    compared as sent."""
    if isinstance(instance, dict):
        fields = [(name, sub, name if where == "body" else f"{where}.{name}")
                  for name, sub in schema.get("properties", {}).items() if name in instance]
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        fields = [(i, schema["items"], f"{where}.{i}") for i in range(len(instance))]
    else:
        return []
    found: list[str] = []
    for key, sub, at in fields:
        value = instance[key]
        if isinstance(value, str):
            if (sub.get("format") == "uuid" or sub.get(ID_KEYWORD)) and is_uuid(value):
                instance[key] = value.lower()
        elif isinstance(value, float) and _whole(sub):
            whole = _as_int(value)
            if whole is None:
                found.append(f"{at} must be an integer")
            else:
                instance[key] = whole
        else:
            found += normalised(value, sub, at)
    return found


def _as_int(value: float) -> int | None:
    """The int a JSON number writes (its text, for a JsonNumber), None when it writes a fraction."""
    try:
        exact = Decimal(value.text if isinstance(value, JsonNumber) else repr(value))
    except InvalidOperation:
        return None
    return int(exact) if exact.is_finite() and exact == exact.to_integral_value() else None


# --- query parameters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query parameter: its type for parsing and for the OpenAPI document."""

    type: str = "string"  # string | integer | boolean | date-time | date | uuid
    description: str = ""
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] | None = None
    max_length: int = 200
    required: bool = False  # 400 when left out (the OpenAPI document says so)
    # 400 when given empty: an exact search whose empty value would list nothing (or, read as "no filter", all), as
    # if the reference or account typed had no payment.
    nonempty: bool = False

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any]
        if self.type == "date-time":
            schema = {"type": "string", "format": "date-time"}
        elif self.type == "date":
            schema = {"type": "string", "format": "date"}
        elif self.type == "uuid":
            schema = {"type": "string", "format": "uuid"}
        else:
            schema = {"type": self.type}
        if self.enum:
            schema["enum"] = list(self.enum)
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.default is not None:
            schema["default"] = self.default
        if self.nonempty:
            schema["minLength"] = 1
        return schema


def period_params(moment: str = "") -> dict[str, Param]:
    """`from` and `to` as every route that takes a period reads them (admin_api.routing._period)."""
    of = f" ({moment})" if moment else ""
    return {
        "from": Param("date-time", f"Start of the period{of}, inclusive. A date alone is midnight in the "
                      "cooperative's time zone; a date-time without an offset is UTC"),
        "to": Param("date-time", f"End of the period{of}, exclusive; as `from`"),
        # Applied as a filter by each route (admin_api.reports._scope and the lists); routing._period reads its
        # time zone for bare dates.
        "cooperativeId": Param("uuid", "Super admin: one cooperative (bare dates are then its local days)"),
    }


PAGE = Param("integer", "Page number", 1, minimum=1, maximum=100000)
LIMIT = Param("integer", "Items per page (max 100)", 10, minimum=1, maximum=100)


class DateOutOfRange(ValueError):
    """A well-formed date-time whose instant, moved to UTC, is before year 1 or after year 9999."""

    RANGE = "between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z"


# RFC 3339's forms (and a bare date): Python's fromisoformat also takes 20261101 and 2026-W44-7, which the
# period check (a bare date is a local day) would not recognise as dates and would read as UTC midnight.
# An un-encoded "+" of the offset arrives as a space.
# Any number of fraction digits (.NET's round-trip format writes 7, Go's RFC3339Nano up to 9): past the
# microsecond they are dropped.
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}([Tt]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+\- ]\d{2}:?\d{2})?)?")


def parse_datetime(text: str) -> datetime:
    """An ISO 8601 date-time in UTC (no offset: UTC); ValueError for anything else, DateOutOfRange for one
    that UTC cannot hold (9999-12-31T23:59:59-01:00 is in year 10000 there)."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"not an RFC 3339 date or date-time: {text!r}")
    value = datetime.fromisoformat(text.upper().replace("Z", "+00:00").replace(" ", "+"))
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise DateOutOfRange(text) from None


def body_datetime(text: str, field: str) -> datetime:
    """A date-time given in a JSON body (RFC 3339; without an offset, UTC), or a 400 naming the field."""
    try:
        return parse_datetime(text.strip())
    except DateOutOfRange:
        raise ValidationError(f"{field} must be a date-time {DateOutOfRange.RANGE}", field=field) from None
    except ValueError:
        raise ValidationError(f"{field} must be a valid date-time", field=field) from None


_OFFSET = re.compile(r"([Zz]|[+\- ]\d{2}:?\d{2})$")


def statement_time(text: str | None, zone: tzinfo, field: str = "completedAt") -> datetime | None:
    """A time an admin reads on a provider's statement (`completedAt` of an outcome; None: not given). Statements
    show local time: one written without an offset is the cooperative's (`zone`), as bare period dates are (read
    as UTC, 23:30 on the 31st in Kigali was counted in the next month)."""
    if text is None:
        return None
    moment = body_datetime(text, field)
    stripped = text.strip()
    if "T" in stripped.upper() and _OFFSET.search(stripped):
        return moment
    # No offset (or a bare date: midnight): the same wall-clock time in the cooperative's zone.
    try:
        return moment.replace(tzinfo=zone).astimezone(UTC)
    except OverflowError:
        raise ValidationError(f"{field} must be a date-time {DateOutOfRange.RANGE}", field=field) from None


def parse_query(query: Mapping[str, str], params: Mapping[str, Param],
                elsewhere: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Typed values for every declared parameter; unknown or bad parameters are all reported. `elsewhere`: for a
    parameter the route does not take but a caller may look for here, where to go instead (said in its refusal)."""
    errors: list[str] = []
    about: set[str] = set()  # the parameters refused: `field` when it is one (as validate's)

    def refuse(name: str, text: str) -> None:
        errors.append(text)
        about.add(name)

    values: dict[str, Any] = {name: p.default for name, p in params.items()}
    for name in dict.fromkeys(query):
        if name not in params:
            hint = (elsewhere or {}).get(name)
            refuse(name, f"query parameter {name} is not allowed" + (f": {hint}" if hint else ""))
        elif len(getattr(query, "getall", lambda _: [None])(name)) > 1:
            # Read as its first value, `status=PENDING&status=PROCESSING` answered half of what was asked.
            refuse(name, f"query parameter {name} is given more than once")
    for name, param in params.items():
        raw = query.get(name)
        if raw is None:
            if param.required:
                refuse(name, f"query parameter {name} is required")
            continue
        raw = raw.strip()
        if NOT_ALLOWED.search(raw):
            refuse(name, f"{name} contains characters that are not allowed")
            continue
        if len(raw) > param.max_length:
            refuse(name, f"{name} is too long")
            continue
        if param.nonempty and not raw:
            refuse(name, f"{name} must not be empty")
            continue
        try:
            if param.type == "integer":
                number = int(raw)
                if param.minimum is not None and number < param.minimum:
                    refuse(name, f"{name} must not be less than {param.minimum}")
                    continue
                if param.maximum is not None and number > param.maximum:
                    refuse(name, f"{name} must not be greater than {param.maximum}")
                    continue
                values[name] = number
            elif param.type == "boolean":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                values[name] = raw.lower() in ("true", "1")
            elif param.type == "date-time":
                try:
                    values[name] = parse_datetime(raw)
                except DateOutOfRange:
                    refuse(name, f"{name} must be a date-time {DateOutOfRange.RANGE}")
                    continue
            elif param.type == "date":
                if not _DATE.fullmatch(raw):
                    raise ValueError
                values[name] = date.fromisoformat(raw)
            elif param.type == "uuid":
                if not is_uuid(raw):
                    raise ValueError
                values[name] = raw.lower()
            else:
                if param.enum and raw not in param.enum:
                    refuse(name, f"{name} must be one of: {', '.join(param.enum)}")
                    continue
                values[name] = raw
        except ValueError:
            kind = {
                "integer": "an integer",
                "boolean": "true or false",
                # What parse_datetime takes, by example: "an ISO 8601 date-time" refused 20261101 (ISO's basic
                # form) in the same words, and did not say that the documented bare date is taken.
                "date-time": "a date (YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm:ssZ)",
                "date": "a date (YYYY-MM-DD)",
                "uuid": "a UUID",
            }.get(param.type, "valid")
            refuse(name, f"{name} must be {kind}")
    if errors:
        raise ValidationError(errors[0], errors=errors, field=_one_field(about))
    return values


def check_path_id(value: str, name: str = "id") -> str:
    """Ids are UUIDs; anything else cannot exist, so it is a 404 rather than a database error."""
    if not is_uuid(value):
        from core.errors import NotFound

        raise NotFound(f"{name} not found")
    return value.lower()


# The idempotency keys the gateway gives its own requests, by prefix: a USSD payment's (channels.ussd.flows:
# ussd:<aggregator>:<session id>) and a dispute's refund (core.disputes: dispute:<dispute id>).
RESERVED_KEY_PREFIXES = {"ussd:": "USSD payments", "dispute:": "refunds of disputes"}


def own_idempotency_key(key: str) -> None:
    """Refuse a client's key that could take one the gateway gives its own requests (keys are unique per cooperative
    for payments, per payment for refunds): the member's USSD payment, or the dispute's resolution with a refund,
    would then be answered with the client's request (a 409 to the officer) instead of made."""
    for prefix, whose in RESERVED_KEY_PREFIXES.items():
        if key.strip().startswith(prefix):
            raise ValidationError(f"idempotencyKey must not start with {prefix!r}: the gateway keys its own {whose} "
                                  "so", field="idempotencyKey")
