"""The paper's Table 1 in miniature on real images: which reference distribution makes the latents
easiest for a diffusion model to learn.

Rows: AE baseline, Gaussian (λ_DM 1), GMM-10 (1), SSL (10), Supervised (10), SubSSL (1), each
trained with the same budgets on scikit-learn's handwritten digits (or ``--data DIR``, any
class-folder image set), scored on a fixed held-out split: PSNR, rFD, gFD and sample accuracy under
an independent digit classifier, latent <-> reference energy distance. See docs/experiments.md and
``dmvae.experiments.table1``.

    python benchmarks/table1.py --out runs/table1              # full run: 3 seeds
    python benchmarks/table1.py --quick --out runs/table1_quick  # 1 seed, short budgets

Writes ``table1.json`` (``rows`` + every setting), ``table1.md`` and ``samples.png`` to ``--out``
and prints the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dmvae.experiments.table1 import QUICK, ROW_KEYS, Table1Settings, merge_results, run_table1
from dmvae.experiments.table1_report import OUTPUT_FILES, markdown_table, write_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="output folder for " + ", ".join(OUTPUT_FILES))
    p.add_argument("--data", default=None,
                   help="a class-folder image set DIR/<class>/<image> (default: scikit-learn's digits)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds 0..N-1 (default 3, or 1 with --quick)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed + seeds - 1 (run seeds in parallel, then --merge)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="combine the table1.json of runs over different seeds into --out (no training)")
    p.add_argument("--quick", action="store_true", help="1 seed and short budgets: a smoke run (~1-2 min)")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help="comma-separated subset of rows")
    p.add_argument("--image-size", type=int, default=Table1Settings.image_size,
                   help="image side in pixels (a multiple of the patch size 8)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="change one Table1Settings field (repeatable), e.g. --set stage1_steps=800; "
                        "the same value applies to every row")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads < 1:
        sys.exit(f"error: --threads must be >= 1, got {args.threads}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown or not rows:
        sys.exit(f"error: unknown --rows {unknown}; choose from {','.join(ROW_KEYS)}")
    out = Path(args.out)
    if not args.overwrite and any((out / f).exists() for f in OUTPUT_FILES):
        sys.exit(f"error: {out} already holds results; pass --overwrite to replace them")
    if args.merge:
        return _merge(args.merge, out, args.overwrite, args.quiet)
    torch.set_num_threads(args.threads)
    try:
        settings = Table1Settings(image_size=args.image_size, **(QUICK if args.quick else {}))
        settings = settings.with_overrides(args.overrides)
    except ValueError as e:
        sys.exit(f"error: {e}")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if n_seeds < 1:
        sys.exit(f"error: --seeds must be >= 1, got {n_seeds}")
    partial: dict[str, dict] = {}

    def save_partial(seed: int, rows_of_seed: dict) -> None:  # progress of a long run, per seed
        from dmvae.files import atomic_write_text

        partial[str(seed)] = rows_of_seed
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "table1.partial.json",
                          json.dumps({"settings": settings.to_dict(), "per_seed": partial}, indent=1) + "\n")

    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    result = run_table1(settings, data=args.data, seeds=seeds, rows=rows, quiet=args.quiet,
                        on_seed=save_partial)
    result["quick"] = args.quick
    write_outputs(result, out, overwrite=args.overwrite)
    if not args.quiet:
        print(markdown_table(result), file=sys.stderr)
    summary = {k: v for k, v in result.items() if not k.startswith("_")}
    print(json.dumps(summary, indent=1))
    return summary


def _merge(dirs: list[str], out: Path, overwrite: bool, quiet: bool) -> dict:
    """Merge the ``table1.json`` of seed-disjoint runs; ``samples.png`` is copied from the first."""
    import shutil

    from dmvae.files import atomic_write_text, read_json

    try:
        merged = merge_results([read_json(Path(d) / "table1.json", "Table 1 results") for d in dirs])
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: cannot merge {dirs}: {e}")
    merged["merged_from"] = [str(d) for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table1.json", json.dumps(merged, indent=1) + "\n")
    atomic_write_text(out / "table1.md", markdown_table(merged))
    if Path(dirs[0], "samples.png").resolve() != (out / "samples.png").resolve():
        shutil.copyfile(Path(dirs[0]) / "samples.png", out / "samples.png")
    if not quiet:
        print(markdown_table(merged), file=sys.stderr)
    print(json.dumps(merged, indent=1))
    return merged


if __name__ == "__main__":
    main()
