// The dmoe playground: one page over the server's public API (no build step, no dependencies).
//
//   Ask        POST /v1/chat/completions (stream: true), once with method "base", once "dmoe"
//   Knowledge  POST /v1/knowledge -> poll GET /v1/jobs/ID; GET /v1/experts; DELETE /v1/experts/ID
//   Details    GET /v1/experts/ID (its indexed text); GET /health for the header
//
// Keys are sent as "Authorization: Bearer KEY", as any OpenAI client sends them.
"use strict";

const $ = (id) => document.getElementById(id);

// Tints for expert backgrounds (dark text stays above 7:1 on all) and a stronger edge of each.
const PALETTE = [
  ["#cfe2ff", "#0a58ca"], ["#ffe0bd", "#b35c00"], ["#cdeed9", "#19804a"],
  ["#f7d0e4", "#a8326e"], ["#e2d9ff", "#5b3cc4"], ["#fff0a6", "#8a6d00"],
  ["#c8eef0", "#0b7285"], ["#eadfcf", "#7a5a2f"],
];
const NO_EXPERT = "#8c959f";
const SHOWN_EXPERTS = 300; // the list shows this many (filter to find others)

const state = {
  keys: { api: "", admin: "" },
  defaults: {},
  colours: new Map(), // expert id -> palette entry, stable for the page's life
  texts: new Map(), // expert id -> GET /v1/experts/ID body
  experts: [],
  fresh: new Set(), // ids added by the last job, highlighted in the list
};

// -- the API -----------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(admin) {
  const key = admin ? state.keys.admin || state.keys.api : state.keys.api || state.keys.admin;
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function explain(status, message) {
  switch (status) {
    case 401: return `${message}. Enter the API key under Keys (top right).`;
    case 403: return `${message}. Adding and deleting knowledge needs the admin key: enter it under Keys.`;
    case 413: return `${message}. Split the document into smaller ones.`;
    case 429: case 503: return `${message}. The server is busy; try again in a moment.`;
    case 500: return `The server failed: ${message}`;
    default: return message;
  }
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiFailure(resp.status, explain(resp.status, message));
}

async function send(method, path, { body, admin = false } = {}) {
  try {
    return await fetch(path, {
      method, headers: headers(admin), body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiFailure(0, `Cannot reach the dmoe server (${e.message}). Is \`dmoe serve\` still running?`);
  }
}

async function api(method, path, options = {}) {
  const resp = await send(method, path, options);
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function showError(id, error) {
  const el = $(id);
  el.textContent = error ? String(error.message || error) : "";
  el.hidden = !error;
}

// -- keys and the header -----------------------------------------------------------------------

function loadKeys() {
  const saved = localStorage.getItem("dmoe.keys") || sessionStorage.getItem("dmoe.keys");
  if (saved) {
    try { Object.assign(state.keys, JSON.parse(saved)); } catch (_) { /* ignore a bad entry */ }
  }
  $("api-key").value = state.keys.api;
  $("admin-key").value = state.keys.admin;
  $("remember").checked = Boolean(localStorage.getItem("dmoe.keys"));
}

function saveKeys(event) {
  event.preventDefault();
  state.keys.api = $("api-key").value.trim();
  state.keys.admin = $("admin-key").value.trim();
  const json = JSON.stringify(state.keys);
  localStorage.removeItem("dmoe.keys");
  sessionStorage.setItem("dmoe.keys", json);
  if ($("remember").checked) localStorage.setItem("dmoe.keys", json);
  $("keys").open = false;
  refresh();
}

async function refresh() {
  try {
    const h = await api("GET", "/health");
    const status = h.status === "ok" ? "" : ` · ${h.status}`;
    $("server").textContent = `${h.model} · ${h.weights} weights · ${h.experts} experts${status}`;
    showError("kb-error", null);
    await listExperts();
  } catch (e) {
    $("server").textContent = "not connected";
    showError("kb-error", e);
    if (e.status === 401) $("keys").open = true;
  }
}

// -- asking ------------------------------------------------------------------------------------

function number(id, { integer = false } = {}) {
  const el = $(id);
  const label = document.querySelector(`label[for="${id}"]`).firstChild.textContent.trim();
  if (!el.checkValidity() || el.value === "") {
    throw new Error(`${label}: enter a number${el.min ? ` from ${el.min}` : ""}${el.max ? ` to ${el.max}` : ""}.`);
  }
  const value = Number(el.value);
  if (integer && !Number.isInteger(value)) throw new Error(`${label}: enter a whole number.`);
  return value;
}

async function ask(event) {
  event.preventDefault();
  showError("ask-error", null);
  const question = $("question").value.trim();
  let body;
  try {
    if (!question) throw new Error("Type a question first.");
    body = {
      messages: [{ role: "user", content: question }], stream: true,
      max_tokens: number("max-tokens", { integer: true }), tau: number("tau"),
      top_k: number("top-k", { integer: true }), min_relevance: number("gate"),
    };
  } catch (e) {
    showError("ask-error", e);
    return;
  }
  const mode = $("mode").value;
  const methods = mode === "both" ? ["base", "dmoe"] : [mode];
  $("answer-base").hidden = !methods.includes("base");
  $("answer-dmoe").hidden = !methods.includes("dmoe");
  document.querySelector(".answers").classList.toggle("single", methods.length === 1);
  $("ask-button").disabled = true;
  const runs = methods.map((method) => answer(method, { ...body, method }));
  const errors = (await Promise.allSettled(runs)).filter((r) => r.status === "rejected");
  showError("ask-error", errors.length ? errors[0].reason : null);
  $("ask-button").disabled = false;
}

async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
    if (done) return;
  }
}

async function answer(method, body) {
  const card = $(`answer-${method}`);
  const textEl = card.querySelector("[data-role=text]");
  const statsEl = card.querySelector("[data-role=stats]");
  card.dataset.state = "running";
  textEl.replaceChildren();
  textEl.classList.add("pending");
  statsEl.textContent = "";
  if (method === "dmoe") clearDmoe();
  const started = performance.now();
  let text = "";
  let firstToken = null;
  let attribution = null;
  let finish = null;
  try {
    const resp = await send("POST", "/v1/chat/completions", { body });
    if (!resp.ok) throw await failure(resp);
    for await (const chunk of events(resp)) {
      if (chunk.error) throw new ApiFailure(0, `The ${method} answer failed: ${chunk.error.message}`);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        if (firstToken === null) firstToken = performance.now() - started;
        text += choice.delta.content;
        textEl.textContent = text;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.attribution) attribution = chunk.attribution;
    }
  } catch (e) {
    card.dataset.state = "failed";
    statsEl.textContent = "failed";
    throw e;
  } finally {
    textEl.classList.remove("pending");
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const tokens = attribution ? attribution.tokens.length : 0;
  const parts = [plural(tokens, "token"), `${seconds} s`];
  if (firstToken !== null) parts.push(`first token ${Math.round(firstToken)} ms`);
  if (method === "dmoe" && attribution) parts.push(plural(attribution.triggers, "trigger"));
  if (finish === "length") parts.push("cut at max tokens");
  statsEl.textContent = parts.join(" · ");
  if (!text) textEl.textContent = "(empty answer)";
  if (method === "dmoe" && attribution) renderAttribution(textEl, attribution, body.tau);
  card.dataset.state = "done";
}

// -- the token view, the legend and the entropy strip --------------------------------------------

function colour(id) {
  if (!state.colours.has(id)) state.colours.set(id, PALETTE[state.colours.size % PALETTE.length]);
  return state.colours.get(id);
}

function titleOf(attribution, id) {
  const title = attribution.experts[id];
  return title === undefined || title === "" ? `${id} (deleted or untitled)` : title;
}

function clearDmoe() {
  $("legend").replaceChildren();
  $("strip").hidden = true;
  $("strip-plot").replaceChildren();
}

function hot(i, on) {
  document.querySelectorAll(`[data-i="${i}"]`).forEach((el) => el.classList.toggle("hot", on));
}

function renderAttribution(textEl, attribution, tau) {
  const { spans, tokens } = attribution;
  if (!tokens.length) return;
  textEl.replaceChildren();
  for (const span of spans) {
    const seg = document.createElement("span");
    seg.className = "seg";
    seg.dataset.experts = span.experts.join(" ");
    if (span.experts.length) {
      const [bg, edge] = colour(span.experts[0]);
      seg.style.background = bg;
      seg.style.boxShadow = `inset 0 -2px 0 ${edge}`;
      const names = span.experts.map((id) => titleOf(attribution, id)).join(", ");
      seg.title = `expert: ${names} (click for its passage)`;
      seg.tabIndex = 0;
      seg.setAttribute("role", "button");
      seg.setAttribute("aria-label", `${span.text.trim() || "tokens"}, from expert ${names}`);
      const open = () => showExperts(span.experts, attribution);
      seg.addEventListener("click", open);
      seg.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    } else {
      seg.title = "no expert active: the base model";
    }
    if (span.triggered) {
      const mark = document.createElement("span");
      mark.className = "trigger-mark";
      mark.setAttribute("role", "img"); // drawn by CSS, so copying the answer copies no marks
      mark.setAttribute("aria-label", "trigger");
      mark.title = `trigger: entropy ${tokens[span.start].entropy.toFixed(2)} > τ ${tau}, experts re-routed here`;
      mark.dataset.trigger = String(span.start);
      seg.append(mark);
    }
    for (let i = span.start; i < span.end; i++) {
      const tok = document.createElement("span");
      tok.className = "tok";
      tok.dataset.i = String(i);
      tok.textContent = tokens[i].text;
      tok.addEventListener("mouseenter", () => hot(i, true));
      tok.addEventListener("mouseleave", () => hot(i, false));
      seg.append(tok);
    }
    textEl.append(seg);
  }
  renderLegend(attribution);
  renderStrip(attribution, tau);
}

function renderLegend(attribution) {
  const seen = [...new Set(attribution.spans.flatMap((s) => s.experts))];
  const items = seen.map((id) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.expert = id;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(id)[0];
    button.append(swatch, titleOf(attribution, id));
    button.addEventListener("click", () => showExperts([id], attribution));
    li.append(button);
    return li;
  });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "No expert was active: every token came from the base model.";
    items.push(li);
  }
  $("legend").replaceChildren(...items);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function renderStrip(attribution, tau) {
  const { tokens, spans } = attribution;
  const W = 10, H = 84, TOP = 12;
  const top = Math.max(tau * 1.25, 0.5, ...tokens.map((t) => t.entropy));
  const y = (e) => H - (Math.min(e, top) / top) * (H - TOP);
  const plot = svg("svg", { viewBox: `0 0 ${tokens.length * W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `Entropy per token; τ = ${tau}; ${plural(attribution.triggers, "trigger")}` });
  const expertAt = [];
  const triggerAt = new Set();
  for (const s of spans) {
    for (let i = s.start; i < s.end; i++) expertAt[i] = s.experts[0];
    if (s.triggered) triggerAt.add(s.start);
  }
  tokens.forEach((t, i) => {
    const fill = expertAt[i] ? colour(expertAt[i])[1] : NO_EXPERT;
    const bar = svg("rect", { x: i * W + 1, y: y(t.entropy), width: W - 2, height: H - y(t.entropy), fill, class: "bar" });
    bar.dataset.i = String(i);
    const tip = svg("title", {});
    tip.textContent = `${JSON.stringify(t.text)} · entropy ${t.entropy.toFixed(2)}${triggerAt.has(i) ? " · trigger" : ""}`;
    bar.append(tip);
    bar.addEventListener("mouseenter", () => hot(i, true));
    bar.addEventListener("mouseleave", () => hot(i, false));
    plot.append(bar);
    if (triggerAt.has(i)) {
      const x = i * W + W / 2;
      plot.append(svg("polygon", { points: `${x - 4},9 ${x + 4},9 ${x},1`, class: "trigger" }));
    }
  });
  plot.append(svg("line", { x1: 0, x2: tokens.length * W, y1: y(tau), y2: y(tau), class: "tau", "vector-effect": "non-scaling-stroke" }));
  $("strip-plot").replaceChildren(plot);
  $("strip").querySelector("figcaption").textContent =
    `Entropy of each token's distribution (bars, coloured by the active expert); dashed line: τ = ${tau}; ▲ a trigger.`;
  $("strip").hidden = false;
}

async function showExperts(ids, attribution) {
  const id = ids[0];
  $("detail").hidden = false;
  $("detail-title").textContent = attribution ? titleOf(attribution, id) : id;
  $("detail-id").textContent = ids.length > 1 ? `${id} (and ${ids.slice(1).join(", ")})` : id;
  $("detail-text").textContent = "loading…";
  try {
    if (!state.texts.has(id)) state.texts.set(id, await api("GET", `/v1/experts/${encodeURIComponent(id)}`));
    const expert = state.texts.get(id);
    $("detail-title").textContent = expert.title || id;
    $("detail-text").textContent = expert.text;
  } catch (e) {
    $("detail-text").textContent = e.status === 404 ? "This expert has been deleted since." : e.message;
  }
}

// -- knowledge ---------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function addDocument(event) {
  event.preventDefault();
  showError("kb-error", null);
  const text = $("doc-text").value;
  if (!text.trim()) {
    showError("kb-error", "Paste the document's text first.");
    return;
  }
  $("doc-button").disabled = true;
  try {
    let job = await api("POST", "/v1/knowledge", { admin: true, body: { documents: [{ title: $("doc-title").value.trim(), text }] } });
    $("job").hidden = false;
    while (job.status === "queued" || job.status === "running") {
      showJob(job);
      await sleep(400);
      job = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}`, { admin: true });
    }
    showJob(job);
    if (job.status === "failed") throw new Error(`The build failed: ${job.error || "no reason given"}`);
    state.fresh = new Set(job.expert_ids);
    $("doc-text").value = "";
    $("doc-title").value = "";
    await refresh();
  } catch (e) {
    showError("kb-error", e);
  } finally {
    $("doc-button").disabled = false;
  }
}

function showJob(job) {
  const bar = $("job-progress");
  bar.max = Math.max(job.total, 1);
  bar.value = job.status === "succeeded" ? bar.max : job.done;
  const box = $("job");
  box.dataset.status = job.status;
  if (job.status === "succeeded") {
    const secs = job.finished && job.started ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
    $("job-text").textContent = `done: ${plural(job.expert_ids.length, "expert")} trained${secs}`;
  } else if (job.status === "failed") {
    $("job-text").textContent = "failed";
  } else {
    $("job-text").textContent = job.status === "queued" ? "queued" : `${job.stage} ${job.done}/${job.total}`;
  }
}

async function listExperts() {
  const { data } = await api("GET", "/v1/experts");
  state.experts = data.sort((a, b) => (a.created < b.created ? 1 : a.created > b.created ? -1 : 0));
  renderExperts();
}

function renderExperts() {
  const query = $("filter").value.trim().toLowerCase();
  const shown = state.experts.filter((e) => !query || e.title.toLowerCase().includes(query) || e.id.toLowerCase().includes(query));
  $("experts-count").textContent = `(${state.experts.length})`;
  const items = shown.slice(0, SHOWN_EXPERTS).map((e) => {
    const li = document.createElement("li");
    li.dataset.expert = e.id;
    if (state.fresh.has(e.id)) li.classList.add("new");
    const title = document.createElement("button");
    title.type = "button";
    title.className = "quiet title";
    title.textContent = e.title || "(untitled)";
    title.title = "show its passage";
    title.addEventListener("click", () => showExperts([e.id], null));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "danger";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete expert ${e.title || e.id}`);
    del.addEventListener("click", () => deleteExpert(e, del));
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${e.id} · ${(e.bytes / 1024).toFixed(0)} KiB ${e.dtype} · ${e.created.replace("T", " ").slice(0, 19)}`;
    li.append(title, del, meta);
    return li;
  });
  if (shown.length > SHOWN_EXPERTS) {
    const li = document.createElement("li");
    li.className = "more";
    li.textContent = `${shown.length - SHOWN_EXPERTS} more; filter to find them`;
    items.push(li);
  } else if (!state.experts.length) {
    const li = document.createElement("li");
    li.className = "more";
    li.textContent = "The bank is empty: add a document above.";
    items.push(li);
  }
  $("experts").replaceChildren(...items);
}

async function deleteExpert(expert, button) {
  if (!button.classList.contains("armed")) { // the first press arms the button, the second deletes
    button.classList.add("armed");
    button.textContent = "Confirm delete";
    setTimeout(() => { button.classList.remove("armed"); button.textContent = "Delete"; }, 5000);
    return;
  }
  button.disabled = true;
  try {
    await api("DELETE", `/v1/experts/${encodeURIComponent(expert.id)}`, { admin: true });
    state.texts.delete(expert.id);
    showError("kb-error", null);
    await refresh();
  } catch (e) {
    showError("kb-error", e);
    button.disabled = false;
  }
}

// -- start -------------------------------------------------------------------------------------

async function start() {
  loadKeys();
  $("keys-form").addEventListener("submit", saveKeys);
  $("ask-form").addEventListener("submit", ask);
  $("doc-form").addEventListener("submit", addDocument);
  $("filter").addEventListener("input", renderExperts);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
  });
  try {
    const config = await api("GET", "/playground/config.json");
    $("tau").value = config.tau;
    $("top-k").value = config.top_k;
    $("gate").value = config.min_relevance;
    $("max-tokens").value = config.max_tokens;
    $("max-tokens").max = config.max_tokens_limit;
  } catch (e) {
    showError("ask-error", e);
  }
  await refresh();
}

start();
