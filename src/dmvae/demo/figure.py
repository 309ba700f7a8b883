"""Pictures of the 2-D study: the four-panel ``demo.png`` and the Fig.-3-style ``compare.png``.

matplotlib's object-oriented API draws them when it is installed (no ``pyplot``, so no GUI backend
is chosen or needed); otherwise PIL draws a plainer version with the same panels, labels and
numbers. Files are written atomically (a crash leaves the old picture or the new one).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dmvae.demo.objectives import FINDINGS
from dmvae.files import atomic_write_bytes
from dmvae.image import save_image

if TYPE_CHECKING:  # pragma: no cover
    from dmvae.demo.toy2d import Toy2DRun

__all__ = ["save_compare_figure", "save_figure"]

_LIM = 1.6  # the panels show [-1.6, 1.6]^2 (the points start on [-1.5, 1.5]^2)
_GREY, _BLUE, _RED = "#9a9a9a", "#1f77b4", "#d62728"
FIELD_NOTE = "blue: the points when the field was taken; red arrows: -g, the DM descent direction"


def _figure(ncols: int, nrows: int = 1, size: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(size * ncols, size * nrows + 0.9))


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _stats(energy: float | None, coverage: float | None, floor: float | None) -> str:
    parts = []
    if energy is not None:
        parts.append(f"energy {energy:.4f}" + (f" ({energy / floor:.1f}x floor)" if floor else ""))
    if coverage is not None:
        parts.append(f"coverage {coverage:.2f}")
    return ", ".join(parts)


def save_figure(
    path: str | Path,
    reference: torch.Tensor,
    start: torch.Tensor,
    result: torch.Tensor,
    field_points: torch.Tensor | None = None,
    fld: tuple[torch.Tensor, torch.Tensor] | None = None,
    title: str = "",
    *,
    run: Toy2DRun | None = None,
    floor: float | None = None,
    field_t: float = 0.7,
) -> Path:
    """``demo.png``: (1) the reference, (2) the start, (3) the result, (4) the update field.

    Panel 4 shows the reference in grey, in blue the points at the moment the field was taken
    (after 10 % of the alignment steps), and red arrows ``-g``: the mean descent direction the DM
    loss gives a point at that place, at time ``field_t`` (g = numel * dL/dz, averaged over noise
    draws). With ``run`` (and ``floor``) the panels carry the energy distance and coverage.
    """
    e0 = c0 = e1 = c1 = None
    if run is not None:
        e0, c0, e1, c1 = run.energy_before, run.coverage_before, run.energy_after, run.coverage_after
    names = [
        "reference p_r (S-shape samples)",
        "start\n" + _stats(e0, c0, floor),
        f"result ({run.objective if run else 'dm'})\n" + _stats(e1, c1, floor),
        f"DM update field at t = {field_t}, after 10 % of the steps\n"
        "red arrows: -g, where the loss moves a point there",
    ]
    fig = _figure(4)
    if fig is None:
        return _save_pil(Path(path), reference, [start, result], names, field_points, fld, title)
    axes = fig.subplots(1, 4)
    axes[0].scatter(reference[:, 0], reference[:, 1], s=2, c=_GREY, label="reference samples")
    axes[1].scatter(start[:, 0], start[:, 1], s=2, c=_BLUE, label="points (start)")
    axes[2].scatter(reference[:, 0], reference[:, 1], s=1, c=_GREY, alpha=0.4)
    axes[2].scatter(result[:, 0], result[:, 1], s=2, c=_RED, label="points (result)")
    ax = axes[3]
    ax.scatter(reference[:, 0], reference[:, 1], s=1, c=_GREY, alpha=0.5)
    if field_points is not None:
        ax.scatter(field_points[:, 0], field_points[:, 1], s=1, c=_BLUE, label="points at 10 % of the steps")
    if fld is not None:
        grid, vec = fld
        ax.quiver(grid[:, 0], grid[:, 1], vec[:, 0], vec[:, 1], color=_RED, label="-g (descent direction)")
    for ax, name in zip(axes, names):
        _square_panel(ax, name, fontsize=10)
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    return _finish(fig, path, handles, labels, title, bottom=0.06)


def _finish(fig: Any, path: str | Path, handles: list, labels: list, title: str, bottom: float) -> Path:
    """One legend row under the panels, the title, and the PNG written atomically."""
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, markerscale=4, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return atomic_write_bytes(path, _png_bytes(fig))


def _square_panel(ax: Any, title: str, fontsize: int) -> None:
    """Title a panel and show [-_LIM, _LIM]^2 at equal aspect (every panel of both figures)."""
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlim(-_LIM, _LIM)
    ax.set_ylim(-_LIM, _LIM)
    ax.set_aspect("equal")


def save_compare_figure(
    path: str | Path, reference: torch.Tensor, runs: Mapping[str, Toy2DRun], floor: float | None = None,
    title: str = "",
) -> Path:
    """``compare.png`` (paper Fig. 3 style): one panel per objective, its final points (red) over
    the reference (grey), titled with the energy distance (x the two-sample floor), the coverage
    and the paper's finding for that objective."""
    names = [
        f"{name}\n{_stats(r.energy_after, r.coverage_after, floor)}\npaper: {FINDINGS.get(name, '')}"
        for name, r in runs.items()
    ]
    n = len(runs)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig = _figure(ncols, nrows, size=4.2)
    if fig is None:
        return _save_pil(Path(path), reference, [r.points for r in runs.values()], names, None, None, title)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, name, r in zip(axes, names, runs.values()):
        ax.scatter(reference[:, 0], reference[:, 1], s=1, c=_GREY, alpha=0.5, label="reference samples")
        ax.scatter(r.points[:, 0], r.points[:, 1], s=2, c=_RED, label="aligned points")
        _square_panel(ax, name, fontsize=9)
    for ax in axes[n:]:
        ax.set_axis_off()
    return _finish(fig, path, *axes[0].get_legend_handles_labels(), title, bottom=0.04)


def _save_pil(path: Path, reference: torch.Tensor, point_sets: list[torch.Tensor], names: list[str],
              field_points: torch.Tensor | None, fld: tuple[torch.Tensor, torch.Tensor] | None,
              title: str) -> Path:
    """The same panels drawn with PIL: panel k < len(point_sets) shows point set k over the
    reference; a further panel (when ``fld`` or ``field_points`` is given) shows the field."""
    from PIL import Image, ImageDraw

    size, pad, top = 320, 10, 64
    n = len(names)
    img = Image.new("RGB", (n * size + (n + 1) * pad, size + top + 30), "white")
    draw = ImageDraw.Draw(img)
    grey, blue, red = (170, 170, 170), (31, 119, 180), (214, 39, 40)

    def to_px(p, k):  # data [-_LIM, _LIM] -> panel k pixels, y up
        x0 = pad + k * (size + pad)
        return (p[..., 0] + _LIM) / (2 * _LIM) * size + x0, (_LIM - p[..., 1]) / (2 * _LIM) * size + top

    def scatter(pts, k, color, r=1):
        u, v = to_px(pts.numpy(), k)
        for a, b in zip(u, v):
            draw.ellipse([a - r, b - r, a + r, b + r], fill=color)

    for k, name in enumerate(names):
        x0 = pad + k * (size + pad)
        draw.rectangle([x0, top, x0 + size, top + size], outline="black")
        draw.multiline_text((x0 + 4, 22), name, fill="black")
        scatter(reference, k, grey)
    if title:
        draw.text((pad, 4), title, fill="black")
    for k, pts in enumerate(point_sets, start=1 if len(point_sets) < n else 0):
        scatter(pts, k, blue if k == 1 and len(point_sets) < n else red)
    legend = "grey: reference samples; blue: points (start); red: points (result)"
    if len(point_sets) < n:  # the field panel
        k = n - 1
        if field_points is not None:
            scatter(field_points, k, blue)
        if fld is not None:
            grid, vec = fld
            mag = vec.norm(dim=1, keepdim=True)
            # direction at full length x sqrt(relative magnitude): weak arrows stay visible
            tip = grid + vec / mag.clamp_min(1e-12) * 0.18 * (mag / mag.max().clamp_min(1e-12)).sqrt()
            u0, v0 = to_px(grid.numpy(), k)
            u1, v1 = to_px(tip.numpy(), k)
            for a, b, c, d in zip(u0, v0, u1, v1):
                draw.line([a, b, c, d], fill=red, width=1)
                draw.ellipse([c - 2, d - 2, c + 2, d + 2], fill=red)
        legend += "; panel 4: " + FIELD_NOTE
    draw.text((pad, top + size + 8), legend, fill="black")
    return save_image(img, path)
