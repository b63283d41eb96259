"""A fixed-count load generator for what wrk cannot express: send each body of a file once, then stop.

    python bench/loadgen.py URL FILE --connections 32

Each line of FILE is one JSON request body; the bodies are shared by `connections` keep-alive clients.
Prints one 'BENCH {json}' line like the wrk scripts: requests, seconds, latency percentiles (µs),
errors, non2xx, and the count of each `result` the server answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import aiohttp


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def run(url: str, bodies: list[bytes], connections: int) -> dict[str, float]:
    latencies: list[float] = []
    results: Counter[str] = Counter()
    errors = non2xx = 0
    position = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def client() -> None:
            nonlocal position, errors, non2xx
            while position < len(bodies):
                body = bodies[position]
                position += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                        text = await resp.read()
                        latencies.append(time.perf_counter() - started)
                        if resp.status >= 300:
                            non2xx += 1
                            continue
                        try:
                            results[str(json.loads(text).get("result", "ok"))] += 1
                        except ValueError:
                            results["unreadable"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

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
