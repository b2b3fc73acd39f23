"""Tests of framework/upgrade.py (Caffe's upgrade_proto.cpp) and the two upgrade tools."""
import glob
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from framework.errors import NetError
from framework.upgrade import (
    V1_TO_CURRENT_TYPE, net_needs_upgrade, upgrade_net, upgrade_solver, upgrade_v1_layer)
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def net_from_text(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def read_net_text(path):
    with open(path) as f:
        return text_format.Parse(f.read(), caffe_pb2.NetParameter())


def read_net_binary(path):
    net = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        net.ParseFromString(f.read())
    return net


def read_solver(path):
    with open(path) as f:
        return text_format.Parse(f.read(), caffe_pb2.SolverParameter())


def fixture(shared_dir, name):
    return os.path.join(shared_dir, "caffe-fixtures", name)


def model(shared_dir, *parts):
    return os.path.join(shared_dir, "caffe-models", *parts)


def blob_values(blob):
    return np.asarray(blob.data, dtype=np.float32).ravel()


def layer_summary(net):
    return [(layer.name, layer.type) for layer in net.layer]


def run_tool(script, *args):
    return subprocess.run([sys.executable, os.path.join(TOOLS, script), *args],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------
# V1 nets inside a solver (lenet_consolidated_solver.prototxt)
# ------------------------------------------------------------------------------------------

LENET_V1_LAYERS = [
    ("mnist", "Data"), ("mnist", "Data"), ("mnist", "Data"), ("conv1", "Convolution"),
    ("pool1", "Pooling"), ("conv2", "Convolution"), ("pool2", "Pooling"),
    ("ip1", "InnerProduct"), ("relu1", "ReLU"), ("ip2", "InnerProduct"),
    ("accuracy", "Accuracy"), ("loss", "SoftmaxWithLoss"),
]


def check_upgraded_consolidated_lenet(net):
    assert len(net.layers) == 0
    assert layer_summary(net) == LENET_V1_LAYERS
    by_name = {layer.name: layer for layer in net.layer}
    for name in ("conv1", "conv2", "ip1", "ip2"):
        assert [p.lr_mult for p in by_name[name].param] == [1.0, 2.0]
        assert not any(p.HasField("decay_mult") for p in by_name[name].param)
    for name in ("pool1", "pool2", "relu1", "accuracy", "loss"):
        assert len(by_name[name].param) == 0
    conv1 = by_name["conv1"]
    assert conv1.convolution_param.num_output == 20
    assert list(conv1.convolution_param.kernel_size) == [5]
    assert conv1.convolution_param.weight_filler.type == "xavier"
    assert list(conv1.bottom) == ["data"] and list(conv1.top) == ["conv1"]
    assert by_name["pool1"].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    assert by_name["ip1"].inner_product_param.num_output == 500
    assert list(by_name["relu1"].top) == ["ip1"]
    data_layers = net.layer[:3]
    assert [d.include[0].phase for d in data_layers] == [caffe_pb2.TRAIN, caffe_pb2.TEST,
                                                         caffe_pb2.TEST]
    assert [list(d.include[0].stage) for d in data_layers] == [
        [], ["test-on-test-set"], ["test-on-train-set"]]
    assert [d.data_param.batch_size for d in data_layers] == [64, 100, 100]
    assert all(d.data_param.backend == caffe_pb2.DataParameter.LMDB for d in data_layers)
    assert all(d.transform_param.scale == pytest.approx(0.00390625) for d in data_layers)
    assert list(data_layers[0].top) == ["data", "label"]


def test_consolidated_solver_net_param(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet_consolidated_solver.prototxt")
    solver = read_solver(path)
    assert len(solver.net_param.layers) == 12 and len(solver.net_param.layer) == 0
    assert net_needs_upgrade(solver.net_param)
    upgrade_solver(solver, path)
    check_upgraded_consolidated_lenet(solver.net_param)
    assert solver.net_param.name == "LeNet"
    assert not net_needs_upgrade(solver.net_param)
    assert not solver.HasField("type")  # no solver_type to upgrade: stays the default


def test_consolidated_solver_train_and_test_net_params(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet_consolidated_solver.prototxt")
    original = read_solver(path)
    solver = caffe_pb2.SolverParameter()
    solver.train_net_param.CopyFrom(original.net_param)
    solver.test_net_param.add().CopyFrom(original.net_param)
    solver.test_net_param.add().CopyFrom(original.net_param)
    upgrade_solver(solver, path)
    for net in [solver.train_net_param, *solver.test_net_param]:
        check_upgraded_consolidated_lenet(net)


def test_solver_inline_nets_left_alone_when_asked(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet_consolidated_solver.prototxt")
    solver = read_solver(path)
    upgrade_solver(solver, path, upgrade_nets=False)
    assert len(solver.net_param.layers) == 12 and len(solver.net_param.layer) == 0


def test_upgrade_net_on_inline_net_directly(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet_consolidated_solver.prototxt")
    net = read_solver(path).net_param
    returned = upgrade_net(net, path)
    assert returned is net
    check_upgraded_consolidated_lenet(net)


# ------------------------------------------------------------------------------------------
# Binary V1 .caffemodel with weights and an input header
# ------------------------------------------------------------------------------------------

LENET_LEARNED = ["conv1", "conv2", "ip1", "ip2"]


def test_v1_caffemodel_upgrade_keeps_weights(shared_dir):
    path = fixture(shared_dir, "lenet_iter_20_v1.caffemodel")
    net = read_net_binary(path)
    assert list(net.input) == ["data"] and len(net.layers) == 7
    assert net_needs_upgrade(net)
    upgrade_net(net, path)

    assert layer_summary(net) == [
        ("input", "Input"), ("conv1", "Convolution"), ("pool1", "Pooling"),
        ("conv2", "Convolution"), ("pool2", "Pooling"), ("ip1", "InnerProduct"),
        ("relu1", "ReLU"), ("ip2", "InnerProduct")]
    assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
    assert list(net.layer[0].top) == ["data"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 1, 28, 28]]
    assert not net_needs_upgrade(net)

    current = {layer.name: layer for layer in read_net_binary(
        fixture(shared_dir, "lenet_iter_20.caffemodel")).layer}
    upgraded = {layer.name: layer for layer in net.layer}
    assert [n for n, layer in upgraded.items() if layer.blobs] == LENET_LEARNED
    for name in LENET_LEARNED:
        ours, ref = upgraded[name], current[name]
        assert [p.lr_mult for p in ours.param] == [1.0, 2.0]
        assert len(ours.blobs) == len(ref.blobs) == 2
        for a, b in zip(ours.blobs, ref.blobs):
            assert a.HasField("num")  # legacy 4-D dims are kept as they are
            assert np.array_equal(blob_values(a), blob_values(b))
            assert blob_values(a).size == int(np.prod(b.shape.dim))
        assert ours.type == ref.type
        assert list(ours.bottom) == list(ref.bottom) and list(ours.top) == list(ref.top)


def test_legacy_caffemodel_input_names_without_dims_are_dropped():
    net = net_from_text('input: "data" layer { name: "relu" type: "ReLU" bottom: "data" '
                        'top: "data" }')
    assert net_needs_upgrade(net)
    upgrade_net(net)
    assert layer_summary(net) == [("relu", "ReLU")]
    assert len(net.input) == 0


# ------------------------------------------------------------------------------------------
# input / input_dim / input_shape headers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", ["50", "101", "152"])
def test_resnet_deploy_input_header(shared_dir, depth):
    path = model(shared_dir, "resnet", f"ResNet-{depth}-deploy.prototxt")
    net = read_net_text(path)
    n_layers = len(net.layer)
    first = net.layer[0].name
    assert list(net.input) == ["data"] and list(net.input_dim) == [1, 3, 224, 224]
    upgrade_net(net, path)
    assert len(net.layer) == n_layers + 1
    assert (net.layer[0].name, net.layer[0].type) == ("input", "Input")
    assert list(net.layer[0].top) == ["data"] and len(net.layer[0].bottom) == 0
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 3, 224, 224]]
    assert net.layer[1].name == first
    assert len(net.input) == 0 and len(net.input_dim) == 0
    assert not net_needs_upgrade(net)


def test_input_shape_header_two_inputs():
    net = net_from_text("""
        input: "a" input_shape { dim: 2 dim: 3 }
        input: "b" input_shape { dim: 2 }
        layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "a" top: "s" }""")
    upgrade_net(net)
    assert layer_summary(net) == [("input", "Input"), ("sum", "Eltwise")]
    assert list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[2, 3], [2]]
    assert len(net.input_shape) == 0


def test_input_dim_two_inputs_split_four_by_four():
    net = net_from_text('input: "x" input: "y" ' + " ".join(
        f"input_dim: {d}" for d in [1, 2, 3, 4, 5, 6, 7, 8]))
    upgrade_net(net)
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_input_dim_count_mismatch_is_an_error():
    net = net_from_text('input: "x" input_dim: 1 input_dim: 3 input_dim: 8')
    with pytest.raises(NetError, match=r"deploy\.prototxt.*4 input_dim values.*got 3"):
        upgrade_net(net, "deploy.prototxt")


def test_input_shape_count_mismatch_is_an_error():
    net = net_from_text('input: "x" input: "y" input_shape { dim: 1 }')
    with pytest.raises(NetError, match=r"net\.prototxt.*2 input\(s\).*1 input_shape"):
        upgrade_net(net, "net.prototxt")


def test_input_shape_and_input_dim_together_is_an_error():
    net = net_from_text('input: "x" input_shape { dim: 1 } input_dim: 1 input_dim: 1 '
                        'input_dim: 1 input_dim: 1')
    with pytest.raises(NetError, match="either by input_shape or by input_dim"):
        upgrade_net(net, "net.prototxt")


# ------------------------------------------------------------------------------------------
# V0 nets
# ------------------------------------------------------------------------------------------

V0_NET = """
name: "tiny_v0"
layers {
  layer { name: "data" type: "data" source: "/data/train_db" batchsize: 4 rand_skip: 3
          scale: 0.5 meanfile: "mean.binaryproto" cropsize: 7 mirror: true }
  top: "data" top: "label"
}
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer { name: "conv1" type: "conv" num_output: 8 kernelsize: 3 stride: 2 group: 2
          biasterm: false weight_filler { type: "gaussian" std: 0.01 }
          bias_filler { type: "constant" value: 0.1 }
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers {
  layer { name: "relu1" type: "relu" }
  bottom: "conv1" top: "conv1"
}
"""


def test_v0_net_upgrade():
    net = net_from_text(V0_NET)
    assert net_needs_upgrade(net)
    upgrade_net(net, "tiny_v0.prototxt")
    assert net.name == "tiny_v0"
    assert layer_summary(net) == [("data", "Data"), ("conv1", "Convolution"), ("relu1", "ReLU")]
    assert len(net.layers) == 0
    data, conv, relu = net.layer
    assert list(data.top) == ["data", "label"]
    assert data.data_param.source == "/data/train_db"
    assert data.data_param.batch_size == 4 and data.data_param.rand_skip == 3
    assert data.transform_param.scale == 0.5
    assert data.transform_param.mean_file == "mean.binaryproto"
    assert data.transform_param.crop_size == 7 and data.transform_param.mirror is True
    # the padding layer is gone and its pad lives in the convolution it fed
    assert list(conv.bottom) == ["data"] and list(conv.top) == ["conv1"]
    cp = conv.convolution_param
    assert list(cp.pad) == [2] and list(cp.kernel_size) == [3] and list(cp.stride) == [2]
    assert cp.num_output == 8 and cp.group == 2 and cp.bias_term is False
    assert cp.weight_filler.type == "gaussian" and cp.weight_filler.std == pytest.approx(0.01)
    assert cp.bias_filler.value == pytest.approx(0.1)
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1.0, 1.0), (2.0, 0.0)]
    assert list(relu.bottom) == ["conv1"] and list(relu.top) == ["conv1"]
    assert not net_needs_upgrade(net)


def test_v0_padding_into_pooling_and_other_layer_types():
    net = net_from_text("""
        input: "x" input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
        layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "x" top: "xp" }
        layers { layer { name: "pool" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
                 bottom: "xp" top: "p" }
        layers { layer { name: "norm" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }
                 bottom: "p" top: "n" }
        layers { layer { name: "ip" type: "innerproduct" num_output: 3 biasterm: false }
                 bottom: "n" top: "ip" }
        layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 }
                 bottom: "ip" top: "ip" }
        layers { layer { name: "cat" type: "concat" concat_dim: 1 }
                 bottom: "ip" bottom: "ip" top: "cat" }
        layers { layer { name: "prob" type: "softmax_loss" } bottom: "cat" top: "loss" }""")
    upgrade_net(net, "v0.prototxt")
    assert layer_summary(net) == [
        ("input", "Input"), ("pool", "Pooling"), ("norm", "LRN"), ("ip", "InnerProduct"),
        ("drop", "Dropout"), ("cat", "Concat"), ("prob", "SoftmaxWithLoss")]
    pool = net.layer[1]
    assert list(pool.bottom) == ["x"]
    pp = pool.pooling_param
    assert (pp.pad, pp.kernel_size, pp.stride) == (1, 3, 2)
    assert pp.pool == caffe_pb2.PoolingParameter.AVE
    lrn = net.layer[2].lrn_param
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (3, 0.5, 0.25, 2.0)
    assert net.layer[3].inner_product_param.num_output == 3
    assert net.layer[3].inner_product_param.bias_term is False
    assert net.layer[4].dropout_param.dropout_ratio == 0.25
    assert net.layer[5].concat_param.concat_dim == 1
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2, 5, 5]]


def test_v0_blobs_are_kept():
    net = net_from_text("""
        input: "x"
        layers { layer { name: "ip" type: "innerproduct" num_output: 2
                         blobs { num: 1 channels: 1 height: 2 width: 3
                                 data: 1 data: 2 data: 3 data: 4 data: 5 data: 6 }
                         blobs { num: 1 channels: 1 height: 1 width: 2 data: -1 data: 7 } }
                 bottom: "x" top: "y" }""")
    upgrade_net(net)
    ip = net.layer[0]
    assert [blob_values(b).tolist() for b in ip.blobs] == [[1, 2, 3, 4, 5, 6], [-1, 7]]
    assert (ip.blobs[0].height, ip.blobs[0].width) == (2, 3)


def test_v0_padding_feeding_relu_is_an_error():
    net = net_from_text("""
        input: "x"
        layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "x" top: "xp" }
        layers { layer { name: "act" type: "relu" } bottom: "xp" top: "y" }""")
    with pytest.raises(NetError, match=r"old\.prototxt.*layer 'act'.*padding.*relu"):
        upgrade_net(net, "old.prototxt")


def test_v0_unknown_bottom_is_an_error():
    net = net_from_text('layers { layer { name: "act" type: "relu" } bottom: "nowhere" '
                        'top: "y" }')
    with pytest.raises(NetError, match=r"old\.prototxt.*layer 'act'.*unknown bottom blob "
                                       r"'nowhere'"):
        upgrade_net(net, "old.prototxt")


def test_v0_unknown_type_is_an_error():
    net = net_from_text('layers { layer { name: "odd" type: "warp" } }')
    with pytest.raises(NetError, match=r"old\.prototxt.*layer 'odd'.*unknown V0 layer type "
                                       r"'warp'"):
        upgrade_net(net, "old.prototxt")


def test_v0_parameter_on_wrong_layer_type_is_an_error():
    # Caffe logs "Unknown parameter num_output for layer type relu" and drops it; we refuse.
    net = net_from_text('layers { layer { name: "act" type: "relu" num_output: 3 } }')
    with pytest.raises(NetError, match=r"old\.prototxt.*layer 'act'.*num_output.*not valid"):
        upgrade_net(net, "old.prototxt")


def test_v0_parameter_without_equivalent_is_an_error():
    net = net_from_text('layers { layer { name: "d" type: "data" new_num: 3 } }')
    with pytest.raises(NetError, match=r"layer 'd'.*new_num.*no equivalent"):
        upgrade_net(net, "old.prototxt")


# ------------------------------------------------------------------------------------------
# V1 details
# ------------------------------------------------------------------------------------------

def test_v1_data_transformation_fields_move_to_transform_param():
    net = net_from_text("""
        layers { name: "d" type: DATA top: "data" top: "label"
                 data_param { source: "db" batch_size: 2 scale: 0.25 crop_size: 5 mirror: true
                              mean_file: "m.binaryproto" }
                 include { phase: TRAIN } }
        layers { name: "img" type: IMAGE_DATA top: "img" top: "l2"
                 image_data_param { source: "list.txt" scale: 2 mirror: false }
                 transform_param { crop_size: 9 } }
        layers { name: "win" type: WINDOW_DATA top: "w" top: "l3"
                 window_data_param { source: "win.txt" crop_size: 11 mean_file: "w.mean" } }""")
    upgrade_net(net, "data.prototxt")
    d, img, win = net.layer
    assert d.type == "Data"
    tp = d.transform_param
    assert (tp.scale, tp.crop_size, tp.mirror, tp.mean_file) == (0.25, 5, True, "m.binaryproto")
    dp = d.data_param
    assert not any(dp.HasField(f) for f in ("scale", "crop_size", "mirror", "mean_file"))
    assert dp.source == "db" and dp.batch_size == 2
    assert d.include[0].phase == caffe_pb2.TRAIN
    assert img.type == "ImageData"
    assert img.transform_param.scale == 2 and img.transform_param.HasField("mirror")
    assert img.transform_param.mirror is False and img.transform_param.crop_size == 9
    assert not img.image_data_param.HasField("scale")
    assert img.image_data_param.source == "list.txt"
    assert win.type == "WindowData"
    assert win.transform_param.crop_size == 11 and win.transform_param.mean_file == "w.mean"
    assert not win.window_data_param.HasField("crop_size")


def test_v1_param_names_share_modes_and_rules():
    net = net_from_text("""
        layers { name: "a" type: INNER_PRODUCT bottom: "x" top: "y"
                 param: "w_shared" param: "b_shared"
                 blob_share_mode: PERMISSIVE
                 blobs_lr: 3 weight_decay: 0.5 weight_decay: 0.25
                 inner_product_param { num_output: 4 }
                 exclude { phase: TEST } }
        layers { name: "l" type: EUCLIDEAN_LOSS bottom: "y" bottom: "t" top: "loss"
                 loss_weight: 0.5 loss_param { normalize: false }
                 include { phase: TRAIN stage: "s1" } }""")
    upgrade_net(net)
    a, loss = net.layer
    assert [(p.name, p.lr_mult, p.decay_mult) for p in a.param] == [
        ("w_shared", 3.0, 0.5), ("b_shared", 1.0, 0.25)]
    assert a.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not a.param[1].HasField("share_mode") and not a.param[1].HasField("lr_mult")
    assert a.exclude[0].phase == caffe_pb2.TEST and len(a.include) == 0
    assert a.inner_product_param.num_output == 4
    assert loss.type == "EuclideanLoss"
    assert list(loss.loss_weight) == [0.5] and loss.loss_param.normalize is False
    assert loss.include[0].phase == caffe_pb2.TRAIN and list(loss.include[0].stage) == ["s1"]


def test_v1_every_param_message_is_copied():
    v1 = caffe_pb2.V1LayerParameter(name="all", type=caffe_pb2.V1LayerParameter.SPLIT)
    names = [fd.name for fd in v1.DESCRIPTOR.fields
             if fd.name.endswith("_param") and fd.message_type is not None]
    assert len(names) == 30
    for name in names:
        getattr(v1, name).SetInParent()
    v1.convolution_param.num_output = 6
    v1.threshold_param.threshold = 0.75
    layer = upgrade_v1_layer(v1)
    assert [name for name in names if not layer.HasField(name)] == []
    assert layer.convolution_param.num_output == 6
    assert layer.threshold_param.threshold == 0.75


def test_v1_every_layer_type_has_a_current_name():
    enum = caffe_pb2.V1LayerParameter.LayerType
    assert set(enum.keys()) == set(V1_TO_CURRENT_TYPE)
    spot = {"DECONVOLUTION": "Deconvolution", "SOFTMAX_LOSS": "SoftmaxWithLoss",
            "IMAGE_DATA": "ImageData", "HDF5_OUTPUT": "HDF5Output", "ABSVAL": "AbsVal",
            "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "TANH": "TanH",
            "NONE": ""}
    for enum_name, expected in spot.items():
        layer = upgrade_v1_layer(caffe_pb2.V1LayerParameter(type=enum.Value(enum_name)))
        assert layer.type == expected


def test_v1_blobs_kept_exactly():
    v1 = caffe_pb2.V1LayerParameter(name="c", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    values = np.random.default_rng(0).standard_normal(24).astype(np.float32)
    blob = v1.blobs.add(num=2, channels=3, height=2, width=2)
    blob.data.extend(values.tolist())
    blob.diff.extend((values * 2).tolist())
    layer = upgrade_v1_layer(v1)
    assert np.array_equal(blob_values(layer.blobs[0]), values)
    assert np.array_equal(np.asarray(layer.blobs[0].diff, np.float32), values * 2)
    assert (layer.blobs[0].num, layer.blobs[0].channels) == (2, 3)


def test_both_layer_and_layers_is_refused():
    net = net_from_text("""
        layer { name: "new" type: "ReLU" bottom: "x" top: "x" }
        layers { name: "old" type: RELU bottom: "x" top: "x" }""")
    with pytest.raises(NetError, match=r"mixed\.prototxt.*both layer and layers fields"):
        upgrade_net(net, "mixed.prototxt")


def test_current_net_is_left_unchanged(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet.prototxt")
    net = read_net_text(path)
    before = net.SerializeToString()
    assert not net_needs_upgrade(net)
    upgrade_net(net, path)
    assert net.SerializeToString() == before


# ------------------------------------------------------------------------------------------
# BatchNorm
# ------------------------------------------------------------------------------------------

def test_batch_norm_three_param_specs_zeroed_names_kept():
    net = net_from_text("""
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y"
                param { name: "mean" lr_mult: 1 decay_mult: 1 }
                param { name: "var" lr_mult: 2 }
                param { name: "factor" share_mode: PERMISSIVE } }
        layer { name: "bn2" type: "BatchNorm" bottom: "y" top: "z"
                param { lr_mult: 1 } param { lr_mult: 1 } }
        layer { name: "ip" type: "InnerProduct" bottom: "z" top: "w"
                param { lr_mult: 5 } param { lr_mult: 5 } param { lr_mult: 5 } }""")
    assert net_needs_upgrade(net)
    upgrade_net(net)
    bn, bn2, ip = net.layer
    assert [(p.name, p.lr_mult, p.decay_mult) for p in bn.param] == [
        ("mean", 0.0, 0.0), ("var", 0.0, 0.0), ("factor", 0.0, 0.0)]
    assert bn.param[2].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    # Caffe only rewrites BatchNorm layers with exactly three specs, and only BatchNorm
    assert [p.lr_mult for p in bn2.param] == [1.0, 1.0]
    assert [p.lr_mult for p in ip.param] == [5.0, 5.0, 5.0]
    assert not net_needs_upgrade(net)


def test_batch_norm_cifar10_file(shared_dir):
    path = model(shared_dir, "bvlc", "examples", "cifar10",
                 "cifar10_full_sigmoid_train_test_bn.prototxt")
    net = read_net_text(path)
    bns = [layer for layer in net.layer if layer.type == "BatchNorm"]
    assert len(bns) == 3 and all(len(b.param) == 3 for b in bns)
    assert not any(p.HasField("decay_mult") for b in bns for p in b.param)
    assert net_needs_upgrade(net)
    upgrade_net(net, path)
    for b in bns:
        assert [(p.lr_mult, p.decay_mult) for p in b.param] == [(0.0, 0.0)] * 3
        assert all(p.HasField("decay_mult") for p in b.param)


# ------------------------------------------------------------------------------------------
# Solvers
# ------------------------------------------------------------------------------------------

SOLVER_ENUMS = {"SGD": "SGD", "Nesterov": "NESTEROV", "AdaGrad": "ADAGRAD",
                "RMSProp": "RMSPROP", "AdaDelta": "ADADELTA", "Adam": "ADAM"}


def mnist_solver_paths(shared_dir):
    paths = sorted(glob.glob(model(shared_dir, "bvlc", "examples", "mnist", "*solver*.prototxt")))
    assert len(paths) >= 10
    return paths


def test_solver_type_enum_upgrade_on_mnist_solvers(shared_dir):
    seen = set()
    for path in mnist_solver_paths(shared_dir):
        with open(path) as f:
            text = f.read()
        original = text_format.Parse(text, caffe_pb2.SolverParameter())
        expected = original.type  # "SGD" by default
        # rewrite the file the old way: `type: "X"` -> `solver_type: ENUM`
        legacy_text = re.sub(r'^type:\s*"\w+"\s*$', "", text, flags=re.M)
        legacy_text += f"\nsolver_type: {SOLVER_ENUMS[expected]}\n"
        legacy = text_format.Parse(legacy_text, caffe_pb2.SolverParameter())
        assert not legacy.HasField("type") and legacy.HasField("solver_type")
        upgrade_solver(legacy, path)
        assert legacy.type == expected
        assert not legacy.HasField("solver_type")
        assert legacy.base_lr == original.base_lr and legacy.net == original.net
        seen.add(expected)
    assert seen == set(SOLVER_ENUMS)


def test_solver_without_solver_type_is_unchanged(shared_dir):
    for path in mnist_solver_paths(shared_dir):
        solver = read_solver(path)
        before = solver.SerializeToString()
        if solver.HasField("net_param"):
            continue  # the consolidated solver's inline net is upgraded (tested above)
        upgrade_solver(solver, path)
        assert solver.SerializeToString() == before


def test_solver_type_and_solver_type_together_is_an_error():
    solver = text_format.Parse('type: "Adam" solver_type: ADAM', caffe_pb2.SolverParameter())
    with pytest.raises(NetError, match=r"s\.prototxt.*solver_type.*ADAM.*'Adam'.*both"):
        upgrade_solver(solver, "s.prototxt")
    solver = text_format.Parse('type: "SGD" solver_type: NESTEROV', caffe_pb2.SolverParameter())
    with pytest.raises(NetError, match="cannot both be specified"):
        upgrade_solver(solver, "s.prototxt")


def test_solver_inline_net_error_names_the_field():
    solver = text_format.Parse("""
        test_net_param { layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU } }""",
                               caffe_pb2.SolverParameter())
    with pytest.raises(NetError, match=r"sol\.prototxt \(test_net_param #0\).*both layer"):
        upgrade_solver(solver, "sol.prototxt")


# ------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------

def test_binary_tool_on_v1_caffemodel(shared_dir, tmp_path):
    out = tmp_path / "lenet_upgraded.caffemodel"
    result = run_tool("upgrade_net_proto_binary.py",
                      fixture(shared_dir, "lenet_iter_20_v1.caffemodel"), str(out))
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["lenet_upgraded.caffemodel"]  # no temporary file left
    upgraded = read_net_binary(str(out))
    current = read_net_binary(fixture(shared_dir, "lenet_iter_20.caffemodel"))
    assert len(upgraded.layers) == 0 and len(upgraded.input) == 0
    # the same layers as the current-format snapshot, except its data and loss layers
    names = [layer.name for layer in upgraded.layer]
    assert names == ["input"] + [layer.name for layer in current.layer
                                 if layer.type not in ("Data", "SoftmaxWithLoss")]
    ref = {layer.name: layer for layer in current.layer}
    for layer in upgraded.layer[1:]:
        assert layer.type == ref[layer.name].type
        assert len(layer.blobs) == len(ref[layer.name].blobs)
        for a, b in zip(layer.blobs, ref[layer.name].blobs):
            assert np.array_equal(blob_values(a), blob_values(b))
    assert sum(len(layer.blobs) for layer in upgraded.layer) == 8


def test_text_tool_on_v1_net(shared_dir, tmp_path):
    solver = read_solver(model(shared_dir, "bvlc", "examples", "mnist",
                               "lenet_consolidated_solver.prototxt"))
    src = tmp_path / "lenet_v1.prototxt"
    src.write_text(text_format.MessageToString(solver.net_param))
    out = tmp_path / "lenet_current.prototxt"
    result = run_tool("upgrade_net_proto_text.py", str(src), str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "layers {" not in text and 'type: "Convolution"' in text
    check_upgraded_consolidated_lenet(read_net_text(str(out)))
    assert sorted(os.listdir(tmp_path)) == ["lenet_current.prototxt", "lenet_v1.prototxt"]


@pytest.fixture
def restore_logging():
    """The tools' main() installs a root log handler; put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def load_tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_tool_current_file_copied_unchanged(shared_dir, tmp_path, restore_logging):
    tool = load_tool("upgrade_net_proto_text")
    path = model(shared_dir, "bvlc", "examples", "mnist", "lenet.prototxt")
    out = tmp_path / "same.prototxt"
    assert tool.main([path, str(out)]) == 0
    assert read_net_text(str(out)) == read_net_text(path)


def test_text_tool_exit_codes(tmp_path, restore_logging):
    tool = load_tool("upgrade_net_proto_text")
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: ")
    assert tool.main([str(bad), str(tmp_path / "o1.prototxt")]) == 2
    mixed = tmp_path / "mixed.prototxt"
    mixed.write_text('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    assert tool.main([str(mixed), str(tmp_path / "o2.prototxt")]) == 1
    assert not (tmp_path / "o1.prototxt").exists() and not (tmp_path / "o2.prototxt").exists()
    assert tool.main([str(tmp_path / "missing.prototxt"), str(tmp_path / "o3")]) == 2


def test_binary_tool_exit_codes(tmp_path, restore_logging):
    tool = load_tool("upgrade_net_proto_binary")
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff\xff not a proto")
    assert tool.main([str(bad), str(tmp_path / "o.caffemodel")]) == 2
    mixed = tmp_path / "mixed.caffemodel"
    mixed.write_bytes(net_from_text('layer { name: "a" type: "ReLU" } '
                                    'layers { name: "b" type: RELU }').SerializeToString())
    assert tool.main([str(mixed), str(tmp_path / "o.caffemodel")]) == 1
    assert not (tmp_path / "o.caffemodel").exists()
