"""A training run's ``metrics.json``: :class:`RunMetrics`, the only code that writes or reads that file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from carsearch.data.atomic import atomic_write_json

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class RunMetrics:
    """What a run measured and chose. Metrics dicts are ``RetrievalMetrics.flat()``; ``test`` / ``zero_shot``
    are of the exported embedding (``embedding["name"]``: ``head`` or ``pooled``); ``val`` holds the best and
    final validation epochs and the history; ``checkpoint`` is the selected Lightning checkpoint. Files written
    by older runs may lack fields: they read as their defaults."""

    test: dict[str, Any] | None = None
    zero_shot: dict[str, Any] = field(default_factory=lambda: {"val": None, "test": None})
    embedding: dict[str, Any] = field(default_factory=dict)
    selected_by: str = ""
    selected_epoch: int | None = None
    val: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    averaging: dict[str, Any] | None = None
    epochs: int = 0
    global_steps: int = 0
    images: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_name(self) -> Literal["head", "pooled"] | None:
        """The embedding the run exports (``head`` / ``pooled``), or None when it did not record one."""
        name = self.embedding.get("name")
        return "head" if name == "head" else "pooled" if name == "pooled" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``run_dir/metrics.json`` atomically; its path."""
        path = Path(run_dir) / METRICS_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunMetrics | None:
        """The run's metrics, or None when it has no ``metrics.json`` (still training, or killed)."""
        path = Path(run_dir) / METRICS_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
