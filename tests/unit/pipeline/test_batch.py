"""The batch crop-and-index job: resume, interruption, bad input, raw / gt / detector modes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from carsearch.config import load_config
from carsearch.errors import IndexMismatchError
from carsearch.index import GalleryIndex
from carsearch.index.records import RecordTable
from carsearch.pipeline import Pipeline
from tests.conftest import CLASS_COLOURS, TEST_OVERRIDES, kill_9_and_survivors, make_car_image


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One raw pipeline whose embedder is reused by the tests (models load once)."""
    return Pipeline.from_config(overrides=TEST_OVERRIDES + ["crop=false"])


def pipeline_with(base: Pipeline, *overrides: str, detector: object = None) -> Pipeline:
    config = load_config(None, TEST_OVERRIDES + list(overrides))
    return Pipeline(config, detector=detector, embedder=base.embedder)  # type: ignore[arg-type]


def read_items(out: Path) -> list[dict]:
    return [r.to_dict() for r in RecordTable.read(out / "items.arrow")]


class FlakyEmbedder:
    """Delegates to a real embedder, then raises KeyboardInterrupt on call number ``fail_on``."""

    def __init__(self, inner: object, fail_on: int) -> None:
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.dim, self.identity = inner.dim, inner.identity  # type: ignore[attr-defined]

    def embed(self, images: list) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        return self.inner.embed(images)  # type: ignore[attr-defined]


def test_raw_index_holds_every_image_once_with_labels(
    shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path
) -> None:
    report = pipeline_with(shared_models, "crop=false").index(tiny_gallery, tmp_path / "idx")
    assert (report.processed, report.errors, report.items_in_index) == (12, 0, 12)
    items = read_items(tmp_path / "idx")
    assert sorted(i["label"] for i in items) == sorted([f"class_{c}" for c in range(3)] * 4)
    assert all(i["flags"] == ["raw"] and i["box"] is None for i in items)
    assert not (tmp_path / "idx" / "work").exists()


def test_rerun_skips_everything(shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path) -> None:
    pipe = pipeline_with(shared_models, "crop=false")
    pipe.index(tiny_gallery, tmp_path / "idx")
    again = pipe.index(tiny_gallery, tmp_path / "idx")
    assert (again.processed, again.skipped, again.items_in_index) == (0, 12, 12)


def test_new_and_changed_files_are_picked_up(shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path) -> None:
    pipe = pipeline_with(shared_models, "crop=false")
    pipe.index(tiny_gallery, tmp_path / "idx")
    make_car_image(999, CLASS_COLOURS[3]).save(tiny_gallery / "class_0" / "new.jpg")
    make_car_image(555, CLASS_COLOURS[3]).save(tiny_gallery / "class_1" / "img_0.jpg")  # changed content
    report = pipe.index(tiny_gallery, tmp_path / "idx")
    assert (report.processed, report.skipped, report.items_in_index) == (2, 11, 13)
    assert (report.added, report.replaced, report.pruned) == (1, 1, 0)
    paths = [i["path"] for i in read_items(tmp_path / "idx")]
    assert len(paths) == len(set(paths)) == 13


def test_prune_drops_deleted_and_moved_files_and_the_report_says_what_changed(
    shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from carsearch.cli import main

    pipe = pipeline_with(shared_models, "crop=false")
    pipe.index(tiny_gallery, tmp_path / "idx")
    (tiny_gallery / "class_0" / "img_0.jpg").unlink()
    (tiny_gallery / "class_1" / "img_1.jpg").rename(tiny_gallery / "class_1" / "moved.jpg")
    make_car_image(555, CLASS_COLOURS[3]).save(tiny_gallery / "class_2" / "img_2.jpg")  # changed content
    (tiny_gallery / "class_2" / "img_3.jpg").write_bytes(b"not an image any more")
    kept = pipe.index(tiny_gallery, tmp_path / "idx")  # without --prune: nothing leaves the index
    assert (kept.added, kept.replaced, kept.skipped, kept.pruned, kept.errors) == (1, 1, 8, 0, 1)
    assert kept.items_in_index == 13
    args = ["index", str(tiny_gallery), "--out", str(tmp_path / "idx"), "--raw", "--prune", "--json"]
    args += sum((["--set", o] for o in TEST_OVERRIDES), [])
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["added"], report["replaced"], report["skipped"], report["pruned"]) == (0, 0, 10, 2)
    paths = {Path(i["path"]).relative_to(tiny_gallery).as_posix() for i in read_items(tmp_path / "idx")}
    assert "class_0/img_0.jpg" not in paths and "class_1/img_1.jpg" not in paths and "class_1/moved.jpg" in paths
    assert len(paths) == report["items_in_index"] == 11  # 12 - 1 deleted; the moved file under its new path
    assert "class_2/img_3.jpg" in paths  # listed but now unreadable: an error, and its old vector stays


def test_interrupted_run_keeps_finished_batches_and_resumes(
    shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path
) -> None:
    config = load_config(None, TEST_OVERRIDES + ["crop=false", "runtime.batch_size=4", "runtime.checkpoint_every=1"])
    flaky = FlakyEmbedder(shared_models.embedder, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(config, embedder=flaky).index(tiny_gallery, tmp_path / "idx")  # type: ignore[arg-type]
    chunks = sorted((tmp_path / "idx" / "work").glob("chunk-*.npz"))
    assert len(chunks) == 2  # two batches of 4 finished before the interruption
    report = Pipeline(config, embedder=shared_models.embedder).index(tiny_gallery, tmp_path / "idx")
    assert (report.skipped, report.processed, report.items_in_index) == (8, 4, 12)
    paths = [i["path"] for i in read_items(tmp_path / "idx")]
    assert len(set(paths)) == 12


def test_crash_after_save_before_chunk_cleanup_does_not_duplicate(
    shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path
) -> None:
    pipe = pipeline_with(shared_models, "crop=false", "runtime.checkpoint_every=1", "runtime.batch_size=4")
    pipe.index(tiny_gallery, tmp_path / "idx")
    # Simulate a kill between writing the index and deleting the work chunks: put chunks back.
    from carsearch.pipeline.chunks import Chunk, ChunkStore

    index = GalleryIndex.load(tmp_path / "idx")
    store = ChunkStore(tmp_path / "idx" / "work")
    store.write(Chunk(index.records[:5], list(index.vectors[:5]), [], 5), index.dim)
    (tmp_path / "idx" / "work" / "merged-vectors.npy").write_bytes(b"killed during a merge")
    report = pipe.index(tiny_gallery, tmp_path / "idx")
    assert report.items_in_index == 12
    assert len({i["path"] for i in read_items(tmp_path / "idx")}) == 12
    assert not (tmp_path / "idx" / "work").exists()  # chunks and the merge's memory map are gone


def test_bad_inputs_are_recorded_and_the_run_goes_on(shared_models: Pipeline, tmp_path: Path) -> None:
    root = tmp_path / "mixed" / "cars"
    root.mkdir(parents=True)
    good = make_car_image(1, CLASS_COLOURS[0])
    good.save(root / "good.jpg")
    good.convert("L").save(root / "gray.png")
    good.convert("CMYK").save(root / "cmyk.jpg")
    good.convert("RGBA").save(root / "alpha.png")
    Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257).save(root / "sixteen.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("definitely not a jpeg")
    buffer = io.BytesIO()
    good.save(buffer, format="JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    report = pipeline_with(shared_models, "crop=false").index(tmp_path / "mixed", tmp_path / "idx")
    assert report.items_in_index == 5
    assert report.errors == 4
    errors = {
        Path(e["path"]).name: e["reason"]
        for e in map(json.loads, (tmp_path / "idx" / "errors.jsonl").read_text().splitlines())
    }
    assert set(errors) == {"empty.jpg", "text.jpg", "truncated.jpg", "dot.png"}
    assert "empty" in errors["empty.jpg"] and "not an image" in errors["text.jpg"]
    assert "too small" in errors["dot.png"] and "truncated" in errors["truncated.jpg"]


def test_fixed_file_leaves_the_errors_list(shared_models: Pipeline, tmp_path: Path) -> None:
    root = tmp_path / "src" / "a"
    root.mkdir(parents=True)
    make_car_image(1, CLASS_COLOURS[0]).save(root / "ok.jpg")
    (root / "later.jpg").write_bytes(b"")
    pipe = pipeline_with(shared_models, "crop=false")
    assert pipe.index(tmp_path / "src", tmp_path / "idx").errors == 1
    make_car_image(2, CLASS_COLOURS[1]).save(root / "later.jpg")
    report = pipe.index(tmp_path / "src", tmp_path / "idx")
    assert (report.processed, report.items_in_index) == (1, 2)
    assert (tmp_path / "idx" / "errors.jsonl").read_text() == ""


def test_resuming_with_other_settings_is_refused(shared_models: Pipeline, tiny_gallery: Path, tmp_path: Path) -> None:
    pipeline_with(shared_models, "crop=false").index(tiny_gallery, tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="built with crop=False"):
        pipeline_with(shared_models, "crop=true", "crop_source=gt").index(tiny_gallery, tmp_path / "idx")


def test_gt_boxes_are_cropped_and_recorded_in_original_pixels(shared_models: Pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        make_car_image(i, CLASS_COLOURS[i], size=(400, 300)).save(folder / f"{i}.jpg")
    (tmp_path / "list.csv").write_text(
        "path,label,x1,y1,x2,y2\nimgs/0.jpg,a,40,100,360,250\nimgs/1.jpg,b,0,0,200,150\nimgs/2.jpg,c,10,10,390,290\n"
    )
    pipe = pipeline_with(shared_models, "crop_source=gt", "detector.margin=0.0", "runtime.max_image_side=200")
    report = pipe.index(tmp_path / "list.csv", tmp_path / "idx")
    assert report.items_in_index == 3 and report.no_detection == 0
    items = {Path(i["path"]).name: i for i in read_items(tmp_path / "idx")}
    assert items["0.jpg"]["box"] == [40.0, 100.0, 360.0, 250.0]  # downscaled ×0.5 to work, stored full-size
    assert items["0.jpg"]["flags"] == ["gt_box", "downscaled"]
    assert items["0.jpg"]["image_size"] == [400, 300]


def test_detector_mode_with_tiny_yolo(
    shared_models: Pipeline, tiny_gallery: Path, tiny_yolo: Path, tmp_path: Path
) -> None:
    pipe = pipeline_with(
        shared_models, f"detector.weights={tiny_yolo}", "detector.image_size=160", "detector.selection=all"
    )
    report = pipe.index(tiny_gallery, tmp_path / "idx")
    items = read_items(tmp_path / "idx")
    assert report.processed == 12 and report.items_in_index == len(items) > 12  # several cars per image
    for item in items:
        assert item["det_class"] == "car" and item["det_score"] >= 0.25
        x1, y1, x2, y2 = item["box"]
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
    assert {i["crop_index"] for i in items} >= {0, 1}


def test_no_vehicle_found_uses_whole_image_and_flags_it(
    shared_models: Pipeline, tiny_gallery: Path, tiny_yolo_blind: Path, tmp_path: Path
) -> None:
    pipe = pipeline_with(shared_models, f"detector.weights={tiny_yolo_blind}", "detector.image_size=160")
    report = pipe.index(tiny_gallery, tmp_path / "idx")
    assert report.items_in_index == 12 and report.no_detection == 12
    assert all(i["flags"] == ["no_detection"] and i["box"] is None for i in read_items(tmp_path / "idx"))


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_mid_run_leaves_no_process_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, workers: int) -> None:
    root = tmp_path / "many" / "cls"
    root.mkdir(parents=True)
    for i in range(48):
        make_car_image(i, CLASS_COLOURS[i % 4]).save(root / f"{i:03d}.jpg")
    out = tmp_path / "idx"
    args = [
        sys.executable,
        "-m",
        "carsearch.cli",
        "index",
        str(tmp_path / "many"),
        "--out",
        str(out),
        "--raw",
        "--no-progress",
        "--batch-size",
        "4",
        "--workers",
        str(workers),
        "--device",
        "cpu",
        *sum((["--set", o] for o in TEST_OVERRIDES + ["runtime.checkpoint_every=1"]), []),
    ]
    repo = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "work").glob("chunk-*.npz"))) < 2:
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= workers  # the decode workers are running
    orphans = kill_9_and_survivors(proc, children, timeout=10)
    assert not orphans, f"orphaned worker processes after kill -9: {orphans}"
    assert not (out / "manifest.json").exists()
    done = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["skipped"] >= 8 and report["skipped"] + report["processed"] == 48
    assert report["items_in_index"] == 48
    paths = [i["path"] for i in read_items(out)]
    assert len(paths) == len(set(paths)) == 48


def test_a_moved_checkpoint_is_the_same_embedder(tiny_gallery: Path, tmp_path: Path) -> None:
    """An index's embedder is its weights' fingerprint: moving the checkpoint file does not orphan the index."""
    import torch

    from carsearch.embedder import EmbeddingModel, ModelSpec, Preprocessing, save_checkpoint

    spec = ModelSpec(embedding_dim=16, preprocessing=Preprocessing(image_size=64))
    torch.manual_seed(0)
    first = tmp_path / "a" / "model.pt"
    first.parent.mkdir()
    save_checkpoint(EmbeddingModel(spec, pretrained=False), first)
    overrides = [*TEST_OVERRIDES, "crop=false"]
    Pipeline.from_config(overrides=[*overrides, f"embedder.model={first}"]).index(tiny_gallery, tmp_path / "idx")
    moved = tmp_path / "b" / "renamed.pt"
    moved.parent.mkdir()
    first.rename(moved)
    again = Pipeline.from_config(overrides=[*overrides, f"embedder.model={moved}"])
    report = again.index(tiny_gallery, tmp_path / "idx")
    assert (report.skipped, report.processed, report.items_in_index) == (12, 0, 12)
    assert again.search(tmp_path / "idx", tiny_gallery / "class_0" / "img_0.jpg", k=1).hits[0].score > 0.999
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(EmbeddingModel(spec, pretrained=False), other)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        third = Pipeline.from_config(overrides=[*overrides, f"embedder.model={other}"])
        third.index(tiny_gallery, tmp_path / "idx")
