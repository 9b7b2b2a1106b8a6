// The intracom web console: plain JavaScript over the gateway's own API, no library.
// Every call carries the admin token the operator typed (kept in sessionStorage).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { token: sessionStorage.getItem("intracom-token") || "", tail: null, paused: false, refresh: null };
const MAX_ROWS = 500;

function setStatus(text, kind) {
  const status = $("#status");
  status.textContent = text;
  status.className = kind || "";
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((data && data.message) || response.status + " " + response.statusText);
  }
  return data;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  return td;
}

// A name as shown: itself when it is printable ASCII; else followed by the code points
// of its other characters, so that a look-alike (a Cyrillic і in "billіng") cannot pass
// for the name it imitates: "billіng [U+0456]".
function showName(name) {
  if (name === undefined || name === null) return "";
  const text = String(name);
  if (/^[\x20-\x7e]*$/.test(text)) return text;
  const points = new Set();
  for (const c of text) {
    if (c > "\x7e" || c < "\x20") points.add("U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0"));
  }
  return text + " [" + [...points].join(" ") + "]";
}

function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

// ---- Server-Sent Events over fetch (EventSource cannot send the Authorization header).
// `onOpen` runs once the gateway answered: the subscription is anchored then.
async function* events(url, signal, onOpen) {
  const response = await fetch(url, {
    headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
    signal,
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.message || response.status + " " + response.statusText);
  }
  if (onOpen) onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (event.data.length) yield { event: event.event, id: event.id, data: event.data.join("\n") };
        event = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "data") event.data.push(text);
      else if (field === "event") event.event = text;
      else if (field === "id") event.id = text;
    }
  }
}

// ---- Live tail
function tailUrl(lastId) {
  const params = new URLSearchParams({ monitor: "true" });
  const service = $("#f-service").value.trim();
  const type = $("#f-type").value;
  if (service) params.set("service", service);
  if (type) params.set("type", type);
  if (lastId) params.set("after", lastId);
  const action = $("#f-action").value.trim() || "*";
  return "/subscribe/" + encodeURIComponent(action) + "?" + params;
}

function addRow(row) {
  const body = $("#tail tbody");
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
}

function showMessage(m) {
  const row = document.createElement("tr");
  row.dataset.id = m.id;
  row.dataset.action = m.action;
  const to = m.serviceNameDest ? showName(m.serviceNameDest) + (m.instanceDest ? "/" + showName(m.instanceDest) : "") : "*";
  row.append(
    cell(m.at ? new Date(m.at).toLocaleTimeString() : ""),
    cell(showName(m.serviceNameSource) + "/" + showName(m.instanceSource)),
    cell(to),
    cell(m.state ? m.type + " · " + m.state : m.type),
    cell(showName(m.action)),
    cell(JSON.stringify(m.query), "query"),
    cell(m.id, "id"),
  );
  addRow(row);
}

function showNotice(text) {
  const row = document.createElement("tr");
  row.className = "notice";
  const td = cell(text);
  td.colSpan = 7;
  row.append(td);
  addRow(row);
}

async function followTail() {
  if (state.tail) state.tail.abort();
  const controller = new AbortController();
  state.tail = controller;
  let lastId = null;
  while (!controller.signal.aborted) {
    try {
      const opened = () => {
        $("#tail-state").textContent = "following";
        $("#tail").dataset.live = "true";
      };
      for await (const e of events(tailUrl(lastId), controller.signal, opened)) {
        if (e.event === "message") {
          lastId = e.id;
          if (!state.paused) showMessage(JSON.parse(e.data));
        } else if (e.event === "lost" || e.event === "lagged" || e.event === "error") {
          showNotice(e.event + ": " + JSON.parse(e.data).message);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      $("#tail-state").textContent = "reconnecting: " + error.message;
    }
    $("#tail").dataset.live = "false";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// ---- Stats
function countList(title, rows) {
  const div = document.createElement("div");
  const h = document.createElement("strong");
  h.textContent = title;
  const ul = document.createElement("ul");
  for (const r of rows.slice(0, 8)) {
    const li = document.createElement("li");
    li.textContent = showName(r.key) + ": " + r.count;
    ul.append(li);
  }
  div.append(h, ul);
  return div;
}

function fillTable(selector, rows) {
  const body = $(selector + " tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells.map((c) => (c instanceof Node ? c : cell(c))));
    return tr;
  }));
}

async function refreshStats() {
  const s = await api("GET", "/stats");
  $("#medium").textContent = s.medium;
  const l = s.latency;
  const ms = (v) => (v === null || v === undefined ? "–" : v + " ms");
  const summary = [
    ["messages retained", s.counts ? s.counts.total : "–"],
    ["pending work", s.counts ? s.counts.queueDepth : "–"],
    ["dead letters", s.counts ? s.counts.dead : "–"],
    ["outbox", s.outbox],
    ["medium", s.mediumError || "answering"],
    ["SSE clients", s.sseClients],
    ["delivered here", l.delivered],
    ["latency p50 / p90 / p99", ms(l.p50Ms) + " / " + ms(l.p90Ms) + " / " + ms(l.p99Ms)],
    ["latency max", ms(l.maxMs)],
  ];
  $("#summary").replaceChildren(...summary.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    return [dt, dd];
  }));
  drawCharts(s.series);
  fillTable("#queues", (s.queues || []).map((q) => [showName(q.id), q.depth, q.inFlight, q.dead]));
  fillTable("#lag", s.lag.map((x) => [showName(x.subscription), x.messages, x.seconds]));
  const counts = $("#counts");
  counts.replaceChildren();
  if (s.counts) {
    counts.append(
      countList("by service", s.counts.byService),
      countList("by action", s.counts.byAction),
      countList("by type", s.counts.byType),
      countList("by state", s.counts.byState),
    );
  }
}

// ---- Charts: the gateway's series (/stats `series`: a sample every 5 s, the last ten
// minutes), drawn as SVG here; no chart library.
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 360, height: 160, left: 40, right: 8, top: 10, bottom: 20 };
const SPAN_MS = 10 * 60 * 1000;

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

// The smallest of 1, 2, 5 × 10^n at or above `value` (1 when there is nothing).
function roundUp(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (m * power >= value * (1 - 1e-9)) return m * power;
  return 10 * power;
}

function figure(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (value >= 100 || Number.isInteger(value)) return String(Math.round(value));
  return value.toFixed(value >= 10 ? 1 : 2);
}

// Draws `lines` ({ name, points: [[at ms, value or null]] }) over the ten minutes that end
// at `end`; a null value leaves a gap. Each point is a circle carrying its value.
function drawChart(selector, legendSelector, lines, unit, end) {
  const chart = $(selector);
  const { width, height, left, right, top, bottom } = CHART;
  const start = end - SPAN_MS;
  const values = lines.flatMap((l) => l.points.map((p) => p[1])).filter((v) => Number.isFinite(v));
  const max = roundUp(Math.max(0, ...values));
  const x = (at) => left + ((at - start) / SPAN_MS) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    const at = y(max * f);
    parts.push(svg("line", { class: "grid", x1: left, x2: width - right, y1: at, y2: at }));
    parts.push(svg("text", { x: left - 6, y: at + 4, "text-anchor": "end" }, figure(max * f) + (f === 1 ? unit : "")));
  }
  for (const [label, at, anchor] of [["−10 min", start, "start"], ["−5 min", start + SPAN_MS / 2, "middle"], ["now", end, "end"]]) {
    parts.push(svg("text", { x: x(at), y: height - 6, "text-anchor": anchor }, label));
  }
  let drawn = 0;
  const legend = [];
  for (const [i, line] of lines.entries()) {
    let d = "";
    let pen = false;
    const dots = [];
    let last = null;
    for (const [at, value] of line.points) {
      if (!Number.isFinite(value) || at < start) {
        pen = false;
        continue;
      }
      d += (pen ? "L" : "M") + x(at).toFixed(1) + " " + y(value).toFixed(1) + " ";
      pen = true;
      dots.push(svg("circle", { class: "point s" + i, cx: x(at).toFixed(1), cy: y(value).toFixed(1), r: 2, "data-series": line.name, "data-value": value }));
      last = value;
    }
    drawn += dots.length;
    if (d) parts.push(svg("path", { class: "line s" + i, d: d.trim(), "data-series": line.name }));
    parts.push(...dots);
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch s" + i;
    item.append(swatch, line.name + ": " + figure(last) + (last === null ? "" : unit));
    legend.push(item);
  }
  if (!drawn) parts.push(svg("text", { class: "empty", x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data yet"));
  chart.replaceChildren(...parts);
  chart.dataset.points = String(drawn);
  $(legendSelector).replaceChildren(...legend);
}

function drawCharts(series) {
  if (!series || !series.length) return;
  const end = series[series.length - 1].at;
  // Rates need an interval: the first sample has none.
  const timed = series.filter((p) => p.intervalMs > 0);
  const rate = (key) => timed.map((p) => [p.at, (p[key] * 1000) / p.intervalMs]);
  drawChart("#chart-rate", "#legend-rate", [
    { name: "published", points: rate("published") },
    { name: "delivered", points: rate("delivered") },
  ], "/s", end);
  drawChart("#chart-depth", "#legend-depth", [
    { name: "queue depth", points: series.map((p) => [p.at, p.queueDepth]) },
    { name: "outbox", points: series.map((p) => [p.at, p.outbox]) },
  ], "", end);
  drawChart("#chart-latency", "#legend-latency", [
    { name: "p50", points: series.map((p) => [p.at, p.p50Ms]) },
    { name: "p99", points: series.map((p) => [p.at, p.p99Ms]) },
  ], " ms", end);
}

// ---- Dead letters
async function refreshDead() {
  const letters = await api("GET", "/dead?limit=200");
  fillTable("#dead", letters.map((d) => {
    const actions = document.createElement("td");
    actions.append(
      button("Show", "secondary show", () => showDead(d.id)),
      button("Retry", "retry", () => act("POST", "/retry/" + encodeURIComponent(d.id), "sent again")),
      button("Purge", "danger purge", () => {
        if (confirm("Purge dead letter " + d.id + "?")) act("DELETE", "/dead/" + encodeURIComponent(d.id), "purged");
      }),
    );
    const row = [cell(d.id, "id"), cell(d.at ? new Date(d.at).toLocaleString() : ""), cell(showName(d.action)), cell(d.reason), actions];
    return row;
  }));
  for (const [i, d] of letters.entries()) $("#dead tbody").rows[i].dataset.id = d.id;
}

async function showDead(id) {
  const d = await api("GET", "/dead/" + encodeURIComponent(id));
  const pre = $("#dead-detail");
  pre.textContent = JSON.stringify(d, null, 2);
  pre.hidden = false;
}

async function act(method, path, done) {
  try {
    const result = await api(method, path);
    setStatus(path + ": " + done + (result && result.id ? " as " + result.id : ""), "ok");
  } catch (error) {
    setStatus(path + ": " + error.message, "error");
  }
  await refreshAll();
}

// ---- Catalog
async function refreshCatalog() {
  const catalog = await api("GET", "/catalog");
  $("#catalog").replaceChildren(...catalog.map((entry) => {
    const li = document.createElement("li");
    li.textContent = showName(entry.service) + ": " + (entry.actions.map(showName).join(", ") || "(no actions)");
    return li;
  }));
}

async function refreshAll() {
  try {
    await Promise.all([refreshStats(), refreshDead(), refreshCatalog()]);
    if ($("#status").className !== "ok") setStatus("connected", "ok");
  } catch (error) {
    setStatus(error.message, "error");
  }
}

function connect() {
  if (!state.token) return;
  sessionStorage.setItem("intracom-token", state.token);
  refreshAll();
  followTail();
  clearInterval(state.refresh);
  state.refresh = setInterval(refreshAll, 3000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token").value = state.token;
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("#token").value.trim();
    connect();
  });
  $("#tail-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    followTail();
  });
  $("#tail-pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("#tail-pause").textContent = state.paused ? "Resume" : "Pause";
  });
  $("#tail-clear").addEventListener("click", () => $("#tail tbody").replaceChildren());
  $("#dead-purge-all").addEventListener("click", () => {
    if (confirm("Purge every dead letter?")) act("DELETE", "/dead", "all purged");
  });
  connect();
});
