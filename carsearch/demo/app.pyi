"""The Gradio app: layout and wiring only; the work happens in :mod:`carsearch.demo.handlers`."""

from __future__ import annotations

import functools
import os
from typing import Any

import gradio as gr

from carsearch.demo.handlers import DemoBackend, QueryState, SearchOutput, explain_hit, search
from carsearch.errors import CarSearchError

TITLE = "carsearch — find similar cars"
INTRO = (
    "Upload a car photo (or take one with the webcam, or paste one). A YOLO detector finds the car, the "
    "embedder embeds its crop and the index returns the most similar cars. GradCAM shows where the model "
    "looks; *attention-in-box* is the share of that attention that falls on the car."
)

class UploadedImage(gr.Image):
    """``gr.Image`` that passes a file Gradio cannot decode through as its path, so the handler explains why."""

    is_template = True  # rendered by the stock Image front end

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - any undecodable upload: the handler reports it
            return str(payload.path) if payload is not None and getattr(payload, "path", None) else None
    from collections.abc import Callable, Sequence
    from typing import TYPE_CHECKING, Any, Literal

    from gradio.blocks import Block

    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

def on_search(backend: DemoBackend, upload: str | None, k: float, confidence: float) -> tuple[Any, ...]:
    """Search handler for the page: one value per output component (see :func:`build_app`)."""
    out: SearchOutput = search(backend, upload, int(k), confidence)
    if out.error:
        gr.Warning(out.error)
    return (
        out.message,
        out.annotated,
        out.crop,
        out.hits,
        out.raw_hits,
        out.query_cam,
        out.hit_cam,
        out.cam_caption,
        out.attention,
        out.photo_cams,
        out.state,
    )

def on_select(backend: DemoBackend, state: QueryState, event: gr.SelectData) -> tuple[Any, Any, str]:
    """A result picked in the gallery: GradCAM of the query against it, and of it against the query."""
    try:
        return explain_hit(backend, state, int(event.index))
    except CarSearchError as exc:
        gr.Warning(str(exc))
        return None, None, str(exc)

def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page: query panel on the left, detection, results, raw-vs-cropped and GradCAM on the right."""
    raw = backend.raw is not None
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        state = gr.State(QueryState())
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = UploadedImage(
                    type="filepath", sources=["upload", "webcam", "clipboard"], label="Car photo", elem_id="query"
                )
                k = gr.Slider(1, 20, value=5, step=1, label="Top-k results", elem_id="top-k")
                confidence = gr.Slider(
                    0.05, 0.95, value=backend.default_confidence, step=0.05, label="Detector confidence"
                )
                button = gr.Button("Search", variant="primary", elem_id="search")
                examples = backend.examples()
                if examples:
                    gr.Examples([[path] for path in examples], inputs=[upload], label="Examples from the index")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    annotated = gr.Image(label="Detected car", interactive=False, elem_id="annotated")
                    crop = gr.Image(label="Embedded crop", interactive=False, elem_id="crop")
                with gr.Row():
                    hits = gr.Gallery(
                        label="Top-k similar cars" + (" — cropped index" if raw else ""),
                        columns=5,
                        height="auto",
                        elem_id="hits",
                    )
                    raw_hits = gr.Gallery(
                        label="Top-k — raw index (whole photos)",
                        columns=5,
                        height="auto",
                        visible=raw,
                        elem_id="raw-hits",
                    )
                gr.Markdown("### GradCAM — click a result to explain it")
                with gr.Row():
                    query_cam = gr.Image(label="Query: where it matches", interactive=False, elem_id="query-cam")
                    hit_cam = gr.Image(label="Result: where it matches", interactive=False, elem_id="hit-cam")
                cam_caption = gr.Markdown(elem_id="cam-caption")
                attention = gr.Markdown(elem_id="attention")
                photo_cams = gr.Gallery(
                    label="Whole photo: where each model looks", columns=2, height="auto", elem_id="photo-cams"
                )
        button.click(
            functools.partial(on_search, backend),
            inputs=[upload, k, confidence],
            outputs=[
                status,
                annotated,
                crop,
                hits,
                raw_hits,
                query_cam,
                hit_cam,
                cam_caption,
                attention,
                photo_cams,
                state,
            ],
            api_name="search",
        )
        hits.select(
            functools.partial(on_select, backend),
            inputs=[state],
            outputs=[query_cam, hit_cam, cam_caption],
            api_name=False,
        )
    return app

def launch(
    backend: DemoBackend, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
) -> gr.Blocks:
    """Queue (one request at a time per event, others wait) and serve; binds to loopback unless told otherwise."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(backend)
    app.queue(default_concurrency_limit=1, max_size=64)
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in backend.examples()})
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        prevent_thread_lock=not block,
        allowed_paths=folders,  # the example images only
        quiet=True,
    )
    return app
