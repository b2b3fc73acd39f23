"""ReLU folding: an in-place ReLU after a Convolution or an Eltwise SUM runs inside that layer's
forward (framework/net.py _plan_relu_folds); results must equal the layers run one by one."""
import numpy as np
import pytest
from google.protobuf import text_format

import framework
from layers import parallel, vision, winograd
from proto import caffe_pb2

# conv (+ in-place ReLU) in each GEMM layout, a leaky ReLU (not folded), an Eltwise SUM
# (+ in-place ReLU), a ReLU that is not in place (not folded) and an Eltwise MAX (not folded)
NET = """
name: "fold"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 dim: 9 dim: 9 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "a_relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "a" top: "b"
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "b_relu" type: "ReLU" bottom: "b" top: "b" relu_param { negative_slope: 0.1 } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 6 kernel_size: 1 bias_term: false
                            weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "c_relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "sum" type: "Eltwise" bottom: "b" bottom: "c" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "b" top: "max" eltwise_param { operation: MAX } }
layer { name: "max_relu" type: "ReLU" bottom: "max" top: "max" }
layer { name: "out" type: "ReLU" bottom: "max" top: "out" }
"""


def make_net(phase=framework.TEST, text=NET):
    framework.set_random_seed(5)
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.state.phase = phase
    return framework.Net(param)


def data(seed=0):
    return np.random.default_rng(seed).standard_normal((3, 4, 9, 9)).astype(np.float32)


def layer_by_layer(net, x):
    """Every blob after running the layers one call each (no folding: each call ends at its layer)."""
    net.blobs["data"].data[...] = x
    for i in range(len(net.layers)):
        net.forward_from_to(i, i)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def test_plan_folds_only_plain_in_place_relus_after_conv_and_eltwise_sum():
    net = make_net()
    names = net.layer_names
    folded = {names[p]: names[r] for p, r in net._relu_folds.items()}
    assert folded == {"a": "a_relu", "c": "c_relu", "sum": "sum_relu"}


def test_folded_forward_equals_the_layers_one_by_one():
    folded_net, plain_net = make_net(), make_net()
    x = data()
    want = layer_by_layer(plain_net, x)
    assert (want["a"] == 0).any() and (want["sum"] == 0).any()  # the ReLUs did clip something
    folded_net.forward(data=x)
    for name, value in want.items():
        np.testing.assert_array_equal(folded_net.blobs[name].data, value, err_msg=name)
    assert folded_net.layers[folded_net.layer_names.index("a")].fused_relu  # conv "a" applied its ReLU


def test_forward_ending_at_the_producer_leaves_the_relu_undone():
    net = make_net()
    out = net.forward(end="a", data=data())["a"]
    assert (out < 0).any()  # as Caffe: the ReLU layer has not run yet
    a_index = net.layer_names.index("a")
    assert not net.layers[a_index].fused_relu
    # starting at the ReLU applies it (the producer did not run in this call)
    net.forward(start="a_relu", end="a_relu")
    assert (net.blobs["a"].data >= 0).all()


def test_training_gradients_equal_with_folding():
    text = NET.replace('dim: 3 dim: 4 dim: 9 dim: 9', 'dim: 3 dim: 4 dim: 9 dim: 9').replace(
        'layer { name: "out" type: "ReLU" bottom: "max" top: "out" }',
        'layer { name: "out" type: "ReLU" bottom: "max" top: "out" }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }')
    text = text.replace('top: "data" input_param { shape { dim: 3 dim: 4 dim: 9 dim: 9 } }',
                        'top: "data" top: "target" input_param { shape { dim: 3 dim: 4 dim: 9 dim: 9 } '
                        'shape { dim: 3 dim: 6 dim: 9 dim: 9 } }')
    x = data(1)
    target = np.random.default_rng(2).standard_normal((3, 6, 9, 9)).astype(np.float32)
    results = []
    for fold in (True, False):
        net = make_net(framework.TRAIN, text)
        if not fold:
            net._relu_folds = {}
        assert bool(net._relu_folds) == fold
        net.blobs["data"].data[...] = x
        net.blobs["target"].data[...] = target
        loss = net.forward_backward()
        results.append((loss, [b.diff.copy() for blobs in net.params.values() for b in blobs]))
    assert results[0][0] == results[1][0]
    for got, want in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n, c, m, size, kernel, layout", [
    (2, 3, 5, 20, 3, "per-image"),      # 400 positions: per-image GEMMs, in-place bias + ReLU
    (1, 3, 5, 20, 1, "per-image"),      # 1x1: the input is the column matrix
    (4, 6, 300, 6, 3, "merged"),        # small map, many outputs: batch-merged, transposed store
    (4, 6, 8, 6, 3, "position-major"),
    (3, 64, 64, 12, 3, "winograd"),     # 3·6·6 = 108 tiles
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_relu_is_max_of_the_plain_forward(monkeypatch, n, c, m, size, kernel, layout, bias):
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 64)  # several blocks per image and thread
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)  # split over threads even when small
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    rng = np.random.default_rng(3)
    pad = kernel // 2
    g = vision.ConvGeometry(c, (size, size), (size, size), (kernel, kernel), (1, 1), (pad, pad), (1, 1), 1)
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    w = rng.standard_normal((m, c, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if bias else None
    assert winograd.use_winograd(x, w, g) == (layout == "winograd")
    assert vision._use_merged(n, g) == (layout in ("merged", "position-major", "winograd"))
    position_major = vision._forward_in_position_major(x, w, g)
    assert position_major == (layout == "position-major")
    forward = vision.conv_forward_position_major if position_major else vision.conv_forward
    plain = np.empty((n, m, size, size), np.float32)
    fused = np.full_like(plain, np.nan)
    forward(x, w, g, plain, b)
    forward(x, w, g, fused, b, relu=True)
    assert (plain < 0).any()
    np.testing.assert_array_equal(fused, np.maximum(plain, 0))


def test_eltwise_sum_relu_blocks_and_threads(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "SPLIT_ALONGSIDE_BLAS", True)
    from layers import utility
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 40)
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    y = np.full_like(a, np.nan)
    utility._sum_relu(a, b, y)
    np.testing.assert_array_equal(y, np.maximum(a + b, 0))


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


@pytest.mark.parametrize("block_bytes", [64, 256 << 10])
def test_scale_folds_the_relu_after_batchnorm_in_training(monkeypatch, block_bytes):
    monkeypatch.setattr(parallel, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    target = rng.standard_normal((4, 5)).astype(np.float32)
    results = []
    for fold in (True, False):
        net = make_net(framework.TRAIN, BN_NET)
        names = net.layer_names
        assert {names[p]: names[r] for p, r in net._relu_folds.items()} == {"scale": "relu"}
        net._scale_folds, net._scale_fold_ends = {}, {}  # the Scale on its own (see test_batchnorm_fold)
        if not fold:
            net._relu_folds = {}
        net.blobs["data"].data[...] = x
        net.blobs["target"].data[...] = target
        loss = net.forward_backward()
        conv = net.blobs["conv"].data.copy()
        results.append((loss, conv, [b.diff.copy() for blobs in net.params.values() for b in blobs]))
    assert (results[1][1] == 0).any() and (results[1][1] > 0).any()
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    for got, want in zip(results[0][2], results[1][2]):
        np.testing.assert_array_equal(got, want)
