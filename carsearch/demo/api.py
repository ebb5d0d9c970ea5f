"""The plain HTTP JSON API, served by the demo's own app (Gradio runs on FastAPI).

- ``POST /api/v1/search?k=5&car=N`` with a multipart image file ``image``: every car found (numbered, 1 = the
  largest), the car searched and its hits, as JSON. Same queue as the page's searches (batched), no maps.
- ``GET /api/v1/items/{item_id}/thumbnail``: a JPEG thumbnail of an indexed item (an id from a search's hits;
  never a path from the request).

Limits as for the page's uploads: ``MAX_UPLOAD_BYTES`` per file (413), the decoder's pixel guard (413), not an
image (415), a broken or too small image (400 / 422), a bad ``k`` or ``car`` (422); every error is JSON
``{"error": "one line"}``, never a 500 for a bad file.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from carsearch.data.images import decode_image
from carsearch.demo.backend import MAX_UPLOAD_BYTES, DemoBackend
from carsearch.demo.searching import CarSearch, SearchRequest, batcher_for, waited
from carsearch.errors import CarSearchError, ImageLoadError, ImageProblem
from carsearch.pipeline.cam_jobs import load_item_crop

PREFIX = "/api/v1"
THUMBNAIL_SIDE = 256


def error(status: int, message: str) -> JSONResponse:
    """The API's one error shape."""
    return JSONResponse({"error": message}, status_code=status)


IMAGE_ERROR_STATUS: dict[ImageProblem, int] = {"too_large": 413, "not_image": 415, "too_small": 422, "unreadable": 400}


def image_error_status(exc: ImageLoadError) -> int:
    """The HTTP status of an unusable upload, by why it is unusable (``ImageLoadError.kind``)."""
    return IMAGE_ERROR_STATUS[exc.kind]


def answer_json(answer: CarSearch) -> dict[str, Any]:
    """The search's JSON: boxes in the uploaded photo's pixels ``[x1, y1, x2, y2]``."""
    main = answer.main
    scale = main.cars.scale
    cars = [
        {"number": n, "box": [round(v, 1) for v in plan.detection.box.scale(1 / scale).as_list()],
         "score": round(plan.detection.score, 4), "class": plan.detection.class_name}
        for n, plan in enumerate(main.cars.plans, start=1)
        if plan.detection is not None
    ]  # fmt: skip
    hits = [
        {"rank": h.rank, "score": round(h.score, 6), "label": h.label, "item_id": h.item_id,
         "box": h.metadata.get("box"), "thumbnail": f"{PREFIX}/items/{h.item_id}/thumbnail"}
        for h in main.hits
    ]  # fmt: skip
    return {
        "cars": cars,
        "car": main.car if cars else None,
        "hits": hits,
        "timings_ms": {name: round(ms, 1) for name, ms in answer.timings_ms.items()},
    }


def api_router(backend: DemoBackend) -> APIRouter:
    """The API's routes over ``backend`` (mounted by :func:`carsearch.demo.app.launch`)."""
    router = APIRouter(prefix=PREFIX)

    @router.post("/search")
    async def search(request: Request, image: UploadFile | None = None, k: int = 5, car: int | None = None) -> Response:
        """Search with car ``car`` (default: the largest) of the uploaded photo; ``k`` hits."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_UPLOAD_BYTES + 64 * 1024:  # the form's own bytes on top of the file's
            return error(413, f"upload too large: {declared} bytes > {MAX_UPLOAD_BYTES} bytes")
        if image is None:
            return error(422, "send the photo as a multipart file field named 'image'")
        data = await image.read(MAX_UPLOAD_BYTES + 1)
        await image.close()
        if len(data) > MAX_UPLOAD_BYTES:
            return error(413, f"file too large: more than {MAX_UPLOAD_BYTES} bytes")
        try:
            photo = await run_in_threadpool(lambda: backend.prepare(decode_image(data)))
        except ImageLoadError as exc:
            return error(image_error_status(exc), str(exc))
        tic = asyncio.get_running_loop().time()
        try:
            query = SearchRequest(photo, k, None, car)
            answer: CarSearch = await asyncio.wrap_future(batcher_for(backend).submit(query))
        except CarSearchError as exc:
            return error(422, str(exc))
        return JSONResponse(answer_json(waited(answer, (asyncio.get_running_loop().time() - tic) * 1000)))

    @router.get("/items/{item_id}/thumbnail")
    async def thumbnail(item_id: int) -> Response:
        """A JPEG of indexed item ``item_id`` as it was embedded (its crop), at most 256 px a side."""
        gallery = backend.main.gallery
        if not 0 <= item_id < len(gallery):
            return error(404, f"no item {item_id} in the index (ids 0–{len(gallery) - 1})")
        try:
            data = await run_in_threadpool(_thumbnail_bytes, gallery.records[item_id].to_dict())
        except CarSearchError as exc:
            return error(404, f"item {item_id}'s image cannot be read: {exc}")
        return Response(data, media_type="image/jpeg")

    return router


def _thumbnail_bytes(record: dict[str, Any]) -> bytes:
    picture = load_item_crop(record)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
