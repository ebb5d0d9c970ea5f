"""carsearch.config and carsearch.config_files: frozen, validated configuration loaded from YAML plus ``key=value``
overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from carsearch.config import (
    DEFAULT_VEHICLE_CLASSES,
    DetectorConfig,
    EmbedderConfig,
    IndexConfig,
    PipelineConfig,
    RuntimeConfig,
    load_config,
)
from carsearch.config_files import CONFIGS_DIR, apply_overrides, from_dict, resolve_paths, to_dict
from carsearch.errors import ConfigError

CONFIG_DIR = CONFIGS_DIR
EXPERIMENT_CONFIGS = {"compare.yaml"}  # carsearch compare's own config, tested in test_compare
CONFIG_FILES = sorted(
    p for p in [*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")] if p.name not in EXPERIMENT_CONFIGS
)


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults and files


def test_defaults():
    config = load_config()
    assert config == PipelineConfig()
    assert config.detector.classes == DEFAULT_VEHICLE_CLASSES == ("car", "truck", "bus")
    assert config.detector.confidence == 0.35 and config.detector.fallback_confidence == 0.05
    assert config.detector.selection == "largest"
    assert config.embedder.model == "cars98-lite1-320" and config.embedder.runtime == "auto"
    assert config.index.kind == "auto"
    assert config.crop is True and config.crop_source == "detector"
    assert load_config(None, []) == config


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == PipelineConfig()
    assert load_config(_write(tmp_path, "# only a comment\n", "c.yaml")) == PipelineConfig()


def test_load_yaml_file(tmp_path):
    path = _write(
        tmp_path,
        """
detector:
  weights: yolov8n.onnx
  classes: [car, bus]
  confidence: 0.4
  selection: most_confident
embedder:
  model: runs/best.ckpt
  embedding_dim: 128
  pretrained: false
index:
  kind: hnsw
runtime:
  device: cuda:1
  threads: 4
crop: false
crop_source: gt
""",
    )
    config = load_config(path)
    assert config.detector.weights == "yolov8n.onnx"
    assert config.detector.classes == ("car", "bus")
    assert config.detector.confidence == 0.4
    assert config.detector.selection == "most_confident"
    assert config.detector.iou == DetectorConfig().iou  # untouched keys keep their defaults
    assert config.embedder == EmbedderConfig(model="runs/best.ckpt", embedding_dim=128, pretrained=False)
    assert config.index == IndexConfig(kind="hnsw")
    assert config.runtime == RuntimeConfig(device="cuda:1", threads=4)
    assert config.crop is False and config.crop_source == "gt"


def test_file_then_overrides(tmp_path):
    path = _write(tmp_path, "detector:\n  confidence: 0.3\n  iou: 0.6\ncrop: true\n")
    config = load_config(path, ["detector.confidence=0.4", "crop=false"])
    assert config.detector.confidence == 0.4  # the override wins
    assert config.detector.iou == 0.6  # the file's other keys stay
    assert config.crop is False
    assert path.read_text().startswith("detector:")  # file untouched


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "detector: [unclosed\n"))


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping of sections, got a list"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="detector.*expected a mapping, got str"):
        load_config(_write(tmp_path, "detector: yolo.pt\n", "d.yaml"))


def test_yaml_list_with_overrides_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "- a\n- b\n"), ["detector.confidence=0.4"])


def test_directory_as_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES])
def test_shipped_config_files_load(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    raw = yaml.safe_load(path.read_text()) or {}
    assert isinstance(raw, dict)
    # every key the file sets is reflected in the loaded config
    loaded = to_dict(config)
    for section, value in raw.items():
        if isinstance(value, dict):
            for key, item in value.items():
                expected = list(item) if isinstance(item, (list, tuple)) else resolve_paths(item, path.parent)
                if isinstance(loaded[section][key], list) and isinstance(item, str):
                    continue  # comma-separated list shorthand
                assert loaded[section][key] == expected, f"{section}.{key}"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "detecter:\n  confidence: 0.3\n"))
    message = str(info.value)
    assert "detecter" in message
    for valid in ("crop", "crop_source", "detector", "embedder", "index", "runtime"):
        assert valid in message


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "detector:\n  confidance: 0.3\n"))
    message = str(info.value)
    assert "detector" in message and "confidance" in message
    assert "valid keys" in message
    for field in dataclasses.fields(DetectorConfig):
        assert field.name in message


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nprobes'\].*nprobe"):
        load_config(None, ["index.nprobes=4"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["bogus=1"])


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("detector.image_size=abc", r"detector\.image_size: expected an integer"),
        ("detector.image_size=640.5", r"detector\.image_size: expected an integer"),
        ("detector.image_size=true", r"detector\.image_size: expected an integer"),
        ("embedder.batch_size=[1,2]", r"embedder\.batch_size: expected an integer"),
        ("embedder.embedding_dim=abc", r"embedder\.embedding_dim: expected an integer"),
        ("detector.confidence=high", r"detector\.confidence: expected a number"),
        ("detector.confidence=false", r"detector\.confidence: expected a number"),
        ("detector.weights=[a.pt,b.pt]", r"detector\.weights: expected a string"),
        ("runtime.device={cuda: 1}", r"runtime\.device: expected a string"),
        ("crop=maybe", r"crop: expected true/false"),
        ("crop=2", r"crop: expected true/false"),
        ("index.use_gpu=[true]", r"index\.use_gpu: expected true/false"),
        ("detector.classes=5", r"detector\.classes: expected a list"),
        (
            "detector.selection=bogus",
            r"detector\.selection: expected one of \['largest', 'most_confident', 'all'\]",
        ),
        ("crop_source=manual", r"crop_source: expected one of"),
        ("index.kind=Flat", r"index\.kind: expected one of"),
        ("detector=5", r"expected a mapping, got int"),
    ],
)
def test_wrong_types(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_wrong_types_in_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime\.workers: expected an integer"):
        load_config(_write(tmp_path, "runtime:\n  workers: two\n"))


def test_infinite_integer_is_a_config_error():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["detector.image_size=.inf"])


def test_lenient_but_exact_coercions():
    config = load_config(
        None,
        [
            "detector.image_size='320'",  # integer-valued string
            "detector.max_detections=5.0",  # integral float
            "detector.confidence=1",  # int for float
            "index.use_gpu=no",  # yes/no, true/false, 1/0 strings
            "crop='TRUE'",
            "embedder.embedding_dim=null",  # Optional accepts None
            "runtime.threads=3",
        ],
    )
    assert config.detector.image_size == 320 and isinstance(config.detector.image_size, int)
    assert config.detector.max_detections == 5 and isinstance(config.detector.max_detections, int)
    assert config.detector.confidence == 1.0 and isinstance(config.detector.confidence, float)
    assert config.index.use_gpu is False
    assert config.crop is True
    assert config.embedder.embedding_dim is None
    assert config.runtime.threads == 3


# --------------------------------------------------------------------------- overrides


def test_overrides():
    config = load_config(None, ["detector.confidence=0.4", "crop=false", "detector.classes=[car,truck]"])
    assert config.detector.confidence == 0.4
    assert config.crop is False
    assert config.detector.classes == ("car", "truck")
    assert config.detector.weights == DetectorConfig().weights


def test_classes_override_as_comma_separated_string():
    assert load_config(None, ["detector.classes=car, bus"]).detector.classes == ("car", "bus")
    assert load_config(None, ["detector.classes=[motorcycle]"]).detector.classes == ("motorcycle",)


def test_override_value_may_contain_equals_sign():
    assert load_config(None, ["detector.weights=runs/a=b.pt"]).detector.weights == "runs/a=b.pt"


def test_later_override_wins():
    assert load_config(None, ["detector.iou=0.1", "detector.iou=0.7"]).detector.iou == 0.7


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["detector.confidence"])
    with pytest.raises(ConfigError):
        load_config(None, ["crop.size=3"])  # crop is not a section


def test_apply_overrides_does_not_mutate_input():
    data = {"detector": {"confidence": 0.3}}
    result = apply_overrides(data, ["detector.confidence=0.5", "runtime.workers=0"])
    assert result == {"detector": {"confidence": 0.5}, "runtime": {"workers": 0}}
    assert data == {"detector": {"confidence": 0.3}}
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"detector": {"weights": "a.pt"}}, ["detector.weights.x=1"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("detector.confidence=1.5", r"detector\.confidence must be in \[0, 1\]"),
        ("detector.confidence=-0.1", r"detector\.confidence"),
        ("detector.confidence=.nan", r"detector\.confidence"),
        ("detector.iou=2", r"detector\.iou"),
        ("detector.margin=-1", r"detector\.margin"),
        ("detector.image_size=100", r"multiple of 32"),
        ("detector.image_size=0", r"multiple of 32"),
        ("detector.min_box_size=-1", r"min_box_size"),
        ("detector.max_detections=0", r"max_detections"),
        ("embedder.batch_size=0", r"batch_size"),
        ("embedder.embedding_dim=0", r"embedding_dim"),
        ("embedder.image_size=16", r"embedder\.image_size"),
        ("index.ivf_threshold=0", r"ivf_threshold"),
        ("index.nprobe=0", r"nprobe"),
        ("runtime.workers=-1", r"workers"),
        ("runtime.max_image_side=32", r"max_image_side"),
        ("runtime.checkpoint_every=0", r"checkpoint_every"),
    ],
)
def test_value_validation(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_validation_boundaries_are_accepted():
    config = load_config(
        None,
        ["detector.confidence=0", "detector.iou=1", "detector.image_size=32", "runtime.workers=0"],
    )
    assert config.detector.confidence == 0.0 and config.detector.iou == 1.0
    assert config.detector.image_size == 32 and config.runtime.workers == 0


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="confidence"):
        DetectorConfig(confidence=1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        EmbedderConfig(batch_size=0)


def test_replace_revalidates_and_configs_are_frozen():
    config = PipelineConfig()
    changed = dataclasses.replace(config.detector, confidence=0.9)
    assert changed.confidence == 0.9 and config.detector.confidence == 0.35
    with pytest.raises(ConfigError, match="confidence"):
        dataclasses.replace(config.detector, confidence=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.crop = False  # type: ignore[misc]


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["detector.confidence=1.5"])


# --------------------------------------------------------------------------- serialisation


def _non_default_config() -> PipelineConfig:
    return load_config(
        None,
        [
            "detector.weights=best.onnx",
            "detector.classes=[car]",
            "detector.confidence=0.4",
            "detector.selection=all",
            "embedder.model=ckpt/last.ckpt",
            "embedder.embedding_dim=256",
            "embedder.image_size=224",
            "index.kind=ivf",
            "index.use_gpu=false",
            "runtime.threads=2",
            "crop=false",
            "crop_source=gt",
        ],
    )


@pytest.mark.parametrize("config", [PipelineConfig(), _non_default_config()], ids=["defaults", "custom"])
def test_to_dict_from_dict_round_trip(config, tmp_path):
    data = to_dict(config)
    assert isinstance(data["detector"]["classes"], list)  # tuples become lists
    assert from_dict(PipelineConfig, data) == config
    # ... and through an actual YAML file
    path = _write(tmp_path, yaml.safe_dump(data))
    assert load_config(path) == config


def test_to_dict_is_plain_yaml():
    data = to_dict(PipelineConfig())
    assert set(data) == {f.name for f in dataclasses.fields(PipelineConfig)}
    assert data["detector"]["classes"] == ["car", "truck", "bus"]
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_from_dict_on_a_section():
    assert from_dict(IndexConfig, {"kind": "flat", "nprobe": "8"}) == IndexConfig(kind="flat", nprobe=8)
    with pytest.raises(ConfigError, match="IndexConfig: unknown key"):
        from_dict(IndexConfig, {"kinds": "flat"})
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(IndexConfig, ["flat"])  # type: ignore[arg-type]


def test_default_yaml_matches_code_defaults():
    path = CONFIG_DIR / "default.yaml"
    if not path.exists():
        pytest.skip("configs/default.yaml is absent")
    # the file says it is the serialised defaults: keep it in step with the dataclasses
    assert load_config(path) == PipelineConfig()
    assert yaml.safe_load(path.read_text()) == to_dict(PipelineConfig())
