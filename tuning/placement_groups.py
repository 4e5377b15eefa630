"""Freeing the placement groups that the Train workers of stopped trials leave behind.

Why it is needed (Ray 2.60). A trial is a Tune actor running a Ray Train v2 ``TorchTrainer``, whose
``TrainController`` actor (owned by the trial actor) creates the workers' placement group. When Tune stops
a trial (ASHA, ``max_t``, the time budget) it kills the trial actor; the controller dies with its owner,
without shutting its worker group down. Ray removes a non-detached placement group only when its creator
actor *and* its creator job are dead, and the job is the sweep driver, still running: the group stays
CREATED and holds its CPUs/GPUs, so the next trials' worker groups wait for resources that never free up
(``WorkerGroupStartupTimeoutError`` after 60 s, then a retry whose group leaks as well). Ray Train's own
remedy, a detached ``PlacementGroupCleaner`` per run (``ray/train/v2/_internal/callbacks/
placement_group_callback.py``, ``.../execution/controller/placement_group_cleaner.py``), asks the state API
(``ray.util.state.get_actor``) whether the controller is alive; the dashboard serves that API, so the cleaner
never succeeds on a cluster started with ``include_dashboard=False`` (the tests'), and its monitor thread
dies on ``ConnectionError: Found multiple active Ray instances`` when a second local Ray runs on the
machine. Measured (2 CPUs, ASHA stopping a trial of a 1-worker ``TorchTrainer``, with and without the
dashboard): the stopped trial's group stayed CREATED ``{CPU: 1}`` and the next trial never got its worker.

How, with public APIs only (no file the workers write, no ``ray._raylet``). A group is an orphan of this
sweep when it belongs to the driver's Ray job (a placement group id ends with the id of the job that
created it), did not exist when the sweep started, is CREATED, and none of its bundle resources
(``<resource>_group_<id>`` in ``ray.available_resources()``) has been in use for ``REAP_DELAY_S``: a live
worker group holds its bundles from the moment its workers are placed, and Tune frees its own trial
groups itself. At the end of the experiment (every trial actor killed, Tune's groups freed) every group
of the sweep still alive is an orphan, PENDING ones too (they would turn CREATED later).
"""

from __future__ import annotations

import time

from workflows.progress import console

try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object

REAP_DELAY_S = 8.0  # how long a group's bundles must stay unused before it counts as an orphan
POLL_S = 2.0  # how often the driver looks (one GCS query and the resource view; only after a trial ended)
ALIVE = ("PENDING", "CREATED", "RESCHEDULING")


def groups_of_job(job_hex: str) -> dict[str, dict]:
    """``ray.util.placement_group_table()`` restricted to the groups created by the Ray job ``job_hex``."""
    import ray

    return {h: g for h, g in ray.util.placement_group_table().items() if h.endswith(job_hex)}


def unused(group_hex: str, total: dict, free: dict) -> bool:
    """True when none of the group's bundle resources is in use (``ray.available_resources()`` leaves out
    the ones with nothing available)."""
    keys = [k for k in total if "_group_" in k and k.endswith(group_hex)]
    return bool(keys) and all(free.get(k, 0.0) >= total[k] - 1e-9 for k in keys)


def remove(group_hex: str) -> bool:
    import ray
    from ray.util.placement_group import PlacementGroup

    try:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_hex)))
        return True
    except Exception as e:  # already gone, or the cluster is going down
        console.print(f"\\[sweep] note: placement group {group_hex[:12]}: {type(e).__name__}: {e}")
        return False


class StoppedTrialGroups(_TuneCallback):
    """Tune callback in the sweep driver: removes the placement groups of stopped trials (module docstring)."""

    def __init__(self, delay_s: float = REAP_DELAY_S, poll_s: float = POLL_S):
        self.delay_s, self.poll_s = delay_s, poll_s
        self._reset()

    def _reset(self) -> None:
        self._job: str | None = None  # the driver's Ray job id (hex); None: not watching
        self._before: set[str] = set()
        self._unused_since: dict[str, float] = {}
        self._armed = False  # no group can be orphaned before a trial ended
        self._last_poll = 0.0
        self.removed: list[str] = []

    def __getstate__(self):  # Tune pickles its callbacks with the experiment
        return {"delay_s": self.delay_s, "poll_s": self.poll_s}

    def __setstate__(self, state: dict) -> None:
        self.delay_s, self.poll_s = state["delay_s"], state["poll_s"]
        self._reset()

    def setup(self, **info):
        import ray

        if not ray.is_initialized():
            return
        job = ray.get_runtime_context().get_job_id()
        if not ray.PlacementGroupID.of(ray.JobID.from_hex(job)).hex().endswith(job):
            console.print(
                "\\[sweep] warning: this Ray's placement group ids do not end with their job id; the "
                "groups of stopped trials are not freed before the sweep ends"
            )
            return
        self._job = job
        self._before = set(groups_of_job(job))

    def _ours(self) -> dict[str, dict]:
        return {h: g for h, g in groups_of_job(self._job).items() if h not in self._before}

    def poll(self) -> list[str]:
        """Remove the sweep's groups unused for ``delay_s``; returns their ids."""
        import ray

        now = self._last_poll = time.time()
        total, free = ray.cluster_resources(), ray.available_resources()
        still: dict[str, float] = {}
        gone = []
        for h, g in self._ours().items():
            if g.get("state") != "CREATED" or not unused(h, total, free):
                continue
            since = still[h] = self._unused_since.get(h, now)
            if now - since >= self.delay_s and remove(h):
                gone.append(h)
                del still[h]
        self._unused_since = still
        self.removed += gone
        return gone

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._armed = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self._armed = True

    def on_step_begin(self, iteration, trials, **info):
        if self._job is None or not self._armed or time.time() - self._last_poll < self.poll_s:
            return
        try:
            self.poll()
        except Exception as e:  # freeing resources must not kill the sweep
            console.print(f"\\[sweep] warning: could not check the placement groups: {type(e).__name__}: {e}")

    def on_experiment_end(self, trials, **info):
        if self._job is None:
            return
        try:
            if not any(g.get("state") in ALIVE for g in self._ours().values()):
                return
            time.sleep(self.delay_s)  # the last trial actors were just killed: let their controllers die
            left = [h for h, g in self._ours().items() if g.get("state") in ALIVE]
            self.removed += [h for h in left if remove(h)]
            if left:
                console.print(f"\\[sweep] freed {len(left)} placement group(s) left by stopped trials")
        except Exception as e:
            console.print(f"\\[sweep] warning: could not free the placement groups: {type(e).__name__}: {e}")
