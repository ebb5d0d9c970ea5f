"""The progress bar of the batch commands (tqdm loads only when a bar is shown)."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar counting images (None when disabled): the one progress display of the batch commands."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
