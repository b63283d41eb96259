"""A small engine that navigates screens declared as data: menus, inputs, confirmations, ends."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from channels.ussd.i18n import KEEP, SHORT, VARIANTS, has, translate, translate_fit
from channels.ussd.types import UssdReply, UssdTurn
from core import gsm
from core.errors import DomainError
from core.money import Money
from core.text import is_number, keypad

log = logging.getLogger("gateway.ussd")

MORE, BACK, HOME = "98", "0", "00"
MAX_ITEMS = 90  # numbers stay clear of the navigation keys (98, 0, 00)
PAGE = "@"  # a back-stack entry "my_list@1": the screen and the page it was left on


class Invalid(Exception):
    """Raised by a validator: the input screen is shown again with this message on top."""

    def __init__(self, msgid: str | None = None, **args: Any) -> None:
        super().__init__(msgid or "invalid")
        self.msgid = msgid
        self.args_ = args


class Ended(Exception):
    """Raised by a flow: the session ends on this End screen, a refusal the flow can name truthfully (rather than
    the generic "try again later" a DomainError ends on)."""

    def __init__(self, screen: str, message: str = "") -> None:
        super().__init__(message or screen)
        self.screen = screen


@dataclass
class State:
    """Everything a session remembers between hops; serialised compactly by the session store."""

    screen: str
    stack: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    page: int = 0
    ids: list[str] = field(default_factory=list)  # entry keys shown on the current page
    first: int = 1  # number of the first entry on the current page
    lang: str = "en"
    ended: bool = False


@dataclass
class Ctx:
    """What a screen's functions see: the runtime, this hop and the session state."""

    rt: Any  # core.runtime.Runtime (Any keeps the engine testable without one)
    turn: UssdTurn | None
    state: State
    limit: int
    cache: dict[str, Any] = field(default_factory=dict)  # per-hop memo for loaders

    @property
    def data(self) -> dict[str, Any]:
        return self.state.data

    @property
    def hop(self) -> UssdTurn:
        """The turn being answered; flows always have one (only engine unit tests run without)."""
        if self.turn is None:
            raise RuntimeError("this screen needs the USSD turn")
        return self.turn

    def t(self, msgid: str, **args: Any) -> str:
        return translate(self.state.lang, msgid, **args)

    def money(self, amount: Money) -> str:
        """An amount as the session's language writes numbers ('50,000 RWF'; French '50 000 RWF')."""
        return amount.format(self.state.lang)

    def t_fit(self, msgid: str, room: int, *, variants: tuple[str, ...] = VARIANTS, **args: Any) -> str:
        return translate_fit(self.state.lang, msgid, room, variants=variants, **args)


@dataclass(frozen=True)
class Item:
    """One dynamic list entry: `key` is kept in the session, `label` is shown."""

    key: str
    label: str


Args = Callable[[Ctx], Awaitable[dict[str, Any]]]
Loader = Callable[[Ctx], Awaitable[list[Item]]]
# A handler returns the id of the next screen (an End screen closes the session).
Handler = Callable[[Ctx, str], Awaitable[str]]
Validator = Callable[[Ctx, str], Awaitable[str]]


@dataclass(frozen=True)
class Option:
    label: str  # msgid
    action: str | Handler  # a screen id, or a handler deciding the next screen


@dataclass(frozen=True)
class Menu:
    """A numbered list: static options after dynamic items; paged to fit the screen limit."""

    id: str
    title: str  # msgid
    options: tuple[Option, ...] = ()
    items: Loader | None = None
    on_item: Handler | None = None
    args: Args | None = None
    remember: bool = True  # pushed on the back stack when left


@dataclass(frozen=True)
class Input:
    """Free text: validated, then handed to `on_valid`; a bad value shows the error message."""

    id: str
    prompt: str  # msgid
    validate: Validator
    on_valid: Handler
    error: str = "error.invalid_input"  # default message when the validator gives none
    args: Args | None = None
    remember: bool = True


@dataclass(frozen=True)
class Confirm:
    """A summary with 1. Confirm / 2. Cancel."""

    id: str
    body: str  # msgid
    on_confirm: Handler
    on_cancel: Handler | str
    args: Args | None = None
    yes: str = "confirm.yes"
    no: str = "confirm.no"
    remember: bool = True


@dataclass(frozen=True)
class End:
    """The last screen: its text is sent with END and the session closes."""

    id: str
    text: str  # msgid
    args: Args | None = None
    remember: bool = False


Screen = Menu | Input | Confirm | End


# Arguments that are names typed by people (any length): the flows hand them whole, and a screen shortens them
# only when it would not fit otherwise (cut before the screen was measured, a cooperative's name lost its end on a
# screen with room to spare).
FREE_TEXT_ARGS = frozenset({"type", "coop", "name"})
MIN_NAME = 8
CUT = ".."  # marks a shortened name or line: a single "." read as the end of a sentence ("ba Maraba.: for help")
LINE = 72  # at most this many septets for one numbered line: a huge name must not eat the whole screen


class Name(str):
    """A free-text name that fit_names shortens with its own `cut(size)` rather than by its end (cut_name): a
    payment type's on the confirmation, shortened as the list she chose it from shortened it. Cut by its end,
    "Monthly contribution ... Block B" and "... Block C" of the same amount both read "Monthly contribution t..",
    so she could not tell which one she was confirming; the list showed "Monthly contr..Block B"."""

    cut: Callable[[int], str]

    def __new__(cls, value: str, cut: Callable[[int], str]) -> Name:
        name = super().__new__(cls, value)
        name.cut = cut
        return name


def fit(text: str, limit: int) -> str:
    """Cut a text to the limit in GSM-7 septets (dynamic data can be longer than planned)."""
    text = gsm.to_gsm(text)
    if gsm.length(text) <= limit:
        return text
    out, used = [], 0
    for ch in text:
        cost = gsm.length(ch)
        if used + cost > limit - len(CUT):
            break
        out.append(ch)
        used += cost
    return "".join(out).rstrip() + CUT


def cut_name(name: str, size: int) -> str:
    """The name in at most `size` characters, marked CUT when shortened (not before a space or a comma)."""
    if len(name) <= size:
        return name
    return name[:max(size - len(CUT), 1)].rstrip(" ,;:-/(") + CUT


def fit_names(ctx: Ctx, msgid: str, room: int, args: dict[str, Any], then: tuple[str, ...] = (),
              *, or_cut: bool = False) -> str | None:
    """The message within `room` septets, its free-text names (a payment type's, a cooperative's, a person's)
    shortened as far as MIN_NAME characters if need be, then the arguments `then` names, in their order; None
    when even that does not fit (`or_cut`: that shortest text cut at its end, so what comes first stays whole). The
    common case, a message that fits, costs one translation. A message's `.shorter` form (the payment detail's
    without its date, which its reference carries) is taken only when the names at their shortest do not fit in its
    `.short` one, and its `.shortest` (what drops a name: the detail's type) only when they do not fit in either: it
    dropped a 29-character payment type on Nalo where "Security and mai.." fitted, and on Nalo's French,
    Kinyarwanda and Swahili details beside a long amount where the type fitted without the date."""
    text = ctx.t_fit(msgid, room, variants=SHORT, **args)
    if gsm.length(text) <= room:
        return text
    cut: dict[str, str] = {}
    for variants in (SHORT, KEEP) if has(ctx.state.lang, msgid + KEEP[-1]) else (SHORT,):
        text, cut = _shortened(ctx, msgid, room, args, then, variants)
        if gsm.length(text) <= room:
            return text
    # The shortest form, its names whole, else as shortened (the same text as above for a message without one).
    for shortest in (args, {**args, **cut}):
        text = ctx.t_fit(msgid, room, **shortest)
        if gsm.length(text) <= room:
            return text
    return fit(text, room) if or_cut else None


def _shortened(ctx: Ctx, msgid: str, room: int, args: dict[str, Any], then: tuple[str, ...],
               variants: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The message in the first of `variants` that fits, its names shortened (fit_names) until it fits in `room` or
    they are as short as they may get, and those shortened names."""
    text = ctx.t_fit(msgid, room, variants=variants, **args)
    full = {k: " ".join(v.split()) for k, v in args.items() if k in FREE_TEXT_ARGS and isinstance(v, str)}
    cutters = {k: v.cut for k, v in args.items() if k in full and isinstance(v, Name)}
    sizes = {k: len(v) for k, v in full.items()}
    cut: dict[str, str] = {}
    for names in [list(full), *([k] for k in then if isinstance(args.get(k), str))]:
        for key in names:
            full.setdefault(key, args[key])
            sizes.setdefault(key, len(args[key]))
        while gsm.length(text) > room:
            level = _level([sizes[k] for k in names], gsm.length(text) - room)
            if all(sizes[k] <= level for k in names):
                break  # as short as they may get
            for key in names:
                sizes[key] = min(sizes[key], level)
            cut = {k: cutters[k](sizes[k]) if k in cutters else cut_name(v, sizes[k]) for k, v in full.items()}
            text = ctx.t_fit(msgid, room, variants=variants, **{**args, **cut})
    return text, cut


def _title(ctx: Ctx, msgid: str, room: int, args: dict[str, Any]) -> str:
    """A menu's title or an input's prompt within `room`: its names shortened (fit_names) when it would not fit,
    else as translate_fit gives it. The common case, a title that fits, is one translation."""
    text = ctx.t_fit(msgid, room, variants=SHORT, **args)
    if gsm.length(text) <= room:
        return text
    return (fit_names(ctx, msgid, room, args) if args else None) or ctx.t_fit(msgid, room, **args)


def _level(sizes: list[int], over: int) -> int:
    """The longest length (at least MIN_NAME) that names cut to it save `over` characters: the longest names are
    shortened first, and two long ones alike (shortening only the longest kept a 59-character cooperative whole
    and left the person's 59-character name "Jean Bosco Ha...")."""
    for level in range(max(sizes, default=0) - 1, MIN_NAME, -1):
        if sum(size - level for size in sizes if size > level) >= over:
            return level
    return MIN_NAME


def typed_key(text: str) -> str:
    """A key press as the menus read it (keypad): full-width forms and digits of another script as the ASCII ones
    ("１", "١": 1), and a choice padded with one zero as its number ("01": 1, "098": More), as a member who pads a
    choice to the width of the menu's numbers (two digits, 98 More) means it. "0" (Back) and "00" (Home) are
    themselves; zeros only ("000") and a choice after more than one zero ("001", "0000001") are no choice: padding
    to a menu's width takes one zero at most, and "00" then a number is as likely Home mistyped as the number, so
    she is asked again rather than one of the two guessed."""
    key = keypad(text)
    if is_number(key) and key not in (BACK, HOME) and key.strip("0") and not key.startswith("00"):
        return key.removeprefix("0")
    return key


def _join(lines: list[str]) -> str:
    return "\n".join(line for line in lines if line)


class Engine:
    def __init__(self, screens: Mapping[str, Screen], home: str = "home") -> None:
        missing = [s.id for s in screens.values() if s.id not in screens]
        if missing or home not in screens:
            raise ValueError(f"screen ids do not match their keys: {missing or home}")
        self.screens = screens
        self.home = home
        # Static menus (no item loader) rendered before: same inputs, same screen. Measuring and paging
        # a menu was most of a plain hop's own work. Bounded: the keys are few (screens x languages x
        # cooperative names), a flood of distinct names only resets it.
        self._menus: dict[tuple[Any, ...], tuple[str, int, list[str], int, bool]] = {}

    # -- navigation -------------------------------------------------------------------------------

    async def show(self, ctx: Ctx, screen_id: str, *, push: bool = True, page: int = 0) -> UssdReply:
        """Move to a screen (remembering the current one, and its page, for Back) and render it."""
        state = ctx.state
        current = self.screens.get(state.screen)
        if push and current is not None and current.remember and screen_id != state.screen:
            # The page too: Back from a payment chosen on a list's second page is that page, not the first.
            state.stack.append(f"{state.screen}{PAGE}{state.page}" if state.page else state.screen)
            del state.stack[:-12]  # a bounded stack keeps the session small
        state.screen, state.page = screen_id, page
        return await self.render(ctx)

    async def step(self, ctx: Ctx, text: str) -> UssdReply:
        """Apply one input to the current screen. A flow's Ended, wherever it is raised (a choice, or a screen
        rendered again by Back or More, or with an error), ends the session on its screen."""
        at = ctx.state.screen
        try:
            return await self._step(ctx, text)
        except Ended as end:
            log.info("ussd flow ended", extra={"screen": at, "error": str(end)})
            return await self.show(ctx, end.screen)

    async def _step(self, ctx: Ctx, text: str) -> UssdReply:
        state = ctx.state
        screen = self.screens.get(state.screen)
        if screen is None or isinstance(screen, End):
            state.stack.clear()
            return await self.show(ctx, self.home, push=False)
        # A trailing "#" is the Send key, which some handsets and aggregators leave on the input ("1#", or "1＃"
        # full-width): not part of what she typed, on a menu or in a name, a code or an amount.
        text = text.strip().rstrip("#\uff03").rstrip()
        key = typed_key(text)
        if key == HOME:
            state.stack.clear()
            return await self.show(ctx, self.home, push=False)
        if key == BACK:
            if state.page > 0:
                state.page -= 1
                return await self.render(ctx)
            previous, _, page = (state.stack.pop() if state.stack else self.home).partition(PAGE)
            return await self.show(ctx, previous, push=False, page=int(page) if is_number(page) else 0)
        if key == MORE and state.ids and state.data.get("_more"):
            state.page += 1
            return await self.render(ctx)
        try:
            if isinstance(screen, Input):
                try:
                    value = await screen.validate(ctx, text)
                except Invalid as bad:
                    # Without a message of its own, the screen's declared error text is shown.
                    return await self.render(ctx, error=ctx.t(bad.msgid or screen.error, **bad.args_))
                return await self.show(ctx, await screen.on_valid(ctx, value))
            chosen = self._chosen(state, key)
            if chosen is None:
                return await self.render(ctx, error=ctx.t("error.invalid_choice"))
            return await self.show(ctx, await self._dispatch(ctx, screen, chosen))
        except Invalid as bad:
            return await self.render(ctx, error=ctx.t(bad.msgid or "error.invalid_choice", **bad.args_))
        except DomainError as exc:
            log.info("ussd flow refused", extra={"screen": screen.id, "error": exc.message})
            return await self.show(ctx, "failed") if "failed" in self.screens else UssdReply(
                ctx.t("error.generic"), True)

    def _chosen(self, state: State, text: str) -> str | None:
        # A menu's numbers stay below 98 (MAX_ITEMS): a key of more than four digits is none, and int() is not
        # asked to read one of thousands (an 8 KiB input on Africa's Talking), which raises past 4,300 digits.
        if not is_number(text) or text.startswith("0") or len(text) > 4:
            return None
        index = int(text) - state.first
        if 0 <= index < len(state.ids):
            return state.ids[index]
        return None

    async def _dispatch(self, ctx: Ctx, screen: Screen, key: str) -> str:
        if isinstance(screen, Confirm):
            if key == "o0":
                return await screen.on_confirm(ctx, key)
            return screen.on_cancel if isinstance(screen.on_cancel, str) else await screen.on_cancel(ctx, key)
        assert isinstance(screen, Menu)
        if key.startswith("i:"):
            assert screen.on_item is not None
            return await screen.on_item(ctx, key[2:])
        action = screen.options[int(key[1:])].action
        return action if isinstance(action, str) else await action(ctx, key)

    # -- rendering --------------------------------------------------------------------------------

    async def render(self, ctx: Ctx, error: str | None = None) -> UssdReply:
        state = ctx.state
        screen = self.screens[state.screen]
        args = await screen.args(ctx) if screen.args else {}
        if isinstance(screen, End):
            state.ended = True
            state.ids, state.first = [], 1
            # The last screen of a session cannot be paged: free-text names are shortened to keep the sentence
            # whole (cut at the limit, a long cooperative's and person's names left "SMS will follow on..").
            text = fit_names(ctx, screen.text, ctx.limit, args) or fit(
                ctx.t_fit(screen.text, ctx.limit, **args), ctx.limit)
            return UssdReply(text, True)
        if isinstance(screen, Input):
            state.ids, state.first = [], 1
            footer = self._footer(ctx, more=False)
            room = ctx.limit - gsm.length(_join(footer)) - 1 - (gsm.length(error) + 1 if error else 0)
            # A name in the prompt ("to join {coop}") is shortened rather than the prompt cut at its end.
            header = _title(ctx, screen.prompt, room, args)
            return UssdReply(self._assemble(ctx, error, header, [], footer), False)
        if isinstance(screen, Confirm):
            # Never paged: what is being confirmed and both answers on one screen (on a 120-character
            # aggregator a long name pushed "Cancel" to a second page, and an error line pushed out the
            # summary, leaving "1. Confirm" alone). Free-text names are shortened to make room; an error
            # line goes rather than the summary.
            entries = [("o0", ctx.t(screen.yes)), ("o1", ctx.t(screen.no))]
            room = ctx.limit - gsm.length(_join([f"1. {entries[0][1]}", f"2. {entries[1][1]}",
                                                 *self._footer(ctx, more=False)])) - 1
            summary = fit_names(ctx, screen.body, room - gsm.length(error) - 1, args) if error else None
            if summary is None:
                error = None
                # Still too long with its names at their shortest (a balance beside a long name on a 120-character
                # screen): cut at its end, what is paid and the reference first stay whole.
                summary = fit_names(ctx, screen.body, room, args, or_cut=True) or ""
            return self._page(ctx, summary, entries, error)
        if screen.items is None:
            return self._static_menu(ctx, screen, args, error)
        items = [("i:" + it.key, it.label) for it in (await screen.items(ctx))[:MAX_ITEMS]]
        return self._menu(ctx, screen, args, error, items)

    def _menu(self, ctx: Ctx, screen: Menu, args: dict[str, Any], error: str | None,
              items: list[tuple[str, str]] | None = None) -> UssdReply:
        entries = [*(items or []), *((f"o{n}", ctx.t(opt.label)) for n, opt in enumerate(screen.options))]
        # A shorter title when it is what keeps the whole menu off one screen.
        whole = _join([f"{n}. {label}" for n, (_, label) in enumerate(entries, start=1)]
                      + self._footer(ctx, more=False))
        room = ctx.limit - gsm.length(gsm.to_gsm(whole)) - 1
        # A name in the title ("Welcome to {name}") is shortened before the menu is paged or the title cut.
        header = _title(ctx, screen.title, room, args)
        return self._page(ctx, header, entries, error)

    def _static_menu(self, ctx: Ctx, screen: Menu, args: dict[str, Any], error: str | None) -> UssdReply:
        """_menu, remembered: the text depends only on what the key holds (the footer reads the page,
        whether there is a back stack, and whether it is two deep)."""
        state = ctx.state
        try:
            key: tuple[Any, ...] = (screen.id, state.lang, ctx.limit, tuple(sorted(args.items())), state.page,
                                    bool(state.stack), len(state.stack) >= 2, error)
            hit = self._menus.get(key)
        except TypeError:  # an unhashable argument: render without remembering
            return self._menu(ctx, screen, args, error)
        if hit is None:
            reply = self._menu(ctx, screen, args, error)
            if len(self._menus) >= 4096:
                self._menus.clear()
            self._menus[key] = (reply.text, state.page, list(state.ids), state.first, bool(state.data.get("_more")))
            return reply
        text, state.page, ids, state.first, more = hit
        state.ids = list(ids)
        if more:
            state.data["_more"] = True
        else:
            state.data.pop("_more", None)
        return UssdReply(text, False)

    def _footer(self, ctx: Ctx, *, more: bool) -> list[str]:
        state = ctx.state
        lines = []
        if more:
            lines.append(ctx.t("nav.more"))
        if state.page > 0 or state.stack:
            lines.append(ctx.t("nav.back"))
        if state.screen != self.home and len(state.stack) >= 2:
            lines.append(ctx.t("nav.home"))
        return lines

    def _assemble(self, ctx: Ctx, error: str | None, header: str, body: list[str], footer: list[str]) -> str:
        text = _join([error or "", header, *body, *footer])
        if gsm.length(gsm.to_gsm(text)) > ctx.limit and error:
            text = _join([error, *body, *footer])  # the error replaces the title rather than an option
        if gsm.length(gsm.to_gsm(text)) > ctx.limit:
            # The header is the only free-length part; shorten it, keep every numbered line whole.
            rest = _join([*body, *footer])
            room = ctx.limit - gsm.length(gsm.to_gsm(rest)) - 1
            lead = _join([error or "", header])
            text = _join([fit(lead, room) if room > 4 else "", rest])
        return fit(text, ctx.limit)

    def _pages(self, ctx: Ctx, header: str, lines: list[str]) -> list[tuple[int, int]]:
        """Greedy page boundaries: as many lines as fit with the header and the footer."""
        pages: list[tuple[int, int]] = []
        start, saved_page = 0, ctx.state.page
        while start < len(lines) and len(pages) <= MAX_ITEMS:
            ctx.state.page = len(pages)  # footer depends on the page (Back shows from page 2)
            rest = _join([header, *lines[start:], *self._footer(ctx, more=False)])
            if gsm.length(gsm.to_gsm(rest)) <= ctx.limit:
                # The rest fits without "More": taken whole (line by line, the "More" line counted for
                # each of them pushed the last option of a menu that fits one screen onto a second page).
                pages.append((start, len(lines)))
                break
            end = start + 1
            while end < len(lines):
                candidate = _join([header, *lines[start:end + 1],
                                   *self._footer(ctx, more=end + 1 < len(lines))])
                if gsm.length(gsm.to_gsm(candidate)) > ctx.limit:
                    break
                end += 1
            pages.append((start, end))
            start = end
        ctx.state.page = saved_page
        return pages or [(0, 0)]

    def _page(self, ctx: Ctx, header: str, entries: list[tuple[str, str]], error: str | None) -> UssdReply:
        state = ctx.state
        lines = [f"{n}. {label}" for n, (_, label) in enumerate(entries, start=1)]
        lines = [fit(line, LINE) for line in lines]  # a huge name must not eat the whole screen
        # Page breaks leave room for an error line in place of the title, so they never move.
        error_line = error or ctx.t("error.invalid_choice")
        layout = header if gsm.length(header) >= gsm.length(error_line) else error_line
        pages = self._pages(ctx, layout, lines)
        state.page = min(state.page, len(pages) - 1)
        start, end = pages[state.page]
        more = state.page + 1 < len(pages)
        state.ids = [key for key, _ in entries[start:end]]
        state.first = start + 1
        state.data["_more"] = more
        if not more:
            state.data.pop("_more", None)
        text = self._assemble(ctx, error, header, lines[start:end], self._footer(ctx, more=more))
        return UssdReply(text, False)
