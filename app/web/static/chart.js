// The fitting-loss chart: an SVG line of (step, loss) points, a text summary, the values in a table.

import { h, svg } from "./dom.js";

export function lossChart(history) {
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
