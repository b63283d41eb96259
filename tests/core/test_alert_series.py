"""The counters the README asks to alert on "any increase" of are scraped at 0 before their first event: a labelled
series born at 1 has no sample before it, so increase() and rate() read no increase and the alert on the first
refund paid back beyond what was collected, or the first callback saying money was taken for no payment of ours,
never fired."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

import core.metrics as metrics
from app import open_runtime


async def _scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await response.text()) for s in family.samples}


async def test_alerted_counters_are_scraped_at_zero_before_their_first_event(rt, client):
    # As a process starts: no refund anomaly and no unmatched callback counted yet (earlier tests' counts gone).
    metrics.REFUND_ANOMALIES.clear()
    metrics.CALLBACKS_UNMATCHED.clear()
    async with open_runtime(rt.settings):  # what serve and worker open at start
        pass
    scraped = await _scrape(client)
    for kind in ("beyond_collected", "failed_after_completion", "amount_mismatch", "sent_after_failure",
                 "withdrawn_unsent"):
        assert scraped[("gateway_refund_anomalies_total", (("kind", kind),))] == 0
    for provider in rt.settings.providers:
        for kind in ("collection", "refund"):
            labels = (("kind", kind), ("outcome", "SUCCEEDED"), ("provider", provider))
            assert scraped[("gateway_callbacks_unmatched_total", labels)] == 0
    # The first event then reads as an increase from 0.
    metrics.REFUND_ANOMALIES.labels(kind="beyond_collected").inc()
    scraped = await _scrape(client)
    assert scraped[("gateway_refund_anomalies_total", (("kind", "beyond_collected"),))] == 1
