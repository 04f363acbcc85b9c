// Step 1 of the form: upload a checkpoint archive (with a progress bar), show what the service
// detected (family, sizes, parameters, config), and keep it for this tab's session. The rest
// of the form learns of an accepted checkpoint through `onCheckpoint`.

import { apiKey, keyRefused, parseBody, ROOT, toProblem } from "./api.js";
import { $, facts, h } from "./dom.js";
import { clearFieldErrors, setFieldError } from "./fields.js";
import { fmt, sizesOf } from "./format.js";
import { requireKey } from "./key.js";

const CHECKPOINT_STORE = "ligo.checkpoint";
export const SIZE_FIELDS = ["layers", "hidden", "heads", "kv_heads", "ffn"];

const step = {
  meta: null,           // GET /ui/meta
  onCheckpoint: null,   // ({checkpoint, family, sources}) => void
  xhr: null,            // the upload in flight
};

function upload(event) {
  event.preventDefault();
  const form = $("upload-form");
  clearFieldErrors(form);
  if (!requireKey()) return;
  const file = $("upload-file").files[0];
  if (!file) {
    setFieldError("upload-file", "Choose a checkpoint archive to upload.");
    $("upload-file").focus();
    return;
  }
  const xhr = new XMLHttpRequest();
  step.xhr = xhr;
  const bar = $("upload-progress");
  bar.hidden = false;
  bar.value = 0;
  $("upload-status").textContent = `Uploading ${file.name}…`;
  $("upload-button").disabled = true;
  $("upload-abort").hidden = false;

  xhr.open("POST", `${ROOT}/v1/checkpoints?filename=${encodeURIComponent(file.name)}`);
  xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.setRequestHeader("Accept", "application/json, application/problem+json");
  xhr.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    bar.value = (100 * e.loaded) / e.total;
    $("upload-status").textContent = `Uploading ${file.name}: ${fmt.bytes(e.loaded)} of ${fmt.bytes(e.total)}`;
  });
  xhr.upload.addEventListener("load", () => {
    bar.value = 100;
    $("upload-status").textContent = "Checking the checkpoint…";
  });
  const done = () => {
    step.xhr = null;
    $("upload-button").disabled = false;
    $("upload-abort").hidden = true;
  };
  xhr.addEventListener("load", () => {
    done();
    const body = parseBody(xhr.responseText, xhr.getResponseHeader("Content-Type"));
    if (xhr.status === 201 || xhr.status === 200) {
      $("upload-status").textContent = `Uploaded ${file.name}.`;
      setCheckpoint(body);
      $("target-preset").focus();
      return;
    }
    bar.hidden = true;
    const problem = toProblem(xhr.status, body, xhr.statusText);
    if (xhr.status === 401) keyRefused(problem);
    $("upload-status").textContent = `Upload refused (HTTP ${xhr.status}).`;
    setFieldError("upload-file", problem.detail);
    for (const e of problem.errors) if (e.message && e.message !== problem.detail) setFieldError("upload-file", e.message);
  });
  xhr.addEventListener("error", () => {
    done();
    bar.hidden = true;
    $("upload-status").textContent = "Upload failed.";
    setFieldError("upload-file", "The connection to the service broke off during the upload.");
  });
  xhr.addEventListener("abort", () => {
    done();
    bar.hidden = true;
    $("upload-status").textContent = "Upload stopped.";
  });
  xhr.send(file);
}

function setCheckpoint(ckpt) {
  const family = ckpt && step.meta.families[ckpt.family];
  if (!family) {
    setFieldError("upload-file", `The service accepted the checkpoint but its family ${ckpt && ckpt.family} is unknown to this page.`);
    return;
  }
  const sources = sizesOf(ckpt.config || {}, family);
  sessionStorage.setItem(CHECKPOINT_STORE, JSON.stringify(ckpt));

  const s = sources;
  facts($("checkpoint-facts"), [
    ["Checkpoint", h("code", { text: ckpt.id })],
    ["File", `${ckpt.filename || ""} (${fmt.bytes(ckpt.size_bytes)})`],
    ["Family", `${family.name} (${family.objective === "mlm" ? "masked LM" : "causal LM"})`],
    ["Model type", ckpt.model_type],
    ["Parameters", ckpt.num_parameters ? `${fmt.count(ckpt.num_parameters)} (${fmt.int(ckpt.num_parameters)})` : ""],
    ["Sizes", SIZE_FIELDS.filter((f) => f in s).map((f) => `${f} ${s[f]}`).join(", ")],
    ["Vocabulary", ckpt.config && ckpt.config.vocab_size],
    ["Tokenizer", ckpt.has_tokenizer === undefined ? "" : ckpt.has_tokenizer ? "included" : "not included"],
    ["SHA-256", h("code", { text: ckpt.sha256 || "" })],
  ]);
  $("checkpoint-config").textContent = JSON.stringify(ckpt.config, null, 2);
  $("checkpoint-info").hidden = false;
  step.onCheckpoint({ checkpoint: ckpt, family, sources });
}

export function startUpload(meta, { onCheckpoint }) {
  step.meta = meta;
  step.onCheckpoint = onCheckpoint;
  $("upload-form").addEventListener("submit", upload);
  $("upload-button").disabled = false;  // off in the page until the form can handle it (never a native submit)
  $("upload-abort").addEventListener("click", () => step.xhr && step.xhr.abort());
  $("upload-file").addEventListener("change", () => clearFieldErrors($("upload-form")));
  // The checkpoint this tab uploaded last (or one put there for it) survives a reload.
  const saved = sessionStorage.getItem(CHECKPOINT_STORE);
  if (saved) {
    try { setCheckpoint(JSON.parse(saved)); } catch { sessionStorage.removeItem(CHECKPOINT_STORE); }
  }
}
