"""Aline loses her SIM while a rent payment of hers waits for her MoMo PIN; her cooperative's admin moves her to her
new number (PATCH member, NEW_SIM) and MTN gives the old number to a stranger, who dials the cooperative's code and
texts its short code. Walked through the app: USSD as Africa's Talking sends it, SMS inbound, the admin API, the MTN
and SMS simulators."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from channels.ussd.sessions import phone_keys
from core.config import ProviderConfig, Secret
from core.models import AuditEvent, OutboxJob, Payment, SmsMessage
from core.outbox import CALL_SENT
from core.payments import create_payment
from core.phone import mask
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, bearer, idem
from tests.admin_api.test_refund_cancel import REFUND_PATH, _submission
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.channels.sms.test_routes import inbound
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import option, reference_on
from tests.conftest import drain
from tests.providers.conftest import load
from tests.providers.test_mtn_momo import CREDS as SIM_CREDS
from tests.providers.wires import ADMIN, Routes, completed, due_now, mtn_adapter, mtn_payment, mtn_wire

OLD = "+250788000001"  # Aline's lost SIM (the demo's Kinyarwanda-speaking MTN member), recycled to a stranger
NEW = "+250788123456"  # her new SIM


REFUNDS_SENT = web.AppKey("refunds_sent", list)


@contextlib.asynccontextmanager
async def mtn(rt: Any, aiohttp_server: Any) -> AsyncIterator[web.Application]:
    """The MTN simulator, every PIN prompt waiting for a decision (interactive), its callbacks dropped: the
    worker's status polls learn the outcome."""
    app = create_simulator(SimulatorOptions(delay=0.01, drop_callback=True, interactive=True,
                                            credentials=SIM_CREDS))
    app[REFUNDS_SENT] = []  # MTN's refund requests, as sent
    server = await aiohttp_server(app, host="127.0.0.1")
    config = ProviderConfig(base_url=str(server.make_url("")).rstrip("/"),
                            credentials={k: Secret(v) for k, v in SIM_CREDS.items()},
                            options={"target_environment": "mtnrwanda"})
    async def record(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path == "/disbursement/v1_0/refund":
            app[REFUNDS_SENT].append(json.loads(request.content))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(http, config)}
        yield app


async def settle(rt: Any, worker: Any, app: web.Application) -> None:
    for _ in range(3):
        await drain(worker)
        await asyncio.sleep(0.05)
        for kind in ("payment.poll", "refund.poll", "sms.send"):
            await due_now(rt, kind)
        await drain(worker)


async def _pending_rent(client: Any, rt: Any, worker: Any, app: web.Application) -> tuple[str, Any]:
    """Aline pays her rent from her old SIM; the PIN prompt reaches it and waits."""
    phone = AtPhone(client, OLD)
    await phone.dial()
    types = await phone.send("1")
    await phone.send(option(types, "Monthly Rent"))
    done = await phone.send("1")
    reference = reference_on(done)
    await drain(worker)
    for _ in range(50):
        if app[STATE].prompts.pending(OLD):
            break
        await asyncio.sleep(0.02)
    [prompt] = app[STATE].prompts.pending(OLD)
    return reference, prompt


async def _payment(rt: Any, reference: str) -> Payment:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(Payment).where(Payment.reference == reference))).scalar_one()


async def _texts(client: Any, rt: Any, worker: Any, app: web.Application, phone: str, *texts: str) -> None:
    for text in texts:
        await inbound(client, phone, text, f"in-{next(_inbound)}")
    await settle(rt, worker, app)


async def test_the_stranger_on_her_old_number_learns_nothing_of_her_payment(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """The number that paid is answered about its payment for SMS_PAYER_ANSWER_DAYS (a husband paying for her):
    not when that number was the member's own and she has since moved to another, its next holder being a
    stranger. He read her pending rent (STATUS) and, once paid, got her receipt (RECEIPT): amount, type,
    cooperative, reference and MTN's transaction id."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        reference, prompt = await _pending_rent(client, rt, worker, app)
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
        # The stranger now holding her old SIM: a number no cooperative knows, in USSD and by SMS.
        home = await AtPhone(client, OLD).dial()
        assert home.startswith("CON Welcome to CoopPay") and "Kigali" not in home, home
        mine = AtPhone(client, OLD)
        await mine.dial()
        assert (await mine.send("2")).startswith("END This phone is not registered with any cooperative.")
        await _texts(client, rt, worker, app, OLD, f"STATUS {reference}", "BALANCE", f"RECEIPT {reference}")
        # Her prompt, approved on the lost SIM before it went (MTN's answer comes later): paid, her receipt to
        # her new number, in her language.
        app[STATE].prompts.decide(prompt.reference, True)
        await settle(rt, worker, app)
        paid = await _payment(rt, reference)
        assert (paid.status, paid.member_id) == ("COMPLETED", aline)
        [receipt] = [m["message"] for m in sms.messages(NEW)]
        assert receipt.startswith("Twakiriye 50,000 RWF") and reference in receipt
        await _texts(client, rt, worker, app, OLD, f"RECEIPT {reference}", f"STATUS {paid.provider_transaction_id}")
        told = [str(m["message"]) for m in sms.messages(OLD)]
        assert all(reference not in text or text.startswith("No payment") for text in told), told
        assert not any("50,000" in text or "Monthly Rent" in text for text in told), told
        # From her new number she asks as before.
        await _texts(client, rt, worker, app, NEW, f"RECEIPT {reference}")
        assert [m["message"] for m in sms.messages(NEW)][-1] == receipt


_inbound = itertools.count(1)


async def _paid_then_moved(client: Any, rt: Any, worker: Any, app: web.Application, admin: Caller,
                           aline: str) -> Payment:
    reference, prompt = await _pending_rent(client, rt, worker, app)
    app[STATE].prompts.decide(prompt.reference, True)
    await settle(rt, worker, app)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW})
    return await _payment(rt, reference)


SENT_BACK_TO_OLD = ("this payment was paid from +25078****001, which is no longer its member's number (changed "
                    "since): MTN MoMo sends a refund back to the number that paid, which the operator may have given "
                    "to someone else. Send it there only if the member still holds that wallet (toPayingNumber: "
                    "true); else pay her another way and record it with returnedByProvider")


async def test_a_refund_to_the_number_she_no_longer_holds_is_confirmed_first(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """MTN refunds to the wallet that paid: her old SIM's, now perhaps a stranger's. The admin refunding her rent
    expected it to reach Aline (and her SMS says it did); he is told where it would go before anything is sent."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        paid = await _paid_then_moved(client, rt, worker, app, admin, aline)
        refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409,
                                   json={"reason": "overpaid", "idempotencyKey": idem()})
        assert (refused["message"], refused.get("field"), refused["code"]) == (
            SENT_BACK_TO_OLD, "toPayingNumber", "PAYING_NUMBER_CHANGED"), refused
        # A dispute resolved with a refund is refused alike, and stays open.
        dispute = await admin.json("POST", "/v1/disputes", 201, json={
            "paymentId": paid.id, "reason": "OTHER", "note": "paid twice"})
        resolve = {"status": "RESOLVED", "note": "refunded", "refundAmount": 50000}
        assert (await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 409, json=resolve))["message"] \
            == SENT_BACK_TO_OLD
        assert (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["status"] == "OPEN"
        await settle(rt, worker, app)
        assert app[REFUNDS_SENT] == []
        assert (await admin.json("GET", f"/v1/payments/{paid.id}/refunds", 200))["data"] == []
        # She still holds that wallet (she says so at the office): sent there, as asked.
        await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                         json={**resolve, "toPayingNumber": True})
        await settle(rt, worker, app)
        [sent] = app[REFUNDS_SENT]
        assert sent["referenceIdToRefund"] == paid.provider_reference
        [refund] = (await admin.json("GET", f"/v1/payments/{paid.id}/refunds", 200))["data"]
        assert refund["status"] == "COMPLETED"
        # Her refund SMS to her new number; her old number had only her receipt, sent while she held it.
        assert "RFD_" in str(sms.messages(NEW)[-1]["message"])
        assert not any("RFD_" in str(m["message"]) for m in sms.messages(OLD))


async def test_her_payments_from_her_new_number_refund_as_before(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    _server, _sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW})
        phone = AtPhone(client, NEW)
        await phone.dial()
        types = await phone.send("1")
        await phone.send(option(types, "Monthly Rent"))
        reference = reference_on(await phone.send("1"))
        await drain(worker)
        for _ in range(50):
            if app[STATE].prompts.pending(NEW):
                break
            await asyncio.sleep(0.02)
        [prompt] = app[STATE].prompts.pending(NEW)
        app[STATE].prompts.decide(prompt.reference, True)
        await settle(rt, worker, app)
        paid = await _payment(rt, reference)
        await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={"idempotencyKey": idem()})
        await settle(rt, worker, app)
        assert [r["referenceIdToRefund"] for r in app[REFUNDS_SENT]] == [paid.provider_reference]


SISTER = "+250788123789"  # Béatrice, Aline's sister, a member too


async def test_two_sisters_swap_their_phones(rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Two members exchanging numbers: each number is held by the other, so a correction alone is refused whichever
    goes first (one member per number). The 409 names who holds it and the way: phoneChange SWAP."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await make_payment(rt, demo["cooperative_id"], account=OLD, member_id=aline)
    sister = (await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER}))["id"]
    for key in (*phone_keys(rt.cipher.blind_index(OLD)), *phone_keys(rt.cipher.blind_index(SISTER))):
        await rt.redis.set(key, "rw")
    refused = await admin.json("PATCH", f"/v1/members/{aline}", 409, json={"phone": SISTER})
    assert refused["message"] == (f"a member with this phone number already exists in this cooperative (member "
                                  f"{sister}): correct hers first, or, if the two members exchange their numbers "
                                  "(sisters swapping phones), send phoneChange SWAP"), refused
    assert refused["code"] == "MEMBER_PHONE_TAKEN"
    nobody = await admin.json("PATCH", f"/v1/members/{aline}", 409, json={"phone": NEW, "phoneChange": "SWAP"})
    assert nobody["field"] == "phoneChange"
    swapped = await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    assert swapped["phone"] == "+25078****789"
    assert (await admin.json("GET", f"/v1/members/{sister}", 200))["phone"] == "+25078****001"
    assert [m["id"] for m in (await admin.json("GET", f"/v1/members?phone={OLD}", 200))["data"]] == [sister]
    assert [m["id"] for m in (await admin.json("GET", f"/v1/members?phone={SISTER}", 200))["data"]] == [aline]
    async with rt.sessionmaker() as s:
        assert (await s.get(Payment, paid.id)).member_id == aline  # her history stays hers
        events = (await s.execute(select(AuditEvent).where(AuditEvent.action == "member.updated")
                                  .order_by(AuditEvent.id))).scalars().all()
    assert [(e.entity_id, e.before["phone"], e.after["phone"], e.after.get("swappedWith")) for e in events] == [
        (sister, "+25078****789", "+25078****001", aline), (aline, "+25078****001", "+25078****789", sister)]
    assert all(e.actor == events[0].actor and e.actor.startswith("admin:") for e in events)
    # Neither number's USSD language is carried over to the sister who now holds it.
    assert await rt.redis.exists(*phone_keys(rt.cipher.blind_index(OLD)),
                                 *phone_keys(rt.cipher.blind_index(SISTER))) == 0
    # Her old number dials as her sister, a member.
    home = await AtPhone(client, OLD).dial()
    assert home.startswith("CON Welcome to Kigali"), home


async def test_her_prompt_never_approved_fails_to_her_new_number(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """The lost SIM's prompt declined (or expired): the payment fails cleanly, its SMS to her new number only, and
    from it she pays again."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        reference, prompt = await _pending_rent(client, rt, worker, app)
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW})
        app[STATE].prompts.decide(prompt.reference, False)
        await settle(rt, worker, app)
        failed = await _payment(rt, reference)
        assert failed.status == "CANCELLED"  # declined at the prompt
        [told] = [str(m["message"]) for m in sms.messages(NEW)]
        assert reference in told
        assert sms.messages(OLD) == []
        shown = await admin.json("GET", f"/v1/payments/{failed.id}", 200)
        assert (shown["status"], shown["memberId"], shown["paymentAccount"]) == ("CANCELLED", aline, "+25078****001")
        phone = AtPhone(client, NEW)
        await phone.dial()
        types = await phone.send("1")
        await phone.send(option(types, "Monthly Rent"))
        assert (await phone.send("1")).startswith("END Emeza")  # her PIN prompt, in Kinyarwanda


async def test_her_lost_sims_open_prompt_does_not_keep_her_from_paying_from_her_new_number(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Her rent's PIN prompt waits on the lost SIM (only her PIN there approves it): moved to her new number, she
    paid her rent again from it and was told for up to ~15 minutes that a payment awaits her approval "on your
    phone" (the lost one), no payment made. Now the open payment of a number she no longer holds does not stop her;
    if that old prompt was approved before the SIM went (MTN answering late), it counts for her period as before."""
    _server, _sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        old_reference, old_prompt = await _pending_rent(client, rt, worker, app)
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
        phone = AtPhone(client, NEW)
        await phone.dial()
        types = await phone.send("1")
        await phone.send(option(types, "Monthly Rent"))
        done = await phone.send("1")
        assert done.startswith("END Emeza"), done  # her PIN prompt, on her new number
        assert old_reference not in done, done
        reference = reference_on(done)
        await drain(worker)
        for _ in range(50):
            if app[STATE].prompts.pending(NEW):
                break
            await asyncio.sleep(0.02)
        [new_prompt] = app[STATE].prompts.pending(NEW)
        # The lost SIM's prompt was approved before it went; her new one she declines, seeing that.
        app[STATE].prompts.decide(old_prompt.reference, True)
        app[STATE].prompts.decide(new_prompt.reference, False)
        await settle(rt, worker, app)
        assert ((await _payment(rt, old_reference)).status, (await _payment(rt, reference)).status) == (
            "COMPLETED", "CANCELLED")
        # Her month is paid: the old SIM's payment counts for her.
        again = AtPhone(client, NEW)
        await again.dial()
        types = await again.send("1")
        assert (await again.send(option(types, "Monthly Rent"))).startswith("CON Wamaze kwishyura")


async def test_an_open_payment_from_her_own_number_still_waits(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Not moved, she dials again while her prompt waits: told it waits, no second payment (as before)."""
    _server, _sms = await start_simulator(aiohttp_server, rt)
    async with mtn(rt, aiohttp_server) as app:
        reference, _prompt = await _pending_rent(client, rt, worker, app)
        phone = AtPhone(client, OLD)
        await phone.dial()
        types = await phone.send("1")
        await phone.send(option(types, "Monthly Rent"))
        waiting = await phone.send("1")
        assert reference in waiting and "telefoni yawe" in waiting, waiting


HUSBAND = "+250788123111"  # Aline's husband, who pays for her sometimes


async def _paid_from(rt: Any, demo: dict[str, Any], account: str, member_id: str) -> Payment:
    """Her rent, COMPLETED, paid from `account` (last January: before any correction of her number)."""
    paid = await make_payment(rt, demo["cooperative_id"], account=account, member_id=member_id)
    async with rt.sessionmaker.begin() as s:
        row = await s.get(Payment, paid.id)
        row.payment_account_masked = mask(account)
    return paid


async def test_a_payment_her_husband_made_for_her_refunds_to_him_after_her_new_sim(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Paid from her husband's number, never hers: the refund goes back to his wallet, as it would have before she
    changed SIMs. It was refused as paid "from a number that is no longer its member's"."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await _paid_from(rt, demo, HUSBAND, aline)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
    await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={"idempotencyKey": idem()})


async def test_a_payment_from_a_number_typed_wrong_refunds_to_the_number_that_paid(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Registered under a number typed wrong, its holder was taken for her and paid from it; corrected as a TYPO, the
    number was never hers: a refund goes back to the wallet that paid, as before the correction. Her own old number
    (NEW_SIM) is still confirmed first."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    typed = await _paid_from(rt, demo, OLD, aline)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "TYPO"})
    await admin.json("POST", f"/v1/payments/{typed.id}/refunds", 201, json={"idempotencyKey": idem()})
    hers = await _paid_from(rt, demo, NEW, aline)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "NEW_SIM"})
    refused = await admin.json("POST", f"/v1/payments/{hers.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert refused["code"] == "PAYING_NUMBER_CHANGED", refused


async def test_a_swapped_number_is_confirmed_before_a_refund_goes_to_her_sister(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await _paid_from(rt, demo, OLD, aline)
    await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert refused["code"] == "PAYING_NUMBER_CHANGED", refused


async def test_a_payment_refunded_already_says_so_before_asking_where_to_send(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Refunded in full while she held her old number, then moved: a second refund was refused 409 asking for
    toPayingNumber, and sent with it, 422 (nothing left). Now the 422 first; a part left still asks where to."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    whole = await _paid_from(rt, demo, OLD, aline)
    part = await _paid_from(rt, demo, OLD, aline)
    await admin.json("POST", f"/v1/payments/{whole.id}/refunds", 201, json={"idempotencyKey": idem()})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
    nothing = await admin.json("POST", f"/v1/payments/{whole.id}/refunds", 422, json={"idempotencyKey": idem()})
    assert nothing["code"] == "REFUND_EXCEEDS_REFUNDABLE", nothing
    too_much = await admin.json("POST", f"/v1/payments/{part.id}/refunds", 422,
                                json={"idempotencyKey": idem(), "amount": 60000})
    assert too_much["code"] == "REFUND_EXCEEDS_REFUNDABLE", too_much
    asked = await admin.json("POST", f"/v1/payments/{part.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert asked["code"] == "PAYING_NUMBER_CHANGED", asked


async def test_her_husband_still_asks_by_sms_about_what_he_paid_for_her_after_her_new_sim(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """The number that paid is answered about its payment for SMS_PAYER_ANSWER_DAYS: her husband's, never hers, was
    told "not found" once she changed SIMs (the rule meant for her old number, which a stranger may hold now)."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await make_payment(rt, demo["cooperative_id"], account=HUSBAND, member_id=aline,
                              created_at=datetime.now(UTC) - timedelta(minutes=5))
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, paid.id)).payment_account_masked = mask(HUSBAND)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
    async with mtn(rt, aiohttp_server) as app:
        await _texts(client, rt, worker, app, HUSBAND, f"STATUS {paid.reference}")
    [told] = [str(m["message"]) for m in sms.messages(HUSBAND)]
    assert paid.reference in told and not told.startswith("No payment"), told


async def test_after_a_swap_her_sister_learns_nothing_of_what_her_number_paid_for_a_friend(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Aline paid Jean Bosco's rent from her number at the office (the number that paid is answered about it for
    SMS_PAYER_ANSWER_DAYS). The sisters then swapped phones: her old number is Béatrice's now, a member whose number
    came to her after the payment, so not its payer. She read Jean Bosco's rent (STATUS: amount, type, status)."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline, friend = demo["members"][OLD], demo["members"]["+250788000002"]
    paid = await make_payment(rt, demo["cooperative_id"], account=OLD, member_id=friend,
                              created_at=datetime.now(UTC) - timedelta(minutes=5))
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, paid.id)).payment_account_masked = mask(OLD)
    sister = (await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER}))["id"]
    async with mtn(rt, aiohttp_server) as app:
        await _texts(client, rt, worker, app, OLD, f"STATUS {paid.reference}")
        [told] = [str(m["message"]) for m in sms.messages(OLD)]
        assert paid.reference in told and not told.startswith("No payment"), told  # Aline, who paid it
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
        assert (await admin.json("GET", f"/v1/members/{sister}", 200))["phone"] == mask(OLD)
        await _texts(client, rt, worker, app, OLD, f"STATUS {paid.reference}", f"RECEIPT {paid.reference}")
    told = [str(m["message"]) for m in sms.messages(OLD)][1:]
    assert len(told) == 2 and all(text.startswith("No payment") for text in told), told


async def test_a_payment_her_number_made_for_a_friend_is_confirmed_before_a_refund_goes_to_her_sister(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Aline paid Jean Bosco's rent from her number; the sisters swapped phones since. MTN refunds to the number that
    paid, Béatrice's now: sent unasked (Jean Bosco's number never changed), as her own payment's refund is not."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline, friend = demo["members"][OLD], demo["members"]["+250788000002"]
    paid = await _paid_from(rt, demo, OLD, friend)
    await admin.json("POST", "/v1/members", 201, json={"name": "Beatrice Uwase", "phone": SISTER})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "SWAP"})
    refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert (refused["code"], refused["field"]) == ("PAYING_NUMBER_CHANGED", "toPayingNumber"), refused
    assert "+25078****001" in refused["message"], refused
    await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                     json={"idempotencyKey": idem(), "toPayingNumber": True})


async def _rent_paid(client: Any, rt: Any, worker: Any, app: web.Application) -> Payment:
    """Aline pays her rent from her old SIM, approved: COMPLETED."""
    reference, prompt = await _pending_rent(client, rt, worker, app)
    app[STATE].prompts.decide(prompt.reference, True)
    await settle(rt, worker, app)
    return await _payment(rt, reference)


def _not_sent(masked: str) -> str:
    return (f"PAYING_NUMBER_CHANGED: not sent: {masked}, the number that paid, is no longer its member's (changed "
            "since the refund was asked): make it again with toPayingNumber if she still holds that wallet")


async def _webhooks(rt: Any, refund_ids: list[str]) -> list[str]:
    async with rt.sessionmaker() as s:
        return sorted((await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.dedupe_key.in_(
            [f"wh:evt_refund_failed_{refund_id}" for refund_id in refund_ids])))).scalars())


async def test_a_refund_queued_before_her_new_sim_is_not_sent_to_her_old_number(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Her rent refunded in part, and her dispute resolved with a refund, while she held her old SIM (the API let
    both through: the number was hers); before the worker sent them she lost the SIM and was moved to her new
    number. Both went to her old number, a stranger's now, unchecked. The worker checks as the API does: neither
    is sent; each FAILED with a reason the admin acts on, she is told on her new number, the cooperative by
    refund.failed, the dispute noted; made again with toPayingNumber (she still holds that wallet), it goes."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        paid = await _rent_paid(client, rt, worker, app)
        dispute = await admin.json("POST", "/v1/disputes", 201, json={
            "paymentId": paid.id, "reason": "OTHER", "note": "paid twice"})
        await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
            "status": "RESOLVED", "note": "refunded", "refundAmount": 20000})
        overpaid = {"amount": 10000, "reason": "overpaid", "idempotencyKey": idem()}
        await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json=overpaid)
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
        await settle(rt, worker, app)
        assert app[REFUNDS_SENT] == []
        # Sent again with its key and toPayingNumber, it is another request (not its FAILED refund answered back
        # as if it were that one's): the admin is told to use a new key.
        reused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409,
                                  json={**overpaid, "toPayingNumber": True})
        assert reused["code"] == "IDEMPOTENCY_KEY_REUSED"
        refunds = (await admin.json("GET", f"/v1/payments/{paid.id}/refunds", 200))["data"]
        assert [(r["status"], r["failureReason"]) for r in refunds] == [("FAILED", _not_sent("+25078****001"))] * 2
        assert await _webhooks(rt, [r["id"] for r in refunds]) == sorted(
            f"wh:evt_refund_failed_{r['id']}" for r in refunds)
        told = [str(m["message"]) for m in sms.messages(NEW)]
        assert sorted(r["reference"] for r in refunds) == sorted(
            r["reference"] for r in refunds if any(r["reference"] in text for text in told)), told
        assert not any("RFD_" in str(m["message"]) for m in sms.messages(OLD))
        notes = [n["text"] for n in (await admin.json("GET", f"/v1/disputes/{dispute['id']}", 200))["notes"]]
        assert any("failed" in (text or "") and "PAYING_NUMBER_CHANGED" in (text or "") for text in notes), notes
        assert (await admin.json("GET", f"/v1/payments/{paid.id}", 200))["status"] == "COMPLETED"
        # She still holds that wallet: made again with toPayingNumber, it goes there.
        again = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                                 json={"amount": 30000, "idempotencyKey": idem(), "toPayingNumber": True})
        await settle(rt, worker, app)
        [sent] = app[REFUNDS_SENT]
        assert sent["referenceIdToRefund"] == paid.provider_reference
        assert (await admin.json("GET", f"/v1/refunds/{again['id']}", 200))["status"] == "COMPLETED"


async def test_a_refund_queued_while_the_number_was_still_hers_goes_once_it_is_her_new_one_that_changed(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Asked with toPayingNumber after her new SIM (she still holds the old wallet), then her new number corrected
    as a TYPO before the worker sent it: the number that paid is not concerned, and the admin's word stands."""
    _server, _sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    async with mtn(rt, aiohttp_server) as app:
        paid = await _rent_paid(client, rt, worker, app)
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": NEW, "phoneChange": "NEW_SIM"})
        await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                         json={"idempotencyKey": idem(), "toPayingNumber": True})
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "TYPO"})
        await settle(rt, worker, app)
        assert [r["referenceIdToRefund"] for r in app[REFUNDS_SENT]] == [paid.provider_reference]


STRANGER = "+250788123222"  # a number no member had when it paid


async def _paid_by_number(rt: Any, demo: dict[str, Any], account: str, member_id: str | None = None,
                          status: str = "COMPLETED") -> Payment:
    paid = await make_payment(rt, demo["cooperative_id"], account=account, member_id=member_id, status=status,
                              created_at=datetime.now(UTC) - timedelta(minutes=5))
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, paid.id)).payment_account_masked = mask(account)
    return paid


async def test_a_payment_of_no_member_is_confirmed_before_a_refund_goes_to_the_member_who_got_its_number(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Paid from a number no member had (an API payment for it); Aline then moved to that number (a new SIM: the
    operator gave it to her). MTN refunds to the number that paid, hers now: it went unasked, as a member's
    payment from a number another member got since is not. A TYPO correction (the number was hers all along) asks
    nothing."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await _paid_by_number(rt, demo, STRANGER)
    typed = await _paid_by_number(rt, demo, SISTER)
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": SISTER, "phoneChange": "TYPO"})
    await admin.json("POST", f"/v1/payments/{typed.id}/refunds", 201, json={"idempotencyKey": idem()})
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409, json={"idempotencyKey": idem()})
    assert (refused["code"], refused["field"]) == ("PAYING_NUMBER_CHANGED", "toPayingNumber"), refused
    assert "+25078****222" in refused["message"], refused
    await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                     json={"idempotencyKey": idem(), "toPayingNumber": True})


async def test_a_released_members_payment_is_confirmed_before_a_refund_goes_to_the_member_who_got_her_number(
        rt: Any, demo: dict[str, Any], client: Any) -> None:
    """Jean Bosco left (suspended, his number released); Aline was moved to his old number since (NEW_SIM). A refund
    of what he paid from it went to her wallet unasked."""
    admin: Caller = await bearer(client, *demo["admin"])
    aline, jean = demo["members"][OLD], demo["members"]["+250788000002"]
    paid = await _paid_by_number(rt, demo, "+250788000002", jean)
    await admin.json("DELETE", f"/v1/members/{jean}", 200)
    await admin.json("POST", f"/v1/members/{jean}/release-phone", 200)
    await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                     json={"amount": 10000, "idempotencyKey": idem()})  # nobody holds it yet: as before
    await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": "+250788000002", "phoneChange": "NEW_SIM"})
    refused = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 409,
                               json={"amount": 10000, "idempotencyKey": idem()})
    assert refused["code"] == "PAYING_NUMBER_CHANGED", refused


async def test_a_refund_of_no_members_payment_queued_before_its_number_moved_is_not_sent(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Asked while no member had the number that paid; before it was sent Aline was moved to that number. Not
    sent: FAILED, the cooperative told; the number, hers now, is told nothing of another's payment."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    aline = demo["members"][OLD]
    paid = await _paid_by_number(rt, demo, STRANGER)
    async with mtn(rt, aiohttp_server) as app:
        refund = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={"idempotencyKey": idem()})
        await admin.json("PATCH", f"/v1/members/{aline}", 200, json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
        await settle(rt, worker, app)
        assert app[REFUNDS_SENT] == []
    shown = await admin.json("GET", f"/v1/refunds/{refund['id']}", 200)
    assert shown["status"] == "FAILED" and shown["failureReason"].startswith(
        "PAYING_NUMBER_CHANGED: not sent: +25078****222, the number that paid, went to another member"), shown
    assert await _webhooks(rt, [refund["id"]]) == [f"wh:evt_refund_failed_{refund['id']}"]
    assert not any(paid.reference in str(m["message"]) for m in sms.messages(STRANGER))


async def _refund_answered_504(rt: Any, demo: dict[str, Any], admin: Caller, worker: Any) -> tuple[Routes, str]:
    """Aline's rent (paid from her own number, OLD) refunded in full; MTN answered the refund's first try 504 (its
    back end not answering in time: it may still carry the refund out, and takes it once by its reference)."""
    wire = mtn_wire().on("POST", REFUND_PATH, 504)
    mtn_adapter(rt, wire)
    async with rt.sessionmaker.begin() as s:
        payment, _ = await create_payment(s, rt, mtn_payment(demo), actor=ADMIN)
    await completed(rt, payment)
    refund = await admin.json("POST", f"/v1/payments/{payment.id}/refunds", 201, json={"idempotencyKey": idem()})
    await drain(worker)
    [job] = await _submission(rt, refund["id"])
    assert job.status == "PENDING" and job.last_error.startswith(CALL_SENT), job.last_error
    return wire, refund["id"]


async def test_a_refund_a_504_may_have_carried_out_is_not_failed_when_her_number_changes_before_its_next_try(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any) -> None:
    """Her number corrected (NEW_SIM) between a try MTN answered 504 and the next: the refund was FAILED as never
    sent (its amount refundable again, the dispute told she was not paid back) while MTN carried out the first try
    and paid her old wallet: a second refund paid her twice. Neither sent again blind nor failed: MTN is asked."""
    admin: Caller = await bearer(client, *demo["admin"])
    wire, refund_id = await _refund_answered_504(rt, demo, admin, worker)
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": NEW, "phoneChange": "NEW_SIM"})
    wire.on("POST", REFUND_PATH, 202).on("GET", f"{REFUND_PATH}/*", 200,
                                         load("mtn_momo", "refund_status_successful.json"))
    await due_now(rt, "refund.submit")
    await drain(worker)
    assert (await admin.json("GET", f"/v1/refunds/{refund_id}", 200))["status"] == "PROCESSING"
    assert len(wire.sent("POST", REFUND_PATH)) == 1  # not sent again to a number that may be a stranger's now
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert (await admin.json("GET", f"/v1/refunds/{refund_id}", 200))["status"] == "COMPLETED"


async def test_a_refund_mtn_never_got_is_not_sent_again_once_her_number_changed(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any) -> None:
    """As above, but MTN has no refund of that reference (the first try never reached it): sent again it went to
    her old number, a stranger's now, unchecked (the poll's resend). FAILED as the worker's first send would be."""
    admin: Caller = await bearer(client, *demo["admin"])
    wire, refund_id = await _refund_answered_504(rt, demo, admin, worker)
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": NEW, "phoneChange": "NEW_SIM"})
    wire.on("POST", REFUND_PATH, 202).on("GET", f"{REFUND_PATH}/*", 404)
    for kind in ("refund.submit", "refund.poll"):
        await due_now(rt, kind)
        await drain(worker)
    assert len(wire.sent("POST", REFUND_PATH)) == 1
    shown = await admin.json("GET", f"/v1/refunds/{refund_id}", 200)
    assert (shown["status"], shown["failureReason"]) == ("FAILED", _not_sent("+25078****001")), shown


async def _refund_texts(rt: Any, refund_id: str) -> tuple[list[str], list[str]]:
    """The refund's SMS: the jobs queued (their dedupe keys) and the messages the worker stored (their templates and
    the number each went to, masked)."""
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind == "sms.send", OutboxJob.dedupe_key.like(f"sms:refund_%:{refund_id}")))).scalars().all()
        stored = (await s.execute(select(SmsMessage.template, SmsMessage.phone_masked).where(
            SmsMessage.idempotency_key.like(f"refund_%:{refund_id}")))).all()
    return sorted(jobs), sorted(f"{template} {masked}" for template, masked in stored)


async def _not_told(rt: Any, refund_id: str) -> list[dict[str, Any]]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_type == "refund", AuditEvent.entity_id == refund_id,
            AuditEvent.action == "refund.payer_not_told"))).scalars())


async def _in_flight(rt: Any, admin: Caller, worker: Any, paid: Payment) -> tuple[Routes, str]:
    """A refund of `paid` MTN took without its outcome yet (202: PROCESSING, its status asked later)."""
    wire = mtn_wire().on("POST", REFUND_PATH, 202)
    mtn_adapter(rt, wire)
    refund = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={"idempotencyKey": idem()})
    await drain(worker)
    assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "PROCESSING"
    return wire, refund["id"]


REFUND_FAILED_AT_MTN = {**load("mtn_momo", "refund_status_successful.json"), "status": "FAILED",
                        "reason": "PAYEE_NOT_FOUND"}


@pytest.mark.parametrize("settled", ["COMPLETED", "FAILED"])
@pytest.mark.parametrize("moved", [True, False])
async def test_a_refund_of_no_members_payment_settled_after_its_number_moved_is_not_texted_to_it(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any, settled: str,
        moved: bool) -> None:
    """Paid from a number no member had; its refund sent while no member had it either (its payer, told at the
    number that paid, as of the receipt). Before MTN settled it Aline was moved to that number (NEW_SIM): "your
    refund of ... was sent" (or "failed"), another's payment, went to her phone. Not texted now; the cooperative's
    system is told (refund.completed or refund.failed) and the audit log says why the payer was not. Not moved, the
    payer is told at the number that paid, as before."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER)
    wire, refund_id = await _in_flight(rt, admin, worker, paid)
    if moved:
        await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                         json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    wire.on("GET", f"{REFUND_PATH}/*", 200, load("mtn_momo", "refund_status_successful.json")
            if settled == "COMPLETED" else REFUND_FAILED_AT_MTN)
    await due_now(rt, "refund.poll")
    await drain(worker)
    assert (await admin.json("GET", f"/v1/refunds/{refund_id}", 200))["status"] == settled
    template, event = ("refund_completed", "refund_completed") if settled == "COMPLETED" else (
        "refund_failed", "refund_failed")
    async with rt.sessionmaker() as s:
        assert (await s.execute(select(OutboxJob.kind).where(
            OutboxJob.dedupe_key == f"wh:evt_{event}_{refund_id}"))).scalar_one() == "webhook.event"
    jobs, stored = await _refund_texts(rt, refund_id)
    if moved:
        assert (jobs, stored) == ([], [])
        assert not any(paid.reference in str(m["message"]) for m in sms.messages(STRANGER))
        assert await _not_told(rt, refund_id) == [{"template": template, "paymentAccount": "+25078****222",
                                                    "reason": "went_to_another"}]
    else:
        assert (jobs, stored) == ([f"sms:{template}:{refund_id}"], [f"{template} +25078****222"])
        assert await _not_told(rt, refund_id) == []


async def test_a_refund_of_no_members_payment_the_admin_sends_to_its_number_is_not_texted_to_its_new_holder(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Aline got the number that paid since (NEW_SIM). The admin sends the refund there all the same
    (toPayingNumber: its payer says he still holds that wallet), or records the one MTN made (returnedByProvider):
    the money is as he decided, but the number is Aline's by the cooperative's own records, and she is not texted
    another's refund. The cooperative's system is told."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER)
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    mtn_adapter(rt, mtn_wire().on("POST", REFUND_PATH, 202).on("GET", f"{REFUND_PATH}/*", 200,
                                                                  load("mtn_momo", "refund_status_successful.json")))
    sent = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201,
                            json={"amount": 20000, "idempotencyKey": idem(), "toPayingNumber": True})
    await drain(worker)
    await due_now(rt, "refund.poll")
    await drain(worker)
    returned = await admin.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
        "amount": 10000, "idempotencyKey": idem(), "returnedByProvider": {"providerTransactionId": "MTN-REV-31"}})
    await drain(worker)
    for refund in (sent, returned):
        assert (await admin.json("GET", f"/v1/refunds/{refund['id']}", 200))["status"] == "COMPLETED"
        async with rt.sessionmaker() as s:
            assert (await s.execute(select(OutboxJob.kind).where(
                OutboxJob.dedupe_key == f"wh:evt_refund_completed_{refund['id']}"))).scalar_one() == "webhook.event"
        assert await _refund_texts(rt, refund["id"]) == ([], [])
        assert [after["template"] for after in await _not_told(rt, refund["id"])] == ["refund_completed"]
    assert not any(paid.reference in str(m["message"]) for m in sms.messages(STRANGER))


async def _dispute_texts(rt: Any, dispute_id: str) -> tuple[list[str], list[str]]:
    """The dispute's SMS: the jobs queued (their dedupe keys) and the messages the worker stored (their templates and
    the number each went to, masked)."""
    async with rt.sessionmaker() as s:
        jobs = (await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind == "sms.send", OutboxJob.dedupe_key.like(f"sms:dispute_%:{dispute_id}:%")))).scalars().all()
        stored = (await s.execute(select(SmsMessage.template, SmsMessage.phone_masked).where(
            SmsMessage.idempotency_key.like(f"dispute_%:{dispute_id}:%")))).all()
    return sorted(jobs), sorted(f"{template} {masked}" for template, masked in stored)


async def _sent(rt: Any, worker: Any) -> None:
    """The SMS queued sent now (a dispute's next is queued a few seconds after the one before: SMS_SPACING)."""
    for _ in range(3):
        await due_now(rt, "sms.send")
        await drain(worker)


@pytest.mark.parametrize("moved", ["never", "before_it_was_opened", "while_it_was_open"])
async def test_a_dispute_of_no_members_payment_is_not_texted_to_a_member_who_got_its_number(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any, moved: str) -> None:
    """A dispute of a payment from a number no member had: its payer is told of each change at the number that paid,
    as a refund's outcome is. Aline was moved to that number (NEW_SIM) before the dispute was opened, or while it was
    open: "dispute ... about payment ... is closed", another's payment, went to her phone. Not texted once she holds
    it; the cooperative's system is told of every change, and the audit log says why the payer was not. Not moved,
    the payer is told of each, as before."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER)

    async def move() -> None:
        await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                         json={"phone": STRANGER, "phoneChange": "NEW_SIM"})

    if moved == "before_it_was_opened":
        await move()
    dispute = await admin.json("POST", "/v1/disputes", 201, json={"paymentId": paid.id, "reason": "OTHER"})
    await _sent(rt, worker)
    if moved == "while_it_was_open":
        await move()
    for status in ("UNDER_REVIEW", "REJECTED"):
        await admin.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200,
                         json={"status": status, "note": "paid as asked"})
    await _sent(rt, worker)
    dispute_id = dispute["id"]
    async with rt.sessionmaker() as s:
        assert sorted((await s.execute(select(OutboxJob.dedupe_key).where(
            OutboxJob.kind == "webhook.event", OutboxJob.dedupe_key.like(f"wh:evt_dispute_%_{dispute_id}_%"))))
            .scalars()) == [f"wh:evt_dispute_opened_{dispute_id}_opened",
                            f"wh:evt_dispute_updated_{dispute_id}_rejected",
                            f"wh:evt_dispute_updated_{dispute_id}_under_review"]
        not_told = [after for after, in (await s.execute(select(AuditEvent.after).where(
            AuditEvent.entity_type == "dispute", AuditEvent.entity_id == dispute_id,
            AuditEvent.action == "dispute.payer_not_told").order_by(AuditEvent.at, AuditEvent.id))).all()]
    told = {"never": ["opened", "under_review", "rejected"], "before_it_was_opened": [],
            "while_it_was_open": ["opened"]}[moved]
    template = {"opened": "dispute_opened", "under_review": "dispute_updated", "rejected": "dispute_resolved"}
    jobs, stored = await _dispute_texts(rt, dispute_id)
    assert jobs == sorted(f"sms:{template[step]}:{dispute_id}:{step}" for step in told)
    assert stored == sorted(f"{template[step]} +25078****222" for step in told)
    texted = [m["message"] for m in sms.messages(STRANGER) if dispute["reference"] in str(m["message"])]
    assert len(texted) == len(told), texted
    assert not_told == [{"template": template[step], "paymentAccount": "+25078****222", "reason": "went_to_another"}
                        for step in ("opened", "under_review", "rejected") if step not in told]


@pytest.mark.parametrize("stored", [False, True])
async def test_a_refund_sms_queued_before_its_number_moved_is_not_sent_after(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any, stored: bool) -> None:
    """The refund of a payment of no member completed while no member had the number that paid: its SMS was
    queued to it, the payer's then. Before the worker's turn (the aggregator down, the outbox behind; `stored`: a
    first attempt stored it and failed at Africa's Talking) Aline was moved to that number (NEW_SIM). Sent now,
    "your refund of ..." told her of another's payment: not sent (the job says why; a stored message ends FAILED,
    not sent), as one queued after the move is not queued at all."""
    from core.audit import Actor
    from core.models import Refund
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome

    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER)
    _wire, refund_id = await _in_flight(rt, admin, worker, paid)
    async with rt.sessionmaker.begin() as s:
        refund = await s.get(Refund, refund_id)
        assert refund is not None
        await apply_refund_outcome(s, rt, refund, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"))
    key = f"sms:refund_completed:{refund_id}"
    assert (await _refund_texts(rt, refund_id))[0] == [key]  # to the number that paid, its payer's still
    if stored:
        sms.set_failure("http503", number=STRANGER, times=1)  # AT refuses it once: stored, QUEUED, retried later
        await drain(worker)
        assert (await _refund_texts(rt, refund_id))[1] == ["refund_completed +25078****222"]
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await due_now(rt, "sms.send")
    await drain(worker)
    assert not any(paid.reference in str(m["message"]) for m in sms.messages(STRANGER))
    async with rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == key))).scalar_one()
        rows = (await s.execute(select(SmsMessage.status, SmsMessage.failure_reason).where(
            SmsMessage.idempotency_key == key.removeprefix("sms:")))).all()
    assert (job.status, job.last_error) == ("DONE", "not sent: number_went_to_a_member")
    assert rows == ([("FAILED", "not sent: number_went_to_a_member")] if stored else [])


async def _settled(rt: Any, paid: Payment, outcome: str) -> None:
    """The provider's outcome of `paid` applied (as its callback or a status poll does): its notices queued."""
    from core.audit import Actor
    from core.ports import ProviderOutcome
    from core.provider_events import apply_collection_outcome

    async with rt.sessionmaker.begin() as s:
        payment = await s.get(Payment, paid.id, with_for_update=True)
        assert payment is not None
        await apply_collection_outcome(s, rt, payment, ProviderOutcome(outcome), actor=Actor("provider:t", "provider"))


async def _payment_text(rt: Any, key: str) -> tuple[tuple[str, str | None], list[tuple[str, str | None]]]:
    """The SMS job of `key` (its status and last error) and the message the worker stored for it (its status and
    failure reason)."""
    async with rt.sessionmaker() as s:
        job = (await s.execute(select(OutboxJob).where(OutboxJob.dedupe_key == key))).scalar_one()
        rows = (await s.execute(select(SmsMessage.status, SmsMessage.failure_reason).where(
            SmsMessage.idempotency_key == key.removeprefix("sms:")))).all()
    return (job.status, job.last_error), [tuple(row) for row in rows]


@pytest.mark.parametrize(("outcome", "template"), [("SUCCEEDED", "payment_receipt"), ("FAILED", "payment_failed")])
@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("moved", [True, False])
async def test_a_payment_sms_queued_before_its_number_moved_is_not_sent_after(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any, outcome: str, template: str,
        stored: bool, moved: bool) -> None:
    """A payment of no member settled while no member had the number that paid: its receipt (or "your payment
    failed") was queued to it, the payer's then. Before the worker's turn (the aggregator down, the outbox behind;
    `stored`: a first attempt stored it and failed at Africa's Talking) Aline was moved to that number (NEW_SIM).
    Sent now, it told her of another's payment (its amount, its reference): not sent (the job says why; a stored
    message ends FAILED, not sent), as a refund's is not. The number not moved: sent, as ever."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER, status="PROCESSING")
    await _settled(rt, paid, outcome)
    key = f"sms:{template}:{paid.id}"
    if stored:
        sms.set_failure("http503", number=STRANGER, times=1)  # AT refuses it once: stored, QUEUED, retried later
        await drain(worker)
        assert [status for status, _why in (await _payment_text(rt, key))[1]] == ["QUEUED"]
    if moved:
        await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                         json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await due_now(rt, "sms.send")
    await drain(worker)
    texts = [m for m in sms.messages(STRANGER) if paid.reference in str(m["message"])]
    job, rows = await _payment_text(rt, key)
    if not moved:
        assert len(texts) == 1 and job[0] == "DONE" and [status for status, _why in rows] == ["SENT"], (job, rows)
        return
    assert texts == []
    assert job == ("DONE", "not sent: number_went_to_a_member")
    assert rows == ([("FAILED", "not sent: number_went_to_a_member")] if stored else [])


async def test_a_late_receipt_of_no_members_payment_after_its_number_moved_is_not_sent(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """The payment of no member timed out (its payer told so, at the number that paid); Aline was then moved to that
    number (NEW_SIM), and MTN's late success came after: its late receipt ("the money was taken after all") is
    queued with the webhook event, and not sent to her at the worker's turn. The cooperative's system is told."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER, status="PROCESSING")
    await _settled(rt, paid, "EXPIRED")
    await drain(worker)
    assert [m for m in sms.messages(STRANGER) if paid.reference in str(m["message"])] != []  # the payer's, then
    told = len(sms.messages(STRANGER))
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await _settled(rt, paid, "SUCCEEDED")
    await due_now(rt, "sms.send")
    await drain(worker)
    assert len(sms.messages(STRANGER)) == told
    job, rows = await _payment_text(rt, f"sms:payment_late_receipt:{paid.id}")
    assert (job, rows) == (("DONE", "not sent: number_went_to_a_member"), [])
    async with rt.sessionmaker() as s:
        events = (await s.execute(select(OutboxJob.dedupe_key).where(OutboxJob.kind == "webhook.event"))).scalars()
        assert f"wh:evt_payment_completed_{paid.id}" in list(events)


async def test_a_members_receipt_goes_to_her_when_the_number_that_paid_it_moved(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any) -> None:
    """Jean's payment, made from a number not his (a friend's): its receipt goes to Jean, whoever got the number
    that paid since (Aline, NEW_SIM): the check is for the SMS to a payer of no member's number only."""
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    jean = "+250788000002"
    paid = await _paid_by_number(rt, demo, STRANGER, member_id=demo["members"][jean], status="PROCESSING")
    await _settled(rt, paid, "SUCCEEDED")
    await admin.json("PATCH", f"/v1/members/{demo['members'][OLD]}", 200,
                     json={"phone": STRANGER, "phoneChange": "NEW_SIM"})
    await due_now(rt, "sms.send")
    await drain(worker)
    assert [m for m in sms.messages(jean) if paid.reference in str(m["message"])] != []
    job, rows = await _payment_text(rt, f"sms:payment_receipt:{paid.id}")
    assert job == ("DONE", None) and [status for status, _why in rows] == ["SENT"], (job, rows)


async def _aged(rt: Any, paid: Payment, days: int) -> None:
    async with rt.sessionmaker.begin() as s:
        (await s.get(Payment, paid.id)).created_at = datetime.now(UTC) - timedelta(days=days)


@pytest.mark.parametrize("template", ["refund_completed", "payment_receipt"])
@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("answer_days", [90, 0])
async def test_an_sms_queued_to_the_paying_number_is_not_sent_once_its_payment_is_older_than_answer_days(
        rt: Any, demo: dict[str, Any], client: Any, worker: Any, aiohttp_server: Any, monkeypatch: Any,
        template: str, stored: bool, answer_days: int) -> None:
    """A payment of no member 89 days old: its refund's SMS ("your refund of ...") is queued to the number that paid
    (core.refunds.payer_to_tell: younger than SMS_PAYER_ANSWER_DAYS), as its receipt is. Before the worker's turn
    (the aggregator down, the outbox behind; `stored`: a first attempt stored it and failed at Africa's Talking)
    the payment turned 91 days old: the operator may have given the number to a stranger since, as RECEIPT from it
    is not answered then. Not sent (the job says why; a stored message ends FAILED, not sent). With
    SMS_PAYER_ANSWER_DAYS=0, sent, as ever."""
    from core.audit import Actor
    from core.models import Refund
    from core.ports import ProviderOutcome
    from core.refunds import apply_refund_outcome

    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, sms_payer_answer_days=answer_days))
    _server, sms = await start_simulator(aiohttp_server, rt)
    admin: Caller = await bearer(client, *demo["admin"])
    paid = await _paid_by_number(rt, demo, STRANGER, status="PROCESSING")
    await _aged(rt, paid, 89)
    if template == "refund_completed":
        await _settled(rt, paid, "SUCCEEDED")
        await drain(worker)  # the receipt, sent
        _wire, refund_id = await _in_flight(rt, admin, worker, paid)
        async with rt.sessionmaker.begin() as s:
            refund = await s.get(Refund, refund_id)
            assert refund is not None
            await apply_refund_outcome(s, rt, refund, ProviderOutcome.SUCCEEDED, actor=Actor("provider:t", "provider"))
        key = f"sms:refund_completed:{refund_id}"
        assert (await _refund_texts(rt, refund_id))[0] == [key]  # queued to the number that paid: 89 days old
    else:
        await _settled(rt, paid, "SUCCEEDED")
        key = f"sms:payment_receipt:{paid.id}"
    told = len(sms.messages(STRANGER))
    if stored:
        sms.set_failure("http503", number=STRANGER, times=1)  # AT refuses it once: stored, QUEUED, retried later
        await drain(worker)
        assert [status for status, _why in (await _payment_text(rt, key))[1]] == ["QUEUED"]
    await _aged(rt, paid, 91)
    await due_now(rt, "sms.send")
    await drain(worker)
    job, rows = await _payment_text(rt, key)
    if not answer_days:
        assert len(sms.messages(STRANGER)) == told + 1 and job[0] == "DONE", job
        assert [status for status, _why in rows] == ["SENT"]
        return
    assert len(sms.messages(STRANGER)) == told
    assert job == ("DONE", "not sent: older_than_answer_days")
    assert rows == ([("FAILED", "not sent: older_than_answer_days")] if stored else [])
