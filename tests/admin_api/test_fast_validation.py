"""The request-body check's fast path (admin_api.validation._fast_valid, fastjsonschema) never passes a body that
jsonschema refuses, for every route's schema: bodies near each schema's edges (lengths, bounds, enums, UUIDs in
any case and form, whole floats, booleans for numbers, missing and unknown fields) and arbitrary JSON. Where it
says valid, jsonschema finds no error; where it does not, jsonschema decides and names every error as before."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from admin_api import all_routes
from admin_api.errors import ApiError
from admin_api.validation import _fast_valid, validate, validator_for
from core.errors import ValidationError

ROUTES = [route for route in all_routes() if route.body is not None]
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
UUIDS = st.uuids().flatmap(lambda u: st.sampled_from([str(u), str(u).upper(), u.hex, f"{{{u}}}", f"{u}-",
                                                       f"urn:uuid:{u}", f" {u}"]))
MOMENTS = st.sampled_from(["2026-11-01", "2026-11-01T00:00:00Z", "2026-02-30T25:00:00Z", "yesterday", ""])


def _kinds(schema: Mapping[str, Any]) -> list[str]:
    kinds = schema.get("type", [])
    return kinds if isinstance(kinds, list) else [kinds]


def values_for(schema: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for one schema node: mostly near what it takes (on and past each edge), some of any JSON kind."""
    options: list[st.SearchStrategy[Any]] = [JSON]
    if "enum" in schema:
        enum = list(schema["enum"])
        options += [st.sampled_from(enum)] * 3
        options.append(st.sampled_from([v.lower() if isinstance(v, str) else v for v in enum]))
    if "const" in schema:
        options.append(st.just(schema["const"]))
    for kind in _kinds(schema):
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength", 40)
            options.append(st.text(min_size=max(0, low - 1), max_size=min(high + 1, 600)))
            options.append(st.integers(max(0, low - 1), high + 1).map(lambda n: "x" * n))
            if "pattern" in schema:
                options.append(st.from_regex(schema["pattern"], fullmatch=False).filter(lambda v: len(v) < 600))
            if schema.get("format") == "uuid" or schema.get("x-gateway-id"):
                options += [UUIDS] * 2
            if schema.get("format") in ("date-time", "date"):
                options.append(MOMENTS)
        elif kind in ("integer", "number"):
            low, high = schema.get("minimum", -5), schema.get("maximum", 10**6)
            options += [st.integers(low - 2, high + 2), st.integers(low - 2, high + 2).map(float),
                        st.floats(low - 2, high + 2), st.booleans()]
        elif kind == "boolean":
            options += [st.booleans(), st.sampled_from([0, 1, "true"])]
        elif kind == "null":
            options.append(st.none())
        elif kind == "array" and depth < 3:
            item = values_for(schema.get("items", {}), depth + 1)
            low = schema.get("minItems", 0)
            options.append(st.lists(item, min_size=max(0, low - 1), max_size=low + 3))
            options.append(item.map(lambda v: [v, v]))  # uniqueItems
        elif kind == "object" and depth < 3:
            options.append(objects_for(schema, depth + 1))
    return st.one_of(options)


def objects_for(schema: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Objects by the schema's properties: the required ones mostly there, the others sometimes, an unknown one
    now and then."""
    properties = schema.get("properties", {})
    required = [name for name in schema.get("required", []) if name in properties]
    fields = {name: values_for(sub, depth) for name, sub in properties.items()}
    every = st.fixed_dictionaries({name: fields[name] for name in required},
                                  optional={name: s for name, s in fields.items() if name not in required})
    some = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(st.sampled_from(["unknown", "Amount", "", "paymentTypeID"]), JSON, max_size=1)
    return st.one_of(every, every, some, st.tuples(every, extra).map(lambda pair: {**pair[0], **pair[1]}))


def fitting(schema: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the schema node takes (a valid body's parts), for bodies that are valid or one change away."""
    if "enum" in schema:
        return st.sampled_from(list(schema["enum"]))
    options: list[st.SearchStrategy[Any]] = []
    for kind in _kinds(schema) or ["string"]:
        if kind == "string":
            if schema.get("format") == "uuid":
                options.append(st.uuids().map(str))
            elif schema.get("format") == "date-time":
                options.append(MOMENTS)
            elif "pattern" in schema:
                options.append(st.from_regex(schema["pattern"], fullmatch=True).filter(
                    lambda v, s=schema: s.get("minLength", 0) <= len(v) <= s.get("maxLength", 10**6)))
            else:
                options.append(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF),
                                       min_size=schema.get("minLength", 0),
                                       max_size=min(schema.get("maxLength", 30), 200)))
        elif kind in ("integer", "number"):
            options.append(st.integers(schema.get("minimum", 0), schema.get("maximum", 10**9)))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
        elif kind == "array" and depth < 3:
            low = schema.get("minItems", 0)
            options.append(st.lists(fitting(schema.get("items", {}), depth + 1), min_size=low, max_size=low + 2,
                                    unique_by=(lambda v: repr(v)) if schema.get("uniqueItems") else None))
        elif kind == "object" and depth < 3:
            properties = schema.get("properties", {})
            required = [name for name in schema.get("required", []) if name in properties]
            options.append(st.fixed_dictionaries(
                {name: fitting(properties[name], depth + 1) for name in required},
                optional={name: fitting(sub, depth + 1) for name, sub in properties.items() if name not in required}))
    return st.one_of(options) if options else JSON


@st.composite
def one_change_away(draw: Any, schema: Mapping[str, Any]) -> Any:
    """A valid body with one field replaced by an edge or any JSON value, dropped, or one unknown field added."""
    body = draw(fitting(schema))
    properties = schema.get("properties", {})
    change = draw(st.sampled_from(["replace", "drop", "add"]))
    if change == "add" or not properties:
        body[draw(st.sampled_from(["unknown", "Amount", ""]))] = draw(JSON)
        return body
    name = draw(st.sampled_from(sorted(properties)))
    if change == "drop":
        body.pop(name, None)
    else:
        body[name] = draw(values_for(properties[name]))
    return body


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path}" for r in ROUTES])
def test_the_fast_check_never_passes_what_jsonschema_refuses(route: Any) -> None:
    schema = route.body
    seen = {"fast": 0, "all": 0}

    @EXAMPLES
    @given(st.one_of(fitting(schema), one_change_away(schema), one_change_away(schema), objects_for(schema), JSON))
    def check(body: Any) -> None:
        before = copy.deepcopy(body)
        seen["all"] += 1
        if _fast_valid(body, schema):
            seen["fast"] += 1
            errors = [e.message for e in validator_for(schema).iter_errors(body)]
            assert errors == [], f"the fast check passed {body!r}, which jsonschema refuses: {errors}"
        assert body == before  # the check writes nothing into the body (no defaults filled in)

    check()
    assert seen["all"] > 0
    assert seen["fast"] > 0  # valid bodies were among them: the fast path was taken, not only refused


def test_a_payment_body_takes_the_fast_path_and_a_bad_one_names_every_error() -> None:
    from admin_api.payments import PAYMENT_CREATE

    body = {"paymentTypeId": "6f1c2b1e-8d4a-4b7e-9a55-3f2f8e1c0b11", "amount": 50000,
            "paymentMethod": "MOBILE_MONEY_MTN", "paymentAccount": "+250788123456", "idempotencyKey": "k-123456789",
            "memberId": "6F1C2B1E-8D4A-4B7E-9A55-3F2F8E1C0B11"}
    assert _fast_valid(body, PAYMENT_CREATE)
    validate(body, PAYMENT_CREATE)
    assert body["memberId"] == "6f1c2b1e-8d4a-4b7e-9a55-3f2f8e1c0b11"  # normalised after the check, as before
    bad = {**body, "amount": True, "paymentMethod": "CASH", "memberId": "{6f1c2b1e-8d4a-4b7e-9a55-3f2f8e1c0b11}",
           "extra": 1}
    del bad["idempotencyKey"]
    assert not _fast_valid(bad, PAYMENT_CREATE)
    with pytest.raises((ValidationError, ApiError)) as info:
        validate(bad, PAYMENT_CREATE)
    named = " | ".join(getattr(info.value, "errors", None) or [str(info.value)])
    for field in ("amount", "paymentMethod", "memberId", "idempotencyKey", "extra"):
        assert field in named, named
