"""Stage outputs cached in the output directory, keyed by a digest of everything the stage depends on."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from carsearch.data.atomic import atomic_write_bytes, atomic_write_json
from carsearch.data.digest import json_digest

logger = logging.getLogger(__name__)


class StageCache:
    """Runs a stage unless its output for the same inputs is on disk; records status and wall time per stage."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "stages"
        self.log: list[dict[str, Any]] = []
        self._timings_file = self.root / "timings.json"
        self._timings: dict[str, float] = (
            json.loads(self._timings_file.read_text()) if self._timings_file.exists() else {}
        )

    def _record(self, name: str, status: str, seconds: float, output: Path) -> None:
        """Log a stage; a cached one reports the wall time it took when it was computed."""
        if status == "computed":
            self._timings[output.name] = round(seconds, 2)
            atomic_write_json(self._timings_file, self._timings)
        took = self._timings.get(output.name)
        self.log.append({"stage": name, "status": status, "seconds": took})
        logger.info("stage %-28s %s (%s s)", name, status, took)

    def path(self, name: str, key: Any, suffix: str) -> Path:
        return self.root / f"{name}-{json_digest(key)}{suffix}"

    def json(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        path = self.path(name, key, ".json")
        if path.exists():
            self._record(name, "cached", 0.0, path)
            return json.loads(path.read_text())
        tic = time.perf_counter()
        value = compute()
        atomic_write_json(path, value)
        self._record(name, "computed", time.perf_counter() - tic, path)
        return value

    def array(self, name: str, key: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(name, key, ".npy")
        if path.exists():
            self._record(name, "cached", 0.0, path)
            return np.load(path, allow_pickle=False)
        tic = time.perf_counter()
        value = np.asarray(compute())
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
        self._record(name, "computed", time.perf_counter() - tic, path)
        return value

    def file(self, name: str, path: Path, compute: Callable[[], Path]) -> Path:
        """A stage whose output is one file at ``path`` (the caller puts the key in the path)."""
        if path.exists():
            self._record(name, "cached", 0.0, path)
            return path
        tic = time.perf_counter()
        compute()
        self._record(name, "computed", time.perf_counter() - tic, path)
        return path
