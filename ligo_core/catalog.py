"""What the engine offers, as data: the strategies, where LiGO's fit starts, and every growth and
fitting option with its default and bounds.

One place that the CLI, the API's request schemas, the web form and the docs read (a test holds
README's strategy table to it). Free of torch, so the API process and the cost estimate can
import it; ``ligo_core.strategies`` turns these names into operators.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line, shown next to the choice in the web form
    fitted: bool  # the operator is learned on the model's own loss (LiGO), not fixed
    width: str  # what growth does to the width (README's table)
    depth: str  # what it does to the depth
    spread: float  # default of the growth option `spread` (docs/GROWTH.md, "Moving copies apart")


STRATEGIES: tuple[Strategy, ...] = (
    Strategy(
        "ligo", "LiGO: a learned linear growth operator, started from the function-preserving one and "
                "fitted for a few steps on the model's own loss.", True,
        width="starts function-preserving",
        depth="starts as zero-output copies (`--ligo-init`; `stack` is the reference code's)", spread=2.0),
    Strategy(
        "stack", "Stacking (G_stack / StackBERT): the new layers repeat the whole layer stack; widths "
                 "expanded function-preservingly.", False,
        width="function-preserving", depth="G_stack / StackBERT: layer `l` copies `l mod L1`", spread=2.0),
    Strategy(
        "interpolate", "Interpolation: each layer is repeated in place (1, 1, 2, 2, ...); widths expanded "
                       "function-preservingly.", False,
        width="function-preserving", depth="each layer repeated in place", spread=2.0),
    Strategy(
        "net2net", "Net2Net / bert2BERT: widths grown by copying units, depth by stacking.", False,
        width="bert2BERT-FPI: random unit copies, inputs divided by count", depth="stacked",
        spread=0.0),  # exact copies, as published: growth never moves them
    Strategy(
        "preserve", "Function-preserving: copied units, zero-output new layers; exact by default "
                    "(spread 0), copies moved apart on request.", False,
        width="function-preserving (copies + mean/zero pads, split inputs)", depth="zero-output copies",
        spread=0.0),  # it promises the small model's function
)
STRATEGY_NAMES = tuple(s.name for s in STRATEGIES)
DEFAULT_STRATEGY = "ligo"

# Where LiGO's fit starts (the growth option `ligo_init`); widths always start function-preserving.
LIGO_INITS = {
    "preserve": "the exact function-preserving operator: new blocks start with zero outputs",
    "stack": "stacked depth, as the reference code starts (layer l copies l mod L1)",
    "interpolate": "each layer repeated in place",
}
DEFAULT_LIGO_INIT = "preserve"  # trained better than the stacked start in every savings run (docs/GROWTH.md)


@dataclass(frozen=True)
class Option:
    """A number a user may set: its default and the closed range it must lie in (``low_open``:
    the low end itself is excluded)."""

    default: float | int | None
    low: float | int
    high: float | int
    low_open: bool = False

    def contains(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high


# Growth options (the job's `growth`).
NOISE = Option(1.0, 0.0, 1.0)  # symmetry breaking between copies; exact at any value
SPREAD = Option(None, 0.0, 4.0)  # default per strategy (Strategy.spread)
# Fitting options (the job's `fit`, `ligo grow`'s flags, the estimate's fit).
FIT_STEPS = Option(100, 0, 1_000_000)  # the paper's 100 steps
FIT_LR = Option(1e-4, 0.0, 1.0, low_open=True)  # measured on real checkpoints: 1e-3 broke SmolLM2 in one step
BATCH_SIZE = Option(16, 1, 65_536)  # sequences per fitting step
SEQ_LEN = Option(128, 8, 1_048_576)  # tokens per fitting sequence (capped at the model's positions)
SEED = Option(0, 0, 2**31 - 1)
EVAL_TOKENS = Option(None, 0, 2**30)  # held-out tokens scored; None: 64 sequences of seq_len, 0: none
MIN_HELDOUT_SEQUENCES = 2  # the fewest held-out sequences a score (or the fit's guard) is made on


def eval_tokens_problem(eval_tokens: int | None, seq_len: int) -> str | None:
    """Why ``eval_tokens`` cannot be scored at ``seq_len`` (None when it can): 0 skips scoring,
    anything else must fill at least MIN_HELDOUT_SEQUENCES sequences."""
    if eval_tokens is None or eval_tokens == 0 or eval_tokens >= MIN_HELDOUT_SEQUENCES * seq_len:
        return None
    return (f"eval_tokens={eval_tokens} is below {MIN_HELDOUT_SEQUENCES} sequences of {seq_len} tokens "
            f"({MIN_HELDOUT_SEQUENCES * seq_len}); give at least that, or 0 to skip scoring")
# The written weights' dtype (growth option `dtype`, `--dtype`): "auto" keeps the checkpoint's.
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")

DEFAULT_BATCH_SIZE = BATCH_SIZE.default
DEFAULT_SEQ_LEN = SEQ_LEN.default
DEFAULT_FIT_LR = FIT_LR.default
DEFAULT_NOISE = NOISE.default
DEFAULT_FIT_STEPS = FIT_STEPS.default
DEFAULT_SEED = SEED.default


def strategy(name: str) -> Strategy:
    for s in STRATEGIES:
        if s.name == name:
            return s
    raise KeyError(name)


def default_spread(name: str) -> float:
    return strategy(name).spread


def check_growth_options(strategy: str, ligo_init: str, noise: float, spread: float | None) -> None:
    """The one check of a growth request's options, for the library, the CLI and the worker alike;
    raises ``TargetError`` with ``field`` naming the option (the API maps it to that field)."""
    from ligo_core.errors import TargetError

    if strategy not in STRATEGY_NAMES:
        raise TargetError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGY_NAMES)}",
                          field="strategy")
    if ligo_init not in LIGO_INITS:
        raise TargetError(f"unknown ligo_init {ligo_init!r}; choose from {', '.join(LIGO_INITS)}",
                          field="ligo_init")
    if not NOISE.contains(noise):
        raise TargetError(f"noise (symmetry breaking between copied units) must be in "
                          f"[{NOISE.low:g}, {NOISE.high:g}], got {noise}", field="noise")
    if spread is not None and not SPREAD.contains(spread):
        raise TargetError(f"spread (how far copied units are moved apart) must be in "
                          f"[{SPREAD.low:g}, {SPREAD.high:g}], got {spread}", field="spread")


def spread_defaults_text() -> str:
    """Each strategy's default spread in words, for help texts: '0 for net2net and preserve, 2 for ...'."""
    by_value: dict[float, list[str]] = {}
    for s in STRATEGIES:
        by_value.setdefault(s.spread, []).append(s.name)
    return ", ".join(f"{value:g} for {' and '.join(names)}" for value, names in sorted(by_value.items()))
