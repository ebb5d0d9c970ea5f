"""Train → export → index → evaluate on a generated hue dataset: the whole training path in a minute or two.

    python benchmarks/train_smoke.py --accelerator gpu      # bf16-mixed on CUDA; --accelerator cpu works too

Prints the run's metrics.json (zero-shot vs trained test Recall@1; the epoch is picked on 30% of the training
classes) and the exported model's leave-one-out metrics on the test classes through an index, and writes
them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_smoke.json"))
    args = parser.parse_args()

    from carsearch.embedder.training import export, load_train_config, train
    from carsearch.pipeline import Pipeline
    from tests.unit.embedder.test_training import make_hue_gallery

    tmp = Path(tempfile.mkdtemp(prefix="carsearch-train-smoke-"))
    data = make_hue_gallery(tmp / "data", classes=20, per_class=8)
    overrides = [
        f"data.source={data}",
        "model.backbone=tf_efficientnet_lite0",
        "model.pretrained=true",
        "model.embedding_dim=128",
        "data.image_size=96",
        "data.classes_per_batch=8",
        "data.images_per_class=4",
        "data.workers=2",
        "data.val_fraction=0.3",
        "loss.name=proxy_anchor",
        f"trainer.max_epochs={args.epochs}",
        "trainer.val_every=1",
        f"trainer.accelerator={args.accelerator}",
        "trainer.progress_bar=false",
        f"out.dir={tmp / 'runs'}",
    ]
    tic = time.perf_counter()
    run_dir = train(load_train_config(None, overrides))
    train_s = time.perf_counter() - tic
    model = export(run_dir, tmp / "model.pt")
    test_classes = json.loads((run_dir / "classes.json").read_text())["test"]
    test_csv = tmp / "test.csv"
    rows = [f"{path},{name}" for name in test_classes for path in sorted((data / name).iterdir())]
    test_csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    pipe = Pipeline.from_config(overrides=["crop=false", f"embedder.model={model}", f"runtime.device={device}"])
    pipe.index(test_csv, tmp / "index")
    evaluation = pipe.evaluate(tmp / "index")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "accelerator": args.accelerator,
        "train_seconds": round(train_s, 1),
        "run_metrics": metrics,
        "exported_index_eval": evaluation.to_dict(),
    }
    print(json.dumps(result, indent=2, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
