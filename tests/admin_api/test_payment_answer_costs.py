"""What an API payment's answer costs in `serve`'s CPU (bench/README.md's forty-eighth round), and that each cut
answers as before: the body read by one JSON decoder built once, a payment's columns read from its state, and the
payment metric's series looked up once."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from admin_api import payments as api_payments
from admin_api.validation import _not_json, parse_json
from core import metrics
from core.errors import ValidationError
from core.models import Payment
from core.money import JsonNumber
from core.payments import _PAYMENT_KEYS, _loaded


class _Request:
    content_type = "application/json"


def _as_before(raw: bytes) -> Any:
    """parse_json's read before the decoder was kept: json.loads with the same hooks, its errors as it said them."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_float=JsonNumber, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("body is not valid JSON") from None
    except RecursionError:
        raise ValidationError("body is nested too deeply") from None


def _plain(value: Any) -> Any:
    """`value` with each JsonNumber as its text and type, and each object's keys in their order: equal only when
    read alike."""
    if isinstance(value, JsonNumber):
        return ("JsonNumber", value.text, float(value))
    if isinstance(value, dict):
        return ("object", [(k, _plain(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("array", [_plain(v) for v in value])
    return (type(value).__name__, value)


def _outcome(read: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "value", _plain(read(raw))
    except ValidationError as exc:
        return "refused", exc.message


def test_a_body_builds_no_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads with parse_float built a decoder and its scanner for every body: two thirds of a payment body's
    parse. The one decoder is built at import."""
    built: list[int] = []
    original = json.JSONDecoder.__init__

    def counted(self: json.JSONDecoder, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(json.JSONDecoder, "__init__", counted)
    body = parse_json(b'{"amount": 50000.00, "idempotencyKey": "k-12345678"}', _Request())  # type: ignore[arg-type]
    assert built == []
    assert body == {"amount": 50000.0, "idempotencyKey": "k-12345678"}
    assert isinstance(body["amount"], JsonNumber) and body["amount"].text == "50000.00"


@pytest.mark.parametrize("raw", [
    b'{"a": 1.50, "b": [1e3, -0.0, 12], "c": "\\u00e9t\\u00e9"}',
    '{"name": "Kigali ☕"}'.encode("utf-16"),  # with its BOM
    '{"name": "Kigali ☕"}'.encode("utf-16-le"),
    '{"name": "Kigali ☕"}'.encode("utf-32"),
    '{"name": "Kigali"}'.encode("utf-8-sig"),  # a UTF-8 BOM is dropped, as json.loads drops it from bytes
    b'{"lone": "\\ud800"}',
    b"[NaN]", b'{"a": Infinity}', b"-Infinity",
    b'{"a": 1', b"\xff\xfe\x00", b"\x00\x00\x00{", b"[" * 100_000,
])
def test_a_body_reads_as_json_loads_read_it(raw: bytes) -> None:
    assert _outcome(lambda r: parse_json(r, _Request()), raw) == _outcome(_as_before, raw)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=12),
       st.sampled_from(["utf-8", "utf-16", "utf-16-be", "utf-32-le"]))
def test_any_json_reads_as_json_loads_read_it(value: Any, encoding: str) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass")
    assert _outcome(lambda r: parse_json(r, _Request()), raw) == _outcome(_as_before, raw)  # type: ignore[arg-type]


def _row(**over: Any) -> dict[str, Any]:
    now = datetime(2026, 12, 7, 17, 30, 12, 345678, tzinfo=UTC)
    values: dict[str, Any] = dict.fromkeys(_PAYMENT_KEYS)
    values.update(id=str(uuid.uuid4()), cooperative_id=str(uuid.uuid4()), payment_type_id=str(uuid.uuid4()),
                  member_id=str(uuid.uuid4()), reference="PAY-20261207-00042", amount_minor=5000, currency="RWF",
                  fee_minor=0, refunded_minor=0, status="PENDING", method="MOBILE_MONEY_AIRTEL", provider="airtel",
                  provider_reference=str(uuid.uuid4()), payment_account_masked="+25073***4567",
                  idempotency_key="key-12345678", description="Water", channel="api", mismatch=False, late=False,
                  expires_at=now + timedelta(minutes=5), next_poll_at=now, created_at=now, updated_at=now)
    values.update(over)
    return values


def _through_attributes(p: Payment) -> dict[str, Any]:
    """present as it was: every column read through the instance's attributes."""
    return api_payments.present(_Partial(p))  # type: ignore[arg-type]


class _Partial:
    """A stand-in whose __dict__ lacks the columns, so _columns reads them through getattr."""

    def __init__(self, payment: Payment) -> None:
        self._payment = payment

    def __getattr__(self, name: str) -> Any:
        return getattr(self._payment, name)


@pytest.mark.parametrize("over", [
    {},
    {"status": "CANCELLED", "payment_url": "https://pay.example/x"},
    {"status": "COMPLETED", "collected_minor": 5000, "completed_at": datetime(2026, 12, 7, 18, tzinfo=UTC),
     "provider_transaction_id": "MP123", "gateway_reference": "GW-9", "fee_minor": 120, "refunded_minor": 1000},
    {"mismatch": True, "mismatch_detail": "another amount", "reviewed_at": datetime(2026, 12, 8, tzinfo=UTC),
     "reviewed_detail": "another amount", "review_note": "checked", "reviewed_by": "admin-1", "late": True},
    {"currency": "KES", "amount_minor": 1250, "due_date": datetime(2026, 12, 31, tzinfo=UTC)},
])
def test_a_payment_presents_from_its_state_as_through_its_attributes(over: dict[str, Any]) -> None:
    payment = _loaded(_row(**over))
    assert api_payments._columns(payment) is payment.__dict__  # every column held: read where they are
    assert api_payments.present(payment) == _through_attributes(payment)


def test_a_payment_missing_columns_presents_through_its_attributes() -> None:
    """An instance that does not hold every column (a transient one made with some; an expired one) is read
    through its attributes, as before: here the ones it lacks are None, as a transient instance's are."""
    values = _row()
    partial = {k: v for k, v in values.items() if k not in ("description", "completed_at")}
    payment = Payment(**partial)
    assert "description" not in payment.__dict__
    shown = api_payments.present(payment)
    assert shown["description"] is None and shown["completedAt"] is None
    assert shown == api_payments.present(_loaded(dict(values, description=None)))


def test_a_payment_missing_a_column_present_does_not_show_presents_as_before() -> None:
    """One lacking only a column its answer does not show (here next_poll_at, expired on a detached payment, as the
    autocommit path's is) answers as before: the fallback reads the columns the answer shows, through the attributes,
    and no other. Reading every column, it read the expired one: DetachedInstanceError (MissingGreenlet on an async
    session's), where present had answered."""
    values = _row()
    payment = _loaded(values)
    session = Session()
    session.add(payment)
    session.expire(payment, ["next_poll_at"])
    session.expunge(payment)
    assert "next_poll_at" not in payment.__dict__
    assert api_payments.present(payment) == api_payments.present(_loaded(values))


def test_a_payment_metric_series_is_looked_up_once() -> None:
    series = metrics.payment_moved("PENDING", "MOBILE_MONEY_AIRTEL")
    assert series is metrics.payment_moved("PENDING", "MOBILE_MONEY_AIRTEL")
    assert series is metrics.PAYMENTS.labels(status="PENDING", method="MOBILE_MONEY_AIRTEL")
    before = series._value.get()
    metrics.payment_moved("PENDING", "MOBILE_MONEY_AIRTEL").inc()
    assert metrics.REGISTRY.get_sample_value(
        "gateway_payment_transitions_total", {"status": "PENDING", "method": "MOBILE_MONEY_AIRTEL"}) == before + 1
