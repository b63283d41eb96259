"""USSD pay sessions started at a fixed rate, for the pay session's latency at the rate its target names.

    python bench/paced.py URL --rate 200 --seconds 10 --phone-first +250788100001 --phones 9600 --run RUN

wrk (bench/lua/ussd_pay.lua) keeps 32 connections busy: the service runs at its limit, and each hop's latency is
mostly the queue of the 31 others. Here session i starts at i / rate seconds whatever the earlier ones are doing (an
open loop: a slow service makes sessions overlap, it does not lighten the load, so no latency is hidden by the
generator waiting), and its four hops ("", "1", "1*1", "1*1*1": home, Pay, the first type, Confirm -> END with the
payment) go back to back on a keep-alive connection taken from the idle ones (opened when none is). Session i is
the phone `--phone-first` + (i mod `--phones`) (bench/run.py seeds the members). A session's first hop is timed
from when it was due, not when it went out, so the generator's own lateness counts against the service too.

Prints one 'BENCH {json}' line like the wrk scripts: requests (hops), seconds, latency percentiles (µs), errors,
non2xx, ends, bad (an answer that is not the hop's CON or END), late_starts (sessions sent 5 ms or more after their
time) and sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or loaded by path (tests)
from loadgen import percentile, read_response

TEXTS = ("", "1", "1*1", "1*1*1")
LATE = 0.005


def _hop(target: str, host: str, port: int, session_id: str, phone: str, text: str) -> bytes:
    body = (f"sessionId={session_id}&serviceCode={quote('*384*123#', safe='')}&phoneNumber={quote(phone, safe='')}"
            f"&networkCode=63510&text={quote(text, safe='')}").encode()
    head = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def phone_number(first: str, n: int) -> str:
    return first[:-6] + f"{int(first[-6:]) + n:06d}"


async def run(url: str, *, rate: float, seconds: float, phone_first: str, phones: int, run_id: str) -> dict[str, float]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"paced: an http:// URL is needed, not {url!r}")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    count = max(1, round(rate * seconds))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    tally = {"errors": 0, "non2xx": 0, "ends": 0, "bad": 0, "late_starts": 0}

    async def session(i: int, due: float) -> None:
        phone = phone_number(phone_first, i % phones)
        conn = idle.pop() if idle else None
        sent_at = due
        for hop, text in enumerate(TEXTS):
            request = _hop(target, host, port, f"q{run_id}s{i}", phone, text)
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                if hop:
                    sent_at = time.perf_counter()
                writer.write(request)
                status, body, keep = await asyncio.wait_for(read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                    IndexError):
                tally["errors"] += 1
                if conn is not None:
                    conn[1].close()
                return
            latencies.append(time.perf_counter() - sent_at)
            if not keep:
                writer.close()
                conn = None
            last = hop == len(TEXTS) - 1
            if status >= 300:
                tally["non2xx"] += 1
                break
            if not body.startswith(b"END " if last else b"CON "):
                tally["bad"] += 1
                break
            if last:
                tally["ends"] += 1
        if conn is not None:
            idle.append(conn)

    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    for i in range(count):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay >= LATE:
            tally["late_starts"] += 1
        tasks.append(asyncio.create_task(session(i, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for _, writer in idle:
        writer.close()
    latencies.sort()
    return {"requests": len(latencies), "seconds": elapsed, "p50": percentile(latencies, 50) * 1e6,
            "p95": percentile(latencies, 95) * 1e6, "p99": percentile(latencies, 99) * 1e6,
            "sessions": float(count), **{k: float(v) for k, v in tally.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=200.0, help="sessions started a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--phone-first", required=True)
    parser.add_argument("--phones", type=int, required=True)
    parser.add_argument("--run", default="r", help="in the session ids, so two runs' sessions differ")
    args = parser.parse_args()
    summary = asyncio.run(run(args.url, rate=args.rate, seconds=args.seconds, phone_first=args.phone_first,
                              phones=args.phones, run_id=args.run))
    print("BENCH " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
