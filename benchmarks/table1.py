"""The paper's Table 1 and Fig. 6 in miniature on real images: does distribution matching toward a
class-structured reference make latents easier for a diffusion model to learn?

Rows: AE (λ 0), Gaussian (λ_DM 1), GMM-10 (1), SSL λ 0 (control), SSL (10), Supervised (10,
positive control), SubSSL (1); all with one set of settings (only λ differs). Stage 1 per encoder
family and the references are trained once and shared by all seeds; per seed: stage 3 (the DM
loop), stage 4 (decoder fine-tune) and a class-conditional downstream LatentDiT scored at several
training budgets. See docs/experiments.md and ``dmvae.experiments``.

    python benchmarks/table1.py --data fashion-mnist:/usr/share/datasets/fashion-mnist --out runs/table1
    python benchmarks/table1.py --quick --data fashion-mnist:ROOT --out runs/table1_quick

Times (measured on a quiet 2-core CPU, --threads 2): the full run (3 seeds) 45.5 min; --quick ~2-3 min;
--threads 1 or a busy machine takes longer. --quick is a smoke run (shapes, files,
finite numbers): its budgets are far too small to pass the gates, and it is not expected to.

Writes table1.json (``rows`` with ``gfd_curve``, ``gates``, ``settings``), table1.md, samples.png,
curves.png and latents.png to --out; the terminal gets a short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dmvae.experiments.data import DataError
from dmvae.experiments.settings import QUICK, ROW_KEYS, Table1Settings
from dmvae.experiments.table1 import merge_results, run_table1
from dmvae.experiments.table1_report import (
    OUTPUT_FILES,
    markdown_table,
    summary_lines,
    write_outputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="output folder for " + ", ".join(OUTPUT_FILES))
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist:ROOT (the four IDX files, .gz or not, flat or in ROOT/FashionMNIST/raw), "
                        "fashion-mnist (the Debian package's folder, or a torchvision download where a network "
                        "exists), digits (scikit-learn's), or DIR (class folders DIR/<class>/<image>). "
                        "Default: fashion-mnist")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, or 1 with --quick)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed + seeds - 1 (run seeds in parallel, then --merge)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="combine the table1.json of runs over different seeds into --out (no training)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed and smoke budgets (~2-3 min on a quiet 2-core CPU); NOT expected to pass the gates")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help="comma-separated subset of rows")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="change one setting for every row (repeatable), e.g. --set stage1_steps=800 "
                        "--set dit_budgets=150,300,600 --set lambda_ssl=5; the names are the fields of "
                        "dmvae.experiments.settings.Table1Settings")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch CPU threads (torch.set_num_threads; default: 2 or the number of cores)")
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
        return _merge(args.merge, out, args.quiet)
    torch.set_num_threads(args.threads)
    try:
        settings = Table1Settings(**(QUICK if args.quick else {})).with_overrides(args.overrides)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if n_seeds < 1:
        sys.exit(f"error: --seeds must be >= 1, got {n_seeds}")
    if args.quick and not args.quiet:
        print("--quick: smoke budgets; the gates are computed but not expected to pass", file=sys.stderr)
    partial: dict[str, dict] = {}

    def save_partial(seed: int, rows_of_seed: dict) -> None:  # progress of a long run, per seed
        from dmvae.files import atomic_write_text

        partial[str(seed)] = rows_of_seed
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "table1.partial.json",
                          json.dumps({"settings": settings.to_dict(), "per_seed": partial}, indent=1) + "\n")

    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    try:
        result = run_table1(settings, data=args.data, seeds=seeds, rows=rows, quiet=args.quiet,
                            on_seed=save_partial)
    except (FileNotFoundError, DataError) as e:  # the data named by --data; anything else is a bug: traceback
        sys.exit(f"error: {e}")
    result["quick"] = args.quick
    paths = write_outputs(result, out, overwrite=args.overwrite)
    summary = {k: v for k, v in result.items() if not k.startswith("_")}
    print("\n".join(summary_lines(summary)))
    print(f"wrote {', '.join(str(p) for p in paths)} ({result['wall_seconds'] / 60:.1f} min)")
    return summary


def _merge(dirs: list[str], out: Path, quiet: bool) -> dict:
    """Merge the ``table1.json`` of seed-disjoint runs; the pictures are copied from the first run
    (the curves are redrawn from the merged numbers)."""
    import shutil

    from dmvae.experiments.table1_report import curves_png
    from dmvae.files import atomic_write_bytes, atomic_write_text, read_json

    try:
        merged = merge_results([read_json(Path(d) / "table1.json", "Table 1 results") for d in dirs])
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: cannot merge {dirs}: {e}")
    merged["merged_from"] = [str(d) for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table1.json", json.dumps(merged, indent=1) + "\n")
    atomic_write_text(out / "table1.md", markdown_table(merged))
    atomic_write_bytes(out / "curves.png", curves_png(merged))
    for name in ("samples.png", "latents.png"):
        if Path(dirs[0], name).resolve() != (out / name).resolve():
            shutil.copyfile(Path(dirs[0]) / name, out / name)
    if not quiet:
        print(markdown_table(merged), file=sys.stderr)
    print("\n".join(summary_lines(merged)))
    return merged


if __name__ == "__main__":
    main()
