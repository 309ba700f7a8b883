"""Writing the Table 1 results: ``table1.json``, ``table1.md`` and ``samples.png``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["markdown_table", "samples_grid", "write_outputs", "OUTPUT_FILES"]

OUTPUT_FILES = ("table1.json", "table1.md", "samples.png")

# (metric key, column title, format); "±" columns show mean ± sd over the seeds
COLUMNS = (
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("rfd", "rFD ↓", "{:.2f}"),
    ("gfd", "gFD ↓", "{:.2f}"),
    ("sample_accuracy", "sample acc. ↑", "{:.3f}"),
    ("ed_raw", "ED raw", "{:.3f}"),
    ("ed_restd", "ED re-std.", "{:.3f}"),
    ("ed_restd_ae", "AE's ED re-std. (same ref.)", "{:.3f}"),
)


def _cell(metrics: dict, key: str, fmt: str) -> str:
    if key not in metrics:
        return "–"
    m = metrics[key]
    if len(m["values"]) > 1:
        return f"{fmt.format(m['mean'])} ± {fmt.format(m['sd'])}"
    return fmt.format(m["mean"])


def markdown_table(result: dict) -> str:
    """The paper-style table (rows = references), then the per-seed values and the settings."""
    seeds = result["seeds"]
    lines = [
        f"Table 1 in miniature: {result['data']['source']}, {result['data']['image_size']} px, "
        f"{result['data']['train_images']} train / {result['data']['held_out_images']} held-out images, "
        f"seeds {seeds} (mean ± sd).",
        "",
        "| reference | λ_DM | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in result["rows"]:
        cells = [_cell(row["metrics"], k, f) for k, _, f in COLUMNS]
        lines.append(f"| {row['name']} | {row['dm_weight']:g} | " + " | ".join(cells) + " |")
    clf = result["classifier"]
    lines += [
        "",
        f"gFD / rFD: Fréchet distance in the {clf['feature_layer']} of an independent CNN digit "
        f"classifier (held-out accuracy {clf['held_out_accuracy']:.3f}; train vs held-out real images: "
        f"FD {clf['fd_train_vs_held_out']:.2f}). ED: energy distance between held-out latents "
        "(stage-1 normalisation) and samples of the row's reference (the AE baseline: N(0, I)); "
        "re-std.: both sides re-standardised with their own mean / std.",
        "",
        "Per seed:",
        "",
        "| reference | metric | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for row in result["rows"]:
        for key, title, fmt in COLUMNS + (("recon_accuracy", "recon. acc.", "{:.3f}"),):
            if key in row["metrics"]:
                vals = " | ".join(fmt.format(v) for v in row["metrics"][key]["values"])
                lines.append(f"| {row['name']} | {title} | {vals} |")
    checks = result["sanity"]
    lines += ["", "Sanity checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()),
              "", f"Wall time {result['wall_seconds'] / 60:.1f} min, {result['threads']} threads.", ""]
    return "\n".join(lines)


def samples_grid(real: Tensor, samples: dict[str, Tensor], per_class: int, num_classes: int,
                 scale: int = 2) -> Tensor:
    """One grid row per model (real held-out images first), ``per_class`` images of every class,
    (R * K * per_class, 3, S*scale, S*scale) in [-1, 1], row-major."""
    tiles = [real]
    for images in samples.values():
        n = images.shape[0] // num_classes
        idx = torch.cat([torch.arange(c * n, c * n + min(per_class, n)) for c in range(num_classes)])
        tiles.append(images[idx])
    grid = torch.cat(tiles)
    return F.interpolate(grid, scale_factor=scale, mode="nearest") if scale != 1 else grid


def write_outputs(result: dict, out: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write the three files atomically into ``out``; refuse to replace them unless ``overwrite``."""
    from dmvae.files import atomic_write_bytes, atomic_write_text
    from dmvae.image import make_grid

    out = Path(out)
    paths = [out / name for name in OUTPUT_FILES]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the results in {out}")
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(paths[0], json.dumps(public, indent=1) + "\n")
    atomic_write_text(paths[1], markdown_table(result))
    samples = result["_samples"]
    k = result["data"]["num_classes"]
    per_class = result["_real"].shape[0] // k
    grid = make_grid(samples_grid(result["_real"], samples, per_class, k), nrow=k * per_class)
    names = ["real (held-out)"] + [r["name"] for r in result["rows"] if r["key"] in samples]
    buf = io.BytesIO()
    _label_rows(grid, names).save(buf, format="PNG")
    atomic_write_bytes(paths[2], buf.getvalue())
    return paths


def _label_rows(grid: np.ndarray, names: list[str], width: int = 110) -> Image.Image:
    """The grid with a white margin on the left naming each of its ``len(names)`` tile rows."""
    canvas = Image.new("RGB", (grid.shape[1] + width, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    step = grid.shape[0] / len(names)
    for i, name in enumerate(names):
        draw.text((4, int(i * step + step / 2) - 5), name, fill="black")
    return canvas
