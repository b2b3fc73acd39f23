"""Real Caffe deploy files from ../shared/caffe-models build in TEST phase and run.

Inputs are fed at batch 1 (the net reshapes), which keeps the suite quick while
still checking every layer's shape rules on the real architectures.
"""
import os

import numpy as np
import pytest

import framework
from model_utils import randomize_params

DEPLOY_NETS = [
    # path under caffe-models, input blob, expected output blob, classes
    ("bvlc/examples/mnist/lenet.prototxt", "prob", 10),
    ("bvlc/examples/cifar10/cifar10_quick.prototxt", "prob", 10),
    ("bvlc/examples/cifar10/cifar10_full.prototxt", "prob", 10),
    ("bvlc/models/bvlc_reference_caffenet/deploy.prototxt", "prob", 1000),
    ("bvlc/models/bvlc_alexnet/deploy.prototxt", "prob", 1000),
    ("bvlc/models/bvlc_googlenet/deploy.prototxt", "prob", 1000),
    ("bvlc/models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt", "fc-rcnn", 200),
    ("bvlc/models/finetune_flickr_style/deploy.prototxt", "prob", 20),
    ("resnet/ResNet-50-deploy.prototxt", "prob", 1000),
    ("resnet/ResNet-101-deploy.prototxt", "prob", 1000),
    ("resnet/ResNet-152-deploy.prototxt", "prob", 1000),
]


def models_dir(shared_dir):
    return os.path.join(shared_dir, "caffe-models")


@pytest.mark.parametrize("relpath,output,classes", DEPLOY_NETS, ids=[d[0].split("/")[-2] + "/" +
                                                                     d[0].split("/")[-1] for d in DEPLOY_NETS])
def test_deploy_net_builds_and_runs_forward(shared_dir, relpath, output, classes):
    framework.set_random_seed(0)
    net = framework.Net(os.path.join(models_dir(shared_dir), relpath), framework.TEST)
    randomize_params(net)
    assert len(net.inputs) == 1
    data = net.inputs[0]
    shape = (1,) + net.blobs[data].shape[1:]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = net.forward(**{data: x})
    assert output in out
    result = out[output]
    assert result.shape[0] == 1 and result.reshape(1, -1).shape[1] == classes
    assert np.isfinite(result).all()
    assert np.ptp(result) > 0, "random weights must give a non-constant output"
    if output == "prob":
        np.testing.assert_allclose(result.reshape(1, -1).sum(axis=1), 1.0, rtol=1e-4)


def test_lenet_deploy_at_its_own_batch_size(shared_dir):
    net = framework.Net(os.path.join(models_dir(shared_dir), "bvlc/examples/mnist/lenet.prototxt"),
                        framework.TEST)
    assert net.blobs["data"].shape == (64, 1, 28, 28)
    out = net.forward()
    assert out["prob"].shape == (64, 10)
    assert [name for name in net.params] == ["conv1", "conv2", "ip1", "ip2"]
    assert net.params["conv1"][0].shape == (20, 1, 5, 5)
    assert net.params["ip1"][0].shape == (500, 800)


def test_resnet50_runs_backward(shared_dir):
    framework.set_random_seed(0)
    path = os.path.join(models_dir(shared_dir), "resnet/ResNet-50-deploy.prototxt")
    from proto import caffe_pb2
    from framework.net import read_net_param
    param = read_net_param(path)
    param.force_backward = True
    param.state.phase = caffe_pb2.TEST
    net = framework.Net(param)
    randomize_params(net)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    out = net.forward(data=x)
    grad = np.zeros_like(out["prob"])
    grad[0, 3] = 1.0
    diffs = net.backward(prob=grad)
    assert diffs["data"].shape == (1, 3, 224, 224)
    assert np.isfinite(diffs["data"]).all() and np.abs(diffs["data"]).sum() > 0
    # force_backward also fills the parameter gradients of the first convolution
    assert np.abs(net.params["conv1"][0].diff).sum() > 0
