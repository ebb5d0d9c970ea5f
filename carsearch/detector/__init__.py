"""Stage 1: find vehicles (YOLO). Which box to crop is decided below, in ``carsearch.data.selection``."""

from carsearch.detector.yolo import VehicleDetector, resolve_vehicle_classes

__all__ = ["VehicleDetector", "resolve_vehicle_classes"]
