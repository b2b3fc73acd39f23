"""Helpers for tests on real architectures whose deploy files carry no weights."""
import numpy as np


def randomize_params(net, seed=0):
    """Give every parameter a sensible random value so activations neither vanish nor explode.

    Weights: gaussians of variance 1/fan-in (fan-in = count / shape[0]), which keeps
    activations of deep ReLU/residual stacks bounded so softmax does not saturate; biases small;
    BatchNorm statistics: mean ~ N(0, 0.1), variance in [0.5, 1.5], scale factor 1.
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
