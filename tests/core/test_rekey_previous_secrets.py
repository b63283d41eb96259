"""`reencrypt` and the webhook secrets rotations replaced (WebhookEndpoint.previous_secrets): every one still
signing is sealed again under the active key, so removing the old key stops none of them early; an expired
one is dropped rather than sealed again; one no key opens is reported and its row left as it was."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app import open_runtime
from core.db import utcnow
from core.models import WebhookEndpoint
from core.rekey import reencrypt
from core.webhooks import endpoint_secret_context, signing_secrets
from tests.conftest import make_settings
from tests.core.test_rekey import AFTER, BEFORE, BOTH, _data_under_the_old_key

WHERE = "webhook_endpoints.previous_secrets"


async def _rotated_twice_under_the_old_key(migrated_database: str, *, gone: str | None = None) -> dict[str, Any]:
    """The endpoint of test_rekey's data with two previous secrets still signing and one expired, all sealed
    under the old key (`gone`: a ciphertext no key opens in place of the older live one)."""
    made = await _data_under_the_old_key(migrated_database)
    now = utcnow()
    async with open_runtime(make_settings(**BEFORE)) as rt:
        async with rt.sessionmaker.begin() as s:
            endpoint = (await s.execute(select(WebhookEndpoint))).scalar_one()
            context = endpoint_secret_context(endpoint.cooperative_id)
            entries = [
                {"secret_enc": rt.cipher.encrypt("whsec_mid", context=context),
                 "expires_at": (now + timedelta(hours=20)).isoformat()},
                {"secret_enc": gone or rt.cipher.encrypt("whsec_first", context=context),
                 "expires_at": (now + timedelta(hours=1)).isoformat()},
                {"secret_enc": rt.cipher.encrypt("whsec_gone", context=context),
                 "expires_at": (now - timedelta(minutes=1)).isoformat()},
            ]
            since = now - timedelta(hours=3)
            await s.execute(update(WebhookEndpoint).values(previous_secrets=entries, updated_at=since))
    return {**made, "endpoint_id": endpoint.id, "entries": entries, "since": since}


async def _endpoint(rt: Any) -> WebhookEndpoint:
    async with rt.sessionmaker() as s:
        return (await s.execute(select(WebhookEndpoint))).scalar_one()


async def test_previous_secrets_still_signing_are_sealed_again_and_sign_after_the_old_key_goes(
    migrated_database: str,
) -> None:
    made = await _rotated_twice_under_the_old_key(migrated_database)
    async with open_runtime(make_settings(**BOTH)) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher, batch=2)
        assert report.unreadable == {} and report.changed_meanwhile == 0
        assert report.rewritten[WHERE] == 1
        endpoint = await _endpoint(rt)
        # Both live ones under the new key, in the same order with the same expiries; the expired one gone.
        assert [e["secret_enc"].partition(":")[0] for e in endpoint.previous_secrets] == ["new", "new"]
        assert [e["expires_at"] for e in endpoint.previous_secrets] == [
            e["expires_at"] for e in made["entries"][:2]]
        assert abs((endpoint.updated_at - made["since"]).total_seconds()) < 1
        again = await reencrypt(rt.sessionmaker, rt.cipher)
        assert again.rewritten == {} and again.unreadable == {}
    async with open_runtime(make_settings(**AFTER)) as rt:
        assert signing_secrets(rt.cipher, await _endpoint(rt)) == ["whsec_old", "whsec_mid", "whsec_first"]


async def test_a_previous_secret_no_key_opens_is_reported_and_its_row_left(migrated_database: str) -> None:
    lost = "gone:" + "A" * 40
    made = await _rotated_twice_under_the_old_key(migrated_database, gone=lost)
    async with open_runtime(make_settings(**BOTH)) as rt:
        report = await reencrypt(rt.sessionmaker, rt.cipher)
        assert report.unreadable == {WHERE: [made["endpoint_id"]]}
        assert (await _endpoint(rt)).previous_secrets == made["entries"]

