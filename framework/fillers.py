"""Weight fillers, matching Caffe's filler.hpp (constant, uniform, gaussian, ...).

``fill(blob, filler_param)`` fills ``blob.data`` in place from a
``FillerParameter``; the random streams come from ``framework.random``.
"""
import math

import numpy as np

from . import random as _random
from .errors import CaffeError


def _fan_in_out(shape):
    count = int(np.prod(shape, dtype=np.int64))
    # filler.hpp: fan_in = count / shape(0); fan_out = count / shape(1) (count for 1-D blobs)
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_n(param, shape):
    from proto import caffe_pb2
    fan_in, fan_out = _fan_in_out(shape)
    norm = param.variance_norm
    if norm == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if norm == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _no_sparse(param):
    if param.sparse != -1:
        raise CaffeError(f"sparsity is not supported by the '{param.type}' filler")


def _constant(param, shape):
    _no_sparse(param)
    return np.full(shape, param.value)


def _uniform(param, shape):
    _no_sparse(param)
    if param.min > param.max:  # math_functions.cpp caffe_rng_uniform: CHECK_LE(a, b)
        raise CaffeError(f"the uniform filler needs min <= max, "
                         f"got min {param.min} > max {param.max}")
    return _random.rng().uniform(param.min, param.max, size=shape)


def _gaussian(param, shape):
    if param.std <= 0:  # math_functions.cpp caffe_rng_gaussian: CHECK_GT(sigma, 0)
        raise CaffeError(f"the gaussian filler needs std > 0, got {param.std}")
    if param.sparse < -1:  # filler.hpp: CHECK_GE(sparse, -1)
        raise CaffeError(f"the gaussian filler's sparse must be -1 (dense) or >= 0, "
                         f"got {param.sparse}")
    values = _random.rng().normal(param.mean, param.std, size=shape)
    if param.sparse >= 0:
        # filler.hpp: each output (shape[0]) keeps an input with probability sparse / num_outputs
        if len(shape) < 1:
            raise CaffeError("a sparse gaussian filler needs a blob with at least one axis")
        num_outputs = shape[0]
        probability = param.sparse / float(num_outputs)
        if probability > 1:  # math_functions.cpp caffe_rng_bernoulli: CHECK_LE(p, 1)
            raise CaffeError(f"the gaussian filler's sparse ({param.sparse}) exceeds the blob's "
                             f"first axis ({num_outputs}): the keep probability would pass 1")
        values *= _random.rng().random(size=shape) < probability
    return values


def _positive_unitball(param, shape):
    _no_sparse(param)
    values = _random.rng().uniform(0.0, 1.0, size=shape)
    num = shape[0] if shape else 1
    rows = values.reshape(num, -1)
    rows /= rows.sum(axis=1, keepdims=True)  # each output's inputs sum to one
    return values


def _xavier(param, shape):
    _no_sparse(param)
    scale = math.sqrt(3.0 / _variance_n(param, shape))
    return _random.rng().uniform(-scale, scale, size=shape)


def _msra(param, shape):
    _no_sparse(param)
    std = math.sqrt(2.0 / _variance_n(param, shape))
    return _random.rng().normal(0.0, std, size=shape)


def _bilinear(param, shape):
    """Bilinear upsampling kernel for Deconvolution (filler.hpp BilinearFiller)."""
    _no_sparse(param)
    if len(shape) != 4:
        raise CaffeError(f"the bilinear filler needs a 4-D blob, got shape {tuple(shape)}")
    if shape[2] != shape[3]:
        raise CaffeError(f"the bilinear filler needs a square kernel, got {shape[2]}x{shape[3]}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    pos = np.arange(k)
    weights_1d = 1 - np.abs(pos / f - c)
    kernel = np.outer(weights_1d, weights_1d)
    return np.broadcast_to(kernel, shape).copy()


FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(blob, param):
    """Fill ``blob.data`` according to the FillerParameter ``param``."""
    try:
        filler = FILLERS[param.type]
    except KeyError:
        raise CaffeError(f"unknown filler type '{param.type}' (known: {', '.join(FILLERS)})") from None
    blob.data[...] = filler(param, blob.shape)
    return blob
