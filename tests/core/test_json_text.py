"""core.db.json_text: the text of a JSON column's value (orjson, the json module for what orjson refuses). It takes
and refuses what json.dumps takes and refuses, and the value read back is the one given."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from core.db import json_text


@pytest.mark.parametrize("value", [
    {"template": "payment_receipt", "context": {"payment_id": "p-1", "amount_minor": 5_000_000}},
    {"name": "Coopérative Abahizi", "note": "Amafaranga 50 000 RWF", "emoji": "🙏", "nested": [1, 2.5, None, True]},
    {"lone surrogate": "\ud800"},  # orjson refuses it: json.dumps writes it
    {"big": 2**70},  # past 64 bits: orjson refuses it
    [],
    "text",
])
def test_the_value_read_back_is_the_one_given(value: Any) -> None:
    assert json.loads(json_text(value)) == value


def test_keys_that_are_not_text_are_written_as_json_dumps_writes_them() -> None:
    keyed = {1: "a", None: "b", False: "c"}
    assert json_text(keyed) == '{"1":"a","null":"b","false":"c"}'
    assert json.loads(json_text(keyed)) == json.loads(json.dumps(keyed))


@pytest.mark.parametrize("value", [{"at": datetime(2026, 1, 15, tzinfo=UTC)}, {"money": object()}, {"s": {1, 2}}])
def test_what_json_dumps_refuses_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        json_text(value)


def test_compact_and_utf8() -> None:
    assert json_text({"a": [1, "é"]}) == '{"a":[1,"é"]}'


def test_what_orjson_refuses_is_written_compact_too() -> None:
    assert json_text({"s": "\ud800", "n": [2**70]}) == '{"s":"\\ud800","n":[1180591620717411303424]}'
