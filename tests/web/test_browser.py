"""The pages in headless Chromium against the real service: `main.py run` on the embedded default."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
README_SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REFERENCE = re.compile(r"[A-Z]{2,5}_\d{8}_\d{1,9}")
WAIT_MS = 30_000

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test command installs it
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is None or not Path(CHROMIUM).exists():
    pytest.skip(f"browser tests need the playwright package and {CHROMIUM} "
                f"(playwright {'found' if sync_playwright else 'missing'}, chromium "
                f"{'found' if Path(CHROMIUM).exists() else 'missing'})", allow_module_level=True)


def _command(env: dict[str, str]) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "run"]


def _stop(proc: subprocess.Popen[str]) -> None:
    """End the service we started, by its PID: SIGTERM, then SIGKILL if it does not go."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go. The README's are rewritten only when asked (`UPDATE_SCREENSHOTS=1`): a test run
    otherwise leaves the tracked files alone (a screenshot that cannot be taken still fails the test)."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        return README_SHOTS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("gateway-web")
    port = free_port()
    dropped = ("DATABASE_URL", "REDIS_URL", "PUBLIC_BASE_URL", "SIM_", "CALLBACK_SECRET_", "MTN_MOMO_",
               "AIRTEL_", "MPESA_", "IREMBOPAY_", "SMS_", "SIMULATORS_IN_PROCESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update({"PORT": str(port), "DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/gateway.db",
                "REDIS_URL": "embedded", "GATEWAY_ENV": "development", "PYTHONUNBUFFERED": "1",
                "REMINDERS_ENABLED": "0"})  # the figures below count only this test's SMS
    env.setdefault("REDIS_TIMEOUT_SECONDS", "5")  # see tests/conftest.py's _base_env: a loaded machine's pauses
    base = f"http://127.0.0.1:{port}"
    log = (workdir / "service.log").open("w")
    proc = subprocess.Popen(_command(env), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (workdir / "service.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service not ready in 90 s"
            time.sleep(0.3)
        yield base
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def _keys(phone: Any, keys: str) -> None:
    for key in keys:
        phone.locator(f'.keypad button[data-key="{key}"]').click()


def _green(phone: Any) -> None:
    phone.locator('.keypad button[data-key="call"]').click()


def _payment(base: str, reference: str) -> dict[str, Any]:
    return httpx.get(f"{base}/simulator/payment", params={"reference": reference}, timeout=5).json()


def _wait_status(base: str, reference: str, statuses: set[str], within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        found = _payment(base, reference)
        if found.get("status") in statuses or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


PROVIDERS = ("mtn_momo", "airtel", "mpesa", "irembopay")


def _held(base: str, provider: str) -> dict[str, Any]:
    """Who answers PIN prompts on a provider simulator: {interactive: everyone?, phones: [held numbers]}."""
    found = httpx.get(f"{base}/_sim/{provider}/_control/phone", timeout=5).json()
    return {"interactive": found["interactive"], "phones": [p["msisdn"] for p in found["phones"]]}


def _dial_and_pay(phone: Any, confirm_screen_text: str) -> None:
    """Dial the code, choose 'pay' and the first payment type, up to the confirmation screen."""
    _keys(phone, "*384*123#")
    expect(phone.locator(".entry")).to_have_text("*384*123#")
    _green(phone)
    ussd = phone.locator(".view-ussd")
    expect(ussd).to_be_visible(timeout=WAIT_MS)
    expect(ussd).to_contain_text("Kigali Heights")
    _keys(phone, "1")
    expect(phone.locator(".reply-input")).to_have_text("1")
    _green(phone)
    expect(ussd).to_contain_text("Monthly Rent", timeout=WAIT_MS)
    _keys(phone, "1")
    _green(phone)
    expect(ussd).to_contain_text(confirm_screen_text, timeout=WAIT_MS)
    expect(ussd).to_contain_text("50,000 RWF")


def test_phone_dials_pays_approves_and_receives_the_receipt(server: str, page: Page, shots: Path) -> None:
    page.goto(f"{server}/simulator")
    phone = page.locator('.phone[data-phone="+250788000001"]')
    expect(phone).to_be_visible()
    expect(phone.locator(".who")).to_contain_text("Aline Uwase")
    _dial_and_pay(phone, "MTN MoMo")
    phone.screenshot(path=str(shots / "phone-pay.png"))
    end, reference = _confirm(phone)
    assert _payment(server, reference)["status"] in ("PENDING", "PROCESSING")

    # The provider simulator's PIN prompt reaches the phone once the outbox has called MTN.
    prompt = phone.locator(".view-prompt")
    expect(prompt).to_be_visible(timeout=WAIT_MS)
    expect(prompt).to_contain_text("MTN MoMo")
    expect(prompt).to_contain_text("Approve payment of 50,000 RWF to Kigali Heights Housing Cooperative")
    expect(prompt).to_contain_text(reference)
    prompt.locator(".prompt-approve").click()  # without a PIN: refused on the phone
    expect(prompt).to_contain_text("Enter your PIN")
    _keys(phone, "1234")
    expect(phone.locator(".pin")).to_have_text("••••")
    prompt.locator(".prompt-approve").click()
    expect(end).to_contain_text("Payment approved", timeout=WAIT_MS)
    assert _wait_status(server, reference, {"COMPLETED"})["status"] == "COMPLETED"

    # The receipt leaves through the outbox to the SMS simulator and shows in the phone's inbox.
    expect(phone.locator(".badge")).to_have_text("1", timeout=WAIT_MS)
    phone.locator(".soft-inbox").click()
    inbox = phone.locator(".view-inbox")
    expect(inbox).to_be_visible()
    expect(inbox.locator(".sms")).to_have_count(1)
    expect(inbox).to_contain_text(reference)
    expect(inbox).to_contain_text("Kigali Heights Housing Cooperative")
    expect(inbox).to_contain_text("50,000")
    expect(phone.locator(".badge")).to_have_text("")
    phone.screenshot(path=str(shots / "phone-receipt.png"))


def test_second_phone_payment_fails_and_gets_the_failure_sms(server: str, page: Page) -> None:
    page.goto(f"{server}/simulator")
    expect(page.locator(".phone")).to_have_count(1)
    page.locator("#add-phone").click()
    expect(page.locator(".phone")).to_have_count(2)  # side by side
    phone = page.locator('.phone[data-phone="+250788000002"]')
    expect(phone.locator(".who")).to_contain_text("Jean Bosco Habimana")
    expect(phone.locator(".who")).to_contain_text("payment fails")
    # PIN prompts off: the page gives its numbers back, and the provider simulator decides by number: this
    # one has no funds. (The page no longer switches the simulators for everyone, so there is nothing to
    # switch back afterwards.)
    with page.expect_response(lambda r: r.url.endswith("/_sim/mtn_momo/_control/phone")
                              and r.request.post_data_json == {"msisdn": "+250788000002",
                                                               "interactive": False}) as switched:
        page.locator("#interactive").uncheck()
    assert switched.value.json()["interactive"] is False
    held = _held(server, "mtn_momo")
    assert held["interactive"] is False and "+250788000002" not in held["phones"], held
    _dial_and_pay(phone, "Confirm")
    _end, reference = _confirm(phone)
    failed = _wait_status(server, reference, {"FAILED"})
    assert failed["status"] == "FAILED", failed
    expect(phone.locator(".view-prompt")).to_be_hidden()

    expect(phone.locator(".badge")).to_have_text("1", timeout=WAIT_MS)
    phone.locator(".inbox-btn").click()
    inbox = phone.locator(".view-inbox")
    expect(inbox).to_contain_text("failed")
    expect(inbox).to_contain_text(reference)
    # Each phone has its own inbox: Aline's receipt is not on Jean's phone.
    assert "Twakiriye" not in inbox.inner_text()


def _confirm(phone: Any) -> tuple[Any, str]:
    """Confirm on the confirmation screen: the END view and the payment's reference it shows."""
    _keys(phone, "1")
    _green(phone)
    end = phone.locator(".view-end")
    expect(end).to_be_visible(timeout=WAIT_MS)
    match = REFERENCE.search(end.inner_text())
    assert match, end.inner_text()
    return end, match.group(0)


def _pay_water_by_airtel(phone: Any) -> tuple[str, Any, Any]:
    """Dial, pay Water (5,000 RWF) by Airtel Money and confirm: the payment's reference, the END view and the PIN
    prompt the simulator shows."""
    _keys(phone, "*384*123#")
    _green(phone)
    ussd = phone.locator(".view-ussd")
    expect(ussd).to_contain_text("1.", timeout=WAIT_MS)
    for answer in ("1", "2"):  # pay, Water
        _keys(phone, answer)
        _green(phone)
        expect(phone.locator(".view-busy")).to_be_hidden(timeout=WAIT_MS)
    expect(ussd).to_contain_text(re.compile(r"5[ ,]000 RWF"))  # as her language writes it (French: 5 000)
    expect(ussd).to_contain_text("Airtel")
    end, reference = _confirm(phone)
    prompt = phone.locator(".view-prompt")
    expect(prompt).to_be_visible(timeout=WAIT_MS)
    expect(prompt).to_contain_text("Airtel Money")
    return reference, end, prompt


def test_declining_the_pin_prompt_cancels_the_payment(server: str, page: Page) -> None:
    page.goto(f"{server}/simulator?phone=%2B250733000001")
    phone = page.locator('.phone[data-phone="+250733000001"]')
    expect(phone.locator(".who")).to_contain_text("Airtel Money")
    reference, end, prompt = _pay_water_by_airtel(phone)
    expect(prompt).to_contain_text("5,000 RWF")
    phone.locator('.keypad button[data-key="end"]').click()  # the red key declines
    expect(end).to_contain_text("Payment declined", timeout=WAIT_MS)
    declined = _wait_status(server, reference, {"CANCELLED", "FAILED"})
    assert declined["status"] in ("CANCELLED", "FAILED"), declined


def test_approving_on_a_failing_number_still_fails(server: str, page: Page) -> None:
    """The page prompts only the phones it shows, and approving does not give a payer without funds money."""
    page.goto(f"{server}/simulator?phone=%2B250733000002")
    phone = page.locator('.phone[data-phone="+250733000002"]')
    expect(phone.locator(".who")).to_contain_text("Airtel Money: payment fails")
    # The page holds its number on every provider simulator, and switches none of them on for everyone.
    deadline = time.monotonic() + WAIT_MS / 1000
    while not all("+250733000002" in _held(server, name)["phones"] for name in PROVIDERS):
        assert time.monotonic() < deadline, [_held(server, name) for name in PROVIDERS]
        time.sleep(0.2)
    assert not any(_held(server, name)["interactive"] for name in PROVIDERS)

    reference, end, prompt = _pay_water_by_airtel(phone)
    _keys(phone, "1234")
    prompt.locator(".prompt-approve").click()
    expect(end).to_contain_text("Payment approved", timeout=WAIT_MS)
    failed = _wait_status(server, reference, {"FAILED", "COMPLETED"})
    assert failed["status"] == "FAILED", failed  # the provider still refuses: no funds


def test_ops_page_logs_in_and_shows_the_figures(server: str, page: Page, shots: Path) -> None:
    token = httpx.post(f"{server}/v1/auth/token", json={"username": "admin@kigali-heights.rw",
                                                        "password": "demo-admin-password"}, timeout=10)
    headers = {"Authorization": f"Bearer {token.json()['accessToken']}"}
    payments = httpx.get(f"{server}/v1/payments", headers=headers, timeout=10).json()["data"]
    if len(payments) < 2:
        pytest.skip("run with the phone tests before it: it reads the payments they made")
    statuses = [p["status"] for p in payments]
    assert "COMPLETED" in statuses and "FAILED" in statuses, statuses
    settled = [s for s in statuses if s not in ("PENDING", "PROCESSING")]
    rate = statuses.count("COMPLETED") / len(settled)
    mtn = [p for p in payments if p["paymentMethod"] == "MOBILE_MONEY_MTN"]

    page.goto(f"{server}/ops")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#username", "admin@kigali-heights.rw")
    page.fill("#password", "wrong-password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("invalid username or password")
    page.fill("#password", "demo-admin-password")
    page.click("#login-submit")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#scope")).to_have_text("Kigali Heights Housing Cooperative")
    expect(page.locator("#kpi-payments .value")).to_have_text(str(len(payments)), timeout=WAIT_MS)
    expect(page.locator("#kpi-payments .detail")).to_contain_text(f"{statuses.count('COMPLETED')} completed")
    expect(page.locator("#kpi-payments .detail")).to_contain_text(f"{statuses.count('FAILED')} failed")
    expect(page.locator("#kpi-success .value")).to_have_text(f"{rate * 100:.1f}%")
    expect(page.locator('#providers .bar-row[data-name="mtn_momo"]')).to_contain_text(f"50.0% of {len(mtn)}")
    mtn_row = page.locator('#methods .bar-row[data-name="MOBILE_MONEY_MTN"]')
    expect(mtn_row.locator(".name")).to_have_text("MTN MoMo")
    expect(mtn_row.locator(".num")).to_contain_text(str(len(mtn)))
    # One bar segment per minute and status: the payments may straddle a minute, so add the counts up.
    for status in ("COMPLETED", "FAILED"):
        bars = page.locator(f"#chart-ppm svg rect[data-status='{status}']")
        expect(bars.first).to_be_visible()
        assert sum(int(n) for n in bars.evaluate_all("els => els.map(e => e.getAttribute('data-count'))")) \
            == statuses.count(status)
    expect(page.locator("#kpi-open .value")).to_have_text("0")
    expect(page.locator("#funnel .bar-row").first).to_be_visible()
    expect(page.locator("#kpi-sms .detail")).to_contain_text(f"of {len(settled)} sent")
    # MTN answered the phones' payments: OK as the process that called it recorded it in Redis.
    health = page.locator('#health tr[data-provider="mtn_momo"]')
    expect(health).to_have_attribute("data-status", "OK")
    expect(health).to_contain_text("MTN MoMo")
    expect(page.locator("#redis-health")).to_contain_text("Redis: reachable")
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "ops.png"), full_page=True)

    # The token lives in sessionStorage: a reload stays signed in, signing out forgets it.
    page.reload()
    expect(page.locator("#dashboard")).to_be_visible()
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ops.accessToken')") is None


def test_ops_page_renews_its_session_with_the_refresh_token(server: str, page: Page) -> None:
    """The access token lives 15 minutes: the page renews it through /v1/auth/refresh (ahead of time, or
    on a 401, once) and stores each new pair, as refresh tokens work once; a refused renewal signs out."""
    renewals: list[int] = []
    data_answers: list[int] = []

    def seen(response: Any) -> None:
        if response.url.endswith("/v1/auth/refresh"):
            renewals.append(response.status)
        elif "/ops/data" in response.url:
            data_answers.append(response.status)

    page.on("response", seen)
    stored = "() => [sessionStorage.getItem('ops.accessToken'), sessionStorage.getItem('ops.refreshToken')]"

    page.goto(f"{server}/ops")
    page.fill("#username", "admin@kigali-heights.rw")
    page.fill("#password", "demo-admin-password")
    page.click("#login-submit")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#scope")).to_have_text("Kigali Heights Housing Cooperative", timeout=WAIT_MS)
    _access, first_refresh = page.evaluate(stored)
    assert first_refresh and renewals == []

    # The access token has expired (a sleeping laptop): /ops/data answers 401, the page renews once.
    page.evaluate("sessionStorage.setItem('ops.accessToken', 'expired')")
    page.wait_for_function("() => sessionStorage.getItem('ops.accessToken') !== 'expired'", timeout=WAIT_MS)
    _access, second_refresh = page.evaluate(stored)
    assert second_refresh and second_refresh != first_refresh
    assert renewals == [200]
    data_answers.clear()
    # At least one more round (every 4 s), with the new token: waited for, not for a fixed 5 s (a loaded machine
    # can take longer over a round than the second left over).
    deadline = time.monotonic() + WAIT_MS / 1000
    while not data_answers:
        assert time.monotonic() < deadline, "no round of /ops/data after the renewal"
        page.wait_for_timeout(200)
    assert set(data_answers) == {200}, data_answers
    expect(page.locator("#dashboard")).to_be_visible()
    # The page used the first refresh token: it is spent.
    spent = httpx.post(f"{server}/v1/auth/refresh", json={"refreshToken": first_refresh}, timeout=10)
    assert spent.status_code == 401, spent.text

    # Ahead of expiry: once the renewal time has come, the page renews before asking for the figures.
    page.evaluate("sessionStorage.setItem('ops.renewAt', '0')")
    page.wait_for_function(f"() => sessionStorage.getItem('ops.refreshToken') !== {second_refresh!r}", timeout=WAIT_MS)
    assert renewals == [200, 200] and 401 not in data_answers, (renewals, data_answers)
    assert int(page.evaluate("Number(sessionStorage.getItem('ops.renewAt'))")) > time.time() * 1000 + 600_000

    # A refused renewal (a spent or forged refresh token) ends the session, and the page forgets the pair.
    page.evaluate("sessionStorage.setItem('ops.accessToken', 'expired');"
                  "sessionStorage.setItem('ops.refreshToken', 'not-a-refresh-token')")
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#login-error")).to_have_text("Your session has ended: sign in again.")
    assert renewals[-1] == 401
    assert page.evaluate(stored) == [None, None]
    assert page.evaluate("sessionStorage.getItem('ops.renewAt')") is None


def _ops_data(server: str) -> dict[str, Any]:
    """What /ops/data answers the demo admin now: the base a test changes and serves the page instead."""
    token = httpx.post(f"{server}/v1/auth/token", json={"username": "admin@kigali-heights.rw",
                                                        "password": "demo-admin-password"}, timeout=10)
    headers = {"Authorization": f"Bearer {token.json()['accessToken']}"}
    data: dict[str, Any] = httpx.get(f"{server}/ops/data", headers=headers, timeout=10).json()
    return data


def _sign_in_to_ops(page: Page, server: str) -> None:
    """The ops page, signed in as the demo admin, its dashboard drawn."""
    page.goto(f"{server}/ops")
    page.fill("#username", "admin@kigali-heights.rw")
    page.fill("#password", "demo-admin-password")
    page.click("#login-submit")
    expect(page.locator("#dashboard")).to_be_visible()


def test_ops_page_counts_refunded_payments_as_paid_by_method(server: str, page: Page) -> None:
    """A payment refunded since (in part or in full) was paid: its method's bar counts it "ok", as the success
    rate per provider counts it succeeded. The bar said "3 (1 ok)" for MTN MoMo beside "mtn_momo 66.7% of 3"."""
    real = _ops_data(server)
    minute = real["generatedAt"][:16]
    rows = [("COMPLETED", 1), ("PARTIALLY_REFUNDED", 1), ("REFUNDED", 1), ("FAILED", 1)]
    data = {**real, "paymentsPerMinute": [{"minute": minute, "status": status, "method": "MOBILE_MONEY_MTN",
                                           "count": count} for status, count in rows],
            "providers": {"mtn_momo": {"settled": 4, "succeeded": 3, "rate": 0.75,
                                       "counts": {"COMPLETED": 1, "PARTIALLY_REFUNDED": 1, "REFUNDED": 1,
                                                  "FAILED": 1}}}}
    page.route("**/ops/data", lambda route: route.fulfill(status=200, json=data))
    _sign_in_to_ops(page, server)
    expect(page.locator('#providers .bar-row[data-name="mtn_momo"]')).to_contain_text("75.0% of 4", timeout=WAIT_MS)
    expect(page.locator('#methods .bar-row[data-name="MOBILE_MONEY_MTN"] .num')).to_have_text("4 (3 ok)")


def test_ops_page_says_the_last_screens_count_payments_asked_not_paid(server: str, page: Page) -> None:
    """`ussdLastScreens[].paid` counts the sessions that asked for a payment, declined or failed ones too: the bar
    said "5 · 5 paid" for five confirmations of which one was declined (four collected, as the payments list said)."""
    real = _ops_data(server)
    data = {**real, "ussdLastScreens": [{"screen": "pay_done", "sessions": 5, "paid": 5},
                                        {"screen": "home", "sessions": 2, "paid": 0}]}
    page.route("**/ops/data", lambda route: route.fulfill(status=200, json=data))
    _sign_in_to_ops(page, server)
    expect(page.locator('#screens .bar-row[data-name="pay_done"] .num')).to_have_text("5 · 5 asked to pay",
                                                                                     timeout=WAIT_MS)
    expect(page.locator('#screens .bar-row[data-name="home"] .num')).to_have_text("2")


def test_ops_page_shows_this_process_only_while_redis_is_down(server: str, page: Page) -> None:
    """Redis down: /ops/data's providerHealth is the answering process's own view (source "this process only",
    redisReachable false). The page drew every provider as unknown; it now draws the rows, MTN failing, and says
    whose view they are. A server before that fallback (providers null) still gets the "unknown" row."""
    real = _ops_data(server)
    failing = {"provider": "mtn_momo", "status": "FAILING", "failingSince": "2026-12-06T10:00:00Z",
               "processesFailing": 1, "processesReporting": 1, "lastSuccessAt": None, "credentialsRefused": [],
               "lastError": {"class": "HTTP_500", "summary": "request_to_pay: HTTP 500",
                             "at": "2026-12-06T10:05:00.000Z"}}
    unknown = {"provider": "airtel", "status": "UNKNOWN", "failingSince": None, "processesFailing": 0,
               "processesReporting": 0, "lastError": None, "lastSuccessAt": None, "credentialsRefused": []}
    answers = [{"redisReachable": False, "processesReporting": None, "source": "this process only",
                "providers": [unknown, failing]}]
    page.route("**/ops/data", lambda route: route.fulfill(status=200, json={**real, "providerHealth": answers[0]}))
    _sign_in_to_ops(page, server)
    mtn = page.locator('#health tr[data-provider="mtn_momo"]')
    expect(mtn).to_have_attribute("data-status", "FAILING", timeout=WAIT_MS)
    expect(mtn).to_contain_text("Failing since")
    expect(mtn).to_contain_text("request_to_pay: HTTP 500")
    expect(page.locator('#health tr[data-provider="airtel"]')).to_contain_text("not called by this process")
    expect(page.locator("#health")).to_have_attribute("data-source", "this-process")
    expect(page.locator("#health")).to_contain_text("This server's own calls only")
    expect(page.locator("#redis-health")).to_contain_text("Redis: cannot be reached · showing this process only")

    answers[0] = {"redisReachable": False, "processesReporting": None, "providers": None}  # the earlier shape
    expect(page.locator("#health")).to_contain_text("Unknown: Redis, where the processes report, cannot be reached.",
                                                    timeout=WAIT_MS)
    expect(page.locator("#health tr[data-provider]")).to_have_count(0)
    expect(page.locator("#redis-health")).to_have_text("Redis: cannot be reached.")
