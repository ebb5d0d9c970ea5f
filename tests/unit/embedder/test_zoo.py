"""The shipped model: name lookup, checksum, float16 storage, its training classes, and the defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from carsearch.cli import main
from carsearch.config import EmbedderConfig
from carsearch.config_files import CONFIGS_DIR
from carsearch.embedder import Embedder, EmbeddingModel, default_spec, save_checkpoint, zoo
from carsearch.embedder.checkpoint import load_checkpoint, read_checkpoint
from carsearch.embedder.training.exporter import half_precision_error
from carsearch.errors import ModelLoadError
from tests.conftest import CLASS_COLOURS, make_car_image

SHIPPED = zoo.MODELS[zoo.DEFAULT_MODEL]


@pytest.fixture(scope="module")
def shipped() -> Embedder:
    return Embedder.from_config(EmbedderConfig(runtime="torch"))


def test_the_default_model_is_the_shipped_checkpoint(shipped: Embedder) -> None:
    assert EmbedderConfig().model == zoo.DEFAULT_MODEL == "cars98-lite1-320"
    assert SHIPPED.path is not None and SHIPPED.path.is_file()
    assert SHIPPED.path.stat().st_size <= 20 * 2**20  # the bound for a file inside the package
    assert hashlib.sha256(SHIPPED.path.read_bytes()).hexdigest() == SHIPPED.sha256
    assert shipped.source == "cars98-lite1-320" and shipped.dim == 1280
    assert shipped.model.spec.backbone == "tf_efficientnet_lite1"
    assert shipped.preprocessing.input_size == (320, 320)
    assert shipped.train_labels is not None and len(shipped.train_labels) == 98
    assert "Audi TTS Coupe 2012" in shipped.train_labels
    assert shipped.identity["train_labels"] == list(shipped.train_labels)


def test_the_shipped_weights_are_not_the_imagenet_backbone(shipped: Embedder) -> None:
    backbone = shipped.model.spec.backbone
    imagenet = Embedder.from_config(
        EmbedderConfig(model="imagenet", backbone=backbone, image_size=320, runtime="torch")
    )
    assert imagenet.source == "imagenet" and imagenet.train_labels == ()
    assert imagenet.model.spec == shipped.model.spec  # same architecture and input, other weights
    assert imagenet.fingerprint != shipped.fingerprint
    images = [make_car_image(i, CLASS_COLOURS[i % 4], size=(200, 110)) for i in range(3)]
    assert np.abs(imagenet.embed(images) - shipped.embed(images)).max() > 0.05


@pytest.mark.parametrize(
    ("name", "backbone", "size"),
    [
        ("cars98-lite1-256", "tf_efficientnet_lite1", 256),
        ("cars98-lite1", "tf_efficientnet_lite1", 224),
        ("cars98-lite0", "tf_efficientnet_lite0", 224),
    ],
)
def test_the_previous_defaults_still_load_for_the_indexes_built_with_them(name: str, backbone: str, size: int) -> None:
    previous = Embedder.from_config(EmbedderConfig(model=name, runtime="torch"))
    entry = zoo.MODELS[name]
    assert entry.path is not None and hashlib.sha256(entry.path.read_bytes()).hexdigest() == entry.sha256
    assert previous.source == name and previous.model.spec.backbone == backbone
    assert previous.train_labels is not None and len(previous.train_labels) == 98
    assert previous.dim == 1280 and previous.preprocessing.input_size == (size, size)


def test_the_default_is_the_256_px_weights_embedding_at_320(shipped: Embedder) -> None:
    """cars98-lite1-320 and cars98-lite1-256 are one file: the same weights, embedding 320-px and 256-px inputs.
    They are different embedders to an index (its manifest records the input size)."""
    at_256 = Embedder.from_config(EmbedderConfig(model="cars98-lite1-256", runtime="torch"))
    assert zoo.MODELS["cars98-lite1-256"].file == SHIPPED.file and at_256.fingerprint == shipped.fingerprint
    assert at_256.identity["spec"] != shipped.identity["spec"]
    assert at_256.identity["spec"]["preprocessing"] == {**shipped.identity["spec"]["preprocessing"], "image_size": 256}
    image = make_car_image(0, CLASS_COLOURS[0], size=(400, 210))
    wide = shipped.embed([image])
    assert np.abs(wide - at_256.embed([image])).max() > 0.01
    assert shipped.tensors([image]).shape == (1, 3, 320, 320)
    np.testing.assert_allclose(wide, at_256.embed_tensors(shipped.tensors([image])), atol=1e-5)  # same weights


def test_exporting_the_default_keeps_its_input_size(shipped: Embedder, tmp_path: Path) -> None:
    """``carsearch export`` without a run writes the named model as it embeds: the 320-px input, not the size
    the shared file records."""
    assert main(["export", "--out", str(tmp_path / "default.pt")]) == 0
    exported = Embedder.from_config(EmbedderConfig(model=str(tmp_path / "default.pt"), runtime="torch"))
    assert exported.preprocessing.input_size == (320, 320)
    assert exported.identity["spec"] == shipped.identity["spec"] and exported.fingerprint == shipped.fingerprint


def test_an_unknown_name_is_a_path_and_a_missing_path_a_clear_error(tmp_path: Path) -> None:
    assert zoo.is_name("cars98-lite1-320") and zoo.is_name("imagenet") and not zoo.is_name("cars98-lite1-256.pt")
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        Embedder.from_config(EmbedderConfig(model=str(tmp_path / "cars99.pt")))
    with pytest.raises(
        ModelLoadError,
        match="not a shipped checkpoint; shipped: cars98-lite1-320, cars98-lite1-256, cars98-lite1, cars98-lite0",
    ):
        zoo.shipped_checkpoint("imagenet")


def test_a_damaged_shipped_file_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert SHIPPED.file is not None
    damaged = tmp_path / SHIPPED.file
    shutil.copy(SHIPPED.path, damaged)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep inside the weights: still a loadable zip
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match=r"is damaged \(SHA-256 .*expected .*reinstall carsearch") as caught:
        Embedder.from_config(EmbedderConfig(runtime="torch"))
    assert "\n" not in str(caught.value)
    damaged.unlink()
    with pytest.raises(ModelLoadError, match="missing from the installed package"):
        Embedder.from_config(EmbedderConfig(runtime="torch"))


def test_the_cli_reports_a_damaged_model_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert SHIPPED.file is not None
    (tmp_path / SHIPPED.file).write_bytes(b"not a checkpoint")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "photos").mkdir()
    make_car_image(0, CLASS_COLOURS[0]).save(tmp_path / "photos" / "car.jpg")
    assert main(["index", str(tmp_path / "photos"), "--out", str(tmp_path / "idx"), "--raw", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carsearch index: error:") and "is damaged" in err and len(err.splitlines()) == 1


def test_the_shipped_file_is_float16_only_when_that_keeps_vectors_within_1e3(shipped: Embedder) -> None:
    payload = read_checkpoint(SHIPPED.path, SHIPPED.sha256)
    assert all(p.dtype == torch.float32 for p in shipped.model.parameters())  # loaded as float32 either way
    error = half_precision_error(shipped.model)
    if payload["dtype"] == "float16":
        assert error == 0.0  # its weights are float16 values already
    else:  # float32 because rounding to float16 would move an embedding by more than the tolerance
        assert payload["dtype"] == "float32" and error > 1e-3


def test_float16_checkpoints_load_as_float32_and_embed_close(tmp_path: Path) -> None:
    model = EmbeddingModel(default_spec(image_size=96), pretrained=True).eval()  # real ImageNet weights
    save_checkpoint(model, tmp_path / "fp32.pt")
    save_checkpoint(model, tmp_path / "fp16.pt", half=True)
    assert (tmp_path / "fp16.pt").stat().st_size < 0.6 * (tmp_path / "fp32.pt").stat().st_size
    loaded = load_checkpoint(tmp_path / "fp16.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images = [make_car_image(i, CLASS_COLOURS[i % 4]) for i in range(8)]
    full = Embedder(load_checkpoint(tmp_path / "fp32.pt")).embed(images)
    half = Embedder(loaded).embed(images)
    assert 0 < np.abs(full - half).max() < 1e-2
    assert (full * half).sum(1).min() > 0.9999  # cosine similarity of each image's two vectors


def test_export_half_refuses_weights_that_move_embeddings_more_than_1e3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the ImageNet backbone's float16 weights move its embeddings by ~1.3e-3: more than the tolerance
    assert half_precision_error(EmbeddingModel(default_spec(), pretrained=True)) > 1e-3
    imagenet = tmp_path / "imagenet.pt"
    assert main(["export", "--out", str(imagenet), "--model", "imagenet", "--half"]) == 2
    assert "float16 weights move embeddings by" in capsys.readouterr().err and not imagenet.exists()
    assert main(["export", "--out", str(imagenet), "--model", "imagenet"]) == 0 and imagenet.exists()


def test_the_default_cpu_runtime_is_onnxruntime_with_the_same_vectors(
    shipped: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARSEARCH_CACHE", str(tmp_path))
    auto = Embedder.from_config(EmbedderConfig())
    assert auto.runtime == "onnx" and auto.batch_size == 32
    assert auto.identity == shipped.identity  # an index does not depend on the runtime that built it
    images = [make_car_image(i, CLASS_COLOURS[i % 4], size=(180, 100)) for i in range(5)]
    np.testing.assert_allclose(auto.embed(images), shipped.embed(images), atol=1e-4)
    assert list((tmp_path / "onnx").glob(f"{shipped.fingerprint}-*.onnx"))  # exported once, cached
    assert Embedder.from_config(EmbedderConfig(), device="cpu").runtime == "onnx"


def test_cuda_keeps_torch_and_a_missing_onnxruntime_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from carsearch.embedder import embedder

    assert embedder.resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert embedder.resolve_runtime("onnx", torch.device("cuda")) == "onnx"  # asked for: kept
    monkeypatch.setattr(embedder, "onnxruntime_available", lambda: False)
    assert embedder.resolve_runtime("auto", torch.device("cpu")) == "torch"


def test_a_checkpoint_records_the_classes_it_was_trained_on(tmp_path: Path) -> None:
    model = EmbeddingModel(dataclasses.replace(default_spec(image_size=64), embedding_dim=8), pretrained=False)
    save_checkpoint(model, tmp_path / "labelled.pt", extra={"train_labels": ["b", "a"]})
    save_checkpoint(model, tmp_path / "unlabelled.pt")
    labelled = Embedder.from_config(EmbedderConfig(model=str(tmp_path / "labelled.pt"), runtime="torch"))
    unlabelled = Embedder.from_config(EmbedderConfig(model=str(tmp_path / "unlabelled.pt"), runtime="torch"))
    assert labelled.train_labels == ("a", "b") and labelled.identity["train_labels"] == ["a", "b"]
    assert unlabelled.train_labels is None and "train_labels" not in unlabelled.identity


def test_the_shipped_recipe_on_the_half_split_is_cpu_quick() -> None:
    """docs/models.md quotes cpu_quick's half-split numbers as cpu_full's: the two recipes differ only in
    which classes train (and where runs go; neither validates, so trainer.select picks nothing)."""
    from carsearch.config_files import to_dict
    from carsearch.embedder.training.config import load_train_config

    configs = CONFIGS_DIR / "train"
    full = to_dict(load_train_config(configs / "cpu_full.yaml", ["data.class_split=half"]))
    quick = to_dict(load_train_config(configs / "cpu_quick.yaml"))
    assert full["data"]["val_fraction"] == quick["data"]["val_fraction"] == 0.0
    for config in (full, quick):
        config["out"].pop("dir"), config["trainer"].pop("select")
    assert full == quick
