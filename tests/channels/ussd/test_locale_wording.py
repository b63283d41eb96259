"""Wording of the USSD screens a member reads, through POST /ussd/africastalking (finding by a localisation
reviewer: Swahili called the cooperative's code "namba", a number, when codes are letters such as KHHC)."""

from __future__ import annotations

import re
from typing import Any

from tests.channels.ussd.helpers import AtPhone

STRANGER = "+250788555123"  # belongs to no cooperative


async def _in_swahili(client: Any) -> AtPhone:
    phone = AtPhone(client, STRANGER)
    await phone.dial()
    await phone.send("4")  # Lugha / Language
    await phone.send("4")  # Kiswahili
    return phone


async def test_swahili_asks_for_the_cooperatives_code_not_its_number(client: Any, demo: dict[str, Any]) -> None:
    phone = await _in_swahili(client)
    prompt = await phone.send("1")  # Lipa: not a member yet, so the cooperative's code first
    assert prompt == "CON Hujasajiliwa. Weka msimbo wa chama chako:\n0. Rudi"
    unknown = await phone.send("ZZZQ")
    assert unknown.startswith("CON Hakuna chama chenye msimbo huu. Hakiki ujaribu tena:\n"), unknown
    assert "namba" not in unknown
    accepted = await phone.send(demo["short_code"].lower())  # the letters are the code
    assert accepted.startswith("CON Weka jina lako"), accepted


async def test_swahili_help_tells_a_stranger_to_ask_for_the_code(client: Any, demo: dict[str, Any]) -> None:
    phone = await _in_swahili(client)
    menu = await phone.dial()
    help_key = next(line.split(".")[0] for line in menu.splitlines() if line.endswith("Msaada"))
    answer = await phone.send(help_key)
    assert answer.endswith("Uliza chama chako msimbo wake."), answer
    assert "namba" not in answer


def test_swahili_never_makes_a_cooperatives_name_the_subject_of_a_verb() -> None:
    """A Swahili verb agrees with its subject's noun class, and a cooperative's name has any ("Ushirika wa ..." u-,
    "Chama cha ..." ki-, "Kikundi ..." ki-, "SACCO ..." i-): "Ushirika wa Nyumba Sinza itawasiliana nawe" (and
    "... haina malipo", "... haisajili wanachama") was wrong for most names. The name is put where nothing agrees
    with it."""
    from channels.ussd.i18n import catalog, translate

    name = "Ushirika wa Nyumba Sinza"
    assert translate("sw", "pay.none", coop=name) == f"{name}: hakuna malipo kwa sasa."
    assert translate("sw", "reg.closed", coop=name).startswith(f"{name}: hakuna usajili wa wanachama kwa simu. ")
    subject = [msgid for msgid, text in catalog("sw").items() if re.search(r"(^|\. )\{coop\} [a-z]", text)]
    assert not subject, subject


def test_kinyarwanda_never_makes_a_cooperatives_name_the_subject_of_a_verb() -> None:
    """As in Swahili: a Kinyarwanda verb agrees with its subject's noun class, and a cooperative's name has any
    ("Koperative ..." i-, "Umuryango w'..." u-, "Ikigo ..." ki-): "Umuryango w'Abahinzi Kicukiro izakuvugisha" (and
    "... ntiyandika abanyamuryango") agreed with koperative only. The verb agrees with "Koperative yawe" beside the
    name, or the name is put where nothing agrees with it (after "muri", as pay.none has it)."""
    from channels.ussd.i18n import catalog, translate

    name = "Umuryango w'Abahinzi Kicukiro"
    assert translate("rw", "dsp.done", ref="DSP-1", coop=name) == (
        f"Ikirego DSP-1 cyakiriwe. Koperative yawe, {name}, izakuvugisha.")
    assert translate("rw", "reg.closed", coop=name).startswith(
        f"Nta kwiyandikisha kuri telefoni guhari muri {name}. ")
    subject = [msgid for msgid, text in catalog("rw").items() if re.search(r"(^|\. )\{coop\} [a-z]", text)]
    assert not subject, subject


def test_paid_names_the_period_beside_the_type_not_after_a_connective() -> None:
    """"Wamaze kwishyura {type} ya {due}" and "Tayari umelipa {type} ya tarehe {due}": the connective "ya" agreed
    with a class-9 type name only ("Umusanzu w'ukwezi ya ...", "Mchango wa mwezi ya ..."); the date is in
    parentheses as pay.type_line_due has it, where nothing agrees with the name."""
    from channels.ussd.i18n import catalog, translate

    assert translate("rw", "pay.paid", type="Umusanzu w'ukwezi", due="05/01/2026") == (
        "Wamaze kwishyura Umusanzu w'ukwezi (itariki 05/01/2026).")
    assert translate("sw", "pay.paid", type="Mchango wa mwezi", due="05/01/2026") == (
        "Tayari umelipa Mchango wa mwezi (tarehe 05/01/2026).")
    connective = re.compile(r"\{(type|name)\}( \([^)]*\))? (wa|ya|la|cha|vya|za|rya|cya|bya|bwa|twa|ka|ra)\b")
    for language in ("rw", "sw"):
        wrong = [msgid for msgid, text in catalog(language).items() if connective.search(text)]
        assert not wrong, (language, wrong)


def test_french_screens_put_a_plain_space_before_a_colon_exclamation_question_mark_and_semicolon() -> None:
    """French typography, as the French SMS write it: "un SMS ; attendez-le" (the screen read "un SMS; attendez-le"),
    "Quel paiement ?", "Réf : ...". A plain space: a non-breaking one is not GSM-7, which the screens keep to."""
    from channels.ussd.i18n import catalog

    glued = {msgid: text for msgid, text in catalog("fr").items() if re.search(r"[^ ][!?;:]", text)}
    assert not glued, glued
    assert "un SMS ; attendez-le avant de réessayer." in catalog("fr")["unsettled"]
