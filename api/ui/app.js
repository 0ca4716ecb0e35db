// The retrain dashboard: a page of the API's own REST calls and its event stream, no build step.
// Every value from the API is put in the page as text (h() below), never as HTML.
"use strict";

const view = document.getElementById("view");
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
let leave = () => {};  // what the current page must stop (its timers, its event stream)

// ---- helpers ---------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

// The API key: asked for once per browser session, kept in sessionStorage, sent as a Bearer header.
const KEY = "retrain-key";
const apiKey = () => sessionStorage.getItem(KEY);
const withKey = (options = {}) => ({ ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` } });

class SignInNeeded extends Error {}

function signIn(message) {
  const input = h("input", { type: "password", "aria-label": "API key", size: 60, autocomplete: "off" });
  const go = () => { sessionStorage.setItem(KEY, input.value.trim()); route(); };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  show(h("h1", {}, "Sign in"), message ? h("p", { class: "error", role: "alert" }, message) : null,
    h("p", { class: "muted" }, "Paste an API key (an operator makes one with python -m api.admin create-key; the local stack's is in .run/admin.key)."),
    h("div", { class: "toolbar" }, input, h("button", { class: "primary", onclick: go }, "Sign in")));
  input.focus();
}

async function api(path, options = {}) {
  if (!apiKey()) throw new SignInNeeded("");
  const response = await fetch(path, withKey(options));
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    throw new SignInNeeded("That key was refused (unknown, revoked or expired).");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const detail = (await response.json()).detail;
      if (detail && detail.error) message = [detail.file, detail.row && `row ${detail.row}`, detail.field, detail.error].filter(Boolean).join(": ");
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v === null || v === undefined ? "" : String(v));
const stateBadge = (state) => h("span", { class: `state ${state}`, "data-state": state }, state);
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "");
const scalars = (metrics) => Object.entries(metrics || {}).filter(([, v]) => typeof v === "number");

function show(...children) {
  view.replaceChildren(...children);
}

function fail(err) {
  if (err instanceof SignInNeeded) return signIn(err.message);
  show(h("p", { class: "error", role: "alert" }, String(err.message || err)));
}

// GET /v1/jobs/{id}/events read with fetch (EventSource cannot send the key): calls onEvent for
// each event; resumes with Last-Event-ID if the connection drops; stop() ends it.
function follow(jobId, onEvent) {
  const control = new AbortController();
  let lastId = null, stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const headers = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await fetch(`/v1/jobs/${jobId}/events`, withKey({ headers, signal: control.signal }));
        if (!response.ok) return;
        const reader = response.body.getReader(), decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;  // the server closes after the final event
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            const id = block.split("\n").find((l) => l.startsWith("id: "));
            if (id) lastId = id.slice(4);
            if (data) onEvent(JSON.parse(data));
          }
        }
      } catch (err) {
        if (stopped) return;
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
  })();
  return () => { stopped = true; control.abort(); };
}

// ---- jobs ------------------------------------------------------------------------------------

async function jobsPage(params) {
  const state = params.get("state") || "";
  const filter = h("select", { "aria-label": "state", onchange: (e) => { location.hash = e.target.value ? `#/jobs?state=${e.target.value}` : "#/jobs"; } },
    h("option", { value: "" }, "all states"), ...STATES.map((st) => h("option", { value: st, selected: st === state }, st)));
  const body = h("tbody");
  const table = h("table", { id: "jobs" },
    h("thead", {}, h("tr", {}, ...["Job", "State", "Task", "Model", "Version", "Progress", "Created"].map((c) => h("th", {}, c)))), body);
  show(h("h1", {}, "Jobs"), h("div", { class: "toolbar" }, filter, h("span", { class: "muted" }, "newest first")), table);
  async function refresh() {
    const page = await api(`/v1/jobs?limit=100${state ? `&state=${state}` : ""}`);
    body.replaceChildren(...page.items.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { class: "id", href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, stateBadge(job.state)), h("td", {}, job.task), h("td", {}, job.model_name),
      h("td", { class: "num" }, fmt(job.model_version)),
      h("td", {}, job.progress.epoch !== null ? `epoch ${job.progress.epoch}${job.progress.epochs ? "/" + job.progress.epochs : ""}` : ""),
      h("td", {}, when(job.created_at)))));
    if (!page.items.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "no jobs")));
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  leave = () => clearInterval(timer);
}

// A line chart of one metric over epochs, drawn as SVG.
function chart(name, points) {
  const width = 360, height = 170, pad = 34;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const Y = (y) => height - pad + 8 - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${name} by epoch` },
    s("line", { x1: pad, y1: height - pad + 8, x2: width - pad, y2: height - pad + 8, stroke: "#d0d5dd" }),
    s("polyline", { fill: "none", stroke: "#2f6fde", "stroke-width": 2, points: points.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ") }),
    ...points.map(([x, y]) => s("circle", { cx: X(x), cy: Y(y), r: 2.5, fill: "#2f6fde" })),
    s("text", { x: pad, y: 14, "font-size": 11, fill: "#667085" }, `${fmt(y1)}`),
    s("text", { x: pad, y: height - 4, "font-size": 11, fill: "#667085" }, `epoch ${x0}`),
    s("text", { x: width - pad, y: height - 4, "font-size": 11, fill: "#667085", "text-anchor": "end" }, `epoch ${x1}`));
  return h("div", { class: "card chart", "data-metric": name }, h("div", { class: "label" }, `${name}: ${fmt(ys[ys.length - 1])}`), svg);
}

function confusion(metrics) {
  const labels = metrics && metrics.labels, matrix = metrics && metrics.confusion_matrix;
  if (!Array.isArray(labels) || !Array.isArray(matrix)) return h("p", { class: "muted" }, "no confusion matrix");
  const max = Math.max(1, ...matrix.flat());
  return h("table", { class: "confusion" },
    h("thead", {}, h("tr", {}, h("th", {}, "true \\ predicted"), ...labels.map((l) => h("th", {}, l)))),
    h("tbody", {}, ...matrix.map((row, i) => h("tr", {}, h("th", {}, labels[i]),
      ...row.map((n, j) => h("td", { class: "num", style: `background: rgba(${i === j ? "47,111,222" : "217,45,32"}, ${(0.75 * n) / max})` }, n))))));
}

function metricsTable(metrics) {
  const rows = scalars(metrics);
  if (!rows.length) return h("p", { class: "muted" }, "no metrics yet");
  return h("table", { class: "metrics" }, h("tbody", {}, ...rows.map(([k, v]) => h("tr", { "data-metric": k }, h("th", {}, k), h("td", { class: "num" }, fmt(v))))));
}

async function jobPage(jobId) {
  const title = h("h1", {}, "Job ", h("span", { class: "id" }, jobId), " ");
  const summary = h("div", { class: "cards" });
  const curves = h("div", { class: "cards", id: "curves" });
  const results = h("div", { id: "results" });
  const log = h("pre", { class: "log", id: "log" }, "(the trainer's log is shown here when the job ends)");
  show(title, summary, h("h2", {}, "Training curves"), curves, results, h("h2", {}, "Log"), log);
  const history = {};  // metric -> [[epoch, value]]

  async function render(job) {
    title.replaceChildren("Job ", h("span", { class: "id" }, job.id), " ", stateBadge(job.state));
    const actions = FINAL.has(job.state) ? [] : [h("button", { onclick: () => api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }).then(load, fail) }, "Cancel")];
    summary.replaceChildren(
      h("div", { class: "card" }, h("div", { class: "muted" }, "model"),
        job.model_version ? h("a", { href: `#/models/${job.model_name}` }, `${job.model_name} v${job.model_version}`) : job.model_name),
      h("div", { class: "card" }, h("div", { class: "muted" }, "task"), job.task),
      h("div", { class: "card", id: "progress" }, h("div", { class: "muted" }, "progress"),
        job.progress.epoch !== null ? `epoch ${job.progress.epoch}${job.progress.epochs ? " of " + job.progress.epochs : ""}` : job.state),
      h("div", { class: "card" }, h("div", { class: "muted" }, "worker, attempts"), `${job.worker || "-"}, ${job.attempts}`),
      ...(job.error ? [h("div", { class: "card error", id: "job-error" }, job.error)] : []), ...actions);
    if (FINAL.has(job.state)) {
      const parts = [h("h2", {}, "Metrics"), metricsTable(job.metrics)];
      if (job.model_version) {
        try {
          const full = await api(`/v1/models/${job.model_name}/versions/${job.model_version}/files/metrics.json`);
          parts.push(h("h2", {}, "Confusion matrix"), confusion(full));
        } catch (_) { /* a model without metrics.json */ }
      }
      results.replaceChildren(...parts);
      log.textContent = await api(`/v1/jobs/${job.id}/logs`).catch((e) => `(no log: ${e.message})`);
    }
  }

  function drawCurves() {
    curves.replaceChildren(...Object.entries(history).filter(([, pts]) => pts.length).map(([name, pts]) => chart(name, pts)));
  }

  async function load() {
    const job = await api(`/v1/jobs/${jobId}`);
    await render(job);
    return job;
  }

  await load();
  // Live: the job's events (past ones first); each progress event extends the curves.
  const stop = follow(jobId, (event) => {
    if (event.type === "progress" && event.epoch !== undefined) {
      for (const [name, value] of Object.entries(event.metrics || {})) {
        if (typeof value !== "number") continue;
        const pts = (history[name] = history[name] || []);
        const last = pts[pts.length - 1];
        if (last && last[0] === event.epoch) last[1] = value; else pts.push([event.epoch, value]);
      }
      drawCurves();
      const progress = document.getElementById("progress");
      if (progress) progress.lastChild.textContent = `epoch ${event.epoch}${event.epochs ? " of " + event.epochs : ""}`;
    }
    if (event.type === "started" || FINAL.has(event.type)) load().catch(fail);
  });
  leave = stop;
}

// ---- models ----------------------------------------------------------------------------------

async function modelsPage() {
  const models = await api("/v1/models");
  show(h("h1", {}, "Models"), h("table", { id: "models" },
    h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", {}, "Versions"), h("th", {}, "Aliases"))),
    h("tbody", {}, ...models.map((m) => h("tr", { "data-model": m.name },
      h("td", {}, h("a", { href: `#/models/${m.name}` }, m.name)), h("td", { class: "num" }, m.versions),
      h("td", {}, Object.entries(m.aliases).map(([a, v]) => `${a} → v${v}`).join(", ")))))));
}

const KEY_METRICS = ["accuracy", "macro_f1", "wer", "cer", "test_size"];

// A job's spec.promote decision (its lineage): both held-out scores, and whether it took the alias.
function promotionText(p) {
  if (!p) return "";
  const scores = p.champion_score !== null && p.champion_score !== undefined
    ? `${p.metric} ${fmt(p.challenger_score)} vs v${p.champion_version} ${fmt(p.champion_score)}`
    : p.challenger_score !== null && p.challenger_score !== undefined ? `${p.metric} ${fmt(p.challenger_score)}` : "";
  return `${p.promoted ? "took" : "did not take"} ${p.alias}${scores ? ": " + scores : ""} (${p.reason})`;
}

async function modelPage(name) {
  const [versions, models] = await Promise.all([api(`/v1/models/${name}/versions`), api("/v1/models")]);
  const model = models.find((m) => m.name === name) || { aliases: {} };
  const picked = new Set();
  const compare = h("button", { class: "primary", disabled: true, onclick: () => {
    const [a, b] = [...picked].sort((x, y) => x - y);
    location.hash = `#/models/${name}/compare/${a}/${b}`;
  } }, "Compare the two selected");
  const rows = versions.slice().reverse().map((v) => h("tr", { "data-version": v.version },
    h("td", {}, h("input", { type: "checkbox", "aria-label": `select version ${v.version}`, onchange: (e) => {
      if (e.target.checked) picked.add(v.version); else picked.delete(v.version);
      compare.disabled = picked.size !== 2;
    } })),
    h("td", { class: "num" }, `v${v.version}`),
    h("td", {}, Object.entries(model.aliases).filter(([, n]) => n === v.version).map(([a]) => a).join(", ")),
    h("td", {}, when(v.created_at)),
    h("td", {}, h("a", { class: "id", href: `#/jobs/${v.job_id}` }, v.job_id)),
    h("td", {}, v.base_version ? `v${v.base_version}` : v.base_model ? "uploaded model" : "from scratch"),
    ...KEY_METRICS.map((k) => h("td", { class: "num" }, fmt((v.metrics || {})[k]))),
    h("td", { class: "promotion" }, promotionText(v.promotion))));
  const aliasName = h("input", { value: "production", "aria-label": "alias", size: 12 });
  const aliasVersion = h("select", { "aria-label": "version to promote" }, ...versions.slice().reverse().map((v) => h("option", { value: v.version }, `v${v.version}`)));
  const note = h("span", { class: "muted", id: "promote-result" });
  const promote = h("button", { class: "primary", onclick: async () => {
    try {
      const updated = await api(`/v1/models/${name}/aliases/${encodeURIComponent(aliasName.value)}`, {
        method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify({ version: Number(aliasVersion.value) }) });
      note.textContent = `${aliasName.value} → v${updated.aliases[aliasName.value]}`;
      await modelPage(name);
      document.getElementById("promote-result").textContent = `${aliasName.value} → v${updated.aliases[aliasName.value]}`;
    } catch (err) { note.textContent = String(err.message); note.className = "error"; }
  } }, "Promote");
  show(h("h1", {}, `Model ${name}`),
    h("h2", {}, "Aliases"),
    h("p", { id: "aliases" }, Object.entries(model.aliases).map(([a, v]) => `${a} → v${v}`).join(", ") || "none"),
    h("div", { class: "toolbar" }, "Point", aliasName, "at", aliasVersion, promote, note),
    h("h2", {}, "Versions and lineage"),
    h("div", { class: "toolbar" }, compare),
    h("table", { id: "versions" }, h("thead", {}, h("tr", {}, ...["", "Version", "Aliases", "Created", "Job", "Trained from", ...KEY_METRICS, "Champion / challenger"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...rows)));
}

async function comparePage(name, a, b) {
  const [va, vb] = await Promise.all([a, b].map((v) => api(`/v1/models/${name}/versions/${v}`)));
  const files = await Promise.all([va, vb].map((v) => (v.files || []).includes("metrics.json")
    ? api(`/v1/models/${name}/versions/${v.version}/files/metrics.json`).catch(() => v.metrics) : v.metrics));
  const lowerIsBetter = (k) => /loss|wer|cer|error|seconds|diff/.test(k);
  const keys = [...new Set([...scalars(files[0]), ...scalars(files[1])].map(([k]) => k))].sort();
  const rows = keys.map((k) => {
    const [x, y] = [files[0][k], files[1][k]];
    let cls = "";
    if (typeof x === "number" && typeof y === "number" && x !== y && !/size|epoch|num_/.test(k)) cls = (y > x) !== lowerIsBetter(k) ? "better" : "worse";
    return h("tr", { "data-metric": k }, h("th", {}, k), h("td", { class: "num" }, fmt(x)), h("td", { class: `num ${cls}` }, fmt(y)));
  });
  show(h("h1", {}, `${name}: v${va.version} and v${vb.version}`),
    h("p", { class: "muted" }, `v${vb.version}'s cells are green where it is better than v${va.version}, red where worse.`),
    h("table", { id: "comparison" }, h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, `v${va.version}`), h("th", {}, `v${vb.version}`))), h("tbody", {}, ...rows)),
    h("h2", {}, "Confusion matrices"),
    h("div", { class: "side-by-side" }, ...[va, vb].map((v, i) => h("div", {}, h("h2", {}, `v${v.version}`), confusion(files[i])))));
}

// ---- routing ---------------------------------------------------------------------------------

async function route() {
  leave();
  leave = () => {};
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === parts[0]);
  try {
    if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "models" && parts[2] === "compare") await comparePage(parts[1], parts[3], parts[4]);
    else if (parts[0] === "models" && parts[1]) await modelPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else await jobsPage(new URLSearchParams(query || ""));
  } catch (err) {
    fail(err);
  }
}

window.addEventListener("hashchange", route);
route();
