"""PII encryption with key rotation, blind indexes, password hashing, and configuration errors."""

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import DEV_KEY, ConfigError, Secret, load_settings
from core.crypto import CryptoError, PiiCipher, hash_password, verify_password

K1 = os.urandom(32)
K2 = os.urandom(32)


def test_encrypt_round_trip_and_rotation():
    old = PiiCipher({"k1": K1}, "k1", "index-key")
    token = old.encrypt("+250788000001", context="member:c1")
    assert token.startswith("k1:") and "250788000001" not in token
    rotated = PiiCipher({"k1": K1, "k2": K2}, "k2", "index-key")
    assert rotated.decrypt(token, context="member:c1") == "+250788000001"
    assert rotated.encrypt("x").startswith("k2:")
    with pytest.raises(CryptoError):
        rotated.decrypt(token, context="member:other")  # bound to its context
    with pytest.raises(CryptoError):
        PiiCipher({"k2": K2}, "k2", "index-key").decrypt(token)


def test_blind_index_is_keyed_and_deterministic():
    a = PiiCipher({"k1": K1}, "k1", "index-a")
    b = PiiCipher({"k1": K1}, "k1", "index-b")
    assert a.blind_index("+250788000001") == a.blind_index("+250788000001")
    assert a.blind_index("+250788000001") != b.blind_index("+250788000001")
    assert "250788000001" not in a.blind_index("+250788000001")


def test_password_hash():
    stored = hash_password("s3cret-pass")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret-pass", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("s3cret-pass", "garbage")


def test_secret_never_shows():
    s = Secret("abc123")
    assert "abc123" not in repr(s) and "abc123" not in str(s) and "abc123" not in f"{s}"
    assert s.get() == "abc123"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"PII_ENCRYPTION_KEYS": "k1:notbase64!"}, "PII_ENCRYPTION_KEYS"),
        ({"PII_ENCRYPTION_KEYS": "k1:" + base64.b64encode(b"short").decode()}, "PII_ENCRYPTION_KEYS"),
        ({"PII_ACTIVE_KEY_ID": "nope"}, "PII_ACTIVE_KEY_ID"),
        ({"GATEWAY_ENV": "staging"}, "GATEWAY_ENV"),
        ({"GATEWAY_ENV": "production"}, "DATABASE_URL"),
        ({"GATEWAY_ENV": "production", "DATABASE_URL": "postgresql+asyncpg://gw@db/gw"}, "REDIS_URL"),
        ({"GATEWAY_ENV": "production", "DATABASE_URL": "postgresql+asyncpg://gw@db/gw", "REDIS_URL": "redis://r/0"},
         "PII_ENCRYPTION_KEYS"),
        ({"GATEWAY_ENV": "production", "DATABASE_URL": "postgresql+asyncpg://gw@db/gw", "REDIS_URL": "redis://r/0",
          "PII_ENCRYPTION_KEYS": "k1:" + base64.b64encode(b"k" * 32).decode(),
          "BLIND_INDEX_KEY": "x", "JWT_SECRET": "y", "SMS_API_KEY": "z"}, "MTN_MOMO_API_USER"),
        ({"MTN_MOMO_BASE_URL": "ftp://x"}, "MTN_MOMO_BASE_URL"),
        ({"SIMULATORS_IN_PROCESS": "maybe"}, "SIMULATORS_IN_PROCESS"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "OUTBOX_BATCH_SIZE"),
        ({"MTN_MOMO_TARGET_ENVIRONMENT": "mtn-rwanda"}, "MTN_MOMO_TARGET_ENVIRONMENT"),
        ({"USSD_SERVICE_CODE": "384*123"}, "USSD_SERVICE_CODE"),
        ({"USSD_SERVICE_CODE_NALO": "*920*44"}, "USSD_SERVICE_CODE_NALO"),
    ],
)
def test_invalid_configuration_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert variable in str(info.value)


def test_defaults_are_embedded():
    s = load_settings({})
    assert s.is_embedded and s.redis_url == "embedded"
    # The file scripts/run.sh uses: `main.py reencrypt` / `migrate` / `seed-demo` reach the service's database.
    assert s.database_url == "sqlite+aiosqlite:///./var/gateway.db"
    run_sh = (Path(__file__).parents[2] / "scripts" / "run.sh").read_text()
    assert "DATABASE_URL:-sqlite+aiosqlite:///./var/gateway.db}" in run_sh
    assert s.providers["mtn_momo"].options["target_environment"] == "sandbox"  # the simulators accept it
    assert s.providers["mtn_momo"].base_url.endswith("/_sim/mtn_momo")
    assert "sim-dev-credential" not in repr(s.providers["mtn_momo"])


def test_process_exits_with_one_line_naming_the_variable():
    env = {**os.environ, "DATABASE_URL": "mysql://nope"}
    result = subprocess.run([sys.executable, "main.py", "serve"], capture_output=True, text=True, env=env,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: DATABASE_URL: must be postgresql+asyncpg://... or sqlite+aiosqlite://..."]


def _production_env() -> dict[str, str]:
    from core.config import _PROVIDER_CREDENTIALS

    env = {"GATEWAY_ENV": "production", "DATABASE_URL": "postgresql+asyncpg://gw@127.0.0.1:5432/gw",
           "REDIS_URL": "redis://127.0.0.1:6379/0", "PII_ENCRYPTION_KEYS": "k1:" + base64.b64encode(b"k" * 32).decode(),
           "BLIND_INDEX_KEY": "b" * 32, "JWT_SECRET": "j" * 32, "SMS_API_KEY": "sms-key",
           "CALLBACK_SECRET_MPESA": "m" * 24, "CALLBACK_SECRET_SMS": "s" * 24, "CALLBACK_SECRET_MTN_MOMO": "t" * 24,
           # Each USSD aggregator: its secret (or a USSD_IP_ALLOWLIST for it; tests/core/test_ussd_production_auth.py).
           "CALLBACK_SECRET_AFRICASTALKING": "a" * 24, "CALLBACK_SECRET_HUBTEL": "h" * 24,
           "CALLBACK_SECRET_NALO": "n" * 24,
           "PUBLIC_BASE_URL": "https://pay.example.rw", "SMS_BASE_URL": "https://api.africastalking.com",
           "MTN_MOMO_TARGET_ENVIRONMENT": "mtnrwanda", "SMS_USERNAME": "twisungane", "SMS_SENDER_ID": "TWISUNGANE",
           "MPESA_SHORTCODE": "600981",
           "IREMBOPAY_PAYMENT_ACCOUNT": "PI-4b1c9e", "IREMBOPAY_PAYMENT_ITEM_CODE": "PC-77a2f0"}
    for provider, creds in _PROVIDER_CREDENTIALS.items():
        env[f"{provider.upper()}_BASE_URL"] = f"https://{provider}.example.com"
        for cred in creds:
            env[f"{provider.upper()}_{cred}"] = f"{provider}-{cred.lower()}-value"
    return env


def test_a_complete_production_configuration_loads():
    s = load_settings(_production_env())
    assert s.is_production and not s.simulators_in_process
    assert not s.extra["phone_simulator_enabled"]
    assert s.providers["mtn_momo"].options["target_environment"] == "mtnrwanda"


@pytest.mark.parametrize(("change", "variable"), [
    ({"CALLBACK_SECRET_MPESA": ""}, "CALLBACK_SECRET_MPESA"),
    ({"CALLBACK_SECRET_MTN_MOMO": ""}, "CALLBACK_SECRET_MTN_MOMO"),
    ({"CALLBACK_SECRET_SMS": ""}, "CALLBACK_SECRET_SMS"),
    ({"JWT_SECRET": "too-short"}, "JWT_SECRET"),
    ({"PHONE_SIMULATOR_ENABLED": "1"}, "PHONE_SIMULATOR_ENABLED"),
    ({"SIMULATORS_IN_PROCESS": "1"}, "SIMULATORS_IN_PROCESS"),
    ({"RATE_LIMIT_MULTIPLIER": "-1"}, "RATE_LIMIT_MULTIPLIER"),
    # Defaults that only make sense on one machine: callbacks to loopback, calls to the in-process simulators.
    ({"PUBLIC_BASE_URL": ""}, "PUBLIC_BASE_URL"),
    ({"MTN_MOMO_BASE_URL": ""}, "MTN_MOMO_BASE_URL"),
    ({"IREMBOPAY_BASE_URL": ""}, "IREMBOPAY_BASE_URL"),
    ({"SMS_BASE_URL": ""}, "SMS_BASE_URL"),
    ({"PII_ENCRYPTION_KEYS": f"dev:{DEV_KEY}"}, "PII_ENCRYPTION_KEYS"),
    # MTN's production API refuses every call made for its sandbox (the default).
    ({"MTN_MOMO_TARGET_ENVIRONMENT": ""}, "MTN_MOMO_TARGET_ENVIRONMENT"),
    ({"MTN_MOMO_TARGET_ENVIRONMENT": "sandbox"}, "MTN_MOMO_TARGET_ENVIRONMENT"),
    ({"MTN_MOMO_TARGET_ENVIRONMENT": "mtnrwnda"}, "MTN_MOMO_TARGET_ENVIRONMENT"),
])
def test_production_refuses_unsafe_settings(change, variable):
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), **change})
    assert info.value.variable == variable


@pytest.mark.parametrize(("change", "variable", "says"), [
    # Demo and sandbox values that would reach a live provider: Africa's Talking's sandbox account texts no phone,
    # 174379 is Daraja's sandbox paybill, PI-demo and PC-demo no IremboPay account's.
    ({"SMS_USERNAME": ""}, "SMS_USERNAME", "is required in production (your Africa's Talking account's username)"),
    ({"SMS_USERNAME": "sandbox"}, "SMS_USERNAME", "must not be sandbox in production"),
    ({"MPESA_SHORTCODE": ""}, "MPESA_SHORTCODE", "is required in production"),
    ({"MPESA_SHORTCODE": "174379"}, "MPESA_SHORTCODE", "must not be 174379 in production"),
    ({"IREMBOPAY_PAYMENT_ACCOUNT": ""}, "IREMBOPAY_PAYMENT_ACCOUNT", "is required in production"),
    ({"IREMBOPAY_PAYMENT_ITEM_CODE": ""}, "IREMBOPAY_PAYMENT_ITEM_CODE", "is required in production"),
])
def test_production_takes_no_demo_or_sandbox_account(change, variable, says):
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), **change})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"configuration error: {variable}: {says}")


def test_production_sends_sms_from_a_sender_id_it_was_given():
    # The default, COOPPAY, is registered with nobody's Africa's Talking account: each SMS would be refused.
    env = {k: v for k, v in _production_env().items() if k != "SMS_SENDER_ID"}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == ("configuration error: SMS_SENDER_ID: is required in production (the sender id "
                               "Africa's Talking registered for you, or empty for its default sender)")
    assert load_settings({**env, "SMS_SENDER_ID": ""}).sms_sender_id == ""
    assert load_settings({**env, "SMS_SENDER_ID": "TWISUNGANE"}).sms_sender_id == "TWISUNGANE"
    assert load_settings({k: v for k, v in env.items() if k != "GATEWAY_ENV"}).sms_sender_id == "COOPPAY"


def test_production_names_every_missing_variable_at_once():
    # A first install sets none of them: each is named on its own line in one go, not one per restart.
    result = _main("migrate", GATEWAY_ENV="production", DATABASE_URL="postgresql+asyncpg://gw@127.0.0.1:1/gw",
                   REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("configuration error: ") for line in lines), lines
    named = [line.split(":")[1].strip() for line in lines]
    assert named[0] == "PII_ENCRYPTION_KEYS"
    from core.config import _PROVIDER_CREDENTIALS

    expected = {"PII_ENCRYPTION_KEYS", "PUBLIC_BASE_URL", "JWT_SECRET", "BLIND_INDEX_KEY", "SMS_BASE_URL",
                "SMS_USERNAME", "SMS_API_KEY", "SMS_SENDER_ID", "MTN_MOMO_TARGET_ENVIRONMENT", "MPESA_SHORTCODE",
                "IREMBOPAY_PAYMENT_ACCOUNT", "IREMBOPAY_PAYMENT_ITEM_CODE",
                *(f"CALLBACK_SECRET_{name}" for name in ("MPESA", "MTN_MOMO", "AIRTEL", "SMS", "AFRICASTALKING",
                                                          "HUBTEL", "NALO")),
                *(f"{provider.upper()}_BASE_URL" for provider in _PROVIDER_CREDENTIALS),
                *(f"{provider.upper()}_{cred}" for provider, creds in _PROVIDER_CREDENTIALS.items()
                  for cred in creds if cred != "CALLBACK_KEY")}
    assert set(named) == expected and len(named) == len(expected)
    # Set them all but one: that one alone is named.
    env = {k: v for k, v in _production_env().items() if k != "JWT_SECRET"}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == ("configuration error: JWT_SECRET: is required in production (at least 32 bytes, "
                               "e.g. the output of openssl rand -base64 32)")
    # A key's line says how to make one.
    env = {k: v for k, v in _production_env().items() if k != "PII_ENCRYPTION_KEYS"}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == ("configuration error: PII_ENCRYPTION_KEYS: is required in production (keyid:key, the "
                               "key 32 bytes in base64, e.g. k1: and the output of openssl rand -base64 32)")


def test_production_needs_some_authentication_of_airtel_callbacks():
    # Neither a URL secret nor the callback hash key: anyone could post made-up "money taken" callbacks.
    env = {**_production_env(), "AIRTEL_CALLBACK_KEY": ""}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == ("configuration error: CALLBACK_SECRET_AIRTEL: is required in production unless "
                               "AIRTEL_CALLBACK_KEY is set (Airtel callbacks are otherwise unauthenticated)")
    # Either one is enough: the hash (Airtel's callback authentication) or the secret in the URL.
    assert load_settings(_production_env()).is_production
    assert load_settings({**env, "CALLBACK_SECRET_AIRTEL": "c" * 24}).callback_secrets["airtel"]


def _main(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "WORKER_METRICS_PORT")}
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, env={**clean, **env},
                          timeout=60, check=False)


def test_start_up_mistakes_end_in_one_line_not_a_traceback(tmp_path):
    bad_port = _main("worker", WORKER_METRICS_PORT="abc", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/g.db")
    assert (bad_port.returncode, bad_port.stderr.strip()) == (
        2, "configuration error: WORKER_METRICS_PORT: must be a port number (0 = off)")
    zero = _main("worker", "--concurrency", "0")
    assert zero.returncode == 2 and "--concurrency: must be at least 1" in zero.stderr
    unreachable = _main("serve", DATABASE_URL="postgresql+asyncpg://gw@127.0.0.1:1/gw", REDIS_URL="redis://127.0.0.1:1/0")
    assert unreachable.returncode == 4, unreachable.stderr
    *_logs, last = unreachable.stderr.strip().splitlines()
    assert last.startswith("cannot start: ") and "Traceback" not in unreachable.stderr


def test_the_demo_is_never_seeded_into_production():
    for command in ("seed-demo", "run"):
        refused = subprocess.run([sys.executable, "main.py", command], capture_output=True, text=True,
                                 env={**os.environ, **_production_env()}, timeout=60, check=False)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"refusing to {command} with GATEWAY_ENV=production")


def test_an_aggregator_may_have_its_own_service_code():
    s = load_settings({"USSD_SERVICE_CODE_NALO": " *920*44# "})
    assert s.service_code_for("nalo") == "*920*44#"
    assert s.service_code_for("hubtel") == s.service_code_for("africastalking") == "*384*123#"


async def test_an_embedded_database_in_a_folder_not_made_yet(tmp_path):
    from sqlalchemy import text

    from core.db import make_engine

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/not/yet/gateway.db")
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    await engine.dispose()
    assert (tmp_path / "not" / "yet" / "gateway.db").exists()


def test_what_one_cooperative_sealed_does_not_open_as_anothers():
    """A member's phone number, a payment's account and a webhook endpoint's secret are bound to their cooperative:
    a row's ciphertext copied onto another cooperative's row (a bad restore, a tampered database) does not open
    there."""
    from types import SimpleNamespace

    from core.members import member_phone, phone_context
    from core.payments import account_context, payment_account
    from core.webhooks import endpoint_secret, endpoint_secret_context

    cipher = PiiCipher({"k1": K1}, "k1", "index-key")
    phone = cipher.encrypt("+250788000001", context=phone_context("coop-a"))
    assert member_phone(cipher, SimpleNamespace(phone_enc=phone, cooperative_id="coop-a")).e164 == "+250788000001"
    with pytest.raises(CryptoError):
        member_phone(cipher, SimpleNamespace(phone_enc=phone, cooperative_id="coop-b"))
    account = cipher.encrypt("+250788000001", context=account_context("coop-a"))
    rt = SimpleNamespace(cipher=cipher)
    assert payment_account(rt, SimpleNamespace(payment_account_enc=account, cooperative_id="coop-a")) == "+250788000001"
    with pytest.raises(CryptoError):
        payment_account(rt, SimpleNamespace(payment_account_enc=account, cooperative_id="coop-b"))
    secret = cipher.encrypt("whsec_a", context=endpoint_secret_context("coop-a"))
    assert endpoint_secret(cipher, SimpleNamespace(secret_enc=secret, cooperative_id="coop-a")) == "whsec_a"
    with pytest.raises(CryptoError):
        endpoint_secret(cipher, SimpleNamespace(secret_enc=secret, cooperative_id="coop-b"))
