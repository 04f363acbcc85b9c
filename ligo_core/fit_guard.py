"""The fit's safety net: it never hands over a model worse than the one it started from.

Every ``every`` steps (and once before the first) the guard scores the current operator on a
small fixed held-out slice (``guard_slice``) and keeps a copy of the best operator state. A batch loss that is not
finite, or that rises more than ``DIVERGE_MARGIN`` above the first batch's, and a held-out score
that rises as much above the start's, stop the fit early. At the end the operator is set back to
the best state seen; ``grow_model`` then checks the written model on the whole held-out set and
falls back to the start if it is worse than the start by more than ``TOLERANCE``.

Outcomes (the report's ``fit.outcome``):
- ``improved``: the written model is the best fitted state, at or below the start;
- ``kept_start``: no fitted state beat the start, so the start is written;
- ``stopped_diverged``: the fit diverged and stopped early; the best state seen is written (the
  start, unless an earlier step beat it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ligo_core.sharding import load_state, snapshot

OUTCOMES = {
    "improved": "the written model is the fitted operator's best state, no worse on held-out text than the start",
    "kept_start": "no fitted state beat the unfitted start on held-out text, so the start was written",
    "stopped_diverged": "the fit diverged and stopped early; the best state seen (the start unless a step beat it) "
                        "was written",
    "unchecked": "no held-out data to check the fit on",
}
DIVERGE_MARGIN = 1.0  # nats above the start: far past the noise of one batch or the slice
TOLERANCE = 1e-3  # nats: what "no worse than the start" allows for float summation order
# Held-out tokens scored per check (at least 8 sequences): a slice of 256 tokens misjudged a toy
# fit that lowered the loss on the whole held-out set (docs/GROWTH.md, "The guard").
GUARD_TOKENS = 4096


def guard_slice(heldout: torch.Tensor) -> torch.Tensor:
    return heldout[: max(8, GUARD_TOKENS // heldout.shape[1])]
CHECKS = 8  # held-out checks per fit, spread evenly (every step for fits of up to 8 steps)


def check_every(steps: int) -> int:
    return max(1, math.ceil(steps / CHECKS))


@dataclass
class FitGuard:
    """Scores the operator with ``score(operator) -> held-out loss`` and keeps the best state."""

    score: Callable[[torch.nn.Module], float]
    every: int = 1
    start_loss: float | None = None
    best_loss: float = math.inf
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    start_state: dict[str, torch.Tensor] | None = None
    first_batch_loss: float | None = None
    stopped_at: int | None = None
    reason: str | None = None
    final_check: str | None = None
    checks: list[tuple[int, float]] = field(default_factory=list)

    def start(self, operator: torch.nn.Module) -> None:
        """Score the unfitted operator: the reference every later state must beat."""
        self.start_loss = self._check(0, operator)
        self.start_state = self.best_state

    def after_step(self, step: int, batch_loss: float, operator: torch.nn.Module, last: bool) -> bool:
        """Called after optimiser step ``step`` (1-based); True means stop fitting now."""
        if self.first_batch_loss is None:
            self.first_batch_loss = batch_loss
        if not math.isfinite(batch_loss) or batch_loss > self.first_batch_loss + DIVERGE_MARGIN:
            return self._stop(step, f"batch loss {batch_loss:.4g} at step {step} (first batch {self.first_batch_loss:.4g})")
        if step % self.every and not last:
            return False
        loss = self._check(step, operator)
        if not math.isfinite(loss) or loss > self.start_loss + DIVERGE_MARGIN:
            return self._stop(step, f"held-out loss {loss:.4g} at step {step} (start {self.start_loss:.4g})")
        return False

    def restore_best(self, operator: torch.nn.Module) -> None:
        load_state(operator, self.best_state)

    def fall_back(self, operator: torch.nn.Module, best_loss: float, start_loss: float) -> None:
        """The best state failed the check on the whole held-out set: set the operator to the start."""
        load_state(operator, self.start_state)
        self.final_check = (f"the fit's best state scored {best_loss:.4f} on the whole held-out set, "
                            f"above the start's {start_loss:.4f}: the start was written")

    @property
    def outcome(self) -> str:
        if self.stopped_at is not None:
            return "stopped_diverged"
        return "improved" if self.best_step > 0 and self.final_check is None else "kept_start"

    def summary(self) -> dict:
        return {"outcome": self.outcome, "best_step": self.best_step, "stopped_at": self.stopped_at,
                "stop_reason": self.reason, "final_check": self.final_check, "guard_checks": self.checks}

    def _check(self, step: int, operator: torch.nn.Module) -> float:
        loss = float(self.score(operator))
        self.checks.append((step, loss))
        # A fitted state must beat the start (or the best so far) to be kept; ties keep the earlier.
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best_state = snapshot(operator)
        return loss

    def _stop(self, step: int, reason: str) -> bool:
        self.stopped_at, self.reason = step, f"diverged: {reason}"
        return True
