"""Members over the API: create, read, edit (her phone number too), suspend, approve, release a suspended member's
phone number, erase a suspended member, and import a CSV all-or-nothing."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from redis.exceptions import RedisError
from sqlalchemy import select

from admin_api.common import DATETIME, ID, NULL_STRING, iso, json_response, obj, one, out, out_plus, page_of, paged
from admin_api.errors import ApiError
from admin_api.routing import Ctx, Route, end_sessions
from admin_api.validation import LIMIT, PAGE, Param, read_body
from channels.ussd.jobs import queue_forget_phone
from channels.ussd.records import LONGEST_SESSION
from channels.ussd.sessions import SESSION_TTL, decode, forget_phone, phone_keys, session_key
from core import auth
from core import members as service
from core.db import unaccent_lower, unaccent_lower_text, utcnow
from core.errors import NotFound, ValidationError
from core.member_import import EXISTING, MAX_ROWS, import_members
from core.models import Cooperative, Member, UssdSession
from core.payments import foreign_number_warning
from core.phone import DEFAULT_REGION, Phone, PhoneError, has_country_code, normalize

IMPORT_LIMIT = 5 * 1024 * 1024
TOO_LARGE = (f"the file is larger than {IMPORT_LIMIT // (1024 * 1024)} MB: an import takes at most "
             f"{MAX_ROWS:,} members a file; import the list in several files, each with the header row")
MEMBER = out(
    {
        "id": ID,
        "cooperativeId": ID,
        "name": {"type": "string"},
        "phone": {"type": "string", "description": "masked: +25078****456"},
        "phoneReleased": {"type": "boolean",
                          "description": "the number was released (POST /members/{id}/release-phone): "
                                         "it is no longer this member's and may be registered again"},
        "language": {"enum": list(service.LANGUAGES)},
        "unit": NULL_STRING,
        "status": {"enum": list(service.MEMBER_STATUSES)},
        "remindersOptOut": {"type": "boolean",
                            "description": "this membership gets no reminders: its number texted STOP while it "
                                           "held it (START from the number clears it). A STOP the number sent "
                                           "elsewhere, or before it was hers, is not shown here"},
        "createdAt": DATETIME,
        "updatedAt": DATETIME,
    }
)
_FIELDS = {
    "name": {"type": "string", "minLength": 2, "maxLength": 200},
    "unit": {"type": ["string", "null"], "maxLength": 64},
    "language": {"enum": list(service.LANGUAGES)},
    "status": {"enum": list(service.MEMBER_STATUSES)},
}
CREATE = obj(
    {
        **_FIELDS,
        "phone": {"type": "string", "minLength": 5, "maxLength": 32},
        "cooperativeId": {"type": "string", "format": "uuid", "description": "super admin only"},
    },
    ["name", "phone"],
)
UPDATE = obj(
    {
        **_FIELDS,
        "phone": {"type": "string", "minLength": 5, "maxLength": 32,
                  "description": "a corrected number (read in the cooperative's country, as on create); 409 if "
                                 "another member of the cooperative has it (naming her; phoneChange SWAP exchanges "
                                 "their numbers), or if the member's number was released"},
        "phoneChange": {"enum": list(service.PHONE_CHANGES),
                        "description": "why phone is corrected (only with phone, 400 otherwise). NEW_SIM (the "
                                       "default): her number changed; a STOP she sent stays (remindersOptOut). "
                                       "TYPO: the old number was never hers; remindersOptOut is reset to false (a "
                                       "STOP from it was its holder's). SWAP: two members of the cooperative "
                                       "exchange their numbers (sisters swapping phones): the member holding phone "
                                       "gets this member's number, each audited (member.updated, swappedWith); 409 "
                                       "when no other member holds phone, or either member is SUSPENDED. Each "
                                       "number's STOP follows it: a remindersOptOut that is her number's STOP "
                                       "goes with it (one kept from an earlier SIM stays hers). The audit row "
                                       "names the phoneChange"},
    },
    min_properties=1,
)
FOREIGN_NUMBER = ("A new member whose number is another country's than the cooperative's is registered all the same "
                  "(she may live abroad) with a warning, as is one of its country on a network none of its wallets "
                  "collects from (Telecel or AT in Ghana), or on one whose wallet this deployment has no account of "
                  "in the cooperative's currency (Airtel Money set up for Rwanda, a Kenyan cooperative's Airtel "
                  "number): no mobile-money method of the cooperative takes her number "
                  "and its USSD menus offer her none, so she can pay only by a bank method that collects the "
                  "cooperative's currency, or never (the message says which). Empty: nothing to look at.")
WARNING = out({"field": {"type": "string"}, "message": {"type": "string"}})
CREATED = out_plus(MEMBER, warnings={"type": "array", "items": WARNING, "description": FOREIGN_NUMBER})
UPDATED = out_plus(MEMBER, warnings={"type": "array", "items": WARNING,
                                     "description": f"{FOREIGN_NUMBER} Said of a number changed (phone) as of a new "
                                                    "member's; empty without phone"})
IMPORTED = out({"imported": {"type": "integer"}, "memberIds": {"type": "array", "items": ID},
               "updated": {"type": "integer", "description": "existing=update: members the file changed"},
               "updatedIds": {"type": "array", "items": ID},
               "unchanged": {"type": "integer",
                             "description": "existing=update: rows whose member already had its name, unit and "
                                            "language"},
               "ignoredColumns": {"type": "array", "items": {"type": "string"},
                                  "description": "the file's columns not stored (name, phone, unit, language are)"},
               "encoding": {"enum": ["utf-8", "utf-16", "windows-1252"]},
               "warnings": {"type": "array", "items": out({"row": {"type": "integer"}, "field": {"type": "string"},
                                                           "message": {"type": "string"}}),
                            "description": f"{FOREIGN_NUMBER} Each names its row (the header is row 1). With "
                                           "existing=update also (field status) each row whose member is "
                                           "SUSPENDED or PENDING: updated all the same, never reactivated or "
                                           "approved; the message says how"}})

log = logging.getLogger("gateway.api")


def present(m: Member) -> dict[str, Any]:
    return {
        "id": m.id,
        "cooperativeId": m.cooperative_id,
        "name": m.name,
        "phone": m.phone_masked,
        "phoneReleased": m.phone_enc is None,
        "language": m.language,
        "unit": m.unit,
        "status": m.status,
        "remindersOptOut": bool(m.reminders_opt_out),
        "createdAt": iso(m.created_at),
        "updatedAt": iso(m.updated_at),
    }


async def _cooperative(ctx: Ctx, requested: str | None) -> Cooperative:
    coop_id = ctx.who.target_cooperative(requested)
    coop = await ctx.session.get(Cooperative, coop_id)
    if coop is None:
        raise NotFound("cooperative not found")
    return coop


async def create_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    body = ctx.body
    coop = await _cooperative(ctx, body.get("cooperativeId"))
    member = await service.create_member(
        ctx.session,
        ctx.rt.cipher,
        cooperative_id=coop.id,
        name=body["name"],
        phone=(phone := normalize(body["phone"], coop.country)),
        actor=ctx.who.actor,
        language=body.get("language") or coop.language,
        unit=body.get("unit"),
        status=body.get("status", "ACTIVE"),
    )
    await ctx.session.commit()
    said = _phone_warning(ctx, coop)(phone)
    return json_response({**present(member), "warnings": [{"field": "phone", "message": said}] if said else []},
                         status=201)


def _phone_warning(ctx: Ctx, coop: Cooperative) -> Callable[[Phone], str | None]:
    """What to tell the admin of a new member's number of `coop` (FOREIGN_NUMBER), by this deployment's routes."""
    return functools.partial(foreign_number_warning, country=coop.country, currency=coop.currency,
                             routes=ctx.rt.routes, providers=ctx.rt.providers)


async def list_members(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    q = ctx.query
    query = ctx.who.scope(select(Member), Member)
    if q.get("status"):
        query = query.where(Member.status == q["status"])
    if q.get("unit"):
        query = query.where(Member.unit == q["unit"])
    if q.get("name"):
        # The support desk finds a member by part of her name, whatever its case and accents ("mutesi beatrice"
        # finds "Mutesi Béatrice"); % and _ typed are letters, not wildcards.
        typed = unaccent_lower_text(q["name"].strip()).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(unaccent_lower(ctx.session.get_bind().dialect.name, Member.name).like(
            f"%{typed}%", escape="\\"))
    if q.get("cooperativeId"):
        query = query.where(Member.cooperative_id == q["cooperativeId"])
    if q.get("phone"):
        # Phones are encrypted; an exact number is found through its blind index, read as a number of the
        # cooperative's country (0712345678 is Kenyan in a Kenyan cooperative): searched_number.
        regions = await search_regions(ctx, ctx.who.cooperative_id or q.get("cooperativeId"))
        phone = searched_number(q["phone"], regions, "phone")
        query = query.where(Member.phone_index == ctx.rt.cipher.blind_index(phone.e164))
    return await paged(ctx, query.order_by(Member.name, Member.id), present)


# How a searched number is read (GET /members?phone=, GET /payments?paymentAccount=), said in both parameters.
SEARCHED_NUMBER_RULE = ("A number in local form (0712345678) is read in the country of the cooperative searched "
                        "(cooperativeId, or the caller's own); a super admin searching every cooperative gets it read "
                        "in their country when they are all of one, and a 400 when they span several: give it with + "
                        "and its country code (+254712345678), found in any cooperative, or give cooperativeId.")


async def search_region(ctx: Ctx, coop_id: str) -> str:
    """The country a number is read in for the cooperative `coop_id`: its own."""
    country = (await ctx.session.execute(select(Cooperative.country).where(Cooperative.id == coop_id))).scalar()
    return country or DEFAULT_REGION


async def search_regions(ctx: Ctx, coop_id: str | None) -> list[str]:
    """The countries a searched number may be of: the cooperative's; searching every cooperative (a super admin
    without cooperativeId), those of all of them. Never the default region alone: read as Rwanda's, a Kenyan
    cooperative's 0712345678 was refused (members) or found nowhere (payments)."""
    if coop_id is not None:
        return [await search_region(ctx, coop_id)]
    countries = (await ctx.session.execute(select(Cooperative.country).distinct())).scalars().all()
    return sorted(countries) or [DEFAULT_REGION]


def searched_number(raw: str, regions: list[str], field: str) -> Phone:
    """`raw` read as a number of `regions`' one country (SEARCHED_NUMBER_RULE). A number in local form is refused
    when they are several: its country is a guess, and a wrong guess finds another person or nobody. With its
    country code it is the same number whatever the region. A PhoneError (a ValidationError) when it is no
    phone number there: GET /payments then looks it up as a bank account."""
    if len(regions) > 1 and not has_country_code(raw):
        if not any(_reads(raw, region) for region in regions):
            raise PhoneError(f"not a valid phone number of any cooperative's country ({', '.join(regions)})",
                             field=field)
        raise ValidationError(f"{field} has no country code and the cooperatives are in several countries "
                              f"({', '.join(regions)}): give it with + and its country code (as +254712345678), or "
                              "cooperativeId to read it as that cooperative's country's", field=field)
    return normalize(raw, regions[0])


def _reads(raw: str, region: str) -> bool:
    try:
        normalize(raw, region)
    except PhoneError:
        return False
    return True


async def get_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    return json_response(present(await one(ctx, Member, request.match_info["id"], "member")))


async def update_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    member = await one(ctx, Member, request.match_info["id"], "member")
    body = ctx.body
    phone = said = None
    if "phone" in body:
        coop = await ctx.session.get_one(Cooperative, member.cooperative_id)
        phone = normalize(body["phone"], coop.country or DEFAULT_REGION)  # as search_region reads it
        said = _phone_warning(ctx, coop)(phone)  # as on create: another country's number, and how she can pay
        # The number it replaces, as last committed (a swap: the other member's row too, in a fixed order).
        member = await service.lock_member(ctx.session, member, swapping_to=ctx.rt.cipher.blind_index(phone.e164)
                                           if body.get("phoneChange") == "SWAP" else None)
    was, number = member.status, member.phone_index
    status = body.get("status")
    # PENDING -> ACTIVE is an approval however it is asked for: the member is told, as by POST …/approve.
    approving = was == "PENDING" and status == "ACTIVE"
    member = await service.update_member(
        ctx.session,
        member,
        actor=ctx.who.actor,
        name=body.get("name"),
        language=body.get("language"),
        unit=body["unit"] or "" if "unit" in body else None,
        status=None if approving else status,
        phone=phone,
        cipher=ctx.rt.cipher,
        phone_change=body.get("phoneChange"),
    )
    if approving:
        member = await service.approve_member(ctx.session, member, actor=ctx.who.actor, cipher=ctx.rt.cipher)
    # A corrected number: the old one's USSD language and resume route are not hers any more. Swapped, neither
    # number's are: the one she took was the other member's.
    forget = (number, member.phone_index) if body.get("phoneChange") == "SWAP" and number != member.phone_index \
        else (number,) if number != member.phone_index else ()
    return await _saved(ctx, member, was, forget=forget,
                        warnings=[{"field": "phone", "message": said}] if said else [])


async def suspend_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    member = await one(ctx, Member, request.match_info["id"], "member")
    was = member.status
    member = await service.update_member(ctx.session, member, actor=ctx.who.actor, status="SUSPENDED")
    return await _saved(ctx, member, was)


async def _saved(ctx: Ctx, member: Member, was: str, *, forget: tuple[str | None, ...] = (),
                 warnings: list[dict[str, str]] | None = None) -> web.StreamResponse:
    """Commit the change and answer with the member (and `warnings`, when given: UPDATED); `forget`: the blind
    indexes of numbers that are no longer the member's (_forget_number)."""
    indexes = [index for index in forget if index is not None]
    for index in indexes:
        await queue_forget_phone(ctx.session, index, cooperative_id=member.cooperative_id)
    if member.status == "SUSPENDED" and was != "SUSPENDED":
        # The member's tenant logins stop working now (sign-in and refresh are refused on the rows), and their
        # earlier refresh tokens for good: not again once she is made active.
        await auth.record_sessions_ended(ctx.session, actor=ctx.who.actor, because="member suspended",
                                         member_id=member.id)
        await end_sessions(ctx, "the member's", lambda: auth.revoke_member_tokens(
            ctx.session, ctx.rt.redis, member.id, ttl_seconds=ctx.rt.settings.jwt_ttl_seconds))
    await ctx.session.commit()
    for index in indexes:
        await _forget_number(ctx, member, index)
    return json_response(present(member) if warnings is None else {**present(member), "warnings": warnings})


async def release_phone(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """A member who left, whose number the operator may give to someone else: only a SUSPENDED member's.
    The member keeps its record, payments and disputes (phone shown masked as before, phoneReleased true);
    the number can be registered again (API, CSV import, USSD) and its SMS keywords no longer speak for
    this member. Cannot be undone; calling it again changes nothing."""
    member = await one(ctx, Member, request.match_info["id"], "member")
    index = member.phone_index
    member = await service.release_phone(ctx.session, member, actor=ctx.who.actor)
    return await _saved(ctx, member, member.status, forget=(index,))


async def erase_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    """A SUSPENDED member who asked to be erased (core.members.erase_member): her name, unit and number, her
    payments' account, her SMS rows' number and text, and her tenant logins' usernames go; the money records
    stay. Her number is released as by release-phone. 409 while a payment or refund of hers is open. Calling it
    again changes nothing."""
    member = await one(ctx, Member, request.match_info["id"], "member")
    index = member.phone_index
    sessions, unsure = await _recent_sessions(ctx, member)
    member = await service.erase_member(ctx.session, member, actor=ctx.who.actor)
    answer = await _saved(ctx, member, member.status, forget=(index,))
    await _forget_sessions(ctx, member, sessions, unsure)
    return answer


async def _recent_sessions(ctx: Ctx, member: Member) -> tuple[list[str], list[str]]:
    """The Redis keys of the member's USSD sessions that may still be there: their saved state holds what she typed
    and was shown (her name as she registered, her payments). A state lives SESSION_TTL after its last hop, which
    comes up to LONGEST_SESSION after the session opened (its row's started_at). Hers as the erasure's rows are
    (core.members.whose_records): another cooperative's session of her number (her other membership's) is not
    hers. The second list: sessions whose row names no cooperative yet (a member of several, opened before she
    was suspended: the row learns the one she chose when it ends), which her state tells (_forget_sessions)."""
    since = utcnow() - LONGEST_SESSION - timedelta(seconds=SESSION_TTL)
    hers = await service.whose_records(ctx.session, member)
    rows = (await ctx.session.execute(select(
        UssdSession.aggregator, UssdSession.session_id, UssdSession.cooperative_id, UssdSession.member_id).where(
        UssdSession.started_at >= since, hers.rows(UssdSession.member_id, UssdSession.cooperative_id,
                                                   UssdSession.phone_index, UssdSession.started_at,
                                                   no_cooperative=True)))).all()
    keys: tuple[list[str], list[str]] = ([], [])
    for aggregator, session_id, cooperative_id, member_id in rows:
        keys[cooperative_id is None and member_id is None].append(session_key(aggregator, session_id))
    return keys


def _of_another(raw: bytes | str | None, member: Member) -> bool:
    """Whether a session's saved state went on in another membership of the number (her other cooperative's
    chosen, or a registration there) and not in this one: kept by her erasure."""
    if not raw:
        return False
    try:
        data = decode(raw.encode() if isinstance(raw, str) else raw).state.data
    except (ValueError, KeyError, TypeError):
        return False
    cooperatives = {data.get(key) for key in ("c", "rc", "ic")} - {None}
    members = {data.get("mb")} - {None}
    if member.cooperative_id in cooperatives or member.id in members:
        return False
    return bool(cooperatives or members)


async def _forget_sessions(ctx: Ctx, member: Member, keys: list[str], unsure: list[str]) -> None:
    """After the erasure's commit, her recent sessions' keys deleted (Redis down: they expire within SESSION_TTL);
    of those whose row names no cooperative, the ones whose state did not go on in another membership of hers."""
    try:
        for key in unsure:
            if not _of_another(await ctx.rt.redis.get(key), member):
                keys.append(key)
        if keys:
            await ctx.rt.redis.delete(*keys)
    except RedisError:
        log.warning("USSD sessions of an erased member not cleared: Redis unavailable; they expire within "
                    "SESSION_TTL (300 s)", extra={"member_id": member.id, "cooperative_id": member.cooperative_id})


async def _forget_number(ctx: Ctx, member: Member, index: str) -> None:
    """After the commit, a number no longer the member's (released, erased, corrected): its USSD language and
    resume route deleted from Redis now; the job queued with the change (queue_forget_phone) deletes them
    once Redis is back if it is down, so the change stands."""
    try:
        await forget_phone(ctx.rt.redis, index)
    except RedisError:
        # Named by the number's blind index: no phone number in the log.
        log.warning("USSD language and resume route of a number no longer its member's (released, corrected, "
                    "erased) not cleared yet: Redis unavailable; the worker retries",
                    extra={"member_id": member.id, "cooperative_id": member.cooperative_id,
                           "redis_keys": " ".join(phone_keys(index))})


async def approve_member(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    member = await one(ctx, Member, request.match_info["id"], "member")
    member = await service.approve_member(ctx.session, member, actor=ctx.who.actor, cipher=ctx.rt.cipher)
    await ctx.session.commit()
    return json_response(present(member))


CSV_TYPES = ("text/csv", "application/csv", "text/plain", "application/vnd.ms-excel")


MAX_FORM_PARTS = 20


async def _uploaded_file(request: web.Request) -> bytes:
    """The file as the body itself (text/csv), or as a form's file field (`curl -F file=@members.csv`, a
    browser form): the first part that carries a file. The whole body counts against IMPORT_LIMIT (chunked
    too, every part and header), and it is parsed in a thread: a form of many small parts must not hold the
    event loop."""
    if request.content_type not in (*CSV_TYPES, "multipart/form-data"):
        raise ApiError(415, "Content-Type must be text/csv, or multipart/form-data with the file in a field")
    try:
        raw = await read_body(request, IMPORT_LIMIT)
    except ApiError as exc:
        if exc.status != 413:
            raise
        # "request body is larger than 5242880 bytes" told a clerk neither the limit she can read nor what to do.
        raise ApiError(413, TOO_LARGE) from None
    if request.content_type in CSV_TYPES:
        return raw
    found = await asyncio.to_thread(_file_in_form, request.headers.get("Content-Type", ""), raw)
    if found is None:
        raise ApiError(400, "the form has no file: send the CSV in a file field (-F file=@members.csv)")
    return found


def _file_in_form(content_type: str, raw: bytes) -> bytes | None:
    """The first file part of a multipart/form-data body (the standard library's MIME parser), or None."""
    from email.parser import BytesParser
    from email.policy import HTTP

    boundary = parse_mimetype(content_type).parameters.get("boundary", "")
    if not boundary:
        raise ApiError(400, "the form could not be read as multipart/form-data: no boundary")
    if raw.count(b"--" + boundary.encode("latin-1", "replace")) > MAX_FORM_PARTS + 1:
        raise ApiError(400, f"the form has more than {MAX_FORM_PARTS} parts")
    try:
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + raw)
        if not message.is_multipart():
            raise ValueError("not multipart")
        for part in message.iter_parts():
            if part.get_filename() is not None:
                payload = part.get_payload(decode=True)
                return payload if isinstance(payload, bytes) else b""
    except ApiError:
        raise
    except Exception:  # the parser's many ways of refusing a malformed form
        raise ApiError(400, "the form could not be read as multipart/form-data") from None
    return None


async def import_members_csv(request: web.Request, ctx: Ctx) -> web.StreamResponse:
    data = await _uploaded_file(request)
    coop = await _cooperative(ctx, ctx.query.get("cooperativeId"))
    done = await import_members(
        ctx.session,
        ctx.rt.cipher,
        cooperative=coop,
        data=data,
        actor=ctx.who.actor,
        status=ctx.query["status"],
        existing=ctx.query["existing"],
        phone_warning=_phone_warning(ctx, coop),
    )
    await ctx.session.commit()
    return json_response({"imported": len(done.member_ids), "memberIds": done.member_ids,
                          "updated": len(done.updated_ids), "updatedIds": done.updated_ids,
                          "unchanged": done.unchanged,
                          "ignoredColumns": done.ignored_columns, "encoding": done.encoding,
                          "warnings": [{"row": w.row, "field": w.field, "message": w.message} for w in done.warnings]},
                         status=201)


ROUTES = [
    Route(
        "POST",
        "/members",
        create_member,
        "Create a member",
        "members",
        "admin",
        status=201,
        body=CREATE,
        response=CREATED,
    ),
    Route(
        "GET",
        "/members",
        list_members,
        "List members",
        "members",
        "admin",
        response=page_of(MEMBER),
        query={
            "page": PAGE,
            "limit": LIMIT,
            "status": Param(enum=service.MEMBER_STATUSES),
            "unit": Param(description="Exact unit"),
            "name": Param(description="Part of the name, any case, with or without its accents (zoe finds Zoë; "
                                      "lukasz soren finds Łukasz Søren, strasse Straße)"),
            "phone": Param(description=f"Exact phone number. {SEARCHED_NUMBER_RULE}"),
            "cooperativeId": Param("uuid", "Super admin: one cooperative"),
        },
    ),
    Route(
        "POST",
        "/members/import",
        import_members_csv,
        "Import members from CSV (name,phone,unit,language)",
        "members",
        "admin",
        status=201,
        response=IMPORTED,
        raw_body="text/csv",
        body_limit=IMPORT_LIMIT,
        query={
            "cooperativeId": Param("uuid", "Super admin: the cooperative"),
            "status": Param(enum=("ACTIVE", "PENDING"), default="ACTIVE"),
            "existing": Param(enum=EXISTING, default="refuse",
                              description="a row whose number is already a member's: refuse the file (naming the "
                                          "row; the same list sent again, each row a member with its name, unit "
                                          "and language, is one error saying it was already imported, when and "
                                          "how many members it matched), or update that member's name, and unit "
                                          "and language where the file has those columns (an empty language cell "
                                          "keeps hers); her status and number stay"),
        },
    ),
    Route(
        "GET",
        "/members/{id}",
        get_member,
        "Get a member",
        "members",
        "payments:read",
        response=MEMBER,
        tenants=True,
    ),
    Route(
        "PATCH",
        "/members/{id}",
        update_member,
        "Update a member",
        "members",
        "admin",
        body=UPDATE,
        response=UPDATED,
    ),
    Route("DELETE", "/members/{id}", suspend_member, "Suspend a member", "members", "admin", response=MEMBER),
    Route(
        "POST",
        "/members/{id}/approve",
        approve_member,
        "Approve a pending member",
        "members",
        "admin",
        response=MEMBER,
    ),
    Route(
        "POST",
        "/members/{id}/release-phone",
        release_phone,
        "Release a suspended member's phone number (it can then be registered again)",
        "members",
        "admin",
        response=MEMBER,
    ),
    Route(
        "POST",
        "/members/{id}/erase",
        erase_member,
        "Erase a suspended member's personal data, keeping the money records",
        "members",
        "admin",
        response=MEMBER,
    ),
]
