"""A closed dispute (resolved, rejected, withdrawn) stays closed: no move takes it back to OPEN or UNDER_REVIEW,
which would have the member told it is being looked at again and count it open in the reconciliation."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from core.models import Dispute, OutboxJob
from tests.admin_api.conftest import Caller, complete_payment, make_payment


async def _sms_jobs(rt: Any) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(OutboxJob)
                                    .where(OutboxJob.kind == "sms.send"))).scalar_one())


@pytest.mark.parametrize("closed", ["RESOLVED", "REJECTED", "WITHDRAWN"])
async def test_a_closed_dispute_is_never_reopened(admin: Caller, rt: Any, demo: dict[str, Any], closed: str) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    done = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                            json={"status": closed, "note": "decided"})
    assert done["resolvedAt"] is not None and done["resolution"] == "decided"
    sent = await _sms_jobs(rt)
    how = {"RESOLVED": "resolved in the payer's favour", "REJECTED": "rejected", "WITHDRAWN": "withdrawn"}[closed]
    for again in ("OPEN", "UNDER_REVIEW"):
        refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409,
                                   json={"status": again, "note": "looking again"})
        assert (refused["code"], refused["message"]) == ("INVALID_STATE", (
            f"dispute {dispute['reference']} was {how} already by admin@kigali-heights.rw at {done['resolvedAt']} "
            '("decided"): a closed dispute takes no further move or note; if the payment is contested again, open '
            "a new dispute of it (POST /v1/disputes)"))
    shown = await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200)
    assert (shown["status"], shown["resolvedAt"]) == (closed, done["resolvedAt"])
    assert await _sms_jobs(rt) == sent  # the member is told nothing more
    # A new dispute of the payment can be opened (the closed one blocks nothing).
    await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})


async def test_a_dispute_under_review_still_refuses_a_second_one(admin: Caller, rt: Any,
                                                                 demo: dict[str, Any]) -> None:
    """Open means OPEN or UNDER_REVIEW: a second dispute of a payment being reviewed is refused (two officers would
    each resolve one, each with a refund), naming the one to add to."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "UNDER_REVIEW"})
    second = await admin.json("POST", "/v1/disputes", 409, json={"paymentId": payment["id"],
                                                                 "reason": "WRONG_AMOUNT"})
    assert (second["code"], second["message"]) == (
        "DISPUTE_ALREADY_OPEN", f"dispute {dispute['reference']} is already open for this payment")
    async with rt.sessionmaker() as s:
        assert list((await s.execute(select(Dispute.id).where(Dispute.payment_id == payment["id"]))).scalars()) == [
            dispute["id"]]


async def test_the_audit_log_says_what_a_dispute_was_opened_for(admin: Caller, rt: Any,
                                                                demo: dict[str, Any]) -> None:
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"],
                                                                  "reason": "NOT_AUTHORISED"})
    events = await admin.json("GET", f"/v1/audit-events?entityType=dispute&entityId={dispute['id']}", 200)
    [opened] = [e for e in events["data"] if e["action"] == "dispute.opened"]
    assert opened["after"] == {"paymentId": payment["id"], "reason": "NOT_AUTHORISED"}


async def test_a_dispute_under_review_is_told_it_does_not_go_back_to_open(admin: Caller, rt: Any,
                                                                         demo: dict[str, Any]) -> None:
    """The one move the table refuses of a dispute still open was answered in the state machine's words ("dispute:
    UNDER_REVIEW -> OPEN is not allowed"); now what is true and what the officer can do instead."""
    payment = await make_payment(admin, demo["payment_types"]["Monthly Rent"])
    await complete_payment(rt, payment["id"])
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": payment["id"], "reason": "OTHER"})
    await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={"status": "UNDER_REVIEW"})
    refused = await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 422, json={"status": "OPEN"})
    assert (refused["code"], refused["message"]) == ("INVALID_STATE", (
        f"dispute {dispute['reference']} is UNDER_REVIEW: it does not go back to OPEN; send a note or evidence to add "
        "to it, or close it (RESOLVED, REJECTED or WITHDRAWN)"))
