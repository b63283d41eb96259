"""MTN MoMo down on rent day, real processes: a member who dials again is not charged twice.

The outage reviewer's finding: request-to-pay answered with errors, the member confirmed Monthly Rent, no PIN prompt
came (the collect job retrying), she dialled *384*123# again and confirmed again; once MTN recovered both collect
jobs went out and both payments completed (100,000 RWF for one month's rent, two receipts). Here the MTN
simulator refuses every request (500) while she dials twice: the second confirmation makes no payment and says
which one waits; once MTN is back the one payment completes, with one receipt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from core.models import Payment
from tests.integration.conftest import needs_servers, start_stack
from tests.integration.helpers import (
    MTN_OK,
    UssdPhone,
    jobs,
    messages_about,
    set_sim_options,
    wait_for,
    wait_payment_status,
)
from tests.integration.procs import Stack

pytestmark = [needs_servers]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("open-guard"), os.environ["DATABASE_URL"], os.environ["REDIS_URL"],
                    env_overrides={"POLL_AFTER_SECONDS": "2", "PAYMENT_TIMEOUT_SECONDS": "120"})
    try:
        yield s
    finally:
        s.stop()


async def test_dialling_again_during_a_provider_outage_pays_once(stack: Stack, gw: Any, demo: Any,
                                                                 http: aiohttp.ClientSession) -> None:
    mtn = stack.sim_url("mtn_momo")
    await set_sim_options(http, mtn, fail_request_500=True)  # MTN refuses request-to-pay
    try:
        first = UssdPhone(http, stack.serve_urls, MTN_OK)
        reference = await first.pay_first_type()
        assert first.screens[-1].startswith("END Emeza ubutumwa"), first.screens[-1]

        async def refused_once() -> bool:
            collect = await jobs(gw, "payment.collect")
            return len(collect) == 1 and collect[0].attempts >= 1 and collect[0].last_error is not None
        await wait_for(refused_once, timeout=30, what="the collect job refused by MTN")  # no prompt came

        second = UssdPhone(http, stack.serve_urls, MTN_OK)
        assert await second.pay_first_type() == reference  # the waiting payment's, not a new one
        assert second.screens[-1] == (
            f"END Kwishyura 50,000 RWF ya Monthly Rent (Ref {reference}) biracyategereje ko ubyemeza kuri telefoni "
            "yawe cyangwa mobile money. Ntukongere kwishyura. Nibidakunda, uzabona SMS.")
    finally:
        await set_sim_options(http, mtn, fail_request_500=False)  # MTN recovers

    paid = await wait_payment_status(gw, reference, "COMPLETED", timeout=120)
    async with gw.sessionmaker() as s:
        made = (await s.execute(select(Payment).where(Payment.member_id == paid.member_id))).scalars().all()
    assert [p.reference for p in made] == [reference]  # one payment, one collection: 50,000 RWF taken once
    assert len(await jobs(gw, "payment.collect")) == 1
    receipts = await wait_for(lambda: messages_about(http, stack.sim_url("africastalking"), MTN_OK, reference),
                              timeout=30, what="the receipt")
    assert len(receipts) == 1 and receipts[0].startswith("Twakiriye 50,000 RWF ya Monthly Rent"), receipts
