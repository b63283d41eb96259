"""The replies to a member's keyword texts (RECEIPT, STATUS, HELP, STOP, START, and the rest) are her messages: the
support desk answering "did she get the receipt she asked for?" reads GET /v1/members/{id}/messages. Each text goes
through the real inbound route, the worker sends the reply to the Africa's Talking simulator, and the stored row and
the API's lists are read back. A reply is the membership's in the cooperative it is for (the payment's, the one HELP
names the code of), never another cooperative's, and a reply about the number (STOP, START) of a number in two
cooperatives is neither's: no cooperative learns from it of a STOP sent elsewhere."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from core.models import Cooperative, SmsMessage
from tests.admin_api.conftest import Caller
from tests.channels.sms.helpers import make_payment, start_simulator
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain

ALINE = "+250788000001"  # a demo member (rw)
BEA = "+250788999001"  # coop_b's member
STRANGER = "+250788777666"  # no member's


@pytest.fixture
async def sim(rt: Any, aiohttp_server: Any) -> Any:
    _server, state = await start_simulator(aiohttp_server, rt)
    return state


async def _rows(rt: Any, phone: str) -> list[SmsMessage]:
    async with rt.sessionmaker() as s:
        return list((await s.execute(select(SmsMessage).where(
            SmsMessage.phone_index == rt.cipher.blind_index(phone))
            .order_by(SmsMessage.created_at, SmsMessage.id))).scalars())


async def _texted(rt: Any, client: Any, worker: Any, phone: str, text: str, inbound_id: str) -> SmsMessage:
    """`text` sent from `phone` through the inbound route, the worker run: the one reply row it made. The reply
    limits (5 per number in 10 minutes) are cleared first: what is tested here is where each reply is kept."""
    await rt.redis.delete(*[k async for k in rt.redis.scan_iter("rl:*")], "no-such-key")
    before = {row.id for row in await _rows(rt, phone)}
    await inbound(client, phone, text, inbound_id)
    await drain(worker)
    [reply] = [row for row in await _rows(rt, phone) if row.id not in before]
    assert reply.status == "SENT"  # the simulator took it
    return reply


async def _listed(caller: Caller, member_id: str, *, body: bool = False) -> list[dict[str, Any]]:
    page = await caller.json("GET", f"/v1/members/{member_id}/messages?limit=100"
                             + ("&includeBody=true" if body else ""), 200)
    assert page["meta"]["total"] == len(page["data"])
    return list(page["data"])


async def test_every_reply_to_a_members_number_is_in_her_messages(
    rt: Any, demo: dict[str, Any], admin: Caller, client: Any, sim: Any, worker: Any
) -> None:
    aline, coop = demo["members"][ALINE], demo["cooperative_id"]
    payment = await make_payment(rt, coop, account=ALINE, member_id=aline)
    texts = [
        (f"RECEIPT {payment.reference}", "payment_receipt"),
        (f"imimerere {payment.reference}", "payment_status"),
        ("HELP", "help"),
        ("STOP", "opted_out"),
        ("TANGIRA", "opted_in"),
        ("RECEIPT", "no_reference_receipt"),
        ("STATUS PAY_20260115_999999", "not_found"),
        ("hello there", "unknown"),
    ]
    replies = []
    for number, (text, template) in enumerate(texts):
        reply = await _texted(rt, client, worker, ALINE, text, f"in-aline-{number}")
        # Stored with her membership and her cooperative, to the number that texted (masked), in her language.
        assert (reply.template, reply.member_id, reply.cooperative_id) == (template, aline, coop), text
        assert (reply.phone_masked, reply.language) == ("+25078****001", "rw")
        replies.append(reply)

    listed = await _listed(admin, aline, body=True)
    assert [m["id"] for m in listed] == [r.id for r in reversed(replies)]  # newest first
    assert [m["template"] for m in listed] == [t for _, t in reversed(texts)]
    assert {m["memberId"] for m in listed} == {aline} and {m["phone"] for m in listed} == {"+25078****001"}
    # The texts she got, as the simulator received them (RECEIPT's names the payment's reference).
    assert sorted(m["body"] for m in listed) == sorted(m["message"] for m in sim.messages(ALINE))
    assert payment.reference in listed[-1]["body"] and listed[-1]["paymentId"] == payment.id
    assert listed[-2]["paymentId"] == payment.id
    assert {m["paymentId"] for m in listed[:-2]} == {None}
    # Without includeBody: no text, and never the number itself.
    assert {m["body"] for m in await _listed(admin, aline)} == {None}
    raw = await (await admin.req("GET", f"/v1/members/{aline}/messages?limit=100&includeBody=true")).text()
    assert ALINE not in raw and ALINE[1:] not in raw
    # The replies about the payment are still its messages.
    about = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    assert [(m["template"], m["memberId"]) for m in about] == [("payment_status", aline), ("payment_receipt", aline)]

    # Her texts themselves are not messages the gateway made: the list holds only the replies (above). Her STOP and
    # START are where the README says: her membership's flag and its audit log, by her masked number.
    assert (await admin.json("GET", f"/v1/members/{aline}", 200))["remindersOptOut"] is False
    events = (await admin.json("GET", f"/v1/audit-events?entityType=member&entityId={aline}"
                               "&action=member.reminders_opt_out", 200))["data"]
    assert [(e["before"], e["after"]) for e in events] == [
        ({"remindersOptOut": True}, {"remindersOptOut": False}),
        ({"remindersOptOut": False}, {"remindersOptOut": True})]
    assert {e["actor"] for e in events} == {"phone:+25078****001"}


async def test_the_status_of_her_refund_or_dispute_is_listed_with_the_payment_it_is_of(
    rt: Any, demo: dict[str, Any], admin: Caller, client: Any, sim: Any, worker: Any
) -> None:
    """STATUS RFD_... / DSP_... (her refund's, her dispute's): the reply is hers and the payment's, naming it."""
    from core.models import Dispute, Refund

    aline, coop = demo["members"][ALINE], demo["cooperative_id"]
    payment = await make_payment(rt, coop, account=ALINE, member_id=aline)
    async with rt.sessionmaker.begin() as s:
        s.add(Refund(payment_id=payment.id, cooperative_id=coop, reference="RFD_20260115_801", amount_minor=5_000,
                     currency="RWF", status="PENDING", reason="test", idempotency_key="rfd-listed-1",
                     provider_reference="prov-rfd-listed-1"))
        s.add(Dispute(payment_id=payment.id, cooperative_id=coop, member_id=aline, reference="DSP_20260115_802",
                      reason="WRONG_AMOUNT", status="OPEN", channel="sms"))
    for number, (text, template) in enumerate((("STATUS RFD_20260115_801", "refund_status"),
                                               ("imimerere DSP 20260115 802", "dispute_status"))):
        reply = await _texted(rt, client, worker, ALINE, text, f"in-status-{number}")
        assert (reply.template, reply.member_id, reply.cooperative_id) == (template, aline, coop)
    listed = await _listed(admin, aline)
    assert [(m["template"], m["paymentId"]) for m in listed] == [("dispute_status", payment.id),
                                                                  ("refund_status", payment.id)]
    about = (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"]
    assert [m["template"] for m in about] == ["dispute_status", "refund_status"]


async def test_a_number_in_two_cooperatives_has_each_reply_in_the_cooperative_it_is_for(
    rt: Any, demo: dict[str, Any], admin: Caller, coop_b: dict[str, Any], client: Any, sim: Any, worker: Any
) -> None:
    """Bea is coop_b's member, then this cooperative's (A). A receipt of her payment here is A's; a status of her
    payment there and HELP (which names the code of her first membership, coop_b's) are coop_b's; her STOP and
    START are about the number, both memberships: stored with neither, so neither cooperative reads them as sent
    there, while each still shows its flag."""
    coop_a = demo["cooperative_id"]
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Cooperative).where(Cooperative.id == coop_b["cooperative_id"])
                        .values(ussd_extension="9"))
    here = (await admin.json("POST", "/v1/members", 201, json={"name": "Bea Here", "phone": BEA}))["id"]
    there, b_admin = coop_b["member_id"], coop_b["admin"]
    paid_here = await make_payment(rt, coop_a, account=BEA, member_id=here)
    paid_there = await make_payment(rt, coop_b["cooperative_id"], account=BEA, member_id=there)

    receipt = await _texted(rt, client, worker, BEA, f"RECEIPT {paid_here.reference}", "in-bea-1")
    status = await _texted(rt, client, worker, BEA, f"STATUS {paid_there.reference}", "in-bea-2")
    help_ = await _texted(rt, client, worker, BEA, "HELP", "in-bea-3")
    stop = await _texted(rt, client, worker, BEA, "STOP", "in-bea-4")
    flags = [(await caller.json("GET", f"/v1/members/{member}", 200))["remindersOptOut"]
             for caller, member in ((admin, here), (b_admin, there))]
    start = await _texted(rt, client, worker, BEA, "START", "in-bea-5")

    assert (receipt.template, receipt.member_id, receipt.cooperative_id) == ("payment_receipt", here, coop_a)
    assert (status.template, status.member_id, status.cooperative_id) == \
        ("payment_status", there, coop_b["cooperative_id"])
    assert (help_.template, help_.member_id, help_.cooperative_id) == ("help", there, coop_b["cooperative_id"])
    assert "*384*123*9#" in help_.body  # coop_b's code: the reply is the cooperative whose code it names
    assert [(r.template, r.member_id, r.cooperative_id) for r in (stop, start)] == \
        [("opted_out", None, None), ("opted_in", None, None)]
    assert flags == [True, True]  # the STOP shows on each membership all the same

    # Each cooperative's desk sees its own replies in its membership's messages, nothing of the other's.
    assert [m["id"] for m in await _listed(admin, here)] == [receipt.id]
    assert [m["id"] for m in await _listed(b_admin, there)] == [help_.id, status.id]
    assert [m["phone"] for m in await _listed(b_admin, there)] == ["+25078****001"] * 2
    await admin.json("GET", f"/v1/members/{there}/messages", 404)
    await b_admin.json("GET", f"/v1/members/{here}/messages", 404)
    assert len(sim.messages(BEA)) == 5


async def test_a_stop_sent_as_another_cooperatives_member_is_not_shown_here_after_she_joins(
    rt: Any, demo: dict[str, Any], admin: Caller, coop_b: dict[str, Any], client: Any, sim: Any, worker: Any
) -> None:
    """Her only membership's reply is that membership's (coop_b's desk sees the STOP confirmation); once she joins
    here too, this cooperative's view of her shows nothing of it, and her next HELP is still coop_b's (her first
    membership's, whose code it names)."""
    stop = await _texted(rt, client, worker, BEA, "STOP", "in-bea-stop")
    assert (stop.member_id, stop.cooperative_id) == (coop_b["member_id"], coop_b["cooperative_id"])
    assert [m["template"] for m in await _listed(coop_b["admin"], coop_b["member_id"])] == ["opted_out"]

    joined = await admin.json("POST", "/v1/members", 201, json={"name": "Bea Here", "phone": BEA})
    assert joined["remindersOptOut"] is False
    assert await _listed(admin, joined["id"]) == []
    help_ = await _texted(rt, client, worker, BEA, "HELP", "in-bea-help")
    assert (help_.member_id, help_.cooperative_id) == (coop_b["member_id"], coop_b["cooperative_id"])
    assert await _listed(admin, joined["id"]) == []
    assert [m["template"] for m in await _listed(coop_b["admin"], coop_b["member_id"])] == ["help", "opted_out"]


async def test_replies_to_a_number_no_member_has_are_no_ones_and_not_hers_once_she_joins(
    rt: Any, demo: dict[str, Any], admin: Caller, client: Any, sim: Any, worker: Any
) -> None:
    aline = demo["members"][ALINE]
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=aline)
    replies = [await _texted(rt, client, worker, STRANGER, text, f"in-stranger-{number}")
               for number, text in enumerate(("HELP", "STOP", f"RECEIPT {payment.reference}"))]
    assert [(r.template, r.member_id, r.cooperative_id) for r in replies] == \
        [("help", None, None), ("opted_out", None, None), ("not_found", None, None)]
    assert await _listed(admin, aline) == []  # Aline's reference asked for by someone else: not in her messages
    assert (await admin.json("GET", f"/v1/payments/{payment.id}/messages", 200))["data"] == []
    joined = await admin.json("POST", "/v1/members", 201, json={"name": "New Member", "phone": STRANGER})
    assert await _listed(admin, joined["id"]) == []
