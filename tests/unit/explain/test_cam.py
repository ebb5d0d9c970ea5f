"""CAMs of embeddings: the constructed quadrant model, target layers, gradients, methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from carsearch.embedder import Embedder, EmbeddingModel, default_spec
from carsearch.errors import ExplainError
from carsearch.explain import EmbeddingCAM, Explainer, SimilarityTarget, energy_in_box, find_target_layer
from carsearch.explain.cam import METHODS, Unnormalised
from carsearch.types import BBox
from tests.conftest import make_car_image
from tests.unit.explain.conftest import QuadrantModel

TOP_LEFT, BOTTOM_RIGHT = BBox(0, 0, 32, 32), BBox(32, 32, 64, 64)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cam_energy_concentrates_where_the_embedding_looks(quadrant_model: QuadrantModel, method: str) -> None:
    batch = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = EmbeddingCAM(quadrant_model, method, target_layer="backbone").maps(batch)  # type: ignore[arg-type]
    assert maps.shape == (4, 64, 64) and maps.dtype == np.float32
    for cam in maps:
        assert energy_in_box(cam, TOP_LEFT) > 0.8  # a uniform map scores 0.25; the rest leaks over the edge
        assert energy_in_box(cam, BOTTOM_RIGHT) < 0.02


def test_explainer_maps_back_to_each_image_size(quadrant_model: QuadrantModel) -> None:
    """Non-square images are squashed into the square: the looked-at quadrant stays the top-left one."""
    explainer = Explainer(Embedder(quadrant_model, channels_last=False), target_layer="backbone", batch_size=2)
    images = [make_car_image(i, (200, 30, 30), size=(160 + 40 * i, 90)) for i in range(3)]
    maps = explainer.heatmaps(images)
    for image, cam in zip(images, maps, strict=True):
        w, h = image.size
        assert cam.shape == (h, w)
        assert energy_in_box(cam, BBox(0, 0, w / 2, h / 2)) > 0.8
        assert energy_in_box(cam, BBox(w / 2, h / 2, w, h)) < 0.05


def test_pair_explains_each_side_against_the_other(quadrant_model: QuadrantModel) -> None:
    explainer = Explainer(Embedder(quadrant_model, channels_last=False), target_layer="backbone")
    a, b = make_car_image(1, (200, 30, 30)), make_car_image(2, (30, 30, 200))
    query_map, result_map, score = explainer.pair(a, b)
    vectors = explainer.embedder.embed([a, b])
    assert score == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
    assert query_map.shape == (120, 160) and result_map.shape == (120, 160)
    assert not np.allclose(query_map, result_map)


def test_self_similarity_target_has_a_gradient(quadrant_model: QuadrantModel) -> None:
    """The projection target keeps a gradient at the image's own embedding (cosine's vanishes there)."""
    x = torch.rand(1, 3, 64, 64)
    out = Unnormalised(quadrant_model)(x)[0]
    SimilarityTarget(out.detach())(out).backward()
    grads = [p.grad for p in quadrant_model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_eigencam_needs_no_gradients(quadrant_model: QuadrantModel) -> None:
    with torch.no_grad():
        maps = EmbeddingCAM(quadrant_model, "eigencam", target_layer="backbone").maps(torch.rand(2, 3, 64, 64))
    assert maps.shape == (2, 64, 64) and maps.max() > 0
    assert all(p.grad is None for p in quadrant_model.parameters())


def test_gradcam_leaves_no_gradients_and_works_with_frozen_weights(quadrant_model: QuadrantModel) -> None:
    for p in quadrant_model.parameters():
        p.requires_grad_(False)
    maps = EmbeddingCAM(quadrant_model, "gradcam", target_layer="backbone").maps(torch.rand(2, 3, 64, 64))
    assert maps.max() > 0.5
    assert all(p.grad is None for p in quadrant_model.parameters())


def test_references_must_match_the_batch(quadrant_model: QuadrantModel) -> None:
    cam = EmbeddingCAM(quadrant_model, "gradcam", target_layer="backbone")
    with pytest.raises(ExplainError, match="one reference embedding per image"):
        cam.maps(torch.rand(2, 3, 64, 64), np.zeros((3, 16), dtype=np.float32))


@pytest.mark.parametrize(("backbone", "layer"), [("tf_efficientnet_lite0", "bn2"), ("resnet18", "layer4")])
def test_target_layer_found_for_timm_backbones(backbone: str, layer: str) -> None:
    model = EmbeddingModel(default_spec(backbone, image_size=64), pretrained=False)
    assert find_target_layer(model) is model.backbone.get_submodule(layer)


def test_target_layer_found_for_convnext() -> None:
    model = EmbeddingModel(default_spec("convnext_atto", image_size=64), pretrained=False)
    assert find_target_layer(model) is model.backbone.stages
    maps = EmbeddingCAM(model).maps(torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, 64, 64)


def test_unsupported_backbone_lists_candidate_layers(quadrant_model: QuadrantModel) -> None:
    with pytest.raises(ExplainError, match=r"no automatic CAM layer for backbone Sequential.*backbone\.2"):
        find_target_layer(quadrant_model)
    with pytest.raises(ExplainError, match="no layer 'backbone.9'.*candidates"):
        find_target_layer(quadrant_model, "backbone.9")


def test_unknown_method_is_refused(quadrant_model: QuadrantModel) -> None:
    with pytest.raises(ExplainError, match="valid methods: gradcam, gradcam\\+\\+, eigencam"):
        EmbeddingCAM(quadrant_model, "scorecam", target_layer="backbone")  # type: ignore[arg-type]


def test_unnormalised_falls_back_to_forward() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(2, 3, 2, 2)
    assert torch.equal(Unnormalised(model)(x), model(x))
