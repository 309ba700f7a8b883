"""What the stage examples share: command-line switches, process setup, the data loader, the optimizer.

Not a library module: the pieces come from ``dmvae.training``; this file only saves each example from
repeating the same twenty lines. Every switch is documented in ``docs/training.md`` ("Scaling out").
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from dmvae.training import init_distributed, is_main_process, latest_checkpoint, load_checkpoint
from dmvae.training.data import build_dataset, center_crop_transform, train_transform
from dmvae.dist import DistInfo
from dmvae.training.logger import LOG_BACKENDS, MetricLogger
from dmvae.training.sampler import TrainLoader


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring verbatim, and every option's default in ``--help``."""


def fail(message: str) -> SystemExit:
    """A user mistake: one line on stderr naming the fix, exit status 2 (``raise fail(...)``)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    return SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args, **kwargs):  # every option shows its default, even without a help text
        kwargs.setdefault("help", "(default: %(default)s)")
        return super().add_argument(*args, **kwargs)


def make_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=doc, formatter_class=HelpFormatter)


def add_data_args(p: argparse.ArgumentParser, *, data_help: str = "") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="skimage",
                   help="'skimage' (bundled photos), an image folder (class sub-folders = labels), a file list "
                        "('<path> [<label>]' lines) or webdataset tar shards ('shards-{0000..0099}.tar')" + data_help)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per GPU/process")
    g.add_argument("--num-classes", type=int, default=None, help="label count for tar shards (else from the data)")
    g.add_argument("--prefetch-factor", type=int, default=None, help="batches prefetched per worker (torch default 2)")


def add_run_args(p: argparse.ArgumentParser, *, log_every: int = 10, image_every: int = 0) -> None:
    g = p.add_argument_group("speed and logging")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained modules")
    g.add_argument("--no-tf32", dest="tf32", action="store_false", help="turn TF32 matmuls on CUDA off")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (None = torch's choice; use 1 next to other jobs)")
    g.add_argument("--log-to", nargs="*", default=[], choices=LOG_BACKENDS, metavar="BACKEND",
                   help=f"also log to these backends when installed: {', '.join(LOG_BACKENDS)}")
    g.add_argument("--log-every", type=int, default=log_every, help="steps between log lines (averages)")
    g.add_argument("--image-every", type=int, default=image_every, help="steps between PNG previews (0 = never)")
    g.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation and noise")


def setup(args: argparse.Namespace) -> DistInfo:
    """Threads, TF32, the process group (torchrun) and the device."""
    if args.threads is not None:
        if args.threads < 1:
            raise fail(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return init_distributed()


def _is_shards(data: str) -> bool:
    return data.endswith(".tar") or data.endswith("}") or ".tar" in Path(data).name


def make_loader(args: argparse.Namespace, image_size: int, batch_size: int, *,
                center_crop: bool = False) -> TrainLoader:
    """The training batches of ``--data``: uint8 (b, 3, S, S) and labels (b,), by epochs, resumable."""
    transform = center_crop_transform(image_size) if center_crop else train_transform(image_size)
    if _is_shards(args.data):
        from dmvae.training.webdataset import ShardLoader

        return ShardLoader(args.data, transform, batch_size, seed=args.seed, num_workers=args.num_workers,
                           num_classes=args.num_classes)
    try:
        dataset = build_dataset(args.data, transform)
        return TrainLoader(dataset, batch_size, seed=args.seed, num_workers=args.num_workers,
                           prefetch_factor=args.prefetch_factor)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None


def adamw(params: Iterable[torch.nn.Parameter], device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; the fused CUDA kernel on GPUs."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, fused=device.type == "cuda" or None, **kwargs)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``module.compile()`` in place (regional where the model defines it), when ``--compile``."""
    if enabled:
        module.compile()
    return module


def load_lpips(args: argparse.Namespace, device: torch.device):
    """LPIPS for ``--lpips-weight > 0``; missing weights end the run with the fix, not a traceback."""
    if args.lpips_weight <= 0:
        return None
    from dmvae.lpips import LPIPS, LPIPSWeightsError

    try:
        return LPIPS(weights=args.lpips_weights).to(device)
    except (LPIPSWeightsError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0]
        raise fail(f"LPIPS weights not found ({first}); pass --lpips-weights FILE, set DMVAE_LPIPS_WEIGHTS, "
                   "or train without LPIPS: --lpips-weight 0") from None


def check_source(flag: str, source: str) -> None:
    """A missing local model directory / file is a user mistake: one line."""
    if source.startswith("prior:") or "://" in source:
        return
    p = Path(os.path.expanduser(source))
    looks_local = source.startswith((".", "/", "~")) or source.count("/") >= 2
    if looks_local and not p.exists():
        raise fail(f"{flag} {source}: no such file or directory (run the previous stage first, see docs/training.md)")


def resume_and_log(args: argparse.Namespace, out: Path, state: dict, desc: str) -> tuple[int, MetricLogger]:
    """Restore the newest checkpoint under ``out/checkpoints`` into ``state`` (modules, optimisers,
    schedulers and the loader's position, all or nothing) and open the run's logger.

    Returns the step to start from (0 for a new run) and the :class:`MetricLogger`.
    """
    ckpt_dir, start = out / "checkpoints", 0
    if latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, **state).step
        if is_main_process():
            data = state["data"]
            print(f"resumed from step {start} (epoch {data.epoch}, batch {data.batch_in_epoch})")
    log = MetricLogger(out, total_steps=args.steps, start_step=start, log_every=args.log_every,
                       log_to=args.log_to, config=vars(args), progress=not args.quiet, desc=desc)
    return start, log
