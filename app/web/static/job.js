// One job's page (/ui/jobs/{id}): state, progress and the fitting-loss chart, polled until the
// job ends; a cancel button while it runs; downloads, estimate and growth report once it succeeded.

import { api, apiKey, ROOT } from "./api.js";
import { lossChart } from "./chart.js";
import { $, facts, h, pageError } from "./dom.js";
import { renderEstimate } from "./estimate.js";
import { configSizes, fmt, num, resolvedText, sizesText } from "./format.js";
import { stateBadge, TERMINAL } from "./jobs.js";

const page = {
  timer: 0,
  resultShown: false,
  lossDrawn: null,  // "points:last step" of the chart on screen
  families: null,   // /ui/meta's families, to read a job's resolved target_config
};

function flatten(value, prefix, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (Array.isArray(value)) {
    const simple = value.every((x) => x === null || typeof x !== "object");
    out.push([prefix, simple && value.length <= 12 ? JSON.stringify(value) : `[${value.length} items]`]);
  } else {
    out.push([prefix, typeof value === "number" && !Number.isInteger(value) ? value.toPrecision(5) : String(value)]);
  }
  return out;
}

// The fit's guard (ligo_core/fit_guard.py): what the written model is.
const FIT_OUTCOMES = {
  improved: "improved: the written model is the fit's best state, no worse on held-out text than its start",
  kept_start: "kept the start: no fitted state beat the unfitted start on held-out text, so the start was written",
  stopped_diverged: "stopped, diverged: the fit stopped early and the best state seen (the start unless a step beat it) was written",
  unchecked: "unchecked: no held-out data to check the fit on",
};

// The growth report: what grew into what, the fitting run, and held-out losses; every field
// is in the raw JSON underneath.
function renderReport(report) {
  if (!report || typeof report !== "object") return h("p", { class: "muted", text: "No report." });
  const src = report.source || {}, tgt = report.target || {}, fit = report.fit || {};
  const dl = h("dl", { class: "facts" });
  facts(dl, [
    ["Strategy", report.strategy ? report.strategy + (report.strategy === "ligo" && report.ligo_init ? ` (depth starts as ${report.ligo_init})` : "") : ""],
    ["Source", src.sizes ? `${sizesText(src.sizes)} (${fmt.count(src.parameters)} parameters)` : ""],
    ["Grown", tgt.sizes ? `${sizesText(tgt.sizes)} (${fmt.count(tgt.parameters)} parameters)` : ""],
    ["Operator parameters", report.operator_parameters !== undefined ? fmt.int(report.operator_parameters) : ""],
    ["Fitting", fit.steps !== undefined ? (fit.steps ? `${fit.steps} steps of ${fit.batch_size} × ${fit.seq_len} tokens` +
      (fit.lr ? `, peak learning rate ${fit.lr}` : "") + (fit.seconds !== undefined ? `, ${fit.seconds} s` : "") : "none (fixed operator)") : ""],
    ["Fit outcome", fit.outcome ? (FIT_OUTCOMES[fit.outcome] || fit.outcome) + (fit.stop_reason ? ` (${fit.stop_reason})` : "") +
      (fit.final_check ? ` (${fit.final_check})` : "") : ""],
    ["Fitting FLOPs", fit.flops !== undefined ? fmt.flops(fit.flops) : ""],
    ["Fitting data", fit.data ? (typeof fit.data === "string" ? fit.data : JSON.stringify(fit.data)) : ""],
    ["Largest logit change", report.function_gap_max_logit !== undefined && report.function_gap_max_logit !== null
      ? `${Number(report.function_gap_max_logit).toPrecision(3)} (grown vs. small model, held-out text)` : ""],
    ["Device", report.device],
    ["Total time", report.seconds !== undefined ? `${report.seconds} s` : ""],
    ["Dropped tensors", Array.isArray(report.dropped_tensors) && report.dropped_tensors.length ? report.dropped_tensors.join(", ") : ""],
  ]);
  const parts = [dl];
  const hl = report.heldout_loss;
  if (hl && typeof hl === "object") {
    const rows = [["small", "Small model"], ["grown_before_fit", "Grown, before fitting"],
      ["fit_start", "Grown, fit's start (copies separated)"], ["grown_after_fit", "Grown, as written (fitted, copies separated)"], ["random_large", "Large model, random weights"]]
      .filter(([k]) => hl[k] !== undefined && hl[k] !== null);
    if (rows.length) {
      parts.push(h("table", { class: "report-table heldout" },
        h("caption", { text: `Held-out loss${hl.sequences ? ` (${hl.sequences} sequences)` : ""}` }),
        h("tbody", {}, rows.map(([k, label]) => h("tr", {}, h("td", { text: label }), h("td", { class: "n", text: num(hl[k]) }))))));
    }
  }
  const rest = flatten(report, "", []).filter(([k]) => !/(^|\.)config\.|loss_history|^versions\./.test(k));
  parts.push(h("details", {}, h("summary", { text: "All report fields" }),
    h("table", { class: "report-table" }, h("tbody", {}, rest.map(([k, v]) => h("tr", {}, h("td", { text: k }), h("td", { text: v })))))));
  parts.push(h("details", {}, h("summary", { text: "Full report (JSON)" }), h("pre", { text: JSON.stringify(report, null, 2) })));
  return h("div", {}, parts);
}

function renderFiles(files) {
  return (files || []).map((f) => {
    const name = String(f.path).split("/").pop();
    const href = /^[a-z]+:\/\//i.test(f.url) || String(f.url).startsWith("/") ? f.url : `${ROOT}/${f.url}`;
    return h("li", {}, h("a", { href, download: name, text: f.path }), ` (${fmt.bytes(f.size_bytes)})`);
  });
}

function showJob(job) {
  $("job-id").textContent = job.id;
  document.title = `Job ${job.id} · ${job.state} · LiGO growth`;
  facts($("job-facts"), [
    ["State", stateBadge(job)],
    ["Stage", TERMINAL.has(job.state) ? "" : job.stage],
    ["Target", fmt.target(job.target)],
    ["Resolved target", resolvedText(configSizes(job.target_config, page.families))],
    ["Strategy", job.strategy],
    ["Fitting", job.fit ? Object.entries(job.fit).filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k.replace("_", " ")} ${v}`).join(", ") : ""],
    ["Plan", job.plan ? Object.entries(job.plan).filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k.replace(/_/g, " ")} ${typeof v === "number" && v >= 1e6 ? fmt.flops(v) : v}`).join(", ") : ""],
    ["Checkpoint", job.checkpoint_id ? h("code", { text: job.checkpoint_id }) : ""],
    ["Created", fmt.time(job.created_at)],
    ["Started", fmt.time(job.started_at)],
    ["Finished", fmt.time(job.finished_at)],
    ["Attempts", job.attempts],
  ]);
  const p = job.progress || {};
  const total = Number(p.total) || 0, step = Number(p.step) || 0;
  const bar = $("job-progress");
  bar.value = job.state === "succeeded" ? 1 : total ? Math.min(step / total, 1) : 0;
  const loss = fmt.loss(p.loss);
  $("job-progress-label").textContent = job.state === "succeeded" ? "Done"
    : (total ? `${job.stage || "step"} ${step} of ${total}` : job.stage || job.state) + (loss ? `, loss ${loss}` : "");

  const cancellable = !TERMINAL.has(job.state);
  $("job-cancel").hidden = !cancellable;
  $("job-cancel").disabled = !!job.cancel_requested;
  if (job.cancel_requested && cancellable) $("job-cancel-status").textContent = "Cancel requested; the job stops after its current step.";
  if (job.state === "cancelled") $("job-cancel-status").textContent = "The job was cancelled.";

  const err = $("job-error");
  err.hidden = !job.error;
  if (job.error) err.replaceChildren(h("strong", { text: job.error.type || "Error" }), ": ", job.error.detail || "");

  const history = job.loss_history || [];
  const drawn = history.length ? `${history.length}:${history[history.length - 1][0]}` : "";
  if (drawn !== page.lossDrawn) {
    page.lossDrawn = drawn;
    $("loss-chart").replaceChildren(lossChart(history));
  }
}

async function showResult(jobId) {
  const result = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}/result`);
  $("job-files").replaceChildren(...renderFiles(result.files));
  $("job-estimate").replaceChildren(result.estimate ? renderEstimate(result.estimate) : h("p", { class: "muted", text: "No estimate." }));
  $("job-report").replaceChildren(renderReport(result.report));
  $("job-result").hidden = false;
  const history = result.report && result.report.fit && result.report.fit.loss_history;
  if (Array.isArray(history) && history.length && !page.lossDrawn) {
    $("loss-chart").replaceChildren(lossChart(history));
  }
}

async function pollJob(jobId) {
  clearTimeout(page.timer);
  if (!apiKey()) return;
  let job;
  try {
    job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
    $("page-error").hidden = true;
    showJob(job);
  } catch (err) {
    pageError(err.status === 404 ? `No job ${jobId} for this key.` : `Could not load the job: ${err.problem.detail}`);
    if (err.status === 404 || err.status === 401) return;
  }
  if (job && TERMINAL.has(job.state)) {
    if (job.state === "succeeded" && !page.resultShown) {
      try {
        await showResult(jobId);
        page.resultShown = true;
      } catch (err) {
        pageError(`Could not load the result: ${err.problem ? err.problem.detail : err.message}`);
      }
    }
    return;
  }
  page.timer = setTimeout(() => pollJob(jobId), document.hidden ? 3000 : 1000);
}

async function cancelJob(jobId) {
  const button = $("job-cancel");
  button.disabled = true;
  $("job-cancel-status").textContent = "Asking the service to cancel…";
  try {
    await api("DELETE", `/v1/jobs/${encodeURIComponent(jobId)}`);
    $("job-cancel-status").textContent = "Cancel requested; the job stops after its current step.";
    pollJob(jobId);
  } catch (err) {
    button.disabled = false;
    $("job-cancel-status").textContent = `Could not cancel: ${err.problem.detail}`;
  }
}

async function loadFamilies() {
  try {
    const resp = await fetch(`${ROOT}/ui/meta`);
    if (resp.ok) page.families = (await resp.json()).families;
  } catch { /* the resolved target's sizes are left out */ }
}

export async function startJobPage(jobId) {
  $("view-job").hidden = false;
  $("job-id").textContent = jobId;
  $("job-cancel").addEventListener("click", () => cancelJob(jobId));
  await loadFamilies();
  document.addEventListener("ligo-key", () => { pageError(""); pollJob(jobId); });
  if (!apiKey()) pageError("Enter your API key to see this job.");
  pollJob(jobId);
}
