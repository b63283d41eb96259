"""Where a setting's accepted values end (core.config.load_settings): the last value taken and the first refused,
each refusal naming its variable; the spellings a boolean takes."""

from __future__ import annotations

import pytest

from core.config import ConfigError, load_settings
from tests.core.test_crypto_config import _production_env


def _refused(env: dict[str, str], variable: str, reason: str) -> None:
    """load_settings(env) refuses the configuration, naming `variable`, for exactly `reason`."""
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert raised.value.variable == variable
    assert str(raised.value) == f"configuration error: {variable}: {reason}"


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("Yes", True), ("on", True), ("ON", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("NO", False), ("off", False), ("Off", False),
])
def test_a_boolean_takes_every_usual_spelling(raw: str, expected: bool) -> None:
    settings = load_settings({"REMINDERS_ENABLED": raw, "REDIS_CLUSTER": "no"})
    assert settings.reminders_enabled is expected


@pytest.mark.parametrize("raw", ["2", "enabled", "y", "nope"])
def test_a_boolean_it_cannot_read_is_refused_naming_it(raw: str) -> None:
    _refused({"REMINDERS_ENABLED": raw}, "REMINDERS_ENABLED", f"must be a boolean, got {raw.lower()!r}")


def test_the_highest_port_is_taken_and_the_next_refused() -> None:
    assert load_settings({"PORT": "65535"}).port == 65535
    _refused({"PORT": "65536"}, "PORT", "must be at most 65535")


def test_host_is_one_address_or_name() -> None:
    """HOST=' ' (a blank from a template) reached the listener: "cannot listen on :8080", exit 4; a value with a
    space, a scheme or a path the same, after the database and Redis were opened."""
    assert load_settings({"HOST": " "}).host == "127.0.0.1"
    assert load_settings({"HOST": " 0.0.0.0 "}).host == "0.0.0.0"
    assert load_settings({"HOST": "::"}).host == "::"
    assert load_settings({"HOST": "gateway-1.internal"}).host == "gateway-1.internal"
    for bad in ("0.0.0.0 127.0.0.1", "http://0.0.0.0", "10.0.0.1/24", "user@host"):
        _refused({"HOST": bad}, "HOST", "must be one address or host name to listen on, such as 127.0.0.1 or "
                                        f"0.0.0.0, not {bad!r}")


@pytest.mark.parametrize(("host", "url"), [
    (None, "http://127.0.0.1:8090"), ("0.0.0.0", "http://127.0.0.1:8090"), ("::", "http://[::1]:8090"),
    ("127.0.0.2", "http://127.0.0.2:8090"), ("::1", "http://[::1]:8090"), ("10.0.0.5", "http://10.0.0.5:8090"),
    ("gateway-1.internal", "http://gateway-1.internal:8090")])
def test_public_base_url_is_where_the_service_listens_unless_set(host: str | None, url: str) -> None:
    """HOST=127.0.0.2 (or an interface's address) left PUBLIC_BASE_URL at http://127.0.0.1:PORT, where nothing
    listened: the in-process simulators' calls, their callbacks and `run`'s banner went there. Every interface
    (0.0.0.0, ::) is called on its family's loopback address."""
    env = {"PORT": "8090"} if host is None else {"HOST": host, "PORT": "8090"}
    assert load_settings(env).public_base_url == url
    assert load_settings({**env, "PUBLIC_BASE_URL": "https://pay.example.rw"}).public_base_url == "https://pay.example.rw"


@pytest.mark.parametrize("host", ["[::1]", "localhost:8090", "gateway#1", "gateway?1"])
def test_a_host_no_url_can_name_is_refused_as_host_not_as_the_unset_public_base_url(host: str) -> None:
    """PUBLIC_BASE_URL unset is http://HOST:PORT: HOST=[::1] (the bracketed form of a URL) or localhost:8090 was
    "configuration error: PUBLIC_BASE_URL: is not a URL", naming a variable nobody set (before, `serve` said it
    cannot listen on HOST)."""
    _refused({"HOST": host, "PORT": "8090"}, "HOST", "must be one address or host name to listen on, such as "
                                                     f"127.0.0.1 or 0.0.0.0, not {host!r}")
    # Set, it is PUBLIC_BASE_URL that callbacks use; HOST is left to the listener, as before.
    assert load_settings({"HOST": host, "PUBLIC_BASE_URL": "https://pay.example.rw"}).host == host


def test_a_host_daraja_refuses_says_public_base_url_is_unset() -> None:
    """A HOST holding "mpesa" (M-Pesa in PROVIDERS, PUBLIC_BASE_URL unset): "PUBLIC_BASE_URL: must not contain
    'mpesa'" did not say that it was unset nor where the word came from."""
    _refused({"HOST": "mpesa-gw", "PORT": "8090", "PROVIDERS": "mpesa"}, "PUBLIC_BASE_URL",
             "unset, it is http://mpesa-gw:8090 (HOST and PORT), which holds 'mpesa' while M-Pesa is in PROVIDERS "
             "(Daraja refuses callback URLs with 'mpesa' or 'safaricom' in them): set PUBLIC_BASE_URL to the "
             "address M-Pesa is to call back on")
    _refused({"HOST": "127.0.0.1", "PUBLIC_BASE_URL": "http://mpesa.example", "PROVIDERS": "mpesa"},
             "PUBLIC_BASE_URL", "must not contain 'mpesa' while M-Pesa is in PROVIDERS (Daraja refuses callback URLs "
                                "with 'mpesa' or 'safaricom' in them, and it is in the URL)")


@pytest.mark.parametrize("variable", ["JWT_SECRET", "BLIND_INDEX_KEY"])
def test_production_takes_a_32_byte_secret_and_refuses_31(variable: str) -> None:
    assert load_settings({**_production_env(), variable: "s" * 32})
    # Bytes, not characters: 16 two-byte letters are 32 bytes.
    assert load_settings({**_production_env(), variable: "é" * 16})
    for short in ("s" * 31, "é" * 15 + "s"):
        with pytest.raises(ConfigError) as raised:
            load_settings({**_production_env(), variable: short})
        assert raised.value.variable == variable
        assert str(raised.value) == f"configuration error: {variable}: must be at least 32 bytes in production"


def test_a_log_level_is_taken_in_any_case_and_an_unknown_one_refused() -> None:
    assert load_settings({"LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert load_settings({}).log_level == "INFO"
    _refused({"LOG_LEVEL": "verbose"}, "LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR")


@pytest.mark.parametrize("size", [16, 24, 31, 33, 48, 64])
def test_an_encryption_key_of_other_than_32_bytes_is_refused(size: int) -> None:
    """AES-256 takes 32 bytes; a key of another length (AES-128's 16, a 64-byte HMAC key pasted by mistake) is
    refused at start, not at the first member's phone number encrypted."""
    import base64

    key = base64.b64encode(b"k" * size).decode()
    _refused({"PII_ENCRYPTION_KEYS": f"k1:{key}"}, "PII_ENCRYPTION_KEYS", "must decode to 32 bytes (AES-256)")
    assert load_settings({"PII_ENCRYPTION_KEYS": f"k1:{base64.b64encode(b'k' * 32).decode()}"}).pii_keys == {
        "k1": b"k" * 32}


def test_a_ussd_code_of_more_than_32_characters_is_refused_naming_it() -> None:
    longest = "*" + "1" * 30 + "#"  # 32 characters
    assert load_settings({"USSD_SERVICE_CODE": longest}).ussd_service_code == longest
    for variable in ("USSD_SERVICE_CODE", "USSD_SERVICE_CODE_HUBTEL"):
        with pytest.raises(ConfigError) as raised:
            load_settings({variable: "*" + "1" * 31 + "#"})
        assert raised.value.variable == variable
        assert str(raised.value) == f"configuration error: {variable}: must be a USSD code such as *384*123#"


def test_a_pool_of_no_connection_is_refused() -> None:
    """DB_POOL_SIZE=0 would leave every request waiting for a connection that never comes, each answered 503."""
    assert load_settings({"DB_POOL_SIZE": "1"}).db_pool_size == 1
    _refused({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE", "must be at least 1")


def test_the_reports_work_mem_is_bounded_and_may_be_the_servers() -> None:
    """REPORT_WORK_MEM_MB: PostgreSQL's work_mem of a reconciliation's read (64 MB); 0 leaves the server's."""
    assert load_settings({}).report_work_mem_mb == 64
    assert load_settings({"REPORT_WORK_MEM_MB": "0"}).report_work_mem_mb == 0
    _refused({"REPORT_WORK_MEM_MB": "-1"}, "REPORT_WORK_MEM_MB", "must be at least 0")
    _refused({"REPORT_WORK_MEM_MB": "2049"}, "REPORT_WORK_MEM_MB", "must be at most 2048")
