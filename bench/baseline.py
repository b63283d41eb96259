"""Baselines measured in the same run as the gateway: a bare aiohttp form handler, the same with a Redis GET and
SET (the floor of a session kept in Redis), and a bare asyncpg INSERT."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import asyncpg
from aiohttp import web

MENU = "CON Welcome to Kigali Heights\n1. Pay\n2. My payments\n3. Problem with a payment\n4. Language\n5. Help"


def form_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        form = await request.post()
        _ = (form.get("sessionId"), form.get("phoneNumber"), form.get("text"))
        return web.Response(text=MENU, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/", handle)
    return app


def form_redis_app(redis_url: str) -> web.Application:
    """The floor of any design that keeps a USSD session in Redis through redis-py: the form parsed, the
    session read (GET) and written back with its TTL (SET EX), the screen answered. Nothing else: no
    menu engine, no authentication, no logging, no metrics."""
    from redis.asyncio import Redis

    app = web.Application()
    session = b'{"st":{"s":"home","l":"en"},"h":3,"t":1764576000.0,"a":"4*0","hk":"4*0","r":["' + \
        MENU.encode() + b'",0]}'

    async def redis_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["redis"] = Redis.from_url(redis_url)
        yield
        await app["redis"].aclose()

    async def handle(request: web.Request) -> web.Response:
        form = await request.post()
        key = f"floor:{{at:{form.get('sessionId')}}}"
        redis = request.app["redis"]
        stored = await redis.get(key)
        await redis.set(key, stored or session, ex=300)
        return web.Response(text=MENU, content_type="text/plain")

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_post("/", handle)
    return app


def insert_app(dsn: str) -> web.Application:
    app = web.Application()

    async def pool_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=20)
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_baseline (id uuid PRIMARY KEY, key text UNIQUE, "
                               "amount bigint NOT NULL, body jsonb NOT NULL, created_at timestamptz DEFAULT now())")
        app["pool"] = pool
        yield
        await pool.close()

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        row_id = uuid.uuid4()
        async with request.app["pool"].acquire() as conn:
            await conn.execute("INSERT INTO bench_baseline (id, key, amount, body) VALUES ($1, $2, $3, $4)",
                               row_id, body["idempotencyKey"], int(body["amount"]), json.dumps(body))
        return web.json_response({"id": str(row_id)}, status=201)

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["form", "form_redis", "insert"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", default="")
    parser.add_argument("--redis", default="")
    args = parser.parse_args()
    if args.kind == "form":
        app = form_app()
    elif args.kind == "form_redis":
        app = form_redis_app(args.redis)
    else:
        app = insert_app(args.dsn)
    # The same event loop as the service (main.use_fast_loop), so the comparison is fair.
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
