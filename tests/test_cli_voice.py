"""One CLI voice (issue 21): flags in error messages, one registry lookup with "did you mean",
--help without noise, --threads set in one place, --json vs text, progress fit for log files, and
the small things a new user trips over (class sub-folders, a file given as the demo's folder,
[0, 1] images, a mistyped local path, dir(dmvae), from_config)."""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmvae
from dmvae.cli import _in_flag_names, _message, build_parser, main
from dmvae.cli._common import HelpFormatter, LineStream, apply_threads, default_threads


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def example_parsers(load_example) -> dict[str, argparse.ArgumentParser]:
    return {name: load_example(name).build_parser() for name in ("train_tokenizer", "train_latent_dit", "train_dmvae")}


def _visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.help is not argparse.SUPPRESS and a.option_strings]


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    dmvae.create_model("dmvae-tiny", image_size=32).save_pretrained(out)
    return out


@pytest.fixture()
def threads_restored():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["cli", "examples"])
def test_help_shows_only_meaningful_defaults(family: str, example_parsers) -> None:
    parsers = _subparsers() if family == "cli" else example_parsers
    for name, p in parsers.items():
        assert p.formatter_class is HelpFormatter, name  # one formatter for the CLI and the examples
        formatter = p._get_formatter()
        for action in _visible(p):
            text = formatter._get_help_string(action) % {"default": action.default, "prog": name} \
                if action.help else ""
            where = f"{name} {action.option_strings[0]}: {text!r}"
            assert "(default: None)" not in text and "(default: [])" not in text, where
            assert "(default: )" not in text, where
            if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
                assert "(default: True)" not in text and "(default: False)" not in text, where
            if action.required:
                assert "(default:" not in text, where
            assert "(required)" not in (action.help or "") or action.required, where  # required is required
        usage = p.format_usage()
        assert "[]" not in usage and " ]" not in usage, (name, usage)


def test_every_command_has_a_summary_and_a_description() -> None:
    """add_command takes both from the run function's docstring: summary, blank line, description."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {c.dest: c.help for c in subparsers._choices_actions}
    for name, p in subparsers.choices.items():
        assert summaries[name] and "\n" not in summaries[name], name  # one line in `dmvae --help`
        assert p.description and p.description != summaries[name], name
        assert p.get_default("func").__doc__.lstrip().startswith(summaries[name].split()[0]), name


def test_required_options_are_required() -> None:
    commands = _subparsers()
    assert next(a for a in commands["convert"]._actions if "--config" in a.option_strings).required


def test_every_command_that_computes_has_threads_and_json(example_parsers) -> None:
    for name, p in _subparsers().items():
        opts = {o for a in _visible(p) for o in a.option_strings}
        if "--device" in opts or name == "demo":
            assert "--threads" in opts, name
        assert "--json" in opts, name
    for name, p in example_parsers.items():
        assert "--threads" in {o for a in _visible(p) for o in a.option_strings}, name


# ---- threads -----------------------------------------------------------------------------------


def test_default_threads_follows_the_environment(monkeypatch, threads_restored) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("dmvae.cli._common._usable_cpus", lambda: 16)
    assert default_threads() == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads() == 4  # 16 CPUs shared by 4 local processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr("dmvae.cli._common._usable_cpus", lambda: 2)
    assert default_threads() == 1  # never below 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_threads() == 2  # the quiet 2-core measurement: 2 threads beat 1
    assert apply_threads(None) == 2 and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="--threads"):
        apply_threads(0)


def test_the_cli_sets_threads_before_the_command_runs(tmp_path, threads_restored) -> None:
    torch.set_num_threads(1)
    code = main(["encode", str(tmp_path / "missing.png"), "-o", str(tmp_path / "z.safetensors"), "--threads", "2"])
    assert code == 1  # the image is missing: the command ran, after the threads were set
    assert torch.get_num_threads() == 2


# ---- error messages ----------------------------------------------------------------------------


def test_errors_name_flags_not_python_arguments(tmp_path, tiny_model, capsys) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"  # weights without a config.json
    save_file(dmvae.DMVAE.from_pretrained(tiny_model).state_dict(), weights)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert main(["reconstruct", str(img), "-o", str(tmp_path / "rec"), "--model", str(weights)]) == 1
    err = capsys.readouterr().err
    assert "--config" in err and "config=" not in err, err
    # the translations, one by one
    assert "--lpips-weights FILE" in _in_flag_names("Provide them with LPIPS(weights='path.safetensors' | "
                                                    "'hf://owner/repo/file' | [trunk_file, heads_file]) or $X")
    assert "weights=" not in _in_flag_names("pass its path (--inception PATH, weights=PATH or $DMVAE_X).")
    assert "--dit-config" in _in_flag_names("x.pt comes without a config.json: pass config= (a LatentDiTConfig, "
                                            "a dict or a preset name)")


class _BadImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise ValueError(f"cannot read image {i}.png: expected RGB, got CMYK")


def test_an_error_in_a_dataloader_worker_is_one_line() -> None:
    loader = torch.utils.data.DataLoader(_BadImages(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch hands over: the worker's whole traceback
    assert _message(info.value) == ("cannot read image 0.png: expected RGB, got CMYK "
                                    "(in DataLoader worker process 0)")
    assert _message(ValueError("Caught nothing here")) == "Caught nothing here"  # other messages untouched


def test_preset_lookup_is_the_registry_s_in_any_case(capsys) -> None:
    assert main(["info", "dmvae-L", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == "preset dmvae-l" and info["latent_shape"] == [32, 16, 16]
    assert main(["info", "dmvae-XL"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'dmvae-l'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["reconstruct", "IMG", "-o", "OUT", "--model", "dmvae-tiny"],
                                  ["encode", "IMG", "-o", "OUT.safetensors", "--model", "DMVAE-Tiny"]])
def test_a_preset_given_as_weights_says_it_is_an_architecture(tmp_path, argv, capsys) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    argv = [str(img) if a == "IMG" else str(tmp_path / a) if a.startswith("OUT") else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is an architecture" in err and "hf download" in err and "not an existing file" not in err, err


# ---- output ------------------------------------------------------------------------------------


def test_reconstruct_keeps_class_subfolders_and_speaks_json(tmp_path, tiny_model, capsys) -> None:
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "imgs" / cls / "a.jpg")
    out = tmp_path / "rec"
    assert main(["reconstruct", str(tmp_path / "imgs"), "-o", str(out), "--model", str(tiny_model),
                 "--quiet", "--json"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["cats/a.png", "dogs/a.png"]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {Path(r["output"]).relative_to(out).as_posix() for r in lines} == {"cats/a.png", "dogs/a.png"}
    assert all(isinstance(r["psnr"], float) for r in lines)
    # without --json: text for people
    assert main(["reconstruct", str(tmp_path / "imgs"), "-o", str(out), "--model", str(tiny_model), "--quiet",
                 "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and not text.lstrip().startswith("{")


def test_progress_in_a_log_file_is_periodic_lines() -> None:
    from tqdm import tqdm

    sink = io.StringIO()
    stream = LineStream(sink, every=3600.0)
    with tqdm(total=500, file=stream, mininterval=0, miniters=1) as bar:
        for _ in range(500):
            bar.update(1)
    stream.write("a message, ")
    stream.write("in pieces\n")
    lines = sink.getvalue().splitlines()
    assert "\r" not in sink.getvalue()
    assert len(lines) <= 3, lines  # the first frame, the final one, the message; not 500 frames
    assert "500/500" in lines[-2] and lines[-1] == "a message, in pieces"


def test_demo_refuses_a_file_as_its_output_folder(tmp_path, capsys) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["demo", "-o", str(f), "--steps", "1", "--teacher-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "directory" in err and "File exists" not in err, err


# ---- library -----------------------------------------------------------------------------------


def test_encode_warns_for_images_in_0_1() -> None:
    vae = dmvae.create_model("dmvae-tiny", image_size=32)
    with pytest.warns(UserWarning, match=r"\[0, 1\].*2 \* x - 1"):
        vae.encode(torch.rand(2, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1)  # [-1, 1]: no warning


def test_dir_lists_the_public_api_only() -> None:
    names = {n for n in dir(dmvae) if not n.startswith("__")}
    assert not names & {"Any", "TYPE_CHECKING", "importlib", "annotations"}
    assert not {n for n in names if n.startswith("_")}
    assert {"DMVAE", "LatentDiT", "create_model"} <= names


def test_from_config_builds_random_models() -> None:
    vae = dmvae.DMVAE.from_config("dmvae-tiny", image_size=32)
    assert isinstance(vae, dmvae.DMVAE) and vae.config.image_size == 32
    dit = dmvae.LatentDiT.from_config({"input_size": 4, "in_channels": 8, "num_classes": 3, "depth": 1,
                                       "hidden_size": 32, "num_heads": 2, "patch_size": 1})
    assert dit.config.num_classes == 3


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch) -> None:
    from dmvae.sources import locate

    (tmp_path / "out" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        locate("out/tyny")
    assert "does not exist" in str(e.value) and "'tiny'" in str(e.value) and "download" not in str(e.value)
    assert locate("someone/a-model").repo_id == "someone/a-model"  # no local someone/: a Hub id


def test_a_hub_id_offline_names_the_current_download_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        dmvae.DMVAE.from_pretrained("someone/not-cached", cache_dir=str(tmp_path / "hub"))
    assert "hf download someone/not-cached" in str(e.value) and "huggingface-cli" not in str(e.value)
