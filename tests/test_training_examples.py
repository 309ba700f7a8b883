"""The stage examples on real photos (tiny models, CPU): loss goes down, exact mid-epoch resume,
2 DDP processes == 1 process (stages 1, 3, 5), training from the latent cache, help and user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from _ddp import run_ranks

from dmvae.training import load_checkpoint

SCRIPTS = ("train_tokenizer", "train_latent_dit", "train_dmvae", "train_reference", "finetune_decoder")


TOK = ["--image-size", "32", "--batch-size", "4", "--lpips-weight", "0", "--lr", "2e-3", "--disc-lr", "2e-3",
       "--warmup", "2", "--ndf", "8", "--log-every", "1", "--stats-batches", "2", "--quiet",
       "--threads", "2"]  # fmt: skip  (every run of a resume pair needs the same thread count: sums round differently)
# GAN on, with per-sample-independent parts only (GroupNorm critic, no DiffAugment): the 1 vs 2 process check
GAN_DDP = ["--disc-norm", "group", "--no-diffaug", "--bcr-weight", "0"]


@pytest.fixture(scope="module")
def ex(load_example) -> SimpleNamespace:
    """The example scripts as modules: ``ex.train_tokenizer.main([...])``."""
    return SimpleNamespace(**{name: load_example(name) for name in SCRIPTS})


@pytest.fixture(scope="module")
def stage1(ex, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stage1")
    # EMA with warm-up (the examples' default): vae_ema is a trained model, so the stage-3 exact-resume check
    # below starts from real latents, not from ~initial weights (a 7th-digit resume difference once seen from
    # such a start did not reproduce in three trials, same thread count).
    summary = ex.train_tokenizer.main(["--out", str(out), "--steps", "10", "--disc-start", "6", "--ckpt-every", "5",
                                       *TOK])  # fmt: skip
    return out, summary


@pytest.fixture(scope="module")
def stage2(ex, stage1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage2")
    ex.train_latent_dit.main(["--vae", str(stage1[0] / "vae_ema"), "--out", str(out), "--steps", "3",
                              "--batch-size", "4", "--quiet"])  # fmt: skip
    return out / "dit_ema"


def _losses(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history]


@pytest.mark.slow
def test_tokenizer_trains_and_resumes_exactly_mid_epoch(ex, stage1, tmp_path) -> None:
    out, full = stage1
    l1 = _losses(full["history"], "l1")
    assert sum(l1[:2]) / 2 > sum(l1[3:6]) / 3, l1  # reconstruction improves before the GAN starts
    assert all("gan_weight" not in h for h in full["history"][:6])  # not computed yet: absent, never nan
    assert all(h["gan_weight"] > 0 for h in full["history"][6:])  # the adaptive GAN term is on from step 6
    cfg = json.loads((out / "vae_ema" / "config.json").read_text())
    assert cfg["latent_scale"] != 1.0 and cfg["latent_mean"] != 0.0  # measured latent statistics written
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10 and "NaN" not in "".join(lines)

    # interrupted run: 5 steps (checkpoint at 5, inside the first epoch), then a new call resumes to 10
    part = tmp_path / "resume"
    ex.train_tokenizer.main(["--out", str(part), "--steps", "5", "--disc-start", "6", "--ckpt-every", "5", *TOK])
    data_state = load_checkpoint(part / "checkpoints", restore_rng=False).state["data"]
    assert data_state["epoch"] == 0 and data_state["batch_in_epoch"] == 5  # mid-epoch (28 batches per epoch)
    resumed = ex.train_tokenizer.main(["--out", str(part), "--steps", "10", "--disc-start", "6", "--ckpt-every", "5", *TOK])
    assert resumed["start_step"] == 5
    assert resumed["history"] == full["history"][5:]  # identical losses, GAN steps included
    a, b = load_file(str(out / "vae" / "model.safetensors")), load_file(str(part / "vae" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_latent_dit_resumes_across_epochs(ex, stage1, tmp_path) -> None:
    vae = str(stage1[0] / "vae_ema")
    args = ["--vae", vae, "--batch-size", "16", "--log-every", "1", "--ckpt-every", "9", "--quiet"]
    full = ex.train_latent_dit.main(["--out", str(tmp_path / "a"), "--steps", "12", *args])  # 7 batches per epoch
    ex.train_latent_dit.main(["--out", str(tmp_path / "b"), "--steps", "9", *args])
    state = load_checkpoint(tmp_path / "b" / "checkpoints", restore_rng=False).state["data"]
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # 9 = 1 epoch + 2 batches
    resumed = ex.train_latent_dit.main(["--out", str(tmp_path / "b"), "--steps", "12", *args])
    assert resumed["start_step"] == 9 and resumed["history"] == full["history"][9:]


@pytest.mark.slow
def test_latent_dit_from_the_cache(ex, stage1, tmp_path, capsys) -> None:
    from dmvae.autoencoder import DMVAE
    from dmvae.latent_cache import cache_latents
    from dmvae.training.data import SkimagePhotos, center_crop_transform

    vae = DMVAE.from_pretrained(stage1[0] / "vae_ema")
    cache_latents(vae, SkimagePhotos(center_crop_transform(32)), tmp_path / "cache", image_size=32, batch_size=16,
                  shard_size=32, progress=False)  # fmt: skip
    args = ["--vae", str(stage1[0] / "vae_ema"), "--latents", str(tmp_path / "cache"), "--batch-size", "16",
            "--log-every", "1", "--quiet"]  # fmt: skip
    run = ex.train_latent_dit.main(["--out", str(tmp_path / "dit"), "--steps", "30", *args])
    loss = _losses(run["history"], "loss")
    assert sum(loss[:6]) / 6 > 1.1 * sum(loss[-6:]) / 6, loss  # training from the cache lowers the loss
    with pytest.raises(SystemExit):  # a cache of another tokenizer (the non-EMA weights) is refused
        ex.train_latent_dit.main(["--out", str(tmp_path / "x"), "--steps", "1",
                                  *[str(stage1[0] / "vae") if a.endswith("vae_ema") else a for a in args]])
    assert "made by a different tokenizer than --vae" in capsys.readouterr().err


@pytest.mark.slow
def test_dmvae_stage3_and_finetune(ex, stage1, stage2, tmp_path) -> None:
    s1 = stage1[0]
    args = ["--vae", str(s1 / "vae_ema"), "--real", str(stage2), "--batch-size", "4", "--lpips-weight", "0",
            "--vae-every", "2", "--disc-start", "4", "--ndf", "8", "--lr", "2e-3", "--warmup", "1",
            "--log-every", "1", "--ckpt-every", "4", "--quiet"]  # fmt: skip
    full = ex.train_dmvae.main(["--out", str(tmp_path / "a"), "--steps", "8", *args])
    h = full["history"]
    assert [("rec" in x) for x in h] == [True, False] * 4  # VAE every 2nd step, fake every step
    assert h[0]["dm"] == 0.0  # fake == real at the start: no DM signal yet
    assert h[2]["dm"] > 0.0  # the fake model has moved, the DM term is active
    assert "d_loss" not in h[2] and h[4]["d_loss"] > 0  # GAN from step 4; nothing logged for it before
    recs = [x["rec"] for x in h if "rec" in x]
    assert recs[0] > min(recs[1:]), recs
    ex.train_dmvae.main(["--out", str(tmp_path / "b"), "--steps", "4", *args])
    resumed = ex.train_dmvae.main(["--out", str(tmp_path / "b"), "--steps", "8", *args])
    assert resumed["start_step"] == 4 and resumed["history"] == h[4:]

    # stage 4: decoder fine-tuning moves only the decoder
    ft = tmp_path / "ft"
    ex.finetune_decoder.run(["--init", str(tmp_path / "a" / "vae"), "--out", str(ft), "--steps", "3",
                             "--disc-start", "100", *TOK])  # fmt: skip
    before = load_file(str(tmp_path / "a" / "vae" / "model.safetensors"))
    after = load_file(str(ft / "vae" / "model.safetensors"))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}, changed


def _assert_same_weights(a_file: Path, b_file: Path) -> None:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    # Gradients agree to float rounding, but Adam (g / (sqrt(v) + eps)) amplifies rounding: on
    # elements whose gradient is analytically ~0 (biases feeding a GroupNorm) to steps of up to lr,
    # and through the adaptive GAN weight (~500 here) to ~1e-5 on a few kernel entries (measured max
    # 1.04e-5 at step 2). Kernels are compared at 3e-5; a rank-local adaptive weight or an unsynced
    # gradient moves them by ~1e-4 to 1e-3. Every element stays within lr.
    mats = {k: (a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point() and a[k].ndim > 1}
    assert max(mats.values()) < 3e-5, sorted(mats.items(), key=lambda kv: -kv[1])[:3]
    all_diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
    assert (all_diffs < 1e-7).float().mean() > 0.99 and all_diffs.max() < 2e-3


def _assert_same_first_adam_step(one: Path, two: Path) -> None:
    """Stage 3's autoencoder after one AdamW step: the (clipped, all-reduced) gradients agree to float
    rounding, and every weight difference is what Adam's first step makes of that rounding.

    Adam's first update is lr * g / (|g| + eps), a sign-like map: an entry whose gradient is at the
    rounding level (the analytically-zero gradients of biases feeding a GroupNorm or of attention's
    k bias; kernel entries where the reconstruction and GAN terms cancel to ~1e-5 of the typical size)
    moves by up to 2 * lr in either run. Measured: gradients 2e-6 of max|g| apart, every weight within
    6e-8 of this prediction (kernels up to 2.3e-4 apart); a rank-local adaptive GAN weight puts the
    gradients 0.11 of max|g| apart.
    """
    from dmvae.autoencoder import DMVAE

    opts = [load_checkpoint(d / "checkpoints", restore_rng=False).state["opt_vae"] for d in (one, two)]
    (group,) = opts[0]["param_groups"]  # lr, betas and eps of the run (the warm-up is 1 step: lr is final)
    assert opts[1]["param_groups"] == opts[0]["param_groups"]
    lr, beta1, eps = group["lr"], group["betas"][0], group["eps"]
    states = [opt["state"] for opt in opts]
    grads = [{i: s["exp_avg"] / (1 - beta1) for i, s in st.items()} for st in states]  # m_1 = (1 - b1) g
    assert all(s["step"].item() == 1 for st in states for s in st.values())
    g_max = max(g.abs().max().item() for g in grads[0].values())
    g_diff = max((grads[0][i] - grads[1][i]).abs().max().item() for i in grads[0])
    assert g_diff <= 1e-5 * g_max, (g_diff, g_max)

    names = [n for n, _ in DMVAE.from_pretrained(one / "vae").named_parameters()]
    assert len(names) == len(grads[0])
    w1, w2 = load_file(str(one / "vae" / "model.safetensors")), load_file(str(two / "vae" / "model.safetensors"))
    for i, name in enumerate(names):
        step = [lr * g[i] / (g[i].abs() + eps) for g in grads]  # bias-corrected first step: m/(sqrt(v)+eps)
        excess = ((w1[name] - w2[name]).abs() - (step[0] - step[1]).abs()).abs().max().item()
        assert excess < 1e-6, (name, excess)


@pytest.mark.slow  # 2 processes per stage
@pytest.mark.parametrize("stage", [
    "stage1",
    "stage3",
    "stage5",
])
def test_two_ddp_processes_match_one(ex, repo_root, stage, stage1, stage2, tmp_path) -> None:
    """torchrun-style 2 x batch 2 (gloo, DDP) gives the losses and weights of 1 x batch 4 (2 steps, GAN on at step 1)."""
    vae = str(stage1[0] / "vae_ema")
    if stage == "stage1":  # the GAN (and its adaptive weight on the global batch) is on at step 1
        script, module = "train_tokenizer.py", ex.train_tokenizer.main
        # every process at its default thread count (the ranks get OMP_NUM_THREADS=1): TOK's --threads 2 is
        # for the resume pairs, and 2 ranks x 2 threads on 2 cores rounded the critic's ratio 1.6e-3 apart
        tok = [a for i, a in enumerate(TOK) if "--threads" not in TOK[max(i - 1, 0):i + 1]]
        common = ["--steps", "2", "--disc-start", "1", *GAN_DDP, *tok]
        files = ["vae/model.safetensors"]
    elif stage == "stage3":  # one step: VAE turn with DM + GAN (+ D step), then the fake model
        # (after one step the optimiser's first moments are the gradients, so they can be compared
        # directly; from step 2 on, Adam's sign-like first update of rounding-level gradients, see
        # _assert_same_first_adam_step, leaves lr-sized weight differences that every later loss sees)
        script, module = "train_dmvae.py", ex.train_dmvae.main
        common = ["--vae", vae, "--real", str(stage2), "--steps", "1", "--vae-every", "1", "--disc-start", "0",
                  "--lpips-weight", "0", "--ndf", "8", "--lr", "2e-3", "--warmup", "1", "--batch-size", "4",
                  "--log-every", "1", "--quiet", *GAN_DDP]  # fmt: skip
        files = ["vae/model.safetensors", "fake/model.safetensors"]
    else:  # LatentDiT with label dropout, noise and times drawn for the global batch
        script, module = "train_latent_dit.py", ex.train_latent_dit.main
        common = ["--vae", vae, "--steps", "2", "--batch-size", "4", "--log-every", "1", "--quiet"]
        files = ["dit/model.safetensors"]
    one = module(["--out", str(tmp_path / "one"), *common])
    if stage != "stage5":
        assert one["history"][-1]["gan_weight"] > 0  # the GAN term is on
    two = [sys.executable, str(repo_root / "examples" / script), "--out", str(tmp_path / "two"), *common]
    two[two.index("--batch-size") + 1] = "2"
    run_ranks(two, world_size=2)
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(one["history"]) == len(two_summary["history"]) == (1 if stage == "stage3" else 2)
    for h1, h2 in zip(one["history"], two_summary["history"]):  # logged means over the global batch
        assert h1.keys() == h2.keys()
        for k in h1:  # 1e-5 for the trained objectives; the critic's readings (the adaptive weight, a
            # ratio of gradient norms, and D's logits on reconstructions of Adam-stepped weights) to 1e-4
            tol = (1e-4 if k in ("gan_weight", "g_loss", "d_loss") else 1e-5) * max(1.0, abs(h1[k]))
            assert abs(h1[k] - h2[k]) <= tol, (k, h1[k], h2[k])
    for f in files:
        if stage == "stage3" and f.startswith("vae/"):
            _assert_same_first_adam_step(tmp_path / "one", tmp_path / "two")
        else:
            _assert_same_weights(tmp_path / "one" / f, tmp_path / "two" / f)


def test_help_and_one_line_user_errors(ex, tmp_path, capsys) -> None:
    for mod, prog, title in ((ex.finetune_decoder.run, "finetune_decoder.py", "Stage 4"),
                             (ex.train_reference.main, "train_reference.py", "Stage 2")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            mod(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: {prog}") and title in text and "(default: 300)" in text

    cases = [
        (ex.train_tokenizer.main, ["--out", str(tmp_path / "a"), "--data", str(tmp_path / "nope")], "--data"),
        (ex.train_tokenizer.main, ["--out", str(tmp_path / "b"), "--lpips-weights", str(tmp_path / "no.safetensors")],
         "--lpips-weight 0"),
        (ex.finetune_decoder.run, ["--out", str(tmp_path / "c")], "--init"),
        (ex.train_latent_dit.main, ["--out", str(tmp_path / "d"), "--vae", str(tmp_path / "runs" / "missing" / "vae")],
         "--vae"),
    ]  # fmt: skip
    for fn, argv, hint in cases:
        with pytest.raises(SystemExit) as e:
            fn(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and hint in err and "Traceback" not in err, err


@pytest.mark.slow  # a fresh interpreter
def test_example_runs_as_a_script(repo_root) -> None:
    res = subprocess.run([sys.executable, str(repo_root / "examples" / "finetune_decoder.py"), "--help"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0 and "--freeze-bottleneck" in res.stdout
