"""tools/upgrade_net_proto_text.py on a V0 net (nested ``layers { layer { ... } }``).

The V0 net is written here: ``input:`` / ``input_dim:`` header, a ``padding`` layer
(folded into the convolution by upgrade_proto.cpp's UpgradeV0PaddingLayers), conv, relu,
pool, innerproduct and softmax, with weights stored in the V0 layers' ``blobs`` in the
legacy num/channels/height/width form (the inner product's as 1 x 1 x N x K and
1 x 1 x 1 x N; the convolution has no bias: base_conv_layer.cpp refuses a 4-D bias
blob held in the net itself).  The upgraded file must be in the current
format, build, and compute what the V0 file computes, and both must match a NumPy
forward written here.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework.upgrade import net_needs_upgrade
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "upgrade_net_proto_text.py")

N, C, H, W = 2, 3, 6, 6
PAD, K, OUT = 1, 3, 4           # conv: 6x6 padded to 8x8 -> 6x6
POOLED = (H + 2 * PAD - K + 1) // 2  # max pool 2x2 stride 2 -> 3x3
CLASSES = 5


def blob_text(values, num, channels, height, width):
    data = " ".join(f"data: {v!r}" for v in np.asarray(values, np.float32).ravel().tolist())
    return f"blobs {{ num: {num} channels: {channels} height: {height} width: {width} {data} }}"


def v0_net(params):
    """A V0 prototxt with the given weights in its layers' blobs."""
    conv_w, fc_w, fc_b = params
    return f"""
name: "tiny_v0"
input: "data"
input_dim: {N} input_dim: {C} input_dim: {H} input_dim: {W}
layers {{
  layer {{ name: "pad1" type: "padding" pad: {PAD} }}
  bottom: "data" top: "pad1"
}}
layers {{
  layer {{ name: "conv1" type: "conv" num_output: {OUT} kernelsize: {K} stride: 1 biasterm: false
          {blob_text(conv_w, OUT, C, K, K)} }}
  bottom: "pad1" top: "conv1"
}}
layers {{ layer {{ name: "relu1" type: "relu" }} bottom: "conv1" top: "conv1" }}
layers {{
  layer {{ name: "pool1" type: "pool" pool: MAX kernelsize: 2 stride: 2 }}
  bottom: "conv1" top: "pool1"
}}
layers {{
  layer {{ name: "fc" type: "innerproduct" num_output: {CLASSES}
          {blob_text(fc_w, 1, 1, CLASSES, OUT * POOLED * POOLED)}
          {blob_text(fc_b, 1, 1, 1, CLASSES)} }}
  bottom: "pool1" top: "fc"
}}
layers {{ layer {{ name: "prob" type: "softmax" }} bottom: "fc" top: "prob" }}
"""


@pytest.fixture
def params():
    rng = np.random.default_rng(11)
    return (rng.normal(0, 0.3, (OUT, C, K, K)).astype(np.float32),
            rng.normal(0, 0.3, (CLASSES, OUT * POOLED * POOLED)).astype(np.float32),
            rng.normal(0, 0.1, CLASSES).astype(np.float32))


def reference_forward(x, params):
    """pad -> 3x3 conv -> relu -> 2x2/2 max pool -> inner product -> softmax, in float64."""
    conv_w, fc_w, fc_b = (p.astype(np.float64) for p in params)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    size = xp.shape[2] - K + 1
    conv = np.zeros((x.shape[0], OUT, size, size))
    for i in range(K):
        for j in range(K):
            patch = xp[:, :, i:i + size, j:j + size]           # N, C, size, size
            conv += np.einsum("ncyx,oc->noyx", patch, conv_w[:, :, i, j])
    conv = np.maximum(conv, 0)
    pooled = conv.reshape(x.shape[0], OUT, POOLED, 2, POOLED, 2).max(axis=(3, 5))
    fc = pooled.reshape(x.shape[0], -1) @ fc_w.T + fc_b
    e = np.exp(fc - fc.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run_tool(src, dst):
    return subprocess.run([sys.executable, TOOL, str(src), str(dst)],
                          capture_output=True, text=True, timeout=120)


def test_v0_net_upgraded_by_the_text_tool(tmp_path, params):
    src = tmp_path / "tiny_v0.prototxt"
    src.write_text(v0_net(params))
    dst = tmp_path / "tiny_current.prototxt"
    result = run_tool(src, dst)
    assert result.returncode == 0, result.stderr

    text = dst.read_text()
    assert "layers {" not in text and "input_dim" not in text and "padding" not in text
    assert "layer {" in text
    upgraded = text_format.Parse(text, caffe_pb2.NetParameter())
    assert not net_needs_upgrade(upgraded)
    assert len(upgraded.layers) == 0 and len(upgraded.input) == 0
    assert [(layer.name, layer.type) for layer in upgraded.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"),
        ("fc", "InnerProduct"), ("prob", "Softmax")]
    for layer_type in ("Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"):
        assert f'type: "{layer_type}"' in text  # string types, not V1 enums
    assert [list(s.dim) for s in upgraded.layer[0].input_param.shape] == [[N, C, H, W]]
    conv = upgraded.layer[1]
    assert list(conv.bottom) == ["data"]  # the padding layer is gone, its pad moved here
    cp = conv.convolution_param
    assert (list(cp.pad), list(cp.kernel_size), cp.num_output) == ([PAD], [K], OUT)
    assert cp.bias_term is False and len(conv.blobs) == 1
    fc = upgraded.layer[4]
    assert [(b.num, b.channels, b.height, b.width) for b in fc.blobs] == [
        (1, 1, CLASSES, OUT * POOLED * POOLED), (1, 1, 1, CLASSES)]  # kept as written
    pp = upgraded.layer[3].pooling_param
    assert (pp.pool, pp.kernel_size, pp.stride) == (caffe_pb2.PoolingParameter.MAX, 2, 2)
    assert upgraded.layer[4].inner_product_param.num_output == CLASSES

    x = np.random.default_rng(12).normal(size=(N, C, H, W)).astype(np.float32)
    from_v0 = framework.Net(str(src), framework.TEST).forward(data=x)["prob"].copy()
    from_current = framework.Net(str(dst), framework.TEST).forward(data=x)["prob"]
    assert from_current.shape == (N, CLASSES)
    np.testing.assert_allclose(from_current, from_v0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(from_current, reference_forward(x, params), rtol=1e-5, atol=1e-6)


def test_v0_fillers_survive_the_tool(tmp_path):
    """No blobs: the V0 weight_filler / bias_filler drive the weights (same seed, same net)."""
    src = tmp_path / "fill_v0.prototxt"
    src.write_text(f"""
name: "fill_v0"
input: "data" input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
layers {{
  layer {{ name: "conv" type: "conv" num_output: 3 kernelsize: 3 biasterm: true
          weight_filler {{ type: "gaussian" std: 0.5 }}
          bias_filler {{ type: "constant" value: 0.25 }} }}
  bottom: "data" top: "conv"
}}
layers {{ layer {{ name: "act" type: "tanh" }} bottom: "conv" top: "conv" }}
""")
    dst = tmp_path / "fill_current.prototxt"
    result = run_tool(src, dst)
    assert result.returncode == 0, result.stderr
    conv = text_format.Parse(dst.read_text(), caffe_pb2.NetParameter()).layer[1]
    assert conv.convolution_param.weight_filler.type == "gaussian"
    assert conv.convolution_param.weight_filler.std == pytest.approx(0.5)
    assert conv.convolution_param.bias_filler.value == pytest.approx(0.25)

    x = np.random.default_rng(13).normal(size=(1, 2, 5, 5)).astype(np.float32)
    outputs = []
    for path in (src, dst):
        framework.set_random_seed(21)
        net = framework.Net(str(path), framework.TEST)
        assert np.all(net.params["conv"][1].data == np.float32(0.25))
        outputs.append(net.forward(data=x)["conv"].copy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    w = net.params["conv"][0].data.astype(np.float64)
    assert w.shape == (3, 2, 3, 3) and 0.3 < w.std() < 0.7
    # independent check of the one output pixel at (0, 0): tanh(<w, x window> + b)
    window = x[0, :, 0:3, 0:3].astype(np.float64)
    expected = np.tanh(np.einsum("ocij,cij->o", w, window) + 0.25)
    np.testing.assert_allclose(outputs[1][0, :, 0, 0], expected, rtol=1e-5, atol=1e-6)
