"""From an image and what is known about it (detections, a ground-truth box) to the crops to embed."""

from __future__ import annotations

from PIL import Image

from carsearch.config import PipelineConfig
from carsearch.data.selection import crop_region, plan_crops
from carsearch.types import FLAG_DOWNSCALED, FLAG_GT_BOX, FLAG_RAW, BBox, CropPlan, Detection


def needs_detector(config: PipelineConfig, gt_box: BBox | None) -> bool:
    """Whether an image needs the detector: cropping, and no usable ground-truth box."""
    return config.crop and not (config.crop_source == "gt" and gt_box is not None)


def plan_image(
    config: PipelineConfig,
    width: int,
    height: int,
    detections: list[Detection] | None = None,
    gt_box: BBox | None = None,
    *,
    single: bool = False,
) -> list[CropPlan]:
    """Crop plans for one image (pixel coordinates of that image).

    Raw mode → the whole image. ``crop_source='gt'`` with a box → that box plus margin. Otherwise the
    detector's boxes by the selection policy (``single`` forces one crop, as for queries).
    """
    if not config.crop:
        return [CropPlan(region=None, detection=None, flags=(FLAG_RAW,))]
    det = config.detector
    if config.crop_source == "gt" and gt_box is not None:
        region = crop_region(gt_box.clip(width, height), width, height, det.margin)
        return [CropPlan(region=region, detection=None, flags=(FLAG_GT_BOX,))]
    policy = "largest" if single and det.selection == "all" else det.selection
    return plan_crops(
        detections or [],
        width,
        height,
        policy=policy,
        margin=det.margin,
        min_box_size=det.min_box_size,
        confidence=det.confidence,
        fallback_confidence=det.fallback_confidence,
    )


def apply_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """The pixels a plan selects (the whole image when it has no region)."""
    if plan.region is None:
        return image
    return image.crop(plan.region.to_int())


def plan_in_original(plan: CropPlan, scale: float) -> CropPlan:
    """A plan made on an image downscaled by ``scale`` (``limit_size``), in the original image's pixels.

    Flagged ``downscaled`` when ``scale < 1``: the crop was taken from the downscaled image.
    """
    if scale >= 1.0:
        return plan
    region = plan.region.scale(1.0 / scale) if plan.region is not None else None
    detection = plan.detection
    if detection is not None:
        detection = Detection(detection.box.scale(1.0 / scale), detection.score, detection.class_name)
    return CropPlan(region, detection, (*plan.flags, FLAG_DOWNSCALED))
