// The job list under the form: state, stage and progress of each job, polled while the view
// is shown (faster while some job is active, paused while the tab is hidden).

import { api, apiKey, ROOT } from "./api.js";
import { $, h } from "./dom.js";
import { fmt } from "./format.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOBS_PAGE = 20;

const list = {
  limit: JOBS_PAGE,
  cursor: null,
  timer: 0,
};

function progressCell(job) {
  const p = job.progress || {};
  const total = Number(p.total) || 0;
  const step = Number(p.step) || 0;
  const value = job.state === "succeeded" ? 1 : total ? Math.min(step / total, 1) : 0;
  const text = total ? `${step}/${total}` : job.state === "succeeded" ? "done" : "";
  const loss = fmt.loss(p.loss);
  return [
    h("progress", { max: 1, value, "aria-label": `Progress of job ${job.id}` }),
    " ",
    h("span", { class: "mono", text: text + (loss ? ` · loss ${loss}` : "") }),
  ];
}

export function stateBadge(job) {
  const label = job.cancel_requested && !TERMINAL.has(job.state) ? `${job.state} (cancelling)` : job.state;
  return h("span", { class: `state state-${job.state}`, "data-state": job.state, text: label });
}

function jobRow(job) {
  return h("tr", { "data-job-id": job.id },
    h("td", {}, h("a", { href: `${ROOT}/ui/jobs/${encodeURIComponent(job.id)}` }, h("code", { text: String(job.id).slice(0, 12) }))),
    h("td", { text: fmt.time(job.created_at) }),
    h("td", { text: fmt.target(job.target) }),
    h("td", { text: job.strategy || "" }),
    h("td", {}, stateBadge(job)),
    h("td", { class: "stage", text: TERMINAL.has(job.state) ? "" : job.stage || "" }),
    h("td", {}, progressCell(job)));
}

// Update rows in place (keyed by job id) so that a focused link keeps its focus while polling.
function renderJobs(items) {
  const body = $("jobs-body");
  const existing = new Map([...body.rows].map((r) => [r.dataset.jobId, r]));
  const wanted = items.map((job) => {
    const fresh = jobRow(job);
    const old = existing.get(String(job.id));
    if (!old) return fresh;
    [...fresh.cells].forEach((cell, i) => {
      if (i > 0 && old.cells[i].innerHTML !== cell.innerHTML) old.cells[i].replaceChildren(...cell.childNodes);
    });
    return old;
  });
  for (const [id, row] of existing) if (!items.some((j) => String(j.id) === id)) row.remove();
  wanted.forEach((row, i) => {
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
  });
  $("jobs-empty").hidden = items.length > 0;
}

export async function refreshJobs() {
  clearTimeout(list.timer);
  if (!apiKey()) return;
  const filter = $("jobs-state").value;
  const query = new URLSearchParams({ limit: String(Math.min(list.limit, 100)) });
  if (filter) query.set("state", filter);
  let active = false;
  try {
    const page = await api("GET", `/v1/jobs?${query}`);
    $("jobs-error").textContent = "";
    renderJobs(page.items || []);
    list.cursor = page.next_cursor || null;
    $("jobs-more").hidden = !list.cursor || list.limit >= 100;
    active = (page.items || []).some((j) => !TERMINAL.has(j.state));
  } catch (err) {
    if (err.status !== 401) $("jobs-error").textContent = `Could not load jobs: ${err.problem.detail}`;
  }
  if (!$("view-new").hidden) list.timer = setTimeout(pollJobs, active ? 1500 : 5000);
}

function pollJobs() {
  if (document.hidden) { list.timer = setTimeout(pollJobs, 2000); return; }
  refreshJobs();
}

function moreJobs() {
  list.limit += JOBS_PAGE;
  refreshJobs();
}

// Rows shown with a key that has been forgotten.
export function clearJobs() {
  $("jobs-body").replaceChildren();
}

export function startJobList() {
  $("jobs-state").addEventListener("change", () => { list.limit = JOBS_PAGE; refreshJobs(); });
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("jobs-more").addEventListener("click", moreJobs);
}
