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

from dmvae.cli._common import (
    HelpFormatter,
    LineStream,
    apply_threads,
    check_weights_source,
    default_threads,
)
from dmvae._utils import eval_mode
from dmvae.dist import DistInfo
from dmvae.ema import EMA
from dmvae.training import (
    init_distributed,
    is_main_process,
    latest_checkpoint,
    load_checkpoint,
)
from dmvae.training.data import (
    SkimagePhotos,
    build_dataset,
    center_crop_transform,
    to_model_input,
    train_transform,
)
from dmvae.training.logger import LOG_BACKENDS, MetricLogger
from dmvae.training.sampler import TrainLoader


def fail(message: str) -> SystemExit:
    """A user mistake: one line on stderr naming the fix, exit status 2 (``raise fail(...)``)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    return SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args, **kwargs):  # an option without a help text still shows its default
        if "help" not in kwargs and kwargs.get("default") not in (None, False, [], ""):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


def make_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The module docstring verbatim and every meaningful default in ``--help`` (the CLI's formatter)."""
    return _Parser(prog=prog, description=doc, formatter_class=HelpFormatter)


def add_data_args(p: argparse.ArgumentParser, *, data_help: str = "") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="skimage",
                   help="'skimage' (bundled photos), an image folder (class sub-folders = labels), a file list "
                        "('<path> [<label>]' lines) or webdataset tar shards ('shards-{0000..0099}.tar')" + data_help)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per GPU/process")
    g.add_argument("--num-classes", type=int, default=None, help="label count for tar shards (else from the data)")
    g.add_argument("--prefetch-factor", type=int, default=None, help="batches prefetched per worker (torch default 2)")
    g.add_argument("--val-data", default=None,
                   help="held-out images for the end-of-stage figure and preview (default: with --data skimage "
                        f"or tar shards, bundled photos the run never trains on ({', '.join(SKIMAGE_HELD_OUT)}); "
                        "with an image folder or file list, images spread over --data, which are NOT held out)")
    g.add_argument("--val-images", type=int, default=16, help="held-out images used (each also mirrored)")


def add_run_args(p: argparse.ArgumentParser, *, log_every: int = 10, image_every: int = 0) -> None:
    g = p.add_argument_group("speed and logging")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained modules")
    g.add_argument("--no-tf32", dest="tf32", action="store_false", help="turn TF32 matmuls on CUDA off")
    g.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads per process (default: {default_threads()} here, see dmvae.cli._common."
                        "default_threads)")
    g.add_argument("--log-to", nargs="*", default=[], choices=LOG_BACKENDS, metavar="BACKEND",
                   help=f"also log to these backends when installed: {', '.join(LOG_BACKENDS)}")
    g.add_argument("--log-every", type=int, default=log_every, help="steps between log lines (averages)")
    g.add_argument("--image-every", type=int, default=image_every, help="steps between PNG previews (0 = never)")
    g.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation and noise")


def setup(args: argparse.Namespace) -> DistInfo:
    """Threads, TF32, progress fit for log files, the process group (torchrun) and the device."""
    if args.threads is not None and args.threads < 1:
        raise fail(f"--threads must be >= 1, got {args.threads}")
    apply_threads(args.threads)
    if not sys.stderr.isatty() and not isinstance(sys.stderr, LineStream):
        sys.stderr = LineStream(sys.stderr)  # a log file: the progress bar as a line every 30 s, no \r flood
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
    """A missing local model directory / file, or a preset name where weights belong: one line."""
    if source.startswith("prior:") or "://" in source:
        return
    try:
        check_weights_source(flag, source)
    except ValueError as e:
        raise fail(str(e)) from None
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


# ################################################################################################
# EMA and the end of a stage: held-out figures and the final preview
# ################################################################################################

#: Colour photos bundled with scikit-image that ``SkimagePhotos`` (the training set of ``--data
#: skimage``) does not contain: the held-out set of the CPU runs.
SKIMAGE_HELD_OUT = ("hubble_deep_field", "retina", "colorwheel")


def add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EMA")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (the reference's 0.9999)")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="let the EMA decay grow with the step count, min(decay, 1 - (1 + n)^(-2/3)) (timm's "
                        "warm-up), so that the EMA of a short run holds trained weights; --no-ema-warmup = the "
                        "reference's fixed decay (an EMA of 300 steps at 0.9999 is ~97 %% the initial weights)")


def make_ema(model: torch.nn.Module, args: argparse.Namespace) -> EMA:
    return EMA(model, decay=args.ema_decay, warmup=args.ema_warmup)


def held_out(args: argparse.Namespace, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Held-out images (each followed by its mirror), their labels and a description.

    ``(x, y, what)``: x (2n, 3, S, S) float in [-1, 1] on ``device`` (ADM centre crops), y (2n,) int64.
    """
    transform = center_crop_transform(image_size)
    try:
        if args.val_data is not None:
            dataset, what = build_dataset(args.val_data, transform), f"held-out {args.val_data}"
        elif args.data == "skimage":
            dataset, what = SkimagePhotos(transform, repeats=1, names=SKIMAGE_HELD_OUT), "held-out photos"
        elif not _is_shards(args.data):
            dataset, what = build_dataset(args.data, transform), f"{args.data} (training images: pass --val-data)"
        else:  # a stream has no fixed images: the bundled held-out photos, until --val-data is given
            dataset = SkimagePhotos(transform, repeats=1, names=SKIMAGE_HELD_OUT)
            what = "held-out photos (bundled: pass --val-data for your data)"
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    n = max(1, min(args.val_images, len(dataset)))
    items = [dataset[i * len(dataset) // n] for i in range(n)]
    x = to_model_input(torch.stack([im for im, _ in items]), device)
    y = torch.tensor([label for _, label in items], dtype=torch.long, device=device)
    return torch.cat([x, x.flip(-1)]), torch.cat([y, y]), f"{what}, {n} images + mirrors"


@torch.no_grad()
def held_out_psnr(vae: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB, on the 8-bit images) of ``vae``'s reconstructions of ``x``, and the reconstructions."""
    from dmvae.image import to_uint8
    from dmvae.metrics import psnr

    with eval_mode(vae):
        x_hat = vae(x).reconstruction.float()
    return float(psnr(to_uint8(x), to_uint8(x_hat)).mean()), x_hat


@torch.no_grad()
def held_out_fm_loss(dit: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, seed: int, repeats: int = 8) -> float:
    """The flow-matching loss of ``dit`` on the held-out latents ``z`` (normalised), averaged over
    ``repeats`` fixed draws of (t, noise) per latent: the same draws for every model compared."""
    from dmvae.transport import FlowMatching

    fm = FlowMatching()
    g = torch.Generator(z.device).manual_seed(seed + 12_345)
    zz, yy = z.repeat(repeats, 1, 1, 1), y.repeat(repeats)
    t = fm.sample_time(zz.shape[0], generator=g, device=z.device)
    noise = torch.randn(zz.shape, generator=g, device=z.device)
    with eval_mode(dit):  # no label dropout
        loss = fm.loss(dit, zz.float(), yy, t=t, noise=noise).loss
    return float(loss)


def quality_line(stage: str, what: str, metric: str, figures: dict[str, float | None], unit: str = "") -> str:
    """``stage 1 | held-out photos, 3 images + mirrors | PSNR  initial 10.21 dB  raw 18.40 dB  EMA 18.31 dB``:
    printed by the main process at the end of a stage (so a broken hand-off shows in the log)."""
    parts = [f"{k} {v:.4g}{unit}" for k, v in figures.items() if v is not None]
    line = f"{stage} | {what} | {metric}  " + "  ".join(parts)
    if is_main_process():
        print(line, flush=True)
    return line
