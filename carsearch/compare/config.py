"""What the cropped-vs-raw experiment runs on and with: a frozen config, a serialised YAML (configs/compare.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from carsearch.config import DEFAULT_BACKBONE, DetectorConfig
from carsearch.config_files import load_dataclass
from carsearch.errors import ConfigError


@dataclass(frozen=True)
class CompareData:
    """Uncropped photos with known boxes (CSV ``path,label,x1,y1,x2,y2``), split by class.

    The first ``train_share`` of the sorted class names are the training classes, the rest the test classes.
    """

    source: str = "../shared/data/stanford_cars/photos.csv"
    where: dict[str, str] = field(default_factory=lambda: {"box_fully_visible": "1"})
    train_share: float = 0.5
    max_classes: int | None = None  # per split, for quick runs
    max_per_class: int | None = None


@dataclass(frozen=True)
class CompareTrain:
    """One recipe for both fine-tuned rows (same budget): raw photos vs detector crops.

    Training classes are split again: the last ``val_share`` of them pick the best epoch, so the
    test classes are never seen before the retrieval grid.
    """

    recipe: str = "cpu_quick"
    overrides: tuple[str, ...] = ()
    val_share: float = 0.25


@dataclass(frozen=True)
class CompareAttention:
    """Attention-in-box on raw test photos, per embedder."""

    limit: int | None = 300
    method: str = "gradcam"
    batch_size: int = 8


@dataclass(frozen=True)
class CompareConfig:
    data: CompareData = field(default_factory=CompareData)
    detector: DetectorConfig = field(
        default_factory=lambda: DetectorConfig(weights="../shared/models/yolov8n_coco_int8.tflite")
    )
    confidences: tuple[float, ...] = (0.1, 0.25, 0.5)  # detector-quality sweep; crops use detector.confidence
    backbone: str = DEFAULT_BACKBONE
    image_size: int = 224  # model input height (and width unless image_width), zero-shot and fine-tuned alike
    image_width: int | None = None  # a non-square input's width; None: square
    train: CompareTrain = field(default_factory=CompareTrain)
    attention: CompareAttention = field(default_factory=CompareAttention)
    examples: int = 4  # pairs shown each way in "where it matters"
    redact: bool = True  # draw CAMs on grey: the report can be shared without the photos' licence
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.data.train_share < 1:
            raise ConfigError(f"data.train_share must be in (0, 1), got {self.data.train_share}")
        if not 0 < self.train.val_share < 1:
            raise ConfigError(f"train.val_share must be in (0, 1), got {self.train.val_share}")
        if not self.confidences or any(not 0 < c < 1 for c in self.confidences):
            raise ConfigError(f"confidences must be in (0, 1), got {self.confidences}")


QUICK_OVERRIDES = [
    "data.max_classes=6",
    "data.max_per_class=5",
    "image_size=64",
    "attention.limit=12",
    "examples=2",
    "train.overrides=[trainer.max_epochs=1, trainer.limit_train_batches=2, data.classes_per_batch=4, "
    "data.images_per_class=2, trainer.val_every=1]",
]


def load_compare_config(
    path: str | Path | None, overrides: list[str] | None = None, quick: bool = False
) -> CompareConfig:
    """The experiment's config from YAML (or defaults) + ``key=value`` overrides; ``quick`` shrinks it for CI."""
    return load_dataclass(CompareConfig, path, [*(QUICK_OVERRIDES if quick else []), *(overrides or [])])
