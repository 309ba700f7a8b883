"""The Table 1 experiment (``benchmarks/table1.py``, ``dmvae.experiments``): data, split, metrics
helpers, output files, and one ``--quick`` run end to end (shapes, finite numbers, files, JSON keys;
not the ranking, which is a finding of the full run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from dmvae.experiments.data import holdout_split, load_image_set  # noqa: E402
from dmvae.experiments.table1 import ROW_KEYS, latent_distances, sanity_checks  # noqa: E402
from dmvae.experiments.table1_report import OUTPUT_FILES, markdown_table, write_outputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---- data ----------------------------------------------------------------------------------------


def test_digits_are_upscaled_real_images_in_range() -> None:
    d = load_image_set(None, 16)
    assert d.images.shape == (1797, 3, 16, 16) and d.images.dtype == torch.float32
    assert d.labels.shape == (1797,) and d.num_classes == 10
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.images[:, 0].eq(d.images[:, 1]).all()  # greyscale replicated
    # upscaling keeps the 8x8 content: average-pooling back by 2 is close to the 8x8 original
    from sklearn.datasets import load_digits

    orig = torch.from_numpy(load_digits().images[:50] / 16.0).float() * 2 - 1
    down = torch.nn.functional.avg_pool2d(d.images[:50, :1], 2)[:, 0]
    assert (down - orig).abs().mean() < 0.15


def test_holdout_split_is_stratified_fixed_and_disjoint() -> None:
    labels = load_image_set(None, 8).labels
    tr, he = holdout_split(labels, 0.2, seed=0)
    tr2, he2 = holdout_split(labels, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(he, he2)
    assert len(set(tr.tolist()) & set(he.tolist())) == 0 and len(tr) + len(he) == len(labels)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((labels[he] == c).sum()) == round(0.2 * n_c)
    _, he3 = holdout_split(labels, 0.2, seed=1)
    assert not torch.equal(he, he3)
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(labels, 1.0)


def _write_folder(root: Path, classes: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            mode = "L" if i % 2 else "RGB"  # mixed modes are decoded to RGB
            arr = rng.integers(0, 256, (size, size + 4) if mode == "L" else (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"{i}.png")


def test_class_folder_image_set(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"cat": 3, "dog": 4})
    d = load_image_set(tmp_path / "set", 8)
    assert d.images.shape == (7, 3, 8, 8) and d.class_names == ["cat", "dog"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert d.images.min() >= -1 and d.images.max() <= 1


def test_class_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_set(tmp_path / "missing", 8)
    _write_folder(tmp_path / "one", {"only": 2})
    with pytest.raises(ValueError, match="single class"):
        load_image_set(tmp_path / "one", 8)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(ValueError, match="sub-folder per class"):
        load_image_set(flat, 8)


# ---- metric helpers -------------------------------------------------------------------------------


def test_restandardised_energy_distance_ignores_scale_but_not_shape() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 8, generator=g)
    gauss = torch.randn(400, 8, generator=g)
    raw1, std1 = latent_distances(gauss * 3 + 1, ref)
    raw2, std2 = latent_distances(gauss, ref)
    assert raw1 > 10 * raw2  # the raw distance sees the scale / shift
    assert std1 == pytest.approx(std2, rel=1e-6)  # the re-standardised one does not
    two_blobs = torch.randn(400, 8, generator=g) * 0.2 + torch.where(torch.arange(400) < 200, -1.0, 1.0)[:, None]
    assert latent_distances(two_blobs, ref)[1] > 5 * std2  # a different shape stays far


def _fake_result(n_seeds: int = 2) -> dict:
    def metric(v: float) -> dict:
        vals = [v + 0.1 * i for i in range(n_seeds)]
        mean = sum(vals) / n_seeds
        return {"mean": mean, "sd": 0.1, "values": vals}

    rows = [
        {"key": "ae", "name": "AE baseline", "dm_weight": 0.0,
         "metrics": {"psnr": metric(25.0), "sample_accuracy": metric(0.85), "ed_restd": metric(0.5)}},
        {"key": "gaussian", "name": "Gaussian", "dm_weight": 1.0,
         "metrics": {"psnr": metric(24.0), "sample_accuracy": metric(0.8), "ed_restd": metric(0.2),
                     "ed_restd_ae": metric(0.5)}},
        {"key": "ssl", "name": "SSL", "dm_weight": 10.0,
         "metrics": {"psnr": metric(23.0), "sample_accuracy": metric(0.9), "ed_restd": metric(0.7),
                     "ed_restd_ae": metric(0.6)}},
    ]
    return {
        "seeds": list(range(n_seeds)), "rows": rows, "sanity": sanity_checks(rows), "wall_seconds": 60.0,
        "threads": 1, "data": {"source": "test", "image_size": 16, "train_images": 8, "held_out_images": 4,
                               "num_classes": 2},
        "classifier": {"feature_layer": "penultimate", "held_out_accuracy": 1.0, "fd_train_vs_held_out": 0.5},
        "_samples": {"ae": torch.zeros(4, 3, 16, 16), "gaussian": torch.ones(4, 3, 16, 16)},
        "_real": torch.zeros(2, 3, 16, 16),
    }


def test_sanity_checks_follow_the_numbers() -> None:
    checks = _fake_result()["sanity"]
    assert checks["ae_psnr_ge_24db"] and checks["ae_sample_accuracy_ge_0.8"]
    assert checks["gaussian_ed_restd_below_ae"]
    assert not checks["ssl_ed_restd_below_ae"]  # 0.75 vs 0.65: the check fails
    assert checks["all"] is False


def test_outputs_are_written_and_not_overwritten(tmp_path: Path) -> None:
    result = _fake_result()
    md = markdown_table(result)
    assert "| AE baseline | 0 | 25.05 ± 0.10 |" in md and "| SSL | 10 |" in md
    write_outputs(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)
    assert "_samples" not in json.loads((tmp_path / "table1.json").read_text())
    # real row + 2 model rows, 2 images per row (1 per class), 16 px shown at x2 with 2-px borders,
    # a 110-px margin naming the rows
    png = Image.open(tmp_path / "samples.png")
    assert png.size == (110 + 2 * 34 + 2, 3 * 34 + 2)
    assert np.asarray(png)[:, :110].min() < 128  # the names are drawn
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_outputs(result, tmp_path)
    write_outputs(result, tmp_path, overwrite=True)


# ---- the whole pipeline ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "t1"
    cmd = [sys.executable, str(REPO / "benchmarks" / "table1.py"), "--quick", "--out", str(out),
           "--threads", "1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    saved = json.loads((out / "table1.json").read_text())
    assert printed == saved
    assert [r["key"] for r in saved["rows"]] == list(ROW_KEYS)
    assert {r["dm_weight"] for r in saved["rows"] if r["key"] in ("ssl", "sup")} == {10.0}
    assert {r["dm_weight"] for r in saved["rows"] if r["key"] in ("gaussian", "gmm", "subssl")} == {1.0}
    assert saved["seeds"] == [0] and saved["quick"] is True
    for key in ("stage1_steps", "stage1_lr", "stage3_lr", "dit_steps", "dit_lr", "sampler", "cfg_scale"):
        assert key in saved["settings"]
    assert saved["data"]["train_images"] + saved["data"]["held_out_images"] == 1797
    for row in saved["rows"]:
        m = row["metrics"]
        for key in ("psnr", "rfd", "gfd", "sample_accuracy", "ed_raw", "ed_restd", "recon_accuracy"):
            assert math.isfinite(m[key]["mean"]) and len(m[key]["values"]) == 1, (row["key"], key)
        assert 0.0 <= m["sample_accuracy"]["mean"] <= 1.0
        assert m["ed_raw"]["mean"] >= 0 and m["rfd"]["mean"] >= -1e-6
        if row["key"] != "ae":
            assert math.isfinite(m["ed_restd_ae"]["mean"])
    assert set(saved["sanity"]) >= {"ae_psnr_ge_24db", "ae_sample_accuracy_ge_0.8", "all"}
    # samples.png: real + 6 rows, 10 classes x 2 images of 16 px shown at x2
    assert Image.open(out / "samples.png").size == (110 + 20 * 34 + 2, 7 * 34 + 2)
    assert "| SubSSL | 1 |" in (out / "table1.md").read_text()
    # a second run into the same folder refuses to overwrite
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_merge_runs_over_disjoint_seeds(tmp_path: Path) -> None:
    from dmvae.experiments.table1 import merge_results

    a, b = _fake_result(1), _fake_result(2)
    b["seeds"] = [1, 2]
    for row in b["rows"]:
        for m in row["metrics"].values():
            m["values"] = [v + 1.0 for v in m["values"]]
    for r in (a, b):
        r.update(settings={"x": 1}, classifier={"c": 1})
    merged = merge_results([b, a])  # order of the runs does not matter: values follow the seeds
    psnr = merged["rows"][0]["metrics"]["psnr"]
    assert merged["seeds"] == [0, 1, 2] and psnr["values"] == [25.0, 26.0, 26.1]
    assert psnr["mean"] == pytest.approx(77.1 / 3) and psnr["sd"] == pytest.approx(float(np.std([25, 26, 26.1], ddof=1)))
    assert merged["wall_seconds"] == 60.0 and merged["wall_seconds_total"] == 120.0
    with pytest.raises(ValueError, match="share seeds"):
        merge_results([a, a])
    c = _fake_result(1)
    c.update(settings={"x": 2}, classifier={"c": 1}, seeds=[5])
    with pytest.raises(ValueError, match="settings"):
        merge_results([a, c])
