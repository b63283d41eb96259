"""A resumed confirmation whose payment was already made and has since closed (failed, cancelled, expired or paid).

The END of a session that confirmed a payment can fail to reach Redis (the hop answers anyway, or a failover
loses the route's DEL): the phone's resume route still holds the confirmation with its reserved reference.
If that payment then closes and the member dials again, confirming must never tell her to approve a prompt
that will not come, nor offer to pay again what she has paid.
"""

from __future__ import annotations

from typing import Any

import pytest

from channels.ussd import sessions
from core.audit import Actor
from core.models import OutboxJob, Payment, UssdSession
from core.phone import normalize
from core.ports import ProviderOutcome
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, FR_AIRTEL, option, reference_on

CLOSED = [(ProviderOutcome.FAILED, "FAILED"), (ProviderOutcome.CANCELLED, "CANCELLED"),
          (ProviderOutcome.EXPIRED, "TIMEOUT")]


async def _confirm_and_lose_the_end(client: Any, rt: Any, number: str) -> tuple[AtPhone, str, str]:
    """Pay Water (5,000 RWF), as the END's write of the session never reached Redis: the resume route still
    holds the confirmation. Returns the phone, the confirmation screen and its reference."""
    dropped = AtPhone(client, number)
    await dropped.dial()
    types = await dropped.send("1")
    confirm = await dropped.send(option(types, "Water"))
    route_key = sessions.resume_key(rt.cipher, normalize(number))
    route = await rt.redis.get(route_key)
    assert route is not None
    done = await dropped.send("1")  # Confirm
    assert reference_on(done) == reference_on(confirm)
    await rt.redis.set(route_key, route, ex=sessions.RESUME_TTL)  # the END's DEL of the route was lost
    return dropped, confirm, reference_on(confirm)


async def _outcome(rt: Any, reference: str, outcome: ProviderOutcome) -> str:
    """The provider's answer about the payment (the member declined or missed the PIN prompt, or paid)."""
    from core.payments import get_by_reference
    from core.provider_events import apply_collection_outcome

    async with rt.sessionmaker.begin() as s:
        payment = await get_by_reference(s, reference)
        assert payment is not None
        await apply_collection_outcome(s, rt, payment, outcome, actor=Actor("provider:test", "provider"),
                                       reason=None if outcome is ProviderOutcome.SUCCEEDED else "declined",
                                       provider_transaction_id="TX-1")
    async with rt.sessionmaker() as s:
        payment = await get_by_reference(s, reference)
        assert payment is not None
        return payment.status


@pytest.mark.parametrize(("outcome", "status"), CLOSED, ids=[s for _, s in CLOSED])
async def test_resuming_a_confirmation_whose_payment_closed_pays_again_with_a_new_reference(
        client: Any, demo: Any, db: Any, rt: Any, outcome: ProviderOutcome, status: str) -> None:
    """She declined the PIN prompt (or let it expire) and dials again to pay: the resumed confirmation shows a
    new reference and Confirm makes a new payment whose prompt comes (it used to find the closed payment by
    the old reference and tell her to approve a prompt that never came, making nothing)."""
    _dropped, confirm, first_ref = await _confirm_and_lose_the_end(client, rt, EN_MTN)
    assert await _outcome(rt, first_ref, outcome) == status

    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    resumed = await again.send("1")
    new_ref = reference_on(resumed)
    assert new_ref != first_ref
    assert resumed == confirm.replace(first_ref, new_ref)  # the same confirmation, a new reference
    done = await again.send("1")
    assert done == f"END Approve the prompt on your phone to pay 5,000 RWF. Ref {new_ref}"

    second = await db.one(Payment, Payment.reference == new_ref)
    assert (second.status, second.amount_minor, second.idempotency_key) == (
        "PENDING", 5_000, f"ussd:africastalking:{again.session_id}")
    assert (await db.one(Payment, Payment.reference == first_ref)).status == status
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 2
    assert (await db.one(UssdSession, UssdSession.session_id == again.session_id)).payment_id == second.id


async def test_resuming_a_confirmation_already_paid_says_so(client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The payment went through: the resumed session tells her it is paid, with its reference, and offers
    nothing to pay again (it used to show the confirmation, then "approve the prompt")."""
    _dropped, _confirm, ref = await _confirm_and_lose_the_end(client, rt, EN_MTN)
    assert await _outcome(rt, ref, ProviderOutcome.SUCCEEDED) == "COMPLETED"

    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    assert await again.send("1") == f"END You have already paid 5,000 RWF. Ref {ref}"

    payment = await db.one(Payment)
    assert payment.reference == ref
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1
    assert (await db.one(UssdSession, UssdSession.session_id == again.session_id)).payment_id == payment.id
    # The END clears the route: the next dial is the menu.
    assert await rt.redis.get(sessions.resume_key(rt.cipher, normalize(EN_MTN))) is None
    assert (await AtPhone(client, EN_MTN).dial()).startswith("CON Welcome to")


async def test_already_paid_says_what_the_provider_took(client: Any, demo: Any, rt: Any) -> None:
    """The provider took 4,000 of the 5,000 RWF asked: "already paid" says the 4,000 her wallet paid (as her receipt
    and "My payments" do), not the 5,000 asked."""
    from core.money import Money
    from core.payments import get_by_reference
    from core.provider_events import apply_collection_outcome

    _dropped, _confirm, ref = await _confirm_and_lose_the_end(client, rt, EN_MTN)
    async with rt.sessionmaker.begin() as s:
        payment = await get_by_reference(s, ref)
        assert payment is not None
        await apply_collection_outcome(s, rt, payment, ProviderOutcome.SUCCEEDED, actor=Actor("provider:test",
                                       "provider"), amount=Money(4_000, "RWF"), provider_transaction_id="TX-1")
    again = AtPhone(client, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    assert await again.send("1") == f"END You have already paid 4,000 RWF. Ref {ref}"


async def test_already_paid_in_the_members_language(client: Any, demo: Any, rt: Any) -> None:
    _dropped, _confirm, ref = await _confirm_and_lose_the_end(client, rt, FR_AIRTEL)
    await _outcome(rt, ref, ProviderOutcome.SUCCEEDED)
    again = AtPhone(client, FR_AIRTEL)
    assert (await again.dial()).startswith("CON Vous n'avez pas terminé")
    assert await again.send("1") == f"END Vous avez déjà payé 5 000 RWF. Réf {ref}"


@pytest.mark.parametrize(("outcome", "status", "answer"), [
    (ProviderOutcome.FAILED, "FAILED", "END Payment {ref} of 5,000 RWF was not completed. Dial again to pay."),
    (ProviderOutcome.EXPIRED, "TIMEOUT", "END Payment {ref} of 5,000 RWF was not completed. Dial again to pay."),
    (ProviderOutcome.SUCCEEDED, "COMPLETED", "END You have already paid 5,000 RWF. Ref {ref}"),
], ids=["FAILED", "TIMEOUT", "COMPLETED"])
async def test_a_payment_closing_while_its_resumed_confirmation_is_shown_is_answered_by_its_status(
        client: Any, demo: Any, db: Any, rt: Any, outcome: ProviderOutcome, status: str, answer: str) -> None:
    """Resumed while the payment was still open (the same reference, so it is never paid twice), it closes
    before she presses Confirm: the answer says what became of it, never "approve the prompt" for a prompt
    that will not come."""
    _dropped, confirm, ref = await _confirm_and_lose_the_end(client, rt, EN_MTN)
    again = AtPhone(client, EN_MTN)
    await again.dial()
    assert await again.send("1") == confirm  # still PENDING: the reservation stands
    assert await _outcome(rt, ref, outcome) == status
    assert await again.send("1") == answer.format(ref=ref)
    assert (await db.one(Payment)).reference == ref
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1


async def test_a_route_that_left_the_confirmation_drops_a_closed_reservation(
        client: Any, demo: Any, db: Any, rt: Any) -> None:
    """The reservation travels with the session past its confirmation (Back to the list): resumed there after
    the payment failed, choosing again makes a new payment rather than finding the failed one."""
    _dropped, confirm, first_ref = await _confirm_and_lose_the_end(client, rt, EN_MTN)
    # A second session resumes (the payment still pending), goes Back to the list and drops.
    middle = AtPhone(client, EN_MTN)
    await middle.dial()
    assert await middle.send("1") == confirm
    types = await middle.send("0")
    assert types.startswith("CON Choose what to pay:")
    await _outcome(rt, first_ref, ProviderOutcome.FAILED)

    again = AtPhone(client, EN_MTN)
    await again.dial()
    assert await again.send("1") == types
    resumed = await again.send(option(types, "Water"))
    new_ref = reference_on(resumed)
    assert new_ref != first_ref
    assert await again.send("1") == f"END Approve the prompt on your phone to pay 5,000 RWF. Ref {new_ref}"
    assert (await db.one(Payment, Payment.reference == new_ref)).status == "PENDING"
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 2
