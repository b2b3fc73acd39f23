"""BatchNorm -> Scale (-> ReLU) folding in training (framework/net.py _plan_scale_folds,
BatchNormLayer._normalize_and_scale / backward_with_scale): the folded group must give the
numbers of the layers run one by one (float32 round-off apart), and its backward must match
finite differences of its forward."""
import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework.blob import Blob
from gradient_check import layer_from_text
from layers import parallel
from proto import caffe_pb2

# Five branches from one input, summed into one loss:
#  a: conv -> BatchNorm (in place) -> Scale with bias (in place) -> ReLU (in place)  folded, with ReLU
#  b: conv -> BatchNorm (in place) -> Scale without bias (in place)                  folded
#  f: conv -> BatchNorm (own top) -> Scale in place on it                            not folded
#     (folded, the BatchNorm top's diff would keep the Scale's input gradient unwritten)
#  c: BatchNorm -> Scale with its own top                                            not folded
#  d: BatchNorm on global statistics -> Scale in place                               not folded
#  e: BatchNorm -> Scale of one scalar (num_axes 0) in place                         not folded
BRANCH = """
layer {{ name: "conv_{n}" type: "Convolution" bottom: "data" top: "conv_{n}"
        convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
"""
NET = "\n".join([
    'name: "bnfold"',
    'layer { name: "data" type: "Input" top: "data" top: "target" '
    'input_param { shape { dim: 3 dim: 3 dim: 5 dim: 5 } shape { dim: 3 dim: 4 dim: 5 dim: 5 } } }',
    *(BRANCH.format(n=n) for n in "abcdef"),
    'layer { name: "bn_a" type: "BatchNorm" bottom: "conv_a" top: "conv_a" }',
    'layer { name: "scale_a" type: "Scale" bottom: "conv_a" top: "conv_a" scale_param { bias_term: true '
    'filler { type: "uniform" min: 0.5 max: 1.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }',
    'layer { name: "relu_a" type: "ReLU" bottom: "conv_a" top: "conv_a" }',
    'layer { name: "bn_b" type: "BatchNorm" bottom: "conv_b" top: "conv_b" }',
    'layer { name: "scale_b" type: "Scale" bottom: "conv_b" top: "conv_b" '
    'scale_param { filler { type: "uniform" min: -1.5 max: 1.5 } } }',
    'layer { name: "bn_f" type: "BatchNorm" bottom: "conv_f" top: "norm_f" }',
    'layer { name: "scale_f" type: "Scale" bottom: "norm_f" top: "norm_f" }',
    'layer { name: "bn_c" type: "BatchNorm" bottom: "conv_c" top: "conv_c" }',
    'layer { name: "scale_c" type: "Scale" bottom: "conv_c" top: "scale_c" scale_param { bias_term: true } }',
    'layer { name: "bn_d" type: "BatchNorm" bottom: "conv_d" top: "conv_d" '
    'batch_norm_param { use_global_stats: true } }',
    'layer { name: "scale_d" type: "Scale" bottom: "conv_d" top: "conv_d" }',
    'layer { name: "bn_e" type: "BatchNorm" bottom: "conv_e" top: "conv_e" }',
    'layer { name: "scale_e" type: "Scale" bottom: "conv_e" top: "conv_e" scale_param { num_axes: 0 } }',
    'layer { name: "sum" type: "Eltwise" bottom: "conv_a" bottom: "conv_b" bottom: "scale_c" '
    'bottom: "conv_d" bottom: "conv_e" bottom: "norm_f" top: "sum" }',
    'layer { name: "loss" type: "EuclideanLoss" bottom: "sum" bottom: "target" top: "loss" }',
])


def make_net():
    framework.set_random_seed(7)
    param = text_format.Parse(NET, caffe_pb2.NetParameter())
    param.state.phase = framework.TRAIN
    net = framework.Net(param)
    rng = np.random.default_rng(8)
    net.blobs["data"].data[...] = rng.standard_normal((3, 3, 5, 5)) * 2 + 1
    net.blobs["target"].data[...] = rng.standard_normal((3, 4, 5, 5))
    # global statistics for bn_d (scale factor 2, so mean = M/2, var = V/2)
    m_sum, v_sum, s = net.params["bn_d"]
    m_sum.data[...], v_sum.data[...], s.data[...] = [0.2, -0.4, 0.6, 0.0], [2.0, 1.0, 0.5, 3.0], 2.0
    return net


def folded_groups(net):
    names = net.layer_names
    return {names[b]: names[s] for b, s in net._scale_folds.items()}


def test_plan_folds_in_place_per_channel_scales_after_batch_statistics():
    net = make_net()
    assert folded_groups(net) == {"bn_a": "scale_a", "bn_b": "scale_b"}
    names = net.layer_names
    assert {names[p]: names[r] for p, r in net._relu_folds.items()} == {"scale_a": "relu_a"}


def snapshot(net):
    blobs = {name: (blob.data.copy(), blob.diff.copy()) for name, blob in net.blobs.items()}
    params = {name: [(b.data.copy(), b.diff.copy()) for b in blobs_] for name, blobs_ in net.params.items()}
    return blobs, params


def one_by_one_step(net):
    """forward and backward with every layer called on its own (nothing folds)."""
    loss = sum(net.forward_from_to(i, i) for i in range(len(net.layers)))
    for i in reversed(range(len(net.layers))):
        net.backward_from_to(i, i)
    return loss


def assert_close(got, want, what):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=what)


@pytest.mark.parametrize("block_bytes", [64, 256 << 10])
def test_folded_training_step_matches_the_layers_one_by_one(monkeypatch, block_bytes):
    monkeypatch.setattr(parallel, "BLOCK_BYTES", block_bytes)  # 64: many blocks per array
    folded, plain = make_net(), make_net()
    loss = None
    for step in range(2):  # the second step starts from updated running statistics
        folded.clear_param_diffs()
        plain.clear_param_diffs()
        loss = folded.forward_backward()
        want_loss = one_by_one_step(plain)
        assert loss == pytest.approx(want_loss, rel=1e-5)
    bn_a, scale_a = folded.layers[folded.layer_names.index("bn_a")], folded.layers[folded.layer_names.index("scale_a")]
    assert bn_a.fused_scale is scale_a and scale_a.fused_relu  # the group did run folded
    got_blobs, got_params = snapshot(folded)
    want_blobs, want_params = snapshot(plain)
    assert (want_blobs["conv_a"][0] == 0).any()  # the ReLU clipped something
    for name, (data, diff) in want_blobs.items():
        assert_close(got_blobs[name][0], data, f"{name} data")
        assert_close(got_blobs[name][1], diff, f"{name} diff")
    for name, blobs in want_params.items():
        for k, (data, diff) in enumerate(blobs):
            assert_close(got_params[name][k][0], data, f"{name} blob {k} data (running statistics)")
            assert_close(got_params[name][k][1], diff, f"{name} blob {k} diff")
    # gradients did flow through each folded group, into its Scale and below its BatchNorm
    for n in "ab":
        assert np.abs(got_params[f"scale_{n}"][0][1]).max() > 0
        assert np.abs(got_params[f"conv_{n}"][0][1]).max() > 0


def test_forward_ending_at_batchnorm_leaves_the_scale_undone():
    net = make_net()
    out = net.forward(end="bn_a")["conv_a"]
    bn_a = net.layers[net.layer_names.index("bn_a")]
    assert bn_a.fused_scale is None
    per_channel = out.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(per_channel.mean(axis=1), 0, atol=1e-5)  # normalised, not scaled
    np.testing.assert_allclose(per_channel.var(axis=1), 1, rtol=1e-3)
    assert (out < 0).any()  # and no ReLU


def test_backward_of_a_partial_range_runs_the_layers_unfolded():
    folded, plain = make_net(), make_net()
    folded.forward_loss()
    plain.forward_loss()
    names = folded.layer_names
    start, end = names.index("relu_a"), names.index("scale_a")  # the group without its BatchNorm
    folded.backward_from_to(start, end)
    for i in range(start, end - 1, -1):
        plain.backward_from_to(i, i)
    np.testing.assert_array_equal(folded.blobs["conv_a"].diff, plain.blobs["conv_a"].diff)
    np.testing.assert_array_equal(folded.params["scale_a"][0].diff, plain.params["scale_a"][0].diff)


@pytest.mark.parametrize("bias, relu", [(True, True), (True, False), (False, False)])
def test_folded_gradient_matches_finite_differences(bias, relu):
    """float64: d/dx, d/dgamma, d/dbeta of sum(R * y), y the folded group's forward of x."""
    rng = np.random.default_rng(9)
    shape = (3, 2, 2, 3)
    x0 = rng.standard_normal(shape) * 1.5 + 0.5
    weights = rng.standard_normal(shape)
    norm = layer_from_text('type: "BatchNorm"', framework.TRAIN)
    scale = layer_from_text(f'type: "Scale" scale_param {{ bias_term: {str(bias).lower()} }}', framework.TRAIN)
    blob = Blob(shape, dtype=np.float64)
    norm.setup_layer([blob], [blob])
    scale.setup_layer([blob], [blob])
    for b in norm.blobs + scale.blobs:
        b.set_dtype(np.float64)
    scale.blobs[0].data[...] = [0.7, -1.3]
    if bias:
        scale.blobs[1].data[...] = [0.4, -0.2]
    assert norm.can_fold_scale(scale)
    norm.fused_scale = scale
    scale.fused_relu = relu

    def objective():
        blob.data[...] = x0
        norm.forward([blob], [blob])
        return float(np.sum(blob.data * weights))

    objective()
    if relu:
        assert (blob.data == 0).any() and (blob.data > 0).any()
    blob.diff[...] = weights
    for b in scale.blobs:
        b.diff[...] = 0
    norm.backward_with_scale([blob], [blob], relu)
    analytic = [blob.diff.copy()] + [b.diff.copy() for b in scale.blobs]

    step = 1e-6
    numeric_x = np.zeros(shape)
    for index in np.ndindex(shape):
        for sign in (1, -1):
            x0[index] += sign * step
            numeric_x[index] += sign * objective() / (2 * step)
            x0[index] -= sign * step
    numeric = [numeric_x]
    for b in scale.blobs:
        grad = np.zeros(b.shape)
        for index in np.ndindex(b.shape):
            for sign in (1, -1):
                b.data[index] += sign * step
                grad[index] += sign * objective() / (2 * step)
                b.data[index] -= sign * step
        numeric.append(grad)
    for what, got, want in zip(("x", "gamma", "beta"), analytic, numeric):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=what)
    assert np.abs(analytic[0]).max() > 1e-3
