"""Inference size: a trained model's retrieval when it embeds at larger sizes than it was trained at.

    python benchmarks/inference_size.py --run runs/select/lite1-256-s0 --run runs/select/lite1-256-s1 \
        --size 288 --size 320

Training views are random crops (``data.crop_scale`` to 1 of the area) of a crop squashed to
``data.resize_to``, so the car fills more of the input in training than at inference, where the whole crop
is squashed to ``image_size``: embedding at a larger size matches the apparent size again (the
train/test resolution discrepancy, FixRes). Each run (``--run``, exported on first use) embeds the shared
Stanford Cars crops of its evaluation classes (its ``classes.json``: the test classes of a half-split run,
else its validation classes; crops of other classes are not read) at its own size and at every
``--size``, with the weights unchanged, and is evaluated leave-one-out (R@1, MAP@R, the other-year share of
wrong top-1 hits). Writes ``benchmarks/results/inference_size.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embedding_size import run_classes  # noqa: E402
from photo_path import CROPS, embedder_for  # noqa: E402

from carsearch.data.images import load_image  # noqa: E402
from carsearch.data.sources import read_source  # noqa: E402
from carsearch.embedder.embedder import Embedder  # noqa: E402
from carsearch.embedder.model import at_input_size  # noqa: E402
from carsearch.metrics import leave_one_out_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a training run folder (repeatable)")
    parser.add_argument("--size", action="append", type=int, required=True, help="an inference size (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_size.json")
    args = parser.parse_args()

    items = read_source(CROPS)
    rows: list[dict[str, Any]] = []
    for run in args.run:
        _, eval_classes, role = run_classes(run)
        chosen = [it for it in items if it.label in eval_classes]
        images = [load_image(it.path) for it in chosen]
        labels = [str(it.label) for it in chosen]
        name, embedder = embedder_for(run, None)
        own = embedder.preprocessing.image_size
        cells: dict[str, Any] = {}
        for size in sorted({own, *args.size}):
            start = time.perf_counter()
            vectors = Embedder(at_input_size(embedder.model, size), runtime="torch").embed(images)
            seconds = time.perf_counter() - start
            metrics = leave_one_out_metrics(vectors, labels)
            cells[str(size)] = {
                "recall_at_1": metrics.recall_at[1],
                "map_at_r": metrics.map_at_r,
                "other_year_share": metrics.other_year_share,
                "ms_per_image": 1000 * seconds / len(images),  # torch, 4 images per pass
            }
            print(f"{name} at {size}: {100 * metrics.recall_at[1]:.1f} / {100 * metrics.map_at_r:.2f}", flush=True)
        row = {"run": name, "path": run, "evaluated_on": role, "crops": len(chosen), "own_size": own}
        rows.append({**row, "sizes": cells})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    sizes = sorted({int(s) for row in rows for s in row["sizes"]})
    print("\nR@1 / MAP@R (%) on each run's evaluation classes, by inference size:\n")
    print("| run | evaluated on (crops) | its own size | " + " | ".join(f"{s} px" for s in sizes) + " |")
    print("|---" * (len(sizes) + 3) + "|")
    for row in rows:
        texts = [
            f"{100 * c['recall_at_1']:.1f} / {100 * c['map_at_r']:.2f}" if (c := row["sizes"].get(str(s))) else "–"
            for s in sizes
        ]
        where = f"{row['evaluated_on']} ({row['crops']})"
        print(f"| {row['run']} | {where} | {row['own_size']} | " + " | ".join(texts) + " |")


if __name__ == "__main__":
    main()
