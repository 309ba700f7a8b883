"""Issue 20: output replacement and the latent cache's trust in what it finds.

Invariants (each tested over generated cases, not only the reported examples):

* a directory without this tool's marker is never deleted; an input, a parent of an input and a
  symbolic link are never deleted, marker or not; deleting an output never reaches through a link;
* a shard is used (on resume or on read) only if its size, header, encoder hash, file-list digest
  and number match the cache; a resume over other input files is refused naming the difference;
  temporary files of killed runs are removed.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dmvae.files import (
    MARKER_NAME,
    OutputReplaceError,
    marker_tool,
    replace_output_dir,
    replace_refusal,
    write_marker,
)
from dmvae.latent_cache import (
    LatentDataset,
    cache_latents,
    read_cache_info,
    verify_shard,
)
from dmvae.training.data import ImageFolder, SkimagePhotos, center_crop_transform

SIZE = 32
TOOL = "cache-latents"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (not following links) with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = p.read_bytes() if not p.is_symlink() else b"->" + os.readlink(p).encode()
    return out


# ------------------------------------------------------------------ the output-replacement rule

MARKS = ("none", "self", "other", "symlinked-marker")
RELATIONS = ("unrelated", "is-input", "parent-of-input", "inside-input")


def _make_case(root: Path, mark: str, relation: str, via_link: bool) -> tuple[Path, list[Path]]:
    """An output directory holding a file, marked as ``mark``, related to the input as ``relation``;
    returns (the path given to replace_output_dir, the inputs)."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"image")
    if relation == "unrelated":
        out, inputs = root / "out", [data / "images"]
    elif relation == "is-input":
        out, inputs = data / "images", [data / "images"]
    elif relation == "parent-of-input":
        out, inputs = data, [data / "images"]
    else:
        out, inputs = data / "images" / "cache", [data / "images"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "payload.bin").write_bytes(b"keep me")
    if mark == "self":
        write_marker(out, TOOL)
    elif mark == "other":
        write_marker(out, "convert")
    elif mark == "symlinked-marker":
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        write_marker(elsewhere, TOOL)
        (out / MARKER_NAME).symlink_to(elsewhere / MARKER_NAME)
    if via_link:
        link = root / "link-to-out"
        link.symlink_to(out, target_is_directory=True)
        return link, inputs
    return out, inputs


@pytest.mark.parametrize(("mark", "relation", "via_link"), list(itertools.product(MARKS, RELATIONS, (False, True))))
def test_a_directory_is_deleted_only_with_our_marker_and_never_an_input(
        tmp_path: Path, mark: str, relation: str, via_link: bool) -> None:
    target, inputs = _make_case(tmp_path, mark, relation, via_link)
    before = _tree(tmp_path)
    allowed = mark == "self" and relation in ("unrelated", "inside-input") and not via_link
    assert (replace_refusal(target, tool=TOOL, inputs=inputs) is None) == allowed
    if not allowed:
        with pytest.raises(OutputReplaceError, match=f"refusing to replace {target}"):
            replace_output_dir(target, tool=TOOL, inputs=inputs)
        assert _tree(tmp_path) == before  # nothing at all was touched
        return
    replace_output_dir(target, tool=TOOL, inputs=inputs)
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME]  # a fresh, marked directory
    after = _tree(tmp_path)
    removed = set(before) - set(after)
    assert removed and all(Path(tmp_path, r).resolve().is_relative_to(target.resolve()) or
                           str(Path(tmp_path, r)).startswith(str(target)) for r in removed)
    assert after[str((tmp_path / "data" / "images" / "a.png").relative_to(tmp_path))] == b"image"


def test_deleting_an_output_never_reaches_through_a_link(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "photo.png").write_bytes(b"irreplaceable")
    out = tmp_path / "out"
    out.mkdir()
    write_marker(out, TOOL)
    (out / "data").symlink_to(precious, target_is_directory=True)
    (out / "file-link").symlink_to(precious / "photo.png")
    replace_output_dir(out, tool=TOOL)
    assert (precious / "photo.png").read_bytes() == b"irreplaceable"
    assert not any(p.name.startswith(".out.deleting-") for p in tmp_path.iterdir())


def test_leftover_of_an_interrupted_replacement_is_swept_and_nothing_else(tmp_path: Path) -> None:
    # a kill between the rename and the end of the deletion leaves ".out.deleting-<8 hex>"
    leftover = tmp_path / ".out.deleting-0123abcd"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "a.png").write_bytes(b"half deleted")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "photo.png").write_bytes(b"irreplaceable")
    (tmp_path / ".out.deleting-feedbeef").symlink_to(precious, target_is_directory=True)  # a link: kept
    (tmp_path / ".other.deleting-0123abcd").mkdir()  # another output's leftover: kept
    (tmp_path / ".out.deleting-notahex!").mkdir()  # not our name pattern: kept
    replace_output_dir(tmp_path / "out", tool=TOOL)
    assert not leftover.exists()
    assert (tmp_path / ".out.deleting-feedbeef").is_symlink()
    assert (precious / "photo.png").read_bytes() == b"irreplaceable"
    assert (tmp_path / ".other.deleting-0123abcd").is_dir() and (tmp_path / ".out.deleting-notahex!").is_dir()
    assert marker_tool(tmp_path / "out") == TOOL


def test_input_given_through_a_link_is_still_an_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    write_marker(out, TOOL)
    (tmp_path / "alias").symlink_to(out / "images", target_is_directory=True)
    with pytest.raises(OutputReplaceError, match="contains an input"):
        replace_output_dir(out, tool=TOOL, inputs=[tmp_path / "alias"])
    assert (out / "images").is_dir()


# ------------------------------------------------------------------ the cache through the CLI


def _images(folder: Path, n: int = 6, offset: int = 0) -> Path:
    ds = SkimagePhotos(repeats=1)
    for i in range(n):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        ds.load((i + offset) % len(ds)).resize((40, 36)).save(folder / f"c{i % 2}" / f"{i}.png")
    return folder


@pytest.mark.parametrize("which", ["data", "parent", "unmarked", "other-tool"])
def test_cli_overwrite_refuses_what_it_did_not_make_in_one_line(tmp_path: Path, which: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from dmvae.cli import main as cli

    data = _images(tmp_path / "project" / "data")
    out = {"data": data, "parent": tmp_path / "project", "unmarked": tmp_path / "mine",
           "other-tool": tmp_path / "converted"}[which]
    if which in ("unmarked", "other-tool"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if which == "other-tool":
            write_marker(out, "convert")
    before = _tree(tmp_path)
    code = cli(["cache-latents", "--model", str(tmp_path / "no-model"), "--data", str(data), "-o", str(out),
                "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "refusing to replace" in err and str(out) in err
    assert _tree(tmp_path) == before  # checked before the model is even looked for


@pytest.fixture(scope="module")
def vae():
    from dmvae.autoencoder import DMVAE, DMVAEConfig

    torch.manual_seed(0)
    cfg = DMVAEConfig.from_preset("dmvae-tiny", image_size=SIZE, decoder_channel_mult=(1, 1, 2, 2))
    return DMVAE(cfg).eval()


def _cache(vae, data: Path, out: Path, **kw):
    kw = {"image_size": SIZE, "batch_size": 4, "shard_size": 2, "progress": False, **kw}
    return cache_latents(vae, ImageFolder(data, center_crop_transform(SIZE)), out, source=str(data), **kw)


def test_overwrite_replaces_only_its_own_cache(vae, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "cache"
    _cache(vae, data, out)
    assert (out / MARKER_NAME).is_file()
    info = _cache(vae, data, out, shard_size=3, overwrite=True)  # incompatible settings: replaced
    assert info.complete and info.num_shards == 2 and read_cache_info(out).shard_size == 3
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    # a cache written into the data folder's parent can never be replaced by --overwrite
    with pytest.raises(OutputReplaceError, match="contains an input"):
        _cache(vae, data, tmp_path, overwrite=True)
    assert len(list(data.rglob("*.png"))) == 6


def _truncations(size: int) -> list[int]:
    return sorted({0, 4, 8, 9, size // 2, size - 1})


def test_damaged_shards_are_found_on_read_and_re_encoded_on_resume(vae, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "cache"
    info = _cache(vae, data, out)
    _cache(vae, data, tmp_path / "ref")
    shard = info.shard_path(out, 1)
    good = shard.read_bytes()
    damages = [("truncated", good[:n]) for n in _truncations(len(good))]
    damages.append(("padded", good + b"\0"))
    header_len = int.from_bytes(good[:8], "little")
    flipped = bytearray(good)
    flipped[8 + header_len // 2] ^= 0x20  # a flipped bit in the JSON header
    damages.append(("header bit", bytes(flipped)))
    for what, blob in damages:
        shard.write_bytes(blob)
        assert verify_shard(out, info, 1) is not None, what
        with pytest.raises(ValueError, match=rf"shard {shard}.*re-encode"):
            LatentDataset(out)
        with pytest.warns(UserWarning, match=rf"{shard.name}.*encoding it again"):
            again = _cache(vae, data, out)
        assert again.complete and info_equal(tmp_path / "ref", out, 1), what  # the same tensors again
    LatentDataset(out)[5]  # and reads again
    opened = LatentDataset(out)
    shard.write_bytes(good[: len(good) // 2])  # damaged while a training run has the cache open
    with pytest.raises(ValueError, match=rf"shard {shard}.*re-encode"):
        opened[2]


def test_a_shard_of_another_tokenizer_or_position_is_refused(vae, tmp_path: Path) -> None:
    from dmvae.autoencoder import DMVAE

    data = _images(tmp_path / "data")
    out, other_out = tmp_path / "cache", tmp_path / "other"
    info = _cache(vae, data, out)
    other = DMVAE(vae.config)
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    _cache(other, data, other_out)
    good = info.shard_path(out, 0).read_bytes()
    info.shard_path(out, 0).write_bytes(info.shard_path(other_out, 0).read_bytes())  # same size, other encoder
    with pytest.raises(ValueError, match="another tokenizer"):
        LatentDataset(out)
    info.shard_path(out, 0).write_bytes(good)
    info.shard_path(out, 1).write_bytes(info.shard_path(out, 2).read_bytes())  # same shape, another position
    with pytest.raises(ValueError, match="holds shard 2, not shard 1"):
        LatentDataset(out)


@pytest.mark.parametrize("change", ["renamed", "replaced", "added", "removed"])
def test_resume_over_other_input_files_is_refused_naming_them(vae, tmp_path: Path, change: str) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "cache"

    def stop(k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _cache(vae, data, out, on_shard=stop)  # a partial cache: shard 0 only
    first = min(data.rglob("*.png"))
    if change == "renamed":
        first.rename(first.with_name("zz.png"))
    elif change == "replaced":  # same name, other image (another size on disk)
        Image.new("RGB", (40, 36), (200, 10, 10)).save(first)
    elif change == "added":
        Image.new("RGB", (40, 36)).save(data / "c0" / "new.png")
    else:
        first.unlink()
    with pytest.raises(ValueError, match="input files changed|num_images") as e:
        _cache(vae, data, out)
    assert change == "replaced" or "files.txt" in str(e.value) or "num_images" in str(e.value)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]  # nothing overwritten


def test_temporary_files_of_killed_runs_are_removed(vae, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "cache"

    def stop(k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _cache(vae, data, out, on_shard=stop)
    left = [out / ".shard-00001.safetensors.k2j3.tmp", out / ".cache.json.x9.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    (out / "notes.tmp").write_text("not ours")
    _cache(vae, data, out)
    assert not any(p.exists() for p in left) and (out / "notes.tmp").exists()


@pytest.mark.slow
def test_cache_killed_at_every_shard_resumes_to_the_same_cache(vae, tmp_path: Path) -> None:
    """Kill trials in a subprocess: SIGKILL after shard k is written, then resume."""
    import subprocess

    data = _images(tmp_path / "data")
    vae.save_pretrained(tmp_path / "vae")
    ref = tmp_path / "ref"
    _cache(vae, data, ref)
    script = (
        "import os, signal, sys, torch\n"
        "from dmvae.autoencoder import DMVAE\n"
        "from dmvae.latent_cache import cache_latents\n"
        "from dmvae.training.data import ImageFolder, center_crop_transform\n"
        "k = int(sys.argv[3])\n"
        "def kill(i):\n"
        "    if i == k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"cache_latents(DMVAE.from_pretrained(sys.argv[1]), ImageFolder(sys.argv[2], center_crop_transform({SIZE})), "
        f"sys.argv[4], image_size={SIZE}, batch_size=4, shard_size=2, progress=False, source=sys.argv[2], "
        "on_shard=kill)\n"
    )
    for k in range(3):
        out = tmp_path / f"killed-{k}"
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "vae"), str(data), str(k), str(out)],
                             timeout=300, check=False)
        assert res.returncode == -9
        _cache(vae, data, out)
        for s in range(3):
            assert info_equal(ref, out, s)


def info_equal(a: Path, b: Path, k: int) -> bool:
    from safetensors.torch import load_file

    x = load_file(str(a / f"shard-{k:05d}.safetensors"))
    y = load_file(str(b / f"shard-{k:05d}.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)


def test_cache_json_with_unknown_or_missing_fields_names_the_file(vae, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "cache"
    _cache(vae, data, out)
    meta = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**meta, "surprise": 1}))
    with pytest.raises(ValueError, match=r"cache.json: unknown fields \['surprise'\]"):
        LatentDataset(out)
    del meta["num_images"]
    (out / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cache.json:.*num_images"):
        LatentDataset(out)
