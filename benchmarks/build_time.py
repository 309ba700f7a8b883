"""How long building a randomly initialised autoencoder takes (issue 21: ``DMVAE("dmvae-l")`` took
36 s on a busy 2-core machine), and where the time goes.

    python benchmarks/build_time.py                       # dmvae-l, one repeat, 1 thread
    python benchmarks/build_time.py --preset dmvae-b --repeats 3 --threads 2 --json

Variants, each timed on a fresh build:

- ``default``: ``DMVAE(preset)``, what users call: every module's own initialisation (torch's
  ``reset_parameters``), then timm's ViT initialisation of the encoder and the reference's
  truncated-normal initialisation of the decoder and bottleneck, i.e. most weights drawn twice;
- ``meta``: the same constructor on the meta device (no memory, no random numbers): the cost of
  building the module tree alone, the floor of any build;
- ``single_init``: meta build, ``to_empty`` on the CPU, then only the final initialisers (timm's
  ``init_weights`` for the encoder, ``initialize_weights`` for the rest, ``reset_parameters`` for
  what neither covers): what skipping the double draw would cost. Its weights follow the same
  distributions but are not the same numbers as ``default`` for a given seed (fewer random draws),
  which is why the library does not do this silently.

Loading weights (``from_pretrained``) already builds on the meta device and assigns the checkpoint's
tensors, so only random builds pay this. Timings depend on the machine's load; the numbers in the
docs come from one quiet run of this script.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from torch import nn


def _build_default(preset: str) -> nn.Module:
    from dmvae import DMVAE

    return DMVAE(preset)


def _build_meta(preset: str) -> nn.Module:
    from dmvae import DMVAE

    with torch.device("meta"):
        return DMVAE(preset)


@functools.lru_cache(maxsize=1)
def _constants() -> dict[str, torch.Tensor]:
    """The buffers (the encoder's pixel normalisation constants), which ``to_empty`` leaves empty."""
    from dmvae import DMVAE

    return dict(DMVAE("dmvae-tiny").named_buffers())


def _build_single_init(preset: str) -> nn.Module:
    model = _build_meta(preset).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything no initialiser reaches shows up below
    drawn_later = {id(m) for m in model.encoder.model.modules() if isinstance(m, nn.Linear)}
    drawn_later |= {id(m) for part in (model.decoder, model.bottle_neck) for m in part.modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d))}
    for m in model.modules():  # norms, LayerScale, the patch-embedding conv: their own (cheap) init
        if id(m) not in drawn_later and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model.encoder.model.init_weights()  # timm: trunc-normal Linear weights, pos_embed, cls token
    model.initialize_weights()  # the reference's init of decoder and bottleneck
    constants = _constants()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(constants[name])
    missed = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    if missed:
        raise RuntimeError(f"single_init left parameters uninitialised: {missed[:5]}")
    return model


VARIANTS = {"default": _build_default, "meta": _build_meta, "single_init": _build_single_init}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dmvae-l", help="autoencoder preset (default: dmvae-l)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=1, help="builds per variant; the minimum is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _build_meta(args.preset)  # imports (timm, the model modules) out of the timings
    _constants()
    results: dict[str, float] = {}
    for name in args.variants:
        times = []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            model = VARIANTS[name](args.preset)
            times.append(time.perf_counter() - t0)
            del model
        results[name] = min(times)
    report = {"preset": args.preset, "threads": args.threads, "repeats": args.repeats,
              "torch": torch.__version__, "seconds": results}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, s in results.items():
            print(f"{args.preset} {name:>12}: {s:7.2f} s")
    return report


if __name__ == "__main__":
    main()
