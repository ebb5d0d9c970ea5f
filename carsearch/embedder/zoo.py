"""Named embedders, like timm's and ultralytics' model names: ``--model cars98-lite1-320`` or ``--model imagenet``.

A name maps to a checkpoint shipped inside the package (verified by its SHA-256 before it is read) and the
input size it embeds at, or, for ``imagenet``, to the pretrained backbone of ``EmbedderConfig``. Anything
that is not a name is a checkpoint path or URI written by ``carsearch export``. The model cards are in
docs/models.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from carsearch.config import DEFAULT_BACKBONE, DEFAULT_MODEL
from carsearch.errors import ModelLoadError

IMAGENET = "imagenet"
__all__ = ["DEFAULT_MODEL", "IMAGENET", "MODELS", "NamedModel"]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class NamedModel:
    """A shipped model: its file under ``carsearch/embedder/weights/`` and that file's SHA-256 (None: no file).

    ``image_size``: the square size the model embeds at when it is not the checkpoint's own (the same weights
    at a larger input: a model trained on random crops sees cars larger in training than in a whole-crop
    input of the same size; docs/training.md).

    The card for ``carsearch models`` (the checkpoint is the truth; tests/unit/embedder/test_zoo.py checks
    the card against it): ``backbone``, ``input_size`` (the square size it embeds at), ``dim`` (embedding
    dimension), ``train_classes`` (car classes it was fine-tuned on; 0: none) and ``note`` (the measured
    figures docs/models.md records, written here once).
    """

    name: str
    summary: str
    file: str | None = None
    sha256: str | None = None
    image_size: int | None = None
    backbone: str = ""
    input_size: int = 0
    dim: int = 0
    train_classes: int = 0
    note: str = ""

    @property
    def path(self) -> Path | None:
        return WEIGHTS_DIR / self.file if self.file else None


MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel(
            DEFAULT_MODEL,
            "tf_efficientnet_lite1 fine-tuned on Stanford Cars classes 1-98 (triplet + semi-hard mining) on "
            "256x256 px views, embedding 320x320 px inputs, pooled 1280-d features; non-commercial research use "
            "(the dataset's terms)",
            file="cars98-lite1-256.pt",
            sha256="e780246d7896e26e4c984bb66808a855b049c60db4bb27dfbc59c473b1871a07",
            image_size=320,
            backbone="tf_efficientnet_lite1",
            input_size=320,
            dim=1280,
            train_classes=98,
            note="its recipe on the half split: R@1 78.1 / MAP@R 23.50; this file on a CARS196 classes 99-196 "
            "hold-out kept outside this repository: crops 86.4 / 30.0, 128x96 thumbnails through the detector "
            "65.0 / 16.6",
        ),
        NamedModel(
            "cars98-lite1-256",
            "the previous default: the same weights embedding 256x256 px inputs (kept for the indexes built with "
            "it); non-commercial research use",
            file="cars98-lite1-256.pt",
            sha256="e780246d7896e26e4c984bb66808a855b049c60db4bb27dfbc59c473b1871a07",
            backbone="tf_efficientnet_lite1",
            input_size=256,
            dim=1280,
            train_classes=98,
            note="half split R@1 75.1 / MAP@R 22.37; CARS196 classes 99-196 hold-out: not measured",
        ),
        NamedModel(
            "cars98-lite1",
            "an earlier default: the same recipe at 224x224 px (kept for the indexes built with it); "
            "non-commercial research use",
            file="cars98-lite1.pt",
            sha256="f5563ac11ac3ea099cf4ed5820dfdd198fc891bc8455ce185229ce260ae926f6",
            backbone="tf_efficientnet_lite1",
            input_size=224,
            dim=1280,
            train_classes=98,
            note="half split R@1 74.5 / MAP@R 20.97; CARS196 classes 99-196 hold-out: not measured",
        ),
        NamedModel(
            "cars98-lite0",
            "an earlier default: tf_efficientnet_lite0 fine-tuned the same way at 224 px (kept for the indexes built "
            "with it); non-commercial research use",
            file="cars98-lite0.pt",
            sha256="de5ec6fd836a5e71220713ceff34d9bec3ec61db4903032ccf0e3cdd209d2205",
            backbone="tf_efficientnet_lite0",
            input_size=224,
            dim=1280,
            train_classes=98,
            note="CARS196 classes 99-196 hold-out (outside this repository), crops: "
            "its recipe R@1 81.5 / MAP@R 24.1 (this file not measured)",
        ),
        NamedModel(
            IMAGENET,
            "the ImageNet-pretrained backbone (embedder.backbone), zero-shot",
            backbone=DEFAULT_BACKBONE,
            input_size=224,
            dim=1280,
            note="zero-shot; CARS196 classes 99-196 hold-out (outside this repository), crops: R@1 52.4 / MAP@R 8.8",
        ),
    )
}


def is_name(model: str) -> bool:
    """Whether ``model`` is a registered name (else it is a checkpoint path or URI)."""
    return model in MODELS


def shipped_checkpoint(name: str) -> tuple[Path, str]:
    """(file, expected SHA-256) of a named model that ships a checkpoint; a clear error otherwise."""
    entry = MODELS.get(name)
    if entry is None or entry.path is None or entry.sha256 is None:
        valid = ", ".join(n for n, m in MODELS.items() if m.path is not None)
        raise ModelLoadError(f"{name!r} is not a shipped checkpoint; shipped: {valid}")
    if not entry.path.is_file():
        raise ModelLoadError(f"model {name!r}: {entry.path} is missing from the installed package; reinstall carsearch")
    return entry.path, entry.sha256


def verified_bytes(path: Path, sha256: str) -> bytes:
    """The file's bytes, refused with a one-line message unless their SHA-256 is ``sha256``."""
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ModelLoadError(
            f"{path} is damaged (SHA-256 {actual[:12]}…, expected {sha256[:12]}…); reinstall carsearch"
        )
    return data


def names_hint() -> str:
    """What ``--model`` takes, for error messages: the shipped names, or a checkpoint path or URI."""
    return f"a shipped name ({', '.join(MODELS)}; see `carsearch models`) or a checkpoint path or URI"


def describe() -> str:
    """One line per named model, for help texts."""
    return "; ".join(f"{name}: {model.summary}" for name, model in MODELS.items())
