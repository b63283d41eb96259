"""The menu engine, GSM-7 handling, accumulated-input parsing and the session encoding, without I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from channels.ussd import sessions
from channels.ussd.engine import Confirm, Ctx, End, Engine, Input, Invalid, Item, Menu, Option, State, fit
from channels.ussd.service import latest_input
from core import gsm

# -- a toy menu tree, independent of the real flows -------------------------------------------------

calls: list[str] = []


async def fruits(_ctx: Ctx) -> list[Item]:
    return [Item(f"f{n}", f"Fruit number {n:02d} with a long name") for n in range(1, 13)]


async def picked(ctx: Ctx, key: str) -> str:
    ctx.data["fruit"] = key
    return "qty"


async def check_qty(_ctx: Ctx, text: str) -> str:
    if not text.isdigit() or not 1 <= int(text) <= 9:
        raise Invalid("error.invalid_input")
    return text


async def qty(ctx: Ctx, value: str) -> str:
    ctx.data["qty"] = value
    return "confirm"


async def ordered(ctx: Ctx, _key: str) -> str:
    calls.append(f"{ctx.data['fruit']}x{ctx.data['qty']}")
    return "done"


async def args(_ctx: Ctx) -> dict[str, Any]:
    return {"name": "Shop", "type": "Fruit", "amount": "1 RWF", "fee": "0 RWF", "method": "MTN MoMo",
            "ref": "PAY_20260101_001"}


SCREENS = {s.id: s for s in (
    Menu("home", "home.title", args=args, options=(Option("menu.pay", "fruits"), Option("menu.help", "bye"))),
    Menu("fruits", "pay.types", items=fruits, on_item=picked),
    Input("qty", "pay.method", validate=check_qty, on_valid=qty),
    Confirm("confirm", "pay.confirm", args=args, on_confirm=ordered, on_cancel="cancelled"),
    End("done", "pay.cancelled"),
    End("cancelled", "pay.cancelled"),
    End("bye", "my.none"),
)}


def ctx(limit: int = 182, lang: str = "en") -> Ctx:
    return Ctx(rt=None, turn=None, state=State(screen="home", lang=lang), limit=limit)


@pytest.fixture
def engine() -> Engine:
    calls.clear()
    return Engine(SCREENS)


async def test_menu_options_and_navigation(engine: Engine) -> None:
    c = ctx()
    home = await engine.show(c, "home", push=False)
    assert home.text == "Welcome to Shop\n1. Pay\n2. Help" and not home.end
    page1 = await engine.step(c, "1")
    assert page1.text.startswith("Choose what to pay:\n1. Fruit number 01")
    assert "98. More" in page1.text and "0. Back" in page1.text
    page2 = await engine.step(c, "98")
    assert page2 != page1 and c.state.page == 1
    assert await engine.step(c, "0") == page1  # back a page
    assert await engine.step(c, "0") == home  # back a screen
    assert c.state.stack == []


@pytest.mark.parametrize("limit", [182, 120, 80])
async def test_paging_shows_every_item_once_and_each_page_fits(engine: Engine, limit: int) -> None:
    c = ctx(limit)
    await engine.show(c, "home", push=False)
    reply = await engine.step(c, "1")
    seen: list[str] = []
    while True:
        assert gsm.length(reply.text) <= limit
        seen += c.state.ids
        if "98. " not in reply.text:
            break
        reply = await engine.step(c, "98")
    assert seen == [f"i:f{n}" for n in range(1, 13)]


async def test_selection_input_validation_and_confirmation(engine: Engine) -> None:
    c = ctx()
    await engine.show(c, "home", push=False)
    await engine.step(c, "1")
    prompt = await engine.step(c, "3")
    assert prompt.text.startswith("Pay with:")
    bad = await engine.step(c, "12")
    assert bad.text.startswith("Invalid entry, try again.\nPay with:")
    confirm = await engine.step(c, "2")
    assert confirm.text.startswith("Pay Fruit") and "1. Confirm\n2. Cancel" in confirm.text
    assert (await engine.step(c, "3")).text.startswith("Invalid choice.")
    done = await engine.step(c, "1")
    assert done.end and calls == ["f3x2"]


async def test_home_from_deep_and_unknown_choices(engine: Engine) -> None:
    c = ctx()
    home = await engine.show(c, "home", push=False)
    await engine.step(c, "1")
    await engine.step(c, "1")
    await engine.step(c, "1")
    assert c.state.screen == "confirm" and "00. Home" in (await engine.render(c)).text
    assert await engine.step(c, "00") == home
    assert c.state.stack == []
    # ("01" is 1, "001" none: test_typed_keys)
    for junk in ("", "9", "000", "001", "-1", "abc", "1*2", "98", "#", "\uff03", "\u00b3", "\u2460"):
        reply = await engine.step(c, junk)
        assert reply.text.startswith("Invalid choice.\n"), junk
    assert (await engine.step(c, "1")).text.startswith("Choose what to pay:")


async def test_number_from_another_page_is_refused(engine: Engine) -> None:
    c = ctx(120)
    await engine.show(c, "home", push=False)
    await engine.step(c, "1")
    await engine.step(c, "98")
    assert (await engine.step(c, "1")).text.startswith("Invalid choice.")


def test_engine_refuses_misdeclared_screens() -> None:
    with pytest.raises(ValueError):
        Engine({"home": Menu("other", "home.title")})
    with pytest.raises(ValueError):
        Engine({"start": Menu("start", "home.title")})


# -- GSM-7 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("Hello", "Hello"),
    ("Café é è à ù", "Café é è à ù"),  # in the GSM-7 alphabet already
    ("Français — “quoted” ‘single’ …", "Francais - \"quoted\" 'single' ..."),
    ("Kwishyura\u00a0amafaranga", "Kwishyura amafaranga"),
    ("ê ô î û ï", "e o i u i"),
    ("Ŵ ŝ", "W s"),
    # Akan, Ewe and Hausa letters (a Ghanaian member's name): their Latin letter, not "?".
    ("Akosua Ɔfori-Atta, Ɛsi Dzaŋ", "Akosua Ofori-Atta, Esi Dzan"),
    ("Ɖ ɖ Ʋ ʋ Ƒ ƒ Ɣ ɣ Ɓ ɓ Ɗ ɗ Ƙ ƙ Ƴ ƴ", "D d V v F f G g B b D d K k Y y"),
    # Yoruba: dots below and tones the alphabet lacks strip to the letter, also a mark NFC leaves apart (ẹ̀).
    ("Ọbádélé Ṣẹ̀gun", "Obadélé Segun"),
    ("中", "?"),
    ("€5 [x]", "€5 [x]"),
])
def test_transliteration(raw: str, expected: str) -> None:
    out = gsm.to_gsm(raw)
    assert out == expected
    assert gsm.is_gsm(out)


def test_length_counts_extension_characters_twice() -> None:
    assert gsm.length("abc") == 3
    assert gsm.length("€[]") == 6


def test_fit_cuts_to_the_limit() -> None:
    assert fit("x" * 10, 10) == "x" * 10
    cut = fit("word " * 50, 20)
    assert gsm.length(cut) <= 20 and cut.endswith("..")


# -- accumulated input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("previous", "accumulated", "latest"), [
    (None, "1", "1"),
    ("", "1", "1"),
    ("1", "1*2", "2"),
    ("1*2", "1*2*KH*HC", "KH*HC"),  # a '*' typed by the user stays in the input
    ("1*KH*HC", "1*KH*HC*4", "4"),
    ("1*2", "1*2*", ""),  # an empty answer
    ("1*2", "1", None),  # a late copy of an earlier hop: nothing new
    ("1*2", "", None),  # the opening hop again
    ("1*2", "1*2", None),
    ("1*2", "9*9", None),  # a history this session never had: not guessed at
    ("1*2", "1*23", None),
])
def test_latest_input(previous: str | None, accumulated: str, latest: str | None) -> None:
    assert latest_input(previous, accumulated) == latest


# -- session encoding ----------------------------------------------------------------------------------

def test_session_round_trip_and_size() -> None:
    state = State(screen="pay_confirm", stack=["home", "pay_type"], lang="rw",
                  data={"c": "1" * 36, "mb": "2" * 36, "pt": "3" * 36, "amt": 50_000, "cur": "RWF",
                        "mt": "MOBILE_MONEY_MTN", "cn": "Kigali Heights Housing Cooperative",
                        "rr": "PAY_20261122_123456", "f": [3, 3, 3], "fc": "1" * 36},
                  ids=["o0", "o1"], first=1)
    stored = sessions.Stored(state=state, acc="1*1", hop="1*1", reply=("Pay Monthly Rent\n1. Confirm", False),
                             hops=3, started=1_700_000_000.5)
    raw = sessions.encode(stored)
    assert len(raw) < 1024
    back = sessions.decode(raw)
    assert back == stored


def test_session_keys_carry_hash_tags() -> None:
    assert sessions.session_key("africastalking", "ATUid_1") == "ussd:{at:ATUid_1}"
    assert sessions.session_key("hubtel", "abc") == "ussd:{hb:abc}"
    odd = sessions.session_key("nalo", "a}b{c")
    assert odd.startswith("ussd:{nl:") and odd.count("{") == 1 and odd.count("}") == 1


async def test_the_page_back_returns_to_is_stored_where_the_previous_release_reads_only_screens(engine: Engine) -> None:
    """Back returns to the page a list was left on; during a deploy a hop of the session may land on a serve of the
    previous release, which pops the stored back stack and shows what it finds as a screen: a stored "fruits@1"
    was no screen of it (KeyError: the member's Back failed). The stack is stored as screen ids, the pages beside
    them; a session that release wrote (no pages) is read back as it was."""
    c = ctx(80)
    await engine.show(c, "home", push=False)
    await engine.step(c, "1")
    second = await engine.step(c, "98")
    await engine.step(c, str(c.state.first))  # a fruit of the second page: its quantity asked
    stored = sessions.Stored(state=c.state, hops=4, started=1_700_000_000.0)
    raw = sessions.encode(stored)
    written = json.loads(raw)["st"]
    assert all(screen in SCREENS for screen in written["k"]), written  # what the previous release's Back shows
    # Read back here: Back shows the page the fruit was chosen on.
    later = Ctx(rt=None, turn=None, state=sessions.decode(raw).state, limit=80)
    assert await engine.step(later, "0") == second
    # Read and written again by the previous release (it knows no pages): Back is that list's first page.
    old = {k: v for k, v in written.items() if k in ("s", "k", "d", "p", "i", "f", "l", "e")}
    again = Ctx(rt=None, turn=None, state=sessions.decode_state(old), limit=80)
    assert (await engine.step(again, "0")).text.startswith("Choose what to pay:\n1. Fruit number 01")
    # The resume route keeps the pages too.
    assert sessions.decode_state(json.loads(sessions._route(c.state))).stack == c.state.stack
