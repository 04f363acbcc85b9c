"""Where the expected savings come from: published settings and our own measurements, as data.

A record is one growth setting (family, strategy, small and large sizes) and the fraction of the
from-scratch training FLOPs it saved, with the source it was read from. ``ligo_core.cost`` looks
records up by family, strategy, depth ratio and width ratio, and interpolates between them.

Savings follow the LiGO paper's definition (DESIGN.md section 3): 1 - (FLOPs to reach the
scratch run's final validation loss, operator fitting included) / (FLOPs of the scratch run);
the small model's pretraining is not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ligo_core.errors import LigoError

LIGO_PAPER = "Wang et al., Learning to Grow Pretrained Models (LiGO), ICLR 2023, arXiv 2303.00980"
LEMON_PAPER = "Wang et al., LEMON: Lossless Model Expansion, ICLR 2024, arXiv 2310.07999"
GSTACK_PAPER = "Du et al., Stacking Your Transformers (G_stack), NeurIPS 2024, arXiv 2405.15319"

# Our reproduction benchmark's reference run writes this file (bench/savings.py, the records of
# docs/results/savings.json). It is package data, so that a checkout, a wheel and an image give
# the same estimate.
MEASURED_PATH = Path(__file__).resolve().parent / "data" / "calibration.json"

# Measured records that do not say which sizes they grew are taken to be the benchmark's
# default setting: "about 3-4x the parameters, deeper and wider, like BERT-Small to BERT-Base".
MEASURED_DEFAULT_SETTING = ((6, 512), (12, 768))
# A measured run counts only if its scratch run ended this many nats below the small model: a
# shorter scratch run makes every grown model "save" nearly everything (issue 3's regime rule).
REGIME_MARGIN = 0.3

# Half-widths of the low/high range, as fractions of the scratch FLOPs.
UNCERTAINTY = {
    "single_run": 0.05,  # around one published number (the papers report one run, no seeds)
    "min_spread": 0.02,  # smallest half-width around a mean of measured seeds
    "per_log_ratio": 0.10,  # added per unit of log distance (ratios and scale) to the nearest calibrated setting
    "other_family": 0.10,  # no setting of this family: evidence borrowed from other families
    "proxy_strategy": 0.05,  # no setting of this strategy: evidence of a similar one
}

# A strategy with no record of its own borrows the evidence of a similar one.
STRATEGY_PROXY = {"interpolate": "stack"}


class CalibrationError(LigoError):
    """The measured results file cannot be read."""


@dataclass(frozen=True)
class Record:
    family: str
    strategy: str
    small: tuple[int, int]  # (layers, hidden)
    large: tuple[int, int]
    saved: float  # fraction of the scratch FLOPs saved (mean over seeds when measured)
    source: str
    kind: str = "paper"  # "paper" (published) or "measured" (our benchmark)
    spread: float | None = None  # half-width of the seeds' range; None for a single published run
    wall_saved: float | None = None
    note: str = ""
    seeds: tuple = field(default=())

    @property
    def depth_ratio(self) -> float:
        return self.large[0] / self.small[0]

    @property
    def width_ratio(self) -> float:
        return self.large[1] / self.small[1]

    @property
    def scale(self) -> int:
        """The large model's width: the scale the saving was measured at."""
        return self.large[1]

    @property
    def setting(self) -> str:
        (l1, d1), (l2, d2) = self.small, self.large
        return f"{self.family} {l1}L/{d1} -> {l2}L/{d2}"


PUBLISHED: tuple[Record, ...] = (
    # LiGO paper, Table 1 and Figure 2 (100 fitting steps; savings include the fitting FLOPs).
    Record("bert", "ligo", (6, 512), (12, 768), 0.447, f"{LIGO_PAPER}, Table 1", wall_saved=0.407),
    Record("bert", "ligo", (12, 768), (24, 1024), 0.452, f"{LIGO_PAPER}, BERT-Base -> BERT-Large"),
    Record("roberta", "ligo", (6, 512), (12, 768), 0.472, f"{LIGO_PAPER}, RoBERTa-Small -> RoBERTa-Base"),
    Record("gpt2", "ligo", (12, 768), (24, 1024), 0.225, f"{LIGO_PAPER}, GPT2-Base (117M) -> GPT2-Medium (345M)"),
    Record("deit", "ligo", (12, 384), (12, 768), 0.554, f"{LIGO_PAPER}, DeiT-S -> DeiT-B", wall_saved=0.520),
    # LiGO paper ablations (growing into BERT-Base along one dimension only).
    Record("bert", "ligo", (6, 768), (12, 768), 0.517, f"{LIGO_PAPER}, depth-only ablation"),
    Record("bert", "ligo", (12, 512), (12, 768), 0.416, f"{LIGO_PAPER}, width-only ablation"),
    # Baselines in the LiGO paper, BERT-Small -> BERT-Base. MSLT and KI have no strategy here;
    # they are kept for the record and are never looked up.
    Record("bert", "stack", (6, 512), (12, 768), 0.341, f"{LIGO_PAPER}, StackBERT baseline", wall_saved=0.333),
    Record("bert", "net2net", (6, 512), (12, 768), 0.290, f"{LIGO_PAPER}, bert2BERT baseline", wall_saved=0.251),
    Record("bert", "mslt", (6, 512), (12, 768), 0.349, f"{LIGO_PAPER}, MSLT baseline", wall_saved=0.300),
    Record("bert", "ki", (6, 512), (12, 768), -0.057, f"{LIGO_PAPER}, KI baseline", wall_saved=-0.139),
    # Function-preserving expansion (our `preserve` is LEMON-style).
    Record("bert", "preserve", (6, 384), (12, 768), 0.332, f"{LEMON_PAPER}, BERT",
           note="setting as reported in the LEMON paper's BERT experiment"),
    Record("deit", "preserve", (6, 384), (12, 768), 0.567, f"{LEMON_PAPER}, ViT",
           note="setting as reported in the LEMON paper's ViT experiment"),
    # G_stack at 7B: the grown model reached the 300B-token scratch loss after 194B tokens
    # (the paper's "54.6% speedup" is 300/194 - 1). Tokens, not FLOPs; growth factor 4 in depth.
    Record("llama", "stack", (8, 4096), (32, 4096), 1 - 194 / 300, f"{GSTACK_PAPER}, 7B, 300B tokens",
           note="tokens saved, not FLOPs; depth growth factor 4"),
)


def load_measured(path: str | Path | None = None) -> list[Record]:
    """Our benchmark's results (``ligo_core/data/calibration.json``), one record per setting.

    The file is a list of runs ``{"model", "strategy", "seed", "flops_saved", "wall_saved", ...}``;
    runs of one setting are averaged over seeds, and a run that never reached the scratch loss
    (``flops_saved`` null) counts as saving nothing. Runs whose scratch run did not end
    ``REGIME_MARGIN`` below the small model are left out. A missing file gives no records.
    """
    path = Path(path) if path is not None else MEASURED_PATH
    if not path.is_file():
        return []
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"measured savings file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(runs, list):
        raise CalibrationError(f"measured savings file {str(path)!r} must hold a list of runs")
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if not isinstance(run, dict) or "model" not in run or "strategy" not in run:
            raise CalibrationError(f"measured savings file {str(path)!r}: each run needs 'model' and 'strategy'")
        if run["strategy"] == "scratch" or not _regime_valid(run):
            continue
        small, large = _setting_of(run)
        groups.setdefault((run["model"], run["strategy"], small, large), []).append(run)
    records = []
    for (family, strategy, small, large), group in sorted(groups.items()):
        saved = [float(r["flops_saved"]) if r.get("flops_saved") is not None else 0.0 for r in group]
        walls = [float(r["wall_saved"]) for r in group if r.get("wall_saved") is not None]
        mean = sum(saved) / len(saved)
        assumed = not any(_has_setting(r) for r in group)
        records.append(Record(
            family=str(family), strategy=str(strategy), small=small, large=large, saved=mean,
            source=f"our benchmark, {path.name} ({len(group)} seed{'s' if len(group) > 1 else ''})",
            kind="measured",
            spread=max(UNCERTAINTY["min_spread"], (max(saved) - min(saved)) / 2),
            wall_saved=sum(walls) / len(walls) if walls else None,
            note="setting not recorded in the file; the benchmark's default assumed" if assumed else "",
            seeds=tuple(r.get("seed") for r in group),
        ))
    return records


def _regime_valid(run: dict) -> bool:
    small, scratch = run.get("small_loss"), run.get("scratch_final_loss")
    if not isinstance(small, (int, float)) or not isinstance(scratch, (int, float)):
        return True  # not recorded: nothing to judge by
    return small - scratch >= REGIME_MARGIN


def _has_setting(run: dict) -> bool:
    return isinstance(run.get("source"), dict) and isinstance(run.get("target"), dict)


def _setting_of(run: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """``source``/``target`` dicts with ``layers`` and ``hidden`` when the run recorded them."""
    if not _has_setting(run):
        return MEASURED_DEFAULT_SETTING
    try:
        small = (int(run["source"]["layers"]), int(run["source"]["hidden"]))
        large = (int(run["target"]["layers"]), int(run["target"]["hidden"]))
    except (KeyError, TypeError, ValueError):
        raise CalibrationError("a measured run's source/target must give 'layers' and 'hidden'") from None
    if min(small + large) <= 0:
        raise CalibrationError("a measured run's sizes must be positive")
    return small, large


def calibration_records(measured_path: str | Path | None = None) -> list[Record]:
    return [*PUBLISHED, *load_measured(measured_path)]


# How much a difference in scale (the large model's width) counts against one in growth ratio,
# per unit of ln. Savings measured on a 128-wide toy model are evidence about growing such a
# model; for a 1024-wide target they count ln(1024/128) x 0.5 = 1.04 away, as far as a setting
# that grows depth 2.8x instead of 1x, so published settings at a nearby scale outweigh them.
SCALE_WEIGHT = 0.5


def log_distance(a: tuple[float, float], b: tuple[float, float],
                 scales: tuple[float, float] | None = None) -> float:
    """Distance between two (depth ratio, width ratio) settings on log scales; with ``scales``
    (the two large models' widths) their difference in scale counts too (``SCALE_WEIGHT``)."""
    scale = SCALE_WEIGHT * math.log(scales[0] / scales[1]) if scales else 0.0
    return math.hypot(math.log(a[0] / b[0]), math.log(a[1] / b[1]), scale)
