"""core.http: httpx requests over aiohttp, against real servers on 127.0.0.1.

The error classes are the point: providers/calls.py retries a ConnectError/ConnectTimeout as "nothing
was sent" and treats everything else as "may have reached the provider".
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from typing import Any

import httpx
import pytest
from aiohttp import web

from core import http as core_http
from core.http import AiohttpTransport, make_client


async def _serve(aiohttp_server: Any, handler: Any, path: str = "/{tail:.*}") -> Any:
    app = web.Application()
    app.router.add_route("*", path, handler)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_form_post_headers_auth_and_json_answer(aiohttp_server: Any) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(method=request.method, raw_path=request.raw_path, headers=dict(request.headers),
                    form=dict(await request.post()))
        return web.json_response({"ok": True, "n": 3}, status=201, reason="Made It",
                                 headers={"X-Answer": "yes"})

    server = await _serve(aiohttp_server, handler)
    async with make_client() as http:
        answer = await http.post(f"http://127.0.0.1:{server.port}/version1/messaging%2Fx?q=a%20b&k=1",
                                 data={"to": "+250788123456", "message": "Murakoze & thanks"},
                                 headers={"apiKey": "k-123"}, auth=("user", "pass"))
    assert answer.status_code == 201
    assert answer.reason_phrase == "Made It"
    assert answer.headers["x-answer"] == "yes"
    assert answer.json() == {"ok": True, "n": 3}
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/version1/messaging%2Fx?q=a%20b&k=1"  # sent as encoded, not re-quoted
    assert seen["form"] == {"to": "+250788123456", "message": "Murakoze & thanks"}
    assert seen["headers"]["apiKey"] == "k-123"
    assert seen["headers"]["Authorization"] == "Basic dXNlcjpwYXNz"
    assert seen["headers"]["Content-Type"] == "application/x-www-form-urlencoded"


async def test_json_body_and_compressed_answer(aiohttp_server: Any) -> None:
    got: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        got.append(await request.json())
        body = gzip.compress(json.dumps({"status": "SUCCESSFUL"}).encode())
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    server = await _serve(aiohttp_server, handler)
    async with make_client() as http:
        answer = await http.put(f"http://127.0.0.1:{server.port}/pay", json={"amount": "50000"})
    assert got == [{"amount": "50000"}]
    assert answer.json() == {"status": "SUCCESSFUL"}  # httpx decoded the gzip once


async def test_connections_are_reused(aiohttp_server: Any) -> None:
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text="ok")

    server = await _serve(aiohttp_server, handler)
    async with make_client() as http:
        for _ in range(5):
            assert (await http.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
    assert len(peers) == 5 and len(set(peers)) == 1


async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with make_client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/collect", json={"a": 1})


async def _raw_server(on_request: Any) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    received: list[bytes] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        await on_request(writer)

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


async def test_disconnect_after_the_request_is_not_a_connect_error() -> None:
    """The request reached the server, which closed without answering: ambiguous, never "not sent"."""
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.close()

    server, port, received = await _raw_server(hang_up)
    async with server, make_client() as http:
        with pytest.raises(httpx.TransportError) as caught:
            await http.post(f"http://127.0.0.1:{port}/requesttopay", json={"amount": "100"})
    assert received and received[0].startswith(b"POST /requesttopay HTTP/1.1")
    assert not isinstance(caught.value, (httpx.ConnectError, httpx.ConnectTimeout))
    assert isinstance(caught.value, httpx.ReadError)


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
async def test_a_request_sent_and_hung_up_on_is_never_sent_again_nor_called_a_connect_error(method: str) -> None:
    """A request the server read whole and then hung up on (its connection kept alive from an earlier answer), the
    server then refusing connections (it is going down). aiohttp sent a request of a method it deems idempotent (PUT,
    GET, DELETE...) a second time, on a new connection, and that one's refusal came out: a ConnectError ("nothing was
    sent") for a request the server had, which providers.calls.send turns back and sends again. The gateway's client
    sends each request once, as httpx's own transport does: a ReadError, in doubt."""
    seen: list[bytes] = []
    server: asyncio.Server | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            seen.append(head.split(b" ", 2)[1])
            if head.split(b" ", 1)[1].startswith(b"/pay"):
                assert server is not None
                server.close()  # no new connection from here on
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with make_client() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/token")).status_code == 200
        with pytest.raises(httpx.TransportError) as caught:
            await http.request(method, f"http://127.0.0.1:{port}/pay", json={"amount": "100"})
    assert seen == [b"/token", b"/pay"]
    assert isinstance(caught.value, httpx.ReadError), repr(caught.value)


async def test_no_answer_within_the_read_timeout_is_a_read_timeout() -> None:
    done = asyncio.Event()

    async def never_answer(writer: asyncio.StreamWriter) -> None:
        await done.wait()  # no answer while the test runs

    server, port, received = await _raw_server(never_answer)
    async with server, make_client() as http:
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"http://127.0.0.1:{port}/x", json={}, timeout=httpx.Timeout(0.3, connect=1.0))
        # The request's 0.3 s, not the client's default 10 s (the bound was 3 s: a loaded machine's pause of this
        # process can take that long, and the server, which never answers, no longer ends it at 5 s).
        assert asyncio.get_running_loop().time() - started < 8
        done.set()
    assert len(received) == 1


async def test_no_free_connection_within_the_pool_timeout_is_a_connect_timeout(aiohttp_server: Any) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        arrived.set()
        await release.wait()
        return web.Response(text="late")

    server = await _serve(aiohttp_server, handler)
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(transport=AiohttpTransport(max_connections=1)) as http:
        first = asyncio.create_task(http.get(f"{base}/first", timeout=5.0))
        await asyncio.wait_for(arrived.wait(), 5)
        with pytest.raises(httpx.ConnectTimeout):
            await http.get(f"{base}/second", timeout=httpx.Timeout(5.0, pool=0.2))
        release.set()
        assert (await first).text == "late"
    assert calls == ["/first"]  # the second request never went out


async def test_an_oversized_answer_is_refused(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_http, "MAX_RESPONSE_BYTES", 1000)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/declared":
            return web.Response(body=b"x" * 5000)
        response = web.StreamResponse()  # chunked, no length announced
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"y" * 400)
        await response.write_eof()
        return response

    server = await _serve(aiohttp_server, handler)
    async with make_client() as http:
        for path in ("/declared", "/chunked"):
            with pytest.raises(httpx.RemoteProtocolError, match="over"):
                await http.get(f"http://127.0.0.1:{server.port}{path}")


async def test_closed_transport_refuses_to_send(aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    server = await _serve(aiohttp_server, handler)
    transport = AiohttpTransport()
    http = httpx.AsyncClient(transport=transport)
    assert (await http.get(f"http://127.0.0.1:{server.port}/")).text == "ok"
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{server.port}/"))


async def test_cookies_a_provider_sets_are_not_sent_back(aiohttp_server: Any) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("session", "provider-session-1", path="/")
        return response

    server = await _serve(aiohttp_server, handler)
    async with make_client() as http:
        first = await http.get(f"http://127.0.0.1:{server.port}/a")
        assert "session=provider-session-1" in first.headers["set-cookie"]
        await http.get(f"http://127.0.0.1:{server.port}/b")
        assert len(http.cookies) == 0
    assert seen == [None, None]


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself (no CA anyone trusts), and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


async def test_tls_certificates_are_verified(aiohttp_server: Any, tmp_path: Any) -> None:
    """Provider calls are HTTPS in production: an untrusted certificate fails before anything is sent."""
    import ssl

    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response({"secure": request.secure})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1", ssl=server_tls)
    url = f"https://127.0.0.1:{server.port}"
    async with make_client() as http:  # the default: the public CAs (certifi), hostname checked
        with pytest.raises(httpx.ConnectError):
            await http.post(f"{url}/collect", json={"amount": "100"})
    assert calls == []  # refused during the handshake: a retry cannot double anything
    trusting = ssl.create_default_context(cafile=cert)
    async with httpx.AsyncClient(transport=AiohttpTransport(verify=trusting)) as http:
        answer = await http.post(f"{url}/collect", json={"amount": "100"})
    assert answer.json() == {"secure": True} and calls == ["/collect"]


class _Answers:
    """A resolver answering fixed addresses, standing in for DNS that an attacker controls."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.asked: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
        self.asked.append((host, port))
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": 0} for a in self.addresses]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("inward", ["127.0.0.1", "10.0.0.7", "172.16.3.4", "192.168.1.1", "169.254.169.254",
                                    "100.64.0.1", "0.0.0.0", "::1", "fc00::1", "fe80::1%eth0", "224.0.0.1",
                                    # IPv4 hosts inside IPv6: mapped, 6to4, NAT64, IPv4-compatible
                                    "::ffff:127.0.0.1", "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "::10.0.0.7"])
async def test_public_only_resolver_refuses_any_inward_address(inward: str) -> None:
    answers = _Answers("93.184.216.34", inward)
    resolver = core_http.PublicOnlyResolver(answers)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="which is not a public address"):
        await resolver.resolve("hooks.example.org", 443)
    answers.addresses = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    assert [r["host"] for r in await resolver.resolve("hooks.example.org", 443)] == answers.addresses
    assert answers.asked == [("hooks.example.org", 443)] * 2


async def test_public_only_client_never_connects_inward(aiohttp_server: Any) -> None:
    """The webhook client connects only to the addresses it checked: a name that resolves to loopback at
    connect time (DNS rebinding after the delivery's own check) gets a ConnectError and nothing is sent,
    where the providers' client reaches the same server."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    server = await _serve(aiohttp_server, handler)
    async with make_client(public_only=True) as guarded, make_client() as plain:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await guarded.post(f"http://localhost:{server.port}/hook", content=b"{}")
        assert hits == []
        assert (await plain.post(f"http://localhost:{server.port}/hook", content=b"{}")).status_code == 200
        assert hits == ["/hook"]


async def test_runtime_webhook_client_is_public_only_outside_the_embedded_default(settings: Any,
                                                                                 aiohttp_server: Any) -> None:
    import dataclasses

    from app import open_runtime

    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    server = await _serve(aiohttp_server, handler)
    url = f"http://localhost:{server.port}/hook"
    # No WEBHOOK_PRIVATE_NETWORKS (the suite's settings list its receivers' 127.0.0.1/32).
    async with open_runtime(dataclasses.replace(settings, webhook_private_networks=())) as rt:
        assert rt.webhook_http is not None and rt.webhook_http is not rt.http
        if rt.settings.is_embedded:  # one machine, trying it out: a local receiver is allowed
            assert (await rt.webhook_http.post(url, content=b"{}")).status_code == 200
            assert hits == ["/hook"]
        else:
            with pytest.raises(httpx.ConnectError):
                await rt.webhook_http.post(url, content=b"{}")
            assert hits == []


@pytest.mark.parametrize("inward", ["127.0.0.1", "192.168.1.1", "10.1.0.7", "169.254.169.254", "::1",
                                    "::ffff:10.0.0.7"])
async def test_public_only_resolver_lets_through_only_the_listed_private_networks(inward: str) -> None:
    """WEBHOOK_PRIVATE_NETWORKS: an address of a listed network is reached; any other that is not public (another
    private network, loopback, the metadata service) is refused as before."""
    listed = core_http.PublicOnlyResolver(_Answers("10.0.0.7", "93.184.216.34"),  # type: ignore[arg-type]
                                          allowed=("10.0.0.0/24", "fd00::/8"))
    assert [r["host"] for r in await listed.resolve("erp.coop.lan", 443)] == ["10.0.0.7", "93.184.216.34"]
    rebound = core_http.PublicOnlyResolver(_Answers("10.0.0.7", inward), allowed=("10.0.0.0/24",))  # type: ignore[arg-type]
    with pytest.raises(OSError, match=f"resolves to {inward}, which is not a public address"):
        await rebound.resolve("erp.coop.lan", 443)


async def test_the_webhook_client_reaches_a_listed_network_by_name(aiohttp_server: Any) -> None:
    """The runtime's webhook client (app.webhook_client) outside the embedded default: a name on the LAN (here
    localhost) is connected to when its addresses are listed, and refused when they are not."""
    import dataclasses

    from app import webhook_client
    from core.config import load_settings
    from tests.integration.procs import free_port

    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1", port=free_port())
    deployed = dataclasses.replace(load_settings({}), database_url="postgresql+asyncpg://gw@db/gw")
    url = f"http://localhost:{server.port}/hook"
    async with webhook_client(dataclasses.replace(deployed, webhook_private_networks=("10.0.0.0/8",))) as unlisted:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await unlisted.post(url, content=b"{}")
    assert hits == []
    lan = ("127.0.0.0/8", "::1")  # localhost may resolve to both
    async with webhook_client(dataclasses.replace(deployed, webhook_private_networks=lan)) as listed:
        assert (await listed.post(url, content=b"{}")).status_code == 200
    assert hits == ["/hook"]
