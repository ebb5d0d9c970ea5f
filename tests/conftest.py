"""Shared fixtures: an offline environment, seeded synthetic car images, tiny galleries, a tiny YOLO."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Offline hygiene before anything imports ultralytics / gradio / huggingface.
_YOLO_DIR = Path(tempfile.mkdtemp(prefix="carsearch-yolo-"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(_YOLO_DIR))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")


def _install_font() -> None:
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    target = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if source.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


_install_font()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DETECTOR = SHARED / "models" / "yolov8n_coco_int8.tflite"
CLASS_COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 30)]
# The ImageNet backbone at 64 px on torch: small and fast (the shipped model and the onnxruntime default
# have tests of their own; each new model's ONNX export takes seconds)
TEST_OVERRIDES = [
    "embedder.model=imagenet",
    "embedder.image_size=64",
    "embedder.runtime=torch",
    "runtime.batch_size=8",
    "runtime.workers=0",
    "index.use_gpu=false",
]


def make_car_image(seed: int, colour: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A "car" (body, cabin, wheels) of ``colour`` on a seeded noisy background."""
    rng = np.random.default_rng(seed)
    width, height = size
    background = rng.integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    x0 = int(width * rng.uniform(0.1, 0.25))
    y0 = int(height * rng.uniform(0.35, 0.5))
    x1, y1 = int(width * rng.uniform(0.75, 0.9)), int(height * 0.8)
    draw.rectangle([x0, y0, x1, y1], fill=colour)
    draw.rectangle([x0 + (x1 - x0) // 4, y0 - (y1 - y0) // 2, x1 - (x1 - x0) // 4, y0], fill=colour)
    r = max(3, (y1 - y0) // 3)
    for cx in (x0 + (x1 - x0) // 5, x1 - (x1 - x0) // 5):
        draw.ellipse([cx - r, y1 - r, cx + r, y1 + r], fill=(20, 20, 20))
    return image


@pytest.fixture
def car_image() -> Image.Image:
    return make_car_image(0, CLASS_COLOURS[0])


def build_gallery(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """A folder tree ``root/class_C/img_I.jpg``: one car colour per class (label = sub-folder)."""
    for c, colour in enumerate(CLASS_COLOURS[:classes]):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            make_car_image(100 * c + i, colour).save(folder / f"img_{i}.jpg", quality=92)
    return root


@pytest.fixture
def tiny_gallery(tmp_path: Path) -> Path:
    """A folder tree: 3 colour classes × 4 images (label = sub-folder)."""
    return build_gallery(tmp_path / "gallery")


def _tiny_yolo(path: Path, car_logit: float) -> Path:
    import torch
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml", task="detect")
    names = {i: f"class{i}" for i in range(80)}
    names.update({0: "person", 2: "car", 5: "bus", 7: "truck"})
    model.model.names = names
    with torch.no_grad():
        for branch in model.model.model[-1].cv3:
            branch[-1].bias.fill_(-10.0)
            branch[-1].bias[2] = car_logit
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_yolo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YOLOv8n built from yaml (random weights) whose class head always says "car": real boxes, random geometry."""
    return _tiny_yolo(tmp_path_factory.mktemp("yolo") / "tiny_car.pt", car_logit=3.0)


@pytest.fixture(scope="session")
def tiny_yolo_blind(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny YOLO with every class logit at -10: it never finds anything."""
    return _tiny_yolo(tmp_path_factory.mktemp("yolo") / "tiny_blind.pt", car_logit=-10.0)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


@pytest.fixture
def shared_detector() -> Path:
    if not SHARED_DETECTOR.exists():
        pytest.skip("../shared/models/yolov8n_coco_int8.tflite is absent")
    pytest.importorskip("ai_edge_litert")
    return SHARED_DETECTOR


def kill_9_and_survivors(proc: subprocess.Popen, processes: list, timeout: float) -> list[int]:
    """SIGKILL the job ``proc``, give ``processes`` (psutil handles of what it started, listed before) up to
    ``timeout`` seconds to go, and return the pids still alive — killed now, so no test leaves them behind."""
    import psutil

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for survivor in alive:
        survivor.kill()
    return [survivor.pid for survivor in alive]


class ObjectStore:
    """A local S3 (moto's server) for the tests: buckets to upload folders into, read back as ``s3://`` URIs."""

    def __init__(self, endpoint: str) -> None:
        from pyarrow.fs import S3FileSystem

        self.endpoint = endpoint
        host = endpoint.removeprefix("http://")
        self.fs = S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True)
        self._buckets = 0

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        self._buckets += 1
        name = f"cars-{self._buckets}"
        self.fs.create_dir(name)
        return name

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file below ``folder`` under ``prefix`` (``bucket/key``); returns ``s3://prefix``."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with self.fs.open_output_stream(f"{prefix}/{path.relative_to(folder).as_posix()}") as stream:
                stream.write(path.read_bytes())
        return f"s3://{prefix}"


@pytest.fixture(scope="session")
def object_store() -> Iterator[ObjectStore]:
    """An S3 endpoint on localhost (moto), with the AWS environment pointing at it for this session — so
    that Ray workers started later inherit it too."""
    import logging

    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield ObjectStore(settings["AWS_ENDPOINT_URL"])
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
