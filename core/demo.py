"""Demo data: the Kigali Heights Housing Cooperative, its payment types, members and admins."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.audit import Actor
from core.crypto import PiiCipher, hash_password
from core.members import create_member
from core.models import AdminUser, Cooperative, PaymentType
from core.phone import normalize

DEMO_COOP = {
    "name": "Kigali Heights Housing Cooperative", "short_code": "KHHC", "country": "RW", "currency": "RWF",
    "timezone": "Africa/Kigali", "ussd_extension": "123", "contact_phone": "+250788123456",
}
DEMO_TYPES = [
    {"name": "Monthly Rent", "description": "Monthly rental payment for cooperative housing",
     "amount_minor": 50_000, "is_recurring": True, "recurring_interval": "MONTHLY", "due_day": 1},
    {"name": "Water", "description": "Monthly water bill", "amount_minor": 5_000, "is_recurring": True,
     "recurring_interval": "MONTHLY", "due_day": 10},
]
# Test numbers from the Copay document: what each does in the simulators.
DEMO_MEMBERS = [
    ("Aline Uwase", "+250788000001", "A-101", "rw", "MTN MoMo: payment succeeds"),
    ("Jean Bosco Habimana", "+250788000002", "A-102", "en", "MTN MoMo: payment fails"),
    ("Claudine Mukamana", "+250733000001", "B-201", "fr", "Airtel Money: payment succeeds"),
    ("Eric Niyonzima", "+250733000002", "B-202", "sw", "Airtel Money: payment fails"),
    ("Grace Ingabire", "+250788000003", "C-301", "en", "MTN MoMo: never approved, times out"),
]
DEMO_ADMIN = ("admin@kigali-heights.rw", "demo-admin-password")
DEMO_SUPER = ("super@gateway.local", "demo-super-password")
DEMO_TENANT = ("aline@kigali-heights.rw", "demo-tenant-password")


async def seed_demo(session: AsyncSession, cipher: PiiCipher) -> dict[str, Any]:
    """Create the demo data once; running it again changes nothing and returns the same ids."""
    actor = Actor("system", "system")
    coop = (await session.execute(select(Cooperative).where(Cooperative.short_code == DEMO_COOP["short_code"])
                                  )).scalar_one_or_none()
    if coop is None:
        coop = Cooperative(**DEMO_COOP, status="ACTIVE", self_registration=True)
        session.add(coop)
        await session.flush()
        for spec in DEMO_TYPES:
            session.add(PaymentType(cooperative_id=coop.id, currency="RWF", is_active=True, **spec))
        members = {}
        for name, phone, unit, language, _ in DEMO_MEMBERS:
            member = await create_member(session, cipher, cooperative_id=coop.id, name=name, phone=normalize(phone),
                                         language=language, unit=unit, actor=actor)
            members[phone] = member.id
        session.add(AdminUser(username=DEMO_ADMIN[0], password_hash=hash_password(DEMO_ADMIN[1]),
                              role="COOP_ADMIN", cooperative_id=coop.id))
        session.add(AdminUser(username=DEMO_SUPER[0], password_hash=hash_password(DEMO_SUPER[1]),
                              role="SUPER_ADMIN"))
        session.add(AdminUser(username=DEMO_TENANT[0], password_hash=hash_password(DEMO_TENANT[1]),
                              role="TENANT", cooperative_id=coop.id, member_id=members["+250788000001"]))
        await session.flush()
    types = {t.name: t.id for t in (await session.execute(
        select(PaymentType).where(PaymentType.cooperative_id == coop.id))).scalars()}
    from core.members import find_memberships

    members = {}
    for _, phone, *_rest in DEMO_MEMBERS:
        found = [m for m, c in await find_memberships(session, cipher, normalize(phone)) if c.id == coop.id]
        if found:
            members[phone] = found[0].id
    return {"cooperative_id": coop.id, "short_code": coop.short_code, "payment_types": types, "members": members,
            "admin": DEMO_ADMIN, "super_admin": DEMO_SUPER, "tenant": DEMO_TENANT}
