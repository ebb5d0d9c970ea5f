"""Every input a user can type wrong gets one line on stderr and exit 2, never a traceback or silent nonsense."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest

from carsearch import cli
from carsearch.cli import main
from carsearch.config import RuntimeConfig
from carsearch.embedder import zoo
from carsearch.errors import ConfigError
from tests.conftest import SHARED_DETECTOR, TEST_OVERRIDES, build_gallery

SETS = sum((["--set", o] for o in TEST_OVERRIDES), [])


@pytest.fixture(scope="module")
def raw_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = build_gallery(tmp_path_factory.mktemp("errors") / "gallery", classes=2, per_class=2)
    out = root.parent / "idx"
    assert main(["index", str(root), "--out", str(out), "--raw", "--no-progress", *SETS]) == 0
    return root, out, root / "class_0" / "img_0.jpg"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``carsearch ARGV`` in-process (argparse's exits included)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


# (argv with {INDEX}, {QUERY}, {GALLERY}, {OUT}; a text the one line must hold)
MISTAKES = [
    (["search", "{INDEX}", "{QUERY}", "--device", "cuda:7"], "cuda"),
    (["search", "{INDEX}", "{QUERY}", "--device", "gpu"], "argument --device: must be auto, cpu, cuda"),
    (["config", "--set", "runtime.device=gpu"], "runtime.device must be one of"),
    (["train", "--device", "gpu"], "argument --device"),
    (["search", "{INDEX}", "{QUERY}", "-k", "0"], "argument -k: must be an integer >= 1, got '0'"),
    (["search", "{INDEX}", "{QUERY}", "-k", "-3"], "argument -k"),
    (["search", "{INDEX}", "{QUERY}", "-k", "ten"], "argument -k"),
    (["audit", "{INDEX}", "-k", "0"], "argument -k"),
    (["audit", "{INDEX}", "--near", "7"], "argument --near: must be a cosine similarity in (0, 1]"),
    (["audit", "{INDEX}", "--near", "0"], "argument --near"),
    (["audit", "{INDEX}", "--max-agree", "1.5"], "argument --max-agree: must be a share in [0, 1]"),
    (["explain", "{INDEX}", "{QUERY}", "--out", "{OUT}", "--top", "0"], "argument --top"),
    (["attention", "{GALLERY}", "--limit", "0"], "argument --limit"),
    (["attention", "{GALLERY}", "--batch-size", "0"], "argument --batch-size"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--workers", "-1"], "argument --workers: must be an integer >= 0"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--batch-size", "0"], "argument --batch-size"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--engine", "ray", "--ray-cpus", "0"], "argument --ray-cpus"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--ray-gpus-per-actor", "-1"], "argument --ray-gpus-per-actor"),
    (["demo", "{INDEX}", "--port", "70000"], "argument --port: must be a port, 1-65535"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--raw", "--model", "nosuch", *SETS[2:]], "cars98-lite1-320, "),
    (["index", "{GALLERY}", "--out", "{OUT}", "--raw", "--detector-weights", "w.pt"], "drop --detector-weights"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--raw", "--crop-source", "gt"], "drop --crop-source"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--ray-actors", "1,1"], "apply to --engine ray only"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--engine", "ray", "--ray-address", "auto", "--ray-cpus", "2"], "own"),
    (["index", "{GALLERY}", "--out", "{OUT}", "--raw", "--split", "train", *SETS], "applies to a Stanford devkit"),
    (["search", "{INDEX}", "{QUERY}", "detector.confidence=0.3"], "did you mean --set detector.confidence=0.3?"),
    (["models", "nosuch"], "shipped: cars98-lite1-320"),
    (["models", "imagenet", "--classes"], "no car classes"),
    (["help", "nope"], "no command 'nope'"),
]


@pytest.mark.parametrize(("argv", "expected"), MISTAKES, ids=[" ".join(a[:1] + a[2:5]) for a, _ in MISTAKES])
def test_a_typed_mistake_is_one_line_and_exit_2(
    argv: list[str],
    expected: str,
    raw_index: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gallery, index, query = raw_index
    names = {"{INDEX}": str(index), "{QUERY}": str(query), "{GALLERY}": str(gallery), "{OUT}": str(tmp_path / "o")}
    code, err = run([names.get(a, a) for a in argv], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err


def test_the_unknown_model_message_lists_the_shipped_names_from_the_table(
    raw_index: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery, _, _ = raw_index
    code, err = run(
        ["index", str(gallery), "--out", str(tmp_path / "o"), "--raw", "--model", "nosuch", *SETS[2:]], capsys
    )
    assert code == 2 and all(name in err for name in zoo.MODELS) and "checkpoint path or URI" in err


def test_device_names_are_checked_at_config_load_and_presence_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from carsearch.runtime.device import resolve_device

    for good in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert RuntimeConfig(device=good).device == good
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x", "cpu:0"):
        with pytest.raises(ConfigError, match="runtime.device must be one of"):
            RuntimeConfig(device=bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^CUDA was asked for \(--device cuda\) but this machine has no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^cuda:3 asked for, 1 GPU present; available: cpu, cuda:0"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_help_help_prints_the_help_command_s_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help", "help"]) == 0
    assert capsys.readouterr().out.startswith("usage: carsearch help")


def test_a_full_disk_is_one_line_and_the_merge_file_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from carsearch.index import GalleryIndex

    root = build_gallery(tmp_path / "gallery", classes=2, per_class=1)
    out = tmp_path / "idx"
    merged: list[Path] = []

    def full_disk(self: GalleryIndex, folder: Path) -> None:
        merged.extend((Path(folder) / "work").glob("merged-*"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(GalleryIndex, "save", full_disk)
    code, err = run(["index", str(root), "--out", str(out), "--raw", "--no-progress", *SETS], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"no space left on device while writing {out}/…; finished chunks are kept in {out / 'work'}" in err
    assert merged and not any(path.exists() for path in merged)  # there while saving, gone after the failure


def test_other_os_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    commands = tuple(dataclasses.replace(c, run=broken) if c.name == "models" else c for c in cli.COMMANDS)
    monkeypatch.setattr(cli, "COMMANDS", commands)
    with pytest.raises(OSError, match="I/O error"):
        main(["models"])


def test_non_image_files_of_a_folder_are_recorded_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    root = build_gallery(tmp_path / "gallery", classes=1, per_class=2)
    (root / "class_0" / "notes.txt").write_text("not a car")
    (root / "class_0" / ".hidden.txt").write_text("ignored")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.bin").write_bytes(b"ignored")
    out = tmp_path / "idx"
    assert main(["index", str(root), "--out", str(out), "--raw", "--no-progress", "--json", *SETS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 1 and report["items_in_index"] == 2
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [
        {"content_hash": None, "path": str(root / "class_0" / "notes.txt"), "reason": "not an image file (.txt)"}
    ]


def test_models_lists_the_table_and_prints_training_classes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:5] == ["name", "backbone", "input", "dim", "classes"]
    assert [row.split()[0] for row in rows[1 : 1 + len(zoo.MODELS)]] == list(zoo.MODELS)
    assert rows[1].startswith(f"{zoo.DEFAULT_MODEL} *") and "tf_efficientnet_lite1    320  1280      98" in rows[1]
    assert main(["models", zoo.DEFAULT_MODEL, "--classes"]) == 0
    classes = capsys.readouterr().out.splitlines()
    assert len(classes) == 98 and "Audi TTS Coupe 2012" in classes and classes == sorted(classes)


@pytest.mark.parametrize("name", [n for n, m in zoo.MODELS.items() if m.path is not None])
def test_each_model_card_matches_its_checkpoint(name: str) -> None:
    from carsearch.embedder.checkpoint import read_checkpoint, train_labels

    card = zoo.MODELS[name]
    payload = read_checkpoint(*zoo.shipped_checkpoint(name))
    spec = payload["spec"]
    assert card.backbone == spec["backbone"] and spec["embedding_dim"] is None and card.dim == 1280
    assert card.input_size == (card.image_size or spec["preprocessing"]["image_size"])
    assert card.train_classes == len(train_labels(payload) or ())


@pytest.mark.skipif(not SHARED_DETECTOR.exists(), reason="shared offline detector absent")
def test_the_litert_delegate_notice_is_silenced_and_other_stderr_kept(capfd: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from carsearch.config import DetectorConfig
    from carsearch.detector import VehicleDetector
    from carsearch.detector.yolo import _without_delegate_notice

    detector = VehicleDetector(DetectorConfig(weights=str(SHARED_DETECTOR)))
    detector.detect([Image.new("RGB", (64, 64))])
    assert "XNNPACK" not in capfd.readouterr().err
    with _without_delegate_notice():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nreal error\n")
    assert capfd.readouterr().err == "real error\n"
