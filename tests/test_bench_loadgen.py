"""bench/loadgen.py, the benchmark's fixed-count client: each body sent once, each answer read whole (a length, a
chunked body, a connection the server closes), and counted by its `result`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from aiohttp import web

_PATH = Path(__file__).resolve().parent.parent / "bench" / "loadgen.py"
_SPEC = importlib.util.spec_from_file_location("loadgen", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
loadgen = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(loadgen)


async def test_each_body_is_sent_once_and_every_answer_read(aiohttp_server: Any) -> None:
    got: list[dict[str, Any]] = []

    async def take(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        got.append(body)
        n = body["n"]
        if n % 4 == 1:  # a chunked answer
            response = web.StreamResponse(status=200)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b'{"result": ')
            await response.write(b'"duplicate"}')
            await response.write_eof()
            return response
        if n % 4 == 2:  # the server closes the connection after answering
            return web.json_response({"result": "completed"}, headers={"Connection": "close"})
        if n % 4 == 3:
            return web.json_response({"error": "no"}, status=409)
        return web.json_response({"result": "completed"})

    app = web.Application()
    app.router.add_post("/cb", take)
    server = await aiohttp_server(app, host="127.0.0.1")
    bodies = [json.dumps({"n": n}).encode() for n in range(40)]
    summary = await loadgen.run(str(server.make_url("/cb?secret=x")), bodies, 4)
    assert sorted(b["n"] for b in got) == list(range(40))
    assert (summary["requests"], summary["errors"], summary["non2xx"]) == (40, 0, 10)
    assert (summary["completed"], summary["duplicate"]) == (20, 10)
    assert 0 < summary["p50"] <= summary["p95"] <= summary["p99"]


async def test_a_server_that_is_gone_counts_errors() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    summary = await loadgen.run(f"http://127.0.0.1:{port}/cb", [b"{}", b"{}", b"{}"], 2)
    assert (summary["requests"], summary["errors"], summary["non2xx"]) == (3, 3, 0)
