"""The Ray Data engine: same index as the local engine, resume, bad inputs, kill -9, no Ray process left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from carsearch.data.watchdog import marked_processes
from carsearch.index import GalleryIndex
from carsearch.index.records import RecordTable
from carsearch.pipeline import Pipeline
from carsearch.pipeline.ray_engine import RayOptions
from tests.conftest import CLASS_COLOURS, TEST_OVERRIDES, build_gallery, kill_9_and_survivors, make_car_image

ray = pytest.importorskip("ray")

REPO = str(Path(__file__).resolve().parents[3])


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray (2 CPUs) for the in-process tests; the engine uses a running session as it is."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def index_contents(folder: Path) -> tuple[list[dict], np.ndarray, list[dict]]:
    index = GalleryIndex.load(folder)
    errors = [json.loads(line) for line in (folder / "errors.jsonl").read_text().splitlines()]
    return [r.to_dict() for r in index.records], index.vectors, errors


def test_ray_engine_builds_the_local_engines_index_and_skips_unchanged_files(
    local_ray: None, tmp_path: Path, tiny_yolo: Path
) -> None:
    gallery = build_gallery(tmp_path / "gallery")
    (gallery / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # bad input: recorded, not fatal
    make_car_image(7, CLASS_COLOURS[1]).convert("L").save(gallery / "class_1" / "grey.png")
    make_car_image(8, CLASS_COLOURS[2]).convert("CMYK").save(gallery / "class_2" / "cmyk.jpg")
    settings = [
        *TEST_OVERRIDES,
        f"detector.weights={tiny_yolo}",
        "detector.selection=all",  # several crops per image: rows of one image travel together
        "detector.confidence=0.05",
        # one image per detector call and one thread in both engines (Ray actors run one thread each): this
        # random-weight YOLO's boxes shift with the batch and the thread count (its box distributions are
        # flat), which would compare arithmetic, not engines
        "runtime.batch_size=1",
        "runtime.threads=1",
        "runtime.checkpoint_every=3",
    ]
    pipeline = Pipeline.from_config(overrides=settings)
    local = pipeline.index(gallery, tmp_path / "local")
    on_ray = pipeline.index(gallery, tmp_path / "ray", engine="ray", ray=RayOptions(num_cpus=2))
    records, vectors, errors = index_contents(tmp_path / "local")
    ray_records, ray_vectors, ray_errors = index_contents(tmp_path / "ray")
    assert local.items_added > local.processed == 14  # detector.selection=all found several cars per image
    assert ray_records == records  # same items, same order, same boxes and flags
    assert np.abs(ray_vectors - vectors).max() <= 1e-5
    assert ray_errors == errors and [Path(e["path"]).name for e in errors] == ["broken.jpg"]
    fields = ("total", "processed", "skipped", "errors", "added", "items_added", "items_in_index", "no_detection")
    assert [getattr(on_ray, f) for f in fields] == [getattr(local, f) for f in fields]
    assert on_ray.detect_seconds > 0 and on_ray.embed_seconds > 0
    assert (
        GalleryIndex.load(tmp_path / "ray").manifest.embedder == GalleryIndex.load(tmp_path / "local").manifest.embedder
    )

    make_car_image(99, CLASS_COLOURS[0]).save(gallery / "class_0" / "img_1.jpg")  # changed content
    again = pipeline.index(gallery, tmp_path / "ray", engine="ray")
    assert (again.processed, again.replaced, again.skipped, again.errors) == (1, 1, 13, 1)
    assert not (tmp_path / "ray" / "work").exists()


def test_ray_engine_survives_kill_9_leaves_no_ray_process_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "many" / "cls"
    root.mkdir(parents=True)
    for i in range(60):
        make_car_image(i, CLASS_COLOURS[i % 4]).save(root / f"{i:03d}.jpg")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")  # too small: a recorded error, not a crash
    out = tmp_path / "idx"
    overrides = [*TEST_OVERRIDES, "runtime.checkpoint_every=2", "runtime.batch_size=2"]
    args = [sys.executable, "-m", "carsearch.cli", "index", str(tmp_path / "many"), "--out", str(out), "--raw"]
    args += ["--no-progress", "--engine", "ray", "--ray-cpus", "2", "--device", "cpu"]
    args += sum((["--set", o] for o in overrides), [])
    mark = uuid.uuid4().hex  # every process the command starts inherits it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    env["CARSEARCH_TEST_MARK"] = mark
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "work").glob("chunk-*.parquet")):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    started = marked_processes("CARSEARCH_TEST_MARK", mark)
    assert len(started) >= 4  # the Ray cluster (gcs, raylet, workers, ...) and the watchdog
    # Ray's agents overwrite their environment with their process title: follow the process tree too
    tree = psutil.Process(proc.pid).children(recursive=True)
    survivors = kill_9_and_survivors(proc, tree, timeout=30)
    assert not (out / "manifest.json").exists()  # killed mid-run
    deadline = time.time() + 10
    while marked_processes("CARSEARCH_TEST_MARK", mark) and time.time() < deadline:
        time.sleep(0.2)
    left = sorted(set(survivors) | set(marked_processes("CARSEARCH_TEST_MARK", mark)))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes left after kill -9 of the command: {left}"

    done = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["skipped"] >= 2 and report["skipped"] + report["processed"] + report["errors"] == 61
    paths = RecordTable.read(out / "items.arrow").column("path")
    assert len(paths) == len(set(paths)) == report["items_in_index"] == 60
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(Path(e["path"]).name, e["reason"].split(":")[0]) for e in errors] == [("tiny.png", "image too small")]
    assert not marked_processes("CARSEARCH_TEST_MARK", mark)  # a finished run leaves nothing behind either


def placements(nodes: list[float], actors: int, share: float) -> Iterator[list[int]]:
    """Every way to place ``actors`` actors of ``share`` CPUs on nodes of these sizes (actors per node)."""
    if not nodes:
        if actors == 0:
            yield []
        return
    for here in range(min(actors, int(nodes[0] / share + 1e-9)) + 1):
        for rest in placements(nodes[1:], actors - here, share):
            yield [here, *rest]


@pytest.mark.parametrize(
    ("nodes", "actors"),
    [([2], 2), ([2], 4), ([1, 1], 2), ([2, 2], 4), ([3], 3), ([1, 1, 1], 3), ([2, 1], 3), ([4, 4], 8),
     ([0, 2, 2], 4), ([16, 16], 32), ([64], 10)],
)  # fmt: skip
def test_actor_pools_fit_and_decode_tasks_always_find_room(nodes: list[float], actors: int) -> None:
    from carsearch.pipeline.ray_engine import actor_cpus
    from carsearch.pipeline.ray_workers import DECODE_CPUS

    share = actor_cpus(nodes, actors)
    assert 0 < share <= 1
    if len(nodes) * actors <= 32:  # small enough to try every placement Ray could choose
        ways = list(placements(nodes, actors, share))
        assert ways, "the pools cannot all start"
        for way in ways:
            free = [cpus - n * share for cpus, n in zip(nodes, way, strict=True)]
            assert max(free) >= DECODE_CPUS - 1e-9, f"{way} on {nodes} leaves no room for decoding: {free}"
    if share < 1:  # and no larger share (Ray's 1e-3 steps) would be safe too
        bigger = round(share + 0.001, 4)
        risky = list(placements(nodes, actors, bigger)) if len(nodes) * actors <= 32 else None
        assert (
            risky is None
            or not risky
            or any(
                max(cpus - n * bigger for cpus, n in zip(nodes, way, strict=True)) < DECODE_CPUS - 1e-9 for way in risky
            )
        ), f"{bigger} CPU per actor would be safe as well"
    assert actor_cpus(nodes, 1) == 1.0 or max(nodes) < 1 + DECODE_CPUS  # one actor needs no squeezing


def test_actor_pools_too_large_for_the_cluster_are_refused() -> None:
    from carsearch.errors import ConfigError
    from carsearch.pipeline.ray_engine import actor_cpus

    assert actor_cpus([2, 2], 300) <= 0.011  # tiny shares, but they fit
    with pytest.raises(ConfigError, match="1000 actors do not fit"):
        actor_cpus([2, 2], 1000)  # would need less than Ray's smallest share we allow (0.01)


def test_decode_workers_import_no_heavy_library() -> None:
    """Ray imports ray_workers in every decode task's process: it must not pull in torch, timm or faiss
    (seconds of CPU per process that would delay the actors' start on a small machine)."""
    code = (
        "import sys, carsearch.pipeline.ray_workers as w, carsearch.index.records; "
        "assert callable(w.decode_batch); "
        "print(sorted(m for m in ('torch', 'timm', 'faiss', 'ultralytics', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_decode_tasks_skip_by_the_hash_each_row_carries(tmp_path: Path) -> None:
    """A resumed job sends each row the hash its index holds for that path (not the whole table)."""
    from carsearch.data.images import content_hash
    from carsearch.pipeline.ray_workers import decode_batch

    paths = [tmp_path / "same.jpg", tmp_path / "changed.jpg", tmp_path / "new.jpg"]
    for i, path in enumerate(paths):
        make_car_image(i, CLASS_COLOURS[i]).save(path)
    batch = {
        "position": np.array([0, 1, 2]),
        "item": np.array([json.dumps([str(p), "x", None, None]) for p in paths], dtype=object),
        "indexed": np.array([content_hash(paths[0].read_bytes()), "0" * 32, ""], dtype=object),
    }
    out = decode_batch(batch, max_side=1024)
    assert list(out["status"]) == ["skip", "ok", "ok"]
    assert list(out["hash"]) == [content_hash(p.read_bytes()) for p in paths]


@pytest.mark.parametrize(
    ("n", "blocks", "rows"), [(1, 1, 1), (500, 16, 32), (32 * 1024, 1024, 32), (100_000, 782, 128)]
)
def test_input_blocks_are_batches_until_there_would_be_too_many(n: int, blocks: int, rows: int) -> None:
    from carsearch.data.sources import SourceItem
    from carsearch.pipeline.ray_engine import MAX_INPUT_BLOCKS, input_blocks

    items = [SourceItem(Path(f"/cams/{i:06d}.jpg"), "x" if i % 2 else None) for i in range(n)]
    tables = input_blocks(items, {"/cams/000001.jpg": "ab" * 16}, batch=32)
    assert len(tables) == blocks <= MAX_INPUT_BLOCKS and tables[0].num_rows == min(rows, n)
    assert sum(t.num_rows for t in tables) == n
    first = tables[0].to_pylist()[: min(n, 2)]
    assert first[0] == {"position": 0, "item": '["/cams/000000.jpg", null, null, null]', "indexed": ""}
    assert n == 1 or first[1]["indexed"] == "ab" * 16


def test_default_pools_leave_a_quarter_of_the_cpus_to_decoding_and_give_each_gpu_its_embedders() -> None:
    from carsearch.pipeline.ray_engine import actor_cpus, decode_slots, default_pools

    assert default_pools(2) == ((1, 1), (1, 1))
    assert default_pools(4) == ((2, 2), (1, 1))  # the odd actor goes to the slower stage, the detector
    assert default_pools(16) == ((6, 6), (6, 6))
    assert default_pools(64, gpu_actors=8) == ((40, 40), (8, 8))  # 8 GPUs, one embedder actor each
    assert default_pools(1, gpu_actors=2) == ((1, 1), (2, 2))  # two actors sharing a GPU (0.5 each)
    # decode tasks run at most one per CPU the actors leave: 4 on a 16-CPU node, 1 beside 1 + 1 on 2 CPUs
    assert decode_slots([16], 12, actor_cpus([16], 12)) == 4
    assert decode_slots([2], 2, actor_cpus([2], 2)) == 1
    assert decode_slots([16, 16, 16, 16], 48, actor_cpus([16] * 4, 48)) == 16
