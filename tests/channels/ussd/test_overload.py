"""Overload: past USSD_MAX_HOPS_IN_FLIGHT a hop is answered "unavailable" at once, touching nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ClassVar

import pytest

from channels.ussd import sessions
from core.metrics import REGISTRY
from core.models import OutboxJob, Payment, UssdSession
from tests.channels.ussd.helpers import AtPhone

EN_MTN = "+250788000002"  # Jean Bosco, English
RW_MTN = "+250788000001"  # Aline, Kinyarwanda
FR_AIRTEL = "+250733000001"  # Claudine, French
RW_UNAVAILABLE = "Serivisi ntiboneka ubu, ongera ugerageze nyuma."
FR_UNAVAILABLE = "Service indisponible, veuillez réessayer plus tard."
# Seconds: the test's patience, not what is tested. That a hop past the cap is answered at once, not held until
# the hop budget (3 s) cuts it, is shown by the gate (the shed hop never reaches the session store) and the
# shed counter: a clock bound below the budget failed whenever a loaded machine paused this process.
PATIENCE = 30.0
# The held hops' budget, as far off as the test's patience: they fill the cap only while they run, and a hop held
# past its budget is cut (TimeoutError) and gives its place back. With the tests' 8 s budget, a loaded machine that
# paused this process between filling the cap and the hop meant to be shed let that hop in: a confirmation paid,
# an opening hop was served, and the held hops answered "unavailable".
HELD_BUDGET = PATIENCE


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def shed_count(aggregator: str) -> float:
    return sample("gateway_ussd_hops_shed_total", aggregator=aggregator)


def in_flight() -> float:
    return sample("gateway_ussd_hops_in_flight")


class Gate:
    """Holds every hop inside its handler (at the session load, before anything is read or written) until
    opened; `entered` counts the hops held, `left` those that went on past it and ended.

    Every gate a test makes is released when the test ends (`release`, by `_gates_released`), whether it passed or
    not: a test that failed with hops still held left them waiting for the gate, and they went on (cut by their
    budget, or let through as the app closed) into the next test's clean-up, which then failed too."""

    made: ClassVar[list[Gate]] = []  # this test's gates (emptied by _gates_released)

    def __init__(self) -> None:
        self.entered = 0
        self.left = 0
        self.opened = asyncio.Event()
        self._came = asyncio.Condition()
        self._hops: list[asyncio.Task[str]] = []
        Gate.made.append(self)

    def hold(self, real: Callable[..., Any]) -> Callable[..., Any]:
        async def held(*args: Any, **kwargs: Any) -> Any:
            async with self._came:
                self.entered += 1
                self._came.notify_all()
            try:
                await self.opened.wait()
                return await real(*args, **kwargs)
            finally:
                async with self._came:
                    self.left += 1
                    self._came.notify_all()
        return held

    def send(self, hop: Coroutine[Any, Any, str]) -> asyncio.Task[str]:
        """A hop sent meanwhile (as a task), which the release waits for too."""
        task = asyncio.create_task(hop)
        self._hops.append(task)
        return task

    async def release(self) -> None:
        """Open the gate and wait, within the test's patience, for every hop it held to leave the handler and
        every hop sent through `send` to be answered (or fail: the test has ended, nobody reads it)."""
        self.opened.set()
        async with self._came:
            await asyncio.wait_for(self._came.wait_for(lambda: self.left >= self.entered), PATIENCE)
        if self._hops:
            await asyncio.wait_for(asyncio.gather(*self._hops, return_exceptions=True), PATIENCE)

    async def until(self, count: int) -> None:
        """Until `count` hops are held, within the test's patience (a count of short sleeps ran out on a loaded
        machine before the hops were in)."""
        async with self._came:
            try:
                await asyncio.wait_for(self._came.wait_for(lambda: self.entered >= count), PATIENCE)
            except TimeoutError:
                raise AssertionError(f"{self.entered} hops held, expected {count}") from None


@pytest.fixture
async def capped(rt: Any, aiohttp_client: Any, settings_factory: Any) -> Any:
    """The app with room for two hops in flight, each hop's budget HELD_BUDGET."""
    from app import create_app
    from channels.ussd.routes import USSD

    client = await aiohttp_client(create_app(settings_factory(USSD_MAX_HOPS_IN_FLIGHT="2"), runtime=rt))
    client.server.app[USSD].budget = HELD_BUDGET
    return client


@pytest.fixture(autouse=True)
async def _gates_released(capped: Any) -> AsyncIterator[None]:
    """Every gate the test made released once it ends (see Gate), before the app and the runtime close (this
    fixture comes after `capped`, so it ends before it)."""
    Gate.made.clear()
    yield
    made, Gate.made[:] = list(Gate.made), []
    for gate in made:
        await gate.release()


async def fill(client: Any, monkeypatch: Any) -> tuple[Gate, list[asyncio.Task[str]]]:
    """Two opening hops held in flight: the cap is full until the gate opens."""
    gate = Gate()
    monkeypatch.setattr(sessions, "load_opening", gate.hold(sessions.load_opening))
    held = [gate.send(AtPhone(client, EN_MTN).dial()) for _ in range(2)]
    await gate.until(2)
    return gate, held


async def learn_language(client: Any, phone: str) -> None:
    """One hop, so that this process knows the phone's language (as for any "unavailable" answer)."""
    assert (await AtPhone(client, phone).dial()).startswith("CON ")


async def test_the_hop_past_the_cap_is_answered_unavailable_at_once_and_nothing_is_written(
        capped: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    await learn_language(capped, RW_MTN)
    gate = Gate()
    monkeypatch.setattr(sessions, "load_opening", gate.hold(sessions.load_opening))
    rows, keys = await db.count(UssdSession), sorted(await rt.redis.keys("*"))
    shed, busy_hops = shed_count("africastalking"), sample("gateway_ussd_hops_total", aggregator="africastalking",
                                                           screen="busy")
    busy_sessions = sample("gateway_ussd_sessions_total", aggregator="africastalking", outcome="busy")
    gauge = in_flight()
    first, second = AtPhone(capped, EN_MTN), AtPhone(capped, EN_MTN)
    held = [gate.send(first.dial()), gate.send(second.dial())]
    await gate.until(2)
    assert in_flight() == gauge + 2

    excess = AtPhone(capped, RW_MTN)
    resp = await asyncio.wait_for(capped.post("/ussd/africastalking", data=excess.form()), PATIENCE)
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert await resp.text() == f"END {RW_UNAVAILABLE}"
    assert gate.entered == 2  # the excess hop never reached the session store
    assert shed_count("africastalking") == shed + 1
    assert sample("gateway_ussd_hops_total", aggregator="africastalking", screen="busy") == busy_hops + 1
    assert sample("gateway_ussd_sessions_total", aggregator="africastalking", outcome="busy") == busy_sessions + 1
    # Nothing was created or touched for it: no session row, no Redis key (session, resume route, language).
    assert await db.count(UssdSession) == rows
    assert sorted(await rt.redis.keys("*")) == keys
    assert await rt.redis.get(sessions.session_key("africastalking", excess.session_id)) is None

    gate.opened.set()
    answers = await asyncio.gather(*held)
    assert all(answer.startswith("CON Welcome to") for answer in answers), answers
    assert in_flight() == gauge
    assert await db.count(UssdSession, UssdSession.session_id.in_([first.session_id, second.session_id])) == 2
    assert await db.count(UssdSession, UssdSession.session_id == excess.session_id) == 0
    # Room again: the same member is served.
    assert (await AtPhone(capped, RW_MTN).dial()).startswith("CON ")
    assert shed_count("africastalking") == shed + 1


async def test_hubtel_and_nalo_are_answered_in_their_own_wire_format(capped: Any, demo: Any, db: Any,
                                                                      monkeypatch: Any) -> None:
    await learn_language(capped, FR_AIRTEL)
    rows = await db.count(UssdSession)
    gate, held = await fill(capped, monkeypatch)
    shed_hubtel, shed_nalo = shed_count("hubtel"), shed_count("nalo")

    resp = await asyncio.wait_for(capped.post("/ussd/hubtel", json={
        "Mobile": "250733000001", "SessionId": "hubtel-busy-1", "ServiceCode": "384*123", "Type": "Initiation",
        "Message": "*384*123#", "Operator": "airtel", "Sequence": 1, "ClientState": "c1"}), PATIENCE)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == {"Type": "Release", "Message": FR_UNAVAILABLE, "Label": "CoopPay",
                                 "ClientState": "c1", "DataType": "display", "FieldType": "text"}

    resp = await asyncio.wait_for(capped.post("/ussd/nalo", json={
        "USERID": "NALOTest", "MSISDN": "250733000001", "USERDATA": "*384*123#", "MSGTYPE": True,
        "NETWORK": "AIRTEL", "SESSIONID": "nalo-busy-1"}), PATIENCE)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert json.loads(await resp.text()) == {"USERID": "NALOTest", "MSISDN": "250733000001",
                                             "MSG": FR_UNAVAILABLE, "MSGTYPE": False}
    assert (shed_count("hubtel"), shed_count("nalo")) == (shed_hubtel + 1, shed_nalo + 1)
    assert gate.entered == 2

    gate.opened.set()
    assert all(a.startswith("CON Welcome to") for a in await asyncio.gather(*held))
    assert await db.count(UssdSession) == rows + 2  # the two held hops' rows; none for the shed ones


async def test_a_shed_confirmation_pays_nothing_and_the_next_dial_resumes_it(
        capped: Any, demo: Any, db: Any, rt: Any, monkeypatch: Any) -> None:
    """Shed mid-session, on the confirmation: nothing is half-done. The session stays as the last hop saved
    it, the next dial offers to resume it, and confirming there pays once with the reserved reference."""
    phone = AtPhone(capped, EN_MTN)
    await phone.dial()
    await phone.send("1")
    confirm = await phone.send("2")  # Water: "1. Confirm"
    assert confirm.startswith("CON Pay Water")
    key = sessions.session_key("africastalking", phone.session_id)
    saved = await rt.redis.get(key)
    gate, held = await fill(capped, monkeypatch)

    shed = shed_count("africastalking")
    assert await asyncio.wait_for(phone.send("1"), PATIENCE) == "END Service unavailable, please try again later."
    assert gate.entered == 2 and shed_count("africastalking") == shed + 1  # shed, not held and cut by the budget
    assert await db.count(Payment) == 0 and await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 0
    assert await rt.redis.get(key) == saved  # the session as the confirmation left it

    gate.opened.set()
    await asyncio.gather(*held)
    again = AtPhone(capped, EN_MTN)
    assert (await again.dial()).startswith("CON You did not finish your last session.")
    assert await again.send("1") == confirm  # the same screen, the same reserved reference
    assert (await again.send("1")).startswith("END Approve the prompt")
    payment = await db.one(Payment)
    assert payment.idempotency_key == f"ussd:africastalking:{again.session_id}"
    assert await db.count(OutboxJob, OutboxJob.kind == "payment.collect") == 1


async def test_a_copy_of_a_hop_paying_now_is_told_to_wait_for_the_sms(capped: Any, demo: Any, db: Any,
                                                                      monkeypatch: Any) -> None:
    """The aggregator's copy of a confirmation whose payment is being written here, shed: not "try again"
    (the member would pay twice) but the answer of a payment whose outcome is not known yet."""
    import core.payments
    from channels.ussd.routes import USSD

    capped.server.app[USSD].max_in_flight = 1  # the paying hop alone fills it
    phone = AtPhone(capped, EN_MTN)
    await phone.dial()
    await phone.send("1")
    await phone.send("2")
    gate = Gate()
    monkeypatch.setattr(core.payments, "create_payment", gate.hold(core.payments.create_payment))
    paying = gate.send(phone.send("1"))
    await gate.until(1)  # the payment began: the hop is inside its transaction
    shed = shed_count("africastalking")
    copy = await asyncio.wait_for(phone.resend(), PATIENCE)
    assert copy == ("END Your request is still being processed. If it went through you will get an SMS "
                    "shortly; wait for it before trying again.")
    assert shed_count("africastalking") == shed + 1 and gate.entered == 1
    # Another session is told "unavailable" as usual.
    assert await AtPhone(capped, EN_MTN).dial() == "END Service unavailable, please try again later."
    gate.opened.set()
    assert (await paying).startswith("END Approve the prompt")
    assert await db.count(Payment) == 1
