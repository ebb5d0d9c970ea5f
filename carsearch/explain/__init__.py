"""GradCAM for embeddings: where the embedder looks, as pictures and as attention-in-box numbers."""

from carsearch.explain.attention import AttentionSummary, energy_in_box, photo_attention
from carsearch.explain.cam import METHODS, EmbeddingCAM, SimilarityTarget, candidate_layers, find_target_layer
from carsearch.explain.explainer import Explainer
from carsearch.explain.geometry import cam_to_image, paste_into

__all__ = [
    "METHODS",
    "AttentionSummary",
    "EmbeddingCAM",
    "Explainer",
    "SimilarityTarget",
    "cam_to_image",
    "candidate_layers",
    "energy_in_box",
    "find_target_layer",
    "paste_into",
    "photo_attention",
]
