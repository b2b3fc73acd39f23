"""Tests of layers/vision.py: Convolution, Deconvolution, Im2col, Pooling, SPP, Crop.

Forward passes are compared with slow loop references written here from the
definitions (and, for pooling, from Caffe's pooling_layer.cpp loops);
backward passes with the shared finite-difference checker.
"""
import math

import numpy as np
import pytest

from framework import random as frandom
from framework.blob import Blob
from framework.errors import LayerError
from gradient_check import check_gradient, layer_from_text, make_blob
from layers import parallel

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)
TEST = 1


def rand(*shape, seed=0, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def distinct(*shape, seed=0):
    """Values without ties, at least 0.05 apart (safe for max-pooling gradient checks)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.05 - n * 0.025).reshape(shape)


def run(text, *arrays, ntop=1, phase=0, dtype=np.float64, blobs=None):
    layer = layer_from_text(text, phase)
    if blobs is not None:
        layer.blobs = blobs
    bottom = [make_blob(a, dtype) for a in arrays]
    top = [Blob((), dtype=dtype) for _ in range(ntop)]
    layer.setup_layer(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


def conv_text(params, type_="Convolution", extra=""):
    return f'name: "c" type: "{type_}" {extra} convolution_param {{ {params} }}'


def gaussian(std=1.0):
    return f'weight_filler {{ type: "gaussian" std: {std} }} bias_filler {{ type: "uniform" min: -1 max: 1 }}'


# -----------------------------------------------------------------------------
# references
# -----------------------------------------------------------------------------

def ref_conv2d(x, w, b, stride=(1, 1), pad=(0, 0), dil=(1, 1), group=1):
    n_, c_, h, wd = x.shape
    m_, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    out = np.zeros((n_, m_, oh, ow))
    mg = m_ // group
    for n in range(n_):
        for m in range(m_):
            g = m // mg
            for i in range(oh):
                for j in range(ow):
                    total = 0.0
                    for c in range(cg):
                        for a in range(kh):
                            for bb in range(kw):
                                total += w[m, c, a, bb] * xp[n, g * cg + c, i * stride[0] + a * dil[0],
                                                            j * stride[1] + bb * dil[1]]
                    out[n, m, i, j] = total + (b[m] if b is not None else 0.0)
    return out


def ref_conv3d(x, w, b, stride, pad):
    n_, c_, d, h, wd = x.shape
    m_, cg, kd, kh, kw = w.shape
    sizes = [(s + 2 * p - k) // st + 1 for s, p, k, st in zip((d, h, wd), pad, (kd, kh, kw), stride)]
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple((p, p) for p in pad))
    out = np.zeros((n_, m_) + tuple(sizes))
    for n in range(n_):
        for m in range(m_):
            for i in range(sizes[0]):
                for j in range(sizes[1]):
                    for k in range(sizes[2]):
                        patch = xp[n, :, i * stride[0]:i * stride[0] + kd, j * stride[1]:j * stride[1] + kh,
                                   k * stride[2]:k * stride[2] + kw]
                        out[n, m, i, j, k] = np.sum(patch * w[m]) + b[m]
    return out


def ref_deconv2d(x, w, b, stride, pad, dil=(1, 1), group=1):
    n_, c_, h, wd = x.shape
    _, mg, kh, kw = w.shape
    m_ = mg * group
    cg = c_ // group
    oh = stride[0] * (h - 1) + dil[0] * (kh - 1) + 1 - 2 * pad[0]
    ow = stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1 - 2 * pad[1]
    out = np.zeros((n_, m_, oh, ow))
    for n in range(n_):
        for c in range(c_):
            g = c // cg
            for i in range(h):
                for j in range(wd):
                    for ml in range(mg):
                        for a in range(kh):
                            for bb in range(kw):
                                y = i * stride[0] - pad[0] + a * dil[0]
                                z = j * stride[1] - pad[1] + bb * dil[1]
                                if 0 <= y < oh and 0 <= z < ow:
                                    out[n, g * mg + ml, y, z] += x[n, c, i, j] * w[c, ml, a, bb]
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def ref_out_size(h, k, s, p, ceil):
    v = (h + 2 * p - k) / s
    return int(math.ceil(v) if ceil else math.floor(v)) + 1


def ref_pool(x, method, k, s, p, ceil=True):
    """Caffe's pooling_layer.cpp loops, output-size rule included; returns (top, mask)."""
    n_, c_, h, w = x.shape
    oh, ow = ref_out_size(h, k[0], s[0], p[0], ceil), ref_out_size(w, k[1], s[1], p[1], ceil)
    if p[0] or p[1]:
        if (oh - 1) * s[0] >= h + p[0]:
            oh -= 1
        if (ow - 1) * s[1] >= w + p[1]:
            ow -= 1
    top = np.zeros((n_, c_, oh, ow))
    mask = np.full((n_, c_, oh, ow), -1.0)
    for n in range(n_):
        for c in range(c_):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * s[0] - p[0], j * s[1] - p[1]
                    if method == "MAX":
                        he, we = min(hs + k[0], h), min(ws + k[1], w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, arg = -FLT_MAX, -1
                        for y in range(hs, he):
                            for z in range(ws, we):
                                if x[n, c, y, z] > best:
                                    best, arg = x[n, c, y, z], y * w + z
                        top[n, c, i, j], mask[n, c, i, j] = best, arg
                    else:
                        he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        top[n, c, i, j] = x[n, c, hs:he, ws:we].sum() / size
    return top, mask


def ref_stochastic_test(x, k, s):
    n_, c_, h, w = x.shape
    oh, ow = ref_out_size(h, k, s, 0, True), ref_out_size(w, k, s, 0, True)
    out = np.zeros((n_, c_, oh, ow))
    for n in range(n_):
        for c in range(c_):
            for i in range(oh):
                for j in range(ow):
                    win = x[n, c, i * s:min(i * s + k, h), j * s:min(j * s + k, w)]
                    out[n, c, i, j] = (win ** 2).sum() / (FLT_MIN + win.sum())
    return out


# -----------------------------------------------------------------------------
# Convolution forward
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("params, kw", [
    ("kernel_size: 3", {}),
    ("kernel_size: 3 pad: 1 stride: 2", dict(stride=(2, 2), pad=(1, 1))),
    ("kernel_size: 3 dilation: 2 pad: 2", dict(pad=(2, 2), dil=(2, 2))),
    ("kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", dict(stride=(2, 1), pad=(1, 0))),
    ("kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 0 pad: 1 dilation: 2 dilation: 1",
     dict(stride=(1, 2), pad=(0, 1), dil=(2, 1))),
])
def test_conv_forward_matches_reference(params, kw):
    x = rand(2, 4, 7, 6, seed=1)
    layer, bottom, top = run(conv_text(f"num_output: 3 {params} {gaussian()}"), x)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ref = ref_conv2d(x, w.astype(np.float64), b.astype(np.float64), **kw)
    assert top[0].shape == ref.shape
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-5)


def test_conv_group_and_odd_shapes_batch1():
    x = rand(1, 6, 5, 3, seed=2)
    layer, _, top = run(conv_text(f"num_output: 4 kernel_size: 2 group: 2 pad: 1 {gaussian()}"), x)
    assert layer.blobs[0].shape == (4, 3, 2, 2)
    ref = ref_conv2d(x, layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float),
                     pad=(1, 1), group=2)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-5)


def test_conv_1x1_is_plain_matmul_and_no_bias():
    x = rand(3, 5, 4, 3, seed=3)
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 1 bias_term: false {gaussian()}"), x)
    assert len(layer.blobs) == 1 and layer.geom.is_1x1
    ref = ref_conv2d(x, layer.blobs[0].data.astype(float), None)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-6, atol=1e-6)


def test_conv_1x1_with_stride_uses_im2col():
    x = rand(2, 3, 5, 5, seed=4)
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 1 stride: 2 {gaussian()}"), x)
    assert not layer.geom.is_1x1
    ref = ref_conv2d(x, layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float), stride=(2, 2))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-6, atol=1e-6)


def test_conv_3d():
    x = rand(2, 2, 4, 5, 3, seed=5)
    layer, _, top = run(conv_text(f"num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 2 "
                                  f"stride: 1 stride: 2 stride: 1 pad: 1 pad: 0 pad: 1 {gaussian()}"), x)
    assert layer.blobs[0].shape == (3, 2, 2, 3, 2)
    ref = ref_conv3d(x, layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float),
                     (1, 2, 1), (1, 0, 1))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-5)


def test_conv_force_nd_im2col_same_result():
    x = rand(2, 3, 5, 5, seed=6)
    frandom.set_random_seed(1)
    a, _, ta = run(conv_text(f"num_output: 2 kernel_size: 3 pad: 1 {gaussian()}"), x)
    frandom.set_random_seed(1)
    b, _, tb = run(conv_text(f"num_output: 2 kernel_size: 3 pad: 1 force_nd_im2col: true {gaussian()}"), x)
    np.testing.assert_array_equal(ta[0].data, tb[0].data)


def test_conv_axis_2_treats_leading_axes_as_batch():
    x = rand(2, 3, 4, 5, 5, seed=7)
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 3 axis: 2 {gaussian()}"), x)
    assert top[0].shape == (2, 3, 2, 3, 3)
    ref = ref_conv2d(x.reshape(6, 4, 5, 5), layer.blobs[0].data.astype(float),
                     layer.blobs[1].data.astype(float))
    np.testing.assert_allclose(top[0].data.reshape(6, 2, 3, 3), ref, rtol=1e-5, atol=1e-5)


def test_conv_no_spatial_axes_is_inner_product():
    x = rand(4, 6, seed=8)
    layer, _, top = run(conv_text(f"num_output: 3 {gaussian()}"), x)
    w, b = layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float)
    np.testing.assert_allclose(top[0].data, x @ w.T + b, rtol=1e-6, atol=1e-6)


def test_conv_multiple_bottoms_share_weights():
    x1, x2 = rand(2, 3, 4, 4, seed=9), rand(2, 3, 4, 4, seed=10)
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 3 {gaussian()}"), x1, x2, ntop=2)
    w, b = layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float)
    np.testing.assert_allclose(top[0].data, ref_conv2d(x1, w, b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(top[1].data, ref_conv2d(x2, w, b), rtol=1e-6, atol=1e-6)


def test_conv_float32_stays_float32():
    x = rand(2, 3, 6, 6, seed=11).astype(np.float32)
    layer, _, top = run(conv_text(f"num_output: 4 kernel_size: 3 pad: 1 {gaussian()}"), x, dtype=np.float32)
    assert top[0].data.dtype == np.float32
    ref = ref_conv2d(x.astype(float), layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float),
                     pad=(1, 1))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-4, atol=1e-4)


def test_conv_input_smaller_than_kernel_uses_c_division():
    # conv_layer.cpp: (3 + 0 - 4) / 2 + 1 == 1 in C (truncation), the window reads zeros past the edge
    x = rand(1, 1, 3, 3, seed=12)
    layer, _, top = run(conv_text(f"num_output: 1 kernel_size: 4 stride: 2 {gaussian()}"), x)
    assert top[0].shape == (1, 1, 1, 1)
    w, b = layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float)
    np.testing.assert_allclose(top[0].data.ravel(), [np.sum(w[0, 0, :3, :3] * x[0, 0]) + b[0]], rtol=1e-6)


def test_conv_batch_chunking_matches(monkeypatch):
    import layers.vision as vision
    x = rand(5, 3, 6, 6, seed=13)
    frandom.set_random_seed(2)
    _, _, whole = run(conv_text(f"num_output: 4 kernel_size: 3 pad: 1 {gaussian()}"), x)
    monkeypatch.setattr(vision, "COL_BUFFER_BYTES", 1)  # one image per chunk
    frandom.set_random_seed(2)
    layer, bottom, top = run(conv_text(f"num_output: 4 kernel_size: 3 pad: 1 {gaussian()}"), x)
    np.testing.assert_allclose(top[0].data, whole[0].data, rtol=1e-12)
    check_gradient(layer, bottom, top, setup=False)


# -----------------------------------------------------------------------------
# Convolution parameters: fillers and preloaded blobs
# -----------------------------------------------------------------------------

def test_conv_fillers_are_honoured():
    layer, _, _ = run(conv_text('num_output: 3 kernel_size: 2 weight_filler { type: "constant" value: 0.5 } '
                                'bias_filler { type: "constant" value: -2 }'), rand(1, 2, 3, 3))
    assert layer.blobs[0].shape == (3, 2, 2, 2) and layer.blobs[0].dtype == np.float32
    assert np.all(layer.blobs[0].data == 0.5) and np.all(layer.blobs[1].data == -2)


def test_conv_default_fillers_are_zero_and_gaussian_std():
    layer, _, _ = run(conv_text("num_output: 2 kernel_size: 1"), rand(1, 2, 2, 2))
    assert np.all(layer.blobs[0].data == 0) and np.all(layer.blobs[1].data == 0)
    frandom.set_random_seed(0)
    layer, _, _ = run(conv_text('num_output: 64 kernel_size: 5 weight_filler { type: "gaussian" std: 0.1 }'),
                      rand(1, 8, 5, 5))
    assert abs(layer.blobs[0].data.std() - 0.1) < 0.005


def test_conv_preloaded_weights_used():
    w = Blob((2, 3, 1, 1))
    w.data[...] = rand(2, 3, 1, 1, seed=3)
    bias = Blob((2,))
    bias.data[...] = [1.0, -1.0]
    x = rand(2, 3, 2, 2, seed=4)
    layer, _, top = run(conv_text("num_output: 2 kernel_size: 1"), x, blobs=[w, bias])
    assert layer.blobs[0] is w
    np.testing.assert_allclose(top[0].data, ref_conv2d(x, w.data.astype(float), bias.data.astype(float)),
                               rtol=1e-6)


def test_conv_preloaded_weight_shape_mismatch_names_layer_and_shapes():
    with pytest.raises(LayerError, match=r"'c'.*expected shape \(2, 3, 3, 3\).*\(2, 3, 1, 1\)"):
        run(conv_text("num_output: 2 kernel_size: 3"), rand(1, 3, 4, 4),
            blobs=[Blob((2, 3, 1, 1)), Blob((2,))])


def test_conv_preloaded_bias_shape_mismatch():
    with pytest.raises(LayerError, match=r"'c'.*bias shape.*\(2,\).*\(3,\)"):
        run(conv_text("num_output: 2 kernel_size: 1"), rand(1, 3, 4, 4), blobs=[Blob((2, 3, 1, 1)), Blob((3,))])


def test_conv_preloaded_wrong_blob_count():
    with pytest.raises(LayerError, match=r"'c'.*number of weight blobs.*expected 2.*got 1"):
        run(conv_text("num_output: 2 kernel_size: 1"), rand(1, 3, 4, 4), blobs=[Blob((2, 3, 1, 1))])


def test_deconv_preloaded_weight_shape_is_reversed():
    with pytest.raises(LayerError, match=r"expected shape \(6, 2, 2, 2\)"):
        run(conv_text("num_output: 4 kernel_size: 2 group: 2", "Deconvolution"), rand(1, 6, 3, 3),
            blobs=[Blob((4, 3, 2, 2)), Blob((4,))])


# -----------------------------------------------------------------------------
# Convolution errors
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("params, pattern", [
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "kernel_size or kernel_h"),
    ("num_output: 2 kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", "pad or pad_h"),
    ("num_output: 2 kernel_size: 3 stride: 1 stride_h: 1 stride_w: 1", "stride or stride_h"),
    ("num_output: 2 kernel_size: 0", "nonzero"),
    ("num_output: 2 kernel_h: 3", "nonzero"),
    ("num_output: 2", r"kernel_size must be specified once.*0 times"),
    ("num_output: 2 kernel_size: 1 kernel_size: 2 kernel_size: 3", "kernel_size must be specified once"),
    ("num_output: 2 kernel_size: 3 stride: 1 stride: 1 stride: 1", "stride must be specified once"),
    ("num_output: 2 kernel_size: 3 pad: 1 pad: 1 pad: 1", "pad must be specified once"),
    ("num_output: 2 kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", "dilation must be specified once"),
    ("num_output: 2 kernel_size: 3 dilation: 0", "dilation must be nonzero"),
    ("num_output: 2 kernel_size: 3 stride: 0", "stride must be at least 1"),
    ("num_output: 2 kernel_size: 3 stride_h: 2", "stride must be at least 1"),
    ("num_output: 0 kernel_size: 3", "num_output must be positive, got 0"),
    ("kernel_size: 3", "num_output must be positive"),
    ("num_output: 2 kernel_size: 3 group: 0", "group must be positive"),
    ("num_output: 2 kernel_size: 1 group: 2", r"input channels \(3\).*group \(2\)"),
    ("num_output: 4 kernel_size: 1 group: 3", r"num_output \(4\).*group \(3\)"),
    ("num_output: 2 kernel_size: 5", "output size"),
    ("num_output: 2 kernel_size: 3 axis: 4", "axis 4"),
])
def test_conv_errors(params, pattern):
    with pytest.raises(LayerError, match=r"layer 'c' \(type Convolution\).*" + pattern):
        run(conv_text(params), rand(1, 3, 3, 3))


def test_conv_kernel_h_for_3d_input_is_an_error():
    with pytest.raises(LayerError, match="kernel_h & kernel_w can only be used for 2-D"):
        run(conv_text("num_output: 2 kernel_h: 1 kernel_w: 1"), rand(1, 2, 3, 3, 3))
    with pytest.raises(LayerError, match="pad_h & pad_w can only be used for 2-D"):
        run(conv_text("num_output: 2 kernel_size: 1 pad_h: 1"), rand(1, 2, 3, 3, 3))


def test_conv_reshape_errors():
    layer, bottom, top = run(conv_text(f"num_output: 2 kernel_size: 1 {gaussian()}"), rand(1, 3, 3, 3))
    with pytest.raises(LayerError, match=r"'c'.*expected 3 channels"):
        layer.reshape([make_blob(rand(1, 4, 3, 3))], top)
    with pytest.raises(LayerError, match=r"'c'.*num_axes may not change"):
        layer.reshape([make_blob(rand(1, 3, 3))], top)
    layer, bottom, top = run(conv_text(f"num_output: 2 kernel_size: 1 {gaussian()}"),
                             rand(1, 3, 3, 3), rand(1, 3, 3, 3), ntop=2)
    with pytest.raises(LayerError, match="same shape"):
        layer.reshape([bottom[0], make_blob(rand(1, 3, 4, 3))], top)


def test_conv_reshape_to_new_spatial_size():
    layer, bottom, top = run(conv_text(f"num_output: 2 kernel_size: 3 pad: 1 stride: 2 {gaussian()}"),
                             rand(1, 3, 5, 5))
    x = rand(2, 3, 8, 7, seed=3)
    b = [make_blob(x)]
    layer.reshape(b, top)
    layer.forward(b, top)
    ref = ref_conv2d(x, layer.blobs[0].data.astype(float), layer.blobs[1].data.astype(float),
                     stride=(2, 2), pad=(1, 1))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Convolution / Deconvolution gradients
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("params, shape", [
    ("num_output: 3 kernel_size: 3 pad: 1 stride: 2", (2, 2, 5, 4)),
    ("num_output: 4 kernel_size: 2 group: 2 dilation: 2 pad: 1", (1, 4, 4, 5)),
    ("num_output: 2 kernel_size: 1", (2, 3, 3, 2)),
    ("num_output: 2 kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1", (1, 2, 4, 3)),
    ("num_output: 2 kernel_size: 2 bias_term: false", (1, 2, 3, 3)),
])
def test_conv_gradient(params, shape):
    layer = layer_from_text(conv_text(f"{params} {gaussian()}"))
    bottom, top = [make_blob(rand(*shape, seed=5))], [Blob()]
    check_gradient(layer, bottom, top)


def test_conv3d_gradient():
    layer = layer_from_text(conv_text(f"num_output: 2 kernel_size: 2 pad: 1 stride: 2 {gaussian()}"))
    check_gradient(layer, [make_blob(rand(1, 2, 3, 3, 2, seed=6))], [Blob()])


def test_conv_gradient_two_bottoms_accumulates_params():
    layer = layer_from_text(conv_text(f"num_output: 2 kernel_size: 2 {gaussian()}"))
    check_gradient(layer, [make_blob(rand(1, 2, 3, 3, seed=1)), make_blob(rand(1, 2, 3, 3, seed=2))],
                   [Blob(), Blob()])


def test_conv_param_diffs_accumulate_and_bottom_diff_assigned():
    layer, bottom, top = run(conv_text(f"num_output: 2 kernel_size: 2 {gaussian()}"), rand(1, 2, 3, 3))
    top[0].diff[...] = 1.0
    bottom[0].diff[...] = 123.0
    layer.backward(top, [True], bottom)
    first_w, first_dx = layer.blobs[0].diff.copy(), bottom[0].diff.copy()
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first_w)
    np.testing.assert_allclose(bottom[0].diff, first_dx)
    bottom[0].diff[...] = 7.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)


@pytest.mark.parametrize("params, kw", [
    ("num_output: 3 kernel_size: 3 stride: 2 pad: 1", dict(stride=(2, 2), pad=(1, 1))),
    ("num_output: 4 kernel_size: 2 stride: 1 group: 2", dict(stride=(1, 1), pad=(0, 0), group=2)),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 dilation: 2",
     dict(stride=(2, 3), pad=(1, 0), dil=(2, 2))),
    ("num_output: 2 kernel_size: 1 bias_term: false", dict(stride=(1, 1), pad=(0, 0))),
])
def test_deconv_forward_matches_reference(params, kw):
    x = rand(2, 4, 3, 4, seed=3)
    layer, _, top = run(conv_text(f"{params} {gaussian()}", "Deconvolution"), x)
    b = layer.blobs[1].data.astype(float) if len(layer.blobs) > 1 else None
    ref = ref_deconv2d(x, layer.blobs[0].data.astype(float), b, **kw)
    assert top[0].shape == ref.shape
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-5, atol=1e-6)


def test_deconv_bilinear_upsampling():
    # the classic FCN upsampler: kernel 4, stride 2, pad 1, bilinear weights, group = channels
    x = rand(1, 2, 3, 3, seed=4)
    layer, _, top = run(conv_text('num_output: 2 kernel_size: 4 stride: 2 pad: 1 group: 2 bias_term: false '
                                  'weight_filler { type: "bilinear" }', "Deconvolution"), x)
    assert top[0].shape == (1, 2, 6, 6)
    ref = ref_deconv2d(x, layer.blobs[0].data.astype(float), None, (2, 2), (1, 1), group=2)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-6)
    # interior pixels interpolate: the mean is preserved away from the border
    const, _, tc = run(conv_text('num_output: 1 kernel_size: 4 stride: 2 pad: 1 bias_term: false '
                                 'weight_filler { type: "bilinear" }', "Deconvolution"), np.ones((1, 1, 4, 4)))
    np.testing.assert_allclose(tc[0].data[0, 0, 1:-1, 1:-1], 1.0)


@pytest.mark.parametrize("params, shape", [
    ("num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 3, 2)),
    ("num_output: 4 kernel_size: 2 group: 2 dilation: 2", (1, 4, 2, 3)),
    ("num_output: 2 kernel_size: 1", (1, 3, 2, 3)),
])
def test_deconv_gradient(params, shape):
    layer = layer_from_text(conv_text(f"{params} {gaussian()}", "Deconvolution"))
    check_gradient(layer, [make_blob(rand(*shape, seed=8))], [Blob()])


def test_deconv3d_shape_and_gradient():
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 2 stride: 2 pad: 1 {gaussian()}", "Deconvolution"),
                        rand(1, 3, 2, 3, 2))
    assert top[0].shape == (1, 2, 2, 4, 2)  # 2·(S − 1) + 2 − 2
    layer = layer_from_text(conv_text(f"num_output: 2 kernel_size: 2 stride: 2 {gaussian()}", "Deconvolution"))
    check_gradient(layer, [make_blob(rand(1, 2, 2, 2, 2, seed=3))], [Blob()])


def test_deconv_is_adjoint_of_conv():
    # <conv(x), y> == <x, deconv(y)> with shared weights and no bias
    x, y = rand(2, 3, 5, 5, seed=1), rand(2, 4, 3, 3, seed=2)
    conv, _, tc = run(conv_text(f"num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 1 bias_term: false "
                                f"{gaussian()}"), x)
    w = Blob(conv.blobs[0].shape)
    w.data[...] = conv.blobs[0].data
    deconv, _, td = run(conv_text("num_output: 3 kernel_size: 3 stride: 2 pad: 1 bias_term: false",
                                  "Deconvolution"), y, blobs=[w])
    assert tc[0].shape == y.shape and td[0].shape == x.shape  # 5 -> 3 -> 5
    lhs = np.sum(tc[0].data * y)
    rhs = np.sum(x * td[0].data)
    assert abs(lhs - rhs) < 1e-4 * max(1, abs(lhs))


def test_deconv_errors():
    with pytest.raises(LayerError, match=r"\(type Deconvolution\).*num_output must be positive"):
        run(conv_text("num_output: 0 kernel_size: 2", "Deconvolution"), rand(1, 2, 3, 3))
    with pytest.raises(LayerError, match=r"\(type Deconvolution\).*output size"):
        run(conv_text("num_output: 1 kernel_size: 1 pad: 1", "Deconvolution"), rand(1, 2, 1, 1))


# -----------------------------------------------------------------------------
# Im2col
# -----------------------------------------------------------------------------

def test_im2col_forward_matches_caffe_ordering():
    x = rand(2, 3, 5, 4, seed=1)
    layer, _, top = run('name: "i" type: "Im2col" convolution_param { kernel_h: 2 kernel_w: 3 pad: 1 '
                        'stride: 2 dilation: 1 }', x)
    n_, c_, h, w = x.shape
    kh, kw, s, p = 2, 3, 2, 1
    oh, ow = (h + 2 - kh) // s + 1, (w + 2 - kw) // s + 1
    assert top[0].shape == (2, c_ * kh * kw, oh, ow)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    for n in range(n_):
        for c in range(c_):
            for a in range(kh):
                for b in range(kw):
                    row = (c * kh + a) * kw + b  # Caffe: channel-major, then kernel row, kernel column
                    for i in range(oh):
                        for j in range(ow):
                            assert top[0].data[n, row, i, j] == xp[n, c, i * s + a, j * s + b]


def test_im2col_dilated_gradient_and_1d():
    layer = layer_from_text('type: "Im2col" convolution_param { kernel_size: 2 dilation: 2 pad: 1 stride: 1 }')
    check_gradient(layer, [make_blob(rand(1, 2, 4, 3, seed=2))], [Blob()])
    layer, _, top = run('type: "Im2col" convolution_param { kernel_size: 2 }', rand(2, 3, 4, seed=3))
    assert top[0].shape == (2, 6, 3)
    np.testing.assert_array_equal(top[0].data[:, 1::2], rand(2, 3, 4, seed=3)[:, :, 1:])


def test_im2col_errors():
    with pytest.raises(LayerError, match=r"\(type Im2col\).*spatial axis"):
        run('name: "i" type: "Im2col" convolution_param { kernel_size: 1 }', rand(2, 3))
    with pytest.raises(LayerError, match=r"\(type Im2col\).*nonzero"):
        run('name: "i" type: "Im2col" convolution_param { kernel_size: 0 }', rand(2, 3, 3, 3))


# -----------------------------------------------------------------------------
# Pooling forward
# -----------------------------------------------------------------------------

def pool_text(params, name="p"):
    return f'name: "{name}" type: "Pooling" pooling_param {{ {params} }}'


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("params, k, s, p, ceil", [
    ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    ("kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True),
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False),
    ("kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), False),
    ("kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0", (3, 2), (1, 2), (1, 0), True),
    ("kernel_size: 2 stride: 3 pad: 1", (2, 2), (3, 3), (1, 1), True),
])
def test_pooling_forward_matches_caffe_loops(method, params, k, s, p, ceil):
    x = distinct(2, 3, 6, 5, seed=1)
    layer, _, top = run(pool_text(f"pool: {method} {params}"), x, ntop=2 if method == "MAX" else 1)
    ref, mask = ref_pool(x, method, k, s, p, ceil)
    assert top[0].shape == ref.shape
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12, atol=1e-14)
    if method == "MAX":
        np.testing.assert_array_equal(top[1].data, mask)


@pytest.mark.parametrize("h, k, s, p, ceil, expected", [
    (6, 3, 2, 0, True, 3),    # ceil((6 - 3) / 2) + 1
    (6, 3, 2, 0, False, 2),   # floor
    (5, 2, 2, 1, True, 3),    # ceil(5/2)+1 = 4, but (4-1)*2 >= 5+1: the last window would start in padding
    (7, 3, 2, 1, True, 4),    # ceil(6/2)+1 = 4 and 3*2 < 8: kept
    (4, 3, 2, 1, True, 3),    # ceil(1.5)+1 = 3, 2*2 < 5: kept
    (1, 1, 1, 0, True, 1),
])
def test_pooling_output_size_rule(h, k, s, p, ceil, expected):
    mode = "" if ceil else "round_mode: FLOOR"
    _, _, top = run(pool_text(f"pool: AVE kernel_size: {k} stride: {s} pad: {p} {mode}"), rand(1, 1, h, h))
    assert top[0].shape == (1, 1, expected, expected)


def test_pooling_padding_correction_applies_to_both_axes():
    # pooling_layer.cpp checks "if (pad_h_ || pad_w_)": pad_h alone also trims the width
    # width: ceil((5 - 1) / 3) + 1 = 3, (3 - 1) * 3 = 6 >= 5 + 0 -> 2
    _, _, top = run(pool_text("kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 3 pad_h: 1 pad_w: 0"),
                    rand(1, 1, 5, 5))
    assert top[0].shape == (1, 1, 5, 2)
    # without padding the width keeps 3 outputs; the last window lies past the image:
    # Caffe leaves it at -FLT_MAX with mask -1
    x = distinct(1, 1, 5, 5)
    _, _, top = run(pool_text("kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 3"), x, ntop=2)
    assert top[0].shape == (1, 1, 3, 3)
    assert np.all(top[0].data[..., 2] == np.float64(-FLT_MAX)) and np.all(top[1].data[..., 2] == -1)
    ref, mask = ref_pool(x, "MAX", (3, 1), (1, 3), (0, 0))
    np.testing.assert_array_equal(top[0].data, ref)


def test_ave_pooling_divisor_counts_padding_not_overhang():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    _, _, top = run(pool_text("pool: AVE kernel_size: 3 stride: 2 pad: 1"), x)
    # window rows: [-1, 2) -> size 3; [1, 4) -> 3; [3, 6) clipped at H+p = 5 -> 2 (sum over row 3 only)
    assert top[0].shape == (1, 1, 3, 3)
    assert top[0].data[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 9)
    assert top[0].data[0, 0, 2, 2] == pytest.approx(15 / 4)
    assert top[0].data[0, 0, 1, 2] == pytest.approx((7 + 11 + 15) / 6)


def test_max_pooling_ties_go_to_first_and_padding_never_wins():
    x = -np.ones((1, 1, 3, 3))
    x[0, 0, 1, 1] = -0.5
    x[0, 0, 2, 2] = -0.5
    _, _, top = run(pool_text("kernel_size: 3 stride: 1 pad: 1"), x, ntop=2)
    assert np.all(top[0].data < 0)  # the zero padding never wins over negative values
    # window centred at (1, 1) holds both -0.5: the first in row-major order wins
    assert top[1].data[0, 0, 1, 1] == 4 and top[1].data[0, 0, 2, 2] == 4
    _, _, top = run(pool_text("kernel_size: 2 stride: 1"), np.zeros((1, 1, 2, 3)), ntop=2)
    np.testing.assert_array_equal(top[1].data, [[[[0, 1]]]])


def test_global_pooling():
    x = rand(2, 3, 4, 5, seed=3)
    _, _, top = run(pool_text("pool: AVE global_pooling: true"), x)
    np.testing.assert_allclose(top[0].data, x.mean(axis=(2, 3), keepdims=True))
    layer, bottom, top = run(pool_text("pool: MAX global_pooling: true"), x)
    np.testing.assert_allclose(top[0].data, x.max(axis=(2, 3), keepdims=True))
    bigger = [make_blob(rand(1, 3, 6, 2, seed=4))]
    layer.reshape(bigger, top)
    layer.forward(bigger, top)
    np.testing.assert_allclose(top[0].data, bigger[0].data.max(axis=(2, 3), keepdims=True))


def test_max_pooling_mask_with_many_taps_and_test_phase_backward():
    # 144-tap global window (wider mask code) and a TEST-phase backward that recomputes the argmax
    x = distinct(2, 3, 12, 12, seed=6)
    layer, bottom, top = run(pool_text("global_pooling: true"), x, ntop=2, phase=TEST)
    flat = x.reshape(2, 3, -1)
    np.testing.assert_array_equal(top[1].data.reshape(2, 3), flat.argmax(axis=2))
    layer, bottom, top = run(pool_text("kernel_size: 5 stride: 3 pad: 2"), x, phase=TEST)
    assert layer.pool.mask is None
    check_gradient(layer, bottom, top, setup=False)


def test_pooling_float32_and_batch1():
    x = distinct(1, 2, 5, 7, seed=5).astype(np.float32)
    _, _, top = run(pool_text("pool: AVE kernel_size: 3 stride: 2 pad: 1"), x, dtype=np.float32)
    assert top[0].data.dtype == np.float32
    ref, _ = ref_pool(x.astype(float), "AVE", (3, 3), (2, 2), (1, 1))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# Stochastic pooling
# -----------------------------------------------------------------------------

def test_stochastic_test_phase_formula():
    x = rand(2, 2, 5, 5, seed=2, low=0.0, high=1.0)
    _, _, top = run(pool_text("pool: STOCHASTIC kernel_size: 3 stride: 2"), x, phase=TEST)
    np.testing.assert_allclose(top[0].data, ref_stochastic_test(x, 3, 2), rtol=1e-12)
    _, _, top = run(pool_text("pool: STOCHASTIC kernel_size: 2 stride: 2"), np.zeros((1, 1, 3, 3)), phase=TEST)
    assert np.all(top[0].data == 0)  # FLT_MIN keeps 0/0 away


def test_stochastic_train_samples_window_members():
    frandom.set_random_seed(5)
    x = rand(2, 3, 7, 6, seed=4, low=0.1, high=1.0)
    layer, bottom, top = run(pool_text("pool: STOCHASTIC kernel_size: 3 stride: 2"), x)
    n_, c_, oh, ow = top[0].shape
    assert (oh, ow) == (3, 3)  # ceil((7-3)/2)+1, ceil((6-3)/2)+1
    for n in range(n_):
        for c in range(c_):
            for i in range(oh):
                for j in range(ow):
                    win = x[n, c, 2 * i:min(2 * i + 3, 7), 2 * j:min(2 * j + 3, 6)]
                    assert top[0].data[n, c, i, j] in win
    # the gradient flows to exactly the sampled element
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    assert bottom[0].diff.sum() == pytest.approx(top[0].count)
    picked = bottom[0].diff > 0
    assert set(np.round(top[0].data.ravel(), 12)) == set(np.round(x[picked], 12))


def test_stochastic_train_probability_proportional_to_activation():
    frandom.set_random_seed(11)
    x = np.tile(np.array([[1.0, 3.0]]), (20000, 1)).reshape(20000, 1, 1, 2)
    _, _, top = run(pool_text("pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 2"), x)
    freq = np.mean(top[0].data.ravel() == 3.0)
    assert abs(freq - 0.75) < 0.02


def test_stochastic_train_gradient():
    x = rand(1, 2, 5, 4, seed=6, low=0.5, high=1.5)
    layer = layer_from_text(pool_text("pool: STOCHASTIC kernel_size: 2 stride: 2"))
    check_gradient(layer, [make_blob(x)], [Blob()], reseed=lambda: frandom.set_random_seed(9))


def test_stochastic_test_backward_is_an_error():
    layer, bottom, top = run(pool_text("pool: STOCHASTIC kernel_size: 2"), rand(1, 1, 3, 3, low=0, high=1),
                             phase=TEST)
    with pytest.raises(LayerError, match=r"'p'.*STOCHASTIC pooling has no backward in the TEST phase"):
        layer.backward(top, [True], bottom)


# -----------------------------------------------------------------------------
# Pooling gradients and errors
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("params, ntop", [
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", 1),
    ("pool: MAX kernel_size: 2 stride: 1", 2),
    ("pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1", 1),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", 1),
    ("pool: AVE kernel_size: 2 stride: 3 pad: 1 round_mode: FLOOR", 1),
    ("pool: AVE global_pooling: true", 1),
])
def test_pooling_gradient(params, ntop):
    layer = layer_from_text(pool_text(params))
    top = [Blob() for _ in range(ntop)]
    check_gradient(layer, [make_blob(distinct(2, 2, 5, 4, seed=7))], top,
                   top_weights=[True, False][:ntop])


def test_max_pooling_backward_reads_mask_top():
    layer, bottom, top = run(pool_text("kernel_size: 2 stride: 2"), distinct(1, 1, 2, 4), ntop=2)
    top[1].data[...] = [[[[3, 6]]]]  # Caffe's backward uses whatever top[1] holds
    top[0].diff[...] = [[[[1.5, 2.5]]]]
    layer.backward(top, [True], bottom)
    expected = np.zeros(8)
    expected[3], expected[6] = 1.5, 2.5
    np.testing.assert_array_equal(bottom[0].diff.ravel(), expected)


@pytest.mark.parametrize("params, ntop, pattern", [
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, "kernel_size OR kernel_h"),
    ("kernel_h: 2", 1, "both kernel_h and kernel_w"),
    ("stride: 2", 1, "needs kernel_size"),
    ("kernel_size: 0", 1, "cannot be zero"),
    ("global_pooling: true kernel_size: 2", 1, "filter size cannot be specified"),
    ("global_pooling: true pad: 1", 1, "only pad = 0 and stride = 1"),
    ("global_pooling: true stride: 2", 1, "only pad = 0 and stride = 1"),
    ("kernel_size: 2 pad: 2", 1, r"pad must be smaller than the kernel: pad \(2, 2\)"),
    ("kernel_size: 3 pad_h: 1 pad_w: 3", 1, "pad must be smaller"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", 1, "padding is implemented only for average and max"),
    ("kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", 1, "pad is pad OR pad_h and pad_w"),
    ("kernel_size: 2 pad_h: 1", 1, "pad is pad OR pad_h and pad_w"),
    ("kernel_size: 2 stride_w: 1", 1, "stride is stride OR stride_h and stride_w"),
    ("kernel_size: 2 stride: 0", 1, "stride must be positive"),
    ("pool: AVE kernel_size: 2", 2, "only MAX pooling can produce a second"),
    ("kernel_size: 2", 3, "at most 2 top"),
])
def test_pooling_errors(params, ntop, pattern):
    with pytest.raises(LayerError, match=r"layer 'p' \(type Pooling\).*" + pattern):
        run(pool_text(params), rand(1, 1, 4, 4), ntop=ntop)


def test_pooling_needs_4d_input():
    with pytest.raises(LayerError, match=r"'p'.*4 axes.*\(1, 4, 4\)"):
        run(pool_text("kernel_size: 2"), rand(1, 4, 4))


def test_pooling_kernel_larger_than_input():
    # ceil((2 - 3) / 1) + 1 = 0 outputs: refused with a clear error
    with pytest.raises(LayerError, match=r"'p'.*pooled output"):
        run(pool_text("kernel_size: 4 stride: 1 round_mode: FLOOR"), rand(1, 1, 2, 2))


# -----------------------------------------------------------------------------
# SPP
# -----------------------------------------------------------------------------

def ref_spp(x, levels, method):
    n_, c_, h, w = x.shape
    parts = []
    for level in range(levels):
        bins = 2 ** level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        out, _ = ref_pool(x, method, (kh, kw), (kh, kw), (ph, pw))
        parts.append(out)
    if levels == 1:
        return parts[0]
    return np.concatenate([p.reshape(n_, -1) for p in parts], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("levels, shape", [(3, (2, 3, 9, 7)), (2, (1, 2, 5, 5)), (1, (2, 2, 3, 4))])
def test_spp_forward(method, levels, shape):
    x = distinct(*shape, seed=2)
    _, _, top = run(f'name: "s" type: "SPP" spp_param {{ pyramid_height: {levels} pool: {method} }}', x)
    ref = ref_spp(x, levels, method)
    assert top[0].shape == ref.shape
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12, atol=1e-14)


def test_spp_output_length_and_reshape():
    layer, bottom, top = run('type: "SPP" spp_param { pyramid_height: 3 }', rand(2, 4, 8, 8))
    assert top[0].shape == (2, 4 * (1 + 4 + 16))
    b = [make_blob(distinct(1, 4, 13, 6, seed=3))]
    layer.reshape(b, top)
    layer.forward(b, top)
    np.testing.assert_allclose(top[0].data, ref_spp(b[0].data, 3, "MAX"))


@pytest.mark.parametrize("method, phase", [("MAX", 0), ("AVE", 0), ("MAX", TEST)])
def test_spp_gradient(method, phase):
    layer = layer_from_text(f'type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}', phase)
    check_gradient(layer, [make_blob(distinct(1, 2, 6, 7, seed=4))], [Blob()])


def test_spp_errors():
    with pytest.raises(LayerError, match=r"'s' \(type SPP\).*pyramid_height must be at least 1, got 0"):
        run('name: "s" type: "SPP" spp_param { }', rand(1, 1, 4, 4))
    with pytest.raises(LayerError, match=r"'s'.*4 axes"):
        run('name: "s" type: "SPP" spp_param { pyramid_height: 1 }', rand(1, 4, 4))
    # level 1 on a 3-row input: kernel 2, pad 1: stochastic pooling cannot pad
    with pytest.raises(LayerError, match=r"'s'.*padding is implemented only"):
        run('name: "s" type: "SPP" spp_param { pyramid_height: 2 pool: STOCHASTIC }', rand(1, 1, 3, 3))
    # level 2 on a 1-row input: kernel 1, pad 2 >= kernel
    with pytest.raises(LayerError, match=r"'s'.*pad must be smaller"):
        run('name: "s" type: "SPP" spp_param { pyramid_height: 3 }', rand(1, 1, 1, 8))


# -----------------------------------------------------------------------------
# Crop
# -----------------------------------------------------------------------------

def crop_text(params):
    return f'name: "k" type: "Crop" crop_param {{ {params} }}'


@pytest.mark.parametrize("params, expected_slices", [
    ("", (slice(None), slice(None), slice(0, 3), slice(0, 2))),
    ("offset: 1", (slice(None), slice(None), slice(1, 4), slice(1, 3))),
    ("offset: 2 offset: 0", (slice(None), slice(None), slice(2, 5), slice(0, 2))),
    ("axis: 1 offset: 1 offset: 2 offset: 3", (slice(None), slice(1, 3), slice(2, 5), slice(3, 5))),
    ("axis: -1 offset: 3", (slice(None), slice(None), slice(None), slice(3, 5))),
])
def test_crop_forward_and_gradient(params, expected_slices):
    x = rand(2, 4, 5, 6, seed=1)
    ref_shape = (2, 2, 3, 2)
    layer, bottom, top = run(crop_text(params), x, np.zeros(ref_shape))
    np.testing.assert_array_equal(top[0].data, x[expected_slices])
    layer = layer_from_text(crop_text(params))
    check_gradient(layer, [make_blob(x), make_blob(np.zeros(ref_shape))], [Blob()], check_bottom=[0])


def test_crop_backward_zero_outside_and_for_reference_bottom():
    layer, bottom, top = run(crop_text("offset: 1"), rand(1, 1, 4, 4), np.zeros((1, 1, 2, 2)))
    top[0].diff[...] = 1.0
    bottom[0].diff[...] = 5.0
    bottom[1].diff[...] = 5.0
    layer.backward(top, [True, True], bottom)
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(bottom[0].diff[0, 0], expected)
    assert np.all(bottom[1].diff == 0)


@pytest.mark.parametrize("params, ref_shape, pattern", [
    ("offset: 1 offset: 1 offset: 1", (1, 2, 2, 2), "number of offset values specified"),
    ("offset: 3", (1, 2, 2, 2), r"crop for dimension 2 is out of bounds with size 2 and offset 3"),
    ("axis: 0", (2, 2, 2, 2), "crop for dimension 0"),
    ("axis: 4", (1, 2, 2, 2), "axis 4 is out of range"),
    ("", (1, 2, 2), "fewer axes"),
])
def test_crop_errors(params, ref_shape, pattern):
    with pytest.raises(LayerError, match=r"layer 'k' \(type Crop\).*" + pattern):
        run(crop_text(params), rand(1, 2, 4, 4), np.zeros(ref_shape))


# -----------------------------------------------------------------------------
# fast paths: GEMM layouts, chunking, threaded copies, separable max pooling
# -----------------------------------------------------------------------------

def ref_conv2d_grads(x, w, dy, stride=(1, 1), pad=(0, 0), dil=(1, 1), group=1):
    """Loop reference of the convolution's gradients: (dW, db, dx) for upstream dy."""
    n_, c_, h, wd = x.shape
    m_, cg, kh, kw = w.shape
    _, _, oh, ow = dy.shape
    mg = m_ // group
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for n in range(n_):
        for m in range(m_):
            g = m // mg
            for i in range(oh):
                for j in range(ow):
                    for c in range(cg):
                        for a in range(kh):
                            for b in range(kw):
                                y, z = i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]
                                dw[m, c, a, b] += dy[n, m, i, j] * xp[n, g * cg + c, y, z]
                                dxp[n, g * cg + c, y, z] += dy[n, m, i, j] * w[m, c, a, b]
    dx = dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd]
    return dw, dy.sum(axis=(0, 2, 3)), dx


@pytest.fixture(params=["per_image", "merged", "position_major", "position_major_wide"])
def conv_layout(request, monkeypatch):
    """Force one GEMM layout, small chunks and threaded copies of any size.

    position_major: batch-merged maps with kernels > 1x1 in the position-major layout
    (1x1 kernels stay batch-merged), one output row per block; _wide: its weight gradient
    as the untransposed GEMM, all rows in one block.
    """
    from layers import vision
    monkeypatch.setattr(vision, "MERGE_BELOW_OUT", 0 if request.param == "per_image" else 10 ** 9)
    monkeypatch.setattr(vision, "POSITION_MAJOR", request.param.startswith("position_major"))
    monkeypatch.setattr(vision, "THIN_WGRAD_OUTPUTS", 0 if request.param.endswith("_wide") else 64)
    monkeypatch.setattr(vision, "PM_BLOCK_BYTES", 1 if request.param == "position_major" else 1 << 30)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    return request.param


@pytest.mark.parametrize("params, kw, shape", [
    ("num_output: 4 kernel_size: 1", {}, (3, 5, 4, 3)),
    ("num_output: 4 kernel_size: 1 stride: 2", {"stride": (2, 2)}, (3, 5, 5, 4)),
    ("num_output: 6 kernel_size: 3 pad: 1", {"pad": (1, 1)}, (3, 4, 5, 6)),
    ("num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 2 stride: 2",
     {"pad": (2, 2), "dil": (2, 2), "group": 2, "stride": (2, 2)}, (2, 4, 7, 6)),
    ("num_output: 3 kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0", {"pad": (1, 0)}, (1, 2, 4, 5)),
])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_conv_layouts_forward_and_backward_match_reference(conv_layout, monkeypatch, params, kw, shape,
                                                           chunk_bytes):
    from layers import vision
    monkeypatch.setattr(vision, "COL_BUFFER_BYTES", chunk_bytes)  # 1: one image per chunk
    x = rand(*shape, seed=4)
    layer, bottom, top = run(conv_text(f"{params} {gaussian()}"), x)
    w, b = layer.blobs[0].data.astype(np.float64), layer.blobs[1].data.astype(np.float64)
    np.testing.assert_allclose(top[0].data, ref_conv2d(x, w, b, **kw), rtol=1e-10, atol=1e-10)
    dy = rand(*top[0].shape, seed=5)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    dw, db, dx = ref_conv2d_grads(x, w, dy, **kw)
    np.testing.assert_allclose(layer.blobs[0].diff, dw, rtol=1e-5, atol=1e-5)  # float32 param blobs
    np.testing.assert_allclose(layer.blobs[1].diff, db, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-10, atol=1e-10)


def test_conv_layouts_float32_agree(monkeypatch):
    """The two layouts give the same float32 numbers up to round-off (ResNet-like 1x1 and 3x3)."""
    from layers import vision
    results = []
    for merge in (0, 10 ** 9):
        monkeypatch.setattr(vision, "MERGE_BELOW_OUT", merge)
        x = rand(4, 16, 7, 7, seed=6).astype(np.float32)
        for params in ("num_output: 32 kernel_size: 1", "num_output: 8 kernel_size: 3 pad: 1 stride: 2"):
            frandom.set_random_seed(11)  # same filled weights for both layouts
            _, _, top = run(conv_text(f"{params} {gaussian()}"), x, dtype=np.float32)
            assert top[0].data.dtype == np.float32
            results.append(top[0].data.copy())
    for a, b in zip(results[:2], results[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_bytes, blocks", [(1 << 30, 1), (3 << 18, 3)])
def test_lenet_conv2_position_major_float32_matches_batch_merged(monkeypatch, block_bytes, blocks):
    """LeNet's conv2 (20 -> 50, 5x5 on 12x12, batch 16) takes the position-major path in
    forward and backward, in one block or three of output rows; float32 results equal the
    batch-merged layout's up to round-off (BLAS may order a GEMM's sums by its shape)."""
    from layers import vision
    monkeypatch.setattr(vision, "PM_BLOCK_BYTES", block_bytes)  # 3/4 MiB: 3 rows (256 KiB each)
    calls = []
    for name in ("im2col_position_major", "_col2im_position_major_add"):
        original = getattr(vision, name)
        monkeypatch.setattr(vision, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x = rand(16, 20, 12, 12, seed=12).astype(np.float32)
    dy = rand(16, 50, 8, 8, seed=13).astype(np.float32)
    results = {}
    for position_major in (True, False):
        monkeypatch.setattr(vision, "POSITION_MAJOR", position_major)
        frandom.set_random_seed(14)
        layer, bottom, top = run(conv_text(f"num_output: 50 kernel_size: 5 {gaussian(0.1)}"), x,
                                 dtype=np.float32)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results[position_major] = (top[0].data.copy(), layer.blobs[0].diff.copy(),
                                   layer.blobs[1].diff.copy(), bottom[0].diff.copy())
    # forward, then backward (weight gradient and input gradient block by block)
    assert calls == (["im2col_position_major"] * blocks
                     + ["im2col_position_major", "_col2im_position_major_add"] * blocks)
    for a, b in zip(results[True][:3], results[False][:3]):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())
    np.testing.assert_allclose(results[True][3], results[False][3], rtol=1e-5, atol=1e-6)
    w = layer.blobs[0].data.astype(np.float64)
    dw, db, dx = ref_conv2d_grads(x.astype(np.float64), w, dy.astype(np.float64))
    np.testing.assert_allclose(results[True][1], dw, rtol=1e-4, atol=1e-4 * np.abs(dw).max())
    np.testing.assert_allclose(results[True][3], dx, rtol=1e-4, atol=1e-4 * np.abs(dx).max())


def test_position_major_forward_only_where_the_columns_outweigh_the_output(monkeypatch):
    """A 1-channel 5x5 convolution (25 column rows for 20 outputs) keeps the batch-merged
    forward (its transposed output would cost more); its backward is position-major."""
    from layers import vision
    calls = []
    original = vision.im2col_position_major
    monkeypatch.setattr(vision, "im2col_position_major", lambda *a: calls.append(1) or original(*a))
    x = rand(4, 1, 12, 12, seed=15)
    layer, bottom, top = run(conv_text(f"num_output: 20 kernel_size: 5 {gaussian()}"), x)
    assert calls == []
    w, b = layer.blobs[0].data.astype(np.float64), layer.blobs[1].data.astype(np.float64)
    np.testing.assert_allclose(top[0].data, ref_conv2d(x, w, b), rtol=1e-10, atol=1e-10)
    dy = rand(*top[0].shape, seed=16)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    assert calls == [1]  # one block
    dw, db, dx = ref_conv2d_grads(x, w, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-10, atol=1e-10)


def test_wide_convolutions_stay_batch_merged(monkeypatch):
    """More than PM_MAX_OUTPUTS outputs per group: the GEMMs dominate, no position-major path."""
    from layers import vision
    calls = []
    original = vision.im2col_position_major
    monkeypatch.setattr(vision, "im2col_position_major", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(vision, "PM_MAX_OUTPUTS", 3)
    x = rand(2, 2, 5, 5, seed=17)
    layer, bottom, top = run(conv_text(f"num_output: 4 kernel_size: 3 {gaussian()}"), x)
    top[0].diff[...] = rand(*top[0].shape, seed=18)
    layer.backward(top, [True], bottom)
    assert calls == []
    monkeypatch.setattr(vision, "PM_MAX_OUTPUTS", 4)
    layer.forward(bottom, top)
    layer.backward(top, [True], bottom)
    assert calls == [1, 1]


def test_conv_backward_honours_param_propagate_down():
    x = rand(2, 3, 5, 5, seed=7)
    layer, bottom, top = run(conv_text(f"num_output: 2 kernel_size: 3 {gaussian()}"), x)
    layer.param_propagate_down = [False, True]  # weights frozen (lr_mult 0), bias learns
    top[0].diff[...] = 1.0
    layer.backward(top, [False], bottom)
    assert not layer.blobs[0].diff.any()
    np.testing.assert_allclose(layer.blobs[1].diff, [9 * 2, 9 * 2])


def test_deconv_uses_both_layouts(conv_layout):
    x = rand(3, 4, 3, 3, seed=8)
    layer, _, top = run(conv_text(f"num_output: 2 kernel_size: 3 stride: 2 pad: 1 {gaussian()}",
                                  type_="Deconvolution"), x)
    ref = ref_deconv2d(x, layer.blobs[0].data.astype(np.float64), layer.blobs[1].data.astype(np.float64),
                       (2, 2), (1, 1))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-10, atol=1e-10)


def test_parallel_copy_splits_along_the_first_axis(monkeypatch):
    from layers import vision
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert parallel.copy_threads() == min(3, __import__("os").cpu_count())
    src = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    dst = np.empty((7, 5, 3), dtype=np.float32)
    parallel.pcopyto(dst, src.swapaxes(0, 1))
    np.testing.assert_array_equal(dst, src.swapaxes(0, 1))
    one = np.empty((1, 4), dtype=np.float32)
    parallel.pcopyto(one, np.ones((1, 4), dtype=np.float32))  # a single row: no split
    assert one.sum() == 4
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert parallel.copy_threads() == 1


def test_passes_are_split_only_where_blas_is_held_to_one_thread(monkeypatch):
    # OpenBLAS's idle workers spin beside a multi-threaded GEMM's caller: no split by default
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setattr(parallel, "_CPU_COUNT", 4)
    assert parallel.copy_threads() == 1
    with parallel.split_over_our_threads():
        assert parallel.copy_threads() == 2
        with parallel.one_thread_per_pass():
            assert parallel.copy_threads() == 1
    assert parallel.copy_threads() == 1


@pytest.mark.parametrize("a_shape, b_shape", [((9, 7), (7, 5)), ((2, 3, 9, 7), (3, 7, 5)), ((3, 4), (4, 6))])
def test_split_matmul_shares_the_rows_over_threads(monkeypatch, a_shape, b_shape):
    monkeypatch.setattr(parallel, "SPLIT_GEMM_MIN_MACS", 0)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setattr(parallel, "_CPU_COUNT", 4)
    rng = np.random.default_rng(3)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = np.matmul(a.astype(np.float64), b)
    shares = []
    original = parallel.executor

    def counting_executor():
        pool, threads = original()
        shares.append(threads)
        return pool, threads

    monkeypatch.setattr(parallel, "executor", counting_executor)
    out = np.empty(want.shape, np.float32)
    assert parallel.matmul(a, b, out) is out and not shares  # outside the block: one call
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    out[...] = np.nan
    with parallel.split_over_our_threads():
        parallel.matmul(a, b, out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # split when there are rows enough for two shares (3 rows are not)
    assert shares == ([2] if a_shape[-2] >= 4 else [])


def ref_pool_backward(dy, mask, shape, dtype=np.float64):
    """Caffe's MAX backward loop: dx = 0; dx[mask] += dy (mask −1: nothing), in output order,
    accumulated in ``dtype``."""
    dx = np.zeros(shape, dtype=dtype)
    for index in np.ndindex(*dy.shape):
        if mask[index] >= 0:
            h, w = divmod(int(mask[index]), shape[3])
            dx[index[0], index[1], h, w] += dy[index]
    return dx


@pytest.mark.parametrize("params, k, s, shape", [
    ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (2, 3, 6, 8)),      # LeNet's pooling: tiles the plane
    ("kernel_size: 2 stride: 2", (2, 2), (2, 2), (2, 3, 7, 5)),      # last windows clipped (CEIL)
    ("kernel_size: 2 stride: 3", (2, 2), (3, 3), (1, 2, 8, 8)),      # gaps between the windows
    ("kernel_size: 2 stride: 3", (2, 2), (3, 3), (1, 2, 8, 7)),      # gaps, last column clipped
    ("kernel_h: 3 kernel_w: 1 stride_h: 3 stride_w: 2", (3, 1), (3, 2), (2, 2, 7, 6)),
    ("kernel_size: 2 stride: 2 round_mode: FLOOR", (2, 2), (2, 2), (1, 2, 5, 5)),  # rows past the last window
    ("kernel_size: 1 stride: 3", (1, 1), (3, 3), (2, 2, 5, 5)),       # the last windows lie past the image
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pooling_disjoint_windows_match_caffe_loops(params, k, s, shape, dtype):
    """Non-overlapping MAX windows keep the argmax as tap numbers and select the gradient per
    tap: top, mask and bottom gradient equal Caffe's loops exactly (ties go to the first tap,
    NaN never wins, an all -inf window keeps -FLT_MAX with no argmax)."""
    x = rand(*shape, seed=21)
    x[0, 0, 0:2, 0:2] = 0.25  # a tie over a whole window
    x[0, -1, 0, 0] = np.nan
    x[-1, 0, -2:, -2:] = -np.inf
    x = x.astype(dtype)
    ceil = "FLOOR" not in params
    layer, bottom, top = run(pool_text(f"pool: MAX {params}"), x, dtype=dtype)
    assert layer.pool._code is not None  # the disjoint-window path
    ref, mask = ref_pool(x.astype(np.float64), "MAX", k, s, (0, 0), ceil)
    np.testing.assert_array_equal(top[0].data, ref.astype(dtype))
    np.testing.assert_array_equal(layer.pool.mask, mask)
    dy = rand(*top[0].shape, seed=22).astype(dtype)
    dy[0, 0, 0, 0] = np.nan  # stays on its argmax only
    top[0].diff[...] = dy
    bottom[0].diff[...] = 7  # overwritten, not accumulated
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, ref_pool_backward(dy.astype(np.float64), mask, shape))
    # a mask top holds the plane indices, and backward then reads it (the scatter path)
    layer2, bottom2, top2 = run(pool_text(f"pool: MAX {params}"), x, ntop=2, dtype=dtype)
    np.testing.assert_array_equal(top2[1].data, mask)
    top2[0].diff[...] = dy
    layer2.backward(top2, [True], bottom2)
    np.testing.assert_array_equal(bottom2[0].diff, bottom[0].diff)


@pytest.mark.parametrize("params, k, s, p, shape", [
    ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), (2, 3, 11, 9)),       # ResNet's pool1, CEIL clipped
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (1, 2, 8, 7)),  # padded
    ("kernel_size: 3 stride: 1", (3, 3), (1, 1), (0, 0), (2, 2, 6, 6)),         # nine windows per element
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1", (3, 2), (2, 1), (0, 0), (1, 3, 7, 6)),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("threaded", [False, True])
def test_max_pooling_overlapping_windows_match_caffe_loops(monkeypatch, params, k, s, p, shape, dtype,
                                                           threaded):
    """Overlapping MAX windows (TRAIN) keep the first maximal tap's number per output and route
    the gradient tap by tap: top, mask and the bottom gradient equal Caffe's loops bit for bit
    (each element sums its windows in Caffe's order), also split over threads."""
    if threaded:
        monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    x = rand(*shape, seed=23)
    x[0, 0, 0:3, 0:3] = 0.5  # ties across overlapping windows
    x[0, -1, 1, 1] = np.nan
    x = x.astype(dtype)
    layer, bottom, top = run(pool_text(f"pool: MAX {params}"), x, dtype=dtype)
    assert layer.pool._code is not None and not layer.pool._disjoint_windows()
    ref, mask = ref_pool(x.astype(np.float64), "MAX", k, s, p)
    np.testing.assert_array_equal(top[0].data, ref.astype(dtype))
    np.testing.assert_array_equal(layer.pool.mask, mask)
    dy = rand(*top[0].shape, seed=24).astype(dtype)
    dy[-1, 0, 0, 0] = np.inf  # stays on its argmax only
    top[0].diff[...] = dy
    bottom[0].diff[...] = 7  # overwritten, not accumulated
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, ref_pool_backward(dy, mask, shape, dtype=dy.dtype))


def test_max_pooling_disjoint_windows_gradient():
    layer = layer_from_text(pool_text("pool: MAX kernel_size: 2 stride: 2"))
    check_gradient(layer, [make_blob(distinct(2, 2, 5, 4, seed=23))], [Blob()])


@pytest.mark.parametrize("params, k, s, p", [
    ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0)),
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1", (2, 3), (1, 2), (1, 1)),
])
def test_test_phase_max_pooling_threaded_matches_loops(monkeypatch, params, k, s, p):
    """TEST phase without a mask top takes the separable, plane-split path."""
    from layers import vision
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    x = rand(3, 5, 9, 8, seed=9)
    x[0, 0, 0, :] = np.nan  # fmax: NaN never wins (Caffe's '>')
    layer, _, top = run(pool_text(f"pool: MAX {params}"), x, phase=TEST)
    assert layer.pool.mask is None
    ref, _ = ref_pool(x, "MAX", k, s, p)
    np.testing.assert_array_equal(top[0].data, ref)


def test_global_average_pooling_fast_path_matches_loops():
    x = rand(2, 3, 7, 7, seed=10).astype(np.float32)
    _, _, top = run(pool_text("pool: AVE kernel_size: 7"), x, dtype=np.float32)
    ref, _ = ref_pool(x.astype(np.float64), "AVE", (7, 7), (1, 1), (0, 0))
    assert top[0].shape == (2, 3, 1, 1)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-6)

