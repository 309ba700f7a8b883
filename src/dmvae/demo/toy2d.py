"""The paper's 2-D study (Sec. 3.2, Fig. 3): align free points with the S-shape via the DM loss.

1,536 points start uniform on [-1.5, 1.5]^2 and play the role of encoder outputs. A small
LatentDiT (one token, 2 channels) is fitted to S-shape samples as the real score; a copy of it is
the fake score, trained on the detached points every step, and the points take one optimiser step
every ``point_every`` steps along the DM gradient (the two-time-scale rule of paper Sec. 3.1 /
DMD2). ``objective`` selects the variants the paper compares (:mod:`dmvae.demo.objectives`).

Settings versus the reference toy (which cannot finish on a CPU in minutes): see
:class:`Toy2DConfig` and ``docs/priors.md``. The figures reported by the demo:

* **energy distance** (V-statistic, ``dmvae.metrics.distribution.energy_distance``) between the
  points and an independent 1,536-sample reference set, averaged over ``eval_sets`` reference sets;
* the **two-sample floor**: the same statistic between pairs of independent reference sets (what a
  perfect sampler scores), averaged over ``eval_sets`` pairs;
* **coverage** (Naeem et al. 2020, k = 5): the fraction of reference samples whose 5-NN ball
  contains at least one point, averaged over the reference sets. Mode dropping lowers it.

Randomness comes from seeded generators; where a library call draws from torch's global RNG (the
networks' initialisation, LatentDiT's label dropout) the draw runs inside
``torch.random.fork_rng``, so a run neither depends on nor changes the caller's global RNG state.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dmvae._config import ConfigMixin
from dmvae.demo.objectives import COMPARE_OBJECTIVES, FINDINGS, ResearchObjectiveLoss
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.metrics.distribution import coverage, energy_distance
from dmvae.priors.learned import fit_reference_model
from dmvae.priors.sshape import SShape2D

__all__ = [
    "COMPARE_OBJECTIVES",
    "Toy2DConfig",
    "Toy2DResult",
    "Toy2DRun",
    "align_points",
    "energy_floor",
    "evaluate_points",
    "initial_points",
    "make_score_net",
    "run_toy2d",
    "train_real_score",
    "update_field",
]



@dataclass
class Toy2DConfig(ConfigMixin):
    """Demo settings. Defaults are tuned to finish in ~1-2 min on 2 busy CPU cores."""

    num_points: int = 1536  # points aligned (paper: 1536)
    seed: int = 0  # seeds the score nets, the noise and the reference/evaluation draws
    init_seed: int = 42  # the reference toy's point init: torch.manual_seed(42); rand*3 - 1.5
    # score networks: LatentDiT with one token of 2 channels (the paper uses Mini: depth 6, 256)
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 1
    # real score ("teacher") fitting on fresh S-shape samples
    teacher_steps: int = 1500
    teacher_batch_size: int = 256
    teacher_lr: float = 3e-3  # cosine decay, 50 warm-up steps (reference: 1e-4 constant, 10k steps)
    # alignment
    steps: int = 1000  # fake-score steps; the points move every `point_every` of them
    point_every: int = 2  # paper/reference: 5
    point_lr: float = 1e-2  # Adam on the points, cosine decay to 10% (reference: AdamW 1e-4)
    fake_lr: float = 1e-3  # (reference: 1e-4)
    fake_batch_size: int = 512  # points per fake-score step (reference: all)
    t_range: tuple[float, float] = (0.0, 1.0)  # library convention, t = 1 data
    normalize: bool = False  # the toy DM gradient has no per-sample normaliser (reference)
    objective: str = "dm"
    # evaluation
    eval_sets: int = 10
    coverage_k: int = 5
    num_threads: int | None = 1  # torch threads during the run (1 is fastest for these tiny nets)


@dataclass
class Toy2DRun:
    """The result of one alignment run."""

    objective: str
    points: torch.Tensor  # (N, 2) final points
    energy_before: float
    energy_after: float
    coverage_before: float
    coverage_after: float
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, energy)
    field_points: torch.Tensor | None = None  # (N, 2) points when the update field was taken
    field: tuple[torch.Tensor, torch.Tensor] | None = None  # (grid (G, 2), -g (G, 2))

    def summary(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "energy_before": self.energy_before,
            "energy_after": self.energy_after,
            "coverage_before": self.coverage_before,
            "coverage_after": self.coverage_after,
            "seconds": round(self.seconds, 2),
        }


def make_score_net(cfg: Toy2DConfig):
    """A one-token LatentDiT over 2 channels (input (B, 2, 1, 1)), one class plus the null class."""
    from dmvae.dit import LatentDiT, LatentDiTConfig

    return LatentDiT(
        LatentDiTConfig(
            input_size=1, patch_size=1, in_channels=2, hidden_size=cfg.hidden_size,
            depth=cfg.depth, num_heads=cfg.num_heads, num_classes=1, class_dropout_prob=0.1,
        )
    )


def initial_points(n: int = 1536, seed: int = 42) -> torch.Tensor:
    """The reference toy's start: ``torch.manual_seed(seed); rand(n, 2) * 3 - 1.5`` (uniform box),
    drawn from a private generator so the global RNG is untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g) * 3.0 - 1.5


def train_real_score(cfg: Toy2DConfig, prior: SShape2D, *, progress: Callable | bool = False):
    """Fit the real score on fresh S-shape samples (paper App. C teacher, scaled down)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the network's initialisation and label dropout, seeded locally
        net = make_score_net(cfg)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        return fit_reference_model(
            net, prior, steps=cfg.teacher_steps, batch_size=cfg.teacher_batch_size, lr=cfg.teacher_lr,
            lr_schedule="cosine", warmup_steps=min(50, cfg.teacher_steps // 10), generator=g,
            progress=progress,
        )


def evaluate_points(points: torch.Tensor, refs: Sequence[torch.Tensor], k: int = 5) -> tuple[float, float]:
    """(mean energy distance, mean coverage) of ``points`` against each reference set."""
    e = float(np.mean([energy_distance(points, r) for r in refs]))
    c = float(np.mean([coverage(r, points, k=k) for r in refs]))
    return e, c


def energy_floor(prior: SShape2D, n: int, pairs: int, seed: int) -> float:
    """Mean energy distance between ``pairs`` pairs of independent n-sample reference sets."""
    rng = np.random.default_rng(seed)
    vals = [
        energy_distance(torch.from_numpy(prior.sample_numpy(n, rng)), torch.from_numpy(prior.sample_numpy(n, rng)))
        for _ in range(pairs)
    ]
    return float(np.mean(vals))


def _as_grid(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 2, 1, 1)


def update_field(loss: DistributionMatchingLoss, *, size: int = 15, t: float = 0.7, draws: int = 8,
                 extent: float = 1.5, seed: int = 0,
                 reshape: Callable[[torch.Tensor], torch.Tensor] = _as_grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean descent direction ``-g`` on a size x size grid at time ``t`` (paper Fig. 7 style).

    ``reshape`` maps (G, 2) points to the score nets' input ((G, 2, 1, 1) for the toy LatentDiT;
    identity for 2-D priors)."""
    lin = torch.linspace(-extent, extent, size)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(-1, 2)  # (G, 2)
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros_like(grid)
    for _ in range(draws):
        z = reshape(grid)
        noise = torch.randn(z.shape, generator=gen)
        acc -= loss.gradient(z, t=t, noise=noise).reshape(-1, 2)
    return grid, acc / draws


def align_points(
    cfg: Toy2DConfig,
    real: torch.nn.Module,
    refs: Sequence[torch.Tensor],
    *,
    objective: str | None = None,
    progress: Callable | bool = False,
    record_every: int | None = None,
    before: tuple[float, float] | None = None,
) -> Toy2DRun:
    """Run the DM (or variant) alignment of ``cfg.num_points`` points against ``real``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)  # the fake score's label dropout, seeded locally
        return _align_points(cfg, real, refs, objective or cfg.objective, progress, record_every, before)


def _align_points(cfg: Toy2DConfig, real: torch.nn.Module, refs: Sequence[torch.Tensor], objective: str,
                  progress: Callable | bool, record_every: int | None,
                  before: tuple[float, float] | None) -> Toy2DRun:
    start = time.perf_counter()
    fake = copy.deepcopy(real).requires_grad_(True).train()  # paper: fake initialised from real
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=cfg.fake_lr, betas=(0.9, 0.95), weight_decay=0.0)
    pts0 = initial_points(cfg.num_points, cfg.init_seed)
    points = torch.nn.Parameter(pts0.clone())
    opt = torch.optim.Adam([points], lr=cfg.point_lr, betas=(0.9, 0.95))
    n_updates = max(1, math.ceil(cfg.steps / cfg.point_every))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / n_updates, 1.0)))
    )
    loss_fn = ResearchObjectiveLoss(real, fake, t_range=cfg.t_range, normalize=cfg.normalize, objective=objective)
    e0, c0 = before if before is not None else evaluate_points(pts0, refs, cfg.coverage_k)
    history = [(0, e0)]
    field_at = max(1, cfg.steps // 10)
    field_pts, fld = None, None
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    it = range(cfg.steps)
    if progress is True:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"align ({objective})", leave=False)
    elif callable(progress):
        it = progress(it)
    for step in it:
        if step % cfg.point_every == 0:
            loss, _ = loss_fn(_as_grid(points), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # reaches the points only (no objective leaks into the score nets)
            if points.grad is not None:
                points.grad.nan_to_num_(0.0, 0.0, 0.0)
            opt.step()
            sched.step()
        idx = torch.randperm(cfg.num_points, generator=gen)[: cfg.fake_batch_size]
        fl, _ = loss_fn.fake_loss(_as_grid(points[idx]), generator=gen)
        fake_opt.zero_grad(set_to_none=True)
        fl.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        fake_opt.step()
        if step + 1 == field_at:
            field_pts = points.detach().clone()
            fld = update_field(loss_fn)
        if record_every and (step + 1) % record_every == 0:
            history.append((step + 1, evaluate_points(points.detach(), refs[:2], cfg.coverage_k)[0]))
    final = points.detach().clone()
    e1, c1 = evaluate_points(final, refs, cfg.coverage_k)
    history.append((cfg.steps, e1))
    return Toy2DRun(objective, final, e0, e1, c0, c1, time.perf_counter() - start, history, field_pts, fld)


@dataclass
class Toy2DResult:
    """Everything ``dmvae demo`` reports: the DM run, the optional comparison runs, the floor."""

    config: Toy2DConfig
    energy_floor: float
    reference: torch.Tensor  # (N, 2) one reference set (for plots)
    runs: dict[str, Toy2DRun]
    teacher_seconds: float
    seconds: float

    @property
    def main(self) -> Toy2DRun:
        return self.runs[self.config.objective] if self.config.objective in self.runs else next(iter(self.runs.values()))

    def to_dict(self) -> dict[str, Any]:
        m = self.main
        out: dict[str, Any] = {
            "energy_before": m.energy_before,
            "energy_after": m.energy_after,
            "energy_floor": self.energy_floor,
            "energy_ratio_to_floor": m.energy_after / self.energy_floor,
            "coverage_before": m.coverage_before,
            "coverage_after": m.coverage_after,
            "objective": m.objective,
            "teacher_seconds": round(self.teacher_seconds, 2),
            "seconds": round(self.seconds, 2),
            "config": self.config.to_dict(),
        }
        if len(self.runs) > 1:
            out["objectives"] = {k: r.summary() for k, r in self.runs.items()}
        return out

    def report(self) -> str:
        """The figures as text: energy distance and coverage before/after next to the floor, and
        with several objectives a table of each one's result beside the paper's finding."""
        m, cfg, floor = self.main, self.config, self.energy_floor
        lines = [
            f"energy distance (V-statistic, vs {cfg.eval_sets} independent {cfg.num_points}-sample reference sets)",
            f"  before  {m.energy_before:.5f}",
            f"  after   {m.energy_after:.5f}   ({m.energy_after / floor:.2f}x the two-sample floor)",
            f"  floor   {floor:.5f}   (two independent reference sets)",
            f"coverage (fraction of reference samples whose {cfg.coverage_k}-NN ball holds a point)",
            f"  before  {m.coverage_before:.3f}",
            f"  after   {m.coverage_after:.3f}",
        ]
        if len(self.runs) > 1:
            lines += ["", f"{'objective':<18}{'energy':>10}{'x floor':>9}{'coverage':>10}{'sec':>7}   paper's finding"]
            for name, r in self.runs.items():
                lines.append(f"{name:<18}{r.energy_after:>10.5f}{r.energy_after / floor:>9.2f}"
                             f"{r.coverage_after:>10.3f}{r.seconds:>7.0f}   {FINDINGS.get(name, '')}")
        lines += ["", f"total {self.seconds:.0f} s (real score {self.teacher_seconds:.0f} s)"]
        return "\n".join(lines)


def run_toy2d(
    cfg: Toy2DConfig | None = None,
    *,
    objectives: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Toy2DResult:
    """Fit the real score once, then align the points with each objective (default: cfg.objective)."""
    cfg = cfg or Toy2DConfig()
    objectives = list(objectives) if objectives else [cfg.objective]
    if cfg.objective not in objectives:
        cfg = cfg.replace(objective=objectives[0])
    say = log or (lambda s: None)
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    try:
        prior = SShape2D(seed=cfg.seed)
        say(f"fitting the real score: LatentDiT depth {cfg.depth}, width {cfg.hidden_size}, "
            f"{cfg.teacher_steps} steps on fresh S-shape samples")
        t0 = time.perf_counter()
        real = train_real_score(cfg, prior, progress=progress)
        teacher_s = time.perf_counter() - t0
        rng = np.random.default_rng(cfg.seed + 100)
        refs = [torch.from_numpy(prior.sample_numpy(cfg.num_points, rng)).float() for _ in range(cfg.eval_sets)]
        floor = energy_floor(prior, cfg.num_points, cfg.eval_sets, cfg.seed + 200)
        before = evaluate_points(initial_points(cfg.num_points, cfg.init_seed), refs, cfg.coverage_k)
        runs = {}
        for obj in objectives:
            say(f"aligning {cfg.num_points} points with objective {obj!r}: {cfg.steps} steps, points every {cfg.point_every}")
            runs[obj] = align_points(cfg, real, refs, objective=obj, progress=progress, before=before)
    finally:
        torch.set_num_threads(old_threads)
    return Toy2DResult(cfg, floor, refs[0], runs, teacher_s, time.perf_counter() - t_start)
