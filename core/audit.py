"""The append-only audit log: who did what to which entity, when, through which channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.db import row_insert, utcnow
from core.models import AuditEvent


@dataclass(frozen=True, slots=True)
class Actor:
    """Who caused a change, by kind and id; the channel says through what.

    'admin:<user id>': a staff login (super or cooperative admin) through the API. 'member:<member id>': the
    member herself, on USSD or through the API signed in with her own (tenant) login. 'phone:<masked number>':
    a number not yet known as a member (USSD, SMS). 'apikey:<key id>', 'provider:<name>', 'system'."""

    id: str
    channel: str  # api | ussd | sms | provider | worker | system

    @classmethod
    def system(cls, channel: str = "system") -> Actor:
        return cls("system", channel)


SYSTEM = Actor.system()


async def record(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    entity_type: str,
    entity_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    cooperative_id: str | None = None,
) -> None:
    await session.execute(
        row_insert(session.get_bind().dialect.name, AuditEvent),
        {
            "cooperative_id": cooperative_id,
            "actor": actor.id,
            "channel": actor.channel,
            "action": action,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "before": before,
            "after": after,
            "at": utcnow(),
        },
    )
