// Phone simulator: each phone plays a subscriber talking to the gateway through the Africa's Talking USSD
// endpoint, sees the provider simulator's PIN prompt and reads SMS from the SMS simulator's inbox.
"use strict";

(function () {
  const PROMPT_POLL_MS = 1500;
  const INBOX_POLL_MS = 2000;
  // The provider simulators prompt only for the numbers this page holds, and a hold lapses after
  // HOLD_SECONDS: renewing it well before then keeps a phone on screen interactive, and a closed tab gives
  // its numbers back to the scripted outcomes (payments from a terminal or the API never wait for it).
  const HOLD_MS = 20000;
  const HOLD_SECONDS = 60;
  const PROVIDER_LABELS = { mtn_momo: "MTN MoMo", airtel: "Airtel Money", mpesa: "M-Pesa", irembopay: "IremboPay" };
  const REFERENCE = /\b([A-Z]{2,5}_\d{8}_\d{1,9})\b/;
  let config = null;
  const phones = [];
  let nextId = 1;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key === "type" || key === "title" || key === "aria-label" ||
               key === "placeholder" || key === "tabindex" || key === "value") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function randomId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return "SIM" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function money(amount, currency) {
    const n = Number(amount);
    return (Number.isFinite(n) ? n.toLocaleString("en-US", { maximumFractionDigits: 2 }) : amount) + " " + currency;
  }

  function normalise(number) {
    const digits = number.replace(/[^\d+]/g, "");
    return digits.startsWith("+") ? digits : "+" + digits;
  }

  const notices = new Map(); // topic -> text: a renewed hold clears its own notice, not the SMS one

  function showNotice(topic, text) {
    if (text) notices.set(topic, text);
    else notices.delete(topic);
    const notice = document.getElementById("notice");
    notice.textContent = Array.from(notices.values()).join(" ");
    notice.hidden = !notices.size;
  }

  function promptsOn() {
    return document.getElementById("interactive").checked;
  }

  async function getJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(url + " answered " + response.status);
    return response.json();
  }

  // --- the simulators' controls -----------------------------------------------------------------------

  // Hold (or give back) one number on every provider simulator: only its payers answer PIN prompts here.
  async function holdNumber(number, on) {
    const body = on ? { msisdn: number, interactive: true, seconds: HOLD_SECONDS } : { msisdn: number, interactive: false };
    const paths = Object.values(config.providers);
    const results = await Promise.allSettled(paths.map((path) => fetch(path + "/_control/phone", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })));
    const failed = results.filter((r) => r.status === "rejected" || !r.value.ok).length;
    showNotice("hold", failed ? "Could not switch PIN prompts on " + failed + " provider simulator(s)." : "");
  }

  // --- one phone --------------------------------------------------------------------------------------

  class Phone {
    constructor(number) {
      this.id = nextId++;
      this.number = number;
      this.mode = "idle"; // idle | busy | ussd | end | prompt | inbox
      this.entry = "";
      this.reply = "";
      this.pin = "";
      this.answers = [];
      this.sessionId = null;
      this.code = null;
      this.prompt = null;
      this.handled = new Set(); // prompt references answered or ignored on this phone
      this.lastRef = null;
      this.messages = [];
      this.read = 0;
      this.returnTo = "idle";
      this.build();
      this.setNumber(number);
      this.timers = [setInterval(() => this.pollPrompts(), PROMPT_POLL_MS),
                     setInterval(() => this.pollInbox(), INBOX_POLL_MS),
                     setInterval(() => this.hold(), HOLD_MS)];
    }

    build() {
      const pick = el("select", { class: "pick", "aria-label": "Phone number" });
      for (const p of config.phones) pick.append(el("option", { value: p.phone, text: p.phone + " — " + p.name }));
      pick.append(el("option", { value: "other", text: "Other number…" }));
      const custom = el("input", { class: "custom", type: "tel", placeholder: "+250788123456",
                                   "aria-label": "Other phone number" });
      custom.hidden = true;
      const remove = el("button", { class: "remove", type: "button", title: "Remove this phone", text: "×" });
      this.who = el("div", { class: "who" });
      this.badge = el("span", { class: "badge" });
      this.inboxButton = el("button", { class: "inbox-btn", type: "button", title: "Inbox" }, "✉ ", this.badge);
      this.net = el("span", { class: "net" });
      this.clock = el("span", { class: "clock" });
      this.views = {
        idle: el("div", { class: "view view-idle" }),
        busy: el("div", { class: "view view-busy", text: "USSD code running…" }),
        ussd: el("div", { class: "view view-ussd" }),
        end: el("div", { class: "view view-end" }),
        prompt: el("div", { class: "view view-prompt" }),
        inbox: el("div", { class: "view view-inbox" }),
      };
      this.hint = el("div", { class: "hint" });
      this.entryBox = el("div", { class: "entry" });
      this.banner = el("div", { class: "banner" });
      this.banner.hidden = true;
      this.views.idle.append(this.hint, this.entryBox, this.banner);
      this.ussdText = el("div", { class: "ussd-text" });
      this.replyBox = el("span", { class: "reply-input" });
      this.views.ussd.append(this.ussdText, el("div", { class: "reply" }, this.replyBox, el("span", { class: "caret" })));
      this.endText = el("div", { class: "end-text" });
      this.views.end.append(this.endText);
      const screen = el("div", { class: "screen" }, el("div", { class: "status-bar" }, this.net, this.clock, this.inboxButton),
                        ...Object.values(this.views));
      const keypad = el("div", { class: "keypad" });
      keypad.append(
        el("button", { class: "call", type: "button", "data-key": "call", title: "Call / send / approve", text: "✆" }),
        el("button", { class: "clr", type: "button", "data-key": "clear", title: "Clear", text: "C" }),
        el("button", { class: "end", type: "button", "data-key": "end", title: "End / cancel / decline", text: "✕" }));
      const letters = { 2: "abc", 3: "def", 4: "ghi", 5: "jkl", 6: "mno", 7: "pqrs", 8: "tuv", 9: "wxyz", 0: "+" };
      for (const key of ["1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "0", "#"]) {
        keypad.append(el("button", { type: "button", "data-key": key }, key, el("small", { text: letters[key] || " " })));
      }
      const softkeys = el("div", { class: "softkeys" },
        el("button", { type: "button", class: "soft-inbox", text: "Inbox" }),
        el("button", { type: "button", class: "soft-back", text: "Back" }));
      this.root = el("section", { class: "phone", tabindex: "0", "aria-label": "Simulated phone" },
        el("div", { class: "phone-top" }, pick, custom, remove), this.who,
        el("div", { class: "handset" }, el("div", { class: "earpiece" }), el("div", { class: "brand", text: "COOPHONE" }),
           screen, softkeys, keypad));

      pick.addEventListener("change", () => {
        custom.hidden = pick.value !== "other";
        if (pick.value === "other") custom.focus();
        else this.setNumber(pick.value);
      });
      custom.addEventListener("change", () => {
        if (/^\+?\d{9,15}$/.test(custom.value.replace(/\s/g, ""))) this.setNumber(normalise(custom.value));
        else this.who.textContent = "Type a number with its country code, e.g. +250788123456";
      });
      remove.addEventListener("click", () => this.destroy());
      keypad.addEventListener("click", (event) => {
        const button = event.target.closest("button");
        if (button) this.press(button.dataset.key);
      });
      this.inboxButton.addEventListener("click", () => this.toggleInbox());
      softkeys.querySelector(".soft-inbox").addEventListener("click", () => this.toggleInbox());
      softkeys.querySelector(".soft-back").addEventListener("click", () => this.press("clear"));
      this.root.addEventListener("keydown", (event) => {
        if (event.target.tagName === "INPUT" || event.target.tagName === "SELECT") return;
        const map = { Enter: "call", Escape: "end", Backspace: "clear" };
        const key = map[event.key] || (/^[0-9*#]$/.test(event.key) ? event.key : null);
        if (key) { event.preventDefault(); this.press(key); }
      });
      this.pick = pick;
      this.custom = custom;
      this.tick();
    }

    setNumber(number) {
      const previous = this.number;
      this.number = number;
      if (previous !== number) this.release(previous);
      this.hold();
      const demo = config.phones.find((p) => p.phone === number);
      if (demo) this.pick.value = number;
      this.root.dataset.phone = number;
      this.who.textContent = demo ? demo.name + " (" + demo.language + ") — " + demo.does
                                  : "Any number: not a member unless registered";
      this.net.textContent = number.startsWith("+25073") ? "Airtel RW" : number.startsWith("+250") ? "MTN RW" : "GSM";
      this.messages = [];
      this.read = 0;
      this.handled = new Set();
      this.prompt = null;
      this.lastRef = null;
      this.reset();
      this.pollInbox();
    }

    reset() {
      this.entry = "";
      this.reply = "";
      this.pin = "";
      this.answers = [];
      this.sessionId = null;
      this.show("idle");
    }

    destroy() {
      this.timers.forEach(clearInterval);
      this.root.remove();
      phones.splice(phones.indexOf(this), 1);
      this.release(this.number);
    }

    // The simulators prompt this number's payer while the page shows it (and PIN prompts are on).
    hold() {
      if (promptsOn()) holdNumber(this.number, true);
    }

    release(number) {
      if (!phones.some((p) => p !== this && p.number === number)) holdNumber(number, false);
    }

    tick() {
      const now = new Date();
      this.clock.textContent = now.toTimeString().slice(0, 5);
    }

    show(mode) {
      this.mode = mode;
      for (const [name, view] of Object.entries(this.views)) view.hidden = name !== mode;
      this.root.dataset.mode = mode;
      this.render();
    }

    render() {
      this.hint.textContent = "Dial " + config.serviceCode + " and press ✆";
      this.entryBox.textContent = this.entry;
      this.replyBox.textContent = this.reply;
      const unread = this.messages.length - this.read;
      this.badge.textContent = unread > 0 ? String(unread) : "";
      this.banner.hidden = unread <= 0;
      this.banner.textContent = unread === 1 ? "1 new message — press Inbox" : unread + " new messages — press Inbox";
      if (this.mode === "prompt") this.renderPrompt();
      if (this.mode === "inbox") this.renderInbox();
    }

    press(key) {
      this.tick();
      if (key === "call") return this.green();
      if (key === "end") return this.red();
      if (key === "clear") {
        if (this.mode === "idle") this.entry = this.entry.slice(0, -1);
        else if (this.mode === "ussd") this.reply = this.reply.slice(0, -1);
        else if (this.mode === "prompt") this.pin = this.pin.slice(0, -1);
        else if (this.mode === "inbox" || this.mode === "end") this.show(this.returnTo === "prompt" ? "prompt" : "idle");
        return this.render();
      }
      if (this.mode === "idle") this.entry += key;
      else if (this.mode === "ussd") this.reply += key;
      else if (this.mode === "prompt" && /\d/.test(key) && this.pin.length < 6) this.pin += key;
      this.render();
    }

    green() {
      if (this.mode === "idle") return this.dial();
      if (this.mode === "ussd") return this.send();
      if (this.mode === "prompt") return this.decide(true);
      if (this.mode === "end" || this.mode === "inbox") this.reset();
    }

    red() {
      if (this.mode === "ussd") {
        this.sessionId = null;
        this.endText.textContent = "Session cancelled.";
        return this.show("end");
      }
      if (this.mode === "prompt") return this.decide(false);
      this.reset();
    }

    // --- USSD ---------------------------------------------------------------------------------------
    async dial() {
      const code = this.entry;
      if (!code) return;
      if (!/^\*[0-9*]*#$/.test(code)) {
        this.endText.textContent = "Invalid MMI code: " + code;
        return this.show("end");
      }
      this.code = code;
      this.sessionId = randomId();
      this.answers = [];
      await this.hop();
    }

    async send() {
      if (!this.reply) return;
      this.answers.push(this.reply);
      this.reply = "";
      await this.hop();
    }

    async hop() {
      this.show("busy");
      // A demo phone's own network; a number typed in is sent with none (the gateway then reads its range).
      const demo = config.phones.find((p) => p.phone === this.number);
      const body = new URLSearchParams({
        sessionId: this.sessionId, serviceCode: this.code, phoneNumber: this.number,
        networkCode: demo ? demo.network : "", text: this.answers.join("*"),
      });
      let text;
      try {
        const response = await fetch(config.ussdUrl, {
          method: "POST", body, headers: { "Content-Type": "application/x-www-form-urlencoded" },
        });
        text = await response.text();
        if (!response.ok) text = "END Connection problem or invalid MMI code (" + response.status + ")";
      } catch (error) {
        text = "END Connection problem or invalid MMI code";
      }
      if (text.startsWith("CON ")) {
        this.ussdText.textContent = text.slice(4);
        this.show("ussd");
        return;
      }
      const message = text.startsWith("END ") ? text.slice(4) : text;
      this.sessionId = null;
      const ref = REFERENCE.exec(message);
      if (ref) this.lastRef = ref[1];
      this.endText.textContent = message;
      this.show("end");
    }

    // --- PIN prompt ---------------------------------------------------------------------------------
    async pollPrompts() {
      if (document.hidden || !promptsOn()) return;
      if (this.mode === "prompt" || this.mode === "busy" || this.mode === "ussd") return;
      const number = this.number;
      for (const [provider, path] of Object.entries(config.providers)) {
        let found;
        try {
          found = await getJson(path + "/_control/pending?msisdn=" + encodeURIComponent(number));
        } catch (error) {
          continue;
        }
        const prompt = (found.prompts || []).find((p) => !this.handled.has(p.reference));
        if (prompt && number === this.number && this.mode !== "prompt") {
          await this.openPrompt(provider, path, prompt);
          return;
        }
      }
    }

    async openPrompt(provider, path, prompt) {
      let payee = null;
      for (const ref of [prompt.note, prompt.reference, this.lastRef]) {
        if (!ref) continue;
        try {
          payee = await getJson("/simulator/payment?reference=" + encodeURIComponent(ref));
          break;
        } catch (error) { /* try the next reference */ }
      }
      if (this.mode === "busy" || this.mode === "ussd") return; // the user started dialling meanwhile
      this.prompt = { provider, path, data: prompt, payee };
      this.pin = "";
      this.returnTo = "prompt";
      this.show("prompt");
    }

    renderPrompt() {
      const view = this.views.prompt;
      const { provider, data, payee } = this.prompt;
      const to = payee ? payee.cooperative + (payee.paymentType ? " (" + payee.paymentType + ")" : "") : "the merchant";
      const ref = payee ? payee.reference : data.note;
      view.replaceChildren(
        el("div", { class: "prompt-title", text: PROVIDER_LABELS[provider] || provider }),
        el("div", { class: "prompt-text", text: "Approve payment of " + money(data.amount, data.currency) + " to " + to +
                                                "?" + (ref ? " Ref " + ref : "") + " Enter PIN" }),
        el("div", { class: "pin", text: "•".repeat(this.pin.length) }),
        this.promptActions());
      if (this.promptError) view.append(el("div", { class: "prompt-error", text: this.promptError }));
    }

    promptActions() {
      const approve = el("button", { type: "button", class: "prompt-approve", text: "Approve" });
      const decline = el("button", { type: "button", class: "prompt-decline", text: "Decline" });
      const ignore = el("button", { type: "button", class: "prompt-ignore", title: "Leave it: the payment times out",
                                    text: "Let it time out" });
      approve.addEventListener("click", () => this.decide(true));
      decline.addEventListener("click", () => this.decide(false));
      ignore.addEventListener("click", () => this.ignorePrompt());
      return el("div", { class: "prompt-actions" }, approve, decline, ignore);
    }

    async decide(approve) {
      const prompt = this.prompt;
      if (!prompt) return;
      if (approve && this.pin.length < 4) {
        this.promptError = "Enter your PIN (4 digits or more) first.";
        return this.render();
      }
      this.promptError = null;
      this.handled.add(prompt.data.reference);
      let text;
      try {
        const response = await fetch(prompt.path + "/_control/decide", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ reference: prompt.data.reference, approve }),
        });
        text = response.ok ? (approve ? "Payment approved. You will receive an SMS confirmation."
                                      : "Payment declined.")
                            : response.status === 404 ? "This request has expired." : "Request failed (" + response.status + ").";
      } catch (error) {
        text = "Network problem: try again.";
      }
      this.prompt = null;
      this.returnTo = "idle";
      this.endText.textContent = text;
      this.show("end");
    }

    ignorePrompt() {
      if (!this.prompt) return;
      this.handled.add(this.prompt.data.reference);
      this.prompt = null;
      this.returnTo = "idle";
      this.endText.textContent = "Prompt left unanswered: the payment will time out.";
      this.show("end");
    }

    // --- SMS inbox ----------------------------------------------------------------------------------
    async pollInbox() {
      if (!config.smsInbox || (document.hidden && this.messages.length)) return;
      const number = this.number;
      try {
        const found = await getJson(config.smsInbox + encodeURIComponent(number));
        if (number !== this.number) return;
        const changed = found.messages.length !== this.messages.length ||
          found.messages.some((m, i) => m.status !== (this.messages[i] || {}).status);
        this.messages = found.messages;
        if (this.mode === "inbox") this.read = this.messages.length;
        if (changed) this.render();
      } catch (error) { /* the SMS simulator is optional; keep trying */ }
    }

    toggleInbox() {
      if (this.mode === "inbox") {
        this.show(this.prompt ? "prompt" : "idle");
        return;
      }
      if (this.mode === "ussd" || this.mode === "busy") return; // a USSD session holds the screen
      this.returnTo = this.prompt ? "prompt" : "idle";
      this.read = this.messages.length;
      this.show("inbox");
    }

    renderInbox() {
      const view = this.views.inbox;
      if (!this.messages.length) {
        view.replaceChildren(el("div", { class: "hint", text: "Inbox is empty." }));
        return;
      }
      const items = this.messages.slice().reverse().map((m) => el("div", { class: "sms" },
        el("div", { class: "sms-meta", text: m.from + " · " + new Date(m.at).toTimeString().slice(0, 5) + " · " + m.status }),
        el("div", { class: "sms-text", text: m.message })));
      view.replaceChildren(...items);
    }
  }

  function addPhone(number) {
    const open = new Set(phones.map((p) => p.number));
    const choice = number || (config.phones.find((p) => !open.has(p.phone)) || config.phones[0] || { phone: "+250788123456" }).phone;
    const phone = new Phone(choice);
    phones.push(phone);
    document.getElementById("phones").append(phone.root);
    return phone;
  }

  async function start() {
    try {
      config = await getJson("/simulator/config");
    } catch (error) {
      showNotice("config", "Could not load the simulator configuration: " + error.message);
      return;
    }
    document.getElementById("service-code").textContent = config.serviceCode;
    const interactive = document.getElementById("interactive");
    const saved = sessionStorage.getItem("phone.interactive");
    if (saved !== null) interactive.checked = saved === "1";
    interactive.addEventListener("change", () => {
      sessionStorage.setItem("phone.interactive", interactive.checked ? "1" : "0");
      if (interactive.checked) phones.forEach((p) => p.hold());
      else new Set(phones.map((p) => p.number)).forEach((number) => holdNumber(number, false));
    });
    // A background tab's timers are throttled and its holds may lapse: renew them as soon as it is seen.
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) phones.forEach((p) => p.hold());
    });
    if (!config.smsInbox) showNotice("sms", "The SMS simulator is not served by this process: the inbox stays empty.");
    document.getElementById("add-phone").addEventListener("click", () => addPhone());
    const wanted = new URLSearchParams(location.search).getAll("phone");
    if (wanted.length) wanted.forEach((n) => addPhone(normalise(n)));
    else addPhone();
    setInterval(() => phones.forEach((p) => p.tick()), 15000);
  }

  window.phoneSimulator = { phones, addPhone };
  document.addEventListener("DOMContentLoaded", start);
})();
