"""A provider that takes another amount than was asked (40,000 or 60,000 of a 50,000 RWF rent): the payment
completes flagged, and everyone is told what was taken: the API (`collectedAmount`, `mismatchDetail`), the
cooperative's webhook (the same fields, so its system credits what came in, not the rent asked) and the
member's receipt ("40,000 RWF of 50,000 RWF"), never the amount asked as if it had been received."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from channels.sms.jobs import SmsJobs
from core.audit import Actor
from core.models import OutboxJob, Payment
from core.money import Money
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import complete_payment, make_payment
from tests.channels.sms.helpers import as_job, start_simulator

# A number no member has (the payment is no member's: the receipt goes to it, in English). A member's own
# number would make it hers (test_seed_member_and_replay), her receipt in her language.
PAYER = "+250788555001"


@pytest.fixture
async def sim(rt: Any, aiohttp_server: Any) -> Any:
    _server, state = await start_simulator(aiohttp_server, rt)
    return state


async def _paid(admin: Any, rt: Any, demo: dict[str, Any], taken: int) -> dict[str, Any]:
    """Rent of 50,000 RWF of which the provider reports `taken` taken."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentAccount=PAYER)
    async with rt.sessionmaker.begin() as s:
        row = (await s.execute(select(Payment).where(Payment.id == payment["id"]).with_for_update())).scalar_one()
        await apply_collection_outcome(s, rt, row, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"),
                                       amount=Money(taken, "RWF"), provider_transaction_id="TX-TAKEN")
    return payment


async def _queued(rt: Any, kind: str) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(OutboxJob).where(OutboxJob.kind == kind))).scalars())


@pytest.mark.parametrize(("taken", "shown"), [(40000, "40,000 RWF of 50,000 RWF"),
                                              (60000, "60,000 RWF (50,000 RWF due)")])
async def test_the_api_the_webhook_and_the_receipt_say_what_was_taken(
    admin: Any, rt: Any, demo: dict[str, Any], sim: Any, taken: int, shown: str
) -> None:
    payment = await _paid(admin, rt, demo, taken)
    detail = f"provider reported {Money(taken, 'RWF')}, expected 50,000 RWF"

    got = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (got["status"], got["amount"], got["collectedAmount"]) == ("COMPLETED", 50000, taken)
    assert (got["mismatch"], got["mismatchDetail"]) == (True, detail)
    [listed] = (await admin.json("GET", "/v1/payments", 200))["data"]
    assert (listed["collectedAmount"], listed["mismatchDetail"]) == (taken, detail)

    event, flagged = sorted(await _queued(rt, "webhook.event"), key=lambda j: j.payload["event_type"])
    assert (event.payload["event_type"], flagged.payload["event_type"]) == ("payment.completed", "payment.flagged")
    data = event.payload["data"]
    assert (data["amount"], data["collectedAmount"], data["mismatch"], data["mismatchDetail"]) == (
        50000, taken, True, detail)
    assert flagged.payload["data"] == {**data, "flag": {"kind": "amount_mismatch", "detail": detail}}

    [receipt] = [j for j in await _queued(rt, "sms.send") if j.payload["template"] == "payment_receipt"]
    await SmsJobs(rt).send(as_job(receipt))
    [sent] = sim.messages(PAYER)
    assert sent["message"].startswith(f"We received {shown} for Monthly Rent, "), sent["message"]


async def test_nothing_taken_is_0_and_a_full_payment_collects_its_amount(
    admin: Any, rt: Any, demo: dict[str, Any], sim: Any
) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    assert (payment["collectedAmount"], payment["mismatchDetail"]) == (0, None)
    pending = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (pending["status"], pending["collectedAmount"], pending["completedAt"]) == ("PENDING", 0, None)

    await complete_payment(rt, payment["id"])
    done = await admin.json("GET", f"/v1/payments/{payment['id']}", 200)
    assert (done["status"], done["amount"], done["collectedAmount"]) == ("COMPLETED", 50000, 50000)
    assert (done["mismatch"], done["mismatchDetail"]) == (False, None)


async def test_a_failed_payment_tells_the_webhook_nothing_was_taken(admin: Any, rt: Any, demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    async with rt.sessionmaker.begin() as s:
        row = (await s.execute(select(Payment).where(Payment.id == payment["id"]).with_for_update())).scalar_one()
        await apply_collection_outcome(s, rt, row, ProviderOutcome.FAILED, actor=Actor("provider:t", "provider"),
                                       reason="payer declined")
    [event] = await _queued(rt, "webhook.event")
    assert event.payload["event_type"] == "payment.failed"
    assert (event.payload["data"]["amount"], event.payload["data"]["collectedAmount"]) == (50000, 0)


def test_the_served_document_lists_what_was_taken() -> None:
    from admin_api import all_routes
    from admin_api.openapi import build_document

    get = build_document(all_routes())["paths"]["/v1/payments/{id}"]["get"]
    payment = get["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"collectedAmount", "mismatchDetail"} <= set(payment["required"])
    assert payment["properties"]["collectedAmount"]["type"] == ["integer", "string"]  # 0 if none, as payments.csv
