"""On a shared short code members start every text with the deployment's keyword ("KHHC STOP"); Africa's Talking
forwards the text whole. SMS_SHORTCODE_KEYWORDS names those words: a text's first word among them is not read as
its command (the STOP was read as an unknown word, the number kept getting reminders, and was told to send HELP)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import select

from app import create_app
from channels.sms.encoding import GSM7, measure
from channels.sms.routes import parse_keyword
from channels.sms.templates import CATALOGS, KEYWORD_PREFIX, TEMPLATES, render
from core.config import ConfigError
from core.models import PhoneOptOut
from tests.channels.sms.test_routes import ALINE, inbound
from tests.channels.sms.test_templates import ONE_PART, worst_case
from tests.conftest import make_settings


def test_the_shared_codes_keyword_before_a_command_is_skipped() -> None:
    assert parse_keyword("KHHC stop", ("KHHC",)) == ("STOP", "en", None)
    assert parse_keyword("khhc: risiti pay_20251016_001", ("KHHC",)) == ("RECEIPT", "sw", "PAY_20251016_001")
    assert parse_keyword("KHHC", ("KHHC",)) == (None, None, None)  # the keyword alone: not understood, HELP told
    assert parse_keyword("KHHC stop", ()) == (None, None, "STOP")  # without the setting, as before


def test_the_setting_is_read_upper_case_and_refuses_what_is_not_one_word() -> None:
    assert make_settings(SMS_SHORTCODE_KEYWORDS=" khhc , Coop2 ").sms_shortcode_keywords == ("KHHC", "COOP2")
    assert make_settings().sms_shortcode_keywords == ()
    with pytest.raises(ConfigError, match="SMS_SHORTCODE_KEYWORDS"):
        make_settings(SMS_SHORTCODE_KEYWORDS="K-HHC")


def _accepted(word: str) -> bool:
    try:
        make_settings(SMS_SHORTCODE_KEYWORDS=word)
    except ConfigError:
        return False
    return True


def test_replies_keep_their_size_with_the_longest_keyword_the_setting_accepts() -> None:
    """Each reply names the word before every keyword (four times in HELP): a longer word than the replies have room
    for made HELP two parts to pay for ("KIGALIHEIGHTS"), or more, and is refused at start-up."""
    longest = max(n for n in range(1, 41) if _accepted("K" * n))
    assert not _accepted("K" * (longest + 1))
    for language in CATALOGS:
        for template in TEMPLATES:
            values = {**worst_case(template, language), KEYWORD_PREFIX: "K" * longest}
            size = measure(render(template, language, values))
            assert size.encoding == GSM7 and size.segments <= (1 if template in ONE_PART else 3), (template, language)


async def test_a_keyword_that_is_a_command_is_refused_at_start_up(rt: Any) -> None:
    """'STOP' as the short code's keyword would swallow every member's STOP."""
    with pytest.raises(ConfigError, match="'STOP' is an SMS command"):
        create_app(dataclasses.replace(rt.settings, sms_shortcode_keywords=("STOP",)), runtime=rt)
    with pytest.raises(ConfigError, match="'HAGARIKA' is an SMS command"):  # Kinyarwanda's STOP
        create_app(dataclasses.replace(rt.settings, sms_shortcode_keywords=("HAGARIKA",)), runtime=rt)


async def test_stop_sent_on_the_shared_code_stops_the_number(rt: Any, aiohttp_client: Any) -> None:
    rt.settings = dataclasses.replace(rt.settings, sms_shortcode_keywords=("KHHC",))
    client = await aiohttp_client(create_app(rt.settings, runtime=rt))
    await inbound(client, ALINE, "KHHC STOP", "in-shared-stop-1")
    async with rt.sessionmaker() as s:
        stopped = (await s.execute(select(PhoneOptOut.phone_index))).scalars().all()
    assert stopped == [rt.cipher.blind_index(ALINE)]
