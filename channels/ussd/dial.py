"""Terminal USSD simulator: drives a running service through an aggregator's endpoint (Africa's Talking, Hubtel or
Nalo), speaking that aggregator's own callbacks as the gateway reads them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import unicodedata
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from channels.ussd import africastalking, hubtel, nalo
from core.phone import DEFAULT_REGION, network_code_of, normalize, operator_of

AGGREGATORS = (africastalking.NAME, hubtel.NAME, nalo.NAME)
# The country whose local form (0244123456) a number given without its country code is read in: the aggregator's.
REGIONS = {africastalking.NAME: DEFAULT_REGION, hubtel.NAME: hubtel.REGION, nalo.NAME: nalo.REGION}
# The network a Ghanaian aggregator names for a number still on its range's operator (Hubtel writes it in lower case,
# Nalo in upper case): Telecel is Vodafone Ghana renamed, AT is AirtelTigo.
_GHANA_NETWORKS = {"MTN": "mtn", "TELECEL": "vodafone", "AIRTELTIGO": "airteltigo", "GLO": "glo"}

Screen = tuple[str, bool]  # the text shown, and whether the session ends with it


class _AfricasTalking:
    """A form per hop, `text` every input of the session so far joined by '*'; a text/plain reply, CON or END."""

    def __init__(self, code: str, number: str) -> None:
        self.code, self.number = code, number
        self.session_id = f"ATUid_dial_{uuid.uuid4().hex[:16]}"
        self.inputs: list[str] = []

    def hop(self, answer: str | None) -> dict[str, Any]:
        if answer is not None:
            self.inputs.append(answer)
        return {"data": {"sessionId": self.session_id, "serviceCode": self.code, "phoneNumber": self.number,
                         "networkCode": network_code_of(self.number), "text": "*".join(self.inputs)}}

    def screen(self, resp: httpx.Response) -> Screen | None:
        body = resp.text
        if not body.startswith(("CON ", "END ")):
            return None
        return body[4:], body.startswith("END ")

    def hang_up(self) -> dict[str, Any] | None:
        return None  # Africa's Talking tells the app on its separate end-of-session URL, not in a hop


class _Hubtel:
    """JSON per hop: Type Initiation with the dialled string as Message, then Response with the latest input only,
    numbered by Sequence, with the ClientState of the reply before; a JSON reply whose Type Release ends it."""

    def __init__(self, code: str, number: str) -> None:
        self.code, self.number = code, number
        self.session_id = uuid.uuid4().hex
        # Hubtel's ServiceCode is the short code dialled, without '*' and '#' (*713*45# comes as "713").
        self.service_code = code.strip("*#").split("*", 1)[0]
        self.sequence = 0
        self.client_state = ""

    def _body(self, kind: str, message: str) -> dict[str, Any]:
        self.sequence += 1
        return {"json": {"Mobile": self.number.lstrip("+"), "SessionId": self.session_id,
                         "ServiceCode": self.service_code, "Type": kind, "Message": message,
                         "Operator": _ghana_network(self.number).lower(), "Sequence": self.sequence,
                         "ClientState": self.client_state}}

    def hop(self, answer: str | None) -> dict[str, Any]:
        return self._body("Initiation", self.code) if answer is None else self._body("Response", answer)

    def screen(self, resp: httpx.Response) -> Screen | None:
        body = _json(resp)
        kind = str(body.get("Type", "")).lower()
        if kind not in ("response", "release") or not isinstance(body.get("Message"), str):
            return None
        self.client_state = str(body.get("ClientState") or "")
        return body["Message"], kind == "release"

    def hang_up(self) -> dict[str, Any] | None:
        return self._body("Release", "")  # what Hubtel sends when the phone ends the session


class _Nalo:
    """JSON per hop: MSGTYPE true with the dialled string as USERDATA, then false with the latest input only; a JSON
    reply whose MSGTYPE false ends it."""

    USERID = "dial"  # the account name Nalo sends (echoed back by the gateway)

    def __init__(self, code: str, number: str) -> None:
        self.code, self.number = code, number
        self.session_id = uuid.uuid4().hex

    def hop(self, answer: str | None) -> dict[str, Any]:
        return {"json": {"USERID": self.USERID, "MSISDN": self.number.lstrip("+"),
                         "USERDATA": self.code if answer is None else answer, "MSGTYPE": answer is None,
                         "NETWORK": _ghana_network(self.number).upper(), "SESSIONID": self.session_id}}

    def screen(self, resp: httpx.Response) -> Screen | None:
        body = _json(resp)
        if not isinstance(body.get("MSGTYPE"), bool) or not isinstance(body.get("MSG"), str):
            return None
        return body["MSG"], not body["MSGTYPE"]

    def hang_up(self) -> dict[str, Any] | None:
        return None  # Nalo sends nothing when the phone ends the session


_PHONES: dict[str, Callable[[str, str], _AfricasTalking | _Hubtel | _Nalo]] = {
    africastalking.NAME: _AfricasTalking, hubtel.NAME: _Hubtel, nalo.NAME: _Nalo}


def _ghana_network(e164: str) -> str:
    """The network name a Ghanaian aggregator sends for `e164` (its range's operator; "" when none is known)."""
    operator = operator_of(e164) or ""
    return _GHANA_NETWORKS.get(operator, operator)


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(resp.content)
    except (ValueError, RecursionError):  # RecursionError: nested past the interpreter's depth, no ValueError
        return {}
    return body if isinstance(body, dict) else {}


def _read_line(prompt: str) -> str | None:
    """A line from stdin, None at its end. Read from the descriptor a byte at a time, not through input(): this runs
    in a daemon thread (_ask), and one left blocked in sys.stdin's buffered reader when Ctrl-C ends the process
    held that reader's lock, which aborted the interpreter's shutdown ("Fatal Python error: _enter_buffered_busy",
    SIGABRT). Without the readline module, which nothing here imports, input() had no more line editing than the
    terminal's own."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = bytearray()
    while True:
        byte = os.read(0, 1)
        if not byte:
            return line.decode(errors="replace") if line else None
        if byte == b"\n":
            return line.decode(errors="replace")
        line += byte


async def dial(service_code: str, phone: str, base_url: str, secret: str | None = None, *,
               aggregator: str = africastalking.NAME,
               read: Callable[[str], str | None] = _read_line, write: Callable[[str], None] = print,
               transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Dial `service_code` as `phone` through `aggregator`'s endpoint, print each screen, read each answer from stdin
    until the service ends the session.

    Returns a process exit code: 0 when the service ended the session, 1 otherwise, 2 for a URL it cannot call.
    """
    if aggregator not in _PHONES:
        raise ValueError(f"aggregator {aggregator!r} is not one of {', '.join(AGGREGATORS)}")
    number = normalize(phone, REGIONS[aggregator]).e164
    handset = _PHONES[aggregator](service_code, number)
    url = base_url.rstrip("/") + f"/ussd/{aggregator}"
    problem = _url_problem(url)
    if problem:
        write(f"[cannot call {url}: {problem}]")
        return 2
    params = {"secret": secret} if secret else None
    answer: str | None = None
    async with httpx.AsyncClient(timeout=20.0, transport=transport) as http:

        async def hang_up() -> None:
            closing = handset.hang_up()
            if closing is not None:
                try:
                    await http.post(url, params=params, timeout=5.0, **closing)
                except httpx.HTTPError:
                    pass  # the session is left to the gateway's sweep, as a lost Release would be
            write("[cancelled]")

        try:
            while True:
                try:
                    resp = await http.post(url, params=params, **handset.hop(answer))
                except httpx.HTTPError as exc:
                    write(f"[network error calling {url}: {type(exc).__name__}: {exc}]")
                    return 1
                screen = handset.screen(resp) if resp.status_code == 200 else None
                if screen is None:
                    hint = _refused_hint(resp.status_code, secret, aggregator)
                    write(f"[HTTP {resp.status_code}] {_shown(resp.text[:200])}{hint}")
                    return 1
                text, end = screen
                write("-" * 30)
                write(_shown(text))
                write("-" * 30)
                if end:
                    return 0
                typed = await _ask(read, "> ")
                if typed is None:  # stdin closed: the user hung up
                    await hang_up()
                    return 1
                answer = typed.strip()
        except asyncio.CancelledError:
            # Ctrl-C (asyncio.run cancels this task on SIGINT): the user hung up, as when stdin closes; main()
            # turns the KeyboardInterrupt that asyncio.run raises next into exit 1.
            write("")
            await hang_up()
            raise


def _shown(text: str) -> str:
    """`text` with its control characters but the newline shown as `\\xNN` escapes: what a gateway sends is
    printed to a terminal, and an escape sequence in it would move the cursor, retitle the window or hide the
    screen's lines."""
    return "".join(c if c == "\n" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def _ask(read: Callable[[str], str | None], prompt: str) -> asyncio.Future[str | None]:
    """`read(prompt)` in a daemon thread. asyncio.to_thread's executor thread is waited for when asyncio.run ends:
    Ctrl-C at the prompt waited there for a line (or EOF) on stdin before it was a traceback."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str | None] = loop.create_future()

    def settle(result: str | None, error: BaseException | None) -> None:
        if answer.done():  # cancelled meanwhile
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    def run() -> None:
        result: str | None = None
        error: BaseException | None = None
        try:
            result = read(prompt)
        except BaseException as exc:  # handed to the waiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits for this answer
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="dial-read", daemon=True).start()
    return answer


def _refused_hint(status: int, secret: str | None, aggregator: str = africastalking.NAME) -> str:
    """What a 403 means to the one dialling: the gateway's answer is a bare "forbidden" (it tells a caller nothing
    of its checks), which left an operator dialling a production gateway without knowing what to change."""
    if status != 403:
        return ""
    name = aggregator.upper()
    allowlist = f"or this address is outside its USSD_IP_ALLOWLIST_{name} or, without one, its USSD_IP_ALLOWLIST"
    if secret is None:
        return f" (the gateway wants its callback secret: --secret with its CALLBACK_SECRET_{name}; {allowlist})"
    return (f" (--secret is not the gateway's CALLBACK_SECRET_{name}, nor in its CALLBACK_SECRET_{name}_PREVIOUS; "
            f"{allowlist})")


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be called, or None. httpx's InvalidURL (a port that is no number: `PORT=abc`, `--url
    http://host:x`) is no HTTPError, and a port past 65535 failed inside the connection (an OverflowError): both
    were tracebacks."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return str(exc)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "give a URL such as http://127.0.0.1:8080"
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        return f"invalid port {parsed.port} (a number from 1 to 65535)"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m channels.ussd.dial CODE PHONE [URL] [SECRET] [AGGREGATOR]` when main.py is not at hand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or (len(args) > 4 and args[4] not in AGGREGATORS):
        print(f"usage: dial SERVICE_CODE PHONE [BASE_URL] [SECRET] [{'|'.join(AGGREGATORS)}]", file=sys.stderr)
        return 2
    base = args[2] if len(args) > 2 else "http://127.0.0.1:8080"
    try:
        return asyncio.run(dial(args[0], args[1], base, (args[3] or None) if len(args) > 3 else None,
                                aggregator=args[4] if len(args) > 4 else africastalking.NAME))
    except KeyboardInterrupt:  # hung up with Ctrl-C: dial said "[cancelled]"
        return 1


if __name__ == "__main__":
    sys.exit(main())
