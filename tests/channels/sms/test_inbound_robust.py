"""Inbound keyword SMS as handsets really send them (decomposed accents, invisible characters, full-width
letters), and a STOP that holds when Redis, which only the reply's rate limit needs, is failing."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
import redis.exceptions
from sqlalchemy import select

from channels.sms.routes import fold, parse_keyword
from core.models import AuditEvent, Member
from core.ratelimit import RateLimiter
from tests.channels.sms.helpers import jobs_of
from tests.channels.sms.test_routes import ALINE, STRANGER, inbound
from tests.conftest import drain


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (nfd("ARRÊT"), ("STOP", "fr", None)),  # the accent as a combining mark (U+0302)
        ("ARRÊT", ("STOP", "fr", None)),  # precomposed, as the catalog spells it
        (nfd("Reçu PAY_20260115_001"), ("RECEIPT", "fr", "PAY_20260115_001")),
        (nfd("état PAY_1"), ("STATUS", "fr", "PAY_1")),
        ("DÉMARRER", ("START", "fr", None)),  # the catalog has only DEMARRER: accents fold away
        ("\ufeffSTOP", ("STOP", "en", None)),  # a BOM some handsets put before a UCS-2 text
        ("STOP\u200b", ("STOP", "en", None)),  # zero-width space
        ("\u2060stop\u200d.", ("STOP", "en", None)),  # word joiner, zero-width joiner
        ("ＳＴＯＰ", ("STOP", "en", None)),  # full-width (CJK and Arabic keyboards)
        ("ｒｅｃｅｉｐｔ\u00a0ＰＡＹ＿２０２６０１１５＿００１", ("RECEIPT", "en", "PAY_20260115_001")),
        ("ＨＡＧＡＲＩＫＡ", ("STOP", "rw", None)),
        ("\u200b", (None, None, None)),
        ("ARRÊTEZ", (None, None, None)),  # folding does not make prefixes match
    ],
)
def test_keyword_variants_are_recognised(text: str, expected: tuple[Any, ...]) -> None:
    assert parse_keyword(text) == expected


def test_fold() -> None:
    assert fold(nfd("Reçu")) == fold("REÇU") == "RECU"
    assert fold("\ufeffＳｔｏｐ\u200b") == "STOP"


async def test_stop_with_a_bom_opts_out_and_gets_the_opt_out_reply(
    rt: Any, demo: dict[str, Any], sms_client: Any, sim: Any, worker: Any
) -> None:
    await inbound(sms_client, ALINE, "\ufeffSTOP", "in-bom")
    await inbound(sms_client, STRANGER, nfd("ARRÊT"), "in-nfd")
    async with rt.sessionmaker() as session:
        member = await session.get(Member, demo["members"][ALINE])
    assert member.reminders_opt_out is True
    await drain(worker)
    assert sim.messages(ALINE)[-1]["message"].startswith("Ntuzongera")  # opted out, in her language
    assert sim.messages(STRANGER)[-1]["message"].startswith("Vous ne recevrez plus de rappels")


@pytest.fixture
def redis_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarting: the reply rate limiter's call fails."""

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Error 111 connecting to redis: Connection refused")

    monkeypatch.setattr(RateLimiter, "hit_all_once", down)


async def test_stop_holds_when_the_reply_rate_limit_cannot_be_checked(
    rt: Any, demo: dict[str, Any], sms_client: Any, worker: Any, redis_failing: None
) -> None:
    response = await inbound(sms_client, ALINE, "STOP", "in-redis-down")  # answered 200
    assert await response.text() == ""
    async with rt.sessionmaker() as session:
        member = await session.get(Member, demo["members"][ALINE])
        audits = (
            await session.execute(select(AuditEvent).where(AuditEvent.action == "member.reminders_opt_out"))
        ).scalars().all()
    assert member.reminders_opt_out is True
    assert [(a.entity_id, a.after) for a in audits] == [(member.id, {"remindersOptOut": True})]
    # The reply is what is skipped.
    assert await jobs_of(rt, "sms.send") == []
    # START the same way.
    await inbound(sms_client, ALINE, "START", "in-redis-down-2")
    async with rt.sessionmaker() as session:
        member = await session.get(Member, demo["members"][ALINE])
    assert member.reminders_opt_out is False
    assert await jobs_of(rt, "sms.send") == []


@pytest.mark.parametrize("route", ["inbound", "delivery"])
async def test_a_form_in_a_charset_no_codec_knows_is_a_400_not_a_500(sms_client: Any, route: str) -> None:
    """`Content-Type: ...; charset=bogus` made aiohttp raise LookupError: a 500 and an ERROR traceback per call."""
    response = await sms_client.post(f"/sms/africastalking/{route}", data=b"from=%2B250788000001&text=STOP",
                                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=bogus"})
    assert (response.status, await response.text()) == (400, "body is not a readable form")
