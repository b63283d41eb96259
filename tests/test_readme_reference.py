"""README.md against the code, where operators and integrators read it as the reference.

The "Configuration" table against the code that reads the environment: every variable the table lists is read,
every variable read is listed, and the defaults and bounds the table states are the code's. An operator configures
the gateway from that table: a variable missing from it (the RETENTION_* periods, ADMIN_PASSWORD) was found only in
the code, and a default or bound it misstates is believed. And every endpoint the README names (`POST /v1/payments`)
is a route of the service, with that method. (The commands' table: tests/test_startup_errors.py.)"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from core.config import PROVIDER_NAMES, USSD_AGGREGATORS, ConfigError, load_settings
from core.retention import load_policy
from providers.registry import _route_overrides
from providers.simulation import options_from_env
from tests.core.test_crypto_config import _production_env

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# The table's placeholders and what each stands for (core.config: the providers, the USSD aggregators, and the
# names a CALLBACK_SECRET_<NAME> is read for).
PLACEHOLDERS = {
    "<PROVIDER>": [name.upper() for name in PROVIDER_NAMES],
    "<AGGREGATOR>": [name.upper() for name in USSD_AGGREGATORS],
    "<NAME>": [name.upper() for name in (*USSD_AGGREGATORS, *PROVIDER_NAMES, "sms")],
}
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*(?:<[A-Z]+>[A-Z0-9_]*)*|<[A-Z]+>[A-Z0-9_]+)`")


def _rows() -> list[tuple[str, str]]:
    """The table's rows: (first cell, meaning)."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| variable | meaning (default) |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line)
        rows.append((cells[1].strip(), "|".join(cells[2:]).strip()))
    return rows


def _expand(name: str) -> list[str]:
    for placeholder, values in PLACEHOLDERS.items():
        if placeholder in name:
            return [full for value in values for full in _expand(name.replace(placeholder, value))]
    assert "<" not in name, f"the table's placeholder in {name} is not one this test knows"
    return [name]


def _without_parentheses(text: str) -> str:
    """The cell without its parenthesised defaults (`AIRTEL_COUNTRY` (`RW`): RW is a value, not a variable)."""
    depth, kept = 0, []
    for char in text:
        depth += char == "("
        if not depth:
            kept.append(char)
        depth -= char == ")" and depth > 0
    return "".join(kept)


def _listed() -> tuple[set[str], list[re.Pattern[str]]]:
    """The variables the table names, and the prefixes it names as a family (`SIM_DELAY`, …: the simulators')."""
    names: set[str] = set()
    families: list[re.Pattern[str]] = []
    for first, meaning in _rows():
        variables = _NAME.findall(_without_parentheses(first))
        if re.search(r"`[A-Z0-9_]+_\*`", first):  # `MTN_MOMO_*`: its meaning names them
            variables += _NAME.findall(meaning)
        if "…" in first:  # `SIM_DELAY`, …: the rest of that prefix, listed in the code the row names
            prefixes = {name.split("_", 1)[0] for name in variables}
            families += [re.compile(rf"{prefix}_[A-Z0-9_]+") for prefix in prefixes]
        names.update(full for name in variables for full in _expand(name))
    return names, families


class _Reads(Mapping[str, str]):
    """An environment that notes every variable looked up in it, set or not."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env, self.read = dict(env), set[str]()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self.env[name]

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return self.env.get(name, default)

    def __contains__(self, name: object) -> bool:
        self.read.add(str(name))
        return name in self.env

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def _route_reads(env: Mapping[str, str]) -> object:
    return _route_overrides(load_settings({}), env)


# What reads the environment: the settings (development and a complete production), prune's periods, the
# simulators' options and the payment routes.
LOADERS: tuple[Callable[[Mapping[str, str]], object], ...] = (load_settings, load_policy, options_from_env,
                                                              _route_reads)


def _read_by(loader: Callable[[Mapping[str, str]], object], env: Mapping[str, str]) -> set[str]:
    reads = _Reads(env)
    loader(reads)
    return reads.read


def _read() -> set[str]:
    read = _read_by(load_settings, _production_env())
    for loader in LOADERS:
        read |= _read_by(loader, {})
    # The commands read a few themselves (main.py: ADMIN_PASSWORD, WORKER_METRICS_PORT), straight from os.environ.
    sources = [path for path in ROOT.glob("*.py")] + [path for folder in ("core", "channels", "providers", "admin_api")
                                                      for path in (ROOT / folder).rglob("*.py")]
    for path in sources:
        read.update(re.findall(r"os\.environ(?:\.get|\.setdefault)?[\[(]\"([A-Z][A-Z0-9_]*)\"", path.read_text()))
    return read


def test_every_variable_read_is_in_the_table_and_every_one_listed_is_read() -> None:
    listed, families = _listed()
    read = _read()
    unlisted = {name for name in read if name not in listed and not any(f.fullmatch(name) for f in families)}
    assert not unlisted, f"read by the code, not in README's Configuration table: {sorted(unlisted)}"
    unread = listed - read
    assert not unread, f"in README's Configuration table, read by nothing: {sorted(unread)}"
    for family in families:
        assert any(family.fullmatch(name) for name in read), family.pattern


def _stated() -> Iterator[tuple[str, str]]:
    """(variable, what its parentheses say) for each variable of a first cell followed by them."""
    for first, _meaning in _rows():
        for match in re.finditer(r"`([A-Z][A-Z0-9_]*)` \(((?:[^()]|\([^()]*\))*)\)", first):
            yield match.group(1), match.group(2)


def _loader(name: str) -> Callable[[Mapping[str, str]], object] | None:
    return next((loader for loader in LOADERS if name in _read_by(loader, {})), None)


STATED = sorted(_stated())


def test_the_table_states_defaults_and_bounds() -> None:
    # The test below reads them: a table it finds none in would pass it whatever the code did.
    assert len(STATED) > 30 and sum("at most" in said for _, said in STATED) > 15


@pytest.mark.parametrize(("name", "said"), STATED, ids=[name for name, _ in STATED])
def test_each_stated_default_and_bound_is_the_codes(name: str, said: str) -> None:
    loader = _loader(name)
    if loader is None:  # read by a command itself (WORKER_METRICS_PORT: main.py's tests)
        return
    default = re.split(r"[,;]", said, maxsplit=1)[0].strip()
    value = {"on": "1", "off": "0"}.get(default, default.strip("`"))
    if default in ("on", "off") or re.fullmatch(r"[0-9]+(\.[0-9]+)?|`[^`]+`", default):
        # Set to the stated default, the configuration is the one loaded with the variable unset.
        assert loader({name: value}) == loader({}), f"{name}: the table says {default}, the code's default differs"
    for bound, beyond in (("at most", 1), ("at least", -1)):
        if found := re.search(rf"{bound} ([0-9]+)", said):
            edge = int(found.group(1))
            loader({name: str(edge)})
            with pytest.raises(ConfigError) as refused:
                loader({name: str(edge + beyond)})
            assert refused.value.variable == name
    if re.search(r"; 0: ", said):
        loader({name: "0"})


# A path as the README writes it: segments, `{id}`-like parameters (`{her id}` too).
_PATH = r"/(?:[A-Za-z0-9_.~-]+|\{[^}/]*\})(?:/(?:[A-Za-z0-9_.~-]+|\{[^}/]*\}))*"


def _segments(path: str) -> tuple[str, ...]:
    return tuple("{}" if part.startswith("{") else part for part in path.strip("/").split("/"))


def test_every_endpoint_the_readme_names_is_a_route_with_that_method() -> None:
    from aiohttp import web

    from app import create_app

    app = create_app(load_settings({"SIMULATORS_IN_PROCESS": "1", "PHONE_SIMULATOR_ENABLED": "1"}))
    routes: set[tuple[str, tuple[str, ...]]] = set()

    def walk(application: web.Application) -> None:
        for resource in application.router.resources():
            if "app" in resource.get_info():  # /v1 and the simulators: their resources carry the prefix
                walk(resource.get_info()["app"])
            routes.update((route.method, _segments(resource.canonical)) for route in resource)

    walk(app)
    # The README also names paths of the simulators' own ports (`POST /_control/decide`) and of the providers' APIs
    # (IremboPay's `GET /payments/invoices/{id}`): a path counts as the service's when its first segment is.
    ours = {path[0] for _, path in routes}
    named = {(method, _segments(path)) for method, path in re.findall(rf"\b(GET|POST|PUT|PATCH|DELETE) `?({_PATH})",
                                                                      README)}
    named = {(method, path) for method, path in named if path[0] in ours}
    missing = sorted(f"{method} /{'/'.join(path)}" for method, path in named if (method, path) not in routes)
    assert not missing, f"README names endpoints the service does not have: {missing}"
    assert len(named) > 60 and any(path[0] == "ussd" for _, path in named)
