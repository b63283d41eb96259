"""A number taken from its member (PATCH phone, release-phone, erase) while a USSD session of it is open: the
admin API forgets the number's resume route, but the open session saves it again on its next hop. Neither that
session nor the number's next one goes on as her: a resumed route whose members no longer hold the number starts
afresh, and a confirmation, her payments' list and details, a receipt and a dispute are refused once the member's
number is not the dialling phone's. An erasure deletes her sessions' state in Redis too: the open session starts
afresh."""

from __future__ import annotations

from typing import Any

import pytest

from channels.ussd import sessions
from core.models import Dispute, Payment
from core.phone import normalize
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import jobs_of, make_payment
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, option

NEW = "+250788999888"  # Jean Bosco's real number: the one she had registered (EN_MTN) was typed wrong
# Not "try again later", which cannot help whoever holds the phone: the number is no longer hers (NotHers).
REFUSED = "END This number is no longer registered for this member. Please dial again."


@pytest.fixture
async def admin(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["admin"])


async def _take_number(admin: Caller, member_id: str, how: str) -> None:
    """The member's number is no longer hers: corrected, or (once she is suspended) released or erased."""
    if how == "corrected":
        await admin.json("PATCH", f"/v1/members/{member_id}", 200, json={"phone": NEW})
        return
    await admin.json("DELETE", f"/v1/members/{member_id}", 200)
    await admin.json("POST", f"/v1/members/{member_id}/{how}", 200)


async def _route_waits(rt: Any, phone: str) -> bool:
    return await rt.redis.exists(sessions.resume_key(rt.cipher, normalize(phone))) == 1


@pytest.mark.parametrize("how", ["corrected", "release-phone", "erase"])
async def test_a_route_saved_again_after_the_number_was_taken_does_not_resume_as_her(
    rt: Any, client: Any, demo: Any, db: Any, admin: Caller, how: str
) -> None:
    jean = demo["members"][EN_MTN]
    live = AtPhone(client, EN_MTN)
    await live.dial()
    types = await live.send("1")
    await _take_number(admin, jean, how)
    assert not await _route_waits(rt, EN_MTN)  # forgotten by the admin API
    confirm = await live.send(option(types, "Water"))  # the open session's next hop, after the change
    if how == "erase":
        # Her sessions' state went with the erasure (it held her name and memberships): the session starts afresh
        # as a number that belongs to no cooperative, and saves no route of hers.
        assert confirm.startswith("CON Welcome to CoopPay"), confirm
        assert not await _route_waits(rt, EN_MTN)
        assert await db.count(Payment) == 0
        return
    assert confirm.startswith("CON Pay Water")
    assert await _route_waits(rt, EN_MTN)  # saved again: the session still holds her memberships

    again = AtPhone(client, EN_MTN)  # the session drops; the number dials again
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    resumed = await again.send("1")  # Continue
    # Not her confirmation: the menu of a number that belongs to no cooperative, the route gone with it.
    assert resumed.startswith("CON Welcome to CoopPay"), resumed
    assert not await _route_waits(rt, EN_MTN)
    assert (await AtPhone(client, EN_MTN).dial()).startswith("CON Welcome to CoopPay")  # nothing offered any more
    register = await again.send("1")  # Pay: a stranger's way in, not her payment types
    assert register.startswith("CON You are not registered yet."), register
    assert await db.count(Payment) == 0


async def _her_payments_listed(rt: Any, client: Any, demo: Any, jean: str) -> tuple[Any, AtPhone, str]:
    """A paid payment of Jean's, and a session of her number on the list of her payments."""
    paid = await make_payment(rt, demo["cooperative_id"], account=EN_MTN, member_id=jean)
    live = AtPhone(client, EN_MTN)
    await live.dial()
    return paid, live, await live.send("2")  # My payments


async def test_an_open_session_of_a_released_number_does_not_show_her_payments(
    rt: Any, client: Any, demo: Any, admin: Caller
) -> None:
    jean = demo["members"][EN_MTN]
    paid, live, listed = await _her_payments_listed(rt, client, demo, jean)
    assert paid.reference in listed
    await _take_number(admin, jean, "release-phone")
    detail = await live.send("1")  # her payment's details, from the number that is not hers any more
    assert detail == REFUSED, detail
    assert not await _route_waits(rt, EN_MTN)  # the session ended: nothing saved to resume
    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON Welcome to CoopPay")
    assert (await again.send("2")).startswith("END This phone is not registered with any cooperative.")


async def test_an_open_session_of_a_corrected_number_cannot_pay_as_her(
    rt: Any, client: Any, demo: Any, db: Any, admin: Caller
) -> None:
    jean = demo["members"][EN_MTN]
    live = AtPhone(client, EN_MTN)
    await live.dial()
    types = await live.send("1")
    confirm = await live.send(option(types, "Water"))
    assert confirm.startswith("CON Pay Water")
    await admin.json("PATCH", f"/v1/members/{jean}", 200, json={"phone": NEW})
    refused = await live.send("1")  # Confirm, from the number that is not hers any more
    assert refused == REFUSED, refused
    assert await db.count(Payment) == 0
    assert not await _route_waits(rt, EN_MTN)  # the session ended: nothing to resume either
    # From her corrected number she pays as before.
    mine = AtPhone(client, NEW)
    await mine.dial()
    types = await mine.send("1")
    await mine.send(option(types, "Water"))
    assert (await mine.send("1")).startswith("END Approve the prompt")
    payment = await db.one(Payment)
    assert (payment.member_id, payment.payment_account_masked) == (jean, "+25078****888")


@pytest.mark.parametrize("how", ["corrected", "release-phone", "erase"])
async def test_an_open_session_of_a_taken_number_cannot_open_a_dispute_as_her(
    rt: Any, client: Any, demo: Any, db: Any, admin: Caller, how: str
) -> None:
    jean = demo["members"][EN_MTN]
    paid = await make_payment(rt, demo["cooperative_id"], account=EN_MTN, member_id=jean)
    live = AtPhone(client, EN_MTN)
    await live.dial()
    pick = await live.send("3")  # Problem with a payment
    reasons = await live.send(option(pick, paid.reference))
    assert reasons.startswith("CON What went wrong?"), reasons
    await _take_number(admin, jean, how)
    refused = await live.send("3")  # "I did not authorise it", from the number that is not hers any more
    # Erased: her session's state went with her data, and the session starts afresh (the menu of no cooperative).
    assert refused == REFUSED if how != "erase" else refused.startswith("CON Welcome to CoopPay"), refused
    assert await db.count(Dispute) == 0 and await jobs_of(rt, "sms.send") == []
    assert not await _route_waits(rt, EN_MTN)
    if how != "corrected":
        return
    # From her corrected number she opens it as before.
    mine = AtPhone(client, NEW)
    await mine.dial()
    pick = await mine.send("3")
    await mine.send(option(pick, paid.reference))
    assert (await mine.send("3")).startswith("END Complaint DSP_")
    dispute = await db.one(Dispute)
    assert dispute.payment_id == paid.id


async def test_an_open_session_of_a_corrected_number_sends_her_no_receipt(
    rt: Any, client: Any, demo: Any, db: Any, admin: Caller
) -> None:
    jean = demo["members"][EN_MTN]
    paid, live, listed = await _her_payments_listed(rt, client, demo, jean)
    detail = await live.send(option(listed, paid.reference))
    assert paid.reference in detail and "Send receipt by SMS" in detail, detail
    await admin.json("PATCH", f"/v1/members/{jean}", 200, json={"phone": NEW})
    refused = await live.send("1")  # Send receipt by SMS
    assert refused == REFUSED, refused
    assert await jobs_of(rt, "sms.send") == []
    # From her corrected number the receipt is sent (to her number, the member's).
    mine = AtPhone(client, NEW)
    await mine.dial()
    listed = await mine.send("2")
    await mine.send(option(listed, paid.reference))
    assert (await mine.send("1")).startswith(f"END Your receipt for {paid.reference}")
    [receipt] = await jobs_of(rt, "sms.send")
    assert (receipt.payload["template"], receipt.payload["member_id"]) == ("payment_receipt", jean)


@pytest.mark.parametrize("entry", ["2", "3"])  # My payments; Problem with a payment
async def test_an_open_session_of_a_corrected_number_does_not_list_her_payments(
    rt: Any, client: Any, demo: Any, admin: Caller, entry: str
) -> None:
    jean = demo["members"][EN_MTN]
    paid = await make_payment(rt, demo["cooperative_id"], account=EN_MTN, member_id=jean)
    live = AtPhone(client, EN_MTN)
    assert (await live.dial()).startswith("CON Welcome to Kigali")  # her memberships, kept for the session
    await admin.json("PATCH", f"/v1/members/{jean}", 200, json={"phone": NEW})
    listed = await live.send(entry)
    assert listed == REFUSED and paid.reference not in listed, listed
