"""dmvae.training.data / sampler / webdataset: datasets, transforms, every PIL mode, epochs, exact resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae.training.data import (
    ImageFolder,
    ImageList,
    SkimagePhotos,
    build_dataset,
    center_crop_transform,
    to_model_input,
    train_transform,
)
from dmvae.training.sampler import ResumableDistributedSampler, TrainLoader


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


class _Indexed(torch.utils.data.Dataset):
    """Item = its index and a random number drawn under the key's seed (an augmentation stand-in)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        i, seed = key
        return i, torch.rand((), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- datasets


def test_image_folder_with_class_folders_flat_and_file_list(tmp_path: Path) -> None:
    for cls, n in (("n02", 2), ("n01", 3)):
        (tmp_path / "cls" / cls).mkdir(parents=True)
        for i in range(n):
            _rgb(20, 30, i).save(tmp_path / "cls" / cls / f"{i}.png")
    ds = ImageFolder(tmp_path / "cls")
    assert ds.classes == ["n01", "n02"] and ds.num_classes == 2 and len(ds) == 5
    assert ds.labels == [0, 0, 0, 1, 1]  # sorted class folders -> labels
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 20, 30) and y == 1

    (tmp_path / "flat").mkdir()
    for i in range(3):
        _rgb(10, 10, i).save(tmp_path / "flat" / f"{i}.jpg")
    flat = build_dataset(tmp_path / "flat")
    assert isinstance(flat, ImageFolder) and flat.labels == [0, 0, 0] and flat.num_classes == 1

    lst = tmp_path / "train.txt"
    lst.write_text("# path label\ncls/n01/0.png 4\ncls/n02/1.png, 2\n\nflat/0.jpg\n")
    fl = build_dataset(lst)
    assert isinstance(fl, ImageList) and fl.labels == [4, 2, 0] and fl.num_classes == 5
    assert torch.equal(fl[0][0], ds[0][0])

    with pytest.raises(FileNotFoundError, match="no such folder or file list"):
        build_dataset(tmp_path / "missing")
    (tmp_path / "bad.txt").write_text("a.png x\n")
    with pytest.raises(ValueError, match="bad.txt:1: the label must be an integer"):
        ImageList(tmp_path / "bad.txt")
    _rgb(8, 8).save(tmp_path / "cls" / "stray.png")
    with pytest.raises(ValueError, match="stray.png lies directly in the root"):
        ImageFolder(tmp_path / "cls", labels="folders")


def _mode_cases() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """One file per PIL mode and the 8-bit RGB it must decode to."""
    u = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)  # 8-bit reference values
    cases: dict[str, tuple[Image.Image, np.ndarray]] = {}
    cases["I;16"] = (Image.fromarray(u.astype(np.uint16) * 257), np.stack([u] * 3, -1))  # 16-bit grey
    cases["I"] = (Image.fromarray(u.astype(np.int32) * 257, mode="I"), np.stack([u] * 3, -1))  # 32-bit int
    f = u.astype(np.float32) / 255.0
    cases["F"] = (Image.fromarray(f, mode="F"), np.stack([np.rint(f * 255).astype(np.uint8)] * 3, -1))
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    pal.info["transparency"] = 0  # index 0 transparent -> white
    cases["P"] = (pal, np.array([[[255] * 3, [10, 200, 10]], [[10, 200, 10], [255] * 3]], np.uint8))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cases["CMYK"] = (cmyk, np.asarray(cmyk.convert("RGB")))
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0], la[0, 0, 1], la[1, 1, 1] = 100, 255, 255  # two opaque, two transparent pixels
    exp = np.full((2, 2, 3), 255, np.uint8)
    exp[0, 0] = exp[1, 1] = 100
    cases["LA"] = (Image.fromarray(la, mode="LA"), exp)
    bits = np.array([[1, 0], [0, 1]], bool)
    cases["1"] = (Image.fromarray(bits), np.stack([bits.astype(np.uint8) * 255] * 3, -1))
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    cases["RGBA"] = (Image.fromarray(rgba, mode="RGBA"), np.array([[[0, 0, 255], [255, 255, 255]]], np.uint8))
    return cases


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "CMYK", "LA", "1", "RGBA"])
def test_every_pil_mode_is_decoded_to_8bit_rgb_by_the_dataset(tmp_path: Path, mode: str) -> None:
    img, expected = _mode_cases()[mode]
    suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == img.mode or (mode == "I;16" and check.mode.startswith("I;16"))  # the file keeps it
    ds = build_dataset(tmp_path)  # a flat folder of this one file, no transform: uint8 (3, H, W)
    x, label = ds[0]
    assert label == 0 and x.dtype == torch.uint8
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), expected)


def test_transforms() -> None:
    img = _rgb(375, 500)
    out = train_transform(64)(img)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = train_transform(64)(img)
        torch.manual_seed(0)
        b = train_transform(64)(img)
    assert torch.equal(a, b)  # torchvision transforms follow the torch RNG
    c = center_crop_transform(64)(img)
    from dmvae.image import center_crop_arr

    assert torch.equal(c, torch.from_numpy(np.array(center_crop_arr(img, 64))).permute(2, 0, 1))
    assert torch.equal(center_crop_transform(64, hflip=True)(img), c.flip(-1))
    import pickle  # DataLoader workers receive the transform pickled

    assert torch.equal(pickle.loads(pickle.dumps(center_crop_transform(64)))(img), c)
    x = to_model_input(c[None])
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, c[None].float() / 127.5 - 1)
    with pytest.raises(ValueError, match="resize_ratio"):
        train_transform(64, resize_ratio=0.5)


def test_seeded_keys_make_augmentation_independent_of_global_rng() -> None:
    ds = SkimagePhotos(train_transform(32), repeats=1)
    torch.manual_seed(1)
    a = ds[(2, 12345)][0]
    torch.manual_seed(2)
    b = ds[(2, 12345)][0]
    assert torch.equal(a, b)
    crops = {ds[(2, s)][0].float().sum().item() for s in range(6)}
    assert len(crops) > 1  # different seeds give different crops / flips


# ------------------------------------------------------------------------ sampler and loader


def test_sampler_epochs_shards_and_world_size_invariance() -> None:
    ds = _Indexed(23)
    # disjoint per-rank shards without replacement; a new order each epoch
    parts = []
    for r in range(2):
        s = ResumableDistributedSampler(ds, 2, r, seed=3, yield_seeds=False)
        s.set_epoch(0)
        parts.append(list(s))
    assert len(parts[0]) == len(parts[1]) == 11 and not set(parts[0]) & set(parts[1])
    one = ResumableDistributedSampler(ds, 1, 0, seed=3, yield_seeds=False)
    e0 = list(one)
    one.set_epoch(1)
    assert sorted(e0) == list(range(23)) and list(one) != e0
    # global batch k is the same set of samples (and seeds) for 1 x 4 and 2 x 2
    single = TrainLoader(ds, 4, seed=3, num_replicas=1, rank=0)
    pair = [TrainLoader(ds, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert single.steps_per_epoch == pair[0].steps_per_epoch == 5
    for _ in range(12):  # crosses two epoch boundaries
        i1, u1 = next(single)
        b = [next(p) for p in pair]
        i2 = torch.stack([b[0][0], b[1][0]], 1).flatten()  # interleave ranks: global positions 0, 1, 2, 3
        u2 = torch.stack([b[0][1], b[1][1]], 1).flatten()
        assert torch.equal(i1, i2) and torch.equal(u1, u2)
    assert single.epoch == 2 and single.batch_in_epoch == 2


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes
def test_loader_resumes_mid_epoch_exactly(workers: int) -> None:
    ds = SkimagePhotos(train_transform(16), repeats=2)  # 14 samples, batch 3: 4 steps per epoch
    full = TrainLoader(ds, 3, seed=5, num_workers=workers)
    ref = [next(full) for _ in range(10)]
    first = TrainLoader(ds, 3, seed=5)
    for _ in range(6):  # stop in the middle of epoch 1
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 2
    resumed = TrainLoader(ds, 3, seed=5, num_workers=workers)
    resumed.load_state_dict(state)
    for k in range(6, 10):
        x, y = next(resumed)
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1]), k  # same images, same crops
    with pytest.raises(ValueError, match="global_batch_size=3"):
        TrainLoader(ds, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        TrainLoader(ds, 15)


def test_webdataset_shards(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    from dmvae.training.webdataset import ShardLoader

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{s}.tar")) as w:
            for i in range(6):
                buf = io.BytesIO()
                img = Image.fromarray((np.full((24, 30), 257 * (i + 1), np.uint16)))  # 16-bit grey PNGs
                img.save(buf, format="PNG")
                w.write({"__key__": f"{s}_{i}", "png": buf.getvalue(), "cls": str(i % 3).encode()})
    loader = ShardLoader(str(tmp_path / "train-{0..1}.tar"), train_transform(16), 4, seed=1, num_classes=3)
    seen = set()
    for _ in range(6):
        x, y = next(loader)
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
        seen |= set(x[:, 0, 0, 0].tolist())
        assert set(y.tolist()) <= {0, 1, 2}
    assert seen <= {1, 2, 3, 4, 5, 6} and len(seen) > 1  # 16-bit values decoded by bit depth, not clipped
    assert loader.num_classes == 3 and loader.state_dict()["stream_batches"] == 6
