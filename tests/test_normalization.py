"""Tests for layers/normalization.py: BatchNorm (every rule of caffe-semantics.md), LRN,
MVN, Scale and Bias — forward against slow references, gradients, in-place use, errors."""
import math

import numpy as np
import pytest

from framework.blob import Blob
from framework.errors import LayerError
from framework.random import set_random_seed
from gradient_check import check_gradient, layer_from_text, make_blob

TRAIN, TEST = 0, 1


def f32(v):
    """A prototxt float as the schema stores it (float32)."""
    return float(np.float32(v))


def inputs(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def run(text, xs, in_place=False, phase=TRAIN, dtype=np.float64):
    """Set up a layer on the arrays ``xs`` and run one forward; returns (layer, bottoms, top)."""
    layer = layer_from_text(text, phase)
    bottom = [make_blob(x, dtype) for x in xs]
    top = bottom[0] if in_place else Blob((), dtype=dtype)
    layer.setup_layer(bottom, [top])
    layer.reshape(bottom, [top])
    layer.forward(bottom, [top])
    return layer, bottom, top


# =============================================================== BatchNorm
def bn_reference(x, eps, mean=None, var=None):
    """Per-channel normalisation by slow loops; batch statistics unless mean/var given."""
    x = np.asarray(x, dtype=np.float64)
    channels = 1 if x.ndim == 1 else x.shape[1]
    x3 = x.reshape(x.shape[0], channels, -1)
    y3 = np.empty_like(x3)
    for c in range(channels):
        values = [float(v) for v in x3[:, c, :].ravel()]
        mu = sum(values) / len(values) if mean is None else mean[c]
        sigma2 = sum((v - mu) ** 2 for v in values) / len(values) if var is None else var[c]
        for n in range(x3.shape[0]):
            for s in range(x3.shape[2]):
                y3[n, c, s] = (x3[n, c, s] - mu) / math.sqrt(sigma2 + eps)
    return y3.reshape(x.shape)


BN_SHAPES = [(2, 3, 2, 3), (1, 3, 5, 7), (5, 4), (6,)]


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_forward_batch_stats(shape):
    x = inputs(shape) * 3 + 1
    layer, _, top = run('type: "BatchNorm"', [x], phase=TRAIN)
    np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5)), rtol=1e-10, atol=1e-12)


def test_batchnorm_blobs_shapes_zero_float32():
    layer, _, _ = run('type: "BatchNorm"', [inputs((2, 3, 2, 2))], phase=TEST)
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert all(b.dtype == np.float32 for b in layer.blobs)
    assert all(np.all(b.data == 0) for b in layer.blobs)  # TEST: global stats, no update


def test_batchnorm_moving_average_two_passes_exact():
    """s <- lambda*s + 1, M <- lambda*M + mu, V <- lambda*V + m/(m-1)*var over two forwards."""
    # channel 0 holds {1, 3, 5, 7}: mean 4, biased var 5; channel 1 holds {-2, -2, 2, 2}: mean 0, var 4
    x1 = np.array([[[[1.0, 3.0]], [[-2.0, 2.0]]], [[[5.0, 7.0]], [[-2.0, 2.0]]]])   # (2, 2, 1, 2)
    # second batch: channel 0 {0, 2, 0, 2}: mean 1, var 1; channel 1 {4, 4, 4, 4}: mean 4, var 0
    x2 = np.array([[[[0.0, 2.0]], [[4.0, 4.0]]], [[[0.0, 2.0]], [[4.0, 4.0]]]])
    layer = layer_from_text('type: "BatchNorm"', TRAIN)
    bottom, top = make_blob(x1, np.float32), Blob((), dtype=np.float32)
    layer.setup_layer([bottom], [top])
    layer.forward([bottom], [top])
    m_sum, v_sum, s = (b.data for b in layer.blobs)
    np.testing.assert_array_equal(s, [1.0])
    np.testing.assert_array_equal(m_sum, [4.0, 0.0])
    f = np.float32(4) / np.float32(3)  # m = N*H*W = 4
    np.testing.assert_array_equal(v_sum, [f * np.float32(5), f * np.float32(4)])

    bottom.data[...] = x2
    layer.forward([bottom], [top])
    lam = np.float32(0.999)
    np.testing.assert_array_equal(s, [lam * np.float32(1) + np.float32(1)])
    np.testing.assert_array_equal(m_sum, [lam * np.float32(4) + np.float32(1), np.float32(4)])
    np.testing.assert_allclose(v_sum, [lam * (f * np.float32(5)) + f * np.float32(1),
                                       lam * (f * np.float32(4))], rtol=1e-7)
    # the output always uses the batch statistics of the current batch
    np.testing.assert_allclose(top.data, bn_reference(x2, f32(1e-5)), rtol=1e-6, atol=1e-6)


def test_batchnorm_custom_fraction_and_eps():
    x = inputs((3, 2, 2, 2))
    layer, bottom, top = run('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.5 '
                             'eps: 0.1 }', [x], phase=TRAIN)
    np.testing.assert_allclose(top.data, bn_reference(x, f32(0.1)), rtol=1e-10)
    layer.forward(bottom, [top])
    assert layer.blobs[2].data[0] == pytest.approx(1.5)
    x3 = x.reshape(3, 2, -1)
    mu = x3.mean(axis=(0, 2))
    np.testing.assert_allclose(layer.blobs[0].data, 1.5 * mu, rtol=1e-6)


def test_batchnorm_unbiased_factor_only_in_stored_variance():
    x = inputs((3, 2, 2, 1), seed=4)
    layer, _, top = run('type: "BatchNorm"', [x], phase=TRAIN)
    m = 6
    biased = x.transpose(1, 0, 2, 3).reshape(2, -1).var(axis=1)
    np.testing.assert_allclose(layer.blobs[1].data, biased * m / (m - 1), rtol=1e-6)
    # the output normalises with the biased variance
    np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5)), rtol=1e-10)


def test_batchnorm_single_value_per_channel_factor_is_one():
    """m == 1: Caffe uses a correction factor of 1 (no division by zero)."""
    x = np.array([[3.0, -1.0, 0.5]])  # (N=1, C=3): one value per channel
    layer, _, top = run('type: "BatchNorm"', [x], phase=TRAIN)
    np.testing.assert_array_equal(layer.blobs[0].data, np.float32(x[0]))
    np.testing.assert_array_equal(layer.blobs[1].data, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(layer.blobs[2].data, [1.0])
    np.testing.assert_array_equal(top.data, np.zeros((1, 3)))


def test_batchnorm_scale_factor_zero_guard():
    """Global stats with s == 0: mean and variance are taken as 0, so y = x / sqrt(eps)."""
    x = inputs((2, 3, 2, 2))
    layer, _, top = run('type: "BatchNorm" batch_norm_param { use_global_stats: true }',
                        [x], phase=TRAIN)
    layer.blobs[0].data[...] = 5.0  # ignored while s == 0
    layer.blobs[1].data[...] = 7.0
    layer.forward([make_blob(x)], [top])
    assert np.all(np.isfinite(top.data))
    np.testing.assert_allclose(top.data, x / math.sqrt(f32(1e-5)), rtol=1e-6)


def test_batchnorm_global_stats_divide_by_scale_factor():
    x = inputs((2, 3, 2, 2))
    layer, bottom, top = run('type: "BatchNorm"', [x], phase=TEST)
    layer.blobs[0].data[...] = [2.0, -4.0, 1.0]
    layer.blobs[1].data[...] = [8.0, 2.0, 0.5]
    layer.blobs[2].data[...] = 4.0
    layer.forward(bottom, [top])
    mean = [0.5, -1.0, 0.25]
    var = [2.0, 0.5, 0.125]
    np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5), mean, var), rtol=1e-10)
    assert layer.blobs[2].data[0] == 4.0  # global statistics are never updated


@pytest.mark.parametrize("phase,explicit,expect_global", [
    (TEST, None, True), (TRAIN, None, False),
    (TEST, "false", False), (TRAIN, "true", True),
])
def test_batchnorm_use_global_stats_default_by_phase(phase, explicit, expect_global):
    text = 'type: "BatchNorm"'
    if explicit is not None:
        text += f' batch_norm_param {{ use_global_stats: {explicit} }}'
    x = inputs((2, 2, 2, 2)) + 3
    layer, _, top = run(text, [x], phase=phase)
    assert layer.use_global_stats is expect_global
    if expect_global:
        assert layer.blobs[2].data[0] == 0  # no update; fresh stats give y = x / sqrt(eps)
        np.testing.assert_allclose(top.data, x / math.sqrt(f32(1e-5)), rtol=1e-6)
    else:
        assert layer.blobs[2].data[0] == 1
        np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5)), rtol=1e-10)


def test_batchnorm_adds_lr_mult_zero_param_specs():
    layer, _, _ = run('name: "bn1" type: "BatchNorm"', [inputs((2, 3))])
    specs = layer.layer_param.param
    assert len(specs) == 3
    assert all(spec.lr_mult == 0 for spec in specs)


def test_batchnorm_keeps_existing_zero_specs_and_completes():
    layer, _, _ = run('name: "bn1" type: "BatchNorm" param { name: "m" lr_mult: 0 decay_mult: 0 }',
                      [inputs((2, 3))])
    specs = layer.layer_param.param
    assert len(specs) == 3
    assert specs[0].name == "m" and specs[0].decay_mult == 0
    assert [s.lr_mult for s in specs] == [0, 0, 0]


@pytest.mark.parametrize("params", [
    "param { lr_mult: 1 }",
    "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0.5 }",
    'param { name: "shared_mean" }',  # lr_mult defaults to 1
])
def test_batchnorm_refuses_learned_statistics(params):
    with pytest.raises(LayerError) as info:
        run(f'name: "bn_refuse" type: "BatchNorm" {params}', [inputs((2, 3))])
    message = str(info.value)
    assert "Cannot configure batch normalization statistics as layer parameters" in message
    assert "bn_refuse" in message


BN_MODES = [("TRAIN batch stats", 'type: "BatchNorm"', TRAIN),
            ("TEST global stats", 'type: "BatchNorm"', TEST)]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 3), (1, 2, 3, 1)])
@pytest.mark.parametrize("mode", [m[0] for m in BN_MODES])
def test_batchnorm_gradient(mode, shape, in_place):
    _, text, phase = next(m for m in BN_MODES if m[0] == mode)
    layer = layer_from_text(text, phase)
    bottom = make_blob(inputs(shape, seed=2) * 2 + 0.5)
    if phase == TEST:
        layer.setup_layer([bottom], [Blob(())])
        layer.blobs[0].data[...] = 0.3
        layer.blobs[1].data[...] = 1.7
        layer.blobs[2].data[...] = 0.9
    top = bottom if in_place else Blob(())
    analytic = check_gradient(layer, [bottom], [top], check_params=False, setup=phase == TRAIN)
    assert np.any(analytic[("bottom", 0)] != 0)


def test_batchnorm_backward_batch_formula_and_cached_norm():
    """dx = (dy - mean(dy) - mean(dy*y)*y) / sqrt(var+eps); works even if the top is clobbered
    (a later in-place layer, e.g. Scale, overwrites BatchNorm's top)."""
    x = inputs((3, 2, 2, 2), seed=6)
    dy = inputs((3, 2, 2, 2), seed=7)
    layer, bottom, top = run('type: "BatchNorm"', [x], in_place=True)
    y = bn_reference(x, f32(1e-5))
    top.data[...] = -99.0  # clobbered by a following in-place layer
    top.diff[...] = dy
    layer.backward([top], [True], bottom)
    expected = np.empty_like(x)
    for c in range(2):
        ys, dys = y[:, c], dy[:, c]
        std = math.sqrt(x[:, c].var() + f32(1e-5))
        expected[:, c] = (dys - dys.mean() - (dys * ys).mean() * ys) / std
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-9, atol=1e-12)


def test_batchnorm_in_place_forward_matches():
    x = inputs((2, 3, 3, 2))
    _, _, separate = run('type: "BatchNorm"', [x])
    _, bottom, top = run('type: "BatchNorm"', [x], in_place=True)
    assert top is bottom[0]
    np.testing.assert_array_equal(top.data, separate.data)


def test_batchnorm_float32_dtype():
    x = inputs((2, 3, 2, 2)).astype(np.float32)
    _, _, top = run('type: "BatchNorm"', [x], dtype=np.float32)
    assert top.data.dtype == np.float32
    np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5)), rtol=1e-5, atol=1e-5)


def test_batchnorm_preloaded_statistics():
    text = ('type: "BatchNorm" '
            'blobs { shape { dim: 2 } data: 1 data: 2 } '
            'blobs { shape { dim: 2 } data: 4 data: 8 } '
            'blobs { shape { dim: 1 } data: 2 }')
    x = inputs((2, 2, 1, 3))
    _, _, top = run(text, [x], phase=TEST)
    np.testing.assert_allclose(top.data, bn_reference(x, f32(1e-5), [0.5, 1.0], [2.0, 4.0]), rtol=1e-10)


def test_batchnorm_errors():
    bad_blobs = 'name: "bn" type: "BatchNorm" blobs { shape { dim: 4 } } blobs { shape { dim: 4 } } ' \
                'blobs { shape { dim: 1 } }'
    with pytest.raises(LayerError, match="bn"):
        run(bad_blobs, [inputs((2, 3))])
    layer, bottom, top = run('name: "bn" type: "BatchNorm"', [inputs((2, 3))])
    with pytest.raises(LayerError, match="channels"):
        layer.reshape([make_blob(inputs((2, 4)))], [top])


# =============================================================== LRN
def lrn_across_reference(x, n, alpha, beta, k):
    N, C, H, W = x.shape
    y = np.empty_like(x)
    half = (n - 1) // 2
    for b in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    total = 0.0
                    for cc in range(c - half, c + half + 1):
                        if 0 <= cc < C:
                            total += x[b, cc, h, w] ** 2
                    y[b, c, h, w] = x[b, c, h, w] * (k + alpha / n * total) ** (-beta)
    return y


def lrn_within_reference(x, n, alpha, beta):
    N, C, H, W = x.shape
    y = np.empty_like(x)
    half = (n - 1) // 2
    for b in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    total = 0.0
                    for hh in range(h - half, h + half + 1):
                        for ww in range(w - half, w + half + 1):
                            if 0 <= hh < H and 0 <= ww < W:
                                total += x[b, c, hh, ww] ** 2
                    y[b, c, h, w] = x[b, c, h, w] * (1 + alpha / (n * n) * total) ** (-beta)
    return y


@pytest.mark.parametrize("n,shape", [(5, (2, 7, 2, 3)), (3, (1, 4, 3, 3)), (5, (1, 2, 2, 2)), (1, (2, 3, 2, 2))])
def test_lrn_across_channels_forward(n, shape):
    x = inputs(shape) * 2
    _, _, top = run(f'type: "LRN" lrn_param {{ local_size: {n} alpha: 0.3 beta: 0.6 k: 2 }}', [x])
    expected = lrn_across_reference(x, n, f32(0.3), f32(0.6), 2.0)
    np.testing.assert_allclose(top.data, expected, rtol=1e-12)


def test_lrn_defaults():
    x = inputs((1, 6, 2, 2))
    layer, _, top = run('type: "LRN"', [x])
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1.0, 0.75, 1.0)
    np.testing.assert_allclose(top.data, lrn_across_reference(x, 5, 1.0, 0.75, 1.0), rtol=1e-12)


@pytest.mark.parametrize("n,shape", [(3, (2, 2, 4, 5)), (5, (1, 3, 3, 2))])
def test_lrn_within_channel_forward_ignores_k(n, shape):
    x = inputs(shape) * 2
    text = f'type: "LRN" lrn_param {{ norm_region: WITHIN_CHANNEL local_size: {n} alpha: 0.7 beta: 0.8 %s }}'
    _, _, top = run(text % "k: 5", [x])
    _, _, top_k1 = run(text % "", [x])
    expected = lrn_within_reference(x, n, f32(0.7), f32(0.8))
    np.testing.assert_allclose(top.data, expected, rtol=1e-12)
    np.testing.assert_array_equal(top.data, top_k1.data)  # k is ignored within channel


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("region,n", [("ACROSS_CHANNELS", 3), ("ACROSS_CHANNELS", 5),
                                      ("WITHIN_CHANNEL", 3)])
def test_lrn_gradient(region, n, in_place):
    text = (f'type: "LRN" lrn_param {{ norm_region: {region} local_size: {n} '
            f'alpha: 0.9 beta: 0.75 k: 1.5 }}')
    layer = layer_from_text(text)
    bottom = make_blob(inputs((2, 4, 3, 3), seed=3) * 1.5)
    top = bottom if in_place else Blob(())
    check_gradient(layer, [bottom], [top])


def test_lrn_in_place_forward_matches():
    x = inputs((2, 5, 3, 2))
    for region in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
        text = f'type: "LRN" lrn_param {{ norm_region: {region} local_size: 3 }}'
        _, _, separate = run(text, [x])
        _, bottom, top = run(text, [x], in_place=True)
        np.testing.assert_array_equal(top.data, separate.data)


@pytest.mark.parametrize("size", [2, 4, 0])
def test_lrn_even_local_size_refused(size):
    with pytest.raises(LayerError) as info:
        run(f'name: "norm1" type: "LRN" lrn_param {{ local_size: {size} }}', [inputs((1, 3, 2, 2))])
    message = str(info.value)
    assert "norm1" in message and "local_size" in message and str(size) in message


def test_lrn_needs_four_axes():
    with pytest.raises(LayerError, match="4 axes"):
        run('name: "norm1" type: "LRN"', [inputs((2, 3))])


# =============================================================== MVN
def mvn_reference(x, normalize_variance=True, across_channels=False, eps=1e-9):
    x = np.asarray(x, dtype=np.float64)
    N = x.shape[0]
    C = x.shape[1] if x.ndim > 1 else 1
    groups = x.reshape(N, -1) if across_channels else x.reshape(N * C, -1)
    out = np.empty_like(groups)
    for i, row in enumerate(groups):
        values = [float(v) for v in row]
        mu = sum(values) / len(values)
        sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
        for j, v in enumerate(values):
            out[i, j] = (v - mu) / (sigma + eps) if normalize_variance else v - mu
    return out.reshape(x.shape)


MVN_VARIANTS = [(nv, ac) for nv in (True, False) for ac in (False, True)]


def mvn_text(nv, ac, extra=""):
    return (f'type: "MVN" mvn_param {{ normalize_variance: {str(nv).lower()} '
            f'across_channels: {str(ac).lower()} {extra} }}')


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 3, 5, 7), (4, 5)])
@pytest.mark.parametrize("nv,ac", MVN_VARIANTS)
def test_mvn_forward(nv, ac, shape):
    x = inputs(shape) * 2 + 1
    _, _, top = run(mvn_text(nv, ac), [x])
    np.testing.assert_allclose(top.data, mvn_reference(x, nv, ac, f32(1e-9)), rtol=1e-9, atol=1e-12)


def test_mvn_eps_added_to_std_not_variance():
    x = inputs((2, 2, 3, 3))
    _, _, top = run(mvn_text(True, False, "eps: 0.5"), [x])
    np.testing.assert_allclose(top.data, mvn_reference(x, eps=0.5), rtol=1e-12)
    # a constant row has std 0: y = 0 / eps = 0, no NaN
    _, _, top = run('type: "MVN"', [np.full((1, 2, 2, 2), 3.0)])
    np.testing.assert_array_equal(top.data, 0.0)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("nv,ac", MVN_VARIANTS)
def test_mvn_gradient(nv, ac, in_place):
    layer = layer_from_text(mvn_text(nv, ac))
    bottom = make_blob(inputs((2, 3, 2, 2), seed=8) * 1.3)
    top = bottom if in_place else Blob(())
    check_gradient(layer, [bottom], [top])


def test_mvn_backward_uses_caffe_formula_with_large_eps():
    """mvn_layer.cpp: dx = (dy - mean(dy) - y*mean(dy*y)) / (std + eps)."""
    x = inputs((1, 2, 2, 3), seed=1)
    dy = inputs((1, 2, 2, 3), seed=2)
    layer, bottom, top = run(mvn_text(True, False, "eps: 0.5"), [x])
    top.diff[...] = dy
    layer.backward([top], [True], bottom)
    y = mvn_reference(x, eps=0.5)
    expected = np.empty_like(x)
    for c in range(2):
        ys, dys = y[0, c], dy[0, c]
        std = x[0, c].std() + 0.5
        expected[0, c] = (dys - dys.mean() - ys * (dys * ys).mean()) / std
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-12)


def test_mvn_in_place_forward_matches():
    x = inputs((2, 3, 2, 2))
    for nv, ac in MVN_VARIANTS:
        _, _, separate = run(mvn_text(nv, ac), [x])
        _, _, top = run(mvn_text(nv, ac), [x], in_place=True)
        np.testing.assert_array_equal(top.data, separate.data)


def test_mvn_too_many_axes():
    with pytest.raises(LayerError, match="4 axes"):
        run('name: "mvn" type: "MVN"', [inputs((1, 2, 2, 2, 2))])


# =============================================================== Scale
def broadcast_reference(x, operand, axis, op):
    """Apply op(x[i], operand[j]) by loops, operand covering x's axes [axis, axis + operand.ndim)."""
    out = np.empty_like(x)
    for index, value in np.ndenumerate(x):
        out[index] = op(value, operand[index[axis:axis + operand.ndim]])
    return out


def multiply(a, b):
    return a * b


def add(a, b):
    return a + b


@pytest.mark.parametrize("params,shape,axis,gamma_shape", [
    ("", (2, 3, 2, 2), 1, (3,)),
    ("axis: 0 num_axes: -1", (2, 3, 2), 0, (2, 3, 2)),
    ("axis: 2 num_axes: 2", (1, 3, 4, 5), 2, (4, 5)),
    ("axis: -1", (2, 3, 5), 2, (5,)),
    ("num_axes: 0", (2, 3, 2), 0, ()),
    ("axis: 1 num_axes: -1", (3, 2, 2), 1, (2, 2)),
])
def test_scale_one_bottom_forward(params, shape, axis, gamma_shape):
    x = inputs(shape)
    layer, bottom, top = run(f'type: "Scale" scale_param {{ {params} }}', [x])
    assert [b.shape for b in layer.blobs] == [gamma_shape]
    np.testing.assert_array_equal(layer.blobs[0].data, 1.0)  # default filler: constant 1
    np.testing.assert_array_equal(top.data, x)
    gamma = inputs(gamma_shape, seed=1)
    layer.blobs[0].set_dtype(np.float64)
    layer.blobs[0].data[...] = gamma
    layer.forward(bottom, [top])
    np.testing.assert_allclose(top.data, broadcast_reference(x, np.asarray(gamma), axis, multiply), rtol=1e-15)


def test_scale_with_bias_forward_and_fillers():
    set_random_seed(0)
    x = inputs((2, 3, 2, 2))
    layer, _, top = run('type: "Scale" scale_param { bias_term: true '
                        'filler { type: "constant" value: 2 } '
                        'bias_filler { type: "constant" value: -0.5 } }', [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_allclose(top.data, 2 * x - 0.5, rtol=1e-15)
    layer2, _, _ = run('type: "Scale" scale_param { bias_term: true }', [x])
    np.testing.assert_array_equal(layer2.blobs[1].data, 0.0)  # bias default: constant 0


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("params,shape", [
    ("bias_term: true", (2, 3, 2, 2)),
    ("bias_term: true axis: 0 num_axes: -1", (2, 3)),
    ("num_axes: 0 bias_term: true", (1, 3, 3)),
    ("axis: 2", (2, 2, 3, 1)),
])
def test_scale_gradient_one_bottom(params, shape, in_place):
    set_random_seed(1)
    text = (f'type: "Scale" scale_param {{ {params} filler {{ type: "gaussian" std: 1 }} '
            f'bias_filler {{ type: "gaussian" std: 1 }} }}')
    layer = layer_from_text(text)
    bottom = make_blob(inputs(shape, seed=2))
    top = bottom if in_place else Blob(())
    analytic = check_gradient(layer, [bottom], [top])
    assert np.any(analytic[("param", 0)] != 0)


def test_scale_in_place_backward_equals_separate():
    x = inputs((2, 3, 2, 2))
    dy = inputs((2, 3, 2, 2), seed=3)
    results = []
    for in_place in (False, True):
        layer, bottom, top = run('type: "Scale" scale_param { bias_term: true }', [x], in_place=in_place)
        for blob, value in zip(layer.blobs, ([0.5, -2.0, 3.0], [0.1, 0.2, 0.3])):
            blob.set_dtype(np.float64)
            blob.data[...] = value
        bottom[0].data[...] = x
        layer.forward(bottom, [top])
        top.diff[...] = dy
        layer.backward([top], [True], bottom)
        results.append([bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    # slow references for the parameter gradients
    expected_gamma = np.zeros(3)
    for (n, c, h, w), v in np.ndenumerate(x):
        expected_gamma[c] += dy[n, c, h, w] * v
    np.testing.assert_allclose(results[0][1], expected_gamma, rtol=1e-12)
    np.testing.assert_allclose(results[0][2], dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_scale_param_diffs_accumulate():
    layer, bottom, top = run('type: "Scale" scale_param { bias_term: true }', [inputs((2, 3, 2))])
    top.diff[...] = 1.0
    layer.backward([top], [True], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward([top], [True], bottom)
    for blob, first in zip(layer.blobs, once):
        np.testing.assert_allclose(blob.diff, 2 * first)


@pytest.mark.parametrize("bias", [False, True])
def test_scale_two_bottoms(bias):
    x = inputs((2, 3, 4))
    gamma = inputs((3, 4), seed=1)
    text = f'type: "Scale" scale_param {{ bias_term: {str(bias).lower()} bias_filler {{ type: "constant" value: 0.25 }} }}'
    layer, bottom, top = run(text, [x, gamma])
    assert [b.shape for b in layer.blobs] == ([(3, 4)] if bias else [])
    expected = broadcast_reference(x, gamma, 1, multiply) + (f32(0.25) if bias else 0)
    np.testing.assert_allclose(top.data, expected, rtol=1e-15)


@pytest.mark.parametrize("in_place", [False, True])
def test_scale_two_bottoms_gradient_to_gamma(in_place):
    layer = layer_from_text('type: "Scale" scale_param { axis: 0 bias_term: true '
                            'bias_filler { type: "constant" value: 0.3 } }')
    bottom = [make_blob(inputs((2, 3, 2))), make_blob(inputs((2, 3), seed=4))]
    top = bottom[0] if in_place else Blob(())
    analytic = check_gradient(layer, bottom, [top])
    assert np.any(analytic[("bottom", 1)] != 0)


def test_scale_two_bottoms_gamma_diff_is_assigned():
    layer, bottom, top = run('type: "Scale"', [inputs((2, 3)), inputs((3,), seed=1)])
    bottom[1].diff[...] = 100.0
    top.diff[...] = 1.0
    layer.backward([top], [True, True], bottom)
    np.testing.assert_allclose(bottom[1].diff, bottom[0].data.sum(axis=0))
    bottom[1].diff[...] = 100.0
    layer.backward([top], [True, False], bottom)
    assert np.all(bottom[1].diff == 100.0)  # propagate_down[1] False: untouched


def test_scale_errors():
    with pytest.raises(LayerError, match="num_axes"):
        run('name: "sc" type: "Scale" scale_param { num_axes: -2 }', [inputs((2, 3))])
    with pytest.raises(LayerError, match="extends past"):
        run('name: "sc" type: "Scale" scale_param { axis: 1 num_axes: 3 }', [inputs((2, 3, 2))])
    with pytest.raises(LayerError, match="does not match"):
        run('name: "sc" type: "Scale"', [inputs((2, 3, 2)), inputs((4,))])
    with pytest.raises(LayerError, match="axis"):
        run('name: "sc" type: "Scale" scale_param { axis: 5 }', [inputs((2, 3))])


def test_scale_preloaded_blobs_shape_checked():
    text = 'name: "sc" type: "Scale" blobs { shape { dim: 4 } data: 1 data: 1 data: 1 data: 1 }'
    with pytest.raises(LayerError, match="does not match"):
        run(text, [inputs((2, 3))])


# =============================================================== Bias
@pytest.mark.parametrize("params,shape,axis,b_shape", [
    ("", (2, 3, 2, 2), 1, (3,)),
    ("axis: 0 num_axes: -1", (2, 3), 0, (2, 3)),
    ("num_axes: 0", (1, 3, 5), 0, ()),
    ("axis: -2 num_axes: 2", (2, 3, 4), 1, (3, 4)),
])
def test_bias_one_bottom(params, shape, axis, b_shape):
    set_random_seed(2)
    x = inputs(shape)
    layer, bottom, top = run(f'type: "Bias" bias_param {{ {params} }}', [x])
    assert [b.shape for b in layer.blobs] == [b_shape]
    np.testing.assert_array_equal(top.data, x)  # default filler: constant 0
    b = inputs(b_shape, seed=5)
    layer.blobs[0].set_dtype(np.float64)
    layer.blobs[0].data[...] = b
    layer.forward(bottom, [top])
    np.testing.assert_allclose(top.data, broadcast_reference(x, np.asarray(b), axis, add), rtol=1e-15)


@pytest.mark.parametrize("in_place", [False, True])
def test_bias_gradient_one_bottom(in_place):
    layer = layer_from_text('type: "Bias" bias_param { filler { type: "gaussian" std: 1 } }')
    bottom = make_blob(inputs((2, 3, 2)))
    top = bottom if in_place else Blob(())
    analytic = check_gradient(layer, [bottom], [top])
    assert np.any(analytic[("param", 0)] != 0)


@pytest.mark.parametrize("in_place", [False, True])
def test_bias_two_bottoms(in_place):
    x, b = inputs((2, 3, 2)), inputs((3, 2), seed=3)
    layer, bottom, top = run('type: "Bias"', [x, b], in_place=in_place)
    assert layer.blobs == []
    np.testing.assert_allclose(top.data, broadcast_reference(x, b, 1, add), rtol=1e-15)
    layer = layer_from_text('type: "Bias"')
    bottom = [make_blob(x), make_blob(b)]
    check_gradient(layer, bottom, [bottom[0] if in_place else Blob(())])


def test_bias_filler_and_param_diff_accumulates():
    layer, bottom, top = run('type: "Bias" bias_param { filler { type: "constant" value: 1.5 } }',
                             [inputs((2, 3))])
    np.testing.assert_array_equal(layer.blobs[0].data, [1.5, 1.5, 1.5])
    top.diff[...] = 1.0
    layer.backward([top], [True], bottom)
    layer.backward([top], [True], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, [4.0, 4.0, 4.0])


def test_bias_errors():
    with pytest.raises(LayerError, match="num_axes"):
        run('name: "b" type: "Bias" bias_param { num_axes: -3 }', [inputs((2, 3))])
    with pytest.raises(LayerError, match="extends past"):
        run('name: "b" type: "Bias" bias_param { num_axes: 2 }', [inputs((2, 3))])
    with pytest.raises(LayerError, match="does not match"):
        run('name: "b" type: "Bias"', [inputs((2, 3)), inputs((2,))])


# ---------------------------------------------------------------------------
# Caches that only backward reads are skipped where the net never runs backward
# ---------------------------------------------------------------------------

_BN_SCALE_NET = """
name: "bn_scale" {force}
input: "data" input_shape {{ dim: 2 dim: 3 dim: 4 dim: 4 }}
layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "data"
        batch_norm_param {{ use_global_stats: {global_stats} }} }}
layer {{ name: "scale" type: "Scale" bottom: "data" top: "data" scale_param {{ bias_term: true }} }}
layer {{ name: "lrn" type: "LRN" bottom: "data" top: "data" }}
layer {{ name: "mvn" type: "MVN" bottom: "data" top: "out" }}
"""


def _bn_scale_net(tmp_path, force_backward, global_stats):
    import framework
    path = tmp_path / "net.prototxt"
    path.write_text(_BN_SCALE_NET.format(force="force_backward: true" if force_backward else "",
                                         global_stats=str(global_stats).lower()))
    net = framework.Net(str(path), framework.TRAIN)
    rng = np.random.default_rng(3)
    for name in ("bn", "scale"):
        for blob in net.params[name]:
            blob.data[...] = rng.uniform(0.5, 1.5, blob.shape)
    return net, rng.standard_normal((2, 3, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("global_stats", [True, False])
def test_no_backward_caches_without_backward(tmp_path, global_stats):
    plain, x = _bn_scale_net(tmp_path, force_backward=False, global_stats=global_stats)
    forced, _ = _bn_scale_net(tmp_path, force_backward=True, global_stats=global_stats)
    for name in ("bn", "scale", "lrn", "mvn"):
        assert not plain.layer_dict[name].backward_needed
        assert forced.layer_dict[name].backward_needed
    for name in ("bn", "scale"):
        for mine, theirs in zip(plain.params[name], forced.params[name]):
            mine.data[...] = theirs.data
    out_plain = plain.forward(data=x)["out"].copy()
    out_forced = forced.forward(data=x)["out"].copy()
    np.testing.assert_array_equal(out_plain, out_forced)
    layers = plain.layer_dict
    assert layers["bn"]._x_norm is None and layers["scale"]._x is None
    assert layers["lrn"]._x is None and layers["mvn"]._y is None
    # With backward forced on, the in-place layers keep what backward needs.
    flayers = forced.layer_dict
    assert flayers["scale"]._x is not None and flayers["lrn"]._x is not None
    assert flayers["mvn"]._y is not None
    assert (flayers["bn"]._x_norm is None) == global_stats
    forced.blobs["out"].diff[...] = 1.0
    forced.backward()
    assert np.isfinite(forced.blobs["data"].diff).all()
    assert np.abs(forced.params["scale"][0].diff).sum() > 0


# ---------------------------------------------------------------------------
# Odd shapes, batch 1, in place, float32/float64 against the slow references
# ---------------------------------------------------------------------------

def bn_backward_reference(x, dy, eps):
    """Batch-statistics BatchNorm dx by per-channel loops over float64 values."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    channels = 1 if x.ndim == 1 else x.shape[1]
    x3, dy3 = x.reshape(x.shape[0], channels, -1), dy.reshape(x.shape[0], channels, -1)
    y3 = bn_reference(x, eps).reshape(x3.shape)
    dx3 = np.empty_like(x3)
    for c in range(channels):
        std = math.sqrt(x3[:, c].var() + eps)
        mean_dy = dy3[:, c].mean()
        mean_dy_y = (dy3[:, c] * y3[:, c]).mean()
        dx3[:, c] = (dy3[:, c] - mean_dy - mean_dy_y * y3[:, c]) / std
    return dx3.reshape(x.shape)


ODD_SHAPES = [(3, 5, 4, 3), (5, 4, 3), (1, 7, 5, 3), (2, 5, 3, 3), (7, 2)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_batchnorm_batch_stats_odd_shapes_match_reference(shape, in_place, dtype):
    x = inputs(shape, seed=11) * 2 + 0.5
    dy = inputs(shape, seed=12)
    layer = layer_from_text('type: "BatchNorm"', TRAIN)
    bottom = make_blob(x, dtype)
    top = bottom if in_place else Blob((), dtype=dtype)
    layer.setup_layer([bottom], [top])
    layer.forward([bottom], [top])
    tol = 2e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(top.data, bn_reference(x.astype(dtype), f32(1e-5)), rtol=tol, atol=tol)
    channels = 1 if len(shape) == 1 else shape[1]
    m = x.size // channels
    mean = x.reshape(shape[0], channels, -1).mean(axis=(0, 2))
    var = x.reshape(shape[0], channels, -1).var(axis=(0, 2))
    np.testing.assert_allclose(layer.blobs[0].data, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-5)
    top.data[...] = -99.0  # a later in-place layer clobbers the top; backward uses its own copy
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    expected = bn_backward_reference(x.astype(dtype), dy.astype(dtype), f32(1e-5))
    np.testing.assert_allclose(bottom.diff, expected, rtol=50 * tol, atol=50 * tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (1, 5, 3, 7)])
def test_batchnorm_global_stats_odd_shapes_match_reference(shape, in_place, dtype):
    x = inputs(shape, seed=13)
    dy = inputs(shape, seed=14)
    layer = layer_from_text('type: "BatchNorm"', TEST)
    bottom = make_blob(x, dtype)
    top = bottom if in_place else Blob((), dtype=dtype)
    layer.setup_layer([bottom], [top])
    m_sum, v_sum = np.linspace(-1, 1, 5), np.linspace(0.5, 3, 5)
    layer.blobs[0].data[...] = m_sum
    layer.blobs[1].data[...] = v_sum
    layer.blobs[2].data[...] = 2.0
    layer.forward([bottom], [top])
    mean, var = np.float32(m_sum) / 2, np.float32(v_sum) / 2
    tol = 2e-6 if dtype == np.float32 else 1e-7  # the statistics are stored as float32
    np.testing.assert_allclose(top.data, bn_reference(x.astype(dtype), f32(1e-5), mean, var),
                               rtol=tol, atol=tol)
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    std = np.sqrt(var.astype(np.float64) + f32(1e-5)).reshape(1, 5, 1, 1)
    np.testing.assert_allclose(bottom.diff, dy.astype(dtype) / std, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("params,shape,axis,gamma_shape", [
    ("", (3, 5, 4, 3), 1, (5,)),
    ("", (1, 7, 3, 5), 1, (7,)),
    ("", (2, 5, 3), 1, (5,)),
    ("axis: 0 num_axes: -1", (3, 4, 2), 0, (3, 4, 2)),
    ("num_axes: 0", (1, 3, 5), 0, ()),
    ("axis: 2 num_axes: 2", (2, 3, 4, 5), 2, (4, 5)),
])
def test_scale_odd_shapes_match_reference(params, shape, axis, gamma_shape, in_place, dtype):
    x, dy = inputs(shape, seed=15), inputs(shape, seed=16)
    gamma, beta = inputs(gamma_shape, seed=17), inputs(gamma_shape, seed=18)
    layer = layer_from_text(f'type: "Scale" scale_param {{ {params} bias_term: true }}')
    bottom = make_blob(x, dtype)
    top = bottom if in_place else Blob((), dtype=dtype)
    layer.setup_layer([bottom], [top])
    for blob, value in zip(layer.blobs, (gamma, beta)):
        blob.set_dtype(dtype)
        blob.data[...] = value
    layer.forward([bottom], [top])
    xd, gd, bd = (np.asarray(v, dtype=dtype).astype(np.float64) for v in (x, gamma, beta))
    expected = broadcast_reference(broadcast_reference(xd, gd, axis, multiply), bd, axis, add)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(top.data, expected, rtol=tol, atol=tol)
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    dyd = np.asarray(dy, dtype=dtype).astype(np.float64)
    np.testing.assert_allclose(bottom.diff, broadcast_reference(dyd, gd, axis, multiply),
                               rtol=tol, atol=tol)
    d_gamma, d_beta = np.zeros(gamma_shape), np.zeros(gamma_shape)
    for index, g in np.ndenumerate(dyd):
        d_gamma[index[axis:axis + len(gamma_shape)]] += g * xd[index]
        d_beta[index[axis:axis + len(gamma_shape)]] += g
    np.testing.assert_allclose(layer.blobs[0].diff, d_gamma, rtol=20 * tol, atol=20 * tol)
    np.testing.assert_allclose(layer.blobs[1].diff, d_beta, rtol=20 * tol, atol=20 * tol)


def test_kept_buffers_follow_a_batch_change():
    """BatchNorm's x_norm and in-place Scale's saved input are reused between passes and
    must be reallocated when the batch changes."""
    bn = layer_from_text('type: "BatchNorm"', TRAIN)
    scale = layer_from_text('type: "Scale" scale_param { filler { type: "constant" value: 2 } }')
    blob = make_blob(inputs((2, 3, 2, 2), seed=22))
    bn.setup_layer([blob], [blob])
    scale.setup_layer([blob], [blob])
    scale.blobs[0].set_dtype(np.float64)
    scale.blobs[0].data[...] = 2.0
    for batch in (2, 3, 1):
        x, dy = inputs((batch, 3, 2, 2), seed=23 + batch), inputs((batch, 3, 2, 2), seed=30 + batch)
        blob.reshape(x.shape)
        blob.data[...] = x
        for layer in (bn, scale):
            layer.reshape([blob], [blob])
            layer.forward([blob], [blob])
        np.testing.assert_allclose(blob.data, 2 * bn_reference(x, f32(1e-5)), rtol=1e-10, atol=1e-12)
        blob.diff[...] = dy
        scale.blobs[0].diff[...] = 0
        scale.backward([blob], [True], [blob])
        np.testing.assert_allclose(scale.blobs[0].diff, [(dy[:, c] * bn_reference(x, f32(1e-5))[:, c]).sum()
                                                         for c in range(3)], rtol=1e-10)
        bn.backward([blob], [True], [blob])
        np.testing.assert_allclose(blob.diff, bn_backward_reference(x, 2 * dy, f32(1e-5)),
                                   rtol=1e-9, atol=1e-12)
