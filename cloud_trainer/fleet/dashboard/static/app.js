// The fleet dashboard: a snapshot, then live updates, both over one Server-Sent Events stream.
// Plain JS, no framework and nothing from a CDN; the server is cloud_trainer/fleet/dashboard/server.py.
"use strict";

const FAILED = new Set(["rejected", "rolled-back"]);
const state = {
  rows: new Map(), // device -> row, as DeviceRow.to_json() gives it
  selected: null,
  token: null,
  writable: false,
  filter: "",
  rendered: false,
  detailBusy: false,
  detailAgain: false,
};

const $ = (id) => document.getElementById(id);
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (v) => (v === null || v === undefined ? "" : String(v).replace(/[&<>"']/g, (c) => ESC[c]));
const time = (v) => (v ? String(v).replace("T", " ").slice(0, 19) : "");
const shortTime = (v) => time(v).slice(5); // the table's: month-day and time
const fixed = (v, digits) => (v === null || v === undefined ? "" : Number(v).toFixed(digits));
const version = (v) => (v === null || v === undefined ? "" : `v${v}`);

// -- the devices table ------------------------------------------------------------------------------
function onlineCell(online) {
  if (online === true) return '<span class="on">online</span>';
  if (online === false) return '<span class="off">offline</span>';
  return "?";
}

function updateCell(r) {
  if (!r.update_state) return "";
  let text = r.update_state;
  if (r.update_version !== null) text += ` v${r.update_version}`;
  if (r.update_state === "downloading" && r.progress !== null) text += ` ${Math.round(r.progress * 100)}%`;
  return esc(text);
}

function rowHtml(r) {
  const classes = [];
  if (r.online === false) classes.push("offline");
  if (FAILED.has(r.update_state) || r.problem) classes.push("failed");
  if (r.device === state.selected) classes.push("selected");
  const error = r.problem || r.last_error;
  const rate = r.error_rate === null ? "" : `${(r.error_rate * 100).toFixed(1)}%`;
  return (
    `<tr class="${classes.join(" ")}" data-device="${esc(r.device)}" data-online="${esc(r.online)}" ` +
    `data-version="${esc(r.active_version)}" data-update="${esc(r.update_state)}">` +
    `<td>${esc(r.device)}</td><td>${onlineCell(r.online)}</td><td>${esc(shortTime(r.since))}</td>` +
    `<td>${esc(r.group)}</td><td>${esc(version(r.active_version))}</td><td>${esc(version(r.previous_version))}</td>` +
    `<td>${updateCell(r)}</td><td class="err">${esc(error)}</td>` +
    `<td class="num">${fixed(r.requests_per_s, 1)}</td><td class="num">${fixed(r.p50_ms, 1)}</td>` +
    `<td class="num">${fixed(r.p99_ms, 1)}</td><td class="num">${rate}</td><td class="num">${esc(r.outbox)}</td>` +
    `<td>${esc(r.agent_version)}</td><td>${esc(shortTime(r.last_seen))}</td></tr>`
  );
}

function shown(r) {
  if (!state.filter) return true;
  const text = [r.device, r.group, version(r.active_version), r.update_state, r.online ? "online" : "offline"];
  return text.join(" ").toLowerCase().includes(state.filter);
}

function renderTable() {
  const devices = [...state.rows.keys()].sort();
  const html = [];
  for (const d of devices) {
    const r = state.rows.get(d);
    if (shown(r)) html.push(rowHtml(r));
  }
  $("device-rows").innerHTML = html.join("");
}

function rowElement(device) {
  return $("device-rows").querySelector(`tr[data-device="${CSS.escape(device)}"]`);
}

// -- summary, rollouts, errors --------------------------------------------------------------------------
function renderSummary(s) {
  const versions = Object.entries(s.versions).map(([v, n]) => `${v}: ${n}`).join(", ");
  const updates = Object.entries(s.update_states).map(([u, n]) => `${u}: ${n}`).join(", ");
  $("summary").textContent =
    `${s.devices} devices · ${s.online} online · ${s.offline} offline` +
    (versions ? ` · versions ${versions}` : "") + (updates ? ` · updates ${updates}` : "");
}

function releaseHtml(r) {
  const names = r.failed_devices.length ? `: ${esc(r.failed_devices.join(", "))}` : "";
  const failed = r.failed ? `<span class="bad">${r.failed} failed${names}</span>` : "0 failed";
  const offline = r.offline ? ` (${r.offline} offline)` : "";
  const buttons = [];
  if (state.writable && r.version !== null) {
    if (r.canary_percent !== null) buttons.push(["promote", "Promote to 100%"]);
    buttons.push(["pause", "Pause"], ["withdraw", "Withdraw"]);
  }
  const html = buttons
    .map(([a, label]) => `<button type="button" data-action="${a}" data-topic="${esc(r.topic)}">${label}</button>`)
    .join("");
  return (
    `<div class="release" data-topic="${esc(r.topic)}"><div><strong>${esc(r.describe)}</strong>` +
    `<div class="counts dim">${esc(r.topic)}</div></div>` +
    `<div><progress max="${Math.max(r.targeted, 1)}" value="${r.active}"></progress>` +
    `<div class="counts">${r.active} active, ${r.pending} pending${offline}, ${failed} of ${r.targeted} targeted</div></div>` +
    `<div>${html}</div></div>`
  );
}

function renderReleases(releases, problem) {
  if (problem) {
    $("releases").innerHTML = `<p class="dim">${esc(problem)}</p>`;
  } else if (!releases.length) {
    $("releases").innerHTML = '<p class="dim">no releases on this fleet</p>';
  } else {
    $("releases").innerHTML = releases.map(releaseHtml).join("");
  }
}

function renderErrors(errors) {
  $("error-rows").innerHTML = errors.length
    ? errors
        .map((e) => `<tr><td>${esc(time(e.at))}</td><td>${esc(e.device)}</td><td>${esc(e.kind)}</td><td class="err">${esc(e.message)}</td></tr>`)
        .join("")
    : '<tr><td colspan="4" class="dim">none</td></tr>';
}

function renderOverview(data) {
  renderSummary(data.summary);
  renderReleases(data.releases, data.releases_problem);
  renderErrors(data.errors);
}

// -- per-device detail and its charts -------------------------------------------------------------------
function chart(series, points) {
  const W = 360, H = 140, L = 34, R = 6, T = 14, B = 16;
  if (points.length < 2) return '<p class="dim">waiting for telemetry…</p>';
  const t = points.map((p) => Date.parse(p.at));
  const t0 = Math.min(...t), t1 = Math.max(...t);
  let max = 0;
  for (const s of series) for (const p of points) if (p[s.key] !== null) max = Math.max(max, p[s.key]);
  max = max > 0 ? max * 1.1 : 1;
  const x = (v) => L + ((v - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const lines = series.map((s) => {
    const pts = points
      .map((p, i) => (p[s.key] === null ? null : `${x(t[i]).toFixed(1)},${y(p[s.key]).toFixed(1)}`))
      .filter((p) => p !== null)
      .join(" ");
    return `<polyline class="${s.cls}" points="${pts}"></polyline>`;
  });
  const legend = series
    .map((s, i) => `<text x="${L + 4 + i * 60}" y="10" class="legend-${s.cls}">${esc(s.label)}</text>`)
    .join("");
  const minutes = ((t1 - t0) / 60000).toFixed(1);
  return (
    `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img">` +
    `<line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"></line>` +
    `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>` +
    `<text x="2" y="${T + 8}">${max >= 100 ? max.toFixed(0) : max.toFixed(1)}</text><text x="2" y="${H - B}">0</text>` +
    `<text x="${L}" y="${H - 3}">${esc(time(points[0].at).slice(11))}</text>` +
    `<text x="${W - R - 110}" y="${H - 3}">${esc(time(points[points.length - 1].at).slice(11))} (${minutes} min)</text>` +
    legend + lines.join("") + "</svg>"
  );
}

function renderDetail(data) {
  const r = data.row;
  $("detail-name").textContent = r.device;
  $("detail-name").className = "";
  const facts = [
    ["online", r.online === null ? "?" : r.online ? "online" : "offline"], ["since", time(r.since)],
    ["group", r.group], ["model", r.model], ["active", version(r.active_version)],
    ["previous", version(r.previous_version)], ["update", r.update_state ? `${r.update_state} ${version(r.update_version)}` : ""],
    ["last error", r.problem || r.last_error], ["agent", r.agent_version], ["machine", r.machine],
    ["last seen", time(r.last_seen)], ["points", `${data.history.length}`],
  ];
  $("detail-facts").innerHTML = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v) || "–"}</dd>`).join("");
  $("chart-latency").innerHTML = chart(
    [{ key: "p50_ms", cls: "p50", label: "p50" }, { key: "p99_ms", cls: "p99", label: "p99" }], data.history);
  $("chart-throughput").innerHTML = chart([{ key: "requests_per_s", cls: "rps", label: "req/s" }], data.history);
}

async function loadDetail() {
  if (state.selected === null) return;
  if (state.detailBusy) {
    state.detailAgain = true;
    return;
  }
  state.detailBusy = true;
  try {
    const response = await fetch(`api/devices/${encodeURIComponent(state.selected)}`);
    if (response.ok) renderDetail(await response.json());
  } finally {
    state.detailBusy = false;
    if (state.detailAgain) {
      state.detailAgain = false;
      loadDetail();
    }
  }
}

function select(device) {
  const old = state.selected === null ? null : rowElement(state.selected);
  if (old) old.classList.remove("selected");
  state.selected = device;
  const row = rowElement(device);
  if (row) row.classList.add("selected");
  loadDetail();
}

// -- the stream ---------------------------------------------------------------------------------------
function applySnapshot(data) {
  $("fleet").textContent = data.fleet;
  document.title = `${data.fleet} · edgeloop fleet`;
  state.writable = data.writable;
  state.token = data.token;
  $("mode").textContent = data.writable ? "read-write" : "read-only";
  $("mode").className = data.writable ? "badge rw" : "badge";
  state.rows = new Map(data.rows.map((r) => [r.device, r]));
  renderTable();
  renderOverview(data);
  if (state.selected !== null) loadDetail();
  if (!state.rendered) {
    state.rendered = true;
    requestAnimationFrame(() => {
      performance.mark("first-render");
      document.body.dataset.firstRenderMs = performance.now().toFixed(0);
      document.body.dataset.firstRenderRows = String($("device-rows").rows.length);
    });
  }
}

function applyUpdate(data) {
  let structural = data.removed.length > 0;
  for (const d of data.removed) state.rows.delete(d);
  for (const r of data.rows) {
    const known = state.rows.has(r.device);
    state.rows.set(r.device, r);
    const tr = rowElement(r.device);
    if (!known || (!tr && shown(r))) structural = true;
    else if (tr && shown(r)) tr.outerHTML = rowHtml(r);
    else if (tr) tr.remove();
  }
  if (structural) renderTable();
  renderOverview(data);
  if (state.selected !== null && data.rows.some((r) => r.device === state.selected)) loadDetail();
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function setLive(on) {
  $("live").textContent = on ? "live" : "reconnecting…";
  $("live").className = on ? "badge on" : "badge off";
}

function connect() {
  const events = new EventSource("api/events");
  events.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  events.addEventListener("update", (e) => applyUpdate(JSON.parse(e.data)));
  events.onopen = () => setLive(true);
  events.onerror = () => setLive(false);
}

// -- actions (only a dashboard started with the signing key offers them) ----------------------------------
function notice(text, isError) {
  $("notice").textContent = text;
  $("notice").className = isError ? "notice error" : "notice";
  $("notice").hidden = false;
}

async function act(action, topic) {
  if (!window.confirm(`${action} the release on ${topic}?`)) return;
  const response = await fetch(`api/actions/${action}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Dashboard-Token": state.token || "" },
    body: JSON.stringify({ topic }),
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  notice(response.ok ? body.message : `${action} failed: ${body.error}`, !response.ok);
}

document.addEventListener("DOMContentLoaded", () => {
  $("device-rows").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-device]");
    if (tr) select(tr.dataset.device);
  });
  $("releases").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-action]");
    if (button) act(button.dataset.action, button.dataset.topic);
  });
  $("filter").addEventListener("input", (e) => {
    state.filter = e.target.value.trim().toLowerCase();
    renderTable();
  });
  connect();
});
