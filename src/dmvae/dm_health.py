"""Is the DM stage healthy? Figures and warnings for a :class:`~dmvae.dm_loss.DistributionMatchingLoss`.

The DM update (Eq. 8) is the difference of two denoisers at the same noisy latent,
``g ∝ x̂_fake − x̂_real``. It is a *distribution-matching* signal only while the fake score really
models the current latents q(z): every error of the fake enters ``g`` one to one. A fake that
over-fits the few latents it sees, or drifts away from the teacher where it should agree with it,
hands the encoder its own error as if it were a mismatch. :class:`DMHealth` measures that, with
fixed noise and times (an explicit generator) so the numbers of two steps compare:

``fake_loss_heldout`` / ``fake_loss_train`` / ``fake_overfit_gap`` / ``fake_overfit_gap_stage1``
    The fake's flow-matching loss (Eq. 7, eval mode) on held-out latents of the current encoder
    and on training latents, with the same noise and times; the gap is
    ``(heldout − train) / train``, and ``_stage1`` the same gap of the fake at construction on the
    stage-1 latents (held-out images unlike the training ones have a gap from the start). A fake
    that memorises its training latents has a growing gap.
``dm_grad_rms``
    The DM update on the held-out latents, as the root mean square of ``g`` per entry averaged over
    samples. ``g`` is divided by the teacher's own denoising error (E1), so this is dimensionless:
    1 means the two denoisers disagree by as much as the teacher errs. (The loss's logged
    ``grad_norm`` is the per-sample norm, ``dm_grad_rms · sqrt(numel per sample)``.)
``dm_floor_rms`` / ``dm_floor_ratio`` (only where the fake is meant to equal the teacher)
    The same update on *reference samples*: there q's mismatch plays no part, so what is left is
    fake/teacher disagreement alone, the *floor*. Where the encoder starts at the reference's own
    latents (q = p_r: the teacher was fitted on the stage-1 latents, the SSL and Supervised rows of
    the paper) every bit of the floor is error the encoder receives; ``dm_floor_ratio`` is
    floor / ``dm_grad_rms``, the share of the encoder's update that is fake error. Where q ≠ p_r by
    design (a Gaussian or GMM prior) the fake models q, not p_r, so its disagreement with the teacher
    on p_r's samples is expected: the floor is not a health signal there and is not reported
    (:attr:`DMHealth.notes` says so). ``dm_floor_rel`` = floor / ``mismatch_rms`` where the caller
    measured the update of a genuine mismatch.
``latent_mean`` / ``latent_std`` / ``latent_mean_drift`` / ``latent_std_ratio``
    Statistics of the held-out latents against the stage-1 ones: drift is
    ``(mean − mean_1) / std_1``, ratio ``std / std_1``. A DM term fed by fake error typically
    shrinks the latents (the issue behind this module: std 1.00 → 0.86 at q = p_r).
``energy_distance`` / ``energy_distance_stage1``
    Energy distance (:func:`dmvae.metrics.distribution.energy_distance`) of the held-out latents to
    the reference samples, now and for the stage-1 latents (the starting point).

:meth:`DMHealth.warnings` turns the figures into sentences naming what to change. Thresholds are
in :class:`HealthThresholds`; ``docs/training.md`` ("Is my DM stage healthy?") gives the ranges
measured in the test setting.

Usage (the caller encodes the same held-out images each time)::

    health = DMHealth(dm, stage1=encode(heldout_images), stage1_train=encode(train_images),
                      fake_matches_teacher=True)       # before stage 3 changes anything
    ...
    figures = health.measure(encode(heldout_images), encode(train_images))
    log.log(step, figures)
    for w in health.warnings(figures):
        print(w)

Nothing here trains: no gradient reaches any network, the modes of the networks are restored, and
torch's global random state is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dmvae._utils import eval_mode
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.latent_stats import LatentStats
from dmvae.metrics.distribution import energy_distance
from dmvae.transport import FlowMatching, guided_velocity, resolve_labels

__all__ = ["DMHealth", "HealthThresholds"]


@dataclass(frozen=True)
class HealthThresholds:
    """When :meth:`DMHealth.warnings` speaks up. Each default carries its reason.

    Attributes:
        overfit_gap: growth of the relative fake-loss gap ``(heldout − train) / train`` beyond
            its value at the start (``fake_overfit_gap_stage1``; 0 where unknown) above which the
            fake is said to over-fit (test setting of docs/training.md: +0.02 for a healthy fake,
            +0.18 for one at lr 1e-2 on 4 training images).
        floor_rms: floor (``dm_floor_rms``) above which the fake has drifted from the teacher, in
            units of the teacher's own denoising error (E1). For a unit-Gaussian teacher a fake off
            by a mean shift of d stds gives ~0.8 d, one off by 20 % in std 0.16: 0.2 is a fake
            about a quarter of a std wrong. With ``mismatch_rms`` given, ``floor_rel`` is used
            instead.
        floor_rel: floor / genuine-mismatch update above which the fake has drifted (the issue's
            gate: 20 %).
        floor_ratio: the floor warning also needs floor / ``dm_grad_rms`` above this: when the
            encoder's own update is much larger, the fake's error is a small part of it.
        std_drift: ``|latent_std_ratio − 1|`` above which the latent scale has drifted.
        mean_drift: ``|latent_mean_drift|`` (in stage-1 stds) above which the mean has drifted.
    """

    overfit_gap: float = 0.1
    floor_rms: float = 0.2
    floor_rel: float = 0.2
    floor_ratio: float = 0.5
    std_drift: float = 0.1
    mean_drift: float = 0.1


def _rms_per_sample(g: Tensor) -> float:
    """Mean over samples of the per-entry root mean square of ``g`` (B, *S)."""
    return float(g.flatten(1).float().pow(2).mean(dim=1).sqrt().mean())


def _moments(latents: Tensor) -> tuple[float, float]:
    s = LatentStats().update(latents).summary(sync=False)
    return float(s["latent_mean"]), float(s["latent_std"])


class DMHealth:
    """Health figures of a DM stage (see the module docstring for what each one means).

    Args:
        dm: the stage's :class:`~dmvae.dm_loss.DistributionMatchingLoss` (its real and fake networks,
            CFG scale, normaliser and t-range are used; a DDP-wrapped fake is unwrapped, so no
            collective runs and one process alone may measure).
        stage1: the held-out latents of the stage-1 encoder (B, *S) (the baseline of the drift
            figures and of ``energy_distance_stage1``), or a :class:`~dmvae.latent_stats.LatentStats`
            of stage-1 latents (drift only), or None: the first :meth:`measure` call's held-out
            latents become the baseline.
        stage1_train: the stage-1 latents of the fixed training images (B', *S) passed to
            :meth:`measure`: with ``stage1`` (a tensor) it gives ``fake_overfit_gap_stage1``, the gap
            of the fake *as it is at construction* (the teacher's copy, at the start of a stage):
            held-out images that differ from the training ones have a gap of their own, and the
            warning looks at the growth of the gap beyond it.
        labels, train_labels: (B,), (B',) labels of the held-out and the training images, for a
            class-conditional DM loss (None: the networks' null label); :meth:`measure` uses them
            unless it is given others.
        reference: samples of p_r (N, *S). None: drawn from ``dm.real.sample`` where the real
            model has one (a :class:`~dmvae.priors.ReferencePrior`), else, with
            ``fake_matches_teacher``, the ``stage1`` latents (the teacher was fitted on them), else
            none (no floor, no energy distance).
        reference_labels: (N,) labels of ``reference`` (None: the networks' null label; ``labels``
            where the reference is the ``stage1`` latents).
        fake_matches_teacher: the fake is meant to equal the teacher (the encoder starts at the
            reference's own latents, q = p_r). Only then is the floor reported and checked.
        mismatch_rms: optional ``dm_grad_rms`` of a genuine mismatch (e.g. the stage-1 latents of
            a plain autoencoder against this teacher, see :meth:`gradient_rms`); gives
            ``dm_floor_rel`` and the 20 % gate.
        num_reference: how many reference samples to draw from a prior.
        draws: noise/time draws per latent (the figures average over them).
        seed: seed of the fixed noise and time draws.
        thresholds: when :meth:`warnings` speaks up.
        prefix: prefix of every figure's key (``"health/"``: grouped in the logger).
    """

    def __init__(
        self,
        dm: DistributionMatchingLoss,
        *,
        stage1: Tensor | LatentStats | None = None,
        stage1_train: Tensor | None = None,
        labels: Tensor | None = None,
        train_labels: Tensor | None = None,
        reference: Tensor | None = None,
        reference_labels: Tensor | None = None,
        fake_matches_teacher: bool = False,
        mismatch_rms: float | None = None,
        num_reference: int = 256,
        draws: int = 4,
        seed: int = 0,
        thresholds: HealthThresholds | None = None,
        prefix: str = "health/",
    ) -> None:
        if not isinstance(dm, DistributionMatchingLoss):
            raise TypeError(f"dm must be a DistributionMatchingLoss, got {type(dm).__name__}")
        if draws < 1 or num_reference < 2:
            raise ValueError(f"need draws >= 1 and num_reference >= 2, got {draws} and {num_reference}")
        if mismatch_rms is not None and not (math.isfinite(mismatch_rms) and mismatch_rms > 0):
            raise ValueError(f"mismatch_rms must be a positive finite number, got {mismatch_rms}")
        real, fake = dm.networks()
        # a plain Eq. 8 view of the same networks (no wrappers, no research variant); t and noise
        # are always passed explicitly
        self._dm = DistributionMatchingLoss(real, fake, cfg_scale=dm.cfg_scale, normalize=dm.normalize)
        self._source = dm  # its t-range (and schedule) at measuring time
        self.fake_matches_teacher = bool(fake_matches_teacher)
        self.mismatch_rms = mismatch_rms
        self.draws, self.seed = int(draws), int(seed)
        self.thresholds = thresholds or HealthThresholds()
        self.prefix = prefix
        self._draw_cache: dict[tuple[int, tuple[int, ...]], tuple[Tensor, Tensor, Tensor]] = {}

        self._stage1_latents: Tensor | None = None
        self._stage1: tuple[float, float] | None = None
        if isinstance(stage1, LatentStats):
            s = stage1.summary(sync=False)
            self._stage1 = (float(s["latent_mean"]), float(s["latent_std"]))
        elif stage1 is not None:
            self._stage1_latents = self._check(stage1, "stage1").detach().float().cpu()
            self._stage1 = _moments(self._stage1_latents)

        self.notes: list[str] = []
        if reference is None:
            sample = getattr(real, "sample", None)
            if callable(sample):
                g = torch.Generator().manual_seed(self.seed + 1)
                reference = sample(num_reference, labels=None, generator=g, device="cpu")
            elif self.fake_matches_teacher and self._stage1_latents is not None:
                reference = self._stage1_latents
                reference_labels = labels if reference_labels is None else reference_labels
        if reference is not None:
            reference = self._check(reference, "reference").detach().float().cpu()
            if reference_labels is not None and reference_labels.shape != (reference.shape[0],):
                raise ValueError(f"reference_labels must have shape ({reference.shape[0]},), "
                                 f"got {tuple(reference_labels.shape)}")
        else:
            self.notes.append("no reference samples (the real model has no sample() and no stage-1 latents were "
                              "given): the floor and the energy distance are not measured")
        self.reference, self.reference_labels = reference, reference_labels
        if not self.fake_matches_teacher:
            self.notes.append("the floor (DM update on reference samples) is not a health signal here: q != p_r by "
                              "design (fake_matches_teacher=False), so the fake is expected to differ from the teacher")
        self._ed_stage1: float | None = None
        self.labels, self.train_labels = labels, train_labels
        self._gap_stage1: float | None = None
        if stage1_train is not None and isinstance(stage1, Tensor):  # on the caller's device
            held = self.fake_loss(stage1, labels)
            train = self.fake_loss(self._check(stage1_train, "stage1_train"), train_labels)
            self._gap_stage1 = (held - train) / max(train, 1e-12)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check(x: Any, name: str) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point() or x.shape[0] < 2:
            raise ValueError(f"{name} must be a floating tensor of latents (B >= 2, ...), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        return x

    def _draws(self, n: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(u (K n,), noise (K n, *S), u_fm (K n,)) for ``draws`` = K, from a generator seeded by
        (seed, n, shape): the same numbers for every call with that batch, whatever came before."""
        key = (n, shape)
        if key not in self._draw_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n * 7919 + math.prod(shape))
            k = self.draws * n
            noise = torch.randn((k, *shape), generator=g)
            u_dm = torch.rand(k, generator=g)
            u_fm = torch.rand(k, generator=g)
            self._draw_cache[key] = (u_dm, noise, u_fm)
        return self._draw_cache[key]

    def _batch(self, latents: Any, labels: Tensor | None) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor]]:
        """``latents`` (B, *S) checked and repeated ``draws`` times (float32), their labels likewise
        (on the latents' device), and the fixed draws for that batch (:meth:`_draws`, on the CPU)."""
        latents = self._check(latents, "latents")
        draws = self._draws(latents.shape[0], tuple(latents.shape[1:]))
        z = latents.detach().float().repeat(self.draws, *([1] * (latents.ndim - 1)))
        y = None if labels is None else labels.repeat(self.draws).to(z.device)
        return z, y, draws

    # ------------------------------------------------------------------ single figures
    @torch.no_grad()
    def gradient_rms(self, latents: Tensor, labels: Tensor | None = None) -> float:
        """``dm_grad_rms`` of ``latents`` (B, *S): the DM update (E1) with the fixed draws, as the
        mean over samples of its per-entry root mean square (teacher's denoising error = 1)."""
        z, y, (u, noise, _) = self._batch(latents, labels)
        t0, t1 = self._source.current_t_range()
        t = (t0 + (t1 - t0) * u).to(z.device)
        g = self._dm.gradient(z, y, t=t, noise=noise.to(z.device), step=0)
        return _rms_per_sample(g)

    @torch.no_grad()
    def fake_loss(self, latents: Tensor, labels: Tensor | None = None) -> float:
        """The fake's flow-matching loss (Eq. 7) on ``latents`` with the fixed draws, in eval mode
        (no label dropout), t ~ U[0, 1] as the fake trains."""
        z, y, (_, noise, u) = self._batch(latents, labels)
        _, fake = self._dm.networks()
        y = resolve_labels(fake, y, z.shape[0], z.device)
        noise, u = noise.to(z.device), u.to(z.device)

        def velocity(x: Tensor, tt: Tensor, yy: Tensor | None) -> Tensor:
            return guided_velocity(fake, x, tt, yy)  # cfg 1: one plain forward, float32

        with eval_mode(fake):
            out = FlowMatching().loss(velocity, z, y, t=u, noise=noise)
        return float(out.loss)

    # ------------------------------------------------------------------ all figures
    @torch.no_grad()
    def measure(
        self,
        latents: Tensor,
        train_latents: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        train_labels: Tensor | None = None,
    ) -> dict[str, float]:
        """All figures for the current encoder (a flat dict of floats, keys with :attr:`prefix`).

        Args:
            latents: (B, *S) normalised latents of the held-out images, encoded now (the same
                images every call).
            train_latents: (B', *S) latents of training images the fake has been trained on, encoded
                now (the same images every call); None: no over-fit gap.
            labels, train_labels: their labels (default: those given at construction).
        """
        labels = self.labels if labels is None else labels
        train_labels = self.train_labels if train_labels is None else train_labels
        latents = self._check(latents, "latents").detach()
        real, fake = self._dm.networks()
        p = self.prefix
        out: dict[str, float] = {}
        with eval_mode(real, fake):
            held = self.fake_loss(latents, labels)
            out[p + "fake_loss_heldout"] = held
            if train_latents is not None:
                train = self.fake_loss(self._check(train_latents, "train_latents"), train_labels)
                out[p + "fake_loss_train"] = train
                out[p + "fake_overfit_gap"] = (held - train) / max(train, 1e-12)
                if self._gap_stage1 is not None:
                    out[p + "fake_overfit_gap_stage1"] = self._gap_stage1
            grad = self.gradient_rms(latents, labels)
            out[p + "dm_grad_rms"] = grad
            if self.fake_matches_teacher and self.reference is not None:
                ref = self.reference.to(latents.device)
                ref_y = None if self.reference_labels is None else self.reference_labels.to(latents.device)
                floor = self.gradient_rms(ref, ref_y)
                out[p + "dm_floor_rms"] = floor
                out[p + "dm_floor_ratio"] = floor / max(grad, 1e-12)
                if self.mismatch_rms is not None:
                    out[p + "dm_floor_rel"] = floor / self.mismatch_rms
        cur = latents.float().cpu()
        mean, std = _moments(cur)
        if self._stage1 is None:
            self._stage1 = (mean, std)
            self._stage1_latents = cur
        mean1, std1 = self._stage1
        out[p + "latent_mean"], out[p + "latent_std"] = mean, std
        out[p + "latent_mean_drift"] = (mean - mean1) / std1
        out[p + "latent_std_ratio"] = std / std1
        if self.reference is not None and self.reference[0].numel() == cur[0].numel():
            out[p + "energy_distance"] = energy_distance(cur, self.reference)
            if self._ed_stage1 is None and self._stage1_latents is not None:
                self._ed_stage1 = energy_distance(self._stage1_latents, self.reference)
            if self._ed_stage1 is not None:
                out[p + "energy_distance_stage1"] = self._ed_stage1
        return out

    # ------------------------------------------------------------------ verdicts
    def warnings(self, figures: dict[str, float]) -> list[str]:
        """One sentence per problem the figures show, each naming what to change (empty: healthy)."""
        th, p = self.thresholds, self.prefix
        f = {k.removeprefix(p): v for k, v in figures.items() if k.startswith(p)}
        msgs: list[str] = []
        gap = f.get("fake_overfit_gap")
        if gap is not None:
            gap0 = f.get("fake_overfit_gap_stage1", 0.0)
            if gap - gap0 > th.overfit_gap:
                since = f" (at the start {gap0:.0%})" if "fake_overfit_gap_stage1" in f else ""
                msgs.append(
                    f"DM health: the fake over-fits its training latents (flow-matching loss held-out "
                    f"{f['fake_loss_heldout']:.4g} vs train {f['fake_loss_train']:.4g}, gap {gap:.0%}{since}; allowed "
                    f"growth {th.overfit_gap:.0%}): lower the fake's lr, take fewer fake steps per autoencoder step, "
                    f"raise its weight decay, or train it on more latents")
        floor = f.get("dm_floor_rms")
        if floor is not None:
            rel = f.get("dm_floor_rel")
            high = rel > th.floor_rel if rel is not None else floor > th.floor_rms
            share = f.get("dm_floor_ratio", math.inf)
            if high and share > th.floor_ratio:
                size = (f"{rel:.0%} of a genuine mismatch (> {th.floor_rel:.0%})" if rel is not None
                        else f"{floor:.3g} of the teacher's denoising error (> {th.floor_rms:.3g})")
                msgs.append(
                    f"DM health: the fake has drifted from the teacher (floor {size}; {min(share, 9.99):.0%} of "
                    f"the encoder's DM update is fake error): lower the fake's lr or its steps per autoencoder "
                    f"step, use weight decay 0 on it, or evaluate the DM term with an EMA of the fake")
        ratio = f.get("latent_std_ratio")
        if ratio is not None and abs(ratio - 1.0) > th.std_drift:
            way = "shrunk" if ratio < 1 else "grown"
            msgs.append(
                f"DM health: the latent std has {way} to {ratio:.3f} x stage 1's (allowed ±{th.std_drift:.0%}): "
                f"if the floor or the over-fit gap is high, fix the fake first (lr, steps, weight decay, EMA); "
                f"otherwise lower the DM weight or the autoencoder's lr")
        drift = f.get("latent_mean_drift")
        if drift is not None and abs(drift) > th.mean_drift:
            msgs.append(
                f"DM health: the latent mean has moved {drift:+.3f} stage-1 stds (allowed ±{th.mean_drift}): "
                f"if the floor or the over-fit gap is high, fix the fake first (lr, steps, weight decay, EMA); "
                f"otherwise lower the DM weight or the autoencoder's lr")
        return msgs

    def report(self, figures: dict[str, float]) -> str:
        """One line: the figures, compactly, and ``healthy`` or the number of warnings."""
        p = self.prefix
        parts = [f"{k.removeprefix(p)}={v:.4g}" for k, v in figures.items()]
        n = len(self.warnings(figures))
        return "DM health: " + " ".join(parts) + (" -> healthy" if n == 0 else f" -> {n} warning(s)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(fake_matches_teacher={self.fake_matches_teacher}, draws={self.draws}, "
                f"reference={None if self.reference is None else tuple(self.reference.shape)}, "
                f"thresholds={self.thresholds})")
