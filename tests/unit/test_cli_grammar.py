"""One command-line grammar: help, --version, --set everywhere, defaults in help, configs by name."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carsearch.cli import build_parser, command_parsers, main
from carsearch.config import load_config
from carsearch.config_files import CONFIGS_DIR, resolve_config
from carsearch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_no_arguments_and_help_print_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: carsearch") and all(f"    {name}" in text for name in command_parsers())
    assert main(["help"]) == 0 and capsys.readouterr().out == text
    assert main(["help", "export"]) == 0
    assert capsys.readouterr().out.startswith("usage: carsearch export")
    with pytest.raises(SystemExit) as exit_info:
        main(["help", "nope"])
    assert exit_info.value.code == 2 and "no command 'nope'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"carsearch {md.version('carsearch')}"


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("name", list(command_parsers()))
def test_every_flag_has_help_and_shows_its_real_default(name: str) -> None:
    parser = command_parsers()[name]
    rendered = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in _actions(parser):
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert "(default:" not in action.help, "defaults are generated, never written by hand"
        default = action.default
        if default not in (None, False, []) and default is not argparse.SUPPRESS:
            assert f"(default: {default})" in rendered, f"{name} {action.option_strings} hides its default"


def test_metavars_outputs_and_overrides_are_the_same_everywhere() -> None:
    for name, parser in command_parsers().items():
        flags = {flag: action for action in _actions(parser) for flag in action.option_strings}
        positional = [a.metavar for a in _actions(parser) if not a.option_strings]
        assert set(positional) <= {"INDEX", "SOURCE", "IMAGE", "RUN", "MODEL"}, name
        assert "--set" in flags or name in ("export", "models"), f"{name} takes no --set"  # they read no config
        if "--config" in flags:
            assert flags["--config"].metavar == "CONFIG"
        if name in ("index", "explain", "attention", "compare", "export"):
            assert "--out" in flags, f"{name} names its output another way"
        if "--model" in flags:
            assert "imagenet" in flags["--model"].help or "index" in flags["--model"].help
    raw = [name for name, parser in command_parsers().items() if "--raw" in parser._option_string_actions]
    assert raw == ["index"]  # one meaning: no detector


def test_bare_overrides_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "cpu_quick", "trainer.max_epochs=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: trainer.max_epochs=1" in err
    assert "did you mean --set trainer.max_epochs=1?" in err and len(err.splitlines()) == 1
    args = build_parser().parse_args(["train", "--config", "cpu_quick", "--set", "trainer.max_epochs=1"])
    assert args.overrides == ["trainer.max_epochs=1"]


def test_configs_by_name_and_by_repository_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository root: names and configs/ paths still resolve
    assert resolve_config("cpu_quick") == CONFIGS_DIR / "train" / "cpu_quick.yaml"
    assert resolve_config("configs/train/cpu_full.yaml") == CONFIGS_DIR / "train" / "cpu_full.yaml"
    assert load_config("offline").detector.weights.endswith("yolov8n_coco_int8.tflite")
    with pytest.raises(ConfigError, match="config file not found: nope .*shipped configs: .*cpu_quick"):
        load_config("nope")
    (tmp_path / "cpu_quick").mkdir()  # a path that exists wins over a name
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "cpu_quick"))


def test_the_config_command_prints_the_effective_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", "cpu_full", "--set", "trainer.max_epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3 and printed["loss"]["miner"] == "semihard"
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["embedder"]["model"] == "cars98-lite1-320"
    assert main(["config", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "cpu_quick" in listing and "TrainConfig" in listing and "offline" in listing
    assert main(["config", "--config", "offline", "--set", "detector.bogus=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_a_non_editable_install_carries_configs_and_the_shipped_model(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "site"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "carsearch", source / "carsearch", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True, env={**os.environ, "PIP_NO_INDEX": "1"}, timeout=300,
    )  # fmt: skip
    probe = (
        "import carsearch, carsearch.config as c, carsearch.config_files as f, carsearch.embedder.zoo as z\n"
        "from carsearch.embedder.checkpoint import read_checkpoint, train_labels\n"
        f"assert carsearch.__file__.startswith({str(target)!r}), carsearch.__file__\n"
        "assert c.load_config('offline').detector.weights.endswith('.tflite')\n"
        "assert f.resolve_config('cpu_full').is_file()\n"
        "path, sha = z.shipped_checkpoint(z.DEFAULT_MODEL)\n"
        "print(len(train_labels(read_checkpoint(path, sha))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "98"


def test_the_cli_choices_are_the_tables_that_define_them() -> None:
    """Each CAM method, engine, split, crop source and export embedding is written once; the flags offer exactly
    those."""
    import typing

    from carsearch.cli import command_parsers
    from carsearch.config import CropSource
    from carsearch.data.sources import Split
    from carsearch.embedder.training.module import FeatureKind
    from carsearch.explain.cam import METHODS
    from carsearch.pipeline.pipeline import ENGINES

    def choices(command: str, flag: str) -> list[str]:
        action = next(a for a in command_parsers()[command]._actions if flag in a.option_strings)
        return list(action.choices or [])

    assert choices("explain", "--method") == choices("demo", "--method") == list(METHODS)
    assert choices("index", "--engine") == list(ENGINES)
    assert choices("index", "--split") == choices("attention", "--split") == list(typing.get_args(Split))
    assert choices("index", "--crop-source") == list(typing.get_args(CropSource))
    assert choices("export", "--embedding") == list(typing.get_args(FeatureKind))


def test_names_in_help_texts_are_the_tables_names() -> None:
    """Help that lists names by hand lists real ones: re-ranking presets, devices, shipped configs."""
    from carsearch.cli import DEVICE_HELP, RERANK_HELP
    from carsearch.config import DEVICE_NAMES, RERANK_PRESETS
    from carsearch.config_files import config_names

    assert all(f"{name} " in RERANK_HELP or f"{name}," in RERANK_HELP for name in RERANK_PRESETS)
    assert all(name in DEVICE_HELP for name in DEVICE_NAMES.split(", "))
    helps = " ".join(
        a.help or "" for p in command_parsers().values() for a in p._actions if "--config" in a.option_strings
    )
    named = {n for group in re.findall(r"a shipped name \(([^)]*)\)", helps) for n in group.split(", ") if n != "..."}
    assert named and named <= set(config_names()), named - set(config_names())


def test_each_command_is_one_entry_of_the_table() -> None:
    """``build_parser`` makes one sub-parser per ``COMMANDS`` entry, in order, described by the entry's help."""
    from carsearch.cli import COMMANDS

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subs.choices) == [command.name for command in COMMANDS]
    assert all(subs.choices[command.name].description == command.help for command in COMMANDS)


def test_help_imports_no_heavy_library() -> None:
    """``carsearch``, ``carsearch help CMD`` and ``carsearch CMD --help`` import no torch, timm, faiss, YOLO, gradio."""
    code = (
        "import contextlib, io, sys\n"
        "from carsearch.cli import COMMANDS, main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main([]) == 0\n"
        "    for command in COMMANDS:\n"
        "        assert main(['help', command.name]) == 0\n"
        "        try:\n"
        "            main([command.name, '--help'])\n"
        "        except SystemExit as exit_info:\n"
        "            assert exit_info.code == 0\n"
        "print(sorted(m for m in ('torch', 'timm', 'faiss', 'ultralytics', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_functions_are_short_and_public_ones_state_their_rule() -> None:
    """No function of cli.py is longer than 80 lines (def to last line); each public one has a docstring."""
    import ast

    tree = ast.parse((ROOT / "carsearch" / "cli.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if (f.end_lineno or 0) - f.lineno + 1 > 80}
    assert not long, f"split these functions (lines): {long}"
    public = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    assert not [n.name for n in public if not ast.get_docstring(n)]
