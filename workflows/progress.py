"""Progress lines for long jobs: step, rate, ETA and the metrics passed in (works in logs, not only TTYs)."""

from __future__ import annotations

import time

from rich.console import Console

console = Console(highlight=False)


class StepLogger:
    """One line every ``every`` steps. ``budget_s``: wall time left for the job (a ``max_minutes`` limit);
    the ETA is then whichever ends first, the remaining steps at the current rate or the budget."""

    def __init__(self, total: int, label: str, every: int = 100, start: int = 0, budget_s: float | None = None):
        self.total, self.label, self.every = total, label, max(1, every)
        self.start_step, self.t0, self.budget_s = start, time.time(), budget_s

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a line: every ``every`` steps and the last one (lets callers skip costly reads)."""
        return step % self.every == 0 or step == self.total

    def __call__(self, step: int, force: bool = False, **metrics: float) -> None:
        if not (force or self.due(step)):
            return
        done = step - self.start_step
        el = time.time() - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        if self.budget_s is not None:
            eta = min(eta, max(0.0, self.budget_s - el)) if eta == eta else max(0.0, self.budget_s - el)
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        console.print(f"[bold]{self.label}[/] {step}/{self.total} {parts} {rate:.2f} it/s eta {eta:.0f}s")
