"""``dmvae convert``: reference ``.pt`` checkpoints -> our safetensors directories
(argparse around :func:`dmvae.conversion.convert_checkpoint`)."""

from __future__ import annotations

import argparse

from dmvae.cli._common import add_command, check_output_files


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "convert", run)
    p.add_argument("input", help="reference .pt file")
    p.add_argument("output", help="output directory")
    p.add_argument(
        "--config",
        required=True,
        help="the architecture the checkpoint was trained with: an autoencoder preset (dmvae-l, ...), a "
        "LatentDiT model name (LightningDiT-XL/1, ...) or a config.json",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA (--ema) or raw (--no-ema) weights (default: raw for an autoencoder, EMA for a LatentDiT)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. --set input_size=16 in_channels=32 (JSON values)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUTPUT (refused otherwise)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


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
    """convert a reference checkpoint (vae.pt / ep*.pt) to a dmvae directory

    Reads the reference checkpoint with torch.load(weights_only=True), picks the raw or EMA state
    dict, loads it strictly into the model built from --config and writes config.json +
    model.safetensors. The kind is detected from the file's keys ('vae_wo_ddp'/'vae_ema':
    autoencoder; 'model'/'ema': LatentDiT). By default the weights are those from_pretrained would
    load: raw for an autoencoder, EMA for a LatentDiT.
    """
    from dmvae.cli._common import config_arg, writing
    from dmvae.conversion import convert_checkpoint
    from dmvae.hub import CONFIG_NAME, WEIGHTS_NAME

    if args.config is None:
        raise ValueError("--config is required: the preset or config.json the checkpoint was trained with")
    overrides = _overrides(args.set)
    check_output_files(args.output, [CONFIG_NAME, WEIGHTS_NAME], overwrite=args.overwrite)  # before reading
    with writing(args.output):
        model, out, ema = convert_checkpoint(args.input, args.output, config_arg(args.config), use_ema=args.ema,
                                             overrides=overrides, overwrite=args.overwrite)  # fmt: skip
    n = model.num_parameters()
    if args.json:
        import json

        print(json.dumps({"model": type(model).__name__, "parameters": n, "weights": "ema" if ema else "raw",
                          "out": str(out)}))
    else:
        print(f"wrote {type(model).__name__} ({n:,} parameters, {'EMA' if ema else 'raw'} weights) to {out}")
    return 0
