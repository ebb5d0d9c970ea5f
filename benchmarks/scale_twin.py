"""The half split's scale-up twin: does the losses' order change between 25 and 49 training classes?

    python benchmarks/scale_twin.py --train-classes 25 --losses triplet_semihard,proxy_anchor,multi_similarity

Each run is ``carsearch train --config cpu_quick`` with only the loss swapped (the commands of
docs/training.md's loss table) on ``--backbone`` (default Lite0, the backbone of the loss table and of the
published twin; cpu_quick's own is Lite1: give it another ``--out-dir``) at the loss table's 224-px input
(views from a 256-px squash; cpu_quick's own views and inference size are larger) and the first N of the 98 sorted
shared classes training; the test set is always the same last 49 classes, so the 25- and 49-class rows compare
directly. Fixed schedule, final model: the test classes choose nothing. Runs go to ``--out-dir/LOSS-N``; a
finished run is read, not retrained. Writes ``benchmarks/results/scale_twin.json`` and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carsearch.embedder.training.data import sort_classes  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "stanford_cars" / "crops.csv"
LOSSES: dict[str, list[str]] = {
    "triplet_semihard": [],
    "proxy_anchor": ["loss.name=proxy_anchor", "loss.miner=none", "loss.margin=0.1", "loss.params={alpha: 32}"],
    "multi_similarity": [
        "loss.name=multi_similarity",
        "loss.miner=multi_similarity",
        "loss.margin=null",
        "loss.params={}",
    ],
}


def class_lists(source: Path, train_count: int) -> tuple[list[str], list[str]]:
    """The first ``train_count`` sorted classes, and the last half of them (the half split's test classes)."""
    with source.open(newline="") as handle:
        classes = sort_classes([row["label"] for row in csv.DictReader(handle)])
    cut = (len(classes) + 1) // 2
    if not 0 < train_count <= cut:
        raise SystemExit(f"--train-classes must be in 1..{cut}")
    return classes[:train_count], classes[cut:]


GEOMETRY = ["data.image_size=224", "data.resize_to=256", "data.crop_size=null"]  # the loss table's input


def run(loss: str, train_count: int, source: Path, out_dir: Path, backbone: str) -> dict:
    """Train one arm (unless its metrics.json exists) and return its metrics."""
    name = f"{loss}-{train_count}"
    metrics_path = out_dir / name / "metrics.json"
    if not metrics_path.exists():
        train, test = class_lists(source, train_count)
        overrides = [
            f"data.source={source}",
            "data.class_split=list",
            f"data.train_classes={json.dumps(train)}",
            f"data.test_classes={json.dumps(test)}",
            f"out.dir={out_dir}",
            f"out.name={name}",
            f"model.backbone={backbone}",
            *GEOMETRY,
            *LOSSES[loss],
        ]
        command = [str(Path(sys.executable).with_name("carsearch")), "train", "--config", "cpu_quick"]
        for item in overrides:
            command += ["--set", item]
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(metrics_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-classes", default="25", help="comma-separated counts of training classes")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of: {', '.join(LOSSES)}")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "twin")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_twin.json")
    args = parser.parse_args()
    rows = []
    for count in (int(c) for c in args.train_classes.split(",")):
        for loss in args.losses.split(","):
            if loss not in LOSSES:
                raise SystemExit(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
            metrics = run(loss, count, args.source, args.out_dir, args.backbone)
            rows.append(
                {
                    "loss": loss,
                    "train_classes": count,
                    "train_images": metrics["images"]["train"],
                    "test_classes": metrics["classes"]["test"],
                    "test_images": metrics["images"]["test"],
                    "recall_at_1": metrics["test"]["recall_at_1"],
                    "map_at_r": metrics["test"]["map_at_r"],
                    "other_year_share": metrics["test"].get("other_year_share"),
                    "train_time_s": metrics["train_time_s"],
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| loss | training classes (images) | test R@1 / MAP@R | other-year share | training min |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = "–" if r["other_year_share"] is None else f"{100 * r['other_year_share']:.1f}%"
        print(
            f"| {r['loss']} | {r['train_classes']} ({r['train_images']}) | {100 * r['recall_at_1']:.1f} / "
            f"{100 * r['map_at_r']:.2f} | {share} | {r['train_time_s'] / 60:.1f} |"
        )


if __name__ == "__main__":
    main()
