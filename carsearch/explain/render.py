"""Pictures of CAMs: heat-map overlays, boxes, query | result panels, top-k grids, attention histograms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image

from carsearch.explain.attention import AttentionSummary
from carsearch.types import BBox

PANEL_HEIGHT = 224
CAPTION_HEIGHT = 40
BOX_COLOUR = (0, 255, 0)


def overlay(image: Image.Image, cam: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    """The image with its (H, W) CAM in [0, 1] blended on top as a jet heat map (same size as the image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if cam.shape != rgb.shape[:2]:
        raise ValueError(f"CAM shape {cam.shape} does not match the image ({rgb.shape[0]}, {rgb.shape[1]})")
    return Image.fromarray(show_cam_on_image(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=image_weight))


def draw_box(image: Image.Image, box: BBox, colour: tuple[int, int, int] = BOX_COLOUR, label: str = "") -> Image.Image:
    """A copy of the image with ``box`` outlined (line width scales with the image) and an optional label."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    draw.rectangle(box.as_list(), outline=colour, width=width)
    if label:
        font = ImageFont.load_default(size=max(10, round(max(out.size) / 40)))
        assert isinstance(font, ImageFont.FreeTypeFont)  # load_default(size=...) always returns a FreeType font
        x, y = box.x1 + width, max(0.0, box.y1 - font.size - 2 * width)
        draw.text((x, y), label, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return out


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def captioned(image: Image.Image, caption: str, height: int = PANEL_HEIGHT) -> Image.Image:
    """The image scaled to ``height`` px with a caption strip of up to two lines below it."""
    body = _fit_height(image, height)
    out = Image.new("RGB", (max(body.width, 160), height + CAPTION_HEIGHT), "white")
    out.paste(body, (0, 0))
    font = ImageFont.load_default(size=13)
    ImageDraw.Draw(out).multiline_text((4, height + 3), caption, fill="black", font=font, spacing=2)
    return out


def hstack(panels: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Panels side by side (top-aligned) on white."""
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + gap
    return out


def vstack(rows: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Rows one under another (left-aligned) on white."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height + gap
    return out


@dataclass(frozen=True)
class PairView:
    """What one query | result panel shows: both images with their CAM overlays, labels and the score."""

    query: Image.Image
    query_cam: np.ndarray
    result: Image.Image
    result_cam: np.ndarray
    score: float
    rank: int
    query_label: str | None = None
    result_label: str | None = None
    query_box: BBox | None = None  # the car's box in ``query`` pixels, when known: drawn on its CAM
    title: str = "query"  # first caption line of the query panels


def pair_panel(view: PairView, photos: bool = True) -> Image.Image:
    """query | query CAM | result CAM | result, captioned with rank, score and labels.

    ``photos=False``: only the two CAM panels (for pictures that must not show the photos).
    """
    match = ""
    if view.query_label is not None and view.result_label is not None:
        match = "  (same label)" if view.query_label == view.result_label else "  (other label)"
    result_caption = f"#{view.rank} score {view.score:.3f}{match}\n{view.result_label or 'unlabelled'}"
    query_cam = overlay(view.query, view.query_cam)
    if view.query_box is not None:
        query_cam = draw_box(query_cam, view.query_box, colour=(255, 255, 0))
    if not photos:
        return hstack(
            [
                captioned(query_cam, f"{view.title}: where it matches\n{view.query_label or ''}"),
                captioned(overlay(view.result, view.result_cam), result_caption),
            ]
        )
    return hstack(
        [
            captioned(view.query, f"{view.title}\n{view.query_label or ''}"),
            captioned(query_cam, f"{view.title}: where it matches"),
            captioned(overlay(view.result, view.result_cam), "result: where it matches"),
            captioned(view.result, result_caption),
        ]
    )


def topk_grid(views: Sequence[PairView], photos: bool = True) -> Image.Image:
    """One :func:`pair_panel` row per result."""
    if not views:
        raise ValueError("no results to draw")
    return vstack([pair_panel(v, photos) for v in views], gap=10)


def attention_plot(summaries: dict[str, AttentionSummary], path: str | Path, title: str = "") -> Path:
    """Histogram(s) of attention-in-box (one series per name) written as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(0.0, 1.0, len(next(iter(summaries.values())).histogram) + 1)
    for name, summary in summaries.items():
        share = np.array(summary.histogram, dtype=float) / max(1, summary.count)
        ax.stairs(share, bins, label=f"{name} (mean {summary.mean:.2f}, n={summary.count})", linewidth=2)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("share of CAM energy inside the car box")
    ax.set_ylabel("share of images")
    ax.set_title(title or "attention-in-box")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
