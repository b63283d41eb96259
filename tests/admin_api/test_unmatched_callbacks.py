"""A provider's callback for a payment the gateway does not have (PostgreSQL restored to an earlier point, say):
answered "unknown_payment" so that the provider stops sending it, and then counted, logged at ERROR when it says
money was taken, listed for a super admin (GET /v1/provider-callbacks) and resolved with a note. Before, it was
kept only in provider_events, which nothing read."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text

from core import metrics
from core.models import AuditEvent, ProviderEvent
from core.payments import handle_provider_event
from core.ports import EventKind, ProviderOutcome
from core.ports import ProviderEvent as Event
from tests.admin_api.conftest import Caller, make_payment

PAYER = "250788000002"
LIST = "/v1/provider-callbacks?unmatched=true&resolved=false"


def _unmatched(provider: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "gateway_callbacks_unmatched_total", {"provider": provider, "outcome": outcome}) or 0.0


async def _lost_payment_reference(rt: Any, admin: Caller, demo: dict[str, Any]) -> str:
    """A payment made, then lost with a restore to a point before it: its row and jobs are gone."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_MTN",
                                 paymentAccount=f"+{PAYER}")
    async with rt.engine.begin() as conn:
        reference = (await conn.execute(text("SELECT provider_reference FROM payments WHERE id = :i"),
                                        {"i": payment["id"]})).scalar_one()
        await conn.execute(text("DELETE FROM outbox_jobs"))
        await conn.execute(text("DELETE FROM payments WHERE id = :i"), {"i": payment["id"]})
    return str(reference)


async def _mtn_callback(client: Any, reference: str, status: str = "SUCCESSFUL", txn: str = "MTN-9911") -> Any:
    body = {"referenceId": reference, "externalId": reference, "status": status, "financialTransactionId": txn,
            "amount": "50000", "currency": "RWF", "payer": {"partyIdType": "MSISDN", "partyId": PAYER}}
    answer = await client.post("/webhooks/payments/mtn_momo", data=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert answer.status == 200, await answer.text()
    return await answer.json()


async def _ops(caller: Caller) -> dict[str, Any]:
    answer = await caller.req("GET", "/ops/data")
    assert answer.status == 200, await answer.text()
    return dict(await answer.json())


async def test_money_taken_for_a_payment_lost_in_a_restore_is_counted_logged_and_listed(
        rt: Any, client: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    before = _unmatched("mtn_momo", "SUCCEEDED")
    with caplog.at_level(logging.WARNING, logger="gateway.payments"):
        ack = await _mtn_callback(client, reference)
    assert ack["result"] == "unknown_payment"  # acknowledged: MTN will not send it again

    assert _unmatched("mtn_momo", "SUCCEEDED") == before + 1
    [line] = [r for r in caplog.records if r.name == "gateway.payments" and r.levelno >= logging.WARNING]
    assert line.levelno == logging.ERROR and "money was taken" in line.getMessage()
    fields = line.__dict__
    assert (fields["provider"], fields["reference"], fields["provider_transaction_id"], fields["outcome"]) == (
        "mtn_momo", reference, "MTN-9911", "SUCCEEDED")
    assert fields["event_id"] and fields["confirmed"] is False  # MTN's callbacks are unsigned
    assert PAYER not in line.getMessage() and PAYER not in json.dumps(fields, default=str)

    listed = await superadmin.json("GET", LIST, 200)
    [shown] = listed["data"]
    assert listed["meta"]["total"] == 1
    assert (shown["provider"], shown["kind"], shown["status"], shown["outcome"], shown["resolution"]) == (
        "mtn_momo", "collection", "SUCCEEDED", "unknown_payment", None)
    assert shown["payload"]["financialTransactionId"] == "MTN-9911"  # to match with MTN's statement
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 1}
    # It names no cooperative: a cooperative admin's page does not count it.
    assert (await _ops(admin))["unmatchedCallbacks"] is None


async def test_a_super_admin_resolves_one_with_a_note_once(
        rt: Any, client: Any, admin: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference)
    [shown] = (await superadmin.json("GET", LIST, 200))["data"]
    note = "MTN statement line MTN-9911: 50,000 RWF credited to the member's rent by hand"

    resolved = await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 200,
                                     json={"note": f"  {note} "})
    assert resolved["outcome"] == "unknown_payment_resolved"
    assert resolved["resolution"]["note"] == note and resolved["resolution"]["by"].startswith("admin:")
    assert resolved["payload"] == shown["payload"]  # the provider's body as it came
    again = await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 409,
                                  json={"note": "a second note"})
    assert "resolved already" in json.dumps(again)

    assert (await superadmin.json("GET", LIST, 200))["data"] == []
    [done] = (await superadmin.json("GET", "/v1/provider-callbacks?resolved=true", 200))["data"]
    assert done["id"] == shown["id"] and done["resolution"]["note"] == note
    assert (await _ops(superadmin))["unmatchedCallbacks"] == {"moneyTakenUnresolved": 0}
    async with rt.sessionmaker() as s:
        [audit] = (await s.execute(select(AuditEvent).where(
            AuditEvent.action == "provider_callback.resolved"))).scalars().all()
        row = await s.get(ProviderEvent, shown["id"])
    assert (audit.entity_type, audit.entity_id, audit.cooperative_id) == ("provider_event", shown["id"], None)
    assert audit.before == {"outcome": "unknown_payment"}
    assert audit.after["note"] == note and audit.after["outcome"] == "unknown_payment_resolved"
    assert row is not None and row.outcome == "unknown_payment_resolved"


async def test_only_a_super_admin_and_only_for_callbacks_that_matched_nothing(
        rt: Any, client: Any, admin: Caller, tenant: Caller, superadmin: Caller, demo: dict[str, Any]) -> None:
    reference = await _lost_payment_reference(rt, admin, demo)
    await _mtn_callback(client, reference)
    [shown] = (await superadmin.json("GET", LIST, 200))["data"]
    # They name no cooperative: a cooperative admin sees none (scoped as every list) and cannot resolve one (its
    # id answers as a missing one); a tenant is refused the routes.
    assert (await admin.json("GET", LIST, 200))["data"] == []
    await admin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 404, json={"note": "mine now"})
    await tenant.json("GET", LIST, 403)
    await tenant.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 403, json={"note": "mine now"})

    # A callback that matched its payment is not one of these.
    paid = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    matched = str(uuid.uuid4())
    async with rt.sessionmaker.begin() as s:
        s.add(ProviderEvent(id=matched, provider="mtn_momo", event_id="cb-paid", payment_id=paid["id"],
                            kind="collection", status="SUCCEEDED", payload={}, outcome="completed"))
    await superadmin.json("POST", f"/v1/provider-callbacks/{matched}/resolve", 404, json={"note": "not this one"})
    await superadmin.json("POST", "/v1/provider-callbacks/not-an-id/resolve", 404, json={"note": "not this one"})
    assert [r["id"] for r in (await superadmin.json("GET", LIST, 200))["data"]] == [shown["id"]]  # still open

    await superadmin.json("GET", "/v1/provider-callbacks?unmatched=false", 400)
    await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 400, json={"note": "ok"})
    await superadmin.json("POST", f"/v1/provider-callbacks/{shown['id']}/resolve", 400, json={})


async def test_newest_first_and_filtered(rt: Any, client: Any, superadmin: Caller, demo: dict[str, Any],
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Signed callbacks (no status query) for no payment take the same path: a failure is a WARNING."""
    before = _unmatched("airtel", "FAILED")
    with caplog.at_level(logging.WARNING, logger="gateway.payments"):
        for n, outcome in enumerate((ProviderOutcome.SUCCEEDED, ProviderOutcome.FAILED, ProviderOutcome.SUCCEEDED)):
            event = Event(provider="airtel", kind=EventKind.COLLECTION, event_id=f"ghost-{n}", reference=f"ref-{n}",
                          outcome=outcome, provider_transaction_id=f"AT-{n}", raw={"n": n})
            assert await handle_provider_event(rt, event) == "unknown_payment"
    assert await handle_provider_event(rt, event) == "duplicate"  # counted and logged once
    assert _unmatched("airtel", "FAILED") == before + 1
    levels = [(r.levelname, r.__dict__["event_id"]) for r in caplog.records if r.name == "gateway.payments"]
    assert levels == [("ERROR", "ghost-0"), ("WARNING", "ghost-1"), ("ERROR", "ghost-2")]

    everything = await superadmin.json("GET", "/v1/provider-callbacks", 200)
    assert [r["eventId"] for r in everything["data"]] == ["ghost-2", "ghost-1", "ghost-0"]
    taken = await superadmin.json("GET", "/v1/provider-callbacks?status=SUCCEEDED&provider=airtel&limit=1", 200)
    assert [r["eventId"] for r in taken["data"]] == ["ghost-2"]
    assert (taken["meta"]["total"], taken["meta"]["hasNext"]) == (2, True)
    assert (await superadmin.json("GET", "/v1/provider-callbacks?provider=mpesa", 200))["data"] == []
