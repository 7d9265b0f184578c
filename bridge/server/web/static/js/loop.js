"use strict";
// One loop, live. On load: the whole history through the API, then the loop's events
// from the newest event that history reflects (`last_event_id`), so nothing is missed
// or shown twice, even when the page is reloaded in the middle of a turn. The
// EventSource sends Last-Event-ID itself when it reconnects.
(() => {
  const root = document.getElementById("loop");
  const loopId = root.dataset.loopId;
  const grant = root.dataset.grant;
  const readonly = root.dataset.readonly === "true";
  const user = root.dataset.user;
  const owner = root.dataset.owner;
  const turnsEl = document.getElementById("turns");
  const liveEl = document.getElementById("live");
  const errorEl = document.getElementById("loop-error");
  const composer = document.getElementById("composer");
  const stopButton = document.getElementById("stop");
  const el = LB.el;
  const NAMES = [
    "queued", "started", "snapshot", "assistant_delta", "thinking_delta", "tool_call",
    "tool_result", "requires_choice", "choice_resolved", "file_shared", "done", "interrupted",
  ];
  const LIVE = new Set(["queued", "running"]);
  const RENDER_EVERY_MS = 80;
  const turns = new Map();
  const order = [];
  let current = null;
  let lastEventId = 0;
  let source = null;

  function loopPath(rest, params) {
    const query = new URLSearchParams(params || {});
    if (grant) query.set("grant", grant);
    const text = query.toString();
    return `/loops/${encodeURIComponent(loopId)}${rest}${text ? "?" + text : ""}`;
  }

  function fileUrl(path) {
    const parts = path.split("/").map(encodeURIComponent).join("/");
    return `/api/v1/loops/${encodeURIComponent(loopId)}/files/${parts}`;
  }

  // ---- a turn ------------------------------------------------------------------------

  class Turn {
    constructor(id) {
      this.id = id;
      this.trigger = "message";
      this.userText = "";
      this.author = null;
      this.text = "";
      this.thinking = "";
      this.entries = [];
      this.ended = "queued";
      this.error = null;
      this.usage = null;
      this.files = [];
      this.startedAt = null;
      this.known = false;
      this.segments = [];
      this.renderTimer = null;
      this.el = el("article", "turn");
      this.el.dataset.turnId = id;
      this.head = el("header", "turn-head");
      this.userEl = el("div", "user-text");
      this.thinkingEl = el("details", "thinking");
      this.thinkingEl.hidden = true;
      this.thinkingEl.append(el("summary", "", "Thinking"), el("pre", "thinking-text"));
      this.body = el("div", "assistant");
      this.foot = el("footer", "turn-foot");
      this.el.append(this.head, this.userEl, this.thinkingEl, this.body, this.foot);
    }
  }

  function ensureTurn(id) {
    let turn = turns.get(id);
    if (!turn) {
      turn = new Turn(id);
      turns.set(id, turn);
      order.push(id);
      turnsEl.append(turn.el);
      layout(turn);
    }
    return turn;
  }

  function renderHead(turn) {
    const who = turn.trigger === "background"
      ? "background"
      : (turn.author && (turn.author.name || turn.author.id)) || owner;
    const when = turn.startedAt ? new Date(turn.startedAt).toLocaleString() : "";
    turn.head.replaceChildren(
      el("span", "who", who),
      el("time", "when", when),
      el("span", `state badge ${turn.ended}`, turn.ended === "running" && waiting(turn) ? "waiting" : turn.ended),
    );
    turn.userEl.textContent = turn.userText;
    turn.userEl.hidden = !turn.userText;
  }

  function renderFoot(turn) {
    const parts = [];
    if (turn.error) parts.push(el("p", "error", `${turn.error.code}: ${turn.error.message}`));
    if (turn.files.length) {
      const list = el("ul", "files");
      for (const file of turn.files) {
        const item = el("li");
        const name = readonly ? el("span", "file", file.path) : el("a", "file", file.path);
        if (!readonly) {
          name.href = fileUrl(file.path);
          name.setAttribute("download", "");
        }
        item.append("Shared ", name);
        if (file.size !== undefined && file.size !== null) item.append(` (${formatBytes(file.size)})`);
        if (file.caption) item.append(` — ${file.caption}`);
        list.append(item);
      }
      parts.push(list);
    }
    if (turn.usage) parts.push(el("p", "usage", formatUsage(turn.usage)));
    turn.foot.replaceChildren(...parts);
  }

  function waiting(turn) {
    return turn.entries.some((entry) => entry.kind === "choice" && entry.pending);
  }

  // The answer is split where tool calls and choices came, so each shows in its place.
  function layout(turn) {
    turn.body.replaceChildren();
    turn.segments = [];
    let start = 0;
    for (const entry of turn.entries) {
      addSegment(turn, start, entry.offset);
      turn.body.append(entry.el);
      start = entry.offset;
    }
    addSegment(turn, start, null);
    for (const segment of turn.segments) renderSegment(turn, segment);
  }

  function addSegment(turn, start, end) {
    const segment = { start, end, shown: null, el: el("div", "md") };
    turn.segments.push(segment);
    turn.body.append(segment.el);
  }

  function renderSegment(turn, segment) {
    const text = segment.end === null ? turn.text.slice(segment.start) : turn.text.slice(segment.start, segment.end);
    if (text !== segment.shown) {
      Markdown.render(segment.el, text);
      segment.shown = text;
    }
  }

  function textGrew(turn) {
    if (turn.renderTimer !== null) return;
    turn.renderTimer = setTimeout(() => {
      turn.renderTimer = null;
      renderSegment(turn, turn.segments[turn.segments.length - 1]);
    }, RENDER_EVERY_MS);
  }

  function addEntry(turn, entry) {
    turn.entries.push(entry);
    layout(turn);
  }

  function findEntry(key) {
    for (const id of order) {
      const entry = turns.get(id).entries.find((e) => e.key === key);
      if (entry) return entry;
    }
    return null;
  }

  // ---- tool calls --------------------------------------------------------------------

  function toolEntry(call, offset) {
    const entry = { kind: "tool", key: "tool:" + call.tool_use_id, offset, call: { ...call } };
    entry.el = el("details", "tool");
    renderTool(entry);
    return entry;
  }

  function renderTool(entry) {
    const call = entry.call;
    const mark = call.ok === true ? "✓" : call.ok === false ? "✗" : "…";
    const summary = el("summary");
    summary.append(el("span", "tool-name", call.tool), " ");
    if (call.input_summary) summary.append(el("code", "tool-summary", call.input_summary), " ");
    summary.append(el("span", `tool-ok ${call.ok === false ? "failed" : call.ok ? "ok" : "running"}`, mark));
    const parts = [summary];
    if (call.input) parts.push(el("h4", "", "Input"), el("pre", "tool-input", JSON.stringify(call.input, null, 2)));
    if (call.diff) parts.push(el("h4", "", "Diff"), diffBlock(call.diff));
    if (call.output) parts.push(el("h4", "", "Output"), el("pre", "tool-output", call.output));
    entry.el.classList.toggle("failed", call.ok === false);
    entry.el.replaceChildren(...parts);
  }

  function diffBlock(diff) {
    const pre = el("pre", "diff");
    for (const line of diff.replace(/\n$/, "").split("\n")) {
      let kind = "";
      if (line.startsWith("@@")) kind = "hunk";
      else if (line.startsWith("+++") || line.startsWith("---")) kind = "file";
      else if (line.startsWith("+")) kind = "add";
      else if (line.startsWith("-")) kind = "del";
      pre.append(el("span", kind, line + "\n"));
    }
    return pre;
  }

  // ---- choices -----------------------------------------------------------------------

  function choiceEntry(choice, offset) {
    const entry = {
      kind: "choice", key: "choice:" + choice.choice_id, offset,
      choice, pending: !choice.answer, outcome: "",
    };
    entry.el = el("div", "choice");
    if (choice.answer) entry.outcome = describeAnswer(choice.answer, choice.payload, choice.source);
    renderChoice(entry);
    return entry;
  }

  function choiceTitle(choice) {
    const payload = choice.payload || {};
    if (choice.kind === "permission") return payload.title || `Allow ${payload.tool || "tool"}?`;
    return "The agent asks";
  }

  function renderChoice(entry) {
    const { choice } = entry;
    const payload = choice.payload || {};
    const parts = [el("p", "choice-title", choiceTitle(choice))];
    if (choice.kind === "permission" && payload.input_summary) {
      parts.push(el("pre", "choice-detail", payload.input_summary));
    }
    const questions = choice.kind === "question" ? payload.questions || [] : [];
    if (entry.pending && !readonly) {
      parts.push(choice.kind === "permission" ? permissionControls(entry) : questionControls(entry, questions));
    } else {
      for (const question of questions) parts.push(el("p", "question", question.question));
      const text = entry.pending ? "Waiting for an answer." : entry.outcome;
      parts.push(el("p", entry.pending ? "outcome pending" : "outcome", text));
    }
    entry.el.classList.toggle("pending", entry.pending);
    entry.el.replaceChildren(...parts);
  }

  function permissionControls(entry) {
    const box = el("div", "choice-actions");
    const allow = el("button", "allow", "Allow");
    const deny = el("button", "danger deny", "Deny");
    allow.type = deny.type = "button";
    allow.addEventListener("click", () => answer(entry, { allow: true }, box));
    deny.addEventListener("click", () => answer(entry, { allow: false }, box));
    box.append(allow, deny);
    return box;
  }

  function questionControls(entry, questions) {
    const form = el("form", "choice-actions questions");
    questions.forEach((question, index) => {
      const set = el("fieldset");
      set.append(el("legend", "", question.header ? `${question.header}: ${question.question}` : question.question));
      for (const option of question.options || []) {
        const label = el("label", "option");
        const input = el("input");
        input.type = question.multi_select ? "checkbox" : "radio";
        input.name = question.id || `q${index + 1}`;
        input.value = option.label;
        label.append(input, " ", el("span", "", option.label));
        if (option.description) label.append(el("small", "", ` — ${option.description}`));
        set.append(label);
      }
      form.append(set);
    });
    const submit = el("button", "", "Answer");
    submit.type = "submit";
    form.append(submit);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const answers = {};
      questions.forEach((question, index) => {
        const name = question.id || `q${index + 1}`;
        const picked = Array.from(form.querySelectorAll("input:checked"))
          .filter((input) => input.name === name)
          .map((input) => input.value);
        if (picked.length) answers[name] = question.multi_select ? picked : picked[0];
      });
      if (!Object.keys(answers).length) {
        LB.show(errorEl, "Pick an answer first.");
        return;
      }
      answer(entry, { answers }, form);
    });
    return form;
  }

  async function answer(entry, body, controls) {
    for (const button of controls.querySelectorAll("button")) button.disabled = true;
    LB.show(errorEl, "");
    const sourceName = "web:" + user;
    // Kept before the request: the stream's choice_resolved may arrive before its answer.
    entry.ownAnswer = describeAnswer(body, entry.choice.payload, sourceName);
    try {
      await LB.json("POST", loopPath(`/choices/${encodeURIComponent(entry.choice.choice_id)}`), { ...body, source: sourceName });
      resolveChoice(entry, entry.ownAnswer);
    } catch (e) {
      entry.ownAnswer = null;
      LB.show(errorEl, e.code === "choice_not_found" ? "This was already answered, or the turn has ended." : e.message);
      for (const button of controls.querySelectorAll("button")) button.disabled = false;
    }
  }

  function describeAnswer(answerBody, payload, by) {
    if (!answerBody) return `Answered by ${by}`;
    if (answerBody.allow === true) return `Allowed by ${by}`;
    if (answerBody.allow === false) return `Denied by ${by}`;
    const texts = {};
    for (const question of (payload && payload.questions) || []) texts[question.id] = question.question;
    const picked = Object.entries(answerBody.answers || {}).map(([id, value]) =>
      `${texts[id] || id} → ${Array.isArray(value) ? value.join(", ") : value}`);
    return `${by} chose: ${picked.join("; ")}`;
  }

  function resolveChoice(entry, outcome) {
    if (!entry.pending) return;
    entry.pending = false;
    entry.outcome = outcome;
    renderChoice(entry);
    const turn = turns.get(entry.turnId);
    if (turn) renderHead(turn);
  }

  // ---- history -----------------------------------------------------------------------

  function fromHistory(item) {
    const turn = ensureTurn(item.turn_id);
    turn.known = true;
    turn.trigger = item.trigger;
    turn.userText = item.user_text;
    turn.author = item.author || null;
    turn.text = item.assistant_text || "";
    turn.ended = item.ended;
    turn.error = item.error;
    turn.usage = item.usage || null;
    turn.files = item.files_shared || [];
    turn.startedAt = item.started_at;
    const offset = (mark) => unitsOf(turn.text, mark.text_offset || 0);
    const marks = [
      ...(item.tool_calls || []).map((call) => ({ at: call.event_id || 0, make: () => toolEntry(call, offset(call)) })),
      ...(item.choices || []).map((choice) => ({ at: choice.event_id || 0, make: () => choiceEntry(choice, offset(choice)) })),
    ];
    marks.sort((a, b) => a.at - b.at);
    turn.entries = marks.map((mark) => mark.make());
    if (item.pending_choice) turn.entries.push(choiceEntry(item.pending_choice, turn.text.length));
    for (const entry of turn.entries) entry.turnId = turn.id;
    layout(turn);
    renderHead(turn);
    renderFoot(turn);
    if (LIVE.has(turn.ended)) current = turn.ended === "running" ? turn : current;
  }

  // The server counts text in code points, a JavaScript string in UTF-16 units.
  function unitsOf(text, codePoints) {
    let units = 0;
    let seen = 0;
    for (const character of text) {
      if (seen >= codePoints) break;
      units += character.length;
      seen += 1;
    }
    return units;
  }

  async function loadHistory() {
    let after = null;
    let page;
    do {
      const params = { limit: "100" };
      if (after) params.after = after;
      page = await LB.json("GET", loopPath("/messages", params));
      for (const item of page.data) fromHistory(item);
      after = page.last_id;
    } while (page.has_more);
    lastEventId = page.last_event_id || 0;
  }

  // A turn this page did not start: who sent it comes from its history item.
  async function learnTurn(turn) {
    const index = order.indexOf(turn.id);
    const params = { limit: "100" };
    if (index > 0) params.after = order[index - 1];
    try {
      const page = await LB.json("GET", loopPath("/messages", params));
      const item = page.data.find((i) => i.turn_id === turn.id);
      if (item && !turn.known) {
        turn.known = true;
        turn.userText = item.user_text;
        turn.author = item.author || null;
        turn.trigger = item.trigger;
        renderHead(turn);
      }
    } catch (e) {
      // The turn still shows; only who sent it is missing.
    }
  }

  // ---- events ------------------------------------------------------------------------

  function turnOf(data) {
    return (data.turn_id && turns.get(data.turn_id)) || current;
  }

  function onEvent(name, data) {
    let turn;
    switch (name) {
      case "started":
        turn = ensureTurn(data.turn_id);
        turn.trigger = data.trigger || turn.trigger;
        turn.ended = "running";
        turn.startedAt = turn.startedAt || new Date().toISOString();
        current = turn;
        if (!turn.known) learnTurn(turn);
        renderHead(turn);
        break;
      case "snapshot":
        turn = ensureTurn(data.turn_id);
        turn.ended = "running";
        turn.text = data.assistant_text_so_far || "";
        current = turn;
        if (!turn.known) learnTurn(turn);
        layout(turn);
        renderHead(turn);
        break;
      case "assistant_delta":
        if (!current) return;
        current.text += data.text;
        textGrew(current);
        break;
      case "thinking_delta":
        if (!current) return;
        current.thinking += data.text;
        current.thinkingEl.hidden = false;
        current.thinkingEl.querySelector("pre").textContent = current.thinking;
        break;
      case "tool_call": {
        if (!current || findEntry("tool:" + data.tool_use_id)) return;
        const entry = toolEntry({ ...data, ok: null }, current.text.length);
        entry.turnId = current.id;
        addEntry(current, entry);
        break;
      }
      case "tool_result": {
        const entry = findEntry("tool:" + data.tool_use_id);
        if (!entry) return;
        entry.call.ok = data.ok;
        if (data.output !== undefined) entry.call.output = data.output;
        if (data.diff !== undefined) entry.call.diff = data.diff;
        renderTool(entry);
        break;
      }
      case "requires_choice": {
        if (!current || findEntry("choice:" + data.choice_id)) return;
        const entry = choiceEntry(data, current.text.length);
        entry.turnId = current.id;
        addEntry(current, entry);
        renderHead(current);
        break;
      }
      case "choice_resolved": {
        const entry = findEntry("choice:" + data.choice_id);
        if (entry) resolveChoice(entry, entry.ownAnswer || `Answered by ${data.source}`);
        break;
      }
      case "file_shared":
        if (!current) return;
        current.files.push(data);
        renderFoot(current);
        break;
      case "done":
      case "interrupted":
      case "error":
        turn = turnOf(data);
        if (!turn) {
          if (name === "error") LB.show(errorEl, data.message);
          return;
        }
        turn.ended = name === "done" ? "done" : name === "interrupted" ? "interrupted" : "error";
        if (name === "error") turn.error = { code: data.code, message: data.message };
        if (data.usage) turn.usage = data.usage;
        for (const entry of turn.entries) {
          if (entry.kind === "choice" && entry.pending) resolveChoice(entry, "No longer needed: the turn ended.");
        }
        if (turn.renderTimer !== null) {
          clearTimeout(turn.renderTimer);
          turn.renderTimer = null;
        }
        layout(turn);
        renderHead(turn);
        renderFoot(turn);
        if (current === turn) current = null;
        break;
      default:
        return;
    }
    showBusy();
  }

  function connect() {
    const es = new EventSource("/api/v1" + loopPath("/events", { last_event_id: String(lastEventId) }));
    source = es;
    const receive = (name) => (event) => {
      if (event.lastEventId) {
        const id = Number(event.lastEventId);
        if (id <= lastEventId) return;
        lastEventId = id;
      }
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      onEvent(name, data);
    };
    for (const name of NAMES) es.addEventListener(name, receive(name));
    const turnError = receive("error");
    // "error" is both the stream's own failure and the loop's `error` event.
    es.addEventListener("error", (event) => {
      if (typeof event.data === "string") {
        turnError(event);
        return;
      }
      if (es.readyState === EventSource.CLOSED) {
        setLive("disconnected", "off");
        if (source === es) setTimeout(connect, 3000);
      } else {
        setLive("reconnecting…", "off");
      }
    });
    es.addEventListener("open", () => setLive("live", "on"));
  }

  function setLive(text, state) {
    liveEl.textContent = text;
    liveEl.className = `badge live-${state}`;
  }

  function showBusy() {
    if (!stopButton) return;
    stopButton.hidden = !order.some((id) => LIVE.has(turns.get(id).ended));
  }

  // ---- the owner's controls ----------------------------------------------------------

  function controls() {
    if (readonly || !composer) return;
    const textarea = composer.querySelector("textarea");
    const send = document.getElementById("send");
    composer.addEventListener("submit", async (event) => {
      event.preventDefault();
      const content = textarea.value;
      if (!content.trim()) return;
      send.disabled = true;
      LB.show(errorEl, "");
      const abort = new AbortController();
      try {
        const response = await fetch(`/api/v1/loops/${encodeURIComponent(loopId)}/messages`, {
          method: "POST",
          credentials: "same-origin",
          headers: {
            "Content-Type": "application/json",
            Accept: "text/event-stream",
            "Idempotency-Key": LB.randomKey(),
          },
          body: JSON.stringify({ content }),
          signal: abort.signal,
        });
        if (!response.ok) throw new LB.ApiError(response.status, await response.json().catch(() => null));
        const turnId = response.headers.get("X-Turn-Id");
        // The turn runs whether or not this stream is read: the page follows it by events.
        abort.abort();
        textarea.value = "";
        if (turnId) {
          const turn = ensureTurn(turnId);
          turn.known = true;
          turn.userText = content;
          renderHead(turn);
          showBusy();
        }
      } catch (e) {
        if (e.name !== "AbortError") LB.show(errorEl, e.message);
      } finally {
        send.disabled = false;
      }
    });
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) composer.requestSubmit();
    });
    stopButton.addEventListener("click", async () => {
      stopButton.disabled = true;
      try {
        await LB.json("POST", loopPath("/interrupt"));
      } catch (e) {
        LB.show(errorEl, e.message);
      } finally {
        stopButton.disabled = false;
      }
    });
  }

  // ---- formatting --------------------------------------------------------------------

  function formatBytes(size) {
    if (size < 1024) return `${size} B`;
    if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KB`;
    return `${(size / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatUsage(usage) {
    const parts = [];
    if (usage.input_tokens !== undefined) parts.push(`${usage.input_tokens.toLocaleString()} in`);
    if (usage.output_tokens !== undefined) parts.push(`${usage.output_tokens.toLocaleString()} out`);
    if (usage.cache_read_input_tokens) parts.push(`${usage.cache_read_input_tokens.toLocaleString()} cached`);
    if (usage.cost_usd !== undefined && usage.cost_usd !== null) parts.push(`$${Number(usage.cost_usd).toFixed(4)}`);
    if (usage.duration_ms) parts.push(`${(usage.duration_ms / 1000).toFixed(1)} s`);
    return parts.join(" · ");
  }

  // ---- start -------------------------------------------------------------------------

  async function start() {
    controls();
    try {
      await loadHistory();
    } catch (e) {
      LB.show(errorEl, e.message);
      setLive("not connected", "off");
      return;
    }
    showBusy();
    connect();
  }

  start();
})();
