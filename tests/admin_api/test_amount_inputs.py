"""Amounts as a client writes them, on every route that takes one (a payment, a payment type made or changed, a
refund, a dispute's refund, a statement line recorded, a payment's outcome): the error says what is wrong with the
number as it was written (1e999 is too large, not 'inf'; 1e-7 has too many decimal places, not "not a decimal
number"), NaN and Infinity are not JSON and are refused by the body's parser, and a zero or negative amount is the
request's own mistake (400) everywhere, where a refund's used to be a business rule's refusal (422)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select

from core.models import AuditEvent, Dispute, Payment, PaymentType, Refund
from tests.admin_api.conftest import Caller, check_shape, complete_payment, idem, make_payment, payment_body
from tests.admin_api.test_payment_outcome import RECORD, _given_up
from tests.admin_api.test_recorded_payments import _line

# A place in a body written as JSON text, filled with the number's own text (json.dumps cannot write 1e999).
SLOT = "__AMOUNT__"
Route = tuple[str, str, dict[str, Any]]


async def _routes(admin: Caller, rt: Any, demo: dict[str, Any]) -> dict[str, Route]:
    """Each amount-taking route with a body that would pass but for its amount (at SLOT)."""
    rent = demo["payment_types"]["Monthly Rent"]
    paid = await make_payment(admin, rent)
    await complete_payment(rt, paid["id"])
    given_up = await _given_up(admin, rt, demo)
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "OTHER"})
    return {
        "payment": ("POST", "/v1/payments", payment_body(rent, amount=SLOT)),
        "payment type": ("POST", "/v1/payment-types", {"name": "Levy", "amount": SLOT}),
        "payment type change": ("PATCH", f"/v1/payment-types/{rent}", {"amount": SLOT}),
        "refund": ("POST", f"/v1/payments/{paid['id']}/refunds", {"amount": SLOT, "idempotencyKey": idem()}),
        "dispute refund": ("POST", f"/v1/disputes/{dispute['id']}/transitions",
                           {"status": "RESOLVED", "note": "refund", "refundAmount": SLOT}),
        "recorded payment": ("POST", "/v1/payments/recorded", _line(demo, amount=SLOT)),
        "outcome": ("POST", f"/v1/payments/{given_up['id']}/outcome", {**RECORD, "amount": SLOT}),
    }


async def _send(admin: Caller, route: Route, number: str, status: int = 400) -> dict[str, Any]:
    method, path, body = route
    raw = json.dumps(body).replace(json.dumps(SLOT), number)
    resp = await admin.req(method, path, data=raw.encode(), headers={"Content-Type": "application/json"})
    answer = await resp.json()
    assert resp.status == status, (route, number, resp.status, answer)
    check_shape(method, path, status, answer)
    return answer


async def _written(rt: Any) -> dict[str, Any]:
    """What an accepted amount would have left: payments, types and their amounts, refunds, resolved disputes,
    audit rows."""
    async with rt.sessionmaker() as s:
        return {name: await s.scalar(query) for name, query in (
            ("payments", select(func.count(Payment.id))),
            ("types", select(func.count(PaymentType.id))),
            ("type amounts", select(func.sum(PaymentType.amount_minor))),
            ("refunds", select(func.count(Refund.id))),
            ("resolved", select(func.count(Dispute.id)).where(Dispute.status == "RESOLVED")),
            ("audit", select(func.count(AuditEvent.id))))}


@pytest.mark.parametrize(("number", "message"), [
    ("1e999", "{field} 1e999 is too large"),
    ("-1e999", "{field} -1e999 is too large"),
    ("1e15", "{field} 1e15 is too large"),
    ("1234567890123456", "{field} 1234567890123456 is too large"),
    ("1e-7", "RWF has 0 decimal places; 1e-7 has more"),
    # Exponents past what Python's Decimal holds (its 999999999999999999): still a number too large or too fine.
    ("1e9999999999999999999", "{field} 1e9999999999999999999 is too large"),
    ("-1E+9999999999999999999", "{field} -1E+9999999999999999999 is too large"),
    ("1e-9999999999999999999", "RWF has 0 decimal places; 1e-9999999999999999999 has more"),
    ("50000.5", "RWF has 0 decimal places; 50000.5 has more"),
    ('"50000.1234567"', "RWF has 0 decimal places; 50000.1234567 has more"),
])
async def test_an_amount_is_refused_for_what_is_wrong_with_it_as_written(
        admin: Caller, rt: Any, demo: dict[str, Any], number: str, message: str) -> None:
    routes = await _routes(admin, rt, demo)
    before = await _written(rt)
    for name, route in routes.items():
        field = "refundAmount" if name == "dispute refund" else "amount"
        answer = await _send(admin, route, number)
        assert answer["message"] == [message.format(field=field)], (name, answer)
        assert "inf" not in json.dumps(answer["message"])
    assert await _written(rt) == before


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json_and_are_refused_by_the_parser(
        admin: Caller, rt: Any, demo: dict[str, Any], constant: str) -> None:
    routes = await _routes(admin, rt, demo)
    before = await _written(rt)
    for route in routes.values():
        answer = await _send(admin, route, constant)
        assert answer["message"] == [f"body is not valid JSON: {constant} is not a JSON value "
                                     "(JSON numbers are finite)"]
        assert answer["error"] == "Bad Request" and answer["statusCode"] == 400
    # Anywhere in a body, not only in an amount; and in a body of a route that takes none.
    answer = await _send(admin, ("POST", "/v1/payment-types", {"name": "Levy", "amount": 2000, "dueDay": SLOT}),
                         constant)
    assert answer["message"][0].startswith(f"body is not valid JSON: {constant}")
    assert await _written(rt) == before


@pytest.mark.parametrize("number", ["0", "-5000", '"-1"', "0.0", "-1e3"])
async def test_a_zero_or_negative_amount_is_a_400_on_every_route(
        admin: Caller, rt: Any, demo: dict[str, Any], number: str) -> None:
    routes = await _routes(admin, rt, demo)
    before = await _written(rt)
    for name, route in routes.items():
        answer = await _send(admin, route, number)
        assert answer["error"] == "Bad Request"
        field = "refundAmount" if name == "dispute refund" else "amount"
        assert answer["message"][0] in (f"{field} must be a positive number",
                                        "amount is 0, so allowCustomAmount must stay true unless a positive amount "
                                        "is set"), (name, answer)
    assert await _written(rt) == before


async def test_amounts_written_as_numbers_are_read_exactly(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """An exponent or a fraction of zeros is the number it writes: 5E4 and 50000.0 are the rent."""
    rent = demo["payment_types"]["Monthly Rent"]
    for number in ("5E4", "50000.0", "5.0e4"):
        raw = json.dumps(payment_body(rent, amount=SLOT)).replace(json.dumps(SLOT), number)
        resp = await admin.req("POST", "/v1/payments", data=raw.encode(), headers={"Content-Type": "application/json"})
        made = await resp.json()
        assert resp.status == 201, made
        assert made["amount"] == 50000
    levy = await admin.json("POST", "/v1/payment-types", 201, json={"name": "Levy", "amount": 2000})
    raw = json.dumps({"amount": SLOT}).replace(json.dumps(SLOT), "2.5e3")
    resp = await admin.req("PATCH", f"/v1/payment-types/{levy['id']}", data=raw.encode(),
                           headers={"Content-Type": "application/json"})
    assert resp.status == 200 and (await resp.json())["amount"] == 2500
    async with rt.sessionmaker() as s:
        assert (await s.get(PaymentType, levy["id"])).amount_minor == 2500


async def test_a_refund_beyond_what_is_left_is_still_a_business_rule(admin: Caller, rt: Any,
                                                                     demo: dict[str, Any]) -> None:
    """422 stays for what depends on the payment: more than is refundable, nothing left."""
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, paid["id"])
    over = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422,
                            json={"amount": 50001, "idempotencyKey": idem()})
    assert over["message"] == "refund of 50,001 RWF exceeds the refundable 50,000 RWF"
    whole = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 201, json={"idempotencyKey": idem()})
    left = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 422, json={"idempotencyKey": idem()})
    assert left["message"] == (f"nothing is left to refund; refunds not settled yet hold 50,000 RWF "
                               f"({whole['reference']}): withdraw one not yet sent with POST /v1/refunds/{{id}}/cancel")
    zero = await admin.json("POST", f"/v1/payments/{paid['id']}/refunds", 400,
                            json={"amount": 0, "idempotencyKey": idem()})
    assert zero["message"] == ["amount must be a positive number"]
