// Field errors: a message under its input (marked aria-invalid), and a problem's errors[]
// placed next to the inputs their `field` names.

import { $ } from "./dom.js";

// Server field names (estimate and job bodies, FastAPI locations) -> the input they concern.
const FIELD_INPUTS = {
  target: "target-preset", strategy: "strategy",
  steps: "fit-steps", fit_steps: "fit-steps", batch_size: "fit-batch", fit_batch: "fit-batch",
  seq_len: "fit-seq", lr: "fit-lr", data_uri: "fit-data", data: "fit-data", seed: "seed", spread: "growth-spread",
  tokens: "plan-tokens", gpu: "plan-gpu", price_per_gpu_hour: "plan-price",
  utilisation: "plan-util", utilization: "plan-util",
  checkpoint_id: "upload-file", source: "upload-file", filename: "upload-file", file: "upload-file",
  layers: "custom-layers", hidden: "custom-hidden", heads: "custom-heads", kv_heads: "custom-kv_heads", ffn: "custom-ffn",
};

export function setFieldError(inputId, message) {
  const box = $(`${inputId}-error`);
  if (!box) return false;
  box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
  const input = inputId === "strategy" ? $("strategy-field") : $(inputId);
  if (input) input.setAttribute("aria-invalid", "true");
  return true;
}

export function clearFieldErrors(container) {
  for (const box of container.querySelectorAll(".field-error")) box.textContent = "";
  for (const el of container.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// `targetInput(message)` says which input a target error belongs under (the form knows).
function inputForField(field, message, targetInput) {
  const parts = String(field || "").split(/[.\/\[\]]+/).filter((p) => p && p !== "body" && p !== "query");
  for (let i = parts.length - 1; i >= 0; i--) {
    const id = FIELD_INPUTS[parts[i]];
    if (id === "target-preset") return targetInput(message);
    if (id) return id;
  }
  return null;
}

// Put each of a problem's field errors next to its input; the rest goes to `fallbackId`.
export function showProblem(problem, fallbackId, targetInput) {
  const left = [];
  for (const e of problem.errors || []) {
    const id = inputForField(e.field, e.message, targetInput);
    if (!(id && setFieldError(id, e.message))) left.push(e.field ? `${e.field}: ${e.message}` : e.message);
  }
  if (!(problem.errors || []).length && problem.status === 422) {
    // A 422 without a field list: the message usually names the field itself.
    const id = /target|layer|hidden|head|ffn|n_embd|n_inner|intermediate|vocab|position/i.test(problem.detail)
      ? targetInput(problem.detail) : null;
    if (id && setFieldError(id, problem.detail)) return;
  }
  const text = [problem.errors && problem.errors.length && !left.length ? "" : problem.detail, ...left]
    .filter(Boolean).join(" ");
  if (text) setFieldError(fallbackId, text);
}
