"""A worker process for outbox tests: runs 'test.record' jobs, appending each run to a file.

It says "ready" once it can reach the database, and stops after `seconds` or as soon as a file named like the
output file plus ".stop" exists, whichever comes first (a test that waits for the work to be done, not for a
clock: starting a Python process takes seconds on a loaded machine)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sqlalchemy import text

from core.db import make_engine, make_sessionmaker
from core.outbox import Job, OutboxWorker


async def main(url: str, out: str, hold: float, lease: int, seconds: float) -> None:
    engine = make_engine(url)
    worker = OutboxWorker(make_sessionmaker(engine), {}, batch_size=5, lease_seconds=lease, concurrency=4,
                          idle_sleep=0.05)

    async def record(job: Job) -> None:
        start = time.time()
        await asyncio.sleep(hold)
        with open(out, "a") as f:  # noqa: ASYNC230 - a tiny append in a test worker
            f.write(f"{job.payload['n']} {worker.worker_id} {start:.6f} {time.time():.6f}\n")

    worker._handlers["test.record"] = record
    async with engine.connect() as conn:  # polling from the moment it says ready
        await conn.execute(text("SELECT 1"))
    print("ready", flush=True)
    task = asyncio.create_task(worker.run_forever())
    stop = Path(out + ".stop")
    until = time.monotonic() + seconds
    while time.monotonic() < until and not stop.exists():  # noqa: ASYNC110, ASYNC240 - the test's word, a file
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
