"""Stage 1: find vehicles (YOLO) and decide which region of each image to embed."""

from carsearch.detector.selection import crop_region, filter_small, plan_crops, select_detections
from carsearch.detector.yolo import VehicleDetector, resolve_vehicle_classes

__all__ = [
    "VehicleDetector",
    "crop_region",
    "filter_small",
    "plan_crops",
    "resolve_vehicle_classes",
    "select_detections",
]
