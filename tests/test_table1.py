"""The Table 1 experiment (``benchmarks/table1.py``, ``dmvae.experiments``): data (IDX reader,
Fashion-MNIST layouts, digits, class folders, splits), settings, gates, the RNG contract, output
files, and one micro-budget run end to end (shapes, finite numbers, files, JSON keys; not the
ranking, which is a finding of the full run)."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from dmvae.experiments import data as data_mod
from dmvae.experiments.data import (
    find_fashion_mnist,
    holdout_split,
    load_data,
    load_image_set,
    per_class_subset,
    read_idx,
)
from dmvae.experiments.measures import (
    class_structure,
    compute_gates,
    knn_accuracy,
    summarise,
)
from dmvae.experiments.settings import QUICK, ROW_KEYS, ROWS, Table1Settings
from dmvae.experiments.table1 import merge_results
from dmvae.experiments.table1_report import OUTPUT_FILES, markdown_table, write_outputs

REPO = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---- IDX files and Fashion-MNIST -----------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_fashion(folder: Path, n_train: int = 40, n_test: int = 30, gz: bool = True, side: int = 28) -> dict:
    """A tiny fake Fashion-MNIST: class c images are filled with 20 c + noise (so classes differ)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = (labels[:, None, None] * 20 + rng.integers(0, 30, (n, side, side))).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = f"{part}-{kind}"
            raw = _idx_bytes(arr)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
        out[part] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.gz" if gz else "x")
    raw = _idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(read_idx(path), arr)
    big = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "y").write_bytes(_idx_bytes(big))
    np.testing.assert_array_equal(read_idx(tmp_path / "y"), [1, -2, 70000])


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    (tmp_path / "short").write_bytes(_idx_bytes(arr)[:-5])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_layouts_flat_and_torchvision(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "flat", gz=True)
    _write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    assert find_fashion_mnist(tmp_path / "flat")["train_images"].name == "train-images-idx3-ubyte.gz"
    assert find_fashion_mnist(tmp_path / "tv")["test_labels"].name == "t10k-labels-idx1-ubyte"
    assert find_fashion_mnist(tmp_path) is None
    for root in ("flat", "tv"):
        b = load_data(f"fashion-mnist:{tmp_path / root}", image_size=16, train_per_class=3, held_per_class=2,
                      holdout_fraction=0.2, split_seed=0)
        assert b.train.images.shape == (30, 3, 16, 16) and b.held.images.shape == (20, 3, 16, 16)
        assert len(b.pretrain) == 40 and b.train.num_classes == 10 and b.train.class_names[0] == "T-shirt/top"
        assert torch.equal(b.train.labels.bincount(), torch.full((10,), 3))
        assert b.train.images.min() >= -1 and b.train.images.max() <= 1
        # class c was drawn brighter than class c - 1: the labels travel with their images
        means = torch.stack([b.held.images[b.held.labels == c].mean() for c in range(10)])
        assert (means.diff() > 0).all()


def test_fashion_errors_name_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_data(f"fashion-mnist:{tmp_path}", image_size=16, train_per_class=3, held_per_class=2,
                  holdout_fraction=0.2, split_seed=0)
    # no ROOT, nothing installed, no network: fails at once, naming where it looked
    monkeypatch.setattr(data_mod, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setattr(data_mod, "DEFAULT_ROOT", tmp_path / "cache")
    monkeypatch.setattr(data_mod, "_network_available", lambda *a, **k: False)
    with pytest.raises(FileNotFoundError, match="cache"):
        load_data("fashion-mnist", image_size=16, train_per_class=3, held_per_class=2, holdout_fraction=0.2,
                  split_seed=0)


def test_installed_fashion_mnist_labels() -> None:
    """The Debian package's files (CI installs dataset-fashion-mnist): 60,000 / 10,000 labels."""
    if not FASHION_ROOT.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{FASHION_ROOT} missing: CI must install the Debian package dataset-fashion-mnist")
        pytest.skip(f"{FASHION_ROOT} missing (apt-get install dataset-fashion-mnist)")
    files = find_fashion_mnist(FASHION_ROOT)
    assert files is not None
    for key, n in (("train_labels", 60000), ("test_labels", 10000)):
        labels = read_idx(files[key])
        assert labels.shape == (n,) and np.bincount(labels).tolist() == [n // 10] * 10


def test_per_class_subset_is_fixed_and_balanced() -> None:
    labels = torch.arange(100) % 4
    a, b = per_class_subset(labels, 5, 0), per_class_subset(labels, 5, 0)
    assert torch.equal(a, b) and torch.equal(labels[a].bincount(), torch.full((4,), 5))
    assert not torch.equal(a, per_class_subset(labels, 5, 1))


# ---- digits and class folders ------------------------------------------------------------------------


def test_digits_bundle_and_holdout_split() -> None:
    b = load_data("digits", image_size=16, train_per_class=1000, held_per_class=200, holdout_fraction=0.2,
                  split_seed=0)
    assert len(b.train) + len(b.held) == 1797 and b.pretrain is b.train
    labels = load_image_set(None, 8).labels
    tr, he = holdout_split(labels, 0.2, seed=0)
    assert len(set(tr.tolist()) & set(he.tolist())) == 0 and len(tr) + len(he) == len(labels)
    for c in range(10):
        assert int((labels[he] == c).sum()) == round(0.2 * int((labels == c).sum()))
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
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_set(tmp_path / "missing", 8)
    _write_folder(tmp_path / "one", {"only": 2})
    with pytest.raises(ValueError, match="single class"):
        load_image_set(tmp_path / "one", 8)


# ---- settings ----------------------------------------------------------------------------------------


def test_settings_overrides_parse_each_type() -> None:
    s = Table1Settings().with_overrides(["stage1_steps=7", "dm_cfg=2.5", "dit_budgets=5,10,20", "sampler=euler",
                                         "lambda_ssl=4"])
    assert s.stage1_steps == 7 and s.dm_cfg == 2.5 and s.dit_budgets == (5, 10, 20) and s.sampler == "euler"
    assert s.dm_weight("ssl") == 4.0 and s.dm_weight("sup") == 10.0 and s.dm_weight(None) == 0.0
    assert Table1Settings().stage1_steps != 7  # a copy: the defaults are untouched
    with pytest.raises(ValueError, match="NAME one of"):
        Table1Settings().with_overrides(["nope=1"])
    with pytest.raises(ValueError, match="cannot read 'x' as int"):
        Table1Settings().with_overrides(["stage1_steps=x"])
    with pytest.raises(ValueError, match="dit_budgets"):
        Table1Settings().with_overrides(["dit_budgets=20,10"])
    with pytest.raises(ValueError, match="teacher_schedule"):
        Table1Settings().with_overrides(["teacher_schedule=linear"])
    assert Table1Settings(**QUICK).to_dict()["dit_budgets"] == list(QUICK["dit_budgets"])


def test_rows_follow_the_paper_weights() -> None:
    s = Table1Settings()
    weights = {r.key: s.dm_weight(r.reference) for r in ROWS}
    assert weights == {"ae": 0, "gaussian": 1, "gmm": 1, "ssl0": 0, "ssl": 10, "sup": 10, "subssl": 1}
    assert {r.key for r in ROWS if r.conditional} == {"ssl", "sup"}
    assert {r.key: r.measured_against for r in ROWS if r.reference is None} == {"ae": "gaussian", "ssl0": "ssl"}


# ---- metrics and gates ---------------------------------------------------------------------------------


def test_knn_and_silhouette_see_class_structure() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = torch.randn(4, 8, generator=g) * 4
    clustered = centres[y] + torch.randn(400, 8, generator=g)
    noise = torch.randn(400, 8, generator=g)
    assert knn_accuracy(clustered[:300], y[:300], clustered[300:], y[300:], 5) > 0.95
    assert knn_accuracy(noise[:300], y[:300], noise[300:], y[300:], 5) < 0.5
    a = class_structure(clustered[:300], y[:300], clustered[300:], y[300:], 5)
    b = class_structure(noise[:300], y[:300], noise[300:], y[300:], 5)
    assert a["silhouette"] > 0.3 > b["silhouette"] and a["probe_acc"] > b["probe_acc"]


def _row(key: str, reference: str, **metrics: float | list[float]) -> dict:
    return {"key": key, "name": key, "reference": reference, "dm_weight": 1.0,
            "metrics": {k: summarise(v if isinstance(v, list) else [v]) for k, v in metrics.items()}}


def _gate_rows(**changes: dict) -> list[dict]:
    base = {
        "ae": ("none", {"knn_acc_s1": 0.80, "silhouette_s1": 0.05, "rfd": [10.0, 12.0, 14.0]}),
        "ssl0": ("none", {"knn_acc_s1": 0.85, "silhouette_s1": 0.08, "rfd": 12.5, "ed": 0.30}),
        "ssl": ("ssl", {"knn_acc_s1": 0.85, "silhouette_s1": 0.08, "rfd": 13.0, "ed": 0.25, "ed_s1": 0.28, "latent_std": 0.97,
                            "dm_floor_rel_start": 0.0, "dm_floor_rel_end": 0.1, "genuine_mismatch_rms": 1.0}),
        "sup": ("sup", {"knn_acc_s1": 0.90, "silhouette_s1": 0.12, "rfd": 11.0, "ed": 0.2, "ed_s1": 0.2, "latent_std": 1.05,
                            "dm_floor_rel_start": 0.0, "dm_floor_rel_end": 0.15, "genuine_mismatch_rms": 1.0}),
    }
    for key, extra in changes.items():
        base[key][1].update(extra)
    return [_row(k, ref, **m) for k, (ref, m) in base.items()]


def test_gates_pass_on_healthy_numbers() -> None:
    gates, details = compute_gates(_gate_rows())
    assert gates and all(gates.values()), {k: v for k, v in details.items() if not v["passed"]}
    assert set(gates) >= {"ssl_reference_more_clustered_than_ae", "sup_reference_more_clustered_than_ae",
                          "ssl_floor_below_20pct", "sup_floor_below_20pct", "ssl_ed_not_worse_than_stage1",
                          "ssl_ed_not_worse_than_control", "sup_latent_std_within_10pct", "stage4_rfd_within_ae_sd"}
    assert details["stage4_rfd_within_ae_sd"]["values"]["sd_ae"] == pytest.approx(2.0)


@pytest.mark.parametrize("changes, failing", [
    ({"ssl0": {"silhouette_s1": 0.04}}, "ssl_reference_more_clustered_than_ae"),
    ({"sup": {"dm_floor_rel_end": 0.4}}, "sup_floor_below_20pct"),
    ({"ssl": {"ed": 0.29}}, "ssl_ed_not_worse_than_stage1"),
    ({"ssl": {"ed": 0.27, "ed_s1": 0.3}, "ssl0": {"ed": 0.26}}, "ssl_ed_not_worse_than_control"),
    ({"ssl": {"latent_std": 0.86}}, "ssl_latent_std_within_10pct"),
    ({"sup": {"rfd": 15.0}}, "stage4_rfd_within_ae_sd"),
])
def test_each_gate_fails_on_its_own_numbers(changes: dict, failing: str) -> None:
    gates, _ = compute_gates(_gate_rows(**changes))
    assert [k for k, v in gates.items() if not v] == [failing]


# ---- RNG contract --------------------------------------------------------------------------------------


def test_stages_leave_the_callers_rng_alone_and_are_reproducible() -> None:
    from dmvae import DMVAE
    from dmvae.experiments.nets import pretrain_ssl_encoder, train_classifier
    from dmvae.experiments.stages import (
        autoencoder_config,
        fit_teacher,
        train_autoencoder,
        train_downstream,
    )

    s = Table1Settings(**QUICK).with_overrides(["teacher_steps=2", "dit_budgets=1,2", "dit_batch=8"])
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    y = torch.arange(16) % 2
    z = torch.randn(16, s.z_channels, 4, 4)

    vae0 = DMVAE(autoencoder_config(s))

    def run() -> list[torch.Tensor]:
        clf = train_classifier(x, y, 2, steps=2, batch_size=8, seed=1)
        enc = pretrain_ssl_encoder(copy.deepcopy(vae0).encoder, x, steps=1, batch_size=8, seed=2)
        teacher = fit_teacher(s, z, y, 2, seed=3)
        seen = []
        train_downstream(s, z, y, 2, 4, lambda step, m: seen.append(next(m.parameters()).clone()))
        vae = train_autoencoder(copy.deepcopy(vae0), x, steps=1, lr=1e-3, batch_size=8, seed=5)
        return [next(clf.parameters()), next(enc.parameters()), next(teacher.parameters()), *seen,
                next(vae.decoder.parameters())]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different caller state: the same models
    second = run()
    assert len(first) == 6 and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state)


# ---- outputs -------------------------------------------------------------------------------------------


def _fake_result(n_seeds: int = 2) -> dict:
    def metric(v: float) -> dict:
        return summarise([v + 0.1 * i for i in range(n_seeds)])

    rows = []
    for key, name in (("ae", "AE (λ 0)"), ("ssl", "SSL")):
        m = {k: metric(v) for k, v in {"psnr": 25.0, "rfd": 10.0, "knn_acc": 0.8, "gfd": 30.0, "gfd_rec": 20.0,
                                            "sample_accuracy": 0.7, "gfd_5": 40.0, "gfd_10": 30.0, "gfd_rec_5": 30.0,
                                            "gfd_rec_10": 20.0}.items()}
        rows.append({"key": key, "name": name, "reference": "none", "dm_weight": 0.0, "metrics": m,
                     "gfd_curve": [{"steps": n, "mean": m[f"gfd_{n}"]["mean"], "sd": m[f"gfd_{n}"]["sd"]}
                                   for n in (5, 10)],
                     "gfd_rec_curve": [{"steps": n, "mean": m[f"gfd_rec_{n}"]["mean"], "sd": 0.1} for n in (5, 10)]})
    gates, details = compute_gates(rows)
    return {
        "seeds": list(range(n_seeds)), "rows": rows, "gates": gates, "gate_details": details, "wall_seconds": 60.0,
        "threads": 1, "settings": {"dit_budgets": [5, 10]},
        "data": {"source": "test", "image_size": 16, "train_images": 8, "held_out_images": 4, "num_classes": 2,
                 "classes": ["a", "b"]},
        "classifier": {"feature_layer": "penultimate", "held_out_accuracy": 1.0, "fd_train_vs_held_out": 0.5},
        "_samples": {"ae": torch.zeros(4, 3, 16, 16), "ssl": torch.ones(4, 3, 16, 16)},
        "_latents": {"ae": torch.randn(40, 8, 4, 4), "ssl": torch.randn(40, 8, 4, 4)},
        "_latent_labels": torch.arange(40) % 2,
        "_real": torch.zeros(2, 3, 16, 16),
    }


def test_outputs_are_written_and_not_overwritten(tmp_path: Path) -> None:
    result = _fake_result()
    md = markdown_table(result)
    assert "| AE (λ 0) | 0 |" in md and "25.05 ± 0.07" in md and "stage4_rfd_within_ae_sd" in md
    write_outputs(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)
    saved = json.loads((tmp_path / "table1.json").read_text())
    assert "_samples" not in saved and saved["rows"][0]["gfd_curve"][1]["steps"] == 10
    png = Image.open(tmp_path / "samples.png")  # real + 2 rows of 2 images (16 px at x2, 2-px borders)
    assert png.size == (130 + 2 * 34 + 2, 3 * 34 + 2)
    for name in ("curves.png", "latents.png"):
        assert Image.open(tmp_path / name).size[0] > 300
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_outputs(result, tmp_path)


def test_merge_runs_over_disjoint_seeds() -> None:
    a, b = _fake_result(1), _fake_result(2)
    b["seeds"] = [1, 2]
    for row in b["rows"]:
        for m in row["metrics"].values():
            m["values"] = [v + 1.0 for v in m["values"]]
    merged = merge_results([b, a])  # order of the runs does not matter: values follow the seeds
    gfd = merged["rows"][0]["metrics"]["gfd"]
    assert merged["seeds"] == [0, 1, 2] and gfd["values"] == [30.0, 31.0, 31.1]
    assert merged["rows"][0]["gfd_curve"][1]["mean"] == pytest.approx(92.1 / 3)
    assert merged["rows"][0]["gfd_curve"][1]["sd"] == pytest.approx(float(np.std([30, 31, 31.1], ddof=1)))
    with pytest.raises(ValueError, match="share seeds"):
        merge_results([a, a])


# ---- the whole pipeline ------------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "t1"
    cmd = [sys.executable, str(REPO / "benchmarks" / "table1.py"), "--quick", "--data", "digits", "--out", str(out),
           "--threads", "1", "--quiet", "--set", "stage1_steps=10", "--set", "teacher_steps=10",
           "--set", "dit_budgets=4,8", "--set", "classifier_steps=20", "--set", "ssl_steps=4", "--set", "sup_steps=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gates passed" in proc.stdout and "{" not in proc.stdout  # a summary, not the JSON
    saved = json.loads((out / "table1.json").read_text())
    assert [r["key"] for r in saved["rows"]] == list(ROW_KEYS)
    assert saved["seeds"] == [0] and saved["quick"] is True and saved["settings"]["dit_budgets"] == [4, 8]
    assert saved["data"]["train_images"] + saved["data"]["held_out_images"] == 1797
    for row in saved["rows"]:
        m = row["metrics"]
        for key in ("psnr_s1", "psnr_s3", "psnr", "rfd", "gfd", "gfd_rec", "sample_accuracy", "knn_acc",
                    "silhouette", "ed", "ed_s1", "latent_std"):
            assert math.isfinite(m[key]["mean"]), (row["key"], key)
        assert [p["steps"] for p in row["gfd_curve"]] == [4, 8]
        assert all(math.isfinite(p["mean"]) for p in row["gfd_curve"])
    dm_rows = [r for r in saved["rows"] if r["dm_weight"] > 0]
    assert all("dm_grad_rms_end" in r["metrics"] for r in dm_rows)
    assert {r["key"]: r["dm_weight"] for r in saved["rows"]}["ssl"] == 10.0
    assert saved["gates"] and all(isinstance(v, bool) for v in saved["gates"].values())
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr
