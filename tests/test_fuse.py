"""Folding inference BatchNorm (+ Scale) into convolutions (framework/fuse.py, tools/fuse_batchnorm.py).

The reference is the unfused net itself (BatchNorm and Scale are tested on their
own in test_normalization.py) plus a hand-written float64 fold of one channel at a
time; the fused outputs must match within 1e-5 relative.
"""
import os

import numpy as np
import pytest

import framework
from framework import io as caffe_io
from framework.errors import WeightsError
from framework.fuse import (batchnorm_affine, find_folds, fold_conv_batchnorm, fuse_batchnorm, fuse_net,
                            fused_net)
from model_utils import randomize_params
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 7 dim: 6 } } }\n'

# Non-in-place BN + Scale after a conv without bias; an in-place BN without Scale after a
# grouped conv with bias; then a plain layer so the fused conv feeds something.
SMALL = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "scale1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "scale1" top: "scale1" }
layer { name: "conv2" type: "Convolution" bottom: "scale1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


def _param(text, phase=caffe_pb2.TEST):
    param = caffe_io.parse_prototxt_text(text, caffe_pb2.NetParameter)
    param.state.phase = phase
    return param


def _statistics(net, seed, scale_factors=(0.25, 40.0)):
    """Random weights, and BatchNorm sums M = s*mu, V = s*var with s != 1 (as after training)."""
    randomize_params(net, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            channels = layer.blobs[0].count
            s = np.float32(rng.uniform(*scale_factors))
            layer.blobs[0].data[...] = s * rng.normal(0.3, 0.5, channels)
            layer.blobs[1].data[...] = s * rng.uniform(0.2, 3.0, channels)
            layer.blobs[2].data[...] = s
        elif layer.type == "Scale":
            layer.blobs[0].data[...] = np.random.default_rng(seed).uniform(-2, 2, layer.blobs[0].shape)
    return net


def _small_net(text=SMALL, seed=0, phase=caffe_pb2.TEST):
    return _statistics(framework.Net(_param(text, phase)), seed)


def _input(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _types(net):
    return [layer.type for layer in net.layers]


# -- the arithmetic ----------------------------------------------------------------------

def test_fold_matches_a_per_channel_hand_computation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    m, v, s = rng.normal(size=3), rng.uniform(1, 2, 3), np.array([4.0])
    gamma, beta, eps = rng.uniform(0.5, 2, 3), rng.normal(size=3), 1e-3
    new_w, new_b = fold_conv_batchnorm(w, b, m, v, s, eps, gamma=gamma, beta=beta)
    assert new_w.dtype == np.float32 and new_w.shape == w.shape and new_b.shape == (3,)
    for c in range(3):
        mean, var = m[c] / s[0], v[c] / s[0]
        k = gamma[c] / np.sqrt(var + eps)
        np.testing.assert_allclose(new_w[c], w[c].astype(np.float64) * k, rtol=1e-6)
        np.testing.assert_allclose(new_b[c], (b[c] - mean) * k + beta[c], rtol=1e-6, atol=1e-6)


def test_fold_without_bias_or_scale():
    w = np.full((2, 1, 1, 1), 3.0, np.float32)
    new_w, new_b = fold_conv_batchnorm(w, None, [2.0, 4.0], [8.0, 6.0], [2.0], eps=0.0)
    # mean = M/s = (1, 2), var = V/s = (4, 3): y = (3x - mean) / sqrt(var)
    np.testing.assert_allclose(new_w.ravel(), [1.5, 3 / np.sqrt(3)], rtol=1e-6)
    np.testing.assert_allclose(new_b, [-0.5, -2 / np.sqrt(3)], rtol=1e-6)


def test_zero_scale_factor_guard():
    """batch_norm_layer.cpp: s == 0 means mean = var = 0, so BN(x) = x / sqrt(eps)."""
    a, c = batchnorm_affine([5.0, -3.0], [7.0, 2.0], [0.0], eps=1e-4)
    np.testing.assert_allclose(a, [100.0, 100.0])
    np.testing.assert_array_equal(c, [0.0, 0.0])


def test_fold_rejects_mismatched_channels():
    with pytest.raises(WeightsError, match="3 values for 2 output channels"):
        fold_conv_batchnorm(np.ones((2, 1, 1, 1)), None, np.zeros(3), np.ones(3), [1.0], 1e-5)


# -- small nets --------------------------------------------------------------------------

def test_small_net_non_in_place_and_bias_free_conv():
    net = _small_net()
    fused = fuse_net(net)
    assert [f[:3] for f in fused.fused.folds] == [("conv1", "bn1", "scale1"), ("conv2", "bn2", None)]
    assert _types(fused) == ["Input", "Convolution", "ReLU", "Convolution", "Pooling"]
    # the bias-free conv gained a bias; the non-in-place chain's last top is the conv's top now
    assert len(fused.params["conv1"]) == 2 and fused.top_names["conv1"] == ["scale1"]
    assert "conv1" not in fused.blobs and "bn1" not in fused.blobs
    assert fused.layer_by_name("conv1").layer_param.convolution_param.bias_term
    x = _input((2, 4, 7, 6))
    want = net.forward(data=x, blobs=["scale1", "conv2"])
    got = fused.forward(data=x, blobs=["scale1", "conv2"])
    assert np.ptp(want["pool"]) > 0.1
    for name in ("scale1", "conv2", "pool"):
        assert _relative_error(got[name], want[name]) < 1e-5, name
    # the original net is untouched
    assert _types(net).count("BatchNorm") == 2


def test_batch_of_one_and_the_fused_weights_are_the_hand_fold():
    net = _small_net(seed=3)
    fused = fuse_net(net)
    bn1, scale1 = net.params["bn1"], net.params["scale1"]
    s = bn1[2].data[0]
    k = scale1[0].data.astype(np.float64) / np.sqrt(bn1[1].data / s + 0.001)
    expected_b = -bn1[0].data / s * k + scale1[1].data
    np.testing.assert_allclose(fused.params["conv1"][1].data, expected_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.params["conv1"][0].data, net.params["conv1"][0].data * k[:, None, None, None],
                               rtol=1e-5, atol=1e-7)
    x = _input((1, 4, 7, 6), seed=4)
    assert _relative_error(fused.forward(data=x)["pool"], net.forward(data=x)["pool"]) < 1e-5


def test_batchnorm_with_zero_scale_factor_folds_like_caffe():
    net = _small_net(seed=5)
    bn = net.params["bn1"]
    bn[2].data[...] = 0  # untrained statistics: Caffe ignores M and V and divides by sqrt(eps)
    assert np.abs(bn[0].data).max() > 0
    fused = fuse_net(net)
    assert len(fused.fused.folds) == 2
    x = _input((2, 4, 7, 6), seed=6)
    want = net.forward(data=x, blobs=["scale1"])
    got = fused.forward(data=x, blobs=["scale1"])
    assert _relative_error(got["scale1"], want["scale1"]) < 1e-5
    assert _relative_error(got["pool"], want["pool"]) < 1e-5
    gamma, beta = net.params["scale1"][0].data, net.params["scale1"][1].data
    np.testing.assert_allclose(fused.params["conv1"][1].data, beta, rtol=1e-6)
    np.testing.assert_allclose(fused.params["conv1"][0].data,
                               net.params["conv1"][0].data * (gamma / np.sqrt(0.001))[:, None, None, None],
                               rtol=1e-5)


def test_conv_feeding_two_consumers_is_not_folded():
    text = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "tap" type: "Power" bottom: "conv1" top: "tap" power_param { scale: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "bn1" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "tap" bottom: "bn1" top: "sum" }
"""
    # (Caffe refuses an in-place layer on a blob with several consumers, so bn1 writes a new top.)
    net = _small_net(text, seed=7)
    fused = fuse_net(net)
    assert fused.fused.folds == []
    assert fused.fused.skipped == [("bn1", "the output of Convolution 'conv1' has other consumers")]
    assert _types(fused) == _types(net)  # the Split inserted for conv1 is rebuilt, not duplicated
    x = _input((2, 4, 7, 6), seed=8)
    np.testing.assert_array_equal(fused.forward(data=x)["sum"], net.forward(data=x)["sum"])


def test_later_reader_of_the_conv_output_blocks_the_fold():
    """Non-in-place BN: a layer further down still reading the conv's top is a second consumer."""
    text = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" }
layer { name: "sum" type: "Eltwise" bottom: "bn1" bottom: "conv1" top: "sum" }
"""
    folds, skipped = find_folds(_param(text))
    assert folds == [] and skipped[0][0] == "bn1"


def test_scale_with_another_consumer_stays():
    text = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "scale1" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "bn1" bottom: "scale1" top: "sum" }
"""
    net = _small_net(text, seed=9)
    fused = fuse_net(net)
    assert [tuple(f) for f in fused.fused.folds] == [("conv1", "bn1", None, "bn1")]
    assert _types(fused) == ["Input", "Convolution", "Split", "Scale", "Eltwise"]
    x = _input((2, 4, 7, 6), seed=10)
    assert _relative_error(fused.forward(data=x)["sum"], net.forward(data=x)["sum"]) < 1e-5


def test_per_channel_scale_only():
    """A Scale over more than the channel axis cannot be folded; the BatchNorm still is."""
    text = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { num_axes: 2 } }
"""
    net = _small_net(text, seed=11)
    fused = fuse_net(net)
    assert [tuple(f) for f in fused.fused.folds] == [("conv1", "bn1", None, "conv1")]
    assert _types(fused) == ["Input", "Convolution", "Scale"]
    x = _input((2, 4, 7, 6), seed=12)
    assert _relative_error(fused.forward(data=x)["conv1"], net.forward(data=x)["conv1"]) < 1e-5


@pytest.mark.parametrize("case,reason", [
    ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "c" inner_product_param { num_output: 3 } }\n'
     'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }', "produced by a InnerProduct layer"),
    ('layer { name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 3 kernel_size: 1 } }\n'
     'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" batch_norm_param { use_global_stats: false } }',
     "batch statistics"),
    ('layer { name: "conv" type: "Convolution" bottom: "data" top: "c" param { name: "w" } '
     'convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }\n'
     'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }\n'
     'layer { name: "conv_b" type: "Convolution" bottom: "c" top: "d" param { name: "w" } '
     'convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }', "shares its parameters"),
], ids=["not-a-conv", "batch-stats", "shared-weights"])
def test_unfoldable_chains_are_left_alone(case, reason):
    net = _small_net(INPUT + case, seed=13)
    fused = fuse_net(net)
    assert fused.fused.folds == []
    assert len(fused.fused.skipped) == 1 and reason in fused.fused.skipped[0][1]
    x = _input((2, 4, 7, 6), seed=14)
    name = net.outputs[0]
    np.testing.assert_array_equal(fused.forward(data=x)[name], net.forward(data=x)[name])


def test_train_phase_batchnorm_is_not_folded():
    net = _small_net(phase=caffe_pb2.TRAIN)
    fused = fuse_net(net)
    assert fused.fused.folds == [] and len(fused.fused.skipped) == 2
    assert fused.phase == caffe_pb2.TRAIN


def test_missing_statistics_in_the_weights(tmp_path):
    net = _small_net()
    weights = {name: [b.data for b in blobs] for name, blobs in net.params.items() if name != "bn2"}
    with pytest.raises(WeightsError, match="BatchNorm 'bn2': the weights hold no blobs"):
        fuse_batchnorm(_param(SMALL), weights)


def test_net_keyword_needs_weights():
    with pytest.raises(WeightsError, match="needs the trained weights"):
        framework.Net(_param(SMALL), fuse_batchnorm=True)


def test_net_keyword_and_fused_net_from_files(tmp_path):
    net = _small_net(seed=15)
    prototxt, weights = tmp_path / "small.prototxt", tmp_path / "small.caffemodel"
    caffe_io.write_prototxt(prototxt, _param(SMALL))
    net.save(weights)
    x = _input((2, 4, 7, 6), seed=16)
    want = net.forward(data=x)["pool"]
    by_keyword = framework.Net(str(prototxt), str(weights), framework.TEST, fuse_batchnorm=True)
    by_function = fused_net(str(prototxt), str(weights))
    for fused in (by_keyword, by_function):
        assert "BatchNorm" not in _types(fused) and "Scale" not in _types(fused)
        assert _relative_error(fused.forward(data=x)["pool"], want) < 1e-5


def test_tool_writes_files_that_load_back(tmp_path, capsys):
    from tools.fuse_batchnorm import main

    net = _small_net(seed=17)
    prototxt, weights = tmp_path / "small.prototxt", tmp_path / "small.caffemodel"
    caffe_io.write_prototxt(prototxt, _param(SMALL))
    net.save(weights)
    out_model, out_weights = tmp_path / "fused.prototxt", tmp_path / "fused.caffemodel"
    assert main([str(prototxt), str(weights), str(out_model), str(out_weights)]) == 0
    assert "Folded 2 BatchNorm layer(s) (1 with their Scale)" in capsys.readouterr().out
    loaded = framework.Net(str(out_model), str(out_weights), framework.TEST)
    assert _types(loaded) == ["Input", "Convolution", "ReLU", "Convolution", "Pooling"]
    x = _input((2, 4, 7, 6), seed=18)
    assert _relative_error(loaded.forward(data=x)["pool"], net.forward(data=x)["pool"]) < 1e-5


def test_tool_reports_a_missing_file(tmp_path, capsys):
    from tools.fuse_batchnorm import main

    prototxt = tmp_path / "small.prototxt"
    caffe_io.write_prototxt(prototxt, _param(SMALL))
    assert main([str(prototxt), str(tmp_path / "nope.caffemodel"), str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "nope.caffemodel" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# -- ResNet-50 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50():
    prototxt = os.path.join(os.path.dirname(ROOT), "shared", "caffe-models", "resnet", "ResNet-50-deploy.prototxt")
    net = _statistics(framework.Net(prototxt, framework.TEST), seed=21, scale_factors=(0.5, 50.0))
    # keep the statistics ResNet-like (randomize_params' ranges) so activations stay bounded
    rng = np.random.default_rng(22)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            s = layer.blobs[2].data[0]
            layer.blobs[0].data[...] = s * rng.normal(0, 0.1, layer.blobs[0].count)
            layer.blobs[1].data[...] = s * rng.uniform(0.5, 1.5, layer.blobs[1].count)
        elif layer.type == "Scale":
            layer.blobs[0].data[...] = rng.uniform(0.8, 1.2, layer.blobs[0].count)
    x = _input((2, 3, 224, 224), seed=23)
    out = {k: v.copy() for k, v in net.forward(data=x, blobs=["fc1000"]).items()}
    assert np.ptp(out["fc1000"]) > 1 and out["prob"].max() < 0.99  # neither flat nor saturated
    return prototxt, net, x, out


def test_resnet50_fused_equals_unfused(resnet50):
    prototxt, net, x, want = resnet50
    fused = fuse_net(net)
    assert len(fused.fused.folds) == 53 and all(f.scale for f in fused.fused.folds)
    assert fused.fused.skipped == []
    assert "BatchNorm" not in _types(fused) and "Scale" not in _types(fused)
    assert set(fused.blobs) == set(net.blobs)  # in-place chains: every blob name stays
    got = fused.forward(data=x, blobs=["fc1000"])
    assert _relative_error(got["fc1000"], want["fc1000"]) < 1e-5
    assert _relative_error(got["prob"], want["prob"]) < 1e-5


def test_resnet50_tool_output_loads_here_and_in_opencv(resnet50, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from tools.fuse_batchnorm import main

    prototxt, net, x, want = resnet50
    weights = tmp_path / "r50.caffemodel"
    net.save(weights)
    out_model, out_weights = tmp_path / "r50_fused.prototxt", tmp_path / "r50_fused.caffemodel"
    assert main([prototxt, str(weights), str(out_model), str(out_weights)]) == 0
    ours = framework.Net(str(out_model), str(out_weights), framework.TEST).forward(data=x, blobs=["fc1000"])
    assert _relative_error(ours["fc1000"], want["fc1000"]) < 1e-5
    cv_net = cv2.dnn.readNetFromCaffe(str(out_model), str(out_weights))
    cv_net.setInput(x)
    cv_fc, cv_prob = cv_net.forward(["fc1000", "prob"])
    assert _relative_error(cv_fc, want["fc1000"]) < 1e-4
    assert _relative_error(cv_prob, want["prob"]) < 1e-4
