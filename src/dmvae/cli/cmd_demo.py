"""``dmvae demo``: the paper's 2-D study on the CPU (DM loss aligning points with an S-shape).

Argument parsing and file names only; the study is :func:`dmvae.demo.run_toy2d`, its text report
:meth:`~dmvae.demo.Toy2DResult.report`, its pictures :mod:`dmvae.demo.figure`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmvae.cli._common import (
    add_command,
    add_quiet_arg,
    add_threads_arg,
    float_range,
    int_range,
)


def register(subparsers) -> None:
    p = add_command(subparsers, "demo", run)
    p.add_argument("--steps", type=int_range(1), default=None, help="alignment steps (default: 1000)")
    p.add_argument("--teacher-steps", type=int_range(1), default=None,
                   help="real-score fitting steps (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the score nets, noise and evaluation draws")
    p.add_argument("--point-lr", type=float_range(0, low_open=True), default=None,
                   help="Adam learning rate of the points (default: 1e-2)")
    p.add_argument("--point-every", type=int_range(1), default=None,
                   help="update the points every k steps (default: 2)")
    p.add_argument("--eval-sets", type=int_range(1), default=None,
                   help="reference sets averaged in the figures (default: 10)")
    p.add_argument("--compare", action="store_true",
                   help="also run the other objectives of the paper's study; writes compare.png")
    p.add_argument(
        "--objectives", default=None,
        help="comma-separated objectives to compare (default: dm,real_score,fake_score,score_diff,loss_diff)",
    )
    p.add_argument(
        "-o", "--out", type=Path, default=Path("dmvae-demo"),
        help="directory for demo.png, compare.png and points*.npy; the demo's own files from an "
        "earlier run are replaced",
    )
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the figures as JSON on stdout (or write them to PATH)")
    add_threads_arg(p, default=1, why=", the fastest for these tiny nets")
    add_quiet_arg(p)


def run(args: argparse.Namespace) -> int:
    """2-D distribution-matching demo (paper Fig. 3), offline on the CPU

    Fits a small LatentDiT real score to S-shape samples, aligns 1,536 points drawn
    uniformly on [-1.5, 1.5]^2 with the DM loss (fake score every step, points every k
    steps), and prints energy distance and coverage before/after next to the two-sample
    floor. Writes demo.png (four labelled panels) and points.npy to -o/--out.
    --compare also runs the other objectives of the paper's 2-D study and draws them
    side by side in compare.png (paper Fig. 3).
    """
    from dmvae.demo import (
        COMPARE_OBJECTIVES,
        OBJECTIVES,
        Toy2DConfig,
        initial_points,
        run_toy2d,
        save_compare_figure,
        save_figure,
    )

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"-o {args.out}: a file of that name exists; the demo writes demo.png and points.npy "
                         "into a directory: pass a directory name")
    overrides = {"seed": args.seed, "num_threads": args.threads}
    for name in ("steps", "teacher_steps", "point_lr", "point_every", "eval_sets"):
        if getattr(args, name) is not None:  # ranges are checked by the parser
            overrides[name] = getattr(args, name)
    cfg = Toy2DConfig(**overrides)
    objectives = ["dm"]
    if args.compare or args.objectives:
        objectives = args.objectives.split(",") if args.objectives else list(COMPARE_OBJECTIVES)
        objectives = [o.strip() for o in objectives if o.strip()]
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; choose from {sorted(OBJECTIVES)}")
        objectives = ["dm"] + [o for o in objectives if o != "dm"]
    to_stdout = args.json == "-"
    say = (lambda s: None) if to_stdout else print
    result = run_toy2d(cfg, objectives=objectives, progress=not (args.quiet or to_stdout), log=say)
    m = result.main
    report = result.to_dict()
    say("\n" + result.report())
    if args.out is not None:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        files = {"points": _save_points(out / "points.npy", m.points)}
        for name, r in result.runs.items():
            if name != m.objective:
                files[f"points_{name}"] = _save_points(out / f"points_{name}.npy", r.points)
        start = initial_points(cfg.num_points, cfg.init_seed)
        files["png"] = str(save_figure(
            out / "demo.png", result.reference, start, m.points, m.field_points, m.field,
            title=f"DM alignment of {cfg.num_points} points with an S-shape (paper Fig. 3)",
            run=m, floor=result.energy_floor,
        ))
        if len(result.runs) > 1:
            files["compare_png"] = str(save_compare_figure(
                out / "compare.png", result.reference, result.runs, result.energy_floor,
                title=f"objectives of the paper's 2-D study, {cfg.steps} alignment steps each",
            ))
        report["files"] = files
        say("wrote " + ", ".join(v for k, v in files.items() if not k.startswith("points_")))
    if args.json is not None:
        text = json.dumps(report, indent=2)
        if to_stdout:
            print(text)
        else:
            from dmvae.files import atomic_write_text

            atomic_write_text(args.json, text + "\n")
            print(f"wrote {args.json}")
    return 0


def _save_points(path: Path, points) -> str:
    import io

    import numpy as np

    from dmvae.files import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, points.numpy().astype(np.float32))
    return str(atomic_write_bytes(path, buf.getvalue()))
