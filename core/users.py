"""Managing sign-in accounts after they exist, shared by the API and the command line: the password rules,
creating an administrator (also the first one of an install, from the CLI), turning an account off and on,
and setting a new password. Every change is audited; a password or its hash never reaches the audit log.

Ending an account's sessions is the caller's part (the API marks its tokens in Redis, core.auth), because the
command line may run where Redis is not reachable; refresh tokens are refused on the audit rows these write
(auth.SESSIONS_ENDED), so they end even without Redis."""

from __future__ import annotations

import asyncio
import unicodedata

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core import auth
from core.audit import Actor, record
from core.crypto import hash_password, verify_password
from core.errors import NAME_TAKEN, Conflict, NotFound, ValidationError
from core.models import AdminUser, ApiKey, AuditEvent, Cooperative
from core.text import has_bad_characters, is_uuid

# The one set of rules for a password, whoever sets it (the API's schemas are built from these).
PASSWORD_MIN, PASSWORD_MAX = 12, 256
USERNAME_MIN, USERNAME_MAX = 3, 120
ADMIN_ROLES = (auth.SUPER_ADMIN, auth.COOP_ADMIN)  # a TENANT login needs a member: the API makes those
_SAME_IN_ANY_CASE = "usernames are the same whatever their case"


def username_taken(asked: str, held: str | None = None) -> str:
    """The API's 409 message for a username an account already has. `held` is that account's spelling when it
    was read: when it differs in case the caller is told the two are one (they may not know), but never shown
    it (the account may be another cooperative's). No note without it (auth.create_user's lost race)."""
    note = "" if held is None or held == asked else f" ({_SAME_IN_ANY_CASE})"
    return f"this username is taken{note}"


def check_password(password: str, *, field: str = "password") -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise ValidationError(f"{field} must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long", field=field)
    _signable(password, field)


def _signable(value: str, field: str) -> None:
    # What sign-in refuses (a control character, core.text.NOT_ALLOWED, as every API text is checked): an account
    # made with one by `create-admin` (stdin, ADMIN_PASSWORD, --username) could never sign in.
    if has_bad_characters(value):
        raise ValidationError(f"{field} contains characters that are not allowed (sign-in refuses them)",
                              field=field)


def named_cooperative(cooperative_id: str | None) -> str | None:
    """The cooperative id an account is made for: an empty one (`--cooperative "$COOP"` with the variable unset)
    names none. Stored as given, a super admin's '' broke the foreign key ("cannot start: ForeignKeyViolationError",
    exit 4)."""
    return (cooperative_id or "").strip() or None


def check_username(username: str) -> str:
    """The username as stored (surrounding spaces dropped, as the API does; its case kept, for display: it is
    unique, and signed in with, whatever its case, see auth.username_is)."""
    # Accented letters composed (NFC): "José" typed as e and a combining accent is the same name as with é, which the
    # unique index on lower(username) would otherwise let in beside it.
    name = unicodedata.normalize("NFC", username.strip())
    if not USERNAME_MIN <= len(name) <= USERNAME_MAX:
        raise ValidationError(f"username must be {USERNAME_MIN} to {USERNAME_MAX} characters long",
                              field="username")
    _signable(name, "username")
    if any(_unseen(c) for c in name):
        # Shown in the users list and in the audit log, where "ana" and "ana<zero-width space>" or "ana\tb" and
        # "ana b" look the same: an account could pass for another one.
        raise ValidationError("username may not contain tabs, line breaks, spaces other than a plain one, or "
                              "invisible characters", field="username")
    return name


def _unseen(c: str) -> bool:
    """A character that shows as nothing or as a plain space: controls (tab, line feed too), format characters
    (zero-width space and joiners, direction marks, soft hyphen), line and paragraph separators, and every space
    but U+0020 (no-break, ideographic...)."""
    kind = unicodedata.category(c)
    return kind[0] == "C" or kind in ("Zl", "Zp") or (kind == "Zs" and c != " ")


async def password_matches(user: AdminUser, password: str) -> bool:
    # scrypt takes tens of milliseconds of CPU: off the event loop, as at sign-in.
    return await asyncio.to_thread(verify_password, password, user.password_hash)


async def create_admin(session: AsyncSession, *, username: str, password: str, role: str,
                       cooperative_id: str | None, actor: Actor, note: dict[str, str] | None = None) -> AdminUser:
    """An administrator made outside the API (the first one of an install has nobody to sign in as).

    An existing username is a Conflict, never an update: running it twice cannot reset someone's password."""
    if role not in ADMIN_ROLES:
        raise ValidationError(f"role must be one of {', '.join(ADMIN_ROLES)}", field="role")
    cooperative_id = named_cooperative(cooperative_id)
    name = check_username(username)
    check_password(password)
    if role == auth.SUPER_ADMIN and cooperative_id:
        raise ValidationError("a super admin belongs to no cooperative", field="cooperativeId")
    if role == auth.COOP_ADMIN:
        if not cooperative_id:
            raise ValidationError("a cooperative admin needs its cooperative's id", field="cooperativeId")
        if not is_uuid(cooperative_id) or await session.get(Cooperative, cooperative_id) is None:
            raise NotFound(f"cooperative {cooperative_id} not found")
    held = (await session.execute(select(AdminUser.username).where(auth.username_is(name)))).scalars().first()
    if held is not None:
        # The command line is the operator's: it may name the other spelling, which the API does not show.
        case = "" if held == name else f" (as {held}: {_SAME_IN_ANY_CASE})"
        raise Conflict(f"the username {name} is taken{case}", field="username", code=NAME_TAKEN)
    user = await auth.create_user(session, username=name, password=password, role=role,
                                  cooperative_id=cooperative_id)
    await record(session, actor=actor, action="user.created", entity_type="user", entity_id=user.id,
                 after={"username": name, "role": role, "memberId": None, **(note or {})},
                 cooperative_id=cooperative_id)
    return user


async def deactivate(session: AsyncSession, user: AdminUser, *, actor: Actor) -> list[ApiKey]:
    """Turn the account off and revoke the API keys it created (each audited); the keys revoked.

    The keys are looked for also when the account is already off: a repeated call thereby cleans up after
    an account deactivated before keys were revoked with it."""
    keys = await auth.revoke_api_keys_created_by(session, user.id, actor=actor)
    if user.is_active:
        user.is_active = False
        await session.flush()
        await record(session, actor=actor, action="user.deactivated", entity_type="user", entity_id=user.id,
                     after={"apiKeysRevoked": [k.id for k in keys]}, cooperative_id=user.cooperative_id)
    return keys


ERASED_USERNAME_PREFIX = "erased-"


async def anonymise(session: AsyncSession, user: AdminUser, *, actor: Actor) -> None:
    """A tenant login of an erased member (core.members.erase_member): its username, often the person's e-mail,
    replaced by one made of its id, which names nobody and stays unique. Its audit row holds neither name (the
    log is append-only). Calling it again changes nothing."""
    anonymous = f"{ERASED_USERNAME_PREFIX}{user.id}"
    if user.username == anonymous:
        return
    user.username = anonymous
    await session.flush()
    await record(session, actor=actor, action="user.anonymised", entity_type="user", entity_id=user.id,
                 cooperative_id=user.cooperative_id)


async def reactivate(session: AsyncSession, user: AdminUser, *, actor: Actor) -> None:
    """Turn a deactivated account back on. Its tokens from before stay refused (the deactivation ended them)
    and the API keys revoked with it stay revoked: it signs in again, and makes new keys if it needs them."""
    if user.is_active:
        return
    user.is_active = True
    await session.flush()
    await record(session, actor=actor, action="user.reactivated", entity_type="user", entity_id=user.id,
                 cooperative_id=user.cooperative_id)


# Why the API keys an account created were revoked with its new password (each key's own audit row says it).
_KEYS_REVOKED_BECAUSE = {"user.password_reset": "creator's password reset",
                         "user.password_changed": "creator's password changed"}


async def set_password(session: AsyncSession, user: AdminUser, password: str, *, actor: Actor,
                       action: str) -> list[ApiKey]:
    """Store a new password (`action`: user.password_reset by an admin, user.password_changed by its owner) and
    revoke the API keys the account created (each audited), as a deactivation does: a new password is how an
    account is taken back, and a key made from a stolen session must not outlast it. The keys revoked.

    The audit row says only that it changed and which keys went: it is also what refuses the account's earlier
    refresh tokens."""
    assert action in _KEYS_REVOKED_BECAUSE  # the actions of auth.SESSIONS_ENDED that set a password
    check_password(password)
    keys = await auth.revoke_api_keys_created_by(session, user.id, actor=actor,
                                                 reason=_KEYS_REVOKED_BECAUSE[action])
    user.password_hash = await asyncio.to_thread(hash_password, password)
    await session.flush()
    await record(session, actor=actor, action=action, entity_type="user", entity_id=user.id,
                 after={"sessionsEnded": True, "apiKeysRevoked": [k.id for k in keys]},
                 cooperative_id=user.cooperative_id)
    return keys


async def deactivated_by_super_admin(session: AsyncSession, user: AdminUser) -> bool:
    """Whether the account's last deactivation was not a cooperative admin's: a super admin's (or, never
    written by this code, no one's: the safe side). Only a super admin may undo it, or a cooperative admin could
    bring back an account the platform turned off. Read from the last user.deactivated audit row's actor."""
    actor = (await session.execute(
        select(AuditEvent.actor)
        .where(AuditEvent.entity_type == "user", AuditEvent.entity_id == user.id,
               AuditEvent.action == "user.deactivated")
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1))).scalar_one_or_none()
    kind, _, actor_id = (actor or "").partition(":")
    if kind != "admin":
        return True
    role = (await session.execute(select(AdminUser.role).where(AdminUser.id == actor_id))).scalar_one_or_none()
    return role != auth.COOP_ADMIN
