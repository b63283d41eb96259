"""Terminal USSD simulator: drives a running service through an aggregator's endpoint (Africa's Talking, Hubtel or
Nalo), speaking that aggregator's own callbacks as the gateway reads them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import sys
import threading
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from channels.ussd import africastalking, hubtel, nalo
from core.config import ConfigError, listen_host, local_url
from core.phone import DEFAULT_REGION, PhoneError, network_code_of, normalize, operator_of

AGGREGATORS = (africastalking.NAME, hubtel.NAME, nalo.NAME)
# The country whose local form (0244123456) a number given without its country code is read in: the aggregator's.
REGIONS = {africastalking.NAME: DEFAULT_REGION, hubtel.NAME: hubtel.REGION, nalo.NAME: nalo.REGION}
# The countries whose numbers dial through each aggregator, None for any. Hubtel and Nalo carry Ghana's networks
# only: a +250 number through them is a call no Ghanaian aggregator ever sends (the gateway would take it all the
# same, and the dial tried a Rwandan member's menus through Ghana's endpoint). Africa's Talking runs USSD in several
# countries and the gateway takes any mobile number from it (a cooperative of any country it serves may use it):
# any, as before.
COUNTRIES: dict[str, frozenset[str] | None] = {africastalking.NAME: None, hubtel.NAME: frozenset({hubtel.REGION}),
                                               nalo.NAME: frozenset({nalo.REGION})}
ALLOW_REMOTE = "--allow-remote"  # the flag of both entry points (main.py dial, python -m channels.ussd.dial)
TIMEOUT = 20.0  # seconds for each hop's answer
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


class DialError(Exception):
    """A caller `dial` cannot dial as: said in one line before anything is sent (exit 2)."""


def caller(phone: str, aggregator: str) -> str:
    """`phone` as `aggregator` sends it (E.164), read in the aggregator's country's local form too (0244123456
    through Hubtel or Nalo is Ghanaian); DialError for one that is no mobile number or is of a country the
    aggregator does not serve. The one check of both entry points and of dial() itself."""
    if aggregator not in _PHONES:
        raise DialError(f"aggregator {aggregator!r} is not one of {', '.join(AGGREGATORS)}")
    try:
        number = normalize(phone, REGIONS[aggregator])
    except PhoneError as exc:
        raise DialError(f"{phone!r}: {exc}") from None
    countries = COUNTRIES[aggregator]
    if countries is not None and number.region not in countries:
        raise DialError(f"{phone!r}: a number of {number.region or 'another country'}; {aggregator} carries "
                        f"calls from {', '.join(sorted(countries))} numbers only (dial another country's number "
                        f"through {africastalking.NAME})")
    return number.e164


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


def _to_stderr(line: str) -> None:
    """One of dial's own errors, on standard error: the screens alone go to standard output, so that `dial ... |
    tee session.txt` keeps the session and a refused URL is still seen on the terminal. Dropped when started without
    a standard error (`2>&-`): print(file=None) would have written it to standard output. Dropped too when what
    reads standard error is gone (`2>` a closed pipe): its BrokenPipeError was taken for the screens' reader gone
    ("[cancelled]" on standard output, Hubtel's session released, exit 141); the exit code still says it."""
    if sys.stderr is None:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        # The line left in stderr's buffer would fail again at the interpreter's exit (exit 120): nothing more
        # written there.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _read_line(prompt: str) -> str | None:
    """A line from stdin, None at its end. Read from the descriptor a byte at a time, not through input(): this runs
    in a daemon thread (_ask), and one left blocked in sys.stdin's buffered reader when Ctrl-C ends the process
    held that reader's lock, which aborted the interpreter's shutdown ("Fatal Python error: _enter_buffered_busy",
    SIGABRT). Without the readline module, which nothing here imports, input() had no more line editing than the
    terminal's own."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    if sys.stdin is None:
        # Started with descriptor 0 closed (`dial ... <&-`): the descriptor is then one of this process's own (the
        # event loop's, a connection's), whose read failed (EINVAL, a traceback) or took the gateway's bytes.
        return None
    line = bytearray()
    while True:
        try:
            byte = os.read(0, 1)
        except OSError:  # the terminal gone (EIO after the SSH connection dropped): hung up, as at its end
            return None
        if not byte:
            return line.decode(errors="replace") if line else None
        if byte == b"\n":
            return line.decode(errors="replace")
        line += byte


async def dial(service_code: str, phone: str, base_url: str, secret: str | None = None, *,
               aggregator: str = africastalking.NAME,
               allow_remote: bool = False, read: Callable[[str], str | None] = _read_line,
               write: Callable[[str], None] = print, write_error: Callable[[str], None] = _to_stderr,
               transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Dial `service_code` as `phone` through `aggregator`'s endpoint, print each screen (`write`), read each answer
    from stdin until the service ends the session. `base_url` must be this machine's unless `allow_remote`.

    Returns a process exit code: 0 when the service ended the session, 1 otherwise, 2 for a URL it cannot call;
    what went wrong is one line to `write_error` (standard error). A hang-up's "[cancelled]" is the session's last
    line, written with the screens.
    Raises DialError for a caller it cannot dial as (caller()).
    """
    number = caller(phone, aggregator)
    handset = _PHONES[aggregator](service_code, number)
    url = base_url.rstrip("/") + f"/ussd/{aggregator}"
    problem = _url_problem(url, allow_remote=allow_remote)
    if problem:
        write_error(f"[cannot call {url}: {problem}]")
        return 2
    params = {"secret": secret} if secret else None
    answer: str | None = None
    ended = False  # the gateway ended the session: nothing left to release
    # This machine's gateway is called directly: through HTTP_PROXY or ALL_PROXY (trust_env), a proxy elsewhere got
    # the callbacks, the secret in their query, for an address it cannot reach. A remote one (--allow-remote) goes
    # as the environment says.
    # A transport of its own is what keeps the environment's proxies off (httpx reads them only for its default
    # one): trust_env=False also dropped SSL_CERT_FILE and SSL_CERT_DIR, the CA of a TLS terminator on this machine.
    if transport is None and is_this_machine(httpx.URL(url).host):
        transport = httpx.AsyncHTTPTransport()
    async with httpx.AsyncClient(timeout=TIMEOUT, transport=transport) as http:

        async def hang_up() -> None:
            closing = handset.hang_up()
            if closing is not None:
                try:
                    await http.post(url, params=params, timeout=5.0, **closing)
                except httpx.HTTPError:
                    pass  # the session is left to the gateway's sweep, as a lost Release would be
            with contextlib.suppress(BrokenPipeError):  # the reader of our output gone: nobody to tell
                write("[cancelled]")

        try:
            while True:
                try:
                    resp = await http.post(url, params=params, **handset.hop(answer))
                except httpx.HTTPError as exc:
                    write_error(f"[network error calling {url}: {_network_problem(exc)}]")
                    return 1
                screen = handset.screen(resp) if resp.status_code == 200 else None
                if screen is None:
                    # One line: a proxy's HTML error page ran over several, its \r shown as escapes.
                    body = " ".join(resp.text[:200].split())
                    hint = _refused_hint(resp.status_code, secret, aggregator) or _not_found_hint(resp.status_code)
                    write_error(f"[HTTP {resp.status_code}] {_shown(body)}{hint}")
                    return 1
                text, end = screen
                ended = end
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
            with contextlib.suppress(BrokenPipeError):
                write("")
            await hang_up()
            raise
        except BrokenPipeError:
            # `dial ... | head -3`: the reader of the screens left, as one who hangs up; run() exits as a Unix tool
            # killed by SIGPIPE. A session the gateway ended (its last screen unshown) is not released again:
            # Hubtel sends no Release after the gateway's own.
            if not ended:
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


def _network_problem(exc: httpx.HTTPError) -> str:
    """`exc` in one line that says what to check: a timeout's own text is empty ("ReadTimeout: "), and "All
    connection attempts failed" does not say that nothing listens there."""
    said = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    if isinstance(exc, httpx.TimeoutException):
        return f"{said}: no answer within {TIMEOUT:g} s"
    if isinstance(exc, httpx.ConnectError):
        # A TLS handshake that failed is a ConnectError too, from a gateway that is running: not "is it running?".
        tls = _cause(exc, ssl.SSLError)
        if isinstance(tls, ssl.SSLCertVerificationError):
            return f"{said} (TLS: its certificate is not trusted here; SSL_CERT_FILE names the CA that signed it)"
        if tls is not None:
            return f"{said} (TLS failed: a gateway serving plain HTTP, as `run` and `serve` do, is called with http://)"
        return f"{said} (is the gateway running there? `main.py run` or `serve`; --url its address)"
    return said


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` among what `exc` was raised from (httpx's from httpcore's from ssl's)."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain is short; a cycle is not followed forever
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _not_found_hint(status: int) -> str:
    if status != 404:
        return ""
    return " (no USSD endpoint at this URL: --url is the gateway's base URL, e.g. http://127.0.0.1:8080)"


def is_this_machine(host: str) -> bool:
    """Whether `host` is this machine by its name or address alone, without resolving a name (one that resolves to
    127.0.0.1 today may not tomorrow): `localhost`, a loopback address (127.0.0.0/8, ::1), an unspecified one
    (0.0.0.0, ::), which a connection on Linux takes to this machine, or an address this machine holds (an
    interface's: `serve` with HOST=10.0.0.5 listens there, and `dial`'s default URL is its own). An address is read
    as the connection reads it (127.1 and 2130706433 are 127.0.0.1), never looked up."""
    if host.lower().rstrip(".") == "localhost":
        return True
    addresses = _addresses(host)
    return bool(addresses) and all(address.is_loopback or address.is_unspecified or _held(address)
                                   for address in addresses)


def _held(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether this machine holds `address`: the route to it is this machine's own, so a UDP socket connected to it
    (which sends nothing, and looks no name up) leaves from it, as from no other address. A bind was no proof: it
    takes a broadcast address (255.255.255.255, an interface's 192.0.2.255), a multicast one, and any address at all
    where non-local binds are allowed (net.ipv4.ip_nonlocal_bind, on keepalived and HAProxy hosts; a sandbox's
    /proc/sys may not say so). A connection to a broadcast address is refused here (EACCES), a multicast address
    is a group's, and an IPv6 link-local one is held with its zone (fe80::1%eth0), which a connection needs too."""
    if address.is_multicast:
        return False
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        [*_, destination] = socket.getaddrinfo(str(address), 9, family, socket.SOCK_DGRAM,
                                               flags=socket.AI_NUMERICHOST)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(destination)
            source = probe.getsockname()
    except OSError:  # unreachable, a broadcast address (EACCES), no IPv6 here, a zone that is no interface
        return False
    # The address, and for IPv6 the zone (sin6_scope_id): a link-local address of another interface is not this one
    return ipaddress.ip_address(source[0]) == ipaddress.ip_address(destination[0]) and source[3:] == destination[3:]


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` is when it is one (none for a name): the C library's own reading (AI_NUMERICHOST: no
    lookup), which the connection's getaddrinfo makes of it. ipaddress alone refused the shorthand forms it reads
    (127.1, 0x7f.1, a single number); an IPv4-mapped IPv6 address (::ffff:127.0.0.1) is taken as its IPv4 one,
    which Python 3.11 does not call loopback."""
    try:
        found = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # socket.gaierror (an OSError): no address; UnicodeError: a name too long
        return []
    addresses = []
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is None and len(sockaddr) > 3 and sockaddr[3]:  # fe80::1%eth0: its zone, which an address needs
            address = ipaddress.IPv6Address(f"{address}%{sockaddr[3]}")
        addresses.append(mapped or address)
    return addresses


def default_url(env: Mapping[str, str] | None = None) -> str:
    """The gateway `run` (or `serve`) serves here by default: where HOST and PORT make it listen (scripts/run.sh's
    `PORT=8090`), 127.0.0.1:8080 unless set. A PORT that is no port is left to the dial's URL error; a HOST the
    service refuses is refused as it refuses it (ConfigError: HOST=[::1] is HOST=::1 written as in a URL)."""
    env = os.environ if env is None else env
    return local_url(listen_host(env), env.get("PORT", "").strip() or "8080")


def _url_problem(url: str, *, allow_remote: bool = False) -> str | None:
    """Why `url` cannot be called, or None. httpx's InvalidURL (a port that is no number: `PORT=abc`, `--url
    http://host:x`) is no HTTPError, and a port past 65535 failed inside the connection (an OverflowError): both
    were tracebacks. Another machine only with `allow_remote`: the dial sends it the aggregator's callback secret
    and a member's number, and any gateway on it takes the calls as a member's (a PIN prompt on her phone)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return str(exc)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "give a URL such as http://127.0.0.1:8080"
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        return f"invalid port {parsed.port} (a number from 1 to 65535)"
    if not allow_remote and not is_this_machine(parsed.host):
        return (f"{parsed.host} is not this machine (localhost, 127.0.0.0/8, ::1, 0.0.0.0, ::, an address it holds), "
                f"and dial sends the aggregator's callback secret and a member's number: {ALLOW_REMOTE} to dial a "
                "gateway elsewhere")
    return None


def run(service_code: str, phone: str, base_url: str, secret: str | None = None, *,
        aggregator: str = africastalking.NAME, allow_remote: bool = False) -> int:
    """dial() as a command (both entry points): its exit code; 1 when hung up with Ctrl-C, 141 (SIGPIPE's) when
    what reads its output is gone; 2, nothing sent, when started without standard output."""
    if sys.stdout is None:
        # Started with descriptor 1 closed (`dial ... >&-`): the prompt's write was an AttributeError traceback
        # once a session was open (Hubtel's never released). Nowhere to show a screen.
        if sys.stderr is not None:
            print("dial: standard output is closed: nowhere to show the gateway's screens (nothing sent)",
                  file=sys.stderr)
        return 2
    with contextlib.suppress(AttributeError, ValueError):
        # Each line written as it is printed, also into a pipe, as main.py's: block-buffered (`python -m
        # channels.ussd.dial ... | head`), the screens were written at the interpreter's exit, where a reader gone
        # was "Exception ignored ... BrokenPipeError" and exit 120, past the handling below.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        code = asyncio.run(dial(service_code, phone, base_url, secret, aggregator=aggregator,
                                allow_remote=allow_remote))
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:  # hung up with Ctrl-C: dial said "[cancelled]" (README: exit 1, hung up)
        return 1
    except BrokenPipeError:
        # Nothing more written there: the interpreter's own flush at exit would say "Exception ignored".
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


USAGE = f"usage: dial SERVICE_CODE PHONE [BASE_URL] [SECRET] [{'|'.join(AGGREGATORS)}] [{ALLOW_REMOTE}]"


def main(argv: list[str] | None = None) -> int:
    """`python -m channels.ussd.dial CODE PHONE [URL] [SECRET] [AGGREGATOR] [--allow-remote]` when main.py is not at
    hand: the number and the URL checked as main.py's `dial` checks them."""
    args = list(sys.argv[1:] if argv is None else argv)
    allow_remote = ALLOW_REMOTE in args
    args = [arg for arg in args if arg != ALLOW_REMOTE]
    if not 2 <= len(args) <= 5 or (len(args) > 4 and args[4] not in AGGREGATORS):
        print(USAGE, file=sys.stderr)
        return 2
    aggregator = args[4] if len(args) > 4 else africastalking.NAME
    try:
        caller(args[1], aggregator)
    except DialError as exc:  # a traceback from core.phone before
        print(USAGE, file=sys.stderr)
        print(f"dial: error: argument phone: {exc}", file=sys.stderr)
        return 2
    try:
        base = args[2] if len(args) > 2 else default_url()
    except ConfigError as exc:  # HOST as the service refuses it, said as the service says it
        print(exc, file=sys.stderr)
        return 2
    return run(args[0], args[1], base, (args[3] or None) if len(args) > 3 else None, aggregator=aggregator,
               allow_remote=allow_remote)


if __name__ == "__main__":
    sys.exit(main())
