"""``dmvae convert``: reference ``.pt`` checkpoints -> our safetensors directories."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a reference checkpoint (vae.pt / ep*.pt) to a dmvae directory",
        description="Reads the reference checkpoint with torch.load(weights_only=True), picks the "
        "raw or EMA state dict, loads it strictly into the model built from --preset and writes "
        "config.json + model.safetensors. The kind is detected from the file's keys "
        "('vae_wo_ddp'/'vae_ema': autoencoder; 'model'/'ema': LatentDiT).",
    )
    p.add_argument("input", help="reference .pt file")
    p.add_argument("output", help="output directory")
    p.add_argument(
        "--preset",
        required=True,
        help="autoencoder preset (dmvae-l, ...) or LatentDiT model name (LightningDiT-XL/1, ...)",
    )
    p.add_argument("--ema", action="store_true", help="take the EMA weights (default: raw)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. --set input_size=16 in_channels=32 (JSON values)",
    )
    p.set_defaults(func=run)


def _overrides(pairs: list[str]) -> dict:
    import json

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from dmvae.hub import CheckpointError, read_torch_checkpoint

    ckpt = read_torch_checkpoint(args.input)
    keys = sorted(ckpt) if isinstance(ckpt, dict) else []
    overrides = _overrides(args.set)
    if any(k in keys for k in ("vae_wo_ddp", "vae_ema")):
        from dmvae.autoencoder import DMVAE, DMVAEConfig

        cls, config = DMVAE, DMVAEConfig.from_preset(args.preset, **overrides)
    elif any(k in keys for k in ("model", "ema")):
        from dmvae.dit import LatentDiT, LatentDiTConfig

        cls, config = LatentDiT, LatentDiTConfig.from_preset(args.preset, **overrides)
    else:
        raise CheckpointError(
            f"{args.input}: not a reference checkpoint (expected keys 'vae_wo_ddp'/'vae_ema' or "
            f"'model'/'ema', found {keys[:10]})"
        )
    del ckpt
    model = cls.from_pretrained(args.input, config=config, use_ema=args.ema)
    out = model.save_pretrained(args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {cls.__name__} ({n:,} parameters, {'EMA' if args.ema else 'raw'} weights) to {out}")
    return 0
