"""What every provider simulator shares: options, outcome by payer number, PIN prompts, callback delivery."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from core.config import ConfigError
from core.phone import mask
from core.text import is_number

log = logging.getLogger("gateway.simulator")


@dataclass
class SimulatorOptions:
    """How a simulator misbehaves. Mutable on purpose: POST /_control/options changes a running one."""

    delay: float = 1.0  # seconds between the request and the payer's decision / the callback
    drop_callback: bool = False  # decide, but never call back (the gateway must poll)
    duplicate_callback: bool = False  # send the final callback twice
    out_of_order: bool = False  # after the final callback, send a stale one (PENDING) again
    fail_request_500: bool = False  # answer collection and refund requests with 500, store nothing
    hang_request: float = 0.0  # sleep this long before answering a collection or refund request
    pending_forever: frozenset[str] = frozenset()  # extra payer numbers that never approve
    # Every payer answers a PIN prompt (POST /_control/decide) instead of being decided by number. The
    # phone page does not set it: it holds only the numbers it shows (POST /_control/phone).
    interactive: bool = False
    prompt_timeout: float = 300.0  # an undecided PIN prompt expires (MTN: about 5 minutes)
    callback_method: str = "PUT"  # MTN calls back with PUT or POST
    callback_url: str = ""  # for providers whose callback URL is configured, not sent (Airtel)
    # Expected credentials by ProviderConfig name (api_user, client_id, ...); a missing one accepts any
    # non-empty value. callback_key, when present, signs callbacks (Airtel `hash`).
    credentials: Mapping[str, str] = field(default_factory=dict)
    token_lifetime: int | None = None  # None: the provider's own (MTN 3600 s, Airtel 180 s)


_BOOL_OPTIONS = ("drop_callback", "duplicate_callback", "out_of_order", "fail_request_500", "interactive")
_FLOAT_OPTIONS = ("delay", "hang_request", "prompt_timeout")


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be a boolean, got {raw!r}")


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        # nan passes the check below and inf is no delay: either made every simulated payer's decision (its
        # asyncio.sleep) fail, each payment PENDING for ever with a traceback in the simulator's log.
        raise ConfigError(name, f"must be a finite number, got {raw!r}")
    if value < 0:
        raise ConfigError(name, "must not be negative")
    return value


def _numbers(raw: str) -> frozenset[str]:
    return frozenset(_digits(part) for part in raw.split(",") if _digits(part))


def options_from_env(env: Mapping[str, str], *, prefix: str = "SIM_",
                     base: SimulatorOptions | None = None) -> SimulatorOptions:
    """SIM_DELAY, SIM_DROP_CALLBACK, SIM_PENDING_FOREVER=+250788000009,..., SIM_CALLBACK_METHOD=POST..."""
    values: dict[str, Any] = {}
    for name in _BOOL_OPTIONS:
        raw = env.get(prefix + name.upper())
        if raw:
            values[name] = _parse_bool(prefix + name.upper(), raw)
    for name in _FLOAT_OPTIONS:
        raw = env.get(prefix + name.upper())
        if raw:
            values[name] = _parse_float(prefix + name.upper(), raw)
    if env.get(prefix + "PENDING_FOREVER"):
        values["pending_forever"] = _numbers(env[prefix + "PENDING_FOREVER"])
    method = env.get(prefix + "CALLBACK_METHOD", "").upper()
    if method:
        if method not in ("PUT", "POST"):
            raise ConfigError(prefix + "CALLBACK_METHOD", "must be PUT or POST")
        values["callback_method"] = method
    if env.get(prefix + "CALLBACK_URL"):
        values["callback_url"] = env[prefix + "CALLBACK_URL"]
    return replace(base or SimulatorOptions(), **values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags matching SimulatorOptions, for `main.py simulate <provider> --port ...`."""
    parser.add_argument("--delay", type=float, help="seconds before the payer decides and the callback")
    parser.add_argument("--drop-callback", action="store_true", default=None)
    parser.add_argument("--duplicate-callback", action="store_true", default=None)
    parser.add_argument("--out-of-order", action="store_true", default=None)
    parser.add_argument("--fail-request-500", action="store_true", default=None)
    parser.add_argument("--hang-request", type=float, help="seconds to sleep before answering a request")
    parser.add_argument("--pending-forever", help="comma list of payer numbers that never approve")
    parser.add_argument("--interactive", action="store_true", default=None)
    parser.add_argument("--prompt-timeout", type=float)
    parser.add_argument("--callback-method", choices=("PUT", "POST"))
    parser.add_argument("--callback-url", help="where to call back when requests carry no callback URL")


def run_standalone(description: str, default_port: int, create: Callable[[SimulatorOptions], web.Application],
                   argv: list[str] | None = None) -> None:
    """`python -m providers.<name>.simulator [--port P] [flags]`: one simulator on its own (`main.py simulate NAME`
    is the usual way), its options from SIM_* overridden by the flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    add_arguments(parser)
    args = parser.parse_args(argv)
    options = options_from_args(args, options_from_env(os.environ))
    logging.basicConfig(level=logging.INFO)
    web.run_app(create(options), host=args.host, port=args.port)


def options_from_args(args: argparse.Namespace | Sequence[str],
                      base: SimulatorOptions | None = None) -> SimulatorOptions:
    """Flags given on the command line override `base`.

    Given raw arguments (`main.py simulate mtn_momo --port 9001 --delay 0.2 --drop-callback`), they are
    parsed here and `base` defaults to the SIM_* environment variables.
    """
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="main.py simulate <provider>")
        add_arguments(parser)
        args = parser.parse_args(list(args))
        base = base or options_from_env(os.environ)
    values: dict[str, Any] = {}
    for f in fields(SimulatorOptions):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "pending_forever":
            value = _numbers(value)
        elif f.name in _FLOAT_OPTIONS:
            value = _parse_float(f"--{f.name.replace('_', '-')}", str(value))
        values[f.name] = value
    return replace(base or SimulatorOptions(), **values)


class Outcome(StrEnum):
    """What the simulated payer (or the provider's sandbox) does with a request."""

    SUCCEED = "succeed"
    FAIL = "fail"  # not enough funds / could not perform
    REJECT = "reject"  # the payer declined the PIN prompt
    EXPIRE = "expire"  # the payer never answered
    PENDING = "pending"  # never approves: the gateway's timeout decides
    DELAYED = "delayed"  # succeeds, but much later than `delay`
    PAYER_NOT_FOUND = "payer_not_found"


# Payer number (digits, with country code) -> outcome; anything else succeeds.
OUTCOMES: dict[str, Outcome] = {
    "250788000001": Outcome.SUCCEED,
    "250733000001": Outcome.SUCCEED,
    "250788000002": Outcome.FAIL,
    "250733000002": Outcome.FAIL,
    "250788000003": Outcome.PENDING,
    "250733000003": Outcome.PENDING,
    # MTN sandbox magic numbers, as documented.
    "46733123450": Outcome.FAIL,
    "46733123451": Outcome.REJECT,
    "46733123452": Outcome.EXPIRE,
    "46733123453": Outcome.PENDING,  # "ongoing"
    "46733123454": Outcome.DELAYED,
    "46733123455": Outcome.PAYER_NOT_FOUND,
}
DELAYED_FACTOR = 10  # a "delayed" payer answers after 10 x delay
# Scripted outcomes that only describe a slow or silent payer: a person answering the prompt replaces
# them. Any other (FAIL, PAYER_NOT_FOUND, the sandbox's REJECT / EXPIRE numbers) is the provider's word,
# which approving on the phone does not change: a payer without funds can approve, the payment still fails.
ANSWERED_BY_PROMPT = frozenset({Outcome.SUCCEED, Outcome.DELAYED, Outcome.PENDING})
PHONE_HOLD_SECONDS = 60.0  # a phone page renews its hold on a number; a closed tab lets it lapse
MAX_PHONE_HOLD_SECONDS = 600.0


def _digits(number: str) -> str:
    return "".join(ch for ch in number if is_number(ch))


def outcome_for(number: str, options: SimulatorOptions) -> Outcome:
    digits = _digits(number)
    if digits in options.pending_forever:
        return Outcome.PENDING
    return OUTCOMES.get(digits, Outcome.SUCCEED)


def after_prompt(answer: bool | None, scripted: Outcome) -> Outcome:
    """What a PIN prompt answer comes to: declined is a rejection, unanswered an expiry, and approved
    succeeds unless the provider refuses this number anyway (its scripted outcome)."""
    if answer is None:
        return Outcome.EXPIRE
    if not answer:
        return Outcome.REJECT
    return Outcome.SUCCEED if scripted in ANSWERED_BY_PROMPT else scripted


def same_number(a: str, b: str) -> bool:
    """Compare numbers written with or without country code: the last nine digits decide."""
    da, db = _digits(a), _digits(b)
    return bool(da) and bool(db) and da[-9:] == db[-9:]


@dataclass
class Prompt:
    """A PIN prompt on a simulated phone, waiting for the person holding it."""

    reference: str
    msisdn: str  # digits with country code
    amount: str
    currency: str
    note: str
    created: float
    decision: asyncio.Future[bool]

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "msisdn": "+" + self.msisdn, "amount": self.amount,
                "currency": self.currency, "note": self.note,
                "ageSeconds": round(time.monotonic() - self.created, 1)}


class PromptBook:
    """Open prompts by reference; the demo phone page lists them and decides."""

    def __init__(self) -> None:
        self._prompts: dict[str, Prompt] = {}

    def open(self, reference: str, msisdn: str, amount: str, currency: str, note: str) -> Prompt:
        prompt = Prompt(reference, _digits(msisdn), amount, currency, note, time.monotonic(),
                        asyncio.get_running_loop().create_future())
        self._prompts[reference] = prompt
        return prompt

    def pending(self, msisdn: str) -> list[Prompt]:
        return [p for p in self._prompts.values() if same_number(p.msisdn, msisdn)]

    def decide(self, reference: str, approve: bool) -> Prompt:
        prompt = self._prompts.pop(reference, None)
        if prompt is None:
            raise KeyError(reference)
        if not prompt.decision.done():
            prompt.decision.set_result(approve)
        return prompt

    async def wait(self, prompt: Prompt, within: float) -> bool | None:
        """True approved, False declined, None expired."""
        try:
            return await asyncio.wait_for(asyncio.shield(prompt.decision), within)
        except TimeoutError:
            return None
        finally:
            self._prompts.pop(prompt.reference, None)


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class CallbackPoster:
    """Sends one callback, once (like MTN: no retry), and only to this machine.

    It waits up to `timeout` seconds for the gateway's answer. It was 5 s: a full test run on a loaded 2-CPU CI
    machine once saw a callback's handler take longer (the CI try of 4dc4e93), the simulator gave up, the test
    server cancelled the handler, and a callback the test was about was lost to the machine's stall. No test or
    benchmark counts on the gateway being given up on; a callback never sent is an option (drop_callback)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0  # attempts made, for tests

    async def send(self, url: str, payload: Mapping[str, Any], *, method: str = "POST",
                   headers: Mapping[str, str] | None = None) -> int | None:
        """Returns the receiver's HTTP status, or None when nothing was delivered."""
        host = urlparse(url).hostname
        if host not in LOOPBACK:
            log.warning("simulator callback refused: not a loopback host", extra={"host": host})
            return None
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self.sent += 1
        started = time.monotonic()
        try:
            async with self._session.request(method, url, json=dict(payload), headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The error's type and the time taken in the line itself (a test log shows no extra fields): a
            # refused connection is at once, a gateway too slow to answer at the timeout. Not str(exc), which
            # can hold the URL and its ?secret=.
            waited = time.monotonic() - started
            log.warning("simulator callback failed after %.1f s: %s", waited, type(exc).__name__,
                        extra={"error": type(exc).__name__, "waited_s": round(waited, 3)})
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class SimulatorState:
    """One running simulator: its options, tokens, prompts, callbacks and background tasks."""

    def __init__(self, name: str, options: SimulatorOptions) -> None:
        self.name = name
        self.options = options
        self.prompts = PromptBook()
        self.poster = CallbackPoster()
        self.requests = 0  # collection / refund requests received, faults included
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (product, expires at)
        self._held: dict[str, float] = {}  # payer digits a phone page shows -> when its hold lapses
        self._tasks: set[asyncio.Task[None]] = set()

    # tokens -----------------------------------------------------------------
    def issue_token(self, product: str, lifetime: int) -> str:
        now = time.monotonic()
        self._tokens = {t: entry for t, entry in self._tokens.items() if entry[1] > now}
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (product, now + lifetime)
        return token

    def bearer_valid(self, request: web.Request, product: str) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        return entry is not None and entry[0] == product and entry[1] > time.monotonic()

    def credential_ok(self, name: str, given: str | None) -> bool:
        expected = self.options.credentials.get(name)
        if not given:
            return False
        return expected is None or secrets.compare_digest(expected.encode(), given.encode())

    # faults -----------------------------------------------------------------
    def fail_now(self) -> bool:
        """Count a collection or refund request; True when told to fail: the caller answers its provider's own 500
        (its error shape) and stores nothing.

        Call it before storing, and hang() after: a hung request that the provider did receive is the
        realistic case (and test servers cancel a handler whose client gave up)."""
        self.requests += 1
        return self.options.fail_request_500

    async def hang(self) -> None:
        """Delay the answer. Called after the request is stored: the provider has it, we just never
        hear back in time (the case where the gateway must ask the status rather than resend)."""
        if self.options.hang_request:
            await asyncio.sleep(self.options.hang_request)

    # phones on a page ---------------------------------------------------------
    def hold_phone(self, msisdn: str, seconds: float = PHONE_HOLD_SECONDS) -> None:
        """A phone page shows this number: its payers answer PIN prompts for the next `seconds`.

        A hold, not a switch, so that a closed tab gives the number back to the script and payments from
        a terminal or the API are never left waiting for a prompt nobody sees."""
        self.release_phone(msisdn)
        self._held[_digits(msisdn)] = time.monotonic() + seconds

    def release_phone(self, msisdn: str) -> None:
        self._held = {held: until for held, until in self._held.items() if not same_number(held, msisdn)}

    def held_phones(self) -> dict[str, float]:
        """Numbers held now -> seconds left; lapsed holds are dropped here."""
        now = time.monotonic()
        self._held = {held: until for held, until in self._held.items() if until > now}
        return {held: until - now for held, until in self._held.items()}

    def interactive_for(self, msisdn: str) -> bool:
        """Does a person answer this payer's PIN prompt? Everyone's with the `interactive` option,
        otherwise only while a phone page holds the number."""
        return self.options.interactive or any(same_number(held, msisdn) for held in self.held_phones())

    # the payer --------------------------------------------------------------
    async def payer_decides(self, reference: str, msisdn: str, amount: str, currency: str,
                            note: str) -> Outcome:
        """Wait like a payer would and say what happened."""
        outcome = outcome_for(msisdn, self.options)
        if self.interactive_for(msisdn):
            prompt = self.prompts.open(reference, msisdn, amount, currency, note)
            return after_prompt(await self.prompts.wait(prompt, self.options.prompt_timeout), outcome)
        if outcome is Outcome.PENDING:
            return outcome
        delay = self.options.delay * (DELAYED_FACTOR if outcome is Outcome.DELAYED else 1)
        await asyncio.sleep(delay)
        return Outcome.SUCCEED if outcome is Outcome.DELAYED else outcome

    async def deliver(self, url: str | None, final: Mapping[str, Any], stale: Mapping[str, Any] | None,
                      *, method: str = "POST", sign: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None
                      = None) -> None:
        """Send the final callback, honouring drop / duplicate / out-of-order."""
        if not url:
            return
        if self.options.drop_callback:
            log.info("simulator dropped a callback", extra={"simulator": self.name})
            return
        sign = sign or (lambda body: body)
        await self.poster.send(url, sign(final), method=method)
        if self.options.duplicate_callback:
            await self.poster.send(url, sign(final), method=method)
        if self.options.out_of_order and stale is not None:
            await asyncio.sleep(min(self.options.delay, 0.2))
            await self.poster.send(url, sign(stale), method=method)

    # background work --------------------------------------------------------
    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed", exc_info=task.exception(), extra={"simulator": self.name})

    async def idle(self) -> None:
        """Wait until every scheduled decision and callback is done (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def context(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.poster.close()


STATE = web.AppKey("simulator_state", SimulatorState)


def new_simulator_app(name: str, options: SimulatorOptions) -> tuple[web.Application, SimulatorState]:
    """An aiohttp app with the shared state and the control API; each simulator adds its own routes."""
    app = web.Application(client_max_size=64 * 1024)
    state = SimulatorState(name, replace(options))  # a copy: control changes stay with this simulator
    app[STATE] = state
    app.cleanup_ctx.append(state.context)
    app.router.add_get("/_control/pending", _pending)
    app.router.add_post("/_control/decide", _decide)
    app.router.add_post("/_control/options", _set_options)
    app.router.add_get("/_control/phone", _held_phones)
    app.router.add_post("/_control/phone", _hold_phone)
    app.router.add_get("/_control/stats", _stats)
    return app, state


async def _pending(request: web.Request) -> web.Response:
    msisdn = request.query.get("msisdn", "")
    if not _digits(msisdn):
        return web.json_response({"error": "msisdn query parameter is required"}, status=400)
    prompts = request.app[STATE].prompts.pending(msisdn)
    return web.json_response({"prompts": [p.to_json() for p in prompts]})


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        body = await request.json()
        if isinstance(body, dict):
            return body
    return None


async def _decide(request: web.Request) -> web.Response:
    body = await _json_object(request)
    if body is None or not isinstance(body.get("reference"), str) \
            or not isinstance(body.get("approve"), bool):
        return web.json_response({"error": "body must be {reference: string, approve: boolean}"}, status=400)
    try:
        prompt = request.app[STATE].prompts.decide(body["reference"], body["approve"])
    except KeyError:
        return web.json_response({"error": "no prompt waiting with that reference"}, status=404)
    log.info("simulated payer decided",
             extra={"payer": mask("+" + prompt.msisdn), "approve": body["approve"]})
    return web.json_response({"reference": prompt.reference, "approved": body["approve"]})


async def _set_options(request: web.Request) -> web.Response:
    """Change a running simulator (an outage in the middle of a burst, say)."""
    body = await _json_object(request)
    state = request.app[STATE]
    allowed = set(_BOOL_OPTIONS) | set(_FLOAT_OPTIONS)
    if body is None or not body or not set(body) <= allowed:
        return web.json_response({"error": f"body must be an object with keys from {sorted(allowed)}"},
                                 status=400)
    for key, value in body.items():
        ok = isinstance(value, bool) if key in _BOOL_OPTIONS else (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0)
        if not ok:
            return web.json_response({"error": f"{key} has the wrong type"}, status=400)
    for key, value in body.items():
        setattr(state.options, key, value)
    return web.json_response({key: getattr(state.options, key) for key in sorted(allowed)})


def _held_json(state: SimulatorState) -> dict[str, Any]:
    return {"interactive": state.options.interactive,
            "phones": [{"msisdn": "+" + held, "expiresIn": round(left, 1)}
                       for held, left in sorted(state.held_phones().items())]}


async def _stats(request: web.Request) -> web.Response:
    """How many collection and refund requests reached this simulator (faults included): a test that kills a
    worker mid-request waits for its requests to be here first."""
    return web.json_response({"requests": request.app[STATE].requests})


async def _held_phones(request: web.Request) -> web.Response:
    """Who answers PIN prompts here: everyone (`interactive`) or the numbers phone pages hold."""
    return web.json_response(_held_json(request.app[STATE]))


def _hold_request(body: dict[str, Any] | None) -> tuple[str, bool, float] | None:
    """(msisdn, hold, seconds) from {msisdn, interactive, seconds?}, or None when it is not one."""
    if body is None or not isinstance(body.get("msisdn"), str) or not isinstance(body.get("interactive"), bool):
        return None
    seconds = body.get("seconds", PHONE_HOLD_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not 0 < seconds <= MAX_PHONE_HOLD_SECONDS:
        return None
    msisdn = _digits(body["msisdn"])
    if not 9 <= len(msisdn) <= 15:  # same_number() compares the last nine digits
        return None
    return msisdn, body["interactive"], float(seconds)


async def _hold_phone(request: web.Request) -> web.Response:
    """The phone page: {msisdn, interactive: true, seconds?} holds a number it shows (renewed before
    `seconds`, 60 by default, run out), {msisdn, interactive: false} gives it back to the script."""
    asked = _hold_request(await _json_object(request))
    if asked is None:
        return web.json_response({"error": "body must be {msisdn: string of 9 to 15 digits, interactive: "
                                           f"boolean, seconds?: number in (0, {MAX_PHONE_HOLD_SECONDS:g}]}}"},
                                 status=400)
    msisdn, hold, seconds = asked
    state = request.app[STATE]
    if hold:
        state.hold_phone(msisdn, seconds)
    else:
        state.release_phone(msisdn)
    return web.json_response({"msisdn": "+" + msisdn, "interactive": hold, "expiresIn": seconds if hold else 0})


def new_id(size: int = 10) -> str:
    """A provider-side transaction id made of digits."""
    return str(secrets.randbelow(10**size)).zfill(size)
