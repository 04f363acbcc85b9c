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

// A config's sizes {layers, hidden, heads, ffn[, kv_heads]} read through its family's config keys.
export function sizesOf(config, family) {
  const get = (f) => (family.config_keys[f] ? config[family.config_keys[f]] : undefined);
  const hidden = Number(get("hidden"));
  const heads = Number(get("heads"));
  const sizes = { layers: Number(get("layers")), hidden, heads, ffn: Number(get("ffn") || 4 * hidden) };
  if (family.fields.includes("kv_heads")) sizes.kv_heads = Number(get("kv_heads") || heads);
  return sizes;
}

// A full config's sizes with its head size (a job's target_config), given /ui/meta's families.
export function configSizes(config, families) {
  const family = config && Object.values(families || {}).find((f) => f.model_types.includes(config.model_type));
  if (!family) return null;
  const sizes = sizesOf(config, family);
  return { ...sizes, head_dim: Number(config.head_dim) || sizes.hidden / sizes.heads };
}

// The target as the service resolved it: fields left out keep the source's proportions.
export function resolvedText(sizes) {
  return sizes && sizes.layers ? `${sizesText(sizes)}, head size ${sizes.head_dim}` : "";
}
