"""What the screens do: loaders and handlers of the pay, my payments, dispute, language and help flows.

Every side effect goes through a core service inside `async with rt.sessionmaker.begin()`; the few
reads with no core helper (cooperative by code or extension) are small private queries here.
"""

from __future__ import annotations

import calendar
import logging
import re
from dataclasses import dataclass, replace
from datetime import date, datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from channels.ussd import cache, funnel, records, sessions
from channels.ussd.engine import LINE, MIN_NAME, Ctx, Ended, Invalid, Item, Name, cut_name, fit_names
from channels.ussd.i18n import LANGUAGES, has
from channels.ussd.types import side_effect_started
from core import gsm
from core.audit import Actor
from core.db import serialise_on_sqlite, utcnow
from core.errors import BusinessRuleError, Conflict, DomainError, NotFound, ValidationError
from core.models import Cooperative, Member, Payment, PaymentType
from core.money import NUMBER_MARKS, Money, MoneyError, exponent
from core.notify import SMS_KEY_SIZE
from core.payments import wallets_by_operator
from core.phone import operator_on_network
from core.ports import refusal_for
from core.state.payment import COLLECTED, OPEN, PaymentStatus, holds_money, shown_status
from core.text import is_number, keypad

if TYPE_CHECKING:
    from collections.abc import Callable

    from core.payments import NewPayment, PaymentContext

log = logging.getLogger("gateway.ussd")

REASONS = ("CHARGED_NOT_RECORDED", "WRONG_AMOUNT", "NOT_AUTHORISED", "OTHER")
# Above these (major units) a USSD payment is refused: mobile-money wallets cap single transfers.
MAX_AMOUNT = {"RWF": 5_000_000, "UGX": 5_000_000, "TZS": 5_000_000, "KES": 250_000, "GHS": 10_000,
              "ZMW": 50_000}
DEFAULT_MAX = 1_000_000
# The smallest screen whose confirmation has room for a balance and the price beside it ("20,000 RWF (balance of
# 50,000 RWF)") with the reference, fee and method whole; a smaller one (Nalo's 120) says "20,000 RWF (balance)".
BALANCE_WITH_PRICE = 160
_NAME = re.compile(r"^[^\W\d_](?:[^\W\d_]|[ '.-]){1,59}$")
_DSP_REF = re.compile(r"DSP_\w+")
# An amount in a currency with cents as typed on a keypad: whole units, then "." or "," and the cents (ASCII digits
# only: str.isdigit takes "³" and "٣").
_DECIMAL_AMOUNT = re.compile(r"([0-9]+)(?:[.,]([0-9]+))?", re.ASCII)
# An amount with its thousands grouped by commas, as the screens write it outside French ("1,000 UGX", "usual:
# 1,000.00 TZS"), the cents after a ".": a comma then exactly three digits, again and again. Its first group is no
# zero: "0,500" or "0٬500" groups no thousands (read as 500, it was 500 where she may have meant 0.50): refused.
_GROUPED_AMOUNT = re.compile(r"[1-9][0-9]{0,2}(?:,[0-9]{3})+(?:\.[0-9]+)?", re.ASCII)
# The same with the Arabic thousands separator (U+066C), the cents after the Arabic decimal one (U+066B) or a ".".
_ARABIC_GROUPED = re.compile(r"[1-9][0-9]{0,2}(?:\u066c[0-9]{3})+(?:[\u066b.][0-9]+)?")
# The same grouped by spaces, as French (and Rwanda, whose franc is written so) writes thousands ("20 000"): a plain
# space, a no-break one (U+00A0) or a narrow no-break one (U+202F, what a French keyboard or a copied amount puts
# there). The decimals after a "," or a "." are then read as any amount's (in French only a "," is one).
_SPACE_GROUPED = re.compile(r"[1-9][0-9]{0,2}(?:[ \u00a0\u202f][0-9]{3})+(?:[.,][0-9]+)?", re.ASCII)


def actor(ctx: Ctx) -> Actor:
    member_id = ctx.data.get("mb")
    return Actor(f"member:{member_id}" if member_id else f"phone:{ctx.hop.phone.masked()}", "ussd")


# -- reads (memoised per hop; rows that rarely change are cached per process, see channels.ussd.cache) --

@dataclass(frozen=True, slots=True)
class CoopRow:
    """The cooperative fields the screens use (a copy, safe to keep after the connection is gone)."""

    id: str
    name: str
    country: str
    contact_phone: str | None
    self_registration: bool
    status: str
    timezone: str | None  # the dates the member is shown are this zone's days
    language: str = "en"  # its menu's for a caller who is none of its members and chose none


@dataclass(frozen=True, slots=True)
class MemberRow:
    id: str
    status: str
    language: str
    cooperative_id: str


@dataclass(frozen=True, slots=True)
class TypeRow:
    id: str
    name: str
    amount_minor: int
    currency: str
    due_day: int | None
    allow_custom_amount: bool
    # When it falls due (core.reminders.due_dates): the period whose balance a fixed amount left part-paid owes.
    is_recurring: bool = False
    recurring_interval: str | None = None
    created_at: datetime | None = None


_COOP_COLUMNS = (Cooperative.id, Cooperative.name, Cooperative.country, Cooperative.contact_phone,
                 Cooperative.self_registration, Cooperative.status, Cooperative.timezone, Cooperative.language)
# With each membership: when its row was last written (the person's language, below, when rows differ).
_MEMBERSHIP_COLUMNS = (*_COOP_COLUMNS, Member.updated_at.label("member_updated"))
_COOP_BY_ID = select(*_COOP_COLUMNS).where(Cooperative.id == bindparam("coop_id"))
_COOP_HELD = _COOP_BY_ID.with_for_update(read=True)  # FOR SHARE: a suspension being written waits, or is read
_TYPES = (select(PaymentType.id, PaymentType.name, PaymentType.amount_minor, PaymentType.currency,
                 PaymentType.due_day, PaymentType.allow_custom_amount, PaymentType.is_recurring,
                 PaymentType.recurring_interval, PaymentType.created_at)
          .where(PaymentType.cooperative_id == bindparam("coop_id"), PaymentType.is_active.is_(True))
          .order_by(PaymentType.name, PaymentType.id))


def _coop_row(row: Any) -> CoopRow:
    return CoopRow(row.id, row.name, row.country, row.contact_phone, bool(row.self_registration), row.status,
                   row.timezone, row.language or "en")


async def memberships(ctx: Ctx) -> list[tuple[MemberRow, CoopRow]]:
    """This phone's memberships, narrowed to the cooperative the dialled extension names.

    Read once per session (the first hop) and kept in the session as data["m"]; later hops rebuild them
    from it and the cached cooperative rows instead of querying again. So a membership approved,
    suspended or added while a session is running (at most a few minutes) shows from the next session,
    as the member and cooperative a session has chosen always did; create_payment still checks that the
    member belongs to the cooperative.
    """
    if "ms" not in ctx.cache:
        saved = ctx.data.get("m")
        found = await _saved_memberships(ctx, saved) if isinstance(saved, list) else None
        if found is None:
            found = await _read_memberships(ctx)
        ctx.cache["ms"] = found
    return ctx.cache["ms"]


def person_language(rows: Any) -> str | None:
    """The person's language, from every membership of the phone (whichever cooperative was dialled); None
    for a phone of no cooperative.

    Choosing a language on USSD writes it on every membership, so the rows agree. They differ only when one
    row was written alone since (an operator's edit or import, a registration): the most recently written
    row is then the latest word (its updated_at; a status change counts as a write too, no row says when its
    language was set), ties broken by member id so every serve process answers alike.
    """
    latest = max(rows, key=lambda row: (row.member_updated, row.member_id), default=None)
    return latest.member_language if latest is not None else None


async def opening_memberships(ctx: Ctx, **opening: Any) -> list[tuple[MemberRow, CoopRow]] | None:
    """memberships() on a session's first hop, with its session row written in the same round trip as
    records.opened() would write it given `opening` (records.opened_reading); None where that is not done (other
    databases than PostgreSQL): the caller then reads memberships() and calls records.opened()."""
    from core.members import membership_query

    phone_index = ctx.rt.cipher.blind_index(ctx.hop.phone.e164)
    async with cache.autocommit(ctx.rt) as conn:
        records_ = await records.opened_reading(conn, ctx.rt, membership_query(_MEMBERSHIP_COLUMNS),
                                                {"phone_index": phone_index}, only=ctx.data.get("x") or None,
                                                **opening)
    if records_ is None:
        return None
    # (by name, as SQLAlchemy's rows are read: membership_query's columns)
    rows = [SimpleNamespace(**r) for r in records_]
    ctx.cache["ms"] = _memberships_of(ctx, rows)
    if not ctx.cache["ms"]:  # as _read_memberships
        await _unusable_memberships(ctx, usable={_coop_row(row).id for row in rows})
    return ctx.cache["ms"]


async def _read_memberships(ctx: Ctx) -> list[tuple[MemberRow, CoopRow]]:
    from core.members import membership_rows

    async with cache.autocommit(ctx.rt) as conn:
        rows = await membership_rows(conn, ctx.rt.cipher, ctx.hop.phone, _MEMBERSHIP_COLUMNS)
    found = _memberships_of(ctx, rows)
    if not found:
        # None she can use, or none in the dialled extension's cooperative while she has some elsewhere: there
        # she may be suspended, and is told so rather than "not registered" (or, at Pay, asked her name and
        # then "already registered").
        await _unusable_memberships(ctx, usable={_coop_row(row).id for row in rows})
    return found


_UNUSABLE = (select(Member.id.label("member_id"), Member.language.label("member_language"),
                    Member.updated_at.label("member_updated"), Member.cooperative_id)
             .where(Member.phone_index == bindparam("phone_index")))


async def _unusable_memberships(ctx: Ctx, usable: set[str]) -> None:
    """For a phone with no membership the menus can use (memberships(): none ACTIVE or PENDING in an ACTIVE
    cooperative), or none in the dialled extension's cooperative, its other ones: the member suspended, or her
    cooperative. Their cooperatives are kept as data["ia"], so a flow tells her that her membership is not active
    (enter) rather than "not registered, choose Pay to register" and a code prompt that refuses her cooperative's
    code (or, by its extension, a registration there that ends "already registered"); with none usable anywhere,
    their language is the person's (greeted in English, though she reads Kinyarwanda). One indexed read, on the
    first hop of such a phone only (a stranger's too: it finds nothing). `usable`: the cooperatives of those the
    menus can use, before the extension narrowed them (none of her memberships there is inactive)."""
    async with cache.autocommit(ctx.rt) as conn:
        rows = (await conn.execute(_UNUSABLE, {"phone_index": ctx.rt.cipher.blind_index(ctx.hop.phone.e164)})).all()
    if rows and not usable:  # else the language was read from the usable ones (_memberships_of), as before
        ctx.cache["lang"] = person_language(rows)
    inactive = sorted({row.cooperative_id for row in rows} - usable)
    if inactive:
        ctx.data["ia"] = inactive


def _memberships_of(ctx: Ctx, rows: Any) -> list[tuple[MemberRow, CoopRow]]:
    # Read before the rows are narrowed to the dialled cooperative: the language is the person's, and the
    # memberships of other cooperatives carry it too.
    ctx.cache["lang"] = person_language(rows)
    only = ctx.data.get("x")
    coops = cache.of(ctx.rt).coops
    found = []
    for row in rows:
        coop = _coop_row(row)
        coops.put(coop.id, coop)
        if not only or coop.id == only:
            found.append((MemberRow(row.member_id, row.member_status, row.member_language, coop.id), coop))
    ctx.data["m"] = [[m.id, m.status, m.language, c.id] for m, c in found]
    return found


async def _saved_memberships(ctx: Ctx, saved: list[Any]) -> list[tuple[MemberRow, CoopRow]] | None:
    found = []
    try:
        for member_id, status, lang, coop_id in saved:
            coop = await cooperative(ctx, coop_id)
            # As the query does: a cooperative suspended since (seen within the cache's TTL) drops out, and is
            # then one of her memberships that are not active (_unusable_memberships).
            if coop is not None and coop.status == "ACTIVE":
                found.append((MemberRow(member_id, status, lang, coop_id), coop))
            elif coop is not None and coop_id not in ctx.data.get("ia", []):
                ctx.data["ia"] = [*ctx.data.get("ia", []), coop_id]
    except (TypeError, ValueError):
        return None  # not what this code writes: read them again
    return found


async def current(ctx: Ctx) -> tuple[MemberRow | None, CoopRow | None]:
    coop_id = ctx.data.get("c")
    for member, coop in await memberships(ctx):
        if coop.id == coop_id:
            return member, coop
    return None, None


async def cooperative(ctx: Ctx, coop_id: str) -> CoopRow | None:
    key = f"coop:{coop_id}"
    if key not in ctx.cache:
        coop = cache.of(ctx.rt).coops.get(coop_id)
        if coop is cache.MISSING:
            return await cooperative_now(ctx, coop_id)
        ctx.cache[key] = coop
    return ctx.cache[key]


async def cooperative_now(ctx: Ctx, coop_id: str) -> CoopRow | None:
    """The cooperative read from the database, not the cache's copy (up to cache.TTL_SECONDS old), which it then
    replaces: where a stale copy would act on a change just made (a session resumed at the name prompt right after
    the cooperative was suspended or closed to registration by phone was shown the prompt again). Not on the
    normal menu hop (one round trip more)."""
    async with cache.autocommit(ctx.rt) as conn:
        row = (await conn.execute(_COOP_BY_ID, {"coop_id": coop_id})).first()
    coop = _coop_row(row) if row is not None else None
    cache.of(ctx.rt).coops.put(coop_id, coop)
    ctx.cache[f"coop:{coop_id}"] = coop
    return coop


async def cooperative_by_code(conn: Any, code: str) -> CoopRow | None:
    """The cooperative whose short code the member typed, in any case (at most one: codes are unique whatever
    their case, so no other cooperative's members are taken in), active or not (code_entered tells a suspended
    one apart: its code exists). A read, not a side effect."""
    from core.cooperatives import code_is

    row = (await conn.execute(select(*_COOP_COLUMNS).where(code_is(code)))).first()
    return _coop_row(row) if row is not None else None


async def cooperative_by_extension(rt: Any, extension: str) -> CoopRow | None:
    """The cooperative whose own code was dialled, active or not: a suspended one's code names it all the same (its
    members are told their membership there is not active, a stranger that it takes no payments now: enter). Read
    among the active ones only, a suspended cooperative's code was the shared code, and a member of another
    cooperative went on to that one's menu and paid it."""
    async with cache.autocommit(rt) as conn:
        row = (await conn.execute(
            select(*_COOP_COLUMNS).where(Cooperative.ussd_extension == extension))).first()
    return _coop_row(row) if row is not None else None


async def payment_types(ctx: Ctx) -> tuple[TypeRow, ...]:
    """The cooperative's active payment types, ordered by name (cached per process for a few seconds)."""
    if "pts" not in ctx.cache:
        coop_id = ctx.data["c"]
        types_cache = cache.of(ctx.rt).types
        types = types_cache.get(coop_id)
        if types is cache.MISSING:
            async with cache.autocommit(ctx.rt) as conn:
                rows = await conn.execute(_TYPES, {"coop_id": coop_id})
                types = tuple(TypeRow(r.id, r.name, r.amount_minor, r.currency, r.due_day,
                                      bool(r.allow_custom_amount), bool(r.is_recurring), r.recurring_interval,
                                      r.created_at) for r in rows)
            types_cache.put(coop_id, types)
        ctx.cache["pts"] = types
    return ctx.cache["pts"]


async def payment_type(ctx: Ctx) -> TypeRow | None:
    for pt in await payment_types(ctx):
        if pt.id == ctx.data.get("pt"):
            return pt
    return None


async def recent_payments(ctx: Ctx) -> list[tuple[Payment, str]]:
    """The member's last five payments with their type names (refused once her number is not this phone's)."""
    if "recent" not in ctx.cache:
        from core.payment_types import list_payment_types

        async with ctx.rt.sessionmaker() as session:
            payments = await _her_payments(ctx, session)
            types, _ = await list_payment_types(session, ctx.data["c"], include_inactive=True, limit=200)
        names = {t.id: t.name for t in types}
        ctx.cache["recent"] = [(p, names.get(p.payment_type_id, "")) for p in payments]
    return ctx.cache["recent"]


NOT_HERS = "the member's number changed during the session: this phone no longer acts as her"


class NotHers(Ended):
    """The member's number is no longer the dialling phone's (NOT_HERS): the session ends saying so and to dial
    again (a new session sees the phone as it now is), not "try again later", which cannot help whoever holds it."""

    def __init__(self) -> None:
        super().__init__("number_changed", NOT_HERS)


async def _her_payments(ctx: Ctx, session: Any) -> list[Payment]:
    """The chosen member's last five payments, in the caller's session, refused (NotHers) unless she
    still has the dialling phone's number: in the same query (recent_payments_of_holder), no extra round trip.

    The session chose her from its first hop's memberships and keeps them (memberships()): a number corrected,
    released or erased since (the admin API) leaves the session of the old number going on as her, listing her
    payments, sending her receipts, opening disputes in her name. Refused as a confirmation is
    (_check_number_still_hers): the session ends saying the number is no longer registered for her (NotHers).
    """
    from core.payments import recent_payments_of_holder

    mine = await recent_payments_of_holder(session, ctx.data["mb"], ctx.rt.cipher.blind_index(ctx.hop.phone.e164),
                                           limit=5)
    if mine is None:
        raise NotHers()
    return mine


async def chosen_payment(ctx: Ctx) -> tuple[Payment, str] | None:
    for payment, name in await recent_payments(ctx):
        if payment.id == ctx.data.get("py"):
            return payment, name
    return None


def short(name: str, size: int = 22) -> str:
    """The name on one line in at most `size` characters, marked ".." when shortened (engine.cut_name)."""
    return cut_name(" ".join(name.split()), size)


# Names (a cooperative's, a person's, a payment type's) are kept whole for the screens, which shorten them only
# when they would not fit (engine.fit_names); beyond this no screen could show them, nor need the session keep them.
WHOLE = 150


def whole(name: str) -> str:
    return short(name, WHOLE)


def shorts(names: list[str], size: int = 22) -> list[str]:
    """short() of each name, except that names whose shortened forms would read the same keep what tells them
    apart: the end ("Monthly Rent - Building A" and "... B": "Monthly Rent..lding A", "..lding B"), or, when
    they share a long end too ("... Block A - Ground Floor Shops", "... Block B - ..."), the part around the first
    character they differ by ("Monthly..Block A - Gr", "Monthly..Block B - Gr"). Only names that are the same
    read the same."""
    cut = [short(n, size) for n in names]
    clashes: dict[str, list[int]] = {}
    for i, label in enumerate(cut):
        clashes.setdefault(label, []).append(i)
    for group in (g for g in clashes.values() if len(g) > 1):
        full = [" ".join(names[i].split()) for i in group]
        if len(set(full)) < len(full):
            continue  # the same name twice: nothing to tell apart
        differ = next((k for k in range(1, size) if len({f[-k:] for f in full}) == len(full)), None)
        if differ is not None and differ + 6 <= size - 6:
            tail = differ + 6
            labels = [name[:size - 2 - tail].rstrip() + ".." + name[-tail:] for name in full]
        else:
            first = next(k for k in range(max(map(len, full)) + 1) if len({f[:k + 1] for f in full}) > 1)
            labels = [_around(name, first, size) for name in full]
        for i, label in zip(group, labels, strict=True):
            cut[i] = label
    return cut


def _around(name: str, at: int, size: int) -> str:
    """The name's start and the part around character `at` (where names that read alike differ), in `size`."""
    head = name[:size // 3].rstrip()
    room = size - len(head) - 2
    start = max(len(head), at - room // 2)
    return head + ".." + name[start:start + room].strip()


# -- home and membership --------------------------------------------------------------------------

async def home_args(ctx: Ctx) -> dict[str, Any]:
    if "hn" not in ctx.data:
        ms = await memberships(ctx)
        ctx.data["hn"] = whole(ms[0][1].name) if len({c.id for _, c in ms}) == 1 else "CoopPay"
    return {"name": ctx.data["hn"]}


async def enter(ctx: Ctx, flow: str) -> str:
    """Start a flow that needs a membership: pick the cooperative first when there are several."""
    ctx.data["nx"] = flow
    ms = await memberships(ctx)
    if ctx.data.get("c") and ctx.data.get("mb") and len(ms) <= 1:
        # One cooperative (or the one a dialled extension named): no need to ask again. A member of several
        # is asked each time a flow starts from the menu, so after Home the others are still reachable.
        return await _start(ctx, flow)
    if not ms:
        inactive = await _inactive_here(ctx)
        if inactive is not None:
            # The session row's cooperative (records.closed): the one she was told about, whose session list
            # should show it. Not "c" (a membership she may use; the ops funnel counts the session for it).
            ctx.data["cn"], ctx.data["ic"] = whole(inactive.name), inactive.id
            return "member_inactive"
        extension_coop = ctx.data.get("x")
        coop = await cooperative(ctx, extension_coop) if extension_coop else None
        if flow == "help":
            # Dialling a cooperative's own code, she is given its help, not told to ask it for that code.
            if coop is None:
                return "help_general"
            return "help" if coop.contact_phone else "help_office"
        if coop is not None and coop.status != "ACTIVE":
            # Its own code dialled while it is suspended: it takes no payments or members now, as its code typed
            # at the registration prompt says (code_entered), not "register here" or a name prompt.
            return "reg_suspended"
        if coop is None and await no_cooperative_of_her_country(ctx):
            # The shared code, and no cooperative of her number's country to join: every code she could type at
            # Pay would refuse her (_registration), and My payments or Problem with a payment would send her to Pay.
            return "reg_foreign_any"
        if flow != "pay":
            if coop is not None:
                # The dialled extension's cooperative: this phone may well be a member of another one. Pay
                # registers her only where the cooperative takes members by phone; elsewhere its office does.
                ctx.data["cn"] = whole(coop.name)
                if _another_countrys(ctx, coop):
                    # Not "Choose Pay to register": Pay would refuse her (_registration). Told at once that the
                    # cooperative cannot take payments from her number, as Pay would tell her.
                    return "reg_foreign"
                return "member_not_here" if coop.self_registration else "member_not_here_office"
            return "member_none"
        if coop is not None:
            return _registration(ctx, coop)
        return "reg_code"
    if len(ms) == 1:
        return await _choose(ctx, ms[0][0], ms[0][1])
    return "coop_pick"


async def _inactive_here(ctx: Ctx) -> CoopRow | None:
    """The cooperative of a membership of this phone that is not active (the member or the cooperative suspended:
    _unusable_memberships), where the session is: the dialled extension's cooperative, when one is (of another,
    she may register there), else any. None when there is none."""
    inactive = ctx.data.get("ia") or []
    extension_coop = ctx.data.get("x")
    for coop_id in [extension_coop] if extension_coop else inactive:
        if coop_id in inactive:
            return await cooperative(ctx, coop_id)
    return None


async def _choose(ctx: Ctx, member: MemberRow, coop: CoopRow) -> str:
    ctx.data["c"], ctx.data["mb"], ctx.data["cn"] = coop.id, member.id, whole(coop.name)
    if member.status == "PENDING" and ctx.data["nx"] != "help":
        return "member_pending"
    return await _start(ctx, ctx.data["nx"])


async def _start(ctx: Ctx, flow: str) -> str:
    if flow == "pay":
        return "pay_type" if await payment_types(ctx) else "pay_none"
    if flow in ("my", "dsp"):
        if not await recent_payments(ctx):
            return "my_none"
        return "my_list" if flow == "my" else "dsp_pick"
    _member, coop = await current(ctx)
    return "help" if coop and coop.contact_phone else "help_office"


async def pay(ctx: Ctx, _key: str) -> str:
    return await enter(ctx, "pay")


async def my_payments(ctx: Ctx, _key: str) -> str:
    return await enter(ctx, "my")


async def problem(ctx: Ctx, _key: str) -> str:
    return await enter(ctx, "dsp")


async def help_(ctx: Ctx, _key: str) -> str:
    return await enter(ctx, "help")


async def coop_items(ctx: Ctx) -> list[Item]:
    ms = await memberships(ctx)
    names = [c.name for _, c in ms]
    labels = _fitted(ctx, "coop.pick", names, lambda labels: labels)
    return [Item(c.id, label) for (_, c), label in zip(ms, labels, strict=True)]


def _fitted(ctx: Ctx, title: str, names: list[str], lines: Callable[[list[str]], list[str]]) -> list[str]:
    """A list's items with its names as long as they may be: whole (up to a line, engine.LINE) when the list fits
    one screen with them, else as long as lets it fit (shorts: what tells names apart stays), never under the
    payment types' 22; where even that does not fit, the engine pages the list. `lines` makes the items from the
    names so shortened. Cut to a fixed size whatever the room, the picker's "Kigali Heights Housing Coope.." left 78
    of Africa's Talking's 182 characters unused, and the type list's "Monthly Savings Cont.. GHS 125.50" 80.
    Measured as the engine lays a page out: the longer of the title and an error line in its place, the numbered
    lines and the footer."""
    from core import gsm

    stack = ctx.state.stack
    footer = [ctx.t("nav.back")] if stack else []
    if len(stack) >= 2:
        footer.append(ctx.t("nav.home"))
    top = max(gsm.length(ctx.t(title)), gsm.length(ctx.t("error.invalid_choice")))
    fixed = top + sum(gsm.length(line) + 1 for line in footer)
    widest = LINE - len(f"{len(names)}. ")
    for size in range(min(max(map(len, names), default=0), widest), 22, -1):
        items = lines(shorts(names, size))
        numbered = [f"{n}. {item}" for n, item in enumerate(items, start=1)]
        if fixed + sum(gsm.length(gsm.to_gsm(line)) + 1 for line in numbered) <= ctx.limit:
            return items
    return lines(shorts(names))


async def coop_chosen(ctx: Ctx, coop_id: str) -> str:
    for member, coop in await memberships(ctx):
        if coop.id == coop_id:
            return await _choose(ctx, member, coop)
    raise Invalid("error.invalid_choice")


async def coop_args(ctx: Ctx) -> dict[str, Any]:
    return {"coop": ctx.data.get("cn", "CoopPay")}


async def type_changed_args(ctx: Ctx) -> dict[str, Any]:
    """The type a confirmation was refused for (TypeChanged), by its name then, and the cooperative."""
    return {**await coop_args(ctx), "type": ctx.data.get("tn") or await _type_name(ctx, await payment_type(ctx))}


# -- registration of a non-member -----------------------------------------------------------------

def _registration(ctx: Ctx, coop: CoopRow) -> str:
    ctx.data["rc"], ctx.data["cn"] = coop.id, whole(coop.name)
    if _another_countrys(ctx, coop):
        return "reg_foreign"
    return "reg_name" if coop.self_registration else "reg_closed"


def _another_countrys(ctx: Ctx, coop: CoopRow) -> bool:
    """Whether the phone's number is of another country than the cooperative's (a Ghanaian number, reaching us
    through Hubtel or Nalo, typing a Rwandan cooperative's code): its wallets are its country's and take no other
    country's number (core.payments.methods_for), and USSD offers no bank method, so a member who joined so could
    never pay here; she was taken in PENDING all the same. Refused before her name is asked: her cooperative's office
    may still register her (POST /v1/members warns of such a number, and a bank method may collect from her)."""
    return _of_another_country(ctx, coop.country)


def _of_another_country(ctx: Ctx, country: str | None) -> bool:
    return bool(country) and ctx.hop.phone.region != country


# The countries of the cooperatives whose code a stranger may type: a suspended one's too (its code says that it
# takes no payments now, reg_suspended: true, where "your number is of another country" would not be).
_COUNTRIES = select(Cooperative.country).distinct()


async def no_cooperative_of_her_country(ctx: Ctx) -> bool:
    """Whether every cooperative is of another country than the phone's number: on the shared code (no cooperative
    named), such a number that is no member was told "choose Pay to register", and Pay asked for a code that could
    only refuse her (_another_countrys). Any cooperative's code may be typed at any aggregator's shared code
    (cooperative_by_code), so every cooperative counts, whatever its ussdAggregator or status. One read of
    the countries, made only for a stranger on the shared code and kept per process for a few seconds (cache);
    a member's hops never make it."""
    countries_cache = cache.of(ctx.rt).countries
    countries = countries_cache.get(None)
    if countries is cache.MISSING:
        async with cache.autocommit(ctx.rt) as conn:
            countries = frozenset((await conn.execute(_COUNTRIES)).scalars())
        countries_cache.put(None, countries)
    # With no cooperative at all, her number is of no other country than theirs: the code prompt, as before.
    return bool(countries) and all(_of_another_country(ctx, country) for country in countries)


async def validate_code(ctx: Ctx, text: str) -> str:
    # Read as on the menu that led here (keypad): a handset that sends "١" for the key 1 sends her code "٤٠٢١" so,
    # and one with a full-width keyboard "ＫＨＨＣ" (a code is ASCII letters, digits, "_" and "-": nothing else
    # could match); each was told no cooperative had it.
    code = keypad(text.strip())
    if not 2 <= len(code) <= 32:
        raise Invalid()
    async with cache.autocommit(ctx.rt) as conn:
        coop = await cooperative_by_code(conn, code)
    if coop is None:
        raise Invalid()
    ctx.cache[f"coop:{coop.id}"] = coop
    return coop.id


async def code_entered(ctx: Ctx, coop_id: str) -> str:
    coop = await cooperative(ctx, coop_id)
    assert coop is not None
    return _joining(ctx, coop)


def _joining(ctx: Ctx, coop: CoopRow) -> str:
    """What a number that is no member is shown on choosing this cooperative: its name prompt, or why not. Also
    for a session at the name prompt continued or answered after the cooperative was suspended or stopped taking
    members by phone (create_member checks neither: she was taken in PENDING)."""
    if coop.status != "ACTIVE":
        # Its code exists ("no cooperative has this code" had her try it again and again): it takes no payments
        # or members now. No more is told (not its name, not why).
        return "reg_suspended"
    return _registration(ctx, coop)


async def validate_name(_ctx: Ctx, text: str) -> str:
    name = " ".join(text.split())
    if not _NAME.match(name):
        raise Invalid()
    return name


async def name_entered(ctx: Ctx, name: str) -> str:
    from core.members import create_member

    try:
        async with ctx.rt.sessionmaker.begin() as session:
            # Read in the transaction that takes her in, not from the cache (a name typed within its 5 s of a
            # suspension was taken in PENDING), its row held FOR SHARE (SQLite: the write lock) so that a suspension
            # or a closing to registration being written waits for this one or is seen by it.
            await serialise_on_sqlite(session, Cooperative, ctx.data["rc"])
            row = (await session.execute(_COOP_HELD, {"coop_id": ctx.data["rc"]})).first()
            coop = _coop_row(row) if row is not None else None
            ctx.cache[f"coop:{ctx.data['rc']}"] = coop
            if coop is not None and (refused := _joining(ctx, coop)) != "reg_name":
                # A session at the name prompt from before the country check, or of a cooperative suspended or
                # closed to registration by phone since, on its next hop (one continued is told at once:
                # resume_continue).
                return refused
            side_effect_started()  # (a failure of the read above took nothing: "unavailable", not "unsettled")
            member = await create_member(session, ctx.rt.cipher, cooperative_id=ctx.data["rc"], name=name,
                                         phone=ctx.hop.phone, language=ctx.state.lang, status="PENDING",
                                         actor=actor(ctx))
    except Conflict:
        return "reg_exists"
    ctx.data["mb"], ctx.data["nm"] = member.id, whole(name)
    return "reg_done"


async def reg_args(ctx: Ctx) -> dict[str, Any]:
    return {"coop": ctx.data.get("cn", ""), "name": ctx.data.get("nm", "")}


# -- pay ------------------------------------------------------------------------------------------

async def type_items(ctx: Ctx) -> list[Item]:
    types = await payment_types(ctx)
    last_day = await _last_day_this_month(ctx) if any(pt.due_day for pt in types) else 31

    def lines(labels: list[str]) -> list[str]:
        out = []
        for pt, name in zip(types, labels, strict=True):
            # A type whose amount the payer enters, with no usual amount: not "0 RWF".
            free = pt.allow_custom_amount and not pt.amount_minor
            amount = ctx.t("pay.any_amount") if free else ctx.money(Money(pt.amount_minor, pt.currency))
            if pt.due_day:
                # This month's day where the cooperative is: the 31st is the 30th in November, as its reminders
                # date it (core.reminders.due_dates).
                out.append(ctx.t("pay.type_line_due", name=name, amount=amount, day=min(pt.due_day, last_day)))
            else:
                out.append(ctx.t("pay.type_line", name=name, amount=amount))
        return out

    # Names whole where the screen has room, as the picker's (_fitted).
    labels = _fitted(ctx, "pay.types", [pt.name for pt in types], lines)
    return [Item(pt.id, label) for pt, label in zip(types, labels, strict=True)]


async def _last_day_this_month(ctx: Ctx) -> int:
    """The last day of this month where the session's cooperative is."""
    from core.cooperatives import zone_of

    coop = await cooperative(ctx, ctx.data["c"])
    today = utcnow().astimezone(zone_of(coop.timezone if coop else None)).date()
    return calendar.monthrange(today.year, today.month)[1]


async def type_chosen(ctx: Ctx, type_id: str) -> str:
    ctx.data["pt"] = type_id
    pt = await payment_type(ctx)
    if pt is None:
        raise Invalid("error.invalid_choice")
    ctx.data["cur"] = pt.currency
    ctx.data.pop("full", None)  # another type's balance, chosen before Back
    ctx.data.pop("paid", None)  # or its period paid in full
    if pt.allow_custom_amount:
        coop = await cooperative(ctx, ctx.data["c"])
        if not _number_methods(ctx, coop.country if coop else "", pt.currency):
            # No method takes her number's wallet whatever the amount (Vodacom's M-Pesa or Yas in Tanzania, Telkom in
            # Kenya, an Airtel Money account of another country's currency): told so now, not after she has typed an
            # amount for nothing.
            return "pay_no_method"
        return "pay_amount"
    ctx.data["amt"] = pt.amount_minor
    owed = await _owed(ctx, pt)
    if owed is not None and owed[1] == 0:
        # Paid in full: she is told so before anything is offered (data["paid"]: the period's due date, as her
        # reminder names it); Back to the list, or pay the price again (a payment made now pays this period: the
        # next one is paid ahead from its midpoint on, core.reminders.current_period, when this reads it unpaid).
        ctx.data["paid"] = owed[0].isoformat()
        return "pay_paid"
    if owed is not None and owed[1] != pt.amount_minor:
        # What is left of the period's price, not the price again (she would overpay by what was taken); the
        # confirmation says it is the balance (data["full"]: the price).
        ctx.data["amt"], ctx.data["full"] = owed[1], pt.amount_minor
    return await _method_step(ctx)


async def paid_args(ctx: Ctx) -> dict[str, Any]:
    """The type chosen and the due date of its period paid in full (type_chosen), dated as her reminder and
    "My payments" date days."""
    return {"type": await _type_name(ctx, await payment_type(ctx)),
            "due": date.fromisoformat(ctx.data["paid"]).strftime("%d/%m/%Y")}


async def pay_again(ctx: Ctx, _key: str) -> str:
    """Told the period is paid, she pays its price again: the method, then the confirmation, as for any type."""
    return await _method_step(ctx)


async def _owed(ctx: Ctx, pt: TypeRow) -> tuple[date, int] | None:
    """The due date of the period a payment made now pays of a fixed-amount recurring type and what the member
    still owes of it (core.reminders.owed_now): the balance her reminder states when the provider took only part
    of its price (or part was refunded), 0 when paid in full. One query, made only when she picks such a type
    (none on the opening hop)."""
    if not pt.is_recurring or pt.allow_custom_amount or not pt.amount_minor:
        return None
    from core.reminders import owed_now_numbered

    coop = await cooperative(ctx, ctx.data["c"])
    # The reference's number rides on the query (data["nr"]: reserved_reference makes the reference of it), unless
    # the session has one already: the confirmation follows, and its nextval was a round trip of its own.
    fresh = not (ctx.data.get("rr") or ctx.data.get("nr"))
    async with cache.autocommit(ctx.rt) as conn:
        owed, number = await owed_now_numbered(conn, ctx.data["mb"], pt, coop.timezone if coop else None,
                                               number=fresh)
    if number is not None:
        ctx.data["nr"] = number
    return owed


async def amount_args(ctx: Ctx) -> dict[str, Any]:
    pt = await payment_type(ctx)
    currency = ctx.data.get("cur", "RWF")
    usual = (ctx.t("pay.usual", amount=ctx.money(Money(pt.amount_minor, currency)))
             if pt and pt.amount_minor else "")  # no "(usual: -)" for a type without one
    return {"currency": currency, "usual": usual}


def _ungrouped(text: str, language: str) -> str:
    """`text` without the commas that group its thousands, where the session's language groups with commas (every
    language but French, whose comma is the decimal mark: its "1,000" stays refused): a member who types the amount
    as the menu and the prompt's "usual" show it ("1,000" in UGX, "10,000" or "1,000.00" in TZS) was asked
    again for "a whole amount, e.g. 5000", though she had typed one."""
    if NUMBER_MARKS.get(language, (",", "."))[0] == "," and _GROUPED_AMOUNT.fullmatch(text):
        return text.replace(",", "")
    return text


def _arabic_marks(text: str) -> str:
    """`text` with the Arabic decimal separator "٫" (U+066B) as ".", and the Arabic thousands separator "٬"
    (U+066C) dropped where it groups digits by three ("١٬٠٠٠٫٥٠" is 1000.50, in every language: neither mark is
    ambiguous as "," is): what an Arabic keyboard types for 12.50 was refused in GHS or KES and asked again. NFKC
    leaves both as they are. The "." is then checked as one typed (cents where the currency has them, at most its
    places); a "٬" anywhere else stays, and is refused."""
    if "\u066c" in text and _ARABIC_GROUPED.fullmatch(text):
        text = text.replace("\u066c", "")
    return text.replace("\u066b", ".")


def _space_ungrouped(text: str) -> str:
    """`text` without the spaces that group its thousands ("20 000", "1 234,50"; _SPACE_GROUPED), in every language:
    a space is no decimal mark anywhere, so "20 000" is twenty thousand whatever the session speaks. A space that
    groups no three digits ("2 0000", "20 00") stays, and the amount is refused, as "20,00" is in RWF."""
    if _SPACE_GROUPED.fullmatch(text):
        return text.replace(" ", "").replace("\u00a0", "").replace("\u202f", "")
    return text


def _unpadded(whole: str) -> str:
    """Whole units without the zeros before them ("0005000" is 5000): a member holding the 0 key means the amount
    after them. Money.parse bounds an amount's text (64 characters), so three hundred zeros before 5000 were "Amount
    too high"; dropped here, the amount left is checked as any other (a long one is still too high)."""
    return whole.lstrip("0") or "0"


async def validate_amount(ctx: Ctx, text: str) -> str:
    currency = ctx.data.get("cur", "RWF")
    places = exponent(currency)
    # Read as the menus read keys ("٢٠٠٠٠" and "２００００" are 20000), with Arabic separators as the ASCII ones
    # (_arabic_marks): the confirmation then shows the amount as the screens write it, before anything is charged.
    text = _ungrouped(_space_ungrouped(_arabic_marks(keypad(text))), ctx.state.lang)
    if places:
        # A currency with cents (GHS, KES): the amount as the screens write it, "12.50" (French "12,50"). Whole
        # units only refused the usual amount the prompt itself shows ("usual: 20.50 GHS"), and told her to enter
        # "a whole amount, e.g. 5000". A comma followed by three digits ("1,000") groups thousands (_ungrouped),
        # except in French, where it is no amount: refused. A comma left is a decimal mark in French only: where
        # "1,000" is a thousand, "1,00" is a thousand mistyped, not 1.00 (as UGX refuses it).
        match = _DECIMAL_AMOUNT.fullmatch(text)
        comma_decimal = NUMBER_MARKS.get(ctx.state.lang, (",", "."))[1] == ","
        if match is None or len(match.group(2) or "") > places or ("," in text and not comma_decimal):
            raise await _not_an_amount(ctx, currency)
        text = _unpadded(match.group(1)) + ("." + match.group(2) if match.group(2) else "")
    elif not is_number(text):
        # Whole units only: a "." or "," typed on a keypad is a mistake more often than cents.
        raise await _not_an_amount(ctx, currency)
    else:
        text = _unpadded(text)
    cap = ussd_cap(currency)
    try:
        amount = Money.parse(text, currency)
    except MoneyError:
        if text.strip("0."):  # digits only, but more than money can hold: too high, not "not a number"
            raise Invalid("pay.amount_too_big", max=ctx.money(cap)) from None
        raise await _not_an_amount(ctx, currency) from None
    if not amount.is_positive():
        raise await _not_an_amount(ctx, currency)
    if amount > cap:
        raise Invalid("pay.amount_too_big", max=ctx.money(cap))
    if amount.minor % 10 ** places and await _whole_only(ctx, amount):
        # Her number's wallet takes whole units only (M-Pesa: whole shillings): asked again for a whole amount
        # rather than ending the session on "this amount cannot be paid".
        raise Invalid("pay.amount_invalid", currency=currency, example="5000")
    return str(amount.minor)


def ussd_cap(currency: str) -> Money:
    """The most a USSD payment may be in `currency` (MAX_AMOUNT, DEFAULT_MAX for another currency)."""
    return Money.parse(MAX_AMOUNT.get(currency, DEFAULT_MAX), currency)


async def _not_an_amount(ctx: Ctx, currency: str) -> Invalid:
    """What she is told who typed no amount: the form an amount takes in `currency`, with its cents ("e.g. 10.50")
    where it has them, but a whole amount where her number's wallet takes whole units only (M-Pesa, Airtel Money in
    Tanzania): told "e.g. 10.50", she typed 10.50 and was then asked for a whole amount."""
    places = exponent(currency)
    if places:
        example = Money(105 * 10 ** (places - 1), currency)
        if not await _whole_only(ctx, example):
            return Invalid("pay.amount_invalid_decimal", currency=currency,
                           example=example.number(ctx.state.lang))
    return Invalid("pay.amount_invalid", currency=currency, example="5000")


async def _whole_only(ctx: Ctx, amount: Money) -> bool:
    """Every method of the caller's number refuses `amount` by its provider's amount rule."""
    coop = await cooperative(ctx, ctx.data["c"])
    usable = _number_methods(ctx, coop.country if coop else "", amount.currency)
    return bool(usable) and all(_refuses_amount(ctx, m, amount) for m in usable)


def _number_methods(ctx: Ctx, country: str, currency: str | None) -> list[str]:
    """methods_for the caller's number, less those whose provider collects no `currency` whatever the amount (an
    MTN or Airtel Money account of another country): counted, they let her type an amount no method could take,
    then blamed her number or asked for cents they never collect."""
    phone = ctx.hop.phone
    usable = methods_for(country, payer_operator(ctx)[0], ctx.rt.routes, number_country=phone.region)
    if currency is None:
        return usable
    probe = Money(0, currency)
    return [m for m in usable if (refusal_for(ctx.rt.routes, ctx.rt.providers, m, probe) or ("amount",))[0] == "amount"]


async def amount_entered(ctx: Ctx, minor: str) -> str:
    ctx.data["amt"] = int(minor)
    return await _method_step(ctx)


def payer_operator(ctx: Ctx) -> tuple[str | None, str]:
    """The operator the caller's number is on, and what said so: "network" when the aggregator's network for this
    hop (UssdTurn.network) names one we know for her number's country (mobile number portability: a number ported
    from Telecel to MTN keeps its Telecel range), else "range" (core.phone.operator_of, as for an API payment).

    A forged or odd network value can at worst offer a method whose provider then refuses the number: the account
    collected from is always the session's own number (confirmed)."""
    phone = ctx.hop.phone
    operator = operator_on_network(ctx.hop.network, phone.e164)
    if operator is not None:
        return operator, "network"
    return phone.operator, "range"


def methods_for(country: str, operator: str | None, routed: Any, *, number_country: str | None = None,
                amount: Money | None = None, providers: Any = None) -> list[str]:
    """Methods this payer can use: the one of the number's operator, among those a provider serves.

    None when the number is another country's than the cooperative's (`number_country`: the providers'
    accounts are the cooperative country's) or belongs to an operator no method collects from (Telecel or AT
    in Ghana, Telkom in Kenya). With `amount` and `providers` (name -> adapter; `routed` then maps method ->
    provider name), only methods whose provider can collect that amount (its currency, its amount rule)."""
    if number_country is not None and number_country != country:
        return []
    by_operator = wallets_by_operator(country)
    if operator in by_operator:
        # The wallet must belong to the number's operator, so there is nothing to choose.
        candidates = [by_operator[operator]]
    elif operator is None:
        # A range nobody names: offer both; the provider refuses a number not on its network.
        candidates = list(by_operator.values())
    else:
        candidates = []
    return [m for m in candidates if m in routed and _can_collect(m, routed, amount, providers)]


def _can_collect(method: str, routed: Any, amount: Money | None, providers: Any) -> bool:
    if amount is None or providers is None:
        return True
    return refusal_for(routed, providers, method, amount) is None


async def _method_step(ctx: Ctx) -> str:
    coop = await cooperative(ctx, ctx.data["c"])
    phone = ctx.hop.phone
    amount = Money(ctx.data["amt"], ctx.data["cur"]) if ctx.data.get("cur") else None
    operator, source = payer_operator(ctx)
    options = methods_for(coop.country if coop else "", operator, ctx.rt.routes,
                          number_country=phone.region, amount=amount, providers=ctx.rt.providers)
    if source == "network" and operator != phone.operator:
        # A ported number (or a network value that says so): support reads here why she was offered what her
        # number's range would not give her (the session row keeps the network_code the aggregator sent).
        log.info("ussd pay methods by the network the aggregator reports, not the number's range",
                 extra={"session_id": ctx.hop.session_id, "network": ctx.hop.network, "operator": operator,
                        "range_operator": phone.operator, "offered": ",".join(options)})
    if not options:
        return _no_method(ctx, coop.country if coop else "", amount)
    if amount is not None and amount > ussd_cap(amount.currency):
        # A fixed price (or a period's balance) above what a USSD payment may be, which a typed amount is refused
        # past: offered and confirmed, it went to the provider, whose wallet limit failed it after her PIN.
        ctx.data["amtf"], ctx.data["xm"] = ctx.money(amount), options
        return "pay_amount_no_method"
    if len(options) == 1:
        ctx.data["mt"] = options[0]
        return "pay_confirm"
    ctx.data["mts"] = options
    return "pay_method"


def _no_method(ctx: Ctx, country: str, amount: Money | None) -> str:
    """The end screen when no method is left: "not this amount" when the number's methods refuse only the
    amount by their provider's rule (M-Pesa: whole shillings, and a type priced 1,500.50 KES), since blaming
    the number sends the member to the wrong place; else no method for the number."""
    usable = _number_methods(ctx, country, amount.currency if amount else None)
    if amount is None or not usable or not all(_refuses_amount(ctx, m, amount) for m in usable):
        return "pay_no_method"
    ctx.data["amtf"], ctx.data["xm"] = ctx.money(amount), usable
    return "pay_amount_no_method"


def _refuses_amount(ctx: Ctx, method: str, amount: Money) -> bool:
    """The method's provider refuses `amount` by its amount rule (not for its currency: the deployment's)."""
    refusal = refusal_for(ctx.rt.routes, ctx.rt.providers, method, amount)
    return refusal is not None and refusal[0] == "amount"


async def amount_no_method_args(ctx: Ctx) -> dict[str, Any]:
    methods = " / ".join(ctx.t(f"method.{m}") for m in ctx.data.get("xm", []))
    return {"amount": ctx.data.get("amtf", ""), "method": methods, "coop": ctx.data.get("cn", "CoopPay")}


async def method_items(ctx: Ctx) -> list[Item]:
    return [Item(m, ctx.t(f"method.{m}")) for m in ctx.data.get("mts", [])]


async def method_chosen(ctx: Ctx, method: str) -> str:
    ctx.data["mt"] = method
    return "pay_confirm"


async def reserved_reference(ctx: Ctx) -> str:
    """The payment's reference, reserved the first time the confirmation is shown.

    Kept in the session, so a redisplayed confirmation (Back and forth, an error, a resumed session)
    shows the same one and the payment is created with exactly it. A session that never confirms
    leaves a gap in the numbering, as a rolled-back payment already does: references are unique,
    not gapless.
    """
    ref = ctx.data.get("rr")
    if not ref:
        from core.cooperatives import zone_of
        from core.references import next_reference, numbered_reference

        # Dated by the cooperative's day, as the receipt and "My payments" date the payment (its row is cached
        # by the memberships' read of this process; else read once).
        coop = await cooperative(ctx, ctx.data["c"])
        zone = zone_of(coop.timezone if coop else None)
        number = ctx.data.pop("nr", None)  # taken by the balance's query (_owed), dated now
        if number is not None:
            ref = numbered_reference("PAY", zone, number)
        else:
            # nextval() needs no transaction around it: BEGIN and COMMIT were two of its four round trips.
            async with cache.autocommit(ctx.rt) as conn:
                ref = await next_reference(conn, "PAY", zone)
        ctx.data["rr"] = ref
    return ref


async def confirm_args(ctx: Ctx) -> dict[str, Any]:
    pt = await payment_type(ctx)
    currency = ctx.data.get("cur", "RWF")
    amount = ctx.money(Money(ctx.data["amt"], currency))
    if ctx.data.get("full"):  # the balance of the period (type_chosen): said so, beside the price where it fits
        price = ctx.money(Money(ctx.data["full"], currency))
        amount = (ctx.t("pay.balance", balance=amount, amount=price) if ctx.limit >= BALANCE_WITH_PRICE
                  else ctx.t("pay.balance.short", balance=amount))
    return {"type": await _type_name(ctx, pt), "amount": amount,
            "fee": ctx.money(Money(0, currency)), "method": ctx.t(f"method.{ctx.data['mt']}"),
            "ref": await reserved_reference(ctx)}


async def _type_name(ctx: Ctx, pt: TypeRow | None) -> str:
    """The type's name whole, shortened where the screen needs it as the list of the cooperative's types shortens
    it (shorts): what tells it apart from the others it was chosen among stays ("Monthly contr..Block C")."""
    if pt is None:
        return ""
    types = await payment_types(ctx)  # cached: the confirmation read them for `pt`
    at = next((n for n, p in enumerate(types) if p.id == pt.id), None)
    if at is None:
        return whole(pt.name)
    names = [p.name for p in types]
    return Name(whole(pt.name), lambda size: shorts(names, max(size, MIN_NAME))[at])


async def confirmed(ctx: Ctx, _key: str) -> str:
    from core.payments import NewPayment, get_by_reference

    turn = ctx.hop
    reference = ctx.data.get("rr") or None
    new = NewPayment(
        cooperative_id=ctx.data["c"], payment_type_id=ctx.data["pt"], method=ctx.data["mt"],
        account=turn.phone.e164, idempotency_key=f"ussd:{turn.aggregator}:{turn.session_id}"[:128],
        channel="ussd", amount=Money(ctx.data["amt"], ctx.data["cur"]), member_id=ctx.data["mb"],
        reference=reference, balance_minor=ctx.data["amt"] if ctx.data.get("full") else None,
        # The operator the network reports her number on, for create_payment's account check (payer_operator):
        # the account is this session's own number, so the network can name only the operator she pays from.
        account_operator=operator_on_network(turn.network, turn.phone.e164),
    )
    side_effect_started()
    try:
        payment = await _pay(ctx, new)
    except OpenPayment as found:
        return await _waiting(ctx, found.reference)
    except SessionsPayment as found:
        return _earlier_payment(ctx, found.payment)
    except NotActive:
        return "member_inactive"
    except TypeChanged as changed:
        ctx.data["tn"] = whole(changed.name) if changed.name else ""
        return "pay_type_gone" if changed.gone else "pay_type_changed"
    except IntegrityError:
        # The reserved reference is taken: a resumed session carried it from a session whose
        # confirmation was committed but whose answer was lost. That payment is this one: shown as
        # what became of it rather than charging the member twice.
        if reference is None:
            raise
        async with ctx.rt.sessionmaker() as session:
            earlier = await get_by_reference(session, reference)
        if earlier is None or earlier.member_id != ctx.data["mb"]:
            raise
        return _earlier_payment(ctx, earlier)
    return _shown_payment(ctx, payment, "pay_done")


async def _pay(ctx: Ctx, new: NewPayment) -> Payment:
    """The session's payment, keyed by the session id: a confirmation posted twice at once, or again after a
    timeout, or replayed whole after Redis lost the session (Africa's Talking's text, with a reference reserved
    anew) finds the payment the first one made instead of charging again.

    An aggregator uses a session id again on another day (Hubtel, Nalo): the payment under the key is then a
    previous session's (made before this session could have opened: records.previous_before), the same member's
    last month or another member's. Answered with it, this confirmation made no payment and no PIN prompt
    ("approve the prompt" with last month's reference, or "could not complete"). This session's payment is
    then keyed by the id and the session's opening time (_this_sessions_key): every copy of this confirmation
    still finds the one payment. Only a key found taken costs more: the common confirmation is one create.
    """
    try:
        payment, created = await _create(ctx, new)
    except Conflict as exc:
        # Another request under the key. A previous session's payment is no answer: this session's is keyed anew
        # below. This session's own, of the type and still open, is (SessionsPayment); else refused as before.
        if exc.field != "idempotencyKey":
            raise
        found = await _keys_payment(ctx, new)
        if found is None:
            raise
        if found.created_at >= records.previous_before():
            if (found.member_id == new.member_id and found.payment_type_id == new.payment_type_id
                    and PaymentStatus(found.status) in OPEN):
                raise SessionsPayment(found) from None
            raise
    else:
        if created or payment.created_at >= records.previous_before():
            return payment
    from core.payments import KEY_SIZE

    key = await _this_sessions_key(ctx, new.idempotency_key, KEY_SIZE)
    payment, _created = await _create(ctx, replace(new, idempotency_key=key))
    return payment


class NotActive(Exception):
    """The member or her cooperative was suspended since the session chose them (memberships()): create_payment
    refuses her. Told as such, not as "try again later" (the generic error), which cannot help."""


class SessionsPayment(Exception):
    """This session's payment, still open, found under its key by a confirmation of the same type for another
    amount: the session was lost from Redis after its confirmation was committed and walked to Confirm again, the
    type repriced meanwhile (the new price shown, a new reference reserved). That payment, whose prompt is on her
    phone, is the answer (_earlier_payment): never "could not complete, try again later", after which a new session
    paid the new price beside it (another amount is not an open payment like it: core.payments.OpenLike)."""

    def __init__(self, payment: Payment) -> None:
        super().__init__(payment.reference)
        self.payment = payment


class OpenPayment(Exception):
    """The payer already has an open payment like the one confirmed (core.payments.OpenLike): none is made."""

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


async def _create(ctx: Ctx, new: NewPayment) -> tuple[Payment, bool]:
    from core.payments import create_payment, like_open, load_context, take_turns_paying

    async with ctx.rt.sessionmaker.begin() as session:
        if new.member_id is not None:
            # Before her open payment is looked for: a confirmation of hers at the same moment (another session,
            # another serve process) is waited for, and its payment found below.
            await take_turns_paying(session, new.cooperative_id, new.member_id, new.payment_type_id)
        # The member as create_payment reads her, with the cooperative's active member of this number and her
        # open payment like this one (unless this key has made its payment already) in the same query: the
        # checks below cost no extra round trip. For the balance of the period, one of the type of any amount that
        # pays the period (the whole price still open beside the underpaid payment: both would be taken).
        period = await _period_now(ctx) if new.balance_minor is not None else None
        like = (like_open(ctx.rt.settings, new.amount, new.idempotency_key, period=period)
                if new.amount is not None else None)
        context = await load_context(session, new.cooperative_id, new.payment_type_id, new.member_id,
                                     payer_index=ctx.rt.cipher.blind_index(ctx.hop.phone.e164), open_like=like)
        _check_number_still_hers(context, new.member_id)
        if context.open_reference is not None:
            # Suspended (or her cooperative) since the session chose her: the open payment's collect job sends
            # her no prompt (core.jobs), so she is not told to approve one, but that she is not active.
            if _not_active(context):
                raise NotActive()
            raise OpenPayment(context.open_reference)
        try:
            return await create_payment(session, ctx.rt, new, actor=actor(ctx), context=context)
        except (BusinessRuleError, NotFound, ValidationError) as refused:
            # Refused after its key's payment was looked for (a copy of a confirmation that paid still finds it).
            if _not_active(context):
                raise NotActive() from None
            changed = _type_changed(context, new, refused)
            if changed is not None:
                raise changed from None
            raise


class TypeChanged(Exception):
    """The payment type confirmed changed since the session showed it: closed (`gone`), repriced, or what she owes
    of its period is no longer the balance offered (paid meanwhile from elsewhere, a refund). create_payment
    refuses the amount shown; she is told so and that nothing was charged, not "try again later" (the generic
    error), which cannot help: the same confirmation is refused again."""

    def __init__(self, name: str | None, *, gone: bool) -> None:
        super().__init__(name)
        self.name, self.gone = name, gone


def _type_changed(context: PaymentContext, new: NewPayment, refused: DomainError) -> TypeChanged | None:
    """Whether create_payment `refused` `new` because its type changed since the session read it (TypeChanged)."""
    pt = context.ptype
    if pt is None or not pt.is_active:
        return TypeChanged(pt.name if pt else None, gone=True)
    if new.balance_minor is not None:  # the balance, not the price: refused for its amount only when it changed
        return TypeChanged(pt.name, gone=False) if refused.field == "amount" else None
    if new.amount is not None and not pt.allow_custom_amount and new.amount != Money(pt.amount_minor, pt.currency):
        return TypeChanged(pt.name, gone=False)
    return None


async def _period_now(ctx: Ctx) -> tuple[date, Any] | None:
    """The period of the session's type a payment made now pays (core.reminders.current_period, in the
    cooperative's zone), as create_payment's balance check reads it; None for a type that has none."""
    from core.cooperatives import zone_of
    from core.reminders import current_period

    pt = await payment_type(ctx)
    coop = await cooperative(ctx, ctx.data["c"])
    return None if pt is None else current_period(pt, utcnow(), zone_of(coop.timezone if coop else None))


def _not_active(context: PaymentContext) -> bool:
    """Whether the member or her cooperative is no longer ACTIVE (NotActive)."""
    return (context.coop is not None and context.coop.status != "ACTIVE") or (
        context.member_found and context.member_status != "ACTIVE")


async def _waiting(ctx: Ctx, reference: str) -> str:
    """The end screen of a confirmation refused because the payer has an open payment of the same type and amount
    (OpenPayment), or of the type whatever its amount when she confirmed the period's balance: its prompt may be on
    her phone, or the provider may be down with its collect job retrying (no prompt yet); a second payment would be
    collected too once the provider answers. She is told which payment waits, not to pay again, and that an SMS
    comes if it cannot be completed (every payment that fails, is cancelled or times out sends one:
    core.provider_events._FAILED_TARGET; one that completes sends the receipt).

    The open payment is the one this route reserved ("rr": a resumed confirmation whose payment was made by the
    session it resumes): shown as before (_earlier_payment), as the one she made. Refused a balance, she is told the
    waiting payment's own amount (the whole price, not the balance), read by its reference."""
    amount = Money(ctx.data["amt"], ctx.data["cur"])
    if reference == ctx.data.get("rr") or ctx.data.get("full"):
        from core.payments import get_by_reference

        async with ctx.rt.sessionmaker() as session:
            earlier = await get_by_reference(session, reference)
        if earlier is not None and reference == ctx.data.get("rr"):
            return _earlier_payment(ctx, earlier)
        if earlier is not None:
            amount = Money(earlier.amount_minor, earlier.currency)
    pt = await payment_type(ctx)
    ctx.data.update(ref=reference, amtf=ctx.money(amount), tn=whole(pt.name) if pt else "")
    return "pay_waiting"


async def waiting_args(ctx: Ctx) -> dict[str, Any]:
    data = ctx.data
    return {"ref": data.get("ref", ""), "amount": data.get("amtf", ""), "type": data.get("tn", "")}


async def _keys_payment(ctx: Ctx, new: NewPayment) -> Payment | None:
    """The payment a refused key names (None while the request that holds it is in flight)."""
    from core.payments import find_by_key

    async with ctx.rt.sessionmaker() as session:
        return await find_by_key(session, new.cooperative_id, new.idempotency_key)


async def _this_sessions_key(ctx: Ctx, key: str, size: int) -> str:
    """`key` (one of the session id's) told apart from its previous sessions': with when this session opened, as
    its row keeps it (the same for every hop and copy of a hop, whatever became of its Redis state); without a
    row of its own (never expected: every first hop writes it), the confirmation's reserved reference."""
    tag = await _session_tag(ctx) or ctx.data.get("rr")
    if not tag:
        raise DomainError("no way to tell this session's payment from a previous session's of its id")
    return _tagged(key, size, tag)


async def _session_tag(ctx: Ctx) -> str | None:
    """When this session opened, in milliseconds, as its row keeps it (records.opened_at: one indexed read): the
    same for every hop of the session and every copy of a hop, whatever became of its Redis state. None without a
    row of its own (never expected: every first hop writes it)."""
    turn = ctx.hop
    started = await records.opened_at(ctx.rt, aggregator=turn.aggregator, session_id=turn.session_id)
    return None if started is None else str(round(started.timestamp() * 1000))


def _tagged(key: str, size: int, tag: str) -> str:
    """`key` cut to `size` with `@tag` kept whole at its end (a long session id must not cut the tag off)."""
    return f"{key[:size - len(tag) - 1]}@{tag}"


def _check_number_still_hers(context: PaymentContext, member_id: str | None) -> None:
    """Refuse a payment by a member whose number is no longer the dialling phone's.

    The session chose her from its first hop's memberships and keeps them (memberships()): a number corrected,
    released or erased since (the admin API) leaves the session of the old number going on as her, and its
    payment would be hers, paid from a number that is not. An ACTIVE member who is not the cooperative's
    active member of this number does not hold it any more (a number is one member's per cooperative). Not
    ACTIVE: create_payment refuses her anyway, with its own reason.
    """
    if context.member_status == "ACTIVE" and context.payer_id != member_id:
        raise NotHers()


def _earlier_payment(ctx: Ctx, payment: Payment) -> str:
    """The end screen for a payment an earlier session of this member already made with the reserved reference.

    Still open: its prompt is on her phone ("approve the prompt"). Money taken: already paid. Failed,
    cancelled or timed out: not completed, dial again (never "approve the prompt": no prompt will come,
    and she would believe she had paid).
    """
    if PaymentStatus(payment.status) in OPEN:
        return _shown_payment(ctx, payment, "pay_done")
    if holds_money(payment):
        return _shown_payment(ctx, payment, "pay_already")
    return _shown_payment(ctx, payment, "pay_not_completed")


def _shown_payment(ctx: Ctx, payment: Payment, screen: str) -> str:
    # Already paid: what was taken (a provider may take less or more than asked); otherwise the amount asked.
    asked = Money(payment.amount_minor, payment.currency)
    amount = _amount(ctx, payment) if screen == "pay_already" else ctx.money(asked)
    ctx.data.update(ref=payment.reference, pid=payment.id, amtf=amount)
    return screen


async def done_args(ctx: Ctx) -> dict[str, Any]:
    data = ctx.data
    return {"amount": data.get("amtf", ""), "ref": data.get("ref", ""), "coop": data.get("cn", "")}


# -- my payments and disputes ---------------------------------------------------------------------

async def payment_items(ctx: Ctx) -> list[Item]:
    recent = await recent_payments(ctx)
    # Cut to 22 whatever the room: five lines of amount, name, status and reference fill a screen as they are.
    labels = shorts([name for _, name in recent])
    # What a page leaves its lines: the screen less its title and footer (_payment_line).
    page = ctx.limit - gsm.length("\n".join(ctx.t(m) for m in ("my.title", "nav.more", "nav.back", "nav.home")))
    return [Item(p.id, _payment_line(ctx, n, p, label, page)) for n, ((p, _), label) in enumerate(zip(
        recent, labels, strict=True), start=1)]


def _payment_line(ctx: Ctx, number: int, payment: Payment, type_name: str, page: int) -> str:
    """One line of the list, within the engine's LINE with its number: a line too long shortens the payment type's
    name, then the status, never the reference (what she quotes to complain or to ask for a receipt by SMS; cut at
    the end, "Imeshindwa, pesa imekatwa PAY_20261202_1.." lost it)."""
    shown, room = _shown(payment), LINE - len(f"{number}. ")
    args = {"amount": _amount(ctx, payment), "type": type_name, "status": ctx.t(f"status.{shown}"),
            "ref": payment.reference}
    # A status too long to stand beside the whole type takes the list's own short form (status.<S>.short, where the
    # language has a shorter one) before the type is shortened: Swahili "Haikuthibitishwa kwa wakati" beside
    # "KES 12,345.00" cut "Monthly Rent" to "Monthly..". The detail, with a line of its own, keeps the whole one.
    # The whole one (the SMS's words: "Not paid: recorded in error") also only where the line leaves the page its
    # title and footer: on Nalo's 120 characters a 72-character line cut the title ("Ubwishyu bwa..").
    beside = min(room, page - len(f"{number}. ") - 1) - (
        gsm.length(ctx.t("my.line", **args)) - gsm.length(args["status"]))
    args["status"] = ctx.t_fit(f"status.{shown}", beside)
    return fit_names(ctx, "my.line", room, args, then=("status",)) or ctx.t("my.line", **args)


async def payment_chosen(ctx: Ctx, payment_id: str) -> str:
    ctx.data["py"] = payment_id
    found = await chosen_payment(ctx)
    if found is None:
        raise Invalid("error.invalid_choice")
    if ctx.data.get("nx") != "my":
        return await _dispute_reason_or_open(ctx, payment_id)
    # The SMS offered is the one send_receipt sends: a receipt once money was collected, else the payment's status
    # ("Send receipt by SMS" of a failed payment sent "... failed").
    return "my_detail" if found[0].status in COLLECTED else "my_detail_status"


async def _dispute_reason_or_open(ctx: Ctx, payment_id: str) -> str:
    """The reasons to choose from, or, when the payment picked already has an open dispute, that one's reference at
    once: she was told it only after choosing a reason, for nothing. open_dispute still refuses a second one (a
    dispute opened meanwhile: another session, the office's desk)."""
    from core.disputes import open_dispute_of

    async with ctx.rt.sessionmaker() as session:
        already = await open_dispute_of(session, payment_id)
        if already is None:
            return "dsp_reason"
        ctx.data["ref"] = already.reference
    return "dsp_exists"


async def detail_args(ctx: Ctx) -> dict[str, Any]:
    found = await chosen_payment(ctx)
    if found is None:
        raise DomainError("payment no longer listed")
    payment, name = found
    from core.cooperatives import zone_of

    coop = await cooperative(ctx, payment.cooperative_id)  # cached: the day as the member lives it (as the receipt)
    created = payment.created_at.astimezone(zone_of(coop.timezone if coop else None))
    status = f"status.{_shown(payment)}"
    # `brief`, the status's short form where it has one (as the list's), is what the detail's short forms show: the
    # whole one, the SMS's words ("Not paid: recorded in error"), takes a line of its own on Nalo's 120 characters.
    brief = status + ".short" if has(ctx.state.lang, status + ".short") else status
    return {"ref": payment.reference, "type": whole(name),
            "amount": _amount(ctx, payment),
            "status": ctx.t(status), "brief": ctx.t(brief), "date": created.strftime("%d/%m/%Y")}


def _amount(ctx: Ctx, payment: Payment) -> str:
    """What was taken once money is (a provider may take less or more than asked: the receipt says both),
    else the amount asked (also for a voided recording: it took nothing, and "0 RWF" reads as a payment of 0; and
    for money taken that counts as nothing, in another currency or of no amount: her wallet was charged, a person
    looks, and her receipt says it is under review)."""
    from core.payments import collected_amount

    taken = None if payment.status == PaymentStatus.VOIDED.value else collected_amount(payment)
    return ctx.money(taken if taken is not None and taken.minor else Money(payment.amount_minor, payment.currency))


def _shown(payment: Any) -> str:
    return shown_status(payment.status, payment.failure_reason, payment.completed_at)


async def send_receipt(ctx: Ctx, _key: str) -> str:
    from channels.sms.templates import asked_receipt
    from core.notify import send_sms

    side_effect_started()
    dedupe = await _receipt_key(ctx, str(ctx.data.get("py")))  # before the transaction: a read of its own
    async with ctx.rt.sessionmaker.begin() as session:
        # Read in this transaction, among the member's own payments while the number is still hers (_her_payments).
        payment = next((p for p in await _her_payments(ctx, session) if p.id == ctx.data.get("py")), None)
        if payment is None:
            raise Invalid("error.invalid_choice")
        template = asked_receipt(payment.status, payment.refunded_minor)  # with what was refunded since
        await send_sms(session, template=template, cooperative_id=payment.cooperative_id,
                       context={"payment_id": payment.id}, cipher=ctx.rt.cipher, member_id=ctx.data["mb"],
                       dedupe=dedupe)
    ctx.data["ref"] = payment.reference
    # What is on its way, as read in this transaction (a payment completed since the detail was shown: its receipt).
    return "my_status_sent" if template == "payment_status" else "my_receipt_sent"


async def _receipt_key(ctx: Ctx, payment_id: str) -> str:
    """The key of this session's receipt of the payment: the same for a retried hop, two copies of it at once and
    a hop after Redis lost the session (one SMS), and never a previous session's of the id (Hubtel and Nalo use
    an id again on another day): with when this session opened, as its row keeps it (records.opened_at: one
    indexed read, on this screen only). Not by whether the previous session's outbox job is still there: `prune`
    deletes it after RETENTION_OUTBOX_DONE_DAYS, and the SMS queued again under its key found that receipt's
    sms_messages row (kept for good) SENT and sent nothing. Without a row of its own (never expected: every
    first hop writes it), the session id alone."""
    key = f"ussd-receipt:{payment_id}:{ctx.hop.session_id}"
    tag = await _session_tag(ctx)
    return key[:SMS_KEY_SIZE] if tag is None else _tagged(key, SMS_KEY_SIZE, tag)


def _reason_handler(reason: str) -> Any:
    async def chosen(ctx: Ctx, _key: str) -> str:
        return await open_dispute(ctx, reason)

    chosen.__name__ = f"reason_{reason.lower()}"
    return chosen


REASON_HANDLERS = {reason: _reason_handler(reason) for reason in REASONS}


async def open_dispute(ctx: Ctx, reason: str) -> str:
    from core.disputes import open_dispute as open_

    try:
        side_effect_started()
        async with ctx.rt.sessionmaker.begin() as session:
            # Loaded again in this transaction, only among the member's own payments, and only while the number
            # is still hers (_her_payments).
            payment = next((p for p in await _her_payments(ctx, session) if p.id == ctx.data.get("py")), None)
            if payment is None:
                raise Invalid("error.invalid_choice")
            dispute = await open_(session, payment=payment, reason=reason, channel="ussd", actor=actor(ctx),
                                  cipher=ctx.rt.cipher, answer_days=ctx.rt.settings.sms_payer_answer_days)
    except Conflict as exc:
        found = _DSP_REF.search(exc.message)
        ctx.data["ref"] = found.group(0) if found else ""
        return "dsp_exists"
    ctx.data["ref"] = dispute.reference
    return "dsp_done"


# -- language, help, resume -----------------------------------------------------------------------

def _language_handler(lang: str) -> Any:
    async def chosen(ctx: Ctx, _key: str) -> str:
        return await set_language(ctx, lang)

    chosen.__name__ = f"language_{lang}"
    return chosen


LANGUAGE_HANDLERS = {lang: _language_handler(lang) for lang in LANGUAGES}


async def set_language(ctx: Ctx, lang: str) -> str:
    from core.members import set_language as remember

    ctx.state.lang = lang
    # Written from fresh rows, not the copy the session keeps (another channel may have changed them).
    ctx.data.pop("m", None)
    ctx.cache.pop("ms", None)
    ms = await memberships(ctx)
    # The language is the person's: every membership of the phone takes it, not only those of the
    # cooperative a dialled extension picked (dialling the main code later would greet them in the old one),
    # suspended ones too (one reactivated later would otherwise be the most recently written row, and speak
    # a language nobody chose since; a number given to someone else is released first, and then matches none).
    async with ctx.rt.sessionmaker.begin() as session:
        rows = (await session.execute(select(Member.id, Member.language).where(
            Member.phone_index == ctx.rt.cipher.blind_index(ctx.hop.phone.e164)))).all()
        for member_id, old in rows:
            if old != lang:
                await remember(session, member_id, lang, actor=actor(ctx))
    if ms:
        ctx.data["m"] = [[m_id, status, lang, coop_id] for m_id, status, _old, coop_id in ctx.data["m"]]
    # Kept in Redis too, so the next session (on any server) speaks it when no membership does: a phone of no
    # cooperative, or one whose memberships are all suspended since (not an older choice kept there).
    await sessions.remember_language(ctx.rt.redis, ctx.rt.cipher, ctx.hop.phone, lang)
    ctx.state.stack.clear()
    return "home"


async def help_args(ctx: Ctx) -> dict[str, Any]:
    _member, coop = await current(ctx)
    if coop is None and ctx.data.get("x"):  # no member: the dialled extension's cooperative (enter)
        coop = await cooperative(ctx, ctx.data["x"])
    return {"coop": whole(coop.name) if coop else "", "phone": (coop.contact_phone if coop else "") or ""}


async def resume_continue(ctx: Ctx, _key: str) -> str:
    saved = await sessions.load_resume(ctx.rt.redis, ctx.rt.cipher, ctx.hop.phone)
    if saved is None or not await _members_still_hold(ctx, saved.data):
        # Nothing to continue, or a route of members this number is no longer (corrected, released or erased
        # since): the menu, as Start again, and the route goes with this hop's save (service._answer).
        ctx.state.stack.clear()
        return "home"
    # This session's own funnel progress stays: the ops funnel counts each session once per step. So does its
    # language: the person's now (her memberships', or the phone's choice), which a language chosen since the
    # saved session was left has changed; the saved one would undo that choice.
    mine = {key: ctx.state.data[key] for key in funnel.OWN_KEYS if key in ctx.state.data}
    ctx.state.stack, ctx.state.data = saved.stack, {**saved.data, **mine}
    ctx.state.data["rs"] = 1  # counted as a resumed session
    screen = await _resumed_reservation(ctx, saved.screen)
    if screen == "dsp_reason" and ctx.data.get("py"):
        # Left at the reasons: a complaint opened about that payment since (the office's desk, another session) is
        # said at once, as picking the payment says it, not after she chose a reason for nothing.
        return await _dispute_reason_or_open(ctx, str(ctx.data["py"]))
    if screen == "reg_name" and ctx.data.get("rc"):
        # Left at the name prompt by a release from before the country check (_registration), or of a cooperative
        # suspended or closed to registration by phone since: told at once what the code typed now would tell her,
        # not after typing her name for nothing (name_entered checks again). Read from the database: the cache's
        # copy (5 s) of a cooperative suspended a second ago still said ACTIVE, and showed her the prompt again.
        coop = await cooperative_now(ctx, str(ctx.data["rc"]))
        if coop is not None:
            return _joining(ctx, coop)
    return screen


_HELD = select(Member.id).where(Member.id.in_(bindparam("ids", expanding=True)),
                                Member.phone_index == bindparam("phone_index"))


async def _members_still_hold(ctx: Ctx, data: dict[str, Any]) -> bool:
    """Whether every member a saved route names (its memberships, the one chosen) still has this phone's number.

    A route carries the memberships its session read on its first hop, and a resumed session goes on from
    them without reading them again (memberships()). A session of a number taken from its member meanwhile
    (PATCH phone, release-phone, erase: they forget the route, but a session of the old number still open
    then saves it again on its next hop) would resume as her: her payments, her disputes, a payment in her
    name. One query, on the Continue hop only.
    """
    saved = data.get("m")
    ids = {row[0] for row in saved if isinstance(row, list) and row and isinstance(row[0], str)} \
        if isinstance(saved, list) else set()
    if isinstance(data.get("mb"), str):
        ids.add(data["mb"])
    if not ids:
        return True  # no member named (a phone of no cooperative): nothing of anyone's to resume
    async with cache.autocommit(ctx.rt) as conn:
        held = set((await conn.execute(_HELD, {"ids": sorted(ids), "phone_index": ctx.rt.cipher.blind_index(
            ctx.hop.phone.e164)})).scalars())
    return held == ids


async def _resumed_reservation(ctx: Ctx, screen: str) -> str:
    """The screen a resumed session goes on to, once its reserved reference is checked against the payments.

    A route keeps its reservation ("rr") even after its confirmation was committed, when the session's END
    was never saved (Redis failed or lost the write): that payment may have moved on since. Still open, the
    reservation stays, so confirming again shows that payment and never pays twice. Money taken: she has
    paid, she is told so rather than offered to pay it again. Failed, cancelled or timed out (she declined
    or missed the PIN prompt and came back to pay): the reservation is dropped, so the confirmation shows a
    new reference and Confirm makes a new payment (with the old one it found that closed payment and told
    her to approve a prompt that never came).
    """
    reference = ctx.data.get("rr")
    if not reference:
        return screen
    from core.payments import get_by_reference

    async with ctx.rt.sessionmaker() as session:
        earlier = await get_by_reference(session, reference)
    if earlier is None:
        return screen  # never confirmed: the reservation stands
    if earlier.member_id == ctx.data.get("mb"):
        if PaymentStatus(earlier.status) in OPEN:
            return screen
        if holds_money(earlier):
            return _earlier_payment(ctx, earlier)
    # Closed without money taken (or, never expected, someone else's): Confirm reserves another.
    del ctx.data["rr"]
    return screen


async def resume_restart(ctx: Ctx, _key: str) -> str:
    # The saved route is dropped with this hop's save, as when 0 or 00 leaves the offer (service._answer).
    ctx.state.stack.clear()
    return "home"


