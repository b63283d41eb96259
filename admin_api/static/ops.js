// Operations page: signs in through /v1/auth/token, keeps the token pair in sessionStorage, renews it
// through /v1/auth/refresh before the access token runs out, and redraws the figures from /ops/data every
// few seconds.
"use strict";

(function () {
  const TOKEN_KEY = "ops.accessToken";
  const REFRESH_KEY = "ops.refreshToken";
  const RENEW_AT_KEY = "ops.renewAt"; // ms since the epoch, by this browser's clock
  const SESSION_KEYS = [TOKEN_KEY, REFRESH_KEY, RENEW_AT_KEY];
  const RENEW_SHARE = 0.8; // renew once 80% of the access token's life has gone (12 of its 15 minutes)
  const ENDED = "Your session has ended: sign in again.";
  const REFRESH_MS = 4000;
  const SVG = "http://www.w3.org/2000/svg";
  const STATUS_COLORS = {
    COMPLETED: "#2f8a3a", PARTIALLY_REFUNDED: "#5aa36a", REFUNDED: "#7e57c2", PROCESSING: "#1f78c8",
    PENDING: "#e0a030", FAILED: "#c9372c", TIMEOUT: "#8a8f96", CANCELLED: "#4e5660", VOIDED: "#b07aa1",
  };
  // Paid, the money taken: refunded since too (in part or in full), as core/ops.py's success rate per provider counts.
  const PAID = ["COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"];
  const METHOD_LABELS = { MOBILE_MONEY_MTN: "MTN MoMo", MOBILE_MONEY_AIRTEL: "Airtel Money", MPESA: "M-Pesa",
                          BANK_BK: "Bank of Kigali", BANK_IM: "I&M Bank", BANK_ECOBANK: "Ecobank" };
  const SMS_COLORS = { DELIVERED: "#2f8a3a", SENT: "#1f78c8", SENT_UNCONFIRMED: "#7aa7d6", QUEUED: "#e0a030",
                       QUEUED_PARKED: "#d35f1f", FAILED: "#c9372c", REJECTED: "#9c2a21", EXPIRED: "#8a8f96" };
  const FUNNEL_COLORS = { went: "#1f78c8", dropped: "#c9372c" };
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  const color = (status) => STATUS_COLORS[status] || "#6b7785";
  const pct = (rate) => (rate === null || rate === undefined ? "–" : (rate * 100).toFixed(rate === 1 ? 0 : 1) + "%");

  function duration(seconds) {
    if (!seconds) return "0 s";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  // --- session ---------------------------------------------------------------------------------------

  function showLogin(message) {
    clearInterval(timer);
    timer = null;
    $("dashboard").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("username").focus();
  }

  async function login(event) {
    event.preventDefault();
    $("login-error").textContent = "";
    $("login-submit").disabled = true;
    try {
      const response = await fetch("/v1/auth/token", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("username").value.trim(), password: $("password").value }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok || !body.accessToken) {
        const message = Array.isArray(body.message) ? body.message.join("; ") : body.message;
        $("login-error").textContent = message || "Sign-in failed (" + response.status + ").";
        return;
      }
      if (body.role !== "SUPER_ADMIN" && body.role !== "COOP_ADMIN") {
        $("login-error").textContent = "This page is for cooperative admins and super admins.";
        return;
      }
      saveTokens(body);
      $("password").value = "";
      startDashboard();
    } catch (error) {
      $("login-error").textContent = "Network problem: " + error.message;
    } finally {
      $("login-submit").disabled = false;
    }
  }

  function logout() {
    forgetTokens();
    showLogin("Signed out.");
  }

  // The answer of /v1/auth/token or /v1/auth/refresh. Refresh tokens work once: the new pair replaces the old.
  function saveTokens(body) {
    sessionStorage.setItem(TOKEN_KEY, body.accessToken);
    sessionStorage.setItem(REFRESH_KEY, body.refreshToken || "");
    const life = Number(body.expiresIn) > 0 ? Number(body.expiresIn) : 900;
    sessionStorage.setItem(RENEW_AT_KEY, String(Date.now() + life * RENEW_SHARE * 1000));
  }

  function forgetTokens() {
    for (const key of SESSION_KEYS) sessionStorage.removeItem(key);
  }

  // One renewal at a time: the figures are fetched every few seconds, and a second request with the same
  // (single-use) refresh token would be refused and sign the operator out.
  let renewing = null;

  function renew() {
    if (!renewing) renewing = renewOnce().finally(() => { renewing = null; });
    return renewing;
  }

  // true: a new pair is stored; false: the session is over (no refresh token, or it was refused);
  // null: the service could not be reached, so keep the pair and try again on the next round.
  async function renewOnce() {
    const refreshToken = sessionStorage.getItem(REFRESH_KEY);
    if (!refreshToken) return false;
    let response;
    try {
      response = await fetch("/v1/auth/refresh", {
        method: "POST", headers: { "Content-Type": "application/json" }, cache: "no-store",
        body: JSON.stringify({ refreshToken }),
      });
    } catch (error) {
      $("data-error").textContent = "Cannot reach the service: " + error.message;
      return null;
    }
    // Signed out (or in again) meanwhile: this answer no longer belongs to the stored session.
    if (sessionStorage.getItem(REFRESH_KEY) !== refreshToken) return sessionStorage.getItem(TOKEN_KEY) ? true : null;
    const body = await response.json().catch(() => ({}));
    if (response.ok && body.accessToken && body.refreshToken) {
      saveTokens(body);
      return true;
    }
    // 429 and 5xx say nothing about the session: keep it and try again later.
    if (response.status === 429 || response.status >= 500) return null;
    return false;
  }

  function endSession(message) {
    forgetTokens();
    showLogin(message);
  }

  function startDashboard() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("who").hidden = false;
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, REFRESH_MS);
  }

  function fetchData(token) {
    return fetch("/ops/data", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
  }

  async function refresh() {
    if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
    // Renew ahead of expiry; if that fails for want of the network, the access token may still be good.
    // (A session stored before refresh tokens were kept has none: its access token serves until a 401.)
    if (sessionStorage.getItem(REFRESH_KEY) && Date.now() >= Number(sessionStorage.getItem(RENEW_AT_KEY) || 0)) {
      if ((await renew()) === false) return endSession(ENDED);
    }
    let token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return; // signed out meanwhile: the sign-in form is showing
    let response;
    try {
      response = await fetchData(token);
      if (response.status === 401) {
        // Expired early (a sleeping laptop, a clock change) or renewed by another round meanwhile: renew
        // once, unless the stored token already changed, and try again; a second 401 ends the session.
        const renewed = sessionStorage.getItem(TOKEN_KEY) !== token ? true : await renew();
        if (renewed === null) return;
        if (renewed === false) return endSession(ENDED);
        token = sessionStorage.getItem(TOKEN_KEY);
        if (!token) return;
        response = await fetchData(token);
      }
    } catch (error) {
      $("data-error").textContent = "Cannot reach the service: " + error.message;
      return;
    }
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      return endSession(response.status === 401 ? ENDED : body.message);
    }
    if (!response.ok) {
      $("data-error").textContent = "The service answered " + response.status + ".";
      return;
    }
    $("data-error").textContent = "";
    render(await response.json());
  }

  // --- drawing ---------------------------------------------------------------------------------------

  function kpi(id, value, detail, warn) {
    const node = $(id);
    node.querySelector(".value").textContent = value;
    node.querySelector(".detail").textContent = detail || "";
    node.classList.toggle("warn", Boolean(warn));
  }

  function barRow(name, value, max, label, colour, inner, labelFor) {
    const row = el("div", "bar-row");
    row.dataset.name = name;
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = (max ? Math.max(0, Math.min(1, value / max)) * 100 : 0) + "%";
    if (colour) fill.style.setProperty("--c", colour);
    track.append(fill);
    if (inner !== undefined && max) {
      const part = el("div", "fill inner");
      part.style.width = Math.min(1, inner / max) * 100 + "%";
      track.append(part);
    }
    const shown = el("span", "name", labelFor ? labelFor(name) : name);
    shown.title = name;
    row.append(shown, track, el("span", "num", label));
    return row;
  }

  function fillBars(id, rows) {
    const box = $(id);
    box.replaceChildren(...(rows.length ? rows : [el("div", "empty", "Nothing yet.")]));
  }

  function minutesWindow(generatedAt, minutes) {
    // Keys as the server writes them: UTC "YYYY-MM-DDTHH:MM".
    const end = new Date(generatedAt);
    end.setUTCSeconds(0, 0);
    const keys = [];
    for (let i = minutes - 1; i >= 0; i -= 1) keys.push(new Date(end.getTime() - i * 60000).toISOString().slice(0, 16));
    return keys;
  }

  function drawPerMinute(data) {
    const minutes = (data.scope && data.scope.minutes) || 60;
    const keys = minutesWindow(data.generatedAt, minutes);
    const perKey = new Map(keys.map((k) => [k, {}]));
    const statuses = new Set();
    for (const row of data.paymentsPerMinute) {
      const slot = perKey.get(row.minute);
      if (!slot) continue;
      slot[row.status] = (slot[row.status] || 0) + row.count;
      statuses.add(row.status);
    }
    const order = Object.keys(STATUS_COLORS).filter((s) => statuses.has(s)).concat([...statuses].filter((s) => !(s in STATUS_COLORS)));
    const totals = keys.map((k) => Object.values(perKey.get(k)).reduce((a, b) => a + b, 0));
    const max = Math.max(1, ...totals);
    // Drawn at the box's real width so text is never stretched.
    const W = Math.max(320, Math.round($("chart-ppm").clientWidth || 720)), H = 220;
    const left = 34, bottom = 22, top = 8, right = 20;
    const plotW = W - left - right, plotH = H - top - bottom;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
    const step = niceStep(max);
    for (let v = 0; v <= max; v += step) {
      const y = top + plotH - (v / max) * plotH;
      chart.append(svg("line", { x1: left, x2: W - right, y1: y, y2: y, stroke: "#e3e8ee" }));
      const label = svg("text", { x: left - 4, y: y + 3, "text-anchor": "end" });
      label.textContent = String(v);
      chart.append(label);
    }
    const slotW = plotW / keys.length;
    keys.forEach((key, i) => {
      let y = top + plotH;
      for (const status of order) {
        const count = perKey.get(key)[status] || 0;
        if (!count) continue;
        const h = (count / max) * plotH;
        y -= h;
        const rect = svg("rect", { x: left + i * slotW + 1, y, width: Math.max(1, slotW - 2), height: h,
                                   fill: color(status), "data-status": status, "data-minute": key,
                                   "data-count": count });
        const title = svg("title");
        title.textContent = `${key.slice(11)} UTC · ${status}: ${count}`;
        rect.append(title);
        chart.append(rect);
      }
      if (i % 10 === 0 || i === keys.length - 1) {
        const label = svg("text", { x: left + i * slotW + slotW / 2, y: H - 6, "text-anchor": "middle" });
        label.textContent = localTime(key);
        chart.append(label);
      }
    });
    chart.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: top + plotH, y2: top + plotH }));
    $("chart-ppm").replaceChildren(chart);
    $("legend-ppm").replaceChildren(...order.map((s) => {
      const item = el("span", "", s.toLowerCase().replace("_", " "));
      item.style.setProperty("--c", color(s));
      return item;
    }));
  }

  // The pay funnel: one bar per step, as long as the sessions that reached it; the part that went on to
  // the next step in blue, the part that stopped there (dropped) in red.
  function drawFunnel(steps) {
    const max = Math.max(1, ...steps.map((r) => r.reached));
    const share = (n) => Math.max(0, Math.min(1, n / max)) * 100 + "%";
    fillBars("funnel", steps.map((r) => {
      const row = el("div", "bar-row");
      row.dataset.name = r.step;
      row.dataset.reached = String(r.reached);
      row.dataset.dropped = String(r.dropped);
      const track = el("div", "track");
      const went = el("div", "fill");
      went.style.setProperty("--c", FUNNEL_COLORS.went);
      went.style.width = share(r.reached - r.dropped);
      const dropped = el("div", "fill drop");
      dropped.style.setProperty("--c", FUNNEL_COLORS.dropped);
      dropped.style.left = share(r.reached - r.dropped);
      dropped.style.width = share(r.dropped);
      track.append(went, dropped);
      track.title = r.reached + " reached, " + r.dropped + " dropped" +
        (r.ofStart === null || r.ofStart === undefined ? "" : " (" + pct(r.ofStart) + " of sessions)");
      const name = el("span", "name", r.label || r.step);
      name.title = r.step;
      row.append(name, track, el("span", "num", r.reached + (r.dropped ? " (−" + r.dropped + ")" : "")));
      return row;
    }));
    $("legend-funnel").replaceChildren(...(steps.length ? [["went on", FUNNEL_COLORS.went],
      ["dropped here", FUNNEL_COLORS.dropped]] : []).map(([label, c]) => {
      const item = el("span", "", label);
      item.style.setProperty("--c", c);
      return item;
    }));
  }

  function niceStep(max) {
    const raw = max / 4;
    const power = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1))));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || power * 10;
    return Math.max(1, step);
  }

  function localTime(key) {
    return new Date(key + ":00Z").toTimeString().slice(0, 5);
  }

  // Provider health from every serve and worker (providers/health.py): OK, FAILING since when with the last
  // error, or UNKNOWN (no process has had an answer from it since it started). Redis, where the processes keep
  // it, cannot be read now: the rows are the view of the process that answered this page alone (source "this
  // process only"), said so above and below the table, so an outage it saw still shows. No rows at all (a server
  // before that fallback): nothing is known, so nothing is drawn as OK.
  const PROVIDER_LABELS = { mtn_momo: "MTN MoMo", airtel: "Airtel Money", mpesa: "M-Pesa", irembopay: "IremboPay",
                            africastalking: "SMS (Africa's Talking)" };
  const THIS_PROCESS_ONLY = "this process only";
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

  function drawHealth(health) {
    const table = $("health");
    const body = table.querySelector("tbody");
    const own = !!health && !health.redisReachable && health.source === THIS_PROCESS_ONLY;
    table.dataset.source = own ? "this-process" : "all-processes";
    if (!health || !health.providers) {
      const tr = el("tr");
      const td = el("td", "empty unavailable", "Unknown: Redis, where the processes report, cannot be reached.");
      td.colSpan = 4;
      tr.append(td);
      body.replaceChildren(tr);
      $("redis-health").textContent = health ? "Redis: cannot be reached." : "";
      return;
    }
    const rows = health.providers.map((p) => {
      const tr = el("tr");
      tr.dataset.provider = p.provider;
      tr.dataset.status = p.status;
      const unknown = own ? "Unknown: not called by this process since it started"
        : "Unknown: no answer since the processes started";
      const status = p.status === "FAILING" ? "Failing since " + when(p.failingSince)
        : p.status === "OK" ? "OK" : unknown;
      const error = p.lastError ? (p.lastError.summary || p.lastError.class) + " (" + when(p.lastError.at) + ")" : "–";
      tr.append(el("td", "", PROVIDER_LABELS[p.provider] || p.provider), el("td", p.status.toLowerCase(), status),
                el("td", "", error), el("td", "", when(p.lastSuccessAt)));
      return tr;
    });
    if (own) {
      const tr = el("tr");
      const td = el("td", "empty unavailable", "This server's own calls only: Redis, where the other servers " +
                    "and the workers report, cannot be reached.");
      td.colSpan = 4;
      tr.append(td);
      rows.unshift(tr);
    }
    body.replaceChildren(...rows);
    $("redis-health").textContent = own
      ? "Redis: cannot be reached · showing this process only (other servers' and workers' views unknown)"
      : "Redis: reachable · " + health.processesReporting + " process(es) reporting";
  }

  function render(data) {
    const scope = data.scope || {};
    $("scope").textContent = scope.name ? scope.name + (scope.role === "SUPER_ADMIN" ? " (super admin)" : "") : "";
    $("updated").textContent = "updated " + new Date(data.generatedAt).toLocaleTimeString();

    const rows = data.paymentsPerMinute;
    const total = rows.reduce((a, r) => a + r.count, 0);
    const byStatus = {};
    const byMethod = {};
    for (const r of rows) {
      byStatus[r.status] = (byStatus[r.status] || 0) + r.count;
      byMethod[r.method] = byMethod[r.method] || {};
      byMethod[r.method][r.status] = (byMethod[r.method][r.status] || 0) + r.count;
    }
    kpi("kpi-payments", String(total), Object.entries(byStatus).map(([s, c]) => c + " " + s.toLowerCase()).join(", "));

    const providers = Object.entries(data.providers);
    const settled = providers.reduce((a, [, p]) => a + p.settled, 0);
    const good = providers.reduce((a, [, p]) => a + p.succeeded, 0);
    kpi("kpi-success", settled ? pct(good / settled) : "–", good + " of " + settled + " settled payments",
        settled && good / settled < 0.8);
    const open = data.openPayments;
    kpi("kpi-open", String(open.count), open.count ? "oldest " + duration(open.oldestSeconds) : "none waiting",
        open.buckets.over_5m > 0);
    kpi("kpi-sms", pct(data.sms.deliveryRate), data.sms.delivered + " of " + data.sms.sent + " sent",
        data.sms.deliveryRate !== null && data.sms.deliveryRate < 0.9);
    // Pending counts jobs scheduled for later too (retries, status polls, reminders): what tells a stuck worker
    // is how long the oldest job due now has waited (warned past 5 minutes, as the README's alert).
    const ob = data.outbox;
    kpi("kpi-outbox", String(ob.pending + ob.running),
        (ob.due ? ob.due + " due, oldest waiting " + duration(ob.oldestDueSeconds) : "none due") + " · " +
        ob.running + " running, " + ob.parked + " parked", ob.parked > 0 || ob.oldestDueSeconds > 300);
    kpi("kpi-webhooks", String(data.webhooks.failed), data.webhooks.held + " held · " +
        data.webhooks.disabledEndpoints + " endpoint(s) disabled",
        data.webhooks.failed > 0 || data.webhooks.held > 0 || data.webhooks.disabledEndpoints > 0);

    drawHealth(data.providerHealth);
    drawPerMinute(data);

    const methodTotals = Object.entries(byMethod).map(([m, s]) => [m, Object.values(s).reduce((a, b) => a + b, 0), s]);
    const methodMax = Math.max(1, ...methodTotals.map(([, t]) => t));
    fillBars("methods", methodTotals.sort((a, b) => b[1] - a[1]).map(([m, t, s]) =>
      barRow(m, t, methodMax, t + " (" + PAID.reduce((a, k) => a + (s[k] || 0), 0) + " ok)", "#1f78c8", undefined,
             (name) => METHOD_LABELS[name] || name)));

    fillBars("providers", providers.sort((a, b) => a[0].localeCompare(b[0])).map(([name, p]) =>
      barRow(name, p.rate || 0, 1, p.settled ? pct(p.rate) + " of " + p.settled : "none settled", "#2f8a3a")));

    const ages = [["under 1 min", open.buckets.under_1m], ["1 to 5 min", open.buckets["1m_to_5m"]],
                  ["over 5 min", open.buckets.over_5m]];
    const ageMax = Math.max(1, ...ages.map(([, c]) => c));
    fillBars("ages", ages.map(([name, c], i) => barRow(name, c, ageMax, String(c), ["#2f8a3a", "#e0a030", "#c9372c"][i])));

    if (data.funnelUnavailable) {
      // Its counters live in Redis, which cannot be reached now: say so, rather than draw an empty funnel.
      $("funnel").replaceChildren(el("div", "empty unavailable", "Unavailable: Redis cannot be reached."));
      $("legend-funnel").replaceChildren();
    } else {
      drawFunnel(data.ussdFunnel || []);
    }
    const screens = data.ussdLastScreens || [];
    const screensMax = Math.max(1, ...screens.map((r) => r.sessions));
    // `paid` counts the sessions that asked for a payment, whatever became of it (declined, failed, still awaiting
    // the PIN): "5 paid" beside 4 payments collected, one declined, did not add up. It says what it counts.
    fillBars("screens", screens.map((r) =>
      barRow(r.screen, r.sessions, screensMax, r.sessions + (r.paid ? " · " + r.paid + " asked to pay" : ""),
             "#7aa6d6", r.paid)));

    const sms = Object.entries(data.sms.counts);
    const smsMax = Math.max(1, ...sms.map(([, c]) => c));
    fillBars("sms", sms.map(([s, c]) => barRow(s, c, smsMax, String(c), SMS_COLORS[s] || "#6b7785")));

    const body = $("outbox").querySelector("tbody");
    const outboxRows = [];
    for (const [status, kinds] of Object.entries(data.outbox.byStatus)) {
      for (const [kind, count] of Object.entries(kinds)) {
        const tr = el("tr");
        tr.append(el("td", "", status), el("td", "", kind), el("td", "", String(count)));
        outboxRows.push(tr);
      }
    }
    if (!outboxRows.length) {
      const tr = el("tr");
      const td = el("td", "empty", "Queue empty.");
      td.colSpan = 3;
      tr.append(td);
      outboxRows.push(tr);
    }
    body.replaceChildren(...outboxRows);

    const hooks = Object.entries(data.webhooks.deliveries);
    const hookMax = Math.max(1, ...hooks.map(([, c]) => c));
    // HELD: pending, but not sent until a person acts (the endpoint enabled, its domain approved).
    const hookColor = (s) => (s === "FAILED" ? "#c9372c" : s === "HELD" ? "#e0a030" : "#2f8a3a");
    fillBars("webhooks", hooks.map(([s, c]) => barRow(s, c, hookMax, String(c), hookColor(s))));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    if (sessionStorage.getItem(TOKEN_KEY)) startDashboard();
    else showLogin();
  });
})();
