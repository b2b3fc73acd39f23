"""Net building and running: NetState filtering, splits, wiring errors, backward needs, weights I/O."""
import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework.errors import LayerError, NetError, WeightsError
from framework.net_passes import filter_net, insert_splits
from proto import caffe_pb2


def net_param(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def build(text, phase=framework.TEST, **kwargs):
    param = net_param(text)
    param.state.phase = phase
    return framework.Net(param, **kwargs)


MLP = """
name: "mlp"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


# -- passes -------------------------------------------------------------------------
def test_filter_net_by_phase_level_and_stage():
    param = net_param("""
    state { phase: TRAIN level: 2 stage: "a" }
    layer { name: "always" type: "ReLU" }
    layer { name: "train" type: "ReLU" include { phase: TRAIN } }
    layer { name: "test" type: "ReLU" include { phase: TEST } }
    layer { name: "lvl3" type: "ReLU" include { min_level: 3 } }
    layer { name: "lvl_max2" type: "ReLU" include { max_level: 2 } }
    layer { name: "stage_a" type: "ReLU" include { stage: "a" } }
    layer { name: "stage_b" type: "ReLU" include { stage: "b" } }
    layer { name: "not_a" type: "ReLU" include { not_stage: "a" } }
    layer { name: "excl_train" type: "ReLU" exclude { phase: TRAIN } }
    layer { name: "excl_test" type: "ReLU" exclude { phase: TEST } }
    layer { name: "either" type: "ReLU" include { phase: TEST } include { stage: "a" } }
    """)
    kept = [layer.name for layer in filter_net(param).layer]
    assert kept == ["always", "train", "lvl_max2", "stage_a", "excl_test", "either"]


def test_filter_net_refuses_include_and_exclude():
    param = net_param('layer { name: "x" type: "ReLU" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(NetError, match="'x'.*either include rules or exclude rules"):
        filter_net(param)


def test_insert_splits_names_and_wiring():
    param = net_param("""
    layer { name: "data" type: "Input" top: "data" }
    layer { name: "a" type: "ReLU" bottom: "data" top: "a" }
    layer { name: "b" type: "ReLU" bottom: "data" top: "b" }
    layer { name: "c" type: "Eltwise" bottom: "a" bottom: "b" bottom: "data" top: "c" }
    """)
    out = insert_splits(param)
    names = [layer.name for layer in out.layer]
    assert names == ["data", "data_data_0_split", "a", "b", "c"]
    split = out.layer[1]
    assert split.type == "Split" and list(split.bottom) == ["data"]
    assert list(split.top) == [f"data_data_0_split_{i}" for i in range(3)]
    assert list(out.layer[2].bottom) == ["data_data_0_split_0"]
    assert list(out.layer[3].bottom) == ["data_data_0_split_1"]
    assert list(out.layer[4].bottom) == ["a", "b", "data_data_0_split_2"]


def test_insert_splits_in_place_rebinds_the_blob():
    # conv -> relu (in place) -> two consumers: the split comes after the relu
    param = net_param("""
    layer { name: "data" type: "Input" top: "x" }
    layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
    layer { name: "a" type: "ReLU" bottom: "x" top: "a" }
    layer { name: "b" type: "ReLU" bottom: "x" top: "b" }
    """)
    out = insert_splits(param)
    assert [layer.name for layer in out.layer] == ["data", "relu", "x_relu_0_split", "a", "b"]
    assert list(out.layer[1].bottom) == ["x"]


def test_insert_splits_moves_loss_weight_to_the_split():
    param = net_param("""
    layer { name: "data" type: "Input" top: "x" }
    layer { name: "l" type: "Reduction" bottom: "x" top: "r" loss_weight: 2 }
    layer { name: "use" type: "ReLU" bottom: "r" top: "y" }
    """)
    out = insert_splits(param)
    split = out.layer[2]
    assert split.name == "r_l_0_split" and list(split.loss_weight) == [2.0, 0.0]
    assert list(out.layer[1].loss_weight) == []
    assert list(out.layer[3].bottom) == ["r_l_0_split_1"]


# -- building -----------------------------------------------------------------------
def test_pycaffe_style_attributes():
    net = build(MLP)
    assert net.inputs == ["data", "label"]
    assert net.outputs == ["loss"]
    assert list(net.params) == ["ip1", "ip2"]
    assert [b.shape for b in net.params["ip1"]] == [(5, 3), (5,)]
    assert [b.shape for b in net.params["ip2"]] == [(2, 5), (2,)]
    assert list(net.blobs) == ["data", "label", "ip1", "ip2", "loss"]
    assert net.blobs["loss"].shape == ()
    np.testing.assert_allclose(net.params["ip1"][1].data, 0.1)
    assert net.params["ip1"][0].data.dtype == np.float32


def test_outputs_are_sorted_like_caffes_std_set():
    net = build("""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "z" type: "ReLU" bottom: "data" top: "zz" }
    layer { name: "a" type: "Sigmoid" bottom: "data" top: "aa" }
    """)
    assert net.outputs == ["aa", "zz"]


def test_forward_matches_numpy_and_returns_outputs():
    net = build(MLP)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = rng.standard_normal((4, 2)).astype(np.float32)
    out = net.forward(data=x, label=y)
    w1, b1 = (b.data for b in net.params["ip1"])
    w2, b2 = (b.data for b in net.params["ip2"])
    h = np.maximum(x @ w1.T + b1, 0)
    pred = h @ w2.T + b2
    expected = np.sum((pred - y) ** 2) / (2 * 4)
    assert list(out) == ["loss"]
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(net.blobs["ip2"].data, pred, rtol=1e-5, atol=1e-6)


def test_forward_reshapes_inputs_of_another_batch_size():
    net = build(MLP)
    out = net.forward(data=np.ones((7, 3), np.float32), label=np.zeros((7, 2), np.float32))
    assert net.blobs["ip2"].shape == (7, 2) and out["loss"].shape == ()


def test_forward_start_end_and_extra_blobs():
    net = build(MLP)
    net.blobs["data"].data[...] = 1
    out = net.forward(end="ip1", blobs=["data"])
    assert set(out) == {"ip1", "data"}
    w1, b1 = (b.data for b in net.params["ip1"])
    np.testing.assert_allclose(out["ip1"], np.ones((4, 3)) @ w1.T + b1, rtol=1e-5)  # before relu1


def test_forward_rejects_unknown_input():
    net = build(MLP)
    with pytest.raises(NetError, match="'ip1'.*not an input"):
        net.forward(ip1=np.zeros((4, 5)))


def test_backward_gradient_matches_finite_differences():
    # a smooth activation: float32 finite differences must not straddle ReLU's kink
    net = build(MLP.replace('type: "ReLU"', 'type: "TanH"'), phase=framework.TRAIN)
    rng = np.random.default_rng(1)
    net.blobs["data"].data[...] = rng.standard_normal((4, 3))
    net.blobs["label"].data[...] = rng.standard_normal((4, 2))
    net.clear_param_diffs()
    loss = net.forward_backward()
    w = net.params["ip1"][0]
    analytic = w.diff.copy()
    numeric = np.zeros_like(analytic)
    eps = 1e-2
    for idx in np.ndindex(w.shape):
        old = w.data[idx]
        w.data[idx] = old + eps
        plus = net.forward_loss()
        w.data[idx] = old - eps
        minus = net.forward_loss()
        w.data[idx] = old
        numeric[idx] = (plus - minus) / (2 * eps)
    assert loss > 0
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)


def test_loss_weight_scales_loss_and_gradient():
    text = MLP.replace('top: "loss" }', 'top: "loss" loss_weight: 3 }')
    plain, weighted = build(MLP, phase=framework.TRAIN), build(text, phase=framework.TRAIN)
    weighted.copy_trained_layers_from(plain.to_proto())
    for net in (plain, weighted):
        net.blobs["data"].data[...] = 0.5
        net.blobs["label"].data[...] = -0.25
        net.clear_param_diffs()
    l1, l3 = plain.forward_backward(), weighted.forward_backward()
    np.testing.assert_allclose(l3, 3 * l1, rtol=1e-6)
    np.testing.assert_allclose(weighted.params["ip2"][0].diff, 3 * plain.params["ip2"][0].diff, rtol=1e-5)
    assert weighted.output_loss_weights == {"loss": 3.0}


def test_backward_needs_follow_caffe():
    net = build("""
    force_backward: false
    layer { name: "data" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
    layer { name: "frozen" type: "InnerProduct" bottom: "data" top: "f"
            param { lr_mult: 0 } param { lr_mult: 0 } inner_product_param { num_output: 4 } }
    layer { name: "ip" type: "InnerProduct" bottom: "f" top: "ip" inner_product_param { num_output: 3 } }
    layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """, phase=framework.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["frozen"] is False      # lr_mult 0 and its bottom needs nothing
    assert need["ip"] is True
    assert need["acc"] is False         # no backward, no loss
    assert need["loss"] is True
    bottom_need = dict(zip(net.layer_names, net.bottom_need_backward))
    assert bottom_need["ip"] == [False]  # the frozen layer needs no gradient
    assert bottom_need["loss"][1] is False  # never to labels


def test_force_backward_reaches_the_input():
    text = MLP.replace('name: "mlp"', 'name: "mlp" force_backward: true')
    net = build(text)
    net.blobs["data"].data[...] = 1
    net.forward()
    diffs = net.backward()
    assert set(diffs) == {"data", "label"}
    assert np.abs(diffs["data"]).sum() > 0


def test_propagate_down_false_stops_the_gradient():
    text = MLP.replace('bottom: "ip1" top: "ip2"', 'bottom: "ip1" top: "ip2" propagate_down: false')
    net = build(text, phase=framework.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["ip2"] is True and need["relu1"] is False and need["ip1"] is False


def test_shared_parameters_are_one_blob_and_gradients_add():
    net = build("""
    layer { name: "data" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya"
            param { name: "w" } param { name: "bias" } inner_product_param { num_output: 2 } }
    layer { name: "ipb" type: "InnerProduct" bottom: "b" top: "yb"
            param { name: "w" } param { name: "bias" } inner_product_param { num_output: 2 } }
    layer { name: "sum" type: "Eltwise" bottom: "ya" bottom: "yb" top: "s" }
    layer { name: "loss" type: "Reduction" bottom: "s" top: "loss" loss_weight: 1 }
    """, phase=framework.TRAIN)
    assert net.params["ipa"][0] is net.params["ipb"][0]
    assert len(net.learnable_params) == 2
    net.blobs["a"].data[...] = 1.0
    net.blobs["b"].data[...] = 2.0
    net.clear_param_diffs()
    net.forward_backward()
    # d(sum of both outputs)/dW = sum over batch of (a + b) inputs for each output row
    np.testing.assert_allclose(net.params["ipa"][0].diff, np.full((2, 3), 2 * (1.0 + 2.0)))


def test_shared_parameter_shape_mismatch_is_an_error():
    with pytest.raises(NetError, match="Cannot share param 'w' owned by layer 'ipa' with layer 'ipb'"):
        build("""
        layer { name: "data" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya" param { name: "w" }
                inner_product_param { num_output: 2 } }
        layer { name: "ipb" type: "InnerProduct" bottom: "a" top: "yb" param { name: "w" }
                inner_product_param { num_output: 4 } }
        """)


# -- wiring errors ------------------------------------------------------------------
def test_unknown_bottom_names_layer_and_index():
    with pytest.raises(NetError, match=r"Unknown bottom blob 'nope' \(layer 'relu', bottom index 0\)"):
        build('layer { name: "relu" type: "ReLU" bottom: "nope" top: "y" }')


def test_top_produced_twice_is_an_error():
    with pytest.raises(NetError, match="Top blob 'y' produced by multiple sources"):
        build("""
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 } } }
        layer { name: "a" type: "ReLU" bottom: "x" top: "y" }
        layer { name: "b" type: "ReLU" bottom: "x" top: "y" }
        """)


def test_unknown_layer_type_lists_known_types():
    with pytest.raises(LayerError, match=r"unknown layer type 'Convolutoin'.*Convolution.*ReLU"):
        build('layer { name: "c" type: "Convolutoin" }')


def test_wrong_bottom_count_names_the_layer():
    with pytest.raises(LayerError, match="layer 'loss' .*EuclideanLoss.*bottom"):
        build("""
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 2 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "x" top: "l" }
        """)


def test_propagate_down_count_must_match():
    with pytest.raises(NetError, match="'relu'.*propagate_down"):
        build("""
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 } } }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "y" propagate_down: true propagate_down: false }
        """)


def test_in_place_layers_share_the_blob():
    net = build(MLP)
    relu = net.layer_by_name("relu1")
    assert relu is net.layers[net.layer_names.index("relu1")]
    assert net.blobs["ip1"] is net._tops[net.layer_names.index("ip1")][0]
    assert net.blobs["ip1"] is net._tops[net.layer_names.index("relu1")][0]


# -- weights --------------------------------------------------------------------------
def test_save_and_reload_gives_identical_outputs(tmp_path):
    framework.set_random_seed(5)
    net = build(MLP)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    first = net.forward(data=x)["loss"].copy()
    path = tmp_path / "mlp.caffemodel"
    net.save(str(path))
    other = build(MLP, weights=str(path))
    for name in net.params:
        for a, b in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(other.forward(data=x)["loss"], first)


def test_caffemodel_written_with_protobuf_classes_loads(tmp_path):
    """A weights file made by another tool (plain caffe_pb2, legacy 4-D dims for the bias)."""
    param = caffe_pb2.NetParameter(name="other-tool")
    layer = param.layer.add(name="ip1", type="InnerProduct")
    w = layer.blobs.add()
    w.shape.dim.extend([5, 3])
    w.data.extend(np.arange(15, dtype=np.float32))
    b = layer.blobs.add(num=1, channels=1, height=1, width=5)
    b.data.extend([1, 2, 3, 4, 5])
    param.layer.add(name="not_in_net", type="ReLU")
    path = tmp_path / "other.caffemodel"
    path.write_bytes(param.SerializeToString())
    net = build(MLP)
    net.copy_from(str(path))
    np.testing.assert_array_equal(net.params["ip1"][0].data, np.arange(15).reshape(5, 3))
    np.testing.assert_array_equal(net.params["ip1"][1].data, [1, 2, 3, 4, 5])


def test_weight_shape_mismatch_names_layer_and_both_shapes(tmp_path):
    param = caffe_pb2.NetParameter()
    layer = param.layer.add(name="ip1", type="InnerProduct")
    w = layer.blobs.add()
    w.shape.dim.extend([3, 5])
    w.data.extend(np.zeros(15, np.float32))
    layer.blobs.add().shape.dim.extend([5])
    layer.blobs[1].data.extend(np.zeros(5, np.float32))
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(param.SerializeToString())
    with pytest.raises(WeightsError, match=r"layer 'ip1'.*Source param shape is 3 5 \(15\); "
                                           r"target param shape is 5 3 \(15\)"):
        build(MLP).copy_from(str(path))



@pytest.mark.parametrize("count", [0, 1, 3])
def test_weight_blob_count_mismatch_is_refused(tmp_path, count):
    # net.cpp CopyTrainedLayersFrom: CHECK_EQ(target_blobs.size(), source_layer.blobs_size()),
    # also for a file layer without blobs.
    param = caffe_pb2.NetParameter()
    layer = param.layer.add(name="ip1", type="InnerProduct")
    for _ in range(count):
        layer.blobs.add().shape.dim.extend([1])
        layer.blobs[-1].data.append(0.0)
    path = tmp_path / "few.caffemodel"
    path.write_bytes(param.SerializeToString())
    with pytest.raises(WeightsError, match=rf"few.caffemodel.*layer 'ip1'.*the file has {count}, "
                                           r"the net expects 2"):
        build(MLP).copy_from(str(path))

def test_not_a_caffemodel_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.caffemodel"
    path.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(WeightsError, match="junk.caffemodel"):
        build(MLP).copy_from(str(path))
    with pytest.raises(WeightsError, match="not found"):
        build(MLP).copy_from(str(tmp_path / "missing.caffemodel"))


def test_share_trained_layers_with_uses_the_same_blobs():
    train = build(MLP, phase=framework.TRAIN)
    test = build(MLP)
    test.share_trained_layers_with(train)
    assert test.params["ip1"][0] is train.params["ip1"][0]
    train.params["ip1"][0].data[...] = 7
    assert (test.params["ip1"][0].data == 7).all()


def test_net_from_prototxt_path_and_weights_positional(tmp_path):
    proto_path = tmp_path / "mlp.prototxt"
    proto_path.write_text(MLP)
    net = framework.Net(str(proto_path), framework.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    again = framework.Net(str(proto_path), str(weights), framework.TEST)
    np.testing.assert_array_equal(again.params["ip2"][0].data, net.params["ip2"][0].data)
    kw = framework.Net(str(proto_path), framework.TEST, weights=str(weights))
    np.testing.assert_array_equal(kw.params["ip2"][0].data, net.params["ip2"][0].data)


def test_set_input_arrays_feeds_the_memory_data_layer():
    net = build("""
    layer { name: "mem" type: "MemoryData" top: "data" top: "label"
            memory_data_param { batch_size: 2 channels: 1 height: 1 width: 3 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 1 } }
    layer { name: "silence" type: "Silence" bottom: "label" }
    """)
    data = np.arange(12, dtype=np.float32).reshape(4, 1, 1, 3)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[2:])
    with pytest.raises(NetError, match="MemoryData"):
        build(MLP).set_input_arrays(data, np.zeros(4, np.float32))
