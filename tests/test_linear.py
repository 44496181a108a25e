"""models/linear.py: the weight-left route for few rows computes the same product as x @ W.T."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models import linear

WIDE = (2048, 512)  # 1M elements: large enough for the weight-left route


@pytest.fixture(params=[False, True], ids=["x@W.T", "W@x.T"])
def route(request, monkeypatch):
    """Run a test with the weight-left route off, then forced on (whatever BLAS is bound)."""
    monkeypatch.setattr(linear, "WEIGHT_LEFT", request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
def test_project_matches_float64_reference(route, rows):
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal(WIDE).astype(np.float32)
    x = rng.standard_normal((1, rows, WIDE[1])).astype(np.float32)
    assert linear.weight_left(rows, mx.array(weight)) == (route and 2 <= rows <= 8)
    ours = np.array(linear.project(mx.array(x), mx.array(weight)))
    reference = x.astype(np.float64) @ weight.T.astype(np.float64)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3)


def test_linear_with_bias_matches_mlx_linear(route):
    plain, ours = nn.Linear(*WIDE[::-1]), linear.Linear(*WIDE[::-1])
    ours.update(plain.parameters())
    x = mx.random.normal((2, 3, WIDE[1]), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(ours(x)), np.array(plain(x)), rtol=1e-4, atol=1e-4)


def test_small_weights_and_other_dtypes_keep_the_usual_product(monkeypatch):
    monkeypatch.setattr(linear, "WEIGHT_LEFT", True)
    assert not linear.weight_left(4, mx.zeros((512, 512)))
    assert not linear.weight_left(4, mx.zeros(WIDE, mx.bfloat16))


def test_quantized_layers_keep_their_own_product():
    assert isinstance(linear.Linear(*WIDE[::-1]).to_quantized(64, 4), nn.QuantizedLinear)
    quantized = nn.QuantizedEmbedding.from_embedding(nn.Embedding(*WIDE), 64, 4)
    h = mx.random.normal((1, 3, WIDE[1]), key=mx.random.key(1))
    np.testing.assert_array_equal(np.array(linear.tied_head(quantized, h)), np.array(quantized.as_linear(h)))


def test_route_follows_the_bound_blas():
    import cpu_blas

    assert linear.mkl_bound() == (cpu_blas.LOADED or "").startswith("libmkl")
