// LiGO growth service web form. Plain JavaScript modules, no build step, no external assets.
//
// Two views on one page: /ui/ (upload, target, estimate preview, job list) and
// /ui/jobs/{id} (one job: progress, fitting-loss chart, downloads, estimate, report).
// Everything goes through the public /v1 API with the key kept in sessionStorage.
//
// This module is the entry point: it picks the view by path and wires the modules together.
//   api.js       fetch wrapper, API key, problem details      key.js     the API key form
//   dom.js       element builders, the page error banner      fields.js  errors next to inputs
//   format.js    numbers, sizes, dates                        chart.js   the fitting-loss chart
//   upload.js    step 1: checkpoint upload and what was detected
//   form.js      steps 2-3: target, strategy, options, estimate preview, submit
//   estimate.js  an estimate's table (form preview and job page)
//   jobs.js      the job list                                 job.js     one job's page

import { apiKey, ROOT } from "./api.js";
import { $, pageError } from "./dom.js";
import { scheduleEstimate, startForm, useCheckpoint } from "./form.js";
import { startJobPage } from "./job.js";
import { clearJobs, refreshJobs, startJobList } from "./jobs.js";
import { startKeyForm } from "./key.js";
import { startUpload } from "./upload.js";

async function startNewJob() {
  $("view-new").hidden = false;
  let meta;
  try {
    const resp = await fetch(`${ROOT}/ui/meta`);
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    meta = await resp.json();
  } catch (err) {
    pageError(`Could not load the form's presets and strategies (${err.message}). Reload to try again.`);
    return;
  }
  startForm(meta, { onJobCreated: () => refreshJobs() });
  startUpload(meta, { onCheckpoint: useCheckpoint });
  startJobList();
  document.addEventListener("ligo-key", () => { refreshJobs(); scheduleEstimate(); });
  refreshJobs();
}

function start() {
  startKeyForm({ onForget: clearJobs });
  const path = location.pathname.slice(ROOT.length);
  const jobMatch = path.match(/^\/ui\/jobs\/([^/]+)\/?$/);
  if (!apiKey()) $("api-key").focus();
  if (jobMatch) startJobPage(decodeURIComponent(jobMatch[1]));
  else startNewJob();
}

document.addEventListener("DOMContentLoaded", start);
