"""A Kumasi market women's susu group (GH, GHS, Africa/Accra) walked through the app: a super admin onboards it and
imports its members' numbers as they write them; members pay the monthly susu (GHS 50.00) through Hubtel and a
savings deposit of their own amount through Nalo, with MTN MoMo Ghana (the simulator); receipts, BALANCE and STATUS
by SMS; the admin's list, export, a refund in part (GHS 12.34) and a dispute.

Found: the susu paid the day it was created (before the midpoint between the due date before it, when it did not
exist, and its first) paid no period: BALANCE still asked for "Monthly susu 50.00 GHS" and the dues report said
UNPAID (core.reminders.period_of)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import date, timedelta
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web

from core.config import ProviderConfig, Secret
from core.db import utcnow
from core.models import Payment, UssdSession
from core.reminders import PaidFor, due_dates
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import start_simulator
from tests.channels.sms.test_routes import inbound
from tests.conftest import drain
from tests.providers.test_mtn_momo import CREDS as SIM_CREDS
from tests.providers.wires import due_now

COOP = "Kejetia Market Women Susu"
CODE = "*384*123*233#"
AKOSUA = "+233244123456"  # MTN, written 024 412 3456 in the list
SENT = web.AppKey("sent", list)


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


def first_half_due_day() -> tuple[int, date]:
    """A due day whose first due date, for a type created now, is still before its period's midpoint (a payment made
    now pays it only if its first period starts when the type was created), and that first due date."""
    zone, now = ZoneInfo("Africa/Accra"), utcnow()
    for day in range(1, 29):
        fake = SimpleNamespace(is_recurring=True, due_day=day, recurring_interval="MONTHLY", created_at=now)
        window = due_dates(fake, now.astimezone(zone).date(), zone)  # type: ignore[arg-type]
        assert window is not None
        if PaidFor.of(*window, zone).since > now + timedelta(hours=1):
            return day, window[1]
    raise AssertionError("no due day")


async def kejetia(operator: Caller, due_day: int = 28) -> dict[str, Any]:
    coop = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": COOP, "shortCode": "KEJSUSU", "country": "GH", "currency": "GHS", "ussdExtension": "233"})
    susu = await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Monthly susu", "amount": "50.00", "cooperativeId": coop["id"], "recurringInterval": "MONTHLY",
        "dueDay": due_day})
    savings = await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Savings deposit", "amount": "20.00", "cooperativeId": coop["id"], "allowCustomAmount": True})
    assert (susu["amount"], susu["currency"], savings["amount"]) == ("50.00", "GHS", "20.00")
    data = "name,phone\nAkosua Mensah,024 412 3456\nAma Serwaa,+233-54-412-3457\nYaa Asantewaa,233 24 412 3458\n"
    imported = await operator.json("POST", f"/v1/members/import?cooperativeId={coop['id']}", 201,
                                   data=data.encode(), headers={"Content-Type": "text/csv"})
    assert (imported["imported"], imported["warnings"]) == (3, [])
    return {"coop": coop, "susu": susu, "savings": savings}


@contextlib.asynccontextmanager
async def mtn(rt: Any, aiohttp_server: Any) -> AsyncIterator[web.Application]:
    """MTN MoMo Ghana's simulator (mtnghana: GHS), each PIN prompt waiting for a decision, callbacks dropped."""
    app = create_simulator(SimulatorOptions(delay=0.01, drop_callback=True, interactive=True, credentials=SIM_CREDS))
    app[SENT] = []
    server = await aiohttp_server(app, host="127.0.0.1")
    config = ProviderConfig(base_url=str(server.make_url("")).rstrip("/"),
                            credentials={k: Secret(v) for k, v in SIM_CREDS.items()},
                            options={"target_environment": "mtnghana"})

    async def record(request: httpx.Request) -> None:
        if request.method == "POST" and "token" not in request.url.path:
            app[SENT].append((request.url.path, json.loads(request.content)))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        rt.providers = {**rt.providers, "mtn_momo": MtnMomoAdapter(http, config)}
        yield app


async def settle(rt: Any, worker: Any) -> None:
    for _ in range(3):
        await drain(worker)
        await asyncio.sleep(0.05)
        for kind in ("payment.poll", "refund.poll", "sms.send"):
            await due_now(rt, kind)
        await drain(worker)


async def approve(rt: Any, worker: Any, app: web.Application, msisdn: str = AKOSUA[1:]) -> None:
    await drain(worker)
    for _ in range(200):
        if app[STATE].prompts.pending(msisdn):
            break
        await asyncio.sleep(0.01)
    [prompt] = app[STATE].prompts.pending(msisdn)
    app[STATE].prompts.decide(prompt.reference, True)
    await settle(rt, worker)


class Hubtel:
    """A phone through Hubtel: JSON, the latest input only, numbered hops."""

    def __init__(self, client: Any, mobile: str, session_id: str) -> None:
        self.client, self.mobile, self.session_id, self.sequence = client, mobile, session_id, 0

    async def post(self, kind: str, message: str) -> dict[str, Any]:
        self.sequence += 1
        resp = await self.client.post("/ussd/hubtel", json={
            "Mobile": self.mobile, "SessionId": self.session_id, "ServiceCode": "384", "Type": kind,
            "Message": message, "Operator": "mtn", "Sequence": self.sequence, "ClientState": "kej"})
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        assert body["ClientState"] == "kej" and len(body["Message"]) <= 182, body
        return body

    async def walk(self, *keys: str) -> list[str]:
        screens = [(await self.post("Initiation", CODE))["Message"]]
        for key in keys:
            screens.append((await self.post("Response", key))["Message"])
        return screens


class Nalo:
    """A phone through Nalo: JSON, MSGTYPE true on the first hop, the latest input only, MSG at most 120."""

    def __init__(self, client: Any, msisdn: str, session_id: str) -> None:
        self.client, self.msisdn, self.session_id = client, msisdn, session_id

    async def post(self, data: str, first: bool) -> dict[str, Any]:
        resp = await self.client.post("/ussd/nalo", json={
            "USERID": "NALO_KEJ", "MSISDN": self.msisdn, "USERDATA": data, "MSGTYPE": first, "NETWORK": "MTN",
            "SESSIONID": self.session_id})
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        assert (body["USERID"], body["MSISDN"]) == ("NALO_KEJ", self.msisdn) and len(body["MSG"]) <= 120, body
        return body

    async def walk(self, *keys: str) -> list[str]:
        screens = [(await self.post(CODE, True))["MSG"]]
        for key in keys:
            screens.append((await self.post(key, False))["MSG"])
        return screens


async def test_the_susu_paid_through_hubtel_on_its_first_day_is_paid(
        operator: Caller, client: Any, rt: Any, db: Any, worker: Any, aiohttp_server: Any) -> None:
    due_day, first_due = first_half_due_day()
    made = await kejetia(operator, due_day)
    _server, sms = await start_simulator(aiohttp_server, rt)
    async with mtn(rt, aiohttp_server) as app:
        home, types, confirm, done = await Hubtel(client, "0244123456", "hub-susu").walk("1", "1", "1")
        assert home == (f"Welcome to {COOP}\n1. Pay\n2. My payments\n3. Problem with a payment\n4. Language\n"
                        "5. Help")
        assert types == (f"Choose what to pay:\n1. Monthly susu GHS 50.00 (due day {due_day})\n"
                         "2. Savings deposit GHS 20.00\n0. Back")
        assert confirm.startswith("Pay Monthly susu\nAmount: GHS 50.00\nFee: GHS 0.00\nVia MTN MoMo\nRef: PAY_")
        assert done.startswith("Approve the prompt on your phone to pay GHS 50.00. Ref PAY_")
        await approve(rt, worker, app)
        [(path, asked)] = app[SENT]
        assert path == "/collection/v1_0/requesttopay"
        assert (asked["amount"], asked["currency"], asked["payer"]["partyId"]) == ("50.00", "GHS", "233244123456")
    paid = await db.one(Payment)
    assert (paid.status, paid.amount_minor, paid.currency) == ("COMPLETED", 5000, "GHS")
    [receipt] = [m["message"] for m in sms.messages(AKOSUA)]
    assert receipt.startswith(f"We received GHS 50.00 for Monthly susu, {COOP}. Ref: {paid.reference}.")
    # BALANCE: the period she just paid, not still owed.
    await inbound(client, AKOSUA, "BALANCE", "gh-bal-1")
    await settle(rt, worker)
    assert sms.messages(AKOSUA)[-1]["message"] == (
        f"Still to pay this period (KEJSUSU): Monthly susu paid. Dial {CODE} to pay.")
    dues = await operator.json("GET", f"/v1/reports/dues?paymentTypeId={made['susu']['id']}", 200)
    assert dues["period"]["dueDate"] == first_due.isoformat()  # its first, not a due date before it existed
    assert {(line["name"], line["status"], line["amountPaid"]) for line in dues["data"]} == {
        ("Akosua Mensah", "PAID", "50.00"), ("Ama Serwaa", "UNPAID", "0.00"), ("Yaa Asantewaa", "UNPAID", "0.00")}
    # Paying it again is offered as paid, not as 50.00 GHS more.
    *_, again = await Hubtel(client, "233244123456", "hub-susu-2").walk("1", "1")
    assert again == f"You have already paid Monthly susu for {first_due:%d/%m/%Y}.\n1. Pay again\n0. Back\n00. Home"


@pytest.mark.parametrize(("typed", "minor"), [("20", 2000), ("20.5", 2050), ("20.50", 2050), ("1,000", 100_000)])
async def test_a_savings_amount_typed_through_nalo_is_read_in_pesewas(operator: Caller, client: Any,
                                                                      typed: str, minor: int) -> None:
    await kejetia(operator)
    _home, _types, prompt, confirm = await Nalo(client, "233544123457", "nalo-amt").walk("1", "2", typed)
    assert prompt == "Enter amount in GHS (usual: GHS 20.00):\n0. Back\n00. Home"
    shown = f"GHS {minor // 100:,}.{minor % 100:02d}"
    assert confirm.startswith(f"Savings deposit: {shown}\nRef PAY_"), confirm
    assert confirm.endswith("\nMTN MoMo\n1. Confirm\n2. Cancel\n0. Back\n00. Home")


@pytest.mark.parametrize("typed", ["20,50", "20.505", "0.001", "GHS 20", "20.", ".5"])
async def test_an_amount_nalo_cannot_read_is_asked_again(operator: Caller, client: Any, typed: str) -> None:
    await kejetia(operator)
    *_, again = await Nalo(client, "233544123457", "nalo-bad").walk("1", "2", typed)
    assert again == ("Enter an amount in GHS, e.g. 10.50:\nEnter amount in GHS (usual: GHS 20.00):\n0. Back\n"
                     "00. Home")


async def test_a_hubtel_timeout_is_resumed_from_nalo_with_the_amount_typed(operator: Caller, client: Any,
                                                                           db: Any) -> None:
    await kejetia(operator)
    hubtel = Hubtel(client, "233244123456", "hub-timeout")
    *_, confirm = await hubtel.walk("1", "2", "15.75")
    assert confirm.startswith("Pay Savings deposit\nAmount: GHS 15.75\n")
    assert (await hubtel.post("Timeout", ""))["Type"] == "Release"
    assert (await db.one(UssdSession)).status == "Incomplete"
    offer, resumed = await Nalo(client, "0244123456", "nalo-resume").walk("1")
    assert offer == "You did not finish your last session.\n1. Continue where you left off\n2. Start again"
    assert resumed.startswith("Savings deposit: GHS 15.75\nRef PAY_")


async def test_refund_in_part_and_dispute(operator: Caller, client: Any, rt: Any, db: Any, worker: Any,
                                          aiohttp_server: Any) -> None:
    made = await kejetia(operator)
    cid = made["coop"]["id"]
    _server, sms = await start_simulator(aiohttp_server, rt)
    async with mtn(rt, aiohttp_server) as app:
        *_, done = await Hubtel(client, "0244123456", "hub-save").walk("1", "2", "20.50", "1")
        assert done.startswith("Approve the prompt on your phone to pay GHS 20.50.")
        await approve(rt, worker, app)
        paid = await db.one(Payment)
        listed = await operator.json("GET", f"/v1/payments?cooperativeId={cid}", 200)
        assert [(p["amount"], p["currency"], p["refundedAmount"]) for p in listed["data"]] == [("20.50", "GHS", "0.00")]
        export = await operator.req("GET", f"/v1/reports/payments.csv?cooperativeId={cid}&from=2026-01-01")
        assert f",{paid.reference},".encode() in await export.read()
        refund = await operator.json("POST", f"/v1/payments/{paid.id}/refunds", 201, json={
            "amount": "12.34", "reason": "overpaid", "idempotencyKey": "gh-refund-0001"})
        assert (refund["amount"], refund["currency"]) == ("12.34", "GHS")
        await settle(rt, worker)
        assert app[SENT][-1][0] == "/disbursement/v1_0/refund"
        assert (app[SENT][-1][1]["amount"], app[SENT][-1][1]["currency"]) == ("12.34", "GHS")
        too_fine = await operator.req("POST", f"/v1/payments/{paid.id}/refunds", json={
            "amount": "1.234", "reason": "x", "idempotencyKey": "gh-refund-0002"})
        assert (await too_fine.json())["message"] == ["GHS has 2 decimal places; 1.234 has more"]
        # She complains through Nalo; the admin resolves it refunding the rest.
        *_, opened = await Nalo(client, "233244123456", "nalo-dsp").walk("3", "1", "2")
        assert opened.startswith("Complaint DSP_") and opened.endswith(f" opened. {COOP} will contact you.")
        [dispute] = (await operator.json("GET", f"/v1/disputes?cooperativeId={cid}", 200))["data"]
        assert dispute["reason"] == "WRONG_AMOUNT"
        await operator.json("POST", f"/v1/disputes/{dispute['id']}/transitions", 200, json={
            "status": "RESOLVED", "refundAmount": "8.16", "note": "rest refunded"})
        await settle(rt, worker)
    got = await operator.json("GET", f"/v1/payments/{paid.id}", 200)
    assert (got["status"], got["refundedAmount"]) == ("REFUNDED", "20.50")
    texts = [m["message"] for m in sms.messages(AKOSUA)]
    assert f"Refund of GHS 12.34 for payment {paid.reference} ({COOP}) completed." in " ".join(texts)
    assert f"Refund of GHS 8.16 for payment {paid.reference} ({COOP}) completed." in " ".join(texts)
