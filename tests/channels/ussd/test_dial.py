"""The terminal simulator against the real HTTP endpoint of a running app."""

from __future__ import annotations

from typing import Any

from channels.ussd.dial import dial
from core.models import Payment


async def test_dial_pays_through_the_africastalking_endpoint(client: Any, demo: Any, db: Any) -> None:
    keys = iter(["1", "1", "1"])
    printed: list[str] = []
    code = await dial("*384*123#", "0788000002", str(client.server.make_url("")),
                      read=lambda _prompt: next(keys, None), write=printed.append)
    assert code == 0
    screens = [line for line in printed if not line.startswith("-")]
    assert screens[0].startswith("Welcome to Kigali Heights")
    assert screens[-1].startswith("Approve the prompt on your phone to pay 50,000 RWF. Ref PAY_")
    assert await db.count(Payment) == 1


async def test_dial_stops_when_stdin_closes(client: Any, demo: Any) -> None:
    printed: list[str] = []
    code = await dial("*384*123#", "+250788000002", str(client.server.make_url("")),
                      read=lambda _prompt: None, write=printed.append)
    assert code == 1 and printed[-1] == "[cancelled]"


async def test_dial_reports_a_refused_secret(rt: Any, aiohttp_client: Any, settings_factory: Any) -> None:
    from app import create_app

    settings = settings_factory(CALLBACK_SECRET_AFRICASTALKING="k")
    secured = await aiohttp_client(create_app(settings, runtime=rt))
    printed: list[str] = []
    code = await dial("*384*123#", "+250788000002", str(secured.server.make_url("")), secret="wrong",
                      read=lambda _prompt: None, write=printed.append)
    assert code == 1 and printed[-1].startswith("[HTTP 403]")
    # The gateway's bare "forbidden" told the operator nothing: the line now says what to change.
    assert "--secret is not the gateway's CALLBACK_SECRET_AFRICASTALKING" in printed[-1]
    printed.clear()
    code = await dial("*384*123#", "+250788000002", str(secured.server.make_url("")),
                      read=lambda _prompt: None, write=printed.append)
    assert code == 1
    assert printed[-1] == ("[HTTP 403] forbidden (the gateway wants its callback secret: --secret with its "
                           "CALLBACK_SECRET_AFRICASTALKING; or this address is outside its USSD_IP_ALLOWLIST)")
