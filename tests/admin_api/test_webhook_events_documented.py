"""`/v1/openapi.json` describes the webhook events the gateway sends (OpenAPI 3.1 `webhooks`): every type it can
send (core.webhooks.EVENTS: fan-out refuses any other), each with its body and signature headers. Real events, made
through the API, the provider's (test) callback and the code's own builders, are delivered to a receiver; every
body that arrives validates against the document's schema for its type, and so do its headers."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from core import provider_events, webhooks
from core.models import Payment
from core.money import Money
from core.notify import emit_event
from core.outbox import PermanentJobError
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.admin_api.test_recorded_payments import _line
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint, receiver  # noqa: F401 (the receiver fixture)

_DOC_URI = "urn:gateway:openapi"


async def _document(client: Any) -> dict[str, Any]:
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    doc: dict[str, Any] = await resp.json()
    assert doc["openapi"].startswith("3.1")
    return doc


def _validator(doc: dict[str, Any], event_type: str) -> Draft202012Validator:
    """The validator of `event_type`'s body as the document describes it, its $refs read from the document."""
    registry: Registry = Registry().with_resource(_DOC_URI, Resource.from_contents(doc, DRAFT202012))
    pointer = f"/webhooks/{event_type}/post/requestBody/content/application~1json/schema"
    return Draft202012Validator({"$ref": f"{_DOC_URI}#{pointer}"}, registry=registry, format_checker=FormatChecker())


async def test_every_event_type_is_described_and_no_other_is_sent(client: Any, rt: Any, demo: Any) -> None:
    doc = await _document(client)
    assert list(doc["webhooks"]) == list(webhooks.EVENTS)
    ids = [op["operationId"] for item in [*doc["paths"].values(), *doc["webhooks"].values()] for op in item.values()]
    assert len(ids) == len(set(ids))
    for event_type, item in doc["webhooks"].items():
        post = item["post"]
        headers = {p["name"]: p for p in post["parameters"] if p["in"] == "header"}
        assert set(headers) == {"X-Gateway-Signature", "X-Gateway-Event-Id", "X-Gateway-Event",
                                "X-Gateway-Delivery-Attempt"}
        assert headers["X-Gateway-Event"]["schema"] == {"const": event_type}
        assert post["requestBody"]["content"]["application/json"]["schema"]["properties"]["type"] == {
            "const": event_type}
    # The code can send no type the document does not describe: fan-out parks one.
    with pytest.raises(PermanentJobError, match="bad webhook event payload"):
        await webhooks.fan_out(rt, {"event_type": "payment.refunded", "event_id": "evt_x",
                                    "cooperative_id": demo["cooperative_id"], "data": {}})


async def _test_callback(client: Any, payment: dict[str, Any], status: str, txn: str | None = None,
                         amount: int = 50000) -> None:
    body = {"gatewayReference": payment["gatewayReference"], "status": status, "gatewayTransactionId": txn,
            "failureReason": None if status == "COMPLETED" else "declined", "gatewayData": {"amount": amount}}
    resp = await client.post("/webhooks/payments/test", json=body)
    assert resp.status == 200, await resp.text()


async def test_delivered_events_validate_against_the_document(
        admin: Caller, rt: Any, demo: dict[str, Any], aiohttp_client: Any, receiver: Any,  # noqa: F811
        worker: Any) -> None:
    from app import create_app

    hook, url = receiver
    _endpoint, secret = await approved_endpoint(rt, demo["cooperative_id"], url)  # every event
    client = await aiohttp_client(create_app(dataclasses.replace(rt.settings, simulators_in_process=True),
                                             runtime=rt))
    doc = await _document(client)
    rent = demo["payment_types"]["Monthly Rent"]

    paid = await make_payment(admin, rent)
    await _test_callback(client, paid, "COMPLETED", "TEST_TXN_1")  # payment.completed
    failed = await make_payment(admin, rent)
    await _test_callback(client, failed, "FAILED")  # payment.failed
    await _test_callback(client, await make_payment(admin, rent), "TIMEOUT")  # payment.timeout
    short = await make_payment(admin, rent)
    await _test_callback(client, short, "COMPLETED", "TEST_TXN_SHORT", amount=40000)  # flagged: another amount
    await admin.json("POST", f"/v1/payments/{short['id']}/review", 200,
                     json={"note": "statement checked, the rest paid in cash"})  # payment.flag_cleared

    refunds = f"/v1/payments/{paid['id']}/refunds"
    sent = await admin.json("POST", refunds, 201, json={"amount": 10000, "idempotencyKey": idem()})
    await admin.json("POST", f"/v1/refunds/{sent['id']}/cancel", 200, json={"note": "asked by mistake"})  # failed
    await admin.json("POST", refunds, 201, json={"amount": 5000, "reason": "chargeback", "idempotencyKey": idem(),
                                                 "returnedByProvider": {"providerTransactionId": "REV-1"}})

    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid["id"], "reason": "WRONG_AMOUNT"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "UNDER_REVIEW"})

    recorded = await admin.json("POST", "/v1/payments/recorded", 201, json=_line(demo))
    await admin.json("POST", f"/v1/payments/{recorded['id']}/void", 200, json={"note": "the wrong statement line"})

    # The events about money a provider reported, and money taken after a failure, as the code builds them.
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, failed["id"])
        assert row is not None
        await emit_event(s, cooperative_id=row.cooperative_id, event_type="payment.taken_after_failure",
                         event_id=f"evt_payment_taken_after_failure_{row.id}", data=provider_events.event_data(row))
        for event_type in webhooks.MAY_FOLLOW:
            await provider_events._emit_reported(s, row, event_type, f"MONEY-{event_type}", Money(50000, "RWF"))
        await provider_events._emit_reported(s, row, "payment.paid_twice", None, None)  # nothing known of the money
        await provider_events.emit_flagged(s, row, "amount_mismatch", "provider reported 1 RWF, expected 50,000 RWF")
    await drain(worker)

    received: dict[str, int] = {}
    for request in hook.requests:
        event = json.loads(request["body"])
        headers = request["headers"]
        post = doc["webhooks"][event["type"]]["post"]
        _validator(doc, event["type"]).validate(event)
        for parameter in post["parameters"]:
            Draft202012Validator(parameter["schema"]).validate(headers[parameter["name"]])
        assert headers["X-Gateway-Event-Id"] == event["id"]
        assert webhooks.verify_signature(secret, headers["X-Gateway-Signature"], request["body"])
        received[event["type"]] = received.get(event["type"], 0) + 1
    assert set(received) == set(webhooks.EVENTS), received

    # And the schema holds the data to what the code sends: a field more, or one missing, is refused.
    event = json.loads(next(r["body"] for r in hook.requests if json.loads(r["body"])["type"] == "payment.completed"))
    for change in ({"fee": 0}, {"reportedPayment": None}):
        bad = copy.deepcopy(event)
        bad["data"].update(change)
        with pytest.raises(jsonschema.ValidationError):
            _validator(doc, "payment.completed").validate(bad)
    bad = copy.deepcopy(event)
    del bad["data"]["collectedAmount"]
    with pytest.raises(jsonschema.ValidationError):
        _validator(doc, "payment.completed").validate(bad)
    reported = json.loads(next(r["body"] for r in hook.requests if json.loads(r["body"])["type"] ==
                               "payment.paid_twice"))
    del reported["data"]["reportedPayment"]
    with pytest.raises(jsonschema.ValidationError):
        _validator(doc, "payment.paid_twice").validate(reported)
