"""The 2-D study (``dmvae.demo``) and ``dmvae demo`` (reduced steps; the full default run is
measured by hand)."""

from __future__ import annotations

import json

import numpy as np
import torch

import pytest

from dmvae.cli import main
from dmvae.demo import Toy2DConfig, initial_points, run_toy2d, save_compare_figure, save_figure


def test_initial_points_match_reference_fixture(fixtures_dir):
    from safetensors.torch import load_file

    d = load_file(fixtures_dir / "toy2d" / "toy2d.safetensors")
    state = torch.random.get_rng_state()
    assert torch.equal(initial_points(1536, 42), d["points_init"])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


@pytest.mark.slow  # runs the demo end to end
def test_demo_cli_reduced_steps_writes_json_png_points(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "fig.json"
    rc = main(["demo", "--steps", "60", "--teacher-steps", "150", "--seed", "1", "--quiet",
               "--point-lr", "0.03", "--eval-sets", "3", "-o", str(out), "--json", str(js)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "floor" in text and "coverage" in text
    rep = json.loads(js.read_text())
    for key in ("energy_before", "energy_after", "energy_floor", "coverage_before", "coverage_after"):
        assert isinstance(rep[key], float)
    assert rep["energy_after"] < 0.5 * rep["energy_before"]  # the points moved towards the S-shape
    assert rep["config"]["steps"] == 60 and rep["config"]["seed"] == 1
    pts = np.load(out / "points.npy")
    assert pts.shape == (1536, 2) and np.isfinite(pts).all()
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "compare.png").exists()  # one objective: no comparison picture
    assert rep["files"]["png"] == str(out / "demo.png")


@pytest.mark.slow  # runs the demo end to end
def test_demo_compare_json_to_stdout_and_compare_picture(tmp_path, capsys):
    from PIL import Image

    rc = main(["demo", "--steps", "10", "--teacher-steps", "20", "--quiet", "--eval-sets", "2", "--objectives",
               "real_score,fake_score", "--json", "-o", str(tmp_path)])  # --json alone: stdout
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["objectives"]) == {"dm", "real_score", "fake_score"}
    for r in rep["objectives"].values():
        assert {"energy_after", "coverage_after"} <= set(r)
    # demo.png stays the DM picture; the comparison has its own file, one panel per objective
    assert rep["files"]["compare_png"] == str(tmp_path / "compare.png")
    demo, compare = Image.open(tmp_path / "demo.png"), Image.open(tmp_path / "compare.png")
    assert demo.size != compare.size
    assert (tmp_path / "points_real_score.npy").exists() and (tmp_path / "points_fake_score.npy").exists()


def test_demo_rejects_bad_arguments(capsys):
    for bad in (["--steps", "0"], ["--point-lr", "nan"], ["--point-lr", "-1"], ["--eval-sets", "x"]):
        with pytest.raises(SystemExit) as e:  # refused by the parser, before any work
            main(["demo", *bad])
        assert e.value.code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err
    assert main(["demo", "--objectives", "nope", "--steps", "1"]) == 1
    assert "unknown objective(s) ['nope']" in capsys.readouterr().err


def test_study_leaves_global_rng_alone_and_does_not_depend_on_it():
    cfg = Toy2DConfig(steps=4, teacher_steps=6, eval_sets=1, num_points=64, fake_batch_size=32, num_threads=None)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        runs.append(run_toy2d(cfg).main.points)
        assert torch.equal(torch.random.get_rng_state(), state)  # not seeded, not consumed
    assert torch.equal(runs[0], runs[1])  # the config's seeds decide everything


def test_figures_choose_no_matplotlib_backend(tmp_path):
    import sys

    pytest.importorskip("matplotlib")
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("pyplot was imported by another test")
    pts = torch.rand(30, 2)
    save_figure(tmp_path / "a.png", pts, pts, pts, pts, (torch.rand(4, 2), torch.randn(4, 2)))
    assert "matplotlib.pyplot" not in sys.modules  # the object-oriented API needs no backend


def test_pil_figure_fallback(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    pts = torch.rand(50, 2)
    grid = torch.rand(9, 2)
    p = save_figure(tmp_path / "f.png", pts, pts, pts, pts, (grid, torch.randn(9, 2)), title="t")
    from PIL import Image

    assert Image.open(p).size[0] > 1000

    class Run:  # what save_compare_figure reads of a Toy2DRun
        def __init__(self, points):
            self.points, self.energy_after, self.coverage_after = points, 0.01, 0.9

    q = save_compare_figure(tmp_path / "c.png", pts, {"dm": Run(pts), "real_score": Run(pts)}, floor=0.001)
    assert Image.open(q).size[0] > 600


def test_config_round_trip():
    cfg = Toy2DConfig(steps=7)
    assert Toy2DConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
