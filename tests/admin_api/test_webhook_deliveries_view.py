"""GET /v1/webhook-endpoints/{id}/deliveries as a receiver catching up uses it: each delivery names what its event
was about (the event id does not, once it is a digest), the list filters by status, and attempts' times are
written as every other API timestamp."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import update

from core.models import OutboxJob, WebhookDelivery
from tests.admin_api.conftest import complete_payment, make_payment
from tests.core.test_webhooks import approved_endpoint

API_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def _attempt_webhooks(rt: Any, worker: Any) -> None:
    """One attempt of every delivery due (no provider or SMS runs here: their jobs are set aside)."""
    for _ in range(4):
        async with rt.sessionmaker.begin() as session:
            await session.execute(update(OutboxJob).where(~OutboxJob.kind.like("webhook.%"),
                                                          OutboxJob.status == "PENDING").values(status="DONE"))
        if not await worker.run_once():
            return


async def _disputed(admin: Any, rt: Any, demo: dict[str, Any], worker: Any) -> tuple[Any, dict[str, Any], Any]:
    """A receiver that is down (nothing listens on port 9): a dispute opened and resolved, each event tried once."""
    endpoint, _ = await approved_endpoint(rt, demo["cooperative_id"], "http://127.0.0.1:9/hook",
                                          events=["dispute.opened", "dispute.updated"])
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "RESOLVED"})
    await _attempt_webhooks(rt, worker)
    return endpoint, dispute, payment


async def test_each_delivery_names_the_entity_its_event_was_about(admin, rt, demo, worker):
    endpoint, dispute, _ = await _disputed(admin, rt, demo, worker)
    listed = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}/deliveries", 200)
    by_type = {d["eventType"]: d for d in listed["data"]}
    assert set(by_type) == {"dispute.opened", "dispute.updated"}
    updated = by_type["dispute.updated"]
    assert dispute["id"] not in updated["eventId"]  # a digest: the id alone names nothing
    for delivery in by_type.values():
        assert (delivery["subjectType"], delivery["subjectId"]) == ("dispute", dispute["id"])


async def test_attempt_times_are_written_as_every_api_timestamp(admin, rt, demo, worker):
    endpoint, _, _ = await _disputed(admin, rt, demo, worker)
    listed = await admin.json("GET", f"/v1/webhook-endpoints/{endpoint.id}/deliveries", 200)
    attempts = [a for d in listed["data"] for a in d["attempts"]]
    assert len(attempts) == 2 and all(a["error"] and a["statusCode"] is None for a in attempts)
    # The API's camelCase, as every other field (the row keeps core.webhooks' own keys).
    assert all(set(a) == {"at", "statusCode", "latencyMs", "error"} for a in attempts), attempts
    assert all(isinstance(a["latencyMs"], int) for a in attempts)
    assert all(API_TIME.match(a["at"]) for a in attempts), [a["at"] for a in attempts]
    assert all(API_TIME.match(d["createdAt"]) for d in listed["data"])


async def test_deliveries_filter_by_status(admin, client, rt, demo, worker):
    endpoint, dispute, _ = await _disputed(admin, rt, demo, worker)
    async with rt.sessionmaker.begin() as session:  # the opening's delivery given up on (three days later)
        await session.execute(update(WebhookDelivery).where(WebhookDelivery.event_type == "dispute.opened")
                              .values(status="FAILED"))
    path = f"/v1/webhook-endpoints/{endpoint.id}/deliveries"
    failed = await admin.json("GET", f"{path}?status=FAILED", 200)
    assert [(d["eventType"], d["status"]) for d in failed["data"]] == [("dispute.opened", "FAILED")]
    assert failed["meta"]["total"] == 1
    pending = await admin.json("GET", f"{path}?status=PENDING", 200)
    assert [(d["eventType"], d["subjectId"]) for d in pending["data"]] == [("dispute.updated", dispute["id"])]
    assert (await admin.json("GET", f"{path}?status=DELIVERED", 200))["meta"]["total"] == 0
    assert (await admin.json("GET", path, 200))["meta"]["total"] == 2
    bad = await admin.json("GET", f"{path}?status=LOST", 400)
    assert any("status must be one of: PENDING, DELIVERED, FAILED" in m for m in bad["message"]), bad
    doc = await (await client.get("/v1/openapi.json")).json()
    params = {p["name"]: p for p in doc["paths"]["/v1/webhook-endpoints/{id}/deliveries"]["get"]["parameters"]}
    assert params["status"]["schema"] == {"type": "string", "enum": ["PENDING", "DELIVERED", "FAILED"]}
