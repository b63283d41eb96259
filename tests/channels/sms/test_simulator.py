"""The Africa's Talking simulator speaks the messaging API over HTTP, keeps inboxes and posts reports."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from aiohttp import web

from channels.sms.sender import AfricasTalkingConfig, AfricasTalkingSender, SmsAccountError, SmsTemporaryError
from channels.sms.simulator import STATE, create_simulator
from core.config import Secret
from core.phone import Phone

KEY = "k-sim"


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient() as client:
        yield client


async def serve(aiohttp_server: Any, **options: Any) -> tuple[str, Any]:
    app = create_simulator(username="coop", api_key=KEY, **options)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), app


def sender(
    http: httpx.AsyncClient, base: str, key: str = KEY, username: str = "coop"
) -> AfricasTalkingSender:
    return AfricasTalkingSender(
        http, AfricasTalkingConfig(base_url=base, username=username, api_key=Secret(key), sender_id="COOPPAY")
    )


async def test_send_and_inbox_over_http(aiohttp_server: Any, http: httpx.AsyncClient) -> None:
    base, _ = await serve(aiohttp_server)
    result = await sender(http, base).send(Phone("+250788000001"), "Murakoze cyane €")
    assert result.accepted and result.provider_message_id.startswith("ATXid_")
    assert result.cost == "RWF 20.0000"
    inbox = (await http.get(f"{base}/_inbox/+250788000001")).json()
    assert inbox["messages"][0]["message"] == "Murakoze cyane €"
    assert inbox["messages"][0]["id"] == result.provider_message_id
    assert (await http.get(f"{base}/_inbox/250788000001")).json()["messages"]  # '+' optional in the path
    everything = (await http.get(f"{base}/_inbox")).json()
    assert list(everything["inboxes"]) == ["+250788000001"]
    assert (await http.delete(f"{base}/_inbox")).status_code == 200
    assert (await http.get(f"{base}/_inbox")).json() == {"inboxes": {}}


async def test_wrong_credentials(aiohttp_server: Any, http: httpx.AsyncClient) -> None:
    base, _ = await serve(aiohttp_server)
    with pytest.raises(SmsTemporaryError, match="401"):
        await sender(http, base, key="wrong").send(Phone("+250788000001"), "x")
    with pytest.raises(SmsTemporaryError, match="401"):
        await sender(http, base, username="other").send(Phone("+250788000001"), "x")
    raw = await http.post(
        f"{base}/version1/messaging",
        headers={"apiKey": KEY},
        data={"username": "coop", "to": "", "message": ""},
    )
    assert raw.status_code == 400
    # A key that is not ASCII (a header is read as Latin-1) is a wrong key too, not the simulator's 500.
    garbled = await http.post(f"{base}/version1/messaging", headers={"apiKey": "k-sim\u00e9".encode("latin-1")},
                              data={"username": "coop", "to": "+250788000001", "message": "x"})
    assert garbled.status_code == 401 and garbled.text == "The supplied authentication is invalid"


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        ("UserInBlackList", "UserInBlacklist", 406),
        ("InvalidPhoneNumber", "InvalidPhoneNumber", 403),
        ("InsufficientBalance", "InsufficientBalance", 405),
    ],
)
async def test_configured_send_failures(
    aiohttp_server: Any, http: httpx.AsyncClient, failure: str, status: str, code: int
) -> None:
    base, _ = await serve(aiohttp_server, failures={"+250788000009": failure})
    answer = await http.post(
        f"{base}/version1/messaging",
        headers={"apiKey": KEY, "Accept": "application/json"},
        data={"username": "coop", "to": "+250788000009", "message": "x"},
    )
    recipient = answer.json()["SMSMessageData"]["Recipients"][0]
    assert (recipient["statusCode"], recipient["status"]) == (code, status)
    if status == "InsufficientBalance":  # our account, not the number: retried until topped up
        with pytest.raises(SmsAccountError, match=status):
            await sender(http, base).send(Phone("+250788000009"), "x")
    else:
        result = await sender(http, base).send(Phone("+250788000009"), "x")
        assert result.permanent and result.provider_status == status
    # Other numbers are unaffected.
    assert (await sender(http, base).send(Phone("+250788000001"), "x")).accepted


async def test_http_failures_through_the_control_endpoint(
    aiohttp_server: Any, http: httpx.AsyncClient
) -> None:
    base, _ = await serve(aiohttp_server)
    assert (await http.post(f"{base}/_control", json={"failure": "http500", "times": 1})).status_code == 200
    with pytest.raises(SmsTemporaryError, match="HTTP 500"):
        await sender(http, base).send(Phone("+250788000001"), "x")
    assert (await sender(http, base).send(Phone("+250788000001"), "x")).accepted
    bad = await http.post(f"{base}/_control", json={"failure": "Nope"})
    assert bad.status_code == 400 and "unknown failure" in bad.json()["error"]
    # "times": 0 fails nothing (it failed one message), and a count below it is refused.
    assert (await http.post(f"{base}/_control", json={"failure": "http500", "times": 0})).status_code == 200
    assert (await sender(http, base).send(Phone("+250788000001"), "x")).accepted
    negative = await http.post(f"{base}/_control", json={"failure": "http500", "times": -1})
    assert negative.status_code == 400 and "times must be 0 or more" in negative.json()["error"]
    assert (await sender(http, base).send(Phone("+250788000001"), "x")).accepted


async def test_a_request_failed_by_one_number_reaches_nobody(aiohttp_server: Any, http: httpx.AsyncClient) -> None:
    """A send to several numbers that one of them fails with a 5xx is refused whole: the numbers before it are not
    inboxed (the caller sends it again, and each gets it once), and their own failures are not used up."""
    base, app = await serve(aiohttp_server, delivery_delay=60)
    state = app[STATE]
    state.set_failure("UserInBlackList", number="+250788000003", times=1)
    state.set_failure("http500", number="+250788000002", times=1)
    form = {"username": "coop", "to": "+250788000001,+250788000003,+250788000002", "message": "x"}
    refused = await http.post(f"{base}/version1/messaging", headers={"apiKey": KEY}, data=form)
    assert refused.status_code == 500
    assert (await http.get(f"{base}/_inbox")).json() == {"inboxes": {}}
    again = await http.post(f"{base}/version1/messaging", headers={"apiKey": KEY, "Accept": "application/json"},
                            data=form)
    assert again.status_code == 201
    codes = {r["number"]: r["statusCode"] for r in again.json()["SMSMessageData"]["Recipients"]}
    assert codes == {"+250788000001": 101, "+250788000003": 406, "+250788000002": 101}
    inboxes = (await http.get(f"{base}/_inbox")).json()["inboxes"]
    assert {number: len(messages) for number, messages in inboxes.items()} == {"+250788000001": 1, "+250788000002": 1}


async def test_a_request_failed_by_one_number_keeps_the_failure_set_for_every_number(
    aiohttp_server: Any, http: httpx.AsyncClient
) -> None:
    """A failure set for every number's next message is not used up by a request one of its numbers refuses whole
    (a 5xx): the caller's retry is that next message (before: it was taken by the refused request, and the retry
    was sent)."""
    base, app = await serve(aiohttp_server, delivery_delay=60)
    state = app[STATE]
    state.set_failure("InsufficientBalance", times=1)
    state.set_failure("http503", number="+250788000002", times=1)
    form = {"username": "coop", "to": "+250788000001,+250788000002", "message": "x"}
    refused = await http.post(f"{base}/version1/messaging", headers={"apiKey": KEY}, data=form)
    assert refused.status_code == 503
    again = await http.post(f"{base}/version1/messaging", headers={"apiKey": KEY, "Accept": "application/json"},
                            data=form)
    assert again.status_code == 201
    codes = {r["number"]: r["statusCode"] for r in again.json()["SMSMessageData"]["Recipients"]}
    assert codes == {"+250788000001": 405, "+250788000002": 405}
    assert (await http.get(f"{base}/_inbox")).json() == {"inboxes": {}}
    third = await http.post(f"{base}/version1/messaging", headers={"apiKey": KEY, "Accept": "application/json"},
                            data=form)
    assert [r["statusCode"] for r in third.json()["SMSMessageData"]["Recipients"]] == [101, 101]


async def test_delivery_reports_are_posted(aiohttp_server: Any, http: httpx.AsyncClient) -> None:
    received: list[dict[str, str]] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append(dict(await request.post()))
        return web.Response(text="ok")

    hook = web.Application()
    hook.router.add_post("/dlr", receiver)
    hook_server = await aiohttp_server(hook)
    base, _ = await serve(
        aiohttp_server,
        delivery_url=str(hook_server.make_url("/dlr")),
        delivery_delay=0.01,
        failures={"+250788000002": "InsufficientCredit", "+250788000003": "Expired"},
    )
    ids = {}
    for number in ("+250788000001", "+250788000002", "+250788000003"):
        ids[number] = (await sender(http, base).send(Phone(number), "x")).provider_message_id
    for _ in range(100):
        if len(received) == 3:
            break
        await asyncio.sleep(0.02)
    by_id = {r["id"]: r for r in received}
    assert by_id[ids["+250788000001"]]["status"] == "Success"
    assert by_id[ids["+250788000002"]]["status"] == "Failed"
    assert by_id[ids["+250788000002"]]["failureReason"] == "InsufficientCredit"
    assert by_id[ids["+250788000003"]]["status"] == "Expired"
    assert by_id[ids["+250788000001"]]["phoneNumber"] == "+250788000001"


async def test_delivery_reports_name_the_recipients_network(aiohttp_server: Any, http: httpx.AsyncClient) -> None:
    """Africa's Talking reports the network of the number it delivered to (its MCC-MNC), not MTN Rwanda's 63510 for
    every recipient: a Safaricom number's report says 63902, an MTN Uganda one's 64110. A number whose network the
    simulator cannot name gets AT's sandbox code, 99999."""
    received: list[dict[str, str]] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append(dict(await request.post()))
        return web.Response(text="ok")

    hook = web.Application()
    hook.router.add_post("/dlr", receiver)
    hook_server = await aiohttp_server(hook)
    base, _ = await serve(aiohttp_server, delivery_url=str(hook_server.make_url("/dlr")), delivery_delay=0.01)
    networks = {
        "+250788000001": "63510",  # MTN Rwanda
        "+250733000001": "63513",  # Airtel Rwanda (Tigo's code before)
        "+254712345678": "63902",  # Safaricom
        "+254733123456": "63903",  # Airtel Kenya
        "+256772123456": "64110",  # MTN Uganda
        "+256752123456": "64101",  # Airtel Uganda
        "+255754123456": "64004",  # Vodacom Tanzania
        "+255784123456": "64005",  # Airtel Tanzania
        "+255713123456": "64002",  # Yas (Tigo) Tanzania
        "+12025550123": "99999",  # no network the simulator knows
        "+99912345678": "99999",  # no country at all
    }
    for number in networks:
        assert (await sender(http, base).send(Phone(number), "x")).accepted
    for _ in range(100):
        if len(received) == len(networks):
            break
        await asyncio.sleep(0.02)
    assert {r["phoneNumber"]: r["networkCode"] for r in received} == networks
