// intentlora ui: three pages over the JSON API of intentlora/ui.py. No build step, no dependency.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const base = (p) => (p ? String(p).split("/").pop() : "");
const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2"];

// ------------------------------------------------------------ API and key

async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem("intentlora-key");
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {method: body === undefined ? "GET" : "POST", headers, body: body === undefined ? undefined : JSON.stringify(body)});
  if (res.status === 401) {
    $("#keybar").hidden = false;
    $("#key-msg").textContent = key ? "wrong key" : "";
    throw new Error("this UI needs its API key (top of the page)");
  }
  const type = res.headers.get("content-type") || "";
  const data = type.includes("json") ? await res.json() : await res.text();
  if (!res.ok) {
    const detail = data && data.detail !== undefined ? data.detail : data;
    const text = typeof detail === "string" ? detail
      : Array.isArray(detail) ? detail.map((d) => `${d.loc ? d.loc[d.loc.length - 1] : ""}: ${d.msg}`).join("; ")  // a field FastAPI refused
      : detail.message || JSON.stringify(detail);
    const error = new Error(text);
    error.detail = detail;
    throw error;
  }
  return data;
}

$("#key-save").addEventListener("click", () => {
  sessionStorage.setItem("intentlora-key", $("#key").value);
  $("#keybar").hidden = true;
  init();
});

// ------------------------------------------------------------ pages

function showPage() {
  const page = (location.hash || "#train").slice(1);
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (page === "runs") loadRuns();
  if (page === "try") loadTryRuns();
}
window.addEventListener("hashchange", showPage);

// ------------------------------------------------------------ charts (SVG)

const tick = (v) => String(+v.toPrecision(3));

function niceStep(lo, hi, n = 4) {
  // Round steps (1, 2, 2.5, 5 x 10^k), so a step axis reads 0, 50, 100 rather than 41.3, 77.5.
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw * 0.999);
}

function niceTicks(lo, hi, n = 4) {
  const step = niceStep(lo, hi, n);
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

function lineChart(svg, series, {title = "", xmin = null, xmax = null, ymin = null, ymax = null, xlabel = "", marker = null} = {}) {
  const W = 460, H = 220, L = 44, R = 12, T = 24, B = 34;
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) {
    svg.innerHTML = `<text x="${W / 2}" y="${H / 2}" class="empty" text-anchor="middle">${esc(title)}: no data yet</text>`;
    return;
  }
  let x0 = xmin ?? Math.min(...pts.map((p) => p[0])), x1 = xmax ?? Math.max(...pts.map((p) => p[0]));
  let y0 = ymin ?? Math.min(...pts.map((p) => p[1])), y1 = ymax ?? Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const [xs, ys] = [niceStep(x0, x1), niceStep(y0, y1)];  // free ends of an axis widen to a round tick
  if (xmin === null) x0 = Math.floor(x0 / xs + 1e-9) * xs;
  if (xmax === null) x1 = Math.ceil(x1 / xs - 1e-9) * xs;
  if (ymin === null) y0 = Math.floor(y0 / ys + 1e-9) * ys;
  if (ymax === null) y1 = Math.ceil(y1 / ys - 1e-9) * ys;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  let out = `<text x="${L}" y="15" class="title">${esc(title)}</text>`;
  for (const y of niceTicks(y0, y1)) {
    out += `<line x1="${L}" x2="${W - R}" y1="${Y(y)}" y2="${Y(y)}" class="grid"/><text x="${L - 6}" y="${Y(y) + 4}" class="tick" text-anchor="end">${tick(y)}</text>`;
  }
  for (const x of niceTicks(x0, x1)) {
    out += `<text x="${X(x)}" y="${H - B + 16}" class="tick" text-anchor="middle">${tick(x)}</text>`;
  }
  out += `<text x="${W - R}" y="${H - 4}" class="tick" text-anchor="end">${esc(xlabel)}</text>`;
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const path = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    out += `<path d="${path}" fill="none" stroke="${color}" stroke-width="2" ${s.step ? 'stroke-linejoin="miter"' : ""}/>`;
    if (s.dots) out += s.points.map((p) => `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="3.5" fill="${color}"/>`).join("");
    const lx = W - R - 100 * (series.length - i);
    if (s.label) out += `<rect x="${lx}" y="9" width="12" height="3" fill="${color}"/><text x="${lx + 16}" y="14" class="tick">${esc(s.label)}</text>`;
  });
  if (marker !== null) out += `<line x1="${X(marker)}" x2="${X(marker)}" y1="${T}" y2="${H - B}" class="marker"/>`;
  svg.innerHTML = out;
}

// ------------------------------------------------------------ Train page

const jobs = new Map(); // id -> {summary, events}

async function fileBase64(file) {
  // The bytes as they are (not decoded here), so the server reports bytes that are not UTF-8 at their line.
  const bytes = new Uint8Array(await file.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function uploadFile(input) {
  const file = input.files[0];
  if (!file) return;
  const target = $("#" + input.dataset.target);
  try {
    const result = await api("/api/upload", {filename: file.name, content_base64: await fileBase64(file)});
    target.value = result.path;
    await validateFiles();
  } catch (e) {
    showValidation({error: e.message});
  }
  input.value = "";
}

function showValidation(result) {
  const box = $("#validation");
  if (result.error) {
    box.innerHTML = `<div class="problem error">${esc(result.error)}</div>`;
    return;
  }
  const kind = (line) => (/^\s/.test(line) ? "detail" : /: (warning|dropped): /.test(line) ? "warning" : "error");
  const rows = result.lines.map((line) => `<div class="problem ${kind(line)}">${esc(line)}</div>`).join("");
  const ok = result.errors === 0;
  const labels = result.labels.length ? `<div class="muted small">labels: ${result.labels.map(esc).join(", ")}</div>` : "";
  box.innerHTML = `<div class="summary ${ok ? "ok" : "bad"}">${ok ? "✓" : "✗"} ${esc(result.summary)}</div>${labels}<div class="problems">${rows}</div>`;
}

let validation = 0; // only the answer to the latest check is shown

async function validateFiles() {
  const train = $("#train-file").value.trim();
  if (!train) return;
  const mine = ++validation;
  try {
    const result = await api("/api/validate", {train, test: $("#test-file").value.trim() || null, valid: $("#valid-file").value.trim() || null});
    if (mine === validation) showValidation(result);
  } catch (e) {
    if (mine === validation) showValidation({error: e.message});
  }
}

function trainRequest() {
  const targets = $("#lora-targets").value;
  const custom = $("#custom-targets").value.split(",").map((s) => s.trim()).filter(Boolean);
  return {
    name: $("#run-name").value.trim() || null,
    model: $("#model").value.trim(),
    train: $("#train-file").value.trim(),
    test: $("#test-file").value.trim(),
    valid: $("#valid-file").value.trim() || null,
    epochs: Number($("#epochs").value),
    lr: Number($("#lr").value),
    batch_size: Number($("#batch-size").value),
    lora_r: Number($("#lora-r").value),
    lora_targets: targets === "custom" ? custom : targets ? [targets] : null,
    precision: $("#precision").value,
    baselines: [...document.querySelectorAll("#baselines input:checked")].map((c) => c.value),
    max_train_samples: $("#max-train").value ? Number($("#max-train").value) : null,
  };
}

async function startTraining() {
  const msg = $("#start-msg");
  msg.className = "";
  msg.textContent = "checking…";
  try {
    const job = await api("/api/jobs", trainRequest());
    jobs.set(job.id, {summary: job, events: []});
    msg.textContent = job.ahead ? `${job.name} queued: ${job.ahead} training(s) ahead` : `${job.name} starting`;
    $("#run-name").value = "";
    renderJobs();
    pollJobs();
  } catch (e) {
    msg.className = "error-text";
    msg.textContent = e.message;
    if (e.detail && e.detail.problems) showValidation(e.detail);
  }
}

async function cancelJob(id) {
  await api(`/api/jobs/${id}/cancel`, {});
  pollJobs();
}

function jobCurves(events) {
  const loss = [], f1 = [];
  for (const e of events) {
    if (e.event === "train_log" && e.loss !== undefined && e.loss !== null) loss.push([e.step, Number(e.loss)]);
    if (e.event === "eval" && e.macro_f1 !== undefined) f1.push([e.step, Number(e.macro_f1)]);
  }
  return {loss, f1};
}

function jobProgress(job) {
  const bars = job.summary.progress || {};
  const train = bars.train;
  const logs = job.events.filter((e) => e.event === "train_log");
  const last = logs[logs.length - 1];
  if (job.summary.state === "finished") return 1;
  if (train && train.total) return train.n / train.total;
  if (last && last.max_steps) return last.step / last.max_steps;
  return null;
}

function renderJob(job) {
  const s = job.summary;
  const active = s.state === "queued" || s.state === "running";
  const progress = jobProgress(job);
  const lines = job.events.filter((e) => ["log", "info", "warning", "error", "phase", "waiting"].includes(e.event)).slice(-8)
    .map((e) => `<div class="${esc(e.event)}">${esc(e.event === "phase" ? `[${e.phase}] ${e.message || ""}` : e.message)}</div>`).join("");
  const status = s.state === "queued" ? `queued, ${s.position} in line` : s.state;
  const result = s.lora_macro_f1 !== null && s.lora_macro_f1 !== undefined ? ` · LoRA macro-F1 <b>${fmt(s.lora_macro_f1)}</b> · <a href="#runs">see in Runs</a>` : "";
  const bars = Object.values(s.progress || {}).filter((b) => b.bar !== "train")
    .map((b) => `${esc(b.bar)} ${b.n}/${b.total}`).join(" · ");
  return `<div class="job" data-job="${esc(s.id)}">
    <div class="job-head"><b>${esc(s.name)}</b> <span class="badge ${esc(s.state)}">${esc(status)}</span>
      ${s.phase ? `<span class="phase">${esc(s.phase)}</span>` : ""}${result}
      <span class="spacer"></span>${active ? `<button class="cancel" data-cancel="${esc(s.id)}">Cancel</button>` : ""}</div>
    ${s.state === "queued" ? "" : `<div class="progress"><div style="width:${progress === null ? 0 : Math.round(progress * 100)}%"></div></div>`}
    <div class="muted small">${[progress === null ? "" : Math.round(progress * 100) + "% of the training steps", bars].filter(Boolean).join(" · ")}</div>
    ${s.state === "queued" ? `<p class="muted small waiting-note">starts when the training${s.ahead > 1 ? "s" : ""} ahead of it end${s.ahead > 1 ? "" : "s"}</p>`
      : `<div class="charts"><svg class="chart loss" viewBox="0 0 460 220"></svg><svg class="chart f1" viewBox="0 0 460 220"></svg></div>`}
    <details class="command"><summary>command</summary><code>${esc(s.command)}</code></details>
    <div class="log">${lines}</div>
  </div>`;
}

function renderJobs() {
  const box = $("#jobs");
  if (!jobs.size) return;
  const ordered = [...jobs.values()].sort((a, b) => (b.summary.n_order ?? 0) - (a.summary.n_order ?? 0));
  const open = new Set([...box.querySelectorAll("details.command[open]")].map((d) => d.closest(".job").dataset.job));
  box.innerHTML = ordered.map(renderJob).join("");
  for (const id of open) box.querySelector(`[data-job="${id}"] details.command`)?.setAttribute("open", "");
  for (const job of ordered) {
    const el = box.querySelector(`[data-job="${job.summary.id}"]`);
    if (!el.querySelector(".chart")) continue;
    const {loss, f1} = jobCurves(job.events);
    lineChart(el.querySelector(".loss"), [{points: loss, label: "train loss", dots: loss.length < 3}], {title: "Training loss", xlabel: "step"});
    lineChart(el.querySelector(".f1"), [{points: f1, label: "valid macro-F1", dots: true, color: COLORS[2]}], {title: "Validation macro-F1", ymin: 0, ymax: 1, xlabel: "step"});
  }
  for (const button of box.querySelectorAll("[data-cancel]")) button.addEventListener("click", () => cancelJob(button.dataset.cancel));
}

let polling = null;
async function pollJobs() {
  clearTimeout(polling);
  try {
    const list = await api("/api/jobs");
    list.forEach((summary, i) => {
      const known = jobs.get(summary.id) || {summary, events: [], done: false};
      known.summary = {...summary, n_order: list.length - i};
      jobs.set(summary.id, known);
    });
    for (const job of jobs.values()) {
      if (job.done) continue;
      const detail = await api(`/api/jobs/${job.summary.id}?since=${job.events.length}`);
      job.events.push(...detail.events);
      job.summary = {...detail, n_order: job.summary.n_order};
      job.done = !["queued", "running"].includes(detail.state);
    }
    renderJobs();
  } catch (e) {
    console.warn(e);
  }
  // Every second while a training is queued or running; every 5 s otherwise (one started from another tab shows up).
  polling = setTimeout(pollJobs, [...jobs.values()].some((j) => !j.done) ? 1000 : 5000);
}

// ------------------------------------------------------------ Runs page

let runs = [];
let sortKey = "date", sortDir = -1;

function runValue(run, key) {
  if (key === "n_labels") return run.labels.length;
  if (key === "best_baseline") return Math.max(-1, ...Object.values(run.baselines).filter((v) => v !== null));
  return run[key] ?? "";
}

function renderRuns() {
  const sorted = [...runs].sort((a, b) => {
    const x = runValue(a, sortKey), y = runValue(b, sortKey);
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
  });
  const body = $("#runs-table tbody");
  body.innerHTML = sorted.map((r) => {
    const baselines = Object.entries(r.baselines).map(([k, v]) => `<span class="pill">${esc(k.replace("_", " "))} ${fmt(v)}</span>`).join(" ");
    const data = r.train_file ? `<span title="${esc(r.train_file)} / ${esc(r.test_file)}">${esc(base(r.train_file))}</span>${r.n_train ? ` <span class="muted small">${r.n_train} train · ${r.n_test} test</span>` : ""}` : "";
    const f1 = r.lora_macro_f1 === null ? "–" : `<div class="cellbar"><div style="width:${Math.round(r.lora_macro_f1 * 100)}%"></div><span>${fmt(r.lora_macro_f1)}</span></div>`;
    return `<tr data-run="${esc(r.name)}">
      <td><input type="checkbox" class="pick" value="${esc(r.name)}" ${r.status === "finished" ? "" : "disabled"}></td>
      <td><b>${esc(r.name)}</b></td>
      <td class="nowrap">${esc(r.date.replace("T", " ").slice(0, 16))}</td>
      <td title="${esc(r.model)}">${esc(base(r.model))}</td>
      <td>${data}</td>
      <td title="${esc(r.labels.join(", "))}">${r.labels.length}</td>
      <td>${baselines || '<span class="muted">none</span>'}</td>
      <td>${f1}</td>
      <td class="nowrap">${r.seconds === null ? "–" : fmt(r.seconds, 1) + " s"}</td>
      <td><span class="badge ${esc(r.status)}">${esc(r.status)}</span></td>
      <td>${r.has_report ? `<button class="report" data-report="${esc(r.name)}">Report</button>` : ""}${r.status === "unfinished" ? `<button data-resume="${esc(r.name)}" title="train --resume: continue from the last complete checkpoint">Resume</button>` : ""}</td>
    </tr>`;
  }).join("") || `<tr><td colspan="11" class="muted">No runs in ${esc($("#runs-dir").dataset.dir || "the runs folder")} yet.</td></tr>`;
  for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === sortKey);
    th.dataset.dir = th.dataset.sort === sortKey ? (sortDir > 0 ? "▲" : "▼") : "";
  }
  for (const b of body.querySelectorAll("[data-report]")) b.addEventListener("click", () => openReport(b.dataset.report));
  for (const b of body.querySelectorAll("[data-resume]")) b.addEventListener("click", () => resumeRun(b.dataset.resume));
  for (const c of body.querySelectorAll(".pick")) c.addEventListener("change", updateCompareButton);
  updateCompareButton();
}

function updateCompareButton() {
  $("#compare").disabled = document.querySelectorAll("#runs-table .pick:checked").length < 2;
}

async function loadRuns() {
  try {
    runs = await api("/api/runs");
    renderRuns();
  } catch (e) {
    $("#runs-table tbody").innerHTML = `<tr><td colspan="11" class="error-text">${esc(e.message)}</td></tr>`;
  }
}

for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
  th.addEventListener("click", () => {
    sortDir = th.dataset.sort === sortKey ? -sortDir : 1;
    sortKey = th.dataset.sort;
    renderRuns();
  });
}

function barCell(value, best) {
  if (value === null || value === undefined) return `<td class="muted">–</td>`;
  return `<td class="${value === best ? "best" : ""}"><div class="cellbar"><div style="width:${Math.round(value * 100)}%"></div><span>${fmt(value)}</span></div></td>`;
}

async function compareSelected() {
  const names = [...document.querySelectorAll("#runs-table .pick:checked")].map((c) => c.value);
  try {
    const result = await api("/api/compare", {runs: names});
    const head = `<tr><th></th>${result.runs.map((r) => `<th>${esc(r.name)}</th>`).join("")}</tr>`;
    const models = [...new Set(result.runs.flatMap((r) => Object.keys(r.metrics)))];
    const metricRows = models.map((m) => {
      const values = result.runs.map((r) => (r.metrics[m] ? r.metrics[m].macro_f1 : null));
      const best = Math.max(...values.filter((v) => v !== null));
      return `<tr><th>${esc(m)}</th>${values.map((v) => barCell(v, best)).join("")}</tr>`;
    }).join("");
    const labels = [...new Set(result.runs.flatMap((r) => Object.keys(r.per_class_f1)))];
    const classRows = labels.map((label) => {
      const values = result.runs.map((r) => r.per_class_f1[label] ?? null);
      const best = Math.max(...values.filter((v) => v !== null));
      return `<tr><th>${esc(label)}</th>${values.map((v) => barCell(v, best)).join("")}</tr>`;
    }).join("");
    const show = (v) => esc(typeof v === "object" && v !== null ? JSON.stringify(v) : v ?? "–");
    const diffRows = result.config_diff.map((d) => `<tr><th><code>${esc(d.key)}</code></th>${d.values.map((v) => `<td><code>${show(v)}</code></td>`).join("")}</tr>`).join("")
      || `<tr><td colspan="${result.runs.length + 1}" class="muted">same config (but the output folder)</td></tr>`;
    $("#comparison").innerHTML = `
      <h3>Test macro-F1 per model</h3><table class="table compare">${head}${metricRows}</table>
      <h3>LoRA F1 per class</h3><table class="table compare">${head}${classRows}</table>
      <h3>Config differences</h3><table class="table compare">${head}${diffRows}</table>`;
    $("#compare-card").hidden = false;
    $("#compare-card").scrollIntoView({behavior: "smooth"});
  } catch (e) {
    $("#comparison").innerHTML = `<p class="error-text">${esc(e.message)}</p>`;
    $("#compare-card").hidden = false;
  }
}

async function resumeRun(name) {
  try {
    await api(`/api/runs/${encodeURIComponent(name)}/resume`, {});
    location.hash = "#train";
    pollJobs();
  } catch (e) {
    alert(e.message);
  }
}

async function openReport(name) {
  const html = await api(`/api/runs/${encodeURIComponent(name)}/files/report.html`);
  $("#report-title").textContent = `Report: ${name}`;
  $("#report-frame").srcdoc = html;
  $("#report-card").hidden = false;
  $("#report-card").scrollIntoView({behavior: "smooth"});
}

$("#compare").addEventListener("click", compareSelected);
$("#refresh-runs").addEventListener("click", loadRuns);
$("#compare-close").addEventListener("click", () => ($("#compare-card").hidden = true));
$("#report-close").addEventListener("click", () => ($("#report-card").hidden = true));

// ------------------------------------------------------------ Try page

let curve = null;      // the selected run's test-set scores
let lastTry = null;    // the last predictions, relabelled as the slider moves

async function loadTryRuns() {
  const select = $("#try-run");
  const chosen = select.value;
  const finished = (await api("/api/runs")).filter((r) => r.status === "finished");
  select.innerHTML = finished.map((r) => `<option value="${esc(r.name)}">${esc(r.name)} · ${esc(base(r.model))} · ${r.labels.length} labels · F1 ${fmt(r.lora_macro_f1)}</option>`).join("")
    || `<option value="">no finished run yet</option>`;
  if (finished.some((r) => r.name === chosen)) select.value = chosen;
  if (select.value && (!curve || curve.run !== select.value)) loadCurve();
}

async function loadCurve() {
  const run = $("#try-run").value;
  curve = null;
  $("#curve-stats").textContent = "scoring the run's test set…";
  try {
    curve = {...(await api(`/api/runs/${encodeURIComponent(run)}/curve`)), run};
    updateThreshold();
  } catch (e) {
    $("#curve-stats").innerHTML = `<span class="error-text">${esc(e.message)}</span>`;
  }
}

function thresholdStats(t) {
  const kept = curve.points.filter((p) => p[0] >= t);
  const right = kept.filter((p) => p[1]).length;
  return {kept: kept.length, precision: kept.length ? right / kept.length : null, coverage: kept.length / curve.n};
}

function updateThreshold() {
  const t = Number($("#threshold").value);
  $("#threshold-value").textContent = t.toFixed(2);
  if (curve) {
    const s = thresholdStats(t);
    $("#curve-stats").innerHTML = `On the run's test set (${curve.n} texts): precision <b>${s.precision === null ? "–" : fmt(s.precision)}</b> on the texts kept, coverage <b>${fmt(s.coverage)}</b> (${s.kept} kept, ${curve.n - s.kept} to the fallback label)`;
    const cuts = [...curve.cuts].sort((a, b) => a.threshold - b.threshold);
    lineChart($("#curve-chart"), [
      {points: cuts.map((c) => [c.threshold, c.precision]), label: "precision", color: COLORS[0]},
      {points: cuts.map((c) => [c.threshold, c.coverage]), label: "coverage", color: COLORS[1]},
    ], {title: "Test set, by threshold", xmin: 0, xmax: 1, ymin: 0, ymax: 1, xlabel: "threshold", marker: t});
  }
  if (lastTry) renderPredictions();
}

async function classify() {
  const texts = $("#try-texts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const box = $("#predictions");
  if (!texts.length) { box.innerHTML = `<p class="error-text">type at least one text</p>`; return; }
  box.innerHTML = `<p class="muted">loading the model and classifying…</p>`;
  try {
    lastTry = await api("/api/try", {run: $("#try-run").value, texts, top_k: Number($("#try-topk").value),
      threshold: Number($("#threshold").value), fallback_label: $("#fallback-label").value.trim() || null});
    renderPredictions();
  } catch (e) {
    lastTry = null;
    box.innerHTML = `<p class="error-text">${esc(e.message)}</p>`;
  }
}

function renderPredictions() {
  // The rule of `predict`: a top score under the threshold gives the fallback label.
  const t = Number($("#threshold").value);
  const fallback = $("#fallback-label").value.trim() || lastTry.fallback_label;
  $("#predictions").innerHTML = lastTry.predictions.map((p) => {
    const below = p.score < t;
    const label = below ? `${esc(fallback)} <span class="muted small">(fallback: ${fmt(p.score)} &lt; ${t.toFixed(2)}; best was ${esc(p.top_k[0].label)})</span>` : esc(p.top_k[0].label);
    const bars = p.top_k.map((k, i) => `<div class="bar ${i === 0 && !below ? "top" : ""}"><span class="bar-label">${esc(k.label)}</span>
        <div class="bar-track"><div style="width:${(k.score * 100).toFixed(1)}%"></div></div><span class="bar-value">${(k.score * 100).toFixed(1)}%</span></div>`).join("");
    return `<div class="prediction ${below ? "fallback" : ""}"><div class="text">${esc(p.text)}</div><div class="label">→ ${label}</div>${bars}</div>`;
  }).join("");
}

$("#try-run").addEventListener("change", () => { lastTry = null; $("#predictions").innerHTML = ""; loadCurve(); });
$("#try-go").addEventListener("click", classify);
$("#threshold").addEventListener("input", updateThreshold);
$("#fallback-label").addEventListener("input", () => lastTry && renderPredictions());

// ------------------------------------------------------------ start

async function init() {
  try {
    const info = await api("/api/info");
    $("#runs-dir").textContent = `runs: ${info.runs_dir}`;
    $("#runs-dir").dataset.dir = info.runs_dir;
    $("#files").innerHTML = info.files.map((f) => `<option value="${esc(f)}">`).join("");
    const d = info.defaults;
    if (!$("#model").value) {
      $("#model").value = d.model;
      $("#epochs").value = d.epochs;
      $("#lr").value = d.lr;
      $("#batch-size").value = d.batch_size;
      $("#lora-r").value = d.lora_r;
    }
    $("#precision").innerHTML = info.precisions.map((p) => `<option ${p === d.precision ? "selected" : ""}>${esc(p)}</option>`).join("");
    $("#baselines").innerHTML = info.baselines.map((b) => `<label class="check"><input type="checkbox" value="${esc(b)}" ${d.baselines.includes(b) ? "checked" : ""}> ${esc(b.replace("_", " "))}</label>`).join("");
    showPage();
    pollJobs();
  } catch (e) {
    $("#runs-dir").textContent = e.message;
  }
}

for (const input of document.querySelectorAll("input[type=file]")) input.addEventListener("change", () => uploadFile(input));
for (const id of ["#train-file", "#test-file", "#valid-file"]) $(id).addEventListener("change", validateFiles);
$("#lora-targets").addEventListener("change", () => ($("#custom-targets-label").hidden = $("#lora-targets").value !== "custom"));
$("#start").addEventListener("click", startTraining);
init();
