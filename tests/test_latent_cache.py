"""dmvae.latent_cache and ``dmvae cache-latents``: bitwise entries, resume without gaps, hash refusal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.latent_cache import LatentDataset, cache_latents, encoder_hash, read_cache_info
from dmvae.training.data import SkimagePhotos, center_crop_transform, to_model_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp import run_ranks  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def vae() -> DMVAE:
    torch.manual_seed(0)
    cfg = DMVAEConfig.from_preset("dmvae-tiny", image_size=SIZE, decoder_channel_mult=(1, 1, 2, 2))
    m = DMVAE(cfg).eval()
    m.config.latent_mean, m.config.latent_scale = 0.01, 3.0  # non-trivial normalisation
    return m


def _data() -> SkimagePhotos:
    return SkimagePhotos(center_crop_transform(SIZE), repeats=1)  # 7 photos


def _rows(directory: Path) -> torch.Tensor:
    info = read_cache_info(directory)
    return torch.cat([load_file(str(info.shard_path(directory, k)))["index"] for k in range(info.num_shards)])


def test_entries_equal_encode_bitwise_and_dataset_reads_them(vae: DMVAE, tmp_path: Path) -> None:
    ds = _data()
    info = cache_latents(vae, ds, tmp_path, image_size=SIZE, batch_size=3, shard_size=4, progress=False)
    assert info.complete and info.num_shards == 2 and info.latent_shape == list(vae.latent_shape(SIZE, SIZE))
    assert info.encoder_hash == encoder_hash(vae) and info.tokenizer_config["latent_scale"] == 3.0
    assert (tmp_path / "files.txt").read_text().splitlines() == [s[0] for s in ds.samples]
    shard = load_file(str(info.shard_path(tmp_path, 1)))
    assert shard["index"].tolist() == [4, 5, 6] and shard["labels"].tolist() == [0, 0, 0]
    with torch.no_grad():
        for i in range(len(ds)):
            x = to_model_input(ds[i][0][None])
            raw = vae.encode(x, normalize=False)[0]
            raw_flip = vae.encode(x.flip(-1), normalize=False)[0]
            k, row = divmod(i, 4)
            s = load_file(str(info.shard_path(tmp_path, k)))
            assert torch.equal(s["latents"][row], raw), i  # bitwise, one image at a time
            assert torch.equal(s["latents_flip"][row], raw_flip), i
            assert not torch.equal(raw, raw_flip)
            # the dataset returns vae.encode(x) (normalised) or its mirror's
            z, label = LatentDataset(tmp_path, flip="none")[i]
            torch.testing.assert_close(z, vae.encode(x)[0], rtol=0, atol=1e-6)
            zf, _ = LatentDataset(tmp_path, flip="only")[i]
            torch.testing.assert_close(zf, vae.encode(x.flip(-1))[0], rtol=0, atol=1e-6)
    # random flips: both variants appear, and a seeded key always picks the same one
    rnd = LatentDataset(tmp_path, normalize=False)
    picks = {torch.equal(rnd[(0, s)][0], shard_row := load_file(str(info.shard_path(tmp_path, 0)))["latents"][0])
             for s in range(16)}
    assert picks == {True, False}
    assert all(torch.equal(rnd[(0, 7)][0], rnd[(0, 7)][0]) for _ in range(3))
    del shard_row
    # statistics of the un-normalised latents, global and per channel (both variants)
    both = [load_file(str(info.shard_path(tmp_path, k)))[n].double() for k in range(2) for n in ("latents", "latents_flip")]
    z = torch.cat(both)  # (2N, C, h, w)
    per_channel = z.transpose(0, 1).flatten(1)
    want = {"latent_channels": z.shape[1], "latent_mean": z.mean().item(), "latent_std": z.std().item(),
            "latent_scale": 1 / z.std().item(), "latent_channel_mean": per_channel.mean(1).tolist(),
            "latent_channel_std": per_channel.std(1).tolist()}
    stats = json.loads((tmp_path / "cache.json").read_text())["statistics"]
    assert set(stats) == set(want)
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, rel=1e-9), key
    assert len(stats["latent_channel_mean"]) == vae.config.z_channels


def test_interrupted_caching_resumes_without_duplicates_or_gaps(vae: DMVAE, tmp_path: Path) -> None:
    ds = _data()
    done: list[int] = []

    def crash_after_first(k: int) -> None:
        done.append(k)
        raise KeyboardInterrupt  # the job is killed right after shard 0 is written

    with pytest.raises(KeyboardInterrupt):
        cache_latents(vae, ds, tmp_path, image_size=SIZE, batch_size=2, shard_size=2, progress=False,
                      on_shard=crash_after_first)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not list(tmp_path.glob(".*tmp*"))  # no partial shard file left behind
    with pytest.raises(ValueError, match=r"incomplete \(3 of 4 shards missing\)"):
        LatentDataset(tmp_path)
    part = cache_latents(vae, ds, tmp_path, image_size=SIZE, batch_size=2, shard_size=2, progress=False,
                         max_shards=1, on_shard=done.append)
    assert not part.complete and done == [0, 1]
    full = cache_latents(vae, ds, tmp_path, image_size=SIZE, batch_size=2, shard_size=2, progress=False,
                         on_shard=done.append)
    assert full.complete and done == [0, 1, 2, 3]  # every shard encoded exactly once
    assert _rows(tmp_path).tolist() == list(range(len(ds)))  # no duplicate, no gap
    uninterrupted = tmp_path.parent / (tmp_path.name + "-ref")
    cache_latents(vae, ds, uninterrupted, image_size=SIZE, batch_size=2, shard_size=2, progress=False)
    for k in range(4):
        a = load_file(str(full.shard_path(tmp_path, k)))
        b = load_file(str(full.shard_path(uninterrupted, k)))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_other_tokenizer_is_refused_decoder_finetune_is_not(vae: DMVAE, tmp_path: Path) -> None:
    cache_latents(vae, _data(), tmp_path, image_size=SIZE, batch_size=4, shard_size=8, progress=False)
    cache = LatentDataset(tmp_path)
    cache.check_tokenizer(vae)
    finetuned = DMVAE(vae.config)
    finetuned.load_state_dict(vae.state_dict())
    with torch.no_grad():
        finetuned.decoder.conv_out.weight.add_(1.0)  # stage 4 changes only the decoder
    cache.check_tokenizer(finetuned)
    other = DMVAE(vae.config)
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="made by a different tokenizer than --vae"):
        cache.check_tokenizer(other)
    with pytest.raises(ValueError, match="holds a different latent cache.*encoder_hash"):
        cache_latents(other, _data(), tmp_path, image_size=SIZE, batch_size=4, shard_size=8, progress=False)


@pytest.mark.slow
def test_cli_under_two_processes_then_one(vae: DMVAE, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """torchrun-style: 2 processes encode their own shards (interrupted), 1 process finishes."""
    vae.save_pretrained(tmp_path / "vae")
    for i in range(7):  # a class-folder data set of 7 small images
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        _data().load(i).resize((40, 36)).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dmvae", "cache-latents", "--model", str(tmp_path / "vae"), "--data",
           str(tmp_path / "data"), "-o", str(out), "--batch-size", "2", "--shard-size", "2", "--num-workers", "0",
           "--quiet"]
    run_ranks([*cmd, "--max-shards", "1"], world_size=2)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    from dmvae.cli import main as cli

    capsys.readouterr()
    assert cli([*cmd[3:], "--json"]) == 0  # the same command in this process, one rank: finishes the missing shards
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "complete" and summary["num_shards"] == 4
    assert _rows(out).tolist() == list(range(7))  # no duplicate, no gap
    assert LatentDataset(out).num_classes == 2


def test_caching_gives_the_model_back_in_its_own_mode(vae: DMVAE, tmp_path: Path) -> None:
    """Encoding runs in eval mode; afterwards every submodule has its own training flag back."""
    vae.train()
    vae.encoder.eval()  # a frozen part stays frozen
    try:
        cache_latents(vae, _data(), tmp_path, image_size=SIZE, batch_size=4, shard_size=8, progress=False)
        assert vae.training and vae.decoder.training and not vae.encoder.training
    finally:
        vae.eval()


def test_cli_prints_text_by_default_and_json_when_asked(vae: DMVAE, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from dmvae.cli import main as cli

    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "data" / "c0").mkdir(parents=True)
    for i in range(3):
        _data().load(i).resize((40, 36)).save(tmp_path / "data" / "c0" / f"{i}.png")
    args = ["cache-latents", "--model", str(tmp_path / "vae"), "--data", str(tmp_path / "data"),
            "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--quiet", "--threads", "1"]
    capsys.readouterr()
    assert cli([*args, "-o", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "3 images in 2 shards" in text and "complete" in text and not text.lstrip().startswith("{")
    assert cli([*args, "-o", str(tmp_path / "b"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_images"] == 3 and summary["status"] == "complete"
