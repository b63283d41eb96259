"""A confused member's random walk through all three aggregators, with a fixed seed: random keys, 0/00/98/#,
empty and very long input, another language's words, options that are not on the screen, sessions that time
out and are dialled again, codes that already carry choices, two phones at once. After every hop the reply must
be a valid body of the aggregator's format that fits its screen, in the member's language, with no Python error
or internal id; Back returns to the screen before; and every confirmed payment is one payment row and one collect
job."""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from channels.ussd.i18n import LANGUAGES, catalog
from core import gsm
from core.audit import Actor
from core.members import create_member
from core.models import Cooperative, OutboxJob, Payment, PaymentType
from core.phone import normalize

SEED = int(os.environ.get("WALK_SEED", "20261203"))  # another seed explores further; the suite keeps this one
HOPS = int(os.environ.get("WALK_HOPS", "400"))

RW_MTN, EN_MTN, FR_AIRTEL, SW_AIRTEL = "+250788000001", "+250788000002", "+250733000001", "+250733000002"
INACTIVE = "+250788000009"  # a member of a cooperative whose payment types are all inactive
GH_MTN = "+233531234567"
KE_SAF = "+254113345678"
STRANGER = "+250788999999"

WORDS = ["yego", "oya", "oui", "non", "ndiyo", "hapana", "yes", "back", "retour", "#", "*", "1*2", "0 ", " 1",
         "١", "01", "001", "98", "99", "100", "-1", "1.5", "50000", "é", "Amakuru", "Murakoze cyane", "\u2019"]
LEAKS = re.compile(r"Traceback|Exception|Error\b|KeyError|NoneType|None\b|\{[a-z_]*\}|\b[0-9a-f]{8}-[0-9a-f]{4}-"
                   r"|\b[0-9a-f]{32}\b|object at 0x|ussd:|i:[0-9a-f]")
# Short texts that belong to one language only: seeing another language's on a screen is a wrong-language hop.
SIGNS = ("nav.back", "nav.home", "nav.more", "error.invalid_choice", "confirm.yes", "confirm.no", "menu.pay",
         "menu.my", "menu.help", "pay.types", "my.title", "resume.title", "lang.title", "error.generic")


def _signs(lang: str) -> list[tuple[str, str]]:
    mine = {catalog(lang)[k] for k in SIGNS if k in catalog(lang)}
    found = []
    for other in LANGUAGES:
        if other == lang:
            continue
        for key in SIGNS:
            text = catalog(other).get(key)
            if text and text not in mine and not any(text in m for m in mine) and len(text) >= 4:
                found.append((other, gsm.to_gsm(text)))
    return found


@dataclass
class Phone:
    number: str
    aggregator: str
    lang: str
    session: str = ""
    hops: int = 0
    inputs: list[str] = field(default_factory=list)
    screen: str | None = None  # the text shown now (None: no session open)
    clean: str = ""  # the screen shown now without an error line
    history: list[str] = field(default_factory=list)  # screens before this one, for Back
    log: list[str] = field(default_factory=list)


class Walk:
    def __init__(self, client: Any, rng: random.Random) -> None:
        self.client, self.rng = client, rng
        self.count = 0
        self.confirmed: set[tuple[str, str]] = set()
        self.log: list[tuple[str, str, str]] = []  # (aggregator, session) that reached a payment's END

    def fail(self, phone: Phone, why: str) -> None:
        raise AssertionError(f"{why}\n--- {phone.number} via {phone.aggregator} ({phone.lang}):\n"
                             + "\n".join(f"[{agg}] {line}" for n, agg, line in self.log[-60:]
                                         if n == phone.number)[-6000:])

    async def hop(self, phone: Phone, key: str | None, *, dialled: str = "*384*123#") -> str:
        """One request; key None opens a session. Returns the reply's text and checks the format."""
        if key is None:
            self.count += 1
            phone.session = f"walk-{phone.aggregator}-{self.count}"
            phone.hops, phone.inputs = 0, []
        phone.hops += 1
        if phone.aggregator == "africastalking":
            code, text = "*384*123#", ""
            if key is None and dialled != "*384*123#":
                if self.rng.random() < 0.5:
                    code = dialled
                else:
                    text = dialled.rstrip("#")[len("*384*123*"):]
                    phone.inputs = text.split("*")
            if key is not None:
                phone.inputs.append(key)
                text = "*".join(phone.inputs)
            resp = await self.client.post("/ussd/africastalking", data={
                "sessionId": phone.session, "serviceCode": code, "phoneNumber": phone.number,
                "networkCode": "63510", "text": text})
            body = await resp.text()
            phone.log.append(f"> {key!r} [{text[-40:]!r}]\n{body}")
            if resp.status != 200 or resp.content_type != "text/plain" or not body.startswith(("CON ", "END ")):
                self.fail(phone, f"not a CON/END body: {resp.status} {body!r}")
            end, message = body.startswith("END "), body[4:]
            limit = 182
        elif phone.aggregator == "hubtel":
            resp = await self.client.post("/ussd/hubtel", json={
                "Mobile": phone.number.lstrip("+"), "SessionId": phone.session, "ServiceCode": "384*123",
                "Type": "Initiation" if key is None else "Response", "Message": dialled if key is None else key,
                "Operator": "mtn", "Sequence": phone.hops, "ClientState": f"s{phone.hops}"})
            raw = await resp.text()
            phone.log.append(f"> {key!r}\n{raw}")
            if resp.status != 200 or resp.content_type != "application/json":
                self.fail(phone, f"not a Hubtel reply: {resp.status} {raw!r}")
            body = json.loads(raw)
            if body.get("Type") not in ("Response", "Release") or body.get("ClientState") != f"s{phone.hops}":
                self.fail(phone, f"bad Hubtel reply {body!r}")
            end, message = body["Type"] == "Release", body["Message"]
            limit = 182
        else:
            resp = await self.client.post("/ussd/nalo", json={
                "USERID": "NALOTest", "MSISDN": phone.number.lstrip("+"), "USERDATA": dialled if key is None else key,
                "MSGTYPE": key is None, "NETWORK": "MTN", "SESSIONID": phone.session})
            raw = await resp.text()
            phone.log.append(f"> {key!r}\n{raw}")
            if resp.status != 200 or resp.content_type != "application/json":
                self.fail(phone, f"not a Nalo reply: {resp.status} {raw!r}")
            body = json.loads(raw)
            if body.get("USERID") != "NALOTest" or not isinstance(body.get("MSGTYPE"), bool):
                self.fail(phone, f"bad Nalo reply {body!r}")
            end, message = not body["MSGTYPE"], body["MSG"]
            limit = 120
        self.log.append((phone.number, phone.aggregator, phone.log[-1]))
        self.check(phone, message, limit)
        return ("END " if end else "CON ") + message

    def check(self, phone: Phone, message: str, limit: int) -> None:
        if not message.strip():
            self.fail(phone, "empty screen")
        if not gsm.is_gsm(message):
            # One character outside GSM-7 makes the whole screen UCS-2: 70-80 characters, not 182.
            self.fail(phone, f"screen is not GSM-7: {[c for c in message if not gsm.is_gsm(c)]}")
        if gsm.length(message) > limit:
            self.fail(phone, f"screen is {gsm.length(message)} septets, over {limit}")
        leak = LEAKS.search(message)
        if leak:
            self.fail(phone, f"internal text on the screen: {leak.group(0)!r}")
        for other, sign in _signs(phone.lang):
            if sign in message.split("\n") or (len(sign) > 9 and sign in message):
                self.fail(phone, f"{other} text {sign!r} on a screen for a {phone.lang} speaker")


def _random_key(rng: random.Random, screen: str) -> str:
    roll = rng.random()
    if roll < 0.6:
        shown = re.findall(r"^(\d+)\. ", screen, re.M)
        # Mostly the first option: Pay, the first type, Confirm (a walk that never pays checks nothing).
        return (shown[0] if rng.random() < 0.5 else rng.choice(shown)) if shown else str(rng.randint(1, 5))
    if roll < 0.6:
        return str(rng.randint(0, 9))
    if roll < 0.68:
        return rng.choice(["0", "00", "98"])
    if roll < 0.73:
        return ""
    if roll < 0.77:
        return rng.choice(["9" * 200, "1" * 150, "A" * 180, "Jean " * 30])
    return rng.choice(WORDS)


async def _world(rt: Any) -> None:
    """The demo cooperative (Rwanda) plus: a second one Aline also belongs to, one whose payment types are all
    inactive, one in Ghana and one in Kenya."""
    actor = Actor("system", "system")
    async with rt.sessionmaker.begin() as s:
        def coop(name: str, ext: str, country: str, currency: str) -> Cooperative:
            row = Cooperative(name=name, short_code=f"W{ext}", country=country, currency=currency, status="ACTIVE",
                              ussd_extension=ext, self_registration=True, contact_phone="+250788123456")
            s.add(row)
            return row

        second = coop("Abahinzi Coffee Growers", "77", "RW", "RWF")
        idle = coop("Ubumwe Savings", "78", "RW", "RWF")
        ghana = coop("Accra Traders Union", "45", "GH", "GHS")
        kenya = coop("Nairobi Matatu Sacco", "46", "KE", "KES")
        await s.flush()
        s.add(PaymentType(cooperative_id=second.id, name="Savings", amount_minor=2_000, currency="RWF",
                          is_active=True))
        s.add(PaymentType(cooperative_id=idle.id, name="Old levy", amount_minor=1_000, currency="RWF",
                          is_active=False))
        s.add(PaymentType(cooperative_id=ghana.id, name="Dues", amount_minor=2_000, currency="GHS", is_active=True))
        s.add(PaymentType(cooperative_id=kenya.id, name="Daily levy", amount_minor=10_000, currency="KES",
                          allow_custom_amount=True, is_active=True))
        for coop_id, number, lang in ((second.id, RW_MTN, "rw"), (idle.id, INACTIVE, "fr"),
                                      (ghana.id, GH_MTN, "en"), (kenya.id, KE_SAF, "sw")):
            await create_member(s, rt.cipher, cooperative_id=coop_id, name="Walk Member", phone=normalize(number),
                                language=lang, actor=actor)


CODES = ["*384*123#", "*384*123*1#", "*384*123*1*2#", "*384*123*77#", "*384*123*77*1#", "*384*123*45#",
         "*384*123*46*1*1#", "*384*123*9#", "*384*123*123*1#"]


async def test_a_confused_members_walk_keeps_every_screen_valid(client: Any, demo: Any, rt: Any, db: Any) -> None:
    await _world(rt)
    rng = random.Random(SEED)
    walk = Walk(client, rng)
    # One phone has one session at a time; each dial goes through one of the three aggregators.
    phones = [Phone(n, "", lang) for n, lang in ((RW_MTN, "rw"), (EN_MTN, "en"), (FR_AIRTEL, "fr"),
                                                 (SW_AIRTEL, "sw"), (INACTIVE, "fr"), (GH_MTN, "en"),
                                                 (KE_SAF, "sw"), (STRANGER, "en"))]
    for _ in range(HOPS):
        phone = rng.choice(phones)  # phones interleave: two (or more) sessions at once
        if phone.screen is None or rng.random() < 0.04:
            # Dial (again: a session that timed out is simply never answered; a new session id opens).
            phone.aggregator = rng.choice(["africastalking", "hubtel", "nalo"])
            dialled = rng.choice(CODES) if rng.random() < 0.3 else "*384*123#"
            reply = await walk.hop(phone, None, dialled=dialled)
            phone.history, phone.clean = [], reply
        else:
            key = _random_key(rng, phone.screen)
            on_language = all(w in phone.clean for w in ("Kiswahili", "Ikinyarwanda", "English"))
            meant = _meant(key)
            chose = on_language and meant in ("1", "2", "3", "4")
            saved = phone.lang
            if chose:
                phone.lang = {"1": "en", "2": "rw", "3": "fr", "4": "sw"}[meant]
            reply = await walk.hop(phone, key)
            stayed = _same(reply, phone.clean)
            if chose and stayed:
                phone.lang = saved
            if meant == "0" and "\n0. " in phone.clean and not reply.startswith("END") and not stayed:
                expected = phone.history.pop() if phone.history else reply  # unknown before the walk's start
                if not _same(reply, expected):
                    walk.fail(phone, f"Back did not return to the previous screen:\n{expected}")
            elif meant == "00" or chose:
                phone.history = []
            elif not stayed and reply.startswith("CON") and not _is_offer(phone.clean):
                # Forward (98. More included: Back from a second page is the first). The offer to continue is
                # not a screen Back returns to.
                phone.history.append(phone.clean)
            if not stayed:
                phone.clean = reply
        if reply.startswith("END"):
            if _paid(reply):
                walk.confirmed.add((phone.aggregator, phone.session))
            phone.screen = None
        else:
            phone.screen = reply
    payments = await db.all(Payment)
    keys = {p.idempotency_key for p in payments}
    assert len(keys) == len(payments)
    for aggregator, session in walk.confirmed:
        assert f"ussd:{aggregator}:{session}" in keys, (aggregator, session)
    jobs = await db.all(OutboxJob, OutboxJob.kind == "payment.collect")
    assert sorted(j.payload["payment_id"] for j in jobs) == sorted(p.id for p in payments)
    assert walk.confirmed, "the walk never paid: widen it"


def _meant(key: str) -> str:
    """The key as the menus read it: the Send key ("#") left on it dropped, digits of any script ASCII, a choice
    padded with one zero ("01", "٠١") its number, with more ("001") none; "0" and "00" themselves."""
    typed = "".join(str(unicodedata.decimal(c, c)) for c in key.strip().rstrip("#").rstrip())
    padded = typed.isascii() and typed.isdigit() and typed.strip("0") and not typed.startswith("00")
    return typed.removeprefix("0") if padded else typed


def _same(reply: str, screen: str) -> bool:
    """The reply is this screen, perhaps with an error line on top (which on a small screen replaces the title, or
    shortens a confirmation's summary)."""
    if reply == screen:
        return True
    first = reply[4:].split("\n")[0]
    return reply[:4] == screen[:4] and any(first.startswith(e) for e in ERRORS) \
        and _options(reply) == _options(screen)


ERRORS = {gsm.to_gsm(catalog(lang)[k].split("{")[0]) for lang in LANGUAGES for k in (
    "error.invalid_choice", "error.invalid_input", "pay.amount_invalid", "pay.amount_invalid_decimal",
    "pay.amount_too_big", "reg.code_unknown", "reg.name_invalid") if k in catalog(lang)}


def _options(reply: str) -> list[str]:
    return re.findall(r"^\d+\. .*$", reply[4:], re.M)


def _is_offer(reply: str) -> bool:
    return any(gsm.to_gsm(catalog(lang)["resume.title"]) in reply for lang in LANGUAGES)


def _paid(reply: str) -> bool:
    return any(gsm.to_gsm(catalog(lang)["pay.done"].split("{")[0]) in reply for lang in LANGUAGES)


async def test_back_from_a_payment_chosen_on_the_second_page_returns_to_that_page(client: Any, demo: Any) -> None:
    """Found by the walk: on Nalo's 120 characters "My payments" takes two pages; she pressed 98, chose the
    payment on the second page, and Back from its detail showed the first page, where the payment she had looked
    at was not (Back is the screen before, as everywhere else)."""
    from tests.channels.ussd.test_hubtel_nalo_flows import nalo

    for n, (session, kind) in enumerate((("nalo-back-1", "1"), ("nalo-back-2", "2"))):
        await nalo(client, session, "*384*123#", True, EN_MTN)
        await nalo(client, session, "1", False, EN_MTN)
        await nalo(client, session, kind, False, EN_MTN)
        done = await nalo(client, session, "1", False, EN_MTN)
        assert done["MSGTYPE"] is False and done["MSG"].startswith("Approve"), (n, done)
    await nalo(client, "nalo-back-3", "*384*123#", True, EN_MTN)
    first = await nalo(client, "nalo-back-3", "2", False, EN_MTN)
    assert "\n98. More" in first["MSG"], first
    second = await nalo(client, "nalo-back-3", "98", False, EN_MTN)
    assert second["MSG"].startswith("Your recent payments:\n2. "), second
    detail = await nalo(client, "nalo-back-3", "2", False, EN_MTN)
    assert detail["MSG"].split("\n")[0] in second["MSG"], detail  # the payment of the second page
    back = await nalo(client, "nalo-back-3", "0", False, EN_MTN)
    assert back["MSG"] == second["MSG"]
    assert (await nalo(client, "nalo-back-3", "0", False, EN_MTN))["MSG"] == first["MSG"]
