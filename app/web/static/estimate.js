// A cost-savings estimate (POST /v1/estimate, or a finished job's) as the page shows it: the
// saving, compute, GPU time and cost per phase, and the assumptions behind them.

import { h } from "./dom.js";
import { fmt, resolvedText } from "./format.js";

function pick(obj, keys) {
  if (!obj || typeof obj !== "object") return undefined;
  for (const k of keys) if (obj[k] !== undefined && obj[k] !== null) return obj[k];
  return undefined;
}

const HOURS_KEYS = ["gpu_hours", "gpu_h", "hours"];
const COST_KEYS = ["cost_usd", "cost", "usd"];

export function renderEstimate(e) {
  const wrap = h("div", { class: "estimate" });
  const s = e.savings || {};
  const frac = Number(s.fraction);
  wrap.append(h("p", { class: `savings${frac < 0 ? " negative" : ""}`, "data-testid": "savings" },
    Number.isFinite(frac) ? (frac >= 0 ? `${fmt.pct(frac)} less compute` : `${fmt.pct(-frac)} more compute`) : "–"));
  if (s.low !== undefined && s.high !== undefined) {
    wrap.append(h("p", { class: "muted", text: `Likely range ${fmt.pct(s.low)} to ${fmt.pct(s.high)} saved.` }));
  }
  if (s.basis) wrap.append(h("p", { class: "hint", text: `Basis: ${s.basis}` }));
  const resolved = resolvedText(e.target);
  if (resolved) wrap.append(h("p", { "data-testid": "resolved-target", text: `Target as resolved: ${resolved}.` }));

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
