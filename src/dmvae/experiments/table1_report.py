"""Writing the Table 1 results: ``table1.json``, ``table1.md``, ``samples.png``, ``curves.png``
(gFD against downstream DiT steps, the paper's Fig. 6 in miniature) and ``latents.png`` (t-SNE of
held-out latents per row, coloured by class, the paper's Fig. 4). The two plots need matplotlib."""

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

__all__ = ["OUTPUT_FILES", "curves_png", "latents_png", "markdown_table", "samples_grid", "summary_lines",
           "write_outputs"]

OUTPUT_FILES = ("table1.json", "table1.md", "samples.png", "curves.png", "latents.png")

# (metric key, column title, format); cells show mean ± sd over the seeds
COLUMNS = (
    ("psnr_s1", "PSNR s1", "{:.2f}"),
    ("psnr_s3", "PSNR s3", "{:.2f}"),
    ("psnr", "PSNR s4 ↑", "{:.2f}"),
    ("rfd_s1", "rFD s1", "{:.2f}"),
    ("rfd_s3", "rFD s3", "{:.2f}"),
    ("rfd", "rFD s4 ↓", "{:.2f}"),
    ("knn_acc", "k-NN ↑", "{:.3f}"),
    ("silhouette", "silh. ↑", "{:.3f}"),
    ("probe_acc", "probe", "{:.3f}"),
    ("gfd", "gFD ↓", "{:.2f}"),
    ("gfd_rec", "gFD vs rec. ↓", "{:.2f}"),
    ("sample_accuracy", "sample acc. ↑", "{:.3f}"),
    ("ed_s1", "ED s1", "{:.3f}"),
    ("ed", "ED s3", "{:.3f}"),
    ("latent_std", "std s3", "{:.3f}"),
)
HEALTH = (("dm_grad_rms_start", "DM update start"), ("dm_grad_rms_end", "DM update end"),
          ("dm_floor_rel_start", "floor/genuine start"), ("dm_floor_rel_end", "floor/genuine end"),
          ("fake_overfit_gap_end", "fake over-fit gap end"), ("latent_std_ratio_end", "std ratio end"),
          ("energy_distance_end", "ED (batch) end"), ("health_warnings_end", "warnings end"))


def _cell(metrics: dict, key: str, fmt: str) -> str:
    if key not in metrics:
        return "–"
    m = metrics[key]
    if len(m["values"]) > 1:
        return f"{fmt.format(m['mean'])} ± {fmt.format(m['sd'])}"
    return fmt.format(m["mean"])


def markdown_table(result: dict) -> str:
    """The table (rows = references), the gFD curves, the stage-3 health figures and the gates."""
    seeds, d = result["seeds"], result["data"]
    lines = [
        (f"Table 1 in miniature: {d['source']}, {d['image_size']} px, {d['train_images']} train / "
         f"{d['held_out_images']} held-out images, seeds {seeds} (mean ± sd)."),
        "",
        "| row | λ_DM | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in result["rows"]:
        cells = [_cell(row["metrics"], k, f) for k, _, f in COLUMNS]
        lines.append(f"| {row['name']} | {row['dm_weight']:g} | " + " | ".join(cells) + " |")
    budgets = [p["steps"] for p in result["rows"][0].get("gfd_curve", [])]
    lines += ["", "gFD after n downstream DiT steps (mean ± sd):", "",
              "| row | " + " | ".join(f"{n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(_cell(row["metrics"], f"gfd_{n}", "{:.2f}") for n in budgets)
                     + " |")
    lines += ["", "Stage-3 health (dmvae.dm_health.DMHealth on fixed batches; floor only where q = p_r at the start):",
              "",
              "| row | " + " | ".join(t for _, t in HEALTH) + " |", "|---|" + "---|" * len(HEALTH)]
    for row in result["rows"]:
        if "dm_grad_rms_start" in row["metrics"]:
            lines.append(f"| {row['name']} | " + " | ".join(_cell(row["metrics"], k, "{:.3f}") for k, _ in HEALTH)
                         + " |")
    clf = result["classifier"]
    lines += [
        "",
        (f"rFD / gFD: Fréchet distance in the {clf['feature_layer']} of an independent CNN classifier "
         f"(held-out accuracy {clf['held_out_accuracy']:.3f}; train vs held-out real images: FD "
         f"{clf['fd_train_vs_held_out']:.2f}); gFD vs rec.: against the same decoder's reconstructions of the "
         "held-out images. s1 / s3 / s4: after stages 1, 3, 4. ED: energy distance between held-out latents "
         "(stage-1 normalisation) and samples of the row's reference (λ 0 rows: their family's reference)."),
        "",
        "Gates (computed, not forced):",
        "",
    ]
    for name, det in result.get("gate_details", {}).items():
        vals = ", ".join(f"{k} {v:.4g}" for k, v in det["values"].items())
        lines.append(f"- **{name}**: {'PASS' if det['passed'] else 'FAIL'} ({vals})")
    lines += ["", f"Wall time {result['wall_seconds'] / 60:.1f} min, {result['threads']} threads.", ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """A short human summary for the terminal."""
    out = [f"{r['name']:>18}: gFD {r['metrics']['gfd']['mean']:7.2f}  rFD {r['metrics']['rfd']['mean']:6.2f}  "
           f"k-NN {r['metrics']['knn_acc']['mean']:.3f}" for r in result["rows"]]
    gates = result.get("gates", {})
    out.append(f"gates passed: {sum(gates.values())}/{len(gates)}"
               + (f" (failed: {', '.join(k for k, v in gates.items() if not v)})" if not all(gates.values()) else ""))
    return out


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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('curves.png and latents.png need matplotlib: pip install "dmvae[experiments]"') from e
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def curves_png(result: dict) -> bytes:
    """gFD (left) and gFD against reconstructions (right) vs downstream DiT steps, log-log, one line
    per row, a band of ± one sd over the seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "gfd_curve", "gFD vs held-out images"),
                           (axes[1], "gfd_rec_curve", "gFD vs the decoder's reconstructions")):
        for row in result["rows"]:
            pts = row.get(key, [])
            if not pts:
                continue
            x = np.array([p["steps"] for p in pts], dtype=float)
            y = np.array([max(p["mean"], 1e-6) for p in pts])
            sd = np.array([p["sd"] for p in pts])
            label = row["name"] if "λ" in row["name"] else f"{row['name']} (λ {row['dm_weight']:g})"
            (line,) = ax.plot(x, y, marker="o", label=label)
            ax.fill_between(x, np.maximum(y - sd, 1e-6), y + sd, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("downstream LatentDiT steps")
        ax.set_ylabel("gFD (lower is better)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['data']['source']}: seeds {result['seeds']} (mean ± sd)", fontsize=9)
    return _png(fig)


def latents_png(latents: dict[str, Tensor], labels: Tensor, names: dict[str, str], class_names: list[str],
                seed: int = 0) -> bytes:
    """A t-SNE of each row's held-out latents (flattened), coloured by class."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    n = len(latents)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    y = labels.numpy()
    for ax, (key, z) in zip(axes.flat, latents.items(), strict=False):
        x = z.flatten(1).double().numpy()
        emb = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
        ax.scatter(emb[:, 0], emb[:, 1], c=y, cmap="tab10", s=3, vmin=0, vmax=9)
        ax.set_title(names.get(key, key), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=plt.get_cmap("tab10")(i), label=c)
               for i, c in enumerate(class_names[:10])]
    fig.legend(handles=handles, loc="lower center", ncol=min(10, len(handles)), fontsize=7)
    fig.suptitle("t-SNE of held-out latents after stage 3, coloured by class (first seed)", fontsize=9)
    return _png(fig)


def write_outputs(result: dict, out: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write the five files atomically into ``out``; refuse to replace them unless ``overwrite``."""
    from dmvae.files import atomic_write_bytes, atomic_write_text
    from dmvae.image import make_grid, save_image

    out = Path(out)
    paths = {name: out / name for name in OUTPUT_FILES}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the results in {out}")
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(paths["table1.json"], json.dumps(public, indent=1) + "\n")
    atomic_write_text(paths["table1.md"], markdown_table(result))
    samples = result["_samples"]
    k = result["data"]["num_classes"]
    per_class = result["_real"].shape[0] // k
    grid = make_grid(samples_grid(result["_real"], samples, per_class, k), nrow=k * per_class)
    names = ["real (held-out)"] + [r["name"] for r in result["rows"] if r["key"] in samples]
    save_image(_label_rows(grid, names), paths["samples.png"])
    atomic_write_bytes(paths["curves.png"], curves_png(result))
    row_names = {r["key"]: r["name"] for r in result["rows"]}
    atomic_write_bytes(paths["latents.png"], latents_png(result["_latents"], result["_latent_labels"], row_names,
                                                         result["data"]["classes"]))
    return list(paths.values())


def _label_rows(grid: np.ndarray, names: list[str], width: int = 130) -> Image.Image:
    """The grid with a white margin on the left naming each of its ``len(names)`` tile rows."""
    canvas = Image.new("RGB", (grid.shape[1] + width, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    step = grid.shape[0] / len(names)
    for i, name in enumerate(names):
        # PIL's built-in bitmap font has no Greek letters
        draw.text((4, int(i * step + step / 2) - 5), name.replace("λ", "lambda"), fill="black")
    return canvas
