"""The pipeline's frozen, validated configuration. Its YAML files are serialised instances of
:class:`PipelineConfig`, loaded by :func:`load_config` (files and overrides: :mod:`carsearch.config_files`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from carsearch.config_files import load_dataclass, require
from carsearch.errors import ConfigError

SelectionPolicy = Literal["largest", "most_confident", "all"]
CropSource = Literal["detector", "gt"]
IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
ResizeMode = Literal["squash", "center_crop"]  # how a crop becomes the model input

DEFAULT_VEHICLE_CLASSES = ("car", "truck", "bus")
DEFAULT_MODEL = "cars98-lite1-320"  # the shipped embedder (carsearch.embedder.zoo)
DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # timm name; offline ImageNet weights (carsearch.embedder.backbones)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # checked without torch; presence at run time
DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"


@dataclass(frozen=True)
class DetectorConfig:
    """YOLO detector settings. ``weights``: anything ultralytics loads (.pt, .onnx, .tflite).

    ``confidence``: the boxes the selection policy chooses from. ``fallback_confidence``: when no usable box
    reaches ``confidence``, crop the most confident one at or above this instead (flagged
    ``low_confidence``); null embeds the whole image (flagged ``no_detection``). The detector runs at the
    lower of the two (:attr:`detection_floor`). ``enlarge_small``: an image smaller than ``image_size`` on both
    sides is enlarged to fill the detector's input (ultralytics' letterbox); false, the default, pastes it at
    its own size on a grey canvas, where the detector finds small blurry cars more often (docs/results.md).
    """

    weights: str = "yolo11n.pt"
    classes: tuple[str, ...] = DEFAULT_VEHICLE_CLASSES
    confidence: float = 0.35  # with the fallback below: measured on the shared photos (docs/results.md)
    iou: float = 0.5
    image_size: int = 640
    margin: float = 0.0  # measured on the shared photos: every step of margin costs Recall@1 (docs/results.md)
    selection: SelectionPolicy = "largest"
    min_box_size: int = 16
    max_detections: int = 20
    fallback_confidence: float | None = 0.05
    enlarge_small: bool = False  # measured on the shared photos (docs/results.md)

    def __post_init__(self) -> None:
        require(0.0 <= self.confidence <= 1.0, "detector.confidence must be in [0, 1]")
        require(
            self.fallback_confidence is None or 0.0 <= self.fallback_confidence <= 1.0,
            "detector.fallback_confidence must be in [0, 1] or null",
        )
        require(0.0 <= self.iou <= 1.0, "detector.iou must be in [0, 1]")
        require(0.0 <= self.margin <= 1.0, "detector.margin must be in [0, 1]")
        require(self.image_size >= 32 and self.image_size % 32 == 0, "detector.image_size must be a multiple of 32")
        require(self.min_box_size >= 0, "detector.min_box_size must be >= 0")
        require(self.max_detections >= 1, "detector.max_detections must be >= 1")
        require(len(self.classes) >= 1, "detector.classes must name at least one class")

    @property
    def detection_floor(self) -> float:
        """The confidence the detector runs at: the lower of ``confidence`` and ``fallback_confidence``."""
        return min(self.confidence, self.fallback_confidence if self.fallback_confidence is not None else 1.0)


@dataclass(frozen=True)
class InputGeometry:
    """The embedder's input, shared by the inference (``embedder``) and training (``data``) configs:
    ``image_size`` high and as wide, or ``image_width`` wide (a non-square input, e.g. 160 × 320 for the
    2:1 shape of a typical car crop; ``resize=squash`` only); ``resize``: how a crop gets there (squash or
    centre crop)."""

    MIN_SIZE: ClassVar[int] = 32
    SECTION: ClassVar[str] = "embedder"

    image_size: int | None = None  # None: the backbone's (inference only)
    image_width: int | None = None  # None: square
    resize: ResizeMode = "squash"

    def __post_init__(self) -> None:
        section, low = self.SECTION, self.MIN_SIZE
        require(self.image_size is None or self.image_size >= low, f"{section}.image_size must be >= {low}")
        require(self.image_width is None or self.image_width >= low, f"{section}.image_width must be >= {low}")
        require(
            self.image_width in (None, self.image_size) or self.resize == "squash",
            f"{section}.image_width (a non-square input) needs {section}.resize=squash",
        )


@dataclass(frozen=True)
class EmbedderConfig(InputGeometry):
    """Embedder settings. ``model``: a shipped name (``carsearch.embedder.zoo``: ``cars98-lite1-320``, the
    default), a checkpoint path or URI (``carsearch export``), or ``imagenet``: the pretrained ``backbone``
    built from the fields below. A checkpoint carries its own backbone, head and input geometry
    (:class:`InputGeometry`); asking for another ``embedding_dim`` or ``image_size`` than it has is an
    error, and ``resize`` applies to ``imagenet`` only."""

    model: str = DEFAULT_MODEL
    backbone: str = DEFAULT_BACKBONE  # model=imagenet only, like pretrained and resize
    pretrained: bool = True
    embedding_dim: int | None = None
    batch_size: int | None = None  # images per pass; None: 4 on CPU with torch, 32 with onnx, 64 on CUDA
    channels_last: bool = True
    flip: bool = False  # flip test-time augmentation; an index built with it is queried with it (manifest)
    # auto: onnxruntime on CPU when it is installed (faster: docs/results.md), torch on CUDA; same vectors
    runtime: Literal["auto", "torch", "onnx"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.model.strip()), "embedder.model must name a model, a checkpoint path or a URI")
        require(self.batch_size is None or self.batch_size >= 1, "embedder.batch_size must be >= 1")
        require(self.embedding_dim is None or self.embedding_dim >= 1, "embedder.embedding_dim must be >= 1")


@dataclass(frozen=True)
class IndexConfig:
    """faiss settings (docs/indexes.md).

    ``kind='auto'``: exact ``flat`` below ``ivf_threshold`` items, ``ivfpq`` from ``pq_threshold`` on (PCA +
    IVF + 4-bit PQ codes, at most ``max_bytes_per_vector`` bytes of RAM per vector, half of it codes; the top
    ``rescore``·k candidates re-scored exactly from the vectors on disk), IVF-Flat (``ivf``) in between when
    ``pq_threshold`` > ``ivf_threshold`` (by default it is not: at 100k realistic vectors ivfpq matched
    IVF-Flat's recall at a fraction of its latency and RAM, docs/indexes.md). ``nprobe`` (IVF kinds) /
    ``ef_search`` (``hnsw``): None = the smallest reaching ``target_recall`` recall@10 against exact search
    on a held-out sample of the gallery's own vectors, chosen at build time and stored in the manifest; a
    number fixes it (also when opening an index).
    ``target_recall`` 0: no tuning (nprobe 16 / efSearch 64).
    """

    kind: IndexKind = "auto"
    ivf_threshold: int = 100_000
    pq_threshold: int = 100_000
    max_bytes_per_vector: int = 64
    target_recall: float = 0.95
    nprobe: int | None = None
    ef_search: int | None = None
    rescore: int = 50
    hnsw_m: int = 32
    use_gpu: bool = True

    def __post_init__(self) -> None:
        require(self.ivf_threshold >= 1 and self.pq_threshold >= 1, "index.ivf_threshold and pq_threshold must be >= 1")
        require(self.nprobe is None or self.nprobe >= 1, "index.nprobe must be >= 1 (or null: tuned)")
        require(self.ef_search is None or self.ef_search >= 1, "index.ef_search must be >= 1 (or null: tuned)")
        require(self.max_bytes_per_vector >= 16, "index.max_bytes_per_vector must be >= 16 (8 code + 8 id bytes)")
        require(0.0 <= self.target_recall <= 1.0, "index.target_recall must be in [0, 1]")
        require(self.rescore >= 1, "index.rescore must be >= 1")
        require(self.hnsw_m >= 2, "index.hnsw_m must be >= 2")


@dataclass(frozen=True)
class RetrievalConfig:
    """Post-processing of the faiss neighbours (all off by default; docs/reranking.md: which to use when).

    ``qe_k``: query expansion, the query averaged with its top ``qe_k`` hits and searched again (AQE;
    ``qe_alpha`` > 0 weights each hit by similarity^alpha, αQE). ``dba_k``: database-side augmentation,
    every gallery vector averaged with its top ``dba_k`` neighbours once, when the index is opened.
    ``kreciprocal``: k-reciprocal re-ranking (Zhong et al. 2017; ``k1``, ``k2``, ``lambda_value``) of the
    top ``candidates`` hits, so its cost does not grow with the gallery.
    """

    qe_k: int = 0
    qe_alpha: float = 0.0
    dba_k: int = 0
    dba_alpha: float = 0.0
    kreciprocal: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    candidates: int = 100

    def __post_init__(self) -> None:
        require(self.qe_k >= 0 and self.dba_k >= 0, "retrieval.qe_k and retrieval.dba_k must be >= 0")
        require(self.qe_alpha >= 0 and self.dba_alpha >= 0, "retrieval.qe_alpha and retrieval.dba_alpha must be >= 0")
        require(self.k1 >= 1 and self.k2 >= 1, "retrieval.k1 and retrieval.k2 must be >= 1")
        require(0.0 <= self.lambda_value <= 1.0, "retrieval.lambda_value must be in [0, 1]")
        require(self.candidates >= 2, "retrieval.candidates must be >= 2")

    @property
    def plain(self) -> bool:
        """True when search returns faiss's neighbours unchanged."""
        return not (self.qe_k or self.dba_k or self.kreciprocal)

    def describe(self) -> str:
        """Human-readable settings, e.g. ``"DBA (k 5, α 3) + AQE (k 2, α 3)"``; empty when plain."""
        parts = []
        if self.dba_k:
            parts.append(f"DBA (k {self.dba_k}, α {self.dba_alpha:g})")
        if self.qe_k:
            parts.append(f"AQE (k {self.qe_k}, α {self.qe_alpha:g})")
        if self.kreciprocal:
            parts.append(f"k-reciprocal re-ranking (k1 {self.k1}, k2 {self.k2}, λ {self.lambda_value:g})")
        return " + ".join(parts)


# Settings chosen by benchmarks/rerank.py on the tuning classes (the first 49 of the shared crops, zero-shot).
RERANK_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"qe_k": 0, "dba_k": 0, "kreciprocal": False},
    "aqe": {"qe_k": 2, "qe_alpha": 3.0},
    "dba": {"dba_k": 5, "dba_alpha": 3.0},
    "kreciprocal": {"kreciprocal": True, "k1": 20, "k2": 6, "lambda_value": 0.8},
}


def rerank_overrides(methods: str) -> list[str]:
    """``"aqe,kreciprocal"`` → ``retrieval.…=…`` overrides of the named presets (``RERANK_PRESETS``)."""
    out = []
    for name in (m.strip() for m in methods.split(",") if m.strip()):
        if name not in RERANK_PRESETS:
            raise ConfigError(f"unknown re-ranking {name!r}; valid: {', '.join(RERANK_PRESETS)} (comma-separated)")
        out += [f"retrieval.{key}={str(value).lower()}" for key, value in RERANK_PRESETS[name].items()]
    return out


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast: device ('auto', 'cpu', 'cuda', 'cuda:1'), decode workers, threads."""

    device: str = "auto"
    batch_size: int = 32  # images decoded and detected together by batch jobs
    workers: int = 2
    threads: int | None = None
    max_image_side: int = 1600
    checkpoint_every: int = 256

    def __post_init__(self) -> None:
        require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            f"runtime.device must be one of {DEVICE_NAMES}, got {self.device!r}",
        )
        require(self.batch_size >= 1, "runtime.batch_size must be >= 1")
        require(self.workers >= 0, "runtime.workers must be >= 0")
        require(self.max_image_side >= 64, "runtime.max_image_side must be >= 64")
        require(self.checkpoint_every >= 1, "runtime.checkpoint_every must be >= 1")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the detect → crop → embed → index pipeline needs."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    crop: bool = True
    crop_source: CropSource = "detector"


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict saved by an older carsearch (an index manifest), in today's keys and meaning:
    ``embedder.checkpoint`` became ``embedder.model`` (a null checkpoint meant the pretrained backbone:
    ``imagenet``); a detector without ``fallback_confidence`` embedded the whole image when nothing passed
    its confidence (null), and one without ``enlarge_small`` enlarged small images (true), whatever today's
    defaults."""
    embedder, detector = data.get("embedder"), data.get("detector")
    if isinstance(embedder, dict) and "checkpoint" in embedder:
        model = embedder["checkpoint"] or "imagenet"
        embedder = {k: v for k, v in embedder.items() if k != "checkpoint"}
        embedder.setdefault("model", model)
        data = {**data, "embedder": embedder}
    if isinstance(detector, dict):
        old = {"fallback_confidence": None, "enlarge_small": True}
        data = {**data, "detector": {**{k: v for k, v in old.items() if k not in detector}, **detector}}
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a :class:`PipelineConfig` from YAML (or defaults) and apply ``key=value`` overrides."""
    return load_dataclass(PipelineConfig, path, overrides)
