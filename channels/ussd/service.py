"""One USSD hop from turn to reply: session load, retry replay, resume, the engine, session save."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from channels.ussd import africastalking, cache, flows, funnel, records, sessions
from channels.ussd.engine import Ctx, Engine, State
from channels.ussd.i18n import language, translate
from channels.ussd.types import (
    EXPECTED_OUTAGES,
    OpeningUnwritten,
    UssdReply,
    UssdTurn,
    extends,
    extension_of,
    row_unwritten,
    side_effect_began,
)
from core import metrics
from core.cooperatives import COUNTRY_LANGUAGE
from core.phone import Phone

log = logging.getLogger("gateway.ussd")

# Screens not worth resuming: starting over lands there anyway (pay_paid: and a serve of the previous release in a
# rolling deploy, resuming it, would show a screen it does not know).
NO_RESUME = frozenset({"home", "resume", "language", "pay_paid"})


class LanguageMemory:
    """A bounded in-process memory of each phone's language, for the answer when Redis is down."""

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._items: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        return self._items.get(key)

    def put(self, key: str, lang: str) -> None:
        self._items[key] = lang
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def latest_input(previous: str | None, accumulated: str) -> str | None:
    """What was typed since the last hop, given every input so far joined by '*'; None when the text is not
    a new hop: a late copy of an earlier one (what was consumed starts with it), or a history this session
    never had. Taking its last part as a key press would apply an old "1" to the screen on now (on the
    confirmation screen, "1" pays).

    A naive split would break inputs that contain '*'; the consumed prefix is known, so the new
    input is whatever follows it.
    """
    if previous is None or (previous == "" and not accumulated.startswith("*")):
        return accumulated  # (an empty first reply makes Africa's Talking's text "*1" for the next choice)
    if accumulated.startswith(previous + "*"):
        return accumulated[len(previous) + 1:]
    return None


def dialled_code(service_code: str, text: str) -> str:
    """The whole code a member dialled whose end came as a first hop's text (*384*123# with text "4" ->
    *384*123*4#), to keep on the session's row (32 characters): the code with its cooperative part only when
    the whole is longer, the plain code when even that is (too long to name a cooperative anyway)."""
    stem = service_code.strip().rstrip("#")
    for tail in (text, text.split("*")[0]):
        code = f"{stem}*{tail}#"
        if len(code) <= 32:
            return code
    return service_code


def is_earlier(previous: str, accumulated: str) -> bool:
    """Whether an accumulated text is one this session already went through (the opening hop's is empty)."""
    return accumulated == "" or previous == accumulated or previous.startswith(accumulated + "*")


def owner_tag(phone_index: str) -> str:
    """The session's phone, kept with it as a short keyed hash (the phone's blind index, cut: the phone itself
    is never stored)."""
    return phone_index[:16]


class UssdService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.languages = LanguageMemory()

    async def handle(self, rt: Any, turn: UssdTurn, limit: int) -> tuple[UssdReply, str]:
        """Answer one hop; returns the reply and the screen id (for metrics and logs)."""
        phone_index = rt.cipher.blind_index(turn.phone.e164)  # once a hop: the owner check and the language memory
        facts: tuple[bool, str | None] | None = None
        if turn.is_new and not turn.closed:
            # A hop that opens a session: what its first hop reads of the phone (a resume route, a chosen
            # language) comes in the same round trip as the session (none, unless this is a retry).
            stored, facts = await sessions.load_opening(rt.hot_redis, turn.aggregator, turn.session_id, phone_index)
        else:
            stored = await sessions.load(rt.hot_redis, turn.aggregator, turn.session_id)
        owner = owner_tag(phone_index)
        if stored is not None and stored.owner is not None and stored.owner != owner:
            # A session belongs to the phone that opened it: a hop with its id and another number (forged,
            # misrouted, or an aggregator's id reused) must not read it or pay on it. The session is untouched.
            log.warning("ussd hop from another phone for this session refused",
                        extra={"aggregator": turn.aggregator, "session_id": turn.session_id})
            return UssdReply(translate(stored.state.lang, "unavailable"), True), "other_phone"
        if turn.closed:
            await self._abandoned(rt, turn, stored)
            return UssdReply("", True), "closed"
        if stored is not None and stored.reply is not None and turn.hop_key is not None \
                and stored.hop == turn.hop_key:
            # The aggregator retried a hop we already answered: same screen, no side effect again.
            if stored.hops <= 1:
                await self._claim(rt, turn, stored)
            return UssdReply(*stored.reply), "retry"
        if stored is not None and turn.is_new and turn.hop_key is None and stored.hops <= 1 \
                and stored.reply is not None and not stored.state.ended:
            # The opening request again (Nalo, or Hubtel without Sequence, name no hop): the aggregator
            # retried it; answering it as a choice on the menu would show "invalid choice".
            await self._claim(rt, turn, stored)
            return UssdReply(*stored.reply), "retry"
        if stored is not None and stored.state.ended and stored.reply is not None:
            return UssdReply(stored.reply[0], True), stored.state.screen
        if stored is not None and stored.reply is not None and turn.sequence is not None \
                and stored.sequence is not None and turn.sequence <= stored.sequence:
            # A numbered hop older than the last one answered (Hubtel's Sequence), arriving late: not a new
            # choice on the screen shown now. The screen again, nothing changed.
            return UssdReply(*stored.reply), "stale"

        if stored is None:
            # The cooperative of the extension, the memberships and the session row: one connection.
            async with cache.one_connection(rt):
                stored, reply, opening = await self._first_hop(rt, turn, limit, facts)
                return await self._answer(rt, turn, stored, reply, phone_index, opening)
        ctx = Ctx(rt=rt, turn=turn, state=stored.state, limit=limit)
        if turn.accumulated is not None:
            new_input = latest_input(stored.acc, turn.accumulated)
            if new_input is None:
                return await self._not_new(rt, turn, stored)
            text = new_input
            stored.acc = turn.accumulated
        else:
            text = turn.input or ""
        offered = stored.state.screen == "resume"
        reply = await self.engine.step(ctx, text)
        stored.hops += 1
        # The offer to continue left for the menu (Start again, or 0 / 00 past it): the saved route goes, as
        # when she leaves a screen this session saved. Kept, a later dial would offer it again.
        left_offer = offered and stored.state.screen == "home"
        return await self._answer(rt, turn, stored, reply, phone_index, left_offer=left_offer)

    async def _not_new(self, rt: Any, turn: UssdTurn, stored: sessions.Stored) -> tuple[UssdReply, str]:
        """An accumulated text that is not a new hop: the screen shown now again, and no step."""
        assert turn.accumulated is not None
        reply = UssdReply(*stored.reply) if stored.reply is not None else UssdReply(
            translate(stored.state.lang, "unavailable"), True)
        if stored.acc is not None and is_earlier(stored.acc, turn.accumulated):
            return reply, "stale"  # a late copy of an earlier hop: nothing changes
        # A history this session never had (the aggregator dropped or rewrote a part): not guessed at; the
        # member's next key is read after this text.
        log.warning("ussd accumulated text does not extend the previous one",
                    extra={"aggregator": turn.aggregator, "session_id": turn.session_id})
        stored.acc, stored.hop = turn.accumulated, turn.hop_key
        winner = await sessions.save(rt.hot_redis, turn.aggregator, turn.session_id, stored)
        if winner is not None and winner.reply is not None:
            return UssdReply(*winner.reply), "retry"  # another copy of this hop answered first: its screen
        return reply, "stale"

    async def _answer(self, rt: Any, turn: UssdTurn, stored: sessions.Stored, reply: UssdReply, phone_index: str,
                      opening: Callable[[], Awaitable[None]] | None = None, *, left_offer: bool = False
                      ) -> tuple[UssdReply, str]:
        """Save the session with its answer (and, on the first hop, write the session row meanwhile);
        `left_offer`: this hop went from the offer to continue to the menu, and the saved route goes."""
        stored.hop, stored.reply = turn.hop_key, (reply.text, reply.end)
        if stored.owner is None:
            stored.owner = owner_tag(phone_index)
        if turn.sequence is not None:
            stored.sequence = max(turn.sequence, stored.sequence or 0)
        state = stored.state
        # The resume route: kept while the user is somewhere worth coming back to; cleared at END, and when
        # they went back to the menu after this session saved one ("rk") or past the offer to continue an
        # earlier one: a later dial must not offer to resume a screen they left. Untouched otherwise (most
        # menu hops: no extra Redis command).
        if state.screen in NO_RESUME and not reply.end:
            keep_route = False if state.data.pop("rk", None) or left_offer else None
        else:
            keep_route = not reply.end
            if keep_route:
                state.data["rk"] = 1
            else:
                state.data.pop("rk", None)
        counted = funnel.advance(state)
        saving = sessions.save(rt.hot_redis, turn.aggregator, turn.session_id, stored,
                               resume=None if keep_route is None else (rt.cipher, turn.phone, keep_route),
                               funnel=counted)
        winner: sessions.Stored | None = None
        try:
            if opening is None:
                winner = await saving
            else:
                # The session row (PostgreSQL) is written while the session is saved (Redis): one wait, not
                # two. Both finish before the hop answers (or fails); the first error is the hop's.
                opened, saved = await asyncio.gather(opening(), saving, return_exceptions=True)
                if opened is None:
                    row_unwritten(False)
                if isinstance(opened, Exception) and not isinstance(saved, sessions.Stored):
                    # The row not written: the session is this hop's to count (OpeningUnwritten), and what it saved
                    # goes (a later close finding its state but no row counted it again). Not when another copy of
                    # the hop saved first (a Stored): that copy's session goes on, its row closed by this hop's
                    # failure as any hop's (UssdService.ended_unanswered).
                    kept = saved is None and not await self._unsaved(rt, turn, stored, counted)
                    raise OpeningUnwritten(f"session row not written: {type(opened).__name__}",
                                           kept=opening if kept else None) from opened
                for outcome in (opened, saved):
                    if isinstance(outcome, BaseException):
                        raise outcome
                winner = saved if isinstance(saved, sessions.Stored) else None
        except Exception as exc:
            if not side_effect_began():
                raise
            # The payment (or other write) is committed: the user must hear the real answer, not "try
            # again" (which would charge twice). A retried hop re-runs the step, which finds the write by
            # its reserved reference or key instead of repeating it.
            log.warning("ussd session not saved after its side effect; answering anyway",
                        extra={"session_id": turn.session_id, "screen": state.screen,
                               "error": type(exc).__name__})
        if winner is not None and winner.reply is not None:
            # Another copy of this hop (the aggregator's retry, on another serve process) saved first: the
            # member hears what the session holds, the screen whose reference a payment will get. Whatever
            # this copy wrote (a reserved reference, an idempotent payment) is not what the session goes on
            # from; the winner also does the session's end bookkeeping.
            log.info("ussd hop answered twice at once; the first saved answer is given",
                     extra={"aggregator": turn.aggregator, "session_id": turn.session_id})
            self.languages.put(phone_index, winner.state.lang)
            return UssdReply(*winner.reply), "retry"
        self.languages.put(phone_index, state.lang)
        if reply.end:
            await self._ended(rt, turn, stored)
        return reply, state.screen

    @staticmethod
    async def _claim(rt: Any, turn: UssdTurn, stored: sessions.Stored) -> None:
        """A retry of the opening hop answered from the session its first copy saved: claimed (sessions.claim), so
        that the first copy, should its row write fail, does not take back the session this copy's member goes on
        from (she saw the menu again at her next key). Best effort: the answer is the session's either way."""
        try:
            await sessions.claim(rt.hot_redis, turn.aggregator, turn.session_id, stored)
        except Exception as exc:
            log.warning("ussd session of a retried opening hop not claimed",
                        extra={"session_id": turn.session_id, "error": type(exc).__name__})

    @staticmethod
    async def _unsaved(rt: Any, turn: UssdTurn, stored: sessions.Stored, counted: list[str]) -> bool:
        """The session an opening hop saved, and its funnel counts, taken back: its row could not be written and the
        hop is answered "unavailable", so nothing of the session stays (as after a shed opening hop). Best effort:
        a later close that finds the state but no row counts nothing either (records.closed). False when the
        session was left, another copy of the hop answering from it (its member goes on: OpeningUnwritten.kept)."""
        try:
            if not await sessions.unsave(rt.hot_redis, turn.aggregator, turn.session_id, stored, funnel=counted):
                log.info("ussd session of an opening hop without its row kept: another copy of the hop answered "
                         "from it", extra={"aggregator": turn.aggregator, "session_id": turn.session_id})
                return False
        except Exception as exc:
            log.warning("ussd session of an opening hop without its row not removed",
                        extra={"session_id": turn.session_id, "error": type(exc).__name__})
        return True

    async def _first_hop(self, rt: Any, turn: UssdTurn, limit: int, facts: tuple[bool, str | None] | None = None
                         ) -> tuple[sessions.Stored, UssdReply, Callable[[], Awaitable[None]] | None]:
        """The opening screen; the session row's write is returned to run alongside the session's save (None
        when the row is there already: a session lost from Redis mid-way, or written with the memberships).
        `facts`: sessions.opening_facts(), when read with the session already."""
        state = State(screen="home")
        stored = sessions.Stored(state=state, hops=1, started=time.time(), seen="")  # saved only if still new
        ctx = Ctx(rt=rt, turn=turn, state=state, limit=limit)
        extension = turn.extension
        dialled = turn.service_code  # the whole code the member dialled, kept on the session's row
        lost: str | None = None
        if turn.accumulated and not extension:
            # Text on the very first hop is the end of the dialled code (*384*123*3# sent as
            # serviceCode *384*123# with text 3): it names a cooperative, it is not a menu choice. On a
            # session lost mid-way it is her keys so far; the code she dialled is the one its row kept.
            lost = await self._lost(rt, turn)
            if lost is None:
                extension, dialled = turn.accumulated, dialled_code(turn.service_code, turn.accumulated)
            else:
                extension = extension_of(lost, turn.service_code)
        elif not turn.is_new and turn.accumulated is None:
            # Hubtel and Nalo: a later hop (her latest key only) of a session lost from Redis mid-way. The code she
            # dialled is the one its row kept: read as its opening hop read it (after our code for this aggregator,
            # else after the aggregator's), it names her cooperative again. Without it she was on the menu of no
            # cooperative: Pay asked a stranger who had dialled a cooperative's code to type that code.
            lost = await self._lost(rt, turn)
            if lost is not None:
                ours = rt.settings.service_code_for(turn.aggregator)
                extension = extension_of(lost, ours if extends(lost, ours) else turn.service_code)
        # Either way the text is consumed: the next hop's key is what follows it (as Hubtel and Nalo, which
        # send only the latest input, drop the key pressed on a lost session).
        stored.acc = turn.accumulated
        written = False
        if lost is None:
            row_unwritten(True)  # (cut off by its budget before the row is written: OpeningUnwritten, routes.run_hop)
        try:
            if extension:
                coop = await flows.cooperative_by_extension(rt, extension.split("*")[0])
                if coop is not None:
                    state.data["x"] = coop.id
                    ctx.cache[f"coop:{coop.id}"] = coop

            async def read_memberships() -> list[Any]:
                # On PostgreSQL the session row is written in the memberships' statement (one round trip, not two):
                # its cooperative and member are the memberships' (below), so nothing is written before they are known.
                nonlocal written
                if lost is None:
                    found = await flows.opening_memberships(ctx, aggregator=turn.aggregator,
                                                            session_id=turn.session_id, phone=turn.phone,
                                                            service_code=dialled, network=turn.network)
                    if found is not None:
                        written = True
                        row_unwritten(False)
                        return found
                return await flows.memberships(ctx)

            # The resume route (Redis), unless read with the session, is looked up while the memberships (PostgreSQL)
            # are read: under load each await of a hop waits its turn behind the other hops, and the opening hop has
            # the most of them.
            if facts is None:
                peek = asyncio.ensure_future(sessions.opening_facts(rt.redis, rt.cipher, turn.phone))
                try:
                    ms = await read_memberships()
                except BaseException:
                    peek.cancel()
                    await asyncio.gather(peek, return_exceptions=True)
                    raise
                facts = await peek
            else:
                ms = await read_memberships()
            resumable, chosen = facts
            if resumable and state.data.get("x"):
                resumable = await self._resumes_in(rt, turn.phone, state.data["x"])
            # The person's language, the same on every serve process: her memberships' (all of them, not only
            # those of a dialled extension's cooperative), else what the phone chose in Redis. Not this process's
            # memory: another process would greet the same phone in another language.
            # A caller none of whose cooperatives knows her, who chose no language, dialling a cooperative's code:
            # that cooperative's. Dialling the shared code: her number's country's (a Tanzanian stranger was greeted
            # in English), computed from the number alone, no read.
            dialled_coop = ctx.cache.get(f"coop:{state.data['x']}") if state.data.get("x") else None
            state.lang = language(ctx.cache.get("lang") or chosen or (dialled_coop.language if dialled_coop else None)
                                  or COUNTRY_LANGUAGE.get(turn.phone.region))
            reply = await self.engine.show(ctx, "resume" if resumable else "home", push=False)
            member_id = ms[0][0].id if len(ms) == 1 else None
            coop_id = ms[0][1].id if len(ms) == 1 else state.data.get("x")
            if coop_id:
                state.data["fc"] = coop_id  # the ops funnel counts the session for it from the main menu on
            if lost is not None:
                return stored, reply, None  # its row was written by the session's real first hop
            if written:
                return stored, reply, None  # with the memberships
            opening = functools.partial(records.opened, rt, aggregator=turn.aggregator, session_id=turn.session_id,
                                        phone=turn.phone, service_code=dialled, network=turn.network,
                                        cooperative_id=coop_id, member_id=member_id)
            return stored, reply, opening
        except Exception as exc:
            if lost is not None or written:
                raise  # its row is there (the session's real first hop's, or written with the memberships)
            # No row written (PostgreSQL writes it with the memberships, which failed; elsewhere it is written
            # with the save, after this), nothing saved: the hop counts the session (OpeningUnwritten). Raised as
            # any other failure, its close failing too left Hubtel's and Nalo's session to a sweep with no row.
            raise OpeningUnwritten(f"session row not written: {type(exc).__name__}") from exc

    @staticmethod
    async def _resumes_in(rt: Any, phone: Phone, coop_id: str) -> bool:
        """Whether the session this phone left may be continued from a dial of `coop_id`'s own code: not when it
        was another cooperative's. A member of two cooperatives who left a payment in one and dialled the other's
        extension was offered "Continue where you left off", and Continue took her to the first one's payment
        list and confirmation, which do not name the cooperative: she paid the wrong one. Its route stays for a
        dial of its own cooperative's code (or the shared one). Read only when a route waits and a cooperative's
        extension was dialled."""
        saved = await sessions.load_resume(rt.redis, rt.cipher, phone)
        if saved is None:
            return False
        theirs = saved.data.get("c") or saved.data.get("rc") or saved.data.get("x")
        if theirs is None:
            # A route of no cooperative yet. Left at the shared code's "Choose your cooperative", it is not continued
            # from a cooperative's own code either: Continue showed that list, and she paid the other cooperative
            # from this one's code (the session's row, the funnel and the menu she dialled were this one's).
            return saved.screen != "coop_pick"
        return theirs == coop_id

    async def _lost(self, rt: Any, turn: UssdTurn) -> str | None:
        """The code a session was opened with when a hop with text (on Hubtel and Nalo, any later hop) and no saved
        session continues it after it was lost from Redis (restart, failover, eviction); None when the hop opens
        one with a dialled code in its text.

        Africa's Talking sends every input so far, so after a loss the member's next key arrives as "4*1":
        read as a dialled code, her first key ("4", also a cooperative's one-digit code) would switch her
        to another cooperative's menu, where Pay offers to join it. The wire cannot tell the two apart; the
        session row can (written on every first hop). Read only here (a hop with text and no session, rare):
        the common opening hop (empty text) costs nothing more. A database outage fails the hop as the
        opening hop's other reads would ("unavailable"): guessing would risk the wrong cooperative.

        A session opened with a cooperative's code in its text (*384*123*4# sent as text "4") keeps that
        cooperative: its row holds the whole code (*384*123*4#), which names it again.
        """
        code = await records.seen(rt, aggregator=turn.aggregator, session_id=turn.session_id)
        if code is not None:
            log.warning("ussd session lost mid-way; its opening screen again, its text taken as consumed",
                        extra={"aggregator": turn.aggregator, "session_id": turn.session_id})
        return code

    async def _ended(self, rt: Any, turn: UssdTurn, stored: sessions.Stored) -> None:
        outcome = "payment" if stored.state.screen == "pay_done" else "completed"
        if not await self._closed(rt, turn, stored, status="Success"):
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome=outcome).inc()
        if stored.state.data.get("rs"):  # what the session did, not how it ended: counted whoever counted that
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome="resumed").inc()

    async def _abandoned(self, rt: Any, turn: UssdTurn, stored: sessions.Stored | None) -> None:
        if stored is not None and stored.reply is not None and stored.reply[1]:
            # Our END released the session, and its hop closed the row and counted it: a Timeout (or Release) after
            # it tells nothing of how it ended. Written, it made the row's end and duration its own instant's.
            return
        # Its state gone (lost), the row is closed all the same, with what the Timeout says: left OPEN, the sweep
        # would count the session a second time.
        # What it read of the session may be older than a hop of it running at once on another process, whose END
        # may close the row first: that close's hops and screen stand (knows_less).
        if not await self._closed(rt, turn, stored, status="Incomplete", knows_less=True):
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome="abandoned").inc()

    async def ended_unanswered(self, rt: Any, turn: UssdTurn, outcome: str,
                               counted: Callable[[], bool] = lambda: False, *, unwritten: bool = False,
                               kept: Callable[[], Awaitable[None]] | None = None) -> None:
        """The session ended by an END the gateway gave without the hop's own answer: `outcome` busy (shed past the
        cap on hops in flight), unavailable (the hop failed) or unsettled (it failed, or ran out of time, after a
        payment began). Its row is closed (Incomplete, with the outcome as its error) and the session counted so, by
        the first close of its row (_closed), as any other. Left OPEN, Hubtel and Nalo, which report no end after
        our END, had the sweep count it a second time (timed_out). Stateless: the hop's answer did not read the
        session's state (shed), or may not have (failed). `counted()`: the hop counted the session itself
        meanwhile (Africa's Talking, its close not done when answered: routes.UssdChannel.end_unanswered).

        A hop is never a notice after the session's end (`opening`): a session with no row of its own is one this
        hop opened, as _first_hop takes it (it writes the row), and is counted here. Not only an is_new hop: Africa's
        Talking's opening hop with a cooperative's code dialled (*384*123*7#, text "7") is not, and one failing
        before its row was written went uncounted (its close taken for a Hubtel Release after a shed opening hop,
        the Success notice of our END counting nothing).

        `unwritten`: the hop's write of the session's row failed (types.OpeningUnwritten). Its close still runs: a
        write that fails may have been committed (the connection lost after the COMMIT), and the row it left OPEN
        was counted again by Hubtel's Release or the sweep. A close that fails too counts the session here, as on
        Africa's Talking: the row is most likely not there, and the sweep has nothing to count.

        `kept`: the session goes on from the state this hop saved, another copy of the hop having answered from it
        (OpeningUnwritten.kept): its row is not closed, but written as its opening writes it (OPEN; left as it is when
        there), and nothing is counted: the session's own end counts it. (Closed, her session's row said
        "unavailable", counted so, while she went on.) That write failing too counts it, as `unwritten`."""
        if kept is not None:
            try:
                await kept()
                return
            except Exception as exc:
                expected = isinstance(exc, EXPECTED_OUTAGES)
                log.log(logging.WARNING if expected else logging.ERROR, "ussd session record not written",
                        extra={"session_id": turn.session_id, "error": type(exc).__name__}, exc_info=not expected)
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome=outcome).inc()
            return
        before = await self._closed(rt, turn, None, status="Incomplete", error=outcome, opening=True,
                                    unwritten=unwritten)
        if not before and not counted():
            metrics.USSD_SESSIONS.labels(aggregator=turn.aggregator, outcome=outcome).inc()

    @staticmethod
    async def _closed(rt: Any, turn: UssdTurn, stored: sessions.Stored | None, *, status: str,
                      error: str | None = None, opening: bool = False, knows_less: bool = False,
                      unwritten: bool = False) -> bool:
        """The session's row recorded ended; whether it was closed before. A session is counted once in
        gateway_ussd_sessions, by the first close of its row (records._first_close): the sweep's timed_out, the
        aggregator's notice (its outcome), or this hop's; a counter cannot take the first back, so a later close
        counts no outcome of its own, and the row still says how the session really ended. A write that fails (the
        database away) leaves the row OPEN: on Hubtel and Nalo its next close, the sweep's, counts it (timed_out),
        so this one does not (twice, else); Africa's Talking reports our END a Success, which counts nothing
        (routes._events), so its END counts (once, unless the notice is lost and the sweep closes the row).
        (records.closed() tells a second write that fails: the first found the row closed before.) `unwritten`: the
        session's opening hop could not write its row (ended_unanswered): a failing close counts it, as on Africa's
        Talking."""
        try:
            if stored is None:
                unanswered = records.unanswered_row(
                    rt, aggregator=turn.aggregator, session_id=turn.session_id, phone=turn.phone,
                    service_code=dialled_code(turn.service_code, turn.accumulated)
                    if turn.accumulated and not turn.extension else turn.service_code,
                    network=turn.network) if opening else None
                return await records.closed(rt, aggregator=turn.aggregator, session_id=turn.session_id,
                                            status=status, stateless=True, error=error, opening=opening,
                                            unanswered=unanswered)
            return await records.closed(rt, aggregator=turn.aggregator, session_id=turn.session_id,
                                        hops=stored.hops, last_screen=stored.state.screen, data=stored.state.data,
                                        status=status, duration_ms=int((time.time() - stored.started) * 1000),
                                        knows_less=knows_less)
        except Exception as exc:  # the user's answer matters more than the bookkeeping row
            # The database away (restarting, its pool exhausted): the hop's own line says so, and this one names the
            # row in a line, not a traceback per hop; anything else is a bug, told in full.
            expected = isinstance(exc, EXPECTED_OUTAGES)
            log.log(logging.WARNING if expected else logging.ERROR, "ussd session record not updated",
                    extra={"session_id": turn.session_id, "error": type(exc).__name__}, exc_info=not expected)
            return turn.aggregator != africastalking.NAME and not unwritten

    def unavailable(self, rt: Any, turn: UssdTurn | None) -> UssdReply:
        return UssdReply(translate(self._language(rt, turn), "unavailable"), True)

    def unsettled(self, rt: Any, turn: UssdTurn) -> UssdReply:
        """The answer when a payment (or another write) was begun and its outcome is not known yet."""
        return UssdReply(translate(self._language(rt, turn), "unsettled"), True)

    def _language(self, rt: Any, turn: UssdTurn | None) -> str | None:
        return self.language_of(rt, turn.phone) if turn is not None else None

    def language_of(self, rt: Any, phone: Phone) -> str | None:
        """The language this process last answered the phone in (None when unknown): for answers given without
        reading Redis or the database (an outage, load shedding, a malformed hop)."""
        try:
            return self.languages.get(rt.cipher.blind_index(phone.e164))
        except Exception:
            return None
