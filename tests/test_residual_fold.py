"""Residual folding: in a memory-saving forward, an Eltwise SUM right after a Convolution runs in
that convolution's output pass (framework/net.py _plan_residual_folds; layers.vision and
layers.winograd take a ``residual``): results must equal the layers run one by one, exactly."""
import numpy as np
import pytest
from google.protobuf import text_format

import framework
from layers import vision, winograd
from proto import caffe_pb2

# A ResNet join after BatchNorm/Scale folding (framework.fuse): "short" is the shortcut, "c" the
# last convolution of the branch, "join" + "join_relu" the join.  Each CONV below is a layout of
# the convolution: per-image 1x1, batch-merged (small maps), im2col 3x3, Winograd 3x3.
NET = """
name: "residual"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {n} dim: {c} dim: {h} dim: {h} }} }} }}
layer {{ name: "short" type: "Convolution" bottom: "data" top: "short"
        convolution_param {{ num_output: {k} kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param {{ num_output: {c} kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "a_relu" type: "ReLU" bottom: "a" top: "a" }}
layer {{ name: "c" type: "Convolution" bottom: "a" top: "c"
        convolution_param {{ num_output: {k} kernel_size: {kernel} pad: {pad} {bias}
                            weight_filler {{ type: "gaussian" std: 0.2 }}
                            bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "join" type: "Eltwise" bottom: {first} bottom: {second} top: "join" {eltwise} }}
{relu}
layer {{ name: "pool" type: "Pooling" bottom: "join" top: "pool" pooling_param {{ pool: AVE global_pooling: true }} }}
"""

LAYOUTS = {  # name: (n, c, h, k, kernel, pad)
    "1x1 per image": dict(n=2, c=8, h=20, k=6, kernel=1, pad=0),
    "1x1 merged": dict(n=3, c=8, h=5, k=6, kernel=1, pad=0),
    "3x3 im2col": dict(n=2, c=5, h=9, k=7, kernel=3, pad=1),
    "3x3 winograd": dict(n=2, c=64, h=16, k=64, kernel=3, pad=1),
}


def net_text(layout, first='"short"', second='"c"', bias="", relu=True, eltwise=""):
    relu_text = 'layer { name: "join_relu" type: "ReLU" bottom: "join" top: "join" }' if relu else ""
    return NET.format(**LAYOUTS[layout], first=first, second=second, bias=bias, relu=relu_text,
                      eltwise=eltwise)


def make_net(text):
    framework.set_random_seed(3)
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.state.phase = framework.TEST
    return framework.Net(param)


def data(net, seed=0):
    return np.random.default_rng(seed).standard_normal(net.blobs["data"].shape).astype(np.float32)


def layer_by_layer(net, x):
    """Every blob after running the layers one call each (nothing folds)."""
    net.blobs["data"].data[...] = x
    for i in range(len(net.layers)):
        net.forward_from_to(i, i)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def spy_forwards(net, calls):
    """Record (layer name, fused_residual set) for every layer forward that runs."""
    for layer in net.layers:
        def forward(bottom, top, layer=layer, original=layer.forward):
            calls.append((layer.name, getattr(layer, "fused_residual", None) is not None))
            return original(bottom, top)
        layer.forward = forward


def test_plan_folds_a_sum_of_two_right_after_the_convolution_that_only_it_reads():
    names = lambda net: {net.layer_names[c]: net.layer_names[e] for c, e in net._residual_folds.items()}  # noqa: E731
    assert names(make_net(net_text("1x1 per image"))) == {"c": "join"}
    assert names(make_net(net_text("1x1 per image", first='"c"', second='"short"'))) == {"c": "join"}
    not_folded = [
        net_text("1x1 per image", eltwise="eltwise_param { coeff: 1 coeff: 2 }"),
        net_text("1x1 per image", eltwise="eltwise_param { operation: PROD }"),
        net_text("1x1 per image", eltwise="eltwise_param { operation: MAX }"),
        net_text("1x1 per image", first='"c"', second='"c"'),  # the conv's top twice
        # the conv's top has a second reader
        net_text("1x1 per image").replace('bottom: "join" top: "pool"', 'bottom: "c" top: "pool"'),
    ]
    for text in not_folded:
        assert make_net(text)._residual_folds == {}, text


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bias", ["", "bias_term: false"])
@pytest.mark.parametrize("relu", [True, False])
def test_memory_saving_forward_folds_the_join_and_equals_the_layers_one_by_one(layout, bias, relu):
    folded, x, want = saving_net_and_expected(net_text(layout, bias=bias, relu=relu))
    if relu:
        assert (want["join"] == 0).any() and (want["join"] > 0).any()  # the ReLU did clip something
    folded.forward(blobs=["join"])  # warm the buffer pool
    calls = []
    spy_forwards(folded, calls)
    out = folded.forward(blobs=["join"], data=x)
    assert ("c", True) in calls  # the convolution ran with the join folded in ...
    assert not [name for name, _ in calls if name.startswith("join")]  # ... and the join (and ReLU) did not
    np.testing.assert_array_equal(out["join"], want["join"])
    np.testing.assert_array_equal(out["pool"], want["pool"])
    assert not folded.blobs["c"].data.any()  # never written: the read-only zeros stand in


def test_winograd_layout_is_the_one_the_winograd_case_takes():
    geom_net = make_net(net_text("3x3 winograd"))
    conv = geom_net.layers[geom_net.layer_names.index("c")]
    x = geom_net.blobs["a"].data
    assert winograd.use_winograd(x, conv.blobs[0].data, conv.geom)
    small = make_net(net_text("1x1 merged"))
    conv = small.layers[small.layer_names.index("c")]
    assert vision._use_merged(small.blobs["a"].shape[0], conv.geom)


def saving_net_and_expected(text):
    """(a memory-saving net of ``text``, its input, every blob of the layers run one by one)."""
    plain, net = make_net(text), make_net(text)
    x = data(plain)
    want = layer_by_layer(plain, x)
    net.memory_saving = True
    return net, x, want


def test_not_folded_when_the_convolution_top_is_asked_for_or_memory_saving_is_off():
    net, x, want = saving_net_and_expected(net_text("1x1 per image"))
    out = net.forward(blobs=["c", "join"], data=x)
    np.testing.assert_array_equal(out["c"], want["c"])
    np.testing.assert_array_equal(out["join"], want["join"])
    assert net.layers[net.layer_names.index("c")].fused_residual is None
    net.memory_saving = False
    calls = []
    spy_forwards(net, calls)
    out = net.forward(data=x)
    assert ("join", False) in calls
    np.testing.assert_array_equal(net.blobs["c"].data, want["c"])
    np.testing.assert_array_equal(net.blobs["join"].data, want["join"])


def test_forward_ending_at_the_convolution_leaves_the_join_to_run():
    net, x, want = saving_net_and_expected(net_text("1x1 per image"))
    np.testing.assert_array_equal(net.forward(end="c", data=x)["c"], want["c"])
    assert net.layers[net.layer_names.index("c")].fused_residual is None


@pytest.mark.parametrize("relu", [True, False])
def test_conv_forward_adds_the_residual_in_every_layout(relu):
    """layers.vision.conv_forward / conv_forward_position_major with a residual: the convolution
    (+ bias), then + residual, then the ReLU, exactly as three separate steps."""
    rng = np.random.default_rng(1)
    cases = [((2, 8, 20, 20), (6, 8, 1, 1), 0), ((3, 8, 5, 5), (6, 8, 1, 1), 0),
             ((2, 5, 9, 9), (7, 5, 3, 3), 1), ((2, 64, 16, 16), (64, 64, 3, 3), 1),
             ((2, 3, 12, 12), (4, 3, 5, 5), 2)]
    for x_shape, w_shape, pad in cases:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        bias = rng.standard_normal(w_shape[0]).astype(np.float32)
        size = x_shape[2] + 2 * pad - w_shape[2] + 1
        geom = vision.ConvGeometry(x_shape[1], x_shape[2:], (size, size), w_shape[2:], (1, 1), (pad, pad),
                                   (1, 1), 1)
        out_shape = (x_shape[0], w_shape[0], size, size)
        residual = rng.standard_normal(out_shape).astype(np.float32)
        for forward in (vision.conv_forward, vision.conv_forward_position_major):
            want = forward(x, w, geom, np.empty(out_shape, np.float32), bias) + residual
            if relu:
                np.maximum(want, 0, out=want)
            got = forward(x, w, geom, np.empty(out_shape, np.float32), bias, relu, residual)
            np.testing.assert_array_equal(got, want, err_msg=f"{forward.__name__} {x_shape} {w_shape}")
