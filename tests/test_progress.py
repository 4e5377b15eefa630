"""StepLogger: the ETA of a time-limited job is bounded by its wall-time budget, not its step count."""

import re

from workflows.progress import StepLogger, console


def _eta(logger: StepLogger, step: int) -> float:
    with console.capture() as cap:
        logger(step, force=True, loss=1.0)
    return float(re.search(r"eta (\S+)s", cap.get()).group(1))


def test_eta_from_steps_without_budget():
    log = StepLogger(1_000_000, "t", every=10)
    log.t0 -= 10.0  # 10 steps took 10 s
    assert _eta(log, 10) > 900_000


def test_eta_capped_by_budget():
    log = StepLogger(1_000_000, "t", every=10, budget_s=60.0)
    log.t0 -= 10.0
    assert 45 <= _eta(log, 10) <= 50


def test_eta_when_steps_end_first():
    log = StepLogger(20, "t", every=10, budget_s=3600.0)
    log.t0 -= 10.0  # 1 step/s, 10 steps left
    assert 9 <= _eta(log, 10) <= 11
