// The public /v1 API from the browser: the fetch wrapper, the API key (kept in sessionStorage),
// and every error answer read as an RFC 9457 problem. No DOM here: what a refused key does to
// the page is the key form's business (onKeyRefused).

const rootMeta = document.querySelector('meta[name="ligo-root"]');
// The API root, non-empty behind a path-prefixing proxy (the server fills the meta tag in).
export const ROOT = rootMeta && !rootMeta.content.includes("{{") ? rootMeta.content.replace(/\/$/, "") : "";
const KEY_STORE = "ligo.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

// Keep `key` for this tab; an empty key forgets it.
export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
}

let refusedListener = () => {};

// Called with the problem whenever the service answers 401 (a fetch or the upload).
export function onKeyRefused(listener) {
  refusedListener = listener;
}

export function keyRefused(problem) {
  refusedListener(problem);
}

// Any error answer as an RFC 9457 problem, including FastAPI's plain {"detail": [...]}.
export function toProblem(status, body, statusText) {
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

export function parseBody(text, contentType) {
  if (!text) return null;
  if ((contentType || "").includes("json")) {
    try { return JSON.parse(text); } catch { return text; }
  }
  return text;
}

// One request with the key; the parsed answer, or an ApiError carrying the problem.
export async function api(method, path, body, { signal, headers } = {}) {
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
