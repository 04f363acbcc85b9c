// Numbers, sizes, dates and targets as the pages write them; "–" for what is not a number.

export const fmt = {
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

export const num = (x, digits = 4) => (x === null || x === undefined || !Number.isFinite(Number(x)) ? "–" : Number(x).toFixed(digits));

export function sizesText(sizes) {
  if (!sizes) return "";
  const parts = [`${sizes.layers} layers`, `hidden ${sizes.hidden}`, `${sizes.heads} heads`];
  if (sizes.kv_heads !== undefined && sizes.kv_heads !== sizes.heads) parts.push(`${sizes.kv_heads} KV heads`);
  parts.push(`FFN ${sizes.ffn}`);
  return parts.join(", ");
}
