// LiGO growth service web form. Plain JavaScript, no build step, no external assets.
//
// Two views on one page: /ui/ (upload, target, estimate preview, job list) and
// /ui/jobs/{id} (one job: progress, fitting-loss chart, downloads, estimate, report).
// Everything goes through the public /v1 API with the key kept in sessionStorage.
"use strict";

(() => {
  const rootMeta = document.querySelector('meta[name="ligo-root"]');
  const ROOT = rootMeta && !rootMeta.content.includes("{{") ? rootMeta.content.replace(/\/$/, "") : "";
  const KEY_STORE = "ligo.apiKey";
  const CHECKPOINT_STORE = "ligo.checkpoint";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const CUSTOM = "__custom__";
  const SIZE_FIELDS = ["layers", "hidden", "heads", "kv_heads", "ffn"];
  const JOBS_PAGE = 20;
  const ESTIMATE_DELAY_MS = 300;

  const $ = (id) => document.getElementById(id);
  const ui = {
    meta: null,
    checkpoint: null,     // the 201 answer of POST /v1/checkpoints
    family: null,         // meta.families[checkpoint.family]
    sources: null,        // the checkpoint's sizes {layers, hidden, ...}
    estimateTimer: 0,
    estimateAbort: null,
    estimateSeq: 0,
    idempotencyKey: null,
    jobsLimit: JOBS_PAGE,
    jobsCursor: null,
    jobsTimer: 0,
    jobTimer: 0,
    jobResultShown: false,
    lossDrawn: null,      // "points:last step" of the chart on screen
    upload: null,
  };

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function facts(dl, rows) {
    dl.replaceChildren(...rows.filter((r) => r && r[1] !== undefined && r[1] !== null && r[1] !== "")
      .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);  // works outside secure contexts, unlike randomUUID
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------ formatting

  const fmt = {
    int: (n) => Number(n).toLocaleString("en-US"),
    count(n) {
      n = Number(n);
      if (!Number.isFinite(n)) return "–";
      for (const [unit, div] of [["T", 1e12], ["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
        if (Math.abs(n) >= div) return `${(n / div).toPrecision(3)}${unit}`;
      }
      return String(n);
    },
    flops(x) {
      x = Number(x);
      if (!Number.isFinite(x)) return "–";
      if (x === 0) return "0";
      return x.toExponential(2).replace("e+", "e");
    },
    hours(x) {
      x = Number(x);
      if (!Number.isFinite(x)) return "–";
      if (x === 0) return "0";
      return x < 0.01 ? x.toExponential(1).replace("e+", "e")
        : x.toLocaleString("en-US", { maximumSignificantDigits: 3 });
    },
    money(x, currency) {
      x = Number(x);
      if (!Number.isFinite(x)) return "–";
      if (x > 0 && x < 0.01) return `< ${fmt.money(0.01, currency)}`;
      const digits = Math.abs(x) < 100 ? 2 : 0;
      try {
        return x.toLocaleString("en-US", { style: "currency", currency: currency || "USD",
          minimumFractionDigits: digits, maximumFractionDigits: digits });
      } catch {
        return `${x.toFixed(digits)} ${currency}`;
      }
    },
    pct(f) {
      f = Number(f);
      return Number.isFinite(f) ? `${(f * 100).toFixed(1)}%` : "–";
    },
    bytes(n) {
      n = Number(n);
      if (!Number.isFinite(n)) return "–";
      for (const [unit, div] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
        if (n >= div) return `${(n / div).toFixed(1)} ${unit}`;
      }
      return `${n} B`;
    },
    time(s) {
      if (!s) return "";
      const d = new Date(s);
      return Number.isNaN(d.getTime()) ? String(s) : d.toLocaleString();
    },
    loss: (x) => (x === null || x === undefined || !Number.isFinite(Number(x)) ? "" : Number(x).toFixed(4)),
    target(t) {
      if (t === null || t === undefined) return "";
      if (typeof t === "string") return t;
      return Object.entries(t).map(([k, v]) => `${k}=${v}`).join(",");
    },
  };

  // ------------------------------------------------------------------ API access

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORE) || "";
  }

  // Any error answer as an RFC 9457 problem, including FastAPI's plain {"detail": [...]}.
  function toProblem(status, body, statusText) {
    const problem = { status, title: statusText || `HTTP ${status}`, detail: "", errors: [] };
    if (body && typeof body === "object") {
      if (typeof body.title === "string") problem.title = body.title;
      if (typeof body.type === "string") problem.type = body.type;
      if (typeof body.detail === "string") problem.detail = body.detail;
      if (Array.isArray(body.errors)) {
        problem.errors = body.errors.map((e) => ({ field: String(e.field ?? ""), message: String(e.message ?? e.msg ?? "") }));
      }
      if (Array.isArray(body.detail)) {
        problem.errors = body.detail.map((e) => ({
          field: Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body" && p !== "query").join(".") : "",
          message: String(e.msg ?? ""),
        }));
        problem.detail = "Some fields are not valid.";
      }
    } else if (typeof body === "string" && body.trim()) {
      problem.detail = body.trim().slice(0, 300);
    }
    if (!problem.detail) {
      problem.detail = {
        401: "The service refused the API key.",
        404: "Not found.",
        413: "The archive is larger than the service accepts.",
      }[status] || problem.title;
    }
    return problem;
  }

  function parseBody(text, contentType) {
    if (!text) return null;
    if ((contentType || "").includes("json")) {
      try { return JSON.parse(text); } catch { return text; }
    }
    return text;
  }

  async function api(method, path, body, { signal, headers } = {}) {
    const hdrs = { Accept: "application/json, application/problem+json", ...(headers || {}) };
    const key = apiKey();
    if (key) hdrs.Authorization = `Bearer ${key}`;
    let payload;
    if (body !== undefined) {
      hdrs["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(ROOT + path, { method, headers: hdrs, body: payload, signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, { status: 0, title: "Network error", detail: `The service did not answer (${err.message}).`, errors: [] });
    }
    const data = parseBody(await resp.text(), resp.headers.get("Content-Type"));
    if (!resp.ok) {
      const err = new ApiError(resp.status, toProblem(resp.status, data, resp.statusText));
      if (resp.status === 401) keyRefused(err.problem);
      throw err;
    }
    return data;
  }

  // ------------------------------------------------------------------ field errors

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

  function setFieldError(inputId, message) {
    const box = $(`${inputId}-error`);
    if (!box) return false;
    box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
    const input = inputId === "strategy" ? $("strategy-field") : $(inputId);
    if (input) input.setAttribute("aria-invalid", "true");
    return true;
  }

  function clearFieldErrors(container) {
    for (const box of container.querySelectorAll(".field-error")) box.textContent = "";
    for (const el of container.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  }

  // A target error names a config attribute (n_embd, num_attention_heads, ...) or one of our
  // size fields; with custom sizes it belongs next to that size's input.
  function targetInput(message) {
    if ($("target-preset").value !== CUSTOM || !ui.family) return "target-preset";
    const byKey = {};
    for (const [field, key] of Object.entries(ui.family.config_keys)) { byKey[key] = field; byKey[field] = field; }
    for (const word of String(message).match(/[A-Za-z_]+/g) || []) {
      const field = byKey[word];
      if (field && SIZE_FIELDS.includes(field) && $(`custom-${field}`)) return `custom-${field}`;
    }
    return "target-preset";
  }

  function inputForField(field, message) {
    const parts = String(field || "").split(/[.\/\[\]]+/).filter((p) => p && p !== "body" && p !== "query");
    for (let i = parts.length - 1; i >= 0; i--) {
      const id = FIELD_INPUTS[parts[i]];
      if (id === "target-preset") return targetInput(message);
      if (id) return id;
    }
    return null;
  }

  // Put each of a problem's field errors next to its input; the rest goes to `fallbackId`.
  function showProblem(problem, fallbackId) {
    const left = [];
    for (const e of problem.errors || []) {
      const id = inputForField(e.field, e.message);
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

  // ------------------------------------------------------------------ API key

  function showKeyState() {
    const key = apiKey();
    $("key-forget").hidden = !key;
    $("api-key-status").textContent = key ? `Key in use (ends …${key.slice(-4)})` : "No key entered";
  }

  function keyRefused(problem) {
    $("api-key-error").textContent = `The service refused the key: ${problem.detail}`;
    $("api-key").setAttribute("aria-invalid", "true");
  }

  async function saveKey(event) {
    event.preventDefault();
    $("api-key-error").textContent = "";
    $("api-key").removeAttribute("aria-invalid");
    const key = $("api-key").value.trim();
    if (!key) {
      setFieldError("api-key", "Enter an API key.");
      $("api-key").focus();
      return;
    }
    const previous = apiKey();
    sessionStorage.setItem(KEY_STORE, key);
    try {
      await api("GET", "/v1/jobs?limit=1");
    } catch (err) {
      if (previous) sessionStorage.setItem(KEY_STORE, previous); else sessionStorage.removeItem(KEY_STORE);
      if (err.status !== 401) setFieldError("api-key", err.problem.detail);
      $("api-key").focus();
      showKeyState();
      return;
    }
    $("api-key").value = "";
    showKeyState();
    document.dispatchEvent(new Event("ligo-key"));
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORE);
    showKeyState();
    $("jobs-body").replaceChildren();
    $("api-key").focus();
  }

  function requireKey() {
    if (apiKey()) return true;
    $("api-key-error").textContent = "Enter your API key first.";
    $("api-key").setAttribute("aria-invalid", "true");
    $("api-key").focus();
    return false;
  }

  // ------------------------------------------------------------------ upload

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
    ui.upload = xhr;
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
      ui.upload = null;
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

  function sizesOf(config, family) {
    const get = (f) => (family.config_keys[f] ? config[family.config_keys[f]] : undefined);
    const hidden = Number(get("hidden"));
    const heads = Number(get("heads"));
    const sizes = { layers: Number(get("layers")), hidden, heads, ffn: Number(get("ffn") || 4 * hidden) };
    if (family.fields.includes("kv_heads")) sizes.kv_heads = Number(get("kv_heads") || heads);
    return sizes;
  }

  function setCheckpoint(ckpt) {
    const family = ckpt && ui.meta.families[ckpt.family];
    if (!family) {
      setFieldError("upload-file", `The service accepted the checkpoint but its family ${ckpt && ckpt.family} is unknown to this page.`);
      return;
    }
    ui.checkpoint = ckpt;
    ui.family = family;
    ui.sources = sizesOf(ckpt.config || {}, family);
    sessionStorage.setItem(CHECKPOINT_STORE, JSON.stringify(ckpt));

    const s = ui.sources;
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
    // Fitting sequences cannot be longer than the model's position table.
    const positions = Number((ckpt.config || {}).max_position_embeddings || (ckpt.config || {}).n_positions) || 0;
    const seq = $("fit-seq");
    seq.max = positions ? String(positions) : "";
    if (positions && Number(seq.value) > positions) seq.value = String(positions);
    $("checkpoint-info").hidden = false;
    $("job-form-locked").hidden = true;
    fillTargets();
    updateSubmit();
    scheduleEstimate();
  }

  // ------------------------------------------------------------------ target, strategy, plan

  function presetFits(p) {
    const s = ui.sources;
    const sizes = { layers: p.layers, hidden: p.hidden, heads: p.heads, ffn: p.ffn, kv_heads: p.kv_heads };
    const fields = ui.family.fields;
    const smaller = fields.some((f) => sizes[f] < s[f]);
    const same = fields.every((f) => sizes[f] === s[f]);
    return smaller ? "smaller than the checkpoint" : same ? "same size as the checkpoint" : "";
  }

  function fillTargets() {
    const select = $("target-preset");
    const previous = select.value;
    const options = [];
    let firstFit = null;
    for (const p of ui.family.presets) {
      const why = presetFits(p);
      if (!why && firstFit === null) firstFit = p.name;
      const kv = ui.family.fields.includes("kv_heads") ? `, ${p.kv_heads} KV heads` : "";
      const label = `${p.name}: ${p.layers} layers, hidden ${p.hidden}, ${p.heads} heads${kv}, FFN ${p.ffn}` +
        (p.note ? ` (${p.note})` : "") + (why ? ` [${why}]` : "");
      options.push(h("option", { value: p.name, disabled: !!why, text: label }));
    }
    options.push(h("option", { value: CUSTOM, text: "Custom sizes…" }));
    select.replaceChildren(...options);
    const keep = [...select.options].find((o) => o.value === previous && !o.disabled);
    select.value = keep ? previous : firstFit || CUSTOM;

    // Custom fields start from the checkpoint with twice the layers, a growth that always fits.
    const s = ui.sources;
    for (const f of SIZE_FIELDS) {
      const input = $(`custom-${f}`);
      if (!input) continue;
      input.value = f in s ? (f === "layers" ? 2 * s.layers : s[f]) : "";
      input.min = f in s ? String(s[f]) : "1";
    }
    $("custom-kv-heads-field").hidden = !ui.family.fields.includes("kv_heads");
    onTargetChange();
  }

  function onTargetChange() {
    const custom = $("target-preset").value === CUSTOM;
    $("custom-fields").hidden = !custom;
    const p = ui.family && ui.family.presets.find((x) => x.name === $("target-preset").value);
    $("target-hint").textContent = custom
      ? "Each size at least the checkpoint's; sizes left as they are stay the checkpoint's."
      : p ? `A ${p.model_type} model; vocabulary and positions stay the checkpoint's.` : "";
  }

  function targetSpec() {
    const select = $("target-preset");
    if (!select.value) return { error: ["target-preset", "Upload a checkpoint, then choose a target."] };
    if (select.value !== CUSTOM) return { spec: select.value };
    const parts = [];
    for (const f of ui.family.fields) {
      const input = $(`custom-${f}`);
      const v = input.value.trim();
      if (input.validity.badInput || (v && !/^\d+$/.test(v))) return { error: [`custom-${f}`, "Enter a whole number."] };
      if (!v) return { error: [`custom-${f}`, "Required."] };
      parts.push(`${f}=${v}`);
    }
    return { spec: parts.join(",") };
  }

  function fillStrategies() {
    const box = $("strategy-options");
    const chosen = box.querySelector("input:checked");
    const current = chosen ? chosen.value : ui.meta.defaults.strategy;
    box.replaceChildren(...ui.meta.strategies.map((s) => {
      const id = `strategy-${s.name}`;
      return h("label", { for: id },
        h("input", { type: "radio", name: "strategy", id, value: s.name, checked: s.name === current,
          "aria-describedby": `${id}-summary` }),
        h("span", { class: "name", text: s.name }),
        h("span", { class: "summary", id: `${id}-summary`, text: s.summary }));
    }));
  }

  function fillPlan() {
    const d = ui.meta.defaults;
    const gpu = $("plan-gpu");
    const gpus = ui.meta.gpus.length ? ui.meta.gpus : [{ name: "" }];
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
    const g = ui.meta.gpus.find((x) => x.name === $("plan-gpu").value);
    $("plan-price").placeholder = g ? `${g.price} (list price)` : "list price";
  }

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

  // ------------------------------------------------------------------ estimate preview

  function scheduleEstimate() {
    clearTimeout(ui.estimateTimer);
    ui.estimateTimer = setTimeout(runEstimate, ESTIMATE_DELAY_MS);
  }

  async function runEstimate() {
    if (!ui.checkpoint || !apiKey()) return;
    const form = $("job-form");
    clearFieldErrors(form);
    const read = readForm();
    updateSubmit(read);
    if (!read.values) {
      $("estimate").replaceChildren(h("p", { class: "muted", text: "Fix the fields marked in red to see the estimate." }));
      return;
    }
    const v = read.values;
    const body = drop({
      checkpoint_id: ui.checkpoint.id,
      target: v.target,
      strategy: v.strategy,
      fit_steps: v.steps,
      fit_batch: v.batch_size,
      seq_len: v.seq_len,
      tokens: v.tokens,
      gpu: v.gpu,
      price_per_gpu_hour: v.price_per_gpu_hour,
      utilisation: v.utilisation,
    });
    if (ui.estimateAbort) ui.estimateAbort.abort();
    const abort = new AbortController();
    ui.estimateAbort = abort;
    const seq = ++ui.estimateSeq;
    $("estimate").setAttribute("aria-busy", "true");
    try {
      const estimate = await api("POST", "/v1/estimate", body, { signal: abort.signal });
      if (seq !== ui.estimateSeq) return;
      $("estimate").replaceChildren(renderEstimate(estimate));
    } catch (err) {
      if (err.name === "AbortError" || seq !== ui.estimateSeq) return;
      $("estimate").replaceChildren(h("p", { class: "muted",
        text: "The service cannot estimate these settings; see the message next to the field concerned." }));
      showProblem(err.problem, "job-form");
    } finally {
      if (seq === ui.estimateSeq) $("estimate").setAttribute("aria-busy", "false");
    }
  }

  function pick(obj, keys) {
    if (!obj || typeof obj !== "object") return undefined;
    for (const k of keys) if (obj[k] !== undefined && obj[k] !== null) return obj[k];
    return undefined;
  }

  const HOURS_KEYS = ["gpu_hours", "gpu_h", "hours"];
  const COST_KEYS = ["cost_usd", "cost", "usd"];

  function renderEstimate(e) {
    const wrap = h("div", { class: "estimate" });
    const s = e.savings || {};
    const frac = Number(s.fraction);
    wrap.append(h("p", { class: `savings${frac < 0 ? " negative" : ""}`, "data-testid": "savings" },
      Number.isFinite(frac) ? (frac >= 0 ? `${fmt.pct(frac)} less compute` : `${fmt.pct(-frac)} more compute`) : "–"));
    if (s.low !== undefined && s.high !== undefined) {
      wrap.append(h("p", { class: "muted", text: `Likely range ${fmt.pct(s.low)} to ${fmt.pct(s.high)} saved.` }));
    }
    if (s.basis) wrap.append(h("p", { class: "hint", text: `Basis: ${s.basis}` }));

    const currency = e.currency || (e.plan && e.plan.currency) || "USD";
    const phases = [["fit", "Fit the operator"], ["grown", "Train the grown model"], ["scratch", "Train from scratch"]];
    const rows = phases.filter(([k]) => e[k]).map(([k, label]) => {
      const p = e[k];
      return h("tr", { "data-phase": k },
        h("td", { text: label }),
        h("td", { class: "n", text: fmt.flops(p.flops) }),
        h("td", { class: "n", text: fmt.hours(pick(p, HOURS_KEYS)) }),
        h("td", { class: "n", text: pick(p, COST_KEYS) === undefined ? "–" : fmt.money(pick(p, COST_KEYS), currency) }));
    });
    wrap.append(h("table", { class: "estimate-table" },
      h("caption", { class: "sr-only", text: "Compute, GPU time and cost per phase" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Phase" }), h("th", { scope: "col", class: "n", text: "FLOPs" }),
        h("th", { scope: "col", class: "n", text: "GPU-hours" }), h("th", { scope: "col", class: "n", text: "Cost" }))),
      h("tbody", {}, rows)));
    const saved = pick(s, COST_KEYS);
    const savedHours = pick(s, HOURS_KEYS);
    if (saved !== undefined || savedHours !== undefined) {
      wrap.append(h("p", { "data-testid": "saved" }, "Saved: ", [savedHours !== undefined ? `${fmt.hours(savedHours)} GPU-hours` : "",
        saved !== undefined ? fmt.money(saved, currency) : ""].filter(Boolean).join(", ")));
    }
    const a = e.assumptions || {};
    const notes = [];
    if (e.target && e.target.parameters) {
      notes.push(`Grown model: ${fmt.count(e.target.parameters)} parameters` +
        (e.source && e.source.parameters ? ` (from ${fmt.count(e.source.parameters)})` : "") + ".");
    }
    if (a.tokens) notes.push(`Training plan: ${fmt.flops(a.tokens)} tokens${a.tokens_source && a.tokens_source !== "given" ? ` (${a.tokens_source})` : ""}.`);
    if (a.gpu) {
      notes.push(`${a.gpu} at ${fmt.pct(a.utilisation)} utilisation of ${a.peak_tflops} TFLOPS, ` +
        `${fmt.money(a.price_per_gpu_hour, currency)} per GPU-hour${a.price_source && a.price_source !== "given" ? " (assumed list price)" : ""}.`);
    }
    if (notes.length) wrap.append(h("ul", { class: "hint assumptions" }, notes.map((n) => h("li", { text: n }))));
    wrap.append(h("details", {}, h("summary", { text: "All estimate fields" }),
      h("pre", { text: JSON.stringify(e, null, 2) })));
    return wrap;
  }

  // ------------------------------------------------------------------ submit

  function updateSubmit(read) {
    const ok = !!ui.checkpoint && (!read || !!read.values);
    $("submit-job").disabled = !ok;
  }

  async function submitJob(event) {
    event.preventDefault();
    // Leaving a field for the button schedules a preview; it would wipe this answer's errors.
    clearTimeout(ui.estimateTimer);
    const form = $("job-form");
    clearFieldErrors(form);
    $("job-created").replaceChildren();
    if (!requireKey()) return;
    if (!ui.checkpoint) {
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
      checkpoint_id: ui.checkpoint.id,
      target: v.target,
      strategy: v.strategy,
      fit: drop({ steps: v.steps, lr: v.lr, batch_size: v.batch_size, seq_len: v.seq_len, data_uri: v.data_uri }),
      growth: drop({ spread: v.spread }),
      plan: drop({ tokens: v.tokens, gpu: v.gpu, price_per_gpu_hour: v.price_per_gpu_hour, utilisation: v.utilisation }),
      seed: v.seed,
    });
    // One key per intended job: a double click or a retry after a network error makes one job.
    if (!ui.idempotencyKey) ui.idempotencyKey = randomKey();
    const button = $("submit-job");
    button.disabled = true;
    try {
      const job = await api("POST", "/v1/jobs", body, { headers: { "Idempotency-Key": ui.idempotencyKey } });
      ui.idempotencyKey = null;
      $("job-created").replaceChildren("Job ", h("a", { href: `${ROOT}/ui/jobs/${encodeURIComponent(job.id)}`, text: job.id }),
        ` is ${job.state}.`);
      refreshJobs();
    } catch (err) {
      if (err.status && err.status !== 409) ui.idempotencyKey = null;
      showProblem(err.problem, "job-form");
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ job list

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

  function stateBadge(job) {
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

  async function refreshJobs() {
    clearTimeout(ui.jobsTimer);
    if (!apiKey()) return;
    const filter = $("jobs-state").value;
    const query = new URLSearchParams({ limit: String(Math.min(ui.jobsLimit, 100)) });
    if (filter) query.set("state", filter);
    let active = false;
    try {
      const page = await api("GET", `/v1/jobs?${query}`);
      $("jobs-error").textContent = "";
      renderJobs(page.items || []);
      ui.jobsCursor = page.next_cursor || null;
      $("jobs-more").hidden = !ui.jobsCursor || ui.jobsLimit >= 100;
      active = (page.items || []).some((j) => !TERMINAL.has(j.state));
    } catch (err) {
      if (err.status !== 401) $("jobs-error").textContent = `Could not load jobs: ${err.problem.detail}`;
    }
    if (!$("view-new").hidden) ui.jobsTimer = setTimeout(pollJobs, active ? 1500 : 5000);
  }

  function pollJobs() {
    if (document.hidden) { ui.jobsTimer = setTimeout(pollJobs, 2000); return; }
    refreshJobs();
  }

  function moreJobs() {
    ui.jobsLimit += JOBS_PAGE;
    refreshJobs();
  }

  // ------------------------------------------------------------------ job page

  function lossChart(history) {
    const points = (history || []).map(([s, l]) => [Number(s), Number(l)]).filter(([s, l]) => Number.isFinite(s) && Number.isFinite(l));
    if (!points.length) return h("p", { class: "muted", text: "No fitting steps yet." });
    const W = 640, H = 260, L = 56, R = 16, T = 14, B = 34;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 1;
    y0 -= pad; y1 += pad;
    const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const grid = [];
    const tick = (y1 - y0) / 4;
    const digits = Math.min(6, Math.max(0, Math.ceil(-Math.log10(tick)) + 1));
    for (let i = 0; i <= 4; i++) {
      const y = y0 + tick * i;
      grid.push(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: Y(y), y2: Y(y) }));
      grid.push(svg("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, y.toFixed(digits)));
    }
    // Step ticks at round intervals (1, 2, 5 x 10^k), at most about six of them.
    const xticks = [];
    const first = Math.min(...xs), last = Math.max(...xs);
    const raw = Math.max(1, (last - first) / 5);
    const mag = 10 ** Math.floor(Math.log10(raw));
    const every = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw);
    for (let x = Math.ceil(first / every) * every; x <= last; x += every) {
      xticks.push(svg("text", { x: X(x), y: H - B + 16, "text-anchor": "middle" }, x));
    }
    const line = points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
    const dots = points.length <= 40 ? points.map(([x, y]) => svg("circle", { class: "dot", cx: X(x), cy: Y(y), r: 2.5 })) : [];
    const [fs, fl] = points[0], [ls, ll] = points[points.length - 1];
    const summary = `Fitting loss over ${points.length} logged steps: ${fl.toFixed(4)} at step ${fs}, ${ll.toFixed(4)} at step ${ls}.`;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary, "data-points": points.length },
      svg("title", {}, summary),
      grid,
      svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
      svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
      xticks,
      svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step"),
      svg("polyline", { class: "line", points: line }),
      dots);
    const table = h("details", {}, h("summary", { text: "Loss values" }),
      h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "n", text: "Step" }), h("th", { scope: "col", class: "n", text: "Loss" }))),
        h("tbody", {}, points.slice(-200).map(([s, l]) => h("tr", {}, h("td", { class: "n", text: s }), h("td", { class: "n", text: l.toFixed(4) }))))));
    return h("div", {}, chart, h("p", { class: "hint", text: summary }), table);
  }

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

  function sizesText(sizes) {
    if (!sizes) return "";
    const parts = [`${sizes.layers} layers`, `hidden ${sizes.hidden}`, `${sizes.heads} heads`];
    if (sizes.kv_heads !== undefined && sizes.kv_heads !== sizes.heads) parts.push(`${sizes.kv_heads} KV heads`);
    parts.push(`FFN ${sizes.ffn}`);
    return parts.join(", ");
  }

  const num = (x, digits = 4) => (x === null || x === undefined || !Number.isFinite(Number(x)) ? "–" : Number(x).toFixed(digits));

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
        ["fit_start", "Grown, fit's start (copies separated)"], ["grown_after_fit", "Grown, as written (fitted, copies separated)"],
        ["random_large", "Large model, random weights"]]
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
    if (drawn !== ui.lossDrawn) {
      ui.lossDrawn = drawn;
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
    if (Array.isArray(history) && history.length && !ui.lossDrawn) {
      $("loss-chart").replaceChildren(lossChart(history));
    }
  }

  async function pollJob(jobId) {
    clearTimeout(ui.jobTimer);
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
      if (job.state === "succeeded" && !ui.jobResultShown) {
        try {
          await showResult(jobId);
          ui.jobResultShown = true;
        } catch (err) {
          pageError(`Could not load the result: ${err.problem ? err.problem.detail : err.message}`);
        }
      }
      return;
    }
    ui.jobTimer = setTimeout(() => pollJob(jobId), document.hidden ? 3000 : 1000);
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

  function pageError(text) {
    const el = $("page-error");
    el.textContent = text;
    el.hidden = !text;
  }

  // ------------------------------------------------------------------ start

  async function start() {
    showKeyState();
    $("key-form").addEventListener("submit", saveKey);
    $("key-forget").addEventListener("click", forgetKey);
    const path = location.pathname.slice(ROOT.length);
    const jobMatch = path.match(/^\/ui\/jobs\/([^/]+)\/?$/);
    if (!apiKey()) $("api-key").focus();

    if (jobMatch) {
      const jobId = decodeURIComponent(jobMatch[1]);
      $("view-job").hidden = false;
      $("job-id").textContent = jobId;
      $("job-cancel").addEventListener("click", () => cancelJob(jobId));
      document.addEventListener("ligo-key", () => { pageError(""); pollJob(jobId); });
      if (!apiKey()) pageError("Enter your API key to see this job.");
      pollJob(jobId);
      return;
    }

    $("view-new").hidden = false;
    try {
      const resp = await fetch(`${ROOT}/ui/meta`);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      ui.meta = await resp.json();
    } catch (err) {
      pageError(`Could not load the form's presets and strategies (${err.message}). Reload to try again.`);
      return;
    }
    fillStrategies();
    fillPlan();

    $("upload-form").addEventListener("submit", upload);
    $("upload-abort").addEventListener("click", () => ui.upload && ui.upload.abort());
    $("upload-file").addEventListener("change", () => clearFieldErrors($("upload-form")));
    $("target-preset").addEventListener("change", onTargetChange);
    const form = $("job-form");
    form.addEventListener("input", scheduleEstimate);
    form.addEventListener("change", scheduleEstimate);
    form.addEventListener("submit", submitJob);
    $("jobs-state").addEventListener("change", () => { ui.jobsLimit = JOBS_PAGE; refreshJobs(); });
    $("jobs-refresh").addEventListener("click", refreshJobs);
    $("jobs-more").addEventListener("click", moreJobs);
    document.addEventListener("ligo-key", () => { refreshJobs(); scheduleEstimate(); });

    const saved = sessionStorage.getItem(CHECKPOINT_STORE);
    if (saved) {
      try { setCheckpoint(JSON.parse(saved)); } catch { sessionStorage.removeItem(CHECKPOINT_STORE); }
    }
    refreshJobs();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
