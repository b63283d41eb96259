"""Where a setting's accepted values end (core.config.load_settings): the last value taken and the first refused,
each refusal naming its variable; the spellings a boolean takes."""

from __future__ import annotations

import pytest

from core.config import ConfigError, check_worker_base_url, load_settings
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


@pytest.mark.parametrize("host", ["localhost:8090", "gateway#1", "gateway?1", "[::1", "[gateway]"])
def test_a_host_no_url_can_name_is_refused_as_host_not_as_the_unset_public_base_url(host: str) -> None:
    """PUBLIC_BASE_URL unset is http://HOST:PORT: HOST=localhost:8090 was "configuration error: PUBLIC_BASE_URL: is
    not a URL", naming a variable nobody set. Set, such a HOST was taken and the listener failed on it after the
    database and Redis were opened ("cannot listen on localhost:8090:8080"): refused at once either way."""
    for public in ({}, {"PUBLIC_BASE_URL": "https://pay.example.rw"}):
        _refused({"HOST": host, "PORT": "8090", **public}, "HOST", "must be one address or host name to listen on, "
                                                                   f"such as 127.0.0.1 or 0.0.0.0, not {host!r}")


@pytest.mark.parametrize("host", ["[::1]", " [::] ", "[2001:db8::5]", "[fe80::1%eth0]"])
def test_an_ipv6_host_in_brackets_is_told_to_drop_them(host: str) -> None:
    """HOST=[::1], as a URL writes it: the service said "HOST: must be one address ..." with PUBLIC_BASE_URL unset
    and "cannot listen on [::1]:8080 (HOST, PORT): Name or service not known" with it set; neither said what to
    write instead."""
    address = host.strip()[1:-1]
    for public in ({}, {"PUBLIC_BASE_URL": "https://pay.example.rw"}):
        _refused({"HOST": host, **public}, "HOST", f"must be the address without brackets: HOST={address} (a URL "
                                                   f"writes it [{address}], and the gateway's own URLs do)")
    assert load_settings({"HOST": address}).host == address


def test_a_host_daraja_refuses_is_named_as_host() -> None:
    """A HOST holding "mpesa" (M-Pesa in PROVIDERS, PUBLIC_BASE_URL unset) was refused as PUBLIC_BASE_URL, a
    variable nobody set, in words of its own; set, PUBLIC_BASE_URL in others. One check and one message, naming
    the variable that holds the word."""
    _refused({"HOST": "mpesa-gw", "PORT": "8090", "PROVIDERS": "mpesa"}, "HOST",
             "must not contain 'mpesa' while M-Pesa is in PROVIDERS (Daraja refuses callback URLs with 'mpesa' or "
             "'safaricom' in them, and the unset PUBLIC_BASE_URL is http://mpesa-gw:8090 (HOST and PORT): set "
             "PUBLIC_BASE_URL to the address M-Pesa is to call back on, or change HOST)")
    _refused({"HOST": "127.0.0.1", "PUBLIC_BASE_URL": "http://mpesa.example", "PROVIDERS": "mpesa"},
             "PUBLIC_BASE_URL", "must not contain 'mpesa' while M-Pesa is in PROVIDERS (Daraja refuses callback URLs "
                                "with 'mpesa' or 'safaricom' in them, and it is in the URL)")
    # Set, PUBLIC_BASE_URL is the callbacks' address: HOST is only where the service listens.
    assert load_settings({"HOST": "mpesa-gw", "PUBLIC_BASE_URL": "https://pay.example.rw", "PROVIDERS": "mpesa"})
    assert load_settings({"HOST": "mpesa-gw", "PROVIDERS": "airtel"}).public_base_url == "http://mpesa-gw:8080"


@pytest.mark.parametrize("host", [None, "127.0.0.1", "0.0.0.0", " "])
def test_a_worker_takes_the_default_public_base_url(host: str | None) -> None:
    env = {"PORT": "8090"} if host is None else {"HOST": host, "PORT": "8090"}
    check_worker_base_url(load_settings(env), env)  # nothing raised
    assert load_settings(env).public_base_url == "http://127.0.0.1:8090"


@pytest.mark.parametrize(("host", "url"), [("10.0.0.5", "http://10.0.0.5:8090"), ("::", "http://[::1]:8090"),
                                           ("127.0.0.2", "http://127.0.0.2:8090"), ("localhost", "http://localhost:8090")])
def test_a_worker_does_not_take_public_base_url_from_another_host(host: str, url: str) -> None:
    """A worker given HOST=10.0.0.5 for its metrics port made PUBLIC_BASE_URL http://10.0.0.5:8090: its providers'
    callback URLs and the in-process simulators' calls went where `serve` (HOST unset) did not listen. It cannot know
    serve's HOST: another than the default's is refused unless PUBLIC_BASE_URL says where serve is."""
    env = {"HOST": host, "PORT": "8090"}
    with pytest.raises(ConfigError) as raised:
        check_worker_base_url(load_settings(env), env)
    assert raised.value.variable == "PUBLIC_BASE_URL"
    assert str(raised.value) == (
        f"configuration error: PUBLIC_BASE_URL: is unset, and a worker would take it from its HOST: {url}, where "
        "`serve` listens only if its HOST is the same (a worker listens on HOST for its metrics only): set "
        "PUBLIC_BASE_URL to the address `serve` listens on")
    env["PUBLIC_BASE_URL"] = "http://127.0.0.1:8090"
    check_worker_base_url(load_settings(env), env)  # said: nothing raised
    # In production PUBLIC_BASE_URL is required anyway (load_settings refuses it unset).
    check_worker_base_url(load_settings({**_production_env(), "HOST": host}), {**_production_env(), "HOST": host})


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
