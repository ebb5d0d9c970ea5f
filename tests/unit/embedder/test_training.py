"""carsearch.embedder.training: losses, PK sampler, data, config, a short real run, export, DDP loss wrappers.

Everything runs on the CPU and offline, with timm's tiny ``test_efficientnet`` (random init) on 32–48 px images.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from pytorch_metric_learning.losses import ProxyAnchorLoss

from carsearch.cli import main
from carsearch.config import DetectorConfig, EmbedderConfig
from carsearch.config_files import CONFIGS_DIR, resolve_paths, to_dict
from carsearch.data.sources import SourceItem
from carsearch.embedder import Embedder, load_checkpoint
from carsearch.embedder.preprocessing import Preprocessing, eval_transform
from carsearch.embedder.training import (
    EmbedderModule,
    TrainConfig,
    boxcache,
    export,
    load_train_config,
    load_trained_model,
    train,
)
from carsearch.embedder.training.choice import choose_embedding
from carsearch.embedder.training.config import DataConfig, LossConfig, ModelConfig, OptimConfig
from carsearch.embedder.training.data import (
    ClassSplits,
    CropDataset,
    augment_transform,
    geometry_transform,
    sort_classes,
    split_classes,
)
from carsearch.embedder.training.datamodule import EmbedderDataModule
from carsearch.embedder.training.losses import build_criterion
from carsearch.embedder.training.module import freeze_backbone, warmup_cosine
from carsearch.embedder.training.registry import LOSSES
from carsearch.embedder.training.run import model_spec, resolve_trainer
from carsearch.embedder.training.sampler import PKSampler, check_pk
from carsearch.errors import ConfigError, DataSourceError
from carsearch.metrics import leave_one_out_metrics
from carsearch.types import BBox
from tests.conftest import CLASS_COLOURS, make_car_image

TRAIN_CONFIG_DIR = CONFIGS_DIR / "train"
TINY = [
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "model.embedding_dim=64",
    "data.image_size=48",
    "data.classes_per_batch=4",
    "data.images_per_class=4",
    "data.workers=0",
    "data.jitter=0",
    "trainer.progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.threads=1",
]


# --------------------------------------------------------------------------- synthetic data
def hue_image(seed: int, hue: float, size: int = 48) -> Image.Image:
    """A small disc/square/triangle of ``hue`` on a random-colour noisy background (the class is the hue)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-30, 30, size=(size, size, 3))
    image = Image.fromarray(np.clip(rng.integers(0, 256, size=3) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = rng.uniform(0.35, 0.65, size=2) * size
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.8, 1), rng.uniform(0.8, 1)))
    box = [cx - r, cy - r, cx + r, cy + r]
    kind = int(rng.integers(3))
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_hue_gallery(root: Path, classes: int = 20, per_class: int = 8) -> Path:
    """Folder tree of ``classes`` hues; names sort so that even hues train and odd hues validate (class_split=half).

    A random-init network embeds these by background colour (poor retrieval); training on the even hues
    teaches it to look at the object's colour, which carries over to the unseen odd hues.
    """
    for c in range(classes):
        folder = root / f"{'tv'[c % 2]}{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            hue_image(1000 * c + i, c / classes).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hue_gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hue_gallery(tmp_path_factory.mktemp("hues"))


def tiny_module(loss: LossConfig, num_classes: int = 4, **model: object) -> EmbedderModule:
    config = load_train_config(None, TINY)
    spec = model_spec(config)
    model_config = ModelConfig(**{**to_dict(config.model), **model})
    return EmbedderModule(spec, num_classes, model_config, loss, OptimConfig(lr=1e-3, loss_lr=1e-2))


def pk_batch(classes: int = 4, per_class: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, size, size, generator=generator) + labels[:, None, None, None].float()
    return images, labels


# --------------------------------------------------------------------------- losses
LOSS_CASES = [
    LossConfig(name="triplet", miner="hard", margin=0.2),
    LossConfig(name="triplet", miner="semihard", margin=0.2),
    LossConfig(name="triplet", miner="all", margin=0.2),
    LossConfig(name="arcface", miner="none"),
    LossConfig(name="subcenter_arcface", miner="none"),
    LossConfig(name="proxy_anchor", miner="none", params={"alpha": 32}),
    LossConfig(name="multi_similarity"),
    LossConfig(name="contrastive", miner="multi_similarity", params={"neg_margin": 0.5}),
    LossConfig(name="triplet", miner="semihard", margin=0.2, plus="proxy_anchor", plus_params={"alpha": 32}),
]


@pytest.mark.parametrize("loss", LOSS_CASES, ids=[f"{c.name}-{c.miner}-{c.plus}" for c in LOSS_CASES])
def test_each_loss_runs_a_training_step(loss):
    torch.manual_seed(0)
    module = tiny_module(loss).train()
    images, labels = pk_batch()
    value, mined = module.compute_loss(module(images), labels)
    assert value.ndim == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    head = module.model.head[0].weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
    for parameter in module.criterion.parameters():  # proxies / class weights learn too
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    if loss.miner_name == "none":
        assert mined is None
    else:
        assert mined is not None and mined > 0


def test_a_plus_loss_adds_its_weighted_value_to_the_mined_loss():
    """``loss.plus``: the first loss on its mined tuples + ``plus_weight`` × the second on the whole batch
    (no miner); the second's proxies train in the loss parameter group."""
    config = LossConfig(
        name="triplet", miner="semihard", margin=0.2, plus="proxy_anchor", plus_weight=0.5, plus_params={"alpha": 32}
    )
    torch.manual_seed(0)
    criterion = build_criterion(config, num_classes=4, embedding_size=8)
    assert criterion.name == "triplet+proxy_anchor" and isinstance(criterion.plus, ProxyAnchorLoss)
    assert criterion.plus.margin == pytest.approx(0.1)  # PML's default: plus_params set only alpha
    torch.manual_seed(0)
    module = tiny_module(config).train()
    images, labels = pk_batch()
    embeddings = module(images)
    value, mined = module.compute_loss(embeddings, labels)
    triplet = module.criterion(embeddings, labels, module.miner(embeddings, labels))
    assert value.item() == pytest.approx((triplet + 0.5 * module.plus_criterion(embeddings, labels)).item(), rel=1e-5)
    assert mined is not None and mined > 0
    groups = {g["name"]: g for g in module.param_groups()}
    assert [p.shape for p in groups["loss"]["params"]] == [torch.Size([4, module.model.dim])]
    value.backward()
    assert module.plus_criterion.proxies.grad.abs().sum() > 0


def memory_module(warmup_epochs: int) -> EmbedderModule:
    torch.manual_seed(0)
    config = load_train_config(None, TINY)
    loss = LossConfig(name="triplet", miner="semihard", margin=0.2, memory=24)
    optim = OptimConfig(lr=1e-3, frozen_warmup_epochs=warmup_epochs)
    return EmbedderModule(model_spec(config), 4, ModelConfig(**to_dict(config.model)), loss, optim).train()


def test_a_cross_batch_memory_adds_the_batch_against_recent_embeddings_once_the_backbone_learns():
    """``loss.memory``: in training, from the first backbone epoch, + the loss of the batch against the last
    ``memory`` embeddings (the batch's own included, detached); not during the frozen warm-up or in eval."""
    module = memory_module(warmup_epochs=0)
    assert module.memory is not None and module.memory.memory_size == 24
    images, labels = pk_batch()
    embeddings = module(images)
    in_batch = module.criterion(embeddings, labels, module.miner(embeddings, labels))
    value, _ = module.compute_loss(embeddings, labels)
    assert module.memory.queue_idx == 16  # the batch went into the memory
    assert value.item() > in_batch.item()
    value.backward()
    assert module.model.head[0].weight.grad.abs().sum() > 0
    second, _ = module.compute_loss(module(pk_batch(seed=1)[0]), labels)
    assert module.memory.has_been_filled and torch.isfinite(second)  # 32 embeddings through a memory of 24

    warming = memory_module(warmup_epochs=1)  # epoch 0 trains the head alone: no memory yet
    embeddings = warming(images)
    value, _ = warming.compute_loss(embeddings, labels)
    assert warming.memory.queue_idx == 0
    plain = warming.criterion(embeddings, labels, warming.miner(embeddings, labels))
    assert value.item() == pytest.approx(plain.item())
    module.eval()
    module.compute_loss(module(images), labels)
    assert module.memory.queue_idx == 32 % 24  # unchanged by evaluation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.memory=-1"], "must be >= 0"),
        (["loss.memory=8"], "at least one batch"),
        (["loss.memory=512", "loss.memory_weight=0"], "must be > 0"),
        (["loss.memory=512", "loss.name=proxy_anchor", "loss.miner=none"], "applies to tuple losses"),
    ],
)
def test_memory_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.plus=multi_similarity"], "runs without a miner"),
        (["loss.plus=triplet"], "repeats loss.name"),
        (["loss.plus=nope"], "expected one of"),
        (["loss.plus=proxy_anchor", "loss.plus_weight=0"], "must be > 0"),
        (["loss.plus_params={alpha: 32}"], "without loss.plus"),
    ],
)
def test_plus_loss_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_loss_factory_errors_list_the_valid_names():
    with pytest.raises(ConfigError) as err:
        build_criterion(LossConfig(name="nope"), 4, 8)
    assert all(name in str(err.value) for name in LOSSES)
    with pytest.raises(ConfigError, match="semihard"):
        build_criterion(LossConfig(name="triplet", miner="bogus"), 4, 8)
    with pytest.raises(ConfigError, match="loss.miner=none"):
        build_criterion(LossConfig(name="proxy_anchor", miner="hard"), 4, 8)
    with pytest.raises(ConfigError, match="loss.params"):
        build_criterion(LossConfig(name="multi_similarity", margin=0.1), 4, 8)
    with pytest.raises(ConfigError, match="bad parameters"):
        build_criterion(LossConfig(name="triplet", params={"no_such_argument": 1}), 4, 8)
    with pytest.raises(ConfigError, match="expected one of"):
        load_train_config(None, ["loss.name=nope"])


def test_backbone_head_and_loss_get_their_own_parameter_groups():
    config = load_train_config(None, TINY)
    optim = OptimConfig(lr=1e-4, head_lr=1e-3, loss_lr=1e-2, weight_decay=0.05, warmup_epochs=1)
    model = ModelConfig(**{**to_dict(config.model), "freeze_blocks": 2})
    module = EmbedderModule(model_spec(config), 4, model, LossConfig(name="proxy_anchor", miner="none"), optim)
    module._trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=2)  # what the optimiser reads
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay", "loss"}
    warm = 1 / 11  # step 0 of a 10-step linear warm-up
    assert groups["backbone"]["lr"] == pytest.approx(1e-4 * warm) and groups["head"]["lr"] == pytest.approx(1e-3 * warm)
    assert groups["loss"]["lr"] == pytest.approx(1e-2 * warm)
    assert {id(p) for p in groups["loss"]["params"]} == {id(p) for p in module.criterion.parameters()}
    assert [g["weight_decay"] for g in groups.values()] == [0.05, 0.0, 0.05, 0.0, 0.0]
    assert all(p.ndim > 1 for name in ("backbone", "head") for p in groups[name]["params"])
    assert all(p.ndim == 1 for name in ("backbone_no_decay", "head_no_decay") for p in groups[name]["params"])
    assert {id(p) for p in groups["head"]["params"]} == {id(module.model.head[0].weight)}
    frozen = {id(p) for p in module.model.backbone.conv_stem.parameters()}
    assert not frozen & {id(p) for g in groups.values() for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g["params"]}  # every trainable one, once
    triplet = tiny_module(LossConfig(name="triplet"))
    triplet._trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=2)
    assert "loss" not in {g["name"] for g in triplet.configure_optimizers()["optimizer"].param_groups}


def test_frozen_warmup_trains_only_head_and_loss_then_the_backbone():
    config = load_train_config(None, TINY)
    optim = OptimConfig(lr=1e-2, head_lr=1e-2, loss_lr=1e-2, frozen_warmup_epochs=1)
    module = EmbedderModule(model_spec(config), 4, config.model, LossConfig(name="proxy_anchor", miner="none"), optim)
    optimiser = torch.optim.AdamW(module.param_groups())
    images, labels = pk_batch(size=48)
    backbone = [p for p in module.model.backbone.parameters() if p.requires_grad]
    for epoch in (0, 1):
        module._trainer = SimpleNamespace(current_epoch=epoch)
        module.on_train_epoch_start()
        before = [p.detach().clone() for p in backbone]
        head = module.model.head[0].weight.detach().clone()
        optimiser.zero_grad()
        module.compute_loss(module(images), labels)[0].backward()
        optimiser.step()
        moved = [not torch.equal(a, p) for a, p in zip(before, backbone, strict=True)]
        assert not torch.equal(head, module.model.head[0].weight)
        assert (not any(moved)) if epoch == 0 else all(moved[:3])


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(step, warmup=4, total=20) for step in range(21)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.0)
    assert warmup_cosine(20, 0, 20, floor=0.1) == pytest.approx(0.1)
    held = [warmup_cosine(step, warmup=0, total=20, hold=5) for step in range(21)]
    assert held[:6] == [1.0] * 6 and held[20] == pytest.approx(0.0)  # constant, then cosine over 15 steps
    assert held[5 + 15 // 2] == pytest.approx(warmup_cosine(15 // 2, 0, 15))


def test_freeze_blocks_freezes_stem_and_first_blocks_and_keeps_their_batchnorm_in_eval():
    module = tiny_module(LossConfig(name="triplet"), freeze_blocks=2, freeze_bn=False)
    backbone = module.model.backbone
    assert not any(p.requires_grad for p in backbone.conv_stem.parameters())
    assert not any(p.requires_grad for p in backbone.blocks[1].parameters())
    assert all(p.requires_grad for p in backbone.blocks[2].parameters())
    assert not backbone.bn1.training and not backbone.blocks[1][0].bn1.training  # from construction on
    module.eval().train()
    assert not backbone.bn1.training and not backbone.blocks[1][0].bn1.training
    assert backbone.blocks[2][0].bn1.training
    with pytest.raises(ConfigError, match="blocks"):
        freeze_backbone(backbone, 99)
    whole = tiny_module(LossConfig(name="triplet"), freeze_blocks=-1)
    assert not any(p.requires_grad for p in whole.model.backbone.parameters())
    assert all(p.requires_grad for p in whole.model.head.parameters())
    frozen_bn = tiny_module(LossConfig(name="triplet"), freeze_blocks=2).train()  # freeze_bn: the default
    norms = [m for m in frozen_bn.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert frozen_bn.model.backbone.blocks[2][0].bn1.weight.requires_grad  # scale and shift still train


# --------------------------------------------------------------------------- sampler
def test_pk_sampler_yields_k_images_of_p_classes_per_batch():
    labels = [c for c in range(10) for _ in range(6)]
    sampler = PKSampler(labels, classes_per_batch=4, images_per_class=3, batches_per_epoch=5, seed=1)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 5 * 12
    for start in range(0, len(indices), 12):
        counts = Counter(labels[i] for i in indices[start : start + 12])
        assert len(counts) == 4 and set(counts.values()) == {3}
    assert list(sampler) == indices  # same seed, rank, epoch: same batches
    sampler.set_epoch(1)
    assert list(sampler) != indices
    other_rank = PKSampler(labels, 4, 3, 5, seed=1, rank=1)
    assert list(other_rank) != indices


def test_pk_sampler_validation(caplog):
    labels = [c for c in range(3) for _ in range(4)]
    with pytest.raises(ConfigError, match="not a multiple"):
        check_pk(labels, classes_per_batch=2, images_per_class=3, batch_size=8)
    with pytest.raises(ConfigError, match="only 3"):
        PKSampler(labels, classes_per_batch=4, images_per_class=2, batches_per_epoch=2)
    short = [*labels, 3]  # class 3 has one image: drawn with replacement
    with caplog.at_level(logging.WARNING):
        sampler = PKSampler(short, classes_per_batch=4, images_per_class=2, batches_per_epoch=3)
    assert "fewer than K=2" in caplog.text and "min_per_class" in caplog.text
    indices = list(sampler)
    for start in range(0, len(indices), 8):
        assert set(Counter(short[i] for i in indices[start : start + 8]).values()) == {2}


def test_min_per_class_drops_short_training_classes(tmp_path):
    root = make_hue_gallery(tmp_path / "g", classes=8, per_class=4)
    (root / "t00" / "0.png").unlink()
    config = load_train_config(None, [*TINY, f"data.source={root}", "data.min_per_class=4"]).data
    data = EmbedderDataModule(config, model_spec(load_train_config(None, TINY)).preprocessing)
    data.setup()
    assert "t00" not in data.splits.train and data.num_train_classes == 3


# --------------------------------------------------------------------------- data
def test_split_classes():
    assert split_classes(["b", "a", "d", "c", "a"]) == ClassSplits(["a", "b"], [], ["c", "d"])
    numeric = [str(i) for i in range(1, 11)]
    assert split_classes(numeric) == ClassSplits(["1", "2", "3", "4", "5"], [], ["6", "7", "8", "9", "10"])
    assert sort_classes(["10", "9", "100"]) == ["9", "10", "100"]
    assert split_classes(list("abcde")) == ClassSplits(["a", "b", "c"], [], ["d", "e"])
    assert split_classes(list("abcde"), "list", ["e", "a"]) == ClassSplits(["a", "e"], [], ["b", "c", "d"])
    assert split_classes(list("abcdef"), "list", ["a", "b"], ["d", "e"]) == ClassSplits(
        ["a", "b"], ["d", "e"], ["c", "f"]
    )
    assert split_classes(list("abcde"), "all") == ClassSplits(list("abcde"), [], [])
    # Validation classes are carved out of the training classes, never out of the test classes.
    carved = split_classes([str(i) for i in range(1, 41)], "half", val_fraction=0.25)
    assert carved.val == ["16", "17", "18", "19", "20"] and len(carved.train) == 15  # the last block (default)
    spaced = split_classes([str(i) for i in range(1, 41)], "half", val_fraction=0.25, val_carve="spaced")
    assert spaced.val == ["3", "7", "11", "15", "19"] and len(spaced.train) == 15
    with pytest.raises(ConfigError, match="val_carve|carve-out"):
        split_classes([str(i) for i in range(1, 41)], "half", val_fraction=0.25, val_carve="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="val_carve"):
        DataConfig(val_carve="random")  # type: ignore[arg-type]
    assert carved.test == [str(i) for i in range(21, 41)]
    assert not set(carved.train) & set(carved.val)
    full = split_classes([str(i) for i in range(1, 99)], "all", val_fraction=0.1)
    assert len(full.val) == 10 and len(full.train) == 88 and full.test == []
    with pytest.raises(ConfigError, match="disjoint"):
        split_classes(list("abcde"), "list", ["a", "b"], ["b", "c"])
    with pytest.raises(ConfigError, match="disjoint"):
        split_classes(list("abcde"), "list", ["a", "b"], [], ["b", "c"])
    with pytest.raises(ConfigError, match="not in the data"):
        split_classes(list("abcde"), "list", ["a", "z"])
    with pytest.raises(ConfigError, match="at least 4"):
        split_classes(list("abc"))


def _identity(image: Image.Image) -> Image.Image:
    return image


def test_crop_dataset_raw_and_gt_modes(tmp_path):
    path = tmp_path / "car.png"
    make_car_image(0, CLASS_COLOURS[0], size=(160, 120)).save(path)
    items = [SourceItem(path, "a", BBox(40, 30, 120, 90)), SourceItem(path, "b", BBox(0, 0, 160, 120))]
    raw = CropDataset(items, ["a", "b"], _identity, mode="raw")
    image, label, index = raw[0]
    assert image.size == (160, 120) and (label, index) == (0, 0)
    gt = CropDataset(items, ["b", "a"], _identity, mode="gt", detector=DetectorConfig(margin=0.1))
    image, label, _ = gt[0]
    assert image.size == (96, 72) and label == 1  # 80×60 box + 10% a side
    with pytest.raises(DataSourceError, match="needs a box"):
        CropDataset([SourceItem(path, "a")], ["a"], _identity, mode="gt")
    only_b = CropDataset(items, ["b"], _identity)
    assert len(only_b) == 1 and only_b.labels == [0]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("resize,width", [("squash", None), ("center_crop", None), ("squash", 96)])
def test_unaugmented_training_path_equals_inference_pixel_for_pixel(tmp_path, cache, resize, width):
    """Crop planning, (cached) resizing and normalisation of the training path, without augmentation, give
    exactly what ``eval_transform`` gives the inference crop: training sees the geometry inference sees."""
    root = tmp_path / "data"
    rows = ["path,label,x1,y1,x2,y2"]
    for i in range(8):
        path = root / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        make_car_image(i, CLASS_COLOURS[i % 4], size=(120 + 20 * i, 60)).save(path)
        rows.append(f"{path},c{i % 4},{5 + i},4,{100 + 2 * i},50")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    overrides = [*TINY, f"data.source={root / 'data.csv'}", "data.class_split=all", "data.input=gt"]
    overrides += [f"data.cache={str(cache).lower()}", f"data.resize={resize}", "data.resize_to=48"]
    overrides += [f"data.image_width={width}"] if width else []
    overrides += ["data.crop_scale=1.0", "data.hflip=false", "data.detector.margin=0.05"]
    config = load_train_config(None, overrides)
    spec = model_spec(config)
    data = EmbedderDataModule(config.data, spec.preprocessing, cache_dir=tmp_path / "cache")
    data.setup()
    crops = CropDataset(data._read(), data.splits.train, eval_transform(spec.preprocessing), "gt", config.data.detector)
    assert len(data.train_set) == len(crops) == 8
    for i in range(8):
        image, label, _ = data.train_set[i]
        expected, expected_label, _ = crops[i]
        assert image.shape == (3, 48, width or 48)
        assert label == expected_label and torch.equal(image, expected), i
    if cache:
        assert list((tmp_path / "cache").glob(f"images_48x{width or 48}_*.npy"))


def test_random_crops_keep_the_inference_aspect_of_wide_cars():
    """A 4:1 crop is squashed to a square first, so even an un-zoomed view keeps both ends of the car
    (cropping the original with aspect <= 4/3 would keep at most a third of its width)."""
    pre = model_spec(load_train_config(None, TINY)).preprocessing
    wide = np.zeros((40, 160, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, -20:] = (0, 0, 255)
    geometry, augment = geometry_transform(pre, size=(56, 56)), augment_transform(pre, crop_scale=0.9, hflip=False)
    for _ in range(20):
        view = augment(geometry(Image.fromarray(wide)))
        assert view[0].max() > 0.5 and view[2].max() > 0.5  # red (left end) and blue (right end) both in view


def test_grayscale_turns_that_share_of_views_grey():
    pre = model_spec(load_train_config(None, TINY)).preprocessing
    red_car = Image.fromarray(np.full((48, 96, 3), (200, 30, 30), dtype=np.uint8))
    geometry = geometry_transform(pre, size=(56, 56))

    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]

    def grey(view: torch.Tensor) -> bool:
        pixels = view * std + mean  # before normalisation
        return bool(torch.allclose(pixels[0], pixels[1], atol=1e-4) and torch.allclose(pixels[1], pixels[2], atol=1e-4))

    torch.manual_seed(0)
    views = {
        p: [augment_transform(pre, hflip=False, grayscale=p)(geometry(red_car)) for _ in range(200)]
        for p in (0, 0.3, 1)
    }
    assert not any(grey(v) for v in views[0]) and all(grey(v) for v in views[1])
    assert 35 <= sum(grey(v) for v in views[0.3]) <= 85  # Binomial(200, 0.3): mean 60, sd 6.5
    with pytest.raises(ConfigError, match="data.grayscale"):
        load_train_config(None, [*TINY, "data.grayscale=1.5"])


def test_data_grayscale_reaches_the_training_views_only(tmp_path, hue_gallery):
    config = load_train_config(None, [*TINY, f"data.source={hue_gallery}", "data.class_split=half", "data.grayscale=1"])
    pre = model_spec(config).preprocessing
    data = EmbedderDataModule(config.data, pre, cache_dir=tmp_path / "cache")
    data.setup()
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    view, evaluated = (image * std + mean for image in (data.train_set[0][0], data.test_set[0][0]))
    assert torch.allclose(view[0], view[1], atol=1e-4) and torch.allclose(view[1], view[2], atol=1e-4)
    assert not torch.allclose(evaluated[0], evaluated[1], atol=1e-2)  # evaluation images keep their colour


def test_crop_size_sets_the_training_views_and_evaluation_keeps_the_inference_size(tmp_path, hue_gallery):
    overrides = [*TINY, f"data.source={hue_gallery}", "data.class_split=half", "data.crop_size=40"]
    config = load_train_config(None, overrides)
    assert config.data.train_size == (round(40 * 8 / 7),) * 2  # the cache is sized for the training view
    spec = model_spec(config)
    data = EmbedderDataModule(config.data, spec.preprocessing, cache_dir=tmp_path / "cache")
    data.setup()
    assert data.train_set[0][0].shape == (3, 40, 40)
    assert data.test_set[0][0].shape == (3, spec.preprocessing.image_size, spec.preprocessing.image_size) != (3, 40, 40)
    with pytest.raises(ConfigError, match="resize_to"):
        load_train_config(None, [*TINY, "data.crop_size=40", "data.resize_to=32"])


def test_a_larger_inference_size_leaves_the_training_views_as_they_were(tmp_path, hue_gallery):
    """crop_size + resize_to pin the training views: raising image_size (the inference size: validation, test,
    export) changes what is evaluated and nothing that trains, so weights trained at the smaller size are
    the larger recipe's weights. The CPU recipes are such a pair: 256-px views, 320-px inference."""
    base = [*TINY, f"data.source={hue_gallery}", "data.class_split=half", "data.resize_to=55"]
    datasets = {}
    for size, extra in ((48, []), (60, ["data.crop_size=48"])):
        config = load_train_config(None, [*base, f"data.image_size={size}", *extra])
        data = EmbedderDataModule(config.data, model_spec(config).preprocessing, cache_dir=tmp_path / str(size))
        data.setup()
        torch.manual_seed(0)
        datasets[size] = (torch.stack([data.train_set[i][0] for i in range(8)]), data.test_set[0][0])
    assert torch.equal(datasets[48][0], datasets[60][0])
    assert datasets[48][1].shape == (3, 48, 48) and datasets[60][1].shape == (3, 60, 60)
    for recipe in ("cpu_quick", "cpu_full"):
        data = load_train_config(TRAIN_CONFIG_DIR / f"{recipe}.yaml").data
        assert (data.image_size, data.train_crop_size, data.train_size) == (320, (256, 256), (292, 292))


def test_a_wide_input_keeps_its_aspect_in_training_views_and_evaluation(tmp_path, hue_gallery):
    """data.image_width: every training view and every evaluated image has the input's 2:1 shape, the random
    crop's aspect range is taken around 2:1 (a wide car is not cut to a square), and the spec records it."""
    overrides = [*TINY, f"data.source={hue_gallery}", "data.class_split=half", "data.image_width=96"]
    overrides += ["data.crop_size=40"]
    config = load_train_config(None, overrides)
    assert config.data.train_crop_size == (40, 80) and config.data.train_size == (46, 92)
    spec = model_spec(config)
    assert spec.preprocessing.input_size == (48, 96)
    data = EmbedderDataModule(config.data, spec.preprocessing, cache_dir=tmp_path / "cache")
    data.setup()
    assert all(data.train_set[i][0].shape == (3, 40, 80) for i in range(4))
    assert data.test_set[0][0].shape == (3, 48, 96)
    wide = np.zeros((40, 160, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, -20:] = (0, 0, 255)
    augment = augment_transform(spec.preprocessing, crop_scale=0.9, hflip=False, size=(40, 80))
    for _ in range(20):
        view = augment(geometry_transform(spec.preprocessing, (46, 92))(Image.fromarray(wide)))
        assert view[0].max() > 0.5 and view[2].max() > 0.5  # both ends of the car stay in view
    with pytest.raises(ConfigError, match="resize=squash"):
        load_train_config(None, [*TINY, "data.image_width=96", "data.resize=center_crop"])


def test_detector_boxes_are_cached_by_path_and_content(tmp_path, tiny_yolo, monkeypatch):
    paths = []
    for i, colour in enumerate(CLASS_COLOURS[:3]):
        paths.append(tmp_path / f"{i}.jpg")
        make_car_image(i, colour).save(paths[-1])
    items = [SourceItem(p, "x") for p in paths]
    config = DetectorConfig(weights=str(tiny_yolo), confidence=0.01)
    cache = boxcache.cache_path(tmp_path / "cache", config)
    first = boxcache.detect_cached(items, config, cache)
    assert cache.exists() and len(first) == 3 and any(first)

    import carsearch.detector as detector_package

    def no_detector(*args: object, **kwargs: object) -> None:
        raise AssertionError("the detector ran although every box was cached")

    monkeypatch.setattr(detector_package, "VehicleDetector", no_detector)
    assert boxcache.detect_cached(items, config, cache) == first
    make_car_image(7, CLASS_COLOURS[3]).save(paths[0])  # new content under the same path: detected again
    with pytest.raises(AssertionError, match="detector ran"):
        boxcache.detect_cached(items, config, cache)
    dataset = CropDataset(items, ["x"], _identity, mode="detector", detector=config, detections=first)
    assert dataset[1][0].size != Image.open(paths[1]).size or not first[1]


# --------------------------------------------------------------------------- config
def test_config_overrides_and_errors():
    config = load_train_config(None, ["trainer.max_epochs=5", "data.source=/x", "loss.params={alpha: 16}"])
    assert config.trainer.max_epochs == 5 and config.data.source == "/x" and config.loss.params == {"alpha": 16}
    assert load_train_config() == TrainConfig()
    with pytest.raises(ConfigError, match="unknown key.*valid keys"):
        load_train_config(None, ["data.bogus=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(None, ["bogus.key=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_train_config(None, ["trainer.max_epochs=many"])
    with pytest.raises(ConfigError, match="class_split=list"):
        load_train_config(None, ["data.train_classes=[a, b]"])
    with pytest.raises(ConfigError, match=r"\(P\)"):
        load_train_config(None, ["data.classes_per_batch=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config("/no/such/train.yaml")
    with pytest.raises(ConfigError, match=r"trainer.select: expected one of"):
        load_train_config(None, ["trainer.select=loss"])
    with pytest.raises(ConfigError, match="patience must be null with select: last"):
        load_train_config(None, ["trainer.select=last", "trainer.patience=3"])


def test_precision_is_32_on_cpu():
    cpu = load_train_config(None, ["trainer.accelerator=cpu"]).trainer
    assert resolve_trainer(cpu) == ("cpu", "32-true")
    with pytest.raises(ConfigError, match="GPU"):
        resolve_trainer(load_train_config(None, ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]).trainer)
    with pytest.raises(ConfigError, match="ddp"):
        resolve_trainer(load_train_config(None, ["trainer.strategy=ddp_spawn"]).trainer)


TRAIN_CONFIGS = sorted(TRAIN_CONFIG_DIR.glob("*.yaml"))


def test_training_recipes_are_shipped():
    names = {p.stem for p in TRAIN_CONFIGS}
    assert {"triplet_hard", "triplet_semihard", "arcface", "proxy_anchor", "cpu_quick"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.stem for p in TRAIN_CONFIGS])
def test_shipped_training_configs_load_and_build(path):
    config = load_train_config(path)
    # files are complete serialised instances (relative paths resolved against the file's folder)
    assert to_dict(config) == resolve_paths(yaml.safe_load(path.read_text()), path.parent)
    build_criterion(config.loss, num_classes=49, embedding_size=config.model.embedding_dim or 1280)


# --------------------------------------------------------------------------- a real (short) run and export
@pytest.fixture(scope="module")
def trained_run(hue_gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        *TINY,
        f"data.source={hue_gallery}",
        "data.val_fraction=0.3",
        "data.batches_per_epoch=25",
        "loss.name=multi_similarity",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0.2",
        "trainer.max_epochs=4",
        "trainer.patience=null",
        f"out.dir={out}",
        "out.name=hues",
    ]
    return train(load_train_config(None, overrides))


def test_training_raises_test_recall_on_unseen_classes(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    zero_shot, test = metrics["zero_shot"]["test"]["recall_at_1"], metrics["test"]["recall_at_1"]
    assert test >= zero_shot + 0.15, metrics
    val = metrics["val"]
    assert val["final"] == val["history"][-1] and len(val["history"]) == 4
    assert metrics["selected_by"] == "val/map_at_r" and metrics["selected_epoch"] == val["best"]["epoch"]
    assert val["best"]["map_at_r"] == max(m["map_at_r"] for m in val["history"])  # trainer.select's default
    assert set(metrics["test"]) >= {
        "recall_at_1",
        "recall_at_2",
        "recall_at_4",
        "recall_at_8",
        "map_at_r",
        "r_precision",
    }
    assert (
        metrics["classes"] == {"train": 7, "val": 3, "test": 10}
        and metrics["wall_time_s"] > metrics["train_time_s"] > 0
    )
    assert metrics["images"] == {"train": 56, "val": 24, "test": 80}
    assert Path(metrics["checkpoint"]).exists() and f"epoch{metrics['selected_epoch']:03d}" in metrics["checkpoint"]
    classes = json.loads((trained_run / "classes.json").read_text())
    assert not set(classes["train"]) & set(classes["val"]) and not set(classes["val"]) & set(classes["test"])
    assert all(name.startswith("t") for name in classes["train"] + classes["val"])
    assert all(name.startswith("v") for name in classes["test"])
    saved = load_train_config(trained_run / "config.yaml")
    assert saved.loss.name == "multi_similarity" and saved.trainer.max_epochs == 4
    logs = list((trained_run / "logs").rglob("*"))
    assert any(p.name == "metrics.csv" or p.name.startswith("events.out") for p in logs)


@pytest.mark.parametrize("select", ["recall_at_1", "last"])
def test_trainer_select_keeps_the_best_recall_or_the_last_epoch(select, hue_gallery, tmp_path):
    overrides = [*TINY, f"data.source={hue_gallery}", "data.val_fraction=0.3", "data.batches_per_epoch=4"]
    overrides += ["trainer.max_epochs=3", "trainer.patience=null", f"trainer.select={select}", f"out.dir={tmp_path}"]
    metrics = json.loads((train(load_train_config(None, overrides)) / "metrics.json").read_text())
    history = metrics["val"]["history"]
    assert [m["epoch"] for m in history] == [0, 1, 2]  # validation is recorded either way
    if select == "last":
        assert metrics["selected_by"].startswith("last epoch") and metrics["selected_epoch"] == 2
        assert Path(metrics["checkpoint"]).name.startswith("last-epoch002")
    else:
        best = max(history, key=lambda m: m["recall_at_1"])
        assert metrics["selected_by"] == "val/recall_at_1" and metrics["selected_epoch"] == best["epoch"]
        assert metrics["val"]["best"] == best
        assert Path(metrics["checkpoint"]).name.startswith(f"best-epoch{best['epoch']:03d}")


def test_a_pooled_export_picks_its_epoch_by_the_pooled_features(hue_gallery, tmp_path):
    overrides = [*TINY, f"data.source={hue_gallery}", "data.val_fraction=0.3", "data.batches_per_epoch=4"]
    overrides += ["trainer.max_epochs=3", "model.embed_with=pooled", f"out.dir={tmp_path}"]
    metrics = json.loads((train(load_train_config(None, overrides)) / "metrics.json").read_text())
    best = max(metrics["val"]["history"], key=lambda m: m["pooled_map_at_r"])
    assert metrics["selected_by"] == "val/pooled_map_at_r" and metrics["selected_epoch"] == best["epoch"]
    assert metrics["val"]["best"] == best and metrics["embedding"]["name"] == "pooled"
    assert Path(metrics["checkpoint"]).name.startswith(f"best-epoch{best['epoch']:03d}")


def test_a_finished_run_directory_is_not_overwritten(trained_run):
    config = load_train_config(trained_run / "config.yaml")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config)


def test_export_gives_an_inference_checkpoint_with_identical_embeddings(trained_run, hue_gallery, tmp_path):
    out = export(trained_run, tmp_path / "embedder.pt", embedding="head")
    embedder = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(out)))
    metrics = json.loads((trained_run / "metrics.json").read_text())
    best = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)
    module = tiny_module(LossConfig(name="multi_similarity"), num_classes=7)
    module.load_state_dict(best["state_dict"])
    module.eval()
    images = [Image.open(p).convert("RGB") for p in sorted(hue_gallery.rglob("*.png"))[:12]]
    with torch.no_grad():
        expected = module(torch.stack([eval_transform(embedder.preprocessing)(im) for im in images])).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-5)
    assert embedder.preprocessing.image_size == 48 and embedder.dim == 64
    assert torch.equal(load_trained_model(metrics["checkpoint"]).head[0].weight, embedder.model.head[0].weight)


def test_choose_embedding_follows_the_config_or_the_validation_metric():
    head, pooled, auto = (ModelConfig(embed_with=name) for name in ("head", "pooled", "auto"))
    scores = {"epoch": 3, "map_at_r": 0.30, "pooled_map_at_r": 0.32, "recall_at_1": 0.8, "pooled_recall_at_1": 0.7}
    assert choose_embedding(head, scores, "map_at_r")[0] == "head"
    assert choose_embedding(pooled, None, "map_at_r")[0] == "pooled"
    assert choose_embedding(auto, scores, "map_at_r") == (
        "pooled",
        "val map_at_r at epoch 3: pooled 0.3200, head 0.3000",
    )
    assert choose_embedding(auto, scores, "recall_at_1")[0] == "head"  # the selection metric decides
    assert choose_embedding(auto, scores, "last")[0] == "pooled"  # a fixed schedule compares MAP@R
    assert choose_embedding(auto, None, "map_at_r")[0] == "head"  # no validation classes: keep the head
    assert choose_embedding(ModelConfig(embedding_dim=None, embed_with="head"), None, "last")[0] == "pooled"
    with pytest.raises(ConfigError, match="embed_with"):
        ModelConfig(embed_with="neck")


def test_the_run_records_its_embedding_choice_and_tests_with_it(trained_run, hue_gallery, tmp_path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    best = metrics["val"]["best"]
    expected = "pooled" if best["pooled_map_at_r"] > best["map_at_r"] else "head"  # auto, selected by MAP@R
    features = load_trained_model(metrics["checkpoint"]).backbone.num_features
    assert metrics["embedding"]["name"] == expected
    assert metrics["embedding"]["dim"] == (64 if expected == "head" else features) and features != 64
    assert metrics["embedding"]["chosen_by"].startswith(f"val map_at_r at epoch {best['epoch']}:")
    # the reported test metrics are those of the exported model (the run's choice), not of the other embedding
    embedder = Embedder.from_config(
        EmbedderConfig(runtime="torch", model=str(export(trained_run, tmp_path / "run.pt")))
    )
    paths = sorted(p for p in hue_gallery.rglob("*.png") if p.parent.name.startswith("v"))
    vectors = embedder.embed([Image.open(p).convert("RGB") for p in paths])
    recomputed = leave_one_out_metrics(vectors, [p.parent.name for p in paths])
    assert embedder.dim == metrics["embedding"]["dim"]
    assert recomputed.map_at_r == pytest.approx(metrics["test"]["map_at_r"], abs=1e-4)


def test_export_of_the_pooled_features_drops_the_head(trained_run, hue_gallery, tmp_path):
    out = export(trained_run, tmp_path / "pooled.pt", embedding="pooled")
    embedder = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(out)))
    trained = load_trained_model(json.loads((trained_run / "metrics.json").read_text())["checkpoint"])
    assert embedder.dim == trained.backbone.num_features != trained.dim and embedder.model.spec.embedding_dim is None
    assert not any(name.startswith("head.") for name in embedder.model.state_dict())
    images = [Image.open(p).convert("RGB") for p in sorted(hue_gallery.rglob("*.png"))[:12]]
    batch = torch.stack([eval_transform(embedder.preprocessing)(im) for im in images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trained.features(batch), dim=1).numpy()
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-5)
    assert torch.load(out, weights_only=True)["extra"]["embedding"] == "pooled"


def sets(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


def test_command_line_entry_points_and_frozen_batchnorm(hue_gallery, tmp_path, capsys):
    args = [*TINY, f"data.source={hue_gallery}", "data.batches_per_epoch=3", "trainer.max_epochs=1"]
    args += ["model.freeze_blocks=1", "model.freeze_bn=false", f"out.dir={tmp_path}", "out.name=cli"]
    assert main(["train", "--set", "loss.name=triplet", *sets(args)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_dir == tmp_path / "cli" and (run_dir / "metrics.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selected_by"].startswith("last epoch") and metrics["val"]["history"] == []  # no val classes
    assert "last-epoch000" in metrics["checkpoint"] and metrics["test"]["recall_at_1"] >= 0
    assert load_train_config(run_dir / "config.yaml").model.freeze_blocks == 1
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out.pt")]) == 0
    model = load_checkpoint(tmp_path / "out.pt")
    # The stem was frozen, BatchNorm statistics included: still the fresh-init values after training;
    # block 2 trained with freeze_bn=false, so its statistics moved.
    for bn, moved in ((model.backbone.bn1, False), (model.backbone.blocks[2][0].bn1, True)):
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) != moved
    # With freeze_bn (the default) no BatchNorm statistics move at all.
    args = [a.replace("freeze_bn=false", "freeze_bn=true").replace("out.name=cli", "out.name=bn") for a in args]
    assert main(["train", "--set", "loss.name=triplet", *sets(args)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bn.pt")]) == 0
    frozen = load_checkpoint(tmp_path / "bn.pt").backbone.blocks[2][0].bn1
    assert torch.equal(frozen.running_mean, torch.zeros_like(frozen.running_mean))


# --------------------------------------------------------------------------- distributed (2 CPU processes, gloo)
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loss_and_grads(module: EmbedderModule, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    loss, _ = module.compute_loss(module(images), labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.item(), grads


DDP_CASES = [
    LossConfig(name="triplet", miner="hard", margin=0.2),
    LossConfig(name="proxy_anchor", miner="none"),
    LossConfig(name="triplet", miner="semihard", margin=0.2, plus="proxy_anchor"),
]


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        for case, loss in enumerate(DDP_CASES):
            torch.manual_seed(0)  # same initial weights and proxies on every rank, as DDP's broadcast ensures
            module = tiny_module(loss).eval()  # eval: BatchNorm uses running statistics, per sample
            module.distribute(world_size)
            images, labels = pk_batch()
            value, grads = _loss_and_grads(module, images[rank::world_size], labels[rank::world_size])
            for grad in grads.values():  # what DDP does to gradients
                torch.distributed.all_reduce(grad)
                grad /= world_size
            torch.save({"loss": value, "grads": grads}, Path(out) / f"case{case}_rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_loss_matches_the_single_process_loss(tmp_path):
    """Two gloo processes, each with half of a PK batch and PML's distributed wrappers, get the loss and
    (after DDP's gradient average) the gradients of one process with the whole batch, proxies included."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for case, loss in enumerate(DDP_CASES):
        torch.manual_seed(0)
        single = tiny_module(loss).eval()
        images, labels = pk_batch()
        expected_loss, expected_grads = _loss_and_grads(single, images, labels)
        assert any("criterion" in name for name in expected_grads) == ("proxy_anchor" in (loss.name, loss.plus))
        for rank in range(2):
            result = torch.load(tmp_path / f"case{case}_rank{rank}.pt", weights_only=True)
            assert result["loss"] == pytest.approx(2 * expected_loss, rel=1e-4)  # PML: world size × gathered loss
            assert result["grads"].keys() == expected_grads.keys()
            for name, grad in expected_grads.items():
                # float32 sums in another order (two processes, one thread each): an element near zero may
                # differ by a few 1e-6 of the tensor's largest gradient, so the absolute tolerance scales with it
                scale = grad.abs().max().item()
                torch.testing.assert_close(
                    result["grads"][name], grad, rtol=1e-3, atol=1e-5 * scale + 1e-8, msg=f"{loss.name}: {name}"
                )


def test_lightning_ddp_run_on_two_cpu_processes(hue_gallery, trained_run, tmp_path):
    """``strategy=ddp devices=2``: Lightning's launcher, a PK sampler per rank, validation gathered from both
    ranks (DistributedSampler repeats removed): the zero-shot metrics equal the single-process ones."""
    root = Path(__file__).resolve().parents[3]
    args = [*TINY, f"data.source={hue_gallery}", "data.batches_per_epoch=3", "trainer.max_epochs=1"]
    args += [
        "data.val_fraction=0.3",
        "loss.name=multi_similarity",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        f"out.dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "carsearch.cli", "train", *sets(args)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "cache"]
    assert len(runs) == 1, runs  # both ranks wrote into rank 0's run directory
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    single = json.loads((trained_run / "metrics.json").read_text())["zero_shot"]
    for part in ("val", "test"):
        assert metrics["zero_shot"][part] == pytest.approx(single[part], abs=1e-6)
    assert metrics["global_steps"] == 3 and Path(metrics["checkpoint"]).exists()


def test_micro_batches_give_the_whole_batch_loss_and_gradients():
    """With frozen BatchNorm, a step in chunks of 4 equals the step on the whole batch (the loss sees all)."""
    config = load_train_config(None, TINY)
    loss = LossConfig(name="proxy_anchor", miner="none")
    images, labels = pk_batch(size=48)
    results = []
    for micro in (None, 4):
        torch.manual_seed(0)
        module = EmbedderModule(model_spec(config), 4, config.model, loss, OptimConfig(), micro_batch=micro).train()
        value, _ = module.compute_loss(module(images), labels)
        value.backward()
        results.append(
            (value.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        )
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole)
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 10
    for name, grad in whole_grads.items():  # float32 sums in another order: equal up to rounding
        difference = (chunked_grads[name] - grad).norm()
        assert difference <= 1e-4 * grad.norm() + 1e-6, (name, float(difference), float(grad.norm()))


def test_image_cache_skips_unreadable_images_and_is_reused(tmp_path, caplog):
    root = make_hue_gallery(tmp_path / "g", classes=8, per_class=4)
    (root / "t00" / "0.png").write_bytes(b"not an image")
    config = load_train_config(None, [*TINY, f"data.source={root}", "data.class_split=all"]).data
    pre = model_spec(load_train_config(None, TINY)).preprocessing
    with caplog.at_level(logging.WARNING):
        data = EmbedderDataModule(config, pre, cache_dir=tmp_path / "cache")
        data.setup()
    assert len(data.train_set) == 31 and "skipping unreadable training image" in caplog.text
    assert sorted(Counter(data.train_labels).values()) == [3] + [4] * 7
    files = sorted((tmp_path / "cache").glob("images_*.npy"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))
    stamp = files[0].stat().st_mtime_ns
    again = EmbedderDataModule(config, pre, cache_dir=tmp_path / "cache")
    again.setup()
    assert files[0].stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert np.array_equal(again.train_set.images[5], data.train_set.images[5])
    (root / "t02" / "1.png").unlink()  # the data changed: a new cache entry
    EmbedderDataModule(config, pre, cache_dir=tmp_path / "cache").setup()
    assert len(list((tmp_path / "cache").glob("images_*.npy"))) == 2


def onnx_metadata(path: Path) -> dict[str, Any]:
    """The carsearch spec and fingerprint an exported ONNX file stores in its metadata."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    spec = props.get("carsearch_spec")
    return {"spec": json.loads(spec) if spec else None, "fingerprint": props.get("carsearch_fingerprint") or None}


def test_export_onnx_runs_in_onnxruntime_like_torch(trained_run, hue_gallery, tmp_path):
    import onnxruntime as ort

    assert main(["export", str(trained_run), "--out", str(tmp_path / "embedder.onnx")]) == 0  # format from the suffix
    assert main(["export", str(trained_run), "--out", str(tmp_path / "embedder.pt")]) == 0
    embedder = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(tmp_path / "embedder.pt")))
    meta = onnx_metadata(tmp_path / "embedder.onnx")
    assert meta["spec"] == embedder.model.spec.to_dict() and meta["fingerprint"] == embedder.fingerprint
    images = [Image.open(p).convert("RGB") for p in sorted(hue_gallery.rglob("*.png"))[:5]]
    batch = embedder.tensors(images).numpy()
    session = ort.InferenceSession(str(tmp_path / "embedder.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": batch})[0]
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=1, keepdims=True), embedder.embed(images), atol=1e-4)


def test_export_without_a_run_writes_the_named_model(tmp_path):
    assert main(["export", "--out", str(tmp_path / "pretrained.pt"), "--model", "imagenet"]) == 0
    exported = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(tmp_path / "pretrained.pt")))
    imagenet = Embedder.from_config(EmbedderConfig(runtime="torch", model="imagenet"))
    assert exported.fingerprint == imagenet.fingerprint and exported.dim == 1280
    assert main(["export", "--out", str(tmp_path / "shipped.pt")]) == 0  # default: the shipped model, its classes kept
    shipped = Embedder.from_config(EmbedderConfig(runtime="torch", model=str(tmp_path / "shipped.pt")))
    default = Embedder.from_config(EmbedderConfig(runtime="torch"))
    assert shipped.fingerprint == default.fingerprint and shipped.train_labels == default.train_labels
    assert default.train_labels and len(default.train_labels) == 98
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path / "x.pt"), "--format", "tflite"])


# --------------------------------------------------------------------------- low-resolution views
def _checkerboard(size: int = 96, square: int = 2) -> torch.Tensor:
    grid = (np.indices((size, size)).sum(axis=0) // square) % 2
    return torch.from_numpy(np.stack([grid * 255] * 3).astype(np.uint8))


def test_a_low_resolution_view_keeps_its_size_and_loses_the_fine_detail() -> None:
    from carsearch.embedder.training.data import LowResolution

    torch.manual_seed(0)
    image = _checkerboard()
    degraded = LowResolution(1.0, (16, 24), jpeg=30)(image)
    assert degraded.shape == image.shape and degraded.dtype == torch.uint8
    detail = lambda t: float(t.float().diff(dim=-1).abs().mean())  # noqa: E731 - mean horizontal gradient
    assert detail(degraded) < 0.3 * detail(image)  # 2-px squares cannot survive a 16-24 px height
    assert torch.equal(LowResolution(0.0, (16, 24))(image), image)
    assert torch.equal(LowResolution(1.0, (200, 300), max_aspect=1.0)(image), image)  # never enlarged first


def test_low_resolution_settings_are_validated_and_reach_the_training_views() -> None:
    from carsearch.embedder.training.data import LowResolution, augment_transform

    with pytest.raises(ConfigError, match="low_res_sides"):
        load_train_config(None, ["data.low_res=0.5", "data.low_res_sides=[64, 32]"])
    with pytest.raises(ConfigError, match="data.low_res must be"):
        load_train_config(None, ["data.low_res=1.5"])
    pre = Preprocessing(image_size=64)
    views = augment_transform(pre, crop_scale=1.0, hflip=False, low_res=LowResolution(1.0, (16, 16)))
    plain = augment_transform(pre, crop_scale=1.0, hflip=False)
    image = _checkerboard(64)
    assert not torch.allclose(views(image), plain(image))
