"""A worker process for outbox tests: runs 'test.record' jobs, appending each run to a file."""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

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
    print("ready", flush=True)
    task = asyncio.create_task(worker.run_forever())
    await asyncio.sleep(seconds)
    worker.stop()
    await task
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
