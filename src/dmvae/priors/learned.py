"""A learned real score: a velocity model (LatentDiT) fitted on reference samples.

This is how the paper realises every data-derived prior (App. B.2, "reference modelling"): the
teacher of the DM loss is a LightningDiT trained by flow matching on samples z ~ p_r, then frozen.
:func:`fit_reference_model` is that training loop (:class:`~dmvae.transport.FlowMatching`: uniform
t, velocity MSE; AdamW (0.9, 0.95), gradient clipping 1.0, as the reference; optionally an
:class:`~dmvae.ema.EMA`); :class:`LearnedPrior` wraps the trained model as a
:class:`~dmvae.priors.ReferencePrior` (velocity = the network with optional CFG through
:func:`dmvae.transport.guided_velocity`, sampling with :func:`dmvae.samplers.sample`).
Time convention: t = 1 data, t = 0 noise; ``x_t = t x + (1 - t) eps``, target ``x - eps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dmvae.priors.base import ReferencePrior, register_prior
from dmvae.transport import (
    FlowMatching,
    guided_velocity,
    null_label,
    resolve_labels,
    sample_shape,
)

__all__ = ["LearnedPrior", "fit_reference_model"]


@register_prior("learned")
class LearnedPrior(ReferencePrior):
    """A frozen velocity network as the reference (the paper's teacher / real score).

    Args:
        model: ``model(x, t, y) -> v`` in the library convention (a LatentDiT). It is frozen
            (``requires_grad_(False)``) and always evaluated in eval mode (no label dropout).
        shape: shape of one latent as the prior exposes it; defaults to the model's
            ``(in_channels, input_size, input_size)``. A different shape with the same number of
            elements is reshaped on the way in and out (e.g. ``(2,)`` points for a (2, 1, 1) DiT).
        cfg_scale: guidance applied inside :meth:`velocity` and :meth:`sample` (``u + s (c - u)``).
            Leave at 1 when the DM loss applies its own ``cfg_scale``.
        num_sampling_steps: Euler steps of :meth:`sample` (ODE from t = 0 noise to t = 1).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        shape: Sequence[int] | None = None,
        cfg_scale: float = 1.0,
        num_sampling_steps: int = 50,
    ) -> None:
        model_shape = sample_shape(model)
        shape = tuple(shape) if shape is not None else model_shape
        if shape is None:
            raise ValueError("shape is required for a model without config.in_channels / config.input_size")
        if model_shape is not None and math.prod(shape) != math.prod(model_shape):
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements; the model takes {model_shape}")
        nc = getattr(model, "num_classes", None) or None  # a LatentDiT with num_classes=0 has none
        super().__init__(shape, num_classes=nc)
        if not (math.isfinite(cfg_scale) and cfg_scale >= 1):
            raise ValueError(f"cfg_scale must be a finite number >= 1, got {cfg_scale}")
        if cfg_scale != 1.0 and nc is not None and null_label(model) is None:
            raise ValueError("cfg_scale > 1 needs a model with a null class (class_dropout_prob > 0)")
        self.model = model.requires_grad_(False).eval()
        self.model_shape = model_shape or shape
        self.cfg_scale = float(cfg_scale)
        self.num_sampling_steps = int(num_sampling_steps)

    def train(self, mode: bool = True) -> LearnedPrior:  # the wrapped model stays in eval mode
        super().train(mode)
        self.model.eval()
        return self

    def velocity(self, x_t, t, labels=None) -> torch.Tensor:
        x_t, t = self._check_xt(x_t, t)
        b = x_t.shape[0]
        labels = self._check_labels(labels, b)
        y = resolve_labels(self.model, labels.to(x_t.device) if labels is not None else None, b, x_t.device)
        x = x_t.reshape(b, *self.model_shape)
        return guided_velocity(self.model, x, t, y, self.cfg_scale).reshape(x_t.shape)

    @torch.no_grad()
    def sample(self, n, *, labels=None, generator=None, device=None) -> torch.Tensor:
        """``num_sampling_steps`` Euler steps of :func:`dmvae.samplers.sample` from fresh noise,
        guided by ``cfg_scale``; (n, *shape)."""
        from dmvae.samplers import sample

        dev = torch.device(device) if device is not None else next(self.model.parameters()).device
        gdev = generator.device if generator is not None else dev
        noise = torch.randn((n, *self.model_shape), generator=generator, device=gdev).to(dev)
        labels = self._check_labels(labels, n)
        x = sample(self.model, noise, labels.to(dev) if labels is not None else None,
                   num_steps=self.num_sampling_steps, method="euler", cfg_scale=self.cfg_scale)
        return x.reshape(n, *self.shape)


def _batches(data: Any, batch_size: int, generator: torch.Generator | None) -> Iterable:
    """Endless stream of (x, y-or-None) batches from a tensor, a prior, or an iterable."""
    if isinstance(data, ReferencePrior):
        while True:
            yield data.sample(batch_size, generator=generator), None
    elif isinstance(data, torch.Tensor):
        n = data.shape[0]
        while True:
            idx = torch.randint(n, (batch_size,), generator=generator)
            yield data[idx], None
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        xs, ys = data
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"samples and labels differ in length: {xs.shape[0]} vs {ys.shape[0]}")
        while True:
            idx = torch.randint(xs.shape[0], (batch_size,), generator=generator)
            yield xs[idx], ys[idx]
    else:
        if not isinstance(data, Iterable):
            raise TypeError(
                "data must be a (N, ...) tensor, a (samples, labels) tuple, a ReferencePrior or an "
                f"iterable of batches, got {type(data).__name__}"
            )
        while True:
            got = False
            for batch in data:
                got = True
                if isinstance(batch, (tuple, list)):
                    yield batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    yield batch, None
            if not got:
                raise ValueError("the data iterable yielded no batch")


def fit_reference_model(
    model: nn.Module,
    data: Any,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = 1.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    ema_decay: float | None = None,
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | Callable[[Iterable], Iterable] = False,
    callback: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Fit ``model`` by flow matching on reference samples (paper App. B.2) and return it.

    Args:
        model: a velocity model (LatentDiT), trained in place in train mode (label dropout on).
        data: a (N, *S) tensor of samples, a (samples, labels) tuple, a ReferencePrior (fresh
            samples every step) or an iterable / DataLoader of ``x`` or ``(x, y)`` batches.
            Missing labels use the null label (an unconditional reference).
        steps, batch_size, lr, weight_decay, betas, grad_clip: the optimisation (reference
            defaults: AdamW (0.9, 0.95), wd 0, clip 1.0; the paper's teacher uses lr 2e-4).
        lr_schedule: ``"constant"`` (the reference) or ``"cosine"`` (decay to 0 over ``steps``),
            after ``warmup_steps`` of linear warm-up.
        ema_decay: if set, an EMA copy is kept and RETURNED instead of the raw model.
        shape: sample shape if the samples are shaped differently from the model input (the toy's
            (2,) points for a (2, 1, 1) DiT).
        progress: True for a tqdm bar, or a callable wrapping the step range.
        callback: ``callback(step, loss)`` after every step.
    Returns: the fitted model (or its EMA) in eval mode, gradients disabled.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    from dmvae.ema import EMA

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).train().requires_grad_(True)
    model_shape = sample_shape(model) or (tuple(shape) if shape is not None else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if lr_schedule == "cosine":
            f = (step - warmup_steps) / max(steps - warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMA(model, decay=ema_decay) if ema_decay is not None else None
    fm = FlowMatching()  # uniform t, no shift: the reference's teacher training
    rng = range(steps)
    if progress is True:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="fit reference model", leave=False)
    elif callable(progress):
        rng = progress(rng)
    stream = _batches(data, batch_size, generator)
    for step in rng:
        x, y = next(stream)
        x = x.to(dev).float()
        if model_shape is not None:
            x = x.reshape(x.shape[0], *model_shape)
        y = resolve_labels(model, y.to(dev).long() if y is not None else None, x.shape[0], dev)
        loss = fm.loss(model, x, y, generator=generator).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        if callback is not None:
            callback(step, float(loss))
    out = ema.module if ema is not None else model
    return out.eval().requires_grad_(False)
