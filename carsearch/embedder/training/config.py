"""Frozen, validated training configuration. YAML files under ``configs/train/`` are serialised :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from carsearch.config import DEFAULT_BACKBONE, DetectorConfig, InputGeometry
from carsearch.config_files import load_dataclass, require
from carsearch.embedder.training.registry import LOSSES, MINERS

InputMode = Literal["raw", "gt", "detector"]
ClassSplit = Literal["half", "all", "list"]
ValCarve = Literal["last", "spaced"]  # validation classes: the last ones in sorted order, or evenly spaced
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed"]


@dataclass(frozen=True)
class DataConfig(InputGeometry):
    """What to train on and how batches are drawn.

    ``source``: folder tree / CSV (``path,label[,x1,y1,x2,y2]``) / Stanford devkit / Kaggle layout.
    Classes are split disjointly into train / validation / test. ``class_split``: ``half`` = the first half
    of the sorted classes trains, the second half is the test set (CARS196 protocol); ``all`` = every class
    trains, no test set; ``list`` = ``train_classes``, ``val_classes`` and ``test_classes`` (default: every
    class not named). Validation classes (they pick the epoch) come from ``val_classes`` or, when that is
    empty, ``val_fraction`` of the training classes (``val_carve``: ``last`` = the last ones in sorted
    order, a block of other makes as in the half split; ``spaced`` = evenly spaced, whose same-model
    neighbours then train: an easier, less telling validation); test classes are evaluated once, at the
    end, and never choose anything.

    Geometry: each crop is resized the way inference resizes it (``resize``: squash or centre crop) to
    ``resize_to`` (default ``crop_size`` × 8/7), *then* randomly cropped to ``crop_size`` (default
    ``image_size``, the inference size) with ``RandomResizedCrop(scale=(crop_scale, 1))``, flipped,
    (``jitter`` > 0) colour-jittered and (with probability ``grayscale``) turned grey. A random crop
    magnifies the car (by ~1.12 at ``crop_scale`` 0.6), so ``crop_size`` ≈ ``image_size`` / 1.12 shows
    training cars at their inference size, in fewer pixels
    ("FixRes", Touvron et al. 2019).
    ``cache``: keep the resized uint8 crops in a memory-mapped file under ``cache_dir`` (keyed by file
    content and preprocessing), so that epochs do not decode JPEGs.
    Batches hold ``classes_per_batch`` (P) classes × ``images_per_class`` (K) images.
    """

    source: str = ""
    split: Literal["train", "test", "all"] = "all"  # devkit / Kaggle split to read
    class_split: ClassSplit = "half"
    train_classes: tuple[str, ...] = ()
    val_classes: tuple[str, ...] = ()
    test_classes: tuple[str, ...] = ()
    val_fraction: float = 0.0
    val_carve: ValCarve = "last"
    input: InputMode = "raw"
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # gt/detector crops use its margin
    cache_dir: str | None = None  # detector boxes and image cache; default <out.dir>/cache
    cache: bool = True
    MIN_SIZE: ClassVar[int] = 16
    SECTION: ClassVar[str] = "data"

    image_size: int = 224  # the inference input's geometry (InputGeometry), which the training views share
    resize_to: int | None = None  # height (the width follows the input's aspect)
    crop_size: int | None = None  # training views' height; None: image_size
    crop_scale: float = 0.6  # RandomResizedCrop scale = (crop_scale, 1)
    hflip: bool = True
    jitter: float = 0.0  # ColorJitter brightness/contrast/saturation (hue = jitter / 4); 0 disables
    grayscale: float = 0.0  # probability of a grey view (after jitter): a car model comes in every colour
    low_res: float = 0.0  # probability of a view degraded as a small photo shows the car (data.LowResolution)
    low_res_sides: tuple[int, ...] = (32, 128)  # its height range in px before it is enlarged back
    low_res_jpeg: int = 0  # lowest JPEG quality of its re-encoding (0: none)
    classes_per_batch: int = 16
    images_per_class: int = 4
    min_per_class: int = 0  # drop training classes with fewer images (0: keep; short classes repeat images)
    batches_per_epoch: int | None = None  # None: about one pass over the training images
    eval_batch_size: int = 64
    workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.resize_to is None or self.resize_to >= self.train_crop_size[0],
            "data.resize_to must be >= data.crop_size (or data.image_size): the random crop is taken from it",
        )
        require(self.crop_size is None or self.crop_size >= 16, "data.crop_size must be >= 16")
        require(0.0 < self.crop_scale <= 1.0, "data.crop_scale must be in (0, 1]")
        require(0.0 <= self.jitter <= 1.0, "data.jitter must be in [0, 1]")
        require(0.0 <= self.grayscale <= 1.0, "data.grayscale must be in [0, 1]")
        require(0.0 <= self.low_res <= 1.0, "data.low_res must be in [0, 1]")
        require(
            len(self.low_res_sides) == 2 and 8 <= self.low_res_sides[0] <= self.low_res_sides[1],
            "data.low_res_sides must be two heights [low, high] with 8 <= low <= high",
        )
        require(0 <= self.low_res_jpeg <= 95, "data.low_res_jpeg must be in [0, 95] (0: no JPEG re-encoding)")
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        require(self.val_carve in ("last", "spaced"), f"data.val_carve must be last or spaced, got {self.val_carve!r}")
        require(self.classes_per_batch >= 2, "data.classes_per_batch (P) must be >= 2 (negatives need two classes)")
        require(self.images_per_class >= 1, "data.images_per_class (K) must be >= 1")
        require(self.min_per_class >= 0, "data.min_per_class must be >= 0")
        require(self.batches_per_epoch is None or self.batches_per_epoch >= 1, "data.batches_per_epoch must be >= 1")
        require(self.eval_batch_size >= 1, "data.eval_batch_size must be >= 1")
        require(self.workers >= 0, "data.workers must be >= 0")
        if self.class_split == "list":
            require(bool(self.train_classes), "data.class_split=list needs data.train_classes")
        else:
            require(
                not self.train_classes and not self.val_classes and not self.test_classes,
                "data.train_classes/val_classes/test_classes are only used with data.class_split=list",
            )

    @property
    def aspect(self) -> float:
        """Width / height of the model input."""
        return (self.image_width or self.image_size) / self.image_size

    @property
    def train_size(self) -> tuple[int, int]:
        """(height, width) crops are resized to before the random crop."""
        height = self.resize_to or round(self.train_crop_size[0] * 8 / 7)
        return height, round(height * self.aspect)

    @property
    def train_crop_size(self) -> tuple[int, int]:
        """(height, width) of a training view (the random crop's output)."""
        height = self.crop_size or self.image_size
        return height, round(height * self.aspect)

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class


@dataclass(frozen=True)
class ModelConfig:
    """The embedder: timm backbone (offline ImageNet weights for ``tf_efficientnet_lite0/1/2``) + pooling + head.

    ``freeze_blocks``: 0 trains everything; N > 0 freezes the stem and the first N blocks (their
    BatchNorm statistics too); -1 freezes the whole backbone (only the head and loss train).
    ``freeze_bn``: every BatchNorm layer keeps its ImageNet statistics (its scale and shift still train);
    PK batches of one dataset are a poor estimate of them.
    ``embed_with``: what the exported model embeds with (the loss always trains through the head):
    ``head`` = the head's output; ``pooled`` = the pooled backbone features before the head (the head
    then only shapes the training signal); ``auto`` = whichever scores higher on the validation classes
    at the selected epoch (``trainer.select``'s metric; MAP@R for ``last``), the head without validation.
    """

    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    pooling: Literal["avg", "max", "avgmax", "gem"] = "avg"
    embedding_dim: int | None = 512  # None: the pooled backbone features, no head
    head_bn: bool = False
    freeze_blocks: int = 0
    freeze_bn: bool = True
    channels_last: bool = True
    embed_with: Literal["head", "pooled", "auto"] = "auto"

    def __post_init__(self) -> None:
        require(self.embedding_dim is None or self.embedding_dim >= 1, "model.embedding_dim must be >= 1 or null")
        require(self.embed_with in ("head", "pooled", "auto"), "model.embed_with must be head, pooled or auto")
        require(self.freeze_blocks >= -1, "model.freeze_blocks must be >= -1 (-1 = whole backbone)")


@dataclass(frozen=True)
class LossConfig:
    """A pytorch-metric-learning loss and miner by name (the names of
    :mod:`carsearch.embedder.training.registry`).

    ``miner``: null takes the loss's own default (semi-hard for triplet, multi_similarity for it, none
    otherwise); proxy losses take none. ``margin``: the loss's margin (triplet: cosine-distance margin, also
    the triplet miner's; arcface / subcenter_arcface: degrees; proxy_anchor: cosine margin); null keeps PML's
    default. ``params`` and ``miner_params`` are passed to the PML constructors as keyword arguments (e.g.
    ``alpha``, ``scale``).

    ``plus``: a second loss added to this one with weight ``plus_weight`` (e.g. a proxy loss beside mined
    triplets); it runs without a miner, so it must be one that needs none (a proxy / class-weight loss or
    ``contrastive``); ``plus_params`` are its keyword arguments, its margin included.

    ``memory``: a cross-batch memory (PML's ``CrossBatchMemory``, XBM) of the last ``memory`` training
    embeddings (0: off; at least one batch): from the first epoch that trains the backbone, the same loss
    and miner also pair each batch's embeddings with the memory's, added with weight ``memory_weight``.
    Tuple losses only (proxy losses already see every class).
    """

    name: str = "triplet"
    miner: str | None = None
    margin: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    miner_params: dict[str, Any] = field(default_factory=dict)
    plus: str | None = None
    plus_weight: float = 1.0
    plus_params: dict[str, Any] = field(default_factory=dict)
    memory: int = 0
    memory_weight: float = 1.0

    def __post_init__(self) -> None:
        require(isinstance(self.params, dict), "loss.params must be a mapping of keyword arguments")
        require(isinstance(self.miner_params, dict), "loss.miner_params must be a mapping of keyword arguments")
        require(isinstance(self.plus_params, dict), "loss.plus_params must be a mapping of keyword arguments")
        if self.plus is not None:
            require(self.plus in LOSSES, f"loss.plus: expected one of {list(LOSSES)}, got {self.plus!r}")
            require(self.plus != self.name, f"loss.plus repeats loss.name ({self.name}); raise its weight instead")
            require(
                LOSSES[self.plus].miner == "none",
                f"loss.plus={self.plus} learns from mined tuples; the added loss runs without a miner "
                "(a proxy / class-weight loss or contrastive)",
            )
            require(self.plus_weight > 0, f"loss.plus_weight must be > 0, got {self.plus_weight}")
        else:
            require(not self.plus_params, "loss.plus_params given without loss.plus")
        require(self.name in LOSSES, f"loss.name: expected one of {list(LOSSES)}, got {self.name!r}")
        require(
            self.miner is None or self.miner in MINERS,
            f"loss.miner: expected one of {list(MINERS)}, got {self.miner!r}",
        )
        entry = LOSSES[self.name]
        require(
            self.margin is None or entry.margin,
            f"loss.margin does not apply to {self.name}; set its parameters in loss.params "
            "(e.g. pos_margin/neg_margin for contrastive, base for multi_similarity)",
        )
        require(
            not entry.proxies or self.miner_name == "none",
            f"loss {self.name} learns from proxies, not mined tuples; set loss.miner=none",
        )
        require(self.memory >= 0, f"loss.memory must be >= 0 embeddings (0: off), got {self.memory}")
        require(self.memory_weight > 0, f"loss.memory_weight must be > 0, got {self.memory_weight}")
        require(
            not (self.memory and entry.proxies),
            f"loss.memory applies to tuple losses; {self.name} learns from proxies (set loss.memory=0)",
        )

    @property
    def miner_name(self) -> str:
        """The miner that runs: ``miner``, or the loss's default when it is null."""
        return self.miner or LOSSES[self.name].miner


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule.

    Three parameter groups: the backbone (``lr``), the head (``head_lr``, default ``lr``) and the loss's own
    parameters (proxies, class weights: ``loss_lr``, no weight decay). Norm and bias parameters get no
    weight decay. The first ``frozen_warmup_epochs`` train only the head and the loss (backbone frozen, at
    constant lr); then a linear warm-up over ``warmup_epochs`` and cosine decay to ``min_lr_ratio`` × lr.
    ``grad_clip``: clip the gradient norm (null: no clipping).
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    head_lr: float | None = None
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    loss_lr: float = 1e-2
    frozen_warmup_epochs: int = 0
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        require(self.lr > 0 and self.loss_lr > 0, "optim.lr and optim.loss_lr must be > 0")
        require(self.head_lr is None or self.head_lr > 0, "optim.head_lr must be > 0 or null")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        require(self.frozen_warmup_epochs >= 0, "optim.frozen_warmup_epochs must be >= 0")
        require(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip must be > 0 or null")


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Trainer settings. ``precision='auto'``: bf16-mixed (or 16-mixed) on GPU, 32-true on CPU.

    ``select``: which epoch's model the run keeps when it has validation classes: the best by validation
    ``recall_at_1`` or ``map_at_r`` (of the pooled features with ``model.embed_with: pooled``, of the head
    otherwise), or ``last`` (a fixed schedule; validation is then only recorded).
    Without validation classes the run keeps its last epoch. ``patience``: validations without a better
    selection metric before stopping (null: never stop early; must be null with ``select: last``).
    Weight averaging (``averaging.StepAveraging``; at most one): ``ema_half_life`` keeps an EMA of the weights
    with that half-life in epochs; ``average_last_epochs`` keeps the mean of the weights after every step
    of that many final epochs. Validation, checkpoints, the test evaluation and the export then use the
    averaged weights.
    """

    max_epochs: int = 20
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    precision: Precision = "auto"
    seed: int = 0
    select: Literal["recall_at_1", "map_at_r", "last"] = "map_at_r"
    patience: int | None = 5
    limit_train_batches: int | None = None  # batches per epoch cap (debugging); None: the sampler's length
    val_every: int = 1
    log_every_n_steps: int = 10
    threads: int | None = None  # CPU threads for torch (None: all cores)
    micro_batch: int | None = None  # forward/backward this many images at a time (CPU caches); None: whole batch
    progress_bar: bool = True
    ema_half_life: float | None = None  # epochs
    average_last_epochs: int | None = None

    def __post_init__(self) -> None:
        require(self.max_epochs >= 1, "trainer.max_epochs must be >= 1")
        require(self.ema_half_life is None or self.ema_half_life > 0, "trainer.ema_half_life must be > 0 (epochs)")
        require(
            self.average_last_epochs is None or 1 <= self.average_last_epochs <= self.max_epochs,
            "trainer.average_last_epochs must be between 1 and trainer.max_epochs",
        )
        require(
            self.ema_half_life is None or self.average_last_epochs is None,
            "set one of trainer.ema_half_life and trainer.average_last_epochs, not both",
        )
        require(self.val_every >= 1, "trainer.val_every must be >= 1")
        require(self.patience is None or self.patience >= 1, "trainer.patience must be >= 1 or null")
        require(self.select != "last" or self.patience is None, "trainer.patience must be null with select: last")
        require(self.log_every_n_steps >= 1, "trainer.log_every_n_steps must be >= 1")
        require(self.micro_batch is None or self.micro_batch >= 1, "trainer.micro_batch must be >= 1 or null")
        require(
            self.limit_train_batches is None or self.limit_train_batches >= 1,
            "trainer.limit_train_batches must be >= 1",
        )
        if isinstance(self.devices, str):
            require(
                self.devices == "auto" or self.devices.lstrip("-").isdigit() or "," in self.devices,
                "trainer.devices must be 'auto', a count or a comma-separated list of ids",
            )


@dataclass(frozen=True)
class OutConfig:
    """Where runs go: ``<dir>/<name>`` (name default: a timestamp and the loss name)."""

    dir: str = "runs/embedder"
    name: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything :func:`carsearch.embedder.training.run.train` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out: OutConfig = field(default_factory=OutConfig)

    def __post_init__(self) -> None:
        require(
            self.loss.memory == 0 or self.loss.memory >= self.data.batch_size,
            f"loss.memory ({self.loss.memory}) must hold at least one batch ({self.data.batch_size} images)",
        )


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from YAML (or defaults) with ``section.key=value`` overrides applied."""
    return load_dataclass(TrainConfig, path, overrides)
