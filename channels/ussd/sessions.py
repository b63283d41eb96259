"""USSD sessions in Redis: one compact key per session, written with its TTL in one round trip.

Keys carry a hash tag so Redis Cluster keeps each key on one slot:
  ussd:{at:<session id>}           the whole session (screen, back stack, data, last hop and reply)
  ussd:{ph:<blind index>}:resume   the route of a session dropped before END, offered on the next dial
  ussd:{ph:<blind index>}:lang     the language the phone last chose (used when no membership carries one)
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from channels.ussd.engine import PAGE, State
from core.crypto import PiiCipher
from core.db import utcnow
from core.ops import FUNNEL_TTL, funnel_key
from core.phone import Phone

SESSION_TTL = 300  # aggregators end a session after about 180 s; the margin covers their retries
RESUME_TTL = 300
ABBREVIATIONS = {"africastalking": "at", "hubtel": "hb", "nalo": "nl"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
# KEYS[1]: a hash of counters; ARGV[1]: its TTL; ARGV[2..]: the fields to add one to.
_COUNT_FIELDS = """
for i = 2, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""
# The same fields taken back (a losing copy of a hop counted what the winning copy counted; an opening hop
# without its row); a key gone meanwhile (expired) is not made again, at -1 and with no expiry.
_UNCOUNT_FIELDS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], -1) end
return #ARGV
"""
# Compare-and-delete of a session. KEYS[1]: the session; ARGV[1]: SHA-1 of the value the hop saved. 1 when deleted,
# 0 when there is none, 2 when another copy of the hop wrote it since or answered from it (claimed: see _CLAIM), its
# session left as it is.
_DELETE_IF_UNCHANGED = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if redis.sha1hex(current) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 2
"""
# An opening hop's session claimed by another copy of that hop, which answers from it (its save lost the race, or it
# read the session and replays its answer): the value is rewritten with "cp" (a copy answered from it) in front, which
# decode() ignores and the next save drops, so that its SHA-1 is no longer the one the saving copy compares against:
# that copy's take-back (unsave, its row not written) leaves the session the other copy's member goes on from.
_CLAIM = """
if string.sub(current, 1, 6) ~= '{"cp":' then
  current = '{"cp":1,' .. string.sub(current, 2)
  redis.call('SET', KEYS[1], current, 'EX', ARGV[3])
end
"""
# A copy of the opening hop replaying the answer of the session it read (ARGV[1]: SHA-1 of it; ARGV[2]: it; ARGV[3]:
# the TTL) claims it. Taken back meanwhile (the saving copy's row not written), it is put back, claimed: this copy's
# member goes on from it. Moved on since (a later hop saved it): left as it is.
_CLAIM_READ = """
local current = redis.call('GET', KEYS[1])
if not current then current = ARGV[2] elseif redis.sha1hex(current) ~= ARGV[1] then return 0 end
""" + _CLAIM + "return 1\n"
# Compare-and-set of a session. KEYS[1]: the session; ARGV[1]: SHA-1 of the value the hop read ("" when
# there was none), ARGV[2]: the new value, ARGV[3]: its TTL. 1 when written; else the value another copy of
# the hop saved meanwhile, returned so the loser answers with it without another round trip. A session
# gone meanwhile (expired) is written: no copy competes by deleting. A copy of an opening hop (ARGV[1] "") that lost
# claims the winner's session, which it answers from (_CLAIM). A session only claimed since it was read is unchanged
# (the value read, with the claim's marker in front): a late copy of the opening hop claiming it while her next key's
# hop ran made that hop lose, and she was shown the menu again, her key dropped. (Compared again only when the first
# comparison fails: a normal hop's save runs as before.)
_SAVE_IF_UNCHANGED = """
local current = redis.call('GET', KEYS[1])
if current and redis.sha1hex(current) ~= ARGV[1]
    and not (string.sub(current, 1, 8) == '{"cp":1,' and redis.sha1hex('{' .. string.sub(current, 9)) == ARGV[1]) then
  if ARGV[1] == '' then
""" + _CLAIM + """
  end
  return current
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


@dataclass
class Stored:
    """A session as kept between hops."""

    state: State
    acc: str | None = None  # accumulated text already consumed (accumulating aggregators)
    hop: str | None = None  # hop key of the last hop answered
    reply: tuple[str, bool] | None = None  # the last answer, replayed when the same hop comes again
    hops: int = 0
    started: float = 0.0  # epoch seconds
    owner: str | None = None  # the phone that opened the session, as a short keyed hash (service.owner_tag)
    sequence: int | None = None  # the highest hop number answered (aggregators that number hops: Hubtel)
    # What save() compares against (not stored): the SHA-1 of the value this session was read from, "" for
    # a session that was not there (its first hop), None to write whatever is there.
    seen: str | None = field(default=None, compare=False, repr=False)
    # The funnel hour save() counted this hop's counters in (not stored): unsave() takes them back from that hour's
    # key, whatever the hour is by then.
    counted_in: str | None = field(default=None, compare=False, repr=False)


def session_key(aggregator: str, session_id: str) -> str:
    tag = ABBREVIATIONS.get(aggregator, aggregator[:8])
    # Braces or odd bytes in an aggregator's id must not break the hash tag.
    safe = session_id if _SAFE_ID.match(session_id) else hashlib.sha256(session_id.encode()).hexdigest()[:40]
    return f"ussd:{{{tag}:{safe}}}"


def resume_key(cipher: PiiCipher, phone: Phone) -> str:
    return phone_keys(cipher.blind_index(phone.e164))[1]


def _state(obj: dict[str, Any]) -> dict[str, Any]:
    kept = {"s": obj["s"], "k": obj.get("k", []), "d": obj.get("d", {}), "l": obj.get("l", "en")}
    if "kp" in obj:
        kept["kp"] = obj["kp"]
    return kept


def encode_state(state: State) -> dict[str, Any]:
    out: dict[str, Any] = {"s": state.screen, "l": state.lang}
    if state.stack:
        # The back stack as screen ids, the pages they were left on beside them ("kp", when one is not the first):
        # a serve of the previous release shows what it pops from "k" as a screen ("my_list@1" was none), and
        # drops "kp" when it writes the session, whose Back then shows those lists' first pages.
        entries = [entry.partition(PAGE) for entry in state.stack]
        out["k"] = [screen for screen, _, _ in entries]
        if any(page for _, _, page in entries):
            out["kp"] = [int(page) if page.isdigit() else 0 for _, _, page in entries]
    if state.data:
        out["d"] = state.data
    if state.page:
        out["p"] = state.page
    if state.ids:
        out["i"], out["f"] = state.ids, state.first
    if state.ended:
        out["e"] = 1
    return out


def decode_state(obj: dict[str, Any]) -> State:
    stack, pages = list(obj.get("k", [])), obj.get("kp")
    if isinstance(pages, list) and len(pages) == len(stack):
        stack = [f"{screen}{PAGE}{page}" if page else screen for screen, page in zip(stack, pages, strict=True)]
    return State(screen=obj["s"], stack=stack, data=dict(obj.get("d", {})),
                 page=int(obj.get("p", 0)), ids=list(obj.get("i", [])), first=int(obj.get("f", 1)),
                 lang=obj.get("l", "en"), ended=bool(obj.get("e")))


def encode(stored: Stored) -> bytes:
    out: dict[str, Any] = {"st": encode_state(stored.state), "h": stored.hops, "t": round(stored.started, 3)}
    if stored.acc is not None:
        out["a"] = stored.acc
    if stored.hop is not None:
        out["hk"] = stored.hop
    if stored.reply is not None:
        out["r"] = [stored.reply[0], 1 if stored.reply[1] else 0]
    if stored.owner is not None:
        out["o"] = stored.owner
    if stored.sequence is not None:
        out["q"] = stored.sequence
    # orjson: the same bytes as json.dumps(separators=(",", ":"), ensure_ascii=False), in a twentieth of the time
    # (a hop encodes one session and decodes one).
    return orjson.dumps(out)


def decode(raw: bytes) -> Stored:
    obj = orjson.loads(raw)
    reply = obj.get("r")
    return Stored(state=decode_state(obj["st"]), acc=obj.get("a"), hop=obj.get("hk"),
                  reply=(reply[0], bool(reply[1])) if reply else None, hops=int(obj.get("h", 0)),
                  started=float(obj.get("t", 0.0)), owner=obj.get("o"),
                  sequence=int(obj["q"]) if "q" in obj else None)


def _seen(raw: bytes) -> str:
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()  # as Lua's redis.sha1hex() spells it


async def load(redis: Any, aggregator: str, session_id: str) -> Stored | None:
    return _loaded(await redis.get(session_key(aggregator, session_id)))


async def load_opening(redis: Any, aggregator: str, session_id: str, blind_index: str
                       ) -> tuple[Stored | None, tuple[bool, str | None]]:
    """load() and opening_facts() of the phone (by its blind index) in one round trip, for a hop that opens a
    session: its first hop wants both, and each round trip costs more than the reply of the one it saves."""
    lang_key, route_key = phone_keys(blind_index)
    pipe = redis.pipeline(transaction=False)
    pipe.get(session_key(aggregator, session_id))
    # MGET as a raw command: a cluster client's pipeline refuses its mget() (keys of any slots), though both keys
    # share the phone's hash tag (one slot), which is all the node needs.
    pipe.execute_command("MGET", route_key, lang_key)
    raw, (route, lang) = await pipe.execute()
    return _loaded(raw), _facts(route, lang)


def _loaded(raw: bytes | None) -> Stored | None:
    if not raw:
        return None
    stored = decode(raw)
    stored.seen = _seen(raw)
    return stored


async def save(redis: Any, aggregator: str, session_id: str, stored: Stored, *,
               resume: tuple[PiiCipher, Phone, bool] | None = None, funnel: Sequence[str] = ()) -> Stored | None:
    """Write the session (and set or clear the phone's resume route) in one round trip; None when written.

    `resume` is (cipher, phone, keep): keep=True stores the current route, False clears it.
    `funnel` names the ops funnel counters this hop adds to (channels.ussd.funnel), in the same trip.

    Compare-and-set: a session read from Redis (stored.seen) is written only if it is still what was read.
    Two copies of one hop at once (an aggregator's retry answered by another serve process) each step from
    the same session; the first to save wins and the other gets the winner's session back (returned) to
    answer with: otherwise the later save replaced what the member had been shown, such as the payment
    reference reserved on the confirmation screen. The comparison runs in Redis (a script in place of the
    SET): no extra round trip.
    """
    if stored.started == 0.0:
        stored.started = time.time()
    session = session_key(aggregator, session_id)
    value = encode(stored)
    if resume is None and not funnel:
        # Most hops (home, language) touch no resume route: one command, no pipeline's overhead.
        if stored.seen is None:
            await redis.set(session, value, ex=SESSION_TTL)
            return None
        return _saved(stored, value, await redis.eval(_SAVE_IF_UNCHANGED, 1, session, stored.seen, value,
                                                       SESSION_TTL))
    pipe = redis.pipeline(transaction=False)
    if stored.seen is None:
        pipe.set(session, value, ex=SESSION_TTL)
    else:
        pipe.eval(_SAVE_IF_UNCHANGED, 1, session, stored.seen, value, SESSION_TTL)
    if resume is not None:
        cipher, phone, keep = resume
        if keep:
            pipe.set(resume_key(cipher, phone), _route(stored.state), ex=RESUME_TTL)
        else:
            pipe.delete(resume_key(cipher, phone))
    hour = funnel_key(utcnow()) if funnel else ""
    if funnel:
        # One command for the hour's counters (one key: any cluster node runs it) instead of an HINCRBY per
        # field and an EXPIRE, each a reply of its own in the pipeline.
        pipe.eval(_COUNT_FIELDS, 1, hour, FUNNEL_TTL, *funnel)
    winner = _saved(stored, value, (await pipe.execute())[0])
    if winner is None and funnel:
        stored.counted_in = hour
    if winner is not None:
        # The route and the counters are other keys (other cluster slots): they were written all the same.
        # Rare (the copy that lost a race), so set right after: the winner's route, and the counts taken back.
        await _undo(redis, winner, resume, hour, funnel)
    return winner


async def unsave(redis: Any, aggregator: str, session_id: str, stored: Stored, *, funnel: Sequence[str] = ()) -> bool:
    """Take back what save() wrote of `stored` (just saved: stored.seen is what it wrote) and the funnel counters it
    added, in one round trip: the session is removed unless something wrote it since. The counters are taken from
    the hour save() counted them in (stored.counted_in), also when the hour has turned since: taken from the new
    hour's, they were left counted in the old one and made the new one's key at -1, with no expiry.

    False when the session was left: another copy of the hop answered from it (claimed, _CLAIM) or a later hop wrote
    it, and its member goes on from it; the counters, taken back in the same trip (another key: another cluster
    slot), are then counted again (a second round trip, on that rare path only)."""
    pipe = redis.pipeline(transaction=False)
    pipe.eval(_DELETE_IF_UNCHANGED, 1, session_key(aggregator, session_id), stored.seen or "")
    hour = stored.counted_in if funnel else None
    if hour:
        pipe.eval(_UNCOUNT_FIELDS, 1, hour, *funnel)
        stored.counted_in = None
    outcome = (await pipe.execute())[0]
    if outcome != 2:
        return True
    if hour:
        await redis.eval(_COUNT_FIELDS, 1, hour, FUNNEL_TTL, *funnel)
    return False


async def claim(redis: Any, aggregator: str, session_id: str, stored: Stored) -> None:
    """A copy of an opening hop answering from the session it read (`stored`) claims it, in one round trip: the copy
    that saved it, should its row write fail, leaves it (unsave). Only a replay of an opening hop's answer calls this:
    no other hop's path."""
    await redis.eval(_CLAIM_READ, 1, session_key(aggregator, session_id), stored.seen or "", encode(stored),
                     SESSION_TTL)


def _saved(stored: Stored, value: bytes, outcome: Any) -> Stored | None:
    """None when the session was written (what it now holds is what a later save compares against), else
    the session another copy of the hop saved first."""
    if not isinstance(outcome, bytes | str):  # 1 from the script, True from a plain SET
        stored.seen = _seen(value)
        return None
    raw = outcome.encode() if isinstance(outcome, str) else outcome
    winner = decode(raw)
    winner.seen = _seen(raw)
    return winner


async def _undo(redis: Any, winner: Stored, resume: tuple[PiiCipher, Phone, bool] | None, hour: str,
                funnel: Sequence[str]) -> None:
    pipe = redis.pipeline(transaction=False)
    if resume is not None:
        cipher, phone, _keep = resume
        if winner.state.data.get("rk") and not winner.state.ended:  # the winner keeps a route (service._answer)
            pipe.set(resume_key(cipher, phone), _route(winner.state), ex=RESUME_TTL)
        else:
            pipe.delete(resume_key(cipher, phone))
    if funnel:
        pipe.eval(_UNCOUNT_FIELDS, 1, hour, *funnel)
    await pipe.execute()


def _route(state: State) -> bytes:
    return orjson.dumps(_state(encode_state(state)))


def language_key(cipher: PiiCipher, phone: Phone) -> str:
    """A phone's last chosen language, for when it belongs to no cooperative (members' rows carry theirs,
    and win). Same hash tag as the resume route: one slot, read with it in one command."""
    return phone_keys(cipher.blind_index(phone.e164))[0]


LANGUAGE_TTL = 90 * 24 * 3600


async def opening_facts(redis: Any, cipher: PiiCipher, phone: Phone) -> tuple[bool, str | None]:
    """For a session's first hop, in one round trip: whether a resume route waits, and the language a
    phone that belongs to no cooperative chose before (on any server: not only this process's memory)."""
    return _facts(*await redis.mget(resume_key(cipher, phone), language_key(cipher, phone)))


def _facts(route: bytes | None, lang: bytes | str | None) -> tuple[bool, str | None]:
    return route is not None, lang.decode() if isinstance(lang, bytes) else lang


async def remember_language(redis: Any, cipher: PiiCipher, phone: Phone, lang: str) -> None:
    await redis.set(language_key(cipher, phone), lang, ex=LANGUAGE_TTL)


def phone_keys(blind_index: str) -> tuple[str, str]:
    """A number's language and resume route keys (language_key, resume_key), by its blind index."""
    return f"ussd:{{ph:{blind_index}}}:lang", f"ussd:{{ph:{blind_index}}}:resume"


async def forget_phone(redis: Any, blind_index: str) -> None:
    """The language and resume route of a number no longer its member's (released, corrected, erased): its next
    holder, given the number by the operator, is neither greeted in the previous holder's language nor offered
    their session."""
    await redis.delete(*phone_keys(blind_index))


async def load_resume(redis: Any, cipher: PiiCipher, phone: Phone) -> State | None:
    raw = await redis.get(resume_key(cipher, phone))
    if not raw:
        return None
    try:
        return decode_state(orjson.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None

