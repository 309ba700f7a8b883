"""The CLI's shared vocabulary: one spelling per concept, old spellings as hidden aliases,
defaults in --help, the getting-started tables are true, broken pipes end quietly."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmvae.cli import build_parser, main
from dmvae.cli._common import default_num_workers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "getting_started.md"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _visible_options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions if a.help is not argparse.SUPPRESS for o in a.option_strings}


def test_getting_started_command_table_is_true() -> None:
    text = DOCS.read_text()
    table = text[text.index("## Command line") :]
    table = table[: table.index("One spelling per concept")]
    commands = _subparsers()
    rows = re.findall(r"^\| `dmvae ([a-z-]+)([^`]*)` \|", table, flags=re.M)
    assert {name for name, _ in rows} == set(commands)  # every command documented, no other
    for name, usage in rows:
        for opt in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage):
            assert opt in _visible_options(commands[name]), f"dmvae {name}: {opt} in the docs table"


def test_getting_started_vocabulary_table_is_used_everywhere() -> None:
    text = DOCS.read_text()
    vocab = text[text.index("One spelling per concept") :]
    documented = set(re.findall(r"`(--?[a-z][a-z-]*)", vocab[: vocab.index("`dmvae COMMAND --help`")]))
    commands = _subparsers()
    everywhere = set().union(*(_visible_options(p) for p in commands.values()))
    assert documented <= everywhere
    # the concept's one spelling is used by every command that has the concept
    for name, p in commands.items():
        opts = _visible_options(p)
        if any(o in opts for o in ("--model", "--dit")) and name != "demo":
            assert "--device" in opts, name
        if "--out" in opts:
            assert "-o" in opts, name
    for name in ("reconstruct", "encode", "decode", "sample", "eval-recon", "eval-gen", "convert"):
        assert "--overwrite" in _visible_options(commands[name]), name
    for name in ("reconstruct", "encode", "decode", "sample", "eval-recon", "eval-gen"):
        assert "--quiet" in _visible_options(commands[name]), name


@pytest.mark.parametrize("command", ["reconstruct", "encode", "decode", "sample", "eval-recon", "eval-gen",
                                     "convert", "info"])  # fmt: skip
def test_help_shows_defaults_and_hides_old_spellings(command: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no line breaks inside the checked words
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for old in ("--preset", "--use-ema", "--vae-preset", "--vae-ema", "--no-progress", "--dit-raw", "--npz ",
                "--size "):
        assert old not in text
    if command != "info":
        assert "(default:" in text
    if command in ("reconstruct", "encode", "decode"):
        assert "sen-ye/dmvae" in text and "(default: 8)" in text  # --model and --batch-size


@pytest.mark.parametrize(
    "command,old",
    [
        (["reconstruct", "x.png", "-o", "o"], ["--preset", "dmvae-l"]),
        (["reconstruct", "x.png", "-o", "o"], ["--size", "64"]),
        (["encode", "x.png", "-o", "o.safetensors"], ["--use-ema"]),
        (["eval-recon", "--data", "d"], ["--no-progress"]),
        (["convert", "a.pt", "out", "--config", "dmvae-tiny"], ["--preset", "dmvae-tiny"]),
        (["sample", "--dit", "d", "-o", "g.png"], ["--vae", "v"]),
        (["sample", "--dit", "d", "-o", "g.png"], ["--vae-preset", "dmvae-l"]),
        (["sample", "--dit", "d", "-o", "g.png"], ["--vae-ema"]),
        (["sample", "--dit", "d", "-o", "g.png"], ["--dit-raw"]),
        (["sample", "--dit", "d"], ["--npz", "s.npz"]),
    ],
)
def test_old_spellings_are_gone(command, old, capsys) -> None:
    """Nothing was released, so no old spelling is kept as a hidden alias."""
    build_parser().parse_args(command)  # the command itself parses
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, *old])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_new_spellings(capsys) -> None:
    a = build_parser().parse_args(["reconstruct", "x", "-o", "o", "--config", "dmvae-l", "--no-ema", "--quiet"])
    assert (a.config, a.ema, a.quiet) == ("dmvae-l", False, True)
    assert capsys.readouterr().err == ""
    b = build_parser().parse_args(["sample", "--dit", "d", "--no-dit-ema", "-o", "x.npz"])
    assert b.dit_ema is False and b.ema is None and b.model == "sen-ye/dmvae"


def test_default_worker_count_fits_the_machine() -> None:
    cpus = len(os.sched_getaffinity(0))
    n = default_num_workers()
    assert 0 <= n <= max(cpus - 1, 0) and n <= 4
    assert _subparsers()["eval-recon"].get_default("num_workers") == n


@pytest.mark.slow  # a fresh interpreter
def test_info_json_into_a_closed_pipe_has_no_traceback() -> None:
    """`dmvae info --json | head` must not end in a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "dmvae", "info", "LightningDiT-XL/1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_info_of_a_dit_without_null_class(tmp_path, capsys) -> None:
    from dmvae.dit import LatentDiTConfig

    LatentDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=5, class_dropout_prob=0.0).save(tmp_path / "config.json")  # fmt: skip
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "null class" in out and "+ null class" not in out
    assert main(["info", "LightningDiT-XL/1"]) == 0
    assert "+ null class 1000" in capsys.readouterr().out


def test_info_bad_json_names_the_file_and_field(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text('{"_class_name": "LatentDiTConfig", "depth": 2,, "x": 1}')
    assert main(["info", str(tmp_path / "config.json")]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "'depth'" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text('{"_class_name": "LatentDiTConfig", "depth": "2"}')
    assert main(["info", str(tmp_path)]) == 1
    assert "depth" in capsys.readouterr().err
