"""StepGuard: no optimizer step on a non-finite or spiking gradient, and never silently.

The engine asks the guard before every optimizer step, with the synchronised gradient norm (the same on every
process, so all processes decide alike) and this process's loss terms. A step is refused when the norm is NaN/inf
or exceeds ``spike_factor`` x the median of the last ``history`` accepted norms. A refused step applies nothing; up
to ``max_skipped`` refusals are counted (``skipped_steps`` in the log), the next one is a ``FloatingPointError``
naming the step and the terms, raised before any checkpoint of that step is written. Under fp16 the GradScaler
already skips non-finite steps (and lowers its scale), so only spikes are checked there.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any

import torch

__all__ = ["StepGuard"]

logger = logging.getLogger(__name__)


class StepGuard:
    """Decides whether an optimizer step may be applied (module docstring)."""

    def __init__(
        self,
        max_skipped: int = 0,
        spike_factor: float = 1e4,
        history: int = 50,
        warmup: int = 10,
        scaler_handles_nonfinite: bool = False,
    ):
        self.max_skipped, self.spike_factor, self.warmup = max_skipped, spike_factor, warmup
        self.scaler_handles_nonfinite = scaler_handles_nonfinite
        self.norms: deque[float] = deque(maxlen=history)
        self.skipped = 0

    def _problem(self, norm: float, scalars: dict[str, float]) -> str | None:
        terms = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        if not math.isfinite(norm):
            if self.scaler_handles_nonfinite:
                return None
            bad = [k for k, v in scalars.items() if not math.isfinite(v)]
            where = (
                f"non-finite loss terms: {', '.join(bad)} ({terms})"
                if bad
                else f"this process's loss terms are finite ({terms}): the non-finite values arose in the backward "
                "pass or on another process"
            )
            return f"the gradient norm is {norm}; {where}"
        if self.spike_factor and len(self.norms) >= self.warmup:
            median = statistics.median(self.norms)
            if norm > self.spike_factor * median:
                return (
                    f"the gradient norm {norm:.4g} is {norm / median:.3g}x the median {median:.4g} of the last "
                    f"{len(self.norms)} steps (--grad_spike_factor {self.spike_factor:g}); loss terms: {terms}"
                )
        return None

    def check(self, norm: torch.Tensor | float, step: int, scalars: dict[str, float]) -> bool:
        """True if step ``step`` may be applied; False if it is skipped; raises past ``max_skipped`` skips."""
        value = float(norm)
        problem = self._problem(value, scalars)
        if problem is None:
            if math.isfinite(value):
                self.norms.append(value)
            return True
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise FloatingPointError(
                f"step {step}: {problem}. The step was not applied and the checkpoints written so far are intact; "
                "resume from the latest with a lower --learning_rate or a smaller --max_grad_norm, check the data "
                f"(data_report.json), or allow skipping such steps with --max_skipped_steps (skipped so far: "
                f"{self.skipped - 1})"
            )
        logger.warning("step %d skipped (%d of at most %d): %s", step, self.skipped, self.max_skipped, problem)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "norms": torch.tensor(list(self.norms), dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.norms.clear()
        self.norms.extend(float(v) for v in state["norms"].tolist())
