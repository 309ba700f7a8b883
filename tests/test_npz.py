"""dmvae.npz: the ADM layout (NHWC uint8) is enforced on read and write; the sharded writer."""

from __future__ import annotations

import numpy as np
import pytest

from dmvae.npz import (
    IncompleteShardsError,
    NpzKeyError,
    ShardedNpzWriter,
    iter_npz_images,
    load_npz_images,
    npz_image_shape,
    save_npz_images,
)


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 3, 8, 3), (4, 3, 3, 3)])
def test_nchw_arrays_are_refused(tmp_path, shape) -> None:
    """NCHW (axis 1 = 3) is refused, also when the last axis happens to be 3 as well."""
    arr = np.zeros(shape, np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=arr)
    for read in (npz_image_shape, load_npz_images, lambda p: next(iter_npz_images(p))):
        with pytest.raises(ValueError, match="NCHW"):
            read(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="NCHW"):
        save_npz_images(tmp_path / "y.npz", arr)
    assert not (tmp_path / "y.npz").exists()


def test_layout_and_key_errors(tmp_path) -> None:
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        npz_image_shape(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(NpzKeyError, match=r"found keys \['images'\]") as e:
        npz_image_shape(tmp_path / "k.npz")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert not str(e.value).startswith("'")  # a readable message, not a KeyError repr


def test_save_refuses_to_overwrite_when_asked(tmp_path) -> None:
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    save_npz_images(tmp_path / "a.npz", imgs)
    with pytest.raises(FileExistsError):
        save_npz_images(tmp_path / "a.npz", imgs, overwrite=False)
    save_npz_images(tmp_path / "a.npz", imgs + 1)  # the default replaces, like np.savez
    assert load_npz_images(tmp_path / "a.npz").max() == 1


def test_sharded_writer_merges_in_index_order(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    w = ShardedNpzWriter(tmp_path / "o.npz", total=7, batch_size=3, fingerprint={"x": 1}).open()
    assert w.num_batches == 3 and w.pending() == [0, 1, 2]
    for b in (2, 0):
        w.write(b, images[3 * b : 3 * b + 3], labels[3 * b : 3 * b + 3])
    assert w.pending() == [1]
    with pytest.raises(IncompleteShardsError, match="1 of 3 shards are missing"):
        w.merge()
    (tmp_path / "o.npz.shards" / "shard_000001.npz").write_bytes(b"truncated")  # an interrupted write
    assert w.pending() == [1]  # unreadable = not done, rewritten
    w.write(1, images[3:6], labels[3:6])
    out = ShardedNpzWriter(tmp_path / "o.npz", total=7, batch_size=3, fingerprint={"x": 1}).open().merge()
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
    assert not (tmp_path / "o.npz.shards").exists()
    with pytest.raises(ValueError, match=r"batch 0 must hold 3 images"):
        w.write(0, images[:2], labels[:2])


def test_sharded_writer_refuses_another_run(tmp_path) -> None:
    ShardedNpzWriter(tmp_path / "o.npz", total=4, batch_size=2, fingerprint={"seed": 1}).open()
    with pytest.raises(ValueError, match=r"different run.*seed: 1 -> 2"):
        ShardedNpzWriter(tmp_path / "o.npz", total=4, batch_size=2, fingerprint={"seed": 2}).open()
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 4"):
        ShardedNpzWriter(tmp_path / "o.npz", total=4, batch_size=4, fingerprint={"seed": 1}).open()
