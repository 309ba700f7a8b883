"""``DMVAEEulerScheduler``: Euler steps of dmvae's flow ODE, as a diffusers scheduler.

dmvae's time runs from t = 0 (noise) to t = 1 (data) and its models predict the velocity
``v = x1 - x0`` (:mod:`dmvae.transport`); diffusers' flow-matching schedulers run a sigma from 1
(noise) to 0 (data) with the opposite velocity (sigma = 1 - t, v_diffusers = -v). This scheduler
keeps dmvae's convention, so a :class:`~dmvae.dit.LatentDiT` is called with the times it was
trained on: ``timesteps`` are the times t of :func:`dmvae.samplers.time_grid` (shifted by
``shift``, the reference ``time_dist_shift``) and ``step`` is ``x + (t_{k+1} - t_k) v``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from dmvae.samplers import time_grid
from dmvae.transport import interpolate

__all__ = ["DMVAEEulerScheduler"]


class DMVAEEulerScheduler(SchedulerMixin, ConfigMixin):
    """Fixed-grid Euler integration of ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1 (data).

    Args:
        shift: time shift ``s`` of the grid ``t' = 1 - s (1 - t) / (1 + (s - 1)(1 - t))``
            (:func:`dmvae.transport.shift_time`); 1 = uniform, ``s > 1`` spends more steps near
            the noise.

    After :meth:`set_timesteps`, ``timesteps`` holds the ``num_inference_steps`` times t_k at which
    the model is evaluated (float32, increasing from 0) and ``time_grid`` the ``num_inference_steps
    + 1`` grid points ending at 1; :meth:`step` advances one grid interval.
    """

    order = 1
    _compatibles: ClassVar[list[str]] = []

    @register_to_config
    def __init__(self, shift: float = 1.0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        self.init_noise_sigma = 1.0  # the noise is N(0, I), unscaled
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.time_grid: torch.Tensor | None = None
        self._step_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index of the next grid interval :meth:`step` integrates over (None before set_timesteps)."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The grid of :func:`dmvae.samplers.time_grid` with ``num_inference_steps`` Euler steps."""
        grid = time_grid(num_inference_steps, float(self.config.shift), device=device)
        self.num_inference_steps = num_inference_steps
        self.time_grid = grid
        self.timesteps = grid[:-1]
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The model takes ``x_t`` as is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """``x_{k+1} = x_k + (t_{k+1} - t_k) v``, with ``model_output`` the velocity ``v`` (dmvae's
        convention) at ``timestep`` = ``timesteps[k]``; steps are taken in order."""
        if self.time_grid is None or self._step_index is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        k = self._step_index
        if k >= len(self.time_grid) - 1:
            raise RuntimeError(
                f"all {len(self.time_grid) - 1} steps have been taken; call set_timesteps() again"
            )
        if isinstance(timestep, (int, float)) and abs(float(timestep) - float(self.time_grid[k])) > 1e-6:
            raise ValueError(f"step {k} is at t = {float(self.time_grid[k]):.6g}, got timestep {timestep}")
        t0, t1 = self.time_grid[k], self.time_grid[k + 1]
        prev_sample = sample + (t1 - t0) * model_output
        self._step_index = k + 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``x_t = t x1 + (1 - t) x0`` (:func:`dmvae.transport.interpolate`): the training input of
        a dmvae-convention model at times ``timesteps`` (B,) in [0, 1]."""
        return interpolate(original_samples, noise, timesteps.to(original_samples.device))
