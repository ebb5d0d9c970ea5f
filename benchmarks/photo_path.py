"""The product path on photos: which detector confidence, and what to do when no box passes it.

    python benchmarks/photo_path.py --run runs/levers/lite1 --run runs/twin/triplet_semihard-25

The shared Stanford Cars photos (128×96 thumbnails with the car's box fully visible) and crops go through
the offline detector once at a floor confidence (0.05, boxes cached), each image smaller than the detector's
input pasted at its own size (``--detector-input pad``) or enlarged to fill it (``enlarge``; the default:
the product's ``detector.enlarge_small``), or both side by side (``both``: the inputs are then named
``det[pad]@…`` and ``det[enlarge]@…``). For each confidence threshold and each fallback when no box passes
it (``whole``: embed the whole image; ``best``: the most confident box below the threshold, down to the
floor: ``detector.fallback_confidence``), the region actually embedded is
compared with the truth (IoU; a whole image counts with its own IoU): the photo's fitted box, or the whole
crop. Images of the **first 49 classes** (the half split's training classes) only; the policy with the
highest mean IoU, photos and crops averaged, is chosen. Then every model (``--run``: a training run,
exported on first use; ``--model``: a checkpoint or a shipped name; ``--size``: at that input size instead
of its own; ``--flip``: also with flip test-time augmentation) is evaluated on the photos of the **last 49
classes** (its test classes when it was trained on the half split; ``--on validation``: the runs' own
validation classes), leave-one-out: raw photos, ground-truth crops, the detector crops of every policy, and
the same classes' crops whole. The test classes choose nothing. Writes ``benchmarks/results/photo_path.json``
(``--out``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carsearch.config import DetectorConfig, EmbedderConfig  # noqa: E402
from carsearch.data.images import load_image  # noqa: E402
from carsearch.data.selection import plan_crops  # noqa: E402
from carsearch.data.sources import SourceItem, read_source  # noqa: E402
from carsearch.embedder import Embedder  # noqa: E402
from carsearch.embedder.model import at_input_size  # noqa: E402
from carsearch.embedder.training.boxcache import cache_path, detect_cached  # noqa: E402
from carsearch.embedder.training.data import sort_classes  # noqa: E402
from carsearch.metrics import leave_one_out_metrics  # noqa: E402
from carsearch.types import BBox, Detection  # noqa: E402

SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "data" / "stanford_cars" / "photos.csv"
CROPS = SHARED / "data" / "stanford_cars" / "crops.csv"
DETECTOR = SHARED / "models" / "yolov8n_coco_int8.tflite"
FLOOR = 0.05
CONFIDENCES = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5)
FALLBACKS = ("whole", "best")
MIN_BOX = DetectorConfig().min_box_size


def chosen_region(dets: list[Detection], width: int, height: int, confidence: float, fallback: str) -> BBox | None:
    """The region the pipeline embeds (None: the whole photo) with ``detector.confidence`` = ``confidence`` and
    ``detector.fallback_confidence`` = the floor (``best``) or null (``whole``)."""
    floor = FLOOR if fallback == "best" else None
    (plan,) = plan_crops(
        dets,
        width,
        height,
        policy="largest",
        margin=0.0,
        min_box_size=MIN_BOX,
        confidence=confidence,
        fallback_confidence=floor,
    )
    return plan.region


def policy_regions(
    dets: list[list[Detection]], sizes: list[tuple[int, int]]
) -> dict[tuple[float, str], list[BBox | None]]:
    """Each policy's embedded region per image (None: the whole image)."""
    return {
        (c, f): [chosen_region(d, w, h, c, f) for d, (w, h) in zip(dets, sizes, strict=True)]
        for c in CONFIDENCES
        for f in FALLBACKS
    }


def policy_stats(
    regions: dict[tuple[float, str], list[BBox | None]], sizes: list[tuple[int, int]], truth: list[BBox], ids: list[int]
) -> dict[tuple[float, str], dict[str, float]]:
    """Per policy, over the images ``ids``: the share embedded whole, and the IoU of what is embedded with the truth."""
    out = {}
    for key, chosen in regions.items():
        ious = [(chosen[i] or BBox(0, 0, *sizes[i])).iou(truth[i]) for i in ids]
        out[key] = {
            "images": len(ids),
            "no_box": float(np.mean([chosen[i] is None for i in ids])),
            "mean_iou": float(np.mean(ious)),
            "hit_iou_0.5": float(np.mean([v >= 0.5 for v in ious])),
        }
    return out


def split(items: list[SourceItem]) -> tuple[list[int], list[int]]:
    """Indices of the photos of the first 49 sorted crop classes, and of the last 49."""
    with CROPS.open(newline="") as handle:
        classes = sort_classes([row["label"] for row in csv.DictReader(handle)])
    train = set(classes[: (len(classes) + 1) // 2])
    inside = [it.label in train for it in items]
    return [i for i, yes in enumerate(inside) if yes], [i for i, yes in enumerate(inside) if not yes]


def validation_classes(runs: list[str]) -> set[str]:
    """The validation classes every run in ``runs`` holds out (their ``classes.json``); they must agree."""
    found = [frozenset(json.loads((Path(run) / "classes.json").read_text()).get("val") or []) for run in runs]
    if not found or not found[0] or len(set(found)) != 1:
        raise SystemExit("--on validation needs runs that share one non-empty list of validation classes")
    return set(found[0])


def embedder_for(run: str | None, model: str | None, size: int | None = None) -> tuple[str, Embedder]:
    """A run's exported model (exported on first use) or a named / saved model; at ``size`` px if given."""
    if run is not None:
        out = Path(run) / "photo_path_model.pt"
        if not out.exists():
            from carsearch.embedder.training import export

            export(run, out)
        name, embedder = Path(run).name, Embedder.from_config(EmbedderConfig(model=str(out)))
    else:
        name, embedder = str(model), Embedder.from_config(EmbedderConfig(model=str(model)))
    if size is None or size == embedder.preprocessing.image_size:
        return name, embedder
    resized = at_input_size(embedder.model, size)
    return f"{name} at {size} px", Embedder(resized, runtime=embedder.runtime, train_labels=embedder.train_labels)


def flipped(embedder: Embedder) -> Embedder:
    """The same model embedding the mean of each image's and its mirror image's vectors (``embedder.flip``)."""
    twin = copy.copy(embedder)
    twin.flip = True
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="a training run folder (repeatable)")
    parser.add_argument("--model", action="append", default=[], help="a checkpoint path or shipped name")
    parser.add_argument("--size", type=int, help="embed at this square size, same weights (default: each one's own)")
    parser.add_argument("--flip", action="store_true", help="also evaluate each model with flip test-time augmentation")
    parser.add_argument(
        "--on",
        choices=["test", "validation"],
        default="test",
        help="evaluate the last 49 classes (test) or the runs' own validation classes (their classes.json)",
    )
    parser.add_argument(
        "--detector-input",
        choices=["pad", "enlarge", "both"],
        default="enlarge" if DetectorConfig().enlarge_small else "pad",
        help="images smaller than the detector's input: pasted at their size (pad) or enlarged (enlarge); the "
        "default: the product's (detector.enlarge_small); both: each, side by side",
    )
    parser.add_argument("--crops-every", type=int, default=1, help="policy table: every Nth crop only (time)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "photo_path")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "photo_path.json")
    args = parser.parse_args()

    items = read_source(PHOTOS, where={"box_fully_visible": "1"})
    train_ids, test_ids = split(items)
    if args.on == "validation":
        wanted = validation_classes(args.run)
        test_ids = [i for i, it in enumerate(items) if it.label in wanted]
    crops = read_source(CROPS)
    crop_ids = split(crops)[0][:: args.crops_every]
    photo_ids = sorted(set(train_ids) | set(test_ids))  # detect only the photos used
    sizes = [load_image(it.path).size for it in items]
    crop_sizes = [load_image(crops[i].path).size for i in crop_ids]
    boxes = [it.box.clip(*size) for it, size in zip(items, sizes, strict=True)]  # type: ignore[union-attr]
    regions_by_input, policy_rows = {}, []
    for small in [args.detector_input] if args.detector_input != "both" else ["pad", "enlarge"]:
        detector = DetectorConfig(weights=str(DETECTOR), confidence=FLOOR, enlarge_small=small == "enlarge")
        found = detect_cached([items[i] for i in photo_ids], detector, cache_path(args.cache, detector))
        dets: list[list[Detection]] = [[] for _ in items]
        for i, d in zip(photo_ids, found, strict=True):
            dets[i] = d
        regions_by_input[small] = regions = policy_regions(dets, sizes)
        photo_stats = policy_stats(regions, sizes, boxes, train_ids)
        crop_dets = detect_cached([crops[i] for i in crop_ids], detector, cache_path(args.cache, detector))
        crop_regions = policy_regions(crop_dets, crop_sizes)
        whole = [BBox(0, 0, w, h) for w, h in crop_sizes]
        crop_stats = policy_stats(crop_regions, crop_sizes, whole, list(range(len(crop_ids))))
        policy_rows += [
            {
                "small_images": small,
                "confidence": c,
                "fallback": f,
                "photos": photo_stats[(c, f)],
                "crops": crop_stats[(c, f)],
            }
            for c, f in regions
        ]
    best = max(policy_rows, key=lambda r: (r["photos"]["mean_iou"] + r["crops"]["mean_iou"]) / 2)

    test_items = [items[i] for i in test_ids]
    evaluated = {str(it.label) for it in test_items}
    class_crops = [load_image(it.path) for it in crops if it.label in evaluated]
    crop_labels = [str(it.label) for it in crops if it.label in evaluated]
    photos = [load_image(it.path) for it in test_items]
    labels = [str(it.label) for it in test_items]
    inputs: dict[str, list[BBox | None]] = {
        "raw": [None] * len(test_ids),
        "gt": [it.box.clip(*p.size) for it, p in zip(test_items, photos, strict=True)],  # type: ignore[union-attr]
        **{
            f"det{'' if len(regions_by_input) == 1 else f'[{small}]'}@{c:g}/{f}": [regions[(c, f)][i] for i in test_ids]
            for small, regions in regions_by_input.items()
            for c, f in regions
        },
    }
    model_rows = []
    models = [embedder_for(r, None, args.size) for r in args.run]
    models += [embedder_for(None, m, args.size) for m in args.model]
    if args.flip:
        models = [row for name, e in models for row in ((name, e), (f"{name} + flip", flipped(e)))]
    for name, embedder in models:
        cache: dict[tuple[int, tuple[float, ...] | None], np.ndarray] = {}
        row: dict[str, object] = {"model": name}
        for key, boxes in inputs.items():
            todo = [(j, b) for j, b in enumerate(boxes) if (j, b and tuple(b.as_list())) not in cache]
            if todo:
                crops = [photos[j].crop(b.to_int()) if b is not None else photos[j] for j, b in todo]
                for (j, b), v in zip(todo, embedder.embed(crops), strict=True):
                    cache[(j, b and tuple(b.as_list()))] = v
            vectors = np.stack([cache[(j, b and tuple(b.as_list()))] for j, b in enumerate(boxes)])
            m = leave_one_out_metrics(vectors, labels)
            row[key] = {"recall_at_1": m.recall_at[1], "map_at_r": m.map_at_r}
        m = leave_one_out_metrics(embedder.embed(class_crops), crop_labels)  # the same classes' crops, whole
        row["crops"] = {"recall_at_1": m.recall_at[1], "map_at_r": m.map_at_r}
        model_rows.append(row)

    result = {
        "photos": {"first_49_classes": len(train_ids), f"evaluated_{args.on}": len(test_ids)},  # photo counts
        "crops": len(class_crops),
        "floor": FLOOR,
        "policies": policy_rows,
        "chosen": {
            "small_images": best["small_images"],
            "confidence": best["confidence"],
            "fallback": best["fallback"],
            "by": "mean IoU of the embedded region, photos and crops averaged, first 49 classes",
        },
        "models": model_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    p, c = policy_rows[0]["photos"]["images"], policy_rows[0]["crops"]["images"]
    print(f"Policies on the first 49 classes: {p} photos (vs their box) and {c} crops (vs the whole crop):\n")
    stats = "no box / mean IoU / IoU ≥ 0.5"
    print(f"| small images | confidence | fallback | photos: {stats} | crops: {stats} |")
    print("|---|---|---|---|---|")
    for r in policy_rows:
        mark = " **(chosen)**" if r is best else ""
        cells = [
            f"{r[k]['no_box']:.1%} / {r[k]['mean_iou']:.3f} / {r[k]['hit_iou_0.5']:.1%}" for k in ("photos", "crops")
        ]
        print(f"| {r['small_images']} | {r['confidence']:g} | {r['fallback']}{mark} | {cells[0]} | {cells[1]} |")
    print(f"\nR@1 / MAP@R (%) on the {len(test_ids)} photos ({args.on} classes; crops: {len(class_crops)}):\n")
    keys = [*inputs, "crops"]
    print("| model | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in model_rows:
        cells = [f"{100 * row[k]['recall_at_1']:.1f} / {100 * row[k]['map_at_r']:.2f}" for k in keys]  # type: ignore[index]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
