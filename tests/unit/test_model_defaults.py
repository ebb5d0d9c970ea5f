"""Every command, and the Python API, embeds with the shipped model unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carsearch.cli import _overrides, build_parser, command_parsers, main
from carsearch.config import DetectorConfig, PipelineConfig, load_config, upgrade_config
from carsearch.config_files import from_dict, to_dict
from carsearch.embedder.zoo import DEFAULT_MODEL
from carsearch.pipeline import Pipeline
from tests.conftest import build_gallery

# the shipped model as shipped, on torch (the onnxruntime default is tested in tests/unit/embedder/test_zoo.py)
SMALL = ["--set", "embedder.runtime=torch", "--set", "runtime.workers=0", "--set", "index.use_gpu=false"]


@pytest.mark.parametrize("argv", [["index", "SRC", "--out", "X"], ["attention", "SRC"]], ids=lambda argv: argv[0])
def test_commands_that_build_a_pipeline_default_to_the_shipped_model(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert load_config(None, _overrides(args)).embedder.model == DEFAULT_MODEL
    args = build_parser().parse_args([*argv, "--model", "imagenet"])
    assert load_config(None, _overrides(args)).embedder.model == "imagenet"


def test_the_python_api_and_export_default_to_the_shipped_model() -> None:
    assert Pipeline.from_config().config.embedder.model == DEFAULT_MODEL
    assert command_parsers()["export"].parse_args(["--out", "out.pt"]).model == DEFAULT_MODEL


@pytest.fixture(scope="module")
def default_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = build_gallery(tmp_path_factory.mktemp("defaults") / "gallery", classes=3, per_class=2)
    out = root.parent / "idx"
    assert main(["index", str(root), "--out", str(out), "--raw", "--no-progress", *SMALL]) == 0
    return root, out


def test_index_records_the_shipped_model_and_search_explain_demo_use_it(
    default_index: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = default_index
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedder"]["source"] == DEFAULT_MODEL and manifest["embedder"]["dim"] == 1280
    assert len(manifest["embedder"]["train_labels"]) == 98
    assert Pipeline.for_index(out).config.embedder.model == DEFAULT_MODEL  # search, explain, demo
    query = root / "class_2" / "img_1.jpg"
    assert main(["search", str(out), str(query), "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["path"] == str(query)
    assert main(["explain", str(out), str(query), "--top", "1", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "pair_01.png").exists()
    from carsearch.demo.handlers import DemoBackend

    backend = DemoBackend.load(out, overrides=["embedder.runtime=torch"])
    assert backend.main.pipeline.embedder.source == DEFAULT_MODEL


def test_evaluate_says_the_gallery_classes_are_unseen(
    default_index: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = default_index
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unseen (3 classes)" in printed
    assert "0 of the index's 3 labels equal a training class name" in printed
    assert "No evaluated class is a training class of the embedder: all 3 are unseen" in printed


def test_an_index_built_before_named_models_opens_with_its_own_embedder(default_index: tuple[Path, Path]) -> None:
    _, out = default_index
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["embedder"].pop("model")
    manifest["config"]["embedder"]["checkpoint"] = None  # what an index of the pretrained backbone recorded
    (out / "manifest.json").write_text(json.dumps(manifest))
    try:
        assert Pipeline.for_index(out).config.embedder.model == "imagenet"
    finally:
        manifest["config"]["embedder"].pop("checkpoint")
        manifest["config"]["embedder"]["model"] = DEFAULT_MODEL
        (out / "manifest.json").write_text(json.dumps(manifest))


def test_an_index_built_before_the_detector_fallback_queries_without_it() -> None:
    """Its images were embedded whole when no box passed the confidence: its queries must be too."""
    old = to_dict(PipelineConfig())
    del old["detector"]["fallback_confidence"]
    assert DetectorConfig().fallback_confidence is not None  # today's default has a fallback
    assert from_dict(PipelineConfig, upgrade_config(old)).detector.fallback_confidence is None
    kept = to_dict(PipelineConfig())
    assert from_dict(PipelineConfig, upgrade_config(kept)).detector.fallback_confidence == 0.05


def test_an_index_built_before_padded_small_photos_queries_with_them_enlarged() -> None:
    """Its small photos were enlarged to the detector's input: its queries must be too."""
    assert DetectorConfig().enlarge_small is False  # today's default pads
    old = to_dict(PipelineConfig(detector=DetectorConfig(enlarge_small=False)))
    del old["detector"]["enlarge_small"]
    assert from_dict(PipelineConfig, upgrade_config(old)).detector.enlarge_small is True
    padded = to_dict(PipelineConfig(detector=DetectorConfig(enlarge_small=False)))
    assert from_dict(PipelineConfig, upgrade_config(padded)).detector.enlarge_small is False
