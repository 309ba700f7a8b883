"""The 2-D study and ``dmvae demo`` (reduced steps; the full default run is measured by hand)."""

from __future__ import annotations

import json

import numpy as np
import torch

from dmvae.cli import main
from dmvae.toy2d import Toy2DConfig, initial_points, save_figure


def test_initial_points_match_reference_fixture(fixtures_dir):
    from safetensors.torch import load_file

    d = load_file(fixtures_dir / "toy2d" / "toy2d.safetensors")
    state = torch.random.get_rng_state()
    assert torch.equal(initial_points(1536, 42), d["points_init"])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


def test_demo_cli_reduced_steps_writes_json_png_points(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "fig.json"
    rc = main(["demo", "--steps", "60", "--teacher-steps", "150", "--seed", "1", "--quiet",
               "--point-lr", "0.03", "--eval-sets", "3", "--out", str(out), "--json", str(js)])
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


def test_demo_compare_json_to_stdout(tmp_path, capsys):
    rc = main(["demo", "--steps", "10", "--teacher-steps", "20", "--quiet", "--eval-sets", "2", "--objectives",
               "real_score,fake_score", "--json", "-", "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["objectives"]) == {"dm", "real_score", "fake_score"}
    for r in rep["objectives"].values():
        assert {"energy_after", "coverage_after"} <= set(r)


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--steps", "0"]) == 1
    assert "--steps must be > 0" in capsys.readouterr().err
    assert main(["demo", "--objectives", "nope", "--steps", "1"]) == 1


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


def test_config_round_trip():
    cfg = Toy2DConfig(steps=7)
    assert Toy2DConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
