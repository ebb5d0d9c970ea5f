"""ONNX export of an :class:`EmbeddingModel` and an onnxruntime session that embeds as the torch model does.

The graph takes the preprocessed (B, 3, S, S) float32 batch (dynamic B) and returns the model's (B, D)
output; the caller L2-normalises, as for torch. The model's spec and weights fingerprint are stored in the
file's metadata, so an ONNX file names the model it came from.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from carsearch.data.digest import json_digest
from carsearch.data.storage import cache_root
from carsearch.embedder.model import EmbeddingModel
from carsearch.errors import ModelLoadError

logger = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "embeddings"
INSTALL = "pip install onnx onnxruntime onnxscript (carsearch's own dependencies: reinstall carsearch)"


def export_onnx(model: EmbeddingModel, path: str | Path, fingerprint: str | None = None, opset: int = 18) -> Path:
    """Write ``model`` as ONNX (torch's dynamo exporter, dynamic batch), atomically; returns ``path``."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelLoadError(f"ONNX export needs the onnx packages: {INSTALL}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = model.spec.preprocessing.input_size
    example = torch.zeros(2, 3, height, width)
    model = copy.deepcopy(model).eval().cpu().to(memory_format=torch.contiguous_format)  # the caller's stays as is
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},),
        dynamo=True, opset_version=opset, verbose=False,
    )  # fmt: skip
    assert program is not None  # dynamo=True always returns an ONNXProgram
    proto = program.model_proto
    meta = {"carsearch_spec": json.dumps(model.spec.to_dict()), "carsearch_fingerprint": fingerprint or ""}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    logger.info("exported ONNX model (%dx%d px, dim %d) to %s", height, width, model.dim, path)
    return path


def onnxruntime_available() -> bool:
    """Whether onnxruntime and the exporter's packages (onnx, onnxscript) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def cache_dir() -> Path:
    """Where exported runtime models are kept: ``onnx/`` under :func:`~carsearch.data.storage.cache_root`."""
    return cache_root() / "onnx"


class OnnxRunner:
    """An onnxruntime session over the ONNX export of ``model``; exported once per weights and spec."""

    def __init__(self, model: EmbeddingModel, fingerprint: str, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"embedder.runtime=onnx needs onnxruntime: {INSTALL}") from exc
        spec = json_digest(model.spec.to_dict(), size=4)
        self.path = cache_dir() / f"{fingerprint}-{spec}.onnx"  # weights and spec (pooling has no weights)
        if not self.path.exists():
            export_onnx(model, self.path, fingerprint)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as configured for torch (runtime.threads)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, D) float32 (CPU)."""
        images = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: images})[0])
