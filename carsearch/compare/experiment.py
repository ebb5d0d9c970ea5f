"""Cropped vs raw: detector quality, a retrieval grid (embedder × input), attention-in-box and examples.

``run_compare(config, out)`` runs every stage (cached in ``out``) and returns the :class:`CompareResults`
that ``report.write_report`` turns into ``report.md`` / ``report.html`` / ``results.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image

from carsearch.compare.config import CompareConfig
from carsearch.compare.stage_cache import StageCache
from carsearch.config import EmbedderConfig, PipelineConfig, RuntimeConfig
from carsearch.config_files import from_dict, to_dict
from carsearch.data import storage
from carsearch.data.cropping import apply_plan, plan_image
from carsearch.data.digest import json_digest
from carsearch.data.images import load_image
from carsearch.data.sources import SourceItem, read_source
from carsearch.embedder import Embedder
from carsearch.embedder.checkpoint import load_checkpoint
from carsearch.embedder.training.boxcache import cache_path, detect_cached
from carsearch.embedder.training.config import TrainConfig, load_train_config
from carsearch.embedder.training.data import carve_out, crop_config
from carsearch.embedder.training.exporter import export
from carsearch.embedder.training.run import train
from carsearch.errors import DataSourceError
from carsearch.metrics import leave_one_out_metrics
from carsearch.pipeline.cam_jobs import attention_dataset
from carsearch.runtime.device import resolve_device
from carsearch.runtime.threads import configure_threads
from carsearch.runtime.versions import versions
from carsearch.types import FLAG_NO_DETECTION, Detection

if TYPE_CHECKING:
    from carsearch.embedder.training.config import InputMode
    from carsearch.explain.cam import Method

logger = logging.getLogger(__name__)

INPUTS = ("raw", "detector", "gt")
EMBEDDERS = ("zero_shot", "ft_raw", "ft_crop")


@dataclasses.dataclass
class PhotoSplit:
    """Class-disjoint split of the photos (every item has a ground-truth box)."""

    train: list[SourceItem]
    test: list[SourceItem]

    @property
    def key(self) -> list[Any]:
        return [[str(i.path), i.label, i.box.as_list() if i.box else None] for i in self.train + self.test]


@dataclasses.dataclass
class CompareResults:
    """What the experiment measured. The fields up to ``versions`` are ``results.json`` (:meth:`to_dict`);
    the rest is what the report's example pictures need: the photos, the zero-shot embedder that explains
    them, the test photos' detections, and each test photo's leave-one-out top-1 (an index into
    ``photos.test``) on raw photos and on detector crops with that embedder."""

    config: dict[str, Any]
    split: dict[str, Any]  # class and image counts, image sizes
    detector_quality: dict[str, Any]
    retrieval: dict[str, dict[str, dict[str, float]]]  # embedder -> input -> metric -> value
    test_no_detection: int
    attention: dict[str, dict[str, Any]]
    examples: dict[str, Any]
    models: dict[str, str]
    stages: list[dict[str, Any]]
    wall_time_s: float
    platform: dict[str, str]
    versions: dict[str, str]
    photos: PhotoSplit = dataclasses.field(metadata={"report_only": True})
    zero_shot: Embedder = dataclasses.field(metadata={"report_only": True})
    test_detections: list[list[Detection]] = dataclasses.field(metadata={"report_only": True})
    top1: dict[str, list[int]] = dataclasses.field(metadata={"report_only": True})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able results (``results.json``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("report_only")}


def split_photos(config: CompareConfig) -> PhotoSplit:
    """Filtered photos, first ``train_share`` of the sorted classes for training, the rest for testing."""
    items = [i for i in read_source(config.data.source, where=config.data.where or None) if i.box and i.label]
    by_class: dict[str, list[SourceItem]] = defaultdict(list)
    for item in items:
        by_class[str(item.label)].append(item)
    classes = sorted(by_class)
    cut = round(len(classes) * config.data.train_share)
    parts = [classes[:cut], classes[cut:]]
    if config.data.max_classes:
        parts = [p[: config.data.max_classes] for p in parts]
    if min(len(p) for p in parts) < 2:
        raise DataSourceError(f"need at least 2 classes on each side of the split, got {[len(p) for p in parts]}")
    train, test = ([i for c in p for i in by_class[c][: config.data.max_per_class]] for p in parts)
    return PhotoSplit(train, test)


def _boxes(detections: list[list[Detection]], confidence: float) -> list[list[Detection]]:
    return [[d for d in dets if d.score >= confidence] for dets in detections]


def input_config(config: CompareConfig, mode: str) -> PipelineConfig:
    """How input ``mode`` crops, as the fine-tuned rows train: whole photo, ground-truth or detector box + margin.

    The detector row takes the largest usable box whatever ``detector.selection`` says.
    """
    # crop_config rejects a mode other than raw, gt and detector
    return crop_config(cast("InputMode", mode), dataclasses.replace(config.detector, selection="largest"))


def _chosen(crop: PipelineConfig, dets: list[Detection], width: int, height: int) -> Detection | None:
    return plan_image(crop, width, height, dets, single=True)[0].detection


def detector_quality(
    config: CompareConfig, items: list[SourceItem], detections: list[list[Detection]], sizes: list[tuple[int, int]]
) -> dict[str, Any]:
    """Chosen box vs ground truth per confidence threshold: IoU histogram, hit rates, no-detection rate."""
    out: dict[str, Any] = {"images": len(items), "thresholds": {}}
    crop = input_config(config, "detector")
    for confidence in sorted(config.confidences):
        ious: list[float | None] = []
        for item, dets, (w, h) in zip(items, _boxes(detections, confidence), sizes, strict=True):
            chosen = _chosen(crop, dets, w, h)
            if chosen:
                assert item.box is not None  # split_photos keeps only photos with a box
                ious.append(chosen.box.iou(item.box.clip(w, h)))
            else:
                ious.append(None)
        found = np.array([v for v in ious if v is not None])
        histogram, _ = np.histogram(found, bins=10, range=(0.0, 1.0))
        out["thresholds"][f"{confidence:g}"] = {
            "no_detection_rate": float(np.mean([v is None for v in ious])),
            "hit_rate_iou_0.5": float(np.mean([v is not None and v >= 0.5 for v in ious])),
            "hit_rate_iou_0.7": float(np.mean([v is not None and v >= 0.7 for v in ious])),
            "mean_iou_when_found": float(found.mean()) if len(found) else float("nan"),
            "iou_histogram": [int(v) for v in histogram],
        }
    return out


def crop_for(
    config: CompareConfig, mode: str, image: Image.Image, item: SourceItem, dets: list[Detection]
) -> tuple[Image.Image, bool]:
    """The pixels one input mode embeds, and whether the detector found nothing (whole image used)."""
    plan = plan_image(input_config(config, mode), image.width, image.height, dets, item.box, single=True)[0]
    return apply_plan(image, plan), FLAG_NO_DETECTION in plan.flags


def _write_csv(items: list[SourceItem], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "x1", "y1", "x2", "y2"])
        for item in items:
            assert item.box is not None  # split_photos keeps only photos with a box
            writer.writerow([storage.identity(item.path), item.label, *item.box.as_list()])
    return path


def train_config(config: CompareConfig, split: PhotoSplit, mode: str, out: Path) -> TrainConfig:
    """The shared recipe for one fine-tuned row; its own validation classes come from the training classes."""
    classes = sorted({str(i.label) for i in split.train})
    # At least one validation class, cut as training cuts its own (data.val_carve=last).
    train_classes, val_classes = carve_out(classes, max(config.train.val_share, 1 / len(classes)), "last")
    data = to_dict(load_train_config(config.train.recipe, list(config.train.overrides)))
    data["data"].update(
        {
            "source": str(_write_csv(split.train, out / "data" / "train_classes.csv")),
            "where": {},
            "class_split": "list",
            "train_classes": train_classes,
            "val_classes": val_classes,
            "input": "detector" if mode == "ft_crop" else "raw",
            "detector": to_dict(config.detector),
            "cache_dir": str(out / "cache"),
            "image_size": config.image_size,
            "image_width": config.image_width,
            "resize_to": None,  # 8/7 of the compare's image size, not the recipe's
            "crop_size": None,  # views at the compare's image size, not the recipe's view size
        }
    )
    data["data"].pop("where")
    data["model"]["backbone"] = config.backbone
    data["trainer"].update({"seed": config.seed, "progress_bar": False})
    data["out"] = {"dir": str(out / "train"), "name": mode, "overwrite": True}
    return from_dict(TrainConfig, data)


def _finetune(cache: StageCache, config: CompareConfig, split: PhotoSplit, mode: str, out: Path) -> Path:
    tconfig = train_config(config, split, mode, out)
    key = [to_dict(dataclasses.replace(tconfig, out=dataclasses.replace(tconfig.out, name=""))), split.key]
    model_path = out / "train" / f"{mode}-{json_digest(key)}.pt"

    def compute() -> Path:
        run_dir = train(tconfig)
        return export(run_dir, model_path)

    return cache.file(f"finetune_{mode}", model_path, compute)


def _embedder(config: CompareConfig, name: str, models: dict[str, Path], device: str) -> Embedder:
    if name == "zero_shot":
        embedder = EmbedderConfig(
            model="imagenet", backbone=config.backbone, image_size=config.image_size, image_width=config.image_width
        )
        return Embedder.from_config(embedder, device)
    return Embedder(load_checkpoint(models[name]), device, source=f"checkpoint:{models[name].name}")


def _metrics(vectors: np.ndarray, labels: list[str]) -> dict[str, float]:
    return leave_one_out_metrics(vectors, labels).flat(("recall_at_1", "recall_at_4", "map_at_r"))


def top1(vectors: np.ndarray) -> np.ndarray:
    """Leave-one-out nearest neighbour of every row."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def _detections(
    cache: StageCache, config: CompareConfig, split: PhotoSplit, out: Path, device: str
) -> tuple[list[list[list[Any]]], list[list[Detection]]]:
    """Stage ``detections``: every photo's boxes at the lowest swept confidence, as stored rows and as detections.

    The rows (:meth:`Detection.to_row`) are part of later stages' keys. ``detect_cached`` returns detections
    already rounded as the row format rounds them, so a row holds exactly the detector cache's values.
    """
    sweep = dataclasses.replace(config.detector, confidence=min(config.confidences))
    rows = cache.json(
        "detections",
        [split.key, to_dict(sweep)],
        lambda: [
            [d.to_row() for d in dets]
            for dets in detect_cached(split.train + split.test, sweep, cache_path(out / "cache", sweep), device=device)
        ],
    )
    return rows, [[Detection.from_row(row) for row in dets] for dets in rows]


def _retrieval(
    cache: StageCache,
    config: CompareConfig,
    split: PhotoSplit,
    test_dets: list[list[Detection]],
    det_rows: list[list[list[Any]]],
    embedders: dict[str, Embedder],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[tuple[str, str], np.ndarray]]:
    """Stages ``embed_<embedder>_<input>``: the test photos' vectors and their leave-one-out metrics, per cell."""
    labels = [str(i.label) for i in split.test]
    grid: dict[str, dict[str, dict[str, float]]] = {}
    vectors: dict[tuple[str, str], np.ndarray] = {}
    crops: dict[str, list[Image.Image]] = {}  # per input mode, decoded and cut once, shared by the embedders

    def crops_for(mode: str) -> list[Image.Image]:
        if mode not in crops:
            if "photos" not in crops:
                crops["photos"] = [load_image(i.path) for i in split.test]
            crops[mode] = [
                crop_for(config, mode, image, item, dets)[0]
                for image, item, dets in zip(crops["photos"], split.test, test_dets, strict=True)
            ]
        return crops[mode]

    for name, embedder in embedders.items():
        grid[name] = {}
        for mode in INPUTS:
            key = [name, embedder.identity, mode, split.key, det_rows, to_dict(config.detector)]

            def compute(embedder: Embedder = embedder, mode: str = mode) -> np.ndarray:
                return embedder.embed(crops_for(mode))

            vectors[(name, mode)] = cache.array(f"embed_{name}_{mode}", key, compute)
            grid[name][mode] = _metrics(vectors[(name, mode)], labels)
    return grid, vectors


ATTENTION_SUMMARY = ("count", "mean", "median", "share_mostly_outside", "chance", "histogram")


def _attention(
    cache: StageCache, config: CompareConfig, split: PhotoSplit, embedders: dict[str, Embedder], device: str
) -> dict[str, dict[str, Any]]:
    """Stages ``attention_<embedder>``: attention-in-box on the first raw test photos, summarised per embedder."""
    limit = config.attention.limit
    pipeline_config = PipelineConfig(detector=config.detector, crop=False, runtime=RuntimeConfig(device=device))
    attention: dict[str, dict[str, Any]] = {}
    for name, embedder in embedders.items():

        def compute_attention(embedder: Embedder = embedder) -> dict[str, Any]:
            from carsearch.pipeline.pipeline import Pipeline

            pipeline = Pipeline(pipeline_config, embedder=embedder)
            report = attention_dataset(
                pipeline,
                split.test[:limit],
                crop=False,
                method=cast("Method", config.attention.method),  # EmbeddingCAM rejects unknown methods
                batch_size=config.attention.batch_size,
            )
            return report.to_dict(with_items=True)

        report = cache.json(
            f"attention_{name}",
            [embedder.identity, split.key, limit, to_dict(config)["attention"]],
            compute_attention,
        )
        attention[name] = {m: report[m] for m in ATTENTION_SUMMARY}
    return attention


def _examples(labels: list[str], raw_top: np.ndarray, crop_top: np.ndarray, limit: int) -> dict[str, Any]:
    """The test photos whose top-1 the crop fixes or breaks (first ``limit`` of each), and the four counts."""
    correct_raw = np.array([labels[j] == labels[i] for i, j in enumerate(raw_top)])
    correct_crop = np.array([labels[j] == labels[i] for i, j in enumerate(crop_top)])
    return {
        "crop_right_raw_wrong": [int(i) for i in np.flatnonzero(correct_crop & ~correct_raw)[:limit]],
        "raw_right_crop_wrong": [int(i) for i in np.flatnonzero(correct_raw & ~correct_crop)[:limit]],
        "counts": {
            "crop_right_raw_wrong": int((correct_crop & ~correct_raw).sum()),
            "raw_right_crop_wrong": int((correct_raw & ~correct_crop).sum()),
            "both_right": int((correct_crop & correct_raw).sum()),
            "both_wrong": int((~correct_crop & ~correct_raw).sum()),
        },
    }


def _split_summary(split: PhotoSplit, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Class and image counts of both sides, and the first five image sizes."""
    return {
        "train_classes": len({i.label for i in split.train}),
        "test_classes": len({str(i.label) for i in split.test}),
        "train_images": len(split.train),
        "test_images": len(split.test),
        "resolution": sorted({f"{w}x{h}" for w, h in sizes})[:5],
    }


def run_compare(config: CompareConfig, out: str | Path) -> CompareResults:
    """Every stage of the experiment (cached in ``out``); returns the results for the report."""
    out = Path(out)
    started = time.perf_counter()
    configure_threads(None)
    device = str(resolve_device(config.device))
    cache = StageCache(out)
    split = split_photos(config)
    items = split.train + split.test

    det_rows, detections = _detections(cache, config, split, out, device)
    sizes = [load_image(i.path).size for i in items]  # decoded as everywhere else (EXIF orientation applied)
    quality = cache.json(
        "detector_quality",
        [split.key, det_rows, to_dict(config)["detector"], config.confidences],
        lambda: detector_quality(config, items, detections, sizes),
    )
    models = {mode: _finetune(cache, config, split, mode, out) for mode in ("ft_raw", "ft_crop")}

    test_dets = _boxes(detections[len(split.train) :], config.detector.confidence)
    test_sizes = sizes[len(split.train) :]
    detector_crop = input_config(config, "detector")
    no_detection = sum(_chosen(detector_crop, d, w, h) is None for d, (w, h) in zip(test_dets, test_sizes, strict=True))
    embedders = {name: _embedder(config, name, models, device) for name in EMBEDDERS}  # loaded once each
    grid, vectors = _retrieval(cache, config, split, test_dets, det_rows, embedders)
    attention = _attention(cache, config, split, embedders, device)

    raw_top, crop_top = top1(vectors[("zero_shot", "raw")]), top1(vectors[("zero_shot", "detector")])
    return CompareResults(
        config=to_dict(config),
        split=_split_summary(split, sizes),
        detector_quality=quality,
        retrieval=grid,
        test_no_detection=int(no_detection),
        attention=attention,
        examples=_examples([str(i.label) for i in split.test], raw_top, crop_top, config.examples),
        models={k: str(v) for k, v in models.items()},
        stages=cache.log,
        wall_time_s=round(time.perf_counter() - started, 1),
        platform={"python": platform.python_version(), "machine": platform.machine(), "device": device},
        versions=versions(),
        photos=split,
        zero_shot=embedders["zero_shot"],
        test_detections=test_dets,
        top1={"raw": raw_top.tolist(), "detector": crop_top.tolist()},
    )
