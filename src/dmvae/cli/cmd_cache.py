"""``dmvae cache-latents``: encode a data set once into a latent cache (see :mod:`dmvae.latent_cache`)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dmvae.cli._common import (
        add_command,
        add_model_args,
        add_output_args,
        int_range,
    )

    p = add_command(subparsers, "cache-latents", run_cache)
    p.add_argument("--data", required=True,
                   help="an image folder (class sub-folders = labels), a file list ('<path> [<label>]' lines), "
                        "or 'skimage' (the bundled photos)")
    p.add_argument("--image-size", type=int_range(1), default=None, help="crop size (default: the model's image_size)")
    p.add_argument("--batch-size", type=int_range(1), default=64, help="images per encoder call, per process")
    p.add_argument("--shard-size", type=int_range(1), default=1024, help="images per shard file")
    p.add_argument("--num-workers", type=int_range(0), default=None,
                   help="DataLoader workers per process (default: fits the machine)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage type of the latents")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (the reference's VAE setting)")
    p.add_argument("--max-shards", type=int_range(1), default=None,
                   help="stop each process after this many new shards (time-limited jobs; re-run to continue)")
    add_output_args(p, what="cache directory (an existing cache of the same tokenizer, settings and input files "
                    "is resumed; --overwrite replaces an incompatible one, and only a directory this command made: "
                    "never the data or a folder holding it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_model_args(p)


def run_cache(args: argparse.Namespace) -> int:
    """encode a data set once into sharded safetensors latents (+ flips) for LatentDiT training

    Encode the ADM centre crop of every image and of its horizontal mirror with the autoencoder and
    write sharded safetensors files with the un-normalised latents, labels, the file index, the
    tokenizer config, a hash of its encoder weights and the latent statistics. Resumable: run it
    again to encode only the missing shards. Under torchrun every process encodes its own shards
    (torchrun --nproc_per_node=8 -m dmvae cache-latents ...). Train from the cache with
    examples/train_latent_dit.py --latents OUT.
    """
    import torch

    from dmvae.cli._common import default_num_workers, load_autoencoder
    from dmvae.dist import cleanup_distributed, init_distributed, is_main_process
    from dmvae.latent_cache import cache_latents, check_cache_output
    from dmvae.training.data import build_dataset, center_crop_transform

    # before loading anything: --overwrite never replaces what this tool did not make, nor the data
    check_cache_output(args.out, overwrite=args.overwrite,
                       inputs=[args.data] if args.data != "skimage" else [])
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    info = init_distributed(device=args.device)
    if info.backend is not None:
        args.device = str(info.device)
    vae = load_autoencoder(args)
    size = args.image_size or vae.config.image_size
    dataset = build_dataset(args.data, center_crop_transform(size))
    try:
        result = cache_latents(vae, dataset, args.out, image_size=size, batch_size=args.batch_size,
                               shard_size=args.shard_size, num_workers=workers,
                               dtype=getattr(torch, args.dtype), autocast=args.bf16, source=str(args.data),
                               overwrite=args.overwrite, max_shards=args.max_shards, progress=not args.quiet)
    finally:
        cleanup_distributed()
    if is_main_process():
        done = "complete" if result.complete else "incomplete (run again to continue)"
        summary = {"out": str(args.out), "num_images": result.num_images, "num_shards": result.num_shards,
                   "latent_shape": result.latent_shape, "status": done,
                   **{k: result.statistics[k] for k in ("latent_mean", "latent_scale") if k in result.statistics}}
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{args.out}: {result.num_images} images in {result.num_shards} shards, latents "
                  f"{tuple(result.latent_shape)}, {done}")
            if "latent_mean" in summary:
                print(f"latent_mean {summary['latent_mean']:.6g}  latent_scale {summary['latent_scale']:.6g}")
    return 0
