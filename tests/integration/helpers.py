"""What integration tests do over HTTP: dial USSD like Africa's Talking, read SMS inboxes, wait for rows."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
from sqlalchemy import func, select

from core.models import AuditEvent, OutboxJob, Payment, SmsMessage

T = TypeVar("T")
REFERENCE = re.compile(r"PAY_\d{8}_\d+")
SERVICE_CODE = "*384*123#"
MTN_OK, MTN_FAIL, MTN_PENDING = "+250788000001", "+250788000002", "+250788000003"
AIRTEL_OK, AIRTEL_FAIL = "+250733000001", "+250733000002"


async def wait_for(check: Callable[[], Awaitable[T]], *, timeout: float,  # noqa: ASYNC109 - a deadline
                   interval: float = 0.2, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(interval)


class UssdPhone:
    """A feature phone behind Africa's Talking: accumulated `text`, one sessionId, hops over `urls` in turn."""

    def __init__(self, http: aiohttp.ClientSession, urls: Sequence[str], phone: str, *,
                 session_id: str | None = None, timeout: float = 10.0) -> None:
        self.http, self.urls, self.phone = http, list(urls), phone
        self.session_id = session_id or f"ATUid_{uuid.uuid4().hex[:16]}"
        self.inputs: list[str] = []
        self.hops = 0
        self.timeout = timeout
        self.served_by: list[str] = []
        self.latencies: list[float] = []
        self.screens: list[str] = []

    def form(self) -> dict[str, str]:
        return {"sessionId": self.session_id, "serviceCode": SERVICE_CODE, "phoneNumber": self.phone,
                "networkCode": "63510", "text": "*".join(self.inputs)}

    async def post(self) -> tuple[int, str]:
        url = self.urls[self.hops % len(self.urls)]
        self.hops += 1
        self.served_by.append(url)
        started = time.monotonic()
        async with self.http.post(f"{url}/ussd/africastalking", data=self.form(),
                                  timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
            body = await resp.text()
        self.latencies.append(time.monotonic() - started)
        self.screens.append(body)
        return resp.status, body

    async def dial(self) -> str:
        status, body = await self.post()
        assert status == 200, (status, body)
        assert body.startswith(("CON ", "END ")), body
        return body

    async def send(self, key: str) -> str:
        self.inputs.append(key)
        return await self.dial()

    async def pay_first_type(self) -> str:
        """Dial, Pay, the first payment type (Monthly Rent, 50,000 RWF), confirm: returns the reference."""
        home = await self.dial()
        assert home.startswith("CON "), home
        types = await self.send("1")
        assert types.startswith("CON "), types
        confirm = await self.send(option(types, "Monthly Rent", default="1"))
        if confirm.startswith("CON ") and "50,000" not in confirm and "50 000" not in confirm:
            # This period's rent paid already (an earlier test's payment of hers): told so, she pays it again (1).
            assert "Monthly Rent" in confirm and "/" in confirm, confirm
            confirm = await self.send("1")
        # As the member's language writes it (French: 50 000).
        assert confirm.startswith("CON ") and ("50,000" in confirm or "50 000" in confirm), confirm
        done = await self.send("1")
        assert done.startswith("END "), done
        found = REFERENCE.search(done)
        assert found, f"no payment reference in {done!r}"
        return found.group(0)


def option(screen: str, label: str, *, default: str | None = None) -> str:
    """The number in front of the line naming `label` (menus are translated; numbers are not)."""
    for line in screen[4:].split("\n"):
        number, _, text = line.partition(". ")
        if label in text and number.isdigit():
            return number
    if default is not None:
        return default
    raise AssertionError(f"{label!r} not offered in {screen!r}")


# -------------------------------------------------------------------------------------------- simulators


async def inbox(http: aiohttp.ClientSession, sms_url: str, phone: str) -> list[dict[str, Any]]:
    async with http.get(f"{sms_url}/_inbox/{phone.lstrip('+')}") as resp:
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["messages"])


async def messages_about(http: aiohttp.ClientSession, sms_url: str, phone: str, reference: str) -> list[str]:
    return [m["message"] for m in await inbox(http, sms_url, phone) if reference in m["message"]]


async def set_sim_options(http: aiohttp.ClientSession, sim_url: str, **options: Any) -> dict[str, Any]:
    async with http.post(f"{sim_url}/_control/options", json=options) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return dict(body)


async def sim_requests(http: aiohttp.ClientSession, sim_url: str) -> int:
    """Collection and refund requests a provider simulator has received."""
    async with http.get(f"{sim_url}/_control/stats") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return int(body["requests"])


async def set_sms_failure(http: aiohttp.ClientSession, sms_url: str, failure: str | None, *,
                          times: int | None = None, number: str | None = None) -> None:
    body: dict[str, Any] = {"failure": failure}
    if times is not None:
        body["times"] = times
    if number is not None:
        body["number"] = number
    async with http.post(f"{sms_url}/_control", json=body) as resp:
        assert resp.status == 200, await resp.text()


# -------------------------------------------------------------------------------------------- database


async def payment_by_reference(rt: Any, reference: str) -> Payment | None:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(Payment).where(Payment.reference == reference))).scalar_one_or_none()


async def wait_payment_status(rt: Any, reference: str, statuses: set[str] | str, *,
                              timeout: float) -> Payment:  # noqa: ASYNC109 - a deadline
    wanted = {statuses} if isinstance(statuses, str) else statuses

    async def check() -> Payment | None:
        payment = await payment_by_reference(rt, reference)
        return payment if payment is not None and payment.status in wanted else None

    try:
        return await wait_for(check, timeout=timeout, what=f"{reference} in {sorted(wanted)}")
    except AssertionError:
        payment = await payment_by_reference(rt, reference)
        found = f"{payment.status} ({payment.failure_reason})" if payment else "missing"
        raise AssertionError(f"{reference} is {found}, expected {sorted(wanted)} within {timeout}s") from None


async def sms_rows(rt: Any, payment_id: str, template: str | None = None) -> list[SmsMessage]:
    """SMS rows queued about one payment (the dedupe key carries the payment id)."""
    async with rt.sessionmaker() as s:
        query = select(SmsMessage).where(SmsMessage.idempotency_key.like(f"%{payment_id}%"))
        if template:
            query = query.where(SmsMessage.template == template)
        return list((await s.execute(query)).scalars())


async def transitions(rt: Any, payment_id: str, action: str) -> int:
    async with rt.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.entity_type == "payment", AuditEvent.entity_id == payment_id,
            AuditEvent.action == action))).scalar_one())


async def jobs(rt: Any, kind: str | None = None) -> list[OutboxJob]:
    async with rt.sessionmaker() as s:
        query = select(OutboxJob).order_by(OutboxJob.id)
        if kind:
            query = query.where(OutboxJob.kind == kind)
        return list((await s.execute(query)).scalars())


async def admin_token(http: aiohttp.ClientSession, url: str, credentials: tuple[str, str]) -> str:
    async with http.post(f"{url}/v1/auth/token",
                         json={"username": credentials[0], "password": credentials[1]}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["tokenType"] == "Bearer" and body["accessToken"]
        return str(body["accessToken"])
