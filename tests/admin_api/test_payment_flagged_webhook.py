"""A payment flagged for a person (mismatch) is told to the cooperative's system as it happens: payment.flagged, with
the payment and the flag (its kind and what it says), queued in the flag's transaction. Before, the flags with no
event of their own (an amount mismatch, a transaction id held twice or contested, money gone back beyond what was
collected...) reached it only through the payment sync (GET /v1/payments?updatedSince=...), however urgent. The
flags that have an event of their own (payment.paid_twice...) are not told twice: those go to payment.flagged's
endpoints instead."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import webhooks
from core.db import iso_ms, utcnow
from core.models import OutboxJob, Payment, WebhookDelivery
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import Caller, make_payment
from tests.admin_api.test_chargeback_beyond_refunds import _at_the_provider, _chargeback, _collected, _mtn_says_sent
from tests.admin_api.test_transaction_id_contested import _b_records, _ours, _theirs
from tests.admin_api.test_transaction_id_held_twice import PROVIDER
from tests.conftest import drain
from tests.core.test_webhooks import approved_endpoint, receiver  # noqa: F401 (the receiver fixture)


async def _deliveries(rt: Any, endpoint_id: str) -> list[WebhookDelivery]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
                                     .order_by(WebhookDelivery.created_at))).scalars())


async def _flagged_jobs(rt: Any, payment_id: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event"))).scalars()
        return [j for j in jobs if j.payload["event_type"] == "payment.flagged"
                and j.payload["data"]["id"] == payment_id]


def _received(hook: Any, secret: str, coop: str | None = None) -> list[dict[str, Any]]:
    """The events the receiver got (of cooperative `coop`, all when None), each signed with the endpoint's secret
    and named in its headers."""
    events = []
    for request in hook.requests:
        event = json.loads(request["body"])
        if coop is not None and event["cooperativeId"] != coop:
            continue
        headers = request["headers"]
        assert webhooks.verify_signature(secret, headers["X-Gateway-Signature"], request["body"])
        assert (headers["X-Gateway-Event"], headers["X-Gateway-Event-Id"]) == (event["type"], event["id"])
        events.append(event)
    return events


async def _row(rt: Any, payment_id: str) -> Payment:
    async with rt.sessionmaker() as s:
        row = await s.get(Payment, payment_id)
        assert row is not None
        return row


async def test_a_chargeback_beyond_collected_is_told_as_payment_flagged(
        admin: Caller, rt: Any, demo: dict[str, Any], receiver: Any, worker: Any) -> None:  # noqa: F811
    hook, url = receiver
    coop = demo["cooperative_id"]
    flagged, secret = await approved_endpoint(rt, coop, url, events=["payment.flagged"])
    others, _ = await approved_endpoint(rt, coop, url.replace("/hook", "/other"),
                                        events=[e for e in webhooks.EVENTS if e != "payment.flagged"])
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid, amount=30_000)
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    recorded = await _chargeback(admin, paid, 50_000, "MTN-REV-FLAG")
    said = (f"chargeback {recorded['reference']} of 50,000 RWF: 30,000 RWF more than collected has gone back to the "
            "payer: recover it from the member")
    # Queued with the flag, in its transaction.
    [job] = await _flagged_jobs(rt, paid["id"])
    assert job.payload["data"]["flag"] == {"kind": "beyond_collected", "detail": said}
    await drain(worker)

    [delivery] = await _deliveries(rt, flagged.id)
    assert (delivery.event_type, delivery.status) == ("payment.flagged", "DELIVERED")
    [event] = _received(hook, secret)
    row = await _row(rt, paid["id"])
    assert (event["type"], event["cooperativeId"], event["data"]["id"]) == ("payment.flagged", coop, paid["id"])
    assert event["data"]["flag"] == {"kind": "beyond_collected", "detail": said}
    assert (event["data"]["mismatch"], event["data"]["mismatchDetail"], event["data"]["status"]) == (
        True, row.mismatch_detail, "REFUNDED")
    assert event["data"]["updatedAt"] == iso_ms(row.updated_at)  # as the refund's outcome left it
    # The endpoint that asked for every other event is sent none of it.
    assert "payment.flagged" not in [d.event_type for d in await _deliveries(rt, others.id)]


async def test_a_refund_flag_is_told_later_than_the_payment_event_before_it(
        admin: Caller, rt: Any, demo: dict[str, Any]) -> None:
    """The refund's move of the payment is what payment.flagged tells (its updatedAt): stamped as every told change is
    (changed_at), strictly after the payment's last event, even when that one was stamped ahead of this host's clock
    (another host's, a little ahead; or a change in the same millisecond). Stamped with this host's clock alone, the
    flag read as older than the payment.completed before it, and a receiver keeping the latest updatedAt dropped it."""
    paid = await _collected(admin, rt, demo)
    sent = await _at_the_provider(admin, rt, paid, amount=30_000)
    assert await _mtn_says_sent(rt, sent["id"]) == "completed"
    ahead = utcnow().replace(microsecond=0) + timedelta(seconds=2)  # the last event's updatedAt, from a host ahead
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid["id"]).values(updated_at=ahead))
    await _chargeback(admin, paid, 50_000, "MTN-REV-AHEAD")
    [job] = await _flagged_jobs(rt, paid["id"])
    row = await _row(rt, paid["id"])
    assert (row.status, job.payload["data"]["updatedAt"]) == ("REFUNDED", iso_ms(row.updated_at))
    assert job.payload["data"]["updatedAt"] > iso_ms(ahead)


async def test_a_transaction_id_held_by_another_cooperative_flags_both_and_tells_each_its_own(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any], receiver: Any,  # noqa: F811
        worker: Any) -> None:
    hook, url = receiver
    _ours_hook, secret_a = await approved_endpoint(rt, demo["cooperative_id"], url, events=["payment.flagged"])
    completed_only, _ = await approved_endpoint(rt, demo["cooperative_id"], url.replace("/hook", "/done"),
                                                events=["payment.completed"])
    theirs_hook, secret_b = await approved_endpoint(rt, coop_b["cooperative_id"], url, events=["payment.flagged"])
    theirs = await _b_records(coop_b, "MTN-XC-FLAG")
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(
            s, rt, await s.get(Payment, payment["id"]), ProviderOutcome.SUCCEEDED, actor=PROVIDER,
            amount=Money(50_000, "RWF"), provider_transaction_id="MTN-XC-FLAG") == "completed"
    await drain(worker)  # A's events; the job flagging B's payment, and B's event

    [event] = _received(hook, secret_a, demo["cooperative_id"])
    assert (event["type"], event["data"]["id"], event["data"]["status"]) == ("payment.flagged", payment["id"],
                                                                            "COMPLETED")
    assert event["data"]["flag"] == {"kind": "transaction_id_held_twice", "detail": _ours("MTN-XC-FLAG")}
    assert event["data"]["mismatchDetail"] == _ours("MTN-XC-FLAG")
    assert [d.event_type for d in await _deliveries(rt, completed_only.id)] == ["payment.completed"]
    # B's system is told of its own payment's flag, naming nothing of A's.
    [delivery] = await _deliveries(rt, theirs_hook.id)
    assert (delivery.event_type, delivery.cooperative_id, delivery.status) == (
        "payment.flagged", coop_b["cooperative_id"], "DELIVERED")
    [body] = _received(hook, secret_b, coop_b["cooperative_id"])
    assert (body["type"], body["data"]["id"], body["data"]["flag"]) == (
        "payment.flagged", theirs["id"], {"kind": "transaction_id_contested", "detail": _theirs("MTN-XC-FLAG")})
    assert payment["id"] not in json.dumps(body) and demo["cooperative_id"] not in json.dumps(body)
    assert (await _row(rt, theirs["id"])).mismatch_detail == _theirs("MTN-XC-FLAG")


async def test_an_amount_mismatch_in_a_provider_callback_is_told_as_payment_flagged(
        admin: Caller, rt: Any, demo: dict[str, Any], aiohttp_client: Any, receiver: Any,  # noqa: F811
        worker: Any) -> None:
    from app import create_app

    hook, url = receiver
    coop = demo["cooperative_id"]
    _endpoint, secret = await approved_endpoint(rt, coop, url, events=["payment.flagged", "payment.completed"])
    client = await aiohttp_client(create_app(dataclasses.replace(rt.settings, simulators_in_process=True),
                                             runtime=rt))
    rent = demo["payment_types"]["Monthly Rent"]
    short = await make_payment(admin, rent)
    exact = await make_payment(admin, rent)
    for payment, amount, txn in ((short, 40_000, "TEST-SHORT"), (exact, 50_000, "TEST-EXACT")):
        resp = await client.post("/webhooks/payments/test", json={
            "gatewayReference": payment["gatewayReference"], "status": "COMPLETED", "gatewayTransactionId": txn,
            "gatewayData": {"amount": amount}})
        assert resp.status == 200, await resp.text()
    assert await _flagged_jobs(rt, exact["id"]) == []  # an unflagged completion queues no payment.flagged
    await drain(worker)

    events = _received(hook, secret)
    assert sorted((e["type"], e["data"]["id"]) for e in events) == sorted([
        ("payment.completed", short["id"]), ("payment.flagged", short["id"]), ("payment.completed", exact["id"])])
    [flag] = [e for e in events if e["type"] == "payment.flagged"]
    said = "provider reported 40,000 RWF, expected 50,000 RWF"
    assert flag["data"]["flag"] == {"kind": "amount_mismatch", "detail": said}
    [done] = [e for e in events if e["type"] == "payment.completed" and e["data"]["id"] == short["id"]]
    # One change: the completion and its flag carry the same payment.
    assert {k: v for k, v in flag["data"].items() if k != "flag"} == done["data"]
    assert (done["data"]["mismatch"], done["data"]["mismatchDetail"], done["data"]["collectedAmount"]) == (
        True, said, 40_000)


async def test_a_flag_with_an_event_of_its_own_is_told_once_to_payment_flagged_endpoints_too() -> None:
    """payment.paid_twice (and the other events telling a flag) go to an endpoint that asked for payment.flagged,
    and no payment.flagged is queued with them: a receiver asking for both gets one alert for one flag."""
    for event_type in webhooks.FLAG_EVENTS:
        assert webhooks.subscribed(["payment.flagged"], event_type)
        assert webhooks.still_subscribed(["payment.flagged"], event_type)
    assert not webhooks.subscribed(["payment.flagged"], "payment.completed")
    assert not webhooks.subscribed(["payment.completed"], "payment.flagged")
    assert webhooks.check_events(["payment.flagged"]) == ["payment.flagged"]
    # payment.flag_cleared goes only to the endpoints that asked for it.
    assert webhooks.check_events(["payment.flag_cleared", "payment.flagged"]) == ["payment.flagged",
                                                                                 "payment.flag_cleared"]
    assert [e for e in webhooks.EVENTS if webhooks.still_subscribed([e], "payment.flag_cleared")] == [
        "payment.flag_cleared"]


async def test_clearing_a_flag_is_told_as_payment_flag_cleared_to_the_endpoints_that_asked_for_it(
        admin: Caller, rt: Any, demo: dict[str, Any], aiohttp_client: Any, receiver: Any,  # noqa: F811
        worker: Any) -> None:
    """A cooperative's system told payment.flagged was never told the flag was dealt with: clearing it (POST
    /v1/payments/{id}/review) sent no event. Now payment.flag_cleared, queued with the review, carries the payment as
    it left it and the review (what was cleared, by whom, when, the note); only to the endpoints that asked for it,
    and nothing for a review refused (nothing flagged)."""
    from app import create_app

    hook, url = receiver
    coop = demo["cooperative_id"]
    cleared_hook, secret = await approved_endpoint(rt, coop, url, events=["payment.flag_cleared"])
    others, _ = await approved_endpoint(rt, coop, url.replace("/hook", "/other"),
                                        events=[e for e in webhooks.EVENTS if e != "payment.flag_cleared"])
    client = await aiohttp_client(create_app(dataclasses.replace(rt.settings, simulators_in_process=True),
                                             runtime=rt))
    short = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    resp = await client.post("/webhooks/payments/test", json={
        "gatewayReference": short["gatewayReference"], "status": "COMPLETED", "gatewayTransactionId": "TEST-CLEAR",
        "gatewayData": {"amount": 40_000}})
    assert resp.status == 200, await resp.text()
    await drain(worker)
    assert _received(hook, secret, coop) == []  # the completion and its flag: not asked for
    said = "provider reported 40,000 RWF, expected 50,000 RWF"
    note = "MTN statement shows 40,000 taken; the member paid the rest in cash"

    reviewed = await admin.json("POST", f"/v1/payments/{short['id']}/review", 200, json={"note": note})
    # Queued with the review, in its transaction.
    async with rt.sessionmaker() as s:
        [job] = [j for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "webhook.event"))).scalars()
                 if j.payload["event_type"] == "payment.flag_cleared"]
    assert job.status == "PENDING" and job.payload["data"]["id"] == short["id"]
    await drain(worker)

    [delivery] = await _deliveries(rt, cleared_hook.id)
    assert (delivery.event_type, delivery.status) == ("payment.flag_cleared", "DELIVERED")
    [event] = _received(hook, secret, coop)  # signed with the endpoint's secret, named in its headers
    row = await _row(rt, short["id"])
    assert (event["type"], event["cooperativeId"], event["id"]) == ("payment.flag_cleared", coop, delivery.event_id)
    review = {"mismatchDetail": said, "note": note, "by": row.reviewed_by, "at": reviewed["review"]["at"]}
    assert row.reviewed_by.startswith("admin:") and event["data"]["review"] == review == reviewed["review"]
    data = event["data"]
    assert (data["id"], data["status"], data["mismatch"], data["mismatchDetail"], data["collectedAmount"]) == (
        short["id"], "COMPLETED", False, None, 40_000)
    assert data["updatedAt"] == iso_ms(row.updated_at)  # the review's change
    # The endpoint that asked for every other event (payment.flagged included) is sent none of it.
    assert "payment.flag_cleared" not in [d.event_type for d in await _deliveries(rt, others.id)]

    # Nothing left to clear: refused, and nothing queued nor sent.
    await admin.json("POST", f"/v1/payments/{short['id']}/review", 409, json={"note": note})
    async with rt.sessionmaker() as s:
        events = [j.payload["event_type"] for j in (await s.execute(
            select(OutboxJob).where(OutboxJob.kind == "webhook.event"))).scalars()]
    assert events.count("payment.flag_cleared") == 1
    await drain(worker)
    assert len(_received(hook, secret, coop)) == 1 and len(await _deliveries(rt, cleared_hook.id)) == 1
