"""Net.memory_saving: the opt-in inference mode that frees intermediate blobs after their last reader."""
import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework.errors import NetError
from proto import caffe_pb2

# splits (data feeds two branches), in-place ReLU, a Flatten view, an Eltwise join,
# and a SoftmaxWithLoss whose second top shares the layer's own buffer
NET = """
name: "ms"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 3 dim: 2 dim: 5 dim: 5 } shape { dim: 3 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "a_relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "data" top: "b"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "flat" type: "Flatten" bottom: "sum" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" top: "prob" }
"""


def make_net(phase=framework.TEST):
    framework.set_random_seed(3)
    param = text_format.Parse(NET, caffe_pb2.NetParameter())
    param.state.phase = phase
    return framework.Net(param)


def inputs(seed):
    rng = np.random.default_rng(seed)
    return {"data": rng.standard_normal((3, 2, 5, 5)).astype(np.float32),
            "label": np.array([0, 2, 1], dtype=np.float32)}


def test_outputs_equal_the_normal_forward_on_repeated_calls():
    plain, saving = make_net(), make_net()
    saving.memory_saving = True
    assert saving.memory_saving and not plain.memory_saving
    for seed in range(3):  # later forwards get fresh arrays for the dropped blobs
        want = {k: v.copy() for k, v in plain.forward(**inputs(seed)).items()}
        got = saving.forward(**inputs(seed))
        assert set(got) == {"loss", "prob"}
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        assert saving.forward_loss() == pytest.approx(plain.forward_loss())


def test_intermediates_are_dropped_inputs_and_outputs_kept():
    net = make_net()
    net.memory_saving = True
    net.forward(**inputs(0))
    for name in ("a", "b", "sum", "flat", "ip"):
        blob = net.blobs[name]
        assert not blob.data.flags.writeable and not blob.data.any(), name
        assert blob.data.shape == blob.shape  # the shape survives
    np.testing.assert_array_equal(net.blobs["data"].data, inputs(0)["data"])
    assert net.blobs["prob"].data.flags.writeable and net.blobs["prob"].data.sum() == pytest.approx(3)


def test_requested_blobs_and_end_tops_are_kept():
    plain, net = make_net(), make_net()
    net.memory_saving = True
    want = plain.forward(blobs=["a"], **inputs(1))["a"].copy()
    got = net.forward(blobs=["a"], **inputs(1))
    np.testing.assert_array_equal(got["a"], want)
    assert not net.blobs["b"].data.flags.writeable
    out = net.forward(end="sum", **inputs(1))
    assert np.abs(out["sum"]).sum() > 0 and net.blobs["sum"].data.flags.writeable


def test_backward_and_partial_forward_are_refused():
    net = make_net(framework.TRAIN)
    net.memory_saving = True
    net.forward(**inputs(0))
    with pytest.raises(NetError, match="memory-saving inference mode"):
        net.backward()
    with pytest.raises(NetError, match="memory-saving inference mode"):
        net.forward_backward()
    with pytest.raises(NetError, match="must start at the first layer"):
        net.forward(start="b")


def test_switching_off_restores_writable_blobs_and_training():
    net, plain = make_net(framework.TRAIN), make_net(framework.TRAIN)
    net.memory_saving = True
    net.forward(**inputs(2))
    net.memory_saving = False
    assert all(b.data.flags.writeable for b in net.blobs.values())
    for n in (net, plain):
        for k, v in inputs(2).items():
            n.blobs[k].data[...] = v
    assert net.forward_backward() == pytest.approx(plain.forward_backward())
    np.testing.assert_allclose(net.params["a"][0].diff, plain.params["a"][0].diff, rtol=1e-6)


def test_dropped_arrays_are_reused_after_the_first_forward():
    net = make_net()
    net.memory_saving = True
    for seed in range(2):
        net.forward(**inputs(seed))
    pool = net._buffer_pool
    made = set(pool._made.keys())
    assert made  # the second forward's tops came from the pool
    for seed in range(2, 5):
        plain = make_net()
        want = {k: v.copy() for k, v in plain.forward(**inputs(seed)).items()}
        got = net.forward(**inputs(seed))
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert set(pool._made.keys()) == made  # no new arrays: every top reused a dropped one


def test_an_array_the_user_holds_is_never_reused():
    net = make_net()
    net.memory_saving = True
    net.forward(**inputs(0))
    held = net.forward(blobs=["a"], **inputs(1))["a"]
    net.forward(**inputs(2))  # "a" is written again (as any forward overwrites its blobs), then dropped
    want = held.copy()
    assert not net.blobs["a"].data.flags.writeable
    for seed in range(3, 6):  # from now on no layer may write into the dropped array the user holds
        net.forward(**inputs(seed))
        np.testing.assert_array_equal(held, want)


def test_buffer_pool_takes_back_only_its_own_unshared_arrays():
    from framework.blob import Blob
    from framework.buffers import BufferPool

    pool = BufferPool()
    blob = Blob((2, 3))
    pool.give(blob)  # not made by the pool
    assert pool.free_nbytes == 0
    blob.data = pool.take((2, 3), np.float32)
    other = Blob((3, 2))
    other.data = blob.data.reshape(3, 2)  # a second blob sees the memory (Caffe's ShareData)
    pool.give(blob)
    assert pool.free_nbytes == 0
    del other
    pool.give(blob)
    assert pool.free_nbytes == 24
    reused = pool.take((6,), np.float32)
    assert reused.base is blob.data.base and pool.free_nbytes == 0
    assert pool.take((3,), np.float64).nbytes == 24  # a new one (nothing free)


@pytest.mark.parametrize("saving", [False, True])
def test_a_broadcast_constant_input_is_not_taken_for_a_dropped_blob(saving):
    # a caller may set an input to a read-only broadcast view; only the net's own stand-ins for
    # dropped blobs are replaced by fresh arrays
    net, plain = make_net(), make_net()
    net.memory_saving = saving
    constant = np.broadcast_to(np.float32(0.5), (3, 2, 5, 5))
    net.blobs["data"].data = constant
    plain.blobs["data"].data[...] = 0.5
    for n in (net, plain):
        n.blobs["label"].data[...] = [0, 2, 1]
    assert net.forward_loss() == pytest.approx(plain.forward_loss())
    assert net.blobs["data"].data is constant
    np.testing.assert_array_equal(net.blobs["prob"].data, plain.blobs["prob"].data)
