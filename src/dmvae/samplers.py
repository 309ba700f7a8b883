"""Samplers for :class:`~dmvae.dit.LatentDiT` velocity models: plain functions over an explicit grid.

Time runs from t = 0 (noise) to t = 1 (data), as in :mod:`dmvae.transport`. Every sampler starts
from ``noise`` at t = 0 and integrates ``dx/dt = v(x, t, y)`` forward.

* ``euler``: ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)``; NFE = num_steps.
* ``heun``: fixed-grid RK2 trapezoid (torchdiffeq ``heun2``): ``k1 = v(x, t_k)``,
  ``k2 = v(x + dt k1, t_{k+1})``, ``x += dt (k1 + k2) / 2``; NFE = 2 num_steps.
* ``euler-maruyama``: the reference's SDE sampler with the "sigma" diffusion ``w(t) = 1 - t``:
  drift ``f = v + w score = (1 + t) v - x``, step ``x += f dt + sqrt(2 w dt) eps`` on
  ``linspace(0, 1 - last_step_size, num_steps + 1)``, then a final noise-free "Mean" step
  ``x += f(x, 1 - last_step_size) last_step_size``; NFE = num_steps + 1.
* ``dopri5`` (needs ``torchdiffeq``): adaptive Dormand-Prince through ``torchdiffeq.odeint`` with the
  reference tolerances, outputs at the grid points.

``num_steps`` counts integration steps. The reference's ``num_steps`` counts grid points, so its
``num_steps=8`` is ``num_steps=7`` here and the release's 250-point SDE is ``num_steps=249``.

Guidance: ``labels`` are the conditional labels; with ``cfg_scale != 1`` the sampler appends the
null-class rows itself and runs conditional and unconditional rows in ONE forward of the doubled
batch, then applies ``u + s (c - u)`` (:func:`dmvae.transport.apply_guidance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from dmvae._utils import unwrap_model
from dmvae.checks import check_finite, check_range
from dmvae.transport import (
    _check_interval,
    guidance_null_label,
    guided_velocity,
    resolve_labels,
    shift_time,
)

__all__ = ["METHODS", "sample", "sde_time_grid", "time_grid"]

METHODS = ("euler", "heun", "euler-maruyama", "dopri5")
Method = Literal["euler", "heun", "euler-maruyama", "dopri5"]


def time_grid(
    num_steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """ODE grid (num_steps + 1,) float32 from 0 to 1: ``linspace(0, 1)`` mapped by
    :func:`~dmvae.transport.shift_time` in float32, as the reference computes it (the map is applied
    even at ``shift = 1``, where its ``1 - (1 - t)`` round trip moves some points by one ulp)."""
    _check_steps(num_steps)
    shift = check_range("time_shift", shift, 0.0, low_open=True)
    grid = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32, device=device)
    return shift_time(grid, shift)


def sde_time_grid(
    num_steps: int, last_step_size: float = 0.04, device: torch.device | str | None = None
) -> torch.Tensor:
    """SDE grid (num_steps + 1,) float32: ``linspace(0, 1 - last_step_size)`` (no shift)."""
    _check_steps(num_steps)
    last_step_size = check_range("last_step_size", last_step_size, 0.0, 1.0, low_open=True, high_open=True)
    return torch.linspace(0, 1 - last_step_size, num_steps + 1, dtype=torch.float32, device=device)


def _check_steps(num_steps: Any) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1 (integration steps), got {num_steps!r}")


def _velocity_fn(
    model: Callable[..., torch.Tensor],
    labels: torch.Tensor | None,
    cfg_scale: float,
    cfg_interval: tuple[float, float] | None,
    guidance_channels: int | None,
    null: int | None,
    eval_times: list[float] | None,
    model_kwargs: dict[str, Any],
) -> Callable[..., torch.Tensor]:
    """``v(x, t, t_host=None)``: the (guided) velocity at the 0-d time tensor ``t``.

    ``t_host`` is the same time as a Python float when the caller knows it without asking the
    device (the fixed grids, read once before the loop): outside ``cfg_interval`` the guided
    velocity IS the conditional one, so that step runs the conditional rows only. Adaptive solvers
    pass no ``t_host`` and get the per-row interval rule of :func:`apply_guidance`. Nothing here
    reads a tensor back to the host unless ``eval_times`` asks for the times."""
    guided = cfg_scale != 1.0 and labels is not None
    lo, hi = _check_interval(cfg_interval) if cfg_interval is not None else (0.0, 1.0)

    def v(x: torch.Tensor, t: torch.Tensor, t_host: float | None = None) -> torch.Tensor:
        if eval_times is not None:
            eval_times.append(t_host if t_host is not None else float(t))
        scale, interval = cfg_scale, cfg_interval
        if guided and t_host is not None and cfg_interval is not None:
            scale, interval = (cfg_scale, None) if lo <= t_host <= hi else (1.0, None)
        return guided_velocity(model, x, t, labels, scale, null=null, cfg_interval=interval,
                               guidance_channels=guidance_channels, **model_kwargs)

    return v


def _prepare(
    model: Callable[..., torch.Tensor], noise: torch.Tensor, labels: torch.Tensor | None,
    null: int | None, guided: bool, extrapolate: bool,
) -> dict[str, Any]:
    """Validate once, before the loop, what a LatentDiT would check at every step, and return the
    keyword arguments that skip those per-step checks (they read tensors back to the host)."""
    from dmvae.dit import LatentDiT

    m = unwrap_model(model)
    if not isinstance(m, LatentDiT):
        return {}
    y = labels
    if guided and labels is not None:
        y = torch.cat([labels, torch.full_like(labels, null)])
        noise = torch.cat([noise, noise])
    m.check_inputs(noise, torch.zeros((), device=noise.device), y)
    return {"check_values": False} if not extrapolate else {"check_values": False, "check_time": False}


def sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    num_steps: int,
    method: Method = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    guidance_channels: int | None = None,
    time_shift: float = 1.0,
    last_step_size: float = 0.04,
    generator: torch.Generator | None = None,
    sde_noise: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    null_label: int | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    progress: bool = False,
    return_trajectory: bool = False,
    eval_times: list[float] | None = None,
) -> torch.Tensor:
    """Sample latents from noise at t = 0 to data at t = 1.

    Args:
        model: ``model(x, t, y) -> v`` with x (B, C, H, W), t (B,) in [0, 1], y (B,) int (a
            :class:`~dmvae.dit.LatentDiT`, or any callable; ``null_label`` is then needed for CFG).
        noise: the starting point x(0), (B, C, H, W).
        labels: (B,) conditional class labels (the sampler adds the null rows for CFG itself), or
            None: an unconditional model (``num_classes=0``) takes none, a conditional one then
            samples its unconditional branch (the null class).
        num_steps: integration steps (NOT grid points; reference ``num_steps=8`` is 7 here).
        method: ``"euler"``, ``"heun"``, ``"euler-maruyama"`` or ``"dopri5"`` (torchdiffeq).
        cfg_scale: guidance scale ``s`` in ``u + s (c - u)``; 1 = no guidance (single forward).
        cfg_interval: ``(lo, hi)``: guide only while ``lo <= t <= hi``.
        guidance_channels: None guides all channels; an int k guides channels ``[:k]`` only (k = 3
            reproduces the reference's legacy default); the rest use the conditional velocity.
        time_shift: ``s`` of the grid map ``1 - s(1 - t) / (1 + (s - 1)(1 - t))`` for the ODE
            methods. The SDE grid is not shifted (as in the reference); ``time_shift != 1`` with
            ``euler-maruyama`` raises instead of being silently ignored.
        last_step_size: SDE only: the grid ends at ``1 - last_step_size``, then a noise-free step.
        generator: source of the SDE noise (ignored by the ODE methods).
        sde_noise: SDE only: inject the standard-normal draws, a (num_steps, B, C, H, W) tensor or
            a callable ``(step, x) -> eps``; overrides ``generator``.
        null_label: label id of the unconditional class (default:
            :func:`dmvae.transport.null_label`, i.e. ``model.null_class``).
        atol, rtol: dopri5 tolerances (reference defaults).
        progress: show a tqdm bar over the steps.
        return_trajectory: also return the states, (num_points, B, C, H, W). For the ODE methods
            these are the num_steps + 1 grid states starting with ``noise``; for the SDE the
            num_steps states after each stochastic step plus the final state (the reference's).
        eval_times: if a list is given, the time of every model evaluation is appended to it.

    Returns:
        the final latents (B, C, H, W), or ``(latents, trajectory)``. Sampling runs under
        ``torch.no_grad()``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        raise ValueError("noise must be a batched tensor (B, C, H, W)")
    if labels is not None:
        labels = torch.as_tensor(labels, device=noise.device)
        if labels.is_floating_point() or labels.shape != (noise.shape[0],):
            raise ValueError(
                f"labels must be ({noise.shape[0]},) integer class ids (conditional only), got "
                f"shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        m = unwrap_model(model)
        if hasattr(m, "num_classes") and m.num_classes == 0:
            raise ValueError(f"{type(m).__name__} is unconditional (num_classes=0): pass labels=None")
    else:
        labels = resolve_labels(model, None, noise.shape[0], noise.device)
    if isinstance(cfg_interval, (tuple, list)):
        cfg_interval = tuple(check_finite(f"cfg_interval[{i}]", v) for i, v in enumerate(cfg_interval))
    if cfg_interval is not None:
        _check_interval(cfg_interval)
    _check_steps(num_steps)
    cfg_scale = check_finite("cfg_scale", cfg_scale)  # a NaN scale would reach the output silently
    time_shift = check_range("time_shift", time_shift, 0.0, low_open=True)
    last_step_size = check_range("last_step_size", last_step_size, 0.0, 1.0, low_open=True, high_open=True)
    atol = check_range("atol", atol, 0.0, low_open=True)
    rtol = check_range("rtol", rtol, 0.0, low_open=True)
    guided = cfg_scale != 1.0 and labels is not None
    null = guidance_null_label(model, null_label) if guided else null_label
    model_kwargs = _prepare(model, noise, labels, null, guided, extrapolate=method == "dopri5")
    v = _velocity_fn(model, labels, cfg_scale, cfg_interval, guidance_channels, null, eval_times,
                     model_kwargs)

    with torch.no_grad():
        if method == "euler-maruyama":
            if time_shift != 1.0:
                raise ValueError(
                    "time_shift is not applied to the euler-maruyama grid (the reference ignores "
                    "time_dist_shift in SDE mode); pass time_shift=1.0 or use an ODE method"
                )
            x, traj = _sde_euler_maruyama(v, noise, num_steps, last_step_size, generator, sde_noise,
                                          progress, keep=return_trajectory)
        else:
            grid = time_grid(num_steps, time_shift, device=noise.device)
            if method == "dopri5":
                x, traj = _dopri5(v, noise, grid, atol, rtol)
            else:
                x, traj = _fixed_grid(v, noise, grid, heun=method == "heun", progress=progress,
                                      keep=return_trajectory)
    if return_trajectory:
        return x, torch.stack(traj)  # type: ignore[return-value]
    return x


def _steps(n: int, progress: bool, desc: str) -> Any:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def _fixed_grid(v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, grid: torch.Tensor,
                heun: bool, progress: bool, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    traj = [x] if keep else []
    times = grid.tolist()  # the grid's values on the host, read once (no sync inside the loop)
    for k in _steps(len(grid) - 1, progress, "heun" if heun else "euler"):
        t0, t1 = grid[k], grid[k + 1]
        dt = t1 - t0
        k1 = v(x, t0, times[k])
        if heun:
            k2 = v(x + k1 * dt, t1, times[k + 1])
            x = x + dt * (0.5 * k1 + 0.5 * k2)
        else:
            x = x + dt * k1
        if keep:
            traj.append(x)
    return x, traj


def _sde_euler_maruyama(
    v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, num_steps: int, last_step_size: float,
    generator: torch.Generator | None, sde_noise: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor] | None,
    progress: bool, keep: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler-Maruyama; ``keep`` collects the states for ``return_trajectory`` (else none is held)."""
    grid = sde_time_grid(num_steps, last_step_size, device=x.device)
    times = grid.tolist()  # host copy, read once
    if isinstance(sde_noise, torch.Tensor) and sde_noise.shape != (num_steps, *x.shape):
        raise ValueError(
            f"sde_noise must have shape {(num_steps, *x.shape)}, got {tuple(sde_noise.shape)}"
        )
    dt = grid[1] - grid[0]  # the reference uses one step size for the whole (uniform) grid

    def drift(x: torch.Tensor, k: int) -> torch.Tensor:
        # v + w(t) * score with w = 1 - t and score = (t v - x) / (1 - t)  ==  (1 + t) v - x
        t = grid[k]
        return (1 + t) * v(x, t, times[k]) - x

    traj: list[torch.Tensor] = []
    for k in _steps(num_steps, progress, "euler-maruyama"):
        t = grid[k]
        if sde_noise is None:
            gen_device = generator.device if generator is not None else x.device
            eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
            eps = eps.to(x.device)
        elif isinstance(sde_noise, torch.Tensor):
            eps = sde_noise[k].to(device=x.device, dtype=x.dtype)
        else:
            eps = sde_noise(k, x)
        dw = eps * torch.sqrt(dt)
        mean_x = x + drift(x, k) * dt
        x = mean_x + torch.sqrt(2 * (1 - t)) * dw
        if keep:
            traj.append(x)
    x = x + drift(x, num_steps) * last_step_size  # "Mean" last step, no noise
    if keep:
        traj.append(x)
    return x, traj


def _dopri5(v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, grid: torch.Tensor, atol: float,
            rtol: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    try:
        from torchdiffeq import odeint
    except ImportError as e:  # optional dependency
        raise ImportError(
            "method='dopri5' needs the optional package torchdiffeq (pip install torchdiffeq)"
        ) from e
    states = odeint(lambda t, y: v(y, t), x, grid, method="dopri5", atol=atol, rtol=rtol)
    return states[-1], list(states)
