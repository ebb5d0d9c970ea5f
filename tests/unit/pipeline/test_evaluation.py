"""Evaluation split by the embedder's training classes: seen classes measure memory, unseen generalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from carsearch.cli import main
from carsearch.config import IndexConfig, PipelineConfig, RetrievalConfig
from carsearch.config_files import to_dict
from carsearch.index import GalleryIndex, ItemRecord
from carsearch.metrics import leave_one_out_metrics
from carsearch.pipeline import evaluate_index

SEEN = ["Audi TTS Coupe 2012", "Acura TL Sedan 2012", "BMW M3 Coupe 2012"]
UNSEEN = ["Volvo 240 Sedan 1993", "Tesla Model S Sedan 2012"]


def gallery(labels: list[str], train_labels: list[str] | None, seed: int = 0, per_class: int = 5) -> GalleryIndex:
    """Seen classes in tight clusters (remembered), unseen ones scattered (not learnt)."""
    rng = np.random.default_rng(seed)
    vectors, records = [], []
    for c, label in enumerate(labels):
        centre = rng.normal(size=16)
        spread = 0.05 if train_labels and label in train_labels else 3.0
        for i in range(per_class):
            vectors.append(centre + spread * rng.normal(size=16))
            records.append(ItemRecord(path=f"{c}_{i}.jpg", label=label, content_hash=f"{c}_{i}"))
    matrix = np.asarray(vectors, dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    identity = {"spec": {}, "dim": 16, "fingerprint": "f", "source": "test"}
    if train_labels is not None:
        identity["train_labels"] = train_labels
    manifest = {"embedder": identity, "config": to_dict(PipelineConfig())}
    index = GalleryIndex(16, manifest, IndexConfig(use_gpu=False))
    index.add(matrix, records)
    index.add(matrix[:1], [ItemRecord(path="unlabelled.jpg", label=None, content_hash="u")])
    return index


def subset_metrics(index: GalleryIndex, keep: list[str]):
    ids = [i for i, label in enumerate(index.records.column("label")) if label in keep]
    return leave_one_out_metrics(index.vectors[ids], [index.records.column("label")[i] for i in ids])


def test_a_mixed_gallery_reports_each_group_among_its_own_items() -> None:
    index = gallery(SEEN + UNSEEN, SEEN + ["Some Class Not In The Gallery 2001"])
    result = evaluate_index(index)
    assert result.seen is not None and result.unseen is not None
    assert (result.seen.classes, result.seen.items) == (3, 15)
    assert (result.unseen.classes, result.unseen.items) == (2, 10)
    assert result.seen.metrics == subset_metrics(index, SEEN)
    assert result.unseen.metrics == subset_metrics(index, UNSEEN)
    assert result.seen.metrics.recall_at[1] == 1.0 > result.unseen.metrics.map_at_r
    assert result.metrics == subset_metrics(index, SEEN + UNSEEN)  # all labelled items, as before
    assert "only the unseen classes' numbers measure generalisation" in result.verdict
    data = result.to_dict()
    assert data["seen"]["classes"] == 3 and data["unseen"]["metrics"]["num_queries"] == 10


def test_a_gallery_of_training_classes_only_says_it_measures_memory() -> None:
    result = evaluate_index(gallery(SEEN, SEEN))
    assert result.unseen is not None and (result.unseen.classes, result.unseen.items) == (0, 0)
    assert result.unseen.metrics is None and result.seen is not None and result.seen.metrics == result.metrics
    assert result.verdict.startswith("3 of the index's 3 labels equal a training class name of the model (exact text")
    assert "Every evaluated class (3) is a training class" in result.verdict
    assert "memory, not generalisation" in result.verdict


def test_a_gallery_of_unseen_classes_only() -> None:
    result = evaluate_index(gallery(UNSEEN, SEEN))
    assert result.seen is not None and result.seen.classes == 0 and result.seen.metrics is None
    assert result.unseen is not None and result.unseen.metrics == result.metrics
    assert result.verdict.startswith(
        "0 of the index's 2 labels equal a training class name of the model (exact text; see `carsearch models test "
        "--classes`). No evaluated class is a training class of the embedder: all 2 are unseen"
    )
    assert "another spelling" in result.verdict  # a folder named audi_tts_2012 is not 'Audi TTS Coupe 2012'


def test_the_verdict_says_how_labels_were_matched() -> None:
    result = evaluate_index(gallery(SEEN + UNSEEN, SEEN))
    assert result.verdict.startswith("3 of the index's 5 labels equal a training class name of the model")


def test_an_embedder_without_recorded_classes_gets_no_split() -> None:
    result = evaluate_index(gallery(SEEN, None))
    assert result.seen is None and result.unseen is None
    assert "does not record its training classes" in result.verdict
    assert result.to_dict()["seen"] is None


def test_post_processing_is_measured_per_group_too() -> None:
    index = gallery(SEEN + UNSEEN, SEEN)
    reranked = evaluate_index(index, RetrievalConfig(qe_k=2, qe_alpha=3.0))
    assert reranked.unseen is not None and reranked.unseen.metrics is not None
    assert reranked.unseen.metrics.num_queries == 10


@pytest.mark.parametrize(("train", "expected"), [(SEEN, "memory, not generalisation"), (UNSEEN, "all 3 are unseen")])
def test_the_evaluate_command_labels_its_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], train: list[str], expected: str
) -> None:
    index = gallery(SEEN, train)
    index.save(tmp_path / "idx")
    assert main(["evaluate", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    group = "seen (3 classes)" if train == SEEN else "unseen (3 classes)"
    assert group in out.splitlines()[1] and expected in out.splitlines()[-1]
    assert main(["evaluate", str(tmp_path / "idx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert expected in data["verdict"] and ("seen" in data and "unseen" in data)
