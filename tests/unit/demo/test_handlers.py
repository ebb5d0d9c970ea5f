"""The demo's handlers on generated images: boxes, crops, captions, raw vs cropped, bad uploads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.demo.app import build_app
from carsearch.demo.explaining import explain_hit, explain_search
from carsearch.demo.handlers import DemoBackend, QueryState, search
from carsearch.errors import CarSearchError
from tests.conftest import make_car_image
from tests.demo_fixtures import build_demo_indexes

CAPTION = re.compile(r"^#(\d+) class_\d · (\d\.\d{3})$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, tiny_yolo: Path) -> tuple[DemoBackend, Path]:
    gallery, cropped, raw = build_demo_indexes(tmp_path_factory.mktemp("demo"), tiny_yolo)
    return DemoBackend.load(cropped, raw), gallery


def test_search_shows_box_crop_hits_and_both_indexes(demo: tuple[DemoBackend, Path]) -> None:
    backend, gallery = demo
    out = search(backend, gallery / "class_1" / "img_0.jpg", k=4, confidence=0.05)
    assert out.error is None and "Found a **car**" in out.message
    assert out.annotated is not None and out.annotated.size == (384, 288)  # 160 x 120 shown at 384 px
    assert np.any(np.all(np.asarray(out.annotated) == (0, 255, 0), axis=-1))  # the searched box is drawn
    assert out.car == 1 and out.cars == list(range(1, len(out.cars) + 1))
    assert out.crop is not None and max(out.crop.size) == 256  # shown upscaled
    assert out.state.crop is not None and out.state.crop.width < 160  # the embedded crop itself
    assert len(out.hits) == 4 and len(out.raw_hits) == 4
    ranks = [int(CAPTION.match(caption).group(1)) for _, caption in out.hits]  # type: ignore[union-attr]
    assert ranks == [1, 2, 3, 4]
    scores = [float(CAPTION.match(caption).group(2)) for _, caption in out.hits]  # type: ignore[union-attr]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(image, Image.Image) for image, _ in out.hits + out.raw_hits)
    assert len(out.state.hits) == 4
    assert not backend.main.explainer_loaded  # the answer needs no CAM model: the maps come after
    maps = explain_search(backend, out.state)
    assert maps.query_cam is not None and maps.hit_cam is not None and "query ↔ #1" in maps.cam_caption
    assert [caption for _, caption in maps.photo_cams] == [
        "raw index: where the model looks",
        "cropped index: where the model looks",
    ]
    assert re.search(r"raw: \*\*\d+%\*\*.*cropped: \*\*\d+%\*\*", maps.attention)


def test_confidence_slider_above_every_detection_searches_with_the_fallback_box(
    demo: tuple[DemoBackend, Path],
) -> None:
    backend, gallery = demo
    out = search(backend, gallery / "class_0" / "img_1.jpg", k=3, confidence=1.0)  # the index's fallback applies
    assert out.message.startswith("No car reached confidence 1.00") and "most confident box" in out.message
    assert out.state.crop is not None and out.state.crop.width < 160 and len(out.hits) == 3


def test_no_box_even_at_the_floor_is_said_plainly() -> None:
    from carsearch.demo.handlers import _message
    from carsearch.types import FLAG_NO_DETECTION, CropPlan

    message = _message(CropPlan(None, None, (FLAG_NO_DETECTION,)), 0.35, 3)
    assert message.startswith("**No car found** (confidence ≥ 0.35)") and "whole image" in message


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_any_image_mode_is_searched(demo: tuple[DemoBackend, Path], tmp_path: Path, mode: str) -> None:
    backend, _ = demo
    path = tmp_path / f"query_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    make_car_image(7, (200, 40, 40)).convert(mode).save(path)
    out = search(backend, path, k=2)
    assert out.error is None and len(out.hits) == 2


def test_bad_uploads_give_a_message_not_an_exception(demo: tuple[DemoBackend, Path], tmp_path: Path) -> None:
    backend, _ = demo
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for upload, expected in [
        (None, "upload a car photo first"),
        (tmp_path / "notes.txt", "Could not use that upload"),
        (tmp_path / "broken.jpg", "Could not use that upload"),
        (tmp_path / "missing.jpg", "Could not use that upload"),
    ]:
        out = search(backend, upload, k=3)
        assert out.error and expected in out.message and not out.hits


def test_explain_hit_for_a_selected_result(demo: tuple[DemoBackend, Path]) -> None:
    backend, gallery = demo
    out = search(backend, gallery / "class_2" / "img_3.jpg", k=3)
    query_cam, hit_cam, caption = explain_hit(backend, out.state, 2)
    assert max(query_cam.size) >= 256 and caption.endswith(out.hits[2][1])
    assert hit_cam.size[0] / hit_cam.size[1] == pytest.approx(out.hits[2][0].width / out.hits[2][0].height, rel=0.02)
    with pytest.raises(CarSearchError, match="search first"):
        explain_hit(backend, out.state, 3)
    with pytest.raises(CarSearchError, match="search first"):
        explain_hit(backend, QueryState(), 0)


def test_examples_come_from_the_index_one_per_label(demo: tuple[DemoBackend, Path]) -> None:
    backend, _ = demo
    examples = backend.examples()
    assert len(examples) == 3 and {Path(p).parent.name for p in examples} == {"class_0", "class_1", "class_2"}


def test_build_app_wires_the_page(demo: tuple[DemoBackend, Path]) -> None:
    backend, _ = demo
    app = build_app(backend)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"query", "search", "status", "hits", "raw-hits", "query-cam", "hit-cam", "attention", "car"} <= ids
    assert "/search" in {f"/{fn.api_name}" for fn in app.fns.values() if fn.api_name}


def test_upload_path_reads_gradio_payloads() -> None:
    from gradio.data_classes import FileData

    from carsearch.demo.app import upload_path

    assert upload_path(None) is None
    assert upload_path({"path": "/tmp/x.png", "url": None}) == "/tmp/x.png"
    assert upload_path(FileData(path="/tmp/y.jpg")) == "/tmp/y.jpg"
    assert upload_path("/tmp/z.webp") == "/tmp/z.webp"


def test_a_result_whose_file_vanished_is_shown_but_not_explained(
    demo: tuple[DemoBackend, Path], tmp_path: Path
) -> None:
    backend, gallery = demo
    out = search(backend, gallery / "class_0" / "img_0.jpg", k=2)
    out.state.missing.add(1)
    with pytest.raises(CarSearchError, match="missing from the gallery"):
        explain_hit(backend, out.state, 1)


def _listening(port: int) -> list[str]:
    import psutil

    return [
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def test_the_demo_listens_on_loopback_only_unless_told_otherwise(demo: tuple[DemoBackend, Path]) -> None:
    """The listening socket itself, not a client connection (which would also succeed on 0.0.0.0)."""
    import socket

    from carsearch.cli import build_parser
    from carsearch.demo.app import launch

    backend, _ = demo
    assert build_parser().parse_args(["demo", "idx"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        kwargs = {} if host == "127.0.0.1" else {"host": host}  # the default first
        app = launch(backend, port=port, block=False, **kwargs)
        try:
            assert _listening(port) == [host]
        finally:
            app.close()


def test_post_processing_is_applied_and_named(tmp_path: Path, tiny_yolo: Path) -> None:
    gallery, cropped, _ = build_demo_indexes(tmp_path, tiny_yolo)
    settings = ["retrieval.dba_k=2", "retrieval.qe_k=1", "retrieval.kreciprocal=true"]
    backend = DemoBackend.load(cropped, overrides=settings)
    assert backend.main.pipeline.config.retrieval.dba_k == 2  # searches use it (Pipeline.search)
    out = search(backend, gallery / "class_1" / "img_0.jpg", k=4, confidence=0.05)
    assert out.error is None and len(out.hits) == 4
    assert "Post-processed: DBA (k 2, α 0) + AQE (k 1, α 0) + k-reciprocal re-ranking" in out.message
    main = backend.main
    assert main.pipeline.search(main.gallery, gallery / "class_1" / "img_0.jpg", k=4, min_score=0.05).reranked
    plain = search(DemoBackend.load(cropped), gallery / "class_1" / "img_0.jpg", k=4, confidence=0.05)
    assert "Post-processed" not in plain.message
