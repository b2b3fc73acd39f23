"""The benchmark's nets, as NetParameters, and their random weights.

- ResNet-50 deploy: ``models/resnet/ResNet-50-deploy.prototxt`` (the original
  release's layout: BatchNorm with use_global_stats + Scale with bias).
- ResNet-50 training variant: the same layers, BatchNorm on batch statistics
  (``use_global_stats`` removed, phase TRAIN), ``prob`` replaced by a
  SoftmaxWithLoss on an Input ``label``.
- LeNet training: ``models/lenet/lenet_train_test.prototxt`` in phase TRAIN
  with its Data layer replaced by two Input tops (data 64x1x28x28, label 64).
- CaffeNet deploy: written out below (BVLC reference CaffeNet's layers: LRN
  after pooling, grouped conv2/4/5, dropout, 10x3x227x227 input).
"""
import os

import numpy as np
from google.protobuf import text_format

from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET50_DEPLOY = os.path.join(ROOT, "models", "resnet", "ResNet-50-deploy.prototxt")
LENET_TRAIN_TEST = os.path.join(ROOT, "models", "lenet", "lenet_train_test.prototxt")

CAFFENET_DEPLOY = """
name: "CaffeNet"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 10 dim: 3 dim: 227 dim: 227 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
        convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv3" type: "Convolution" bottom: "norm2" top: "conv3"
        convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
        convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
        convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
        inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
        inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8"
        inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def _read(path):
    from framework.net import read_net_param
    return read_net_param(path)


def _set_input_shape(param, name, dims):
    for layer in param.layer:
        if layer.type == "Input" and name in layer.top:
            shape = layer.input_param.shape[list(layer.top).index(name)
                                            if len(layer.input_param.shape) > 1 else 0]
            del shape.dim[:]
            shape.dim.extend(dims)
            return
    raise ValueError(f"no Input top named {name!r}")


def resnet50_deploy(batch, size=224):
    """ResNet-50 deploy (TEST) with input (batch, 3, size, size)."""
    param = _read(RESNET50_DEPLOY)  # the legacy input header is upgraded to an Input layer
    _set_input_shape(param, "data", (batch, 3, size, size))
    param.state.phase = caffe_pb2.TEST
    return param


def resnet50_train(batch, size=224):
    """ResNet-50 for a training step: batch statistics, SoftmaxWithLoss on an Input label."""
    param = resnet50_deploy(batch, size)
    param.state.phase = caffe_pb2.TRAIN
    for layer in param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.ClearField("use_global_stats")
        if layer.type == "Input":
            layer.top.append("label")
            layer.input_param.shape.add().dim.append(batch)
    prob = [layer for layer in param.layer if layer.name == "prob"][0]
    prob.type = "SoftmaxWithLoss"
    prob.bottom.append("label")
    prob.top[0] = "loss"
    prob.name = "loss"
    return param


def lenet_train(batch=64):
    """LeNet (lenet_train_test.prototxt, phase TRAIN) with Input data/label instead of Data."""
    source = _read(LENET_TRAIN_TEST)
    param = caffe_pb2.NetParameter(name=source.name)
    param.state.phase = caffe_pb2.TRAIN
    data_done = False
    for layer in source.layer:
        phases = [rule.phase for rule in layer.include if rule.HasField("phase")]
        if phases and caffe_pb2.TRAIN not in phases:
            continue
        if layer.type == "Data":
            if data_done:
                continue
            data_done = True
            inp = param.layer.add(name="data", type="Input")
            inp.top.extend(["data", "label"])
            inp.input_param.shape.add().dim.extend([batch, 1, 28, 28])
            inp.input_param.shape.add().dim.append(batch)
            continue
        new = param.layer.add()
        new.CopyFrom(layer)
        del new.include[:]
    return param


def caffenet_deploy(batch=10, size=227):
    """BVLC reference CaffeNet deploy with input (batch, 3, size, size)."""
    param = text_format.Parse(CAFFENET_DEPLOY, caffe_pb2.NetParameter())
    _set_input_shape(param, "data", (batch, 3, size, size))
    param.state.phase = caffe_pb2.TEST
    return param


def randomize_weights(net, seed=0):
    """Sane random weights: N(0, 1/fan_in) filters, small biases, BatchNorm stats near N(0, 1).

    Keeps the activations of deep ReLU/residual stacks bounded (so outputs of two
    frameworks can be compared) without any pretrained file.
    """
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if not layer.blobs:
            continue
        if layer.type == "BatchNorm":
            channels = layer.blobs[0].shape[0]
            layer.blobs[0].data[...] = rng.normal(0, 0.1, channels)
            layer.blobs[1].data[...] = rng.uniform(0.5, 1.5, channels)
            layer.blobs[2].data[...] = 1.0
            continue
        for i, blob in enumerate(layer.blobs):
            if blob.num_axes >= 2:
                fan_in = blob.count // blob.shape[0]
                blob.data[...] = rng.normal(0, np.sqrt(1.0 / fan_in), blob.shape)
            elif layer.type == "Scale" and i == 0:
                blob.data[...] = rng.uniform(0.8, 1.2, blob.shape)
            else:
                blob.data[...] = rng.normal(0, 0.01, blob.shape)


def weights_dict(net):
    """{'layer/i': array} of every layer blob (for handing weights to a subprocess)."""
    return {f"{name}/{i}": blob.data for name, layer in zip(net.layer_names, net.layers)
            for i, blob in enumerate(layer.blobs)}


def load_weights_dict(net, weights):
    """Copy a :func:`weights_dict` (or an npz of one) into ``net``."""
    for name, layer in zip(net.layer_names, net.layers):
        for i, blob in enumerate(layer.blobs):
            blob.data[...] = weights[f"{name}/{i}"]


def conv_fc_flops(net):
    """Multiply-add FLOPs (2 per MAC) of the Convolution and InnerProduct layers' forward."""
    total = 0
    for layer, bottoms, tops in zip(net.layers, net._bottoms, net._tops):
        if layer.type in ("Convolution", "InnerProduct"):
            weights = layer.blobs[0]
            outputs_per_row = weights.shape[0]
            if layer.type == "InnerProduct" and layer.layer_param.inner_product_param.transpose:
                outputs_per_row = weights.shape[-1]
            macs_per_output = weights.count // outputs_per_row
            outputs = tops[0].count
            total += 2 * macs_per_output * outputs
    return total
