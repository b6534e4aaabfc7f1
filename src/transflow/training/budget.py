"""The time budget of ``--time-limit``: how many steps fit, from the measured speed."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping

from .recipe import TrainConfig

FALLBACK_RESERVE = 0.1  # share of the budget kept for the final phase until its cost is measured
RESERVE_MARGIN = 1.5  # the measured estimate of the final phase, times this
RESERVE_FLOOR = 0.02  # never keep less than this share of the budget
RESERVE_CAP = 0.5  # nor more than this share
ESSENTIAL = ("eval", "sample")  # the final phase's work that must be measured for an estimate


class TimeBudget:
    """``--time-limit``: after 30 steps of this session, fit ``steps`` to the budget from the
    measured speed (refitted at every log step while the machine's speed changes), keeping a
    reserve for the final phase; and say when the budget is spent. The budget counts earlier
    sessions' training time (``elapsed_before``) and this session's ``setup`` seconds (the
    trainer's construction: model, data-dependent initialisation, checkpoint).

    The final phase (the whole test split's bits/dim, the temperature rule's samples, the final
    grid, the checkpoint and model files) is the training loop's own periodic work at a larger
    size: ``final_work`` counts its units (``"eval"`` test images, ``"sample"`` images,
    ``"save"`` checkpoint-sized writes) and :meth:`note` records what each unit cost in the
    loop (the trainer measures a small evaluation and draw at the first fit). Once evaluation
    and sampling have been measured, the reserve is 1.5 times the estimate (within 2% and 50%
    of the budget); before that it is 10% of the budget."""

    WARMUP_STEPS = 30

    def __init__(self, minutes: float, start_step: int, elapsed_before: float,
                 final_work: Mapping[str, int] | None = None, setup: float = 0.0):
        self.seconds = minutes * 60
        self.start_step = start_step
        self.before = elapsed_before + setup  # earlier sessions, and this one's set-up
        self.final_work = {k: n for k, n in (final_work or {}).items() if n > 0}
        self.unit_seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @property
    def active(self) -> bool:
        return self.seconds > 0

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def note(self, kind: str, seconds: float, units: int) -> None:
        """``units`` of the final phase's work ``kind`` took ``seconds`` in the loop (the
        latest measurement counts)."""
        if units > 0:
            self.unit_seconds[kind] = seconds / units

    @contextlib.contextmanager
    def timing(self, kind: str, units: int) -> Iterator[None]:
        """Time the enclosed work as ``units`` of ``kind`` (:meth:`note`)."""
        t0 = time.perf_counter()
        yield
        self.note(kind, time.perf_counter() - t0, units)

    def final_estimate(self) -> float | None:
        """Seconds the final phase should take at the measured costs; None until its
        evaluation and sampling have been measured (a write counts once measured)."""
        needed = [k for k in self.final_work if k in ESSENTIAL]
        if not needed or any(k not in self.unit_seconds for k in needed):
            return None
        return sum(self.unit_seconds[k] * n for k, n in self.final_work.items()
                   if k in self.unit_seconds)

    def reserve(self) -> float:
        """Seconds of the budget kept for the final phase."""
        return final_reserve(self.seconds, self.final_estimate())

    def out_of_time(self, step: int) -> bool:
        """Whether the budget, less the final phase's reserve, is spent before step
        ``step + 1``."""
        return bool(self.active and step + 1 > self.start_step + self.WARMUP_STEPS
                    and self.before + self.spent() > self.seconds - self.reserve())

    def due(self, step: int, log_every: int) -> bool:
        """Whether to refit after step ``step`` (1-based count of steps done)."""
        first = self.start_step + self.WARMUP_STEPS
        return self.active and step >= first and (step == first or step % log_every == 0)

    def fit(self, cfg: TrainConfig, step: int) -> TrainConfig:
        return fit_steps_to_budget(cfg, step - self.start_step, step, self.before, self.spent(),
                                   self.reserve())


def final_reserve(budget: float, estimate: float | None) -> float:
    """The seconds of a ``budget`` kept for the final phase: 10% of it while the phase's cost is
    unmeasured, else ``1.5 * estimate`` within 2% and 50% of it."""
    if estimate is None:
        return FALLBACK_RESERVE * budget
    return min(max(RESERVE_MARGIN * estimate, RESERVE_FLOOR * budget), RESERVE_CAP * budget)


def fit_steps_to_budget(cfg: TrainConfig, done: int, step: int, before: float, spent: float,
                        reserve: float | None = None) -> TrainConfig:
    """Set ``steps`` so the run ends within ``time_limit`` at the speed of this session so far
    (``done`` steps in ``spent`` seconds), keeping ``reserve`` seconds for the final phase (10%
    of the budget by default); the warmup is capped at 10% of the steps."""
    budget = cfg.time_limit * 60
    if reserve is None:
        reserve = final_reserve(budget, None)
    rate = done / max(spent, 1e-9)
    left = budget - reserve - before - spent
    steps = max(step + 1, step + int(left * rate))
    # a short budget must not spend itself warming up: at most 10% of the steps
    return dataclasses.replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))
