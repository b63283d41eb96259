"""USSD sessions in Redis: one compact key per session, written with its TTL in one round trip.

Keys carry a hash tag so Redis Cluster keeps each key on one slot:
  ussd:{at:<session id>}           the whole session (screen, back stack, data, last hop and reply)
  ussd:{ph:<blind index>}:resume   the route of a session dropped before END, offered on the next dial
  ussd:{ph:<blind index>}:lang     the language a phone of no cooperative chose
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from channels.ussd.engine import State
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


def session_key(aggregator: str, session_id: str) -> str:
    tag = ABBREVIATIONS.get(aggregator, aggregator[:8])
    # Braces or odd bytes in an aggregator's id must not break the hash tag.
    safe = session_id if _SAFE_ID.match(session_id) else hashlib.sha256(session_id.encode()).hexdigest()[:40]
    return f"ussd:{{{tag}:{safe}}}"


def resume_key(cipher: PiiCipher, phone: Phone) -> str:
    return f"ussd:{{ph:{cipher.blind_index(phone.e164)}}}:resume"


def _state(obj: dict[str, Any]) -> dict[str, Any]:
    return {"s": obj["s"], "k": obj.get("k", []), "d": obj.get("d", {}), "l": obj.get("l", "en")}


def encode_state(state: State) -> dict[str, Any]:
    out: dict[str, Any] = {"s": state.screen, "l": state.lang}
    if state.stack:
        out["k"] = state.stack
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
    return State(screen=obj["s"], stack=list(obj.get("k", [])), data=dict(obj.get("d", {})),
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
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes) -> Stored:
    obj = json.loads(raw)
    reply = obj.get("r")
    return Stored(state=decode_state(obj["st"]), acc=obj.get("a"), hop=obj.get("hk"),
                  reply=(reply[0], bool(reply[1])) if reply else None, hops=int(obj.get("h", 0)),
                  started=float(obj.get("t", 0.0)), owner=obj.get("o"),
                  sequence=int(obj["q"]) if "q" in obj else None)


async def load(redis: Any, aggregator: str, session_id: str) -> Stored | None:
    raw = await redis.get(session_key(aggregator, session_id))
    return decode(raw) if raw else None


async def save(redis: Any, aggregator: str, session_id: str, stored: Stored, *,
               resume: tuple[PiiCipher, Phone, bool] | None = None, funnel: Sequence[str] = ()) -> None:
    """Write the session (and set or clear the phone's resume route) in one round trip.

    `resume` is (cipher, phone, keep): keep=True stores the current route, False clears it.
    `funnel` names the ops funnel counters this hop adds to (channels.ussd.funnel), in the same trip.
    """
    if stored.started == 0.0:
        stored.started = time.time()
    if resume is None and not funnel:
        # Most hops (home, language) touch no resume route: a plain SET skips the pipeline's overhead.
        await redis.set(session_key(aggregator, session_id), encode(stored), ex=SESSION_TTL)
        return
    pipe = redis.pipeline(transaction=False)
    pipe.set(session_key(aggregator, session_id), encode(stored), ex=SESSION_TTL)
    if resume is not None:
        cipher, phone, keep = resume
        key = resume_key(cipher, phone)
        if keep:
            route = json.dumps(_state(encode_state(stored.state)), separators=(",", ":"), ensure_ascii=False)
            pipe.set(key, route.encode(), ex=RESUME_TTL)
        else:
            pipe.delete(key)
    if funnel:
        # One command for the hour's counters (one key: any cluster node runs it) instead of an HINCRBY per
        # field and an EXPIRE, each a reply of its own in the pipeline.
        pipe.eval(_COUNT_FIELDS, 1, funnel_key(utcnow()), FUNNEL_TTL, *funnel)
    await pipe.execute()


def language_key(cipher: PiiCipher, phone: Phone) -> str:
    """A phone's chosen language when it belongs to no cooperative (members keep theirs on their rows).
    Same hash tag as the resume route: one slot, read with it in one command."""
    return f"ussd:{{ph:{cipher.blind_index(phone.e164)}}}:lang"


LANGUAGE_TTL = 90 * 24 * 3600


async def opening_facts(redis: Any, cipher: PiiCipher, phone: Phone) -> tuple[bool, str | None]:
    """For a session's first hop, in one round trip: whether a resume route waits, and the language a
    phone that belongs to no cooperative chose before (on any server: not only this process's memory)."""
    route, lang = await redis.mget(resume_key(cipher, phone), language_key(cipher, phone))
    return route is not None, lang.decode() if isinstance(lang, bytes) else lang


async def remember_language(redis: Any, cipher: PiiCipher, phone: Phone, lang: str) -> None:
    await redis.set(language_key(cipher, phone), lang, ex=LANGUAGE_TTL)


async def load_resume(redis: Any, cipher: PiiCipher, phone: Phone) -> State | None:
    raw = await redis.get(resume_key(cipher, phone))
    if not raw:
        return None
    try:
        return decode_state(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


async def drop_resume(redis: Any, cipher: PiiCipher, phone: Phone) -> None:
    await redis.delete(resume_key(cipher, phone))
