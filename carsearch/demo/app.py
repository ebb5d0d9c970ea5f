"""The Gradio app: layout and wiring only; the work happens in :mod:`carsearch.demo.handlers` (search),
:mod:`carsearch.demo.explaining` (maps) and :mod:`carsearch.demo.api` (the JSON API on the same server).

A search answers first (box, crop, hits); its GradCAM maps follow in a chained event. Searches from the page
and the API share one batched queue (:mod:`carsearch.demo.searching`); explanations run one at a time.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from carsearch.demo.api import api_router
from carsearch.demo.backend import MAX_BATCH, MAX_K, MAX_UPLOAD_BYTES, DemoBackend, release_memory
from carsearch.demo.explaining import explain_hit, explain_search
from carsearch.demo.handlers import QueryState, SearchOutput, pick_car, search
from carsearch.errors import CarSearchError

TITLE = "carsearch — find similar cars"
INTRO = (
    "Upload a car photo (or take one with the webcam, or paste one). A YOLO detector finds the cars and numbers "
    "them (1 = the largest, searched by default: click another box or pick its number to search it); the "
    "embedder embeds that car's crop and the index returns the most similar cars. GradCAM maps follow: where the "
    "model looks; *attention-in-box* is the share of that attention that falls on the car. JSON API: "
    "`POST /api/v1/search` (see docs/demo.md)."
)

IMAGE_HEIGHT = 220
ANNOTATED_HEIGHT = 320
GALLERY_HEIGHT = 260
PHOTO_CAMS_HEIGHT = "auto"  # the whole-photo maps grow to show both pictures whole (a fixed height clipped them)
QUEUE_SIZE = 512  # queued page events; beyond it a user is told the demo is busy (the API queue is unbounded)
STATE_TTL_S = 1800  # a session's last search (pictures) is dropped after this long


def upload_path(payload: Any) -> str | None:
    """The uploaded file's path in Gradio's cache, from an image payload (dict or ``FileData``)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    if isinstance(payload, str):
        return payload
    return getattr(payload, "path", None)


def car_number(payload: Any) -> int | None:
    """The car radio's raw value (an int, its text or None)."""
    try:
        return int(payload) if payload not in (None, "") else None
    except (TypeError, ValueError):
        return None


class PageHandlers:
    """The page's event handlers, bound to one loaded backend (Gradio reads their signatures)."""

    def __init__(self, backend: DemoBackend) -> None:
        self.backend = backend

    def search(self, upload: Any, k: float, confidence: float, car: Any = None) -> tuple[Any, ...]:
        """One value per output of the search event (see :func:`build_app`); the maps are cleared, the chained
        explain event fills them.

        The event runs with ``preprocess=False``: ``upload`` is Gradio's file payload, not a decoded image,
        so a file Gradio cannot decode still reaches :func:`search`, which explains what is wrong with it.
        """
        return self._answer(search(self.backend, upload_path(upload), int(k), float(confidence), car_number(car)))

    def search_car(
        self, upload: Any, k: float, confidence: float, car: Any, last: QueryState | None
    ) -> tuple[Any, ...]:
        """Another car of the searched photo (picked in the list or on the picture): the cars shown are reused."""
        number = car_number(car)
        return self._answer(search(self.backend, upload_path(upload), int(k), float(confidence), number, last))

    def _answer(self, out: SearchOutput) -> tuple[Any, ...]:
        if out.error:
            gr.Warning(out.error)
        cars = gr.Radio(choices=[(str(n), n) for n in out.cars], value=out.car)
        cleared: tuple[Any, ...] = (None, None, "", "", [])
        return (out.message, out.annotated, out.crop, out.hits, out.raw_hits, cars, out.state, *cleared)

    def explain(self, state: QueryState) -> tuple[Any, ...]:
        """The maps of the last search: query ↔ first hit, the whole photo per index, attention-in-box."""
        out = explain_search(self.backend, state)
        release_memory()  # the backward pass's buffers
        return out.query_cam, out.hit_cam, out.cam_caption, out.attention, out.photo_cams

    def select(self, state: QueryState, event: gr.SelectData) -> tuple[Any, Any, str]:
        """A result picked in the gallery: GradCAM of the query against it, and of it against the query."""
        try:
            return explain_hit(self.backend, state, int(event.index))
        except CarSearchError as exc:
            gr.Warning(str(exc))
            return None, None, str(exc)

    def pick(self, state: QueryState, event: gr.SelectData) -> Any:
        """A click on the picture: the car under it becomes the car to search (the chained search follows)."""
        x, y = event.index
        number = pick_car(state, float(x), float(y))
        if number is None:
            raise gr.Error("Click inside a numbered box to search that car.", print_exception=False)
        return gr.Radio(value=number)

    def new_photo(self) -> Any:
        """A new photo: no car numbers until it is searched (then the largest is car 1)."""
        return gr.Radio(choices=[], value=None)


def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page: query panel on the left; cars, crop, results, raw-vs-cropped and GradCAM on the right."""
    raw = backend.raw is not None
    handlers = PageHandlers(backend)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        state = gr.State(QueryState(), time_to_live=STATE_TTL_S)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.Image(
                    type="filepath", sources=["upload", "webcam", "clipboard"], label="Car photo", elem_id="query"
                )
                k = gr.Slider(1, MAX_K, value=5, step=1, label="Top-k results", elem_id="top-k")
                confidence = gr.Slider(
                    0.05, 0.95, value=backend.default_confidence, step=0.05, label="Detector confidence"
                )
                car = gr.Radio(choices=[], label="Car to search (1 = the largest)", elem_id="car")
                button = gr.Button("Search", variant="primary", elem_id="search")
                examples = backend.examples()
                if examples:
                    gr.Examples([[path] for path in examples], inputs=[upload], label="Examples from the index")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    annotated = gr.Image(
                        label="Detected cars — click a box to search that car",
                        interactive=False,
                        height=ANNOTATED_HEIGHT,
                        elem_id="annotated",
                    )
                    crop = gr.Image(label="Embedded crop", interactive=False, height=IMAGE_HEIGHT, elem_id="crop")
                hits = gr.Gallery(
                    label="Top-k similar cars" + (" — cropped index" if raw else ""),
                    columns=5,
                    height=GALLERY_HEIGHT,
                    object_fit="contain",
                    elem_id="hits",
                )
                raw_hits = gr.Gallery(
                    label="Top-k — raw index (whole photos, same query): compare with the cropped results above",
                    columns=5,
                    height=GALLERY_HEIGHT,
                    object_fit="contain",
                    visible=raw,
                    elem_id="raw-hits",
                )
                gr.Markdown("### GradCAM — click a result to explain it")
                with gr.Row():
                    query_cam = gr.Image(
                        label="Query: where it matches", interactive=False, height=IMAGE_HEIGHT, elem_id="query-cam"
                    )
                    hit_cam = gr.Image(
                        label="Result: where it matches", interactive=False, height=IMAGE_HEIGHT, elem_id="hit-cam"
                    )
                cam_caption = gr.Markdown(elem_id="cam-caption")
                attention = gr.Markdown(elem_id="attention")
                photo_cams = gr.Gallery(
                    label="Whole photo: where each model looks (green: the searched car)",
                    columns=2,
                    height=PHOTO_CAMS_HEIGHT,
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="photo-cams",
                )
        _wire(handlers, upload, k, confidence, car, button, annotated, state, hits,
              answer=[status, annotated, crop, hits, raw_hits, car, state],
              maps=[query_cam, hit_cam, cam_caption, attention, photo_cams])  # fmt: skip
    return app


def _wire(
    handlers: PageHandlers,
    upload: gr.Image,
    k: gr.Slider,
    confidence: gr.Slider,
    car: gr.Radio,
    button: gr.Button,
    annotated: gr.Image,
    state: gr.State,
    hits: gr.Gallery,
    answer: list[Any],
    maps: list[Any],
) -> None:
    """Search (the button, a car picked in the list or on the picture) → answer; then → maps."""
    search_inputs = [upload, k, confidence, car]
    searching: dict[str, Any] = {
        "inputs": search_inputs,
        "outputs": answer + maps,
        "concurrency_id": "search",  # searches wait on the shared batched queue, not on each other
        "concurrency_limit": MAX_BATCH,
        "preprocess": False,  # the handler decodes the upload itself (bad files get a message, not a crash)
    }
    private: dict[str, Any] = {"api_name": "false", "api_visibility": "private"}  # gradio's api_name=False
    explaining: dict[str, Any] = {"inputs": [state], "outputs": maps, "concurrency_id": "explain", **private}
    button.click(handlers.search, api_name="search", **searching).then(handlers.explain, **explaining)
    picking = {**searching, "inputs": [*search_inputs, state]}
    car.input(handlers.search_car, **picking, **private).then(handlers.explain, **explaining)
    annotated.select(handlers.pick, inputs=[state], outputs=[car], **private).success(
        handlers.search_car, **picking, **private
    ).then(handlers.explain, **explaining)
    upload.change(handlers.new_photo, outputs=[car], queue=False, **private)
    hits.select(handlers.select, inputs=[state], outputs=maps[:3], concurrency_id="explain", **private)


def launch(
    backend: DemoBackend, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
) -> gr.Blocks:
    """Queue and serve the page and the JSON API (``/api/v1``); binds to loopback unless told otherwise."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(backend)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    examples = [os.path.abspath(p) for p in backend.examples()]
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        prevent_thread_lock=not block,
        allowed_paths=examples,  # the example files only, not their folders
        max_file_size=MAX_UPLOAD_BYTES,
        app_kwargs={"routes": api_router(backend).routes},  # the JSON API, before Gradio's own routes
        quiet=True,
    )
    return app
