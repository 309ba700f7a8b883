"""Which torch CPU thread count to use by default (issue 21): two fixed workloads at 1 .. N threads.

    python benchmarks/threads.py                  # 1 and all usable CPUs, one repeat each
    python benchmarks/threads.py --threads 1 2 4 --repeats 3

Workloads, each run in a fresh process per thread count (torch's thread pool cannot shrink safely
once it has run work):

- ``stage1``: ``examples/train_tokenizer.py`` for ``--steps`` steps on the bundled photos (the
  documented CPU stage 1 without LPIPS), wall time of the whole run;
- ``sample``: Heun sampling with CFG 4 of a ``LightningDiT-Mini/1`` (random weights) at 16 x 16
  latents, 8 images, 20 steps.

Prints one JSON object: seconds per workload and thread count, and each count's speed-up against
1 thread measured in the same run. Only meaningful on a quiet machine: `dmvae.cli._common.default_threads`
cites the figures of such a run (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmvae.cli._common import _usable_cpus

ROOT = Path(__file__).resolve().parents[1]

_SAMPLE = """
import time, torch
from dmvae import create_model
from dmvae.samplers import sample
torch.set_num_threads({threads})
with torch.random.fork_rng():
    torch.manual_seed(0)
    dit = create_model("LightningDiT-Mini/1", input_size=16, in_channels=32).eval()
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 32, 16, 16, generator=g)
y = torch.arange(8) % 1000
t0 = time.perf_counter()
with torch.no_grad():
    sample(dit, x, y, num_steps=20, method="heun", cfg_scale=4.0)
print(time.perf_counter() - t0)
"""


def _run_stage1(threads: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "examples" / "train_tokenizer.py"), "--out", tmp, "--steps", str(steps),
               "--threads", str(threads), "--quiet", "--image-every", "0", "--lpips-weight", "0"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return time.perf_counter() - t0


def _run_sample(threads: int) -> float:
    code = _SAMPLE.format(threads=threads)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts to compare (default: 1 and the usable CPUs)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the minimum is reported")
    ap.add_argument("--steps", type=int, default=20, help="stage-1 steps")
    ap.add_argument("--dry-run", action="store_true", help="2 steps, 1 thread, no timing claims (for tests)")
    args = ap.parse_args(argv)
    usable = _usable_cpus()  # the count default_threads() divides among local processes
    counts = [1] if args.dry_run else (args.threads or sorted({1, usable}))
    steps = 2 if args.dry_run else args.steps
    seconds: dict[str, dict[str, float]] = {"stage1": {}, "sample": {}}
    for n in counts:
        seconds["stage1"][str(n)] = min(_run_stage1(n, steps) for _ in range(args.repeats))
        seconds["sample"][str(n)] = min(_run_sample(n) for _ in range(args.repeats))
        print(json.dumps({"threads": n, **{k: v[str(n)] for k, v in seconds.items()}}), file=sys.stderr)
    speedup = {k: {n: v["1"] / t for n, t in v.items()} for k, v in seconds.items() if "1" in v}
    result = {"usable_cpus": usable, "stage1_steps": steps, "seconds": seconds, "speedup_vs_1_thread": speedup}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
