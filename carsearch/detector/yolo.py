"""The vehicle detector: a thin wrapper over ``ultralytics.YOLO`` that returns :class:`Detection` lists.

This is the only module that imports ultralytics (lazily, at construction).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from carsearch.config import DetectorConfig
from carsearch.data import storage
from carsearch.detector.weights import is_bare_name, local_target
from carsearch.errors import ModelLoadError
from carsearch.types import BBox, Detection

logger = logging.getLogger(__name__)

DELEGATE_NOTICE = "Created TensorFlow Lite XNNPACK delegate"  # LiteRT's C++ INFO line, not an error
OFFLINE_HINT = (
    "pass local weights with --detector-weights PATH (or --set detector.weights=PATH), "
    "e.g. ../shared/models/yolov8n_coco_int8.tflite"
)


def resolve_vehicle_classes(names: dict[int, str], wanted: Sequence[str]) -> dict[int, str]:
    """Model class ids whose names are in ``wanted`` (case-insensitive); a single-class model is used as is."""
    if len(names) == 1:
        return dict(names)
    wanted_lower = {w.lower() for w in wanted}
    found = {i: n for i, n in names.items() if str(n).lower() in wanted_lower}
    if not found:
        sample = ", ".join(str(n) for n in list(names.values())[:20])
        raise ModelLoadError(
            f"detector has none of the vehicle classes {sorted(wanted_lower)}; its classes are: {sample}"
            f"{' …' if len(names) > 20 else ''}. Set detector.classes to the right names."
        )
    return found


def _task_for(weights: str) -> str | None:
    # Exported formats (.tflite, .onnx, saved models) do not always carry their task.
    return None if weights.endswith((".pt", ".yaml", ".yml")) else "detect"


class VehicleDetector:
    """Detects vehicles with any YOLO model ultralytics loads.

    ``device`` is a torch device string ('cpu', 'cuda:0'); exported formats pick their own runtime.
    """

    def __init__(self, config: DetectorConfig, device: str = "cpu", threads: int | None = None) -> None:
        self.config = config
        self.device = device
        with _quiet_ultralytics(), _without_delegate_notice():  # reading .names creates a .tflite interpreter
            self._model, self.weights_file = _load_yolo(config.weights, threads or os.cpu_count() or 1)
            names = {int(k): str(v) for k, v in dict(self._model.names).items()}
        self.class_names = resolve_vehicle_classes(names, config.classes)
        self.identity = f"{storage.name(config.weights)}:{','.join(sorted(self.class_names.values()))}"

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Vehicles in each RGB image, in that image's pixel coordinates, sorted by decreasing score."""
        if not images:
            return []
        threads = torch.get_num_threads()
        with _quiet_ultralytics():
            results = self._model.predict(
                [detector_input(image, self.config.image_size, self.config.enlarge_small) for image in images],
                conf=self.config.detection_floor,
                iou=self.config.iou,
                imgsz=self.config.image_size,
                classes=sorted(self.class_names),
                max_det=self.config.max_detections,
                device=self.device,
                verbose=False,
            )
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # ultralytics' select_device resets it to cpu_count - 1
        return [self._to_detections(r, image.size) for r, image in zip(results, images, strict=True)]

    def _to_detections(self, result: Any, image_size: tuple[int, int]) -> list[Detection]:
        width, height = image_size
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().tolist()
        scores = boxes.conf.cpu().numpy().tolist()
        classes = boxes.cls.cpu().numpy().astype(int).tolist()
        detections = []
        for (x1, y1, x2, y2), score, cls in zip(xyxy, scores, classes, strict=True):
            if cls not in self.class_names:
                continue
            box = BBox(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)).clip(width, height)
            if box.area <= 0:
                continue
            detections.append(
                Detection(box=box, score=float(min(max(score, 0.0), 1.0)), class_name=self.class_names[cls])
            )
        return sorted(detections, key=lambda d: d.score, reverse=True)


def detector_input(image: Image.Image, size: int, enlarge_small: bool) -> Image.Image:
    """What the detector is given: the image itself (ultralytics' letterbox then fits it to ``size``), or, for
    an image smaller than ``size`` on both sides when ``enlarge_small`` is false, the image at its own size in
    the top-left corner of a grey ``size``×``size`` canvas, so that its pixel coordinates are the image's
    (ultralytics' predictor builds its ``LetterBox`` with scale-up on and offers no switch for it)."""
    if enlarge_small or image.width > size or image.height > size:
        return image
    canvas = Image.new("RGB", (size, size), (114, 114, 114))  # YOLO's letterbox grey
    canvas.paste(image.convert("RGB"), (0, 0))
    return canvas


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """Keep ultralytics' INFO lines (printed to stdout) out of our output, e.g. ``--json``."""
    import ultralytics  # noqa: F401 - its first import resets its logger to INFO: import before lowering it

    log = logging.getLogger("ultralytics")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _without_delegate_notice() -> Iterator[None]:
    """Capture file descriptor 2 for the block (LiteRT logs from C++, past ``sys.stderr``) and re-emit every
    line but the XNNPACK delegate notice, so real errors stay visible."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a detached process): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            _flush_c_streams()  # LiteRT's stream may hold the line in a C buffer
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if DELEGATE_NOTICE not in line)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _flush_c_streams() -> None:
    with contextlib.suppress(Exception):  # no C library to ask (unusual platforms): the notice may slip through
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _load_yolo(weights: str, threads: int) -> tuple[Any, Path]:
    """The YOLO model and the local file it was loaded from (a URI's cached copy; a bare name's download in
    the cache folder, :mod:`carsearch.detector.weights`)."""
    try:
        from ultralytics import YOLO
    except ImportError as exc:  # pragma: no cover - ultralytics is a hard dependency
        raise ModelLoadError(f"ultralytics is not installed: {exc}") from exc
    try:
        # ultralytics gives the LiteRT interpreter cpu_count - 1 threads (1 on a 2-core laptop: a core idles).
        import ultralytics.nn.backends.litert as litert

        litert.NUM_THREADS = threads
    except (ImportError, AttributeError):  # layout differs in other ultralytics versions: keep their default
        pass
    if storage.is_uri(weights):  # an object store: ultralytics needs a local file
        try:
            weights = str(storage.local_copy(weights))
        except OSError as exc:
            raise ModelLoadError(f"cannot fetch detector weights {weights!r}: {exc}") from None
    local = Path(local_target(weights)).expanduser()  # a bare name: the cache folder, where it downloads
    if local.suffix == "" and not local.exists():
        raise ModelLoadError(f"detector weights {weights!r} not found; {OFFLINE_HINT}")
    if not is_bare_name(weights) and not local.exists():
        raise ModelLoadError(f"detector weights {weights!r} not found (no such file); {OFFLINE_HINT}")
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        return YOLO(str(local), task=_task_for(weights)), local  # task None: YOLO's default
    except Exception as exc:  # noqa: BLE001 - ultralytics raises many types; one clear error for users
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load detector weights {weights!r} ({reason}); {OFFLINE_HINT}") from exc
