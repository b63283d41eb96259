"""Delivery reports and inbound keyword SMS through the HTTP endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from channels.sms import routes
from channels.sms.routes import DELIVERY_STATUS, parse_keyword
from channels.sms.templates import render
from core.config import Secret
from core.db import utcnow
from core.models import AuditEvent, Member, SmsMessage
from tests.channels.sms.conftest import gateway_app
from tests.channels.sms.helpers import jobs_of, make_payment, start_simulator
from tests.conftest import drain

FIXTURES = Path(__file__).parents[2] / "fixtures" / "africastalking_sms"
REPORTS = json.loads((FIXTURES / "delivery_reports.json").read_text())
ALINE, JEAN = "+250788000001", "+250788000002"
STRANGER = "+250788777666"
OTHER_STRANGER = "+250788777667"


async def sent_message(rt: Any, provider_id: str = "ATXid_X", status: str = "SENT") -> str:
    async with rt.sessionmaker.begin() as session:
        row = SmsMessage(
            phone_enc=rt.cipher.encrypt(ALINE, context="sms"),
            phone_index=rt.cipher.blind_index(ALINE),
            phone_masked="+25078****001",
            template="help",
            language="en",
            body="hi",
            encoding="GSM-7",
            length=2,
            segments=1,
            status=status,
            idempotency_key=f"k-{provider_id}",
            provider_message_id=provider_id,
            sent_at=utcnow(),
        )
        session.add(row)
    return row.id


async def status_of(rt: Any, sms_id: str) -> SmsMessage:
    async with rt.sessionmaker() as session:
        return await session.get(SmsMessage, sms_id)


def test_every_aggregator_status_has_a_row_and_a_fixture() -> None:
    assert {r["form"]["status"] for r in REPORTS} == set(DELIVERY_STATUS)


@pytest.mark.parametrize("case", REPORTS, ids=[r["form"]["status"] for r in REPORTS])
async def test_delivery_report(rt: Any, sms_client: Any, case: dict[str, Any]) -> None:
    sms_id = await sent_message(rt)
    response = await sms_client.post("/sms/africastalking/delivery", data=case["form"])
    assert response.status == 200
    row = await status_of(rt, sms_id)
    assert row.status == case["expect"]
    assert row.provider_status == case["form"]["status"]
    assert row.failure_reason == case["form"].get("failureReason")
    if case["expect"] == "DELIVERED":
        assert row.delivered_at is not None
    # The same report again (aggregators retry): still 200, nothing changes.
    again = await sms_client.post("/sms/africastalking/delivery", data=case["form"])
    assert again.status == 200 and await again.text() == "duplicate"
    assert (await status_of(rt, sms_id)).status == case["expect"]


async def test_final_status_is_not_reopened_by_a_late_report(rt: Any, sms_client: Any) -> None:
    sms_id = await sent_message(rt)
    await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_X", "status": "Success"})
    late = await sms_client.post(
        "/sms/africastalking/delivery",
        data={"id": "ATXid_X", "status": "Failed", "failureReason": "DeliveryFailure"},
    )
    assert late.status == 200 and await late.text() == "ignored"
    assert (await status_of(rt, sms_id)).status == "DELIVERED"
    async with rt.sessionmaker() as session:
        audits = (
            (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == sms_id))).scalars().all()
        )
    assert [a.action for a in audits] == ["sms.delivered"]


@pytest.mark.parametrize("report", ["Success", "Sent", "Buffered"])
async def test_a_failed_message_is_not_moved_by_a_report(rt: Any, sms_client: Any, report: str) -> None:
    """A delivery report never moves a FAILED text back (to DELIVERED or SENT): only the sender's named recoveries
    leave FAILED (core.state.sms: SMS.recoveries, which a report's move does not name)."""
    sms_id = await sent_message(rt, "ATXid_F", status="FAILED")
    answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_F", "status": report})
    assert answer.status == 200 and await answer.text() == "ignored"
    assert (await status_of(rt, sms_id)).status == "FAILED"
    async with rt.sessionmaker() as session:
        assert (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == sms_id))).first() is None


async def test_unknown_message_id_is_acknowledged_logged_and_kept_an_hour(
    rt: Any, sms_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="gateway.sms.routes")
    sms_id = await sent_message(rt)  # another message: untouched
    response = await sms_client.post(
        "/sms/africastalking/delivery", data={"id": "ATXid_nope", "status": "Success"}
    )
    assert response.status == 200 and await response.text() == "unknown"
    [logged] = [r for r in caplog.records if getattr(r, "provider_message_id", None) == "ATXid_nope"]
    assert logged.levelno == logging.WARNING and "unknown message" in logged.getMessage()
    key = routes.parked_key("ATXid_nope")
    assert key.startswith("sms:dlr:{") and key.endswith("}")
    assert 0 < await rt.redis.ttl(key) <= routes.PARKED_TTL
    [value] = await rt.redis.lrange(key, 0, -1)
    assert json.loads(value) == {"s": "Success", "r": None} and len(value) < 64
    # Never matched: nothing applied, and asking again changes nothing.
    assert await routes.apply_parked_reports(rt, "ATXid_nope") == []
    assert await rt.redis.llen(key) == 1
    assert (await status_of(rt, sms_id)).status == "SENT"
    # An aggregator retrying keeps a bounded list.
    for _ in range(routes.PARKED_MAX + 3):
        await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_nope", "status": "Buffered"})
    assert await rt.redis.llen(key) == routes.PARKED_MAX


async def test_parked_reports_apply_in_order_once_the_id_is_stored(rt: Any, sms_client: Any) -> None:
    for status in ("Buffered", "Success"):
        answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_E", "status": status})
        assert answer.status == 200 and await answer.text() == "unknown"
    sms_id = await sent_message(rt, "ATXid_E")  # the sender's SENT commit, late
    assert await routes.apply_parked_reports(rt, "ATXid_E") == ["progress", "delivered"]
    row = await status_of(rt, sms_id)
    assert row.status == "DELIVERED" and row.provider_status == "Success" and row.delivered_at is not None
    assert await rt.redis.exists(routes.parked_key("ATXid_E")) == 0
    assert await routes.apply_parked_reports(rt, "ATXid_E") == []  # taken once


async def test_the_latest_reports_are_kept_when_more_come_ahead_of_the_send(rt: Any, sms_client: Any) -> None:
    """An aggregator that reports more than PARKED_MAX times before the send is recorded: the latest are kept, so its
    final word (Success, last) is applied once the id is stored, not dropped for the first Buffered ones."""
    statuses = ["Submitted"] + ["Buffered"] * routes.PARKED_MAX + ["Success"]
    for status in statuses:
        answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_M", "status": status})
        assert await answer.text() == "unknown"
    sms_id = await sent_message(rt, "ATXid_M")
    outcomes = await routes.apply_parked_reports(rt, "ATXid_M")
    assert len(outcomes) == routes.PARKED_MAX and outcomes[-1] == "delivered"
    row = await status_of(rt, sms_id)
    assert row.status == "DELIVERED" and row.provider_status == "Success" and row.delivered_at is not None


async def test_parked_report_for_a_message_already_final_does_nothing(rt: Any, sms_client: Any) -> None:
    await sms_client.post(
        "/sms/africastalking/delivery", data={"id": "ATXid_F", "status": "Failed", "failureReason": "X"}
    )
    sms_id = await sent_message(rt, "ATXid_F", status="DELIVERED")
    assert await routes.apply_parked_reports(rt, "ATXid_F") == ["ignored"]
    row = await status_of(rt, sms_id)
    assert row.status == "DELIVERED" and row.failure_reason is None
    # A report for a final message that is known is not parked either.
    late = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_F", "status": "Expired"})
    assert await late.text() == "ignored"
    assert await rt.redis.exists(routes.parked_key("ATXid_F")) == 0
    async with rt.sessionmaker() as session:
        audits = (await session.execute(select(AuditEvent).where(AuditEvent.entity_id == sms_id))).scalars().all()
    assert audits == []


async def test_report_parked_while_the_id_is_being_stored_is_applied_by_the_route(
    rt: Any, sms_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sender commits the id after the route's read but before the park, and finds nothing parked:
    # the route looks again after parking.
    real_park = routes.park_report
    made: list[str] = []

    async def park_after_the_sender_committed(*args: Any) -> None:
        made.append(await sent_message(rt, "ATXid_R"))
        assert await routes.apply_parked_reports(rt, "ATXid_R") == []  # the sender's look: too early
        await real_park(*args)

    monkeypatch.setattr(routes, "park_report", park_after_the_sender_committed)
    answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_R", "status": "Success"})
    assert answer.status == 200 and await answer.text() == "delivered"
    assert (await status_of(rt, made[0])).status == "DELIVERED"
    assert await rt.redis.exists(routes.parked_key("ATXid_R")) == 0


class ReportBeforeRecorded:
    """The real sender, plus the aggregator's delivery report posted before the job records the id."""

    def __init__(self, inner: Any, client: Any) -> None:
        self.inner, self.client, self.answers = inner, client, []

    async def send(self, phone: Any, body: str) -> Any:
        result = await self.inner.send(phone, body)
        response = await self.client.post(
            "/sms/africastalking/delivery", data={"id": result.provider_message_id, "status": "Success"}
        )
        self.answers.append((response.status, await response.text()))
        return result


async def test_report_before_the_send_is_recorded_ends_delivered(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    from core.notify import send_sms

    rt.sms = ReportBeforeRecorded(rt.sms, sms_client)
    async with rt.sessionmaker.begin() as session:
        await send_sms(
            session,
            template="help",
            cooperative_id=demo["cooperative_id"],
            context={},
            cipher=rt.cipher,
            member_id=demo["members"][ALINE],
            dedupe="fast-report",
        )
    await drain(worker)
    assert rt.sms.answers == [(200, "unknown")]  # the row had no provider id yet: parked
    async with rt.sessionmaker() as session:
        [row] = (await session.execute(select(SmsMessage))).scalars().all()
        audits = (
            (await session.execute(select(AuditEvent.action).where(AuditEvent.entity_id == row.id)))
            .scalars()
            .all()
        )
    assert row.status == "DELIVERED" and row.provider_message_id == sim.messages(ALINE)[0]["id"]
    assert row.delivered_at is not None and row.provider_status == "Success"
    assert sorted(audits) == ["sms.delivered", "sms.sent"]
    assert await rt.redis.exists(routes.parked_key(row.provider_message_id)) == 0


async def test_simulator_reporting_at_once_ends_delivered(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any
) -> None:
    from core.notify import send_sms

    gateway = await aiohttp_server(gateway_app(rt))
    _, sim = await start_simulator(
        aiohttp_server, rt, delivery_url=str(gateway.make_url("/sms/africastalking/delivery")), delivery_delay=0
    )
    phones = [ALINE, JEAN, "+250733000001", "+250733000002", "+250788000003"]
    async with rt.sessionmaker.begin() as session:
        for phone in phones:
            await send_sms(
                session,
                template="help",
                cooperative_id=demo["cooperative_id"],
                context={},
                cipher=rt.cipher,
                member_id=demo["members"][phone],
                dedupe=f"now-{phone}",
            )
    await drain(worker)
    for _ in range(100):
        if len(sim.reports_posted) == len(phones):
            break
        await asyncio.sleep(0.05)
    assert len(sim.reports_posted) == len(phones)
    async with rt.sessionmaker() as session:
        rows = (await session.execute(select(SmsMessage))).scalars().all()
    assert [r.status for r in rows] == ["DELIVERED"] * len(phones)


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"id": "ATXid_X"}, "id and status are required"),
        ({"status": "Success"}, "id and status are required"),
    ],
)
async def test_bad_delivery_reports_are_400(
    rt: Any, sms_client: Any, form: dict[str, str], message: str
) -> None:
    sms_id = await sent_message(rt)
    response = await sms_client.post("/sms/africastalking/delivery", data=form)
    assert response.status == 400
    assert message in await response.text()
    assert (await status_of(rt, sms_id)).status == "SENT"


@pytest.mark.parametrize("status", ["AbsentSubscriber", "Delivered"])
async def test_a_delivery_status_the_gateway_does_not_know_is_kept_not_refused(rt: Any, sms_client: Any,
                                                                               status: str) -> None:
    """Not a 400 (which the aggregator retries and then drops, the report lost): the provider's word is kept on the
    message, still SENT, as Buffered is; a final status is not moved by it."""
    sms_id = await sent_message(rt)
    provider_id = (await status_of(rt, sms_id)).provider_message_id
    response = await sms_client.post("/sms/africastalking/delivery", data={"id": provider_id, "status": status})
    assert (response.status, await response.text()) == (200, "progress")
    row = await status_of(rt, sms_id)
    assert (row.status, row.provider_status) == ("SENT", status)
    response = await sms_client.post("/sms/africastalking/delivery", data={"id": provider_id, "status": "Success"})
    assert (response.status, (await status_of(rt, sms_id)).status) == (200, "DELIVERED")
    response = await sms_client.post("/sms/africastalking/delivery", data={"id": provider_id, "status": status})
    assert response.status == 200
    row = await status_of(rt, sms_id)
    assert (row.status, row.provider_status) == ("DELIVERED", "Success")


async def test_a_progress_report_older_than_the_one_stored_does_not_move_it_back(rt: Any, sms_client: Any) -> None:
    """Reports out of order: Sent arriving after Buffered left the message reading "Sent" (the admin API's
    providerStatus) while the operator was holding it for a phone out of reach. An older one changes nothing; a
    later one, a status the gateway does not know, and the final report still apply; parked ones too."""
    sms_id = await sent_message(rt)
    said = []
    for status in ("Submitted", "Buffered", "Sent", "Submitted"):
        answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_X", "status": status})
        said.append((await answer.text(), (await status_of(rt, sms_id)).provider_status))
    assert said == [("progress", "Submitted"), ("progress", "Buffered"), ("ignored", "Buffered"),
                    ("ignored", "Buffered")]
    for status, outcome in (("AbsentSubscriber", "progress"), ("Sent", "progress"), ("Success", "delivered")):
        answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_X", "status": status})
        assert (await answer.text(), (await status_of(rt, sms_id)).provider_status) == (outcome, status)
    assert (await status_of(rt, sms_id)).status == "DELIVERED"
    # Parked ahead of the send's record, in the order they came.
    for status in ("Buffered", "Sent"):
        await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_O", "status": status})
    parked_id = await sent_message(rt, "ATXid_O")
    assert await routes.apply_parked_reports(rt, "ATXid_O") == ["progress", "ignored"]
    assert (await status_of(rt, parked_id)).provider_status == "Buffered"


async def test_a_status_the_gateway_does_not_know_parked_before_the_send_is_recorded_is_kept(
    rt: Any, sms_client: Any
) -> None:
    """Parked (the report beat the sender's commit) it is kept as it is when the row was there, not dropped as
    unreadable."""
    answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_U", "status": "AbsentSubscriber"})
    assert (answer.status, await answer.text()) == (200, "unknown")
    sms_id = await sent_message(rt, "ATXid_U")
    assert await routes.apply_parked_reports(rt, "ATXid_U") == ["progress"]
    row = await status_of(rt, sms_id)
    assert (row.status, row.provider_status) == ("SENT", "AbsentSubscriber")


async def test_callback_secret(rt: Any, aiohttp_client: Any, caplog: Any) -> None:
    guarded = dataclasses.replace(
        rt,
        settings=dataclasses.replace(
            rt.settings, callback_secrets={**rt.settings.callback_secrets, "sms": Secret("s3cret")}
        ),
    )
    client = await aiohttp_client(gateway_app(guarded, guarded.settings))
    sms_id = await sent_message(rt)
    form = {"id": "ATXid_X", "status": "Success"}
    assert (await client.post("/sms/africastalking/delivery", data=form)).status == 403
    assert (await client.post("/sms/africastalking/delivery?secret=wrong", data=form)).status == 403
    assert (
        await client.post("/sms/africastalking/inbound", data={"from": ALINE, "text": "HELP"})
    ).status == 403
    assert (await status_of(rt, sms_id)).status == "SENT"
    # Each refusal is logged, naming the route, as USSD's and the providers' are: a CALLBACK_SECRET_SMS that differs
    # from the URL registered at Africa's Talking loses every inbound text and delivery report, and said nothing.
    refused = [r for r in caplog.records if r.getMessage() == "sms callback refused: wrong or missing secret"]
    assert [(r.levelname, r.route) for r in refused] == [  # type: ignore[attr-defined]
        ("WARNING", "delivery"), ("WARNING", "delivery"), ("WARNING", "inbound")]
    caplog.clear()
    assert (await client.post("/sms/africastalking/delivery?secret=s3cret", data=form)).status == 200
    assert (await status_of(rt, sms_id)).status == "DELIVERED"
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


async def test_full_loop_simulator_posts_reports_to_the_gateway(
    rt: Any, demo: dict[str, Any], aiohttp_server: Any, worker: Any
) -> None:
    gateway = await aiohttp_server(gateway_app(rt))
    _, sim = await start_simulator(
        aiohttp_server,
        rt,
        delivery_url=str(gateway.make_url("/sms/africastalking/delivery")),
        failures={JEAN: "InsufficientCredit"},
    )
    from core.notify import send_sms

    async with rt.sessionmaker.begin() as session:
        for phone in (ALINE, JEAN):
            await send_sms(
                session,
                template="help",
                cooperative_id=demo["cooperative_id"],
                context={},
                cipher=rt.cipher,
                member_id=demo["members"][phone],
                dedupe=f"help-{phone}",
            )
    await drain(worker)
    for _ in range(100):
        if len(sim.reports_posted) == 2:
            break
        await asyncio.sleep(0.05)
    async with rt.sessionmaker() as session:
        rows = {r.phone_masked: r for r in (await session.execute(select(SmsMessage))).scalars()}
    assert rows["+25078****001"].status == "DELIVERED"
    assert rows["+25078****002"].status == "FAILED"
    assert rows["+25078****002"].failure_reason == "InsufficientCredit"


# ------------------------------------------------------------------------------------------------ inbound


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RECEIPT PAY_20260115_000001", ("RECEIPT", "en", "PAY_20260115_000001")),
        ("risiti pay_20260115_000001", ("RECEIPT", "sw", "PAY_20260115_000001")),
        ("Reçu PAY_1", ("RECEIPT", "fr", "PAY_1")),
        ("INYEMEZABUGUZI PAY_1", ("RECEIPT", "rw", "PAY_1")),
        ("status PAY_1.", ("STATUS", "en", "PAY_1")),
        ("HALI PAY_1", ("STATUS", "sw", "PAY_1")),
        ("statut PAY_1", ("STATUS", "fr", "PAY_1")),
        ("imimerere PAY_1", ("STATUS", "rw", "PAY_1")),
        ("help", ("HELP", "en", None)),
        ("AIDE", ("HELP", "fr", None)),
        ("ubufasha", ("HELP", "rw", None)),
        ("msaada", ("HELP", "sw", None)),
        ("STOP", ("STOP", "en", None)),
        ("hagarika", ("STOP", "rw", None)),
        ("sitisha", ("STOP", "sw", None)),
        ("arret", ("STOP", "fr", None)),
        ("START", ("START", "en", None)),
        ("tangira", ("START", "rw", None)),
        ("anza", ("START", "sw", None)),
        ("reprendre", ("START", "fr", None)),
        ("hello there", (None, None, "THERE")),
        ("", (None, None, None)),
    ],
)
def test_parse_keyword(text: str, expected: tuple[Any, ...]) -> None:
    assert parse_keyword(text) == expected


async def inbound(client: Any, phone: str, text: str, message_id: str) -> Any:
    response = await client.post(
        "/sms/africastalking/inbound",
        data={
            "date": "2026-01-15 10:00:00",
            "from": phone,
            "id": message_id,
            "linkId": "L1",
            "text": text,
            "to": "12345",
            "networkCode": "63510",
        },
    )
    assert response.status == 200
    return response


async def first_try_fails_after_its_count(client: Any, monkeypatch: Any, text: str, message_id: str,
                                          date: str) -> Any:
    """`text`'s first try counts its reply, then fails (the database away as the reply is queued: a 503, which
    Africa's Talking retries); nothing of it commits. The 503, answered."""
    real = routes.send_sms
    failing = {"left": 1}

    async def send_once_failing(*args: Any, **kwargs: Any) -> Any:
        if failing["left"]:
            failing["left"] -= 1
            raise ConnectionError("database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(routes, "send_sms", send_once_failing)
    response = await client.post("/sms/africastalking/inbound", data={
        "date": date, "from": ALINE, "id": message_id, "linkId": "L1", "text": text, "to": "12345",
        "networkCode": "63510"})
    assert response.status == 503
    return response


async def test_receipt_keyword_for_own_payment(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    await inbound(sms_client, ALINE, f"receipt {payment.reference.lower()}", "in-1")
    await inbound(sms_client, ALINE, f"receipt {payment.reference.lower()}", "in-1")  # the aggregator retried
    await drain(worker)
    [reply] = sim.messages(ALINE)
    assert payment.reference in reply["message"] and "MTN-TX-778899" in reply["message"]
    assert reply["message"].startswith("Twakiriye")  # member language when the keyword is English


async def test_status_keyword_in_swahili_for_a_payment_made_from_this_phone(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    # Paid from Jean's phone for no member (an API payment): the account index proves ownership.
    payment = await make_payment(rt, demo["cooperative_id"], account=JEAN, status="PENDING",
                           created_at=utcnow() - timedelta(days=1))
    await inbound(sms_client, JEAN, f"HALI {payment.reference}", "in-2")
    await drain(worker)
    [reply] = sim.messages(JEAN)
    assert reply["message"].startswith(f"Malipo {payment.reference}: 50,000 RWF")
    assert "inasubiri uthibitisho wako" in reply["message"]


async def test_someone_elses_reference_is_refused_without_leaking(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    payment = await make_payment(rt, demo["cooperative_id"], account=ALINE, member_id=demo["members"][ALINE])
    # Drained one at a time: a worker batch runs jobs concurrently, so inbox order is not job order.
    await inbound(sms_client, STRANGER, f"RECEIPT {payment.reference}", "in-3")
    await drain(worker)
    await inbound(sms_client, STRANGER, "RECEIPT PAY_20260115_999999", "in-4")
    await drain(worker)
    theirs, made_up = [m["message"] for m in sim.messages(STRANGER)]
    # Same answer shape for an existing but foreign reference and a made-up one; nothing about the payment.
    assert theirs == render("not_found", "en", {"ref": payment.reference})
    assert made_up == render("not_found", "en", {"ref": "PAY_20260115_999999"})
    for secret in ("50,000", "MTN-TX", "Kigali", "Aline"):
        assert secret not in theirs
    assert sim.messages(ALINE) == []
    # Jean is a member of the same cooperative, but it is still not his payment.
    await inbound(sms_client, JEAN, f"STATUS {payment.reference}", "in-5")
    await drain(worker)
    assert sim.messages(JEAN)[-1]["message"] == render("not_found", "en", {"ref": payment.reference})


async def test_stop_and_start_switch_reminders_on_every_membership(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    await inbound(sms_client, ALINE, "STOP", "in-6")
    async with rt.sessionmaker() as session:
        member = await session.get(Member, demo["members"][ALINE])
        assert member.reminders_opt_out is True
    await drain(worker)
    assert sim.messages(ALINE)[-1]["message"].startswith("Ntuzongera")  # Kinyarwanda member
    await inbound(sms_client, ALINE, "tangira", "in-7")
    async with rt.sessionmaker() as session:
        member = await session.get(Member, demo["members"][ALINE])
        assert member.reminders_opt_out is False
        audits = (
            (await session.execute(select(AuditEvent).where(AuditEvent.action == "member.reminders_opt_out")))
            .scalars()
            .all()
        )
    assert len(audits) == 2 and all("+250788000001" not in a.actor for a in audits)


async def test_help_and_anything_else(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    await inbound(sms_client, STRANGER, "AIDE", "in-8")
    await drain(worker)
    await inbound(sms_client, OTHER_STRANGER, "what is this", "in-9")
    await drain(worker)
    [help_fr] = [m["message"] for m in sim.messages(STRANGER)]
    assert help_fr.startswith("Composez *384*123# pour payer")
    [unknown] = [m["message"] for m in sim.messages(OTHER_STRANGER)]
    assert unknown == render("unknown", "en", {"dial": "*384*123#"})


@pytest.mark.usefixtures("limiter_clock")
async def test_replies_are_rate_limited_per_phone(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    for i in range(7):  # not HELP: its reply goes once a day (tests/channels/sms/test_stop_and_reply_limits.py)
        await inbound(sms_client, STRANGER, "STATUS PAY_20260115_999999", f"flood-{i}")
    await inbound(sms_client, ALINE, "HELP", "other-phone")
    await drain(worker)
    assert len(sim.messages(STRANGER)) == 5
    assert len(sim.messages(ALINE)) == 1
    keys = [k.decode() async for k in rt.redis.scan_iter("rl:{*}:sms:reply:*")]
    assert keys and not any("250788" in k for k in keys)  # keyed by blind index, not the number


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"text": "HELP"}, "from is required"),
        ({"from": "hello", "text": "HELP"}, "not a valid mobile number"),
    ],
)
async def test_bad_inbound(rt: Any, sms_client: Any, form: dict[str, str], message: str) -> None:
    response = await sms_client.post("/sms/africastalking/inbound", data=form)
    assert response.status == 400 and message in await response.text()
    assert await jobs_of(rt, "sms.send") == []


async def test_a_report_that_cannot_be_parked_is_refused_503_to_come_again(rt: Any, sms_client: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarting when a report for an id not yet stored arrives: the aggregator is told to send it again
    (503 with Retry-After, as every outage is answered), and it applies once the id is stored."""
    import redis

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Error 111 connecting to redis: Connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(routes, "park_report", down)
        answer = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_R", "status": "Success"})
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
        body = await answer.json()
        assert (body["code"], body["path"]) == ("SERVICE_UNAVAILABLE", "/sms/africastalking/delivery")
    sms_id = await sent_message(rt, "ATXid_R")
    again = await sms_client.post("/sms/africastalking/delivery", data={"id": "ATXid_R", "status": "Success"})
    assert again.status == 200 and await again.text() == "delivered"
    assert (await status_of(rt, sms_id)).status == "DELIVERED"
