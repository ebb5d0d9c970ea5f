"""CAM jobs through the pipeline: a query's results explained, attention-in-box over a dataset (the CAMs
themselves are :mod:`carsearch.explain`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from carsearch.config import PipelineConfig
from carsearch.data.atomic import atomic_write_json
from carsearch.data.cropping import apply_plan, needs_detector, plan_image
from carsearch.data.images import ImageInput, as_image, load_image
from carsearch.data.sources import SourceItem
from carsearch.errors import CarSearchError
from carsearch.explain import AttentionSummary, Explainer, photo_attention
from carsearch.explain.cam import Method
from carsearch.explain.render import PairView, draw_box, overlay, pair_panel, topk_grid
from carsearch.index import GalleryIndex
from carsearch.runtime.progress import progress_bar
from carsearch.types import FLAG_NO_DETECTION, BBox, CropPlan, Detection, SearchResult

if TYPE_CHECKING:
    from carsearch.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

QUERY_MIN_SIDE = 384


def load_item_crop(record: dict[str, Any]) -> Image.Image:
    """The pixels an index item was embedded from: its image cropped to its recorded box."""
    image = load_image(record["path"])
    box = record.get("box")
    if not box:
        return image
    size = record.get("image_size")
    region = BBox(*box)
    if size and tuple(size) != image.size:  # the file changed size since indexing: keep the relative box
        region = region.scale(image.width / size[0]) if size[0] else region
    return image.crop(region.clip(image.width, image.height).to_int())


@dataclass(frozen=True)
class QueryExplanation:
    """A query's crop and the CAMs of its top hits; ``attention``: its own CAM's energy in ``box``."""

    image: Image.Image
    plan: CropPlan
    crop: Image.Image
    views: list[PairView]
    photo_map: np.ndarray  # the query's own CAM (w.r.t. its embedding), over the whole photo
    box: BBox | None
    attention: float | None


def explain_result(
    explainer: Explainer,
    image: Image.Image,
    plan: CropPlan,
    result: SearchResult,
    query_label: str | None = None,
    box: BBox | None = None,
) -> QueryExplanation:
    """Pair CAMs (query w.r.t. each hit, and each hit w.r.t. the query) for the hits of ``result``."""
    crop = apply_plan(image, plan)
    box = box or (plan.detection.box if plan.detection else None)
    crop_box = None
    if box is not None:  # the car box in crop pixels
        x0, y0 = plan.region.to_int()[:2] if plan.region else (0, 0)
        crop_box = BBox(box.x1 - x0, box.y1 - y0, box.x2 - x0, box.y2 - y0).clip(crop.width, crop.height)
    hits, hit_crops = [], []
    for hit in result.hits:
        try:
            hit_crops.append(load_item_crop(hit.metadata or {"path": hit.path}))
            hits.append(hit)
        except CarSearchError as exc:
            logger.warning("cannot explain hit %s: %s", hit.path, exc)
    # one batched pass each: the query against every hit (+ its own embedding), every hit against the query
    vectors = explainer.embedder.embed([crop, *hit_crops])
    query_maps = explainer.heatmaps([crop] * (len(hits) + 1), np.concatenate([vectors[1:], vectors[:1]]))
    hit_maps = explainer.heatmaps(hit_crops, np.repeat(vectors[:1], len(hits), axis=0)) if hits else []
    views = [
        PairView(crop, q_map, hit_crop, h_map, hit.score, hit.rank, query_label, hit.label, crop_box)
        for hit, hit_crop, q_map, h_map in zip(hits, hit_crops, query_maps[:-1], hit_maps, strict=True)
    ]
    photo_map, attention = photo_attention(query_maps[-1], plan.region, image.size, box)
    return QueryExplanation(image, plan, crop, views, photo_map, box, attention)


def explain_query(
    pipeline: Pipeline,
    index: GalleryIndex | str | Path,
    query: ImageInput,
    k: int = 3,
    method: Method = "gradcam",
    target_layer: str | None = None,
    box: BBox | None = None,
    exclude_self: bool = False,
) -> QueryExplanation:
    """Search with ``query`` (anything :meth:`Pipeline.search` takes) and explain its top-``k`` hits (``box``: a
    known car box for attention-in-box)."""
    gallery = index if isinstance(index, GalleryIndex) else pipeline.open_index(index)
    image, data = as_image(query)
    result = pipeline.search(gallery, data if data is not None else image, k=k, exclude_self=exclude_self)
    explainer = Explainer(pipeline.embedder, method, target_layer)
    return explain_result(explainer, image, result.query_plan, result, box=box)


def _blank(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


def save_explanation(explanation: QueryExplanation, out: str | Path, redact: bool = False) -> dict[str, Any]:
    """Write ``query.png`` (photo + boxes + its own CAM), ``pair_NN.png`` per hit, ``topk.png``, ``explain.json``.

    ``redact`` draws the CAMs on grey instead of the photos: pictures that can be published without the
    photos' licence (the maps and boxes are the model's output).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image = _blank(explanation.image) if redact else explanation.image
    scale = max(1.0, QUERY_MIN_SIDE / max(image.size))  # thumbnails are upscaled so boxes stay readable
    size = (round(image.width * scale), round(image.height * scale))
    photo = overlay(
        image.resize(size, Image.Resampling.BILINEAR), np.asarray(Image.fromarray(explanation.photo_map).resize(size))
    )
    region, box = explanation.plan.region, explanation.box
    same = region is not None and box is not None and region.to_int() == box.to_int()  # no margin: one box
    if region is not None:
        photo = draw_box(photo, region.scale(scale), label="car box = embedded crop" if same else "embedded crop")
    if box is not None and not same:
        photo = draw_box(photo, box.scale(scale), colour=(255, 255, 0), label="car box")
    files = [out / "query.png"]
    photo.save(files[0])
    views = explanation.views
    if redact:
        views = [dataclasses.replace(v, query=_blank(v.query), result=_blank(v.result)) for v in views]
    for view in views:
        files.append(out / f"pair_{view.rank:02d}.png")
        pair_panel(view, photos=not redact).save(files[-1])
    if views:
        files.append(out / "topk.png")
        topk_grid(views, photos=not redact).save(files[-1])
    summary = {
        "query_region": region.as_list() if region else None,
        "query_flags": list(explanation.plan.flags),
        "box": explanation.box.as_list() if explanation.box else None,
        "attention_in_box": explanation.attention,
        "hits": [{"rank": v.rank, "score": round(v.score, 5), "label": v.result_label} for v in views],
        "files": [f.name for f in files],
    }
    atomic_write_json(out / "explain.json", summary)
    return summary


@dataclass
class AttentionReport:
    """Attention-in-box of one input mode (raw photo or crop) over a dataset."""

    mode: str
    method: str
    summary: AttentionSummary
    items: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        """Plain JSON: mode, method, the summary's figures, counts (skipped, per box source, no detection) and
        the chance level (the boxes' mean share of the image); the item and skipped rows unless ``with_items``
        is false."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "method": self.method,
            **self.summary.to_dict(),
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "box_sources": {s: sum(i["box_source"] == s for i in self.items) for s in ("gt", "detector")},
            # crop mode: photos with no detection are embedded whole, as the pipeline does, and counted here
            "no_detection": sum(bool(i.get("no_detection")) for i in self.items),
            # what a uniform map would score: the box's share of the image
            "chance": float(np.mean([i["box_share"] for i in self.items])) if self.items else float("nan"),
        }
        if with_items:
            out["items"], out["skipped_items"] = self.items, self.skipped
        return out


def _detections(
    pipeline: Pipeline, config: PipelineConfig, items: Sequence[SourceItem], images: list[Image.Image]
) -> dict[int, list[Detection]]:
    """Detector output for the images that need it: no ground-truth box, or crops taken by the detector."""
    need = [i for i, item in enumerate(items) if item.box is None or needs_detector(config, item.box)]
    if not need:
        return {}
    return dict(zip(need, pipeline.detector.detect([images[i] for i in need]), strict=True))


def _car_box(
    config: PipelineConfig, item: SourceItem, image: Image.Image, dets: list[Detection] | None
) -> tuple[BBox | None, str]:
    """The car's box: the ground truth when known, else the detector's chosen box (or none)."""
    if item.box is not None:
        return item.box.clip(image.width, image.height), "gt"
    detector_config = dataclasses.replace(config, crop=True, crop_source="detector")
    plans = plan_image(detector_config, image.width, image.height, dets or [], single=True)
    return (plans[0].detection.box if plans and plans[0].detection else None), "detector"


def attention_dataset(
    pipeline: Pipeline,
    items: Sequence[SourceItem],
    crop: bool,
    method: Method = "gradcam",
    target_layer: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> AttentionReport:
    """Energy of each image's own CAM inside its car box, for raw photos or their crops (pasted back).

    Images without a known box (no ground truth, nothing detected) and unreadable files are skipped and
    recorded. The crop follows the pipeline's config (``crop_source`` detector or gt).
    """
    explainer = Explainer(pipeline.embedder, method, target_layer, batch_size=batch_size)
    config = dataclasses.replace(pipeline.config, crop=crop)
    report = AttentionReport("crop" if crop else "raw", method, AttentionSummary.from_scores([]))
    scores: list[float] = []
    bar = progress_bar(len(items), progress, f"attention ({report.mode})")
    tic = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk, images = [], []
        for item in items[start : start + batch_size]:
            try:
                images.append(load_image(item.path))
                chunk.append(item)
            except CarSearchError as exc:
                report.skipped.append({"path": str(item.path), "reason": str(exc)})
        detections = _detections(pipeline, config, chunk, images)
        boxes = [
            _car_box(config, item, im, detections.get(i))
            for i, (item, im) in enumerate(zip(chunk, images, strict=True))
        ]
        keep = [i for i, (box, _) in enumerate(boxes) if box is not None and box.area > 0]
        for i in sorted(set(range(len(chunk))) - set(keep)):
            report.skipped.append({"path": str(chunk[i].path), "reason": "no car box (no ground truth, none detected)"})
        plans = [
            plan_image(config, images[i].width, images[i].height, detections.get(i), chunk[i].box, single=True)[0]
            for i in keep
        ]
        crops = [apply_plan(images[i], plan) for i, plan in zip(keep, plans, strict=True)]
        maps = explainer.heatmaps(crops) if crops else []
        for i, plan, cam in zip(keep, plans, maps, strict=True):
            box, source = boxes[i]
            assert box is not None  # keep lists only items with a box
            _, score = photo_attention(cam, plan.region, images[i].size, box)
            scores.append(score)
            report.items.append(
                {
                    "path": str(chunk[i].path),
                    "label": chunk[i].label,
                    "attention": None if np.isnan(score) else round(score, 4),
                    "box": box.as_list(),
                    "box_source": source,
                    "box_share": round(box.area / (images[i].width * images[i].height), 4),
                    "region": plan.region.as_list() if plan.region else None,
                    "no_detection": FLAG_NO_DETECTION in plan.flags,  # crop mode, nothing found: whole photo
                }
            )
        if bar is not None:
            bar.update(len(items[start : start + batch_size]))
    if bar is not None:
        bar.close()
    report.summary = AttentionSummary.from_scores(scores)
    report.seconds = time.perf_counter() - tic
    return report
