"""A member of a Tanzanian housing cooperative (TZS, Swahili by default) walked through Africa's Talking: her rent
refused on the PIN prompt, left to time out, then paid; the receipts in Swahili at Dar es Salaam's time; "my
payments" and the balance of a month the provider took part of.

Found: a neighbour who is no member yet, dialling the cooperative's own code and choosing Help, was told
"CoopPay ... Uliza chama chako msimbo wake" (ask your cooperative for its code: the one she had just dialled),
not the cooperative's help line, which its Pay, My payments and Problem screens all named the cooperative for."""

from __future__ import annotations

import asyncio
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import update

from core.models import Payment
from providers.airtel.adapter import AirtelAdapter
from providers.airtel.simulator import create_simulator as airtel_simulator
from providers.simulation import STATE, SimulatorOptions
from tests.admin_api.conftest import Caller, bearer
from tests.channels.sms.helpers import start_simulator
from tests.channels.ussd.helpers import AtPhone
from tests.conftest import drain
from tests.providers.test_airtel import CREDS, config
from tests.providers.wires import due_now

ZAWADI = "+255682000002"  # Airtel Tanzania
CODE = "*384*123*255#"
COOP = "Ushirika wa Nyumba Sinza"


@pytest.fixture
def settings(migrated_database: str) -> Any:
    from tests.conftest import make_settings

    return make_settings(AIRTEL_COUNTRY="TZ")


@pytest.fixture
async def operator(client: Any, demo: dict[str, Any]) -> Caller:
    return await bearer(client, *demo["super_admin"])


async def sinza(operator: Caller, **extra: Any) -> str:
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": COOP, "shortCode": "SINZA", "country": "TZ", "ussdExtension": "255", **extra})
    await operator.json("POST", "/v1/payment-types", 201, json={
        "name": "Kodi ya nyumba", "amount": "150000", "cooperativeId": made["id"], "recurringInterval": "MONTHLY",
        "dueDay": 5})
    # No language given: the cooperative's, Swahili for Tanzania.
    await operator.json("POST", "/v1/members", 201, json={
        "name": "Zawadi Mushi", "phone": "0682000002", "cooperativeId": made["id"]})
    return str(made["id"])


async def walk(client: Any, keys: list[str]) -> list[str]:
    phone = AtPhone(client, ZAWADI, service_code=CODE)
    screens = [await phone.dial()]
    for key in keys:
        screens.append(await phone.send(key))
    return screens


@pytest.mark.parametrize(("contact", "told"), [
    ("+255755123456", f"END {COOP}: kwa msaada piga +255755123456."),
    (None, f"END {COOP}: kwa msaada, tembelea ofisi ya chama."),
])
async def test_a_neighbour_dialling_the_cooperatives_code_gets_its_help(operator: Caller, client: Any,
                                                                        contact: str | None, told: str) -> None:
    await sinza(operator, contactPhone=contact)
    neighbour = AtPhone(client, "+255682000009", service_code=CODE)
    await neighbour.dial()
    assert await neighbour.send("5") == told
    # Dialling no cooperative's code, she is still told what CoopPay is.
    stranger = AtPhone(client, "+255682000009")
    await stranger.dial()
    assert (await stranger.send("5")).startswith("END CoopPay ")


async def test_her_rent_declined_timed_out_then_paid_in_swahili(
        operator: Caller, client: Any, rt: Any, db: Any, worker: Any, aiohttp_server: Any) -> None:
    await sinza(operator)
    _server, sms = await start_simulator(aiohttp_server, rt)
    app = airtel_simulator(SimulatorOptions(delay=0.01, interactive=True, prompt_timeout=0.3, drop_callback=True,
                                            credentials=CREDS))
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    async with httpx.AsyncClient() as http:
        rt.providers = {**rt.providers, "airtel": AirtelAdapter(http, config(base, country="TZ", currency="TZS"))}

        async def pay(approve: bool | None) -> list[str]:
            screens = await walk(client, ["1", "1", "1"])
            await drain(worker)
            for _ in range(200):
                prompts = (await http.get(f"{base}/_control/pending", params={"msisdn": ZAWADI[1:]})).json()
                if prompts["prompts"]:
                    break
                await asyncio.sleep(0.01)
            [prompt] = prompts["prompts"]
            assert (prompt["amount"], prompt["currency"]) == ("150000", "TZS")  # whole shillings, TZS
            if approve is None:
                await asyncio.sleep(0.4)  # she lets the prompt expire
            else:
                await http.post(f"{base}/_control/decide", json={"reference": prompt["reference"], "approve": approve})
            for _ in range(3):
                await app[STATE].idle()
                await due_now(rt, "payment.poll")
                await drain(worker)
            return screens

        home, types, confirm, done = await pay(False)
        assert home == f"CON Karibu {COOP}\n1. Lipa\n2. Malipo yangu\n3. Tatizo la malipo\n4. Lugha\n5. Msaada"
        assert types == "CON Chagua unacholipia:\n1. Kodi ya nyumba 150,000.00 TZS (tarehe 5)\n0. Rudi", types
        assert confirm.startswith("CON Lipa Kodi ya nyumba\nKiasi: 150,000.00 TZS\nAda: 0.00 TZS\n"
                                  "Kupitia Airtel Money\nKumb: PAY_"), confirm
        assert confirm.endswith("\n1. Thibitisha\n2. Ghairi\n0. Rudi\n00. Mwanzo"), confirm
        assert done.startswith("END Idhinisha ombi kwenye simu yako kulipa 150,000.00 TZS. Kumb PAY_"), done
        await pay(None)
        await pay(True)
        statuses = sorted((p.status, p.currency, p.method) for p in await db.all(Payment))
        assert statuses == [("COMPLETED", "TZS", "MOBILE_MONEY_AIRTEL"), ("FAILED", "TZS", "MOBILE_MONEY_AIRTEL"),
                            ("TIMEOUT", "TZS", "MOBILE_MONEY_AIRTEL")], statuses
    declined, expired, receipt = (m["message"] for m in sms.messages(ZAWADI))
    assert declined.startswith("Malipo ya 150,000.00 TZS kwa Kodi ya nyumba hayakufanikiwa: "
                               "ulikataa ombi. Kumb: PAY_"), declined
    assert expired.startswith("Malipo ya 150,000.00 TZS kwa Kodi ya nyumba hayakuthibitishwa "
                              "kwa wakati."), expired
    paid = await db.one(Payment, Payment.status == "COMPLETED")
    local = paid.completed_at.astimezone(ZoneInfo("Africa/Dar_es_Salaam"))
    assert receipt.startswith(f"Tumepokea 150,000.00 TZS kwa Kodi ya nyumba, {COOP}. Kumb: {paid.reference} ("), \
        receipt
    assert receipt.endswith(f". {local:%d/%m/%Y %H:%M}"), receipt  # no closing "Asante!": one SMS

    # The provider took 100,000 of it: "my payments" says what was taken, and Pay offers the balance.
    async with rt.sessionmaker.begin() as s:
        await s.execute(update(Payment).where(Payment.id == paid.id).values(collected_minor=10_000_000))
    _home, listing, detail, _back_home = await walk(client, ["2", "1", "00"])
    assert listing.startswith(f"CON Malipo yako ya karibuni:\n1. 100,000.00 TZS Kodi ya nyumba Imelipwa "
                              f"{paid.reference}\n"), listing
    assert detail.startswith(f"CON {paid.reference}\nKodi ya nyumba: 100,000.00 TZS\nHali: Imelipwa\nTarehe: "
                             f"{local:%d/%m/%Y}\n1. Tuma risiti kwa SMS"), detail
    _home, _types, balance = await walk(client, ["1", "1"])
    assert "\nKiasi: 50,000.00 TZS (salio la 150,000.00 TZS)\n" in balance, balance
    # She complains about it: the confirmation agrees with "chama", not with her cooperative's name ("Ushirika wa
    # ..." takes u-, never the i- it was given: "Ushirika wa Nyumba Sinza itawasiliana nawe").
    _resume, _home, _listing, _reasons, disputed = await walk(client, ["2", "3", "1", "1"])  # 2: start over
    assert disputed.startswith("END Lalamiko DSP"), disputed
    assert disputed.endswith(f" limefunguliwa. Chama chako, {COOP}, kitawasiliana nawe."), disputed
    for screen in (home, types, confirm, done, listing, detail, balance, disputed):
        assert len(screen) - 4 <= 182 and "{" not in screen, screen


async def test_a_stranger_dialling_the_shared_code_from_a_tanzanian_number_is_greeted_in_swahili(
        operator: Caller, client: Any) -> None:
    # No member anywhere, no cooperative's code dialled: no cooperative's language applies. Her number's country's
    # does (Swahili for +255), not the deployment's English.
    stranger = AtPhone(client, "+255682000009")
    assert await stranger.dial() == ("CON Karibu CoopPay\n1. Lipa\n2. Malipo yangu\n3. Tatizo la malipo\n4. Lugha\n"
                                     "5. Msaada")
    # A Rwandan stranger keeps the deployment's default.
    assert (await AtPhone(client, "+250788000009").dial()).startswith("CON Welcome to CoopPay\n1. Pay\n")
    # Her own choice (remembered for the phone) wins over her number's country, on this dial and the next.
    assert await stranger.send("4") == ("CON Chagua lugha:\n1. English\n2. Ikinyarwanda\n3. Francais\n4. Kiswahili\n"
                                        "0. Rudi")
    assert (await stranger.send("1")).startswith("CON Welcome to CoopPay\n1. Pay\n")
    assert (await AtPhone(client, "+255682000009").dial()).startswith("CON Welcome to CoopPay\n1. Pay\n")
    # So does a Tanzanian member's own language, dialling the shared code.
    made = await operator.json("POST", "/v1/cooperatives", 201, json={
        "name": COOP, "shortCode": "SINZA", "country": "TZ"})
    await operator.json("POST", "/v1/members", 201, json={
        "name": "Zawadi Mushi", "phone": "0682000002", "cooperativeId": made["id"], "language": "en"})
    assert (await AtPhone(client, ZAWADI).dial()).startswith(f"CON Welcome to {COOP}\n1. Pay\n")
