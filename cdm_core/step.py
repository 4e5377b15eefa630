"""One CDM iteration: schedule -> backward simulation -> fake step (+ blend) -> every ``update_ratio``-th
iteration a student step (CA + DM + CDM) and the student EMA update.

Every ablation of CDM_SPEC.md is a field of :class:`CDMConfig` on this one code path:
``schedule`` fixed | dynamic; ``use_ca/use_dm/use_cdm``; ``off_trajectory`` velocity | gaussian (re-noising
the rollout's ``gaussian_base``: final | anchor); ``target`` local | final; ``n_max``; ``alpha``;
``update_ratio``; the loss weights; ``norm_floor``; ``fake_mix`` (a variant outside the authors' code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from cdm_core.conditioning import Cond
from cdm_core.ema import EMA
from cdm_core.flow import VelocityFn, euler_step, interpolate, x0_from_velocity
from cdm_core.knobs import knob
from cdm_core.losses import ca_loss, dm_loss, fake_loss
from cdm_core.rollout import backward_simulation
from cdm_core.schedule import Schedule, dynamic_schedule, fixed_schedule, pick_anchors
from cdm_core.seeds import rank_seed, schedule_seed
from cdm_core.trainable import Trainable, blend_parameters


@dataclass(frozen=True)
class CDMConfig:
    """The algorithm's knobs; defaults are the spec's SD3 values.

    ``norm_floor``: lower bound of the per-sample normaliser ``n = max(mean|D_R - x0_hat|, floor)``, in the
    data's units (0.1 for SD3's unit-variance latents; in pixel space on [-1, 1] the median ``n`` is ~0.01-0.07,
    so 0.1 would bind at most noise levels). ``fake_mix``: share of the fake teacher's batch taken from the
    off-trajectory estimates ``x0_hat'`` (built by velocity extrapolation, as L_CDM's default builds them), instead
    of the anchor estimates ``x0_hat_i`` (0 = the authors' code; costs one student forward without gradient).
    ``fake_final``: share of the fake teacher's batch taken from the rollout's final sample (the clean estimate at
    the last anchor, what the student outputs) instead, over the whole batch; ``fake_mix`` applies to the rest.
    Anchor and off-trajectory estimates pool the student's clean estimates over all noise levels, the blurry
    early ones with the sharp late ones, so ``D_R - D_F`` at a late estimate can keep pointing sharper than the
    output already is; a fake teacher of the final samples scores the distribution the student is judged on (a
    variant outside the authors' code; the rollout then runs to the last anchor, at most a few student forwards
    without gradient).
    ``ca_tau_max``: CA's own upper clamp, a guidance interval (guidance left out at the highest noise levels, where
    it sets global intensity and contrast) while DM, the fake teacher and ``t'`` keep ``[tau_min, tau_max]``; None =
    ``tau_max``, which then bounds every sampled level as before.
    """

    schedule: Literal["dynamic", "fixed"] = "dynamic"
    n_max: int = knob(28, ge=1, le=1000)
    s_min: float = knob(0.25, gt=0.0, lt=1.0)
    s_max: float = knob(0.95, gt=0.0, lt=1.0)
    shift: float = knob(3.0, gt=0.0, le=100.0, description="time shift of schedules and sampler levels")
    fixed_steps: int = knob(4, ge=1, le=64, description="anchors of schedule=fixed (DMD2)")
    sampler_steps: int = knob(
        4, ge=1, le=64, description="K of the student's K-step sampler: validation, export, evaluation and serving"
    )
    use_ca: bool = True
    use_dm: bool = True
    use_cdm: bool = True
    w_ca: float = knob(1.0, ge=0.0, le=100.0)
    w_dm: float = knob(1.0, ge=0.0, le=100.0)
    w_cdm: float = knob(1.0, ge=0.0, le=100.0)
    alpha: float = knob(7.0, ge=0.0, le=100.0, description="CFG-augmentation scale")
    off_trajectory: Literal["velocity", "gaussian"] = "velocity"
    target: Literal["local", "final"] = "local"
    gaussian_base: Literal["final", "anchor"] = knob(
        "final", description="what off_trajectory=gaussian re-noises: the rollout's final sample or the anchor's x0_hat"
    )
    fake_mix: float = knob(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of the fake teacher's batch taken from off-trajectory estimates (0 = authors' code)",
    )
    fake_final: float = knob(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of the fake teacher's batch taken from the rollout's final sample (0 = authors' code)",
    )
    tau_min: float = knob(0.02, gt=0.0, lt=1.0)
    tau_max: float = knob(0.98, gt=0.0, lt=1.0)
    ca_tau_max: float | None = knob(
        None,
        gt=0.0,
        lt=1.0,
        description="upper clamp of CA's tau alone (None = tau_max); DM, the fake teacher and t' keep tau_max",
    )
    norm_floor: float = knob(
        0.1, gt=0.0, le=10.0, description="floor of the DM/CA normaliser, in the data's units (0.1 for SD3 latents)"
    )
    update_ratio: int = knob(2, ge=1, le=100)
    fake_blend: float | None = knob(0.999, ge=0.0, le=1.0)
    seed: int = knob(0, ge=0)

    def __post_init__(self):
        if self.schedule not in ("dynamic", "fixed"):
            raise ValueError(f"schedule must be dynamic or fixed, got {self.schedule!r}")
        if self.off_trajectory not in ("velocity", "gaussian"):
            raise ValueError(f"off_trajectory must be velocity or gaussian, got {self.off_trajectory!r}")
        if self.target not in ("local", "final"):
            raise ValueError(f"target must be local or final, got {self.target!r}")
        if self.gaussian_base not in ("final", "anchor"):
            raise ValueError(f"gaussian_base must be final or anchor, got {self.gaussian_base!r}")
        if not 0.0 <= self.fake_mix <= 1.0:
            raise ValueError(f"fake_mix must be in [0, 1], got {self.fake_mix}")
        if not 0.0 <= self.fake_final <= 1.0:
            raise ValueError(f"fake_final must be in [0, 1], got {self.fake_final}")
        if not self.norm_floor > 0.0:
            raise ValueError(f"norm_floor must be > 0, got {self.norm_floor}")
        if min(self.n_max, self.update_ratio, self.fixed_steps, self.sampler_steps) < 1:
            raise ValueError("n_max, update_ratio, fixed_steps and sampler_steps must be >= 1")
        if not 0.0 < self.s_min < self.s_max < 1.0:
            raise ValueError(f"need 0 < s_min < s_max < 1, got s_min={self.s_min}, s_max={self.s_max}")
        if not 0.0 < self.tau_min < self.tau_max < 1.0:
            raise ValueError(f"need 0 < tau_min < tau_max < 1, got tau_min={self.tau_min}, tau_max={self.tau_max}")
        if self.ca_tau_max is not None and not self.tau_min < self.ca_tau_max < 1.0:
            raise ValueError(f"need tau_min < ca_tau_max < 1, got tau_min={self.tau_min}, ca_tau_max={self.ca_tau_max}")
        if not (self.use_ca or self.use_dm or self.use_cdm):
            raise ValueError("at least one of use_ca, use_dm, use_cdm must be on")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if self.fake_blend is not None and not 0.0 <= self.fake_blend <= 1.0:
            raise ValueError("fake_blend must be in [0, 1] or None")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepResult:
    iteration: int
    n: int
    student_updated: bool
    metrics: dict[str, float]


class CDMStep:
    """Drives student, fake teacher and real teacher through one iteration at a time.

    student, fake: :class:`Trainable`; real: velocity callable of the frozen teacher; ema: the student's
    EMA (or None); ``blend`` and ``ema_update`` can be replaced where parameters are partitioned
    (ZeRO-3) and must be gathered first.
    """

    def __init__(
        self,
        cfg: CDMConfig,
        student: Trainable,
        fake: Trainable,
        real: VelocityFn,
        ema: EMA | None = None,
        rank: int = 0,
        blend: Callable[[Trainable, Trainable, float], None] | None = None,
        ema_update: Callable[[EMA, Trainable], None] | None = None,
        sync_depth: Callable[[int], int] | None = None,
    ):
        self.sync_depth = sync_depth
        self.cfg, self.student, self.fake, self.real, self.ema, self.rank = cfg, student, fake, real, ema, rank
        self.blend = blend or (lambda f, s, d: blend_parameters(f.parameters(), s.parameters(), d))
        self.ema_update = ema_update or (lambda e, s: e.update(s))
        self.student_steps = 0

    def schedule(self, iteration: int) -> Schedule:
        c = self.cfg
        if c.schedule == "fixed":
            return fixed_schedule(c.fixed_steps, c.shift)
        return dynamic_schedule(schedule_seed(c.seed, iteration), c.n_max, c.s_min, c.s_max, c.shift)

    def _uniform(self, b: int, g: torch.Generator, device, lo: float | torch.Tensor = None, hi=None) -> torch.Tensor:
        lo = self.cfg.tau_min if lo is None else lo
        hi = self.cfg.tau_max if hi is None else hi
        return lo + (hi - lo) * torch.rand(b, generator=g, device=device)

    def __call__(
        self,
        iteration: int,
        cond: Cond,
        uncond: Cond,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StepResult:
        c = self.cfg
        b = shape[0]
        g = torch.Generator(device=device).manual_seed(rank_seed(c.seed, self.rank, iteration))
        g_cpu = torch.Generator().manual_seed(rank_seed(c.seed, self.rank, iteration, stream=1))
        randn = lambda: torch.randn(shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        sched = self.schedule(iteration)
        anchors = pick_anchors(sched, b, g_cpu)
        need_final = c.fake_final > 0.0 or (
            c.use_cdm and (c.target == "final" or (c.off_trajectory == "gaussian" and c.gaussian_base == "final"))
        )
        roll = backward_simulation(
            self.student.velocity, randn(), sched.sigmas, anchors, cond, need_final, self.sync_depth
        )
        m: dict[str, float] = {
            "schedule/n": float(sched.n),
            "schedule/t_mean": float(roll.t.mean()),
            "nfe/rollout": float(roll.nfe),
        }

        # fake teacher: denoise the student's current samples; then blend toward the student
        x0_fake = roll.x0_hat
        if c.fake_mix > 0.0 and c.fake_final < 1.0:
            x0_fake = self._mix_off_trajectory(roll, cond, iteration, device)
        if c.fake_final > 0.0:
            x0_fake = self._mix_final(roll, x0_fake, iteration, device)
        lf = fake_loss(self.fake.velocity, x0_fake, randn(), self._uniform(b, g, device), cond)
        r = self.fake.apply(lf.loss)
        m.update(lf.log("fake"))
        m["grad_norm/fake"], m["skipped/fake"] = r.grad_norm, float(r.skipped)
        if c.fake_blend is not None:
            self.blend(self.fake, self.student, c.fake_blend)

        update = (iteration + 1) % c.update_ratio == 0
        if update:
            m.update(self._student_step(roll, cond, uncond, b, g, device, randn))
        return StepResult(iteration, sched.n, update, m)

    def _share(self, share: float, stream: int, iteration: int, like: torch.Tensor, device):
        """Which samples of the batch ``like`` a ``share`` replaces (a mask that broadcasts against it), drawn from
        this iteration's stream ``stream``; and that stream's generator, for the caller's further draws."""
        b = like.shape[0]
        g = torch.Generator(device=device).manual_seed(rank_seed(self.cfg.seed, self.rank, iteration, stream=stream))
        pick = torch.rand(b, generator=g, device=device) < share
        return pick.view(-1, *[1] * (like.ndim - 1)), g

    @torch.no_grad()
    def _mix_off_trajectory(self, roll, cond: Cond, iteration: int, device) -> torch.Tensor:
        """Replace a ``fake_mix`` share of the anchor estimates by off-trajectory ones, built as L_CDM builds
        them (``x' = x + (t' - t) v_roll``, ``x0_hat' = x' - t' G(x', t')``), from a stream of its own."""
        pick, g = self._share(self.cfg.fake_mix, 2, iteration, roll.x, device)
        t_off = self._uniform(roll.x.shape[0], g, device)
        x_off = euler_step(roll.x, roll.t, t_off, roll.v)
        x0_off = x0_from_velocity(x_off, t_off, self.student.velocity(x_off, t_off, cond))
        return torch.where(pick, x0_off, roll.x0_hat)

    def _mix_final(self, roll, x0_fake: torch.Tensor, iteration: int, device) -> torch.Tensor:
        """Replace a ``fake_final`` share of the fake teacher's samples by the rollout's final sample, picked from a
        stream of its own (so ``fake_final`` 0 leaves every other draw as it was)."""
        pick, _ = self._share(self.cfg.fake_final, 3, iteration, roll.x, device)
        return torch.where(pick, roll.final_x0_hat, x0_fake)

    def _student_step(self, roll, cond, uncond, b, g, device, randn) -> dict[str, float]:
        c = self.cfg
        m: dict[str, float] = {}
        x, t, v_roll = roll.x, roll.t, roll.v
        total = torch.zeros((), device=x.device)
        if c.use_ca or c.use_dm:
            x0_hat = x0_from_velocity(x, t, self.student.velocity(x, t, cond))
            if c.use_ca:
                ca_hi = c.tau_max if c.ca_tau_max is None else c.ca_tau_max
                tau = self._uniform(b, g, device, 0.0, t).clamp(c.tau_min, ca_hi)
                la = ca_loss(x0_hat, self.real, cond, uncond, randn(), tau, c.alpha, c.norm_floor)
                total = total + c.w_ca * la.loss
                m.update(la.log("ca"))
            if c.use_dm:
                ld = dm_loss(
                    x0_hat,
                    self.real,
                    self.fake.velocity,
                    cond,
                    randn(),
                    self._uniform(b, g, device),
                    floor=c.norm_floor,
                )
                total = total + c.w_dm * ld.loss
                m.update(ld.log("dm"))
        if c.use_cdm:
            t_off = self._uniform(b, g, device)
            if c.off_trajectory == "velocity":
                x_off = euler_step(x, t, t_off, v_roll)  # x + (t' - t) v_roll, no gradient
            else:  # re-noise a clean estimate to t': the rollout's final one (authors' default) or the anchor's
                base = roll.final_x0_hat if c.gaussian_base == "final" else roll.x0_hat
                x_off = interpolate(base, randn(), t_off)
            x0_off = x0_from_velocity(x_off, t_off, self.student.velocity(x_off, t_off, cond))
            z_base = roll.final_x0_hat if c.target == "final" else None
            lc = dm_loss(
                x0_off,
                self.real,
                self.fake.velocity,
                cond,
                randn(),
                self._uniform(b, g, device),
                z_base=z_base,
                floor=c.norm_floor,
            )
            total = total + c.w_cdm * lc.loss
            m.update(lc.log("cdm"))
        r = self.student.apply(total)
        m["loss/student"] = float(total.detach())
        m["grad_norm/student"], m["skipped/student"] = r.grad_norm, float(r.skipped)
        if self.ema is not None:
            m["ema/decay"] = self.ema_update(self.ema, self.student) or self.ema.decay
        self.student_steps += 1
        return m
