"""Embedding size: how much of a trained model's pooled embedding retrieval needs, and whether whitening helps.

    python benchmarks/embedding_size.py --run runs/levers/lite1-256 --run runs/levers/lite1

Each half-split run (``--run``, exported on first use) embeds the shared Stanford Cars crops. A PCA is
fitted on the crops of the **first 49 sorted classes** only (the run's training classes: they may choose);
the crops of the **last 49 classes** (its test classes, choosing nothing) are projected onto the first
``d`` principal components, with and without whitening (each component divided by its standard
deviation), L2-normalised, and evaluated leave-one-out (R@1, MAP@R). The projection centres the vectors
first, so even the full size differs from the unprojected embedding (printed beside it). Writes
``benchmarks/results/embedding_size.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from photo_path import CROPS, embedder_for, split  # noqa: E402

from carsearch.data.images import load_image  # noqa: E402
from carsearch.data.sources import read_source  # noqa: E402
from carsearch.metrics import leave_one_out_metrics  # noqa: E402

DIMS = (1280, 512, 256, 128, 64, 32)


def fit_pca(train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,), components (D, D) as rows in decreasing variance, and each component's standard deviation."""
    mean = train.mean(axis=0)
    _, singular, components = np.linalg.svd(train - mean, full_matrices=False)
    return mean, components, singular / np.sqrt(max(len(train) - 1, 1))


def project(vectors: np.ndarray, pca: tuple[np.ndarray, np.ndarray, np.ndarray], dim: int, whiten: bool) -> np.ndarray:
    """The first ``dim`` principal coordinates (whitened or not), L2-normalised."""
    mean, components, std = pca
    out = (vectors - mean) @ components[:dim].T
    if whiten:
        out = out / np.maximum(std[:dim], 1e-12)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a half-split training run folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_size.json")
    args = parser.parse_args()

    items = read_source(CROPS)
    train_ids, test_ids = split(items)
    images = [load_image(it.path) for it in items]
    labels = [str(items[i].label) for i in test_ids]
    rows: list[dict[str, Any]] = []
    for run in args.run:
        name, embedder = embedder_for(run, None)
        vectors = np.asarray(embedder.embed(images), dtype=np.float64)
        train, test = vectors[train_ids], vectors[test_ids]
        pca = fit_pca(train)
        full = leave_one_out_metrics(test, labels)
        row: dict[str, Any] = {
            "run": name,
            "dim": int(vectors.shape[1]),
            "unprojected": {"recall_at_1": full.recall_at[1], "map_at_r": full.map_at_r},
        }
        for whiten in (False, True):
            cells = {}
            for dim in (d for d in DIMS if d <= min(vectors.shape[1], len(train_ids))):
                m = leave_one_out_metrics(project(test, pca, dim, whiten), labels)
                cells[str(dim)] = {"recall_at_1": m.recall_at[1], "map_at_r": m.map_at_r}
            row["pca_whitened" if whiten else "pca"] = cells
        rows.append(row)

    result = {"crops": {"first_49_classes": len(train_ids), "last_49_classes": len(test_ids)}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"R@1 / MAP@R (%) on the {len(test_ids)} crops of the last 49 classes (PCA fitted on {len(train_ids)}):\n")
    dims = list(rows[0]["pca"])
    print("| run | projection | unprojected | " + " | ".join(f"{d}-d" for d in dims) + " |")
    print("|---" * (len(dims) + 3) + "|")
    for row in rows:
        for key in ("pca", "pca_whitened"):
            values = [row["unprojected"], *row[key].values()]
            texts = [f"{100 * v['recall_at_1']:.1f} / {100 * v['map_at_r']:.2f}" for v in values]
            print(f"| {row['run']} | {key} | " + " | ".join(texts) + " |")


if __name__ == "__main__":
    main()
