"""Tests of layers/winograd.py: the F(2x2, 3x3) Convolution forward and its dispatch.

Forward results are compared with a float64 reference written here (a sum
over the nine kernel offsets of channel contractions, no im2col) and with
the im2col path; the filter cache is checked against in-place weight
updates; a whole Convolution layer gives the same forward with the fast
path on and off, and its gradients (im2col backward) still check.
"""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

from framework.blob import Blob
from gradient_check import check_gradient, layer_from_text, make_blob
from layers import parallel, vision, winograd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ref_conv3x3(x, w, b, pad, group=1):
    """Float64 correlation, stride 1: y[n, k] = Σ_c Σ_(i,j) w[k, c, i, j] · xpad[n, c, y+i, x+j] + b[k]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    k = w.shape[0]
    ho, wo = h + 2 * pad - 2, wd + 2 * pad - 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cg, kg = c // group, k // group
    y = np.zeros((n, k, ho, wo))
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(3):
            for j in range(3):
                y[:, g * kg:(g + 1) * kg] += np.einsum(
                    "kc,nchw->nkhw", w[g * kg:(g + 1) * kg, :, i, j], xs[:, :, i:i + ho, j:j + wo])
    if b is not None:
        y += np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return y


def geometry(c, h, w, pad, group=1):
    return vision.ConvGeometry(c, (h, w), (h + 2 * pad - 2, w + 2 * pad - 2), (3, 3), (1, 1),
                               (pad, pad), (1, 1), group)


def problem(n, c, k, h, w, group=1, bias=True, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weights = (rng.standard_normal((k, c // group, 3, 3)) * np.sqrt(2.0 / (9 * c // group))).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if bias else None
    return x, weights, b


def run_winograd(x, weights, b, pad, group=1):
    geom = geometry(x.shape[1], x.shape[2], x.shape[3], pad, group)
    out = np.full((x.shape[0], weights.shape[0]) + geom.out_shape, np.nan, dtype=x.dtype)
    winograd.conv_forward(x, weights, geom, out, b)
    return out


def run_im2col(x, weights, b, pad, group=1):
    geom = geometry(x.shape[1], x.shape[2], x.shape[3], pad, group)
    out = np.empty((x.shape[0], weights.shape[0]) + geom.out_shape, dtype=x.dtype)
    saved = winograd.ENABLED
    winograd.ENABLED = False
    try:
        vision.conv_forward(x, weights, geom, out, b)
    finally:
        winograd.ENABLED = saved
    return out


def rel_error(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


# (n, c, k, h, w, pad, group, bias): odd/even sizes, pads 0-3, groups, batch 1/3,
# outputs down to 1x1 and 2x2 (a single, partial tile)
SHAPES = [
    (1, 3, 5, 7, 7, 1, 1, True),
    (3, 4, 6, 8, 6, 1, 1, False),
    (2, 6, 4, 9, 5, 0, 2, True),
    (1, 4, 4, 5, 8, 2, 1, True),
    (3, 8, 8, 6, 7, 1, 4, False),
    (2, 3, 2, 1, 1, 1, 1, True),     # 1x1 output from a 1x1 image
    (2, 3, 4, 3, 3, 0, 1, True),     # 1x1 output, no padding
    (1, 2, 3, 2, 2, 1, 1, False),    # 2x2 output: one full tile
    (3, 2, 2, 4, 3, 0, 1, True),     # 2x1 output
    (1, 2, 2, 3, 4, 3, 1, True),     # pad 3: tiles entirely in the padding
    (2, 5, 3, 11, 13, 1, 1, True),
]


@pytest.mark.parametrize("n, c, k, h, w, pad, group, bias", SHAPES)
def test_winograd_matches_float64_reference(n, c, k, h, w, pad, group, bias):
    x, weights, b = problem(n, c, k, h, w, group, bias, seed=n + c + h)
    ref = ref_conv3x3(x, weights, b, pad, group)
    y64 = run_winograd(x, weights, b, pad, group)
    assert y64.shape == ref.shape
    np.testing.assert_allclose(y64, ref, rtol=1e-12, atol=1e-12)
    x32, w32 = x.astype(np.float32), weights.astype(np.float32)
    b32 = None if b is None else b.astype(np.float32)
    y32 = run_winograd(x32, w32, b32, pad, group)
    assert y32.dtype == np.float32
    assert rel_error(y32, ref) <= winograd.ERROR_BOUND
    np.testing.assert_allclose(y32, run_im2col(x32, w32, b32, pad, group), rtol=1e-5, atol=1e-5)


# V of the problem below: 6 images of 5 tile rows of 16 x 4 tiles x 5 channels x 8 bytes
@pytest.mark.parametrize("block_bytes, threads, blocks", [
    (1, 3, 30),                     # one tile row per block
    (2 * 5 * 16 * 4 * 5 * 8, 3, 3),  # two whole images per block
    (1 << 20, 2, 2),                # at least one block per thread
    (1 << 20, 1, 1),                # everything in one block
])
def test_blocks_and_threads_match(monkeypatch, block_bytes, threads, blocks):
    monkeypatch.setattr(winograd, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(winograd, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    monkeypatch.setattr(parallel, "copy_threads", lambda: threads)
    assert len(winograd._blocks(6, 5, 16 * 4 * 5 * 8, winograd._threads(1))) == blocks
    x, weights, b = problem(6, 5, 4, 9, 7, seed=4)
    np.testing.assert_allclose(run_winograd(x, weights, b, 1), ref_conv3x3(x, weights, b, 1),
                               rtol=1e-12, atol=1e-12)


def test_transforms_are_lavin_grays_matrices():
    # one tile through the matrices reproduces the 2x2 correlation output
    rng = np.random.default_rng(3)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    m = (winograd.G @ g @ winograd.G.T) * (winograd.BT @ d @ winograd.BT.T)
    y = winograd.AT @ m @ winograd.AT.T
    direct = [[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(y, direct, rtol=1e-12)
    # and the code's hand-expanded transforms agree with them on a single tile
    np.testing.assert_allclose(run_winograd(d.reshape(1, 1, 4, 4), g.reshape(1, 1, 3, 3), None, 0)[0, 0],
                               direct, rtol=1e-12)


@pytest.mark.parametrize("k, cg, group", [(8, 5, 1), (12, 4, 3), (6, 2, 2)])
def test_filter_transform_is_g_g_gt(k, cg, group):
    # each value within the round-off of a sum of at most 9 exactly scaled taps (8 additions:
    # 8 units of round-off times the sum of magnitudes) of the exact G g Gᵀ, in either precision
    weights = np.random.default_rng(7).standard_normal((k, cg, 3, 3))
    for dtype in (np.float32, np.float64):
        tolerance = 8 * np.finfo(dtype).eps / 2
        u = winograd.filter_transform(weights.astype(dtype), group)
        assert u.shape == (16, group, k // group, cg) and u.dtype == dtype
        w = weights.astype(dtype).astype(np.float64)
        for f in range(k):
            for c in range(cg):
                want = winograd.G @ w[f, c] @ winograd.G.T
                magnitude = np.abs(winograd.G) @ np.abs(w[f, c]) @ np.abs(winograd.G).T
                got = u[:, f // (k // group), f % (k // group), c].reshape(4, 4)
                assert (np.abs(got - want) <= tolerance * magnitude).all()


@pytest.mark.parametrize("c, h", [(64, 8), (256, 6), (512, 4)])
def test_float32_error_bound(c, h):
    # N(0, 1) inputs, He-initialised weights: Winograd stays within ERROR_BOUND
    # and within a small multiple of the im2col path's own float32 error
    x, weights, b = problem(2, c, c, h, h, bias=False, seed=c)
    ref = ref_conv3x3(x, weights, None, 1)
    x32, w32 = x.astype(np.float32), weights.astype(np.float32)
    err_w = rel_error(run_winograd(x32, w32, None, 1), ref)
    err_d = rel_error(run_im2col(x32, w32, None, 1), ref)
    assert err_w <= winograd.ERROR_BOUND
    assert err_w <= 4 * err_d


def test_filter_cache_hits_and_sees_in_place_updates():
    winograd.clear_cache()
    x, weights, b = problem(2, 4, 3, 6, 5, seed=7)
    u1 = winograd.cached_filter_transform(weights, 1)
    assert winograd.cached_filter_transform(weights, 1) is u1  # unchanged weights: cached
    weights[1, 2, 0, 1] += 0.25                                # a solver-style in-place update
    u2 = winograd.cached_filter_transform(weights, 1)
    assert u2 is not u1
    np.testing.assert_array_equal(u2, winograd.filter_transform(weights, 1))
    for _ in range(2):
        np.testing.assert_allclose(run_winograd(x, weights, b, 1), ref_conv3x3(x, weights, b, 1),
                                   rtol=1e-12, atol=1e-12)
        weights *= 0.5


def test_filter_cache_transforms_once_for_threads_asking_together(monkeypatch):
    import threading
    import time
    winograd.clear_cache()
    weights = problem(1, 8, 8, 3, 3)[1].astype(np.float32)
    original = winograd.filter_transform
    calls = []

    def slow_transform(*args, **kwargs):  # long enough for the other threads to arrive
        calls.append(1)
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(winograd, "filter_transform", slow_transform)
    results = [None] * 3

    def ask(k):
        results[k] = winograd.cached_filter_transform(weights, 1)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] is results[1] is results[2]


def test_filter_cache_entry_goes_with_the_array():
    winograd.clear_cache()
    weights = problem(1, 2, 2, 3, 3)[1]
    winograd.cached_filter_transform(weights, 1)
    assert len(winograd._cache) == 1
    del weights
    assert len(winograd._cache) == 0


def conv_layer_text(num_output, params="kernel_size: 3 pad: 1"):
    return (f'name: "c" type: "Convolution" convolution_param {{ num_output: {num_output} {params} '
            f'weight_filler {{ type: "msra" }} bias_filler {{ type: "uniform" min: -1 max: 1 }} }}')


def forward_layer(layer, x, dtype=np.float32):
    bottom, top = [make_blob(x, dtype)], [Blob((), dtype=dtype)]
    layer.setup_layer(bottom, top)
    layer.forward(bottom, top)
    return top[0].data.copy()


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every supported convolution, whatever its size."""
    monkeypatch.setattr(winograd, "ENABLED", True)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    monkeypatch.setattr(winograd, "WGRAD_MIN_TILES", 1)
    monkeypatch.setattr(winograd, "WGRAD_MIN_CHANNELS_ON_THREADS", 1)


def count_calls(monkeypatch, name):
    """Replace winograd.<name> by a wrapper that records its first argument's shape; the list."""
    calls = []
    original = getattr(winograd, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(winograd, name, counted)
    return calls


@pytest.fixture
def count_winograd(monkeypatch):
    return count_calls(monkeypatch, "conv_forward")


def test_convolution_layer_same_forward_with_fast_path_on_and_off(monkeypatch, everywhere, count_winograd):
    x = np.random.default_rng(5).standard_normal((3, 16, 9, 8))
    layer = layer_from_text(conv_layer_text(24))
    fast = forward_layer(layer, x)
    assert count_winograd, "the 3x3 layer should have used the Winograd path"
    ref = ref_conv3x3(x.astype(np.float32), layer.blobs[0].data, layer.blobs[1].data, 1)
    assert rel_error(fast, ref) <= winograd.ERROR_BOUND
    # the solver updates the weights in place: the next forward must see them
    layer.blobs[0].data[...] *= -2.0
    fast2 = forward_layer(layer, x)
    ref2 = ref_conv3x3(x.astype(np.float32), layer.blobs[0].data, layer.blobs[1].data, 1)
    assert rel_error(fast2, ref2) <= winograd.ERROR_BOUND
    calls = len(count_winograd)
    monkeypatch.setattr(winograd, "ENABLED", False)
    exact = forward_layer(layer, x)
    assert len(count_winograd) == calls, "ENABLED = False must keep the im2col path"
    np.testing.assert_allclose(fast2, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    assert rel_error(exact, ref2) <= winograd.ERROR_BOUND


@pytest.mark.parametrize("params", [
    "kernel_size: 3 pad: 1 stride: 2",
    "kernel_size: 3 pad: 2 dilation: 2",
    "kernel_size: 5 pad: 2",
    "kernel_h: 3 kernel_w: 1 pad_h: 1",
])
def test_other_geometries_keep_the_im2col_path(params, everywhere, count_winograd):
    x = np.random.default_rng(6).standard_normal((1, 4, 6, 6))
    forward_layer(layer_from_text(conv_layer_text(4, params)), x)
    assert not count_winograd


def fake_input(n, c, h, dtype=np.float32):
    """An array of that shape and dtype without the memory (use_winograd reads shape and dtype only)."""
    return np.broadcast_to(np.zeros((), dtype), (n, c, h, h))


@pytest.mark.parametrize("n, c, h, expected", [
    (1, 64, 56, True), (1, 128, 28, True), (8, 64, 56, True),
    (2, 512, 7, False), (4, 512, 7, False), (8, 512, 7, True),   # 32, 64, 128 tiles per GEMM
    (1, 256, 14, False), (2, 256, 14, True),                     # 49, 98
    (8, 32, 32, False),                                          # too few channels
])
def test_dispatch_rule(monkeypatch, n, c, h, expected):
    # GEMMs on one thread, as in a data-parallel replica
    monkeypatch.setattr(winograd, "ENABLED", True)
    x, w = fake_input(n, c, h), np.zeros((c, c, 3, 3), np.float32)
    geom = geometry(c, h, h, 1)
    with parallel.one_thread_per_pass():
        assert winograd.use_winograd(x, w, geom) == expected
        if expected:
            monkeypatch.setattr(winograd, "ENABLED", False)
            assert not winograd.use_winograd(x, w, geom)


@pytest.mark.parametrize("n, c, h, expected", [
    (1, 64, 56, False), (1, 128, 28, False),  # one image: im2col beside multi-threaded GEMMs
    (2, 128, 28, True), (8, 256, 14, True),
])
def test_dispatch_rule_with_gemms_on_several_threads(monkeypatch, two_cores, n, c, h, expected):
    monkeypatch.setattr(winograd, "ENABLED", True)
    x, w = fake_input(n, c, h), np.zeros((c, c, 3, 3), np.float32)
    geom = geometry(c, h, h, 1)
    assert winograd.use_winograd(x, w, geom) == expected
    monkeypatch.setattr(winograd, "SINGLE_IMAGE_ON_THREADS", True)
    assert winograd.use_winograd(x, w, geom)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # BLAS on one thread: Winograd again
    monkeypatch.setattr(winograd, "SINGLE_IMAGE_ON_THREADS", False)
    assert winograd.use_winograd(x, w, geom)


def test_dispatch_needs_float_and_channels_per_group():
    c = 2 * winograd.MIN_CHANNELS
    x, w = fake_input(8, c, 16), np.zeros((c, c, 3, 3), np.float32)
    assert winograd.use_winograd(x, w, geometry(c, 16, 16, 1)) == winograd.ENABLED
    assert not winograd.use_winograd(fake_input(8, c, 16, np.float16), w.astype(np.float16),
                                     geometry(c, 16, 16, 1))
    grouped = geometry(c, 16, 16, 1, group=4)  # c/4 channels per group
    assert winograd.supports(x, w[:, :c // 4], grouped)
    assert not winograd.use_winograd(x, w[:, :c // 4], grouped)


@pytest.fixture
def count_data_gradient(monkeypatch):
    return count_calls(monkeypatch, "conv_backward_data")


@pytest.fixture
def count_weight_gradient(monkeypatch):
    return count_calls(monkeypatch, "conv_weight_grad")


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_gradients_check_with_winograd_forward_and_both_gradients(everywhere, count_winograd,
                                                                  count_data_gradient,
                                                                  count_weight_gradient, pad):
    # forward, input and weight gradients by Winograd (thresholds lowered to reach a small
    # layer), the bias gradient beside the weight gradient's
    layer = layer_from_text(conv_layer_text(3, f"kernel_size: 3 pad: {pad} group: 1"))
    assert layer.layer_param.convolution_param.bias_term
    check_gradient(layer, [make_blob(np.random.default_rng(8).uniform(-1, 1, (2, 2, 4, 5)))], [Blob()])
    assert count_winograd and count_data_gradient and count_weight_gradient


def im2col_data_gradient(dy, weights, geom):
    dx = np.empty((dy.shape[0], geom.channels) + geom.in_shape, dtype=dy.dtype)
    saved = winograd.ENABLED
    winograd.ENABLED = False
    try:
        vision.conv_backward(None, dy, weights, geom, dx, weight_grad=False)
    finally:
        winograd.ENABLED = saved
    return dx


# (n, c, k, h, w, pad, group): odd/even sizes, pads 0-2, groups, batch 1/3
@pytest.mark.parametrize("n, c, k, h, w, pad, group", [
    (2, 4, 6, 7, 8, 1, 1), (1, 6, 4, 5, 5, 0, 2), (3, 4, 4, 6, 9, 2, 1), (2, 8, 8, 4, 4, 1, 4),
    (1, 3, 5, 3, 3, 0, 1),
])
def test_data_gradient_matches_im2col_in_float64(everywhere, n, c, k, h, w, pad, group):
    _, weights, _ = problem(1, c, k, 3, 3, group, seed=12)
    geom = geometry(c, h, w, pad, group)
    dy = np.random.default_rng(13).standard_normal((n, k) + geom.out_shape)
    assert winograd.use_for_data_gradient(dy, weights, geom)
    dx = np.full((n, c, h, w), np.nan)
    winograd.conv_backward_data(dy, weights, geom, dx)
    np.testing.assert_allclose(dx, im2col_data_gradient(dy, weights, geom), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c, h", [(64, 8), (256, 8)])
def test_data_gradient_float32_error_bound(c, h):
    # the real dispatch (no lowered thresholds): ResNet-like channels
    _, weights, _ = problem(1, c, c, 3, 3, seed=14, dtype=np.float32)
    geom = geometry(c, h, h, 1)
    dy = np.random.default_rng(15).standard_normal((8, c, h, h)).astype(np.float32)
    assert winograd.use_for_data_gradient(dy, weights, geom) == winograd.ENABLED
    dx = np.empty((8, c, h, h), np.float32)
    winograd.conv_backward_data(dy, weights, geom, dx)
    ref = im2col_data_gradient(dy.astype(np.float64), weights.astype(np.float64), geom)
    exact_err = rel_error(im2col_data_gradient(dy, weights, geom), ref)
    err = rel_error(dx, ref)
    assert err <= winograd.ERROR_BOUND and err <= 4 * exact_err


def test_data_gradient_dispatch():
    c = 2 * winograd.MIN_CHANNELS
    w = np.zeros((c, c, 3, 3), np.float32)
    dy = fake_input(8, c, 16)
    assert winograd.use_for_data_gradient(dy, w, geometry(c, 16, 16, 1)) == winograd.ENABLED
    assert not winograd.use_for_data_gradient(fake_input(8, c, 20), w, geometry(c, 16, 16, 3))  # pad 3
    small = np.zeros((8, 8, 3, 3), np.float32)
    assert not winograd.use_for_data_gradient(fake_input(8, 8, 16), small, geometry(8, 16, 16, 1))


def im2col_weight_gradient(x, dy, geom):
    saved = winograd.ENABLED
    winograd.ENABLED = False
    try:
        return vision.conv_backward(x, dy, None, geom)[0]
    finally:
        winograd.ENABLED = saved


@pytest.mark.parametrize("n, c, k, h, w, pad, group", [
    (2, 4, 6, 7, 8, 1, 1), (1, 6, 4, 5, 5, 0, 2), (3, 4, 4, 6, 9, 2, 1), (2, 8, 8, 4, 4, 1, 4),
    (1, 3, 5, 3, 3, 0, 1),
])
def test_weight_gradient_matches_im2col_in_float64(everywhere, n, c, k, h, w, pad, group):
    geom = geometry(c, h, w, pad, group)
    x = np.random.default_rng(16).standard_normal((n, c, h, w))
    dy = np.random.default_rng(17).standard_normal((n, k) + geom.out_shape)
    assert winograd.use_for_weight_gradient(x, dy, geom)
    got = winograd.conv_weight_grad(x, dy, geom)
    assert got.shape == (k, c // group * 9) and got.flags.c_contiguous
    np.testing.assert_allclose(got, im2col_weight_gradient(x, dy, geom), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c, h", [(64, 16), (256, 12)])
def test_weight_gradient_float32_error_bound(c, h):
    # the real dispatch of a replica on one thread: ResNet-like channels, 8 images
    geom = geometry(c, h, h, 1)
    x = np.random.default_rng(18).standard_normal((8, c, h, h)).astype(np.float32)
    dy = np.random.default_rng(19).standard_normal((8, c, h, h)).astype(np.float32)
    with parallel.one_thread_per_pass():
        assert winograd.use_for_weight_gradient(x, dy, geom) == winograd.ENABLED
    ref = im2col_weight_gradient(x.astype(np.float64), dy.astype(np.float64), geom)
    exact_err = rel_error(im2col_weight_gradient(x, dy, geom), ref)
    err = rel_error(winograd.conv_weight_grad(x, dy, geom), ref)
    assert err <= winograd.ERROR_BOUND and err <= 4 * exact_err


@pytest.mark.parametrize("n, c, h, alone, expected", [
    (8, 64, 56, True, True), (8, 64, 56, False, False),      # 64 channels: only on one thread
    (4, 128, 28, False, True), (8, 256, 14, False, True),
    (2, 256, 14, True, False), (8, 512, 7, True, False),     # 98 and 128 tiles
    (4, 256, 14, True, True),                                # 196 tiles
    (8, 32, 32, True, False),                                # too few channels
])
def test_weight_gradient_dispatch(monkeypatch, two_cores, n, c, h, alone, expected):
    monkeypatch.setattr(winograd, "ENABLED", True)
    x = fake_input(n, c, h)
    geom = geometry(c, h, h, 1)
    with parallel.one_thread_per_pass() if alone else contextlib.nullcontext():
        assert winograd.use_for_weight_gradient(x, x, geom) == expected
        monkeypatch.setattr(winograd, "ENABLED", False)
        assert not winograd.use_for_weight_gradient(x, x, geom)


def test_deconvolution_backward_uses_the_same_forward(monkeypatch, everywhere, count_winograd):
    # Deconvolution's bottom gradient is a convolution forward of its top gradient
    text = ('name: "d" type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 3 pad: 1 '
            'weight_filler { type: "gaussian" std: 0.5 } }')
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(winograd, "ENABLED", enabled)
        layer = layer_from_text(text)
        x = np.random.default_rng(10).standard_normal((2, 4, 5, 6))
        bottom, top = [make_blob(x)], [Blob((), np.float64)]
        layer.setup_layer(bottom, top)
        layer.blobs[0].data[...] = np.random.default_rng(9).standard_normal(layer.blobs[0].shape)
        layer.forward(bottom, top)
        top[0].diff[...] = np.random.default_rng(11).standard_normal(top[0].shape)
        layer.backward(top, [True], bottom)
        results.append(bottom[0].diff.copy())
    assert count_winograd
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True)])
def test_environment_switch(value, expected):
    env = dict(os.environ, CAFFE_NUMPY_WINOGRAD=value)
    out = subprocess.run([sys.executable, "-c", "import layers.winograd as w; print(w.ENABLED)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
