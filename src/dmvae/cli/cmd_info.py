"""``dmvae info``: architecture, parameter counts and latent shape, without downloading weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dmvae.cli._common import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "info", run)
    p.add_argument("source", help="preset, model name or directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _describe_autoencoder(config: Any, label: str) -> dict[str, Any]:
    import torch

    from dmvae.autoencoder import DMVAE

    with torch.device("meta"):
        model = DMVAE(config)
    p = config.patch_size
    h = w = config.image_size // p
    enc = model.encoder.model
    return {
        "model": "DMVAE",
        "source": label,
        "config": config.to_dict(),
        "parameters": model.parameter_counts(),
        "encoder": {
            "timm_model": config.encoder,
            "embed_dim": int(getattr(enc, "embed_dim", 0)),
            "depth": len(getattr(enc, "blocks", [])),
            "patch_size": p,
        },
        "image_shape": [3, config.image_size, config.image_size],
        "latent_shape": [config.z_channels, h, w],
        "compression": (3 * config.image_size**2) / (config.z_channels * h * w),
        "latent_normalisation": f"(z - {config.latent_mean}) * {config.latent_scale}",
    }


def _describe_dit(config: Any, label: str) -> dict[str, Any]:
    import torch

    from dmvae.dit import LatentDiT

    with torch.device("meta"):
        model = LatentDiT(config)
    tokens = (config.input_size // config.patch_size) ** 2
    return {
        "model": "LatentDiT",
        "source": label,
        "config": config.to_dict(),
        "parameters": {"total": model.num_parameters()},
        "latent_shape": [config.in_channels, config.input_size, config.input_size],
        "null_class": model.null_class,
        "tokens": tokens,
        "head_dim": config.hidden_size // config.num_heads,
    }


def describe(source: str) -> dict[str, Any]:
    """The description of a preset name (looked up as ``dmvae.create_model`` does: the one model
    registry, any case, "did you mean"), a ``config.json`` or a directory holding one."""
    from dmvae._registry import MODELS, UnknownNameError
    from dmvae.autoencoder import DMVAEConfig
    from dmvae.dit import LatentDiTConfig
    from dmvae.models import model_config

    path = Path(source)
    if not path.exists():
        try:
            config = model_config(source)
        except UnknownNameError as e:
            raise ValueError(f"{e}; or give a config.json or a directory holding one") from None
        source = MODELS.canonical(source)  # the registered spelling
        if isinstance(config, LatentDiTConfig):
            return _describe_dit(config, f"model {source}")
        return _describe_autoencoder(config, f"preset {source}")
    cfg_file = path / "config.json" if path.is_dir() else path
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        from dmvae.files import read_json

        data = read_json(cfg_file, "config file")
        if not isinstance(data, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object of config fields, got {type(data).__name__}")
        kind = data.get("_class_name", "DMVAEConfig")
        if kind in ("LatentDiT", "LatentDiTConfig"):
            return _describe_dit(LatentDiTConfig.load(cfg_file), str(path))
        return _describe_autoencoder(DMVAEConfig.load(cfg_file), str(path))
    raise ValueError(f"{source!r} is neither a config.json nor a directory holding one")


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M ({n:,})"


def run(args: argparse.Namespace) -> int:
    """describe a preset or a saved model (no download)

    SRC is an autoencoder preset (dmvae-l, dmvae-b, ...), a LatentDiT model name (LightningDiT-XL/1,
    ...), a config.json or a directory holding one. The model is built on the meta device, so
    nothing is allocated or downloaded.
    """
    info = describe(args.source)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']} — {info['source']}")
    if info["model"] == "DMVAE":
        c, e, n = info["config"], info["encoder"], info["parameters"]
        print(f"  encoder     {e['timm_model']} (dim {e['embed_dim']}, depth {e['depth']}, "
              f"patch {e['patch_size']}): {_millions(n['encoder'])}")
        print(f"  bottleneck  MLP {e['embed_dim']} -> {c['bottleneck_dim']} -> {c['z_channels']}: "
              f"{_millions(n['bottleneck'])}")
        print(f"  decoder     conv, channels {c['decoder_channels']} x {tuple(c['decoder_channel_mult'])}, "
              f"{c['decoder_num_res_blocks']} res blocks: {_millions(n['decoder'])}")
        print(f"  total       {_millions(n['total'])} parameters")
        print(f"  image       {'x'.join(map(str, info['image_shape']))} in [-1, 1]")
        print(f"  latent      {'x'.join(map(str, info['latent_shape']))} "
              f"(compression {info['compression']:.0f}x)")
        print(f"  normalised  {info['latent_normalisation']}")
    else:
        c = info["config"]
        print(f"  transformer depth {c['depth']}, width {c['hidden_size']}, heads {c['num_heads']} "
              f"(head dim {info['head_dim']}), patch {c['patch_size']}")
        print(f"  latent      {'x'.join(map(str, info['latent_shape']))} -> {info['tokens']} tokens")
        null = info["null_class"]
        extra = f" (+ null class {null} for guidance)" if null is not None else " (no null class: no guidance)"
        print(f"  classes     {c['num_classes']}{extra if c['num_classes'] else ' (unconditional)'}")
        print(f"  total       {_millions(info['parameters']['total'])} parameters")
    return 0
