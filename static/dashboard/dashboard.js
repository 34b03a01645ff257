// Training dashboard client: polls the JSON API and fills the page.
// Plain JS, no dependencies.  Log-derived text is only ever set through
// textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const body = document.body;
// A stored preference wins over the server's default, if it is sane.
function pref(key, fallback, low, high) {
  const value = Number(localStorage.getItem(key) ?? fallback);
  return Number.isFinite(value) && value >= low && value <= high ? value : Number(fallback);
}
const prefs = {
  refresh: pref("dash.refresh", body.dataset.refresh || 5, 0, 3600),
  smoothing: pref("dash.smoothing", body.dataset.smoothing || 0.6, 0, 0.99),
};
let timer = null;
let inflight = false;
let plotVersions = {};

// ---------------------------------------------------------------- formatting
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const dash = "–";

function fmtFixed(v, digits = 4) { return isNum(v) ? v.toFixed(digits) : dash; }
function fmtSci(v) { return isNum(v) ? (v === 0 ? "0" : v.toExponential(2)) : dash; }
function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : dash; }
function fmtCompact(v) {
  if (!isNum(v)) return dash;
  const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, unit] of units) if (Math.abs(v) >= size) return (v / size).toFixed(v / size >= 100 ? 0 : 1) + unit;
  return v.toFixed(v >= 100 ? 0 : 1);
}
function fmtBytes(v) {
  if (!isNum(v)) return dash;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}
function fmtDuration(s) {
  if (!isNum(s)) return dash;
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}
function fmtClock(unix, withDate = false) {
  if (!isNum(unix)) return dash;
  const opts = withDate ? { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  return new Date(unix * 1000).toLocaleString([], opts);
}
function fmtAgo(seconds) { return isNum(seconds) ? `${fmtDuration(seconds)} ago` : dash; }

function setText(id, text) { const el = $(id); if (el && el.textContent !== text) el.textContent = text; }
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- fetching
async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) throw new Error("unauthorized");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// ---------------------------------------------------------------- renderers
const STATUS_TEXT = {
  waiting: "waiting for run", running: "running", finished: "finished", crashed: "crashed",
  stalled: "stalled", preempted: "preempted", offline: "dashboard offline",
};

function renderStatus(s) {
  const pill = $("status");
  pill.className = `pill status-${s.status}`;
  pill.textContent = STATUS_TEXT[s.status] || s.status;
  setText("last-write", isNum(s.seconds_since_write) ? `last write ${fmtAgo(s.seconds_since_write)}` : "");
}

function renderBanner(s, errors, experts) {
  const banner = $("banner");
  let kind = null, text = "";
  if (s.status === "waiting") {
    kind = "info"; text = "No run yet: waiting for the trainer to write its logs. This page updates by itself.";
  } else if (s.status === "crashed") {
    const last = errors && errors.errors.length ? errors.errors[errors.errors.length - 1] : null;
    kind = "error"; text = last ? `Training crashed at step ${last.step ?? "?"}: ${last.type}: ${last.message}` : "Training crashed.";
  } else if (s.status === "stalled") {
    kind = "warn"; text = `No log line written for ${fmtDuration(s.seconds_since_write)}: the trainer may be hung or killed.`;
  } else if (s.status === "preempted") {
    kind = "warn"; text = "The run was preempted; resume it to continue from its last checkpoint.";
  } else if (experts && experts.collapsed) {
    kind = "warn";
    text = `Expert routing looks collapsed: ${experts.collapse_reasons[0]}. ${experts.collapse_explanation || ""}`;
  }
  banner.hidden = !kind;
  if (kind) { banner.className = `banner ${kind}`; banner.textContent = text; }
}

function renderProgress(s) {
  setText("stat-step", fmtInt(s.step));
  setText("stat-total", fmtInt(s.total_steps));
  setText("stat-elapsed", fmtDuration(s.elapsed_seconds));
  const live = s.status === "running" || s.status === "stalled";
  setText("stat-eta", s.status === "finished" ? "done" : live ? fmtDuration(s.eta_seconds) : dash);
  const finish = isNum(s.eta_seconds) && live ? Date.now() / 1000 + s.eta_seconds : null;
  setText("stat-finish", finish ? fmtClock(finish, true) : dash);
  setText("stat-progress", isNum(s.progress) ? `${(s.progress * 100).toFixed(1)}%` : dash);
  const fill = $("progress-fill");
  fill.style.width = `${isNum(s.progress) ? (s.progress * 100).toFixed(2) : 0}%`;
  fill.className = `bar-fill ${s.status === "finished" ? "finished" : s.status === "crashed" ? "crashed" : ""}`;
}

function renderCards(s) {
  setText("stat-loss-smoothed", fmtFixed(s.loss_smoothed));
  setText("stat-loss", `raw ${fmtFixed(s.loss)} · EMA ${fmtFixed(s.smoothing, 2)}`);
  setText("stat-lr", fmtSci(s.lr));
  setText("stat-grad-norm", fmtFixed(s.grad_norm, 3));
  setText("stat-tps", isNum(s.tokens_per_sec) ? `${fmtCompact(s.tokens_per_sec)} tok/s` : dash);
  const perStep = isNum(s.steps_per_sec) && s.steps_per_sec > 0 ? 1 / s.steps_per_sec : s.seconds_per_step;
  setText("stat-speed", isNum(perStep) ? `${perStep.toFixed(perStep < 10 ? 2 : 1)} s / step` : dash);
  setText("stat-epoch", fmtFixed(s.epoch, 3));
  setText("stat-tokens", isNum(s.tokens_seen) ? `${fmtCompact(s.tokens_seen)} tokens seen` : dash);
  const trained = isNum(s.trained_tokens_seen)
    ? `; ${fmtCompact(s.trained_tokens_seen)} of them trained (loss targets: chat data counts the assistant's tokens only)`
    : "";
  $("stat-tokens").title = s.tokens_seen_estimated
    ? "estimated: this log predates tokens_seen, so each logged step's tokens stand for the steps since the previous record"
    : `non-pad input tokens trained on so far, all processes, across resumes${trained}`;
  setText("stat-mem", fmtBytes(s.gpu_mem_peak));
  setText("stat-mem-hint", isNum(s.gpu_mem_allocated)
    ? `peak · now ${fmtBytes(s.gpu_mem_allocated)} / reserved ${fmtBytes(s.gpu_mem_reserved)}` : "not logged (no CUDA)");
  const bad = $("bad-lines");
  const problems = Object.entries(s.log_problems || {}).map(([file, why]) => `${file} ${why}`);
  const notes = [...problems, ...(s.bad_lines ? [`${s.bad_lines} malformed log line(s) skipped`] : [])];
  bad.textContent = notes.length ? notes.join(" · ") : "all log lines parsed";
  bad.className = notes.length ? "warn" : "";
}

function renderValidation(s, checkpoints) {
  const has = isNum(s.val_loss);
  $("val-empty").hidden = has;
  $("val-cards").hidden = !has;
  setText("val-count", has ? `${s.evals} evaluation${s.evals === 1 ? "" : "s"} · best by ${s.select_by ?? "val"}` : "");
  renderEvalSets(s.eval_sets || []);
  if (!has) return;
  const best = checkpoints && checkpoints.best;
  setText("val-best", fmtFixed(s.best_val_loss));
  const bestName = best && best.step === s.best_val_step ? ` · ${best.name}` : "";
  setText("val-best-step", isNum(s.best_val_step) ? `step ${fmtInt(s.best_val_step)}${bestName}` : "after the first update");
  setText("val-latest", fmtFixed(s.val_loss));
  setText("val-latest-step", `step ${fmtInt(s.val_step)}`);
  setText("val-ppl", fmtFixed(s.perplexity, 2));
  const trend = $("val-trend");
  if (isNum(s.val_trend)) {
    const better = s.val_trend < 0;
    trend.textContent = `${better ? "▼" : s.val_trend > 0 ? "▲" : "■"} ${Math.abs(s.val_trend).toFixed(4)}`;
    trend.className = `value mono ${better ? "trend-down" : s.val_trend > 0 ? "trend-up" : ""}`;
    setText("val-trend-hint", better ? "improving vs previous eval" : s.val_trend > 0 ? "worse than previous eval" : "unchanged");
  } else {
    trend.textContent = dash;
    trend.className = "value mono";
    setText("val-trend-hint", "needs two evaluations");
  }
}

// One row per eval set: the base model's loss (step 0), the latest, the change between them
// (red when worse than the base: forgetting on a general-text set), and the best step.
function fmtChange(change, pct) {
  if (!isNum(change)) return dash;
  const sign = change > 0 ? "+" : change < 0 ? "−" : "±";
  return `${sign}${Math.abs(change).toFixed(4)}${isNum(pct) ? ` (${sign}${Math.abs(pct).toFixed(1)}%)` : ""}`;
}

// The MTP layer's speculative acceptance on a set: the latest share of drafts accepted and its change
// from step 0 in points (red when below the base model's: serving with MTP drafts has slowed).
function fmtAcceptance(set) {
  if (!isNum(set.latest_acceptance)) return dash;
  const latest = `${(100 * set.latest_acceptance).toFixed(1)}%`;
  if (!isNum(set.acceptance_change)) return latest;
  const points = 100 * set.acceptance_change;
  const sign = points > 0 ? "+" : points < 0 ? "−" : "±";
  return `${latest} (${sign}${Math.abs(points).toFixed(1)} pt)`;
}

function renderEvalSets(sets) {
  $("evalsets-table").hidden = sets.length === 0;
  const mtp = sets.some((set) => isNum(set.latest_acceptance));
  for (const cell of document.querySelectorAll("#evalsets-table th.mtp")) cell.hidden = !mtp;
  $("mtp-plot").hidden = !mtp;
  $("evalsets-rows").replaceChildren(...sets.map((set) => {
    const row = el("tr", set.selected ? "selected" : "");
    row.dataset.set = set.name;
    const name = el("td", "mono", set.name);
    if (set.selected) name.append(el("span", "tag best", "selects best"));
    const change = el("td", `num change ${set.change > 0 ? "trend-up" : set.change < 0 ? "trend-down" : ""}`,
      fmtChange(set.change, set.change_pct));
    row.append(name, el("td", "num baseline", fmtFixed(set.baseline_loss)),
      el("td", "num latest", fmtFixed(set.latest_loss)), change, el("td", "num best", fmtFixed(set.best_loss)),
      el("td", "num best-step", isNum(set.best_step) ? fmtInt(set.best_step) : dash));
    if (mtp) {
      const drift = set.acceptance_change;
      row.append(el("td", `num mtp ${drift < 0 ? "trend-up" : drift > 0 ? "trend-down" : ""}`, fmtAcceptance(set)));
    }
    return row;
  }));
}

// Redrawing a plot costs the server ~0.1 s, so plots refresh at most every
// PLOT_MIN_SECONDS even when the cards refresh faster.  A new image is
// loaded off-screen and swapped in, so plots never flicker or fade.
const PLOT_MIN_SECONDS = 5;
let plotsShownAt = 0;
let plotsForced = true;

function renderPlots(s) {
  const now = Date.now() / 1000;
  if (!plotsForced && now - plotsShownAt < Math.max(PLOT_MIN_SECONDS, prefs.refresh)) return;
  plotsForced = false;
  plotsShownAt = now;
  const smoothing = prefs.smoothing.toFixed(2);
  for (const img of document.querySelectorAll("img[data-plot]")) {
    const name = img.dataset.plot;
    const version = (s.plot_versions || {})[name] ?? "0";
    const src = `/api/plots/${name}.png?smoothing=${smoothing}&v=${encodeURIComponent(version)}`;
    if (img.getAttribute("src") === src || img.dataset.pending === src) continue;
    if (!img.getAttribute("src")) { img.setAttribute("src", src); continue; }
    img.dataset.pending = src;
    const next = new Image();
    next.onload = () => { if (img.dataset.pending === src) img.setAttribute("src", src); };
    next.onerror = () => { if (img.dataset.pending === src) delete img.dataset.pending; };
    next.src = src;
  }
}

function renderExperts(x) {
  const ok = x && x.available;
  $("experts-empty").hidden = ok;
  $("experts-body").hidden = !ok;
  const badge = $("experts-badge");
  badge.className = `pill ${!ok ? "status-waiting" : x.collapsed ? "status-warn" : "status-ok"}`;
  badge.textContent = !ok ? "no data" : x.collapsed ? "collapse warning" : "healthy";
  if (!ok) return;
  setText("ex-entropy", fmtFixed(x.mean_entropy, 3));
  setText("ex-min-entropy", fmtFixed(x.min_entropy, 3));
  setText("ex-imbalance", isNum(x.max_over_mean) ? `${x.max_over_mean.toFixed(2)}×` : dash);
  setText("ex-dead", fmtInt(x.dead_experts_total));
  const reasons = $("ex-reasons");
  reasons.replaceChildren(...x.collapse_reasons.slice(0, 5).map((r) => el("li", null, r)));
  const worst = [...x.layers].sort((a, b) => (b.max_over_mean ?? 0) - (a.max_over_mean ?? 0)).slice(0, 6);
  $("ex-layers").replaceChildren(...worst.map((l) => {
    const row = el("tr");
    row.append(el("td", "mono", String(l.layer)), el("td", "num", isNum(l.max_over_mean) ? `${l.max_over_mean.toFixed(2)}×` : dash),
      el("td", "num", fmtFixed(l.entropy, 3)), el("td", "num", String(l.dead_experts.length)),
      el("td", "num", l.hottest_expert === null ? dash : `#${l.hottest_expert}`));
    return row;
  }));
  setText("ex-note", `Step ${fmtInt(x.step)} · ${x.layers.length} MoE layers × ${x.num_experts} experts, top-${x.top_k ?? "?"} · most imbalanced layers shown`);
}

function meter(label, value, max, text) {
  const box = el("div", "meter");
  const head = el("div", "meter-head");
  head.append(el("span", null, label), el("span", "mono", text));
  const bar = el("div", "bar");
  const fill = el("div", "bar-fill");
  const pct = isNum(value) && isNum(max) && max > 0 ? Math.min(100, (100 * value) / max) : 0;
  fill.style.width = `${pct}%`;
  if (pct > 92) fill.classList.add("hot");
  bar.append(fill);
  box.append(head, bar);
  return box;
}

function renderGpus(g) {
  const gpus = (g && g.gpus) || [];
  const empty = $("gpu-empty");
  empty.hidden = gpus.length > 0;
  empty.textContent = g ? (g.reason || "No GPU on this machine.") : "GPU status unavailable.";
  setText("gpu-count", gpus.length ? `${gpus.length} device${gpus.length === 1 ? "" : "s"}` : "");
  $("gpus").replaceChildren(...gpus.map((gpu) => {
    const card = el("div", "gpu");
    card.append(el("div", "gpu-name", `GPU ${gpu.index} · ${gpu.name}`));
    card.append(meter("Utilisation", gpu.utilization, 100, isNum(gpu.utilization) ? `${gpu.utilization}%` : dash));
    card.append(meter("Memory", gpu.memory_used, gpu.memory_total, `${fmtBytes(gpu.memory_used)} / ${fmtBytes(gpu.memory_total)}`));
    const foot = el("div", "gpu-foot");
    foot.append(el("span", null, isNum(gpu.temperature) ? `${gpu.temperature} °C` : dash),
      el("span", null, isNum(gpu.power_watts) ? `${gpu.power_watts.toFixed(0)} W${isNum(gpu.power_limit_watts) ? ` / ${gpu.power_limit_watts.toFixed(0)} W` : ""}` : dash));
    card.append(foot);
    return card;
  }));
}

function renderCheckpoints(c) {
  const rows = c ? [...c.checkpoints].reverse() : [];
  $("ckpt-empty").hidden = rows.length > 0;
  $("ckpt-table").hidden = rows.length === 0;
  setText("ckpt-count", rows.length ? `${rows.length} on disk${c.deleted.length ? ` · ${c.deleted.length} pruned` : ""}` : "");
  $("ckpt-rows").replaceChildren(...rows.map((ck) => {
    const row = el("tr", ck.best ? "best" : "");
    const name = el("td", "mono", ck.name);
    if (ck.best) name.append(el("span", "tag best", "★ best"));
    if (ck.final) name.append(el("span", "tag final", "final"));
    if (!ck.complete) name.append(el("span", "tag incomplete", "incomplete"));
    row.append(name, el("td", "num", fmtInt(ck.step)), el("td", "num", fmtFixed(ck.val_loss)),
      el("td", "num", fmtBytes(ck.size_bytes)), el("td", "mono", fmtClock(ck.time, true)));
    return row;
  }));
}

function renderTimeline(e) {
  const events = e ? [...e.events].reverse().slice(0, 200) : [];
  $("events-empty").hidden = events.length > 0;
  setText("events-count", e && e.total ? `${e.total} event${e.total === 1 ? "" : "s"}` : "");
  $("timeline").replaceChildren(...events.map((ev) => {
    const item = el("li", `ev-${ev.event}`);
    const when = el("span", "when", fmtClock(ev.time));
    when.title = isNum(ev.time) ? new Date(ev.time * 1000).toString() : "";
    item.append(el("span", "dot"), when, el("span", "step", `step ${ev.step ?? "?"}`), el("span", null, ev.summary));
    return item;
  }));
}

function renderErrors(x) {
  const errors = x ? x.errors : [];
  $("errors-panel").hidden = errors.length === 0;
  setText("errors-count", errors.length ? `${x.total} logged` : "");
  $("errors").replaceChildren(...[...errors].reverse().slice(0, 20).map((err) => {
    const item = el("div", "error-item");
    item.append(el("strong", null, `${err.type ?? "Error"}: ${err.message ?? ""}`));
    item.append(el("div", "muted small", `step ${err.step ?? "?"} · rank ${err.rank ?? "?"} · ${fmtClock(err.time, true)}`));
    if (err.traceback) {
      const details = el("details");
      details.append(el("summary", "small", "traceback"), el("pre", null, err.traceback));
      item.append(details);
    }
    return item;
  }));
}

// ---------------------------------------------------------------- refresh loop
const settled = (p) => p.then((v) => v, () => null);

async function refresh() {
  if (inflight) return;
  inflight = true;
  try {
    const smoothing = prefs.smoothing.toFixed(2);
    const stats = await getJSON(`/api/stats?smoothing=${smoothing}`);
    const [checkpoints, events, experts, gpu, errors] = await Promise.all([
      "/api/checkpoints", "/api/events?limit=300", "/api/experts", "/api/gpu", "/api/errors?limit=20",
    ].map((path) => settled(getJSON(path))));
    renderStatus(stats);
    renderBanner(stats, errors, experts);
    renderProgress(stats);
    renderCards(stats);
    renderValidation(stats, checkpoints);
    renderPlots(stats);
    renderExperts(experts);
    renderGpus(gpu);
    renderCheckpoints(checkpoints);
    renderTimeline(events);
    renderErrors(errors);
    body.dataset.step = stats.step ?? "";
  } catch (err) {
    const pill = $("status");
    pill.className = "pill status-offline";
    pill.textContent = err.message === "unauthorized" ? "unauthorized" : STATUS_TEXT.offline;
    const banner = $("banner");
    banner.hidden = false;
    banner.className = "banner error";
    banner.textContent = err.message === "unauthorized"
      ? "Access denied: open this dashboard as /?token=<TOKEN> once."
      : `Cannot reach the dashboard server (${err.message}); retrying.`;
  } finally {
    inflight = false;
  }
}

function schedule() {
  clearTimeout(timer);
  timer = null;
  // Polling stops while the tab is hidden; visibilitychange restarts it.
  if (prefs.refresh > 0 && !document.hidden) {
    timer = setTimeout(async () => { await refresh(); schedule(); }, prefs.refresh * 1000);
  }
}

function setupControls() {
  const select = $("refresh");
  if (![...select.options].some((o) => Number(o.value) === prefs.refresh)) {
    select.append(new Option(`${prefs.refresh} s`, String(prefs.refresh)));
  }
  select.value = String(prefs.refresh);
  select.addEventListener("change", () => {
    prefs.refresh = Number(select.value);
    localStorage.setItem("dash.refresh", select.value);
    schedule();
  });
  const slider = $("smoothing");
  slider.value = String(prefs.smoothing);
  setText("smoothing-value", prefs.smoothing.toFixed(2));
  slider.addEventListener("input", () => setText("smoothing-value", Number(slider.value).toFixed(2)));
  slider.addEventListener("change", () => {
    prefs.smoothing = Number(slider.value);
    localStorage.setItem("dash.smoothing", slider.value);
    plotsForced = true;
    refresh();
  });
  $("refresh-now").addEventListener("click", () => { plotsForced = true; refresh().then(schedule); });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) { plotsForced = true; refresh(); }
    schedule();
  });
}

setupControls();
refresh().then(schedule);
