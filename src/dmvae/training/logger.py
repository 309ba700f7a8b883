"""Training logs: ``metrics.jsonl`` always, TensorBoard / wandb on request, a tqdm bar, PNG previews.

    means = RunningMeans()                       # device-side sums: no host sync inside a step
    log = MetricLogger(out, total_steps=steps, start_step=start, log_to=["tensorboard"])
    for step in range(start, steps):
        ...
        means.add(loss=loss, l1=parts.l1)        # tensors stay on the device
        log.advance()                            # the progress bar (ETA); no sync
        if log.is_log_step(step):
            log.log(step, means.pop())           # one all-reduce + one host copy per log step
        if step % image_every == 0:
            log.images(step, "recon", torch.cat([x, x_hat]))
    log.close()

- :class:`RunningMeans` keeps a sum and a count per metric; :meth:`RunningMeans.pop` averages over
  the steps since the last call *and* over the processes, and reports only the metrics that were
  added in that window (a term not computed yet is absent, never ``nan``).
- :class:`MetricLogger` (main process only; a no-op elsewhere) appends one JSON object per log step to
  ``<out>/metrics.jsonl`` (``step``, the metrics, ``lr`` if given, ``elapsed_s``, ``steps_per_s``);
  on a resume, lines at or after the resumed step are dropped first, so the file reads as one run.
  ``log_to`` adds ``"tensorboard"`` (``<out>/tensorboard``, via ``torch.utils.tensorboard``) and/or
  ``"wandb"`` (offline when ``WANDB_MODE=offline``); a backend that is not installed gives a one-line
  warning and is skipped. The tqdm bar (total steps, rate, ETA) runs on the main process.
- :meth:`MetricLogger.images` writes a PNG grid to ``<out>/images/<name>_<step>.png`` (atomically).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmvae.files import atomic_write_text
from dmvae.dist import all_reduce_mean, is_main_process

__all__ = ["RunningMeans", "MetricLogger", "LOG_BACKENDS"]

LOG_BACKENDS = ("tensorboard", "wandb")


class RunningMeans:
    """Sums of scalar metrics between log steps, kept where the values live (no ``.item()``)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: Tensor | float) -> None:
        """Add one value per metric (scalar tensors are detached and summed in float32)."""
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v))
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._counts[k] = self._counts.get(k, 0) + 1

    def pop(self, sync: bool = True) -> dict[str, float]:
        """Means since the last ``pop`` (over steps, then over processes when ``sync``); resets.

        Every process must call it at the same steps with the same metric names.
        """
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        device = next(iter(self._sums.values())).device
        sums = torch.stack([self._sums[k].to(device).reshape(()) for k in keys])
        counts = torch.tensor([self._counts[k] for k in keys], dtype=torch.float32, device=device)
        means = sums / counts
        if sync:
            means = all_reduce_mean(means)
        self._sums, self._counts = {}, {}
        return dict(zip(keys, means.tolist()))  # the one host sync


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricLogger:
    """Log sink of one training run (see the module docstring).

    Args:
        out_dir: the run directory.
        total_steps: the run's last step + 1 (for the bar's total and ETA).
        start_step: the step the run (re)starts at.
        log_every: :meth:`is_log_step` is true every ``log_every`` steps and at the last step.
        log_to: extra backends, a subset of :data:`LOG_BACKENDS`.
        config: run arguments, written to ``<out>/args.json`` and given to wandb.
        progress: show the tqdm bar (main process only).
        enabled: default: this is the main process.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, total_steps: int, start_step: int = 0,
                 log_every: int = 10, log_to: Iterable[str] = (), config: Mapping[str, Any] | None = None,
                 progress: bool = True, desc: str = "train", enabled: bool | None = None) -> None:
        self.out = Path(out_dir)
        self.total_steps, self.start_step, self.log_every = int(total_steps), int(start_step), max(1, int(log_every))
        self.enabled = is_main_process() if enabled is None else enabled
        log_to = [b for b in log_to if b and b != "none"]
        unknown = sorted(set(log_to) - set(LOG_BACKENDS))
        if unknown:
            raise ValueError(f"unknown log backend(s) {unknown}; choose from {list(LOG_BACKENDS)}")
        self._tb = self._wandb = self._bar = None
        self._t0 = time.time()
        self._last = (self._t0, self.start_step)
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.out / "metrics.jsonl"
        self._truncate_from(self.start_step)
        if config is not None:
            atomic_write_text(self.out / "args.json", json.dumps(dict(config), indent=1, default=str))
        if "tensorboard" in log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=self.start_step)
            except ImportError:
                warnings.warn("--log-to tensorboard: tensorboard is not installed (pip install tensorboard); "
                              "skipping it", stacklevel=2)
        if "wandb" in log_to:
            try:
                import wandb

                self._wandb = wandb.init(dir=str(self.out), config=dict(config or {}), resume="allow",
                                         id=self._wandb_id(), project=os.environ.get("WANDB_PROJECT", "dmvae"))
            except ImportError:
                warnings.warn("--log-to wandb: wandb is not installed (pip install wandb); skipping it", stacklevel=2)
        if progress:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=desc, dynamic_ncols=True,
                             mininterval=0.5 if tty else 30.0, smoothing=0.05)

    # ---------------------------------------------------------------------------------- helpers
    def _truncate_from(self, step: int) -> None:
        """Drop lines of steps >= ``step`` left by an interrupted run (atomically)."""
        if not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", -1) < step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        if len(keep) != len(lines):
            atomic_write_text(self.metrics_file, "".join(x + "\n" for x in keep))

    def _wandb_id(self) -> str:
        f = self.out / "wandb_id.txt"
        if f.is_file():
            return f.read_text().strip()
        import uuid

        run_id = uuid.uuid4().hex[:12]
        atomic_write_text(f, run_id)
        return run_id

    def is_log_step(self, step: int) -> bool:
        return (step + 1) % self.log_every == 0 or step + 1 == self.total_steps

    # ---------------------------------------------------------------------------------- logging
    def advance(self, n: int = 1) -> None:
        """Move the progress bar (call once per step; no device sync)."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, metrics: Mapping[str, float], **extra: float) -> dict[str, Any]:
        """Write the metrics of ``step`` (means over the last window) everywhere; returns the record."""
        now = time.time()
        t_last, s_last = self._last
        rate = (step + 1 - s_last) / max(now - t_last, 1e-9)
        self._last = (now, step + 1)
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()},
                  **{k: _finite_or_none(v) for k, v in extra.items()}}
        if not self.enabled:
            return record
        line = {**record, "elapsed_s": round(now - self._t0, 3), "steps_per_s": round(rate, 4)}
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(line) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.add_scalar("steps_per_s", rate, step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "steps_per_s": rate}, step=step)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
            if not sys.stderr.isatty():  # batch jobs: one readable line per log step
                self._bar.write(f"step {step} " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        return record

    def images(self, step: int, name: str, images: Tensor, nrow: int | None = None) -> Path | None:
        """Save a grid of float images (N, 3, H, W) in [-1, 1] as ``<out>/images/<name>_<step>.png``."""
        if not self.enabled:
            return None
        from dmvae.image import make_grid, save_image

        x = torch.nan_to_num(images.detach().float().cpu()).clamp(-1, 1)
        nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
        arr = make_grid(x, nrow)  # built once: the file, TensorBoard and W&B get the same grid
        path = save_image(arr, self.out / "images" / f"{name}_{step:08d}.png")  # atomic
        if self._tb is not None:
            self._tb.add_image(name, torch.from_numpy(arr).permute(2, 0, 1), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(arr)}, step=step)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._wandb = None
