"""PIN prompts on the provider simulators: who gets one (the numbers a phone page holds, or everyone with
the `interactive` option), and what approving, declining or ignoring it comes to for scripted numbers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from core.ports import CollectionRequest, ProviderOutcome
from providers.airtel.adapter import AirtelAdapter
from providers.airtel.simulator import create_simulator as create_airtel
from providers.mpesa.adapter import MpesaAdapter
from providers.mpesa.simulator import create_simulator as create_mpesa
from providers.mtn_momo.adapter import MtnMomoAdapter
from providers.mtn_momo.simulator import create_simulator as create_mtn
from providers.simulation import STATE, SimulatorOptions, SimulatorState
from tests.providers import test_airtel as airtel
from tests.providers import test_mpesa as mpesa
from tests.providers import test_mtn_momo as mtn

REF = mtn.REF


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def start_mtn(aiohttp_server: Any, http: httpx.AsyncClient) -> Any:
    async def start(**overrides: Any) -> tuple[MtnMomoAdapter, SimulatorState, str]:
        app = create_mtn(SimulatorOptions(**{"delay": 0.02, "credentials": mtn.CREDS, **overrides}))
        server = await aiohttp_server(app, host="127.0.0.1")
        base = str(server.make_url("")).rstrip("/")
        return MtnMomoAdapter(http, mtn.config(base)), app[STATE], base

    return start


async def prompt_for(http: httpx.AsyncClient, base: str, msisdn: str) -> dict[str, Any]:
    """The first PIN prompt the simulator shows this phone (waits for the request to be stored)."""
    for _ in range(200):
        prompts = (await http.get(f"{base}/_control/pending", params={"msisdn": msisdn})).json()["prompts"]
        if prompts:
            return prompts[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no PIN prompt for {msisdn}")


async def hold(http: httpx.AsyncClient, base: str, msisdn: str, **extra: Any) -> httpx.Response:
    return await http.post(f"{base}/_control/phone", json={"msisdn": msisdn, "interactive": True, **extra})


async def mtn_status(adapter: MtnMomoAdapter, state: SimulatorState) -> ProviderOutcome:
    await state.idle()
    return (await adapter.collection_status(REF, None, "RWF")).outcome


# --- what a person's answer comes to --------------------------------------------------------------------


@pytest.mark.parametrize(("payer", "approve", "expected", "reason"), [
    ("+250788000001", True, ProviderOutcome.SUCCEEDED, None),
    # The demo's failing number: approving on the phone does not give it funds.
    ("+250788000002", True, ProviderOutcome.FAILED, "NOT_ENOUGH_FUNDS"),
    ("+250788000002", False, ProviderOutcome.CANCELLED, "APPROVAL_REJECTED"),
    # Scripted "never approves" only stands for a silent payer: a person who approves pays.
    ("+250788000003", True, ProviderOutcome.SUCCEEDED, None),
    ("+46733123455", True, ProviderOutcome.FAILED, "PAYER_NOT_FOUND"),
])
async def test_approving_keeps_the_providers_refusal(start_mtn: Any, http: httpx.AsyncClient, payer: str,
                                                      approve: bool, expected: ProviderOutcome,
                                                      reason: str | None) -> None:
    adapter, state, base = await start_mtn(interactive=True)
    await adapter.request_collection(mtn.collection(payer, callback=""))
    prompt = await prompt_for(http, base, payer)
    decided = await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": approve})
    assert decided.status_code == 200
    await state.idle()
    status = await adapter.collection_status(REF, None, "RWF")
    assert status.outcome is expected
    assert status.raw.get("reason") == reason


async def test_a_failing_number_left_unanswered_expires(start_mtn: Any) -> None:
    adapter, state, _ = await start_mtn(interactive=True, prompt_timeout=0.05)
    await adapter.request_collection(mtn.collection("+250788000002", callback=""))
    assert await mtn_status(adapter, state) is ProviderOutcome.EXPIRED


async def test_airtel_failing_number_approved_on_the_page_fails(aiohttp_server: Any, receiver: Any,
                                                                 http: httpx.AsyncClient) -> None:
    recv, url = receiver
    app = create_airtel(SimulatorOptions(delay=0.02, credentials=airtel.CREDS, callback_url=f"{url}/airtel"))
    base = str((await aiohttp_server(app, host="127.0.0.1")).make_url("")).rstrip("/")
    adapter = AirtelAdapter(http, airtel.config(base))
    assert (await hold(http, base, "+250733000002")).status_code == 200  # the phone page shows it
    await adapter.request_collection(airtel.collection("+250733000002"))
    prompt = await prompt_for(http, base, "+250733000002")
    await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
    (call,) = await recv.wait_for(1)
    event = adapter.parse_callback(airtel.inbound(call))
    assert event.outcome is ProviderOutcome.FAILED
    assert (await adapter.collection_status(airtel.REF, None, "RWF")).outcome is ProviderOutcome.FAILED


@pytest.mark.parametrize(("phone", "result_code", "expected"), [
    ("+254708000001", 0, ProviderOutcome.SUCCEEDED),
    ("+254708000002", 1, ProviderOutcome.FAILED),  # insufficient funds, approved or not
])
async def test_mpesa_approval_keeps_the_numbers_scripted_refusal(
        aiohttp_server: Any, receiver: Any, http: httpx.AsyncClient, phone: str, result_code: int,
        expected: ProviderOutcome) -> None:
    recv, url = receiver
    app = create_mpesa(SimulatorOptions(delay=0.02, credentials=mpesa.SIM_CREDS))
    base = str((await aiohttp_server(app, host="127.0.0.1")).make_url("")).rstrip("/")
    adapter = MpesaAdapter(http, mpesa.config(base))
    assert (await hold(http, base, phone)).status_code == 200
    await adapter.request_collection(mpesa.collection(phone, callback_url=f"{url}/daraja"))
    prompt = await prompt_for(http, base, phone)
    await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": True})
    (call,) = await recv.wait_for(1)
    assert call.json()["Body"]["stkCallback"]["ResultCode"] == result_code
    assert adapter.parse_callback(mpesa.inbound(None, call.body.decode())).outcome is expected


# --- who gets a prompt ----------------------------------------------------------------------------------


def collection(payer: str, ref: str = REF) -> CollectionRequest:
    return mtn.collection(payer, ref=ref, callback="")


async def test_only_the_numbers_a_page_holds_get_prompts(start_mtn: Any, http: httpx.AsyncClient) -> None:
    """A phone page open on one number does not leave everybody else's payment waiting for a prompt."""
    adapter, state, base = await start_mtn()
    asked = time.monotonic()
    held = await hold(http, base, "+250 788 000 001")
    assert held.status_code == 200
    assert held.json() == {"msisdn": "+250788000001", "interactive": True, "expiresIn": 60}
    listed = (await http.get(f"{base}/_control/phone")).json()
    assert listed["interactive"] is False
    assert [p["msisdn"] for p in listed["phones"]] == ["+250788000001"]
    # 60 s less the time since the hold (not "at least 59": a pause of a loaded machine can take a second).
    assert 59.9 - (time.monotonic() - asked) <= listed["phones"][0]["expiresIn"] <= 60

    other = "8c1f2d9e-0000-4000-8000-000000000001"
    await adapter.request_collection(collection("+250788000005", ref=other))  # from a terminal, say
    await adapter.request_collection(collection("0788000001"))  # the phone on the page
    prompt = await prompt_for(http, base, "+250788000001")
    assert prompt["reference"] == REF
    for _ in range(100):
        if (await adapter.collection_status(other, None, "RWF")).outcome is ProviderOutcome.SUCCEEDED:
            break
        await asyncio.sleep(0.02)
    assert (await adapter.collection_status(other, None, "RWF")).outcome is ProviderOutcome.SUCCEEDED
    assert (await http.get(f"{base}/_control/pending", params={"msisdn": "+250788000005"})).json() == {
        "prompts": []}
    await http.post(f"{base}/_control/decide", json={"reference": REF, "approve": True})
    assert await mtn_status(adapter, state) is ProviderOutcome.SUCCEEDED


async def test_a_hold_lapses_when_the_page_stops_renewing_it(start_mtn: Any, http: httpx.AsyncClient) -> None:
    adapter, state, base = await start_mtn()
    assert (await hold(http, base, "+250788000002", seconds=0.05)).json()["expiresIn"] == 0.05
    await asyncio.sleep(0.1)  # the tab was closed
    assert (await http.get(f"{base}/_control/phone")).json() == {"interactive": False, "phones": []}
    await adapter.request_collection(collection("+250788000002"))
    assert await mtn_status(adapter, state) is ProviderOutcome.FAILED  # by number, no prompt
    assert state.prompts.pending("+250788000002") == []


async def test_switching_prompts_off_gives_the_number_back(start_mtn: Any, http: httpx.AsyncClient) -> None:
    adapter, state, base = await start_mtn()
    await hold(http, base, "+250788000001")
    await hold(http, base, "+250733000001")
    off = await http.post(f"{base}/_control/phone", json={"msisdn": "250788000001", "interactive": False})
    assert off.json() == {"msisdn": "+250788000001", "interactive": False, "expiresIn": 0}
    phones = (await http.get(f"{base}/_control/phone")).json()["phones"]
    assert [p["msisdn"] for p in phones] == ["+250733000001"]
    await adapter.request_collection(collection("+250788000001"))
    assert await mtn_status(adapter, state) is ProviderOutcome.SUCCEEDED
    assert state.prompts.pending("+250788000001") == []


async def test_the_interactive_option_still_prompts_everyone(start_mtn: Any, http: httpx.AsyncClient) -> None:
    adapter, state, base = await start_mtn()
    switched = await http.post(f"{base}/_control/options", json={"interactive": True})
    assert switched.json()["interactive"] is True
    assert (await http.get(f"{base}/_control/phone")).json() == {"interactive": True, "phones": []}
    await adapter.request_collection(collection("+250788000005"))
    prompt = await prompt_for(http, base, "+250788000005")
    await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": False})
    assert await mtn_status(adapter, state) is ProviderOutcome.CANCELLED


@pytest.mark.parametrize("body", [
    None, [], {}, {"msisdn": "+250788000001"}, {"interactive": True},
    {"msisdn": 250788000001, "interactive": True}, {"msisdn": "+250788000001", "interactive": "yes"},
    {"msisdn": "12345", "interactive": True}, {"msisdn": "+2507880000011234567", "interactive": True},
    {"msisdn": "+250788000001", "interactive": True, "seconds": 0},
    {"msisdn": "+250788000001", "interactive": True, "seconds": -5},
    {"msisdn": "+250788000001", "interactive": True, "seconds": 601},
    {"msisdn": "+250788000001", "interactive": True, "seconds": True},
    {"msisdn": "+250788000001", "interactive": True, "seconds": "60"},
])
async def test_a_bad_hold_is_refused(start_mtn: Any, http: httpx.AsyncClient, body: Any) -> None:
    _adapter, state, base = await start_mtn()
    answer = await http.post(f"{base}/_control/phone", json=body)
    assert answer.status_code == 400
    assert "msisdn" in answer.json()["error"]
    assert state.held_phones() == {}
