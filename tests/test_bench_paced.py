"""bench/paced.py, the pay session at a fixed rate: each session starts when due whatever the earlier ones are
doing (a slow service makes them overlap), its four hops in order on one connection, each answer checked."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

from aiohttp import web

_PATH = Path(__file__).resolve().parent.parent / "bench" / "paced.py"
_SPEC = importlib.util.spec_from_file_location("paced", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
paced = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(paced)


def _ussd(hops: list[dict[str, str]], *, pause: float = 0.0, wrong_at: str | None = None) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        form = dict(await request.post())
        hops.append({**form, "at": str(asyncio.get_running_loop().time())})
        await asyncio.sleep(pause)
        text = form["text"]
        if text == wrong_at:
            return web.Response(text="END Sorry, something went wrong")
        return web.Response(text=("END Payment started" if text == "1*1*1" else "CON Menu"))

    app = web.Application()
    app.router.add_post("/ussd/africastalking", answer)
    return app


async def test_each_session_runs_its_four_hops_in_order_as_another_member(aiohttp_server: Any) -> None:
    hops: list[dict[str, str]] = []
    server = await aiohttp_server(_ussd(hops), host="127.0.0.1")
    summary = await paced.run(str(server.make_url("/ussd/africastalking")), rate=100, seconds=0.3,
                              phone_first="+250788100001", phones=7, run_id="t")
    assert (summary["sessions"], summary["ends"], summary["requests"]) == (30, 30, 120)
    assert (summary["errors"], summary["non2xx"], summary["bad"]) == (0, 0, 0)
    by_session: dict[str, list[dict[str, str]]] = {}
    for hop in hops:
        by_session.setdefault(hop["sessionId"], []).append(hop)
    assert len(by_session) == 30
    for i in range(30):
        mine = by_session[f"qts{i}"]
        assert [h["text"] for h in mine] == ["", "1", "1*1", "1*1*1"]
        assert {h["phoneNumber"] for h in mine} == {f"+250788{100001 + i % 7:06d}"}
        assert {h["serviceCode"] for h in mine} == {"*384*123#"}
    assert 0 < summary["p50"] <= summary["p95"] <= summary["p99"]


async def test_a_slow_service_gets_the_sessions_on_time_all_the_same(aiohttp_server: Any) -> None:
    """An open loop: at 100 sessions/s against 60 ms a hop, wrk's connections would have waited for each answer;
    here the sessions overlap, each first hop sent when due, and the latency says what members wait."""
    hops: list[dict[str, str]] = []
    server = await aiohttp_server(_ussd(hops, pause=0.06), host="127.0.0.1")
    summary = await paced.run(str(server.make_url("/ussd/africastalking")), rate=100, seconds=0.2,
                              phone_first="+250788100001", phones=100, run_id="s")
    firsts = sorted(float(h["at"]) for h in hops if h["text"] == "")
    assert len(firsts) == 20 and summary["ends"] == 20
    assert firsts[-1] - firsts[0] < 0.19 + 0.05  # due at 0, 10, ... 190 ms: not held back by 240 ms sessions
    assert summary["p50"] >= 60_000  # µs: each hop's 60 ms


async def test_a_wrong_answer_ends_the_session_and_is_counted(aiohttp_server: Any) -> None:
    hops: list[dict[str, str]] = []
    server = await aiohttp_server(_ussd(hops, wrong_at="1*1"), host="127.0.0.1")
    summary = await paced.run(str(server.make_url("/ussd/africastalking")), rate=50, seconds=0.1,
                              phone_first="+250788100001", phones=10, run_id="w")
    assert (summary["sessions"], summary["ends"], summary["bad"], summary["requests"]) == (5, 0, 5, 15)
