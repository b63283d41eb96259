"""A fixed-count load generator for what wrk cannot express: send each body of a file once, then stop.

    python bench/loadgen.py URL FILE --connections 32

Each line of FILE is one JSON request body; the bodies are shared by `connections` keep-alive clients.
Prints one 'BENCH {json}' line like the wrk scripts: requests, seconds, latency percentiles (µs),
errors, non2xx, and the count of each `result` the server answered.

It shares the benchmark's two CPUs with the service, PostgreSQL and Redis, so it is kept lean: each request's bytes
are built before the clock starts, and a connection writes them and reads the answer on asyncio's streams. The
aiohttp client it replaced spent 0.21 ms of CPU a request, these streams 0.12 ms (bench/run.py reports it:
loadgen_cpu_ms). HTTP/1.1 keep-alive; a connection the server closes is opened again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def requests_for(url: str, bodies: list[bytes]) -> tuple[str, int, list[bytes]]:
    """(host, port, each body's whole POST request)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"loadgen: an http:// URL is needed, not {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"POST {target} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nContent-Type: application/json\r\n"
    return parts.hostname, port, [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


async def run(url: str, bodies: list[bytes], connections: int) -> dict[str, float]:
    host, port, requests = requests_for(url, bodies)
    latencies: list[float] = []
    results: Counter[str] = Counter()
    errors = non2xx = 0
    position = 0

    async def client() -> None:
        nonlocal position, errors, non2xx
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while position < len(requests):
                request = requests[position]
                position += 1
                started = time.perf_counter()
                try:
                    if writer is None or reader is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    status, text, keep = await asyncio.wait_for(read_response(reader), 30)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                        IndexError):
                    errors += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                latencies.append(time.perf_counter() - started)
                if not keep:
                    writer.close()
                    reader = writer = None
                if status >= 300:
                    non2xx += 1
                    continue
                try:
                    results[str(json.loads(text).get("result", "ok"))] += 1
                except ValueError:
                    results["unreadable"] += 1
        finally:
            if writer is not None:
                writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(bodies), "seconds": seconds, "p50": percentile(latencies, 50) * 1e6,
            "p95": percentile(latencies, 95) * 1e6, "p99": percentile(latencies, 99) * 1e6,
            "errors": errors, "non2xx": non2xx, **{k: float(v) for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("file")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    summary = asyncio.run(run(args.url, bodies, args.connections))
    print("BENCH " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
