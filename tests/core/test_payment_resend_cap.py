"""A payment whose request the provider never got is sent again at most PAYMENT_RESENDS times.

Its status poll sends a request the provider says it has never heard of (NOT_FOUND inside the window) again, with
the same reference. A provider swallowing every request (each one unanswered, its status lookup NOT_FOUND: a
black-holed endpoint) was sent one more at every poll of the window, 15 to 30 s apart (11 requests to pay in 10
polls), each holding a slot of the provider's lane for the whole call budget ahead of other payers' first requests.
Now the first request and three resends; the poll goes on asking, and a resend after a replay still goes while under
the cap.
"""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select

from core.jobs import PAYMENT_RESENDS
from core.models import OutboxJob, Payment
from core.payments import create_payment
from tests.conftest import drain
from tests.providers.wires import ADMIN, due_now, mtn_adapter, mtn_payment, mtn_wire

RTP = "/collection/v1_0/requesttopay"
NOT_FOUND = {"code": "RESOURCE_NOT_FOUND", "message": "Requested resource was not found."}


async def test_a_request_the_provider_keeps_swallowing_is_sent_again_three_times_at_most(
        rt: Any, demo: dict[str, Any], worker: Any) -> None:
    def swallowed(request: httpx.Request) -> httpx.Response:  # sent, never answered: it may have arrived
        raise httpx.ReadTimeout("no answer", request=request)

    wire = mtn_wire().on("POST", RTP, swallowed).on("GET", RTP + "/*", 404, NOT_FOUND)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await drain(worker)  # the collect: unanswered, left to the poll
    for _ in range(10):  # ten polls inside the window, each told NOT_FOUND with no collect in flight
        await due_now(rt, "payment.poll")
        await drain(worker)
    sent = wire.sent("POST", RTP)
    assert len(sent) == 1 + PAYMENT_RESENDS == 4
    assert {r.headers["X-Reference-Id"] for r in sent} == {payment.provider_reference}
    async with rt.sessionmaker() as s:
        keys = list((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "payment.collect")
                                     .order_by(OutboxJob.id))).scalars())
        [poll] = (await s.execute(select(OutboxJob).where(OutboxJob.kind == "payment.poll"))).scalars().all()
        stored = await s.get(Payment, payment.id)
    assert keys == [f"collect:{payment.id}", *(f"collect:{payment.id}:resent:{n}" for n in (1, 2, 3))]
    # Still asked about (its window is not over), never ended on a guess.
    assert (stored.status, poll.status) == ("PENDING", "PENDING")
    assert len(wire.sent("GET", RTP + "/*")) == 10
