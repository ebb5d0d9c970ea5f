"""The command line on a tiny gallery: index → search (table and JSON) → evaluate, and error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carsearch.cli import build_parser, flags_markdown, main
from carsearch.errors import ConfigError
from tests.conftest import TEST_OVERRIDES, build_gallery

SETS = sum((["--set", o] for o in TEST_OVERRIDES), [])


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = build_gallery(tmp_path_factory.mktemp("cli") / "gallery", classes=2, per_class=3)
    out = root.parent / "idx"
    assert main(["index", str(root), "--out", str(out), "--raw", "--no-progress", *SETS]) == 0
    return root, out


def test_index_prints_a_summary(cli_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, out = cli_index
    assert main(["index", str(root), "--out", str(out), "--raw", "--no-progress", "--json", *SETS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == 6 and report["items_in_index"] == 6


def test_search_table_and_json(cli_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, out = cli_index
    query = root / "class_1" / "img_2.jpg"
    assert main(["search", str(out), str(query), "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and "class_1" in table and str(query) in table
    assert main(["search", str(out), str(query), "-k", "3", "--json", "--exclude-self"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in data["hits"]] == [1, 2, 3]
    assert all(h["path"] != str(query) for h in data["hits"])
    assert data["query"]["flags"] == ["raw"]


def test_evaluate_json(cli_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, out = cli_index
    assert main(["evaluate", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["recall_at"]) == {"1", "2", "4", "8"}
    assert 0 <= data["map_at_r"] <= 1 and data["items"] == 6


def test_evaluate_and_search_with_rerank(cli_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, out = cli_index
    rerank = ["--rerank", "aqe,kreciprocal", "--set", "retrieval.k1=2", "--set", "retrieval.qe_k=1"]
    assert main(["evaluate", str(out), "--json", *rerank]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["retrieval"]["kreciprocal"] is True and data["retrieval"]["qe_k"] == 1  # --set refines --rerank
    assert data["retrieval"]["k1"] == 2 and set(data["reranked"]["recall_at"]) == {"1", "2", "4", "8"}
    assert data["reranked"]["num_queries"] == data["num_queries"] == 6
    assert main(["evaluate", str(out), "--rerank", "kreciprocal"]) == 0
    table = capsys.readouterr().out
    assert "all + kreciprocal" in table and "MAP@R" in table
    query = root / "class_1" / "img_2.jpg"
    assert main(["search", str(out), str(query), "-k", "3", "--json", "--exclude-self", *rerank]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["path"] != str(query) for h in hits)
    assert main(["evaluate", str(out), "--rerank", "bogus"]) == 2
    assert "unknown re-ranking 'bogus'" in capsys.readouterr().err


def test_flip_index_is_searched_with_flip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build_gallery(tmp_path / "gallery", classes=2, per_class=2)
    out = tmp_path / "idx"
    assert main(["index", str(root), "--out", str(out), "--raw", "--flip", "--no-progress", *SETS]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedder"]["tta"] == "flip" and manifest["config"]["embedder"]["flip"] is True
    query = root / "class_1" / "img_1.jpg"
    assert main(["search", str(out), str(query), "-k", "1", "--json"]) == 0  # queries follow the index
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["path"] == str(query) and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["search", str(out), str(query), "--set", "embedder.flip=false"]) == 2
    assert "tta" in capsys.readouterr().err


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a carsearch index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--raw"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "detector.bogus=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_explain_writes_overlays(
    cli_index: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = cli_index
    query = root / "class_1" / "img_2.jpg"
    args = ["explain", str(out), str(query), "--top", "2", "--out", str(tmp_path / "x"), "--box", "0,0,80,60"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "attention-in-box:" in printed and "#2" in printed
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "explain.json",
        "pair_01.png",
        "pair_02.png",
        "query.png",
        "topk.png",
    ]
    assert main([*args[:-2], "--box", "1,2,3"]) == 2
    assert "--box must be x1,y1,x2,y2" in capsys.readouterr().err


def test_attention_reports_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import make_car_image

    rows = ["path,label,x1,y1,x2,y2"]
    for i in range(2):
        make_car_image(i, (200, 30, 30)).save(tmp_path / f"car{i}.jpg")
        rows.append(f"car{i}.jpg,red,10,20,150,110")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    args = ["attention", str(tmp_path / "data.csv"), "--crop-source", "gt", "--no-progress", *SETS]
    assert main([*args, "--out", str(tmp_path / "att"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["modes"]) == {"raw", "crop"} and result["modes"]["raw"]["count"] == 2
    saved = json.loads((tmp_path / "att" / "attention.json").read_text())
    assert len(saved["items"]["crop"]) == 2 and (tmp_path / "att" / "attention.png").stat().st_size > 0
    assert main([*args, "--inputs", "whole"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["mode", "images", "mean"] and "crop" not in table


def test_evaluate_and_audit_take_index_settings(
    cli_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = cli_index
    assert main(["evaluate", str(out), "--json", "--set", "index.nprobe=4", "--set", "index.use_gpu=false"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 6
    assert main(["audit", str(out), "--json", "--set", "index.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_docs_flag_table_is_the_parsers_table() -> None:
    """docs/cli.md lists exactly the flags each command's parser takes (and so honours)."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    block = readme.split("<!-- cli-flags:start -->\n", 1)[1].split("\n<!-- cli-flags:end -->", 1)[0]
    assert block == flags_markdown()


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "idx", "q.jpg", "--config", "c.yaml"],
        ["explain", "idx", "q.jpg", "--out", "o", "--config", "c.yaml"],
        ["demo", "idx", "--config", "c.yaml"],
        ["evaluate", "idx", "--device", "cuda"],
        ["audit", "idx", "--detector-weights", "w.pt"],
    ],
)
def test_flags_a_command_would_ignore_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_train_and_compare_take_device(tmp_path: Path) -> None:
    from carsearch.embedder.training.run import device_overrides

    assert device_overrides("cuda:1") == ["trainer.accelerator=gpu", "trainer.devices=1,"]
    assert device_overrides("cpu") == ["trainer.accelerator=cpu"]
    with pytest.raises(ConfigError, match="--device"):
        device_overrides("tpu")
    args = build_parser().parse_args(["train", "--device", "cpu", "-v", "--set", "trainer.max_epochs=1"])
    assert args.device == "cpu" and args.verbose and args.overrides == ["trainer.max_epochs=1"]
    parsed = build_parser().parse_args(["compare", "--out", str(tmp_path), "--device", "cpu"])
    assert parsed.device == "cpu"
