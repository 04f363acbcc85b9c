// Steps 2 and 3 of the form: target (a preset of the checkpoint's family or custom sizes),
// strategy, fitting options and training plan with the service's defaults; the values read and
// checked; the estimate preview (debounced POST /v1/estimate); and submitting the job.

import { api, apiKey, ROOT } from "./api.js";
import { $, h } from "./dom.js";
import { renderEstimate } from "./estimate.js";
import { clearFieldErrors, setFieldError, showProblem } from "./fields.js";
import { requireKey } from "./key.js";
import { SIZE_FIELDS } from "./upload.js";

const CUSTOM = "__custom__";
const ESTIMATE_DELAY_MS = 300;

const form = {
  meta: null,           // GET /ui/meta
  checkpoint: null,     // the 201 answer of POST /v1/checkpoints
  family: null,         // meta.families[checkpoint.family]
  sources: null,        // the checkpoint's sizes {layers, hidden, ...}
  onJobCreated: null,   // (job) => void
  estimateTimer: 0,
  estimateAbort: null,
  estimateSeq: 0,
  idempotencyKey: null,
};

function randomKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // works outside secure contexts, unlike randomUUID
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ------------------------------------------------------------------ the checkpoint

// An accepted checkpoint (uploaded, or kept from earlier in the session) unlocks the form.
export function useCheckpoint({ checkpoint, family, sources }) {
  form.checkpoint = checkpoint;
  form.family = family;
  form.sources = sources;
  // Fitting sequences cannot be longer than the model's position table.
  const config = checkpoint.config || {};
  const positions = Number(config.max_position_embeddings || config.n_positions) || 0;
  const seq = $("fit-seq");
  seq.max = positions ? String(positions) : "";
  if (positions && Number(seq.value) > positions) seq.value = String(positions);
  $("job-form-locked").hidden = true;
  fillTargets();
  updateSubmit();
  scheduleEstimate();
}

// ------------------------------------------------------------------ target, strategy, plan

function presetFits(p) {
  const s = form.sources;
  const sizes = { layers: p.layers, hidden: p.hidden, heads: p.heads, ffn: p.ffn, kv_heads: p.kv_heads };
  const fields = form.family.fields;
  const smaller = fields.some((f) => sizes[f] < s[f]);
  const same = fields.every((f) => sizes[f] === s[f]);
  return smaller ? "smaller than the checkpoint" : same ? "same size as the checkpoint" : "";
}

function fillTargets() {
  const select = $("target-preset");
  const previous = select.value;
  const options = [];
  let firstFit = null;
  for (const p of form.family.presets) {
    const why = presetFits(p);
    if (!why && firstFit === null) firstFit = p.name;
    const kv = form.family.fields.includes("kv_heads") ? `, ${p.kv_heads} KV heads` : "";
    const label = `${p.name}: ${p.layers} layers, hidden ${p.hidden}, ${p.heads} heads${kv}, FFN ${p.ffn}` +
      (p.note ? ` (${p.note})` : "") + (why ? ` [${why}]` : "");
    options.push(h("option", { value: p.name, disabled: !!why, text: label }));
  }
  options.push(h("option", { value: CUSTOM, text: "Custom sizes…" }));
  select.replaceChildren(...options);
  const keep = [...select.options].find((o) => o.value === previous && !o.disabled);
  select.value = keep ? previous : firstFit || CUSTOM;

  // Custom fields start from the checkpoint with twice the layers, a growth that always fits.
  const s = form.sources;
  for (const f of SIZE_FIELDS) {
    const input = $(`custom-${f}`);
    if (!input) continue;
    input.value = f in s ? (f === "layers" ? 2 * s.layers : s[f]) : "";
    input.min = f in s ? String(s[f]) : "1";
  }
  $("custom-kv-heads-field").hidden = !form.family.fields.includes("kv_heads");
  onTargetChange();
}

function onTargetChange() {
  const custom = $("target-preset").value === CUSTOM;
  $("custom-fields").hidden = !custom;
  const p = form.family && form.family.presets.find((x) => x.name === $("target-preset").value);
  $("target-hint").textContent = custom
    ? "Each size at least the checkpoint's; sizes left as they are stay the checkpoint's."
    : p ? `A ${p.model_type} model; vocabulary and positions stay the checkpoint's.` : "";
}

function targetSpec() {
  const select = $("target-preset");
  if (!select.value) return { error: ["target-preset", "Upload a checkpoint, then choose a target."] };
  if (select.value !== CUSTOM) return { spec: select.value };
  const parts = [];
  for (const f of form.family.fields) {
    const input = $(`custom-${f}`);
    const v = input.value.trim();
    if (input.validity.badInput || (v && !/^\d+$/.test(v))) return { error: [`custom-${f}`, "Enter a whole number."] };
    if (!v) return { error: [`custom-${f}`, "Required."] };
    parts.push(`${f}=${v}`);
  }
  return { spec: parts.join(",") };
}

// A target error names a config attribute (n_embd, num_attention_heads, ...) or one of our
// size fields; with custom sizes it belongs next to that size's input.
function targetInput(message) {
  if ($("target-preset").value !== CUSTOM || !form.family) return "target-preset";
  const byKey = {};
  for (const [field, key] of Object.entries(form.family.config_keys)) { byKey[key] = field; byKey[field] = field; }
  for (const word of String(message).match(/[A-Za-z_]+/g) || []) {
    const field = byKey[word];
    if (field && SIZE_FIELDS.includes(field) && $(`custom-${field}`)) return `custom-${field}`;
  }
  return "target-preset";
}

function fillStrategies() {
  const box = $("strategy-options");
  const chosen = box.querySelector("input:checked");
  const current = chosen ? chosen.value : form.meta.defaults.strategy;
  box.replaceChildren(...form.meta.strategies.map((s) => {
    const id = `strategy-${s.name}`;
    return h("label", { for: id },
      h("input", { type: "radio", name: "strategy", id, value: s.name, checked: s.name === current,
        "aria-describedby": `${id}-summary` }),
      h("span", { class: "name", text: s.name }),
      h("span", { class: "summary", id: `${id}-summary`, text: s.summary }));
  }));
}

// The spread field's range and per-strategy defaults, as the engine's catalog gives them.
function fillSpread() {
  const s = form.meta.spread;
  if (!s) return;
  const input = $("growth-spread");
  input.min = s.low;
  input.max = s.high;
  $("growth-spread-hint").textContent = `${s.low} to ${s.high} (default ${s.defaults}). 0 keeps the grown ` +
    "model's outputs exactly the small model's; larger values start it a little off them and it trains " +
    "better. Not for net2net.";
}

function fillPlan() {
  const d = form.meta.defaults;
  const gpu = $("plan-gpu");
  const gpus = form.meta.gpus.length ? form.meta.gpus : [{ name: "" }];
  gpu.replaceChildren(...gpus.map((g) => h("option", {
    value: g.name,
    title: g.source,
    text: g.name ? `${g.name} (${g.peak_tflops} TFLOPS)` : "service default",
  })));
  if (d.gpu) gpu.value = d.gpu;
  gpu.addEventListener("change", showListPrice);
  showListPrice();
  const set = (id, v) => { if (v !== undefined && v !== null && $(id).value === "") $(id).value = v; };
  set("fit-steps", d.fit_steps);
  set("fit-batch", d.fit_batch);
  set("fit-seq", d.seq_len);
  set("seed", d.seed);
  set("plan-tokens", d.tokens);
  set("plan-price", d.price_per_gpu_hour);
  set("plan-util", d.utilisation);
  if (d.tokens_per_parameter) {
    $("plan-tokens").placeholder = `${d.tokens_per_parameter} × parameters`;
    $("plan-tokens-hint").textContent = `e.g. 3e11; empty: ${d.tokens_per_parameter} tokens per parameter of the grown model (compute-optimal).`;
  }
}

// An empty price means the GPU's assumed list price: show it as the placeholder.
function showListPrice() {
  const g = form.meta.gpus.find((x) => x.name === $("plan-gpu").value);
  $("plan-price").placeholder = g ? `${g.price} (list price)` : "list price";
}

// ------------------------------------------------------------------ reading the form

function strategy() {
  const chosen = $("strategy-options").querySelector("input:checked");
  return chosen ? chosen.value : "";
}

// Numeric inputs: undefined when empty, an error when the browser could not parse the text.
function numberField(id, { integer = false, required = false } = {}) {
  const input = $(id);
  const text = input.value.trim();
  if (input.validity.badInput) return { error: [id, "Enter a number."] };
  if (!text) return required ? { error: [id, "Required."] } : { value: undefined };
  const value = Number(text);
  if (!Number.isFinite(value)) return { error: [id, "Enter a number."] };
  if (integer && !Number.isInteger(value)) return { error: [id, "Enter a whole number."] };
  return { value };
}

// Read the form; field errors go next to their inputs. Returns null when something is off.
function readForm({ quiet = false } = {}) {
  const errors = [];
  const take = (r) => { if (r.error) errors.push(r.error); return r.value; };
  const target = targetSpec();
  if (target.error) errors.push(target.error);
  const values = {
    target: target.spec,
    strategy: strategy(),
    steps: take(numberField("fit-steps", { integer: true })),
    batch_size: take(numberField("fit-batch", { integer: true })),
    seq_len: take(numberField("fit-seq", { integer: true })),
    lr: take(numberField("fit-lr")),
    seed: take(numberField("seed", { integer: true })),
    spread: take(numberField("growth-spread")),
    data_uri: $("fit-data").value.trim() || undefined,
    tokens: take(numberField("plan-tokens", { integer: true })),
    gpu: $("plan-gpu").value || undefined,
    price_per_gpu_hour: take(numberField("plan-price")),
    utilisation: take(numberField("plan-util")),
  };
  if (!values.strategy) errors.push(["strategy", "Choose a strategy."]);
  if (!quiet) for (const [id, message] of errors) setFieldError(id, message);
  return errors.length ? { errors } : { values };
}

const drop = (obj) => Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== ""));

// What the estimate and the job both start with: the checkpoint, the target and the strategy.
const subject = (v) => ({ checkpoint_id: form.checkpoint.id, target: v.target, strategy: v.strategy });

// ------------------------------------------------------------------ estimate preview

export function scheduleEstimate() {
  clearTimeout(form.estimateTimer);
  form.estimateTimer = setTimeout(runEstimate, ESTIMATE_DELAY_MS);
}

async function runEstimate() {
  if (!form.checkpoint || !apiKey()) return;
  clearFieldErrors($("job-form"));
  const read = readForm();
  updateSubmit(read);
  if (!read.values) {
    $("estimate").replaceChildren(h("p", { class: "muted", text: "Fix the fields marked in red to see the estimate." }));
    return;
  }
  const v = read.values;
  const body = drop({
    ...subject(v),
    fit_steps: v.steps,
    fit_batch: v.batch_size,
    seq_len: v.seq_len,
    tokens: v.tokens,
    gpu: v.gpu,
    price_per_gpu_hour: v.price_per_gpu_hour,
    utilisation: v.utilisation,
  });
  if (form.estimateAbort) form.estimateAbort.abort();
  const abort = new AbortController();
  form.estimateAbort = abort;
  const seq = ++form.estimateSeq;
  $("estimate").setAttribute("aria-busy", "true");
  try {
    const estimate = await api("POST", "/v1/estimate", body, { signal: abort.signal });
    if (seq !== form.estimateSeq) return;
    $("estimate").replaceChildren(renderEstimate(estimate));
  } catch (err) {
    if (err.name === "AbortError" || seq !== form.estimateSeq) return;
    $("estimate").replaceChildren(h("p", { class: "muted",
      text: "The service cannot estimate these settings; see the message next to the field concerned." }));
    showProblem(err.problem, "job-form", targetInput);
  } finally {
    if (seq === form.estimateSeq) $("estimate").setAttribute("aria-busy", "false");
  }
}

// ------------------------------------------------------------------ submit

function updateSubmit(read) {
  const ok = !!form.checkpoint && (!read || !!read.values);
  $("submit-job").disabled = !ok;
}

async function submitJob(event) {
  event.preventDefault();
  // Leaving a field for the button schedules a preview; it would wipe this answer's errors.
  clearTimeout(form.estimateTimer);
  clearFieldErrors($("job-form"));
  $("job-created").replaceChildren();
  if (!requireKey()) return;
  if (!form.checkpoint) {
    setFieldError("upload-file", "Upload a checkpoint first.");
    $("upload-file").focus();
    return;
  }
  const read = readForm();
  if (!read.values) {
    const first = $(read.errors[0][0]);
    if (first) first.focus();
    return;
  }
  const v = read.values;
  const body = drop({
    ...subject(v),
    fit: drop({ steps: v.steps, lr: v.lr, batch_size: v.batch_size, seq_len: v.seq_len, data_uri: v.data_uri }),
    growth: drop({ spread: v.spread }),
    plan: drop({ tokens: v.tokens, gpu: v.gpu, price_per_gpu_hour: v.price_per_gpu_hour, utilisation: v.utilisation }),
    seed: v.seed,
  });
  // One key per intended job: a double click or a retry after a network error makes one job.
  if (!form.idempotencyKey) form.idempotencyKey = randomKey();
  const button = $("submit-job");
  button.disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", body, { headers: { "Idempotency-Key": form.idempotencyKey } });
    form.idempotencyKey = null;
    $("job-created").replaceChildren("Job ", h("a", { href: `${ROOT}/ui/jobs/${encodeURIComponent(job.id)}`, text: job.id }),
      ` is ${job.state}.`);
    form.onJobCreated(job);
  } catch (err) {
    if (err.status && err.status !== 409) form.idempotencyKey = null;
    showProblem(err.problem, "job-form", targetInput);
  } finally {
    button.disabled = false;
  }
}

export function startForm(meta, { onJobCreated }) {
  form.meta = meta;
  form.onJobCreated = onJobCreated;
  fillStrategies();
  fillSpread();
  fillPlan();
  $("target-preset").addEventListener("change", onTargetChange);
  const jobForm = $("job-form");
  jobForm.addEventListener("input", scheduleEstimate);
  jobForm.addEventListener("change", scheduleEstimate);
  jobForm.addEventListener("submit", submitJob);
}
