"""A recording of another cooperative's transaction id, contested by the provider's own completion: not refunded
through the provider, and its reviewed flag not raised again by a repeat of the contest's job.

Cooperative B's admin records from a "statement" (POST /v1/payments/recorded) an Airtel transaction id X that is
really cooperative A's money (a typo or a guess). A's genuine payment then completes with X by the provider's own
word: A keeps the money (collected, receipt, settled) and both payments are flagged (payment.contested). The
provider has now said whose money X is. B's recording must not be refunded through the provider: an Airtel (or
M-Pesa) refund names the transaction id, so it would reverse A's member's payment while A's payment keeps
counting the money as collected (A's `settled` then shows money the provider gave back)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from core.db import utcnow
from core.models import OutboxJob, Payment, Refund
from core.ports import ProviderOutcome
from core.provider_events import apply_collection_outcome
from tests.admin_api.conftest import Caller, idem, make_payment
from tests.admin_api.test_chargeback_visibility import _z
from tests.admin_api.test_transaction_id_held_twice import PROVIDER
from tests.conftest import drain

X = "AIRTEL-XC-77"


async def test_a_recording_contested_by_the_providers_own_completion_is_not_refunded_through_the_provider(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any], worker: Any) -> None:
    b = coop_b["admin"]
    theirs = await b.json("POST", "/v1/payments/recorded", 201, json={
        "paymentTypeId": coop_b["payment_type_id"], "amount": 1000, "paymentMethod": "MOBILE_MONEY_AIRTEL",
        "paymentAccount": "+250733999001", "providerTransactionId": X,
        "completedAt": _z(utcnow().replace(microsecond=0) - timedelta(minutes=5)),
        "note": "Airtel statement, line 3", "idempotencyKey": idem()})
    ours = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_AIRTEL",
                              paymentAccount="+250733000001")
    async with rt.sessionmaker.begin() as s:
        assert await apply_collection_outcome(s, rt, await s.get(Payment, ours["id"]), ProviderOutcome.SUCCEEDED,
                                              actor=PROVIDER, provider_transaction_id=X) == "completed"
    await drain(worker)  # payment.contested flags B's recording
    mine = await admin.json("GET", f"/v1/payments/{ours['id']}", 200)
    assert (mine["status"], mine["collectedAmount"], mine["gatewayTransactionId"]) == ("COMPLETED", 50000, X)
    flagged = await b.json("GET", f"/v1/payments/{theirs['id']}", 200)
    assert flagged["mismatch"] is True

    # B's admin asks the provider to refund its recording of X: an Airtel refund of X reverses A's member's money.
    answer = await b.req("POST", f"/v1/payments/{theirs['id']}/refunds",
                         json={"reason": "refund", "idempotencyKey": idem()})
    said = await answer.json()
    async with rt.sessionmaker() as s:
        queued = [j for j in (await s.execute(select(OutboxJob).where(OutboxJob.kind == "refund.submit"))).scalars()]
        refunds = list((await s.execute(select(Refund).where(Refund.payment_id == theirs["id"]))).scalars())
    assert (answer.status, queued, refunds) == (409, [], []), (
        f"B's refund of A's money was accepted ({answer.status}): {len(queued)} refund.submit job(s) queued "
        f"for transaction {X}, which the provider reported as A's payment's")
    assert "another cooperative's payment" in str(said) and ours["reference"] not in str(said)
    # A's own refund of its genuine money is still sent.
    await admin.json("POST", f"/v1/payments/{ours['id']}/refunds", 201,
                     json={"reason": "charged twice", "idempotencyKey": idem()})


async def test_a_repeat_of_the_contested_job_after_the_review_does_not_flag_again(
        admin: Caller, rt: Any, demo: dict[str, Any], coop_b: dict[str, Any], worker: Any) -> None:
    """The worker ran payment.contested (B's recording flagged, committed) but died before marking it DONE; B's admin
    reviews the flag; the job's lease runs out and another worker runs it again: the same contest, reviewed
    already, must not set mismatch again (flag_contested's repeat check reads only mismatch_detail, which the
    review emptied)."""
    from core.transaction_ids import flag_contested

    b = coop_b["admin"]
    theirs = await b.json("POST", "/v1/payments/recorded", 201, json={
        "paymentTypeId": coop_b["payment_type_id"], "amount": 1000, "paymentMethod": "MOBILE_MONEY_AIRTEL",
        "paymentAccount": "+250733999001", "providerTransactionId": X,
        "completedAt": _z(utcnow().replace(microsecond=0) - timedelta(minutes=5)),
        "note": "Airtel statement, line 3", "idempotencyKey": idem()})
    ours = await make_payment(admin, demo["payment_types"]["Monthly Rent"], paymentMethod="MOBILE_MONEY_AIRTEL",
                              paymentAccount="+250733000001")
    async with rt.sessionmaker.begin() as s:
        await apply_collection_outcome(s, rt, await s.get(Payment, ours["id"]), ProviderOutcome.SUCCEEDED,
                                       actor=PROVIDER, provider_transaction_id=X)
    async with rt.sessionmaker.begin() as s:  # the job's first run
        await flag_contested(s, theirs["id"], X)
    reviewed = await b.json("POST", f"/v1/payments/{theirs['id']}/review", 200,
                            json={"note": "Airtel statement: X is not ours; our line 3 was mistyped"})
    assert reviewed["mismatch"] is False
    async with rt.sessionmaker.begin() as s:  # the same job again (its lease ran out before it was marked DONE)
        await flag_contested(s, theirs["id"], X)
    again = await b.json("GET", f"/v1/payments/{theirs['id']}", 200)
    assert (again["mismatch"], again["mismatchDetail"]) == (False, None)
