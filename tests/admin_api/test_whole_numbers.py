"""Whole-number fields of the admin API's bodies (a payment type's dueDay, a secret rotation's overlapHours) as a
client writes them: JSON Schema counts 5.0 as an integer, so `"dueDay": 5.0` was taken and echoed back as 5.0. Read
as an amount is (tests/admin_api/test_amount_inputs: "50000.00" is 50000), from the number's text: a whole number
written with a fraction or an exponent is that int, stored and echoed as one; any other is refused, even one whose
float is whole (31.000000000000001)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from core.db import parse_aware, utcnow
from core.models import AuditEvent, PaymentType
from tests.admin_api.conftest import Caller, check_shape
from tests.admin_api.test_payment_types import NEW
from tests.core.test_webhooks import approved_endpoint

SLOT = "__NUMBER__"


async def _send(admin: Caller, method: str, path: str, body: dict[str, Any], number: str,
                status: int) -> tuple[str, Any]:
    """The body with `number`'s text at SLOT; the answer's raw text and its JSON."""
    raw = json.dumps(body).replace(json.dumps(SLOT), number)
    resp = await admin.req(method, path, data=raw.encode(), headers={"Content-Type": "application/json"})
    text = await resp.text()
    answer = json.loads(text)
    assert resp.status == status, (number, resp.status, answer)
    check_shape(method, path, status, answer)
    return text, answer


@pytest.mark.parametrize(("number", "day"), [("5.0", 5), ("5e0", 5), ("0.5e1", 5), ("31.00", 31), ("1E1", 10)])
async def test_a_due_day_written_whole_with_a_fraction_or_exponent_is_that_day(
        admin: Caller, rt: Any, demo: dict[str, Any], number: str, day: int) -> None:
    text, made = await _send(admin, "POST", "/v1/payment-types", {**NEW, "dueDay": SLOT}, number, 201)
    written = re.search(r'"dueDay":\s*([^,}\s]+)', text)
    assert written is not None and written.group(1) == str(day), text  # an int in the answer, never 5.0
    rent = demo["payment_types"]["Monthly Rent"]
    _, changed = await _send(admin, "PATCH", f"/v1/payment-types/{rent}", {"dueDay": SLOT}, number, 200)
    assert type(changed["dueDay"]) is int and changed["dueDay"] == day
    async with rt.sessionmaker() as s:
        assert [await s.scalar(select(PaymentType.due_day).where(PaymentType.id == i))
                for i in (made["id"], rent)] == [day, day]
        after = (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_id == rent, AuditEvent.action == "payment_type.updated"))).scalar_one()
    assert type(after["dueDay"]) is int and after["dueDay"] == day  # the audit row's too, never 5.0
    listed = await admin.json("GET", f"/v1/payment-types/{rent}", 200)
    assert type(listed["dueDay"]) is int and listed["dueDay"] == day


INTEGER = ["dueDay must be an integer"]


@pytest.mark.parametrize(("number", "messages"), [
    ("5.5", INTEGER), ("31.000000000000001", INTEGER), ("4.9999999999999999", INTEGER),
    ("1e-400", ["dueDay must not be less than 1"]),  # its float is 0.0
    ("1e400", [*INTEGER, "dueDay must not be greater than 31"]),  # its float is inf
])
async def test_a_due_day_that_is_not_whole_as_written_is_refused(
        admin: Caller, rt: Any, demo: dict[str, Any], number: str, messages: list[str]) -> None:
    rent = demo["payment_types"]["Monthly Rent"]
    async with rt.sessionmaker() as s:
        before = (await s.scalar(select(func.count(PaymentType.id))),
                  await s.scalar(select(PaymentType.due_day).where(PaymentType.id == rent)))
    for method, path, body in (("POST", "/v1/payment-types", {**NEW, "dueDay": SLOT}),
                               ("PATCH", f"/v1/payment-types/{rent}", {"dueDay": SLOT})):
        _, refused = await _send(admin, method, path, body, number, 400)
        assert refused["message"] == messages, (method, refused)
    async with rt.sessionmaker() as s:
        assert (await s.scalar(select(func.count(PaymentType.id))),
                await s.scalar(select(PaymentType.due_day).where(PaymentType.id == rent))) == before


async def test_a_rotation_overlap_is_read_as_written(admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "https://erp.example.rw/hook")
    path = f"/v1/webhook-endpoints/{endpoint.id}/rotate-secret"
    for number in ("0.5", "1.0000000000000001"):
        _, refused = await _send(admin, "POST", path, {"overlapHours": SLOT}, number, 400)
        assert refused["message"] == ["overlapHours must be an integer"], refused
    _, rotated = await _send(admin, "POST", path, {"overlapHours": SLOT}, "2.0", 200)
    until = parse_aware(rotated["previousSecretValidUntil"])
    assert until is not None and timedelta(hours=1) < until - utcnow() <= timedelta(hours=2)
