"""The time budget of ``--time-limit``: how many steps fit, from the measured speed."""

from __future__ import annotations

import dataclasses
import time

from .recipe import TrainConfig


class TimeBudget:
    """``--time-limit``: after 30 steps of this session, fit ``steps`` to the budget from the
    measured speed (refitted at every log step while the machine's speed changes), keeping 10%
    of the budget for the final evaluation; and say when the budget is spent."""

    WARMUP_STEPS = 30

    def __init__(self, minutes: float, start_step: int, elapsed_before: float):
        self.seconds = minutes * 60
        self.start_step = start_step
        self.before = elapsed_before
        self.t0 = time.perf_counter()

    @property
    def active(self) -> bool:
        return self.seconds > 0

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, step: int) -> bool:
        """Whether the budget is spent before step ``step + 1``."""
        return bool(self.active and step + 1 > self.start_step + self.WARMUP_STEPS
                    and self.before + self.spent() > self.seconds)

    def due(self, step: int, log_every: int) -> bool:
        """Whether to refit after step ``step`` (1-based count of steps done)."""
        first = self.start_step + self.WARMUP_STEPS
        return self.active and step >= first and (step == first or step % log_every == 0)

    def fit(self, cfg: TrainConfig, step: int) -> TrainConfig:
        return fit_steps_to_budget(cfg, step - self.start_step, step, self.before, self.spent())


def fit_steps_to_budget(cfg: TrainConfig, done: int, step: int, before: float, spent: float
                        ) -> TrainConfig:
    """Set ``steps`` so the run ends within ``time_limit`` at the speed of this session so far
    (``done`` steps in ``spent`` seconds), keeping 10% of the budget for the final evaluation;
    the warmup is capped at 10% of the steps."""
    rate = done / max(spent, 1e-9)
    left = 0.9 * cfg.time_limit * 60 - before - spent
    steps = max(step + 1, step + int(left * rate))
    # a short budget must not spend itself warming up: at most 10% of the steps
    return dataclasses.replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))
