"""The Gradio app: layout and wiring only; the work happens in :mod:`carsearch.demo.handlers`."""

from __future__ import annotations

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


IMAGE_HEIGHT = 220
GALLERY_HEIGHT = 260


def upload_path(payload: Any) -> str | None:
    """The uploaded file's path in Gradio's cache, from an image payload (dict or ``FileData``)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    if isinstance(payload, str):
        return payload
    return getattr(payload, "path", None)


class PageHandlers:
    """The page's event handlers, bound to one loaded backend (Gradio reads their signatures)."""

    def __init__(self, backend: DemoBackend) -> None:
        self.backend = backend

    def search(self, upload: Any, k: float, confidence: float) -> tuple[Any, ...]:
        """One value per output component of the search event (see :func:`build_app`).

        The event runs with ``preprocess=False``: ``upload`` is Gradio's file payload, not a decoded image,
        so a file Gradio cannot decode still reaches :func:`search`, which explains what is wrong with it.
        """
        out: SearchOutput = search(self.backend, upload_path(upload), int(k), float(confidence))
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

    def select(self, state: QueryState, event: gr.SelectData) -> tuple[Any, Any, str]:
        """A result picked in the gallery: GradCAM of the query against it, and of it against the query."""
        try:
            return explain_hit(self.backend, state, int(event.index))
        except CarSearchError as exc:
            gr.Warning(str(exc))
            return None, None, str(exc)


def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page: query panel on the left, detection, results, raw-vs-cropped and GradCAM on the right."""
    raw = backend.raw is not None
    handlers = PageHandlers(backend)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        state = gr.State(QueryState())
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.Image(
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
                    annotated = gr.Image(
                        label="Detected car", interactive=False, height=IMAGE_HEIGHT, elem_id="annotated"
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
                    label="Whole photo: where each model looks (green: the detected car)",
                    columns=2,
                    height=GALLERY_HEIGHT,
                    object_fit="contain",
                    elem_id="photo-cams",
                )
        button.click(
            handlers.search,
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
            concurrency_id="model",  # search and explain share the model (and CAM hooks): one at a time
            preprocess=False,  # the handler decodes the upload itself (bad files get a message, not a crash)
        )
        hits.select(
            handlers.select,
            inputs=[state],
            outputs=[query_cam, hit_cam, cam_caption],
            api_name="false",  # what gradio makes of api_name=False, which its types no longer allow
            api_visibility="private",  # not in the API docs, not callable by clients
            concurrency_id="model",
        )
    return app


def launch(
    backend: DemoBackend, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
) -> gr.Blocks:
    """Queue (one model request at a time, others wait) and serve; binds to loopback unless told otherwise."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(backend)
    app.queue(default_concurrency_limit=1, max_size=64)
    examples = [os.path.abspath(p) for p in backend.examples()]
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        prevent_thread_lock=not block,
        allowed_paths=examples,  # the example files only, not their folders
        quiet=True,
    )
    return app
