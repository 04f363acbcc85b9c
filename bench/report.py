"""The savings benchmark's report: records, tables and a plot from the runs' loss curves.

``bench.savings`` records every run's held-out loss against its FLOPs and wall time; this turns
those curves into savings (the cost to reach the scratch run's final loss, interpolated between
evals), one record per run (``savings.json``, which ``ligo_core.calibration`` reads), the
markdown tables (``savings.md``) and the loss-curve plot (``savings_loss_curves.png``).
``python -m bench.savings --report CURVES_JSON`` rewrites the tables from recorded curves.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import STRATEGIES
from ligo_core import calibration

# ----------------------------------------------------------------------------- savings arithmetic


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table: a header row, the separator, one line per row (cells as given)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cost_to_reach(costs: list[float], losses: list[float], target: float) -> float | None:
    """Cost at which a loss curve first reaches ``target``, linear between points; None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return costs[0]
            c0, c1, l0 = costs[i - 1], costs[i], losses[i - 1]
            return c0 + (l0 - target) / (l0 - loss) * (c1 - c0)
    return None


def saving(costs: list[float], losses: list[float], target: float, reference_total: float) -> float | None:
    reached = cost_to_reach(costs, losses, target)
    return None if reached is None else 1.0 - reached / reference_total


BUDGETS = (0.25, 0.5, 0.75, 1.0)  # fractions of the scratch run's FLOPs


def labels_in(recs: list[dict]) -> list[str]:
    """The strategies present, in table order (labels of older runs, e.g. ``ligo-preserve``, last)."""
    present = {r["strategy"] for r in recs}
    return [s for s in STRATEGIES if s in present] + sorted(present - set(STRATEGIES))


def is_fitted(label: str) -> bool:
    return label == "ligo" or label.startswith("ligo-")


def loss_at(costs: list[float], losses: list[float], cost_point: float) -> float:
    """A curve's loss at ``cost_point``, linear between points (clamped to the curve's ends)."""
    if cost_point <= costs[0]:
        return losses[0]
    for i in range(1, len(costs)):
        if cost_point <= costs[i]:
            w = (cost_point - costs[i - 1]) / (costs[i] - costs[i - 1])
            return losses[i - 1] + w * (losses[i] - losses[i - 1])
    return losses[-1]


def savings_by_budget(costs: list[float], losses: list[float], ref_costs: list[float],
                      ref_losses: list[float]) -> dict[str, float | None]:
    """Saving against a scratch run stopped at each fraction of its budget (its loss there the target)."""
    out = {}
    for fraction in BUDGETS:
        budget = ref_costs[0] + fraction * (ref_costs[-1] - ref_costs[0])
        out[str(fraction)] = saving(costs, losses, loss_at(ref_costs, ref_losses, budget), budget)
    return out


# ----------------------------------------------------------------------------- records and tables


def records(result: dict) -> list[dict]:
    """One record per run; savings measured against the scratch run of the same seed."""
    out = []
    scratch = {r["seed"]: r for r in result["runs"] if r["strategy"] == "scratch"}
    for r in result["runs"]:
        ref = scratch.get(r["seed"])
        target = ref["losses"][-1] if ref else None
        rec = {
            "model": result["model"], "strategy": r["strategy"], "seed": r["seed"],
            "flops_saved": saving(r["flops"], r["losses"], target, ref["flops"][-1]) if ref else None,
            "flops_saved_fit_free": saving([f - r["fit_flops"] for f in r["flops"]], r["losses"], target,
                                           ref["flops"][-1]) if ref else None,
            "wall_saved": saving(r["wall"], r["losses"], target, ref["wall"][-1]) if ref else None,
            "flops_saved_by_budget": savings_by_budget(r["flops"], r["losses"], ref["flops"], ref["losses"])
            if ref else None,
            "final_loss": r["losses"][-1], "final_seen_loss": _final_seen_loss(r),
            "small_loss": result["small_loss"], "scratch_final_loss": target,
            "init_loss": r["init_loss"], "fit_flops": r["fit_flops"], "total_flops": r["flops"][-1],
            "source": result.get("source"), "target": result.get("target"),
        }
        out.append(rec)
    return out


def _final_seen_loss(run: dict) -> float | None:
    """Runs recorded before 2026-11-29 kept the training-sequence loss at every eval."""
    if "final_seen_loss" in run:
        return run["final_seen_loss"]
    return (run.get("train_sample_losses") or [None])[-1]


def _mean_spread(values: list[float | None], pct: bool = True, missing: str = "never reached",
                 signed: bool = False) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return missing
    scale, unit = (100.0, "%") if pct else (1.0, "")
    mean = statistics.fmean(got) * scale
    sign = "+" if signed else ""
    text = f"{mean:{sign}.1f}{unit}" if pct else f"{mean:{sign}.3f}"
    if len(got) > 1:
        text += f" ± {statistics.stdev(got) * scale:.1f}" if pct else f" ± {statistics.stdev(got):.3f}"
    if len(got) < len(values):
        text += f" ({len(values) - len(got)}/{len(values)} seeds never reached)"
    return text


BASELINES = ("stack", "interpolate", "net2net", "preserve")


def paired_gaps(recs: list[dict], strategy: str, baseline: str, key: str = "flops_saved") -> dict[int, float | None]:
    """Per seed, ``strategy``'s saving (``key``) minus ``baseline``'s (None where either never reached)."""
    saved = {(r["strategy"], r["seed"]): r.get(key) for r in recs}
    seeds = sorted({r["seed"] for r in recs if r["strategy"] == strategy})
    gaps = {}
    for seed in seeds:
        a, b = saved.get((strategy, seed)), saved.get((baseline, seed))
        gaps[seed] = None if a is None or b is None else a - b
    return gaps


def best_baseline(recs: list[dict]) -> str | None:
    """The baseline with the highest mean FLOPs saved (a run that never reached counts as 0), or,
    where no baseline reaches the scratch loss, the one with the lowest mean final loss."""
    ran = [b for b in BASELINES if any(r["strategy"] == b for r in recs)]
    if not ran:
        return None
    of = lambda b, key: [r[key] for r in recs if r["strategy"] == b]  # noqa: E731
    if any(v is not None for b in ran for v in of(b, "flops_saved")):
        return max(ran, key=lambda b: statistics.fmean(v or 0.0 for v in of(b, "flops_saved")))
    return min(ran, key=lambda b: statistics.fmean(of(b, "final_loss")))


EQUAL_FLOPS_POINTS = (0.05, 0.1, 0.25, 0.5, 1.0)  # fractions of the scratch run's FLOPs


def equal_flops_gaps(runs: list[dict], strategy: str, baseline: str) -> dict[str, list[float]]:
    """Per point, over seeds: ``strategy``'s held-out loss minus ``baseline``'s at the same FLOPs
    (negative: ``strategy`` is ahead). "fit" is where the fitted run starts training."""
    by = {(r["strategy"], r["seed"]): r for r in runs}
    gaps: dict[str, list[float]] = {}
    for (label, seed), run in sorted(by.items()):
        base, scratch = by.get((baseline, seed)), by.get(("scratch", seed))
        if label != strategy or base is None or scratch is None:
            continue
        points = {"fit": run["flops"][0], **{str(f): f * scratch["flops"][-1] for f in EQUAL_FLOPS_POINTS}}
        for name, flops in points.items():
            gap = loss_at(run["flops"], run["losses"], flops) - loss_at(base["flops"], base["losses"], flops)
            gaps.setdefault(name, []).append(gap)
    return gaps


def _equal_flops_table(runs: list[dict], best: str | None) -> list[str]:
    rows = []
    for variant in filter(is_fitted, labels_in(runs)):
        gaps = equal_flops_gaps(runs, variant, best) if best else {}
        if gaps:
            rows.append(f"| {variant} minus {best} | "
                        + " | ".join(_mean_spread(gaps[k], pct=False, signed=True) for k in gaps) + " |")
    if not rows:
        return []
    return [
        "Held-out loss at equal FLOPs (fitting counted; negative: the fitted operator is ahead), at the end",
        "of its fit and at fractions of the scratch run's FLOPs; curves interpolated between evals:",
        "",
        "| | end of fit | " + " | ".join(f"{int(100 * f)}%" for f in EQUAL_FLOPS_POINTS) + " |",
        "|---|---|" + "---|" * len(EQUAL_FLOPS_POINTS),
        *rows,
        "",
    ]


def _budget_table(recs: list[dict]) -> list[str]:
    if not any(r.get("flops_saved_by_budget") for r in recs):
        return []
    lines = [
        "FLOPs saved at shorter budgets: the target is the scratch run's held-out loss after that fraction",
        "of its FLOPs, and the saving is against that fraction. Read off the same full-length runs (a run",
        "planned for the shorter budget would decay its rate sooner and end lower), so indicative only:",
        "",
        "| strategy | " + " | ".join(f"{int(100 * f)}% budget" for f in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for strategy in [s for s in labels_in(recs) if s != "scratch"]:
        sr = [r for r in recs if r["strategy"] == strategy and r.get("flops_saved_by_budget")]
        if sr:
            lines.append(f"| {strategy} | " + " | ".join(
                _mean_spread([r["flops_saved_by_budget"][str(f)] for r in sr]) for f in BUDGETS) + " |")
    return lines + [""]


def _comparison(recs: list[dict]) -> list[str]:
    best = best_baseline(recs)
    if best is None:
        return []
    lines = []
    for key, what, fmt in (("flops_saved", "FLOPs saved (points)", lambda g: f"{100 * g:+.1f}"),
                           ("flops_saved_fit_free", "growth free (points)", lambda g: f"{100 * g:+.1f}"),
                           ("final_loss", "final loss (nats)", lambda g: f"{g:+.3f}")):
        parts = []
        for variant in filter(is_fitted, labels_in(recs)):
            gaps = paired_gaps(recs, variant, best, key)
            if gaps and any(g is not None for g in gaps.values()):
                parts.append(f"{variant} minus {best}: "
                             + ", ".join(f"seed {s}: " + ("n/a" if g is None else fmt(g)) for s, g in gaps.items()))
        if parts:
            lines.append(f"- {what}, paired by seed: " + "; ".join(parts) + ".")
    return [f"Best baseline: {best}.", "", *lines, ""] if lines else []


REGIME_MARGIN = calibration.REGIME_MARGIN  # nats: the scratch run must end this far below the small model


def _regime(margin: float) -> str:
    if margin >= REGIME_MARGIN:
        return f"Regime: valid (the scratch run ends {margin:.2f} >= {REGIME_MARGIN} nats below the small model)."
    where = f"only {margin:.2f} nats below" if margin >= 0 else f"{-margin:.2f} nats above"
    return (f"**Regime: NOT valid** (the scratch run ends {where} the small model; {REGIME_MARGIN} below "
            "needed): a grown model starts at about the scratch run's final loss, so these savings do not "
            "measure growth, and the cost estimate ignores them.")


def _recipe(r: dict) -> str:
    fit = f"LiGO fit {r['fit_steps']} steps x {r.get('fit_batch') or r['batch']} sequences"
    return (f"Recipe: small model pretrained {r['small_steps']} steps at peak rate {r['small_lr']:g}; every "
            f"large run {r['steps']} steps x {r['batch']} x {r['seq_len']} tokens at peak rate {r['lr']:g}; {fit}.")


def markdown(results: list[dict], recs: list[dict], meta: dict) -> str:
    lines = [
        "# Savings: growing vs training from scratch",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; device {meta['device']}; total wall time {meta['wall_minutes']:.1f} min.  ",
        f"Size `{meta['size']}`: {meta['size_fields']}",
        *([f"Tables rewritten from the recorded curves by `{meta['rerendered']}`."] if meta.get("rerendered") else []),
        *([meta["note"]] if meta.get("note") else []),
        "",
        *([] if meta.get("complete", True) else ["**Partial results: the run is in progress or stopped early.**", ""]),
        "FLOPs saved = 1 - (FLOPs to reach the scratch run's final held-out loss, growth and operator",
        "fitting included) / (FLOPs of the scratch run); wall time likewise (seconds of growth + training,",
        "evaluation excluded). Mean ± standard deviation over seeds; the small model's pretraining is",
        "not counted. Each seed's grown runs are compared with the scratch run of the same seed.",
        "The last column leaves the growth step's FLOPs (operator fitting, or one materialisation) out:",
        "what the grown start alone is worth, as when fitting is a negligible share of a long run.",
        "\"Seen sequences\": the same loss on a fixed sample of training sequences; a grown model has",
        "also read them through the small model, so a gap below held-out shows memorisation.",
        "",
    ]
    for res in results:
        rs = [r for r in recs if r["model"] == res["model"]]
        scratch_final = [r["scratch_final_loss"] for r in rs if r["strategy"] == "scratch"]
        lines += [
            f"## {res['model']}",
            "",
            f"Small model {res['small_params'] / 1e6:.2f}M parameters, held-out loss {res['small_loss']:.3f}; "
            f"large model {res['large_params'] / 1e6:.2f}M parameters "
            f"({res['large_params'] / res['small_params']:.1f}x); scratch final loss "
            f"{_mean_spread(scratch_final, pct=False)} "
            f"({res['small_loss'] - statistics.fmean(scratch_final):+.2f} nats: small minus scratch).",
            *([_recipe(res["recipe"]), ""] if res.get("recipe") else [""]),
            _regime(res["small_loss"] - statistics.fmean(scratch_final)),
            "",
            "| strategy | FLOPs saved | wall time saved | loss at step 0 | final loss | final loss, seen sequences "
            "| FLOPs saved, growth free |",
            "|---|---|---|---|---|---|---|",
        ]
        for strategy in labels_in(rs):
            sr = [r for r in rs if r["strategy"] == strategy]
            if not sr:
                continue
            lines.append(
                f"| {strategy} | {_mean_spread([r['flops_saved'] for r in sr])} "
                f"| {_mean_spread([r['wall_saved'] for r in sr])} "
                f"| {_mean_spread([r['init_loss'] for r in sr], pct=False)} "
                f"| {_mean_spread([r['final_loss'] for r in sr], pct=False)} "
                f"| {_mean_spread([r.get('final_seen_loss') for r in sr], pct=False, missing='-')} "
                f"| {_mean_spread([r.get('flops_saved_fit_free') for r in sr])} |"
            )
        lines.append("")
        lines += _comparison(rs)
        lines += _equal_flops_table(res["runs"], best_baseline(rs))
        lines += _budget_table(rs)
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    colors = dict(zip(STRATEGIES, ("black", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:pink")))
    for ax, res in zip(axes[0], results):
        seeds = sorted({r["seed"] for r in res["runs"]})
        for r in res["runs"]:
            ax.plot([f / 1e12 for f in r["flops"]], r["losses"], color=colors.get(r["strategy"], "gray"),
                    alpha=0.9 if r["seed"] == seeds[0] else 0.35, lw=1.4,
                    label=r["strategy"] if r["seed"] == seeds[0] else None)
        scratch = [r["losses"][-1] for r in res["runs"] if r["strategy"] == "scratch"]
        if scratch:
            ax.axhline(statistics.fmean(scratch), color="black", ls=":", lw=1, label="scratch final")
        ax.axhline(res["small_loss"], color="gray", ls="--", lw=1, label="small model")
        finals = [r["losses"][-1] for r in res["runs"]]
        ax.set_ylim(min(finals) - 0.15, max(res["small_loss"], max(finals)) + 0.6)
        ax.set_title(f"{res['model']}: held-out loss vs training FLOPs ({len(seeds)} seeds)")
        ax.set_xlabel("FLOPs (1e12), growth + fitting + training")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rewrite_report(curves_path: Path, calibration_to: Path | None = None) -> list[dict]:
    """Tables and records again from a finished run's curves (after the report gained a column)."""
    saved = json.loads(curves_path.read_text())
    saved["meta"]["rerendered"] = f"python -m bench.savings --report {curves_path}"
    recs = write_tables(curves_path.parent, saved["results"], saved["meta"])
    if calibration_to is not None and saved["meta"].get("complete", True):
        write_calibration(calibration_to, recs)
    return recs


REFERENCE_OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def calibration_path(out: Path, given: str | None) -> Path | None:
    """Where a completed run's records go as the estimate's calibration: ``--calibration`` if
    given ('' for nowhere), else the package's file for the reference run only (probes in other
    folders must not change what ``ligo estimate`` says)."""
    if given is not None:
        return Path(given) if given else None
    return Path(calibration.MEASURED_PATH) if out.resolve() == REFERENCE_OUT else None


def write_calibration(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recs, indent=1) + "\n")


def write_tables(out: Path, results: list[dict], meta: dict) -> list[dict]:
    """savings.json (one record per run) and savings.md from the runs' curves; returns the records."""
    recs = [rec for res in results for rec in records(res)]
    (out / "savings.json").write_text(json.dumps(recs, indent=1) + "\n")
    (out / "savings.md").write_text(markdown(results, recs, meta))
    return recs
