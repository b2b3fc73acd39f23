"""framework.DataParallelNet: the batch split over net replicas on threads gives the net's own
outputs (float32 round-off apart), with BLAS held to one thread while it runs."""
import numpy as np
import pytest
from google.protobuf import text_format
from threadpoolctl import threadpool_info

import framework
from proto import caffe_pb2

NET = """
name: "dp"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def make_net(text=NET):
    framework.set_random_seed(11)
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.state.phase = framework.TEST
    return framework.Net(param)


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


def blas_threads():
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


@pytest.mark.parametrize("threads, batch", [(2, 6), (2, 5), (3, 7), (4, 2)])
def test_outputs_equal_the_net_forward_on_the_whole_batch(threads, batch):
    x = images(batch)
    want = make_net().forward(data=x, blobs=["pool"])
    dp = framework.DataParallelNet(make_net(), threads=threads)
    got = dp.forward(data=x, blobs=["pool"])
    assert set(got) == {"prob", "pool"}
    for name in got:  # a slice may take another GEMM layout or BLAS blocking: float32 round-off
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    # each replica ran one contiguous slice
    used = min(threads, batch)
    sizes = [r.blobs["prob"].shape[0] for r in dp.replicas[:used]]
    assert sizes == [batch * (k + 1) // used - batch * k // used for k in range(used)]


def test_replicas_share_the_weights_and_start_at_their_share_of_the_batch():
    net = make_net()
    dp = framework.DataParallelNet(net, threads=3)
    assert dp.replicas[0] is net and len(dp.replicas) == 3
    for replica in dp.replicas[1:]:
        assert replica.params["conv"][0] is net.params["conv"][0]
        assert replica.blobs["data"].shape[0] == 2  # 6 images / 3 threads
    net.params["ip"][0].data[...] *= -1  # a change to the net's weights reaches every replica
    x = images(6, seed=1)
    np.testing.assert_allclose(dp.forward(data=x)["prob"], make_net_with(net).forward(data=x)["prob"],
                               rtol=1e-6, atol=1e-7)


def make_net_with(source):
    net = make_net()
    net.share_trained_layers_with(source)
    return net


def test_blas_runs_single_threaded_inside_and_as_before_after():
    before = blas_threads()
    dp = framework.DataParallelNet(make_net(), threads=2)
    seen = []
    original = dp.replicas[1].forward

    def recording_forward(**kwargs):
        seen.append(blas_threads())
        return original(**kwargs)

    dp.replicas[1].forward = recording_forward
    dp.forward(data=images(4))
    assert seen and all(t == 1 for t in seen[0])
    assert blas_threads() == before


def test_a_single_image_runs_on_the_first_replica_alone():
    x = images(1)
    dp = framework.DataParallelNet(make_net(), threads=2)
    np.testing.assert_array_equal(dp.forward(data=x)["prob"], make_net().forward(data=x)["prob"])


def test_bad_inputs_are_named():
    dp = framework.DataParallelNet(make_net(), threads=2)
    with pytest.raises(framework.NetError, match="'label'.*not inputs of net 'dp'"):
        dp.forward(data=images(2), label=np.zeros(2))
    two_inputs = NET.replace('top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } }',
                             'top: "data" top: "extra" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } '
                             'shape { dim: 6 dim: 2 } }')
    dp2 = framework.DataParallelNet(make_net(two_inputs), threads=2)
    with pytest.raises(framework.NetError, match="same batch size"):
        dp2.forward(data=images(4), extra=np.zeros((3, 2), np.float32))


def test_a_net_without_input_blobs_is_refused():
    text = NET.replace('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }',
                       'layer { name: "data" type: "DummyData" top: "data" '
                       'dummy_data_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }')
    with pytest.raises(framework.NetError, match="no input blobs"):
        framework.DataParallelNet(make_net(text), threads=2)
