"""Softmax layer and the shared softmax functions: forward against a loop reference, gradients, in-place."""
import math

import numpy as np
import pytest

from framework.blob import Blob
from framework.errors import LayerError
from gradient_check import check_gradient, layer_from_text, make_blob
from layers.softmax import softmax, softmax_backward


def ref_softmax(x, axis):
    """Plain-loop softmax along ``axis`` (max subtracted, as Caffe does)."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, axis, -1)
    out = np.empty_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx]
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        total = sum(exps)
        out[idx] = [e / total for e in exps]
    return np.moveaxis(out, -1, axis)


def run(layer_text, x, dtype=np.float64):
    layer = layer_from_text(layer_text)
    bottom = [make_blob(x, dtype=dtype)]
    top = [Blob()]
    top[0].set_dtype(dtype)
    layer.setup_layer(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


@pytest.mark.parametrize("shape,axis", [((2, 3, 2, 3), 1), ((1, 4), 1), ((3, 2, 5), -1),
                                        ((4, 3), 0), ((2, 1, 3), 1), ((2, 3, 4), 2)])
def test_forward_matches_reference(shape, axis):
    x = np.random.default_rng(0).standard_normal(shape) * 3
    _, _, top = run(f'type: "Softmax" softmax_param {{ axis: {axis} }}', x)
    np.testing.assert_allclose(top[0].data, ref_softmax(x, axis), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(top[0].data.sum(axis=axis), 1.0, rtol=1e-12)


def test_default_axis_is_channels():
    x = np.random.default_rng(1).standard_normal((2, 3, 2))
    _, _, top = run('type: "Softmax"', x)
    np.testing.assert_allclose(top[0].data, ref_softmax(x, 1), rtol=1e-12)


def test_float32_stays_float32_and_is_stable_for_huge_inputs():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]], dtype=np.float32)
    _, _, top = run('type: "Softmax"', x, dtype=np.float32)
    assert top[0].data.dtype == np.float32
    assert np.all(np.isfinite(top[0].data))
    np.testing.assert_allclose(top[0].data, ref_softmax(x, 1), rtol=1e-6)
    np.testing.assert_allclose(top[0].data[1], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", [((2, 3, 2), 1), ((1, 4), 1), ((2, 2, 3), -1), ((3, 2), 0)])
def test_gradient(shape, axis):
    x = np.random.default_rng(2).standard_normal(shape)
    layer = layer_from_text(f'type: "Softmax" softmax_param {{ axis: {axis} }}')
    check_gradient(layer, [make_blob(x)], [Blob()])


def test_backward_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3))
    dy = rng.standard_normal((2, 4, 3))
    layer, bottom, top = run('type: "Softmax"', x)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    y = ref_softmax(x, 1)
    expected = np.empty_like(x)
    for n in range(2):
        for s in range(3):
            dot = sum(dy[n, c, s] * y[n, c, s] for c in range(4))
            for c in range(4):
                expected[n, c, s] = (dy[n, c, s] - dot) * y[n, c, s]
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-12, atol=1e-15)


def test_in_place_matches_out_of_place():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 2))
    dy = rng.standard_normal((3, 5, 2))
    layer, bottom, top = run('type: "Softmax"', x)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)

    blob = make_blob(x)
    inplace = layer_from_text('type: "Softmax"')
    inplace.setup_layer([blob], [blob])
    inplace.forward([blob], [blob])
    np.testing.assert_allclose(blob.data, top[0].data, rtol=1e-14)
    blob.diff[...] = dy
    inplace.backward([blob], [True], [blob])
    np.testing.assert_allclose(blob.diff, bottom[0].diff, rtol=1e-12, atol=1e-15)


def test_propagate_down_false_leaves_bottom_diff():
    layer, bottom, top = run('type: "Softmax"', np.ones((2, 3)))
    bottom[0].diff[...] = 7
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7)


def test_functions_in_place():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6))
    expected = ref_softmax(x, 1)
    buf = x.copy()
    assert softmax(buf, 1, out=buf) is buf
    np.testing.assert_allclose(buf, expected, rtol=1e-12)
    dy = rng.standard_normal((4, 6))
    want = softmax_backward(expected, dy.copy(), 1)
    got = dy.copy()
    softmax_backward(expected, got, 1, out=got)
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_axis_out_of_range_is_an_error():
    with pytest.raises(LayerError, match=r"softmax_param.axis 3"):
        run('name: "prob" type: "Softmax" softmax_param { axis: 3 }', np.ones((2, 3)))


def test_blob_counts_checked():
    layer = layer_from_text('type: "Softmax"')
    with pytest.raises(LayerError):
        layer.setup_layer([make_blob(np.ones((2, 3))), make_blob(np.ones((2, 3)))], [Blob()])
