"""The batch job reading its source from an object store (a local S3 server): the index it builds is the one
built from the same files on disk, under the files' URIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carsearch.index import GalleryIndex
from carsearch.pipeline import Pipeline
from tests.conftest import TEST_OVERRIDES, ObjectStore, build_gallery

REPO = str(Path(__file__).resolve().parents[3])


def test_index_an_s3_folder_like_the_same_folder_on_disk(object_store: ObjectStore, tmp_path: Path) -> None:
    gallery = build_gallery(tmp_path / "gallery", classes=3, per_class=3)
    (gallery / "class_2" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    uri = object_store.upload(gallery, f"{object_store.bucket()}/gallery")
    # decode workers are forked processes, reading from the store too
    pipeline = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false", "runtime.workers=2"])
    from_disk = pipeline.index(gallery, tmp_path / "disk")
    from_s3 = pipeline.index(uri, tmp_path / "s3")
    assert (from_s3.processed, from_s3.errors, from_s3.items_added) == (from_disk.processed, 1, 9)
    disk, s3 = GalleryIndex.load(tmp_path / "disk"), GalleryIndex.load(tmp_path / "s3")
    relative = [Path(r.path).relative_to(gallery).as_posix() for r in disk.records]
    assert [r.path for r in s3.records] == [f"{uri}/{name}" for name in relative]
    assert [r.label for r in s3.records] == [r.label for r in disk.records]
    assert np.array_equal(s3.vectors, disk.vectors)
    errors = [json.loads(line) for line in (tmp_path / "s3" / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [f"{uri}/class_2/broken.jpg"]

    again = pipeline.index(uri, tmp_path / "s3")  # unchanged objects are skipped by content hash
    assert (again.processed, again.skipped, again.errors) == (0, 9, 1)
    hits = pipeline.search(tmp_path / "s3", s3.records[4].path, k=1)  # a query straight from the store
    assert hits.hits[0].path == s3.records[4].path and hits.hits[0].score > 0.999


def test_ray_engine_reads_the_source_and_the_models_from_s3_in_its_workers(
    object_store: ObjectStore, tmp_path: Path, tiny_yolo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images, detector weights and embedder checkpoint all in the store (no shared filesystem): the Ray
    engine's workers fetch them and build the index the local engine builds from the same files on disk."""
    pytest.importorskip("ray")
    from carsearch.embedder import EmbeddingModel, ModelSpec, Preprocessing, save_checkpoint
    from carsearch.pipeline.ray_engine import RayOptions

    monkeypatch.setenv("CARSEARCH_CACHE", str(tmp_path / "cache"))  # where workers keep downloaded models
    gallery = build_gallery(tmp_path / "gallery", classes=2, per_class=3)
    (gallery / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    save_checkpoint(EmbeddingModel(ModelSpec(embedding_dim=16, preprocessing=Preprocessing(image_size=64)),
                                   pretrained=False), models / "embedder.pt")  # fmt: skip
    shutil.copy(tiny_yolo, models / "tiny_car.pt")
    bucket = object_store.bucket()
    uri = object_store.upload(gallery, f"{bucket}/gallery")
    store_models = object_store.upload(models, f"{bucket}/models")
    # one image per detector call and one thread in both engines, as in test_ray_engine.py
    settings = [*TEST_OVERRIDES, "runtime.batch_size=1", "runtime.threads=1", "detector.confidence=0.05"]

    def pipeline(folder: Path | str) -> Pipeline:
        return Pipeline.from_config(
            overrides=[*settings, f"detector.weights={folder}/tiny_car.pt", f"embedder.model={folder}/embedder.pt"]
        )

    on_disk, in_store = pipeline(models), pipeline(store_models)
    local = on_disk.index(gallery, tmp_path / "local")
    # the job's own local cluster: its workers inherit the store's endpoint and credentials from this process
    on_ray = in_store.index(uri, tmp_path / "ray", engine="ray", ray=RayOptions(num_cpus=2))
    assert (on_ray.processed, on_ray.errors, on_ray.items_added) == (local.processed, 1, 6)
    local_index, ray_index = GalleryIndex.load(tmp_path / "local"), GalleryIndex.load(tmp_path / "ray")
    relative = [Path(r.path).relative_to(gallery).as_posix() for r in local_index.records]
    assert [r.path for r in ray_index.records] == [f"{uri}/{name}" for name in relative]
    strip = [{**r.to_dict(), "path": None} for r in local_index.records]
    assert [{**r.to_dict(), "path": None} for r in ray_index.records] == strip  # same boxes, hashes, labels
    assert np.abs(ray_index.vectors - local_index.vectors).max() <= 1e-5
    assert ray_index.manifest.embedder_identity["fingerprint"] == local_index.manifest.embedder_identity["fingerprint"]
    assert ray_index.vectors.shape[1] == 16  # the checkpoint's head, not the pretrained backbone
    assert list((tmp_path / "cache" / "downloads").glob("*-tiny_car.pt"))  # fetched by the workers


def test_cli_on_an_existing_two_node_cluster_reads_s3_and_leaves_the_cluster_running(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    """``--ray-address``: a simulated two-node cluster (two raylets of one CPU each, as ``ray start`` makes),
    its workers reading the source from the store. Default pools: one detector and one embedder actor,
    which — before actor shares were chosen per node — left neither node room for a decode task (a hang)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    gallery = build_gallery(tmp_path / "gallery", classes=2, per_class=3)
    uri = object_store.upload(gallery, f"{object_store.bucket()}/gallery")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        args = [sys.executable, "-m", "carsearch.cli", "index", uri, "--raw", "--no-progress", "--json"]
        args += ["--engine", "ray", "--ray-address", cluster.address, "--device", "cpu"]
        args += sum((["--set", o] for o in TEST_OVERRIDES), [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
        first = subprocess.run([*args, "--out", str(tmp_path / "ray")], env=env, capture_output=True, text=True,
                               timeout=240)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        assert json.loads(first.stdout)["processed"] == 6
        again = subprocess.run([*args, "--out", str(tmp_path / "ray")], env=env, capture_output=True, text=True,
                               timeout=240)  # fmt: skip  # the cluster outlived the first command
        assert again.returncode == 0, again.stderr[-3000:]
        assert (json.loads(again.stdout)["processed"], json.loads(again.stdout)["skipped"]) == (0, 6)
    finally:
        cluster.shutdown()
    local = Pipeline.from_config(overrides=[*TEST_OVERRIDES, "crop=false", "runtime.threads=1"])
    local.index(uri, tmp_path / "local")
    on_cluster, on_disk = GalleryIndex.load(tmp_path / "ray"), GalleryIndex.load(tmp_path / "local")
    assert [r.to_dict() for r in on_cluster.records] == [r.to_dict() for r in on_disk.records]
    assert np.abs(on_cluster.vectors - on_disk.vectors).max() <= 1e-5
