"""Two copies of one USSD hop at once: the aggregator retries a hop still being answered, and the retry lands on
another serve process. Both step from the same session; the session is saved compare-and-set, so the copy that
saves second answers with what the first saved, never a screen the session does not hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from channels.ussd import sessions
from core.db import utcnow
from core.models import Payment
from core.ops import funnel_key
from core.phone import normalize
from tests.channels.ussd.helpers import AtPhone
from tests.channels.ussd.test_flows_africastalking import EN_MTN, option, reference_on


async def another_serve_process(rt: Any, aiohttp_client: Any) -> Any:
    from app import create_app

    return await aiohttp_client(create_app(rt.settings, runtime=rt))


def first_save_waits(monkeypatch: Any, until: Callable[[], bool] | None = None) -> tuple[asyncio.Event,
                                                                                         asyncio.Event]:
    """The first session save of the hop waits (having read the session and stepped) until released: the
    other copy reads, steps and saves meanwhile. Returns (the first copy is waiting, release it)."""
    waiting, release = asyncio.Event(), asyncio.Event()
    real = sessions.save

    async def save(*args: Any, **kwargs: Any) -> Any:
        if not waiting.is_set():
            waiting.set()
            await asyncio.wait_for(release.wait(), 10)
        return await real(*args, **kwargs)

    monkeypatch.setattr(sessions, "save", save)
    return waiting, release


async def test_both_copies_of_the_type_hop_show_the_reference_the_payment_gets(
        client: Any, demo: Any, db: Any, rt: Any, aiohttp_client: Any, monkeypatch: Any, caplog: Any) -> None:
    """Each copy reserved a payment reference for the confirmation screen; the one saved last was the one the
    payment got, whichever screen the member had been shown."""
    phone = AtPhone(client, EN_MTN)
    await phone.dial()
    types = await phone.send("1")
    phone.inputs.append(option(types, "Monthly Rent"))
    retry = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN, session_id=phone.session_id)
    retry.inputs = list(phone.inputs)
    hour = funnel_key(utcnow())
    counted = await rt.redis.hgetall(hour)

    waiting, release = first_save_waits(monkeypatch)
    first = asyncio.ensure_future(phone.dial())
    await waiting.wait()  # the first copy has read the session, reserved a reference, and not saved yet
    second = await retry.dial()  # the retry on the other process: reads, reserves another, saves
    release.set()
    first_screen = await first

    assert first_screen == second and reference_on(second) != ""
    assert "ussd hop answered twice at once; the first saved answer is given" in caplog.messages
    kept = await sessions.load(rt.redis, "africastalking", phone.session_id)
    assert kept is not None and kept.state.data["rr"] == reference_on(second)
    # The resume route (another key, written alongside) and the ops funnel were those of the winning copy too.
    route = await sessions.load_resume(rt.redis, rt.cipher, normalize(EN_MTN))
    assert route is not None and route.data["rr"] == reference_on(second)
    after = await rt.redis.hgetall(hour)
    added = {k: int(v) - int(counted.get(k, 0)) for k, v in after.items() if int(v) != int(counted.get(k, 0))}
    assert added and set(added.values()) == {1}, added  # the confirm step counted once, not twice

    done = await phone.send("1")
    payment = await db.one(Payment)
    assert done.startswith("END Approve the prompt") and payment.reference == reference_on(second)


async def test_two_copies_of_the_opening_hop_answer_alike(client: Any, demo: Any, rt: Any, aiohttp_client: Any,
                                                          monkeypatch: Any, caplog: Any) -> None:
    """The first hop: no session yet on either copy; the one saving second answers with the first's."""
    phone = AtPhone(client, EN_MTN)
    retry = AtPhone(await another_serve_process(rt, aiohttp_client), EN_MTN, session_id=phone.session_id)
    waiting, release = first_save_waits(monkeypatch)
    first = asyncio.ensure_future(phone.dial())
    await waiting.wait()
    second = await retry.dial()
    release.set()
    assert await first == second
    assert "ussd hop answered twice at once; the first saved answer is given" in caplog.messages
    assert (await phone.send("1")).startswith("CON ")  # and the session goes on from it
