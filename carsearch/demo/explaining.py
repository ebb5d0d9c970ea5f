"""The GradCAM maps that follow a search: query ↔ a hit, and where each index's model looks in the whole photo.

They run after the answer is on the page (a chained event) and never in the search itself; the CAM model is
built on the first explanation (:attr:`carsearch.demo.backend.Side.explainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from carsearch.demo.backend import DemoBackend, Side
from carsearch.demo.handlers import CROP_MIN_SIDE, Caption, QueryState, fit
from carsearch.errors import CarSearchError
from carsearch.explain import photo_attention
from carsearch.explain.render import draw_box, overlay
from carsearch.pipeline.queries import QueryCars

PHOTO_MAX_SIDE = 640  # the whole-photo maps are shown at most this large (two side by side)


@dataclass
class ExplainOutput:
    """The maps of one search: query ↔ its first hit, and the whole photo per index with attention-in-box."""

    query_cam: Image.Image | None = None
    hit_cam: Image.Image | None = None
    cam_caption: str = ""
    attention: str = ""
    photo_cams: list[Caption] = field(default_factory=list)


def explain_hit(backend: DemoBackend, state: QueryState, index: int) -> tuple[Image.Image, Image.Image, str]:
    """GradCAM overlays of the query crop w.r.t. hit ``index`` and of that hit w.r.t. the query."""
    if state.crop is None or not 0 <= index < len(state.hits):
        raise CarSearchError("search first, then pick a result")
    if index in state.missing:
        raise CarSearchError("that result's image file is missing from the gallery: nothing to explain")
    hit_image, caption = state.hits[index]
    explainer = backend.main.explainer
    query_map, hit_map, _ = explainer.pair(state.crop, hit_image)
    pictures = (
        fit(overlay(state.crop, query_map), CROP_MIN_SIDE),
        fit(overlay(hit_image, hit_map), CROP_MIN_SIDE),
    )
    return *pictures, f"{explainer.method}: query ↔ {caption}"


def photo_cam(side: Side, cars: QueryCars, car: int, box_car: QueryCars | None) -> tuple[Image.Image, float | None]:
    """The side's own-embedding CAM over the whole photo (the crop's map pasted back) and its energy in the
    searched car's box (from ``box_car``, the main index's view, where that index crops)."""
    image, plan = cars.image, cars.plans[car - 1]
    detection = box_car.plans[0].detection if box_car is not None else None
    box = detection.box if detection is not None else None
    cam, share = photo_attention(side.explainer.heatmaps([cars.crop(car)])[0], plan.region, image.size, box)
    picture = fit(overlay(image, cam), max_side=PHOTO_MAX_SIDE)
    if box is not None:
        picture = draw_box(picture, box.scale(picture.width / image.width), label="car")
    return picture, share


def explain_search(backend: DemoBackend, state: QueryState) -> ExplainOutput:
    """The maps of the search ``state`` holds: the query against its first hit, then the whole photo per index
    (raw first, as the page lays them out); nothing when there was no search."""
    out = ExplainOutput()
    if state.crop is None or not state.views:
        return out
    if state.hits and 0 not in state.missing:
        out.query_cam, out.hit_cam, out.cam_caption = explain_hit(backend, state, 0)
    sides = {side.name: side for side in backend.sides}
    _, main_cars, main_car = state.views[0]
    searched = QueryCars(main_cars.image, main_cars.scale, (main_cars.plans[main_car - 1],))
    lines = []
    for name, cars, car in reversed(state.views):
        same = cars.image.size == main_cars.image.size
        picture, share = photo_cam(sides[name], cars, car, searched if same else None)
        out.photo_cams.append((picture, f"{name} index: where the model looks"))
        if share is not None:
            lines.append(f"{name}: **{share:.0%}** of the attention inside the car box")
    out.attention = "Attention-in-box — " + "; ".join(lines) if lines else "Attention-in-box: no car box known."
    return out
