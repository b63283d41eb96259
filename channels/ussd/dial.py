"""Terminal USSD simulator: drives a running service through the Africa's Talking endpoint."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable

import httpx

from core.phone import network_code_of, normalize


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


async def dial(service_code: str, phone: str, base_url: str, secret: str | None = None, *,
               read: Callable[[str], str | None] = _read_line, write: Callable[[str], None] = print,
               transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Dial `service_code` as `phone`, print each screen, read each answer from stdin until END.

    Returns a process exit code: 0 when the service ended the session, 1 otherwise.
    """
    number = normalize(phone).e164
    session_id = f"ATUid_dial_{uuid.uuid4().hex[:16]}"
    url = base_url.rstrip("/") + "/ussd/africastalking"
    problem = _url_problem(url)
    if problem:
        write(f"[cannot call {url}: {problem}]")
        return 2
    params = {"secret": secret} if secret else None
    inputs: list[str] = []
    async with httpx.AsyncClient(timeout=20.0, transport=transport) as http:
        while True:
            form = {"sessionId": session_id, "serviceCode": service_code, "phoneNumber": number,
                    "networkCode": network_code_of(number), "text": "*".join(inputs)}
            try:
                resp = await http.post(url, data=form, params=params)
            except httpx.HTTPError as exc:
                write(f"[network error calling {url}: {type(exc).__name__}: {exc}]")
                return 1
            body = resp.text
            if resp.status_code != 200 or not body.startswith(("CON ", "END ")):
                write(f"[HTTP {resp.status_code}] {body[:200]}{_refused_hint(resp.status_code, secret)}")
                return 1
            write("-" * 30)
            write(body[4:])
            write("-" * 30)
            if body.startswith("END "):
                return 0
            answer = await asyncio.to_thread(read, "> ")
            if answer is None:  # stdin closed: the user hung up
                write("[cancelled]")
                return 1
            inputs.append(answer.strip())


def _refused_hint(status: int, secret: str | None) -> str:
    """What a 403 means to the one dialling: the gateway's answer is a bare "forbidden" (it tells a caller nothing
    of its checks), which left an operator dialling a production gateway without knowing what to change."""
    if status != 403:
        return ""
    if secret is None:
        return (" (the gateway wants its callback secret: --secret with its CALLBACK_SECRET_AFRICASTALKING; "
                "or this address is outside its USSD_IP_ALLOWLIST)")
    return (" (--secret is not the gateway's CALLBACK_SECRET_AFRICASTALKING, nor in its "
            "CALLBACK_SECRET_AFRICASTALKING_PREVIOUS; or this address is outside its USSD_IP_ALLOWLIST)")


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
    """`python -m channels.ussd.dial CODE PHONE [URL] [SECRET]` when main.py is not at hand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: dial SERVICE_CODE PHONE [BASE_URL] [SECRET]", file=sys.stderr)
        return 2
    base = args[2] if len(args) > 2 else "http://127.0.0.1:8080"
    return asyncio.run(dial(args[0], args[1], base, args[3] if len(args) > 3 else None))


if __name__ == "__main__":
    sys.exit(main())
