"""Eval-time preprocessing, recorded in every checkpoint and index manifest so both sides match."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torchvision.transforms import v2

from carsearch.config import ResizeMode

Size = tuple[int, int]  # (height, width) of a model input


def _rgb(values: Iterable[Any]) -> tuple[float, float, float]:
    """Per-channel ``mean`` / ``std`` as a tuple of floats: three (R, G, B) as stored; the count is not checked."""
    return cast("tuple[float, float, float]", tuple(float(v) for v in values))


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB crop becomes a tensor: resize to ``input_size`` (squash or centre crop), normalise.

    The input is ``image_size`` × ``image_size``, or ``image_size`` high and ``image_width`` wide: car crops
    are about twice as wide as high, and a 2:1 input keeps their shape in as many pixels as a square (it did
    not beat the square on validation classes; docs/training.md).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    resize: ResizeMode = "squash"
    image_width: int | None = None  # None: square

    def __post_init__(self) -> None:
        if self.image_width is not None and self.image_width != self.image_size and self.resize != "squash":
            raise ValueError(f"a {self.image_size}x{self.image_width} (non-square) input needs resize=squash")

    @property
    def input_size(self) -> Size:
        """(height, width) of the model input."""
        return self.image_size, self.image_width or self.image_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if self.image_width is None:
            del data["image_width"]  # square: the same dict as before image_width existed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(data["image_size"]),
            mean=_rgb(data["mean"]),
            std=_rgb(data["std"]),
            interpolation=str(data["interpolation"]),
            resize=data.get("resize", "squash"),
            image_width=None if data.get("image_width") is None else int(data["image_width"]),
        )

    @classmethod
    def from_timm(
        cls,
        data_config: dict[str, Any],
        image_size: int | None = None,
        resize: ResizeMode = "squash",
        image_width: int | None = None,
    ) -> Preprocessing:
        """From ``timm.data.resolve_model_data_config`` output (mean/std/interpolation, input size)."""
        return cls(
            image_size=image_size or int(data_config["input_size"][-1]),
            mean=_rgb(data_config["mean"]),
            std=_rgb(data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bicubic")),
            resize=resize,
            image_width=image_width,
        )


def interpolation_mode(name: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        return v2.InterpolationMode.BICUBIC


def resize_transforms(pre: Preprocessing, size: Size | None = None) -> list[v2.Transform]:
    """The inference geometry: squash to ``size`` (height, width; default ``pre.input_size``), or resize the
    short side and centre-crop (square sizes only)."""
    height, width = size or pre.input_size
    mode = interpolation_mode(pre.interpolation)
    if pre.resize == "squash":
        return [v2.Resize((height, width), interpolation=mode, antialias=True)]
    if height != width:
        raise ValueError(f"centre-crop resizing needs a square size, got {height}x{width}")
    return [v2.Resize(height, interpolation=mode, antialias=True), v2.CenterCrop(height)]


def normalise_transforms(pre: Preprocessing) -> list[v2.Transform]:
    """uint8 tensor → float tensor normalised with the model's mean and std."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]


def tensor_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 (3, H, W) tensor, on any device → normalised float tensor (3, h, w) (``input_size``) on that device."""
    return v2.Compose([*resize_transforms(pre), *normalise_transforms(pre)])


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """PIL RGB image → normalised float tensor (3, h, w): ``PILToTensor`` then :func:`tensor_transform`."""
    return v2.Compose([v2.PILToTensor(), *tensor_transform(pre).transforms])
