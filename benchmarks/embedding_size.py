"""Embedding size: how much of a trained model's pooled embedding retrieval needs, and whether whitening helps.

    python benchmarks/embedding_size.py --run runs/levers/lite1-256 --run runs/select/lite1-256-s0

Each training run (``--run``, exported on first use) embeds the shared Stanford Cars crops of its own
classes (its ``classes.json``). A PCA is fitted on the crops of the run's **training classes** only
(they may choose); the crops of its **evaluation classes** (the test classes of a half-split run, which
choose nothing, or the validation classes of a run that has no test classes) are projected onto the first
``d`` principal components, with and without whitening (each component divided by its standard
deviation), L2-normalised, and evaluated leave-one-out (R@1, MAP@R). Crops of other classes are not read.
The projection centres the vectors first, so even the full size differs from the unprojected embedding
(printed beside it). Writes ``benchmarks/results/embedding_size.json`` and prints a Markdown table.
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

from photo_path import CROPS, embedder_for  # noqa: E402

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


def run_classes(run: str) -> tuple[set[str], set[str], str]:
    """The run's training classes, its evaluation classes and their role: ``test``, else ``val``."""
    classes = json.loads((Path(run) / "classes.json").read_text())
    role = "test" if classes.get("test") else "val"
    if not classes.get(role):
        raise SystemExit(f"{run}: classes.json lists neither test nor validation classes")
    return set(classes["train"]), set(classes[role]), role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a training run folder (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_size.json")
    args = parser.parse_args()

    items = read_source(CROPS)
    rows: list[dict[str, Any]] = []
    for run in args.run:
        fit_classes, eval_classes, role = run_classes(run)
        fit_ids = [i for i, it in enumerate(items) if it.label in fit_classes]
        eval_ids = [i for i, it in enumerate(items) if it.label in eval_classes]
        name, embedder = embedder_for(run, None)
        vectors = np.asarray(embedder.embed([load_image(items[i].path) for i in fit_ids + eval_ids]), dtype=np.float64)
        train, test = vectors[: len(fit_ids)], vectors[len(fit_ids) :]
        labels = [str(items[i].label) for i in eval_ids]
        pca = fit_pca(train)
        full = leave_one_out_metrics(test, labels)
        row: dict[str, Any] = {
            "run": name,
            "path": run,
            "evaluated_on": role,
            "crops": {"fit": len(fit_ids), "evaluated": len(eval_ids)},
            "classes": {"fit": len(fit_classes), "evaluated": len(eval_classes)},
            "dim": int(vectors.shape[1]),
            "unprojected": {"recall_at_1": full.recall_at[1], "map_at_r": full.map_at_r},
        }
        for whiten in (False, True):
            cells = {}
            for dim in (d for d in DIMS if d <= min(vectors.shape[1], len(fit_ids))):
                m = leave_one_out_metrics(project(test, pca, dim, whiten), labels)
                cells[str(dim)] = {"recall_at_1": m.recall_at[1], "map_at_r": m.map_at_r}
            row["pca_whitened" if whiten else "pca"] = cells
        rows.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print("R@1 / MAP@R (%) on each run's evaluation classes, PCA fitted on its training classes:\n")
    dims = list(rows[0]["pca"])
    print("| run | evaluated on (crops) | projection | unprojected | " + " | ".join(f"{d}-d" for d in dims) + " |")
    print("|---" * (len(dims) + 4) + "|")
    for row in rows:
        for key in ("pca", "pca_whitened"):
            values = [row["unprojected"], *row[key].values()]
            texts = [f"{100 * v['recall_at_1']:.1f} / {100 * v['map_at_r']:.2f}" for v in values]
            where = f"{row['evaluated_on']} ({row['crops']['evaluated']})"
            print(f"| {row['run']} | {where} | {key} | " + " | ".join(texts) + " |")


if __name__ == "__main__":
    main()
