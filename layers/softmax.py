"""Softmax: the layer and the reusable, numerically stable softmax functions.

``softmax(x, axis)`` is shared with the loss layers (SoftmaxWithLoss and
InfogainLoss apply it to their first bottom).
"""
import numpy as np

from framework.layer import Layer, register_layer


def softmax(x, axis, out=None):
    """Stable softmax of ``x`` along ``axis``: y = exp(x - max) / sum(exp(x - max)).

    Subtracting the per-position maximum keeps exp from overflowing
    (softmax_layer.cpp does the same, then divides by the sum).  ``out`` may
    be ``x`` itself (in-place) or another array of x's shape and dtype.
    Returns the result array.
    """
    if out is None:
        out = np.empty_like(x)
    peak = x.max(axis=axis, keepdims=True)
    np.subtract(x, peak, out=out)
    np.exp(out, out=out)
    total = out.sum(axis=axis, keepdims=True)
    np.divide(out, total, out=out)
    return out


def softmax_backward(y, dy, axis, out=None):
    """Gradient through a softmax: dx = (dy - sum(dy * y, axis)) * y.

    ``y`` is the softmax output, ``dy`` the upstream gradient.  ``out`` may be
    ``dy`` itself (the in-place case, where top and bottom share their diff).
    """
    dot = np.sum(dy * y, axis=axis, keepdims=True)
    out = np.subtract(dy, dot, out=out)
    out *= y
    return out


def softmax_axis(layer, blob, axis, field):
    """Canonical form of a (possibly negative) axis of ``blob``, or a LayerError naming ``field``."""
    try:
        return blob.canonical_axis(axis)
    except IndexError:
        raise layer.error(f"{field} {axis} is out of range for a bottom of shape {blob.shape}") from None


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over one axis (``softmax_param.axis``, default 1: the channels).

    bottom: x of any shape; top: y, same shape; y sums to 1 along the axis.
    Backward: dx = (dy - sum(dy * y, axis)) * y.  May run in place.
    ``softmax_param.engine`` selects a backend in Caffe; every engine gives
    the same numbers here.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        self.axis_param = self.layer_param.softmax_param.axis

    def reshape(self, bottom, top):
        self.axis = softmax_axis(self, bottom[0], self.axis_param, "softmax_param.axis")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        softmax(bottom[0].data, self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            softmax_backward(top[0].data, top[0].diff, self.axis, out=bottom[0].diff)
