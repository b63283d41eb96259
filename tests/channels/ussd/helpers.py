"""Small drivers that speak each aggregator's wire format to the app under test."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

_ids = itertools.count(1)


def new_session_id(prefix: str = "ATUid") -> str:
    return f"{prefix}_{next(_ids):06d}"


def _range_network(phone: str) -> str:
    from core.phone import PhoneError, network_code_of, normalize

    try:
        return network_code_of(normalize(phone).e164)
    except PhoneError:
        return "63510"


class AtPhone:
    """A phone dialling through Africa's Talking: keeps the accumulated text like the aggregator does."""

    def __init__(self, client: Any, phone: str, *, service_code: str = "*384*123#",
                 session_id: str | None = None, query: str = "", network: str | None = None) -> None:
        self.client, self.phone, self.service_code = client, phone, service_code
        self.session_id = session_id or new_session_id()
        self.inputs: list[str] = []
        self.query = query
        # The network Africa's Talking reports: by default the one of the number's range (a number never ported).
        self.network = network if network is not None else _range_network(phone)

    def form(self) -> dict[str, str]:
        return {"sessionId": self.session_id, "serviceCode": self.service_code, "phoneNumber": self.phone,
                "networkCode": self.network, "text": "*".join(self.inputs)}

    async def post(self, form: dict[str, str]) -> tuple[int, str]:
        resp = await self.client.post(f"/ussd/africastalking{self.query}", data=form)
        return resp.status, await resp.text()

    async def dial(self) -> str:
        status, body = await self.post(self.form())
        assert status == 200, body
        assert body.startswith(("CON ", "END ")), body
        return body

    async def send(self, key: str) -> str:
        self.inputs.append(key)
        return await self.dial()

    async def resend(self) -> str:
        """The aggregator retrying the last hop."""
        return await self.dial()


@contextlib.contextmanager
def swapped_redis(rt: Any, redis: Any) -> Iterator[None]:
    """`redis` in place of the runtime's Redis clients, the hop path's multiplexed one included."""
    original, hop = rt.redis, rt.redis_mux
    rt.redis, rt.redis_mux = redis, None
    try:
        yield
    finally:
        rt.redis, rt.redis_mux = original, hop
