"""The USSD channel's outbox jobs: what must reach Redis even when Redis is down at the moment it is decided."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from channels.ussd.sessions import forget_phone
from core.outbox import Handler, Job, enqueue

if TYPE_CHECKING:
    from core.runtime import Runtime

FORGET_PHONE = "ussd.forget_phone"


async def queue_forget_phone(session: AsyncSession, blind_index: str, *, cooperative_id: str) -> None:
    """Forget the USSD language and resume route of a number no longer its member's (released, corrected,
    erased), in the change's transaction: the worker deletes the keys (retrying while Redis is down), so the
    number's next holder is not greeted in the previous holder's language, nor offered her session, once Redis is
    back. The route deletes them at once as well; the job's DEL is then a no-op."""
    # No dedupe key: a number given back to its member and released again later needs its own job (a key
    # naming the member and number would match the first, DONE, job); two releases at once queue two DELs.
    await enqueue(session, FORGET_PHONE, {"blind_index": blind_index}, cooperative_id=cooperative_id,
                  max_attempts=25)


def job_handlers(rt: Runtime) -> dict[str, Handler]:
    async def forget(job: Job) -> None:
        await forget_phone(rt.redis, job.payload["blind_index"])  # Redis down: raises, retried with backoff

    return {FORGET_PHONE: forget}
