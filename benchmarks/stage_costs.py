"""What each stage of the batch job costs per image on one thread, by image size: the numbers behind the
Ray engine's split of a node's CPUs between decoding and the detector / embedder actors.

    python benchmarks/stage_costs.py    # JSON: benchmarks/results/stage-costs-cpu.json

Images: a shared Stanford Cars thumbnail (128×96), a shared street photo (1920×1200) and the 3840×2160
street photo upscaled to 4000×3000 (a 12 MP camera frame; written to a temp dir, never into the repo).
Per image, one thread (as a Ray actor or decode task runs): ``decode`` = read + hash + decode + limit to
``runtime.max_image_side`` (1600); ``detect`` = the offline YOLOv8n int8 detector; ``embed`` = the pretrained
embedder on the crop (batch of 8 copies, per image). Median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def timed(fn: Any, repeats: int) -> float:
    """Median milliseconds of ``fn()``."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1000)
    return round(statistics.median(times), 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "stage-costs-cpu.json")
    args = parser.parse_args(argv)
    from PIL import Image

    from carsearch.data.decode import decode_item
    from carsearch.data.sources import SourceItem
    from carsearch.pipeline import Pipeline

    detector = SHARED / "models" / "yolov8n_coco_int8.tflite"
    settings = [f"detector.weights={detector}", "runtime.device=cpu", "runtime.threads=1"]
    pipeline = Pipeline.from_config(overrides=settings)
    side = pipeline.config.runtime.max_image_side
    work = tempfile.TemporaryDirectory(prefix="carsearch-stages-")  # removed when this function returns
    frame = Path(work.name) / "frame_12mp.jpg"
    Image.open(SHARED / "data" / "street" / "street_01.jpg").convert("RGB").resize((4000, 3000)).save(frame, quality=90)
    images = {
        "thumbnail 128×96": SHARED / "data" / "stanford_cars" / "photos" / "00001.jpg",
        "photo 1920×1200": SHARED / "data" / "street" / "street_03.jpg",
        "frame 4000×3000": frame,
    }
    rows = []
    for name, path in images.items():
        decoded = decode_item(0, SourceItem(path), {}, side)
        image = Image.fromarray(decoded.image)
        crop = image.crop((0, 0, image.width // 2, image.height // 2))
        decode = timed(lambda p=path: decode_item(0, SourceItem(p), {}, side), args.repeats)
        detect = timed(lambda im=image: pipeline.detector.detect([im]), args.repeats)
        embed = round(timed(lambda c=crop: pipeline.embedder.embed([c] * 8), args.repeats) / 8, 1)
        share = round(decode / (decode + detect + embed), 2)
        rows.append({"image": name, "bytes": path.stat().st_size, "decode_ms": decode, "detect_ms": detect,
                     "embed_ms": embed, "decode_share": share})  # fmt: skip
    print("| image | file | decode | detect | embed | decode's share of the CPU time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['bytes'] / 1e3:,.0f} kB | {r['decode_ms']} ms | {r['detect_ms']} ms | "
              f"{r['embed_ms']} ms | {r['decode_share']:.0%} |")  # fmt: skip
    result = {"cores": os.cpu_count(), "machine": platform.machine(), "threads": 1, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
